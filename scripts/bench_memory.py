#!/usr/bin/env python3
"""What attacks cost the server in memory: RSS before and after, one scenario at a time.

Each scenario starts its own broker the way a user does (``python -m wsbroadcast
serve``, through tests/serverproc.py), prepares it, measures its RSS, runs the
attack, samples the RSS for a while (the largest sample counts) and checks that
an honest client is still served. One table row per measurement:

    scripts/bench_memory.py [--only NAME ...] [--store sqlite|memory] [--settle 4]

Scenarios (``--only`` picks some; default: all):

- ``history``: ``--messages`` stored messages of ``--size`` bytes on one topic;
  ``--clients`` HTTP clients ask ``GET /history?limit=1000`` and never read, and as
  many v1 subscribers ask ``since: 0`` and never read. Target: growth < 64 MiB; a
  reading client then pages through the whole history and a ``since: 0``
  subscriber receives every message.
- ``fragments``: one text frame without FIN, then ``--fragments`` empty continuation
  frames on one connection. Target: the RSS comes back within 2 MiB of its level
  before the attack once the connection is closed.
- ``chunked``: ``--chunked-clients`` HTTP publishes whose bodies (just under 1 MiB)
  come in 2-byte chunks and never end. Target: growth < 64 MiB.
- ``topics``: ``--topics`` distinct topics (default 1,000,000), one message of
  ``--topic-size`` bytes each. On the memory store with ``--memory-store-bytes
  --topics-budget``: target growth < the budget + 16 MiB. On the memory store with
  ``--history-ttl`` (and a budget that holds them all), the topics expire after they
  are all published; a probe publishes with an id every 10 ms; target: ack p99 < 50 ms
  while they are trimmed and forgotten (the p99 during the publish flood is shown too).
  On SQLite: target growth < 32 MiB (the topics' metadata is a bounded cache).

A scenario is a function registered with ``@scenario(name)``; it gets the parsed
arguments and returns ``Row``s. Options of its own are added by the function
given as ``options=``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import wsraw  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

MIB = 1024 * 1024
#: receive buffer of the clients that never read (the kernel absorbs little for them)
NONREADER_RCVBUF = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Row(NamedTuple):
    """One measurement: RSS in MiB before and after (the largest sample) the attack."""

    scenario: str
    case: str
    before: float
    after: float
    target: Optional[float]  # largest acceptable growth in MiB (None: no target)
    note: str = ""

    @property
    def growth(self) -> float:
        return self.after - self.before

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "ok" if self.growth < self.target and "FAIL" not in self.note else "FAIL"


class Scenario(NamedTuple):
    run: Callable[[argparse.Namespace], List[Row]]
    options: Optional[Callable[[argparse.ArgumentParser], None]]
    doc: str


SCENARIOS: Dict[str, Scenario] = {}


def scenario(name: str, options: Optional[Callable[[argparse.ArgumentParser], None]] = None
             ) -> Callable[[Callable[[argparse.Namespace], List[Row]]], Callable[[argparse.Namespace], List[Row]]]:
    """Register a scenario function under ``name`` (``--only name``)."""
    def register(fn: Callable[[argparse.Namespace], List[Row]]) -> Callable[[argparse.Namespace], List[Row]]:
        SCENARIOS[name] = Scenario(fn, options, (fn.__doc__ or "").strip().splitlines()[0])
        return fn
    return register


# ---------------------------------------------------------------- shared helpers


def start_server(args: argparse.Namespace, workdir: str, *extra: str) -> ServerProcess:
    """A broker as a user starts it, with the store asked for (SQLite in ``workdir``)."""
    store = "memory" if args.store == "memory" else os.path.join(workdir, "history.db")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return ServerProcess("--store", store, *extra,
                         cwd=str(ROOT), env=env, timeout=30.0)


def rss_mib(proc: ServerProcess) -> float:
    return proc.rss_kib() / 1024.0


def steady_rss(proc: ServerProcess, quiet: float = 1.0, timeout: float = 30.0) -> float:
    """The RSS once it has not moved by more than 1 MiB for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last = rss_mib(proc)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = rss_mib(proc)
        if abs(now - last) > 1.0:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
    return rss_mib(proc)


def peak_rss(proc: ServerProcess, seconds: float) -> float:
    """The largest RSS sampled every 50 ms for ``seconds``."""
    peak = rss_mib(proc)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        peak = max(peak, rss_mib(proc))
    return peak


def http_publish(conn: http.client.HTTPConnection, topic: str, data: str) -> int:
    body = json.dumps({"topic": topic, "data": data}).encode()
    conn.request("POST", "/publish", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError("publish answered %d: %r" % (resp.status, doc))
    return int(doc["seq"])


# ---------------------------------------------------------------- scenario: history


def _history_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("history")
    g.add_argument("--messages", type=int, default=200, help="stored messages (default 200)")
    g.add_argument("--size", type=int, default=MIB - 64,
                   help="bytes of each message's data (default: just under 1 MiB)")
    g.add_argument("--clients", type=int, default=10,
                   help="non-reading /history clients, and as many since:0 subscribers (default 10)")


def read_history(port: int, topic: str, timeout: float = 60.0) -> List[int]:
    """Page through GET /history with ``since`` = the last seq got; return every seq."""
    seqs: List[int] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        while True:
            conn.request("GET", "/history?topic=%s&limit=1000&since=%d" % (topic, seqs[-1] if seqs else 0))
            resp = conn.getresponse()
            rows = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError("history answered %d: %r" % (resp.status, rows))
            if not rows:
                return seqs
            seqs.extend(r["seq"] for r in rows)
    finally:
        conn.close()


def replay_all(port: int, topic: str, count: int, timeout: float = 60.0) -> List[int]:
    """Subscribe with ``since: 0`` and read ``count`` messages; return their seqs."""
    ws = wsraw.connect(port, timeout=timeout)
    try:
        ws.send_json({"type": "subscribe", "topic": topic, "since": 0, "id": "r"})
        seqs: List[int] = []
        deadline = time.monotonic() + timeout
        while len(seqs) < count:
            msg = ws.recv_json(timeout=max(0.1, deadline - time.monotonic()))
            if msg.get("type") == "message":
                seqs.append(msg["seq"])
        return seqs
    finally:
        ws.close()


def nonreading_history(port: int, topic: str) -> object:
    """A client that asks for a topic's whole history and never reads the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NONREADER_RCVBUF)
    sock.settimeout(10.0)
    sock.connect(("127.0.0.1", port))
    sock.sendall(("GET /history?topic=%s&limit=1000 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                  % (topic, port)).encode())
    return sock


def nonreading_replay(port: int, topic: str) -> object:
    """A v1 subscriber that asks for a topic's whole history (``since: 0``) and never reads."""
    ws = wsraw.connect(port, rcvbuf=NONREADER_RCVBUF)
    ws.send_json({"type": "subscribe", "topic": topic, "since": 0, "id": 1})
    return ws


@scenario("history", options=_history_options)
def history_scenario(args: argparse.Namespace) -> List[Row]:
    """Non-reading /history clients and since:0 subscribers on a large history."""
    topic = "bench.history"
    rows: List[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        with start_server(args, workdir, "--history-size", str(max(1000, args.messages))) as proc:
            data = "x" * args.size
            log("history: publishing %d messages of %d bytes" % (args.messages, args.size))
            conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=60)
            try:
                for _ in range(args.messages):
                    http_publish(conn, topic, data)
            finally:
                conn.close()
            del data
            before = steady_rss(proc)
            log("history: %.1f MiB before; %d non-reading clients of each kind"
                % (before, args.clients))
            held: List[object] = []
            try:
                for _ in range(args.clients):
                    held.append(nonreading_history(proc.port, topic))
                for _ in range(args.clients):
                    held.append(nonreading_replay(proc.port, topic))
                after = peak_rss(proc, args.settle)
                seqs = read_history(proc.port, topic)
                got_http = seqs == list(range(1, args.messages + 1))
                seqs = replay_all(proc.port, topic, args.messages)
                got_ws = seqs == list(range(1, args.messages + 1))
            finally:
                for c in held:
                    c.close()  # type: ignore[attr-defined]
            note = "reader: /history %s, since:0 %s" % ("all" if got_http else "FAIL",
                                                        "all" if got_ws else "FAIL")
            rows.append(Row("history", "%s, %d x %d B, %d+%d non-readers" % (
                args.store, args.messages, args.size, args.clients, args.clients),
                before, after, 64.0, note))
    return rows


# ---------------------------------------------------------------- scenario: fragments


def _fragments_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fragments")
    g.add_argument("--fragments", type=int, default=1_600_000,
                   help="empty continuation frames sent after one unfinished text frame (default 1.6 million)")


class _Sampler:
    """The largest RSS of a process, sampled every 50 ms in a thread until ``stop()``."""

    def __init__(self, proc: ServerProcess) -> None:
        import threading
        self.proc = proc
        self.peak = rss_mib(proc)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.proc))
            except (OSError, RuntimeError):
                return

    def stop(self) -> float:
        self._done.set()
        self._thread.join(5)
        return self.peak


@scenario("fragments", options=_fragments_options)
def fragments_scenario(args: argparse.Namespace) -> List[Row]:
    """One message of endless empty continuation frames; RSS during and after the connection."""
    rows: List[Row] = []
    block_frames = 10_000
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        with start_server(args, workdir) as proc:
            idle_threads = proc.threads()
            before = steady_rss(proc)
            log("fragments: %.1f MiB before; sending %d empty continuation frames"
                % (before, args.fragments))
            ws = wsraw.connect(proc.port, timeout=60)
            sampler = _Sampler(proc)
            sent = 0
            started = time.monotonic()
            ws.send_frame(0x1, b"", fin=False)
            block = wsraw.encode_frame(0x0, b"", fin=False) * block_frames
            try:
                while sent < args.fragments:
                    ws.sock.sendall(block)
                    sent += block_frames
                ws.send_frame(0x0, b"")  # the end of the message, if it is still read
            except OSError as exc:
                log("fragments: the server stopped reading after %d frames (%s)" % (sent, exc))
            code = None
            try:
                code = ws.expect_close(timeout=5)[0]
            except (OSError, TimeoutError) as exc:
                log("fragments: no close frame (%s)" % (exc,))
            elapsed = time.monotonic() - started
            ws.close()
            during = sampler.stop()
            gone = wsraw.wait_for(lambda: proc.threads() <= idle_threads, timeout=120)
            after = steady_rss(proc, quiet=2.0)
            note = "%d frames sent in %.1fs, close %s%s" % (sent, elapsed, code,
                                                          "" if gone else ", thread still there: FAIL")
            rows.append(Row("fragments", "%s, during the message" % args.store, before, during, None, note))
            rows.append(Row("fragments", "%s, after the close" % args.store, before, after, 2.0, ""))
    return rows


# ---------------------------------------------------------------- scenario: chunked


def _chunked_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chunked")
    g.add_argument("--chunked-clients", type=int, default=10,
                   help="HTTP publishers sending a body in 2-byte chunks, never finished (default 10)")


@scenario("chunked", options=_chunked_options)
def chunked_scenario(args: argparse.Namespace) -> List[Row]:
    """HTTP publish bodies just under the size limit in 2-byte chunks, never finished."""
    rows: List[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        with start_server(args, workdir) as proc:
            before = steady_rss(proc)
            head = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" % proc.port)
            body = b"2\r\nxx\r\n" * ((MIB - 64) // 2)
            log("chunked: %.1f MiB before; %d clients x %d bytes of chunks"
                % (before, args.chunked_clients, len(body)))
            held: List[socket.socket] = []
            try:
                for _ in range(args.chunked_clients):
                    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=60)
                    sock.sendall(head + body)  # no last chunk: the server keeps what it read
                    held.append(sock)
                after = peak_rss(proc, args.settle)
            finally:
                for sock in held:
                    sock.close()
            rows.append(Row("chunked", "%d clients, 2-byte chunks" % args.chunked_clients,
                            before, after, 64.0, ""))
    return rows


# ---------------------------------------------------------------- scenario: topics


def _topics_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("topics")
    g.add_argument("--topics", type=int, default=1_000_000,
                   help="distinct topics published, one message each (default 1,000,000)")
    g.add_argument("--topic-size", type=int, default=100, help="bytes of each message's data (default 100)")
    g.add_argument("--topics-budget", default="64MiB",
                   help="--memory-store-bytes of the budget case (default 64MiB)")
    g.add_argument("--topics-ttl", type=float, default=0.0,
                   help="--history-ttl of the trim case, in seconds (default: long enough for the "
                        "topics to be published before the first one expires, from the budget case)")


def publish_topics(port: int, prefix: str, count: int, size: int, batch: int = 500) -> float:
    """Publish one message on each of ``count`` distinct topics from one connection; seconds taken."""
    ws = wsraw.connect(port, timeout=60)
    data = json.dumps("x" * max(0, size - 2))
    started = time.monotonic()
    try:
        frames: List[bytes] = []
        for i in range(count):
            text = '{"type":"publish","topic":"%s.%d","data":%s}' % (prefix, i, data)
            frames.append(wsraw.encode_frame(0x1, text.encode()))
            if len(frames) == batch:
                ws.sock.sendall(b"".join(frames))
                frames = []
            if i % 50_000 == 49_999 or i == count - 1:  # keep in step with the server
                if frames:
                    ws.sock.sendall(b"".join(frames))
                    frames = []
                ws.send_json({"type": "ping", "id": i})
                while ws.recv_json(timeout=300).get("id") != i:
                    pass
        return time.monotonic() - started
    finally:
        ws.close()


def healthz(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class _Probe:
    """Publishes with an id every 10 ms on its own connection; (sent at, ack latency) pairs."""

    def __init__(self, port: int) -> None:
        import threading
        self.samples: List[tuple] = []
        self.errors = 0
        self._ws = wsraw.connect(port, timeout=60)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._done.wait(0.01):
            n += 1
            sent = time.monotonic()
            try:
                self._ws.send_json({"type": "publish", "topic": "probe", "data": n, "id": n})
                while True:
                    reply = self._ws.recv_json(timeout=60)
                    if reply.get("id") == n:
                        break
            except (OSError, TimeoutError, ValueError):
                self.errors += 1
                return
            if reply.get("type") != "ack":
                self.errors += 1
            self.samples.append((sent, time.monotonic() - sent))

    def stop(self) -> None:
        self._done.set()
        self._thread.join(70)
        self._ws.close()


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _serve(store: str, *extra: str) -> ServerProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return ServerProcess("--store", store, *extra, cwd=str(ROOT), env=env, timeout=30.0)


@scenario("topics", options=_topics_options)
def topics_scenario(args: argparse.Namespace) -> List[Row]:
    """Many distinct topics: the memory store's budget, a TTL trim of all of them, SQLite."""
    from wsbroadcast.config import parse_size

    rows: List[Row] = []
    n, size = args.topics, args.topic_size
    budget = parse_size(args.topics_budget)

    # 1. the byte budget
    with _serve("memory", "--memory-store-bytes", str(budget)) as proc:
        before = steady_rss(proc)
        log("topics: memory store of %s: %.1f MiB before; publishing %d topics"
            % (args.topics_budget, before, n))
        sampler = _Sampler(proc)
        took = publish_topics(proc.port, "t", n, size)
        after = max(sampler.stop(), peak_rss(proc, args.settle))
        broker = healthz(proc.port)["broker"]
        ttl = args.topics_ttl or round(took * 1.3 + 10)
        rows.append(Row("topics", "memory, %d topics x %d B, budget %s" % (n, size, args.topics_budget),
                        before, after, budget / MIB + 16.0,
                        "%.0f/s; %d topics kept, %.1f of %.1f MiB accounted" % (
                            n / took, broker["topics"], broker["bytes"] / MIB, broker["max_bytes"] / MIB)))

    # 2. a TTL trim of every topic, publishes measured meanwhile
    with _serve("memory", "--memory-store-bytes", "4GiB", "--history-ttl", "%g" % ttl) as proc:
        before = steady_rss(proc)
        log("topics: memory store, ttl %gs: %.1f MiB before; publishing %d topics" % (ttl, before, n))
        probe = _Probe(proc.port)
        sampler = _Sampler(proc)
        started = time.monotonic()
        took = publish_topics(proc.port, "t", n, size)
        deadline = time.monotonic() + 600
        while healthz(proc.port)["broker"]["topics"] > 1 and time.monotonic() < deadline:
            time.sleep(0.5)  # only "probe" is left once every other topic is forgotten
        finished = time.monotonic()
        time.sleep(10.0)  # the same probe with nothing else to do: this machine's baseline
        probe.stop()
        after = sampler.stop()
        trim = healthz(proc.port)["trim"]
        load = os.getloadavg()[0]
        expiry = started + ttl
        calm = [lat for at, lat in probe.samples if at < min(expiry, started + took)]
        trimming = [lat for at, lat in probe.samples if expiry <= at < finished]
        idle = [lat for at, lat in probe.samples if at >= finished]
        p99 = _percentile(trimming, 0.99) * 1000
        note = ("publish %.0f/s for %.0fs; all forgotten %.0fs after the first expiry; ack ms "
                "during the flood p50 %.1f p99 %.1f, during the trim p50 %.1f p99 %.1f max %.1f (%d acks%s), "
                "idle after p99 %.1f; longest step %.1f ms (%.1f ms CPU) of %d; load average %.1f%s" % (
                    n / took, took, finished - expiry,
                    _percentile(calm, 0.5) * 1000, _percentile(calm, 0.99) * 1000,
                    _percentile(trimming, 0.5) * 1000, p99, max(trimming or [0]) * 1000,
                    len(trimming), ", %d probe errors" % probe.errors if probe.errors else "",
                    _percentile(idle, 0.99) * 1000,
                    trim["longest_hold_ms"], trim["longest_cpu_ms"], trim["steps"], load,
                    "" if p99 < 50 and finished < deadline and not probe.errors else " FAIL"))
        rows.append(Row("topics", "memory, %d topics, ttl %gs" % (n, ttl),
                        before, after, 4096.0, note))  # the budget: the verdict is the note's

    # 3. SQLite: the topics' metadata in memory is a bounded cache
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as workdir:
        with _serve(os.path.join(workdir, "history.db")) as proc:
            before = steady_rss(proc)
            log("topics: sqlite store: %.1f MiB before; publishing %d topics" % (before, n))
            sampler = _Sampler(proc)
            took = publish_topics(proc.port, "t", n, size)
            after = max(sampler.stop(), peak_rss(proc, args.settle))
            rows.append(Row("topics", "sqlite, %d topics x %d B" % (n, size), before, after, 32.0,
                            "%.0f/s; %.0f B of RSS per topic; file %.0f MB" % (
                                n / took, (after - before) * MIB / n,
                                os.path.getsize(os.path.join(workdir, "history.db")) / 1e6)))
    return rows


# ---------------------------------------------------------------- main


def print_table(rows: List[Row]) -> None:
    head = ("scenario", "case", "RSS before MiB", "RSS after MiB", "growth MiB", "target", "verdict", "note")
    table = [head] + [(r.scenario, r.case, "%.1f" % r.before, "%.1f" % r.after, "%.1f" % r.growth,
                       "< %g" % r.target if r.target is not None else "-", r.verdict, r.note)
                      for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(head))]
    for n, line in enumerate(table):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join("%s: %s" % (n, s.doc) for n, s in SCENARIOS.items()))
    p.add_argument("--only", action="append", choices=sorted(SCENARIOS),
                   help="run this scenario (repeatable; default: all)")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite",
                   help="the server's store (default: sqlite, as `serve` does)")
    p.add_argument("--settle", type=float, default=4.0,
                   help="seconds the RSS is sampled after an attack (default 4)")
    p.add_argument("--json", help="also write the rows to this file")
    for s in SCENARIOS.values():
        if s.options is not None:
            s.options(p)
    args = p.parse_args(argv)
    rows: List[Row] = []
    for name in args.only or list(SCENARIOS):
        rows.extend(SCENARIOS[name].run(args))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r._asdict(), growth=r.growth, verdict=r.verdict) for r in rows], f, indent=2)
    return 0 if all(r.verdict != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
