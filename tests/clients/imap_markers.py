#!/usr/bin/env python3
"""Reads every message of INBOX with Python's imaplib over STARTTLS (verified against a CA) and
counts the burst markers (BURST-RUN_ID-n) in them.

usage: imap_markers.py HOST:PORT CA_PEM USER PASSWORD RUN_ID OUT_DIR
Prints JSON {"messages": total, "markers": {"n": copies, ...}}; writes the message carrying
marker n to OUT_DIR/got-n.eml when n is a multiple of 50 (to compare bytes)."""
import imaplib
import json
import os
import re
import ssl
import sys

host_port, ca, user, password, run_id, out_dir = sys.argv[1:7]
host, port = host_port.rsplit(":", 1)
imaplib._MAXLINE = 10_000_000
m = imaplib.IMAP4(host, int(port), timeout=300)
m.starttls(ssl_context=ssl.create_default_context(cafile=ca))
m.login(user, password)
m.select("INBOX", readonly=True)
_, data = m.uid("SEARCH", None, "ALL")
uids = data[0].split()
pattern = re.compile(rb"BURST-" + re.escape(run_id.encode()) + rb"-(\d+)\r?\n")
markers = {}
for i in range(0, len(uids), 100):
    chunk = b",".join(uids[i : i + 100]).decode()
    _, parts = m.uid("FETCH", chunk, "(BODY.PEEK[])")
    for part in parts:
        if not isinstance(part, tuple):
            continue
        body = part[1]
        found = pattern.search(body)
        if not found:
            continue
        n = int(found.group(1))
        markers[str(n)] = markers.get(str(n), 0) + 1
        if n % 50 == 0:
            with open(os.path.join(out_dir, "got-%d.eml" % n), "wb") as f:
                f.write(body)
m.logout()
print(json.dumps({"messages": len(uids), "markers": markers}))
