"""The message store: per-topic sequence numbers, epochs and retained history.

One interface (:class:`MessageStore`), two implementations:

- :class:`MemoryStore`: bounded per topic by count and in all by bytes (the oldest
  messages of any topic go first); a topic left without messages and subscribers is
  forgotten and comes back at seq 1 under a new epoch (PROTOCOL.md section 6). One
  random epoch per instance, so a restart starts a new numbering (section 4).
- :class:`SqliteStore`: one SQLite file in WAL mode. Each topic's epoch and last
  seq live in their own table, so seqs survive trimming, ``history_size`` 0 and
  restarts (same file => same epoch, seqs continue); topics are never forgotten,
  and only a bounded cache of their metadata is kept in memory. A topic's messages
  appended in one commit are one row (a *run*, see :func:`pack_run`).

Threading contract: ``append_batch``, ``append_deferred`` and ``latest`` are called
by one thread at a time (the hub holds its lock around them; ``in_use`` and
``trim_step(in_use=...)`` rely on it); a ``Pending`` may be settled from any thread.
``since``, ``oldest`` and ``trim`` may be called from any thread concurrently with
them. Every failure to read or write surfaces as :class:`~wsbroadcast.errors.StoreError`; ``append_batch`` is
all-or-nothing.
"""

from __future__ import annotations

import abc
import collections
import heapq
import itertools
import logging
import os
import pathlib
import secrets
import sqlite3
import sys
import threading
import time
from array import array
from contextlib import contextmanager
from typing import (
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
)

from .envelope import strict_text
from .errors import StoreError, StoreInUse
from .logutil import RateLimitedLog
from .pidlock import LockHeld, PidLock
from .topics import is_wildcard

logger = logging.getLogger(__name__)

__all__ = [
    "StoredMessage",
    "MessageStore",
    "MemoryStore",
    "SqliteStore",
    "RetentionTrimmer",
    "open_store",
    "data_bytes",
    "ByteBound",
]

Clock = Callable[[], float]


class StoredMessage(NamedTuple):
    """One stored message; ``data`` is the published value as JSON text, verbatim."""

    topic: str
    seq: int
    data: str
    time: float


def data_bytes(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes (without a copy when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ByteBound:
    """Admits messages while their summed data stays within ``max_bytes``; the first always."""

    __slots__ = ("left", "taken")

    def __init__(self, max_bytes: Optional[int]) -> None:
        self.left = max_bytes
        self.taken = 0

    @property
    def full(self) -> bool:
        """True when no further message can be admitted (its data is at least one byte)."""
        return self.left is not None and self.left <= 0

    def admit(self, data: str) -> bool:
        """Count a message of text ``data`` in, or say False when it does not fit."""
        if self.left is not None:
            size = data_bytes(data)
            if size > self.left and self.taken:
                return False
            self.left -= size
        self.taken += 1
        return True


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _check_retention(history_size: int, history_ttl: Optional[float]) -> None:
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 0:
        raise ValueError("history_size must be an int >= 0, got %r" % (history_size,))
    if history_ttl is not None and (
        isinstance(history_ttl, bool) or not isinstance(history_ttl, (int, float)) or history_ttl < 0
    ):
        raise ValueError("history_ttl must be None or a number >= 0, got %r" % (history_ttl,))


def _check_items(items: Sequence[Tuple[str, str]]) -> None:
    for item in items:
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise StoreError("append_batch items must be (topic: str, data: str) tuples")


class Pending(abc.ABC):
    """Appends whose commit is left for later: stored once :meth:`settle` says so."""

    #: why they were not stored (set when :meth:`settle` returned False)
    error: Optional[str] = None

    @abc.abstractmethod
    def settle(self) -> bool:
        """Commit the appends if not done yet; True once stored, False once failed
        (nothing of them was stored, and their seqs are given out again). Any thread;
        never raises."""


class MessageStore(abc.ABC):
    """Sequence numbers, epochs and retained history of topics.

    Attributes:
        history_size: most messages kept per topic (0 keeps none; seqs still count).
        history_ttl: seconds a message is kept, or None for no age limit.
        read_only: True when appends are refused (e.g. an unwritable SQLite file).
    """

    history_size: int
    history_ttl: Optional[float]
    read_only: bool = False
    #: ``in_use(topic)``: does a subscriber rely on the topic's numbering? Set by the owner
    #: of the lock ``append_batch`` is called under (the hub); a store that forgets topics
    #: may then forget unused ones in ``append_batch`` too.
    in_use: Optional[Callable[[str], bool]] = None
    #: whether ``trim_step`` may forget topics, asking its ``in_use``: its caller must then
    #: hold the lock ``in_use`` needs; a store that never forgets is trimmed without it
    forgets_topics: bool = False

    def open(self) -> None:
        """Acquire what the store needs (files, locks); idempotent. Raises StoreError."""

    @property
    def failure(self) -> Optional[str]:
        """Why publishes cannot be stored now (one line), or None while they can."""
        return None

    @abc.abstractmethod
    def latest(self, topic: str) -> Tuple[int, str]:
        """Return ``(last seq, epoch)`` of ``topic``; ``(0, epoch)`` if never published."""

    @abc.abstractmethod
    def append_batch(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        """Store ``[(topic, data_json), ...]`` as one transaction; return ``[(seq, epoch), ...]``.

        Each item gets its topic's next seq, in item order. On failure raise
        StoreError and leave every seq as if the call never happened.
        """

    def append_deferred(
        self, items: Sequence[Tuple[str, str]]
    ) -> Tuple[List[Tuple[int, str]], Optional[Pending]]:
        """``append_batch`` whose commit may be left for later: ``(positions, pending)``.

        With ``pending`` None the items are stored already. Otherwise they are stored
        only once ``pending.settle()`` returns True: nothing about them (an ack, a
        delivery) may leave the process before. Later appends may join the same open
        transaction; ``latest`` of a topic in it, and every other write, settle it
        first. Raises StoreError (nothing appended) like ``append_batch``.
        """
        return self.append_batch(items), None

    @abc.abstractmethod
    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        """Return at most ``limit`` stored messages of ``topic`` with seq > ``seq``, oldest first.

        With ``max_bytes`` the list also stops before the message that would take the
        summed UTF-8 size of the ``data`` past it, but holds at least one message when
        one exists: a page whose memory is bounded whatever the messages' sizes.
        """

    @abc.abstractmethod
    def oldest(self, topic: str) -> int:
        """Return the seq of the oldest stored message of ``topic``, 0 if none is stored."""

    @abc.abstractmethod
    def trim(self, now: Optional[float] = None) -> int:
        """Apply retention (``history_size`` per topic, ``history_ttl``); return rows removed."""

    def trim_step(
        self, now: Optional[float] = None, limit: int = 1000, in_use: Optional[Callable[[str], bool]] = None
    ) -> Tuple[int, bool]:
        """One bounded piece of :meth:`trim`: ``(rows removed, more to do)``.

        At most about ``limit`` messages or topics are handled, so a caller holding a
        lock can release it between steps. ``in_use(topic)`` says whether a subscriber
        still relies on a topic's numbering: a store that forgets topics without
        stored messages (see PROTOCOL.md section 6) forgets only those it says no
        for, and none when it is None.
        """
        return self.trim(now), False

    def release(self, pattern: str) -> None:
        """The last subscriber of ``pattern`` is gone (topics it kept may be forgotten)."""

    def checkpoint(self) -> None:
        """Do, off the publish path, upkeep its commits would otherwise do (any thread)."""

    def _trim_in_steps(self, now: Optional[float]) -> int:
        """A whole trim as a series of :meth:`trim_step` calls (for stores that have them)."""
        removed = 0
        while True:
            n, more = self.trim_step(now)
            removed += n
            if not more:
                return removed

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent. Later appends and reads raise StoreError."""

    def __enter__(self) -> "MessageStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- memory

#: default byte budget of a MemoryStore (all topics together)
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
#: what a stored message costs besides its text: the tuple, its float and int, a list
#: slot, allocator rounding (measured with tracemalloc on CPython 3.9-3.13, rounded up)
MESSAGE_COST = 160
#: what a known topic costs besides its name: its record, list, dict entry and heap entry
TOPIC_COST = 320
#: most topics or messages one trim step handles when no limit is given
TRIM_STEP = 256


def message_cost(data: str) -> int:
    """Bytes a stored message of JSON text ``data`` counts against a MemoryStore's budget."""
    return MESSAGE_COST + sys.getsizeof(data)


def topic_cost(topic: str) -> int:
    """Bytes a known topic counts against a MemoryStore's budget."""
    return TOPIC_COST + sys.getsizeof(topic)


#: a stored message inside a MemoryStore: (topic, seq, data, time), StoredMessage's
#: fields in a plain tuple, which the garbage collector stops tracking (a NamedTuple it
#: tracks, and a full collection walks every tracked object)
_Msg = Tuple[str, int, str, float]


class _Topic:
    """One topic of a MemoryStore: its numbering and its stored messages, oldest first."""

    __slots__ = ("name", "epoch", "last", "msgs", "head", "queued", "idle", "listed")

    def __init__(self, name: str, epoch: str) -> None:
        self.name = name
        self.epoch = epoch
        self.last = 0
        #: msgs[head:] are the stored messages (consecutive seqs); msgs[:head] are None
        self.msgs: List[Optional[_Msg]] = []
        self.head = 0
        self.queued = False  # has an entry in the store's heap
        self.idle = _ACTIVE  # _IDLE or _KEPT while no message is stored
        self.listed = False  # in the store's idle queue (maybe no longer idle)

    def count(self) -> int:
        return len(self.msgs) - self.head

    def drop_oldest(self) -> _Msg:
        msg = self.msgs[self.head]
        assert msg is not None
        self.msgs[self.head] = None
        self.head += 1
        if self.head == len(self.msgs):
            self.msgs = []
            self.head = 0
        elif self.head >= 32 and 2 * self.head >= len(self.msgs):
            del self.msgs[: self.head]
            self.head = 0
        return msg


_ACTIVE, _IDLE, _KEPT = 0, 1, 2

#: ``in_use(topic)``: True while a subscriber may still rely on the topic's seq and epoch
InUse = Callable[[str], bool]


class MemoryStore(MessageStore):
    """History in memory, bounded per topic by count (and age) and in all by bytes.

    ``max_bytes`` bounds what messages and topics cost together (see
    :func:`message_cost`, :func:`topic_cost`): an append that goes over it evicts
    the oldest messages of all topics first, never one of its own. A topic left
    without messages is forgotten when ``in_use`` says no subscriber needs it: by
    :meth:`trim_step`, and by an append over the budget (before it evicts a message)
    once :attr:`in_use` is set. Published again it starts at seq 1 under a new epoch
    (each step that forgets starts a new *generation*: topics created after it get
    ``<instance epoch>-<generation>``). :meth:`trim` never forgets a topic; an
    unknown topic asked for by :meth:`latest` is recorded, so that the epoch told to
    a subscriber holds for its first publish.

    Count retention is immediate (the oldest message goes on append); age
    retention is applied by :meth:`trim` / :meth:`trim_step`, oldest first across
    topics (a heap of each topic's oldest message), so a step costs what it removes.
    """

    forgets_topics = True

    def __init__(
        self,
        history_size: int = 1000,
        history_ttl: Optional[float] = None,
        *,
        max_bytes: int = DEFAULT_MEMORY_BYTES,
        clock: Clock = time.time,
    ) -> None:
        _check_retention(history_size, history_ttl)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError("max_bytes must be an int > 0, got %r" % (max_bytes,))
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.max_bytes = max_bytes
        self.read_only = False
        self.epoch = _new_epoch()
        self._clock = clock
        # _lock guards every field below. Lock order: the hub's lock, then _lock.
        self._lock = threading.Lock()
        self._topics: Dict[str, _Topic] = {}
        # (time of the oldest message, tie-break, its seq, topic name): one entry per topic
        # with messages, whose key may be stale (too old); refreshed when it comes up.
        # Names, not records, so that the garbage collector does not track the entries.
        self._heap: List[Tuple[float, int, int, str]] = []
        self._order = itertools.count()
        # topics without messages: not yet checked, oldest first (an entry whose topic
        # got a message since is skipped) / found in use when checked
        self._idle: Deque[_Topic] = collections.deque()
        self._kept: Dict[str, _Topic] = {}
        self._recheck = False  # move _kept back to _idle (a wildcard subscription went)
        self._bytes = 0
        self._generation = 0
        self._epoch = self.epoch  # the epoch of topics created from now on
        self._trimmed_size = history_size
        self.evicted = 0  # messages evicted over the byte budget
        self.forgotten = 0  # topics forgotten
        self._closed = False

    # -- state (under _lock)

    @property
    def bytes_used(self) -> int:
        """What the stored messages and known topics count against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._topics)

    def _topic_locked(self, name: str) -> _Topic:
        t = self._topics.get(name)
        if t is None:
            t = self._topics[name] = _Topic(name, self._epoch)
            self._bytes += topic_cost(name)
            self._set_idle(t)
        return t

    def _set_active(self, t: _Topic) -> None:
        if t.idle == _KEPT:
            del self._kept[t.name]
        t.idle = _ACTIVE

    def _set_idle(self, t: _Topic) -> None:
        if t.idle != _IDLE:
            t.idle = _IDLE
            if not t.listed:
                t.listed = True
                self._idle.append(t)

    def _pop_oldest_locked(self, done: Callable[[_Topic, _Msg], bool],
                           limit: int) -> Tuple[int, bool]:
        """Remove the oldest message of all topics until ``done(its topic, it)``.

        Returns ``(removed, stopped at limit)``; ``limit`` counts heap entries looked at.
        """
        heap = self._heap
        topics = self._topics
        removed = 0
        for _ in range(limit):
            if not heap:
                return removed, False
            _tm, _n, seq, name = heap[0]
            t = topics.get(name)
            if t is None or not t.count():
                heapq.heappop(heap)
                if t is not None:
                    t.queued = False
                continue
            msg = t.msgs[t.head]
            assert msg is not None
            if msg[1] != seq:  # the key is stale: the oldest went by count since
                heapq.heapreplace(heap, (msg[3], next(self._order), msg[1], name))
                continue
            if done(t, msg):
                return removed, False
            t.drop_oldest()
            self._bytes -= message_cost(msg[2])
            removed += 1
            if t.count():
                nxt = t.msgs[t.head]
                assert nxt is not None
                heapq.heapreplace(heap, (nxt[3], next(self._order), nxt[1], name))
            else:
                heapq.heappop(heap)
                t.queued = False
                self._set_idle(t)
        return removed, bool(heap)

    # -- interface

    def latest(self, topic: str) -> Tuple[int, str]:
        """``(last seq, epoch)``; an unknown topic is recorded so that its epoch holds."""
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            t = self._topic_locked(topic)
            return t.last, t.epoch

    def append_batch(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        _check_items(items)
        now = self._clock()
        size = self.history_size
        out: List[Tuple[int, str]] = []
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            first: Dict[_Topic, int] = {}  # seq of the first message of this call per topic
            for topic, data in items:
                t = self._topic_locked(topic)
                seq = t.last = t.last + 1
                out.append((seq, t.epoch))
                if size <= 0:
                    continue
                if t.idle:
                    self._set_active(t)
                first.setdefault(t, seq)
                t.msgs.append((t.name, seq, data, now))
                self._bytes += message_cost(data)
                if not t.queued:
                    heapq.heappush(self._heap, (now, next(self._order), seq, t.name))
                    t.queued = True
                while t.count() > size:
                    self._bytes -= message_cost(t.drop_oldest()[2])
            if self._bytes > self.max_bytes and self.in_use is not None:
                # topics without messages or subscribers first: that loses no message
                self._forget_locked(self.in_use, sys.maxsize, self.max_bytes)
            if self._bytes > self.max_bytes:
                limit = self.max_bytes

                def done(t: _Topic, msg: _Msg) -> bool:
                    if self._bytes <= limit:
                        return True
                    mine = first.get(t)
                    return mine is not None and msg[1] >= mine  # never evict this call's own

                self.evicted += self._pop_oldest_locked(done, sys.maxsize)[0]
        return out

    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        if limit <= 0:
            return []
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            t = self._topics.get(topic)
            if t is None or not t.count():
                return []
            oldest = t.msgs[t.head]
            assert oldest is not None
            start = t.head + max(0, seq + 1 - oldest[1])
            page: Iterable[_Msg] = t.msgs[start:start + limit]  # type: ignore[assignment]
            if max_bytes is not None:
                bound = ByteBound(max_bytes)
                page = itertools.takewhile(lambda m: bound.admit(m[2]), page)
            return [StoredMessage._make(m) for m in page]

    def oldest(self, topic: str) -> int:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            t = self._topics.get(topic)
            if t is None or not t.count():
                return 0
            return t.msgs[t.head][1]  # type: ignore[index]

    def trim(self, now: Optional[float] = None) -> int:
        return self._trim_in_steps(now)

    def trim_step(
        self, now: Optional[float] = None, limit: int = TRIM_STEP, in_use: Optional[InUse] = None
    ) -> Tuple[int, bool]:
        """Apply retention to at most ``limit`` messages and topics: ``(removed, more to do)``.

        Topics without messages are forgotten only when ``in_use`` is given and says no.
        """
        size = self.history_size
        ttl = self.history_ttl
        removed = 0
        with self._lock:
            if self._closed:
                return 0, False
            if self._trimmed_size != size:  # lowered at run time: a rare full pass
                for t in list(self._topics.values()):
                    while t.count() > size:
                        self._bytes -= message_cost(t.drop_oldest()[2])
                        removed += 1
                    if not t.count():
                        self._set_idle(t)
                heap = []
                for t in self._topics.values():
                    t.queued = bool(t.count())
                    if t.queued:
                        oldest = t.msgs[t.head]
                        assert oldest is not None
                        heap.append((oldest[3], next(self._order), oldest[1], t.name))
                heapq.heapify(heap)
                self._heap = heap
                self._trimmed_size = size
            work = removed
            if in_use is not None:
                work += self._forget_locked(in_use, limit - work)
                if work >= limit:
                    return removed, True
            if ttl is not None:
                if now is None:
                    now = self._clock()
                cutoff = now - ttl
                n, more = self._pop_oldest_locked(lambda t, m: m[3] >= cutoff, limit - work)
                removed += n
                work += n
                if more:
                    return removed, True
            if self._bytes > self.max_bytes:
                cap = self.max_bytes
                n, more = self._pop_oldest_locked(lambda t, m: self._bytes <= cap, limit - work)
                self.evicted += n
                removed += n
                if more:
                    return removed, True
            return removed, in_use is not None and bool(self._idle)

    def _forget_locked(self, in_use: InUse, limit: int, cap: Optional[int] = None) -> int:
        """Check up to ``limit`` idle topics (until the bytes are within ``cap``, if given);
        forget those not in use. Returns the work done."""
        work = 0
        if self._recheck and cap is None:
            kept = self._kept
            while kept and work < limit:
                _name, t = kept.popitem()
                t.idle = _ACTIVE  # so that _set_idle queues it
                self._set_idle(t)
                work += 1
            self._recheck = bool(kept)
        forgot = 0
        idle = self._idle
        while idle and work < limit and (cap is None or self._bytes > cap):
            t = idle.popleft()
            t.listed = False
            work += 1
            if t.idle != _IDLE:
                continue  # it got a message (or was checked) since it was queued
            if in_use(t.name):
                t.idle = _KEPT
                self._kept[t.name] = t
                continue
            del self._topics[t.name]
            self._bytes -= topic_cost(t.name)
            forgot += 1
        if forgot:
            self.forgotten += forgot
            self._generation += 1
            self._epoch = "%s-%d" % (self.epoch, self._generation)
        return work

    def release(self, pattern: str) -> None:
        """The last subscriber of ``pattern`` went: topics it kept may be forgotten again."""
        with self._lock:
            if is_wildcard(pattern):
                self._recheck = bool(self._kept)
                return
            t = self._kept.pop(pattern, None)
            if t is not None:
                t.idle = _ACTIVE
                self._set_idle(t)

    @property
    def failure(self) -> Optional[str]:
        return "store is closed" if self._closed else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._topics.clear()
            self._heap = []
            self._idle.clear()
            self._kept.clear()
            self._bytes = 0


# --------------------------------------------------------------------------- sqlite

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta ("
    " key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS topics ("
    " topic TEXT PRIMARY KEY, epoch TEXT NOT NULL, last_seq INTEGER NOT NULL) WITHOUT ROWID",
    # one row per run: messages first_seq..last_seq of a topic, appended in one commit
    # (one time); the small columns first, so that reading them never touches the
    # overflow pages of a long ``data``
    "CREATE TABLE IF NOT EXISTS runs ("
    " topic TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,"
    " time REAL NOT NULL, lens BLOB, data TEXT NOT NULL, PRIMARY KEY (topic, last_seq))",
)
#: the layout this version writes: 1 had one row per message (table ``messages``),
#: 2 has one row per run (table ``runs``); a version-1 file is migrated on a writable open
_SCHEMA_VERSION = 2
_RUN_COLUMNS = "topic, first_seq, last_seq, time, lens, data"
_INSERT_RUN = "INSERT INTO runs (%s) VALUES (?, ?, ?, ?, ?, ?)" % _RUN_COLUMNS
#: most messages in one run, and most characters (code points) of a run of more than
#: one: what one row costs to read, whatever a since() asks for
_RUN_MESSAGES = 256
_RUN_CHARS = 65536
#: version-1 messages, and characters of them, a migration holds at once (its memory;
#: the file is migrated in one transaction all the same)
_MIGRATE_STEP = 4096
_MIGRATE_CHARS = 8 * 1024 * 1024
_MAX_IDLE_READERS = 8
_READER_CACHE_KIB = 256
#: topics whose epoch and last seq a SqliteStore keeps in memory
_META_CACHE = 65536
#: an open group (see SqliteStore.append_deferred) is committed by the append that
#: brings it to this many appends or characters of messages: what it holds and what waits
#: on its commit stay bounded
_GROUP_APPENDS = 256
_GROUP_CHARS = 4 * 1024 * 1024
#: WAL pages past which a commit checkpoints by itself: a backstop only, as the store's
#: checkpoint() (the trimmer thread, every round) keeps the WAL well below it
_WAL_BACKSTOP_PAGES = 16384


# Runs: the texts of one run are stored joined in ``data``; ``lens`` holds their lengths
# in code points (Python's str indexes), 4-byte little-endian unsigned, or is NULL for a
# run of one, whose ``data`` is then its text as it is. A run of more than one holds at
# most _RUN_CHARS code points, so each length fits.
_LENS_TYPE = next(t for t in ("I", "L") if array(t).itemsize == 4)
_LENS_SWAP = sys.byteorder != "little"
RunRow = Tuple[str, int, int, float, Optional[bytes], str]


def pack_run(texts: Sequence[str]) -> Tuple[Optional[bytes], str]:
    """``(lens, data)`` of a run of ``texts`` (at least one)."""
    if len(texts) == 1:
        return None, texts[0]
    lens = array(_LENS_TYPE, map(len, texts))
    if _LENS_SWAP:
        lens.byteswap()
    return lens.tobytes(), "".join(texts)


def unpack_run(lens: Optional[bytes], data: str, count: int, start: int = 0,
               stop: Optional[int] = None) -> List[str]:
    """Texts ``start:stop`` of a run of ``count`` stored as ``(lens, data)``; ValueError
    if the run does not hold ``count`` texts."""
    if lens is None:
        if count != 1:
            raise ValueError("a run of %d messages without lengths" % count)
        return [data][start:stop]
    sizes = array(_LENS_TYPE)
    sizes.frombytes(lens)  # ValueError when not a multiple of 4 bytes
    if _LENS_SWAP:
        sizes.byteswap()
    ends = list(itertools.accumulate(sizes))
    if len(ends) != count or not ends or ends[-1] != len(data):
        raise ValueError("the lengths of a run of %d messages do not match its data" % count)
    ends = ends[start:stop]
    if not ends:
        return []
    begin = ends[0] - sizes[start]
    return [data[i:j] for i, j in zip([begin] + ends, ends)]


def split_runs(texts: Sequence[str]) -> List[Tuple[int, int]]:
    """Cut ``texts`` (consecutive messages) into runs: ``[(start, end), ...]`` index ranges
    of at most _RUN_MESSAGES texts and, when more than one, _RUN_CHARS code points."""
    n = len(texts)
    if n <= _RUN_MESSAGES and (n == 1 or sum(map(len, texts)) <= _RUN_CHARS):
        return [(0, n)]
    out: List[Tuple[int, int]] = []
    start = 0
    chars = 0
    for i, text in enumerate(texts):
        size = len(text)
        if i > start and (i - start >= _RUN_MESSAGES or chars + size > _RUN_CHARS):
            out.append((start, i))
            start, chars = i, 0
        chars += size
    out.append((start, n))
    return out


def run_rows(topic: str, first: int, texts: Sequence[str], now: float) -> List[RunRow]:
    """The rows of the runs of ``texts``, messages ``first``, ``first + 1``, ... of ``topic``."""
    if len(texts) == 1:
        return [(topic, first, first, now, None, texts[0])]
    rows: List[RunRow] = []
    for start, end in split_runs(texts):
        lens, data = pack_run(texts[start:end] if start or end < len(texts) else texts)
        rows.append((topic, first + start, first + end - 1, now, lens, data))
    return rows


class _OpenRun:
    """A run being gathered from version-1 rows."""

    __slots__ = ("topic", "first", "last", "time", "texts", "chars")

    def __init__(self, topic: str, seq: int, data: str, tm: float) -> None:
        self.topic = topic
        self.first = self.last = seq
        self.time = tm
        self.texts = [data]
        self.chars = len(data)


def runs_of_messages(messages: Iterable[Tuple[str, int, str, float]]) -> List[RunRow]:
    """Rows of runs holding ``messages`` (``(topic, seq, data, time)``, one row each of a
    version-1 file, in insertion order): a topic's consecutive seqs of one time make a run.
    The runs come in the order of their first message, so their times keep that order."""
    runs: List[_OpenRun] = []
    open_runs: Dict[str, _OpenRun] = {}
    for topic, seq, data, tm in messages:
        run = open_runs.get(topic)
        if (
            run is not None
            and run.last == seq - 1
            and run.time == tm
            and len(run.texts) < _RUN_MESSAGES
            and run.chars + len(data) <= _RUN_CHARS
        ):
            run.last = seq
            run.texts.append(data)
            run.chars += len(data)
        else:
            run = open_runs[topic] = _OpenRun(topic, seq, data, tm)
            runs.append(run)
    return [(r.topic, r.first, r.last, r.time) + pack_run(r.texts) for r in runs]


class _Group(Pending):
    """Appends given their seqs and kept in memory until one commit writes them all
    (a SqliteStore's ``_wlock`` guards it)."""

    __slots__ = ("_store", "meta", "new", "texts", "time", "appends", "chars", "stored", "error")

    def __init__(self, store: "SqliteStore") -> None:
        self._store = store
        #: topic -> (epoch, last seq) once the group commits
        self.meta: Dict[str, Tuple[str, int]] = {}
        self.new: Set[str] = set()  # topics the topics table does not hold yet
        #: topic -> its texts of the group, the last one ``meta``'s seq (none when no history is kept)
        self.texts: Dict[str, List[str]] = {}
        self.time = 0.0  # of the last append: the time of every run the commit writes
        self.appends = 0
        self.chars = 0
        #: None while open; True once committed, False once rolled back
        self.stored: Optional[bool] = None
        self.error: Optional[str] = None

    def settle(self) -> bool:
        try:
            return self._store._settle(self)
        except Exception as exc:  # e.g. the store closed meanwhile: it was not committed
            logger.debug("settling appends failed: %s", exc)
            return bool(self.stored)

    def rows(self) -> List[RunRow]:
        """The runs the commit inserts: each topic's texts cut into runs."""
        out: List[RunRow] = []
        for topic, texts in self.texts.items():
            out.extend(run_rows(topic, self.meta[topic][1] - len(texts) + 1, texts, self.time))
        return out


class SqliteStore(MessageStore):
    """History in one SQLite file (WAL, ``synchronous=NORMAL``, FULL with ``full_sync``).

    ``path`` is a file path, ``":memory:"`` (no persistence; reads share the writer
    connection), or an SQLite ``file:`` URI (e.g. ``file:/x/h.db?mode=ro``).

    Opening (in the constructor, or in :meth:`open` with ``defer_open``): a file
    path is first locked, through ``PATH.lock`` holding this process's pid; a
    lock held by another store (of this process or another) raises StoreError
    naming that pid. Then the file is opened read-write and the schema created.
    If that fails (read-only file, or a directory where the lock file cannot be
    made) the file is opened read-only instead: ``read_only`` is True, reads
    work, ``append_batch`` raises StoreError and ``trim`` does nothing. In a
    read-only directory SQLite cannot make the ``-shm`` file WAL readers need:
    a file closed cleanly there (no ``-wal`` file) is opened immutable, which
    assumes nobody writes it meanwhile. If the file cannot be opened at all
    (missing directory, not a database, no schema in a read-only file) StoreError
    is raised. ``file:`` URIs and ``":memory:"`` are opened as given, unlocked.

    This process must be the only writer of the file: topic metadata (epoch,
    last seq) is cached in memory and updated only after a successful commit.
    Before each commit the path is checked to still name the file that was
    opened: once it was deleted or replaced, the batch is rolled back and this
    and every later append raises StoreError (nothing more is acknowledged that
    a restart would not find), reads go to the file this store wrote, and
    :attr:`failure` says why.
    Reads use a small pool of read-only WAL connections, so they run
    concurrently with the writer and each sees a committed snapshot (a batch is
    never seen torn); if a reader connection cannot be opened, reads fall back to
    the writer connection.

    Layout (schema 2): the messages of a topic committed together are
    stored as runs, one row each, of at most _RUN_MESSAGES messages and (when more
    than one) _RUN_CHARS characters, so that a row costs a bounded amount to read;
    a run has one time. A file of schema 1 (a row per message) is migrated when
    opened writable, in one transaction; opened read-only it is read as it is. A
    file of a newer schema is refused with StoreError.

    Group commit: :meth:`append_deferred` gives the messages their seqs and keeps them
    in an open group, which later appends join, and which the first ``settle()`` of any
    of them writes in one transaction (the server's writer does, before it sends their
    acks and deliveries): one statement per table, each topic's messages in as few runs
    as fit. It is committed by the append that takes it to _GROUP_APPENDS appends or
    _GROUP_CHARS characters, by ``latest`` of one of its topics, ``append_batch``,
    trims and close. A failed commit stores none
    of it; its seqs are given out again (none of them was acknowledged or delivered).

    Count retention is applied by :meth:`trim` (call it periodically, e.g. with
    :class:`RetentionTrimmer`), so between trims a topic can hold more than
    ``history_size`` messages.
    """

    def __init__(
        self,
        path: str,
        history_size: int = 1000,
        history_ttl: Optional[float] = None,
        full_sync: bool = False,
        *,
        clock: Clock = time.time,
        defer_open: bool = False,
    ) -> None:
        _check_retention(history_size, history_ttl)
        self.path = str(path)
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.full_sync = bool(full_sync)
        self.read_only = False
        self.epoch = ""
        self._clock = clock
        self._is_uri = self.path.startswith("file:")
        self._shared_reads = self.path == ":memory:"
        # the file a plain path names (locked, checked before commits); None for URIs
        self._file: Optional[str] = None
        if self._is_uri or self._shared_reads:
            self._reader_uri = self.path
        else:
            self._file = os.path.abspath(self.path)
            self._reader_uri = pathlib.Path(self._file).as_uri() + "?mode=ro"
        # Why the file can no longer be trusted (deleted or replaced); set once, never
        # cleared. _append_error: the last append's failure, cleared by a success.
        # Both are plain attribute stores, read without a lock by ``failure``.
        self._lost: Optional[str] = None
        self._append_error: Optional[str] = None
        self._errors = RateLimitedLog(logger)

        # _wlock guards the writer connection _writer and everything only the writer
        # changes: _meta, _dirty, _scan, _group (and the _Group it names), and what open() sets once
        # (_writer, epoch, read_only, _reader_uri, _identity, _lock_file); _closed is set holding
        # both _wlock and _pool_lock, so either one suffices to read it. Lock order:
        # the hub's lock, then _wlock, then _pool_lock; never the other way round.
        self._wlock = threading.Lock()
        # topic -> (epoch, last_seq): a committed mirror of part of the topics table, at
        # most _META_CACHE topics (the oldest cached go first); the table has the rest.
        self._meta: Dict[str, Tuple[str, int]] = {}
        # topic -> last seq, for topics appended past history_size since their count trim.
        self._dirty: Dict[str, int] = {}
        # a pass over the topics table for count trimming (on open and when history_size
        # changed): the last topic scanned ("" to start), or None when no pass is due.
        self._scan: Optional[str] = ""
        self._scan_size = history_size
        # the appends append_deferred left for a later commit, or None
        self._group: Optional[_Group] = None
        self._closed = False
        # the file has the version-1 layout (one row per message): only when opened
        # read-only, which cannot migrate it; set by open()
        self._v1 = False

        # _pool_lock guards _idle, the reader connections not in use. A reader
        # connection is used by one thread at a time (taken out of _idle, given back).
        self._pool_lock = threading.Lock()
        self._idle: List[sqlite3.Connection] = []
        # Set once (no lock needed) when no reader connection can be opened: from then
        # on reads go through the writer connection under _wlock.
        self._reader_failed = False

        self._writer: Optional[sqlite3.Connection] = None
        # _ckpt_lock guards _ckpt, the connection checkpoint() uses (set by open()).
        # Lock order: _wlock, then _ckpt_lock.
        self._ckpt_lock = threading.Lock()
        self._ckpt: Optional[sqlite3.Connection] = None
        self._lock_file: Optional[PidLock] = None
        # (st_dev, st_ino) of the file opened, compared with the path's before commits
        self._identity: Optional[Tuple[int, int]] = None
        if not defer_open:
            self.open()

    # -- opening

    def open(self) -> None:
        """Lock and open the file and load its topics (see the class doc); idempotent."""
        with self._wlock:
            if self._writer is not None:
                return
            if self._closed:
                raise StoreError("store is closed")
            lock = self._take_lock()
            try:
                self._writer = self._open(lock is None and self._file is not None)
                self.epoch = self._load()
                if self._file is not None:
                    st = os.stat(self._file)
                    self._identity = (st.st_dev, st.st_ino)
                if not (self.read_only or self._shared_reads):
                    ckpt = self._open_checkpointer()
                    with self._ckpt_lock:
                        self._ckpt = ckpt
            except BaseException as exc:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if lock is not None:
                    lock.release()
                if isinstance(exc, OSError):
                    raise StoreError("cannot open sqlite store %s: %s" % (self.path, exc)) from exc
                raise
            self._lock_file = lock
        logger.info(
            "sqlite store %s opened%s: epoch %s",
            self.path,
            " read-only" if self.read_only else "",
            self.epoch,
        )

    def _take_lock(self) -> Optional[PidLock]:
        """Lock the file for this store; None when no lock file can be made here."""
        if self._file is None:
            return None
        folder = os.path.dirname(self._file)
        if not os.path.isdir(folder):
            raise StoreError(
                "cannot open sqlite store %s: directory %s does not exist" % (self.path, folder)
            )
        lock = PidLock(self._file + ".lock")
        try:
            lock.acquire()
        except LockHeld as exc:
            raise StoreInUse(
                "sqlite store %s is in use by process %s (lock file %s)"
                % (self.path, exc.pid or "(unknown)", lock.path),
                exc.pid,
            ) from None
        except OSError as exc:
            logger.debug("cannot make lock file %s: %s", lock.path, exc)
            return None
        return lock

    def _connect(self, target: str, uri: bool) -> sqlite3.Connection:
        return sqlite3.connect(
            target, uri=uri, timeout=5.0, isolation_level=None, check_same_thread=False
        )

    def _open(self, read_only: bool) -> sqlite3.Connection:
        """Open the writer connection (read-only when ``read_only`` or when writing fails)."""
        conn: Optional[sqlite3.Connection] = None
        first: object = "its directory is not writable"
        second: object = None
        if not read_only:
            try:
                conn = self._connect(self.path, self._is_uri)
                self._init_schema(conn)
                return conn
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                if self._shared_reads:
                    raise StoreError("cannot open sqlite store %s: %s" % (self.path, exc)) from exc
                first = exc
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
        uris = [self._reader_uri]
        if self._file is not None and not os.path.exists(self._file + "-wal"):
            # closed cleanly, in a directory where SQLite cannot make its -shm file
            uris.append(pathlib.Path(self._file).as_uri() + "?immutable=1")
        for uri in uris:
            conn = None
            try:
                conn = self._connect(uri, True)
                conn.execute("SELECT 1 FROM topics LIMIT 1").fetchall()
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                second = exc
                continue
            self.read_only = True
            self._reader_uri = uri
            logger.warning(
                "sqlite store %s is not writable (%s); opened it read-only", self.path, first
            )
            return conn
        raise StoreError(
            "cannot open sqlite store %s: %s (read-only: %s)" % (self.path, first, second)
        )

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not self._shared_reads:
            raise sqlite3.OperationalError("cannot switch to WAL (journal_mode=%s)" % mode)
        conn.execute("PRAGMA synchronous=%s" % ("FULL" if self.full_sync else "NORMAL"))
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._schema_of(conn)
            for stmt in _SCHEMA:
                conn.execute(stmt)
            # schema 1, or rows an older version added to a file of schema 2 (it did
            # not check the schema, and made its table again)
            migrated = self._migrate(conn)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (_new_epoch(),)
            )
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)",
                (str(_SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if migrated and not self._shared_reads:
            # the migration went through the WAL: copy it into the file and empty it
            # now, rather than keep a WAL as large as the history
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                logger.warning("sqlite store %s: checkpoint after migrating: %s", self.path, exc)

    def _schema_of(self, conn: sqlite3.Connection) -> int:
        """The layout version of the file (0: a new one); StoreError for a version this
        one does not know (written by a newer wsbroadcast)."""
        tables = {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )}
        row = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            return 1 if "messages" in tables else 0
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            version = -1
        if not 1 <= version <= _SCHEMA_VERSION:
            raise StoreError(
                "sqlite store %s has schema version %s, which this wsbroadcast does not know"
                " (it knows 1 to %d): a newer wsbroadcast wrote it"
                % (self.path, row[0], _SCHEMA_VERSION)
            )
        return version

    def _migrate(self, conn: sqlite3.Connection) -> bool:
        """Turn the rows of the version-1 table (one per message), if there is one, into
        runs, in the caller's transaction (all or nothing: a crash leaves the file as it
        was), _MIGRATE_STEP rows at a time. Returns whether there was such a table."""
        after = 0
        count = 0
        try:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
            ).fetchone():
                return False
            while True:
                rows: List[Tuple[str, int, str, float]] = []
                chars = 0
                cur = conn.execute(
                    "SELECT rowid, topic, seq, data, time FROM messages WHERE rowid > ?"
                    " ORDER BY rowid", (after,)
                )
                try:
                    for rowid, topic, seq, data, tm in cur:
                        after = rowid
                        rows.append((topic, seq, data, tm))
                        chars += len(data)
                        if len(rows) >= _MIGRATE_STEP or chars >= _MIGRATE_CHARS:
                            break
                finally:
                    cur.close()
                if not rows:
                    break
                count += len(rows)
                # the rows go as their runs come, so that the runs take the pages freed
                conn.execute("DELETE FROM messages WHERE rowid <= ?", (after,))
                conn.executemany(_INSERT_RUN, runs_of_messages(rows))
            conn.execute("DROP TABLE messages")
        except sqlite3.Error as exc:
            raise StoreError(
                "cannot migrate sqlite store %s to schema version %d (the file is left as it"
                " was): %s" % (self.path, _SCHEMA_VERSION, exc)
            ) from exc
        logger.info(
            "sqlite store %s: migrated %d messages to schema version %d",
            self.path, count, _SCHEMA_VERSION,
        )
        return True

    def _load(self) -> str:
        conn = self._conn()
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                raise StoreError("sqlite store %s has no epoch (not a wsbroadcast store?)" % self.path)
            if self.read_only:
                self._v1 = self._schema_of(conn) == 1
                if self._v1:
                    logger.warning(
                        "sqlite store %s has the layout of an older version (schema 1): read"
                        " as it is; open it writable once to migrate it",
                        self.path,
                    )
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError("cannot read sqlite store %s: %s" % (self.path, exc)) from exc
        except StoreError:
            conn.close()
            raise
        return str(row[0])

    # -- reading

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        """Lend a reader connection (or the writer, under _wlock, as a fallback)."""
        # Once the file was replaced, a new reader would open the other file: read the
        # one this store wrote, through the writer.
        conn: Optional[sqlite3.Connection] = None
        if not (self._shared_reads or self._reader_failed or self._lost):
            with self._pool_lock:
                self._check_open()
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                try:
                    conn = self._open_reader()
                except sqlite3.Error as exc:
                    logger.warning(
                        "cannot open a reader connection to %s (%s); reading through the writer",
                        self.path,
                        exc,
                    )
                    self._reader_failed = True
        if conn is None:
            with self._wlock:
                self._check_open()
                yield self._conn()
            return
        keep = False
        try:
            yield conn
            keep = True
        finally:
            with self._pool_lock:
                if keep and not self._closed and len(self._idle) < _MAX_IDLE_READERS:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _open_checkpointer(self) -> Optional[sqlite3.Connection]:
        """A connection for :meth:`checkpoint`; with it, commits leave checkpoints to it
        (but past _WAL_BACKSTOP_PAGES). None, commits checkpointing as SQLite does by
        default, when it cannot be opened."""
        try:
            conn = self._connect(self.path, self._is_uri)
        except sqlite3.Error as exc:
            logger.warning("sqlite store %s: no checkpoint connection (%s)", self.path, exc)
            return None
        try:
            conn.execute("PRAGMA synchronous=%s" % ("FULL" if self.full_sync else "NORMAL"))
            self._conn().execute("PRAGMA wal_autocheckpoint=%d" % _WAL_BACKSTOP_PAGES)
        except sqlite3.Error as exc:
            conn.close()
            logger.warning("sqlite store %s: no checkpoint connection (%s)", self.path, exc)
            return None
        return conn

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file (PASSIVE: waits for
        neither the writer nor readers), so that no publish's commit does it."""
        with self._ckpt_lock:
            conn = self._ckpt
            if conn is None or self._closed or self._lost:
                return
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                self._errors.error("sqlite store %s: checkpoint failed: %s", self.path, exc)

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect(self._reader_uri, True)
        try:
            # a small page cache: a reader's cache is dropped whenever the file changed
            # since its last read anyway, and big messages would park ~2 MiB in each
            conn.execute("PRAGMA cache_size=%d" % -_READER_CACHE_KIB)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        """The writer connection; StoreError when the store is not open."""
        conn = self._writer
        if conn is None:
            raise StoreError("store is not open")
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")
        if self._writer is None:
            raise StoreError("store is not open")

    def latest(self, topic: str) -> Tuple[int, str]:
        if self._group is not None:
            with self._wlock:
                group = self._group
                if group is not None and topic in group.meta:
                    # a seq given out only once it is stored: an ack that says it must
                    # not meet a rollback that gives it out again
                    self._settle_locked()
        meta = self._meta.get(topic)
        if meta is None:
            with self._wlock:
                self._check_open()
                try:
                    meta = self._lookup(topic)
                except sqlite3.Error as exc:
                    raise StoreError("cannot read topic %r: %s" % (topic, exc)) from exc
            if meta is None:
                return 0, self.epoch
        return meta[1], meta[0]

    def _lookup(self, topic: str) -> Optional[Tuple[str, int]]:
        """(epoch, last seq) of a topic from the cache or the table (under _wlock)."""
        meta = self._meta.get(topic)
        if meta is None:
            row = self._conn().execute(
                "SELECT epoch, last_seq FROM topics WHERE topic = ?", (topic,)
            ).fetchone()
            if row is not None:
                meta = (str(row[0]), int(row[1]))
                self._remember({topic: meta})
        return meta

    def _remember(self, metas: Dict[str, Tuple[str, int]]) -> None:
        cache = self._meta
        cache.update(metas)
        over = len(cache) - _META_CACHE
        if over > 0:
            for topic in list(itertools.islice(cache, over + _META_CACHE // 8)):
                del cache[topic]

    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        if limit <= 0:
            return []
        bound = ByteBound(max_bytes)
        out: List[StoredMessage] = []
        try:
            with self._reader() as conn:
                if self._v1:
                    self._since_v1(conn, topic, seq, limit, bound, out)
                    return out
                # a row per run: at most ``limit`` rows hold the page (each has a message
                # at least); the first may begin before seq
                cur = conn.execute(
                    "SELECT first_seq, last_seq, time, lens, data FROM runs"
                    " WHERE topic = ? AND last_seq > ? ORDER BY last_seq LIMIT ?",
                    (topic, seq, limit),
                )
                try:
                    # run by run: past the bound at most one message more is read, none
                    # once the bound is reached (a run costs at most _RUN_CHARS to read)
                    while not bound.full and len(out) < limit:
                        row = cur.fetchone()
                        if row is None:
                            break
                        first, last, tm, lens, data = row
                        at = max(first, seq + 1)
                        try:
                            texts = unpack_run(lens, data, last - first + 1, at - first,
                                               at - first + limit - len(out))
                        except ValueError as exc:
                            raise StoreError(
                                "sqlite store %s: run %d-%d of %r is damaged: %s"
                                % (self.path, first, last, topic, exc)
                            ) from None
                        size = len(texts)
                        if max_bytes is not None:
                            texts = list(itertools.takewhile(
                                lambda text: not bound.full and bound.admit(text), texts
                            ))
                        # an older version may have stored NaN/Infinity
                        out.extend(map(StoredMessage._make, zip(
                            itertools.repeat(topic), itertools.count(at),
                            map(strict_text, texts), itertools.repeat(tm),
                        )))
                        if len(texts) < size:
                            break  # a message did not fit: the bound is reached
                finally:
                    cur.close()  # ends the read before the connection goes back to the pool
        except sqlite3.Error as exc:
            raise StoreError("cannot read history of %r: %s" % (topic, exc)) from exc
        return out

    @staticmethod
    def _since_v1(conn: sqlite3.Connection, topic: str, seq: int, limit: int,
                  bound: ByteBound, out: List[StoredMessage]) -> None:
        """since() of a read-only file of the version-1 layout (a row per message)."""
        cur = conn.execute(
            "SELECT topic, seq, data, time FROM messages"
            " WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
            (topic, seq, limit),
        )
        try:
            while not bound.full:
                row = cur.fetchone()
                if row is None or not bound.admit(row[2]):
                    break
                out.append(StoredMessage(row[0], row[1], strict_text(row[2]), row[3]))
        finally:
            cur.close()

    def oldest(self, topic: str) -> int:
        try:
            with self._reader() as conn:
                if self._v1:
                    query = "SELECT MIN(seq) FROM messages WHERE topic = ?"
                else:  # runs do not overlap: the first by last_seq begins first
                    query = "SELECT first_seq FROM runs WHERE topic = ? ORDER BY last_seq LIMIT 1"
                row = conn.execute(query, (topic,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError("cannot read history of %r: %s" % (topic, exc)) from exc
        return int(row[0]) if row and row[0] is not None else 0

    # -- writing

    def append_batch(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        out, pending = self.append_deferred(items)
        if pending is not None and not pending.settle():
            raise StoreError(pending.error or "cannot store messages")
        return out

    def append_deferred(
        self, items: Sequence[Tuple[str, str]]
    ) -> Tuple[List[Tuple[int, str]], Optional[Pending]]:
        _check_items(items)
        with self._wlock:
            self._check_open()
            if self.read_only:
                raise StoreError("sqlite store %s is read-only" % self.path)
            if self._lost:
                raise StoreError(self._lost)
            if not items:
                return [], None
            group = self._group
            if group is None:
                group = _Group(self)
            meta = group.meta
            # topic -> (epoch, last seq) of the topics this batch adds to the group, None
            # for one the topics table does not hold
            first: Dict[str, Optional[Tuple[str, int]]] = {}
            try:
                for topic, _data in items:
                    if topic not in meta and topic not in first:
                        first[topic] = self._lookup(topic)
            except sqlite3.Error as exc:  # (only a read: the group is as it was)
                raise StoreError("cannot read topics: %s" % exc) from exc
            # Nothing below can fail: the batch joins the group whole.
            self._group = group
            for topic, known in first.items():
                if known is None:
                    known = (self.epoch, 0)
                    group.new.add(topic)
                meta[topic] = known
            keep = self.history_size > 0
            texts = group.texts
            out: List[Tuple[int, str]] = []
            chars = 0
            for topic, data in items:
                epoch, seq = meta[topic]
                meta[topic] = (epoch, seq + 1)
                out.append((seq + 1, epoch))
                if keep:
                    run = texts.get(topic)
                    if run is None:
                        run = texts[topic] = []
                    run.append(data)
                    chars += len(data)
            group.time = self._clock()
            group.appends += 1
            group.chars += chars
            if group.appends >= _GROUP_APPENDS or group.chars >= _GROUP_CHARS:
                self._settle_locked()  # bounded: what the group holds, what waits on it
            return out, group

    def _settle(self, group: "_Group") -> bool:
        """Commit ``group`` if it is still open (see Pending.settle)."""
        if group.stored is None:
            with self._wlock:
                self._settle_locked()  # (a group not settled yet is the open one)
        return bool(group.stored)

    def _settle_locked(self) -> None:
        """Write and commit the open group, if any, in one transaction (under _wlock)."""
        group = self._group
        if group is None:
            return
        conn = self._conn()
        lost = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            meta = group.meta
            _execute_rows(conn, _INSERT_RUN, group.rows())
            _execute_rows(conn, "INSERT INTO topics (topic, epoch, last_seq) VALUES (?, ?, ?)",
                          [(t, meta[t][0], meta[t][1]) for t in group.new])
            _execute_rows(conn, "UPDATE topics SET last_seq = ? WHERE topic = ?",
                          [(seq, t) for t, (_e, seq) in meta.items() if t not in group.new])
            # Last check before the commit: a file deleted or replaced is one no
            # restart opens, so what would be acked now would be lost.
            lost = self._check_file()
            if lost is None:
                conn.execute("COMMIT")
        except Exception as exc:
            self._end_group(group, "cannot store messages: %s" % exc)
            return
        except BaseException:
            self._end_group(group, "interrupted")
            raise
        if lost is not None:  # (a lost file was logged once by _check_file)
            self._end_group(group, lost, log=lost != self._lost)
            return
        self._group = None
        group.stored = True
        group.texts = {}
        self._append_error = None
        # Committed: only now does the cache move forward.
        self._remember(group.meta)
        if self.history_size > 0:
            size = self.history_size
            for topic, (_e, seq) in group.meta.items():
                if seq > size:
                    self._dirty[topic] = seq

    def _end_group(self, group: "_Group", error: str, log: bool = True) -> None:
        """Roll back the commit of ``group``, if begun: nothing of it is stored."""
        _rollback(self._conn())
        self._group = None
        group.stored = False
        group.error = error
        group.texts = {}
        if error != self._lost:
            self._append_error = error
        if log:
            self._errors.error("sqlite store %s: %d append(s) not stored: %s",
                               self.path, group.appends, error)

    def trim(self, now: Optional[float] = None) -> int:
        return self._trim_in_steps(now)

    def trim_step(
        self, now: Optional[float] = None, limit: int = TRIM_STEP, in_use: Optional[InUse] = None
    ) -> Tuple[int, bool]:
        """Apply retention to about ``limit`` messages or topics: ``(messages removed, more to do)``.

        Age: the oldest runs by insertion (rowid) order while they are expired (a run
        has one time), so what stays of a topic is contiguous; whole runs, of about
        ``limit`` messages (up to a run more). Count: topics appended past
        ``history_size`` since their last trim, and every topic after opening or a
        change of size; at most ``limit`` messages are removed in all, the oldest of
        each topic first (a run cut is rewritten as its kept part: up to a run more to
        write). Topics are never forgotten here: their row in the topics table keeps
        the numbering, also when every message expired (``in_use`` is not needed).
        """
        with self._wlock:
            if self._closed or self._writer is None or self.read_only or self._lost:
                return 0, False
            self._settle_locked()  # its own transactions follow
            size = self.history_size
            ttl = self.history_ttl
            conn = self._conn()
            removed = 0
            more = False
            try:
                if self._scan_size != size:
                    self._scan, self._scan_size = "", size
                if ttl is not None:
                    cutoff = (self._clock() if now is None else now) - ttl
                    upto = None
                    rows = conn.execute(
                        "SELECT rowid, time, last_seq - first_seq + 1 FROM runs"
                        " ORDER BY rowid LIMIT ?", (limit,)
                    ).fetchall()
                    expired = 0
                    for rowid, tm, count in rows:
                        if tm >= cutoff:
                            break
                        if expired >= limit:
                            more = True
                            break
                        upto = rowid
                        expired += count
                    else:
                        more = len(rows) == limit
                    if upto is not None:
                        conn.execute("BEGIN IMMEDIATE")
                        conn.execute("DELETE FROM runs WHERE rowid <= ?", (upto,))
                        conn.execute("COMMIT")
                        removed += expired
                    if more:
                        return removed, True
                # topic -> its last seq: each topic once, from the scan or _dirty
                work: Dict[str, int] = {}
                if self._scan is not None:
                    rows = conn.execute(
                        "SELECT topic, last_seq FROM topics WHERE topic > ? ORDER BY topic LIMIT ?",
                        (self._scan, limit),
                    ).fetchall()
                    work.update((t, last) for t, last in rows if last > size)
                    self._scan = rows[-1][0] if len(rows) == limit else None
                    more = self._scan is not None
                dirty = self._dirty
                while dirty and len(work) < limit:
                    topic = next(iter(dirty))
                    last = dirty.pop(topic)
                    work[topic] = max(last, work.get(topic, 0))
                more = more or bool(dirty)
                if work:
                    # at most ``limit`` messages per step, however far a topic is past
                    # its size (a burst between rounds, a smaller history_size): the
                    # rest of a topic is left in _dirty for the next step
                    budget = limit
                    conn.execute("BEGIN IMMEDIATE")
                    for topic, last in work.items():
                        if budget > 0:
                            n, done = self._trim_topic(conn, topic, last - size, budget)
                            removed += n
                            budget -= max(n, 1)
                            if done:
                                continue
                        dirty[topic] = max(last, dirty.get(topic, 0))
                        more = True
                    conn.execute("COMMIT")
            except Exception as exc:
                _rollback(conn)
                raise StoreError("cannot trim sqlite store %s: %s" % (self.path, exc)) from exc
            if removed:
                logger.debug("sqlite store %s: trimmed %d messages", self.path, removed)
            return removed, more

    def _trim_topic(self, conn: sqlite3.Connection, topic: str, upto: int,
                    budget: int) -> Tuple[int, bool]:
        """Remove the messages of ``topic`` up to seq ``upto``, at most ``budget`` of them
        (the oldest): ``(messages removed, all up to upto are)``. Runs that end by then
        are deleted; the one that holds the last message removed and more is rewritten
        as what it keeps: only at ``upto``, or when its first run is longer than the
        budget (else the step stops before a run it would cut)."""
        row = conn.execute(
            "SELECT first_seq FROM runs WHERE topic = ? ORDER BY last_seq LIMIT 1", (topic,)
        ).fetchone()
        if row is None:
            return 0, True
        oldest = int(row[0])
        end = min(upto, oldest + budget - 1)
        if end < upto:
            run = conn.execute(
                "SELECT first_seq, last_seq FROM runs WHERE topic = ? AND last_seq >= ?"
                " ORDER BY last_seq LIMIT 1", (topic, end)
            ).fetchone()
            if run is not None and oldest < run[0] <= end < run[1] <= upto:
                end = run[0] - 1  # the run goes whole in a later step
        removed = 0
        if oldest <= end:
            removed = conn.execute(
                "SELECT coalesce(sum(last_seq - first_seq + 1), 0) FROM runs"
                " WHERE topic = ? AND last_seq <= ?", (topic, end)
            ).fetchone()[0]
            conn.execute("DELETE FROM runs WHERE topic = ? AND last_seq <= ?", (topic, end))
            cut = conn.execute(
                "SELECT first_seq, last_seq FROM runs WHERE topic = ? ORDER BY last_seq LIMIT 1",
                (topic,),
            ).fetchone()
            if cut is not None and cut[0] <= end:
                first, last = cut
                lens, data = conn.execute(
                    "SELECT lens, data FROM runs WHERE topic = ? AND last_seq = ?", (topic, last)
                ).fetchone()
                try:
                    texts = unpack_run(lens, data, last - first + 1, end + 1 - first)
                except ValueError as exc:
                    raise StoreError(
                        "run %d-%d of %r is damaged: %s" % (first, last, topic, exc)
                    ) from None
                lens, data = pack_run(texts)
                conn.execute(
                    "UPDATE runs SET first_seq = ?, lens = ?, data = ?"
                    " WHERE topic = ? AND last_seq = ?",
                    (end + 1, lens, data, topic, last),
                )
                removed += end + 1 - first
        return removed, end >= upto

    def close(self) -> None:
        with self._wlock:
            if self._writer is not None and not self._closed:
                self._settle_locked()
            with self._pool_lock:
                if self._closed:
                    return
                self._closed = True
                idle, self._idle = self._idle, []
            # Readers in use are closed when they are given back.
            for conn in idle:
                conn.close()
            with self._ckpt_lock:
                ckpt, self._ckpt = self._ckpt, None
            if ckpt is not None:
                ckpt.close()
            if self._writer is None:
                return
            try:
                self._writer.close()
            except sqlite3.Error as exc:  # pragma: no cover - close rarely fails
                logger.warning("closing sqlite store %s: %s", self.path, exc)
            if self._lock_file is not None:
                self._lock_file.release()
        logger.info("sqlite store %s closed", self.path)

    # -- health

    @property
    def failure(self) -> Optional[str]:
        """Why appends are refused: closed, read-only, file deleted or replaced, last error."""
        if self._closed:
            return "store is closed"
        if self._writer is None:
            return "store is not open"
        if self.read_only:
            return "sqlite store %s is read-only" % self.path
        return self._check_file() or self._append_error

    def _check_file(self) -> Optional[str]:
        """Whether the path still names the file opened; once it does not, say so for good.

        Any thread may call it (an os.stat, no lock).
        """
        if self._lost or self._identity is None or self._file is None:
            return self._lost
        try:
            st = os.stat(self._file)
        except (FileNotFoundError, NotADirectoryError):
            what = "was deleted"
        except OSError as exc:
            return "cannot check sqlite store %s: %s" % (self.path, exc)
        else:
            if (st.st_dev, st.st_ino) == self._identity:
                return None
            what = "was replaced by another file"
        if self._lost is None:
            self._lost = (
                "sqlite store %s %s while in use; messages are not stored until a restart"
                % (self.path, what)
            )
            logger.error("%s", self._lost)
        return self._lost


def _execute_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple]) -> None:
    """``sql`` once per row (``execute`` for one: cheaper than ``executemany``)."""
    if len(rows) == 1:
        conn.execute(sql, rows[0])
    elif rows:
        conn.executemany(sql, rows)


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any; never raise."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        logger.warning("sqlite rollback failed: %s", exc)


# --------------------------------------------------------------------------- trimmer


#: ``step(limit) -> (more to do, seconds a lock was held)``: one bounded piece of a trim
TrimStep = Callable[[int], Tuple[bool, float]]


class RetentionTrimmer:
    """A daemon thread applying retention every ``interval`` seconds, in small steps,
    then the store's :meth:`~MessageStore.checkpoint`.

    Each round calls ``step(limit)`` until it reports nothing more to do, pausing
    between steps so that the lock it takes (the hub's) is free for others most
    of the time; ``limit`` adapts so that a step takes about ``HOLD`` seconds of
    CPU. Without ``step`` a round is ``store.trim()``. Exceptions are logged
    (at most one traceback per minute while they repeat) and the thread keeps going.
    """

    LOG_EVERY = 60.0
    #: seconds a step aims to hold its lock
    HOLD = 0.002
    MIN_LIMIT = 16
    MAX_LIMIT = 2000

    def __init__(self, store: MessageStore, interval: float = 1.0,
                 step: Optional[TrimStep] = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.store = store
        self.interval = interval
        self.step = step or self._store_step
        self.limit = TRIM_STEP
        #: the longest a step held its lock, in seconds (wall clock: preemption included)
        self.longest_hold = 0.0
        #: the most CPU time one step took, in seconds (what the step size controls)
        self.longest_cpu = 0.0
        self.steps = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_log = float("-inf")

    def _store_step(self, limit: int) -> Tuple[bool, float]:
        start = time.perf_counter()
        self.store.trim()  # its own steps take and release the store's lock
        return False, time.perf_counter() - start

    def start(self) -> None:
        """Start the thread (once; later calls do nothing)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="wsbroadcast-trimmer", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Ask the thread to stop and wait for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def run_once(self) -> None:
        """One round: steps until nothing more is to do (or stop)."""
        while True:
            cpu = time.thread_time()
            more, held = self.step(self.limit)
            cpu = time.thread_time() - cpu
            self.steps += 1
            self.longest_hold = max(self.longest_hold, held)
            self.longest_cpu = max(self.longest_cpu, cpu)
            # sized by CPU time: on a busy machine the wall clock also counts preemption
            if cpu > self.HOLD:
                self.limit = max(self.MIN_LIMIT, self.limit // 2)
            elif cpu < self.HOLD / 4 and more:
                self.limit = min(self.MAX_LIMIT, self.limit * 2)
            # pause about as long as the step took: the lock is free at least half the time
            if not more or self._stop.wait(max(0.0005, held)):
                return

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
                self.store.checkpoint()
            except Exception:
                mono = time.monotonic()
                if mono - self._last_log >= self.LOG_EVERY:
                    self._last_log = mono
                    logger.exception("retention trim failed")
                else:
                    logger.debug("retention trim failed again", exc_info=True)


# --------------------------------------------------------------------------- factory


def open_store(
    spec: str,
    history_size: int,
    history_ttl: Optional[float],
    *,
    full_sync: bool = False,
    defer_open: bool = False,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> MessageStore:
    """Open a store: ``"memory"`` is a MemoryStore (of ``memory_bytes``), anything else an SqliteStore.

    With ``defer_open`` nothing touches the file system until ``store.open()``.
    """
    if spec == "memory":
        return MemoryStore(history_size, history_ttl, max_bytes=memory_bytes)
    return SqliteStore(spec, history_size, history_ttl, full_sync=full_sync, defer_open=defer_open)
