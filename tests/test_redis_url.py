"""The --redis URL forms: what each parses into, and a one-line refusal of each malformed one.

Sans-I/O: no Redis is reached here (the pools are made lazily; connecting is the broker's).
The refusals through the command line are in test_startup_errors.py.
"""

from __future__ import annotations

import pytest

from wsbroadcast.errors import ConfigError
from wsbroadcast.redis_url import (
    DEFAULT_SENTINEL_PORT,
    DEFAULT_WAIT_TIMEOUT_MS,
    MAX_WAIT_REPLICAS,
    MAX_WAIT_TIMEOUT_MS,
    parse_redis_url,
    redact,
)


def test_one_server_forms_keep_their_url_for_redis_py():
    t = parse_redis_url("redis://127.0.0.1:7000/3")
    assert (t.kind, t.client_url, t.db, t.wait_replicas, t.wait_timeout_ms) == (
        "redis", "redis://127.0.0.1:7000/3", 3, 0, DEFAULT_WAIT_TIMEOUT_MS)
    t = parse_redis_url("rediss://u:p%40ss@h/0?wait_replicas=1&socket_timeout=1.5&wait_timeout_ms=250")
    assert t.client_url == "rediss://u:p%40ss@h/0?socket_timeout=1.5"  # wsbroadcast's options taken out
    assert (t.username, t.password, t.wait_replicas, t.wait_timeout_ms) == ("u", "p@ss", 1, 250)
    t = parse_redis_url("unix:///run/redis.sock?db=2")
    assert (t.kind, t.client_url, t.db) == ("redis", "unix:///run/redis.sock?db=2", 2)
    assert parse_redis_url("redis://[::1]:6380").client_url == "redis://[::1]:6380"


def test_sentinel_form():
    t = parse_redis_url("redis+sentinel://:pw@10.0.0.1:5000,sentinel-b,[::1]:5002/my-primary"
                        "?db=4&wait_replicas=2&wait_timeout_ms=" + str(MAX_WAIT_TIMEOUT_MS))
    assert t.kind == "sentinel"
    assert t.sentinels == (("10.0.0.1", 5000), ("sentinel-b", DEFAULT_SENTINEL_PORT), ("::1", 5002))
    assert (t.service, t.db, t.password, t.wait_replicas, t.wait_timeout_ms) == (
        "my-primary", 4, "pw", 2, MAX_WAIT_TIMEOUT_MS)
    assert t.redacted == "redis+sentinel://:***@10.0.0.1:5000,sentinel-b,[::1]:5002/my-primary" \
        "?db=4&wait_replicas=2&wait_timeout_ms=60000"
    t = parse_redis_url("redis+sentinel://s:26380/m?socket_connect_timeout=0.5&socket_keepalive=false"
                        "&wait_replicas=" + str(MAX_WAIT_REPLICAS))
    assert t.options == {"socket_connect_timeout": 0.5, "socket_keepalive": False}
    assert t.wait_replicas == MAX_WAIT_REPLICAS


@pytest.mark.parametrize("url, needle", [
    ("", "empty"),
    ("http://h:1/0", "scheme is not one of"),
    ("redis//h:1/0", "scheme is not one of"),
    ("redis://", "no host"),
    ("redis://h:0/0", "port of h '0'"),
    ("redis://h:65536/0", "port of h '65536'"),
    ("redis://h:x/0", "port of h 'x'"),
    ("redis://h:1/zero", "database"),
    ("redis://h:1/0?db=1", "given twice"),
    ("redis://h:1/0?wait_replicas=1&wait_replicas=1", "given twice"),
    ("redis://h:1/0?max_connections=5", "unknown option 'max_connections'"),
    ("redis://h:1/0?socket_timeout=soon", "socket_timeout 'soon' is not a number"),
    ("redis://h:1/0?wait_replicas=-1", "wait_replicas '-1'"),
    ("redis://h:1/0?wait_replicas=%d" % (MAX_WAIT_REPLICAS + 1), "wait_replicas"),
    ("redis://h:1/0?wait_timeout_ms=0", "wait_timeout_ms '0'"),
    ("redis://h:1/0?wait_timeout_ms=%d" % (MAX_WAIT_TIMEOUT_MS + 1), "wait_timeout_ms"),
    ("redis://h:1/0#frag", "fragment"),
    ("unix://host/path", "three slashes"),
    ("unix://", "three slashes"),
    ("redis+sentinel:///m", "no Sentinel address"),
    ("redis+sentinel://a:1,b:2", "no master name"),
    ("redis+sentinel://a:1,b:2/", "no master name"),
    ("redis+sentinel://a:1,:2/m", "is not HOST or HOST:PORT"),
    ("redis+sentinel://a:1,b:2/m/0", "the master name alone"),
    ("redis+sentinel://a:1/m%20%0A", "not one word"),
    ("redis+sentinel://a:99999/m", "port of a"),
    ("redis+sentinel://a:1/m?ssl_certfile=c.pem", "ssl_certfile is not taken with Sentinel"),
    ("redis+sentinel://a:1/m?socket_keepalive=maybe", "socket_keepalive 'maybe' is not a true or false"),
])
def test_malformed_urls_are_refused_in_one_line(url, needle):
    with pytest.raises(ConfigError) as info:
        parse_redis_url(url)
    text = str(info.value)
    assert needle in text and "\n" not in text, text


def test_limits_at_their_edges_are_taken():
    assert parse_redis_url("redis://h:65535/0?wait_timeout_ms=1&wait_replicas=0").wait_timeout_ms == 1
    assert parse_redis_url("redis://h:1/0").client_url == "redis://h:1/0"


def test_the_password_never_appears_in_a_refusal():
    with pytest.raises(ConfigError) as info:
        parse_redis_url("redis+sentinel://user:s3cret@a:1,b:2/m?bogus=1")
    assert "s3cret" not in str(info.value) and "user:***@a:1,b:2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_redis_url("redis://h:1/0?password=s3cret")  # not an option here: refused, not shown
    assert "s3cret" not in str(info.value) and "redis://h:1/0?..." in str(info.value)
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0" and redact("not a url") == "not a url"
