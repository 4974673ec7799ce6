#!/usr/bin/env python3
"""Mail for the backup/restore test, with Python's smtplib and imaplib as real clients.

usage: backup_mail.py populate MX SUBMISSION IMAP CA CANARY
    As alice (submission, STARTTLS + AUTH): a message to herself with a non-ASCII subject, one
    with a 3 MiB attachment, one to bob, one to carol@b.test (it waits in the queue); from an
    Internet sender (MX): one to alice and one to bob. Then over IMAP: alice files the first
    message into the folder "Projects/Zürich" (created), flags messages \\Seen, \\Flagged and
    $Work; bob marks his first message \\Answered. Every body carries CANARY. Prints "ok".
usage: backup_mail.py snapshot IMAP CA USER PASSWORD
    Prints JSON {folder: [{"uid", "flags", "size", "sha256"}]} of every folder of USER, read
    with EXAMINE and BODY.PEEK[] (so reading changes nothing); \\Recent is left out."""
import hashlib
import imaplib
import json
import random
import smtplib
import ssl
import sys
from email.message import EmailMessage


def hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def imap(addr, ca, user, password):
    m = imaplib.IMAP4(*hostport(addr), timeout=120)
    m.starttls(ssl_context=ssl.create_default_context(cafile=ca))
    m.login(user, password)
    return m


def check(result):
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


def populate(mx, sub, imap_addr, ca, canary):
    ctx = ssl.create_default_context(cafile=ca)
    messages = []
    m = EmailMessage()
    m["From"], m["To"] = "alice@a.test", "alice@a.test"
    m["Subject"] = "Grüße aus Zürich – 量子メール"
    m.set_content(f"Notiz für mich selbst. {canary} first\n")
    messages.append(m)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@a.test", "alice@a.test", "the big one"
    m.set_content(f"Attached, the measurements. {canary} big\n")
    blob = random.Random(7).randbytes(3 * 1024 * 1024)
    m.add_attachment(blob, maintype="application", subtype="octet-stream", filename="measurements.bin")
    messages.append(m)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@a.test", "bob@a.test", "for bob"
    m.set_content(f"Hello Bob. {canary} bob\n")
    messages.append(m)
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "alice@a.test", "carol@b.test", "for carol, queued"
    m.set_content(f"Hello Carol. {canary} queued\n")
    messages.append(m)
    for msg in messages:
        with smtplib.SMTP(*hostport(sub), timeout=120) as s:
            s.starttls(context=ctx)
            s.login("alice@a.test", "alice-pass-1")
            s.send_message(msg)
    for rcpt in ["alice@a.test", "bob@a.test"]:
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = "someone@sender.example", rcpt, "from the internet"
        m.set_content(f"Greetings from outside. {canary} mx\n")
        with smtplib.SMTP(*hostport(mx), timeout=120) as s:
            s.ehlo("sender.example")
            s.send_message(m)

    a = imap(imap_addr, ca, "alice@a.test", "alice-pass-1")
    check(a.create('"Projects/Z&APw-rich"'))
    check(a.select("INBOX"))
    uids = check(a.uid("SEARCH", None, "ALL"))[0].split()
    assert len(uids) == 3, uids
    check(a.uid("COPY", uids[0], '"Projects/Z&APw-rich"'))
    check(a.uid("STORE", uids[0], "+FLAGS", r"(\Seen)"))
    check(a.uid("STORE", uids[1], "+FLAGS", r"(\Flagged $Work)"))
    a.logout()
    b = imap(imap_addr, ca, "bob@a.test", "bob-pass-1")
    check(b.select("INBOX"))
    uids = check(b.uid("SEARCH", None, "ALL"))[0].split()
    assert len(uids) == 2, uids
    check(b.uid("STORE", uids[0], "+FLAGS", r"(\Answered)"))
    b.logout()
    print("ok")


def snapshot(imap_addr, ca, user, password):
    m = imap(imap_addr, ca, user, password)
    out = {}
    for line in check(m.list()):
        text = line.decode()
        attributes = text[text.index("(") + 1 : text.index(")")].lower()
        if "\\noselect" in attributes or "\\nonexistent" in attributes:
            continue
        name = text.rsplit(' "/" ', 1)[-1]
        check(m.select(name, readonly=True))
        uids = check(m.uid("SEARCH", None, "ALL"))[0].split()
        entries = []
        for uid in uids:
            data = check(m.uid("FETCH", uid, "(FLAGS BODY.PEEK[])"))
            meta, body = data[0]
            flags = imaplib.ParseFlags(meta)
            flags = sorted(f.decode() for f in flags if f != rb"\Recent")
            entries.append(
                {"uid": int(uid), "flags": flags, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            )
        out[name] = entries
    m.logout()
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1] == "populate":
        populate(*sys.argv[2:7])
    elif sys.argv[1] == "snapshot":
        snapshot(*sys.argv[2:6])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
