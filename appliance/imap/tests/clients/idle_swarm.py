#!/usr/bin/env python3
"""Opens many idle IMAP connections at once and holds them.

usage: idle_swarm.py HOST PORT COUNT
Opens COUNT connections (at most 200 handshakes in flight), reads the first line of each and
prints one JSON line {"greeted": g, "bye": b, "failed": f, "seconds": s}; then holds them all,
without sending anything, until a line arrives on stdin; then closes them all and prints
{"closed": n}."""
import asyncio
import json
import resource
import sys
import time

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def one(gate, tally, writers):
    async with gate:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            line = await asyncio.wait_for(reader.readline(), 120)
        except (OSError, asyncio.TimeoutError):
            tally["failed"] += 1
            return
    if line.startswith(b"* OK"):
        tally["greeted"] += 1
    elif line.startswith(b"* BYE"):
        tally["bye"] += 1
    else:
        tally["failed"] += 1
    writers.append(writer)


async def main():
    gate = asyncio.Semaphore(200)
    tally = {"greeted": 0, "bye": 0, "failed": 0}
    writers = []
    started = time.monotonic()
    await asyncio.gather(*(one(gate, tally, writers) for _ in range(count)))
    tally["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(tally), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in writers:
        w.close()
    print(json.dumps({"closed": len(writers)}), flush=True)


asyncio.run(main())
