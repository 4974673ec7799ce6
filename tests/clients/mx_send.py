#!/usr/bin/env python3
"""Sends one message to an MX listener as another mail server would (smtplib, no AUTH).

usage: mx_send.py HOST:PORT HELO MAIL_FROM RCPT MESSAGE_FILE
Prints JSON {"code": n, "reply": "..."}: 250 when accepted, else the refusing reply."""
import json
import smtplib
import sys

host_port, helo, mail_from, rcpt, message_file = sys.argv[1:6]
host, port = host_port.rsplit(":", 1)
with open(message_file, "rb") as f:
    message = f.read()
try:
    with smtplib.SMTP(host, int(port), local_hostname=helo, timeout=120) as s:
        s.ehlo(helo)
        refused = s.sendmail(mail_from, [rcpt], message)
        result = {"code": 250, "reply": json.dumps(refused)}
except smtplib.SMTPRecipientsRefused as e:
    code, text = e.recipients[rcpt]
    result = {"code": code, "reply": text.decode(errors="replace")}
except smtplib.SMTPResponseException as e:
    result = {"code": e.smtp_code, "reply": e.smtp_error.decode(errors="replace")}
print(json.dumps(result))
