"""The hub: the registry of connections and subscriptions, where a message is matched.

Commands parsed by a reader arrive here in batches (one per chunk read). Under
one lock the hub checks them, assigns seqs through the broker, matches each
publication against the subject tree, and queues acks and deliveries on the
writer's channel, so that per topic the order of the channel is the seq order
and a subscribe's ack precedes every message published after it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .broker import Broker, Publication
from .connection import Connection
from .envelope import (
    NO_ID,
    SEED_TOPIC,
    Invalid,
    Ping,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    ack_text,
    error_text,
    has_id,
    join_leave_text,
    message_head,
    message_text,
    pong_text,
    presence_stats_text,
    presence_text,
    subscribed_text,
)
from .errors import BrokerUnavailable, CloseCode, ErrorCode, StoreError
from .logutil import RateLimitedLog
from .presence import Member, PresenceTable, PresenceView, merge
from .stats import TopicRates
from .store import Pending, StoredMessage
from .topics import SubjectTree, is_wildcard, validate_topic
from .writer import CLOSE, DELIVER, REPLAY, SEND, SEND_WIRE, SLOW, STORED, Writer
from .wsframe import text_frame, text_frame_of

logger = logging.getLogger(__name__)

#: most messages read from the store per replay page (a page is bounded by bytes too)
REPLAY_PAGE = 200
#: seconds a batch of commands waits, at most, for the shared broker to take up the new
#: interest of its subscribes without a seq (then they are acked all the same)
EARLY_WAIT = 2.0
#: the place of a join or leave in a replay's buffer of live frames: after the replayed part
_AFTER_ANY_SEQ = 1 << 62


class _ReplayEnded(Exception):
    """The replaying subscription went away before the replay finished."""


def _frame(text: str) -> bytes:
    return text_frame(text.encode("utf-8"))


class Hub:
    """Connections, subscriptions and the publish path of one server."""

    def __init__(self, broker: Broker, writer: Writer, max_subscriptions: int = 1000) -> None:
        self.broker = broker
        self.writer = writer
        self.max_subscriptions = max_subscriptions
        # The hub lock guards: the subject tree, the set of connections, every
        # Connection.patterns / .replays / .floors / .registered, _interest, _early,
        # broker.publish and broker.latest (seq assignment), and the order of puts
        # on the writer's channel for everything above. Never taken by the writer.
        self.lock = threading.Lock()
        self._tree: SubjectTree[Connection] = SubjectTree()
        self._conns: Dict[int, Connection] = {}
        self._interest: Dict[str, int] = {}  # pattern -> local subscribers (node-level interest)
        # (pattern, False) or (topic, True: its joins and leaves) -> subscribes on their way
        # to an ack that hold the broker's interest in it (see _subscribe_early)
        self._early: Dict[Tuple[str, bool], int] = {}
        self._replaying = 0  # connections with a replay in progress
        self._floored = 0  # (connection, topic) floors set: deliveries at or below are dropped
        self.received = 0  # messages published
        self.subscriptions = 0  # (connection, pattern) subscriptions now
        #: publishes per topic lately, for /stats (its own small lock; fed under this one)
        self.topic_rates = TopicRates()
        #: names this node in client ids (unique among the nodes of a shared broker)
        self.node = secrets.token_hex(4)
        broker.node = self.node
        #: members of concrete topics and their join/leave listeners (PROTOCOL.md "Presence")
        self.presence = PresenceTable()
        broker.presence_source(self._presence_snapshot)
        self._refused_log = RateLimitedLog(logger)  # refused publishes: one line per interval
        broker.attach(self._tree.has_match)
        broker.start(self.on_publications)

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
            ops: List[tuple] = []
            for pattern in list(conn.patterns):
                self._unsubscribe_locked(conn, pattern, ops)
            if ops:
                self.writer.put(ops)
            if conn.replays:
                self._replaying -= 1
                conn.replays.clear()
            self._floored -= len(conn.floors)
            conn.floors.clear()

    def connections(self) -> List[Connection]:
        """A snapshot of the registered connections."""
        with self.lock:
            return list(self._conns.values())

    def __len__(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ commands
    def handle(self, conn: Connection, commands: Sequence[Any]) -> None:
        """Carry out a batch of one connection's commands in order."""
        if conn.expires is not None and time.time() >= conn.expires:
            # credentials ran out: nothing more is carried out (the writer closes it)
            self.writer.put(((CLOSE, conn, CloseCode.POLICY_VIOLATION, "token expired"),))
            return
        ops: List[tuple] = []
        replays: Dict[str, Tuple[Subscribe, int]] = {}  # topic -> (subscribe, its ack's seq)
        queries: List[PresenceQuery] = []
        early = self._subscribe_early(commands)
        with self.lock:
            try:
                self._carry_out_locked(conn, commands, ops, replays, queries)
            finally:
                self._drop_early_locked(early)  # after the subscribes that may keep it
            if ops:  # (after that: a refusal is answered once its interest is withdrawn)
                self.writer.put(ops)
        for query in queries:
            self._answer_presence(conn, query)
        for cmd, upto in replays.values():
            self._replay(conn, cmd, upto)

    def _carry_out_locked(self, conn: Connection, commands: Sequence[Any], ops: List[tuple],
                          replays: Dict[str, Tuple[Subscribe, int]], queries: List[PresenceQuery]) -> None:
        """The part of ``handle`` under the hub's lock: the frames to send are left in
        ``ops``, replays and presence queries in ``replays`` and ``queries``."""
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
                    other = replays.get(cmd.topic)
                    if other is None:
                        replays[cmd.topic] = replay
                    elif (replay[0].since or 0) < (other[0].since or 0):  # both set in a replay
                        replays[cmd.topic] = (replay[0], other[1])  # one replay from the lowest since
            elif kind is Unsubscribe:
                self._unsubscribe_locked(conn, cmd.topic, ops)
                ops.append((SEND, conn, _frame(ack_text(cmd.id, cmd.topic))))
            elif kind is PresenceQuery:
                queries.append(cmd)
            elif kind is Ping:
                ops.append((SEND, conn, _frame(pong_text(cmd.id))))
            elif kind is Invalid:
                ops.append((SEND, conn, _frame(error_text(cmd.id, cmd.code, cmd.message))))
        if pubs:
            self._publish_locked(conn, pubs, ops)

    def _subscribe_early(self, commands: Sequence[Any]) -> List[Tuple[str, bool]]:
        """With a shared broker, make new interest without a seq effective before acking it.

        A pattern's ack carries no seq to recover from, and joins and leaves are never
        replayed: the broker's subscription (to the pattern, or to the topic's joins and
        leaves) must be in place before the ack says the client gets them. Returns
        (pattern or topic, whether joins and leaves) of each interest added. A local
        broker needs none of this: nothing is done and nothing returned.
        """
        early: List[Tuple[str, bool]] = []
        if self.broker.delivers_locally:
            return early
        for cmd in commands:
            if type(cmd) is Subscribe:
                if is_wildcard(cmd.topic):
                    early.append((cmd.topic, False))
                elif cmd.join_leave:
                    early.append((cmd.topic, True))
        if not early:
            return early
        with self.lock:
            # held until _drop_early_locked: no one withdraws the interest meanwhile
            for key in early:
                held = self._early.get(key, 0)
                self._early[key] = held + 1
                if not held and not self._kept(key):
                    self._broker_interest(key, True)
        try:
            deadline = time.monotonic() + EARLY_WAIT  # one for the batch, however many it waits for
            for name, join_leave in dict.fromkeys(early):
                left = max(0.0, deadline - time.monotonic())
                if join_leave:
                    if not self.broker.wait_join_leave(name, left):
                        logger.warning("broker subscription to the joins and leaves of %s not "
                                       "confirmed in time", name)
                elif not self.broker.wait_subscribed(name, left):
                    logger.warning("broker subscription to %s not confirmed in time", name)
        except BaseException:
            with self.lock:
                self._drop_early_locked(early)  # (the caller never gets them to release)
            raise
        return early

    def _kept(self, key: Tuple[str, bool]) -> bool:
        """Whether a subscription of this node keeps the broker's interest in ``key``
        (a pattern, or a topic's joins and leaves) on."""
        name, join_leave = key
        return self._listened(name) if join_leave else name in self._interest

    def _broker_interest(self, key: Tuple[str, bool], on: bool) -> None:
        name, join_leave = key
        if join_leave:
            self.broker.join_leave_interest(name, on)
        else:
            self.broker.interest(name, on)

    def _listened(self, topic: str) -> bool:
        """Whether some connection of this node listens to ``topic``'s joins and leaves."""
        entry = self.presence.get(topic)
        return entry is not None and bool(entry.listeners)

    def _drop_early_locked(self, early: Sequence[Tuple[str, bool]]) -> None:
        """Release what ``_subscribe_early`` held; withdraw the interest nothing keeps (the
        subscribe refused, or gone since)."""
        for key in early:
            held = self._early[key] - 1
            if held:
                self._early[key] = held
                continue
            del self._early[key]
            if not self._kept(key):
                self._broker_interest(key, False)

    def subscribe_seed(self, conn: Connection) -> None:
        """The automatic subscription of a plain connection to the seed topic (no ack)."""
        ops: List[tuple] = []
        with self.lock:
            if conn.registered and self._allowed(conn, "subscribe", SEED_TOPIC):
                self._insert(conn, SEED_TOPIC, None, ops)
            if ops:
                self.writer.put(ops)

    def grant(self, conn: Connection, patterns: Sequence[str], greeting: bytes = b"") -> None:
        """Subscribe a new connection to what its token grants, telling it by ``subscribed`` frames.

        ``greeting`` (the upgrade's 101 answer when it was left to the writer) is queued
        first, under the same lock as the subscriptions: every message published after
        the client can see the connection open is delivered to it.
        """
        cmds = [Subscribe(p, None, None, None) for p in dict.fromkeys(patterns)]
        early = self._subscribe_early(cmds)
        ops: List[tuple] = [(SEND_WIRE, conn, greeting)] if greeting else []
        with self.lock:
            try:
                if conn.registered:
                    for cmd in cmds:
                        self._grant_locked(conn, cmd.topic, ops)
            finally:
                self._drop_early_locked(early)  # after the subscriptions that may keep it
            if ops:
                self.writer.put(ops)

    def _grant_locked(self, conn: Connection, pattern: str, ops: List[tuple]) -> None:
        if pattern not in conn.patterns and len(conn.patterns) >= self.max_subscriptions:
            ops.append((SEND, conn, _frame(error_text(
                NO_ID, ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                "granted subscription to %s over the limit of %d per connection"
                % (pattern, self.max_subscriptions)))))
            return
        if is_wildcard(pattern):
            self._insert(conn, pattern, None, ops)
            ops.append((SEND, conn, _frame(subscribed_text(pattern))))
            return
        try:
            latest, epoch = self.broker.latest(pattern)
        except (StoreError, BrokerUnavailable) as exc:
            ops.append((SEND, conn, _frame(error_text(
                NO_ID, ErrorCode.UNAVAILABLE, "granted subscription to %s: %s" % (pattern, exc)))))
            return
        self._insert(conn, pattern, latest, ops)
        self._floor_locked(conn, pattern, latest, epoch)
        ops.append((SEND, conn, _frame(subscribed_text(pattern, latest, epoch))))

    def publish(self, topic: str, data_json: str) -> Tuple[int, str]:
        """Publish from inside the process (any thread); returns (seq, epoch)."""
        validate_topic(topic)
        ops: List[tuple] = []
        with self.lock:
            pubs, _stored = self._store_locked([Publish(topic, data_json, None)], defer=False)
            if self.broker.delivers_locally:
                self._deliver_locked(pubs, ops)
                self.writer.put(ops)
        return pubs[0].seq, pubs[0].epoch

    def on_publications(self, pubs: Sequence[Publication]) -> None:
        """Deliver publications handed back by a shared broker (its thread)."""
        ops: List[tuple] = []
        with self.lock:
            self._deliver_locked(pubs, ops)
            if ops:
                self.writer.put(ops)

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

    def _store_locked(self, pubs: Sequence[Publish],
                      defer: bool) -> Tuple[List[Publication], Optional[Pending]]:
        """Give ``pubs`` their seqs; with ``defer``, their commit may be left to the writer
        (then nothing about them may be sent before the Pending returned settles)."""
        items = [(p.topic, p.data) for p in pubs]
        if defer:
            positions, pending = self.broker.publish_deferred(items)
        else:
            positions, pending = self.broker.publish(items), None
        self.received += len(pubs)
        self.topic_rates.add([p.topic for p in pubs])
        return ([Publication(p.topic, seq, epoch, p.data) for p, (seq, epoch) in zip(pubs, positions)],
                pending)

    def _publish_locked(self, conn: Connection, pubs: List[Publish], ops: List[tuple]) -> None:
        try:
            # While a replay runs, live frames are kept for it as they are published:
            # only stored ones may be (the commit is not left to the writer then).
            stored, pending = self._store_locked(pubs, defer=not self._replaying)
        except (StoreError, BrokerUnavailable) as exc:
            self._refused_log.error("publish of %d message(s) from %s failed: %s",
                                    len(pubs), conn.label, exc)
            ops.extend(self._not_stored(conn, pubs, exc))
            return
        out = ops if pending is None else []
        for p, (topic, seq, epoch, _data) in zip(pubs, stored):
            if has_id(p.id):
                out.append((SEND, conn, _frame(ack_text(p.id, topic, seq, epoch))))
        if self.broker.delivers_locally:
            self._deliver_locked(stored, out)
        if pending is not None:  # the writer commits, then sends ``out`` (or the refusals)
            ops.append((STORED, pending, out, lambda: self._not_stored(conn, pubs, pending.error)))

    @staticmethod
    def _not_stored(conn: Connection, pubs: Sequence[Publish], why: object) -> List[tuple]:
        """The answers to publishes that could not be stored."""
        return [(SEND, conn, _frame(error_text(p.id, ErrorCode.UNAVAILABLE, "message not stored: %s" % why)))
                for p in pubs]

    def _deliver_locked(self, stored: Sequence[Publication], ops: List[tuple]) -> None:
        now = time.monotonic()
        match = self._tree.match
        for topic, seq, _epoch, data in stored:
            if not seq:  # another node's join or leave
                self._remote_event(topic, _epoch, data, ops)
                continue
            recipients = match(topic)
            if not recipients:
                continue
            if self._replaying or self._floored:
                recipients = self._filter(recipients, topic, seq, _epoch, data)
            ops.append((DELIVER, topic, seq, data, recipients, now))

    def _filter(self, recipients: Any, topic: str, seq: int, epoch: str, data: str) -> Any:
        """Drop what a connection's ack already covers; buffer for replaying connections."""
        keep = []
        for conn in recipients:
            floor = conn.floors.get(topic)
            if floor is not None:
                if seq <= floor[0] and epoch == floor[1]:
                    continue
                del conn.floors[topic]
                self._floored -= 1
            buf = conn.replays.get(topic)
            if buf is None:
                keep.append(conn)
                continue
            self._buffer(conn, buf, seq, message_text(topic, seq, data) if not conn.is_plain else data)
        return keep

    def _buffer(self, conn: Connection, buf: List[Any], seq: int, text: str) -> None:
        """Keep a live frame for a connection replaying its topic (sent when the replay ends)."""
        buf[0].append((seq, text))
        buf[1] += len(text)
        if buf[1] > conn.max_outbox:
            # the live part alone outgrew the limit while the replay ran
            self.writer.put(((SLOW, conn),))
            buf[0].clear()
            buf[1] = 0

    # ------------------------------------------------------------------ subscribe
    def _subscribe_locked(self, conn: Connection, cmd: Subscribe,
                          ops: List[tuple]) -> Optional[Tuple[Subscribe, int]]:
        """Subscribe ``conn`` and queue the ack; (the subscribe from where to replay, the
        ack's seq) when stored messages are to be replayed after the lock is let go."""
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
            self._insert(conn, pattern, None, ops)
            ops.append((SEND, conn, _frame(ack_text(cmd.id, pattern))))
            return None
        try:
            latest, epoch = self.broker.latest(pattern)
        except (StoreError, BrokerUnavailable) as exc:
            ops.append((SEND, conn, _frame(error_text(cmd.id, ErrorCode.UNAVAILABLE, str(exc)))))
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
                    oldest = self.broker.oldest(pattern)
                except (StoreError, BrokerUnavailable):
                    oldest = 0
                recovered = oldest != 0 and oldest <= since + 1
        self._insert(conn, pattern, latest, ops)
        if cmd.join_leave or self.presence.listened:
            self._listen(pattern, conn, cmd.join_leave)
        self._floor_locked(conn, pattern, latest, epoch)
        ops.append((SEND, conn, _frame(ack_text(cmd.id, pattern, latest, epoch, recovered))))
        if replay_from is None or latest == 0:
            return None
        if pattern in conn.replays:
            # a replay of this topic is pending in this batch: it covers this one too
            return (cmd._replace(since=replay_from), latest)
        if not conn.replays:
            self._replaying += 1
        conn.replays[pattern] = [[], 0]
        return (cmd._replace(since=replay_from), latest)

    def _floor_locked(self, conn: Connection, pattern: str, latest: int, epoch: str) -> None:
        """With a shared broker, drop deliveries of ``pattern`` up to the seq just told to
        ``conn`` (publications up to it may still be on their way: not for this one)."""
        if not self.broker.delivers_locally and pattern not in conn.floors:
            conn.floors[pattern] = (latest, epoch)
            self._floored += 1

    def _insert(self, conn: Connection, pattern: str, acked: Optional[int],
                ops: List[tuple]) -> None:
        if pattern not in conn.patterns:
            conn.patterns.add(pattern)
            self._tree.insert(pattern, conn)
            self.subscriptions += 1
            n = self._interest.get(pattern, 0)
            self._interest[pattern] = n + 1
            if n == 0:
                self.broker.interest(pattern, True, acked)
            if not is_wildcard(pattern):
                self._joined(conn, pattern, ops)

    def _unsubscribe_locked(self, conn: Connection, pattern: str, ops: List[tuple]) -> None:
        if pattern in conn.patterns:
            conn.patterns.discard(pattern)
            self._tree.remove(pattern, conn)
            self.subscriptions -= 1
            n = self._interest.get(pattern, 1) - 1
            if n > 0:
                self._interest[pattern] = n
            else:
                self._interest.pop(pattern, None)
                if (pattern, False) not in self._early:  # (else the last holder withdraws it)
                    self.broker.interest(pattern, False)
            if not is_wildcard(pattern):
                self._left(conn, pattern, ops)
        if conn.floors.pop(pattern, None) is not None:
            self._floored -= 1
        if conn.replays.pop(pattern, None) is not None and not conn.replays:
            self._replaying -= 1

    # ------------------------------------------------------------------ presence
    def client_id(self, conn: Connection) -> str:
        """The opaque id of a connection in presence answers and join/leave events."""
        return "%s-%d" % (self.node, conn.id)

    def _joined(self, conn: Connection, topic: str, ops: List[tuple]) -> None:
        claims = conn.claims
        member = Member(self.client_id(conn), claims.sub if claims is not None else None, time.time())
        entry = self.presence.join(topic, member)
        self.broker.member(topic, member, True)
        if entry.listeners:
            self._announce("join", topic, member.text, entry.listeners, conn, ops)

    def _left(self, conn: Connection, topic: str, ops: List[tuple]) -> None:
        if self.presence.listened:
            self._listen(topic, conn, False)
        member, entry = self.presence.leave(topic, self.client_id(conn))
        if member is None:
            return
        self.broker.member(topic, member, False)
        if entry is not None and entry.listeners:
            self._announce("leave", topic, member.text, entry.listeners, conn, ops)

    def _listen(self, topic: str, conn: Connection, on: bool) -> None:
        if self.presence.listen(topic, conn, on) and (on or (topic, True) not in self._early):
            self.broker.join_leave_interest(topic, on)  # (held early: the last holder withdraws it)

    def _remote_event(self, topic: str, kind: str, client: str, ops: List[tuple]) -> None:
        entry = self.presence.get(topic)
        if entry is not None and entry.listeners:
            self._announce(kind, topic, client, entry.listeners, None, ops)

    def _presence_snapshot(self) -> List[Tuple[str, str, str]]:
        """Every member of this node: (topic, client id, client object)."""
        with self.lock:
            return [(topic, m.conn, m.text) for topic, entry in self.presence.items()
                    for m in entry.members.values()]

    def _announce(self, kind: str, topic: str, client: str, listeners: Any, source: Any,
                  ops: List[tuple]) -> None:
        """Queue a join or leave for each listener of ``topic`` except ``source``.

        A listener replaying the topic gets it after the live messages buffered meanwhile.
        """
        text = join_leave_text(kind, topic, client)
        frame = _frame(text)
        for listener in listeners:
            if listener is source:
                continue
            buf = listener.replays.get(topic) if self._replaying else None
            if buf is None:
                ops.append((SEND, listener, frame))
                continue
            self._buffer(listener, buf, _AFTER_ANY_SEQ, text)

    def presence_view(self, topic: str) -> PresenceView:
        """The members of a concrete topic on every node (may block on a shared broker)."""
        with self.lock:
            listed, subs = self.presence.local(topic)
            count = self.presence.count(topic)
        return merge([(count, subs, listed)] + self.broker.presence(topic))

    def _answer_presence(self, conn: Connection, query: PresenceQuery) -> None:
        topic = query.topic
        if not self._allowed(conn, "subscribe", topic):
            text = error_text(query.id, ErrorCode.FORBIDDEN, "not allowed to see who is subscribed to %s"
                              % topic)
        else:
            try:
                view = self.presence_view(topic)
            except BrokerUnavailable as exc:
                text = error_text(query.id, ErrorCode.UNAVAILABLE, "presence unavailable: %s" % exc)
            else:
                if query.stats:
                    text = presence_stats_text(query.id, topic, view.total, view.users)
                else:
                    text = presence_text(query.id, topic, view.total, [m.text for m in view.listed])
        self.writer.put(((SEND, conn, _frame(text)),))

    # ------------------------------------------------------------------ replay
    def _replay(self, conn: Connection, cmd: Subscribe, upto: int) -> None:
        """Send stored messages (since, upto] paced by the outbox, then switch to live."""
        topic = cmd.topic
        pos = cmd.since or 0
        # A page is read only once the replayed bytes still unsent or on their way have
        # fallen to a quarter of the outbox limit, and holds about that many bytes (at
        # least one message): a replay costs about one page whatever the history's size,
        # and live messages arriving meanwhile always find room.
        budget = max(1, conn.max_outbox // 4)
        try:
            while pos < upto and not (conn.close_sent or conn.dead):
                while (conn.out_bytes + conn.replay_queued - conn.replay_applied > budget
                       and not (conn.close_sent or conn.dead)):
                    conn.drained.clear()
                    if conn.out_bytes + conn.replay_queued - conn.replay_applied > budget:
                        conn.drained.wait(0.2)
                if conn.replays.get(topic) is None or conn.close_sent or conn.dead:
                    raise _ReplayEnded()  # unsubscribed or closed meanwhile
                page = self.broker.since(topic, pos, min(REPLAY_PAGE, upto - pos), budget)
                page = [m for m in page if m.seq <= upto]
                if not page:
                    break
                pos = page[-1].seq
                frames = [self._replay_frame(conn, m) for m in page]
                del page
                conn.replay_queued += sum(len(f) for f in frames)
                self.writer.put(((REPLAY, conn, frames),))
                del frames
        except _ReplayEnded:
            pass
        except (StoreError, BrokerUnavailable) as exc:
            logger.error("replay of %s for %s failed: %s", topic, conn.label, exc)
        with self.lock:
            buf = conn.replays.pop(topic, None)
            if buf is not None:
                if not conn.replays:
                    self._replaying -= 1
                live = [_frame(text) for seq, text in buf[0] if seq > upto]
                if live and conn.registered:
                    conn.replay_queued += sum(len(f) for f in live)
                    self.writer.put(((REPLAY, conn, live),))

    @staticmethod
    def _replay_frame(conn: Connection, m: StoredMessage) -> bytes:
        # built from parts: a large message is copied twice (encoded, framed), not four times
        data = m.data.encode("utf-8")
        if conn.is_plain:
            return text_frame_of(data)
        return text_frame_of(message_head(m.topic, m.seq).encode("utf-8"), data, b"}")

    # ------------------------------------------------------------------ retention
    def trim_step(self, limit: int) -> Tuple[bool, float]:
        """One bounded retention step: (more to do, seconds a lock was held).

        Topics matched by no subscription (concrete or wildcard) may be forgotten: a
        store that forgets topics is trimmed under the hub's lock; one that never
        does (SQLite) only under its own, so that subscribes and deliveries go on.
        """
        if not self.broker.trim_needs_lock:
            start = time.perf_counter()
            _removed, more = self.broker.trim(limit, self._tree.has_match)
            return more, time.perf_counter() - start
        with self.lock:
            start = time.perf_counter()
            _removed, more = self.broker.trim(limit, self._tree.has_match)
            return more, time.perf_counter() - start

    # ------------------------------------------------------------------ history
    def history(self, topic: str, since: int, limit: int,
                max_bytes: Optional[int] = None) -> List[StoredMessage]:
        """Stored messages of a concrete topic after ``since``, bounded by bytes too when
        ``max_bytes`` is given (raises StoreError)."""
        return self.broker.since(topic, since, limit, max_bytes)
