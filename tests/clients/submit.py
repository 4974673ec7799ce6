#!/usr/bin/env python3
"""Submits one message with Python's smtplib: STARTTLS (verified against a CA) and AUTH.

usage: submit.py HOST:PORT CA_PEM USER PASSWORD FROM TO[,TO...] SUBJECT BODY_FILE [SENT_FILE]
Prints the refused recipients as JSON ({} when all were accepted); writes the exact bytes sent
(before SMTP dot-stuffing) to SENT_FILE when given."""
import email.policy
import email.utils
import json
import smtplib
import ssl
import sys
from email.message import EmailMessage

host_port, ca, user, password, sender, recipients, subject, body_file = sys.argv[1:9]
sent_file = sys.argv[9] if len(sys.argv) > 9 else None
host, port = host_port.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
message = EmailMessage()
message["From"] = sender
message["To"] = recipients
message["Subject"] = subject
message["Date"] = email.utils.formatdate()
message["Message-ID"] = email.utils.make_msgid(domain=sender.split("@")[1])
with open(body_file, encoding="utf-8") as f:
    message.set_content(f.read())
with smtplib.SMTP(host, int(port), timeout=60) as s:
    s.starttls(context=context)
    s.login(user, password)
    data = message.as_bytes(policy=email.policy.SMTP)
    if sent_file:
        with open(sent_file, "wb") as f:
            f.write(data)
    refused = s.sendmail(sender, recipients.split(","), data)
print(json.dumps(refused))
