#!/usr/bin/env python3
"""Takes every key kmd holds for a pair through ETSI GS QKD 014 (mutual TLS), as the master SAE.

usage: kmd_drain.py ETSI014_URL CA_PEM CERT_PEM KEY_PEM SLAVE_SAE_ID
Asks `enc_keys` for as many and as large keys as kmd allows, then ever smaller requests, until
kmd answers that it has not enough keys even for one key of its smallest size. Prints JSON
{"keys_taken": n, "bits_taken": n, "last_status": code, "stored_key_count": n} (the last from
`status` after the drain). The keys themselves are discarded, never printed."""
import json
import ssl
import sys
import urllib.error
import urllib.request

url, ca, cert, key, slave = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)


def get(path):
    try:
        with urllib.request.urlopen(f"{url}/api/v1/keys/{slave}/{path}", context=ctx, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, None


code, status = get("status")
assert code == 200, f"status answered {code}"
taken = bits = 0
last = 200
number, size = status["max_key_per_request"], status["max_key_size"]
smallest = status["min_key_size"]
while True:
    last, body = get(f"enc_keys?number={number}&size={size}")
    if last == 200:
        taken += len(body["keys"])
        bits += len(body["keys"]) * size
        continue
    if last not in (400, 503):
        sys.exit(f"enc_keys answered {last}, not 200, 400 or 503")
    # Not enough for this request: ask for less, down to one key of the smallest size.
    if number > 1:
        number = max(1, number // 2)
    elif size > smallest:
        size = max(smallest, (size // 2) // 8 * 8)
    else:
        break
code, status = get("status")
assert code == 200, f"status answered {code}"
print(json.dumps({"keys_taken": taken, "bits_taken": bits, "last_status": last,
                  "stored_key_count": status["stored_key_count"]}))
