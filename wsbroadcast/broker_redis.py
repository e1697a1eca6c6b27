"""A broker shared by several nodes through one Redis server (the extra ``wsbroadcast[redis]``).

Keys, for a topic T and the prefix P (default ``wsb:``):

- ``P topic:T`` a hash with ``seq`` (the last seq) and ``epoch``. Both live in one
  key so that they are lost together: if Redis loses the hash (no persistence,
  FLUSHALL, eviction), the next publish starts seq 1 under a new epoch, never an
  old epoch with restarted seqs. With ``wait_replicas`` also ``pub``, the last seq
  released (see below).
- ``P stream:T`` a stream of the retained history; the entry id of seq S is
  ``S-0``, fields ``data`` (the JSON text) and ``time`` (Redis time, ms). When a
  topic gets a new epoch its old stream is deleted.
- ``P ch:T`` the pub/sub channel; a message is ``seq|epoch|data``.
- ``P presence:T`` a hash of the members of T on every node: field the client id
  (``node-N``), value its client object (JSON). ``P node:N`` exists while node N is
  alive: each node sets its own with a time to live (``presence_ttl``) and refreshes it;
  members of a node whose key is gone are left out of answers (and removed).
- ``P jl:T`` the pub/sub channel of T's joins and leaves, ``J|node|client`` or
  ``L|node|client``, subscribed only by nodes with a join/leave listener of T.

Presence writes and join/leave events are queued by the hub (``member``) and sent by
the thread ``wsbroadcast-redis-presence``, or by ``publish`` before its own script when
some are still queued: a node's events therefore reach Redis, and every listener, in
order with its messages (one subscription connection per node receives both).

Publishing is one EVALSHA per batch (the script below); it is atomic, so a
publish is stored and published completely or not at all, and the caller acks
only after it returned. Retention: ``history_size`` by ``XADD MAXLEN`` (exact);
``history_ttl`` on publish (the script removes the expired head of the topic's
stream) and by ``PEXPIRE`` of the stream key, so a topic that stays quiet loses
its whole expired history without any background thread.

Fan-out: one pub/sub connection per node, owned by the thread ``wsbroadcast-redis``
(started by ``start``, joined by ``close``). It subscribes only to what the hub
declared interest in (``SUBSCRIBE`` for topics, ``PSUBSCRIBE`` for wildcard
patterns), and hands publications back to the hub per topic in seq order with no
gap and no duplicate: it remembers the last seq handed back per topic, drops
what it already handed back (a message may arrive via a channel and a pattern)
and refills a hole from the stream. ``interest`` never blocks: it records the
wanted state under a small lock and wakes the thread (a socketpair), which
reconciles its subscriptions with it. A ``PING`` sent after new subscriptions
acts as a fence: when its answer arrives, every message published before the
subscriptions took effect is known, and the topics a subscriber was acked for
are caught up from the stream (``HMGET`` + ``XRANGE``).

Faults: commands use short socket timeouts and no retries, so a publish while
Redis is away raises :class:`~wsbroadcast.errors.BrokerUnavailable` at once.
The listener reconnects with exponential backoff and jitter (up to
``reconnect_max`` seconds), resubscribes, and catches up every topic it knows.
``healthy`` is False from the first failure until the listener is back and the
commands succeed again.

With ``?wait_replicas=N`` in the URL (see redis_url.py) a publish is three steps: the
script without its PUBLISH, then ``WAIT N T`` on the same connection, then (N replicas
have the batch) a release script that raises ``pub`` and PUBLISHes; only then is it
acked. ``latest`` answers ``pub`` and ``since`` reads no further, so nothing a client
can see exists on the primary alone: a failover to a replica (Sentinel promotes the
one with the most data) cannot take back a seq a subscriber saw, nor number it again.
A seq stored whose WAIT failed is released with the next one shown (that one's WAIT
covers every write before it), by the refill of the nodes that receive it.

A publish whose answer is lost (a timeout after Redis ran the script) raises
BrokerUnavailable although the message was stored: it is never acked, but it
is delivered. If Redis restarts with a lost tail of its append-only file
(``appendfsync everysec``), seqs may be reused under the same epoch; use
``appendfsync always`` where that matters.
"""

from __future__ import annotations

import inspect
import logging
import random
import secrets
import select
import socket
import threading
import time
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, ReadOnlyError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError

from .broker import Broker, Handler, Publication
from .envelope import parse_json, strict_text
from .errors import BrokerUnavailable, StoreError
from .logutil import RateLimitedLog
from .presence import MAX_LISTED, Member
from .redis_url import parse_redis_url, redact
from .store import ByteBound, StoredMessage
from .topics import is_wildcard, pattern_matches

logger = logging.getLogger(__name__)

__all__ = ["RedisBroker"]

#: one publish batch: per item KEYS (meta hash, stream), ARGV (channel, data)
_PUBLISH_LUA = """
local size = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local fresh = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS / 2 do
  local meta = KEYS[2 * i - 1]
  local stream = KEYS[2 * i]
  local channel = ARGV[2 * i + 2]
  local data = ARGV[2 * i + 3]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    -- a new numbering: whatever history is left belongs to the old one
    epoch = fresh
    redis.call('HSET', meta, 'epoch', epoch)
    redis.call('HDEL', meta, 'seq', 'pub')
    redis.call('DEL', stream)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  if size > 0 and ttl ~= 0 then
    redis.call('XADD', stream, 'MAXLEN', size, seq .. '-0', 'data', data, 'time', now)
    if ttl > 0 then
      local cutoff = now - ttl
      for _ = 1, 16 do
        local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
        local upto = nil
        local more = true
        for _, e in ipairs(head) do
          if tonumber(e[2][4]) < cutoff then
            upto = e[1]
          else
            more = false
            break
          end
        end
        if upto == nil then break end
        local s = tonumber(string.match(upto, '^(%d+)'))
        redis.call('XTRIM', stream, 'MINID', (s + 1) .. '-0')
        if not more then break end
      end
      redis.call('PEXPIRE', stream, ttl)
    end
  end
  redis.call('PUBLISH', channel, seq .. '|' .. epoch .. '|' .. data)
  out[#out + 1] = seq
  out[#out + 1] = epoch
end
return out
"""

#: with wait_replicas: the publish script without its PUBLISH (stored, not yet shown); a
#: topic's ``pub``, the last seq released, starts at the seq it had before
_STORE_LUA = _PUBLISH_LUA.replace(
    "  local seq = redis.call('HINCRBY', meta, 'seq', 1)\n",
    "  if redis.call('HEXISTS', meta, 'pub') == 0 then\n"
    "    redis.call('HSET', meta, 'pub', redis.call('HGET', meta, 'seq') or 0)\n"
    "  end\n"
    "  local seq = redis.call('HINCRBY', meta, 'seq', 1)\n").replace(
    "  redis.call('PUBLISH', channel, seq .. '|' .. epoch .. '|' .. data)\n", "")

#: with wait_replicas, once replicas have a batch: per item KEYS (meta hash), ARGV (channel,
#: seq, epoch, data); raises the topic's ``pub`` to seq and publishes, unless the topic has
#: had a new numbering since (its data was lost)
_RELEASE_LUA = """
for i = 1, #KEYS do
  local meta = KEYS[i]
  local seq = ARGV[4 * i - 2]
  local epoch = ARGV[4 * i - 1]
  if redis.call('HGET', meta, 'epoch') == epoch then
    local pub = tonumber(redis.call('HGET', meta, 'pub') or '0')
    if tonumber(seq) > pub then
      redis.call('HSET', meta, 'pub', seq)
    end
    redis.call('PUBLISH', ARGV[4 * i - 3], seq .. '|' .. epoch .. '|' .. ARGV[4 * i])
  end
end
return #KEYS
"""

#: entries read from a stream per refill round trip
REFILL_PAGE = 500
#: pub/sub replies handled before the collected publications are handed back
HANDBACK_BATCH = 512
#: channels per SUBSCRIBE / PSUBSCRIBE / UNSUBSCRIBE command
SUBSCRIBE_CHUNK = 256
#: seconds without traffic on the subscription before it is checked with a PING
HEALTH_INTERVAL = 1.0
#: first reconnect delay (doubles up to reconnect_max; jittered)
RECONNECT_MIN = 0.1

#: redis-py >= 5 takes ``protocol`` (and 8 defaults to 3)
_HAS_PROTOCOL = "protocol" in inspect.signature(redis.Connection.__init__).parameters or "protocol" in (
    inspect.signature(getattr(redis.connection, "AbstractConnection", redis.Connection).__init__).parameters)

_GLOB_SPECIALS = "\\*?[]"

#: what a redis-py call raises when another thread closed its connection under it (the
#: cluster client resets a node's connections after a failure, in use or not): ValueError
#: ("I/O operation on closed file") or AttributeError (the parser's buffer is gone); the
#: calls guarded by it are redis-py's only
CLOSED_UNDER_US = (ValueError, AttributeError)
#: errors meaning "not now" (a cluster's too: a shard failing over, a slot moving; a
#: connection closed under the call)
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError,
                ClusterError, TryAgainError, RedisClusterException, *CLOSED_UNDER_US)
#: a wanted "pattern" standing for the join/leave channel of the topic that follows it
_JL = "\0jl\0"
#: presence writes queued at most while Redis does not take them (then a full resync)
MAX_PRESENCE_PENDING = 100000
_presence_log = RateLimitedLog(logger)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIALS else c for c in text)


def _reason(exc: BaseException) -> str:
    """What went wrong, for logs and errors (a Sentinel's error lists every connection's settings)."""
    if isinstance(exc, MasterNotFoundError):
        return "no Sentinel named a primary (unreachable, or the failover is not over)"
    return str(exc)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _Lost(Exception):
    """The subscription connection is unusable; reconnect."""


class RedisBroker(Broker):
    """Seqs, history and fan-out in one Redis server, shared by every node using it."""

    delivers_locally = False
    #: with wait_replicas: publish releases (PUBLISH, ``pub``) only after WAIT, and readers stop
    #: at ``pub``; a subclass publishing otherwise sets False
    releases_after_wait = True

    def __init__(
        self,
        url: str,
        history_size: int = 1000,
        history_ttl: Optional[float] = None,
        key_prefix: str = "wsb:",
        reconnect_max: float = 5.0,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        max_connections: int = 16,
        presence_ttl: float = 30.0,
    ) -> None:
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 0:
            raise ValueError("history_size must be an int >= 0, got %r" % (history_size,))
        if history_ttl is not None and (isinstance(history_ttl, bool) or history_ttl < 0):
            raise ValueError("history_ttl must be None or a number >= 0, got %r" % (history_ttl,))
        if reconnect_max <= 0:
            raise ValueError("reconnect_max must be > 0")
        self.url = url
        self.target = parse_redis_url(url)  # ConfigError (a ValueError) when malformed
        self._where = redact(url)
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.key_prefix = key_prefix
        self.reconnect_max = float(reconnect_max)
        self.socket_timeout = socket_timeout
        self._ttl_ms = -1 if history_ttl is None else int(history_ttl * 1000)
        # a publish's WAIT blocks its connection up to wait_timeout_ms: its answer is due after that
        cmd_timeout = socket_timeout + (self.target.wait_timeout_ms / 1000.0 if self.target.wait_replicas else 0)
        self._ch_prefix = key_prefix + "ch:"
        self._ch_prefix_b = self._ch_prefix.encode("utf-8")
        self._jl_prefix = key_prefix + "jl:"
        self._jl_prefix_b = self._jl_prefix.encode("utf-8")
        if presence_ttl <= 0:
            raise ValueError("presence_ttl must be > 0")
        self.presence_ttl = float(presence_ttl)
        # _pending_lock guards _pending (presence writes and events not sent yet), _queued
        # (how many were ever queued), _resync and _lost_upto (a resync needs a snapshot
        # taken after the _lost_upto-th change: changes up to it may be lost);
        # never held during I/O. _send_lock is held while they are sent, by the presence
        # thread or by publish (which sends them ahead of its messages, holding the hub's
        # lock: so the hub's lock is never taken with _send_lock held).
        self._pending_lock = threading.Lock()
        self._pending: List[Tuple[str, str, str, str]] = []  # (op, topic, client id, text)
        self._queued = 0
        self._resync = True
        self._lost_upto = 0
        self._send_lock = threading.Lock()
        self._snapshot: Any = None  # the hub's members, for a resync (takes the hub lock)
        self._presence_wake = threading.Event()
        self._presence_thread: Optional[threading.Thread] = None
        common: Dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
                                  "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
        if _HAS_PROTOCOL:
            common["protocol"] = 2  # RESP2 replies everywhere (redis-py 8 defaults to RESP3)
        self._connect(common, max_connections, cmd_timeout)
        self._deferred = bool(self.target.wait_replicas) and self.releases_after_wait
        self._handler: Optional[Handler] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # _lock guards _wanted, _needs, _dirty and _changes: the hub's declared interest,
        # not yet applied by the listener, and how many times the wanted set changed.
        # Never held during I/O or while calling the handler.
        self._lock = threading.Lock()
        self._wanted: Set[str] = set()
        self._needs: Dict[str, int] = {}
        self._dirty = False
        self._changes = 0
        # _cond (its own lock) guards _active_names (confirmed subscriptions, by Redis name)
        # and _in_effect (the wanted patterns the listener has applied to a confirmed
        # name: from then on each of their messages is handed back; what wait_subscribed
        # waits for, as several patterns share one name, e.g. d.* and d.>)
        self._cond = threading.Condition()
        self._active_names: Set[str] = set()
        self._in_effect: FrozenSet[str] = frozenset()
        self._applied = 0  # the _changes that _in_effect reflects
        # listener thread only
        self._sent: Dict[str, Set[str]] = {}  # redis name -> wanted patterns mapped to it
        self._unconfirmed: Dict[str, int] = {}  # redis name -> (P)SUBSCRIBE replies still due
        self._taken = 0  # the _changes of the interest last taken
        self._covering: List[str] = []  # wanted patterns whose subscription is confirmed
        self._last: Dict[str, int] = {}  # topic -> last seq handed back
        self._epochs: Dict[str, str] = {}  # topic -> epoch of _last
        self._need: Dict[str, int] = {}  # topic -> acked seq, waiting for the next fence
        self._fences: Dict[bytes, List[str]] = {}
        self._fence_no = 0
        # health and counters (plain attribute writes; read by status())
        self._listener_up = False
        self._cmd_ok = True
        self.reconnects = 0
        self.refilled = 0
        self.duplicates = 0

    def _connect(self, common: Dict[str, Any], max_connections: int, command_timeout: float) -> None:
        """Make the command client (``_redis``, ``_script``) and the subscription connection factory."""
        # commands (publish, reads, refills): a bounded pool, waits at most the socket timeout;
        # the subscription connection (the listener thread's, one at a time) is made by _sub_pool
        self._pool, self._sub_pool, self._close_pools = self.target.open_pools(
            common, max_connections=max_connections, timeout=self.socket_timeout, command_timeout=command_timeout)
        self._redis = redis.Redis(connection_pool=self._pool)
        self._script = self._redis.register_script(_PUBLISH_LUA)
        self._store = self._redis.register_script(_STORE_LUA)
        self._release = self._redis.register_script(_RELEASE_LUA)

    def _disconnect(self) -> None:
        """Close every connection of the command client and the subscription factory."""
        self._pool.disconnect()
        self._sub_pool.disconnect()
        self._close_pools()

    # ------------------------------------------------------------------ keys
    def _meta(self, topic: str) -> str:
        return self.key_prefix + "topic:" + topic

    def _stream(self, topic: str) -> str:
        return self.key_prefix + "stream:" + topic

    def _presence_key(self, topic: str) -> str:
        return self.key_prefix + "presence:" + topic

    def _node_key(self, node: str) -> str:
        return self.key_prefix + "node:" + node

    def _name(self, pattern: str) -> str:
        """The Redis channel (topic) or glob (wildcard pattern) of a pattern."""
        if pattern.startswith(_JL):
            return self._jl_prefix + pattern[len(_JL):]
        if not is_wildcard(pattern):
            return self._ch_prefix + pattern
        tokens = ["*" if t in ("*", ">") else _glob_escape(t) for t in pattern.split(".")]
        return _glob_escape(self._ch_prefix) + ".".join(tokens)

    # ------------------------------------------------------------------ commands
    def _failed(self, what: str, exc: BaseException) -> BrokerUnavailable:
        if self._cmd_ok:
            logger.warning("redis %s: %s failed: %s", self._where, what, _reason(exc))
        self._cmd_ok = False
        return BrokerUnavailable("redis is unavailable: %s" % _reason(exc))

    def _begin_publish(self, items: Sequence[Tuple[str, str]]) -> None:
        """Check the items (StoreError); send this node's queued joins and leaves first."""
        for item in items:
            if (not isinstance(item, (tuple, list)) or len(item) != 2
                    or not isinstance(item[0], str) or not isinstance(item[1], str)):
                raise StoreError("publish items must be (topic: str, data: str) tuples")
        if self._pending:
            with self._send_lock:
                self._send_presence(False)  # this node's joins and leaves go first

    def publish(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        if not items:
            return []
        self._begin_publish(items)
        keys: List[str] = []
        args: List[Any] = [self.history_size, self._ttl_ms, secrets.token_hex(8)]
        for topic, data in items:
            keys.append(self._meta(topic))
            keys.append(self._stream(topic))
            args.append(self._ch_prefix + topic)
            args.append(data)
        wait = self.target.wait_replicas
        try:
            if not wait:
                res = self._script(keys=keys, args=args)
            else:
                # stored, then WAIT on the same connection (its writes reached `wait` replicas),
                # then released: nothing is shown (published, counted by latest, read by since)
                # that a failover to a replica could take back and number again
                pipe = self._redis.pipeline(transaction=False)
                self._store(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", wait, self.target.wait_timeout_ms)
                res, replicas = pipe.execute()
                if int(replicas) < wait:
                    raise self._failed("publish", RedisTimeoutError(
                        "%d of the %d replica(s) asked for (wait_replicas) had it within %d ms"
                        % (int(replicas), wait, self.target.wait_timeout_ms)))
                release: List[Any] = []
                for i, item in enumerate(items):
                    release.extend((self._ch_prefix + item[0], res[2 * i], res[2 * i + 1], item[1]))
                self._release(keys=keys[::2], args=release)
        except _UNAVAILABLE as exc:
            raise self._failed("publish", exc) from exc
        except (RedisError, UnicodeError) as exc:
            raise StoreError("cannot store messages in redis: %s" % exc) from exc
        self._cmd_ok = True
        return [(int(res[i]), _text(res[i + 1])) for i in range(0, len(res), 2)]

    def _shown(self, seq: Any, pub: Any) -> int:
        """The last seq of a topic that readers see: with wait_replicas the last released."""
        if self._deferred and pub is not None:
            return int(pub)
        return int(seq) if seq is not None else 0

    def latest(self, topic: str) -> Tuple[int, str]:
        meta = self._meta(topic)
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hsetnx(meta, "epoch", secrets.token_hex(8))
            pipe.hmget(meta, ["seq", "epoch", "pub"])
            _, (seq, epoch, pub) = pipe.execute()
        except _UNAVAILABLE as exc:
            raise self._failed("latest", exc) from exc
        except RedisError as exc:
            raise StoreError("cannot read %r from redis: %s" % (topic, exc)) from exc
        self._cmd_ok = True
        return self._shown(seq, pub), _text(epoch)

    @staticmethod
    def _entries(topic: str, raw: Sequence[Any]) -> List[StoredMessage]:
        out = []
        for entry_id, fields in raw:
            seq = int(entry_id.split(b"-", 1)[0])
            out.append(StoredMessage(topic, seq, strict_text(fields[b"data"].decode("utf-8")),
                                     int(fields.get(b"time", 0)) / 1000.0))
        return out

    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        if limit <= 0:
            return []
        if max_bytes is None:
            return self._entries(topic, self._xrange(topic, seq, limit))
        # Bounded by bytes: one message first, then batches sized from the average
        # so far, so that what is read past the bound stays near one message.
        bound = ByteBound(max_bytes)
        out: List[StoredMessage] = []
        count = 1
        while len(out) < limit:
            ask = min(count, limit - len(out))
            batch = self._entries(topic, self._xrange(topic, seq, ask))
            for m in batch:
                if not bound.admit(m.data):
                    return out
                out.append(m)
            if len(batch) < ask or bound.full:
                break
            seq = out[-1].seq
            left = bound.left if bound.left is not None else max_bytes  # set: max_bytes is given
            count = max(1, left // max(1, (max_bytes - left) // len(out)))
        return out

    def _xrange(self, topic: str, seq: int, count: int) -> Sequence[Any]:
        raw: Any
        try:
            if self._deferred:  # up to the last released seq only
                pipe = self._redis.pipeline(transaction=True)
                pipe.hmget(self._meta(topic), ["seq", "pub"])
                pipe.xrange(self._stream(topic), "%d-0" % (max(seq, 0) + 1), "+", count=count)
                (last, pub), raw = pipe.execute()
                shown = self._shown(last, pub)
                raw = [e for e in raw if int(e[0].split(b"-", 1)[0]) <= shown]
            else:
                raw = self._redis.xrange(self._stream(topic), "%d-0" % (max(seq, 0) + 1), "+", count=count)
        except _UNAVAILABLE as exc:
            raise self._failed("history read", exc) from exc
        except RedisError as exc:
            raise StoreError("cannot read history of %r from redis: %s" % (topic, exc)) from exc
        self._cmd_ok = True
        return raw

    def oldest(self, topic: str) -> int:
        try:
            raw: Any = self._redis.xrange(self._stream(topic), "-", "+", count=1)
        except _UNAVAILABLE as exc:
            raise self._failed("history read", exc) from exc
        except RedisError as exc:
            raise StoreError("cannot read history of %r from redis: %s" % (topic, exc)) from exc
        self._cmd_ok = True
        return int(raw[0][0].split(b"-", 1)[0]) if raw else 0

    # ------------------------------------------------------------------ interest
    def interest(self, pattern: str, on: bool, acked: Optional[int] = None) -> None:
        with self._lock:
            if on:
                if pattern not in self._wanted:
                    self._wanted.add(pattern)
                    self._changes += 1
                if acked is not None and not is_wildcard(pattern):
                    self._needs[pattern] = acked
            else:
                if pattern in self._wanted:
                    self._wanted.discard(pattern)
                    self._changes += 1
                self._needs.pop(pattern, None)
            self._dirty = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake (full) or closing

    def wait_subscribed(self, pattern: str, timeout: float = 2.0) -> bool:
        """Block until this node's Redis subscription for ``pattern`` is in effect.

        Every publication after that reaches this node. False on timeout (e.g.
        Redis is away). Not to be called with the hub's lock held. The listener must
        have applied every change of interest made before the call: a subscription
        still in effect but about to be dropped (withdrawn, then wanted again) is not.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            changes = self._changes
        with self._cond:
            while self._applied < changes or pattern not in self._in_effect:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._cond.wait(left)
            return True

    # ------------------------------------------------------------------ presence
    def member(self, topic: str, member: Member, on: bool) -> None:
        with self._pending_lock:
            self._queued += 1
            if len(self._pending) >= MAX_PRESENCE_PENDING:
                self._pending = []
                self._resync = True
                self._lost_upto = self._queued
            else:
                self._pending.append(("set" if on else "del", topic, member.conn, member.text))
        self._presence_wake.set()

    def presence_source(self, snapshot: Any) -> None:
        self._snapshot = snapshot

    def join_leave_interest(self, topic: str, on: bool) -> None:
        self.interest(_JL + topic, on)

    def wait_join_leave(self, topic: str, timeout: float) -> bool:
        return self.wait_subscribed(_JL + topic, timeout)

    def _take_snapshot(self) -> Optional[Tuple[int, List[Tuple[str, str, str]]]]:
        """When a resync is due: (how many changes it holds, every member of this node).
        Taken without _send_lock held: it takes the hub's lock."""
        with self._pending_lock:
            if not self._resync or self._snapshot is None:
                return None
            upto = self._queued  # these changes were made under the hub's lock before this
        return upto, self._snapshot()  # (later ones are queued, and go after it)

    def _send_presence(self, refresh: bool, taken: Optional[Tuple[int, List[Tuple[str, str, str]]]] = None
                       ) -> None:
        """Send the queued presence writes and events (with _send_lock held); on a refresh
        with a resync due, every member again from ``taken`` (``_take_snapshot``)."""
        with self._pending_lock:
            items, self._pending = self._pending, []
            resync = refresh and self._resync and (
                self._snapshot is None or (taken is not None and taken[0] >= self._lost_upto))
            if resync:
                self._resync = False
        if resync and taken is not None:
            # every member again (no events), then what is queued, in order: it may hold
            # changes the snapshot has not (the last of a member's wins, as in the hub)
            items = [("sync", t, c, x) for t, c, x in taken[1]] + items
        if not items and not refresh:
            return
        node = self.node
        pipe = self._redis.pipeline(transaction=False)
        for op, topic, conn, text in items:
            key = self._presence_key(topic)
            if op == "sync":
                pipe.hset(key, conn, text)
            elif op == "set":
                pipe.hset(key, conn, text)
                self._publish_jl(pipe, topic, "J|%s|%s" % (node, text))
            elif op == "del":
                pipe.hdel(key, conn)
                self._publish_jl(pipe, topic, "L|%s|%s" % (node, text))
        if refresh:
            pipe.set(self._node_key(node), "1", px=int(self.presence_ttl * 1000))
        try:
            pipe.execute()
        except (RedisError, OSError) as exc:
            _presence_log.warning("redis %s: presence not written: %s", self._where, _reason(exc))
            with self._pending_lock:
                self._resync = True  # written again in full once redis answers
                self._lost_upto = self._queued

    def _publish_jl(self, pipe: Any, topic: str, payload: str) -> None:
        """Queue on ``pipe`` the publish of a join or leave of ``topic``."""
        pipe.publish(self._jl_prefix + topic, payload)

    def _run_presence(self) -> None:
        interval = self.presence_ttl / 3
        next_refresh = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            refresh = now >= next_refresh
            if refresh:
                next_refresh = now + interval
            taken = self._take_snapshot() if refresh else None
            with self._send_lock:
                self._send_presence(refresh, taken)
            self._presence_wake.wait(max(0.0, next_refresh - time.monotonic()))
            self._presence_wake.clear()

    def presence(self, topic: str) -> List[Tuple[int, List[str], List[Member]]]:
        key = self._presence_key(topic)
        own = str(self.node).encode()
        try:
            raw: Any = self._redis.hgetall(key)
            by_node: Dict[bytes, List[Tuple[bytes, bytes]]] = {}
            for conn, text in raw.items():
                node = conn.split(b"-", 1)[0]
                if node != own:
                    by_node.setdefault(node, []).append((conn, text))
            if not by_node:
                return []
            nodes = list(by_node)
            node_b = self._node_key("").encode()  # the field's node as it is, any bytes
            alive: Any = self._redis.mget([node_b + n for n in nodes])
            dead = [c for n, a in zip(nodes, alive) if a is None for c, _t in by_node[n]]
            if dead:
                self._redis.hdel(key, *dead)  # type: ignore[arg-type]  # bytes field names
        except _UNAVAILABLE as exc:
            raise self._failed("presence", exc) from exc
        except RedisError as exc:
            raise BrokerUnavailable("cannot read presence from redis: %s" % exc) from exc
        out = []
        for node, up in zip(nodes, alive):
            if up is None:
                continue
            members = []
            for conn, text_b in by_node[node]:
                try:
                    text = text_b.decode("utf-8")
                    obj = parse_json(text)
                    members.append(Member(conn.decode("utf-8"), obj.get("sub"), float(obj["joined"]), text))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # not written by this version
            members.sort(key=lambda m: m.joined)
            subs = list({m.sub for m in members if m.sub is not None})
            out.append((len(members), subs, members[:MAX_LISTED]))
        return out

    # ------------------------------------------------------------------ health
    @property
    def healthy(self) -> bool:
        if self._thread is None:
            return self._cmd_ok
        return self._listener_up and self._cmd_ok

    def status(self) -> dict:
        out = {
            "kind": "redis",
            "url": self._where,
            "healthy": self.healthy,
            "subscribed": self._listener_up,
            "subscriptions": len(self._active_names),
            "topics": len(self._last),
            "reconnects": self.reconnects,
            "refilled": self.refilled,
        }
        if self.target.kind == "sentinel":
            # the primary the commands' pool last connected to, as Sentinel named it
            address = getattr(self._pool, "master_address", None)
            out.update(kind="redis-sentinel", wait_replicas=self.target.wait_replicas,
                       primary="%s:%s" % tuple(address) if address else None)
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self, handler: Handler) -> None:
        if self._thread is not None:
            return
        if self._closed:
            raise StoreError("redis broker is closed")
        self._handler = handler
        self._thread = threading.Thread(target=self._run, name="wsbroadcast-redis", daemon=True)
        self._thread.start()
        self._presence_thread = threading.Thread(target=self._run_presence,
                                                 name="wsbroadcast-redis-presence", daemon=True)
        self._presence_thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        self._presence_wake.set()
        for thread in (self._thread, self._presence_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(self.socket_timeout + 5.0)
                if thread.is_alive():
                    logger.warning("%s did not stop in time", thread.name)
        if self._presence_thread is not None:
            # the leaves of the connections closed meanwhile; this node is gone
            with self._send_lock:
                self._send_presence(False)
            try:
                self._redis.delete(self._node_key(self.node))
            except (RedisError, OSError):
                pass
        with self._cond:
            self._cond.notify_all()
        self._disconnect()
        self._wake_r.close()
        self._wake_w.close()
        logger.info("redis broker %s closed", self._where)

    # ------------------------------------------------------------------ listener
    def _run(self) -> None:
        delay = RECONNECT_MIN
        failures = 0
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._new_sub_connection()
                conn.connect()
                self._ping()  # the command side works too
                self._cmd_ok = True
                self._on_connected()
                self._listener_up = True
                if failures:
                    logger.info("redis %s: subscription connection is back", self._where)
                    self.reconnects += 1
                failures = 0
                delay = RECONNECT_MIN
                self._serve(conn)
            except (_Lost, RedisError, OSError, *CLOSED_UNDER_US) as exc:
                self._listener_up = False
                if not self._stop.is_set():
                    if failures == 0:
                        logger.warning("redis %s: subscription lost: %s; reconnecting",
                                       self._where, _reason(exc))
                    else:
                        logger.debug("redis reconnect failed: %s", _reason(exc))
                    failures += 1
            except Exception:
                self._listener_up = False
                logger.exception("redis listener failed; reconnecting")
                failures += 1
            finally:
                self._listener_up = False
                with self._cond:
                    self._active_names.clear()
                    self._in_effect = frozenset()
                    self._cond.notify_all()
                if conn is not None:
                    try:
                        conn.disconnect()
                    except Exception:  # pragma: no cover - closing a dead socket
                        pass
            if self._stop.is_set():
                break
            self._stop.wait(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max)

    def _ping(self) -> None:
        """Raise unless the command side answers."""
        self._redis.ping()

    def _new_sub_connection(self) -> Any:
        # a connection of its own, outside any pool's count (the pool is only its factory)
        # and always RESP2, whose pub/sub replies the listener parses (a URL may ask for RESP3)
        pool = self._sub_pool
        kwargs = dict(pool.connection_kwargs)
        if _HAS_PROTOCOL:
            kwargs["protocol"] = 2
        return pool.connection_class(**kwargs)

    def _on_connected(self) -> None:
        """A new subscription connection: everything must be subscribed and caught up again."""
        with self._pending_lock:
            self._resync = True  # redis may have lost this node's members (a restart)
            self._lost_upto = self._queued
        self._sent = {}
        self._unconfirmed = {}
        self._covering = []
        self._fences = {}
        with self._lock:
            self._dirty = True

    def _serve(self, conn: Any) -> None:
        sock = getattr(conn, "_sock", None)
        fresh = True
        last_rx = time.monotonic()
        ping_at: Optional[float] = None
        while not self._stop.is_set():
            if self._dirty or fresh:
                self._reconcile(conn, catch_up_all=fresh)
                fresh = False
            batch: List[Publication] = []
            got = 0
            try:
                while got < HANDBACK_BATCH and conn.can_read(0):
                    got += 1
                    self._on_reply(conn.read_response(), batch)
            finally:
                if batch:
                    self._hand_back(batch)
            now = time.monotonic()
            if got:
                last_rx = now
                ping_at = None
                if not self._listener_up:
                    self._listener_up = True
                continue
            if ping_at is not None and now - ping_at > self.socket_timeout:
                raise _Lost("no answer to PING within %.1f s" % self.socket_timeout)
            if ping_at is None and now - last_rx >= HEALTH_INTERVAL:
                conn.send_command("PING", "h")
                ping_at = now
            if self._dirty:
                continue
            wait = HEALTH_INTERVAL if ping_at is None else max(0.0, ping_at + self.socket_timeout - now)
            if sock is None:
                # no socket to wait on: poll
                if conn.can_read(min(wait, 0.05)):
                    continue
            else:
                pending = getattr(sock, "pending", None)
                if pending is not None and pending():
                    continue
                self._wait_readable([sock], wait)

    def _wait_readable(self, socks: List[Any], wait: float) -> None:
        """Wait up to ``wait`` seconds for one of ``socks`` or a wake-up (which is consumed)."""
        readable, _, _ = select.select(socks + [self._wake_r], [], [], wait)
        if self._wake_r in readable:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def _take_interest(self) -> Tuple[Set[str], Dict[str, Set[str]], Set[str], List[str], List[str]]:
        """The hub's interest, taken: (wanted patterns, Redis name -> its patterns, the names
        that are globs, names to drop, names to add). Topics acked anew wait in ``_need``."""
        with self._lock:
            wanted = set(self._wanted)
            needs = self._needs
            self._needs = {}
            self._dirty = False
            self._taken = self._changes
        by_name: Dict[str, Set[str]] = {}
        for pattern in wanted:
            by_name.setdefault(self._name(pattern), set()).add(pattern)
        globs = {n for n, ps in by_name.items() if is_wildcard(next(iter(ps)))}
        globs.update(n for n, ps in self._sent.items() if is_wildcard(next(iter(ps))))
        gone = [n for n in self._sent if n not in by_name]
        new = [n for n in by_name if n not in self._sent]
        for pattern in needs:
            if pattern not in wanted:
                continue
            # a topic already covered by a confirmed subscription keeps its position
            if pattern in self._last and self._covered(pattern):
                continue
            self._last.pop(pattern, None)
            self._epochs.pop(pattern, None)
            self._need[pattern] = needs[pattern]
        return wanted, by_name, globs, gone, new

    def _reconcile(self, conn: Any, catch_up_all: bool) -> None:
        """Bring the subscriptions in line with the hub's interest; fence new ones."""
        wanted, by_name, globs, gone, new = self._take_interest()
        if gone:
            for kind, names in (("UNSUBSCRIBE", [n for n in gone if n not in globs]),
                                ("PUNSUBSCRIBE", [n for n in gone if n in globs])):
                for i in range(0, len(names), SUBSCRIBE_CHUNK):
                    conn.send_command(kind, *names[i:i + SUBSCRIBE_CHUNK])
            for n in gone:
                del self._sent[n]  # (replies still due stay counted: a new SUBSCRIBE waits past them)
            with self._cond:
                self._active_names.difference_update(gone)
        for n, patterns in by_name.items():
            if n in self._sent:
                self._sent[n] = patterns
        if new:
            for kind, names in (("SUBSCRIBE", [n for n in new if n not in globs]),
                                ("PSUBSCRIBE", [n for n in new if n in globs])):
                for i in range(0, len(names), SUBSCRIBE_CHUNK):
                    conn.send_command(kind, *names[i:i + SUBSCRIBE_CHUNK])
            for n in new:
                self._sent[n] = by_name[n]
                self._unconfirmed[n] = self._unconfirmed.get(n, 0) + 1
        self._recompute_covering()
        if gone:
            self._forget_uncovered(wanted)
        fence: Set[str] = set(self._need)
        if catch_up_all:
            fence.update(self._last)
        if fence:
            self._fence_no += 1
            token = b"f%d" % self._fence_no
            self._fences[token] = sorted(fence)
            conn.send_command("PING", token)

    def _recompute_covering(self) -> None:
        with self._cond:
            active = set(self._active_names)
        self._covering = [p for n, ps in self._sent.items() if n in active for p in ps]
        in_effect = frozenset(self._covering)
        with self._cond:
            if in_effect != self._in_effect or self._applied != self._taken:
                self._in_effect = in_effect
                self._applied = self._taken
                self._cond.notify_all()

    def _covered(self, topic: str) -> bool:
        for p in self._covering:
            if p == topic or (is_wildcard(p) and pattern_matches(p, topic)):
                return True
        return False

    def _forget_uncovered(self, wanted: Set[str]) -> None:
        patterns = [p for p in wanted if is_wildcard(p)]

        def kept(topic: str) -> bool:
            return topic in wanted or any(pattern_matches(p, topic) for p in patterns)

        for table in (self._last, self._epochs, self._need):
            for topic in [t for t in table if not kept(t)]:
                del table[topic]

    # -- replies
    def _on_reply(self, resp: Any, batch: List[Publication]) -> None:
        if isinstance(resp, list) and resp:
            kind = resp[0]
            if kind == b"message":
                self._on_message(resp[1], resp[2], batch)
            elif kind == b"pmessage":
                self._on_message(resp[2], resp[3], batch)
            elif kind in (b"subscribe", b"psubscribe"):
                self._on_confirmed(_text(resp[1]))
            elif kind == b"pong":
                self._on_pong(resp[1], batch)
            # unsubscribe / punsubscribe confirmations need nothing
        elif isinstance(resp, bytes):
            self._on_pong(resp, batch)  # PING outside subscribed mode answers its argument

    def _on_confirmed(self, name: str) -> None:
        left = self._unconfirmed.get(name, 0) - 1
        if left > 0:
            self._unconfirmed[name] = left
            return
        self._unconfirmed.pop(name, None)
        if name not in self._sent:
            return  # unsubscribed since
        with self._cond:
            self._active_names.add(name)
            self._cond.notify_all()
        self._recompute_covering()

    def _on_pong(self, token: bytes, batch: List[Publication]) -> None:
        if token == b"h" or token == b"":
            return
        topics = self._fences.pop(token, None)
        if not topics:
            return
        self._listener_up = True
        ready = []
        for topic in topics:
            acked = self._need.pop(topic, None)
            if acked is not None and topic not in self._last:
                self._last[topic] = acked
            if topic in self._last:
                ready.append(topic)
        if ready:
            self._catch_up(ready, batch)

    def _on_message(self, channel: bytes, payload: bytes, batch: List[Publication]) -> None:
        if not channel.startswith(self._ch_prefix_b):
            if channel.startswith(self._jl_prefix_b):
                self._on_join_leave(channel, payload, batch)
            return
        try:
            topic = channel[len(self._ch_prefix_b):].decode("utf-8")
            seq_b, epoch_b, data_b = payload.split(b"|", 2)
            seq = int(seq_b)
            epoch = epoch_b.decode("ascii")
            data = strict_text(data_b.decode("utf-8"))  # another node may run an older version
        except (ValueError, UnicodeDecodeError):
            logger.warning("ignoring a malformed message on %r", channel[:100])
            return
        last = self._last.get(topic)
        if last is None:
            acked = self._need.pop(topic, None)
            if acked is not None:
                last = min(acked, seq - 1)
            elif self._covered(topic):
                last = seq - 1  # first seen through a pattern: start here
            else:
                return  # not (or no longer) subscribed here, or a glob's over-match
            self._epochs[topic] = epoch
        else:
            known = self._epochs.get(topic)
            if known is None:
                self._epochs[topic] = epoch
            elif known != epoch:
                logger.info("topic %s has a new epoch %s (was %s): a new numbering", topic, epoch, known)
                self._epochs[topic] = epoch
                last = 0
        if seq <= last:
            self.duplicates += 1
            self._last[topic] = last
            return
        self._last[topic] = last
        if seq > last + 1:
            self._refill(topic, seq - 1, epoch, batch)
        batch.append(Publication(topic, seq, epoch, data))
        self._last[topic] = seq

    def _on_join_leave(self, channel: bytes, payload: bytes, batch: List[Publication]) -> None:
        """Another node's join or leave: handed back as a Publication with seq 0."""
        try:
            kind, node, text = payload.split(b"|", 2)
            topic = channel[len(self._jl_prefix_b):].decode("utf-8")
            if node.decode("ascii") == self.node:
                return  # this node's own: its listeners had it at once
            batch.append(Publication(topic, 0, "join" if kind == b"J" else "leave", text.decode("utf-8")))
        except (ValueError, UnicodeDecodeError):
            logger.debug("ignoring a malformed join/leave on %r", channel[:100])

    def _refill(self, topic: str, upto: int, epoch: str, batch: List[Publication]) -> None:
        """Hand back the stored messages (last, upto] of a topic; what is gone stays gone."""
        start = self._last[topic]
        while start < upto:
            count = min(REFILL_PAGE, upto - start)
            stream_epoch, raw = self._epoch_and_range(topic, start, upto, count)
            if stream_epoch is None or _text(stream_epoch) != epoch:
                return  # the stream moved on to another numbering; its messages will tell
            if not raw:
                break
            for m in self._entries(topic, raw):
                batch.append(Publication(topic, m.seq, epoch, m.data))
                self._last[topic] = m.seq
                self.refilled += 1
            start = self._last[topic]
            if len(raw) < count:
                break
        if self._last[topic] < upto:
            logger.info("topic %s: seqs %d..%d are no longer stored", topic, self._last[topic] + 1, upto)
            self._last[topic] = upto

    def _epoch_and_range(self, topic: str, start: int, upto: int, count: int) -> Tuple[Any, Sequence[Any]]:
        """In one step: the topic's epoch and its stored entries of seqs (start, upto], at most count."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hget(self._meta(topic), "epoch")
        pipe.xrange(self._stream(topic), "%d-0" % (start + 1), "%d-0" % upto, count=count)
        stream_epoch, raw = pipe.execute()
        return stream_epoch, raw

    def _catch_up(self, topics: List[str], batch: List[Publication]) -> None:
        """Hand back what was published on ``topics`` beyond their last seq (after a fence)."""
        pipe = self._redis.pipeline(transaction=False)
        for topic in topics:
            pipe.hmget(self._meta(topic), ["seq", "epoch", "pub"])
        answers = pipe.execute()
        for topic, (seq_b, epoch_b, pub_b) in zip(topics, answers):
            if epoch_b is None:
                continue  # nothing published under any epoch (yet)
            stored = int(seq_b) if seq_b is not None else 0
            latest = self._shown(seq_b, pub_b)
            epoch = _text(epoch_b)
            known = self._epochs.get(topic)
            last = self._last[topic]
            if known is None:
                self._epochs[topic] = epoch
            elif known != epoch:
                logger.info("topic %s has a new epoch %s (was %s): a new numbering", topic, epoch, known)
                self._epochs[topic] = epoch
                last = self._last[topic] = 0
            if stored < last:
                logger.warning("topic %s: redis is at seq %d, below the %d handed back "
                               "(data lost without a new epoch)", topic, stored, last)
                self._last[topic] = stored
            elif latest > last:
                self._refill(topic, latest, epoch, batch)

    def _hand_back(self, batch: List[Publication]) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler(batch)
        except Exception:
            logger.exception("delivering %d publication(s) failed", len(batch))
