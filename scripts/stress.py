#!/usr/bin/env python3
"""wsbroadcast stress client: many subscribers and publishers, each on its own connection.

Built on the project's own synchronous client (``wsbroadcast.Client``). S subscriber
threads connect and subscribe to every topic of --topics (or to --subscribe-pattern);
P publisher threads then publish for --duration seconds at --rate messages/s each,
cycling over the topics. Every payload carries its send time (time.time_ns, so the
latency is comparable between processes on the same host), the publisher's id and a
per-publisher counter, padded to --size bytes. After publishing stops, subscribers
get --drain seconds to receive what is still in flight; then a report is printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import random
import resource
import socket
import ssl
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(ROOT, "wsbroadcast")):
    sys.path.insert(0, ROOT)  # a checkout runs its own client

try:
    import wsbroadcast.client  # noqa: E402,F401  (with every dependency of the client)
except ImportError as exc:  # a Python without wsbroadcast's dependencies (the system's python3)
    print("stress.py: %s has no module %r, which wsbroadcast needs; run it with the virtual "
          "environment's Python, e.g. .venv/bin/python scripts/stress.py" % (sys.executable, exc.name or str(exc)),
          file=sys.stderr)
    sys.exit(2)
from wsbroadcast.errors import ClientError, ConnectionClosed, ProtocolError, TopicError  # noqa: E402
from wsbroadcast.topics import pattern_matches, validate_pattern, validate_topic  # noqa: E402

PROG = "stress.py"
CLOSE_GRACE = 3.0  # seconds allowed for closing every connection at the end
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_WATCHDOG = 0, 1, 2, 3

DESCRIPTION = """\
A threaded stress client for a wsbroadcast server, built on wsbroadcast.Client.

S subscriber threads each open a connection and subscribe to every topic of --topics
(or to --subscribe-pattern). Once all of them are set up (connections are spread over
--ramp-up seconds), P publisher threads, each on its own connection, publish for
--duration seconds at --rate messages/s each, cycling over the topics. Each payload
carries its send time (time.time_ns), the publisher's id and a per-publisher counter,
padded to --size bytes; subscribers measure the latency from it and check that every
message published to their topics arrives once and in order. After publishing, the
subscribers get up to --drain seconds to receive what is in flight. Latency runs from
the publish call to the subscriber's recv(), so it includes both clients' queues.

A progress line (elapsed, connected, published/s, delivered/s, errors) goes to stderr
once a second; the report goes to stdout (JSON with --json). The run always ends by
itself: within ramp-up + duration + drain + 2 x timeout + 3 s (printed at the start).
Only loopback servers are accepted unless --allow-remote is given.

Exit status: 0 clean run; 1 when anything was lost, out of order, duplicated, or a
connect/publish error occurred; 2 usage error; 3 the hard time limit was hit.
"""

EPILOG = """\
examples:
  # 20 subscribers, 2 publishers at 1000 msg/s each for 5 s, against a local server
  .venv/bin/python scripts/stress.py --subscribers 20 --publishers 2 --rate 1000 --duration 5

  # as fast as possible over three topics, wildcard subscribers, JSON report and a chart
  .venv/bin/python scripts/stress.py --topics news.eu,news.us,news.asia --subscribe-pattern 'news.*' \\
      --rate 0 --ack-every 50 --json --plot stress.png > report.json

  # a TLS server with a token (the token may also come from $WSBROADCAST_TOKEN)
  .venv/bin/python scripts/stress.py --url wss://localhost:8443/ws --cafile ca.pem --token "$TOKEN"

Note: the client is Python; at high rates the stress process itself may be the
bottleneck (see client_cpu_percent in the report). scripts/bench measures the
server with a C load generator instead.
"""


# ---------------------------------------------------------------------- statistics
class LogHistogram:
    """Latencies in logarithmic buckets (4% wide: percentiles within 2%): bounded memory, any count.

    Values are in microseconds; bucket 0 holds everything below 1 us, the last one
    everything above about an hour. Exact count, sum, min and max are kept too.
    """

    GROWTH = 1.04
    BUCKETS = 600

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0
        self._log_growth = math.log(self.GROWTH)

    def add(self, us: float) -> None:
        if us < 0:
            us = 0.0
        if us < 1.0:
            i = 0
        else:
            i = min(self.BUCKETS - 1, 1 + int(math.log(us) / self._log_growth))
        self.counts[i] += 1
        self.count += 1
        self.total += us
        if us < self.min:
            self.min = us
        if us > self.max:
            self.max = us

    def merge(self, other: "LogHistogram") -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def bounds(self, i: int) -> Tuple[float, float]:
        """The [low, high) range of bucket i in microseconds."""
        if i == 0:
            return 0.0, 1.0
        return self.GROWTH ** (i - 1), self.GROWTH ** i

    def percentile(self, q: float) -> Optional[float]:
        """The q-th percentile (0-100) in microseconds, within a bucket's width."""
        if not self.count:
            return None
        rank = max(1, math.ceil(self.count * q / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                lo, hi = self.bounds(i)
                mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
                return min(max(mid, self.min), self.max)
        return self.max

    def summary_ms(self) -> Dict[str, Any]:
        def ms(v: Optional[float]) -> Optional[float]:
            return None if v is None else round(v / 1000.0, 3)
        return {
            "count": self.count,
            "min": ms(self.min) if self.count else None,
            "mean": ms(self.total / self.count) if self.count else None,
            "p50": ms(self.percentile(50)), "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)), "p99.9": ms(self.percentile(99.9)),
            "max": ms(self.max) if self.count else None,
        }


class Bitmap:
    """Which counters were seen: one bit each, grown by doubling (max-messages / 8 bytes)."""

    __slots__ = ("bits",)

    def __init__(self) -> None:
        self.bits = bytearray(1024)

    def test_and_set(self, n: int) -> bool:
        """Mark n as seen; True when it was seen already."""
        byte, bit = n >> 3, 1 << (n & 7)
        if byte >= len(self.bits):
            self.bits.extend(bytes(max(byte + 1, 2 * len(self.bits)) - len(self.bits)))
        old = self.bits[byte] & bit
        self.bits[byte] |= bit
        return bool(old)


# ---------------------------------------------------------------------- shared run state
class Run:
    """What the threads share: options, phase, events and the client factory."""

    def __init__(self, args: argparse.Namespace, ssl_context: Optional[ssl.SSLContext]) -> None:
        self.args = args
        self.ssl_context = ssl_context
        self.run_id = "%06x" % random.getrandbits(24)  # tells this run's messages from others'
        self.t0 = time.monotonic()
        self.stop = threading.Event()  # everything winds down
        self.go = threading.Event()  # publishing may start
        self.pub_stop = threading.Event()  # publishing must stop now
        self.lock = threading.Lock()  # guards: setup_pending, publishing_started
        self.setup_pending = 0
        self.setup_done = threading.Condition(self.lock)
        self.publishing_started = False
        self.phase = "connecting"
        self.pad_cache: Dict[int, str] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def client(self, on_gap: Any = None) -> Any:
        from wsbroadcast.client import Client
        return Client.connect(self.args.url, token=self.args.token or None,
                              ssl_context=self.ssl_context, reconnect=True,
                              timeout=self.args.timeout, on_gap=on_gap)

    def finish_setup(self) -> bool:
        """A thread's setup is over; False when publishing had already started (too late)."""
        with self.lock:
            self.setup_pending -= 1
            self.setup_done.notify_all()
            return not self.publishing_started

    def wait_start_delay(self, index: int, total: int) -> bool:
        """Wait for this connection's slot in the ramp-up; False when the run stops first."""
        delay = self.args.ramp_up * index / max(1, total)
        return not self.stop.wait(max(0.0, self.t0 + delay - time.monotonic()))


def describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return "%s: %s" % (exc.__class__.__name__, text)


class Worker(threading.Thread):
    """One connection of the run: set up in its ramp-up slot, then does its part."""

    def __init__(self, name: str, run: Run, ident: int, slot: int, slots: int) -> None:
        super().__init__(name=name, daemon=True)
        self.run_ = run
        self.num = ident
        self.slot, self.slots = slot, slots
        self.client: Any = None
        self.setup_ok = False
        self.connect_error: Optional[str] = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def setup(self) -> None:
        """Open the connection (and subscribe); errors are recorded, not raised."""
        self.client = self.run_.client()

    def set_up(self) -> bool:
        """Wait for this worker's slot, set up, and report whether it is ready."""
        run = self.run_
        try:
            if not run.wait_start_delay(self.slot, self.slots):
                return False
            try:
                self.setup()
                self.setup_ok = True
            except Exception as exc:  # OSError, ConnectionError, handshake and protocol errors
                self.connect_error = describe(exc)
        finally:
            if not run.finish_setup() and self.setup_ok:
                self.setup_ok = False
                self.connect_error = "setup not finished before publishing started (--timeout)"
        return self.setup_ok


class Subscriber(Worker):
    def __init__(self, run: Run, ident: int, patterns: List[str], slot: int, slots: int) -> None:
        super().__init__("stress-sub-%d" % ident, run, ident, slot, slots)
        self.patterns = patterns
        self.closed_error: Optional[str] = None
        self.received = 0  # deliveries of this run's messages, duplicates included
        self.distinct = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.foreign = 0  # messages of other runs or publishers on the same topics
        self.gaps = 0
        self.hist = LogHistogram()
        self.seen: Dict[int, Bitmap] = {}
        self.last: Dict[Tuple[int, str], int] = {}
        self.expected: Optional[int] = None
        self.done = threading.Event()

    def _on_gap(self, pattern: str, reply: Any) -> None:
        self.gaps += 1

    def setup(self) -> None:
        self.client = self.run_.client(on_gap=self._on_gap)
        for pattern in self.patterns:
            self.client.subscribe(pattern)

    def run(self) -> None:
        if not self.set_up():
            self.done.set()
            return
        self._receive()

    def _receive(self) -> None:
        run_id = self.run_.run_id
        stop = self.run_.stop
        client = self.client
        while not stop.is_set():
            try:
                msg = client.recv(timeout=0.2)
            except ConnectionClosed as exc:
                if not stop.is_set():
                    self.closed_error = describe(exc)
                break
            if msg is None:
                continue
            now = time.time_ns()
            data = msg.data
            if not isinstance(data, dict) or data.get("r") != run_id:
                self.foreign += 1
                continue
            try:
                pub, n, sent = int(data["p"]), int(data["n"]), int(data["t"])
            except (KeyError, TypeError, ValueError):
                self.foreign += 1
                continue
            self.received += 1
            self.hist.add((now - sent) / 1000.0)
            bitmap = self.seen.get(pub)
            if bitmap is None:
                bitmap = self.seen[pub] = Bitmap()
            if bitmap.test_and_set(n):
                self.duplicates += 1
                continue
            self.distinct += 1
            key = (pub, msg.topic)
            last = self.last.get(key, -1)
            if n < last:
                self.out_of_order += 1
            else:
                self.last[key] = n
            expected = self.expected
            if expected is not None and self.distinct >= expected:
                self.done.set()
        self.done.set()

    def lost(self) -> int:
        if not self.setup_ok or self.expected is None:
            return 0
        return max(0, self.expected - self.distinct)


class Publisher(Worker):
    def __init__(self, run: Run, ident: int, topics: List[str], slot: int, slots: int) -> None:
        super().__init__("stress-pub-%d" % ident, run, ident, slot, slots)
        self.topics = topics
        self.published = 0
        self.by_topic: Dict[str, int] = {t: 0 for t in topics}
        self.errors = 0
        self.error_samples: List[str] = []
        self.uncertain = 0  # sent, but the answer never came: may or may not be delivered
        self.started: Optional[float] = None
        self.stopped: Optional[float] = None

    def _error(self, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(describe(exc))

    def payload(self, n: int) -> Dict[str, Any]:
        run = self.run_
        data: Dict[str, Any] = {"r": run.run_id, "p": self.num, "n": n, "t": time.time_ns()}
        base = len(json.dumps(data, separators=(",", ":")))
        pad = run.args.size - base - len(',"x":""')
        if pad > 0:
            text = run.pad_cache.get(pad)
            if text is None:
                text = run.pad_cache[pad] = "x" * pad
            data["x"] = text
        return data

    def run(self) -> None:
        run = self.run_
        if not self.set_up():
            return
        run.go.wait()
        if run.stop.is_set() or run.pub_stop.is_set():
            return
        self._publish()

    def _publish(self) -> None:
        args = self.run_.args
        client = self.client
        topics = self.topics
        interval = 1.0 / args.rate if args.rate > 0 else 0.0
        ack_every = args.ack_every
        pub_stop = self.run_.pub_stop
        self.started = base = time.monotonic()
        end = base + args.duration
        n = 0
        scheduled = 0  # messages due since base (for the rate)
        while n < args.max_messages and not pub_stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            if interval:
                due = base + scheduled * interval
                if due > now:
                    time.sleep(min(due - now, end - now))
                    continue
                if now - due > 1.0:  # more than a second behind: do not burst to catch up
                    base += now - due - interval
                scheduled += 1
            topic = topics[n % len(topics)]
            ack = ack_every > 0 and (n + 1) % ack_every == 0
            try:
                client.publish(topic, self.payload(n), ack=ack)
                self.published += 1
                self.by_topic[topic] += 1
            except ProtocolError as exc:  # refused by the server: not stored, not delivered
                self._error(exc)
            except ClientError as exc:  # no answer in time: sent, fate unknown
                self._error(exc)
                self.uncertain += 1
            except ConnectionClosed as exc:
                self._error(exc)
                if "lost before the answer" in str(exc):
                    self.uncertain += 1
                if self.run_.stop.is_set():
                    break
            n += 1
        self.stopped = time.monotonic()
        # everything sent before the pong has been taken by the server's reader
        try:
            client.ping(timeout=args.timeout)
        except (ClientError, ConnectionClosed) as exc:
            self._error(exc)


class ServerErrorCounter(logging.Handler):
    """Counts the client's "server error" warnings: errors to publishes without an id."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.samples: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if text.startswith("server error"):
            self.count += 1
            if len(self.samples) < 5:
                self.samples.append(text)


# ---------------------------------------------------------------------- progress
class Progress(threading.Thread):
    """Once a second: a progress line on stderr and a point of the throughput timeline."""

    def __init__(self, run: Run, subs: List[Subscriber], pubs: List[Publisher],
                 async_errors: ServerErrorCounter, quiet: bool) -> None:
        super().__init__(name="stress-progress", daemon=True)
        self.run_ = run
        self.subs, self.pubs = subs, pubs
        self.async_errors = async_errors
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.halt = threading.Event()
        self.timeline: List[Dict[str, Any]] = []
        self._last = (run.elapsed(), 0, 0)
        self._width = 0

    def totals(self) -> Tuple[int, int, int, int]:
        published = sum(p.published for p in self.pubs)
        delivered = sum(s.received for s in self.subs)
        errors = (sum(1 for c in self.subs + self.pubs if c.connect_error)  # type: ignore[operator]
                  + sum(p.errors for p in self.pubs) + self.async_errors.count
                  + sum(1 for s in self.subs if s.closed_error))
        connected = sum(1 for c in self.subs + self.pubs if c.connected)  # type: ignore[operator]
        return published, delivered, errors, connected

    def tick(self) -> None:
        now = self.run_.elapsed()
        published, delivered, errors, connected = self.totals()
        t_last, p_last, d_last = self._last
        dt = max(1e-6, now - t_last)
        pub_rate, del_rate = (published - p_last) / dt, (delivered - d_last) / dt
        self._last = (now, published, delivered)
        self.timeline.append({"t": round(now, 3), "published_per_s": round(pub_rate, 1),
                              "delivered_per_s": round(del_rate, 1), "connected": connected,
                              "errors": errors})
        if self.quiet:
            return
        line = ("%6.1fs %-10s connected %d/%d  published %8.0f/s  delivered %9.0f/s  errors %d"
                % (now, self.run_.phase, connected, len(self.subs) + len(self.pubs),
                   pub_rate, del_rate, errors))
        if self.tty:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            sys.stderr.write("\r" + line + " " * pad)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def run(self) -> None:
        next_tick = time.monotonic() + 1.0
        while not self.halt.wait(max(0.0, next_tick - time.monotonic())):
            self.tick()
            next_tick += 1.0

    def finish(self) -> None:
        self.halt.set()
        self.join(2.0)
        if self.run_.elapsed() - self._last[0] >= 0.25:  # no rate from a sliver of a second
            self.tick()
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------- options
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError("must be a finite number, 0 or more")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30))
    target = parser.add_argument_group("server")
    target.add_argument("--url", default="ws://127.0.0.1:8080/ws",
                        help="the server's WebSocket URL, ws:// or wss:// (default: %(default)s)")
    target.add_argument("--allow-remote", action="store_true",
                        help="allow a server that is not on a loopback address (default: refuse)")
    target.add_argument("--token", default=os.environ.get("WSBROADCAST_TOKEN", ""),
                        help="JWT sent with every connection (default: $WSBROADCAST_TOKEN, else none)")
    target.add_argument("--cafile", help="CA certificate(s) to verify a wss:// server with "
                        "(default: the system's CAs)")
    target.add_argument("--insecure", action="store_true",
                        help="wss:// without verifying the certificate or host name (default: verify)")
    target.add_argument("--timeout", type=positive_float, default=5.0, metavar="SEC",
                        help="seconds for a connection's setup and for each acknowledged request "
                        "(default: %(default)s)")

    load = parser.add_argument_group("load")
    load.add_argument("--subscribers", "-s", type=non_negative_int, default=10, metavar="S",
                      help="subscriber threads, each on its own connection (default: %(default)s)")
    load.add_argument("--publishers", "-p", type=positive_int, default=1, metavar="P",
                      help="publisher threads, each on its own connection (default: %(default)s)")
    load.add_argument("--topics", default="stress",
                      help="comma-separated topics; each publisher cycles over them and every "
                      "subscriber subscribes to all of them (default: %(default)s)")
    load.add_argument("--subscribe-pattern", metavar="PATTERN",
                      help="subscribe to this pattern (wildcards * and >) instead of the topics "
                      "(default: the topics)")
    load.add_argument("--rate", type=non_negative_float, default=1000.0,
                      help="messages per second per publisher; 0: as fast as possible "
                      "(default: %(default)s)")
    load.add_argument("--size", type=non_negative_int, default=128,
                      help="bytes of each published JSON value, padded up to this; the smallest "
                      "is about 60 (default: %(default)s)")
    load.add_argument("--ack-every", type=non_negative_int, default=100, metavar="K",
                      help="every K-th publish waits for the server's ack, which bounds the data "
                      "in flight; 1: every publish; 0: never (default: %(default)s)")

    timing = parser.add_argument_group("time limits (every run ends by itself)")
    timing.add_argument("--duration", "-d", type=non_negative_float, default=10.0, metavar="SEC",
                        help="seconds of publishing (default: %(default)s)")
    timing.add_argument("--ramp-up", type=non_negative_float, default=1.0, metavar="SEC",
                        help="seconds over which connection setup is spread (default: %(default)s)")
    timing.add_argument("--drain", type=non_negative_float, default=5.0, metavar="SEC",
                        help="seconds subscribers get after publishing to receive what is in "
                        "flight (default: %(default)s)")
    timing.add_argument("--max-messages", type=positive_int, default=1_000_000, metavar="N",
                        help="hard cap of messages per publisher (default: %(default)s)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print the report as JSON on stdout (default: text)")
    out.add_argument("--plot", metavar="FILE.png",
                     help="write a latency histogram and a throughput-over-time chart; needs "
                     "matplotlib: pip install 'wsbroadcast[plot]' (default: no chart)")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no progress line on stderr (default: one a second)")
    out.add_argument("--worst", type=non_negative_int, default=5, metavar="N",
                     help="list the N worst subscribers in the report (default: %(default)s)")
    return parser


def is_loopback(host: str) -> bool:
    """True when host is a loopback address or a name that resolves only to such."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """Validate what argparse cannot; returns (topics, subscription patterns)."""
    parts = urlsplit(args.url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        parser.error("--url must be ws://HOST[:PORT]/PATH or wss://...: %r" % args.url)
    try:
        parts.port
    except ValueError:
        parser.error("--url has a bad port: %r" % args.url)
    if not args.allow_remote and not is_loopback(parts.hostname):
        parser.error("refusing %s: %s is not a loopback address; a stress run can overload a "
                     "shared server. Pass --allow-remote if you mean it." % (args.url, parts.hostname))
    if parts.scheme == "ws" and (args.cafile or args.insecure):
        parser.error("--cafile and --insecure apply to wss:// URLs only")
    if args.cafile and args.insecure:
        parser.error("--cafile and --insecure exclude each other")
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    if not topics:
        parser.error("--topics needs at least one topic")
    try:
        for t in topics:
            validate_topic(t)
        patterns = topics
        if args.subscribe_pattern is not None:
            patterns = [validate_pattern(args.subscribe_pattern)]
    except TopicError as exc:
        parser.error("bad topic or pattern: %s" % exc)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed here (%s); install it "
                         "with: %s -m pip install 'matplotlib>=3.5' (or the extra "
                         "'wsbroadcast[plot]')" % (sys.executable, sys.executable))
    return topics, patterns


def make_ssl_context(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    if urlsplit(args.url).scheme != "wss":
        return None
    ctx = ssl.create_default_context(cafile=args.cafile)
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------------- report
def spread(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {"min": None, "max": None, "total": 0}
    return {"min": min(values), "max": max(values), "total": sum(values)}


def build_report(args: argparse.Namespace, run: Run, subs: List[Subscriber], pubs: List[Publisher],
                 progress: Progress, async_errors: ServerErrorCounter, times: Dict[str, float],
                 time_limit: float, cpu: float) -> Tuple[Dict[str, Any], LogHistogram]:
    hist = LogHistogram()
    for s in subs:
        hist.merge(s.hist)
    live = [s for s in subs if s.setup_ok]
    published = sum(p.published for p in pubs)
    delivered = sum(s.distinct for s in subs)
    expected = sum(s.expected or 0 for s in live)
    pub_window = max(1e-6, times["pub_end"] - times["pub_start"]) if "pub_start" in times else 0.0
    deliver_window = max(1e-6, times["drain_end"] - times["pub_start"]) if "pub_start" in times else 0.0
    connect_errors = [c.connect_error for c in subs + pubs if c.connect_error]  # type: ignore[operator]

    def sub_row(s: Subscriber) -> Dict[str, Any]:
        p99 = s.hist.percentile(99)
        return {"id": s.num, "connected": s.setup_ok, "expected": s.expected or 0,
                "received": s.received, "distinct": s.distinct, "lost": s.lost(),
                "out_of_order": s.out_of_order, "duplicates": s.duplicates,
                "reconnects": s.client.reconnects if s.client is not None else 0, "gaps": s.gaps,
                "foreign": s.foreign, "latency_p99_ms": None if p99 is None else round(p99 / 1000, 3),
                "error": s.connect_error or s.closed_error}

    rows = [sub_row(s) for s in subs]
    live_rows = [r for r in rows if r["connected"]]
    worst = sorted(live_rows, key=lambda r: (r["lost"], r["out_of_order"], r["duplicates"],
                                             r["reconnects"], r["latency_p99_ms"] or 0.0),
                   reverse=True)[:args.worst]
    p99s = [r["latency_p99_ms"] for r in live_rows if r["latency_p99_ms"] is not None]
    report: Dict[str, Any] = {
        "url": args.url,
        "config": {"subscribers": args.subscribers, "publishers": args.publishers,
                   "topics": [t.strip() for t in args.topics.split(",") if t.strip()],
                   "subscribe_pattern": args.subscribe_pattern,
                   "rate": args.rate, "size": args.size, "duration": args.duration,
                   "ramp_up": args.ramp_up, "ack_every": args.ack_every, "drain": args.drain,
                   "max_messages": args.max_messages, "timeout": args.timeout},
        "elapsed_s": round(run.elapsed(), 3),
        "time_limit_s": round(time_limit, 3),
        "publishing_s": round(pub_window, 3),
        "drain_s": round(times.get("drain_end", 0) - times.get("pub_end", 0), 3) if "pub_end" in times else 0.0,
        "drained": times.get("drained", False),
        "connected_subscribers": len(live),
        "connected_publishers": sum(1 for p in pubs if p.setup_ok),
        "connect_errors": len(connect_errors),
        "connect_error_samples": connect_errors[:5],
        "published": published,
        "publish_rate": round(published / pub_window, 1) if pub_window else 0.0,
        "target_publish_rate": args.rate * sum(1 for p in pubs if p.setup_ok),
        "publish_errors": sum(p.errors for p in pubs) + async_errors.count,
        "publish_uncertain": sum(p.uncertain for p in pubs),
        "publish_error_samples": ([e for p in pubs for e in p.error_samples] + async_errors.samples)[:5],
        "expected": expected,
        "delivered": delivered,
        "deliveries_per_s": round(delivered / deliver_window, 1) if deliver_window else 0.0,
        "latency_ms": hist.summary_ms(),
        "lost": sum(r["lost"] for r in live_rows),
        "out_of_order": sum(r["out_of_order"] for r in live_rows),
        "duplicates": sum(r["duplicates"] for r in live_rows),
        "reconnects": sum(r["reconnects"] for r in rows),
        "gaps": sum(r["gaps"] for r in rows),
        "foreign": sum(r["foreign"] for r in rows),
        "closed_subscribers": sum(1 for s in subs if s.closed_error),
        "per_subscriber": {
            "received": spread([r["distinct"] for r in live_rows]),
            "lost": spread([r["lost"] for r in live_rows]),
            "out_of_order": spread([r["out_of_order"] for r in live_rows]),
            "duplicates": spread([r["duplicates"] for r in live_rows]),
            "reconnects": spread([r["reconnects"] for r in live_rows]),
            "latency_p99_ms": {"min": min(p99s) if p99s else None, "max": max(p99s) if p99s else None},
        },
        "worst_subscribers": worst,
        "publishers_detail": [{"id": p.num, "connected": p.setup_ok, "published": p.published,
                               "errors": p.errors, "uncertain": p.uncertain,
                               "error": p.connect_error} for p in pubs],
        "subscribers_detail": rows,
        "phases": {k: round(v - run.t0, 3) for k, v in times.items() if isinstance(v, float)},
        "timeline": progress.timeline,
        "client_cpu_percent": round(cpu, 1),
    }
    report["ok"] = (report["lost"] == 0 and report["out_of_order"] == 0 and report["duplicates"] == 0
                    and report["connect_errors"] == 0 and report["publish_errors"] == 0
                    and report["closed_subscribers"] == 0 and report["connected_publishers"] > 0)
    return report, hist


def fmt_ms(v: Optional[float]) -> str:
    return "-" if v is None else ("%.3g" % v if v < 100 else "%.0f" % v)


def behind(r: Dict[str, Any]) -> str:
    """A note when the publishers did not reach the rate they were asked for."""
    target = r["target_publish_rate"]
    if target and r["publish_rate"] < 0.95 * target:
        return " (target %.0f/s: the publishers fell behind)" % target
    return ""


def text_report(r: Dict[str, Any]) -> str:
    c = r["config"]
    lat = r["latency_ms"]
    lines = [
        "wsbroadcast stress  %s" % r["url"],
        "  %d subscribers, %d publishers, topics %s%s, rate %s/s per publisher, %d B, "
        "ack every %d, %.1f s" % (c["subscribers"], c["publishers"], ",".join(c["topics"]),
                                  " (subscribed as %s)" % c["subscribe_pattern"] if c["subscribe_pattern"] else "",
                                  "max" if not c["rate"] else "%g" % c["rate"], c["size"],
                                  c["ack_every"], c["duration"]),
        "",
        "connections   %d/%d subscribers, %d/%d publishers connected; %d connect errors, "
        "%d reconnects, %d subscribers closed"
        % (r["connected_subscribers"], c["subscribers"], r["connected_publishers"], c["publishers"],
           r["connect_errors"], r["reconnects"], r["closed_subscribers"]),
        "published     %d in %.2f s = %.0f/s%s; %d publish errors%s"
        % (r["published"], r["publishing_s"], r["publish_rate"], behind(r), r["publish_errors"],
           " (%d of unknown fate)" % r["publish_uncertain"] if r["publish_uncertain"] else ""),
        "delivered     %d of %d expected = %.0f/s over all subscribers (drain %.2f s%s)"
        % (r["delivered"], r["expected"], r["deliveries_per_s"], r["drain_s"],
           "" if r["drained"] else ", timed out"),
        "latency ms    p50 %s  p90 %s  p99 %s  p99.9 %s  max %s  (mean %s, min %s, %d samples)"
        % (fmt_ms(lat["p50"]), fmt_ms(lat["p90"]), fmt_ms(lat["p99"]), fmt_ms(lat["p99.9"]),
           fmt_ms(lat["max"]), fmt_ms(lat["mean"]), fmt_ms(lat["min"]), lat["count"]),
        "integrity     lost %d, out of order %d, duplicates %d, gaps %d, foreign %d"
        % (r["lost"], r["out_of_order"], r["duplicates"], r["gaps"], r["foreign"]),
        "",
        "per subscriber          min        max      total",
    ]
    for key, label in (("received", "received"), ("lost", "lost"), ("out_of_order", "out of order"),
                       ("duplicates", "duplicates"), ("reconnects", "reconnects")):
        s = r["per_subscriber"][key]
        lines.append("  %-14s %10s %10s %10s" % (label, "-" if s["min"] is None else s["min"],
                                                  "-" if s["max"] is None else s["max"], s["total"]))
    p = r["per_subscriber"]["latency_p99_ms"]
    lines.append("  %-14s %10s %10s" % ("p99 ms", fmt_ms(p["min"]), fmt_ms(p["max"])))
    troubled = [w for w in r["worst_subscribers"]
                if w["lost"] or w["out_of_order"] or w["duplicates"] or w["reconnects"] or w["error"]]
    if r["worst_subscribers"] and not troubled:
        w = r["worst_subscribers"][0]
        lines.append("worst subscribers: none lost, reordered or duplicated a message or reconnected; "
                     "highest p99: sub %d, %s ms" % (w["id"], fmt_ms(w["latency_p99_ms"])))
    elif troubled:
        lines.append("worst subscribers (by lost, out of order, duplicates, reconnects, p99):")
        for w in troubled:
            lines.append("  sub %-4d received %d/%d  lost %d  out of order %d  duplicates %d  "
                         "reconnects %d  p99 %s ms%s"
                         % (w["id"], w["distinct"], w["expected"], w["lost"], w["out_of_order"],
                            w["duplicates"], w["reconnects"], fmt_ms(w["latency_p99_ms"]),
                            "  (%s)" % w["error"] if w["error"] else ""))
    for label, key in (("connect errors", "connect_error_samples"), ("publish errors", "publish_error_samples")):
        if r[key]:
            lines.append("%s, first ones:" % label)
            lines.extend("  " + e for e in r[key])
    lines.append("")
    lines.append("client CPU %.0f%% of one core%s; run took %.1f s (limit %.1f s); %s"
                 % (r["client_cpu_percent"],
                    " (the stress client may be the bottleneck)" if r["client_cpu_percent"] > 85 else "",
                    r["elapsed_s"], r["time_limit_s"], "OK" if r["ok"] else "PROBLEMS FOUND"))
    return "\n".join(lines)


def plot(path: str, report: Dict[str, Any], hist: LogHistogram) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 10))
    grid = fig.add_gridspec(3, 1, height_ratios=(2.2, 1, 1), hspace=0.35)
    ax1 = fig.add_subplot(grid[0])
    ax2 = fig.add_subplot(grid[1])
    ax3 = fig.add_subplot(grid[2], sharex=ax2)
    lat = report["latency_ms"]
    c = report["config"]
    fig.suptitle("wsbroadcast stress: %d subscribers, %d publishers, %s msg/s each, %d B; "
                 "%.0f deliveries/s" % (c["subscribers"], c["publishers"],
                                        "max" if not c["rate"] else "%g" % c["rate"], c["size"],
                                        report["deliveries_per_s"]), fontsize=11)
    used = [i for i, n in enumerate(hist.counts) if n]
    if used:
        lo_i, hi_i = used[0], used[-1]
        lefts, widths, heights = [], [], []
        for i in range(lo_i, hi_i + 1):
            lo, hi = hist.bounds(i)
            lo = max(lo, 0.5)  # bucket 0 (< 1 us) on a log axis
            lefts.append(lo / 1000.0)
            widths.append((hi - lo) / 1000.0)
            heights.append(hist.counts[i])
        ax1.bar(lefts, heights, width=widths, align="edge", color="#4C72B0", edgecolor="none")
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        for key, color in (("p50", "#2ca02c"), ("p99", "#ff7f0e"), ("p99.9", "#d62728"), ("max", "#7f7f7f")):
            if lat[key] is not None:
                ax1.axvline(lat[key], color=color, linestyle="--", linewidth=1.2,
                            label="%s %s ms" % (key, fmt_ms(lat[key])))
        ax1.legend(loc="upper left", fontsize=9, framealpha=0.9)
    else:
        ax1.text(0.5, 0.5, "no deliveries", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_title("latency, publish to delivery (%d samples)" % lat["count"], fontsize=10)
    ax1.set_xlabel("latency (ms, log scale)")
    ax1.set_ylabel("messages (log scale)")
    ax1.grid(True, which="major", alpha=0.3)

    tl = report["timeline"]
    edges = [0.0] + [p["t"] for p in tl]  # each point: the rate since the previous one
    phases = report["phases"]
    for ax, key, color, what in ((ax2, "delivered_per_s", "#4C72B0", "delivered/s (all subscribers)"),
                                 (ax3, "published_per_s", "#DD8452", "published/s (all publishers)")):
        if tl:
            ax.stairs([p[key] for p in tl], edges, color=color, linewidth=1.8, label=what)
        if "pub_start" in phases:
            ax.axvspan(0, phases["pub_start"], color="#cccccc", alpha=0.35, label="connecting")
            if "pub_end" in phases:
                ax.axvspan(phases["pub_end"], max(phases.get("drain_end", 0), phases["pub_end"] + 0.02),
                           color="#9ecae1", alpha=0.5, label="drain")
        ax.set_ylabel(what.split(" ")[0])
        ax.set_ylim(bottom=0, top=max([p[key] for p in tl] + [1.0]) * 1.15)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower center", fontsize=8, ncol=3, framealpha=0.9)
    ax2.set_title("throughput over time (1 s intervals)", fontsize=10)
    ax2.tick_params(labelbottom=False)
    ax3.set_xlabel("seconds since start")
    fig.subplots_adjust(left=0.08, right=0.97, top=0.93, bottom=0.06)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def close_all(clients: List[Any], deadline: float) -> None:
    """Close every client in parallel, waiting at most until ``deadline``."""
    threads = []
    for c in clients:
        t = threading.Thread(target=c.close, name="stress-close", daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def watchdog(limit: float, done: threading.Event) -> None:
    if not done.wait(limit):
        sys.stderr.write("\n%s: the hard time limit of %.1f s passed; giving up\n" % (PROG, limit))
        sys.stderr.flush()
        os._exit(EXIT_WATCHDOG)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    topics, patterns = check_args(parser, args)
    try:
        ssl_context = make_ssl_context(args)
    except (OSError, ssl.SSLError) as exc:
        parser.error("--cafile: %s" % exc)
    if args.subscribe_pattern and not any(pattern_matches(args.subscribe_pattern, t) for t in topics):
        sys.stderr.write("%s: warning: --subscribe-pattern %s matches none of the topics\n"
                         % (PROG, args.subscribe_pattern))

    # the client's "server error" warnings are errors to publishes without an id: count them
    async_errors = ServerErrorCounter()
    client_log = logging.getLogger("wsbroadcast.client")
    client_log.addHandler(async_errors)
    client_log.setLevel(logging.WARNING)
    client_log.propagate = False

    time_limit = args.ramp_up + args.timeout + args.duration + args.timeout + args.drain + CLOSE_GRACE
    run = Run(args, ssl_context)
    finished = threading.Event()
    threading.Thread(target=watchdog, args=(time_limit + 5.0, finished), name="stress-watchdog",
                     daemon=True).start()
    if not args.quiet:
        sys.stderr.write("%s: %d subscribers, %d publishers on %s; ends within %.1f s\n"
                         % (PROG, args.subscribers, args.publishers, args.url, time_limit))
    slots = args.subscribers + args.publishers
    subs = [Subscriber(run, i, patterns, i, slots) for i in range(args.subscribers)]
    pubs = [Publisher(run, i, topics, args.subscribers + i, slots) for i in range(args.publishers)]
    progress = Progress(run, subs, pubs, async_errors, args.quiet)
    run.setup_pending = slots
    times: Dict[str, Any] = {}
    progress.start()
    for t in subs + pubs:  # type: ignore[operator]
        t.start()

    try:
        # 1. setup: every connection made (or failed), at most ramp-up + timeout
        setup_deadline = run.t0 + args.ramp_up + args.timeout
        with run.lock:
            while run.setup_pending > 0:
                left = setup_deadline - time.monotonic()
                if left <= 0:
                    break
                run.setup_done.wait(left)
            run.publishing_started = True
        # 2. publishing
        run.phase = "publishing"
        times["pub_start"] = time.monotonic()
        run.go.set()
        pub_deadline = times["pub_start"] + args.duration + args.timeout
        for p in pubs:
            p.join(max(0.0, pub_deadline - time.monotonic()))
        run.pub_stop.set()
        times["pub_end"] = max([p.stopped for p in pubs if p.stopped is not None] or [time.monotonic()])
        # 3. drain: until every subscriber has what was published to it, or --drain
        run.phase = "draining"
        for s in subs:
            if s.setup_ok:
                s.expected = sum(p.by_topic[t] for p in pubs for t in topics
                                 if any(pattern_matches(pat, t) for pat in patterns))
                if s.distinct >= s.expected:
                    s.done.set()
        drain_deadline = time.monotonic() + args.drain
        drained = all(s.done.wait(max(0.0, drain_deadline - time.monotonic())) for s in subs)
        times["drained"] = drained
        times["drain_end"] = time.monotonic()
    except KeyboardInterrupt:
        sys.stderr.write("\n%s: interrupted; reporting what there is\n" % PROG)
        run.pub_stop.set()
        now = time.monotonic()
        times.setdefault("pub_start", now)
        times.setdefault("pub_end", now)
        times.setdefault("drain_end", now)
    run.phase = "closing"
    run.stop.set()
    run.go.set()
    clients = [c.client for c in subs + pubs if c.client is not None]  # type: ignore[operator]
    close_all(clients, time.monotonic() + CLOSE_GRACE)
    progress.finish()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = 100.0 * (usage.ru_utime + usage.ru_stime) / max(1e-6, run.elapsed())
    report, hist = build_report(args, run, subs, pubs, progress, async_errors,
                                {k: v for k, v in times.items()}, time_limit, cpu)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(text_report(report) + "\n")
    sys.stdout.flush()
    if args.plot:
        try:
            plot(args.plot, report, hist)
        except Exception as exc:  # a report without its chart beats no report
            sys.stderr.write("%s: could not write %s: %s\n" % (PROG, args.plot, describe(exc)))
            finished.set()
            return EXIT_PROBLEMS
        if not args.quiet:
            sys.stderr.write("%s: chart written to %s\n" % (PROG, args.plot))
    finished.set()
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
