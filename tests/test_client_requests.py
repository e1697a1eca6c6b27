"""The Python client's requests: answers it waits for, error replies, and its message queue."""

from __future__ import annotations

import base64
import hashlib
import socket
import time

import pytest

import threadutil
import wsraw
from conftest import SCALE

from wsbroadcast import Client
from wsbroadcast.errors import ClientError, ErrorCode, ProtocolError

pytestmark = pytest.mark.timeout(60)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept_then_stay_silent(listener: socket.socket, held: list) -> None:
    """Answer one WebSocket handshake, then read and never answer (until shut down)."""
    conn, _ = listener.accept()
    held.append(conn)
    with conn:
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(4096)
        key = [ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n")
               if ln.lower().startswith(b"sec-websocket-key:")][0]
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: wsbroadcast.v1\r\n\r\n")
        while conn.recv(4096):
            pass


def test_a_request_without_answer_fails_after_the_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10 * SCALE)  # accept gives up if the client never dials
    held: list = []
    server = threadutil.start(_accept_then_stay_silent, listener, held, name="test-silent-server")
    try:
        c = Client.connect("ws://127.0.0.1:%d/ws" % listener.getsockname()[1], reconnect=False)
        c.timeout = 0.3  # (after the handshake, which a loaded machine may take longer for)
        try:
            t0 = time.monotonic()
            with pytest.raises(ClientError, match="no answer within 0.3s"):
                c.publish("t", 1)
            waited = time.monotonic() - t0
            assert 0.3 <= waited < 0.3 + 5 * SCALE, waited
            with pytest.raises(ClientError, match="no answer within 1.0s"):
                c.ping(timeout=1.0)
        finally:
            c.close()
    finally:
        for conn in held:
            conn.shutdown(socket.SHUT_RDWR)
        listener.close()
    server.finish(10 * SCALE)


def test_an_error_reply_is_a_protocol_error_with_its_code(make_server):
    srv = make_server(max_publish_rate=0.001, publish_burst=1)
    c = Client.connect(srv.url, reconnect=False)
    try:
        assert c.publish("t", 1)[0] == 1
        with pytest.raises(ProtocolError) as info:
            c.publish("t", 2)
        assert info.value.code == ErrorCode.RATE_LIMITED and str(info.value)
        # the connection goes on: the next request is answered
        assert c.ping() >= 0
        with pytest.raises(ProtocolError) as info:
            c.unsubscribe("a.>.b")
        assert info.value.code == ErrorCode.BAD_TOPIC
    finally:
        c.close()


def test_a_full_message_queue_holds_the_reader_and_loses_nothing(make_server):
    srv = make_server()
    c = Client.connect(srv.url, queue_size=3, reconnect=False)
    try:
        c.subscribe("q")
        for i in range(1, 21):
            srv.publish("q", i)
        assert srv.writer.sync(10 * SCALE)
        # the queue holds 3; the client's thread waits to put the 4th and reads nothing more
        assert wsraw.wait_for(lambda: c._messages.full(), timeout=10 * SCALE)
        assert c.state == "connected"
        got = [c.recv(timeout=10 * SCALE) for _ in range(20)]
        assert [m.data for m in got] == list(range(1, 21)), got
        assert [m.seq for m in got] == list(range(1, 21))
        srv.publish("q", "marker")  # nothing else was queued: the marker comes next
        assert c.recv(timeout=10 * SCALE).data == "marker"
        assert srv.writer.stats.slow_consumers == 0
    finally:
        c.close()
