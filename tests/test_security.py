"""Acceptance tests of PROTOCOL.md section 8 (origins, tokens, claims, keys) and of the
security limits (TLS, handshake timeout, rate and connection limits, log hygiene),
each against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence, Tuple
from urllib.parse import quote

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import certs
import logcapture
import tokens
import wsraw
from httputil import publish_raw as publish_http
from httputil import request
from serverproc import ServerProcess
from tokens import OTHER_SECRET, SECRET, b64, expired_token, hs256_with_key, token, unsigned_token

from wsbroadcast import Client

pytestmark = pytest.mark.timeout(30)

SCALE = float(os.environ.get("WSBROADCAST_TEST_TIMEOUT_SCALE", "1"))
API_KEY = "api-key-for-tests-0123456789"
V1 = "wsbroadcast.v1"


# --------------------------------------------------------------------------- helpers


def handshake(port: int, query_token: Optional[str] = None, bearer: Optional[str] = None,
              subprotocol: Optional[str] = V1, origin: Optional[str] = None,
              headers: Sequence[Tuple[str, str]] = ()):
    """Send an upgrade request; return (status, headers, RawWS) on 101, else (status, headers, body)."""
    path = "/ws" if query_token is None else "/ws?token=" + quote(query_token, safe="")
    extra = list(headers)
    if bearer is not None:
        extra.append(("Authorization", "Bearer " + bearer))
    if origin is not None:
        extra.append(("Origin", origin))
    return wsraw.handshake(port, path, subprotocol, extra)


def ws(port: int, **kwargs) -> wsraw.RawWS:
    """An upgraded connection (fails the test unless answered 101)."""
    status, _, conn = handshake(port, **kwargs)
    assert status == 101, "expected 101, got %d: %r" % (status, conn)
    return conn


def assert_error_answer(answer, status: int, code: str, secret_texts: Sequence[str] = ()) -> dict:
    got, headers, body = answer
    assert got == status, "expected %d %s, got %d %r" % (status, code, got, body)
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["error"] == code and isinstance(doc["message"], str) and doc["message"]
    if status == 401:
        assert headers.get("www-authenticate", "").startswith("Bearer")
    for text in secret_texts:
        assert text not in body.decode("latin-1")
        assert text not in json.dumps(dict(headers))
    return doc


def bearer(tok: str) -> List[Tuple[str, str]]:
    return [("Authorization", "Bearer " + tok)]


def roundtrip(c: wsraw.RawWS, frame: dict) -> dict:
    """Send a frame with an id and return the next frame (which must answer it)."""
    c.send_json(frame)
    reply = c.recv_json()
    assert reply.get("id") == frame["id"], "expected the answer to %r, got %r" % (frame, reply)
    return reply


assert_nothing_pending = wsraw.expect_pong_next


def close_all(*conns: wsraw.RawWS) -> None:
    for c in conns:
        try:
            c.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def rsa_pair():
    return tokens.rsa_pair()


@pytest.fixture(scope="module")
def other_rsa_pair():
    return tokens.rsa_pair(1)


@pytest.fixture(scope="module")
def ec_pair():
    return tokens.ec_pair()


# ------------------------------------------------------------------ tokens at the handshake


def _bad_hs_tokens(valid: str):
    head, payload, sig = valid.split(".")
    return {
        "expired": expired_token(),
        "wrong signature": token(key=OTHER_SECRET, subscribe=[">"], publish=[">"]),
        "tampered payload": head + "." + b64(json.dumps(
            {"sub": "mallory", "subscribe": [">"], "publish": [">"]}).encode()) + "." + sig,
        "alg none": unsigned_token("none"),
        "alg None": unsigned_token("None"),
        "malformed": "not-a-jwt",
        "three garbage parts": "abc.def.ghi",
        "truncated": valid[:-6],
        "two parts": head + "." + payload,
    }


@pytest.mark.parametrize("how", ["query", "header"])
def test_only_a_valid_token_upgrades(make_server, how):
    srv = make_server(secret=SECRET)
    valid = token(subscribe=["news.*"], publish=["news.*"])

    def attempt(tok):
        return handshake(srv.port, query_token=tok) if how == "query" else handshake(srv.port, bearer=tok)

    for name, bad in _bad_hs_tokens(valid).items():
        answer = attempt(bad)
        assert answer[0] == 401, "%s token: %r" % (name, answer[:2])
        assert_error_answer(answer, 401, "unauthorized", [bad])
    # no token at all
    assert_error_answer(handshake(srv.port), 401, "unauthorized")
    assert len(srv.hub) == 0  # no WebSocket was ever opened

    status, headers, conn = attempt(valid)
    assert status == 101 and conn.subprotocol == V1
    assert roundtrip(conn, {"type": "subscribe", "topic": "news.eu", "id": 1})["type"] == "ack"
    conn.close()


def test_empty_bearer_header_is_refused(make_server):
    srv = make_server(secret=SECRET)
    status, headers, body = handshake(srv.port, bearer="")
    assert_error_answer((status, headers, body), 401, "unauthorized")


def test_header_token_wins_over_query_token(make_server):
    srv = make_server(secret=SECRET)
    good = token(subscribe=["a"], publish=["a"])
    bad = token(key=OTHER_SECRET, subscribe=[">"], publish=[">"])
    # a bad header token is not rescued by a good query token
    assert_error_answer(handshake(srv.port, query_token=good, bearer=bad), 401, "unauthorized", [bad, good])
    # a good header token wins over a bad query token, and its claims are the ones used
    narrow = token(subscribe=["only.this"])
    wide = token(subscribe=[">"])
    c = ws(srv.port, query_token=wide, bearer=narrow)
    assert roundtrip(c, {"type": "subscribe", "topic": "only.this", "id": 1})["type"] == "ack"
    err = roundtrip(c, {"type": "subscribe", "topic": "other", "id": 2})
    assert err["type"] == "error" and err["code"] == "forbidden"
    c.close()


@pytest.mark.parametrize("as_text", [False, True])
def test_rs256_with_public_key(make_server, rsa_pair, other_rsa_pair, as_text):
    private, public = rsa_pair
    srv = make_server(public_key=public.decode("ascii") if as_text else public)
    valid = token(key=private, algorithm="RS256", subscribe=["news.*"])
    bad = {
        "other key": token(key=other_rsa_pair[0], algorithm="RS256", subscribe=[">"]),
        "expired": expired_token(private, "RS256"),
        "alg none": unsigned_token("none"),
        "HS256 signed with the public key": hs256_with_key(public),
        "HS256 with a secret": token(key=SECRET, subscribe=[">"]),
        "malformed": "x.y.z",
    }
    for name, tok in bad.items():
        for answer in (handshake(srv.port, query_token=tok), handshake(srv.port, bearer=tok)):
            assert answer[0] == 401, "%s: %r" % (name, answer[:2])
            assert_error_answer(answer, 401, "unauthorized", [tok])
    for kwargs in ({"query_token": valid}, {"bearer": valid}):
        c = ws(srv.port, **kwargs)
        assert roundtrip(c, {"type": "subscribe", "topic": "news.eu", "id": 1})["type"] == "ack"
        assert roundtrip(c, {"type": "subscribe", "topic": "sport.x", "id": 2})["code"] == "forbidden"
        c.close()


def test_es256_with_public_key(make_server, ec_pair, rsa_pair):
    private, public = ec_pair
    srv = make_server(public_key=public.decode("ascii"))
    valid = token(key=private, algorithm="ES256", subscribe=["a.*"])
    for tok in (token(key=rsa_pair[0], algorithm="RS256", subscribe=[">"]),
                token(key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", subscribe=[">"]),
                expired_token(private, "ES256"), unsigned_token(), hs256_with_key(public)):
        assert_error_answer(handshake(srv.port, bearer=tok), 401, "unauthorized", [tok])
    c = ws(srv.port, bearer=valid)
    assert roundtrip(c, {"type": "subscribe", "topic": "a.b", "id": 1})["type"] == "ack"
    c.close()


# ------------------------------------------------------------------ claims on the socket


def test_claims_decide_subscribe_and_publish(make_server):
    srv = make_server(secret=SECRET, api_key=API_KEY)
    ann = ws(srv.port, query_token=token(subscribe=["news.*"], publish=["news.*"]))
    watcher = ws(srv.port, bearer=token(sub="watcher", subscribe=[">"]))
    assert roundtrip(watcher, {"type": "subscribe", "topic": ">", "id": 1})["type"] == "ack"

    assert roundtrip(ann, {"type": "subscribe", "topic": "news.eu", "id": 1})["type"] == "ack"
    for i, pattern in enumerate(["sport.x", "news.>", "news.eu.x", "news", ">", "*.eu"], start=2):
        err = roundtrip(ann, {"type": "subscribe", "topic": pattern, "id": i})
        assert err["type"] == "error" and err["code"] == "forbidden", (pattern, err)
    assert roundtrip(ann, {"type": "subscribe", "topic": "news.*", "id": 10}) == {
        "type": "ack", "id": 10, "topic": "news.*"}

    for i, topic in enumerate(["sport.x", "news.eu.x", "news"], start=20):
        err = roundtrip(ann, {"type": "publish", "topic": topic, "data": {"n": i}, "id": i})
        assert err["type"] == "error" and err["code"] == "forbidden", (topic, err)
    # without an id the refusal is still answered
    ann.send_json({"type": "publish", "topic": "sport.x", "data": "no id"})
    err = ann.recv_json()
    assert err["type"] == "error" and err["code"] == "forbidden" and "id" not in err

    # nothing was delivered (the pong comes first) and nothing was stored
    assert_nothing_pending(watcher)
    assert_nothing_pending(ann)
    for topic in ("sport.x", "news.eu.x", "news"):
        assert srv.hub.history(topic, 0, 100) == []
        status, _, body = request(srv.port, "GET", "/history?topic=" + topic, headers=[("X-API-Key", API_KEY)])
        assert status == 200 and json.loads(body) == []

    # the allowed publish goes through, to both
    ack = roundtrip(ann, {"type": "publish", "topic": "news.eu", "data": "ok", "id": 30})
    assert ack["type"] == "ack" and ack["seq"] == 1
    assert watcher.recv_json() == {"type": "message", "topic": "news.eu", "seq": 1, "data": "ok"}
    assert ann.recv_json() == {"type": "message", "topic": "news.eu", "seq": 1, "data": "ok"}
    status, _, body = request(srv.port, "GET", "/history?topic=news.eu", headers=[("X-API-Key", API_KEY)])
    assert status == 200 and json.loads(body) == [{"topic": "news.eu", "seq": 1, "data": "ok"}]
    close_all(ann, watcher)


def test_missing_claims_allow_nothing(make_server):
    srv = make_server(secret=SECRET)
    c = ws(srv.port, bearer=token(subscribe=(), publish=()))
    assert roundtrip(c, {"type": "subscribe", "topic": "a", "id": 1})["code"] == "forbidden"
    assert roundtrip(c, {"type": "publish", "topic": "a", "data": 1, "id": 2})["code"] == "forbidden"
    c.close()


def test_plain_client_with_broadcast_claims(make_server):
    srv = make_server(secret=SECRET)
    plain = ws(srv.port, subprotocol=None, query_token=token(subscribe=["broadcast"], publish=["broadcast"]))
    assert plain.subprotocol is None
    watcher = ws(srv.port, bearer=token(subscribe=["broadcast"]))
    assert roundtrip(watcher, {"type": "subscribe", "topic": "broadcast", "id": 1})["type"] == "ack"
    assert_nothing_pending(plain, 1)  # also: its automatic subscription is in place
    srv.publish("broadcast", {"from": "server"})
    assert plain.recv_json() == {"from": "server"}
    assert watcher.recv_json()["data"] == {"from": "server"}
    plain.send_json({"hello": "world"})  # the seed's form
    assert plain.recv_json() == {"hello": "world"}
    assert watcher.recv_json() == {"type": "message", "topic": "broadcast", "seq": 2, "data": {"hello": "world"}}
    close_all(plain, watcher)


def test_plain_client_without_broadcast_claims(make_server):
    srv = make_server(secret=SECRET)
    plain = ws(srv.port, subprotocol=None, bearer=token(subscribe=["news.*"], publish=["news.*"]))
    watcher = ws(srv.port, bearer=token(subscribe=["broadcast"]))
    assert roundtrip(watcher, {"type": "subscribe", "topic": "broadcast", "id": 1})["type"] == "ack"
    assert_nothing_pending(plain, 1)  # the connection is open; on_open has run
    srv.publish("broadcast", {"from": "server"})
    assert watcher.recv_json()["data"] == {"from": "server"}
    assert_nothing_pending(plain, 2)  # it was not subscribed to broadcast
    plain.send_json({"hello": "world"})
    err = plain.recv_json()
    assert err["type"] == "error" and err["code"] == "forbidden"
    assert_nothing_pending(watcher, 3)
    assert [m.data for m in srv.hub.history("broadcast", 0, 100)] == ['{"from":"server"}']
    # it may still use what its claims allow
    assert roundtrip(plain, {"type": "subscribe", "topic": "news.eu", "id": 4})["type"] == "ack"
    close_all(plain, watcher)


# ------------------------------------------------------------------ HTTP publish and history


def test_http_publish_and_history_with_tokens_and_key(make_server):
    srv = make_server(secret=SECRET, api_key=API_KEY)
    port = srv.port
    writer = token(subscribe=["news.*"], publish=["news.*"])
    reader = token(subscribe=["news.eu"])
    status, _, body = publish_http(port, "news.eu", {"n": 1}, bearer(writer))
    assert status == 200 and json.loads(body)["seq"] == 1
    assert_error_answer(publish_http(port, "sport.x", 1, bearer(writer)), 403, "forbidden", [writer])
    assert_error_answer(publish_http(port, "news.eu", 1, bearer(reader)), 403, "forbidden", [reader])
    assert_error_answer(publish_http(port, "news.eu", 1), 401, "unauthorized")
    for bad in (expired_token(), token(key=OTHER_SECRET, publish=[">"]), unsigned_token()):
        assert_error_answer(publish_http(port, "news.eu", 1, bearer(bad)), 401, "unauthorized", [bad])
    status, _, body = publish_http(port, "any.topic.at_all", {"n": 2}, [("X-API-Key", API_KEY)])
    assert status == 200 and json.loads(body)["seq"] == 1
    assert_error_answer(publish_http(port, "news.eu", 1, [("X-API-Key", API_KEY + "x")]),
                        401, "unauthorized", [API_KEY])
    # only the accepted publishes are stored
    assert [m.data for m in srv.hub.history("news.eu", 0, 10)] == ['{"n":1}']
    assert srv.hub.history("sport.x", 0, 10) == []

    status, _, body = request(port, "GET", "/history?topic=news.eu", headers=bearer(reader))
    assert status == 200 and json.loads(body) == [{"topic": "news.eu", "seq": 1, "data": {"n": 1}}]
    status, _, body = request(port, "GET", "/history?topic=news.eu&token=" + quote(reader))
    assert status == 200 and len(json.loads(body)) == 1
    assert_error_answer(request(port, "GET", "/history?topic=news.fr", headers=bearer(reader)),
                        403, "forbidden", [reader])
    assert_error_answer(request(port, "GET", "/history?topic=news.eu"), 401, "unauthorized")
    assert_error_answer(request(port, "GET", "/history?topic=news.eu", headers=[("X-API-Key", "nope")]),
                        401, "unauthorized")
    status, _, body = request(port, "GET", "/history?topic=any.topic.at_all", headers=[("X-API-Key", API_KEY)])
    assert status == 200 and json.loads(body)[0]["data"] == {"n": 2}


def test_only_an_api_key(make_server):
    srv = make_server(api_key=API_KEY)
    port = srv.port
    # WebSocket stays open to all
    c = ws(port)
    assert roundtrip(c, {"type": "subscribe", "topic": "x.y", "id": 1})["type"] == "ack"
    assert roundtrip(c, {"type": "publish", "topic": "x.y", "data": 1, "id": 2})["type"] == "ack"
    plain = ws(port, subprotocol=None)
    assert_nothing_pending(plain)
    close_all(c, plain)
    # the two HTTP endpoints need the key
    assert_error_answer(publish_http(port, "x.y", 2), 401, "unauthorized")
    assert_error_answer(publish_http(port, "x.y", 2, [("X-API-Key", "wrong")]), 401, "unauthorized")
    some_token = token(publish=[">"], subscribe=[">"])
    assert_error_answer(publish_http(port, "x.y", 2, bearer(some_token)), 401, "unauthorized", [some_token])
    status, _, body = publish_http(port, "x.y", 3, [("X-API-Key", API_KEY)])
    assert status == 200 and json.loads(body)["seq"] == 2
    assert_error_answer(request(port, "GET", "/history?topic=x.y"), 401, "unauthorized")
    status, _, body = request(port, "GET", "/history?topic=x.y", headers=[("x-api-key", API_KEY)])
    assert status == 200 and [m["data"] for m in json.loads(body)] == [1, 3]


# ------------------------------------------------------------------ origins


def test_origin_checks_default(make_server):
    srv = make_server()
    port = srv.port
    own = "http://127.0.0.1:%d" % port
    for origin in ("http://evil.example", "null", "https://127.0.0.1:%d" % port,
                   "http://127.0.0.1:%d.evil.example" % port, "http://127.0.0.1:%d" % (port + 1),
                   "http://127.0.0.1"):
        assert_error_answer(handshake(port, origin=origin), 403, "forbidden_origin")
    assert len(srv.hub) == 0
    for origin in (own, own + "/", own.upper()):
        c = ws(port, origin=origin)
        assert_nothing_pending(c)
        c.close()
    c = ws(port)  # no Origin: not a browser
    assert_nothing_pending(c)
    c.close()


def test_origin_checked_before_a_valid_token(make_server):
    srv = make_server(secret=SECRET)
    tok = token(subscribe=[">"])
    assert_error_answer(handshake(srv.port, origin="http://evil.example", bearer=tok), 403, "forbidden_origin")
    c = ws(srv.port, origin="http://127.0.0.1:%d" % srv.port, bearer=tok)
    c.close()


def test_allowed_origins(make_server):
    srv = make_server(allowed_origins=("http://evil.example",))
    c = ws(srv.port, origin="http://evil.example")
    c.close()
    c = ws(srv.port, origin="http://127.0.0.1:%d" % srv.port)  # its own is still fine
    c.close()
    for origin in ("null", "http://other.example", "https://evil.example"):
        assert_error_answer(handshake(srv.port, origin=origin), 403, "forbidden_origin")
    anyone = make_server(allowed_origins=("*",))
    for origin in ("http://evil.example", "https://whatever.example:8443"):
        c = ws(anyone.port, origin=origin)
        c.close()


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return certs.make_cert(str(tmp_path_factory.mktemp("tls")))


def _partial_client_hello(ctx: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 40
    return hello[: len(hello) // 2]


def _server_closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_tls_websocket_and_https(make_server, cert):
    certfile, keyfile = cert
    srv = make_server(certfile=certfile, keyfile=keyfile, secret=SECRET)
    assert srv.url.startswith("wss://")
    ctx = certs.client_context(certfile)
    with urllib.request.urlopen(srv.http_url + "/healthz", context=ctx, timeout=5) as answer:
        assert answer.status == 200 and json.loads(answer.read())["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(srv.http_url + "/history?topic=t.x", context=ctx, timeout=5)
    assert info.value.code == 401
    # the server's own origin is https:// here
    tok = token(subscribe=[">"])
    for origin, status in (("https://127.0.0.1:%d" % srv.port, 101), ("http://127.0.0.1:%d" % srv.port, 403)):
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=5),
                               server_hostname="127.0.0.1")
        try:
            sock.sendall(wsraw.upgrade_request(srv.port, subprotocol=None,
                                               headers=[("Origin", origin), ("Authorization", "Bearer " + tok)]))
            assert wsraw.read_response(sock)[0] == status, origin
        finally:
            sock.close()
    c = Client(srv.url, token=token(subscribe=["t.*"], publish=["t.*"]), ssl_context=ctx,
               reconnect=False, timeout=5).open()
    try:
        ack = c.subscribe("t.x")
        srv.publish("t.x", {"n": 1})
        msg = c.recv(timeout=5)
        assert msg is not None and (msg.topic, msg.seq, msg.data) == ("t.x", 1, {"n": 1})
        assert c.publish("t.x", {"n": 2}) == (2, ack["epoch"])
        msg = c.recv(timeout=5)
        assert msg is not None and msg.data == {"n": 2}
    finally:
        c.close()


def test_tls_records_that_arrive_together_are_read_as_one_batch(make_server, cert, monkeypatch):
    certfile, keyfile = cert
    srv = make_server(certfile=certfile, keyfile=keyfile)
    batches: List[int] = []
    handle = srv.hub.handle

    def counting(conn, commands):  # the real hub, counting the commands of each batch it is given
        batches.append(len(commands))
        return handle(conn, commands)

    monkeypatch.setattr(srv.hub, "handle", counting)
    c = wsraw.connect(srv.port, ssl_context=certs.client_context(certfile))
    try:
        wsraw.expect_pong_next(c)
        batches.clear()
        # ten publishes in ten TLS records, corked so that they reach the server in one segment
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for i in range(10):
            c.send_json({"type": "publish", "topic": "t", "data": i, "id": i})
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        assert [c.recv_json()["id"] for _ in range(10)] == list(range(10))
        assert sum(batches) == 10 and max(batches) > 1, batches  # not one batch per record
    finally:
        c.close()


def test_tls_granted_channels_greeting_comes_first(make_server, cert):
    # the 101 answer of a token with channels is sent by the writer (encrypted there, like the frames)
    certfile, keyfile = cert
    srv = make_server(certfile=certfile, keyfile=keyfile, secret=SECRET)
    tok = tokens.mint_token(SECRET, sub="g", subscribe=[], extra={"channels": ["room"]})
    c = wsraw.connect(srv.port, headers=[("Authorization", "Bearer " + tok)],
                      ssl_context=certs.client_context(certfile))
    try:
        granted = c.recv_json()
        assert (granted["type"], granted["topic"]) == ("subscribed", "room"), granted
        srv.publish("room", {"n": 1})
        msg = c.recv_json()
        assert (msg["type"], msg["topic"], msg["data"]) == ("message", "room", {"n": 1}), msg
    finally:
        c.close()


def test_tls_stalled_handshakes_hold_no_thread_and_block_no_one(make_server, cert):
    certfile, keyfile = cert
    timeout = 6.0 * SCALE  # room for the other client's work on a loaded machine
    srv = make_server(certfile=certfile, keyfile=keyfile, handshake_timeout=timeout)
    ctx = certs.client_context(certfile)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    partial = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    started = time.monotonic()
    try:
        partial.sendall(_partial_client_hello(ctx))
        assert wsraw.wait_for(lambda: srv.thread_count() == 2, timeout=5)
        # meanwhile another client connects, subscribes, receives, and HTTPS answers
        c = Client(srv.url, ssl_context=ctx, reconnect=False, timeout=5).open()
        try:
            c.subscribe("x")
            srv.publish("x", "hello")
            msg = c.recv(timeout=5)
            assert msg is not None and msg.data == "hello"
        finally:
            c.close()
        with urllib.request.urlopen(srv.http_url + "/healthz", context=ctx, timeout=5) as answer:
            assert answer.status == 200
        assert time.monotonic() - started < timeout, "the other client was delayed"
        assert not _server_closed(silent) and not _server_closed(partial)
        # both stalled connections are dropped once the handshake timeout is over
        assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=timeout + 3 * SCALE)
        assert time.monotonic() - started >= timeout * 0.9
        assert wsraw.wait_for(lambda: _server_closed(silent) and _server_closed(partial), timeout=2)
    finally:
        close_all(silent, partial)


def test_plain_stalled_handshake_holds_no_thread(make_server):
    timeout = 2.0 * SCALE  # (the test's own client must get through within it on a loaded machine)
    srv = make_server(handshake_timeout=timeout)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    half = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        half.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert wsraw.wait_for(lambda: srv.thread_count() == 2, timeout=5)
        c = ws(srv.port)
        assert_nothing_pending(c)
        c.close()
        assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=timeout + 3 * SCALE)
    finally:
        close_all(silent, half)


def test_plain_trickled_request_is_cut_at_the_handshake_timeout(make_server):
    timeout = 1.0 * SCALE
    srv = make_server(handshake_timeout=timeout)
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        request_bytes = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 200 + b"\r\n"
        _trickle(srv, raw, request_bytes, timeout)
    finally:
        raw.close()


def _trickle(srv, raw, data, timeout):
    """Send ``data`` a byte every 0.2 s; the server must free the thread by the handshake timeout."""
    started = time.monotonic()
    limit = started + timeout + 2.0 * SCALE
    for i in range(len(data)):
        if srv.thread_count() == 0 or time.monotonic() > limit:
            break
        try:
            raw.sendall(data[i:i + 1])
        except OSError:
            break
        time.sleep(0.2)  # pacing the attack, not synchronisation
    assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=max(0.0, limit - time.monotonic()) + 0.5), \
        "thread still held %.1fs after the connection began" % (time.monotonic() - started)


def test_tls_trickled_request_is_cut_at_the_handshake_timeout(make_server, cert):
    certfile, keyfile = cert
    timeout = 2.0 * SCALE  # (the TLS handshake before the trickle is within it, on a loaded machine)
    srv = make_server(certfile=certfile, keyfile=keyfile, handshake_timeout=timeout)
    ctx = certs.client_context(certfile)
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        while True:  # a complete TLS handshake, then a request trickled a byte at a time
            try:
                obj.do_handshake()
                raw.sendall(outgoing.read())
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        obj.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"p" * 200 + b"\r\n")
        record = outgoing.read()
        _trickle(srv, raw, record, timeout)
    finally:
        raw.close()


# ------------------------------------------------------------------ rate and connection limits


def test_publish_flood_is_rate_limited_per_connection(make_server):
    srv = make_server(max_publish_rate=0.001, publish_burst=5)  # no refill within any test run
    flooder = ws(srv.port)
    other = ws(srv.port)
    n = 40
    for i in range(1, n + 1):
        flooder.send_json({"type": "publish", "topic": "flood", "data": i, "id": i})
    replies = [flooder.recv_json() for _ in range(n)]
    acks = [r for r in replies if r["type"] == "ack"]
    limited = [r for r in replies if r["type"] == "error"]
    assert all(r["code"] == "rate_limited" for r in limited)
    assert len(acks) + len(limited) == n
    assert sorted(r["id"] for r in acks) == list(range(1, 6)) and len(limited) == n - 5
    # the other connection has its own budget
    for i in range(1, 6):
        assert roundtrip(other, {"type": "publish", "topic": "calm", "data": i, "id": i})["type"] == "ack"
    # refused publishes were not stored
    assert len(srv.hub.history("flood", 0, 1000)) == len(acks)
    close_all(flooder, other)


def test_max_connections_per_ip(make_server):
    srv = make_server(max_connections_per_ip=2)
    first, second = ws(srv.port), ws(srv.port)
    assert_nothing_pending(first)
    assert_nothing_pending(second)
    extra = ws(srv.port)
    code, _reason = extra.expect_close()
    assert code == 1013
    assert extra.at_eof()
    extra.close()
    assert_nothing_pending(first)  # the others are unaffected
    first.send_frame(0x8, b"\x03\xe8")
    assert first.expect_close()[0] == 1000
    first.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 1, timeout=5 * SCALE)
    again = ws(srv.port)
    assert_nothing_pending(again)
    close_all(second, again)


def test_upgrades_reset_mid_handshake_do_not_use_up_the_per_ip_limit(make_server):
    srv = make_server(max_connections_per_ip=1)
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(wsraw.upgrade_request(srv.port, subprotocol=None))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset, often before the 101 is written
    # all 20 accepted (each one's thread registered before it counts) and every thread gone
    assert wsraw.wait_for(lambda: srv.accepted == 20 and srv.thread_count() == 0, timeout=10 * SCALE), \
        (srv.accepted, srv.thread_count())
    c = ws(srv.port)
    assert_nothing_pending(c)
    c.close()


# ------------------------------------------------------------------ expiry


def test_token_expiring_during_the_connection_closes_1008(make_server):
    srv = make_server(secret=SECRET)
    exp = time.time() + 3.0 * SCALE  # room for two handshakes and a subscribe on a loaded machine
    short = jwt.encode({"sub": "ann", "exp": exp, "subscribe": ["a"], "publish": ["a"]}, SECRET,
                       algorithm="HS256")
    lasting = ws(srv.port, bearer=token(subscribe=["a"], lifetime=None))
    c = ws(srv.port, query_token=short)
    assert roundtrip(c, {"type": "subscribe", "topic": "a", "id": 1})["type"] == "ack"
    code, reason = c.expect_close(timeout=exp - time.time() + 5 * SCALE)
    closed_at = time.time()
    assert code == 1008 and reason
    assert closed_at >= exp, "closed %.3fs before expiry" % (exp - closed_at)
    # the writer's clock ticks every 0.5 s at most; the rest is room for a loaded machine
    assert closed_at <= exp + 0.5 + 2.0 * SCALE, "closed %.3fs after expiry" % (closed_at - exp)
    assert c.at_eof()
    c.close()
    assert_nothing_pending(lasting)  # a token without exp is not affected
    assert_error_answer(handshake(srv.port, query_token=short), 401, "unauthorized", [short])
    lasting.close()


# ------------------------------------------------------------------ tokens never logged


def _leaky_traffic(port: int, tokens: Sequence[str], wait_logged) -> None:
    """Connections that carry ``tokens`` in every place a request can."""
    valid, invalid = tokens[0], tokens[1]
    c = ws(port, query_token=valid)
    assert_nothing_pending(c)
    c.send_frame(0x8, b"\x03\xe8")
    c.expect_close()
    c.close()
    c = ws(port, bearer=valid, subprotocol=None)
    assert_nothing_pending(c)
    c.close()
    for tok in tokens[1:]:
        assert handshake(port, query_token=tok)[0] == 401
        assert handshake(port, bearer=tok)[0] == 401
    # bad handshakes: no key, a malformed header line, a bad version
    bad = ("GET /ws?token=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nAuthorization: Bearer %s\r\n\r\n" % (valid, valid)).encode()
    assert wsraw.http_request(port, bad)[0] == 400
    bad = ("GET /ws?token=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nthis is no header\r\n\r\n" % valid).encode()
    assert wsraw.http_request(port, bad)[0] == 400
    assert handshake(port, query_token=valid, headers=[("Sec-WebSocket-Version", "8")])[0] in (400, 426)
    assert publish_http(port, "a", 1, bearer(valid) + [("X-API-Key", invalid)])[0] == 401
    assert publish_http(port, "a", 1, [("X-API-Key", API_KEY)])[0] == 200
    # a request cut off mid-headers, token included: the handshake timeout is logged
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        half.sendall(("GET /ws?token=%s HTTP/1.1\r\nAuthorization: Bearer %s\r\n" % (valid, invalid)).encode())
        assert wait_logged("handshake timeout"), "the handshake timeout was not logged"
    finally:
        half.close()
    # a reset in the middle of the upgrade
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(wsraw.upgrade_request(port, "/ws?token=" + valid, subprotocol=None))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _secrets_of(tokens: Sequence[str]) -> List[str]:
    out = [SECRET, API_KEY]
    for tok in tokens:
        out.append(tok)
        out.extend(part for part in tok.split(".")[1:] if len(part) > 8)  # payload, signature
    return out


def test_tokens_never_logged_in_process(make_server):
    with logcapture.capture(also=["wsbroadcast"]) as handler:
        srv = make_server(secret=SECRET, api_key=API_KEY, handshake_timeout=0.5 * SCALE)
        toks = [token(subscribe=[">"], publish=[">"]), token(key=OTHER_SECRET, subscribe=[">"]),
                expired_token(), unsigned_token()]
        _leaky_traffic(srv.port, toks,
                       lambda text: wsraw.wait_for(lambda: any(text in t for t in handler.texts), 5 * SCALE))
        srv.shutdown()
    assert any("listening on" in t for t in handler.texts)
    for text in handler.texts:
        for secret in _secrets_of(toks):
            assert secret not in text, "a secret in the log: %r" % text


@pytest.mark.timeout(60)
def test_tokens_never_logged_by_the_cli_at_debug_level():
    tokens = [token(subscribe=[">"], publish=[">"]), token(key=OTHER_SECRET, subscribe=[">"]),
              expired_token(), unsigned_token()]
    with ServerProcess("--store", "memory", "--log-level", "debug", "--secret", SECRET,
                       "--api-key", API_KEY, "--handshake-timeout", str(0.5 * SCALE)) as proc:
        _leaky_traffic(proc.port, tokens,
                       lambda text: wsraw.wait_for(lambda: any(text in t for t in proc.lines), 5 * SCALE))
        assert proc.terminate() == 0
    assert any("DEBUG" in line for line in proc.lines)
    for line in proc.lines:
        for secret in _secrets_of(tokens):
            assert secret not in line, "a secret in the log: %r" % line


def test_nothing_is_carried_out_after_expiry_even_before_the_close(make_server):
    # a long clock tick, so that the close cannot come from the writer's timer first
    srv = make_server(secret=SECRET, ping_interval=60.0, close_timeout=8.0)
    exp = time.time() + 3.0 * SCALE  # room for the handshake and a subscribe on a loaded machine
    short = jwt.encode({"sub": "ann", "exp": exp, "subscribe": ["a"], "publish": ["a"]}, SECRET,
                       algorithm="HS256")
    c = ws(srv.port, query_token=short)
    assert roundtrip(c, {"type": "subscribe", "topic": "a", "id": 1})["type"] == "ack"
    while time.time() < exp:  # wait for the expiry by the wall clock the server uses
        time.sleep(0.05)
    c.send_json({"type": "publish", "topic": "a", "data": "late", "id": 2})
    code, reason = c.expect_close(timeout=5 * SCALE)
    assert code == 1008 and "expired" in reason
    assert srv.hub.history("a", 0, 10) == []  # the late publish was not stored
    c.close()


def test_client_gives_up_when_reconnect_is_refused(make_server, tmp_path):
    from wsbroadcast import Client, ConnectionClosed
    srv = make_server(secret=SECRET, store=str(tmp_path / "s.db"))
    exp = time.time() + 3.0 * SCALE  # room for the connect and subscribe on a loaded machine
    short = jwt.encode({"sub": "ann", "exp": exp, "subscribe": ["a"], "publish": ["a"]}, SECRET,
                       algorithm="HS256")
    client = Client.connect(srv.url, token=short, max_backoff=0.2)
    try:
        client.subscribe("a")
        # expiry closes the connection; every reconnect is refused with 401: the client stops
        with pytest.raises(ConnectionClosed):
            while True:
                assert client.recv(timeout=10 * SCALE) is not None, "the client did not stop"
        assert "401" in client.close_reason
        assert not client.connected
    finally:
        client.close()
