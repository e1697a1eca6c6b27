"""A broker shared through a Redis Cluster (``--redis redis+cluster://host:port,host:port``).

The URL (parsed by redis_url.py): ``redis+cluster://[user:password@]host:port[,host:port...]``
(``rediss+cluster://`` for TLS); the nodes are where the client first reads the
cluster's map (one reachable node is enough). ``?wait_replicas=N&wait_timeout_ms=T``:
a publish is acked only once ``WAIT N T``, on the connection that ran the script, says
N replicas of the topic's primary have it; otherwise the publisher gets
``unavailable`` (the message was stored, and may be delivered, but is not acked).

Keys and channels, for a topic T and the prefix P: ``P{T}:topic`` (seq and epoch),
``P{T}:stream`` (history), ``P{T}:presence`` (members), the sharded channels
``P{T}:ch`` (messages) and ``P{T}:jl`` (joins and leaves). The hash tag ``{T}`` puts
them in one slot, so the publish script (the same one as on one Redis) stays atomic,
and ``SPUBLISH`` sends a message over the shard that owns T only. ``P{nodes}:node:N``
are the nodes' liveness keys (one slot, so they are read with one ``MGET``).

Wildcards: sharded pub/sub has no patterns. A node with a wildcard subscription
``PSUBSCRIBE``s (classic pub/sub, any node) the classic channel ``P ch:T`` and keeps an
entry in the sorted set ``P{wildcards}`` (member its node name, score an expiry it
refreshes). While that set is not empty, every publish also does a classic
``PUBLISH``, which the cluster bus copies to every node: the cost of a wildcard is that
broadcast, paid only while some node has one. Publishers read the set at most every
``WILDCARD_LEASE`` seconds; a node's first wildcard subscription is acked only after
the entry was written and one lease (plus a margin) went by, so every publish that
starts after the ack does the classic ``PUBLISH``.

Faults: the listener keeps one sharded subscription connection per primary owning a
wanted topic (plus one classic connection for patterns). Any fault on any of them (a
lost connection, a slot moved away: the server ends that subscription with
``sunsubscribe``, an error) makes it drop them all, reload the cluster's map, and
subscribe again; every topic is then caught up from its stream by its last seq
handed back, so subscribers see no duplicate and no gap. A publish follows
``MOVED`` and ``ASK`` redirections (a slot being migrated); while the topic's shard
has no reachable primary (a failover) or its slot is half migrated (``TRYAGAIN``) it
raises BrokerUnavailable at once, and the publisher gets ``unavailable``.

Guarantee: with ``wait_replicas=N`` a publish is acked only once the topic's primary
wrote it (to its append-only file before answering, with ``appendfsync always``) and
``WAIT`` says N of its replicas have it; only then is it released: sent out live
(FANOUT_LUA, in seq order) and counted in the topic's ``pub``, where ``latest`` and
``since`` stop, as on one Redis (see broker_redis.py). No client sees a message that a
failover could lose and number again. An acked message survives the primary's crash
when the replica promoted in its place is one of those N (always so when N is the
number of replicas per primary) and the primary's restart. Without ``wait_replicas``
a failover may lose the last acked messages of the failed primary and number later
ones with their seqs again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.retry import Retry

from .broker import Publication
from .broker_redis import (
    _HAS_PROTOCOL,
    _JL,
    _PUBLISH_LUA,
    _STORE_LUA,
    _UNAVAILABLE,
    CLOSED_UNDER_US,
    HANDBACK_BATCH,
    HEALTH_INTERVAL,
    RedisBroker,
    _Lost,
    _text,
)
from .errors import BrokerUnavailable, ConfigError, StoreError
from .redis_url import CLUSTER_SCHEMES, parse_redis_url, redact
from .topics import is_wildcard

logger = logging.getLogger(__name__)

__all__ = ["ClusterBroker", "is_cluster_url"]

_FANOUT_PLAIN = "  redis.call('PUBLISH', channel, seq .. '|' .. epoch .. '|' .. data)\n"
_FANOUT_SHARDED = """  local msg = seq .. '|' .. epoch .. '|' .. data
  redis.call('SPUBLISH', channel, msg)
  local classic = ARGV[#KEYS + 3 + i]
  if classic then redis.call('PUBLISH', classic, msg) end
"""
assert _FANOUT_PLAIN in _PUBLISH_LUA
#: the publish script of one Redis, fanning out by SPUBLISH (and PUBLISH to the classic
#: channels appended to ARGV, one per item, while some node has a wildcard subscription)
PUBLISH_LUA = _PUBLISH_LUA.replace(_FANOUT_PLAIN, _FANOUT_SHARDED)
#: with wait_replicas the messages are stored by the store script of one Redis (no fan-out;
#: ``pub``, the last seq released, starts where seq was) and sent out once WAIT confirmed
#: them, by FANOUT_LUA, which raises ``pub``
STORE_LUA = _STORE_LUA

#: most seqs one FANOUT_LUA sends (what a lagging ``pub`` would add is left to the refills)
FANOUT_SPAN = 256
#: sends a topic's messages after ``pub`` (the last sent) up to the highest of the caller's,
#: in seq order: the caller's from ARGV, the others' (stored before, so confirmed with the
#: caller's) from the stream. KEYS: meta, stream; ARGV: channel, classic channel or '',
#: epoch, then seq, data of the caller's messages.
FANOUT_LUA = """
local meta, stream = KEYS[1], KEYS[2]
local channel, classic, epoch = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', meta, 'epoch') ~= epoch then return 0 end
local done = tonumber(redis.call('HGET', meta, 'pub') or '0')
local own = {}
local top = done
for i = 4, #ARGV, 2 do
  local s = tonumber(ARGV[i])
  own[s] = ARGV[i + 1]
  if s > top then top = s end
end
if top <= done then return 0 end
local first = math.max(done + 1, top - %d)
local stored = {}
if first < top then
  for _, e in ipairs(redis.call('XRANGE', stream, first .. '-0', (top - 1) .. '-0')) do
    stored[tonumber(string.match(e[1], '^(%%d+)'))] = e[2][2]
  end
end
local sent = 0
for s = first, top do
  local data = own[s] or stored[s]
  if data then
    local msg = s .. '|' .. epoch .. '|' .. data
    redis.call('SPUBLISH', channel, msg)
    if classic ~= '' then redis.call('PUBLISH', classic, msg) end
    sent = sent + 1
  end
end
redis.call('HSET', meta, 'pub', top)
return sent
""" % FANOUT_SPAN

#: seconds a publisher trusts what it read of the wildcard set
WILDCARD_LEASE = 0.5
#: a node's first wildcard subscription waits this long after writing its entry
WILDCARD_SETTLE = WILDCARD_LEASE * 1.5
#: a wildcard entry expires this long after its last refresh (a node that died)
WILDCARD_TTL = 10.0
#: redirections (MOVED, ASK, NOSCRIPT) followed by one publish
MAX_REDIRECTS = 4

_WILD_READ_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
_WILD_WRITE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""


_HISTORY_LUA = """
local m = redis.call('HMGET', KEYS[1], 'seq', 'pub')
return {m[1] or '', m[2] or '', redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}
"""
_EPOCH_AND_RANGE_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
return {epoch or '', redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[2], 'COUNT', ARGV[3])}
"""


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` (or ``rediss+cluster://``) URL."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def _redirect(exc: BaseException) -> Tuple[str, Optional[Tuple[str, int]]]:
    """What an error answer to a publish means: (kind, the node to go to)."""
    if isinstance(exc, MovedError):
        return "MOVED", (exc.host, int(exc.port))
    if isinstance(exc, AskError):
        return "ASK", (exc.host, int(exc.port))
    if isinstance(exc, NoScriptError):
        return "NOSCRIPT", None
    if isinstance(exc, (TryAgainError, ClusterDownError, ReadOnlyError, BusyLoadingError)):
        return "UNAVAILABLE", None
    words = str(exc).split()
    if words and words[0] in ("MOVED", "ASK") and len(words) == 3:
        host, _, port = words[2].rpartition(":")
        return words[0], (host, int(port))
    if words and words[0] in ("NOSCRIPT",):
        return "NOSCRIPT", None
    if words and words[0] in ("TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "READONLY", "LOADING"):
        return "UNAVAILABLE", None
    return "ERROR", None


class _Subscriptions:
    """The listener's connections: one per primary with sharded subscriptions, one classic."""

    def __init__(self, broker: "ClusterBroker") -> None:
        self.broker = broker
        self.shards: Dict[Tuple[str, int], Any] = {}
        self.classic: Any = None
        self.last_rx: Dict[int, float] = {}  # id(conn) -> last time it said anything
        self.ping_at: Dict[int, float] = {}  # id(conn) -> when a health PING went unanswered

    def connect(self) -> None:
        """Connections are made on demand (``shard``, ``classic_conn``)."""

    def _open(self, host: str, port: int) -> Any:
        conn = self.broker._connection_to(host, port)
        conn.connect()
        self.last_rx[id(conn)] = time.monotonic()
        return conn

    def shard(self, addr: Tuple[str, int]) -> Any:
        conn = self.shards.get(addr)
        if conn is None:
            conn = self.shards[addr] = self._open(*addr)
        return conn

    def classic_conn(self) -> Any:
        if self.classic is None:
            host, port = self.broker._any_primary()
            self.classic = self._open(host, port)
        return self.classic

    def all(self) -> List[Any]:
        conns = list(self.shards.values())
        if self.classic is not None:
            conns.append(self.classic)
        return conns

    def disconnect(self) -> None:
        for conn in self.all():
            try:
                conn.disconnect()
            except Exception:  # pragma: no cover - closing a dead socket
                pass
        self.shards = {}
        self.classic = None


class ClusterBroker(RedisBroker):
    """Seqs, history and fan-out in a Redis Cluster: each topic lives on the shard owning its slot."""

    def __init__(self, url: str, history_size: int = 1000, history_ttl: Optional[float] = None,
                 key_prefix: str = "wsb:", reconnect_max: float = 5.0, *, socket_timeout: float = 2.0,
                 connect_timeout: float = 1.0, max_connections: int = 16, presence_ttl: float = 30.0) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("the key prefix of a cluster broker may not hold { or } (hash tags)")
        if parse_redis_url(url).kind != "cluster":
            raise ConfigError("%s is not a redis+cluster:// URL" % redact(url))
        # _map_lock serialises reloads of the cluster map (_map_stale: reload before the next use)
        self._map_lock = threading.Lock()
        self._map_stale = False
        # _wild_lock guards the publishers' view of the wildcard set (_wild_on until _wild_until)
        self._wild_lock = threading.Lock()
        self._wild_on = False
        self._wild_until = 0.0
        super().__init__(url, history_size, history_ttl, key_prefix, reconnect_max,
                         socket_timeout=socket_timeout, connect_timeout=connect_timeout,
                         max_connections=max_connections, presence_ttl=presence_ttl)
        self._wild_key = key_prefix + "{wildcards}"
        # listener thread only
        self._shard_of: Dict[str, Tuple[str, int]] = {}  # sharded channel -> its connection's node
        self._unsubscribing: Dict[str, int] = {}  # sharded channel -> SUNSUBSCRIBE replies still due
        self._wild_registered = False
        self._wild_refresh_at = 0.0
        # when this node's wildcard entry was first written (monotonic); None while it has none
        self._wild_since: Optional[float] = None

    # ------------------------------------------------------------------ clients
    def _connect(self, common: Dict[str, Any], max_connections: int, command_timeout: float) -> None:
        c = self.target
        kwargs = {k: v for k, v in common.items() if k != "retry"}
        kwargs.update(c.options, username=c.username, password=c.password)
        if c.ssl:
            kwargs["ssl"] = True
        self._conn_kwargs = dict(kwargs)  # the listener's connections
        kwargs["socket_timeout"] = command_timeout  # a publish's WAIT may take wait_timeout_ms more
        try:
            # a bounded pool per node (redis-py's cluster takes no blocking pool here: one more
            # is "unavailable"; publishes come one at a time, under the hub's lock)
            cluster: Any = redis.RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in c.nodes], retry=Retry(NoBackoff(), 1),
                require_full_coverage=False, max_connections=max_connections, **kwargs)
        except (RedisClusterException, RedisError, OSError) as exc:
            raise ConfigError("cannot load the cluster's map from %s: %s; check the addresses and that "
                              "the cluster is up" % (",".join("%s:%d" % n for n in c.nodes), exc)) from exc
        self._redis: Any = cluster
        self._script = cluster.register_script(STORE_LUA if self.target.wait_replicas else PUBLISH_LUA)
        self._wild_read = cluster.register_script(_WILD_READ_LUA)
        self._wild_write = cluster.register_script(_WILD_WRITE_LUA)
        self._range_script = cluster.register_script(_EPOCH_AND_RANGE_LUA)
        self._history_script = cluster.register_script(_HISTORY_LUA)
        self._fanout_script = cluster.register_script(FANOUT_LUA)

    def _disconnect(self) -> None:
        self._redis.close()

    def _connection_to(self, host: str, port: int) -> Any:
        """A new RESP2 connection to one node (the listener's, outside any pool)."""
        kwargs = {k: v for k, v in self._conn_kwargs.items() if k != "ssl"}
        if _HAS_PROTOCOL:
            kwargs["protocol"] = 2
        cls = redis.SSLConnection if self._conn_kwargs.get("ssl") else redis.Connection
        return cls(host=host, port=port, **kwargs)

    def _refresh_map(self) -> None:
        """Reload which primary owns which slot; BrokerUnavailable when no node answers."""
        with self._map_lock:
            try:
                self._redis.nodes_manager.initialize()
            except (RedisClusterException, RedisError, OSError) as exc:
                raise BrokerUnavailable("redis cluster map unavailable: %s" % exc) from exc
            self._map_stale = False

    def _owner(self, slot: int) -> Any:
        if self._map_stale:
            self._refresh_map()
        try:
            return self._redis.nodes_manager.get_node_from_slot(slot)
        except (RedisClusterException, RedisError, IndexError) as exc:
            self._map_stale = True
            raise BrokerUnavailable("no primary for slot %d: %s" % (slot, exc)) from exc

    def _any_primary(self) -> Tuple[str, int]:
        primaries = self._redis.get_primaries()
        if not primaries:
            raise _Lost("the cluster map has no primary")
        node = primaries[0]
        return node.host, int(node.port)

    def _ping(self) -> None:
        self._refresh_map()
        for node in self._redis.get_primaries():
            self._redis.get_redis_connection(node).ping()

    # ------------------------------------------------------------------ keys
    def _tag(self, topic: str) -> str:
        return self.key_prefix + "{" + topic + "}:"

    def _meta(self, topic: str) -> str:
        return self._tag(topic) + "topic"

    def _stream(self, topic: str) -> str:
        return self._tag(topic) + "stream"

    def _presence_key(self, topic: str) -> str:
        return self._tag(topic) + "presence"

    def _node_key(self, node: str) -> str:
        return self.key_prefix + "{nodes}:node:" + node

    def _sharded(self, topic: str) -> str:
        return self._tag(topic) + "ch"

    def _name(self, pattern: str) -> str:
        if pattern.startswith(_JL):
            return self._tag(pattern[len(_JL):]) + "jl"
        if not is_wildcard(pattern):
            return self._sharded(pattern)
        return super()._name(pattern)  # a glob over the classic channels P ch:T

    def _classic_name(self, channel: bytes) -> bytes:
        """``P{T}:ch`` -> ``P ch:T`` and ``P{T}:jl`` -> ``P jl:T``, the names the parent parses."""
        prefix = self.key_prefix.encode("utf-8") + b"{"
        if channel.startswith(prefix) and channel.endswith((b"}:ch", b"}:jl")):
            topic = channel[len(prefix):-4]
            return (self._ch_prefix_b if channel.endswith(b"ch") else self._jl_prefix_b) + topic
        return channel

    def _publish_jl(self, pipe: Any, topic: str, payload: str) -> None:
        pipe.execute_command("SPUBLISH", self._tag(topic) + "jl", payload)

    # ------------------------------------------------------------------ publish
    def _wildcards_on(self) -> bool:
        """Whether some node has a wildcard subscription (read at most once per lease)."""
        now = time.monotonic()
        with self._wild_lock:
            if now < self._wild_until:
                return self._wild_on
            try:
                on = bool(self._wild_read(keys=[self._wild_key], args=[]))
            except (RedisError, RedisClusterException, OSError, *CLOSED_UNDER_US) as exc:
                logger.debug("wildcard set not read (%s): publishing to the classic channels too", exc)
                on = True
            self._wild_on, self._wild_until = on, now + WILDCARD_LEASE
            return on

    def publish(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        if not items:
            return []
        self._begin_publish(items)
        groups: Dict[int, List[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self._redis.keyslot(self._meta(item[0])), []).append(i)
        wild = self._wildcards_on()
        out: List[Tuple[int, str]] = [(0, "")] * len(items)
        # one script per slot: atomic per slot; a batch over several slots may be stored in part
        # when a later slot fails (then nothing is acked, as for a lost answer)
        for slot, indexes in groups.items():
            keys: List[str] = []
            args: List[Any] = [self.history_size, self._ttl_ms, secrets.token_hex(8)]
            for i in indexes:
                topic, data = items[i]
                keys += [self._meta(topic), self._stream(topic)]
                args += [self._sharded(topic), data]
            if wild and not self.target.wait_replicas:
                args += [self._ch_prefix + items[i][0] for i in indexes]
            res = self._eval_on_slot(slot, keys, args)
            for j, i in enumerate(indexes):
                out[i] = (int(res[2 * j]), _text(res[2 * j + 1]))
            if self.target.wait_replicas:
                self._fan_out(slot, [(items[i][0], items[i][1]) + out[i] for i in indexes], wild)
        self._cmd_ok = True
        return out

    def _fan_out(self, slot: int, stored: List[Tuple[str, str, int, str]], wild: bool) -> None:
        """Send out messages that replicas confirmed (wait_replicas): (topic, data, seq, epoch) each.

        Only confirmed messages go out live, so a failover cannot renumber a message a
        subscriber saw. FANOUT_LUA sends each topic's messages in seq order, others'
        stored before these too, so concurrent publishers cannot reorder them. If this
        fails, the messages are stored all the same (and acked): listeners get them with
        the topic's next message or when they reconnect.
        """
        by_topic: Dict[str, List[Any]] = {}
        for topic, data, seq, epoch in stored:
            by_topic.setdefault(topic, [epoch]).extend((seq, data))
        try:
            for topic, (epoch, *pairs) in by_topic.items():
                self._fanout_script(keys=[self._meta(topic), self._stream(topic)], args=[
                    self._sharded(topic), self._ch_prefix + topic if wild else "", epoch, *pairs])
        except (RedisError, RedisClusterException, OSError, *CLOSED_UNDER_US) as exc:
            self._map_stale = True
            logger.warning("stored %d message(s) but could not send them out now (%s): listeners "
                           "get them from the stream later", len(stored), exc)

    def _eval_on_slot(self, slot: int, keys: List[str], args: List[Any]) -> Any:
        """Run the publish script on the slot's primary (then WAIT), following redirections."""
        asking: Optional[Any] = None
        wait = self.target.wait_replicas
        for _ in range(MAX_REDIRECTS):
            node = asking if asking is not None else self._owner(slot)
            try:
                client = self._redis.get_redis_connection(node)
                pipe = client.pipeline(transaction=False)
                if asking is not None:
                    pipe.execute_command("ASKING")
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                if wait:
                    pipe.execute_command("WAIT", wait, self.target.wait_timeout_ms)
                answers = pipe.execute(raise_on_error=False)
            except _UNAVAILABLE as exc:
                # (CLOSED_UNDER_US among them: the map was reloaded meanwhile and closed it)
                self._map_stale = True
                raise self._failed("publish", exc) from exc
            except (RedisError, UnicodeError) as exc:
                raise StoreError("cannot store messages in redis: %s" % exc) from exc
            if asking is not None:
                answers = answers[1:]
            res = answers[0]
            if isinstance(res, Exception):
                kind, target = _redirect(res)
                if kind == "NOSCRIPT":
                    try:
                        client.script_load(self._script.script)
                    except _UNAVAILABLE as exc:
                        raise self._failed("publish", exc) from exc
                    continue
                if kind in ("MOVED", "ASK"):
                    assert target is not None
                    if kind == "MOVED":
                        self._refresh_map()
                        asking = None
                    else:
                        asking = self._redis.nodes_manager.get_node(host=target[0], port=target[1]) or \
                            ClusterNode(target[0], target[1])
                    continue
                if kind == "UNAVAILABLE":
                    self._map_stale = True
                    raise self._failed("publish", res)
                raise StoreError("cannot store messages in redis: %s" % res)
            if wait:
                got = answers[1]
                if isinstance(got, Exception) or int(got) < wait:
                    raise self._failed("publish", Exception(
                        "stored, but %s of %d replica(s) confirmed it within %d ms"
                        % (got if not isinstance(got, Exception) else "none", wait,
                           self.target.wait_timeout_ms)))
            return res
        raise self._failed("publish", Exception("slot %d kept moving" % slot))

    def _xrange(self, topic: str, seq: int, count: int) -> Sequence[Any]:
        """Stored entries after ``seq``; with wait_replicas none past ``pub`` (not released yet)."""
        try:
            last, pub, raw = self._history_script(
                keys=[self._meta(topic), self._stream(topic)], args=["%d-0" % (max(seq, 0) + 1), count])
        except _UNAVAILABLE as exc:
            raise self._failed("history read", exc) from exc
        except RedisError as exc:
            raise StoreError("cannot read history of %r from redis: %s" % (topic, exc)) from exc
        self._cmd_ok = True
        shown = self._shown(last or None, pub or None)
        return [(eid, dict(zip(fields[::2], fields[1::2]))) for eid, fields in raw
                if int(eid.split(b"-", 1)[0]) <= shown]

    def _epoch_and_range(self, topic: str, start: int, upto: int, count: int) -> Tuple[Any, Sequence[Any]]:
        # a script, not MULTI: a cluster pipeline's transaction hands back raw replies
        epoch, raw = self._range_script(keys=[self._meta(topic), self._stream(topic)],
                                        args=["%d-0" % (start + 1), "%d-0" % upto, count])
        entries = [(eid, dict(zip(fields[::2], fields[1::2]))) for eid, fields in raw]
        return (epoch or None), entries

    # ------------------------------------------------------------------ interest
    def wait_subscribed(self, pattern: str, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        if not super().wait_subscribed(pattern, timeout):
            return False
        if not is_wildcard(pattern) or pattern.startswith(_JL):
            return True
        # every publisher has read the wildcard set since this node's entry was written
        while True:
            since = self._wild_since
            now = time.monotonic()
            if since is not None and now >= since + WILDCARD_SETTLE:
                return True
            left = deadline - now
            if left <= 0 or self._stop.is_set():
                return False
            self._stop.wait(min(left, WILDCARD_SETTLE if since is None else since + WILDCARD_SETTLE - now))

    def _wild_update(self, wanted: Set[str]) -> None:
        """Keep this node's entry in the wildcard set while it has a wildcard subscription."""
        want = any(is_wildcard(p) and not p.startswith(_JL) for p in wanted)
        now = time.monotonic()
        if want and (not self._wild_registered or now >= self._wild_refresh_at):
            self._wild_write(keys=[self._wild_key], args=[self.node or "?", int(WILDCARD_TTL * 1000)])
            self._wild_refresh_at = now + WILDCARD_TTL / 4
            if not self._wild_registered:
                self._wild_registered = True
                self._wild_since = time.monotonic()
        elif not want and self._wild_registered:
            self._wild_registered = False
            self._wild_since = None
            try:
                self._redis.zrem(self._wild_key, self.node or "?")
            except _UNAVAILABLE as exc:
                logger.debug("wildcard entry not removed (it expires): %s", exc)

    # ------------------------------------------------------------------ listener
    def _new_sub_connection(self) -> Any:
        return _Subscriptions(self)

    def _on_connected(self) -> None:
        super()._on_connected()
        self._shard_of = {}
        self._unsubscribing = {}
        self._wild_registered = False
        self._wild_since = None

    def _serve(self, subs: Any) -> None:
        fresh = True
        while not self._stop.is_set():
            if self._dirty or fresh:
                self._reconcile(subs, catch_up_all=fresh)
                fresh = False
            elif self._wild_registered and time.monotonic() >= self._wild_refresh_at:
                with self._lock:
                    wanted = set(self._wanted)
                self._wild_update(wanted)
            batch: List[Publication] = []
            got = 0
            now = time.monotonic()
            try:
                for conn in subs.all():
                    n = 0
                    while got < HANDBACK_BATCH and conn.can_read(0):
                        got += 1
                        n += 1
                        self._on_cluster_reply(conn.read_response(), batch)
                    if n:
                        subs.last_rx[id(conn)] = now
                        subs.ping_at.pop(id(conn), None)
            finally:
                if batch:
                    self._hand_back(batch)
            if got:
                self._listener_up = True
                continue
            wait = HEALTH_INTERVAL
            for conn in subs.all():
                key = id(conn)
                sent = subs.ping_at.get(key)
                if sent is not None:
                    if now - sent > self.socket_timeout:
                        raise _Lost("no answer to PING within %.1f s" % self.socket_timeout)
                    wait = min(wait, sent + self.socket_timeout - now)
                elif now - subs.last_rx.get(key, now) >= HEALTH_INTERVAL:
                    conn.send_command("PING", "h")
                    subs.ping_at[key] = now
                    wait = min(wait, self.socket_timeout)
                else:
                    wait = min(wait, subs.last_rx.get(key, now) + HEALTH_INTERVAL - now)
            if self._wild_registered:
                wait = min(wait, self._wild_refresh_at - now)
            if self._dirty:
                continue
            socks: List[Any] = []
            for conn in subs.all():
                sock = getattr(conn, "_sock", None)
                if sock is not None:
                    pending = getattr(sock, "pending", None)
                    if pending is not None and pending():
                        wait = 0
                    socks.append(sock)
            self._wait_readable(socks, max(0.0, wait))

    def _reconcile(self, subs: Any, catch_up_all: bool) -> None:  # type: ignore[override]
        """Bring the subscriptions in line with the hub's interest; fence new ones per connection."""
        wanted, by_name, globs, gone, new = self._take_interest()
        for n in gone:
            if n in globs:
                subs.classic_conn().send_command("PUNSUBSCRIBE", n)
            else:
                addr = self._shard_of.pop(n, None)
                if addr is not None and addr in subs.shards:
                    subs.shards[addr].send_command("SUNSUBSCRIBE", n)
                    self._unsubscribing[n] = self._unsubscribing.get(n, 0) + 1
                else:
                    self._unconfirmed.pop(n, None)  # its connection is gone: no reply is due
            del self._sent[n]  # (replies still due stay counted: a new subscribe waits past them)
        if gone:
            with self._cond:
                self._active_names.difference_update(gone)
        for n, patterns in by_name.items():
            if n in self._sent:
                self._sent[n] = patterns
        for n in new:
            if n in globs:
                subs.classic_conn().send_command("PSUBSCRIBE", n)
            else:
                try:
                    node = self._owner(self._redis.keyslot(n))
                except BrokerUnavailable as exc:
                    raise _Lost(str(exc)) from exc
                addr = (node.host, int(node.port))
                subs.shard(addr).send_command("SSUBSCRIBE", n)  # one per command: one slot each
                self._shard_of[n] = addr
            self._sent[n] = by_name[n]
            self._unconfirmed[n] = self._unconfirmed.get(n, 0) + 1
        self._recompute_covering()
        if gone:
            self._forget_uncovered(wanted)
        self._wild_update(wanted)
        fence: Set[str] = set(self._need)
        if catch_up_all:
            fence.update(self._last)
        per_conn: Dict[int, Tuple[Any, List[str]]] = {}
        for topic in sorted(fence):
            addr = self._shard_of.get(self._sharded(topic))
            conn = subs.shards[addr] if addr is not None else subs.classic_conn()
            per_conn.setdefault(id(conn), (conn, []))[1].append(topic)
        for conn, topics in per_conn.values():
            self._fence_no += 1
            token = b"f%d" % self._fence_no
            self._fences[token] = topics
            conn.send_command("PING", token)

    def _on_cluster_reply(self, resp: Any, batch: List[Publication]) -> None:
        if isinstance(resp, list) and resp:
            kind = resp[0]
            if kind == b"smessage":
                self._on_message(self._classic_name(resp[1]), resp[2], batch)
                return
            if kind == b"ssubscribe":
                self._on_confirmed(_text(resp[1]))
                return
            if kind == b"sunsubscribe":
                name = _text(resp[1])
                left = self._unsubscribing.get(name, 0)
                if left > 0:
                    if left == 1:
                        del self._unsubscribing[name]
                    else:
                        self._unsubscribing[name] = left - 1
                    return
                # the server ended it: the slot moved to another shard
                raise _Lost("the shard of %s gave up its slot" % name)
        elif isinstance(resp, Exception):
            raise resp
        self._on_reply(resp, batch)

    def status(self) -> dict:
        out = super().status()
        out.update(kind="redis-cluster", wait_replicas=self.target.wait_replicas)
        return out
