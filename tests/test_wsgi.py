"""The broker mounted in a Flask app under Werkzeug's threaded server (wsbroadcast.wsgi)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import threading
import time

import pytest

from wsbroadcast.errors import ServerClosed

flask = pytest.importorskip("flask")
simple_websocket = pytest.importorskip("simple_websocket")

from werkzeug.serving import make_server  # noqa: E402

import wsraw  # noqa: E402
from conftest import SCALE  # noqa: E402

from wsbroadcast.wsgi import Broker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = "wsbroadcast.v1"


def _load_example():
    spec = importlib.util.spec_from_file_location("wsbroadcast_flask_example",
                                                  os.path.join(ROOT, "examples", "flask_app.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def mounted():
    """Start brokers inside the example Flask app on Werkzeug's threaded server."""
    made = []

    def make(**settings):
        settings.setdefault("store", "memory")
        settings.setdefault("close_timeout", 2.0 * SCALE)
        broker = Broker(**settings).start()
        app = example.create_app(broker)

        @app.post("/pub/<topic>")
        def pub(topic):  # the app's own code publishing from a request handler
            seq, epoch = broker.publish(topic, flask.request.get_json())
            return {"seq": seq, "epoch": epoch}

        srv = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=srv.serve_forever, name="test-werkzeug", daemon=True)
        thread.start()
        made.append((broker, srv, thread))
        return broker, srv.server_port

    yield make
    for broker, srv, thread in made:
        broker.shutdown()
        srv.shutdown()
        thread.join(10)
        srv.server_close()


def _post(port, path, body, ctype="application/json"):
    req = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
           "Connection: close\r\n\r\n" % (path, port, ctype, len(body))).encode() + body
    return wsraw.http_request(port, req)


def _recv_json(ws, timeout=5.0):
    data = ws.receive(timeout=timeout)
    assert data is not None, "nothing received in %.1fs" % timeout
    return json.loads(data)


@pytest.mark.timeout(30)
def test_form_post_reaches_subscribers_v1_and_plain(mounted):
    broker, port = mounted()
    url = "ws://127.0.0.1:%d/live" % port
    v1 = simple_websocket.Client.connect(url, subprotocols=[V1])
    plain = simple_websocket.Client.connect(url)
    try:
        assert v1.subprotocol == V1
        assert plain.subprotocol is None
        v1.send(json.dumps({"type": "subscribe", "topic": "news", "id": 1}))
        ack = _recv_json(v1)
        assert ack["type"] == "ack" and ack["topic"] == "news" and ack["seq"] == 0
        # the example's form post: a plain view calling broker.publish()
        status, _, body = _post(port, "/say", b"text=hello", "application/x-www-form-urlencoded")
        assert status == 303, body
        msg = _recv_json(v1)
        assert msg == {"type": "message", "topic": "news", "seq": 1, "data": "hello"}
        # a plain client gets the published data itself on `broadcast`
        v1.send(json.dumps({"type": "subscribe", "topic": "broadcast", "id": 2}))
        assert _recv_json(v1)["type"] == "ack"
        status, _, body = _post(port, "/pub/broadcast", b'{"n": 1}')
        assert status == 200 and json.loads(body)["seq"] == 1
        assert _recv_json(plain) == {"n": 1}
        assert _recv_json(v1)["data"] == {"n": 1}
        # the seed's form from the plain client is published on broadcast
        plain.send(json.dumps({"chat": "hi"}))
        assert _recv_json(v1) == {"type": "message", "topic": "broadcast", "seq": 2, "data": {"chat": "hi"}}
        assert _recv_json(plain) == {"chat": "hi"}
        # same protocol errors as the standalone server
        v1.send(json.dumps({"type": "publish", "topic": "bad topic", "data": 1, "id": 3}))
        err = _recv_json(v1)
        assert err["type"] == "error" and err["code"] == "bad_topic" and err["id"] == 3
        assert len(broker.hub) == 2
    finally:
        v1.close()
        plain.close()
    assert wsraw.wait_for(lambda: len(broker.hub) == 0 and broker.thread_count() == 0)


@pytest.mark.timeout(30)
def test_frames_sent_right_after_the_handshake_are_not_lost(mounted):
    """Bytes Werkzeug buffered past the request head reach the reader."""
    broker, port = mounted()
    head = wsraw.upgrade_request(port, "/live", V1)

    class Collect:
        data = b""

        def sendall(self, data):
            self.data += data

    collect = Collect()
    wsraw.RawWS(collect, None).send_json({"type": "ping", "id": 7})  # a masked frame, kept
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head + collect.data)  # the frame in the same segment as the request head
    status, headers, rest = wsraw.read_response(sock)
    assert status == 101
    ws = wsraw.RawWS(sock, headers.get("sec-websocket-protocol"), rest)
    assert ws.recv_json() == {"type": "pong", "id": 7}
    ws.close()


@pytest.mark.timeout(20)
def test_refusals_match_the_standalone_server(mounted):
    broker, port = mounted()
    # a disallowed Origin: 403 before the upgrade
    status, headers, body = wsraw.http_request(port, _upgrade_request(port, [("Origin", "http://evil.example")]))
    assert status == 403
    assert json.loads(body)["error"] == "forbidden_origin"
    # the app's own origin is allowed
    ws = wsraw.connect(port, path="/live", headers=[("Origin", "http://127.0.0.1:%d" % port)])
    assert ws.subprotocol == V1
    ws.close()
    # a plain GET on the WebSocket route: 426 with the JSON body
    status, headers, body = wsraw.http_request(
        port, b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 426 and json.loads(body)["error"] == "upgrade_required"
    assert headers.get("upgrade") == "websocket"
    assert broker.upgraded == 1


@pytest.mark.timeout(20)
def test_mounted_host_check_only_with_allowed_hosts(mounted):
    """The WSGI server, not the broker, knows its address: no Host check unless hosts are given."""
    _, port = mounted()
    ws = wsraw.connect(port, path="/live", host="app.example")
    ws.close()
    _, port = mounted(allowed_hosts=("app.example",))
    ws = wsraw.connect(port, path="/live", host="app.example:%d" % port)
    ws.close()
    for host in ("evil.example", "127.0.0.1:%d" % port):
        status, _, body = wsraw.http_request(port, _upgrade_request(port).replace(
            b"Host: 127.0.0.1:%d" % port, b"Host: " + host.encode()))
        assert status == 403 and json.loads(body)["error"] == "forbidden_host", host


@pytest.mark.timeout(20)
def test_auth_and_allowed_origins(mounted):
    from wsbroadcast.auth import mint_token

    broker, port = mounted(secret="s3cret-for-the-mounted-test-0123456789", allowed_origins=("https://app.example",))
    status, headers, body = wsraw.http_request(port, _upgrade_request(port))
    assert status == 401 and json.loads(body)["error"] == "unauthorized"
    assert headers.get("www-authenticate") == "Bearer"
    token = mint_token("s3cret-for-the-mounted-test-0123456789", sub="t", subscribe=["news"], publish=[])
    ws = wsraw.connect(port, path="/live?token=" + token, headers=[("Origin", "https://app.example")])
    ws.send_json({"type": "subscribe", "topic": "news", "id": 1})
    assert ws.recv_json()["type"] == "ack"
    ws.send_json({"type": "publish", "topic": "news", "data": 1, "id": 2})
    assert ws.recv_json()["code"] == "forbidden"
    ws.close()


def _upgrade_request(port, extra=()):
    return wsraw.upgrade_request(port, "/live", V1, list(extra), key="dGhlIHNhbXBsZSBub25jZQ==")


@pytest.mark.timeout(60)
def test_stuck_client_on_mounted_route_is_closed_without_stalling_others(mounted):
    broker, port = mounted(history_size=0)  # default limits: 1 MiB outbox
    url = "ws://127.0.0.1:%d/live" % port
    stuck = wsraw.connect(port, path="/live")
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.send_json({"type": "subscribe", "topic": "flood", "id": 1})
    assert stuck.recv_json()["type"] == "ack"
    fast = simple_websocket.Client.connect(url, subprotocols=[V1])
    fast.send(json.dumps({"type": "subscribe", "topic": "flood", "id": 1}))
    assert _recv_json(fast)["type"] == "ack"
    n, payload = 1000, "x" * (8 * 1024)  # 8 MB: far past the stuck client's buffers and outbox
    got = []
    failure = []

    def read():
        try:
            while len(got) < n:
                data = fast.receive(timeout=30 * SCALE)
                if data is None:
                    return
                got.append(json.loads(data)["seq"])
        except Exception as exc:  # e.g. closed: reported by the assertions below
            failure.append(exc)

    reader = threading.Thread(target=read, name="test-fast-reader")
    reader.start()
    worst = 0.0
    for i in range(1, n + 1):
        broker.publish("flood", payload)  # from this thread, as a view would
        if i % 32 == 0:
            # the fast subscriber keeps up: never more than 64 messages (512 KiB) behind
            t0 = time.monotonic()
            assert wsraw.wait_for(lambda i=i: len(got) >= i - 32 or failure, timeout=10 * SCALE), \
                "the fast subscriber stalled at %d of %d" % (len(got), i)
            worst = max(worst, time.monotonic() - t0)
    reader.join(30 * SCALE)
    assert not failure, failure
    assert got == list(range(1, n + 1)), "the fast subscriber missed messages"
    assert worst < 2.0 * SCALE, "the fast subscriber lagged %.2fs" % worst
    assert wsraw.wait_for(lambda: broker.writer.stats.slow_consumers == 1, timeout=10 * SCALE)
    assert broker.writer.stats.close_codes.get(1008) == 1
    # it never reads: once the close grace is over it is reset (its close frame cannot get out)
    assert wsraw.wait_reset(stuck.sock, timeout=10 * SCALE), wsraw.tcp_state(stuck.sock)
    # the stuck connection is gone and its request thread released; the app still serves
    assert wsraw.wait_for(lambda: len(broker.hub) == 1, timeout=10 * SCALE)
    status, _, _ = _post(port, "/pub/flood", b'"after"')
    assert status == 200
    assert _recv_json(fast)["data"] == "after"
    fast.close()
    stuck.close()


@pytest.mark.timeout(30)
def test_shutdown_closes_mounted_connections_and_joins_threads(mounted):
    before = set(threading.enumerate())
    broker, port = mounted()
    url = "ws://127.0.0.1:%d/live" % port
    clients = [wsraw.connect(port, path="/live") for _ in range(3)]
    plain = simple_websocket.Client.connect(url)
    for c in clients:
        c.send_json({"type": "subscribe", "topic": "news", "id": 1})
        assert c.recv_json()["type"] == "ack"
    assert wsraw.wait_for(lambda: broker.thread_count() == 4)
    started = time.monotonic()
    broker.shutdown()
    assert time.monotonic() - started < 5.0 * SCALE
    for c in clients:
        assert c.expect_close() == (1001, "server shutting down")
        assert c.at_eof()
        c.close()
    assert wsraw.wait_for(lambda: not plain.connected)
    assert broker.thread_count() == 0
    assert not broker.writer.alive
    assert broker._trimmer is not None and not broker._trimmer._thread.is_alive()
    # no wsbroadcast thread is left, and the server's request threads have ended
    assert wsraw.wait_for(lambda: not [t for t in threading.enumerate()
                                       if t.name.startswith("wsbroadcast") and t not in before])
    assert wsraw.wait_for(lambda: {t for t in threading.enumerate()
                                   if t.name != "test-werkzeug"} <= before | {threading.current_thread()},
                          timeout=10 * SCALE)
    # after shutdown the endpoint answers 503 and publish refuses
    status, _, body = wsraw.http_request(port, _upgrade_request(port))
    assert status == 503 and json.loads(body)["error"] == "unavailable"
    with pytest.raises(ServerClosed):
        broker.publish("news", 1)


def test_a_signal_shuts_the_broker_down_in_a_thread_that_shutdown_joins(mounted):
    broker, port = mounted()
    c = wsraw.connect(port, path="/live")
    c.send_json({"type": "subscribe", "topic": "news", "id": 1})
    assert c.recv_json()["type"] == "ack"
    earlier = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: earlier.append(number))
    try:
        broker.shutdown_on_signal(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wsraw.wait_for(lambda: earlier == [signal.SIGUSR1])  # the handler before still runs
        assert c.expect_close() == (1001, "server shutting down")
        thread = broker._signal_shutdown
        assert thread is not None and thread.name == "wsbroadcast-shutdown"
        broker.shutdown()  # (at exit, say): the signal's shutdown is waited for and its thread joined
        assert not thread.is_alive()
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal starts no second shutdown
        assert wsraw.wait_for(lambda: len(earlier) == 2)
        assert broker._signal_shutdown is thread
    finally:
        signal.signal(signal.SIGUSR1, previous)
    c.close()


GUNICORN_APP = '''
import importlib.util
spec = importlib.util.spec_from_file_location("flask_example", %r)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
from wsbroadcast.wsgi import Broker
broker = Broker(store="memory", close_timeout=1.0).start()
app = example.create_app(broker)
'''


@pytest.mark.timeout(60)
def test_gunicorn_gthread_worker(tmp_path):
    """The example app under gunicorn's threaded worker: same endpoint, same behaviour."""
    import re
    import signal
    import subprocess
    import sys

    gunicorn = pytest.importorskip("gunicorn")
    from gunicorn.config import KNOWN_SETTINGS

    (tmp_path / "gapp.py").write_text(GUNICORN_APP % os.path.join(ROOT, "examples", "flask_app.py"))
    cmd = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
           "--threads", "8", "--bind", "127.0.0.1:0", "--chdir", str(tmp_path), "gapp:app"]
    if any("--no-control-socket" in (s.cli or ()) for s in KNOWN_SETTINGS):
        cmd.insert(3, "--no-control-socket")  # gunicorn >= 25 would make ~/.gunicorn/ otherwise
    # the worker imports wsbroadcast from this tree, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path), env=env)
    try:
        port = None
        deadline = time.monotonic() + 20 * SCALE
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "gunicorn %s did not start" % gunicorn.__version__
        threading.Thread(target=proc.stderr.read, name="test-gunicorn-log", daemon=True).start()
        v1 = wsraw.connect(port, path="/live", headers=[("Origin", "http://127.0.0.1:%d" % port)])
        assert v1.subprotocol == V1
        v1.send_json({"type": "subscribe", "topic": "news", "id": 1})
        assert v1.recv_json()["type"] == "ack"
        status, _, _ = _post(port, "/say", b"text=via+gunicorn", "application/x-www-form-urlencoded")
        assert status == 303
        assert v1.recv_json() == {"type": "message", "topic": "news", "seq": 1, "data": "via gunicorn"}
        status, _, body = wsraw.http_request(port, _upgrade_request(port, [("Origin", "http://evil.example")]))
        assert status == 403 and json.loads(body)["error"] == "forbidden_origin"
        v1.send_frame(0x8, b"\x03\xe8")
        assert v1.expect_close() == (1000, "")
        assert v1.at_eof()
        v1.close()
        # the worker thread is free again: another connection is served
        again = wsraw.connect(port, path="/live")
        again.send_json({"type": "ping", "id": 2})
        assert again.recv_json() == {"type": "pong", "id": 2}
        again.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10 * SCALE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.timeout(30)
def test_mount_on_a_plain_wsgi_app():
    """Broker.mount() without Flask: the endpoint at its path, everything else to the app."""

    def app(environ, start_response):
        body = ("plain app: %s" % environ["PATH_INFO"]).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    broker = Broker(store="memory", close_timeout=2.0 * SCALE).start()
    srv = make_server("127.0.0.1", 0, broker.mount(app, path="/updates"), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, name="test-werkzeug-plain", daemon=True)
    thread.start()
    try:
        port = srv.server_port
        status, _, body = wsraw.http_request(
            port, b"GET /other HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port)
        assert (status, body) == (200, b"plain app: /other")
        ws = wsraw.connect(port, path="/updates")
        assert wsraw.subscribe(ws, "news", 1)["type"] == "ack"
        broker.publish("news", {"n": 1})
        assert ws.recv_json() == {"type": "message", "topic": "news", "seq": 1, "data": {"n": 1}}
        ws.close()
        assert wsraw.handshake(port, "/ws")[0] == 200  # /ws is the app's here, not an endpoint
    finally:
        broker.shutdown()
        srv.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        srv.server_close()


@pytest.mark.timeout(30)
def test_mounted_broker_compresses_unless_told_not_to(mounted):
    offer = [("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")]
    for compression in (True, False):
        broker, port = mounted(compression=compression)
        status, headers, ws = wsraw.handshake(port, path="/live", headers=offer, cls=wsraw.DeflateWS)
        assert status == 101
        assert headers.get("sec-websocket-extensions") == (
            "permessage-deflate; server_no_context_takeover" if compression else None)
        assert wsraw.subscribe(ws, "news")["type"] == "ack"
        broker.publish("news", {"text": "mounted " * 100})
        assert ws.recv_json()["data"] == {"text": "mounted " * 100}
        assert ws.compressed == (1 if compression else 0)
        ws.close()


def test_mounted_broker_says_it_is_ready_not_that_something_is_missing(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="wsbroadcast"):
        broker = Broker(store="memory").start()
        broker.shutdown()
    records = [r for r in caplog.records if r.name == "wsbroadcast.server"]
    said = [r.getMessage() for r in records]
    assert any(m.startswith("broker ready for connections handed over by the web application") for m in said), said
    assert not any("without" in m for m in said) and all(r.levelno < logging.WARNING for r in records), said
