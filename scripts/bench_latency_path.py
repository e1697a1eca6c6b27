#!/usr/bin/env python3
"""Where a delivered message's time goes inside the server, stage by stage, at a steady rate.

    python scripts/bench_latency_path.py [--rate 200 --rate 5000] [--seconds 5] [--subs 1]
                                         [--store memory|sqlite]

The server runs in this process with timing hooks on its reader and its writer; a child
process publishes ``--rate`` messages a second on one connection while ``--subs``
connections are subscribed (the server on CPU 0, the clients on CPU 1, when there are two).
For each message it times four stages:

* read -> queued: the publisher's reader, from its bytes to the delivery on the writer's
  channel (frame, JSON, hub and store; with SQLite the commit is the writer's, in stage 3);
* queued -> awake: until the writer is out of its wait (the hand-off between two threads);
* awake -> fan-out: the writer's round up to the fan-out (taking the channel; the commit);
* fan-out -> sent: frames made and handed to every subscriber's socket.

Each rate gets a fresh server. Compare the rates: at 200 msg/s the machine idles 5 ms
between messages and every stage starts with cold caches. (The Python publisher may not reach
a high rate; the rate it reached is printed.) The stages are timed with
``perf_counter_ns`` around methods of the writer and the reader, which adds about a
microsecond to each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsbroadcast import Server  # noqa: E402
from wsbroadcast.reader import Reader  # noqa: E402
from wsbroadcast.writer import DELIVER, STORED, Writer  # noqa: E402

STAGES = ("read -> queued", "queued -> awake", "awake -> fan-out", "fan-out -> sent", "read -> sent")

#: the child process: SUBS subscribers, then RATE publishes a second for SECONDS
CLIENTS = r"""
import json, sys, threading, time
import simple_websocket
url, subs, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
got = [0] * subs
def subscriber(i, ready):
    ws = simple_websocket.Client.connect(url)
    ws.send(json.dumps({"type": "subscribe", "topic": "bench", "id": 1}))
    while json.loads(ws.receive())["type"] != "ack":
        pass
    ready.set()
    while True:
        try:
            text = ws.receive(timeout=2)
        except simple_websocket.ConnectionClosed:
            return
        if text is None:
            ws.close()
            return
        got[i] += 1
readies = []
for i in range(subs):
    ready = threading.Event()
    threading.Thread(target=subscriber, args=(i, ready), name="sub-%d" % i, daemon=True).start()
    readies.append(ready)
for ready in readies:
    assert ready.wait(30), "a subscriber did not get its ack"
pub = simple_websocket.Client.connect(url)
frame = json.dumps({"type": "publish", "topic": "bench", "data": {"x": "a" * 80}})
start = time.monotonic()
n = int(rate * seconds)
for k in range(n):
    delay = start + k / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    pub.send(frame)
deadline = time.monotonic() + 10
while min(got) < n and time.monotonic() < deadline:
    time.sleep(0.05)
pub.close()
print(json.dumps({"sent": n, "received_min": min(got)}))
"""


#: the methods the hooks wrap, as the package has them (each run's hooks wrap these, not the last run's)
ORIGINAL = {(cls, name): cls.__dict__[name] for cls, name in
            ((Reader, "_feed"), (Writer, "put"), (Writer, "_fan_out"), (Writer, "_flush_dirty"))}


class Hooks:
    """Timestamps of the current message at each stage; rows of stage durations (ns)."""

    def __init__(self) -> None:
        self.read = self.queued = self.awake = self.fan = 0
        self.rows: List[tuple] = []
        self.recording = False

    def install(self, server: Server) -> None:
        ns = time.perf_counter_ns
        hooks = self
        feed, put = ORIGINAL[Reader, "_feed"], ORIGINAL[Writer, "put"]
        fan_out, flush = ORIGINAL[Writer, "_fan_out"], ORIGINAL[Writer, "_flush_dirty"]

        def timed_feed(reader: Reader, data: bytes) -> bool:
            hooks.read = ns()
            return feed(reader, data)

        def timed_put(writer: Writer, ops: Any) -> None:
            if ops and ops[0][0] in (DELIVER, STORED):
                hooks.queued = ns()
            put(writer, ops)

        def timed_fan_out(writer: Writer) -> None:
            hooks.fan = ns()
            fan_out(writer)

        def timed_flush(writer: Writer) -> None:
            flush(writer)
            if hooks.fan and hooks.recording:
                t = ns()
                hooks.rows.append((hooks.queued - hooks.read, hooks.awake - hooks.queued,
                                   hooks.fan - hooks.awake, t - hooks.fan, t - hooks.read))
            hooks.fan = 0

        Reader._feed = timed_feed  # type: ignore[method-assign]
        Writer.put = timed_put  # type: ignore[method-assign]
        Writer._fan_out = timed_fan_out  # type: ignore[method-assign]
        Writer._flush_dirty = timed_flush  # type: ignore[method-assign]
        select = server.writer._sel.select

        def timed_select(timeout: Any = None) -> Any:
            events = select(timeout)
            hooks.awake = ns()
            return events

        server.writer._sel.select = timed_select  # type: ignore[method-assign]


def percentiles(values: List[int]) -> Dict[str, float]:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(len(values) * q))] / 1000  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def _on_cpu(cpu: int) -> Any:
    """A preexec_fn pinning the child to ``cpu`` (None when this machine has one CPU)."""
    if len(os.sched_getaffinity(0)) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run(rate: float, seconds: float, subs: int, store: str) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = store if store == "memory" else os.path.join(tmp, "bench.db")
        server = Server("127.0.0.1", 0, store=path).start()
        hooks = Hooks()
        hooks.install(server)
        try:
            url = "ws://127.0.0.1:%d/ws" % server.port
            warmup = subprocess.run([sys.executable, "-c", CLIENTS, url, str(subs), str(rate), "1"],
                                    capture_output=True, text=True, timeout=120, preexec_fn=_on_cpu(1))
            if warmup.returncode:
                raise SystemExit("the clients failed:\n" + warmup.stderr[-2000:])
            hooks.recording = True
            done = subprocess.run([sys.executable, "-c", CLIENTS, url, str(subs), str(rate), str(seconds)],
                                  capture_output=True, text=True, timeout=seconds + 120,
                                  preexec_fn=_on_cpu(1))
            hooks.recording = False
            if done.returncode:
                raise SystemExit("the clients failed:\n" + done.stderr[-2000:])
            counts = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            server.shutdown()
    rows = hooks.rows
    return {"rate": rate, "subs": subs, "store": store, "messages": len(rows), **counts,
            "stages_us": {stage: percentiles([r[i] for r in rows]) for i, stage in enumerate(STAGES)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, action="append", help="messages a second (repeatable; 200 and 5000)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--subs", type=int, default=1, help="subscribed connections")
    ap.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) >= 2:  # the server on CPU 0, the clients on CPU 1
        os.sched_setaffinity(0, {0})
    results = [run(rate, a.seconds, a.subs, a.store) for rate in (a.rate or [200.0, 5000.0])]
    print("per message, in microseconds (p50 / p90 / p99); store %s, %d subscriber(s)" % (a.store, a.subs))
    print("%-18s" % "stage" + "".join("%26s" % ("%g msg/s" % r["rate"]) for r in results))
    for stage in STAGES:
        print("%-18s" % stage + "".join("%26s" % ("%.0f / %.0f / %.0f" % tuple(r["stages_us"][stage].values()))
                                          for r in results))
    print("%-18s" % "messages timed" + "".join("%26d" % r["messages"] for r in results))
    print("%-18s" % "achieved msg/s" + "".join("%26.0f" % (r["messages"] / a.seconds) for r in results))
    if min(r["received_min"] for r in results) < min(r["sent"] for r in results):
        print("(a subscriber missed messages: see --json)")
    print("p50 of read -> sent, %g against %g msg/s: %.2fx" % (
        results[0]["rate"], results[-1]["rate"],
        results[0]["stages_us"]["read -> sent"]["p50"] /
        max(1e-9, results[-1]["stages_us"]["read -> sent"]["p50"])))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
