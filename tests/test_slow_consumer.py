"""A subscriber that never reads must not hurt the others, and memory stays bounded."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

import threadutil
import wsraw
from conftest import SCALE
from httputil import metric
from serverproc import ServerProcess

from wsbroadcast import Client, Server
from wsbroadcast.store import MemoryStore

PAYLOAD = "p" * 4096


def stuck_subscriber(port: int, topic: str) -> wsraw.RawWS:
    """A subscriber with a tiny receive buffer that does not read from now on."""
    c = wsraw.connect(port, rcvbuf=4096)
    assert wsraw.subscribe(c, topic, 1)["type"] == "ack"
    return c


def assert_reset_after_buffered_data(c: wsraw.RawWS) -> None:
    """Reading what the kernel still holds ends in ECONNRESET, never in an orderly EOF."""
    c.sock.settimeout(5 * SCALE)
    with pytest.raises(ConnectionResetError):
        for _ in range(10000):
            assert c.sock.recv(65536), "an orderly EOF where a reset was expected"


def flood_until_slow(srv, topic: str, limit: int = 5000) -> int:
    """Publish PAYLOAD to ``topic`` until the writer closes a slow consumer; the count published."""
    for i in range(1, limit + 1):
        srv.publish(topic, PAYLOAD)
        if i % 16 == 0:
            assert srv.writer.sync(10 * SCALE), "the writer is stuck"
            if srv.writer.stats.slow_consumers:
                return i
    raise AssertionError("no slow consumer after %d messages" % limit)


@pytest.mark.timeout(120)
def test_stuck_subscriber_is_closed_and_others_get_everything():
    with ServerProcess("--store", "memory", "--history-size", "0") as srv:
        port = srv.port
        url = "ws://127.0.0.1:%d/ws" % port
        # the stuck subscriber: subscribes, then never reads (small receive buffer)
        stuck = stuck_subscriber(port, "flood")
        fast = Client.connect(url)
        fast.subscribe("flood")
        n, size = 3000, 10 * 1024  # 30 MB
        got = []
        last_arrival = [0.0]
        failure = []

        def read():
            try:
                while len(got) < n:
                    m = fast.recv(timeout=30 * SCALE)
                    if m is None:
                        return
                    got.append(m.seq)
                    last_arrival[0] = time.monotonic()
            except BaseException as exc:  # reported by the test thread
                failure.append(exc)

        reader = threading.Thread(target=read, name="test-fast-reader")
        reader.start()
        pub = Client.connect(url)
        rss_before = srv.rss_kib()
        payload = "x" * size
        for i in range(n):
            pub.publish("flood", payload, ack=(i % 100 == 99))
        published_at = time.monotonic()
        reader.join(60 * SCALE)
        assert not reader.is_alive(), "the fast reader is still waiting (%d of %d)" % (len(got), n)
        assert not failure, failure
        assert got == list(range(1, n + 1)), "the fast subscriber missed messages"
        assert last_arrival[0] - published_at < 10.0 * SCALE, "the fast subscriber lagged"
        assert wsraw.wait_for(lambda: metric(port, "wsbroadcast_slow_consumer_closes_total") == 1,
                              timeout=10 * SCALE)
        assert metric(port, 'wsbroadcast_close_codes_total{code="1008"}') == 1
        growth = srv.rss_kib() - rss_before
        assert growth < 4 * 1024, "server RSS grew by %d KiB" % growth
        # the stuck one never reads: once the close grace (3 s by default) is over it is reset
        assert wsraw.wait_reset(stuck.sock, timeout=10 * SCALE), wsraw.tcp_state(stuck.sock)
        # the server is still healthy and serving
        pub.publish("flood", "after")
        assert fast.recv(timeout=5 * SCALE).data == "after"
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


@pytest.mark.timeout(60)
def test_stuck_reader_that_resumes_in_time_gets_whole_frames_then_exactly_the_1008_close(make_server):
    # a long grace: the reader resumes well inside it, so no reset can race the close frame
    srv = make_server(max_outbox=64 * 1024, socket_sndbuf=32 * 1024, close_timeout=30 * SCALE)
    stuck = stuck_subscriber(srv.port, "flood")
    published = flood_until_slow(srv, "flood")
    assert srv.writer.stats.close_codes.get(1008) == 1
    # now it reads: every frame still in flight, in order and whole, then the close frame
    seqs = []
    while True:
        op, payload = stuck.recv_frame(timeout=10 * SCALE)
        if op == 0x8:
            break
        assert op == 0x1, (op, payload[:80])
        msg = json.loads(payload)
        assert msg["type"] == "message" and msg["data"] == PAYLOAD, msg.get("seq")
        seqs.append(msg["seq"])
    assert seqs == list(range(1, len(seqs) + 1)), "a gap or a repeat before the close: %r" % seqs[-5:]
    assert 0 < len(seqs) < published, "the unsent backlog (%d of %d) is dropped, not delivered" % (
        len(seqs), published)
    code, reason = struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")
    assert (code, reason) == (1008, "slow consumer")
    assert stuck.at_eof(timeout=10 * SCALE), "nothing may follow the close frame"
    assert wsraw.tcp_state(stuck.sock) != wsraw.TCP_CLOSE, "closed cleanly, not reset"
    stuck.close()


@pytest.mark.timeout(60)
def test_stuck_reader_that_never_reads_is_reset_after_the_grace_and_nobody_waits(make_server):
    grace = 3.0 * SCALE  # (the test sees the close a moment after it: room for a loaded machine)
    srv = make_server(max_outbox=64 * 1024, socket_sndbuf=32 * 1024, close_timeout=grace)
    stuck = stuck_subscriber(srv.port, "flood")
    other = wsraw.connect(srv.port)
    assert wsraw.subscribe(other, "probe", 1)["type"] == "ack"
    flood_until_slow(srv, "flood")
    slow_seen = time.monotonic()
    # during the grace period every other subscriber is served at once
    worst, n = 0.0, 0
    while wsraw.tcp_state(stuck.sock) != wsraw.TCP_CLOSE:
        assert time.monotonic() - slow_seen < grace + 5 * SCALE, "the stuck reader was never reset"
        n += 1
        t0 = time.monotonic()
        srv.publish("probe", n)
        msg = other.recv_json(timeout=5 * SCALE)
        assert (msg["topic"], msg["seq"]) == ("probe", n), msg
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.02)  # pacing of the probes, not synchronisation
    reset_after = time.monotonic() - slow_seen
    assert reset_after >= 0.5 * grace, "reset %.2fs after the close: before its grace" % reset_after
    assert worst < grace / 2, "another subscriber waited %.2fs" % worst
    assert_reset_after_buffered_data(stuck)
    assert wsraw.wait_for(lambda: len(srv.hub) == 1, timeout=5 * SCALE)
    wsraw.expect_pong_next(other)
    stuck.close()
    other.close()


@pytest.mark.timeout(60)
def test_peer_that_leaves_with_bytes_unsent_is_reset_at_once(make_server):
    """The reader ends (EOF) while the outbox holds bytes: the writer's detach resets the socket."""
    srv = make_server(max_outbox=1024 * 1024, socket_sndbuf=32 * 1024, close_timeout=30 * SCALE)
    stuck = stuck_subscriber(srv.port, "flood")
    # fill the kernel's buffers and leave bytes in the outbox, short of the slow-consumer limit
    conn = next(iter(srv.hub._conns.values()))  # white box: to know the precondition holds
    for _ in range(1, 200):
        srv.publish("flood", PAYLOAD)
        assert srv.writer.sync(10 * SCALE)
        if conn.out_bytes > 16 * 1024:
            break
    assert conn.out_bytes > 16 * 1024 and srv.writer.stats.slow_consumers == 0
    stuck.sock.shutdown(socket.SHUT_WR)  # the peer is done (EOF) and still does not read
    t0 = time.monotonic()
    assert wsraw.wait_reset(stuck.sock, timeout=10 * SCALE), wsraw.tcp_state(stuck.sock)
    assert time.monotonic() - t0 < 10 * SCALE
    assert_reset_after_buffered_data(stuck)
    assert wsraw.wait_for(lambda: len(srv.hub) == 0 and srv.thread_count() == 0, timeout=5 * SCALE)
    stuck.close()


@pytest.mark.timeout(60)
def test_a_client_that_asks_and_never_reads_is_closed_as_a_slow_consumer(make_server):
    """Answers (pongs) count against the outbox like messages: a ping loop that never reads ends in 1008."""
    srv = make_server(max_outbox=64 * 1024, socket_sndbuf=32 * 1024, close_timeout=30 * SCALE)
    c = wsraw.connect(srv.port, rcvbuf=4096)
    ping = json.dumps({"type": "ping", "id": "x" * 1000})
    for _ in range(400):  # ~400 KB of pongs asked for, far past the kernel buffers and the outbox
        try:
            c.send_texts(*[ping] * 10)
        except OSError:
            break  # closed by the server meanwhile
        if srv.writer.stats.slow_consumers:
            break
    assert wsraw.wait_for(lambda: srv.writer.stats.slow_consumers == 1, timeout=10 * SCALE)
    assert srv.writer.stats.close_codes.get(1008) == 1
    c.close()


@pytest.mark.timeout(60)
def test_a_replay_over_tls(make_server, tmp_path):
    import certs

    from wsbroadcast import Client

    certfile, keyfile = certs.make_cert(str(tmp_path))
    srv = make_server(certfile=certfile, keyfile=keyfile)
    for i in range(1, 6):
        srv.publish("r", i)
    c = Client(srv.url, ssl_context=certs.client_context(certfile), reconnect=False).open()
    try:
        c.subscribe("r", since=0)
        assert [c.recv(timeout=10 * SCALE).data for _ in range(5)] == [1, 2, 3, 4, 5]
    finally:
        c.close()


@pytest.mark.timeout(90)
def test_a_stuck_tls_reader_is_closed_soon_while_tls_subscribers_get_everything(make_server, tmp_path):
    import certs

    certfile, keyfile = certs.make_cert(str(tmp_path))
    limit = 256 * 1024
    srv = make_server(certfile=certfile, keyfile=keyfile, max_outbox=limit, socket_sndbuf=16384,
                      close_timeout=20 * SCALE)
    ctx = certs.client_context(certfile)
    stuck = wsraw.connect(srv.port, rcvbuf=4096, ssl_context=ctx, timeout=10 * SCALE)
    assert wsraw.subscribe(stuck, "broadcast", 1)["type"] == "ack"
    v1 = wsraw.connect(srv.port, ssl_context=ctx, timeout=10 * SCALE)
    assert wsraw.subscribe(v1, "broadcast", 1)["type"] == "ack"
    plain = wsraw.connect(srv.port, subprotocol=None, ssl_context=ctx, timeout=10 * SCALE)
    wsraw.expect_pong_next(plain)  # its automatic subscription to broadcast is in place
    got = {"v1": [], "plain": []}

    def read(name: str, ws: wsraw.RawWS) -> None:
        try:
            while True:
                msg = json.loads(ws.recv_text(30 * SCALE))
                data = msg["data"] if name == "v1" else msg
                got[name].append(data)
                if data == "end":
                    return
        except (OSError, AssertionError, ValueError) as exc:
            got[name].append(repr(exc))

    readers = [threading.Thread(target=read, args=item, daemon=True) for item in (("v1", v1), ("plain", plain))]
    for t in readers:
        t.start()
    try:
        sent = 0
        while not srv.writer.stats.slow_consumers:
            assert sent < 5000, "no slow consumer"
            for _ in range(8):
                srv.publish("broadcast", PAYLOAD)
            sent += 8
            # the readers keep up (each within 8 messages): only the stuck one falls behind
            assert wsraw.wait_for(lambda n=sent - 8: min(len(got["v1"]), len(got["plain"])) >= n,
                                  timeout=10 * SCALE), got["v1"][-1:] + got["plain"][-1:]
        srv.publish("broadcast", "end")
        for t in readers:
            t.join(30 * SCALE)
        # the reading subscribers got every message, in order, over TLS
        assert got["v1"] == got["plain"] == [PAYLOAD] * sent + ["end"]
        # the stuck one, reading at last: its close follows what was already encrypted and the
        # kernel held, not the whole outbox behind it (frames not yet encrypted are dropped)
        before_close = 0
        while True:
            op, payload = stuck.recv_frame(10 * SCALE)
            if op == 0x8:
                break
            before_close += len(payload)
        assert struct.unpack("!H", payload[:2])[0] == 1008 and payload[2:] == b"slow consumer"
        assert before_close < limit // 2, before_close
    finally:
        for c in (stuck, v1, plain):
            c.close()


@pytest.mark.parametrize("sndbuf", [None, 32 * 1024])
def test_client_sockets_get_no_nagle_and_the_send_buffer_cap(make_server, sndbuf):
    # (on Linux the accepted sockets take both options from the listener, set once)
    srv = make_server() if sndbuf is None else make_server(socket_sndbuf=sndbuf)
    reference = socket.socket()
    reference.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, srv.config.socket_sndbuf)
    expected = reference.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    reference.close()
    ws = wsraw.connect(srv.port)
    try:
        assert wsraw.wait_for(lambda: len(srv.hub) == 1)
        sock = srv.hub.connections()[0].sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == expected
    finally:
        ws.close()


class _GatedStore(MemoryStore):
    """A memory store whose open() waits until the test lets it go (a slow start-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = threading.Event()
        self.go = threading.Event()

    def open(self) -> None:
        self.opening.set()
        assert self.go.wait(30 * SCALE)
        super().open()


@pytest.mark.timeout(60)
def test_a_connection_queued_while_the_server_starts_gets_the_socket_options():
    # a client that connects while start() is still opening the store sits in the listen
    # backlog: it must get the same options as every later one
    store = _GatedStore()
    srv = Server("127.0.0.1", 0, message_store=store, socket_sndbuf=32 * 1024,
                 close_timeout=2.0 * SCALE)
    starter = threadutil.start(srv.start, name="test-starter")
    early = None
    try:
        assert store.opening.wait(30 * SCALE)
        assert srv._listener is not None
        port = srv._listener.getsockname()[1]
        early = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)  # queued
        store.go.set()
        starter.finish(30 * SCALE)
        reference = socket.socket()
        reference.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        expected = reference.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        reference.close()
        early.sendall(wsraw.upgrade_request(port))
        assert wsraw.read_response(early, 10 * SCALE, upgrade=True)[0] == 101
        assert wsraw.wait_for(lambda: len(srv.hub) == 1)
        sock = srv.hub.connections()[0].sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == expected
    finally:
        store.go.set()
        starter.join(30 * SCALE)
        if early is not None:
            early.close()
        srv.shutdown()
