#!/usr/bin/env python3
"""Logs in once over SMTP submission (smtplib: STARTTLS then AUTH PLAIN) or IMAP (imaplib: STARTTLS
then LOGIN), from a chosen loopback source address, and reports the server's answer.

usage: login_attempts.py smtp|imap HOST:PORT CA_PEM SOURCE_IP USER PASSWORD [COUNT]
Makes COUNT attempts (default 1), each on a new connection, and prints one JSON line per
attempt: {"ok": bool, "code": SMTP reply code or null, "reply": the server's text}."""
import imaplib
import json
import smtplib
import ssl
import sys

proto, host_port, ca, source, user, password = sys.argv[1:7]
count = int(sys.argv[7]) if len(sys.argv) > 7 else 1
host, port = host_port.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)


def smtp_attempt():
    with smtplib.SMTP(host, int(port), timeout=120, source_address=(source, 0)) as s:
        s.starttls(context=context)
        s.ehlo()
        # Exactly one AUTH per attempt: smtplib's login() would try each mechanism in turn and
        # so count two failures for one wrong password.
        s.user, s.password = user, password
        try:
            code, text = s.auth("PLAIN", s.auth_plain)
            return {"ok": True, "code": code, "reply": text.decode(errors="replace")}
        except smtplib.SMTPResponseException as e:
            return {"ok": False, "code": e.smtp_code, "reply": e.smtp_error.decode(errors="replace")}


class SourceIMAP(imaplib.IMAP4):
    def _create_socket(self, timeout):
        import socket

        return socket.create_connection((self.host, self.port), timeout, source_address=(source, 0))


def imap_attempt():
    m = SourceIMAP(host, int(port), timeout=120)
    m.starttls(ssl_context=context)
    try:
        typ, data = m.login(user, password)
        m.logout()
        return {"ok": True, "code": None, "reply": b" ".join(data).decode(errors="replace")}
    except imaplib.IMAP4.error as e:
        return {"ok": False, "code": None, "reply": str(e)}


for _ in range(count):
    print(json.dumps(smtp_attempt() if proto == "smtp" else imap_attempt()), flush=True)
