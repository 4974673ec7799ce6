#!/usr/bin/env python3
"""Waits in IMAP IDLE (imapclient, STARTTLS) for a new message in INBOX and saves it.

usage: imap_idle_wait.py HOST:PORT CA_PEM USER PASSWORD OUT_FILE TIMEOUT_S
Prints "IDLING" once the server accepted IDLE, then JSON {"seconds": wait, "uid": uid} after the
new message arrived and its BODY.PEEK[] was written to OUT_FILE. Exits 1 on timeout."""
import json
import ssl
import sys
import time

from imapclient import IMAPClient

host_port, ca, user, password, out_file, timeout = sys.argv[1:7]
host, port = host_port.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
c = IMAPClient(host, port=int(port), ssl=False, timeout=60)
c.starttls(ssl_context=context)
c.login(user, password)
before = c.select_folder("INBOX")[b"UIDNEXT"]
c.idle()
print("IDLING", flush=True)
start = time.monotonic()
got = False
while time.monotonic() - start < float(timeout):
    for response in c.idle_check(timeout=1):
        if len(response) >= 2 and response[1] == b"EXISTS":
            got = True
    if got:
        break
waited = time.monotonic() - start
c.idle_done()
if not got:
    print("no EXISTS within the timeout", file=sys.stderr)
    sys.exit(1)
uids = c.search(["UID", f"{before}:*"])
uid = max(uids)
data = c.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
with open(out_file, "wb") as f:
    f.write(data)
c.logout()
print(json.dumps({"seconds": waited, "uid": uid}))
