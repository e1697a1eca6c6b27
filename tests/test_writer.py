"""The writer on its own: a started Writer and real TCP connections on 127.0.0.1, no server.

What a socket does not take at once must arrive later, whole, in order and once; a
connection whose peer has gone is dropped without disturbing the others' deliveries.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import List, Tuple

import pytest

import wsraw
from conftest import SCALE

from wsbroadcast.connection import Connection
from wsbroadcast.envelope import message_text
from wsbroadcast.writer import DELIVER, SEND, Writer
from wsbroadcast.wsframe import text_frame


def _pairs(n: int, rcvbuf: int = 0) -> List[Tuple[socket.socket, socket.socket]]:
    """``n`` connected (server side, client side) TCP pairs; the server side non-blocking."""
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = []
    try:
        for _ in range(n):
            client = socket.socket()
            if rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            if rcvbuf:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
            server.setblocking(False)
            pairs.append((server, client))
    finally:
        listener.close()
    return pairs


@pytest.fixture
def writer():
    w = Writer()
    w.start()
    yield w
    w.stop()
    assert not w.alive


@pytest.mark.timeout(60)
def test_frames_a_socket_takes_in_parts_arrive_whole_in_order_and_once(writer):
    (server, client), = _pairs(1, rcvbuf=4096)
    conn = Connection(server, ("127.0.0.1", 1), max_outbox=8 << 20)
    writer.attach(conn)
    # one frame far bigger than the socket buffers (the socket takes part of it), then frames of
    # different sizes while the rest waits for writability
    payloads = [b"@" * 300_000] + [bytes([65 + i % 26]) * (1000 + 7919 * i) for i in range(1, 40)]
    frames = [text_frame(p) for p in payloads]
    total = sum(len(f) for f in frames)
    writer.put([(SEND, conn, frames[0])])
    assert wsraw.wait_for(lambda: conn.waiting_write, timeout=10 * SCALE), "the socket took it all at once"
    assert 0 < conn.out_bytes < len(frames[0])
    writer.put([(SEND, conn, f) for f in frames[1:]])
    assert writer.sync()
    assert len(frames[0]) < conn.out_bytes < total
    ws = wsraw.RawWS(client, None)
    for payload in payloads:
        assert ws.recv_frame(10 * SCALE) == (0x1, payload)
    assert wsraw.wait_for(lambda: not conn.waiting_write and conn.out_bytes == 0, timeout=10 * SCALE)
    # what follows goes out in the common way, after the rest
    writer.put([(SEND, conn, text_frame(b"after"))])
    assert ws.recv_frame(10 * SCALE) == (0x1, b"after") and not ws.buf
    # (counted by the writer once the send returns: the bytes may be read before that)
    assert wsraw.wait_for(lambda: writer.stats.bytes_out == total + 7, timeout=10 * SCALE)
    assert not conn.dead
    server.close()
    client.close()


@pytest.mark.timeout(60)
def test_a_peer_that_reset_is_dropped_and_the_others_get_their_delivery(writer):
    pairs = _pairs(3)
    conns = [Connection(s, ("127.0.0.1", i)) for i, (s, _) in enumerate(pairs)]
    for conn in conns:
        writer.attach(conn)
    gone = pairs[1][1]
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()  # a reset: the server side's next send fails
    recipients = frozenset(conns)
    deadline = time.monotonic() + 10 * SCALE
    n = 0
    while not conns[1].dead:  # (the reset may take a send or two to show)
        assert time.monotonic() < deadline, "a send to a reset peer never failed"
        n += 1
        writer.put([(DELIVER, "t", n, '"x"', recipients, time.monotonic())])
        writer.sync()
    assert writer.alive and not conns[0].dead and not conns[2].dead
    for i in (0, 2):
        ws = wsraw.RawWS(pairs[i][1], None)
        for seq in range(1, n + 1):
            assert ws.recv_text(10 * SCALE) == message_text("t", seq, '"x"').encode()
        assert not ws.buf
    for server, client in pairs:
        server.close()
        client.close()
