#!/usr/bin/env python3
"""Submits a burst of numbered messages with Python's smtplib from several connections at once
(STARTTLS verified against a CA, AUTH), and records what the server answered to each.

usage: burst_submit.py HOST:PORT CA_PEM USER PASSWORD FROM TO COUNT CONNECTIONS RUN_ID OUT_DIR

Message n has Message-ID <RUN_ID.n@FROM-DOMAIN> and the body marker BURST-RUN_ID-n. While it
runs, OUT_DIR/progress has one line per message: "n accepted" (250 to the end of DATA),
"n refused CODE" (a 5xx) or "n in-doubt" (the connection broke before the reply: the server
may or may not have taken it). A 4xx is retried on a new connection, as a client would. When a
connection breaks the worker reconnects (for up to 300 s: the test restarts a killed gateway)
and goes on with the next message. Every 50th message's exact bytes go to OUT_DIR/sent-n.eml.
At the end it prints {"accepted": a, "refused": r, "in_doubt": d, "seconds": s}."""
import email.policy
import email.utils
import json
import os
import smtplib
import ssl
import sys
import threading
import time
from email.message import EmailMessage

host_port, ca, user, password, sender, recipient, count, connections, run_id, out_dir = sys.argv[1:11]
count, connections = int(count), int(connections)
host, port = host_port.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
domain = sender.split("@")[1]
lock = threading.Lock()
progress = open(os.path.join(out_dir, "progress"), "a", buffering=1)
next_number = [0]
tally = {"accepted": 0, "refused": 0, "in_doubt": 0}
FILLER = "".join("line %03d of the figures, unchanged since the last report.\n" % i for i in range(40))


def record(n, outcome, key):
    with lock:
        progress.write("%d %s\n" % (n, outcome))
        tally[key] += 1


def take():
    with lock:
        n = next_number[0]
        next_number[0] += 1
        return n if n < count else None


def message(n):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = recipient
    m["Subject"] = "burst %s message %d" % (run_id, n)
    m["Date"] = email.utils.formatdate()
    m["Message-ID"] = "<%s.%d@%s>" % (run_id, n, domain)
    m.set_content("BURST-%s-%d\n%s" % (run_id, n, FILLER))
    return m.as_bytes(policy=email.policy.SMTP)


def connect():
    deadline = time.monotonic() + 300
    while True:
        try:
            s = smtplib.SMTP(host, int(port), timeout=120)
            s.starttls(context=context)
            s.login(user, password)
            return s
        except (OSError, smtplib.SMTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def worker():
    s = None
    n = take()
    while n is not None:
        if s is None:
            s = connect()
        data = message(n)
        if n % 50 == 0:
            with open(os.path.join(out_dir, "sent-%d.eml" % n), "wb") as f:
                f.write(data)
        try:
            s.sendmail(sender, [recipient], data)
            record(n, "accepted", "accepted")
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as e:
            code = e.smtp_code if hasattr(e, "smtp_code") else list(e.recipients.values())[0][0]
            if 400 <= code < 500:
                # Temporary: not taken; send it again on a fresh connection.
                try:
                    s.quit()
                except (OSError, smtplib.SMTPException):
                    pass
                s = None
                time.sleep(0.2)
                continue
            record(n, "refused %d" % code, "refused")
        except (OSError, smtplib.SMTPException):
            record(n, "in-doubt", "in_doubt")
            try:
                s.close()
            except OSError:
                pass
            s = None
        n = take()
    if s is not None:
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass


started = time.monotonic()
threads = [threading.Thread(target=worker) for _ in range(connections)]
for t in threads:
    t.start()
for t in threads:
    t.join()
tally["seconds"] = round(time.monotonic() - started, 1)
progress.close()
print(json.dumps(tally))
