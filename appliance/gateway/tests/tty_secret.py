"""Runs a command on a real pseudo-terminal, as an operator at a console would, and types the
given lines each after a prompt ending in ": " appears. Prints JSON: the exit status and what the
terminal showed (the transcript), so the test can check that typed secrets were not echoed.

usage: tty_secret.py LINE [LINE ...] -- COMMAND [ARG ...]
"""
import json
import os
import pty
import select
import signal
import sys
import time

args = sys.argv[1:]
split = args.index("--")
lines, command = args[:split], args[split + 1:]

pid, fd = pty.fork()
if pid == 0:
    os.execvp(command[0], command)

transcript = b""
deadline = time.monotonic() + 60


def read_some(timeout):
    global transcript
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return True
    try:
        chunk = os.read(fd, 4096)
    except OSError:  # EIO: the child closed the terminal
        return False
    if not chunk:
        return False
    transcript += chunk
    return True


answered = 0
for line in lines:
    # Type only once the program prompts (its output ends in ": "), as a person would.
    while not transcript[answered:].endswith(b": ") and time.monotonic() < deadline:
        if not read_some(1.0):
            break
    answered = len(transcript)
    os.write(fd, line.encode() + b"\n")

status = None
while status is None:
    open_ = read_some(1.0)
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
    elif time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)  # still waiting for input nobody was to type
        status = os.waitpid(pid, 0)[1]
    elif not open_:
        status = os.waitpid(pid, 0)[1]
for _ in range(50):  # what it wrote before it ended
    if not read_some(0.1):
        break
print(json.dumps({"status": os.waitstatus_to_exitcode(status), "transcript": transcript.decode(errors="replace")}))
