"""Many connections, clean release of threads and descriptors, graceful shutdown from the CLI."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

import httputil
import threadutil
import wsraw
from conftest import SCALE
from serverproc import ServerProcess

from wsbroadcast import Client, Server


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(120)
def test_500_connections_get_one_broadcast_and_resources_return():
    # (no keepalive: these raw clients answer no ping, and a loaded machine can take longer than
    # the default ping interval and timeout to connect all 500 before the broadcast)
    with ServerProcess("--store", "memory", "--ping-interval", "0") as srv:
        base_threads, base_fds = srv.threads(), srv.fds()
        conns = [wsraw.connect(srv.port, subprotocol=None) for _ in range(500)]
        assert wsraw.wait_for(lambda: srv.threads() >= base_threads + 500, timeout=30 * SCALE)
        # (a plain connection is subscribed to broadcast just after its 101: wait for all 500)
        assert wsraw.wait_for(lambda: httputil.http_json(srv.port, "GET", "/stats")[1]["subscriptions"] >= 500,
                              timeout=30 * SCALE)
        pub = wsraw.connect(srv.port)
        pub.send_json({"type": "publish", "topic": "broadcast", "data": {"hello": "all"}, "id": 1})
        assert pub.recv_json()["type"] == "ack"
        for c in conns:
            assert c.recv_json(timeout=30 * SCALE) == {"hello": "all"}
        # half leave politely, half drop TCP
        for i, c in enumerate(conns):
            if i % 2:
                c.send_frame(0x8, b"\x03\xe8")
            c.close()
        pub.close()
        assert wsraw.wait_for(lambda: srv.threads() <= base_threads and srv.fds() <= base_fds,
                              timeout=60 * SCALE), \
            "threads %d (was %d), fds %d (was %d)" % (srv.threads(), base_threads, srv.fds(), base_fds)


@pytest.mark.timeout(60)
def test_in_process_server_releases_threads_and_fds():
    before_threads = threading.active_count()
    before_fds = _fds()
    with Server("127.0.0.1", 0, store="memory") as srv:
        clients = [Client.connect(srv.url) for _ in range(20)]
        for c in clients:
            c.subscribe("x")
        srv.publish("x", 1)
        for c in clients:
            assert c.recv(timeout=5).data == 1
        for c in clients:
            c.close()
        assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=10)
    assert wsraw.wait_for(lambda: threading.active_count() <= before_threads, timeout=10), \
        [t.name for t in threading.enumerate()]
    assert _fds() <= before_fds


@pytest.mark.timeout(60)
def test_sigterm_closes_clients_with_1001_and_exits_0():
    srv = ServerProcess("--store", "memory")
    try:
        a = wsraw.connect(srv.port)
        b = wsraw.connect(srv.port, subprotocol=None)
        a.send_json({"type": "ping", "id": 1})
        assert a.recv_json()["type"] == "pong"
        code = srv.terminate(timeout=15)
        assert code == 0
        for c in (a, b):
            assert c.expect_close()[0] == 1001
            assert c.at_eof()
        assert any("shutting down" in line for line in srv.lines)
    finally:
        srv.kill()


@pytest.mark.timeout(60)
def test_while_shutdown_drains_handshakes_healthz_and_publish_get_503(make_server):
    srv = make_server(shutdown_timeout=30.0 * SCALE)
    c = wsraw.connect(srv.port)  # keeps the drain waiting until it answers the close
    stopper = threadutil.start(srv.shutdown, name="test-shutdown")
    assert c.expect_close(timeout=10 * SCALE)[0] == 1001  # the drain has begun
    assert srv.shutting_down
    status, headers, body = wsraw.handshake(srv.port)
    assert status == 503 and json.loads(body)["error"] == "unavailable", (status, body)
    assert httputil.healthz(srv.port)[0] == 503
    status, doc = httputil.publish(srv.port, "a", 1)
    assert (status, doc["error"]) == (503, "unavailable"), doc
    assert stopper.is_alive(), "the drain ended before the client answered"
    c.send_frame(0x8, b"\x03\xe9")  # the close answered: the drain can end
    stopper.finish(20 * SCALE)
    assert c.at_eof()
    c.close()


@pytest.mark.timeout(60)
def test_silent_tcp_client_holds_no_thread_past_handshake_timeout(make_server):
    srv = make_server(handshake_timeout=2.0 * SCALE)
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # slowloris: never finishes the headers
    assert wsraw.wait_for(lambda: srv.thread_count() == 1, timeout=5)
    other = wsraw.connect(srv.port)  # not delayed by the silent one
    other.send_json({"type": "ping", "id": 1})
    assert other.recv_json()["type"] == "pong"
    other.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=5)
    s.settimeout(2)
    assert s.recv(100) == b""
    s.close()


@pytest.mark.timeout(60)
def test_client_shared_by_threads_never_interleaves_frames(server):
    """Many threads publishing big messages through one client: every frame arrives whole."""
    pub = Client.connect(server.url)
    sub = Client.connect(server.url)
    sub.subscribe("mt")
    per_thread = 40

    def run(k):
        for i in range(per_thread):
            pub.publish("mt", {"k": k, "i": i, "pad": "z" * 50000}, ack=(i % 10 == 0))

    threads = [threadutil.start(run, k, name="test-shared-%d" % k) for k in range(6)]
    for t in threads:
        t.finish(60 * SCALE)
    seen = {}
    for _ in range(6 * per_thread):
        m = sub.recv(timeout=10)
        assert m is not None
        seen.setdefault(m.data["k"], []).append(m.data["i"])
    assert all(v == list(range(per_thread)) for v in seen.values())
    assert server.writer.stats.close_codes == {}
    pub.close()
    sub.close()


@pytest.mark.timeout(10)
def test_a_connection_thread_is_alive_and_joinable_before_it_runs():
    # the accept loop does not wait for a connection thread to run (Thread.start would wait,
    # here for ever): a thread started but not running yet is alive, and join waits for it
    from wsbroadcast.server import _ConnectionThread

    ran = threading.Event()
    thread = _ConnectionThread(target=ran.set, name="wsbroadcast-conn-test", daemon=True)
    with thread._started._cond:  # the new thread cannot mark itself running until this is let go
        thread.start()
        assert thread.is_alive() and not ran.is_set()
    thread.join(5)
    assert ran.is_set() and not thread.is_alive()
