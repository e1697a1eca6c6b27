"""Every ``wsbroadcast serve`` flag through the real command line, and SIGINT."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request

import pytest

import certs
import httputil
import wsraw
from conftest import SCALE
from serverproc import ServerProcess

from wsbroadcast import Client, cli
from wsbroadcast.config import Config

pytestmark = pytest.mark.timeout(60)


class _Captured(Exception):
    pass


def parsed_config(monkeypatch, *argv: str) -> Config:
    """The Config that ``wsbroadcast serve ARGV`` builds (stopped before anything starts)."""
    import wsbroadcast.server as server_module

    seen = []

    class Recorder:
        def __init__(self, host, port, config):
            seen.append(config)
            raise _Captured()

    monkeypatch.setattr(server_module, "Server", Recorder)
    with pytest.raises(_Captured):
        cli.main(["serve", "--port", "0"] + list(argv))
    return seen[0]


def test_every_serve_flag_reaches_the_config(monkeypatch, tmp_path):
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    cfg = parsed_config(
        monkeypatch, "--host", "127.0.0.1", "--path", "/live", "--max-message-size", "4096",
        "--max-outbox", "65536", "--ping-interval", "3", "--ping-timeout", "4", "--handshake-timeout", "5",
        "--close-timeout", "6", "--max-connections", "7", "--max-connections-per-ip", "2",
        "--max-subscriptions", "9", "--max-publish-rate", "2.5", "--publish-burst", "11",
        "--store", str(tmp_path / "h.db"), "--history-size", "12", "--history-ttl", "13", "--full-sync",
        "--redis", "redis://127.0.0.1:1/0", "--api-key", "k" * 20,
        "--allowed-origin", "https://a.example", "--allowed-origin", "https://b.example",
        "--certfile", cert, "--keyfile", key)
    assert (cfg.path, cfg.max_message_size, cfg.max_outbox) == ("/live", 4096, 65536)
    assert (cfg.ping_interval, cfg.ping_timeout, cfg.handshake_timeout, cfg.close_timeout) == (3, 4, 5, 6)
    assert (cfg.max_connections, cfg.max_connections_per_ip, cfg.max_subscriptions) == (7, 2, 9)
    assert (cfg.max_publish_rate, cfg.publish_burst) == (2.5, 11)
    assert (cfg.store, cfg.history_size, cfg.history_ttl, cfg.store_full_sync) == (
        str(tmp_path / "h.db"), 12, 13, True)
    assert cfg.redis_url == "redis://127.0.0.1:1/0" and cfg.api_key == "k" * 20
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")
    assert (cfg.certfile, cfg.keyfile) == (cert, key)
    defaults = parsed_config(monkeypatch)
    assert defaults.store_full_sync is False and defaults.redis_url is None and defaults.history_ttl is None


def _connect_from(source: str, port: int, **kw):
    """An upgrade from another loopback address (each is its own client IP)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5 * SCALE)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(wsraw.upgrade_request(port, **kw))
    status, headers, rest = wsraw.read_response(sock, 5 * SCALE, upgrade=True)
    assert status == 101, (status, rest)
    return wsraw.RawWS(sock, headers.get("sec-websocket-protocol"), rest)


@pytest.mark.timeout(90)
def test_serve_flags_take_effect(tmp_path):
    db = str(tmp_path / "history.db")
    with ServerProcess("--path", "/live", "--allowed-origin", "https://app.example",
                       "--max-connections", "3", "--max-connections-per-ip", "2",
                       "--max-publish-rate", "0.001", "--publish-burst", "2",
                       "--ping-interval", "0.3", "--ping-timeout", "30",
                       "--store", db, "--full-sync", "--history-ttl", "3") as srv:
        port = srv.port
        # --path: the endpoint moved
        assert wsraw.handshake(port, "/ws")[0] == 404
        # --allowed-origin: that origin only (besides the server's own)
        assert wsraw.handshake(port, "/live", headers=[("Origin", "https://evil.example")])[0] == 403
        a = wsraw.connect(port, path="/live", headers=[("Origin", "https://app.example")])
        # --ping-interval: the server pings an idle connection
        op, payload = a.recv_frame(timeout=10 * SCALE)
        assert op == 0x9, (op, payload)
        a.send_frame(0xA, payload)
        # --max-publish-rate / --publish-burst: the burst passes, then nothing (no refill in 1000 s)
        a.send_texts(*[json.dumps({"type": "publish", "topic": "t", "data": i, "id": i}) for i in range(3)])
        replies = sorted((r["id"], r["type"]) for r in (a.recv_json(10 * SCALE) for _ in range(3)))
        assert replies == [(0, "ack"), (1, "ack"), (2, "error")]
        # --store with --history-ttl: stored, then expired from the history file
        assert [m["seq"] for m in httputil.history(port, "t")] == [1, 2]
        assert wsraw.wait_for(lambda: httputil.history(port, "t") == [], timeout=15 * SCALE)
        # --max-connections-per-ip 2: a third from 127.0.0.1 is closed 1013
        b = wsraw.connect(port, path="/live")
        c = wsraw.connect(port, path="/live")
        assert c.expect_close(10 * SCALE) == (1013, "too many connections from this address")
        c.close()
        # --max-connections 3: one more from another address fits, the next is turned away
        d = _connect_from("127.0.0.2", port, path="/live")
        wsraw.expect_pong_next(d)
        e = _connect_from("127.0.0.3", port, path="/live")
        assert e.expect_close(10 * SCALE) == (1013, "server over its connection limit")
        for x in (a, b, d, e):
            x.close()
    # --full-sync leaves a WAL history file behind that holds the messages' seqs
    import sqlite3
    conn = sqlite3.connect(db)  # (its context manager commits, it does not close)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_serve_tls_with_a_small_outbox(tmp_path):
    certfile, keyfile = certs.make_cert(str(tmp_path))
    ctx = certs.client_context(certfile)
    with ServerProcess("--certfile", certfile, "--keyfile", keyfile, "--max-outbox", "65536",
                       "--close-timeout", "1", "--store", "memory") as srv:
        assert any("wss://" in line for line in srv.lines)
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5 * SCALE)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(wsraw.upgrade_request(srv.port))
        status, _h, rest = wsraw.read_response(tls, 5 * SCALE, upgrade=True)
        assert status == 101
        stuck = wsraw.RawWS(tls, "wsbroadcast.v1", rest)

        def metric(name: str) -> float:
            with urllib.request.urlopen("https://127.0.0.1:%d/metrics" % srv.port, context=ctx,
                                        timeout=10 * SCALE) as answer:
                for line in answer.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.rpartition(" ")[2])
            return 0.0

        assert wsraw.subscribe(stuck, "flood", 1)["type"] == "ack"
        # the stuck TLS reader passes the 64 KiB outbox: closed as a slow consumer, then reset
        pub = Client("wss://127.0.0.1:%d/ws" % srv.port, ssl_context=ctx, reconnect=False, timeout=10 * SCALE).open()
        try:
            for i in range(1, 2001):
                pub.publish("flood", "x" * 4096, ack=(i % 50 == 0))
                if i % 50 == 0 and metric("wsbroadcast_slow_consumer_closes_total") == 1:
                    break
            assert metric("wsbroadcast_slow_consumer_closes_total") == 1
            assert metric('wsbroadcast_close_codes_total{code="1008"}') == 1
            assert wsraw.wait_reset(tls, 10 * SCALE), wsraw.tcp_state(tls)
            assert pub.publish("flood", "still served")[0] > i  # the publisher is not held up
        finally:
            pub.close()
            stuck.close()


@pytest.mark.timeout(60)
def test_sigint_closes_clients_with_1001_and_exits_0():
    srv = ServerProcess("--store", "memory")
    try:
        a = wsraw.connect(srv.port)
        wsraw.expect_pong_next(a)
        assert srv.terminate(timeout=15 * SCALE, signum=signal.SIGINT) == 0
        assert a.expect_close()[0] == 1001
        assert a.at_eof()
        assert any("signal %d" % signal.SIGINT in line for line in srv.lines)
        a.close()
    finally:
        srv.kill()


@pytest.mark.timeout(60)
def test_serve_redis_joins_two_processes(tmp_path):
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer(str(tmp_path / "redis")) as rs:
        with ServerProcess("--redis", rs.url) as a, ServerProcess("--redis", rs.url) as b:
            assert any("redis: " + rs.url in line for line in a.lines)
            sub = wsraw.connect(a.port)
            assert wsraw.subscribe(sub, "x", 1)["type"] == "ack"
            doc = httputil.publish_ok(b.port, "x", "across")
            msg = sub.recv_json(10 * SCALE)
            assert msg == {"type": "message", "topic": "x", "seq": doc["seq"], "data": "across"}, msg
            assert httputil.healthz(b.port)[1]["broker"]["kind"] != "local"
            sub.close()
