"""GET /stats (the dashboard's JSON), its access rules, and the busiest-topics counter."""

from __future__ import annotations

import json
import socket
from typing import Optional

import pytest

import wsraw
from httputil import http_json, request
from tokens import SECRET, token

from wsbroadcast import Server
from wsbroadcast.stats import TopicRates


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stats_counts_connections_subscriptions_and_messages(make_server):
    srv = make_server()
    status, doc = http_json(srv.port, "GET", "/stats")
    assert status == 200
    assert doc["status"] == "ok" and doc["connections"] == 0 and doc["subscriptions"] == 0
    assert doc["messages_in"] == 0 and doc["topics"] == []
    assert doc["store"]["store"] == "MemoryStore" and doc["writer"]["alive"] is True
    ws = wsraw.connect(srv.port)
    wsraw.subscribe(ws, "news.eu", "a")
    wsraw.subscribe(ws, "news.*", "b")
    for i in range(3):
        srv.publish("news.eu", i)
    srv.publish("other", "x")
    for _ in range(3):  # news.eu reaches the connection once per message (two patterns match)
        assert ws.recv_json()["topic"] == "news.eu"
    status, doc = http_json(srv.port, "GET", "/stats")
    assert doc["connections"] == 1 and doc["subscriptions"] == 2
    assert doc["messages_in"] == 4 and doc["messages_out"] == 3 and doc["bytes_out"] > 0
    assert [t["topic"] for t in doc["topics"]] == ["news.eu", "other"]
    assert doc["topics"][0]["rate"] > doc["topics"][1]["rate"] > 0
    assert set(doc) >= {"time", "uptime", "slow_consumer_closes", "close_codes", "writer", "store"}
    ws.close()
    assert wsraw.wait_for(lambda: http_json(srv.port, "GET", "/stats")[1]["subscriptions"] == 0)
    assert request(srv.port, "HEAD", "/stats")[0] == 200
    assert request(srv.port, "POST", "/stats")[0] == 405


def test_dashboard_and_client_script_are_served(make_server):
    srv = make_server()
    status, headers, body = request(srv.port, "GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<canvas" in body and b'"stats' in body
    for path in ("/wsbroadcast.js", "/wsbroadcast.mjs"):
        status, headers, body = request(srv.port, "GET", path)
        assert status == 200 and headers["content-type"].startswith("text/javascript"), path
        assert headers["access-control-allow-origin"] == "*"  # public: a module from any page
    assert b"export default wsbroadcast" in body


def test_stats_and_dashboard_need_the_key_or_a_token_for_every_topic(make_server):
    srv = make_server(secret=SECRET, api_key="k" * 32)
    for path in ("/stats", "/dashboard"):
        status, headers, _ = request(srv.port, "GET", path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
        assert request(srv.port, "GET", path, headers=[("X-API-Key", "k" * 32)])[0] == 200
        assert request(srv.port, "GET", path, headers=[("X-API-Key", "wrong")])[0] == 401
        everything = token(subscribe=[">"])
        assert request(srv.port, "GET", path + "?token=" + everything)[0] == 200
        assert request(srv.port, "GET", path, headers=[("Authorization", "Bearer " + everything)])[0] == 200
        status, doc = http_json(srv.port, "GET", path + "?token=" + token(subscribe=["news.>"]))
        assert status == 403 and doc["error"] == "forbidden"


def _other_address() -> Optional[str]:
    """A non-loopback address of this machine, or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        addr = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def _get_from(addr: str, port: int, path: str) -> int:
    with socket.create_connection((addr, port), timeout=10) as sock:
        sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                      % (path, addr, port)).encode())
        status, _h, _b = wsraw.read_response(sock)
    return status


@pytest.mark.parametrize("public", [False, True])
def test_without_auth_only_loopback_clients_unless_public(make_server, public):
    addr = _other_address()
    if addr is None:
        pytest.skip("no non-loopback address on this machine")
    srv = Server("0.0.0.0", 0, store="memory", public_stats=public).start()
    try:
        assert http_json(srv.port, "GET", "/stats")[0] == 200  # loopback: always
        for path in ("/stats", "/dashboard"):
            assert _get_from(addr, srv.port, path) == (200 if public else 403), path
        assert _get_from(addr, srv.port, "/healthz") == 200  # the rule is for these two only
    finally:
        srv.shutdown()


def test_topic_rates_are_bounded_and_windowed():
    clock = _Clock()
    rates = TopicRates(window=5.0, max_topics=3, clock=clock)
    rates.add(["a", "a", "b", "c"])
    rates.add(["d"])  # past the bound: not counted
    rates.add(["c", "a"])
    clock.now += 2.0
    assert rates.top(10) == [{"topic": "a", "rate": 1.5}, {"topic": "c", "rate": 1.0},
                             {"topic": "b", "rate": 0.5}]
    assert len(rates.top(2)) == 2
    clock.now += 4.0  # a new window: the last one still counts
    rates.add(["d", "d"])
    assert [t["topic"] for t in rates.top()] == ["a", "c", "d", "b"]  # a tie goes by name
    clock.now += 11.0  # quiet for two windows: nothing is recent
    assert rates.top() == []


def test_an_allowed_origin_may_read_stats_answers(make_server):
    srv = make_server(secret=SECRET, allowed_origins=("http://app.example",))
    status, headers, _ = request(srv.port, "GET", "/stats", headers=[("Origin", "http://app.example")])
    assert status == 401 and headers["access-control-allow-origin"] == "http://app.example"
    status, headers, _ = request(srv.port, "GET", "/stats?token=" + token(subscribe=[">"]),
                                 headers=[("Origin", "http://app.example")])
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    # another origin is told so (it may read that much), before any check of credentials
    status, headers, body = request(srv.port, "GET", "/stats?token=" + token(subscribe=[">"]),
                                    headers=[("Origin", "http://evil.example")])
    assert status == 403 and json.loads(body)["error"] == "forbidden_origin"
    assert headers["access-control-allow-origin"] == "http://evil.example"
