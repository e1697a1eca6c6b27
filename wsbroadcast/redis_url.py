"""The ``--redis`` URL: which Redis deployment, how to reach it, what a publish waits for.

Forms (``[user][:password]@`` is optional everywhere)::

    redis://[user:password@]HOST[:PORT][/DB][?OPTIONS]          one server (port 6379)
    rediss://...                                                 the same over TLS
    unix://[user:password@]/PATH/TO/SOCKET[?db=DB&OPTIONS]       a local socket
    redis+sentinel://[user:password@]HOST[:PORT][,HOST[:PORT]...]/MASTER[?db=DB&OPTIONS]
        the primary that the Sentinels (port 26379) name MASTER; the password is the
        data nodes' (the Sentinels are reached without one)
    redis+cluster://[user:password@]HOST[:PORT][,HOST[:PORT]...][/][?OPTIONS]
        a Redis Cluster (rediss+cluster:// over TLS); the nodes listed are where its map is
        first read (one reachable node is enough); a cluster has database 0 only

OPTIONS of wsbroadcast (taken out before the rest reaches redis-py):

- ``wait_replicas=N`` (default 0): a publish is acked only once N replicas have it
  (Redis ``WAIT N T`` after the publish); fewer in time and the publisher gets
  ``unavailable``. With the primary on ``appendfsync always`` and N >= 1, an acked
  message survives a crash of the primary and a failover to a replica; N = every
  replica also covers a manual failover or a partition (README: Redis Sentinel).
- ``wait_timeout_ms=T`` (default 1000, 1 to 60000): how long a publish waits for them.

OPTIONS passed on to redis-py: see ``PASSED_OPTIONS``. Anything else is refused, since
redis-py would hand an unknown option to the connection, which fails only at connect time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlencode

from .errors import ConfigError

__all__ = ["RedisTarget", "RedisPools", "parse_redis_url", "redact", "FORMS"]

#: the forms, as said in error messages and --help
FORMS = ("redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///PATH?db=DB, "
         "redis+sentinel://HOST:PORT,HOST:PORT/MASTER?db=DB or redis+cluster://HOST:PORT,HOST:PORT")

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_WAIT_TIMEOUT_MS = 1000
MAX_WAIT_TIMEOUT_MS = 60000
#: replicas a publish may wait for (more than any real deployment has)
MAX_WAIT_REPLICAS = 100

def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


#: redis-py connection options a URL may carry, and how each value is checked
PASSED_OPTIONS: Dict[str, Callable[[str], Any]] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": _bool,
    "health_check_interval": int,
    "client_name": str,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": _bool,
}
#: options a redis+sentinel:// URL takes (TLS to Sentinel and its nodes is not offered)
SENTINEL_OPTIONS = ("socket_timeout", "socket_connect_timeout", "socket_keepalive",
                    "health_check_interval", "client_name")
#: the options wsbroadcast itself reads
OWN_OPTIONS = ("wait_replicas", "wait_timeout_ms")

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[^:]*))?$")


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``; never raises."""
    try:
        scheme, sep, rest = url.partition("://")
        if not sep:
            return url
        netloc, slash, tail = rest.partition("/")
        if "@" not in netloc:
            return url
        userinfo, hosts = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        return "%s://%s@%s%s%s" % (scheme, userinfo, hosts, slash, tail)
    except Exception:  # pragma: no cover - partition on a str does not fail
        return "<redis url>"


class RedisPools(NamedTuple):
    """What a broker makes its clients from."""

    #: the commands' pool (publish, reads): bounded, blocks at most ``timeout`` for a connection
    commands: Any
    #: makes the pub/sub connection: ``subscriber.connection_class(**subscriber.connection_kwargs)``
    subscriber: Any
    #: closes what the pools do not (the Sentinel clients)
    close: Callable[[], None]


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``--redis`` URL."""

    url: str
    #: "redis" (one server: redis://, rediss://, unix://), "sentinel" or "cluster"
    kind: str
    #: the URL for redis-py (one server), wsbroadcast's options taken out
    client_url: str = ""
    #: sentinel: the Sentinels' addresses and the master's name
    sentinels: Tuple[Tuple[str, int], ...] = ()
    service: str = ""
    #: cluster: the nodes its map is first read from, and whether they speak TLS
    nodes: Tuple[Tuple[str, int], ...] = ()
    ssl: bool = False
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    #: redis-py options given in the URL (sentinel; one server keeps them in client_url)
    options: Dict[str, Any] = field(default_factory=dict)
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS

    @property
    def redacted(self) -> str:
        return redact(self.url)

    def open_pools(self, common: Dict[str, Any], max_connections: int, timeout: float,
                   command_timeout: Optional[float] = None) -> RedisPools:
        """The pools of this target; ``common`` are the connection options of both.

        ``timeout``: the longest wait for a free command connection; ``command_timeout``:
        the commands' socket timeout, if not the subscriber's (``common["socket_timeout"]``).
        """
        import redis

        cmd = dict(common)
        if command_timeout is not None:
            cmd["socket_timeout"] = command_timeout
        if self.kind == "redis":
            commands = redis.BlockingConnectionPool.from_url(
                self.client_url, max_connections=max_connections, timeout=timeout, **cmd)
            subscriber = redis.ConnectionPool.from_url(self.client_url, **common)
            return RedisPools(commands, subscriber, lambda: None)
        from redis.sentinel import Sentinel, SentinelConnectionPool

        class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
            """Sentinel's pool (connections go to the current primary), bounded and blocking."""

        sentinel_kwargs = {k: v for k, v in common.items()
                           if k in ("socket_timeout", "socket_connect_timeout", "retry", "protocol")}
        manager = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)
        own = dict(self.options, db=self.db, username=self.username, password=self.password)
        commands = BlockingSentinelPool(self.service, manager, max_connections=max_connections,
                                        timeout=timeout, **dict(cmd, **own))
        subscriber = SentinelConnectionPool(self.service, manager, **dict(common, **own))

        def close() -> None:
            for client in manager.sentinels:
                client.connection_pool.disconnect()

        return RedisPools(commands, subscriber, close)


def _fail(url: str, what: str, forms: bool = False) -> ConfigError:
    # the query is left out: an unknown option's value may be a secret
    shown = redact(url.partition("?")[0]) + ("?..." if "?" in url else "")
    return ConfigError("redis URL %s: %s%s" % (shown, what, "; give " + FORMS if forms else ""))


def _int(url: str, name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _fail(url, "%s %r is not a whole number from %d to %d" % (name, text, low, high))
    return value


def _address(url: str, text: str, default_port: int) -> Tuple[str, int]:
    m = _HOST_PORT.match(text)
    if not m:
        raise _fail(url, "%r is not HOST or HOST:PORT" % text)
    host = m.group("v6") or m.group("host")
    port_text = m.group("port")
    if port_text is None:
        return host, default_port
    return host, _int(url, "the port of %s" % host, port_text, 1, 65535)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and check a ``--redis`` URL; ConfigError (one line, no password) when malformed."""
    if not isinstance(url, str) or not url.strip():
        raise _fail(str(url), "it is empty", forms=True)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise _fail(url, "the scheme is not one of %s" % ", ".join(s + "://" for s in SCHEMES), forms=True)
    if "#" in rest:
        raise _fail(url, "a fragment (#...) means nothing here")
    rest, _, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    own: Dict[str, str] = {}
    passed: List[Tuple[str, str]] = []
    for name, value in pairs:
        if name in own or any(name == n for n, _v in passed):
            raise _fail(url, "option %s is given twice" % name)
        if name in OWN_OPTIONS:
            own[name] = value
        elif name in PASSED_OPTIONS or name == "db":
            passed.append((name, value))
        else:
            raise _fail(url, "unknown option %r (known: %s)" % (
                name, ", ".join(OWN_OPTIONS + ("db",) + tuple(PASSED_OPTIONS))))
    options: Dict[str, Any] = {}
    db: Optional[int] = None
    for name, value in passed:
        if name == "db":
            db = _int(url, "db", value, 0, 1 << 20)
            continue
        try:
            options[name] = PASSED_OPTIONS[name](value)
        except ValueError:
            kind = {float: "number", int: "whole number", _bool: "true or false"}[PASSED_OPTIONS[name]]
            raise _fail(url, "option %s %r is not a %s" % (name, value, kind)) from None
    wait_replicas = _int(url, "wait_replicas", own["wait_replicas"], 0, MAX_WAIT_REPLICAS) \
        if "wait_replicas" in own else 0
    wait_timeout_ms = _int(url, "wait_timeout_ms", own["wait_timeout_ms"], 1, MAX_WAIT_TIMEOUT_MS) \
        if "wait_timeout_ms" in own else DEFAULT_WAIT_TIMEOUT_MS

    netloc, slash, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None

    def target(kind: str, **more: Any) -> RedisTarget:
        return RedisTarget(url=url, kind=kind, db=db or 0, username=username, password=password,
                           wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms, **more)

    if scheme == "unix":
        if netloc or not path:
            raise _fail(url, "a unix:// URL names a socket file: unix:///PATH (three slashes)")
    elif scheme in ("redis", "rediss"):
        if not netloc:
            raise _fail(url, "no host", forms=True)
        _address(url, netloc, DEFAULT_PORT)
        if path:
            if db is not None:
                raise _fail(url, "the database is given twice (/DB and ?db=)")
            db = _int(url, "the database (/DB)", path, 0, 1 << 20)
    if scheme in CLUSTER_SCHEMES:
        if not netloc:
            raise _fail(url, "no node address: give HOST:PORT,HOST:PORT of cluster nodes")
        if path or db:
            raise _fail(url, "a cluster has database 0 only (no /DB, no ?db=)")
        nodes = tuple(_address(url, part, DEFAULT_PORT) for part in netloc.split(","))
        return target("cluster", nodes=nodes, ssl=scheme.startswith("rediss"), options=options)
    if scheme != "redis+sentinel":
        query_out = urlencode(passed)
        base = url.partition("?")[0]
        client_url = base + ("?" + query_out if query_out else "")
        return target("redis", client_url=client_url)

    if not netloc:
        raise _fail(url, "no Sentinel address: give HOST:PORT,HOST:PORT of the Sentinels")
    for name in options:
        if name not in SENTINEL_OPTIONS:
            raise _fail(url, "option %s is not taken with Sentinel (it takes %s)" % (
                name, ", ".join(SENTINEL_OPTIONS)))
    sentinels = tuple(_address(url, part, DEFAULT_SENTINEL_PORT) for part in netloc.split(","))
    if not slash or not path:
        raise _fail(url, "no master name: end the URL with /MASTER, the name the Sentinels monitor")
    if "/" in path:
        raise _fail(url, "the path is the master name alone (give the database as ?db=DB)")
    service = unquote(path)
    if not service.strip() or any(c.isspace() or not c.isprintable() for c in service):
        raise _fail(url, "the master name %r is not one word" % service)
    return target("sentinel", sentinels=sentinels, service=service, options=options)

