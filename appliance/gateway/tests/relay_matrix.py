#!/usr/bin/env python3
"""The relay matrix against a running gateway, with Python's smtplib.

usage: relay_matrix.py MX SUBMISSION SUBMISSIONS CA USER PASSWORD OTHER_LOCAL
Prints one JSON object: case name -> the SMTP reply code the gateway gave."""
import json
import smtplib
import ssl
import sys

mx, sub, subs, ca, user, password, other_local = sys.argv[1:8]
domain = user.split("@")[1]
ctx = ssl.create_default_context(cafile=ca)
results = {}


def hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def code_of(fn):
    try:
        return fn()
    except smtplib.SMTPResponseException as e:
        return e.smtp_code
    except smtplib.SMTPRecipientsRefused as e:
        return list(e.recipients.values())[0][0]


def mx_case(name, mail_from, rcpt, starttls=False):
    def run():
        with smtplib.SMTP(*hostport(mx), timeout=30) as s:
            s.ehlo("relay-test.example")
            if starttls:
                s.starttls(context=ctx)
                s.ehlo("relay-test.example")
            code, _ = s.mail(mail_from)
            if code != 250:
                return code
            code, _ = s.rcpt(rcpt)
            return code
    results[name] = code_of(run)


def submission_case(name, implicit, login, mail_from, rcpt):
    def run():
        if implicit:
            s = smtplib.SMTP_SSL(*hostport(subs), context=ctx, timeout=30)
        else:
            s = smtplib.SMTP(*hostport(sub), timeout=30)
        with s:
            s.ehlo("client.example")
            if not implicit and login != "no-tls":
                s.starttls(context=ctx)
                s.ehlo("client.example")
            if login == "right":
                s.login(user, password)
            elif login == "wrong":
                try:
                    s.login(user, password + "-wrong")
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code
            code, _ = s.mail(mail_from)
            if code != 250:
                return code
            code, _ = s.rcpt(rcpt)
            return code
    results[name] = code_of(run)


external, other = "someone@external.example", "victim@elsewhere.example"
# Port 25: nothing but local recipients, whoever asks, however the address is dressed up.
mx_case("mx: external to external", external, other)
mx_case("mx: external to external after STARTTLS", external, other, starttls=True)
mx_case("mx: forged local sender to external", user, other)
mx_case("mx: percent hack", external, "victim%elsewhere.example@" + domain)
mx_case("mx: source route", external, "<@" + domain + ":victim@elsewhere.example>")
mx_case("mx: unknown local user", external, "nobody@" + domain)
mx_case("mx: local recipient (allowed)", external, other_local)
# Submission: TLS, then the right password, then only one's own address.
for implicit, port in ((False, "587"), (True, "465")):
    submission_case(f"{port}: no authentication", implicit, "none", user, other)
    submission_case(f"{port}: wrong password", implicit, "wrong", user, other)
    submission_case(f"{port}: forged local sender", implicit, "right", other_local, other)
    submission_case(f"{port}: forged external sender", implicit, "right", external, other)
    submission_case(f"{port}: own address to external (allowed)", implicit, "right", user, other)
submission_case("587: MAIL before STARTTLS", False, "no-tls", user, other)
print(json.dumps(results))
