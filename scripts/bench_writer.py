#!/usr/bin/env python3
"""The writer's own cost per recipient: one message fanned out and sent to N connections,
against a bare loop that sends the same frame to the same sockets.

    python scripts/bench_writer.py [--recipients 100] [--rounds 3000] [--compare DIR]

The writer (not started: its fan-out and flush are called in this thread) and the bare
loop take turns over the same N Unix socket pairs, whose other ends are emptied between
rounds. Unix sockets make the kernel's part small, so what the writer adds shows:
(writer - bare) / N is the Python per recipient. ``--compare DIR`` measures another
checkout the same way, in the same run, turn about.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: run with the checkout under test first on sys.path; prints one JSON line
MEASURE = r"""
import json, socket, statistics, sys, time
sys.path.insert(0, sys.argv[1])
from wsbroadcast.connection import Connection
from wsbroadcast.writer import DELIVER, Writer
from wsbroadcast.wsframe import text_frame
n, rounds = int(sys.argv[2]), int(sys.argv[3])
writer = Writer()
pairs = [socket.socketpair() for _ in range(n)]
conns = []
for a, b in pairs:
    a.setblocking(False)
    b.setblocking(False)
    conns.append(Connection(a, ("127.0.0.1", 1)))
recipients = frozenset(conns)
data = '{"x":"' + "a" * 80 + '"}'
frame = text_frame(('{"type":"message","topic":"t","seq":1,"data":%s}' % data).encode())
socks = [a for a, _ in pairs]
def drain():
    for _, b in pairs:
        try:
            while b.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
def bare():
    for s in socks:
        s.send(frame, socket.MSG_DONTWAIT)
def through_writer():
    writer._apply([(DELIVER, "t", 1, data, recipients, time.monotonic())])
    writer._fan_out()
    writer._flush_dirty()
    writer._round_t0 = []
times = {"bare": [], "writer": []}
for i in range(rounds):
    order = (("bare", bare), ("writer", through_writer)) if i % 2 else (("writer", through_writer), ("bare", bare))
    for name, fn in order:
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
        drain()
print(json.dumps({k: statistics.median(v) * 1e6 for k, v in times.items()}))
"""


def measure(checkout: str, recipients: int, rounds: int) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, checkout, str(recipients), str(rounds)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit("measuring %s failed:\n%s" % (checkout, done.stderr[-2000:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3000, help="messages timed per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per checkout, turn about (medians reported)")
    ap.add_argument("--compare", metavar="DIR", help="another checkout, measured the same way")
    a = ap.parse_args()
    checkouts = [str(ROOT)] + ([os.path.abspath(a.compare)] if a.compare else [])
    runs: dict = {c: [] for c in checkouts}
    for _ in range(a.runs):
        for c in checkouts:
            runs[c].append(measure(c, a.recipients, a.rounds))
    print("one message to %d recipients, medians of %d run(s) of %d messages" % (a.recipients, a.runs, a.rounds))
    print("%-40s %12s %12s %16s %14s" % ("checkout", "bare us", "writer us", "writer/bare", "us/recipient"))
    for c in checkouts:
        bare = sorted(r["bare"] for r in runs[c])[len(runs[c]) // 2]
        writer = sorted(r["writer"] for r in runs[c])[len(runs[c]) // 2]
        print("%-40s %12.1f %12.1f %15.2fx %14.2f" % (c[-40:], bare, writer, writer / bare,
                                                      (writer - bare) / a.recipients))


if __name__ == "__main__":
    main()
