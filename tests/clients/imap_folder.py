#!/usr/bin/env python3
"""Reads one folder with Python's imaplib over STARTTLS (verified against a CA).

usage: imap_folder.py HOST:PORT CA_PEM USER PASSWORD FOLDER OUT_DIR
Writes OUT_DIR/<uid>.eml with BODY.PEEK[] of each message and prints JSON {"uids": [...]}."""
import imaplib
import json
import os
import ssl
import sys

host_port, ca, user, password, folder, out_dir = sys.argv[1:7]
host, port = host_port.rsplit(":", 1)
m = imaplib.IMAP4(host, int(port), timeout=60)
m.starttls(ssl_context=ssl.create_default_context(cafile=ca))
m.login(user, password)
m.select(folder, readonly=True)
_, data = m.uid("SEARCH", None, "ALL")
uids = [u.decode() for u in data[0].split()]
for uid in uids:
    _, parts = m.uid("FETCH", uid, "(BODY.PEEK[])")
    with open(os.path.join(out_dir, f"{uid}.eml"), "wb") as f:
        f.write(parts[0][1])
m.logout()
print(json.dumps({"uids": uids}))
