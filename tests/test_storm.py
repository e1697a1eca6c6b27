"""Connection storms: many connections ending at once, resets mid-handshake and mid-delivery.

A reader whose connection ends hands it to the writer, which lets a close frame out
and detaches the connection; the reader's thread waits for that, blocked, then
closes the socket and ends. Idle readers wait in the idle park, which wakes at most a
few at a time. Figures (how fast, how many) come from scripts/bench; these tests
check that everything is released, with no error logged.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

import pytest

import logcapture
import wsraw
from conftest import SCALE

_LINGER_RESET = struct.pack("ii", 1, 0)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _problems(records: logcapture.Records) -> list:
    return [t for r, t in zip(records.records, records.texts) if r.levelno >= logging.WARNING]


def _released(srv, fds: int) -> bool:
    """No connection thread, nothing registered, no socket held by the writer, the fds back."""
    return srv.thread_count() == 0 and len(srv.hub) == 0 and srv.writer.holding() == 0 and _fds() <= fds


@pytest.mark.timeout(120)
def test_readers_ending_while_the_writer_is_busy_wait_for_it_then_all_are_released(make_server):
    srv = make_server()
    fds = _fds()
    clients = [wsraw.connect(srv.port, subprotocol=None) for _ in range(60)]
    assert wsraw.wait_for(lambda: len(srv.hub) == 60, timeout=30 * SCALE)
    gate = threading.Event()
    srv.writer.call(lambda: gate.wait(60 * SCALE))  # the writer is busy until the gate opens
    try:
        with logcapture.capture("wsbroadcast") as records:
            for i, c in enumerate(clients):
                if i % 3 == 0:
                    c.send_frame(0x8, b"\x03\xe8")  # a polite close: its echo waits for the writer
                if i % 3 == 1:
                    _reset(c.sock)
                else:
                    c.close()
            # every reader has ended its connection and waits for the writer to detach it
            assert wsraw.wait_for(lambda: len(srv.hub) == 0, timeout=30 * SCALE), len(srv.hub)
            assert srv.thread_count() == 60 and srv.writer.holding() == 60
            gate.set()
            assert wsraw.wait_for(lambda: _released(srv, fds), timeout=30 * SCALE), \
                (srv.thread_count(), srv.writer.holding(), _fds(), fds)
        assert _problems(records) == []
    finally:
        gate.set()
    # and the server goes on serving
    c = wsraw.connect(srv.port)
    assert wsraw.subscribe(c, "t")["type"] == "ack"
    srv.publish("t", {"after": 1})
    assert c.recv_json()["data"] == {"after": 1}
    c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("idle_park", [True, False], ids=["parked", "in-recv"])
def test_many_clients_dropping_at_once_are_all_released(make_server, idle_park):
    # (raw clients answer no ping; a loaded run is slow)
    srv = make_server(ping_interval=0, idle_park=idle_park)
    fds = _fds()
    n = 300
    clients = [wsraw.connect(srv.port, subprotocol=None) for _ in range(n)]
    assert wsraw.wait_for(lambda: len(srv.hub) == n, timeout=60 * SCALE)
    if idle_park:  # they wait in the park, which wakes them a few at a time
        assert wsraw.wait_for(lambda: srv._park.parked() == n, timeout=30 * SCALE)
    stay = wsraw.connect(srv.port)
    assert wsraw.subscribe(stay, "t")["type"] == "ack"
    assert len(srv.hub) == n + 1
    with logcapture.capture("wsbroadcast") as records:
        for i, c in enumerate(clients):
            if i % 2:
                _reset(c.sock)
            else:
                c.close()
        # the one that stays is served meanwhile
        srv.publish("t", {"during": 1})
        assert stay.recv_json(timeout=30 * SCALE)["data"] == {"during": 1}
        assert wsraw.wait_for(lambda: srv.thread_count() == 1 and len(srv.hub) == 1
                              and srv.writer.holding() == 1, timeout=60 * SCALE), \
            (srv.thread_count(), len(srv.hub), srv.writer.holding())
        stay.close()
        assert wsraw.wait_for(lambda: _released(srv, fds), timeout=30 * SCALE)
    assert _problems(records) == []


@pytest.mark.timeout(60)
def test_a_reset_mid_handshake_and_just_after_it(make_server):
    srv = make_server()
    fds = _fds()
    with logcapture.capture("wsbroadcast") as records:
        half = socket.create_connection(("127.0.0.1", srv.port))
        request = wsraw.upgrade_request(srv.port, subprotocol=None)
        half.sendall(request[:len(request) // 2])
        assert wsraw.wait_for(lambda: srv.thread_count() == 1 and len(srv.pending) == 1, timeout=10 * SCALE)
        _reset(half)
        assert wsraw.wait_for(lambda: srv.thread_count() == 0 and len(srv.pending) == 0, timeout=10 * SCALE)
        # the whole request and a reset before reading the 101
        late = socket.create_connection(("127.0.0.1", srv.port))
        late.sendall(request)
        assert wsraw.wait_for(lambda: len(srv.hub) == 1, timeout=10 * SCALE)
        _reset(late)
        assert wsraw.wait_for(lambda: _released(srv, fds), timeout=10 * SCALE), \
            (srv.thread_count(), len(srv.hub), srv.writer.holding())
    assert _problems(records) == []
    c = wsraw.connect(srv.port)
    c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["reset", "close frame"])
def test_a_close_while_a_delivery_is_in_flight(make_server, how):
    srv = make_server(max_outbox=8 << 20)
    fds = _fds()
    reader = wsraw.connect(srv.port)
    stuck = wsraw.connect(srv.port, rcvbuf=4096)
    for c in (reader, stuck):
        assert wsraw.subscribe(c, "t")["type"] == "ack"
    conn = [c for c in srv.hub.connections() if c.addr[1] == stuck.sock.getsockname()[1]][0]
    big = "x" * 60000
    sent = 0
    while conn.out_bytes == 0 and sent < 400:  # until the writer holds bytes it cannot send
        srv.publish("t", big)
        sent += 1
        assert reader.recv_json(timeout=10 * SCALE)["data"] == big
        srv.writer.sync()
    assert conn.out_bytes > 0
    with logcapture.capture("wsbroadcast") as records:
        if how == "reset":
            _reset(stuck.sock)
        else:
            # a close frame, then the write side shut: the close echo cannot get out (nothing
            # is read), the reader ends at EOF and the writer resets it at the close deadline
            stuck.send_frame(0x8, b"\x03\xe8")
            stuck.sock.shutdown(socket.SHUT_WR)
        assert wsraw.wait_for(lambda: srv.thread_count() == 1 and len(srv.hub) == 1, timeout=10 * SCALE)
        srv.publish("t", "after")
        assert reader.recv_json(timeout=10 * SCALE)["data"] == "after"
        assert wsraw.wait_for(lambda: srv.writer.holding() == 1, timeout=20 * SCALE)
        if how != "reset":
            assert wsraw.wait_reset(stuck.sock, timeout=20 * SCALE)
            stuck.close()
        reader.close()
        assert wsraw.wait_for(lambda: _released(srv, fds), timeout=20 * SCALE), \
            (srv.thread_count(), len(srv.hub), srv.writer.holding(), _fds(), fds)
    assert [t for t in _problems(records) if "resetting" not in t] == []
