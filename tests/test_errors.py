"""Every error code and close code of the contract, each from a raw client sending the bad input."""

from __future__ import annotations

import json
import struct
import time

import pytest

import wsraw
from conftest import SCALE

from wsbroadcast.connection import TokenBucket

pytestmark = pytest.mark.timeout(60)


def _error(c, frame, code, raw=False):
    if raw:
        c.send_text(frame)
    else:
        c.send_json(frame)
    reply = c.recv_json()
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"]
    return reply


def _still_works(c):
    c.send_json({"type": "ping", "id": "alive"})
    assert c.recv_json() == {"type": "pong", "id": "alive"}


@pytest.mark.parametrize("frame, code", [
    ("{not json", "bad_json"),
    ("", "bad_json"),
    ('{"type": "publish", "topic": "a", "data": NaN}', "bad_json"),
    ("[1, 2]", "bad_request"),
    ('"just a string"', "bad_request"),
    ('{"type": "dance", "id": 1}', "unknown_type"),
    ('{"topic": "a", "data": 1, "id": 1}', "unknown_type"),
    ('{"type": "publish", "data": 1, "id": 1}', "bad_request"),
    ('{"type": "publish", "topic": "a", "id": 1}', "bad_request"),
    ('{"type": "subscribe", "id": 1}', "bad_request"),
    ('{"type": "publish", "topic": 5, "data": 1}', "bad_topic"),
    ('{"type": "publish", "topic": "a.*", "data": 1}', "bad_topic"),
    ('{"type": "publish", "topic": "a.>", "data": 1}', "bad_topic"),
    ('{"type": "publish", "topic": "", "data": 1}', "bad_topic"),
    ('{"type": "publish", "topic": "a..b", "data": 1}', "bad_topic"),
    ('{"type": "publish", "topic": "sp ace", "data": 1}', "bad_topic"),
    ('{"type": "subscribe", "topic": "a.>.b"}', "bad_topic"),
    ('{"type": "subscribe", "topic": "a.b*"}', "bad_topic"),
    ('{"type": "subscribe", "topic": "a", "since": -1}', "bad_request"),
    ('{"type": "subscribe", "topic": "a", "since": 1.5}', "bad_request"),
    ('{"type": "subscribe", "topic": "a", "since": "3"}', "bad_request"),
    ('{"type": "subscribe", "topic": "a", "since": true}', "bad_request"),
    ('{"type": "subscribe", "topic": "a.*", "since": 0}', "bad_request"),
    ('{"type": "subscribe", "topic": "a", "since": 5}', "bad_request"),
])
def test_error_frames_keep_the_connection(server, frame, code):
    c = wsraw.connect(server.port)
    reply = _error(c, frame, code, raw=True)
    if '"id": 1' in frame:
        assert reply["id"] == 1
    _still_works(c)


def test_topic_length_edge(server):
    c = wsraw.connect(server.port)
    at = ("a" * 127) + "." + ("b" * 127)  # 255 bytes
    assert len(at) == 255
    c.send_json({"type": "publish", "topic": at, "data": 1, "id": 1})
    assert c.recv_json()["type"] == "ack"
    _error(c, {"type": "publish", "topic": at + "c", "data": 1, "id": 2}, "bad_topic")
    _still_works(c)


def test_too_many_subscriptions_at_and_past_the_edge(make_server):
    srv = make_server(max_subscriptions=3)
    c = wsraw.connect(srv.port)
    for i in range(3):
        c.send_json({"type": "subscribe", "topic": "t%d" % i, "id": i})
        assert c.recv_json()["type"] == "ack"
    c.send_json({"type": "subscribe", "topic": "t0", "id": "again"})  # not a new one
    assert c.recv_json()["type"] == "ack"
    _error(c, {"type": "subscribe", "topic": "t3", "id": 9}, "too_many_subscriptions")
    c.send_json({"type": "unsubscribe", "topic": "t0", "id": 10})
    c.recv_json()
    c.send_json({"type": "subscribe", "topic": "t3", "id": 11})
    assert c.recv_json()["type"] == "ack"


def test_token_bucket_at_and_past_its_edges():
    bucket = TokenBucket(rate=4.0, burst=3)
    t0 = bucket.stamp
    assert [bucket.take(t0) for _ in range(4)] == [True, True, True, False]  # the burst, then none
    assert bucket.take(t0 + 0.24) is False  # just short of one token (0.25 s at 4/s)
    assert bucket.take(t0 + 0.25) is True
    assert bucket.take(t0 + 0.25) is False
    # a long pause saves up the burst, never more
    assert [bucket.take(t0 + 100.0) for _ in range(4)] == [True, True, True, False]


def test_rate_limited_publisher_does_not_slow_another(make_server):
    # one token per 1000 s: however slow this machine, only the burst of 5 gets through
    srv = make_server(max_publish_rate=0.001, publish_burst=5)
    flood = wsraw.connect(srv.port)
    other = wsraw.connect(srv.port)
    for i in range(40):
        flood.send_json({"type": "publish", "topic": "r", "data": i, "id": i})
    replies = [flood.recv_json() for _ in range(40)]
    # (a refusal may overtake the acks of earlier publishes: replies are matched by id)
    assert sorted(r["id"] for r in replies if r["type"] == "ack") == list(range(5))
    refused = sorted((r["id"], r["code"]) for r in replies if r["type"] == "error")
    assert refused == [(i, "rate_limited") for i in range(5, 40)]
    other.send_json({"type": "publish", "topic": "r", "data": "ok", "id": "o"})
    assert other.recv_json()["type"] == "ack"


# ---------------------------------------------------------------- close codes

def _closed_with(c, code):
    got, _reason = c.expect_close()
    assert got == code
    assert c.at_eof(), "server must close TCP after its close frame"


def test_invalid_utf8_closes_1007(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x1, b'{"type": "ping", "x": "\xff\xfe"}')
    _closed_with(c, 1007)


def test_unmasked_frame_closes_1002(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x1, b'{"type": "ping"}', mask=False)
    _closed_with(c, 1002)


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_reserved_bits_close_1002(server, rsv):
    c = wsraw.connect(server.port)
    c.send_frame(0x1, b'{"type": "ping"}', rsv=rsv)
    _closed_with(c, 1002)


def test_unknown_opcode_closes_1002(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x3, b"x")
    _closed_with(c, 1002)


def test_binary_frame_closes_1003(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x2, b"\x00\x01")
    _closed_with(c, 1003)


def test_message_size_limit_at_and_past_the_edge(make_server):
    srv = make_server(max_message_size=1000)
    c = wsraw.connect(srv.port)
    body = json.dumps({"type": "publish", "topic": "big", "data": "", "id": 1})
    filler = 1000 - len(body)
    at = json.dumps({"type": "publish", "topic": "big", "data": "x" * filler, "id": 1})
    assert len(at) == 1000
    c.send_text(at)
    assert c.recv_json()["type"] == "ack"
    c.send_text(at[:-1] + " }")  # 1001 bytes
    _closed_with(c, 1009)


def test_fragmented_message_size_counts_the_whole_message(make_server):
    srv = make_server(max_message_size=1000)
    c = wsraw.connect(srv.port)
    text = json.dumps({"type": "publish", "topic": "f", "data": "y" * 600, "id": 1}).encode()
    c.send_frame(0x1, text[:300], fin=False)
    c.send_frame(0x0, text[300:])
    assert c.recv_json()["type"] == "ack"  # fragments reassembled
    c.send_frame(0x1, b"z" * 600, fin=False)
    c.send_frame(0x0, b"z" * 401, fin=False)
    _closed_with(c, 1009)


def test_default_size_limit_is_one_mebibyte(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x1, b" " * (1024 * 1024 + 1))
    _closed_with(c, 1009)


def test_peer_close_is_answered_with_its_code(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x8, b"\x03\xe8bye")
    code, _ = c.expect_close()
    assert code == 1000
    assert c.at_eof()


def test_connection_limit_closes_1013(make_server):
    srv = make_server(max_connections=2)
    a = wsraw.connect(srv.port)
    b = wsraw.connect(srv.port)
    c = wsraw.connect(srv.port)
    _closed_with(c, 1013)
    for x in (a, b):
        x.send_json({"type": "ping", "id": 1})
        assert x.recv_json()["type"] == "pong"
    a.close()
    # room again once a's reader has given its place back (the hub lets go of it first)
    deadline = time.monotonic() + 10.0 * SCALE
    while True:
        d = wsraw.connect(srv.port)
        d.send_json({"type": "ping", "id": 2})
        op, payload = d.recv_frame()
        if op == 0x1:
            break
        assert op == 0x8 and payload[:2] == struct.pack("!H", 1013), (op, payload)
        assert time.monotonic() < deadline, "no room after a closed"
        d.close()
        time.sleep(0.02)  # polling with a deadline, not a synchronisation
    assert json.loads(payload)["type"] == "pong"
    _still_works(d)


def test_keepalive_ping_then_1011_without_pong(make_server):
    srv = make_server(ping_interval=0.3, ping_timeout=0.5)
    c = wsraw.connect(srv.port)
    op, payload = c.recv_frame(timeout=5)
    assert op == 0x9  # the server's ping; this client never answers
    code, reason = c.expect_close(timeout=5)
    assert code == 1011 and "keepalive" in reason


def test_keepalive_pong_keeps_the_connection(make_server):
    # a new ping is only sent once the previous one was answered, so four pings prove three
    # pongs were counted; a long timeout keeps a late pong on a loaded machine harmless
    srv = make_server(ping_interval=0.2, ping_timeout=30.0)
    c = wsraw.connect(srv.port)
    for _ in range(4):
        op, payload = c.recv_frame(timeout=10)
        assert op == 0x9, (op, payload)
        c.send_frame(0xA, payload)
    _still_works(c)


def test_client_ping_gets_pong(server):
    c = wsraw.connect(server.port)
    c.send_frame(0x9, b"hello")
    assert c.recv_frame() == (0xA, b"hello")


def test_shutdown_closes_1001(make_server):
    srv = make_server()
    c = wsraw.connect(srv.port)
    _still_works(c)
    srv.shutdown()
    _closed_with(c, 1001)
