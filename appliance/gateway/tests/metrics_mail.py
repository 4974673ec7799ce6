#!/usr/bin/env python3
"""Sends mail to a running gateway with Python's smtplib, one SMTP session per message.

usage: metrics_mail.py MX SUBMISSION CA USER PASSWORD LOCAL_RCPT REMOTE_RCPT MX_COUNT
Sends MX_COUNT messages from an Internet sender to LOCAL_RCPT on the MX listener, then, as USER
on submission (STARTTLS + AUTH), one message to LOCAL_RCPT and one to REMOTE_RCPT. Prints JSON
{"mx": n, "submission": n}: the messages each listener accepted with 250."""
import json
import smtplib
import ssl
import sys
from email.message import EmailMessage

mx, sub, ca, user, password, local_rcpt, remote_rcpt, mx_count = sys.argv[1:9]
ctx = ssl.create_default_context(cafile=ca)


def hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def message(sender, rcpt, n):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = rcpt
    m["Subject"] = f"metrics test {n}"
    m.set_content(f"message {n}\n")
    return m


accepted = {"mx": 0, "submission": 0}
for n in range(int(mx_count)):
    with smtplib.SMTP(*hostport(mx), timeout=60) as s:
        s.ehlo("sender.example")
        s.send_message(message("someone@sender.example", local_rcpt, n))
        accepted["mx"] += 1
for n, rcpt in enumerate([local_rcpt, remote_rcpt]):
    with smtplib.SMTP(*hostport(sub), timeout=60) as s:
        s.starttls(context=ctx)
        s.login(user, password)
        s.send_message(message(user, rcpt, n))
        accepted["submission"] += 1
print(json.dumps(accepted))
