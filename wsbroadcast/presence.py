"""Presence: the members of each concrete topic and the connections listening for their joins
and leaves (PROTOCOL.md, "Presence").

Sans-I/O bookkeeping. The hub owns one ``PresenceTable`` and uses it only under its
lock; a shared broker adds the members of other nodes when an answer is built.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .envelope import client_text

#: most client objects in one presence answer (the total is always given)
MAX_LISTED = 1000


class Member:
    """One connection subscribed to one concrete topic."""

    __slots__ = ("conn", "sub", "joined", "_text")

    def __init__(self, conn: str, sub: Optional[str], joined: float, text: Optional[str] = None) -> None:
        self.conn = conn  # the client id: unique among the nodes of a broker
        self.sub = sub
        self.joined = joined  # wall-clock seconds
        self._text = text

    @property
    def text(self) -> str:
        """The client object as JSON text (built once)."""
        if self._text is None:
            self._text = client_text(self.conn, self.sub, self.joined)
        return self._text


class TopicPresence:
    """The members of one topic (in the order they joined) and its join/leave listeners."""

    __slots__ = ("members", "users", "listeners")

    def __init__(self) -> None:
        self.members: Dict[str, Member] = {}
        self.users: Dict[str, int] = {}  # sub -> members carrying it
        #: local connections that asked for join/leave (a dict as an ordered set)
        self.listeners: Dict[Any, None] = {}


class PresenceTable:
    """Members and listeners of every concrete topic with at least one of either."""

    def __init__(self) -> None:
        self._topics: Dict[str, TopicPresence] = {}
        #: topics with at least one listener: 0 keeps the no-listener path free of work
        self.listened = 0

    def __len__(self) -> int:
        return len(self._topics)

    def get(self, topic: str) -> Optional[TopicPresence]:
        """The entry of ``topic``, None when it has no member or listener."""
        return self._topics.get(topic)

    def join(self, topic: str, member: Member) -> TopicPresence:
        """Add ``member`` to ``topic`` (a member already there is kept as it was)."""
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = TopicPresence()
        if member.conn not in entry.members:
            entry.members[member.conn] = member
            if member.sub is not None:
                entry.users[member.sub] = entry.users.get(member.sub, 0) + 1
        return entry

    def leave(self, topic: str, conn: str) -> Tuple[Optional[Member], Optional[TopicPresence]]:
        """Remove the member ``conn`` of ``topic``: (the member or None, the topic's entry or None)."""
        entry = self._topics.get(topic)
        if entry is None:
            return None, None
        member = entry.members.pop(conn, None)
        if member is not None and member.sub is not None:
            n = entry.users[member.sub] - 1
            if n:
                entry.users[member.sub] = n
            else:
                del entry.users[member.sub]
        self._drop_if_empty(topic, entry)
        return member, entry

    def listen(self, topic: str, listener: Any, on: bool) -> bool:
        """Start (``on``) or stop sending ``topic``'s joins and leaves to ``listener``;
        True when that gave the topic its first listener or took its last."""
        entry = self._topics.get(topic)
        if on:
            if entry is None:
                entry = self._topics[topic] = TopicPresence()
            if listener not in entry.listeners:
                entry.listeners[listener] = None
                if len(entry.listeners) == 1:
                    self.listened += 1
                    return True
        elif entry is not None and listener in entry.listeners:
            del entry.listeners[listener]
            if not entry.listeners:
                self.listened -= 1
                self._drop_if_empty(topic, entry)
                return True
        return False

    def items(self) -> Iterable[Tuple[str, TopicPresence]]:
        """(topic, its entry) of every topic with members or listeners."""
        return self._topics.items()

    def _drop_if_empty(self, topic: str, entry: TopicPresence) -> None:
        if not entry.members and not entry.listeners:
            del self._topics[topic]

    def local(self, topic: str) -> Tuple[List[Member], List[str]]:
        """This node's members of ``topic`` (earliest first, at most MAX_LISTED) and all their subs."""
        entry = self._topics.get(topic)
        if entry is None:
            return [], []
        return list(itertools.islice(entry.members.values(), MAX_LISTED)), list(entry.users)

    def count(self, topic: str) -> int:
        """How many members ``topic`` has on this node."""
        entry = self._topics.get(topic)
        return 0 if entry is None else len(entry.members)


class PresenceView:
    """The members of a topic over every node: what an answer is built from."""

    __slots__ = ("total", "users", "listed")

    def __init__(self, total: int, users: int, listed: List[Member]) -> None:
        self.total = total
        self.users = users
        self.listed = listed  # earliest joined first, at most MAX_LISTED


def merge(parts: Iterable[Tuple[int, Iterable[str], List[Member]]]) -> PresenceView:
    """Combine per-node (count, subs, listed members) into one view."""
    total = 0
    subs: set = set()
    listed: List[Member] = []
    for count, node_subs, members in parts:
        total += count
        subs.update(node_subs)
        listed.extend(members)
    listed.sort(key=lambda m: m.joined)
    return PresenceView(total, len(subs), listed[:MAX_LISTED])
