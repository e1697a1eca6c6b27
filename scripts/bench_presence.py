#!/usr/bin/env python3
"""What presence costs fan-out: server CPU with and without subscribe/unsubscribe churn.

One ``wsbroadcast serve`` process (tests/serverproc.py), ``--subs`` plain subscribers of
``broadcast`` held by the C load generator (scripts/benchlib/loadgen.c, built as
scripts/bench builds it) which publishes ``--rate`` messages per second to all of them.
While that runs, the server's CPU time (/proc) is measured in alternating phases of
``--seconds`` each, ``--repeat`` times:

- ``base``      fan-out alone;
- ``churn``     plus ``--churn`` subscribe/unsubscribe pairs per second on ``broadcast``,
                spread over ``--churners`` v1 connections (each pair a join and a leave
                of presence), nobody asking for join/leave;
- ``listened``  the same churn with one connection subscribed with ``join_leave``
                (every pair then sends it a join and a leave).

One JSON line on stdout: per phase the median CPU (percent of one core), and the
increase of ``churn`` over ``base``. ``--tree DIR`` runs the server from another
checkout (for example the commit before presence) to compare the same churn there.

On a loaded machine the phases vary more than presence costs; ``--micro`` measures the
hub alone instead, in one process per tree (``--tree`` and each ``--compare`` tree): the
CPU time of ``Hub.handle`` for one subscribe/unsubscribe pair on a topic with ``--subs``
members (the writer's channel drained, no socket), the median of ``--repeat`` runs::

    scripts/bench_presence.py --subs 10000 --rate 20 --churn 1000
    scripts/bench_presence.py --tree /tmp/before-presence
    scripts/bench_presence.py --micro --compare /tmp/before-presence
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httputil  # noqa: E402
import wsraw  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_overload import cpu_seconds  # noqa: E402
from bench_redis import load_bench  # noqa: E402


class Churn:
    """``pairs`` subscribe/unsubscribe pairs per second over ``n`` v1 connections (own thread)."""

    def __init__(self, port: int, n: int, pairs: float) -> None:
        self.conns = [wsraw.connect(port) for _ in range(n)]
        for c in self.conns:
            c.sock.setblocking(False)
        self.pairs = pairs
        self.on = threading.Event()
        self.stop = threading.Event()
        self.sent = 0
        self._pair = (wsraw.encode_frame(1, b'{"type":"subscribe","topic":"broadcast"}')
                      + wsraw.encode_frame(1, b'{"type":"unsubscribe","topic":"broadcast"}'))
        self.thread = threading.Thread(target=self._run, name="bench-churn", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tick = 0.01
        owed = 0.0
        i = 0
        last = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if self.on.is_set():
                owed = min(owed + self.pairs * (now - last), self.pairs)  # at most 1 s behind
                while owed >= 1.0:
                    c = self.conns[i % len(self.conns)]
                    i += 1
                    try:
                        c.sock.send(self._pair)  # 2 small frames: sent whole or not at all here
                        self.sent += 1
                    except BlockingIOError:
                        pass
                    owed -= 1.0
            for c in self.conns:  # the acks
                try:
                    while c.sock.recv(65536):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            else:
                owed = 0.0
            last = now
            self.stop.wait(tick)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.sock.close()


_MICRO = r"""
import json, socket, sys, time
from wsbroadcast.broker import LocalBroker
from wsbroadcast.connection import Connection
from wsbroadcast.envelope import V1, parse_client_frame
from wsbroadcast.hub import Hub
from wsbroadcast.store import MemoryStore
from wsbroadcast.writer import Writer
subs, pairs = int(sys.argv[1]), int(sys.argv[2])
store = MemoryStore(100)
store.open()
writer = Writer(queue_size=1 << 20)  # never started: the channel is drained here
hub = Hub(LocalBroker(store), writer)
a, b = socket.socketpair()
sub = parse_client_frame('{"type":"subscribe","topic":"broadcast"}', V1)
unsub = parse_client_frame('{"type":"unsubscribe","topic":"broadcast"}', V1)
def drain():
    while not writer.queue.empty():
        writer.queue.get_nowait()
for _ in range(subs):
    c = Connection(a, ("127.0.0.1", 1), V1)
    hub.add(c)
    hub.handle(c, [sub])
drain()
churner = Connection(a, ("127.0.0.1", 2), V1)
hub.add(churner)
t0 = time.process_time()
for i in range(pairs):
    hub.handle(churner, [sub])
    hub.handle(churner, [unsub])
    if i % 256 == 0:
        drain()
print(json.dumps({"us_per_pair": (time.process_time() - t0) / pairs * 1e6}))
"""


def micro(tree: str, subs: int, pairs: int, repeat: int) -> float:
    """Median CPU microseconds of one subscribe/unsubscribe pair through Hub.handle in ``tree``."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", _MICRO, str(subs), str(pairs)], cwd=tree,
                             env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True,
                             timeout=600, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1])["us_per_pair"])
    return statistics.median(runs)


def wait_connections(port: int, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        _status, doc = httputil.healthz(port)
        n = doc.get("connections", 0)
        if n >= want:
            return n
        time.sleep(0.2)
    raise SystemExit("only %d of %d connections after %.0f s" % (n, want, timeout))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subs", type=int, default=10000)
    p.add_argument("--rate", type=float, default=20.0, help="messages per second to all subscribers")
    p.add_argument("--churn", type=float, default=1000.0, help="subscribe/unsubscribe pairs per second")
    p.add_argument("--churners", type=int, default=10)
    p.add_argument("--seconds", type=float, default=4.0, help="length of one phase")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tree", default=str(ROOT), help="the checkout whose server runs")
    p.add_argument("--micro", action="store_true", help="measure Hub.handle per churn pair instead")
    p.add_argument("--compare", action="append", default=[], metavar="TREE",
                   help="with --micro: another checkout to measure the same way")
    p.add_argument("--pairs", type=int, default=20000, help="with --micro: pairs per run")
    args = p.parse_args(argv)
    if args.micro:
        doc = {"subs": args.subs, "pairs": args.pairs,
               "us_per_pair": {t: round(micro(t, args.subs, args.pairs, args.repeat), 2)
                               for t in [args.tree] + args.compare}}
        print(json.dumps(doc))
        return 0

    exe = load_bench().build(Path.home() / ".cache" / "wsbroadcast-bench")["loadgen"]
    phases = ["base", "churn", "listened"]
    total = args.repeat * len(phases) * (args.seconds + 0.5) + 30
    env = dict(os.environ, PYTHONPATH=args.tree)
    results: Dict[str, List[float]] = {k: [] for k in phases}
    with ServerProcess("--store", "memory", "--max-connections", "20000",
                       "--max-pending", "1024", cwd=args.tree, env=env) as srv:
        gen = subprocess.Popen([exe, "--path", "/ws", "--port", str(srv.port), "--mode", "rate",
                                "--rate", str(args.rate), "--subs", str(args.subs), "--size", "100",
                                "--duration", str(total), "--warmup", "0", "--connect-timeout", "120"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_connections(srv.port, args.subs + 1, 150)
            churn = Churn(srv.port, args.churners, args.churn)
            listener = None
            time.sleep(1.0)  # let the fan-out settle before the first phase
            for _ in range(args.repeat):
                for phase in phases:
                    if phase == "listened":
                        listener = wsraw.connect(srv.port, rcvbuf=1 << 20)
                        assert wsraw.subscribe(listener, "broadcast", 1, join_leave=True)["type"] == "ack"
                        listener.sock.setblocking(False)
                        drain = threading.Thread(target=_drain, args=(listener.sock, churn.stop),
                                                 name="bench-listener", daemon=True)
                        drain.start()
                    if phase != "base":
                        churn.on.set()
                    time.sleep(0.5)  # a phase starts settled
                    c0, t0, s0 = cpu_seconds(srv.pid), time.monotonic(), churn.sent
                    time.sleep(args.seconds)
                    c1, t1, s1 = cpu_seconds(srv.pid), time.monotonic(), churn.sent
                    results[phase].append(100.0 * (c1 - c0) / (t1 - t0))
                    if phase != "base" and s1 - s0 < 0.8 * args.churn * (t1 - t0):
                        print("warning: churn reached %.0f pairs/s" % ((s1 - s0) / (t1 - t0)), file=sys.stderr)
                    churn.on.clear()
                    if listener is not None:
                        listener.sock.close()
                        listener = None
            churn.close()
        finally:
            gen.terminate()
            try:
                out, _err = gen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                gen.kill()
                out, _err = gen.communicate()
    med = {k: round(statistics.median(v), 1) for k, v in results.items()}
    doc = {"tree": args.tree, "subs": args.subs, "rate": args.rate, "churn_pairs_per_s": args.churn,
           "cpu_percent": med, "samples": {k: [round(x, 1) for x in v] for k, v in results.items()},
           "churn_increase_percent": round(100.0 * (med["churn"] - med["base"]) / med["base"], 1),
           "listened_increase_percent": round(100.0 * (med["listened"] - med["base"]) / med["base"], 1)}
    lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
    if lines:
        gen_doc = json.loads(lines[-1])
        doc["deliveries_per_s"] = gen_doc.get("deliveries_per_s") or gen_doc.get("rate")
    print(json.dumps(doc))
    return 0


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            stop.wait(0.005)
        except OSError:
            return


if __name__ == "__main__":
    sys.exit(main())
