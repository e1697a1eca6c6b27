"""The hub: the registry of connections and subscriptions, where a message is matched.

Commands parsed by a reader arrive here in batches (one per chunk read). Under
one lock the hub checks them, assigns seqs through the store, matches each
publication against the subject tree, and queues acks and deliveries on the
writer's channel, so that per topic the order of the channel is the seq order
and a subscribe's ack precedes every message published after it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .connection import Connection
from .envelope import (
    SEED_TOPIC, Invalid, Ping, Publish, Subscribe, Unsubscribe, ack_text, error_text,
    has_id, message_text, pong_text,
)
from .errors import BrokerUnavailable, ErrorCode, StoreError
from .store import MessageStore, StoredMessage
from .topics import SubjectTree, is_wildcard, validate_topic
from .writer import DELIVER, REPLAY, SEND, SLOW, Writer
from .wsframe import text_frame

logger = logging.getLogger(__name__)

#: messages read from the store per replay page
REPLAY_PAGE = 200


def _frame(text: str) -> bytes:
    return text_frame(text.encode("utf-8"))


class Hub:
    """Connections, subscriptions and the publish path of one server."""

    def __init__(self, store: MessageStore, writer: Writer, max_subscriptions: int = 1000) -> None:
        self.store = store
        self.writer = writer
        self.max_subscriptions = max_subscriptions
        # The hub lock guards: the subject tree, the set of connections, every
        # Connection.patterns / .replays / .registered, store.append_batch and
        # store.latest (seq assignment), and the order of puts on the writer's
        # channel for everything above. Never taken by the writer thread.
        self.lock = threading.Lock()
        self._tree: SubjectTree[Connection] = SubjectTree()
        self._conns: Dict[int, Connection] = {}
        self._replaying = 0  # connections with a replay in progress (under lock)
        self.received = 0  # messages published (under lock)

    # ------------------------------------------------------------------ registry
    def add(self, conn: Connection) -> None:
        """Register a connection."""
        with self.lock:
            self._conns[conn.id] = conn
            conn.registered = True

    def remove(self, conn: Connection) -> None:
        """Unregister a connection and drop all its subscriptions."""
        with self.lock:
            if not conn.registered:
                return
            conn.registered = False
            self._conns.pop(conn.id, None)
            for pattern in conn.patterns:
                self._tree.remove(pattern, conn)
            conn.patterns.clear()
            if conn.replays:
                self._replaying -= 1
                conn.replays.clear()

    def connections(self) -> List[Connection]:
        """A snapshot of the registered connections."""
        with self.lock:
            return list(self._conns.values())

    def __len__(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ commands
    def handle(self, conn: Connection, commands: Sequence[Any]) -> None:
        """Carry out a batch of one connection's commands in order."""
        ops: List[tuple] = []
        replays: List[Tuple[Subscribe, int, str]] = []
        with self.lock:
            if not conn.registered:
                return
            pubs: List[Publish] = []
            for cmd in commands:
                kind = type(cmd)
                if kind is Publish:
                    refusal = self._check_publish(conn, cmd)
                    if refusal is None:
                        pubs.append(cmd)
                    else:
                        ops.append((SEND, conn, _frame(error_text(cmd.id, refusal[0], refusal[1]))))
                    continue
                if pubs:
                    self._publish_locked(conn, pubs, ops)
                    pubs = []
                if kind is Subscribe:
                    replay = self._subscribe_locked(conn, cmd, ops)
                    if replay is not None:
                        replays.append(replay)
                elif kind is Unsubscribe:
                    self._unsubscribe_locked(conn, cmd.topic)
                    ops.append((SEND, conn, _frame(ack_text(cmd.id, cmd.topic))))
                elif kind is Ping:
                    ops.append((SEND, conn, _frame(pong_text(cmd.id))))
                elif kind is Invalid:
                    ops.append((SEND, conn, _frame(error_text(cmd.id, cmd.code, cmd.message))))
            if pubs:
                self._publish_locked(conn, pubs, ops)
            if ops:
                self.writer.put(ops)
        for cmd, upto, epoch in replays:
            self._replay(conn, cmd, upto)

    def subscribe_seed(self, conn: Connection) -> None:
        """The automatic subscription of a plain connection to the seed topic (no ack)."""
        with self.lock:
            if conn.registered and self._allowed(conn, "subscribe", SEED_TOPIC):
                conn.patterns.add(SEED_TOPIC)
                self._tree.insert(SEED_TOPIC, conn)

    def publish(self, topic: str, data_json: str) -> Tuple[int, str]:
        """Publish from inside the process (any thread); returns (seq, epoch)."""
        validate_topic(topic)
        ops: List[tuple] = []
        with self.lock:
            pubs = self._store_locked([Publish(topic, data_json, None)])
            self._deliver_locked(pubs, ops)
            self.writer.put(ops)
        _, seq, epoch, _ = pubs[0]
        return seq, epoch

    # ------------------------------------------------------------------ publish
    def _check_publish(self, conn: Connection, cmd: Publish) -> Optional[Tuple[ErrorCode, str]]:
        if not self._allowed(conn, "publish", cmd.topic):
            return ErrorCode.FORBIDDEN, "not allowed to publish on %s" % cmd.topic
        if conn.rate is not None and not conn.rate.take():
            return ErrorCode.RATE_LIMITED, "publish rate limit exceeded"
        return None

    @staticmethod
    def _allowed(conn: Connection, action: str, pattern: str) -> bool:
        claims = conn.claims
        if claims is None:
            return True
        if action == "publish":
            return claims.can_publish(pattern)
        return claims.can_subscribe(pattern)

    def _store_locked(self, pubs: Sequence[Publish]) -> List[Tuple[str, int, str, str]]:
        positions = self.store.append_batch([(p.topic, p.data) for p in pubs])
        self.received += len(pubs)
        return [(p.topic, seq, epoch, p.data) for p, (seq, epoch) in zip(pubs, positions)]

    def _publish_locked(self, conn: Connection, pubs: List[Publish], ops: List[tuple]) -> None:
        try:
            stored = self._store_locked(pubs)
        except (StoreError, BrokerUnavailable) as exc:
            logger.error("publish of %d message(s) from %s failed: %s", len(pubs), conn.label, exc)
            for p in pubs:
                ops.append((SEND, conn, _frame(error_text(
                    p.id, ErrorCode.INTERNAL, "message not stored: %s" % exc))))
            return
        for p, (topic, seq, epoch, _data) in zip(pubs, stored):
            if has_id(p.id):
                ops.append((SEND, conn, _frame(ack_text(p.id, topic, seq, epoch))))
        self._deliver_locked(stored, ops)

    def _deliver_locked(self, stored: Sequence[Tuple[str, int, str, str]], ops: List[tuple]) -> None:
        now = time.monotonic()
        match = self._tree.match
        for topic, seq, _epoch, data in stored:
            recipients = match(topic)
            if not recipients:
                continue
            if self._replaying:
                recipients = self._divert_replaying(recipients, topic, seq, data)
            ops.append((DELIVER, topic, seq, data, recipients, now))

    def _divert_replaying(self, recipients: Any, topic: str, seq: int, data: str) -> Any:
        """Buffer live messages for connections replaying this topic; deliver to the rest."""
        keep = []
        for conn in recipients:
            buf = conn.replays.get(topic)
            if buf is None:
                keep.append(conn)
                continue
            text = message_text(topic, seq, data) if not conn.is_plain else data
            buf[0].append(text)
            buf[1] += len(text)
            if buf[1] > conn.max_outbox:
                # the live part alone outgrew the limit while the replay ran
                self.writer.put(((SLOW, conn),))
                buf[0].clear()
                buf[1] = 0
        return keep

    # ------------------------------------------------------------------ subscribe
    def _subscribe_locked(self, conn: Connection, cmd: Subscribe,
                          ops: List[tuple]) -> Optional[Tuple[Subscribe, int, str]]:
        pattern = cmd.topic
        if not self._allowed(conn, "subscribe", pattern):
            ops.append((SEND, conn, _frame(error_text(
                cmd.id, ErrorCode.FORBIDDEN, "not allowed to subscribe to %s" % pattern))))
            return None
        if pattern not in conn.patterns and len(conn.patterns) >= self.max_subscriptions:
            ops.append((SEND, conn, _frame(error_text(
                cmd.id, ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                "at most %d subscriptions per connection" % self.max_subscriptions))))
            return None
        if is_wildcard(pattern):
            self._insert(conn, pattern)
            ops.append((SEND, conn, _frame(ack_text(cmd.id, pattern))))
            return None
        try:
            latest, epoch = self.store.latest(pattern)
        except StoreError as exc:
            ops.append((SEND, conn, _frame(error_text(cmd.id, ErrorCode.INTERNAL, str(exc)))))
            return None
        since = cmd.since
        replay_from: Optional[int] = None
        recovered = True
        if since is not None:
            if cmd.epoch is not None and cmd.epoch != epoch:
                replay_from, recovered = 0, False
            elif since > latest:
                ops.append((SEND, conn, _frame(error_text(
                    cmd.id, ErrorCode.BAD_REQUEST,
                    "'since' %d is ahead of the latest seq %d" % (since, latest)))))
                return None
            elif since < latest:
                replay_from = since
                try:
                    oldest = self.store.oldest(pattern)
                except StoreError:
                    oldest = 0
                recovered = oldest != 0 and oldest <= since + 1
        self._insert(conn, pattern)
        ops.append((SEND, conn, _frame(ack_text(cmd.id, pattern, latest, epoch, recovered))))
        if replay_from is None or latest == 0:
            return None
        if pattern in conn.replays:
            return None  # a replay of this topic is already running; it covers the live part
        if not conn.replays:
            self._replaying += 1
        conn.replays[pattern] = [[], 0]
        return (cmd._replace(since=replay_from), latest, epoch)

    def _insert(self, conn: Connection, pattern: str) -> None:
        if pattern not in conn.patterns:
            conn.patterns.add(pattern)
            self._tree.insert(pattern, conn)

    def _unsubscribe_locked(self, conn: Connection, pattern: str) -> None:
        if pattern in conn.patterns:
            conn.patterns.discard(pattern)
            self._tree.remove(pattern, conn)
        if conn.replays.pop(pattern, None) is not None and not conn.replays:
            self._replaying -= 1

    def _replay(self, conn: Connection, cmd: Subscribe, upto: int) -> None:
        """Send stored messages (since, upto] paced by the outbox, then switch to live."""
        topic = cmd.topic
        pos = cmd.since or 0
        low_water = max(1, conn.max_outbox // 2)
        try:
            while pos < upto and not (conn.close_sent or conn.dead):
                page = self.store.since(topic, pos, min(REPLAY_PAGE, upto - pos))
                page = [m for m in page if m.seq <= upto]
                if not page:
                    break
                frames = [self._replay_frame(conn, m) for m in page]
                pos = page[-1].seq
                # pace: wait until the outbox has room, so a replay never makes a reader slow
                while conn.out_bytes > low_water and not (conn.close_sent or conn.dead):
                    conn.drained.clear()
                    if conn.out_bytes > low_water:
                        conn.drained.wait(0.2)
                if conn.replays.get(topic) is None:
                    return  # unsubscribed meanwhile
                self.writer.put(((REPLAY, conn, frames),))
        except StoreError as exc:
            logger.error("replay of %s for %s failed: %s", topic, conn.label, exc)
        with self.lock:
            buf = conn.replays.pop(topic, None)
            if buf is not None:
                if not conn.replays:
                    self._replaying -= 1
                if buf[0] and conn.registered:
                    self.writer.put(((REPLAY, conn, [_frame(t) for t in buf[0]]),))

    @staticmethod
    def _replay_frame(conn: Connection, m: StoredMessage) -> bytes:
        if conn.is_plain:
            return _frame(m.data)
        return _frame(message_text(m.topic, m.seq, m.data))

    # ------------------------------------------------------------------ history
    def history(self, topic: str, since: int, limit: int) -> List[StoredMessage]:
        """Stored messages of a concrete topic after ``since`` (raises StoreError)."""
        return self.store.since(topic, since, limit)
