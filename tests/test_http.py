"""The HTTP endpoints on the broker's port and their error answers."""

from __future__ import annotations

import json
import socket

import pytest

import httputil
import wsraw

pytestmark = pytest.mark.timeout(60)


def _req(port, method, path, body=b"", headers=()):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port, "Connection: close"]
    if body or method == "POST":
        lines.append("Content-Length: %d" % len(body))
    lines.extend("%s: %s" % kv for kv in headers)
    return wsraw.http_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _json_error(status, headers, body, code):
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["error"] == code and doc["message"]


def test_demo_page(server):
    status, headers, body = _req(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<html" in body.lower() and b'<script src="/wsbroadcast.js">' in body
    status, headers, js = _req(server.port, "GET", "/wsbroadcast.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b'"wsbroadcast.v1"' in js


def test_healthz(server):
    status, _, body = _req(server.port, "GET", "/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok"
    assert doc["connections"] == 0 and doc["writer"]["alive"] is True
    assert doc["uptime"] >= 0


def test_metrics_after_traffic(server):
    c = wsraw.connect(server.port)
    c.send_json({"type": "subscribe", "topic": "m", "id": 1})
    c.recv_json()
    c.send_json({"type": "publish", "topic": "m", "data": 1, "id": 2})
    c.recv_json(), c.recv_json()
    status, headers, body = _req(server.port, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["wsbroadcast_connections_open"] == 1
    assert values["wsbroadcast_connections_accepted_total"] >= 1
    assert values["wsbroadcast_messages_received_total"] == 1
    assert values["wsbroadcast_messages_delivered_total"] == 1
    assert values["wsbroadcast_bytes_out_total"] > 0
    assert values["wsbroadcast_slow_consumer_closes_total"] == 0
    assert "wsbroadcast_writer_queue_depth" in values
    assert values["wsbroadcast_publish_to_write_seconds_count"] >= 1
    assert "wsbroadcast_close_codes_total" in text


def test_publish_200_and_delivery(server):
    c = wsraw.connect(server.port)
    c.send_json({"type": "subscribe", "topic": "h.t", "id": 1})
    epoch = c.recv_json()["epoch"]
    body = json.dumps({"topic": "h.t", "data": {"x": "é"}}).encode()
    status, _, resp = _req(server.port, "POST", "/publish", body, [("Content-Type", "application/json")])
    assert status == 200 and json.loads(resp) == {"topic": "h.t", "seq": 1, "epoch": epoch}
    assert c.recv_json() == {"type": "message", "topic": "h.t", "seq": 1, "data": {"x": "é"}}


@pytest.mark.parametrize("body, ctype, status, code", [
    (b"{nope", "application/json", 400, "bad_json"),
    (b"[1]", "application/json", 400, "bad_request"),
    (b'{"topic": "a"}', "application/json", 400, "bad_request"),
    (b'{"topic": "a.*", "data": 1}', "application/json", 400, "bad_topic"),
    (b'{"topic": "a", "data": 1}', "text/plain", 415, "unsupported_media_type"),
    (b'{"topic": "a", "data": 1}', None, 415, "unsupported_media_type"),
])
def test_publish_errors(server, body, ctype, status, code):
    headers = [("Content-Type", ctype)] if ctype else []
    got, h, resp = _req(server.port, "POST", "/publish", body, headers)
    assert got == status
    _json_error(got, h, resp, code)


def test_publish_body_limit_at_and_past_the_edge(make_server):
    srv = make_server(max_message_size=200)
    doc = b'{"topic": "a", "data": "%s"}'
    at = doc % (b"x" * (200 - len(doc) + 2))
    assert len(at) == 200
    status, _, _ = _req(srv.port, "POST", "/publish", at, [("Content-Type", "application/json")])
    assert status == 200
    status, h, resp = _req(srv.port, "POST", "/publish", at + b" ", [("Content-Type", "application/json")])
    assert status == 413
    _json_error(status, h, resp, "too_large")


def test_publish_rate_limited_429(make_server):
    srv = make_server(max_publish_rate=1, publish_burst=2)
    statuses = [_req(srv.port, "POST", "/publish", b'{"topic": "a", "data": 1}',
                     [("Content-Type", "application/json")])[0] for _ in range(4)]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]


def test_history(server):
    for i in range(5):
        server.publish("hist", i)
    status, _, body = _req(server.port, "GET", "/history?topic=hist&since=2&limit=2")
    assert status == 200
    assert json.loads(body) == [{"topic": "hist", "seq": 3, "data": 2}, {"topic": "hist", "seq": 4, "data": 3}]
    status, _, body = _req(server.port, "GET", "/history?topic=hist")
    assert [m["seq"] for m in json.loads(body)] == [1, 2, 3, 4, 5]
    status, _, body = _req(server.port, "GET", "/history?topic=hist&limit=1000")
    assert status == 200


@pytest.mark.parametrize("query, code", [
    ("topic=a.*", "bad_topic"), ("topic=", "bad_topic"), ("", "bad_topic"),
    ("topic=a&since=-1", "bad_request"), ("topic=a&since=x", "bad_request"),
    ("topic=a&limit=0", "bad_request"), ("topic=a&limit=1001", "bad_request"),
])
def test_history_errors(server, query, code):
    status, h, body = _req(server.port, "GET", "/history?" + query)
    assert status == 400
    _json_error(status, h, body, code)


@pytest.mark.parametrize("query", ["", "topic="])
def test_history_without_a_topic_says_how_to_ask(server, query):
    status, h, body = _req(server.port, "GET", "/history?" + query)
    assert status == 400
    assert "/history?topic=" in json.loads(body)["message"]


def test_ws_path_without_upgrade_is_426(server):
    status, h, body = _req(server.port, "GET", "/ws")
    assert status == 426
    _json_error(status, h, body, "upgrade_required")


def test_upgrade_on_other_path_is_404(server):
    with pytest.raises(AssertionError, match="404"):
        wsraw.connect(server.port, path="/elsewhere")


def test_unknown_path_404_and_wrong_method_405(server):
    status, h, body = _req(server.port, "GET", "/nothing")
    assert status == 404
    _json_error(status, h, body, "not_found")
    for method, path in [("POST", "/healthz"), ("GET", "/publish"), ("DELETE", "/"), ("PUT", "/history")]:
        status, h, body = _req(server.port, method, path)
        assert status == 405, (method, path)
        _json_error(status, h, body, "method_not_allowed")
        assert "allow" in h


def test_malformed_request_is_400(server):
    status, h, body = wsraw.http_request(server.port, b"GARBAGE\r\n\r\n")
    assert status == 400


def test_keep_alive_serves_several_requests(server):
    import socket
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(3):
        s.sendall(req)
        status, _, body = wsraw.read_response(s)
        assert status == 200 and json.loads(body)["status"] == "ok"
    s.close()


def test_demo_page_connects_to_the_configured_path(make_server):
    srv = make_server(path="/live/updates")
    status, _, body = _req(srv.port, "GET", "/")
    assert status == 200 and b'<meta name="wsbroadcast-path" content="/live/updates">' in body


def _on(sock, raw: bytes):
    sock.sendall(raw)
    return wsraw.read_response(sock)


def test_keep_alive_after_a_refused_post_body(make_server):
    srv = make_server(max_message_size=100)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        post = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n")
        healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for body, code in ((b"not j", "bad_json"), (b'{"topic":"a.>","data":1}', "bad_topic"),
                           (b'{"data":1}', "bad_request")):
            status, _h, answer = _on(s, post % len(body) + body)
            assert (status, json.loads(answer)["error"]) == (400, code), answer
            status, _h, answer = _on(s, healthz)  # the same connection goes on
            assert status == 200 and json.loads(answer)["status"] == "ok"
        body = b'{"topic":"a","data":1}'
        status, _h, answer = _on(s, post % len(body) + body)
        assert status == 200 and json.loads(answer)["seq"] == 1
        # a body over the limit is not read: 413, then the connection ends
        status, headers, answer = _on(s, post % 300 + b"x" * 300)
        assert (status, json.loads(answer)["error"]) == (413, "too_large")
        assert headers.get("connection") == "close"
        assert wsraw.RawWS(s, None).at_eof(timeout=5)
    finally:
        s.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_still_sending_a_body_over_the_limit_reads_its_413(make_server, framing):
    """The server stops reading at the limit but does not reset the answer away."""
    srv = make_server(max_message_size=1000)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        head = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + (b"Content-Length: %d\r\n\r\n" % (4 << 20) if framing == "content-length"
                   else b"Transfer-Encoding: chunked\r\n\r\n"))
        piece = b"x" * 65536 if framing == "content-length" else b"10000\r\n" + b"x" * 65536 + b"\r\n"
        s.sendall(head)
        sent = 0
        s.settimeout(0.2)
        try:  # keep sending until the server stops taking the body (its window fills up)
            while sent < (4 << 20):
                sent += s.send(piece)
        except (socket.timeout, OSError):
            pass
        status, headers, answer = wsraw.read_response(s, timeout=10)
        assert (status, json.loads(answer)["error"]) == (413, "too_large")
        assert headers.get("connection") == "close"
    finally:
        s.close()


def test_chunked_request_bodies(make_server):
    srv = make_server(max_message_size=100)
    head = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        # chunks of any size, an extension, a trailer; then the connection is reused
        body = b'5;ext=1\r\n{"top\r\n13\r\nic":"c","data":[1]}\r\n0\r\nX-Trailer: y\r\n\r\n'
        status, _h, answer = _on(s, head + body)
        assert status == 200 and json.loads(answer)["seq"] == 1, answer
        status, _h, answer = _on(s, head + b"16\r\n" + b'{"topic":"c","data":2}' + b"\r\n0\r\n\r\n")
        assert status == 200 and json.loads(answer)["seq"] == 2, answer
        assert [m["data"] for m in httputil.history(srv.port, "c")] == [[1], 2]
        # at the body limit (100 bytes, in 10-byte chunks) it is served; one byte past it, 413
        for size, expected in ((100, 200), (101, 413)):
            doc = b'{"topic":"c","data":"' + b"z" * (size - 23) + b'"}'
            assert len(doc) == size
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(doc[i:i + 10]), doc[i:i + 10]) for i in range(0, size, 10))
            status, _h, answer = _on(s, head + chunks + b"0\r\n\r\n")
            assert status == expected, (size, answer)
    finally:
        s.close()
