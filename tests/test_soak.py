"""Soak: many connect/subscribe/disconnect cycles against a server process; nothing may leak.

WSBROADCAST_SOAK_CYCLES (default 10000) sets the number of measured cycles; a warm-up of
WSBROADCAST_SOAK_WARMUP (default 500) cycles runs first, and the RSS baseline is taken after it.
Threads and file descriptors must come back to the level of the idle server before any
connection; RSS must stay within WSBROADCAST_SOAK_RSS_SLACK_KIB (default 3072) of the baseline.
Run with ``pytest -s`` to see the figures; they are also attached to the report as properties.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from typing import Dict, List

import pytest

import wsraw
from conftest import SCALE
from serverproc import ServerProcess

CYCLES = int(os.environ.get("WSBROADCAST_SOAK_CYCLES", "10000"))
WARMUP = int(os.environ.get("WSBROADCAST_SOAK_WARMUP", "500"))
RSS_SLACK_KIB = int(os.environ.get("WSBROADCAST_SOAK_RSS_SLACK_KIB", "3072"))
CLIENT_THREADS = 8
SEED = 7
CLOSE_TIMEOUT = 1.0

KINDS = ("close_frame", "drop_tcp", "reset", "mid_handshake", "mid_handshake_reset", "publish_close")


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def one_cycle(port: int, rng: random.Random, name: str, counts: Dict[str, int]) -> None:
    kind = rng.choice(KINDS)
    counts[kind] = counts.get(kind, 0) + 1
    if kind.startswith("mid_handshake"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        req = wsraw.upgrade_request(port, subprotocol=rng.choice(["wsbroadcast.v1", None]))
        sock.sendall(req[:rng.randint(1, len(req) - 1)])
        if kind == "mid_handshake_reset":
            _reset(sock)
        else:
            sock.close()
        return
    v1 = kind != "drop_tcp" or rng.random() < 0.5
    c = wsraw.connect(port, subprotocol="wsbroadcast.v1" if v1 else None, timeout=10)
    c.send_json({"type": "subscribe", "topic": name, "id": 1})
    if rng.random() < 0.5:
        c.send_json({"type": "subscribe", "topic": name.rsplit(".", 1)[0] + ".*", "id": 2})
        reply = c.recv_json(timeout=10)
        assert reply.get("type") == "ack", reply
    reply = c.recv_json(timeout=10)
    assert reply.get("type") == "ack", reply
    if kind == "publish_close":
        c.send_json({"type": "publish", "topic": "soak.pub", "data": {"from": name}, "id": "p"})
        reply = c.recv_json(timeout=10)
        assert reply.get("type") == "ack" and reply.get("id") == "p", reply
    if kind in ("close_frame", "publish_close"):
        c.send_frame(0x8, struct.pack("!H", 1000))
        code, _reason = c.expect_close(timeout=10)
        assert code == 1000
        c.close()
    elif kind == "reset":
        _reset(c.sock)
    else:
        c.close()


def run_cycles(port: int, total: int, seed: int) -> Dict[str, int]:
    """``total`` cycles spread over CLIENT_THREADS threads; returns counts per kind."""
    errors: List[str] = []
    counts: List[Dict[str, int]] = [{} for _ in range(CLIENT_THREADS)]

    def work(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        n = total // CLIENT_THREADS + (1 if t < total % CLIENT_THREADS else 0)
        for i in range(n):
            try:
                one_cycle(port, rng, "soak.s%d.c%d.x" % (t, i), counts[t])
            except Exception as exc:
                errors.append("thread %d cycle %d: %r" % (t, i, exc))
                return

    threads = [threading.Thread(target=work, args=(t,), name="soak-%d" % t, daemon=True)
               for t in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "soak clients hung"
    assert not errors, "\n".join(errors[:10])
    merged: Dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            merged[k] = merged.get(k, 0) + v
    assert sum(merged.values()) == total
    return merged


def _steady(srv, polls: int = 20):
    """A predicate: true once threads and fds have been the same for ``polls`` polls in a row."""
    seen = {"last": None, "same": 0}

    def check() -> bool:
        now = (srv.threads(), srv.fds())
        seen["same"] = seen["same"] + 1 if now == seen["last"] else 0
        seen["last"] = now
        return seen["same"] >= polls

    return check


@pytest.mark.timeout(300)
def test_soak_connect_subscribe_disconnect(record_property):
    with ServerProcess("--store", "memory", "--close-timeout", str(CLOSE_TIMEOUT),
                       "--handshake-timeout", "5") as srv:
        # the idle server: the levels to come back to. The accept loop makes its selector after
        # the "listening" line, so one request first, then wait until the levels hold still.
        status, _headers, _body = wsraw.http_request(
            srv.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert status == 200
        assert wsraw.wait_for(_steady(srv), timeout=10), "the idle server's threads/fds did not settle"
        start_threads, start_fds = srv.threads(), srv.fds()
        start_rss = srv.rss_kib()

        def idle() -> bool:
            return srv.threads() <= start_threads and srv.fds() <= start_fds

        run_cycles(srv.port, WARMUP, seed=SEED)
        assert wsraw.wait_for(idle, timeout=30 * SCALE), \
            "after warm-up: threads %d (idle %d), fds %d (idle %d)" % (srv.threads(), start_threads,
                                                                      srv.fds(), start_fds)
        base_rss = srv.rss_kib()

        t0 = time.monotonic()
        counts = run_cycles(srv.port, CYCLES, seed=SEED + 1)
        elapsed = time.monotonic() - t0
        peak_threads = srv.threads()

        settled = wsraw.wait_for(idle, timeout=30 * SCALE)
        end_threads, end_fds = srv.threads(), srv.fds()
        end_rss = srv.rss_kib()
        status, _headers, body = wsraw.http_request(
            srv.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        figures = {
            "soak_cycles": CYCLES, "soak_seconds": round(elapsed, 2),
            "soak_cycles_per_s": round(CYCLES / elapsed, 1),
            "soak_threads_start": start_threads, "soak_threads_end": end_threads,
            "soak_threads_right_after": peak_threads,
            "soak_fds_start": start_fds, "soak_fds_end": end_fds,
            "soak_rss_kib_start": start_rss, "soak_rss_kib_after_warmup": base_rss, "soak_rss_kib_end": end_rss,
            "soak_rss_kib_growth": end_rss - base_rss,
            "soak_kinds": counts,
        }
        for k, v in figures.items():
            record_property(k, v)
        print("\nsoak: %d cycles in %.1f s (%.0f cycles/s) %s" % (CYCLES, elapsed, CYCLES / elapsed, counts))
        print("soak: threads %d -> %d (right after the run %d), fds %d -> %d" % (
            start_threads, end_threads, peak_threads, start_fds, end_fds))
        print("soak: RSS %d KiB idle, %d KiB after warm-up, %d KiB at the end (%+d KiB)" % (
            start_rss, base_rss, end_rss, end_rss - base_rss))

        assert status == 200 and b'"ok"' in body, (status, body)
        assert settled, "threads %d (idle %d), fds %d (idle %d)" % (end_threads, start_threads, end_fds, start_fds)
        assert end_rss - base_rss <= RSS_SLACK_KIB, \
            "RSS grew by %d KiB over %d cycles (allowed %d)" % (end_rss - base_rss, CYCLES, RSS_SLACK_KIB)
        assert srv.proc.poll() is None, "server died"
        assert not [line for line in srv.lines if "Traceback" in line or "ERROR" in line], \
            "\n".join(srv.lines[-30:])
