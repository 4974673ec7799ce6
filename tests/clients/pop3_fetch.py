#!/usr/bin/env python3
"""Downloads a maildrop with Python's poplib over STLS (verified against a CA), keeping it.

usage: pop3_fetch.py HOST:PORT CA_PEM USER PASSWORD OUT_DIR
Writes OUT_DIR/<n>.eml (CRLF line ends, as the server sent them) and prints JSON:
{"count": n, "sizes": [LIST sizes], "uidl": [unique ids]}."""
import json
import os
import poplib
import ssl
import sys

host_port, ca, user, password, out_dir = sys.argv[1:6]
host, port = host_port.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
p = poplib.POP3(host, int(port), timeout=60)
p.stls(context=context)
p.user(user)
p.pass_(password)
count, _ = p.stat()
sizes = [int(line.split()[1]) for line in p.list()[1]]
uidl = [line.split()[1].decode() for line in p.uidl()[1]]
for n in range(1, count + 1):
    _, lines, _ = p.retr(n)
    with open(os.path.join(out_dir, f"{n}.eml"), "wb") as f:
        f.write(b"\r\n".join(lines) + b"\r\n")
p.quit()
print(json.dumps({"count": count, "sizes": sizes, "uidl": uidl}))
