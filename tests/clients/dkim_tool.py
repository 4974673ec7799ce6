#!/usr/bin/env python3
"""DKIM with dkimpy, an implementation independent of the gateway's, with its DNS (dnspython)
pointed at a test server.

usage: dkim_tool.py verify DNS_PORT MESSAGE_FILE
         prints JSON {"pass": bool, "signatures": n} for every DKIM-Signature, all verified
       dkim_tool.py sign DOMAIN SELECTOR KEY_PEM IN_FILE OUT_FILE
         writes IN_FILE with a relaxed/relaxed rsa-sha256 signature prepended (RSA PEM key)"""
import json
import sys

import dkim
import dns.resolver


def point_dns_at(port):
    # dkimpy looks TXT records up through dnspython's default resolver.
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 10
    dns.resolver.default_resolver = resolver


command = sys.argv[1]
if command == "verify":
    port, message_file = int(sys.argv[2]), sys.argv[3]
    point_dns_at(port)
    with open(message_file, "rb") as f:
        message = f.read()
    d = dkim.DKIM(message)
    headers, _ = dkim.rfc822_parse(message)
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    results = [d.verify(idx=i) for i in range(count)]
    print(json.dumps({"pass": bool(results) and all(results), "signatures": count}))
elif command == "sign":
    domain, selector, key_file, in_file, out_file = sys.argv[2:7]
    with open(key_file, "rb") as f:
        key = f.read()
    with open(in_file, "rb") as f:
        message = f.read()
    signature = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        signature_algorithm=b"rsa-sha256",
    )
    with open(out_file, "wb") as f:
        f.write(signature + message)
else:
    sys.exit(f"unknown command {command}")
