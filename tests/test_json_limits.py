"""JSON nesting depth and non-finite numbers (PROTOCOL.md section 3), against the command line.

Servers here are ``python -m wsbroadcast serve`` run by the interpreter running the tests, so
the command line's default thread stack size is the one under test (CI runs 3.9 and 3.13).
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3

import pytest

import wsraw
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(60)

#: PROTOCOL.md section 3: deeper than this is bad_json
MAX_DEPTH = 64

SECRET = "json-limits-secret-0123456789abcdef"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WSBROADCAST_SECRET", "WSBROADCAST_API_KEY")}
    env.update(extra)
    return env


def nested(depth: int, inner: str = "") -> str:
    """A JSON array text nested ``depth`` deep."""
    return "[" * depth + inner + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def publish_frame(data: str, ident: int, topic: str = "broadcast") -> str:
    """A publish frame: the frame object is one level, so ``data`` nested N deep makes N + 1."""
    return '{"type":"publish","topic":"%s","id":%d,"data":%s}' % (topic, ident, data)


def post(port: int, body: str, headers: str = "") -> tuple:
    raw = body.encode()
    status, _, answer = wsraw.http_request(port, (
        "POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
        "Content-Length: %d\r\nConnection: close\r\n\r\n" % (headers, len(raw))).encode() + raw)
    return status, wsraw.strict_loads(answer)


def get(port: int, target: str) -> tuple:
    status, _, body = wsraw.http_request(
        port, ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % target).encode())
    return status, wsraw.strict_loads(body)


def answer(c: wsraw.RawWS, text: str) -> dict:
    c.send_text(text)
    return wsraw.strict_loads(c.recv_text())


def alive(proc: ServerProcess, *conns: wsraw.RawWS) -> None:
    """The process runs and every connection still answers a ping."""
    assert proc.proc.poll() is None, "server exited with %s:\n%s" % (proc.proc.returncode, "\n".join(proc.lines))
    for i, c in enumerate(conns):
        assert answer(c, '{"type":"ping","id":"alive-%d"}' % i) == {"type": "pong", "id": "alive-%d" % i}


def test_json_deeper_than_64_is_bad_json_and_no_input_exhausts_a_thread_stack(tmp_path):
    """3,000 '[' once crashed a 3.13 server (SIGSEGV): the decoder's recursion outgrew the
    connection thread's stack. Depth 64 is served, 65 is bad_json, on WebSocket and HTTP."""
    with ServerProcess("--store", str(tmp_path / "h.db"), env=_env()) as proc:
        port = proc.port
        v1 = wsraw.connect(port)
        plain = wsraw.connect(port, subprotocol=None)
        watcher = wsraw.connect(port)
        for i, topic in enumerate(("t", "broadcast")):
            assert answer(watcher, '{"type":"subscribe","topic":"%s","id":%d}' % (topic, i))["type"] == "ack"
        for deep in (nested(3000), nested(100000), "[" * 3000, '{"a":' * 3000, nested_objects(MAX_DEPTH + 1),
                     publish_frame(nested(MAX_DEPTH), 9), nested(MAX_DEPTH + 1)):
            for c in (v1, plain):
                reply = answer(c, deep)
                assert (reply["type"], reply["code"]) == ("error", "bad_json"), (deep[:20], reply)
        alive(proc, v1, plain, watcher)
        # at the edge: 64 levels in all are served and delivered
        data = nested(MAX_DEPTH - 1, "1")
        ack = answer(v1, publish_frame(data, 1, "t"))
        assert ack["type"] == "ack"
        got = wsraw.strict_loads(watcher.recv_text())
        assert got["seq"] == ack["seq"] and got["data"] == json.loads(data)
        seed = nested_objects(MAX_DEPTH)  # the seed's form on a plain connection: delivered verbatim
        plain.send_text(seed)
        assert wsraw.strict_loads(watcher.recv_text())["data"] == json.loads(seed)
        assert wsraw.strict_loads(plain.recv_text()) == json.loads(seed)  # it is on "broadcast" too
        # brackets inside strings are text, not nesting
        ack = answer(v1, publish_frame(json.dumps("[" * 3000 + "{" * 3000), 2, "t"))
        assert ack["type"] == "ack"
        assert wsraw.strict_loads(watcher.recv_text())["data"] == "[" * 3000 + "{" * 3000
        # HTTP publish: the same limit, answered 400 bad_json
        for deep in ("[" * 3000, nested(100000), '{"topic":"t","data":%s}' % nested(MAX_DEPTH)):
            status, body = post(port, deep)
            assert (status, body["error"]) == (400, "bad_json"), deep[:20]
        status, body = post(port, '{"topic":"t","data":%s}' % nested(MAX_DEPTH - 1, "2"))
        assert status == 200
        got = wsraw.strict_loads(watcher.recv_text())
        assert got["seq"] == body["seq"] and got["data"] == json.loads(nested(MAX_DEPTH - 1, "2"))
        status, rows = get(port, "/history?topic=t&limit=1000")
        assert status == 200 and rows[-1]["seq"] == body["seq"]
        alive(proc, v1, plain, watcher)
        for c in (v1, plain, watcher):
            c.close()
        assert proc.terminate() == 0

    # with authentication on, the token's header is JSON read before any signature check
    with ServerProcess("--store", "memory", env=_env(WSBROADCAST_SECRET=SECRET)) as proc:
        deep = base64.urlsafe_b64encode(b"[" * 12000).rstrip(b"=").decode() + ".e30.c2ln"
        status, body = get(proc.port, "/history?topic=t&token=" + deep)
        assert (status, body["error"]) == (401, "unauthorized")
        with pytest.raises(AssertionError, match="handshake answered 401"):
            wsraw.connect(proc.port, path="/ws?token=" + deep)
        assert proc.proc.poll() is None, "\n".join(proc.lines)
        assert proc.terminate() == 0


#: numbers with no finite double: refused wherever they are in a frame or body
NOT_FINITE = ["1e400", "-1e400", "1E400", "1e+309", "-1.5e999", "0.1e310", "1" + "0" * 400,
              "-" + "9" * 309, str(2 ** 1024 - 2 ** 970)]  # the last rounds up to 2**1024
#: the same as literals Python's json module would take
NOT_JSON = ["NaN", "Infinity", "-Infinity"]
#: the largest finite ones: served
FINITE_EDGE = ["1.7976931348623157e308", "-1.7976931348623157e308", "1e308", "1" + "0" * 308,
               str(2 ** 1024 - 2 ** 971), "5e-324", "1e-400"]


def test_non_finite_numbers_are_bad_json_and_nothing_invalid_is_sent(tmp_path):
    """``"data": 1e400`` was acked, stored and delivered as ``Infinity``, which strict parsers
    refuse. Every such number is bad_json, in any field, on WebSocket and HTTP."""
    with ServerProcess("--store", str(tmp_path / "h.db"), env=_env()) as proc:
        port = proc.port
        v1 = wsraw.connect(port)
        plain = wsraw.connect(port, subprotocol=None)  # gets every "broadcast" message bare
        watcher = wsraw.connect(port)
        assert answer(watcher, '{"type":"subscribe","topic":"broadcast","id":0}')["type"] == "ack"
        for number in NOT_FINITE + NOT_JSON:
            frames = [publish_frame(number, 1), publish_frame("[1, {\"x\": %s}]" % number, 2),
                      '{"type":"ping","id":%s}' % number, '{"type":"ping","id":[%s]}' % number,
                      '{"type":"subscribe","topic":"t","id":3,"extra":%s}' % number]
            for text in frames:
                reply = answer(v1, text)
                assert (reply["type"], reply["code"]) == ("error", "bad_json"), (text[:60], reply)
            reply = answer(plain, '{"reading":%s}' % number)  # the seed's form
            assert (reply["type"], reply["code"]) == ("error", "bad_json"), (number[:20], reply)
            for body in ('{"topic":"broadcast","data":%s}' % number,
                         '{"topic":"broadcast","data":{"v":[%s]}}' % number):
                status, answer_body = post(port, body)
                assert (status, answer_body["error"]) == (400, "bad_json"), body[:60]
        # the finite edge is served, and what is sent is exactly what a strict parser reads back
        seqs = []
        for number in FINITE_EDGE:
            ack = answer(v1, publish_frame(number, 4))
            assert ack["type"] == "ack", (number, ack)
            seqs.append(ack["seq"])
        status, body = post(port, '{"topic":"broadcast","data":[1e308]}')
        assert status == 200
        seqs.append(body["seq"])
        expected = [json.loads(n) for n in FINITE_EDGE] + [[1e308]]
        assert [wsraw.strict_loads(watcher.recv_text())["data"] for _ in expected] == expected
        assert [wsraw.strict_loads(plain.recv_text()) for _ in expected] == expected
        status, rows = get(port, "/history?topic=broadcast&limit=1000")
        assert status == 200 and [r["seq"] for r in rows] == seqs
        assert [r["data"] for r in rows] == expected
        alive(proc, v1, plain, watcher)
        for c in (v1, plain, watcher):
            c.close()
        assert proc.terminate() == 0


def test_non_finite_numbers_stored_by_an_older_version_are_sent_as_null(tmp_path):
    """Versions before 1.1 stored ``1e400`` as ``Infinity``: history and replay of such a
    store send null there (as JSON.stringify does), never the invalid word."""
    store = str(tmp_path / "h.db")
    with ServerProcess("--store", store, env=_env()) as proc:
        v1 = wsraw.connect(proc.port)
        for i, data in enumerate(('"x"', '"NaN and Infinity in a string"', "[1]", "{\"v\":2}")):
            assert answer(v1, publish_frame(data, i, "old"))["seq"] == i + 1
        v1.close()
        assert proc.terminate() == 0
    with sqlite3.connect(store) as db:  # what an older version wrote for 1e400, -1e400 and NaN
        # each publish was its own commit: a run of one, whose data is the message's text
        db.execute("UPDATE runs SET data = 'Infinity' WHERE last_seq = 1 AND lens IS NULL")
        db.execute("UPDATE runs SET data = '[-Infinity, NaN, 1.5]' WHERE last_seq = 3 AND lens IS NULL")
        db.execute("UPDATE runs SET data = '{\"v\": [Infinity, \"Infinity\"]}'"
                   " WHERE last_seq = 4 AND lens IS NULL")
    db.close()
    expected = [None, "NaN and Infinity in a string", [None, None, 1.5], {"v": [None, "Infinity"]}]
    with ServerProcess("--store", store, env=_env()) as proc:
        status, rows = get(proc.port, "/history?topic=old")
        assert status == 200 and [r["data"] for r in rows] == expected
        v1 = wsraw.connect(proc.port)
        assert answer(v1, '{"type":"subscribe","topic":"old","since":0,"id":1}')["type"] == "ack"
        assert [wsraw.strict_loads(v1.recv_text())["data"] for _ in expected] == expected
        v1.close()
        assert proc.terminate() == 0


def test_non_finite_numbers_from_an_older_node_through_redis_are_sent_as_null(tmp_path):
    """A node of an older version sharing the Redis broker may publish ``Infinity``: the
    live delivery and the history read back from the stream carry null there."""
    import redis

    from redis_server import RedisServer

    with RedisServer(str(tmp_path / "redis")) as rs, \
            ServerProcess("--redis", rs.url, env=_env()) as proc:
        v1 = wsraw.connect(proc.port)
        assert answer(v1, '{"type":"subscribe","topic":"old","id":1}')["type"] == "ack"
        assert answer(v1, publish_frame("1", 2, "old"))["type"] == "ack"
        assert wsraw.strict_loads(v1.recv_text())["data"] == 1
        # what an older node does for a publish of [1e400, NaN] (the keys of broker_redis.py)
        r = redis.Redis.from_url(rs.url)
        epoch = r.hget("wsb:topic:old", "epoch").decode()
        seq = r.hincrby("wsb:topic:old", "seq", 1)
        data = "[Infinity,NaN]"
        r.xadd("wsb:stream:old", {"data": data, "time": 0}, id="%d-0" % seq)
        r.publish("wsb:ch:old", "%d|%s|%s" % (seq, epoch, data))
        r.close()
        got = wsraw.strict_loads(v1.recv_text())
        assert (got["seq"], got["data"]) == (seq, [None, None])
        status, rows = get(proc.port, "/history?topic=old")
        assert status == 200 and [r["data"] for r in rows] == [1, [None, None]]
        v1.close()
        assert proc.terminate() == 0


def test_python_client_writes_and_reads_only_strict_json():
    """The client refuses to send NaN or Infinity (the server would answer bad_json) and
    reads a delivery whose data is nested as deep as the contract allows."""
    from wsbroadcast import Client

    with ServerProcess("--store", "memory", env=_env()) as proc:
        client = Client.connect("ws://127.0.0.1:%d/ws" % proc.port)
        try:
            client.subscribe("t")
            for bad in (float("inf"), float("-inf"), float("nan"), {"v": [float("inf")]}):
                with pytest.raises(ValueError):
                    client.publish("t", bad)
            deepest = json.loads(nested(MAX_DEPTH - 1, "1"))  # 64 levels in the publish frame
            seq, _ = client.publish("t", deepest)
            got = client.recv(timeout=10)
            assert got is not None and (got.seq, got.data) == (seq, deepest)
            assert client.ping() >= 0
        finally:
            client.close()
        assert proc.terminate() == 0
