"""History answers and replays bounded by bytes (PROTOCOL.md sections 1 and 6).

GET /history stops before the message that would take its body past 1 MiB and always
holds one message when one exists; a client pages on with ``since``. Clients that
never read a /history answer or a ``since: 0`` replay cost the server about one page
each, not the whole history: checked on a broker started as a user starts it.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import List, Tuple

import pytest

from conftest import SCALE
from httputil import request
from serverproc import ServerProcess
from wsraw import connect, wait_for

MIB = 1024 * 1024
#: the body of GET /history stops before this (PROTOCOL.md section 1)
BODY_LIMIT = MIB

TOPIC = "hist.bytes"


def fill(topic: str, first: int, second: int, extra: int = 0) -> List[int]:
    """Data sizes of three messages (seqs 1-3) whose list is 1 MiB + ``extra`` bytes."""
    item = len('{"topic":"%s","seq":1,"data":""}' % topic)  # empty string data
    return [first, second, BODY_LIMIT + extra - 4 - 3 * item - first - second]


def get_history(port: int, query: str, method: str = "GET") -> Tuple[dict, bytes]:
    status, headers, body = request(port, method, "/history?" + query, timeout=30 * SCALE)
    assert status == 200, (status, body[:200])
    assert headers["content-type"] == "application/json"
    return headers, body


def seqs_of(body: bytes) -> List[int]:
    return [row["seq"] for row in json.loads(body)]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_history_body_stops_at_one_mib(make_server, tmp_path, kind: str) -> None:
    store = "memory" if kind == "memory" else str(tmp_path / "history.db")
    srv = make_server(store=store)
    # three messages whose list is exactly 1 MiB: "[" a "," b "," c "]"
    sizes = fill(TOPIC, 300_000, 400_000)
    for n in sizes:
        srv.publish(TOPIC, "x" * n)
    srv.publish(TOPIC, "tail")
    headers, body = get_history(srv.port, "topic=%s&limit=1000" % TOPIC)
    assert len(body) == BODY_LIMIT == int(headers["content-length"])
    assert seqs_of(body) == [1, 2, 3]  # the fourth would take it past 1 MiB
    assert [len(r["data"]) for r in json.loads(body)] == sizes
    # the client goes on from the last seq it got
    assert seqs_of(get_history(srv.port, "topic=%s&since=3" % TOPIC)[1]) == [4]

    # one byte more: the third moves to the next page
    other = TOPIC + ".over"
    for n in fill(other, 300_000, 400_000, extra=1):
        srv.publish(other, "x" * n)
    headers, body = get_history(srv.port, "topic=%s&limit=1000" % other)
    assert seqs_of(body) == [1, 2] and len(body) < BODY_LIMIT
    assert seqs_of(get_history(srv.port, "topic=%s&since=2" % other)[1]) == [3]

    # a message whose item alone is over 1 MiB still comes, alone
    big = TOPIC + "3"
    srv.publish(big, "y" * BODY_LIMIT)
    srv.publish(big, "z")
    headers, body = get_history(srv.port, "topic=%s&limit=1000" % big)
    assert seqs_of(body) == [1] and len(body) > BODY_LIMIT
    assert seqs_of(get_history(srv.port, "topic=%s&since=1" % big)[1]) == [2]
    # HEAD: the same length, no body
    head_headers, head_body = get_history(srv.port, "topic=%s&limit=1000" % big, "HEAD")
    assert head_body == b"" and head_headers["content-length"] == headers["content-length"]


# --------------------------------------------------------------------------- clients that never read

#: the receive buffer of a client that never reads (the kernel keeps little for it)
RCVBUF = 4096


def nonreading_history(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.settimeout(10 * SCALE)
    sock.connect(("127.0.0.1", port))
    sock.sendall(("GET /history?topic=%s&limit=1000 HTTP/1.1\r\nHost: localhost\r\n\r\n" % TOPIC).encode())
    return sock


def arrived(sock: socket.socket) -> int:
    """Bytes waiting in a client's receive buffer (nothing is taken out); -1 once reset."""
    try:
        return len(sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0
    except OSError:
        return -1


def read_history_pages(port: int) -> List[int]:
    """Every seq of TOPIC, page by page with since = the last seq got."""
    got: List[int] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30 * SCALE)
    try:
        while True:
            conn.request("GET", "/history?topic=%s&limit=1000&since=%d" % (TOPIC, got[-1] if got else 0))
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, body[:200]
            page = seqs_of(body)
            assert len(body) <= BODY_LIMIT or len(page) == 1
            if not page:
                return got
            got.extend(page)
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_clients_that_never_read_history_cost_about_a_page(tmp_path) -> None:
    count, size = 40, MIB - 64
    # (no keepalive: the replaying subscribers never read, and a loaded run can take longer
    # than ping interval and timeout)
    with ServerProcess("--store", str(tmp_path / "history.db"), "--ping-interval", "0",
                       "--handshake-timeout", str(2 * SCALE)) as proc:
        data = json.dumps({"topic": TOPIC, "data": "x" * size}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30 * SCALE)
        for _ in range(count):
            conn.request("POST", "/publish", data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
        conn.close()
        threads = proc.threads()
        before = proc.rss_kib()

        readers = [nonreading_history(proc.port) for _ in range(3)]
        replays = [connect(proc.port, rcvbuf=RCVBUF) for _ in range(3)]
        for ws in replays:
            ws.send_json({"type": "subscribe", "topic": TOPIC, "since": 0, "id": 1})
        # each has been answered: the status line arrived (the page was read before it);
        # the ack and replayed bytes arrived
        socks = readers + [ws.sock for ws in replays]
        assert wait_for(lambda: all(arrived(s) > 0 for s in readers)
                        and all(arrived(ws.sock) > 512 for ws in replays), timeout=30 * SCALE), \
            [arrived(s) for s in socks]
        growth_mib = (proc.rss_kib() - before) / 1024
        # about one page each (~1-2 MiB here); the whole history would be 40 MiB each
        assert growth_mib < 100, "RSS grew by %.0f MiB" % growth_mib

        # a client that reads still gets everything, both ways
        assert read_history_pages(proc.port) == list(range(1, count + 1))
        ws = connect(proc.port, timeout=30 * SCALE)
        ws.send_json({"type": "subscribe", "topic": TOPIC, "since": 0, "id": 1})
        got = []
        while len(got) < count:
            msg = ws.recv_json(timeout=30 * SCALE)
            if msg.get("type") == "message":
                assert len(msg["data"]) == size
                got.append(msg["seq"])
        assert got == list(range(1, count + 1))
        ws.close()

        # the /history clients that never read are dropped after the handshake timeout;
        # the subscribers stay (their own keepalive decides)
        assert wait_for(lambda: proc.threads() <= threads + len(replays), timeout=30 * SCALE), \
            (proc.threads(), threads)
        assert all(arrived(s) != -1 for s in (w.sock for w in replays))
        for s in socks:
            s.close()
