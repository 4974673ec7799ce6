"""Drives the QuteMail POP3 server with Python's standard poplib, as a mail client would.

Usage: poplib_check.py SCENARIO CONFIG.json
CONFIG: host, plain_port, tls_port, ca_file, user, password, expected_dir (msg-N.eml files
holding the bytes the vault presents for message N), out_file (written on success, JSON).
Exits non-zero with a message on the first failed check.
"""

import json
import os
import poplib
import socket
import ssl
import sys


def fail(msg):
    print("CHECK FAILED: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


cfg = json.load(open(sys.argv[2]))
scenario = sys.argv[1]
ctx = ssl.create_default_context(cafile=cfg["ca_file"])
ctx.check_hostname = True


def plain():
    return poplib.POP3(cfg["host"], cfg["plain_port"], timeout=20)


def stls():
    p = plain()
    p.stls(context=ctx)
    return p


def implicit():
    return poplib.POP3_SSL(cfg["host"], cfg["tls_port"], context=ctx, timeout=20)


def login(p):
    p.user(cfg["user"])
    return p.pass_(cfg["password"])


def expect_err(fn, code, what):
    try:
        r = fn()
    except poplib.error_proto as e:
        text = e.args[0]
        check(text.startswith(b"-ERR " + code), "%s: expected -ERR %r, got %r" % (what, code, text))
        return text
    fail("%s: expected -ERR %r, got %r" % (what, code, r))


def expected():
    out = {}
    for name in os.listdir(cfg["expected_dir"]):
        if name.startswith("msg-") and name.endswith(".eml"):
            out[int(name[4:-4])] = open(os.path.join(cfg["expected_dir"], name), "rb").read()
    return out


def wire_bytes(lines):
    # poplib strips CRLF and the stuffing dots; each line ended by CRLF is the message.
    return b"".join(l + b"\r\n" for l in lines)


results = {}

if scenario == "capa":
    p = plain()
    caps = p.capa()
    check("STLS" in caps, "CAPA before TLS lacks STLS: %r" % caps)
    check("USER" not in caps and "SASL" not in caps, "CAPA before TLS offers a login: %r" % caps)
    for c in ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]:
        check(c in caps, "CAPA lacks %s: %r" % (c, caps))
    check(caps.get("EXPIRE") == ["NEVER"], "EXPIRE NEVER missing: %r" % caps)
    check("IMPLEMENTATION" in caps, "IMPLEMENTATION missing: %r" % caps)
    expect_err(lambda: p.user(cfg["user"]), b"[AUTH]", "USER before TLS")
    expect_err(lambda: p._shortcmd("PASS " + cfg["password"]), b"[AUTH]", "PASS before TLS")
    expect_err(lambda: p.stat(), b"", "STAT before login")
    p.stls(context=ctx)
    caps = p.capa()
    check("USER" in caps and "STLS" not in caps, "CAPA after STLS: %r" % caps)
    check(caps.get("SASL") == ["PLAIN"], "SASL PLAIN after TLS: %r" % caps)
    expect_err(lambda: p._shortcmd("STLS"), b"", "STLS twice")
    check(login(p).startswith(b"+OK"), "login after STLS")
    p.quit()
    q = implicit()
    caps = q.capa()
    check("USER" in caps and "STLS" not in caps, "CAPA on 995: %r" % caps)
    q.quit()

elif scenario == "read":
    want = expected()
    uidls = []
    for connect in (stls, implicit):
        p = connect()
        login(p)
        count, total = p.stat()
        check(count == len(want), "STAT count %d, expected %d" % (count, len(want)))
        resp, listing, _ = p.list()
        sizes = {int(l.split()[0]): int(l.split()[1]) for l in listing}
        check(sum(sizes.values()) == total, "LIST sizes %r do not add up to STAT %d" % (sizes, total))
        for n, body in sorted(want.items()):
            resp, lines, octets = p.retr(n)
            got = wire_bytes(lines)
            check(got == body, "RETR %d: %d bytes differ from the %d presented" % (n, len(got), len(body)))
            check(octets == sizes[n] == len(body), "message %d: LIST %d, RETR octets %d, presented %d"
                  % (n, sizes[n], octets, len(body)))
            check(resp == b"+OK %d octets" % len(body), "RETR status %r" % resp)
            one = p.list(n)
            check(one == b"+OK %d %d" % (n, len(body)), "LIST %d: %r" % (n, one))
            head = body.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            resp, lines, _ = p.top(n, 0)
            check(wire_bytes(lines) == head, "TOP %d 0 is not the header: %r" % (n, wire_bytes(lines)))
            resp, lines, _ = p.top(n, 1)
            first = body[len(head):].split(b"\r\n", 1)[0] + b"\r\n"
            check(wire_bytes(lines) == head + first, "TOP %d 1: %r" % (n, wire_bytes(lines)))
        resp, listing, _ = p.uidl()
        uidls.append([l.decode() for l in listing])
        check(p.uidl(1).split()[2] == listing[0].split()[1], "UIDL 1 differs from the listing")
        expect_err(lambda: p.retr(len(want) + 1), b"", "RETR of a missing message")
        p.quit()
    check(uidls[0] == uidls[1], "UIDL differs between sessions: %r" % uidls)
    check(len(set(u.split()[1] for u in uidls[0])) == len(want), "UIDs not unique: %r" % uidls[0])
    results["uidl"] = uidls[0]

elif scenario == "dele-rset":
    p = stls()
    login(p)
    count, total = p.stat()
    first = int(p.list(1).split()[2])
    p.dele(1)
    check(p.stat() == (count - 1, total - first), "STAT after DELE: %r" % (p.stat(),))
    expect_err(lambda: p.retr(1), b"", "RETR of a deleted message")
    expect_err(lambda: p.dele(1), b"", "DELE twice")
    resp, listing, _ = p.list()
    check(all(not l.startswith(b"1 ") for l in listing), "LIST shows a deleted message")
    p.rset()
    check(p.stat() == (count, total), "STAT after RSET: %r" % (p.stat(),))
    p.quit()
    results["count"] = count

elif scenario == "dele-quit":
    p = implicit()
    login(p)
    count, _ = p.stat()
    uid = p.uidl(1).split()[2].decode()
    p.dele(1)
    resp = p.quit()
    check(resp.startswith(b"+OK"), "QUIT: %r" % resp)
    q = implicit()
    login(q)
    check(q.stat()[0] == count - 1, "message 1 still there after DELE+QUIT")
    resp, listing, _ = q.uidl()
    check(all(l.split()[1].decode() != uid for l in listing), "the deleted UIDL is still listed")
    q.quit()
    results["deleted_uidl"] = uid

elif scenario == "drop":
    p = stls()
    login(p)
    count, _ = p.stat()
    for n in range(1, count + 1):
        p.dele(n)
    check(p.stat()[0] == 0, "all marked deleted")
    # Hang up without QUIT: RFC 1939 says nothing may be removed.
    p.sock.shutdown(socket.SHUT_RDWR)
    p.sock.close()
    results["count"] = count

elif scenario == "in-use":
    a = stls()
    login(a)
    b = implicit()
    b.user(cfg["user"])
    expect_err(lambda: b.pass_(cfg["password"]), b"[IN-USE]", "a second session")
    a.quit()
    b.user(cfg["user"])
    check(b.pass_(cfg["password"]).startswith(b"+OK"), "login once the first session quit")
    b.quit()

elif scenario == "bad-logins":
    import base64
    # AUTH PLAIN for an unknown user: [AUTH], one answer for every failure.
    p = implicit()
    blob = base64.b64encode(b"\0nobody@a.example\0whatever").decode()
    expect_err(lambda: p._shortcmd("AUTH PLAIN " + blob), b"[AUTH]", "AUTH PLAIN of an unknown user")
    p.close()
    # Wrong passwords: [AUTH] (each a little later); once this address has used up its cap,
    # even the right password gets [SYS/TEMP].
    limit = cfg["per_address_limit"]
    failures = 1
    while failures < limit:
        p = implicit()
        try:
            for _ in range(2):
                if failures == limit:
                    break
                p.user(cfg["user"])
                expect_err(lambda: p.pass_("wrong password"), b"[AUTH]", "a wrong password")
                failures += 1
        finally:
            p.close()
    p = implicit()
    p.user(cfg["user"])
    expect_err(lambda: p.pass_(cfg["password"]), b"[SYS/TEMP]", "the right password after too many failures from this address")
    p.close()

elif scenario == "auth-plain":
    import base64
    p = implicit()
    blob = base64.b64encode(("\0%s\0%s" % (cfg["user"], cfg["password"])).encode()).decode()
    resp = p._shortcmd("AUTH PLAIN " + blob)
    check(resp.startswith(b"+OK"), "AUTH PLAIN with an initial response: %r" % resp)
    p.quit()
    p = stls()
    resp = p._shortcmd("AUTH PLAIN")
    check(resp.startswith(b"+"), "AUTH PLAIN continuation: %r" % resp)
    resp = p._shortcmd(blob)
    check(resp.startswith(b"+OK"), "AUTH PLAIN after the continuation: %r" % resp)
    p.quit()

else:
    fail("unknown scenario " + scenario)

json.dump(results, open(cfg["out_file"], "w"))
print("poplib scenario %s: ok" % scenario)
