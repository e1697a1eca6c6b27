#!/usr/bin/env python3
"""Publish throughput with the SQLite store against the memory store, in one run.

For each store a fresh broker process is started (``python -m wsbroadcast serve
--port 0 --store ...``); P publisher connections (threads of this process, raw
sockets, frames built and masked before the clock starts) each publish their
share of N messages on one topic, in pipelined batches of B frames with an id,
waiting for all B acks before the next batch. A publish is acked only once it is
stored, so this measures the store on the publish path. Stores are interleaved
and the whole set is repeated; medians are reported.

    scripts/bench_store.py [--messages 20000] [--publishers 4] [--batch 100]
                           [--repeat 3] [--history-size 1000] [--size 100] [--json out.json]

The target is SQLite >= 50 % of memory.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LISTEN = re.compile(r"listening on wss?://[^:]+:(\d+)/")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- server process


class Broker:
    """A ``python -m wsbroadcast serve`` child on a free port."""

    def __init__(self, store: str, history_size: int, timeout: float = 20.0) -> None:
        cmd = [sys.executable, "-m", "wsbroadcast", "serve", "--host", HOST, "--port", "0",
               "--store", store, "--history-size", str(history_size)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.port = 0
        self.lines: List[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                m = LISTEN.search(line)
                if m and not self.port:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError("broker did not start:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


# ---------------------------------------------------------------- raw publisher


def ws_connect(port: int, timeout: float = 10.0) -> Tuple[socket.socket, bytes]:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(("GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: wsbroadcast.v1\r\n\r\n" % (HOST, port, key)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if head.split()[1] != b"101":
        raise ConnectionError("handshake answered %r" % head[:80])
    return sock, rest


def masked_text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    key = os.urandom(4)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


class Publisher:
    """One connection publishing ``count`` messages in batches of ``batch``, acks awaited per batch."""

    def __init__(self, port: int, topic: str, tag: int, count: int, batch: int, size: int) -> None:
        self.sock, self.buf = ws_connect(port)
        self.sock.settimeout(60.0)
        pad = "x" * max(0, size - 30)
        frames = [masked_text_frame(json.dumps(
            {"type": "publish", "topic": topic, "id": i, "data": {"p": tag, "i": i, "pad": pad}},
            separators=(",", ":")).encode()) for i in range(count)]
        self.batches = [b"".join(frames[i:i + batch]) for i in range(0, count, batch)]
        self.sizes = [min(batch, count - i) for i in range(0, count, batch)]
        self.error: Optional[str] = None
        self.acks = 0

    def _read_acks(self, want: int) -> None:
        buf = self.buf
        got = 0
        pos = 0
        while got < want:
            # parse every complete frame in buf
            while True:
                if len(buf) - pos < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                n = b1 & 0x7F
                hl = 2
                if n == 126:
                    if len(buf) - pos < 4:
                        break
                    n = struct.unpack_from("!H", buf, pos + 2)[0]
                    hl = 4
                elif n == 127:
                    if len(buf) - pos < 10:
                        break
                    n = struct.unpack_from("!Q", buf, pos + 2)[0]
                    hl = 10
                if len(buf) - pos < hl + n:
                    break
                op = b0 & 0x0F
                if op == 0x1:
                    payload = bytes(buf[pos + hl:pos + hl + n])
                    if b'"type":"ack"' not in payload:
                        raise RuntimeError("not an ack: %r" % payload[:200])
                    got += 1
                elif op == 0x8:
                    raise RuntimeError("closed by the server: %r" % bytes(buf[pos + hl:pos + hl + n]))
                pos += hl + n
            if got >= want:
                break
            chunk = self.sock.recv(262144)
            if not chunk:
                raise RuntimeError("connection closed")
            buf = buf[pos:] + chunk
            pos = 0
        self.buf = buf[pos:]
        self.acks += got

    def run(self, start: threading.Event) -> None:
        try:
            start.wait()
            for frames, n in zip(self.batches, self.sizes):
                self.sock.sendall(frames)
                self._read_acks(n)
        except Exception as exc:  # reported by the caller
            self.error = repr(exc)

    def close(self) -> None:
        self.sock.close()


def run_once(store: str, args: argparse.Namespace, workdir: str) -> float:
    """Start a broker on ``store``, publish, stop it; return messages per second."""
    spec = "memory" if store == "memory" else os.path.join(workdir, "bench-%d.db" % time.monotonic_ns())
    broker = Broker(spec, args.history_size)
    try:
        per = args.messages // args.publishers
        pubs = [Publisher(broker.port, "bench.store", k, per, args.batch, args.size)
                for k in range(args.publishers)]
        start = threading.Event()
        threads = [threading.Thread(target=p.run, args=(start,), daemon=True) for p in pubs]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        start.set()
        for t in threads:
            t.join(300)
        elapsed = time.perf_counter() - t0
        errors = [p.error for p in pubs if p.error]
        if errors or any(t.is_alive() for t in threads):
            raise RuntimeError("publishers failed: %r" % (errors or "timeout"))
        total = sum(p.acks for p in pubs)
        assert total == per * args.publishers, (total, per * args.publishers)
        for p in pubs:
            p.close()
        return total / elapsed
    finally:
        broker.stop()
        if spec != "memory":
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.remove(spec + suffix)
                except FileNotFoundError:
                    pass


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000, help="messages per store and run")
    ap.add_argument("--publishers", type=int, default=4, help="publisher connections")
    ap.add_argument("--batch", type=int, default=100, help="frames sent before waiting for their acks")
    ap.add_argument("--size", type=int, default=100, help="approximate data bytes per message")
    ap.add_argument("--history-size", type=int, default=1000, help="--history-size of the broker")
    ap.add_argument("--repeat", type=int, default=3, help="runs per store (medians reported)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="bench-store-")
    results: Dict[str, List[float]] = {"memory": [], "sqlite": []}
    try:
        for r in range(args.repeat):
            for store in ("memory", "sqlite") if r % 2 == 0 else ("sqlite", "memory"):
                rate = run_once(store, args, workdir)
                results[store].append(rate)
                log("run %d %-6s %9.0f msgs/s" % (r + 1, store, rate))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mem = statistics.median(results["memory"])
    sql = statistics.median(results["sqlite"])
    ratio = sql / mem
    print("publish throughput, %d messages x %d publishers, batches of %d, ~%d-byte data, "
          "history-size %d (median of %d)" % (args.messages, args.publishers, args.batch, args.size,
                                               args.history_size, args.repeat))
    print("  memory  %9.0f msgs/s" % mem)
    print("  sqlite  %9.0f msgs/s" % sql)
    print("  ratio   %9.2f  (target >= 0.50: %s)" % (ratio, "met" if ratio >= 0.5 else "NOT met"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": results["memory"], "sqlite": results["sqlite"],
                       "memory_median": mem, "sqlite_median": sql, "ratio": ratio,
                       "settings": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
