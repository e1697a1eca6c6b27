"""Malformed and hostile HTTP on the broker's port: framing ambiguities (request smuggling),
requests that used to end in a traceback, and the allowed hosts (DNS rebinding)."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time

import pytest

import wsraw
from serverproc import ServerProcess

from wsbroadcast import Server

pytestmark = pytest.mark.timeout(60)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample: 16 bytes in base64
#: a request hidden behind an ambiguous one: it publishes, so being served leaves a trace
HIDDEN_BODY = b'{"topic":"smuggled","data":1}'
HIDDEN = (b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n" % len(HIDDEN_BODY)) + HIDDEN_BODY


def answer_then_eof(port, raw, timeout=5.0):
    """Send ``raw``; return (status, headers, body) of the one answer, asserting that the
    server then closes without answering anything else."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(raw)
        status, headers, body = wsraw.read_response(sock, timeout)
        length = int(headers.get("content-length", "-1"))
        extra = body[length:] if length >= 0 else b""
        assert length >= 0 and len(body) >= length, (status, headers, body)
        rest = b""
        while True:  # read to the end: nothing but the EOF may follow the answer
            sock.settimeout(timeout)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            rest += chunk
        assert extra + rest == b"", "served after the refusal: %r" % (extra + rest)[:300]
        return status, headers, body[:length]
    finally:
        sock.close()


def error_code(body):
    doc = json.loads(body)
    assert doc["message"]
    return doc["error"]


def history(port, topic, host="localhost"):
    status, _, body = wsraw.http_request(
        port, b"GET /history?topic=%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
        % (topic.encode(), host.encode()))
    assert status == 200, body
    return json.loads(body)


def upgrade_request(host="localhost", key=KEY, extra=b""):
    return (b"GET /ws HTTP/1.1\r\nHost: " + host.encode("latin-1") + b"\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
            + extra + b"\r\n")


# ------------------------------------------------------------------ 6. request smuggling

SMUGGLE_CL_TE = (b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(HIDDEN))
                 + HIDDEN)


def test_content_length_with_chunked_is_400_and_the_hidden_request_never_runs(server):
    status, headers, body = answer_then_eof(server.port, SMUGGLE_CL_TE)
    assert status == 400 and error_code(body) == "bad_request"
    assert headers["connection"] == "close"
    assert history(server.port, "smuggled") == []


def _post(head_lines, body=b"0\r\n\r\n", version=b"1.1"):
    return (b"POST /publish HTTP/" + version + b"\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + b"".join(line + b"\r\n" for line in head_lines) + b"\r\n" + body + HIDDEN)


@pytest.mark.parametrize("raw", [
    _post([b"Transfer-Encoding: chunked", b"Content-Length: 5"]),  # the other order
    _post([b"Transfer-Encoding: chunked, gzip"]),  # chunked not last: length unknowable
    _post([b"Transfer-Encoding: gzip, chunked"]),  # a coding the server does not do
    _post([b"Transfer-Encoding: identity"]),
    _post([b"Transfer-Encoding:"]),
    _post([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"]),
    _post([b"Transfer-Encoding: chunked"], version=b"1.0"),  # RFC 9112 6.1: faulty framing
    _post([b"Transfer-Encoding: chunked"], b"5\nhello\r\n0\r\n\r\n"),  # bare LF in the body's framing
    _post([b"Transfer-Encoding: chunked"], b"5zz\r\nhello\r\n0\r\n\r\n"),
    _post([b"Content-Length: 5", b"Content-Length: 5"], b"0\r\n\r\n"),  # duplicate, even if equal
    _post([b"Content-Length: 5, 5"], b"0\r\n\r\n"),
    _post([b"Content-Length: 5", b"X-Note: folded", b" Transfer-Encoding: chunked"]),  # obs-fold
    _post([b"Content-Length: 5", b"X-Note: folded", b"\tmore"]),
    b"POST /publish HTTP/1.1\nHost: localhost\nContent-Type: application/json\nContent-Length: 5\n\n"
    b"0\r\n\r\n" + HIDDEN,  # bare LF line ends
    b"GET /healthz HTTP/1.1\r\nHost: localhost\nX: y\r\n\r\n" + HIDDEN,  # one bare LF
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n\r\n" + HIDDEN,
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\nOrigin: http://a.example\r\n\r\n"
    + HIDDEN,
    b"GET /history?topic=t HTTP/1.1\r\nHost: localhost\r\nX-API-Key: a\r\nX-API-Key: b\r\n\r\n" + HIDDEN,
    upgrade_request(extra=b"Sec-WebSocket-Key: " + KEY + b"\r\n") + HIDDEN,
], ids=["te-cl", "chunked-gzip", "gzip-chunked", "identity", "empty-te", "te-twice", "te-on-1.0",
        "chunk-bare-lf", "chunk-bad-size", "cl-twice", "cl-list", "obs-fold-space", "obs-fold-tab", "bare-lf",
        "one-bare-lf", "host-twice",
        "origin-twice", "api-key-twice", "ws-key-twice"])
def test_ambiguous_framing_is_400_and_closes(server, raw):
    status, headers, body = answer_then_eof(server.port, raw)
    assert status == 400 and error_code(body) == "bad_request", body
    assert history(server.port, "smuggled") == []
    assert len(server.hub) == 0


def test_unambiguous_requests_still_keep_alive_and_pipeline(server):
    """One write with three requests (a chunked POST among them): three answers, in order."""
    body = HIDDEN_BODY
    chunked = (b"POST /publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        s.sendall(health + chunked + HIDDEN)
        answers = _read_answers(s, 3)
    finally:
        s.close()
    assert [status for status, _ in answers] == [200, 200, 200], answers
    assert json.loads(answers[0][1])["status"] == "ok"
    assert [json.loads(body)["seq"] for _, body in answers[1:]] == [1, 2]


def _read_answers(sock, n, timeout=5.0):
    """``n`` pipelined answers [(status, body)] (each with a Content-Length)."""
    deadline = time.monotonic() + timeout
    data = b""
    answers = []
    while len(answers) < n:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            if len(rest) >= length:
                answers.append((int(head.split()[1]), rest[:length]))
                data = rest[length:]
                continue
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "closed after %d answers" % len(answers)
        data += chunk
    return answers


def test_a_refused_client_that_keeps_sending_is_cut_off(server):
    """After a closing answer the rest of the request is read and dropped, but only so much."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        s.sendall(SMUGGLE_CL_TE)
        status, headers, _ = wsraw.read_response(s)
        assert status == 400 and headers["connection"] == "close"
        junk = b"x" * 65536
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # reset past 256 KiB or 2 s
            for _ in range(1024):  # 64 MiB: far more than the kernel buffers on both sides
                s.sendall(junk)
    finally:
        s.close()
    assert wsraw.wait_for(lambda: server.thread_count() == 0, timeout=10), server.thread_count()


@pytest.mark.parametrize("raw, status", [
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", 200),
    (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX: y\n\r\n", 400),
])
def test_head_checked_however_it_is_cut_into_packets(server, raw, status):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(len(raw)):
            s.sendall(raw[i:i + 1])
        assert wsraw.read_response(s)[0] == status
    finally:
        s.close()


# ------------------------------------------------------------------ 8. answers, not tracebacks

@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_history_since_past_any_seq_is_an_empty_list(make_server, tmp_path, store):
    srv = make_server(store=str(tmp_path / "h.db") if store == "sqlite" else "memory")
    srv.publish("t", 1)
    for since in (2 ** 63 - 2, 2 ** 63 - 1, 2 ** 63, 1180591620717411303424, 10 ** 300):
        status, _, body = wsraw.http_request(
            srv.port, b"GET /history?topic=t&since=%d HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n" % since)
        assert (status, json.loads(body)) == (200, []), (since, body)
    assert history(srv.port, "t") == [{"topic": "t", "seq": 1, "data": 1}]


@pytest.mark.parametrize("extra, key", [
    (b"Sec-WebSocket-Protocol: \xff\xfe\r\n", KEY),
    (b"Sec-WebSocket-Extensions: \xff\r\n", KEY),
    (b"", b"not base64 at all!"),
    (b"", b"\xff\xfe"),
    (b"", b"AAAAAAAAAAAAAAAAAAAA"),  # base64 of 15 bytes
    (b"", b"AAAAAAAAAAAAAAAAAAAAAAA="),  # 17 bytes
], ids=["protocol-not-ascii", "extensions-not-ascii", "key-not-base64", "key-not-ascii", "key-15", "key-17"])
def test_bad_websocket_handshakes_are_400(server, extra, key):
    status, _, body = wsraw.http_request(server.port, upgrade_request(key=key, extra=extra))
    assert status == 400 and error_code(body) == "bad_request", body
    assert len(server.hub) == 0
    c = wsraw.connect(server.port)  # the server is unharmed; a 16-byte key is fine
    c.close()


@pytest.mark.parametrize("request_head, status", [
    (upgrade_request(key=b"short"), 400),
    (upgrade_request(extra=b"Origin: https://evil.example\r\n"), 403),
    (upgrade_request(host="evil.example"), 403),
], ids=["bad-key", "foreign-origin", "foreign-host"])
def test_a_refused_upgrade_leaves_the_connection_serving(server, request_head, status):
    # (an upgrade of the common shape is read without h11: refused, h11 reads it then to answer)
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(request_head)
        assert wsraw.read_response(s)[0] == status
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert wsraw.read_response(s)[0] == 200
    assert len(server.hub) == 0


def test_a_connection_header_not_in_ascii_is_400_not_a_fault(server):
    # (it used to reach a decoder for ASCII only: 500 and an error logged, for any client)
    request = upgrade_request().replace(b"Connection: Upgrade", b"Connection: \xe9, Upgrade")
    status, _, body = wsraw.http_request(server.port, request)
    assert status == 400 and error_code(body) == "bad_request", body
    assert len(server.hub) == 0


@pytest.mark.parametrize("raw", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",  # the HTTP/2 preface
    b"GET /healthz HTTP/1.2\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/2\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/3.0\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/0.9\r\nHost: localhost\r\n\r\n",
])
def test_other_http_versions_are_505(server, raw):
    status, headers, body = answer_then_eof(server.port, raw + HIDDEN)
    assert status == 505 and error_code(body) == "bad_request"
    assert headers["connection"] == "close"


def test_http_1_0_is_served(server):
    status, _, body = wsraw.http_request(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"


class _FaultyHealth(Server):
    def health(self):
        raise ZeroDivisionError("a fault in the server's own code")


def test_a_fault_while_serving_is_a_500_and_one_log_line(caplog):
    srv = _FaultyHealth("127.0.0.1", 0, store="memory").start()
    try:
        with caplog.at_level(logging.INFO, logger="wsbroadcast"):
            status, headers, body = answer_then_eof(
                srv.port, b"GET /healthz?token=s3cret HTTP/1.1\r\nHost: localhost\r\n\r\n" + HIDDEN)
        assert status == 500 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "internal_error"
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        line = errors[0].getMessage()
        assert errors[0].exc_info is None and "\n" not in line
        assert "/healthz" in line and "ZeroDivisionError" in line and "s3cret" not in line
        assert history(srv.port, "t") == []  # the server goes on
    finally:
        srv.shutdown()


# ------------------------------------------------------------------ 11. allowed hosts

def _get(port, path, host, extra=b""):
    return wsraw.http_request(port, b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n"
                              % (path.encode(), host.encode(), extra))


def test_dns_rebinding_page_is_refused_on_every_endpoint(server):
    """A page on http://evil.example:PORT re-pointed at 127.0.0.1: its Host is evil.example:PORT
    and its Origin matches that Host, so only the host check stops it."""
    port = server.port
    evil = "evil.example:%d" % port
    origin = ("Origin: http://%s\r\n" % evil).encode()
    with pytest.raises(AssertionError, match="403"):
        wsraw.connect(port, host=evil, headers=[("Origin", "http://" + evil)])
    status, _, body = wsraw.http_request(port, upgrade_request(host=evil, extra=origin))
    assert status == 403 and error_code(body) == "forbidden_host"
    for path in ("/", "/healthz", "/metrics", "/history?topic=t", "/nowhere", "/ws"):
        status, _, body = _get(port, path, evil, origin)
        assert status == 403 and error_code(body) == "forbidden_host", path
    pub = (b"POST /publish HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (evil.encode(), len(HIDDEN_BODY), HIDDEN_BODY))
    status, _, body = wsraw.http_request(port, pub)
    assert status == 403 and error_code(body) == "forbidden_host"
    assert history(port, "smuggled") == [] and len(server.hub) == 0


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.1.evil.example",
                                  "localhost:80@evil.example", "localhost:", "localhost:99999", "::1",
                                  "[::1", "evil.example:%(port)d"])
def test_other_hosts_are_403_on_loopback(server, host):
    status, _, body = _get(server.port, "/healthz", host % {"port": server.port})
    assert status == 403 and error_code(body) == "forbidden_host"


@pytest.mark.parametrize("host", ["localhost", "localhost:%(port)d", "LocalHost:1", "127.0.0.1",
                                  "127.0.0.1:%(port)d", "127.8.9.10:%(port)d", "[::1]", "[::1]:%(port)d"])
def test_loopback_names_are_served_on_loopback(server, host):
    host = host % {"port": server.port}
    status, _, body = _get(server.port, "/healthz", host)
    assert status == 200, body
    c = wsraw.connect(server.port, host=host, headers=[("Origin", "http://" + host)])
    c.close()


def test_allowed_hosts_are_served_besides_loopback(make_server):
    srv = make_server(allowed_hosts=("app.example", "other.example:8443"))
    port = srv.port
    for host in ("app.example", "APP.example:%d" % port, "other.example:8443", "localhost:%d" % port):
        assert _get(port, "/healthz", host)[0] == 200, host
    c = wsraw.connect(port, host="app.example:%d" % port, headers=[("Origin", "http://app.example:%d" % port)])
    c.close()
    for host in ("other.example", "other.example:8444", "evil.example", "sub.app.example"):
        status, _, body = _get(port, "/healthz", host)
        assert status == 403 and error_code(body) == "forbidden_host", host
    anyone = make_server(allowed_hosts=("*",))
    assert _get(anyone.port, "/healthz", "evil.example")[0] == 200


def test_host_rule_off_loopback():
    """Listening on another address: any Host unless allowed hosts are configured, then only those."""
    from wsbroadcast.hosts import HostRule
    public = HostRule((), loopback_only=False)
    assert public.allows("evil.example") and public.allows("localhost") and public.allows(None)
    listed = HostRule(("app.example",), loopback_only=False)
    assert listed.allows("app.example:80") and not listed.allows("localhost") \
        and not listed.allows("evil.example")
    loop = listed.with_loopback_only(True)
    assert loop.allows("localhost") and loop.allows("app.example") and not loop.allows("evil.example")
    assert loop.allows(None)  # HTTP/1.0 without Host: no browser sends that


@pytest.mark.parametrize("bad", ["http://app.example", "app.example/", "app example", "", "a:b", "[::1"])
def test_bad_allowed_host_is_a_config_error(bad):
    from wsbroadcast.errors import ConfigError
    with pytest.raises(ConfigError, match="--allowed-host"):
        Server("127.0.0.1", 0, store="memory", allowed_hosts=(bad,))


# ------------------------------------------------------------------ all three through the CLI

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """``wsbroadcast serve`` on loopback with a SQLite store and one allowed host."""
    tmp = tmp_path_factory.mktemp("cli")
    proc = ServerProcess("--store", str(tmp / "s.db"), "--allowed-host", "app.example",
                         )
    yield proc
    proc.kill()


def test_cli_smuggled_request_is_refused(cli):
    status, headers, _ = answer_then_eof(cli.port, SMUGGLE_CL_TE)
    assert status == 400 and headers["connection"] == "close"
    assert history(cli.port, "smuggled") == []


def test_cli_answers_what_used_to_drop_the_connection(cli):
    status, _, body = _get(cli.port, "/history?topic=t&since=1180591620717411303424", "localhost")
    assert (status, json.loads(body)) == (200, [])
    status, _, body = wsraw.http_request(
        cli.port, upgrade_request(extra=b"Sec-WebSocket-Protocol: \xff\xfe\r\n"))
    assert status == 400 and error_code(body) == "bad_request"
    status, _, _ = answer_then_eof(cli.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert status == 505
    assert not [line for line in cli.lines if "Traceback" in line or "ERROR" in line], cli.lines


def test_cli_allowed_hosts(cli):
    port = cli.port
    evil = "evil.example:%d" % port
    with pytest.raises(AssertionError, match="403"):
        wsraw.connect(port, host=evil, headers=[("Origin", "http://" + evil)])
    status, _, body = _get(port, "/", evil)
    assert status == 403 and error_code(body) == "forbidden_host"
    assert _get(port, "/", "app.example:%d" % port)[0] == 200
    assert _get(port, "/", "localhost:%d" % port)[0] == 200


def test_cli_bad_allowed_host_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wsbroadcast", "serve", "--port", "0", "--store", "memory",
                           "--allowed-host", "http://app.example/"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsbroadcast serve: --allowed-host"), proc.stderr
