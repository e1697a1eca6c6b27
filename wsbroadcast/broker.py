"""The broker boundary: where publications get their seq, are kept, and come back for delivery.

Publishing always goes through a broker. The hub delivers a publication to its
local subscribers only when the broker hands it back: ``LocalBroker`` (memory or
SQLite store, one process) does so at once, inside ``publish``'s caller; a
shared broker such as ``RedisBroker`` hands back what its subscription receives,
from its own thread, through the callback given to ``start``. The hub does not
know which broker it runs on.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional, Sequence, Tuple

from .store import InUse, MemoryStore, MessageStore, Pending, StoredMessage

if TYPE_CHECKING:  # pragma: no cover
    from .presence import Member


class Publication(NamedTuple):
    """One stored publication: its topic, position and JSON text."""

    topic: str
    seq: int
    epoch: str
    data: str


#: the hub's entry point for publications handed back by a broker
Handler = Callable[[Sequence[Publication]], None]


class Broker(abc.ABC):
    """Seq assignment, history, and fan-out between nodes."""

    #: True when ``publish``'s caller delivers the publications itself, right away
    delivers_locally: bool = True
    #: this node's name in client ids (set by the hub)
    node: str = ""

    def start(self, handler: Handler) -> None:
        """Begin handing publications back to ``handler`` (a shared broker's own thread)."""

    @abc.abstractmethod
    def publish(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        """Store ``[(topic, data_json), ...]`` in order; return each one's (seq, epoch).

        All or nothing: raises StoreError or BrokerUnavailable and stores none.
        """

    def publish_deferred(
        self, items: Sequence[Tuple[str, str]]
    ) -> Tuple[List[Tuple[int, str]], Optional[Pending]]:
        """``publish`` whose commit may come later: ``(positions, pending)``, see
        ``MessageStore.append_deferred`` (``pending`` None: stored already)."""
        return self.publish(items), None

    @abc.abstractmethod
    def latest(self, topic: str) -> Tuple[int, str]:
        """(last seq, epoch) of a topic; (0, epoch) for one never published."""

    @abc.abstractmethod
    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        """Stored messages of ``topic`` with seq > ``seq``, oldest first, at most ``limit``.

        With ``max_bytes``, bounded by bytes too, as ``MessageStore.since``.
        """

    @abc.abstractmethod
    def oldest(self, topic: str) -> int:
        """Seq of the oldest stored message of ``topic``, 0 when none is stored."""

    def interest(self, pattern: str, on: bool, acked: Optional[int] = None) -> None:
        """This node gained (``on``) or lost its last local subscriber of ``pattern``.

        ``acked`` is the seq a new topic subscriber was told is the latest: a shared
        broker must hand back every later publication of the topic, none missed.
        Called with the hub's lock held: must not block.
        """

    def attach(self, in_use: InUse) -> None:
        """Learn how to ask whether a subscriber relies on a topic's numbering.

        ``in_use(topic)`` may only be called with the hub's lock held (in ``publish``,
        ``latest`` or ``trim``).
        """

    @property
    def trim_needs_lock(self) -> bool:
        """Whether :meth:`trim` must be called with the hub's lock held (it may ask ``in_use``)."""
        return True

    def trim(self, limit: int, in_use: InUse) -> Tuple[int, bool]:
        """One bounded step of retention: ``(messages removed, more to do)``.

        Called with the hub's lock held when :attr:`trim_needs_lock`, so ``in_use(topic)``
        (is a subscriber relying on its numbering?) cannot change meanwhile: a topic may
        be forgotten only when it says no; otherwise ``in_use`` must not be called.
        About ``limit`` messages or topics are handled per call.
        """
        return 0, False

    def member(self, topic: str, member: "Member", on: bool) -> None:
        """A connection of this node became (``on``) or stopped being a member of ``topic``.

        A shared broker tells the other nodes (their listeners get a join or leave in
        order with this node's messages) and keeps the member in its presence.
        Called with the hub's lock held: must not block.
        """

    def join_leave_interest(self, topic: str, on: bool) -> None:
        """This node gained (``on``) or lost its last join/leave listener of ``topic``: a
        shared broker hands back the other nodes' joins and leaves of it, in order with
        their messages, as publications with seq 0 (epoch "join" or "leave", data the
        client object). Called with the hub's lock held: must not block."""

    def presence_source(self, snapshot: Callable[[], List[Tuple[str, str, str]]]) -> None:
        """``snapshot()`` lists this node's members as (topic, client id, client object)."""

    def presence(self, topic: str) -> List[Tuple[int, List[str], List["Member"]]]:
        """The members of ``topic`` on the other nodes: per node (count, subs, earliest
        members at most presence.MAX_LISTED). May block; raises BrokerUnavailable."""
        return []

    def wait_subscribed(self, pattern: str, timeout: float) -> bool:
        """Block until this node's interest in ``pattern`` is in effect (never holding the hub lock)."""
        return True

    def wait_join_leave(self, topic: str, timeout: float) -> bool:
        """Block until the other nodes' joins and leaves of ``topic`` reach this node (never
        holding the hub lock)."""
        return True

    @property
    def healthy(self) -> bool:
        """False while the broker cannot take publishes (e.g. its server is away)."""
        return True

    @property
    def reason(self) -> Optional[str]:
        """Why publishes cannot be stored now (one line for /healthz), None while they can."""
        return None if self.healthy else "the shared broker is unavailable"

    def status(self) -> dict:
        """Details for /healthz."""
        return {"kind": type(self).__name__, "healthy": self.healthy}

    def close(self) -> None:
        """Release connections and threads."""


class LocalBroker(Broker):
    """One process: a memory or SQLite store; publications are delivered by the caller at once."""

    delivers_locally = True

    def __init__(self, store: MessageStore) -> None:
        self.store = store

    def publish(self, items: Sequence[Tuple[str, str]]) -> List[Tuple[int, str]]:
        return self.store.append_batch(items)

    def publish_deferred(
        self, items: Sequence[Tuple[str, str]]
    ) -> Tuple[List[Tuple[int, str]], Optional[Pending]]:
        return self.store.append_deferred(items)

    def latest(self, topic: str) -> Tuple[int, str]:
        return self.store.latest(topic)

    def since(self, topic: str, seq: int, limit: int,
              max_bytes: Optional[int] = None) -> List[StoredMessage]:
        return self.store.since(topic, seq, limit, max_bytes)

    def oldest(self, topic: str) -> int:
        return self.store.oldest(topic)

    @property
    def healthy(self) -> bool:
        return self.store.failure is None

    @property
    def reason(self) -> Optional[str]:
        return self.store.failure

    def attach(self, in_use: InUse) -> None:
        self.store.in_use = in_use

    def interest(self, pattern: str, on: bool, acked: Optional[int] = None) -> None:
        if not on:
            self.store.release(pattern)

    @property
    def trim_needs_lock(self) -> bool:
        return self.store.forgets_topics

    def trim(self, limit: int, in_use: InUse) -> Tuple[int, bool]:
        return self.store.trim_step(limit=limit, in_use=in_use)

    def status(self) -> dict:
        out = {"kind": "local", "store": type(self.store).__name__, "healthy": self.healthy,
               "read_only": bool(getattr(self.store, "read_only", False))}
        if isinstance(self.store, MemoryStore):
            out.update(topics=len(self.store), bytes=self.store.bytes_used,
                       max_bytes=self.store.max_bytes)
        return out

    def close(self) -> None:
        self.store.close()
