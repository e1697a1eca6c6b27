"""A subscriber that never reads must not hurt the others, and memory stays bounded."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

import wsraw
from serverproc import ServerProcess
from wsbroadcast import Client


def _metric(port, name):
    _, _, body = wsraw.http_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return line
    return None


def _value(line):
    return float(line.rpartition(" ")[2]) if line else 0.0


@pytest.mark.timeout(120)
def test_stuck_subscriber_is_closed_and_others_get_everything():
    with ServerProcess("--store", "memory", "--history-size", "0") as srv:
        port = srv.port
        url = "ws://127.0.0.1:%d/ws" % port
        # the stuck subscriber: subscribes, then never reads (small receive buffer)
        stuck = wsraw.connect(port)
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.send_json({"type": "subscribe", "topic": "flood", "id": 1})
        assert stuck.recv_json()["type"] == "ack"
        fast = Client.connect(url)
        fast.subscribe("flood")
        n, size = 3000, 10 * 1024  # 30 MB
        got = []
        last_arrival = [0.0]

        def read():
            while len(got) < n:
                m = fast.recv(timeout=30)
                if m is None:
                    return
                got.append(m.seq)
                last_arrival[0] = time.monotonic()

        reader = threading.Thread(target=read, name="test-fast-reader")
        reader.start()
        pub = Client.connect(url)
        rss_before = srv.rss_kib()
        payload = "x" * size
        for i in range(n):
            pub.publish("flood", payload, ack=(i % 100 == 99))
        published_at = time.monotonic()
        reader.join(60)
        assert got == list(range(1, n + 1)), "the fast subscriber missed messages"
        assert last_arrival[0] - published_at < 5.0, "the fast subscriber lagged"
        assert wsraw.wait_for(lambda: _value(_metric(port, "wsbroadcast_slow_consumer_closes_total")) == 1,
                              timeout=10)
        assert _value(_metric(port, 'wsbroadcast_close_codes_total{code="1008"}')) == 1
        growth = srv.rss_kib() - rss_before
        assert growth < 4 * 1024, "server RSS grew by %d KiB" % growth
        # the stuck one, when it finally reads, finds its stream cut: a 1008 close or a reset
        try:
            code, reason = stuck.expect_close(timeout=10)
            assert code == 1008 and reason == "slow consumer"
        except (ConnectionResetError, ConnectionError):
            pass
        # the server is still healthy and serving
        pub.publish("flood", "after")
        assert fast.recv(timeout=5).data == "after"
        for c in (fast, pub):
            c.close()
        stuck.close()


@pytest.mark.timeout(60)
def test_slow_reader_that_reads_is_not_closed(make_server):
    """A client that reads slowly but keeps up within the limit is never cut off, even with big messages."""
    srv = make_server(max_outbox=64 * 1024, max_message_size=200 * 1024)
    c = wsraw.connect(srv.port)
    c.send_json({"type": "subscribe", "topic": "big", "id": 1})
    c.recv_json()
    big = "y" * (150 * 1024)  # one legal message larger than the outbox limit
    for i in range(5):
        srv.publish("big", big)
        m = c.recv_json(timeout=10)
        assert m["seq"] == i + 1
    assert srv.writer.stats.slow_consumers == 0
