#!/usr/bin/env python3
"""A small authoritative DNS server for tests (dnslib), on 127.0.0.1, UDP and TCP.

usage: dns_server.py ZONE_JSON
Prints "PORT <n>" once listening, then serves until standard input closes. ZONE_JSON is read
again for every query, so a test can change records (or make names fail) while it runs:
  {"records": [["name", "TYPE", "value"], ...], "servfail": ["name", ...]}
TYPE is A, AAAA, MX ("<preference> <exchange>", "0 ." for a null MX) or TXT (any length; split
into 255-byte strings). A name with no record at all answers NXDOMAIN; a name with records of
other types answers NOERROR with no answers; a name in "servfail" answers SERVFAIL."""
import json
import sys

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

zone_file = sys.argv[1]


class ZoneResolver(BaseResolver):
    def resolve(self, request, handler):
        with open(zone_file, encoding="utf-8") as f:
            zone = json.load(f)
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qname in [n.lower() for n in zone.get("servfail", [])]:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        records = [r for r in zone["records"] if r[0].rstrip(".").lower() == qname]
        if not records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for name, rtype, value in records:
            if rtype != qtype:
                continue
            if rtype == "A":
                rdata = A(value)
            elif rtype == "AAAA":
                rdata = AAAA(value)
            elif rtype == "MX":
                preference, exchange = value.split(None, 1)
                rdata = MX(exchange, int(preference))
            elif rtype == "TXT":
                data = value.encode()
                rdata = TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])
            else:
                raise ValueError(f"unsupported record type {rtype}")
            reply.add_answer(RR(request.q.qname, QTYPE.reverse[rtype], rdata=rdata, ttl=1))
        return reply


class QuietLogger(DNSLogger):
    # Standard output carries only the PORT line (the test stops reading after it).
    def __init__(self):
        super().__init__("-request,-reply,-truncated,-recv,-send,-data", prefix=False)

    def log_error(self, handler, e):
        print(f"dns_server: {e}", file=sys.stderr)


resolver = ZoneResolver()
udp = DNSServer(resolver, port=0, address="127.0.0.1", logger=QuietLogger())
port = udp.server.server_address[1]
tcp = DNSServer(resolver, port=port, address="127.0.0.1", tcp=True, logger=QuietLogger())
udp.start_thread()
tcp.start_thread()
print(f"PORT {port}", flush=True)
sys.stdin.read()
