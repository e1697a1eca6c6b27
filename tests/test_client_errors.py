"""The Python client speaks the broker's language: refusals and connection state."""

from __future__ import annotations

import queue
import socket
import threading

import pytest

from conftest import SCALE

from wsbroadcast import Client, HandshakeRefused, Server
from wsbroadcast.auth import mint_token

pytestmark = pytest.mark.timeout(60)

SECRET = "client-errors-secret-0123456789abcdef"


def _refusal(url, **kwargs) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as info:
        Client.connect(url, reconnect=False, **kwargs)
    return info.value


def test_refused_token_says_unauthorized_with_the_servers_message(make_server):
    srv = make_server(secret=SECRET)
    exc = _refusal(srv.url)
    assert (exc.status, exc.code) == (401, "unauthorized") and exc.message
    assert str(exc) == "server refused the connection: HTTP 401 unauthorized: " + exc.message
    exc = _refusal(srv.url, token=mint_token(SECRET + "-other", subscribe=[">"]))
    assert (exc.status, exc.code) == (401, "unauthorized") and exc.message


def test_foreign_origin_and_unknown_path(make_server):
    srv = make_server()
    exc = _refusal(srv.url, headers={"Origin": "http://evil.example"})
    assert (exc.status, exc.code) == (403, "forbidden_origin") and "403 forbidden_origin" in str(exc)
    exc = _refusal(srv.url.replace("/ws", "/nowhere"))
    assert (exc.status, exc.code) == (404, "not_found") and "404 not_found" in str(exc)


def test_a_server_that_never_answers_the_handshake_is_a_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        with pytest.raises(OSError):  # socket.timeout / TimeoutError, not a hang
            Client.connect("ws://127.0.0.1:%d/ws" % listener.getsockname()[1], timeout=0.5,
                           reconnect=False)
    finally:
        listener.close()


def test_state_tells_a_program_the_server_went_away_and_came_back():
    states: "queue.Queue[str]" = queue.Queue()
    srv = Server("127.0.0.1", 0, store="memory", close_timeout=2.0 * SCALE).start()
    port = srv.port
    client = Client(srv.url, max_backoff=0.2, on_state=states.put)
    try:
        assert client.state == "connecting"
        client.open()
        assert states.get(timeout=5) == "connected" and client.connected
        client.subscribe("news")
        srv.shutdown()
        assert states.get(timeout=20 * SCALE) == "reconnecting"
        assert client.state == "reconnecting" and not client.connected
        assert client.recv(timeout=0.05) is None  # nothing to read, and the state says why
        srv = Server("127.0.0.1", port, store="memory", close_timeout=2.0 * SCALE).start()
        assert states.get(timeout=20 * SCALE) == "connected" and client.connected
        client.ping()  # after the resubscribe
        srv.publish("news", "back")
        msg = client.recv(timeout=10 * SCALE)
        assert msg is not None and msg.data == "back"
    finally:
        client.close()
        srv.shutdown()
    assert states.get(timeout=5) == "closed" and client.state == "closed"
    assert states.empty()


def test_expired_credentials_on_reconnect_close_the_client_with_the_reason(make_server):
    srv = make_server(secret=SECRET)
    port = srv.port
    states: "queue.Queue[str]" = queue.Queue()
    client = Client.connect(srv.url, token=mint_token(SECRET, subscribe=[">"]), max_backoff=0.2,
                            on_state=states.put)
    done = threading.Event()
    try:
        srv.shutdown()
        srv2 = Server("127.0.0.1", port, store="memory", secret=SECRET + "-rotated",
                      close_timeout=2.0 * SCALE).start()
        try:
            assert states.get(timeout=5) == "connected"
            assert states.get(timeout=20 * SCALE) == "reconnecting"
            assert states.get(timeout=20 * SCALE) == "closed"
            done.set()
            assert "HTTP 401 unauthorized" in client.close_reason
        finally:
            srv2.shutdown()
    finally:
        client.close()
    assert done.is_set()
