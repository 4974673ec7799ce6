#!/usr/bin/env python3
"""An internet mail server for tests (aiosmtpd): accepts every message, with STARTTLS offered.

usage: smtp_sink.py CERT_PEM KEY_PEM OUT_DIR
Prints "PORT <n>" once listening on 127.0.0.1, then serves until standard input closes. Each
message is written to OUT_DIR/<n>.eml exactly as received, with OUT_DIR/<n>.json holding
{"mail_from", "rcpt_tos", "tls"}."""
import asyncio
import json
import os
import socket
import ssl
import sys

from aiosmtpd.controller import Controller

cert, key, out_dir = sys.argv[1:4]


class Sink:
    count = 0

    async def handle_DATA(self, server, session, envelope):
        Sink.count += 1
        base = os.path.join(out_dir, str(Sink.count))
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json.tmp", "w") as f:
            json.dump(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "tls": session.ssl is not None,
                },
                f,
            )
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 stored"


with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(Sink(), hostname="127.0.0.1", port=port, tls_context=context, require_starttls=False)
controller.start()
print(f"PORT {port}", flush=True)
sys.stdin.read()
controller.stop()
