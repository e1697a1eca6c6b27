"""Topic validation and the subject tree that matches a topic to its subscribers.

A topic is 1 to 255 bytes of tokens joined by ``.``; a token is one or more of
``A-Z a-z 0-9 _ - : @``. Patterns may use ``*`` (exactly one token) and ``>``
(one or more tokens, last position only) as whole tokens.
"""

from __future__ import annotations

import re
from typing import Dict, FrozenSet, Generic, Hashable, Iterable, List, Optional, Set, TypeVar

from .errors import TopicError

MAX_TOPIC_BYTES = 255
_TOKEN = re.compile(r"[A-Za-z0-9_\-:@]+\Z")

T = TypeVar("T", bound=Hashable)

_ALLOWED = "parts of A-Z a-z 0-9 _ - : @ joined by single dots, e.g. news.eu"


def _bad_token(topic: str, token: str) -> TopicError:
    """The error for a part of ``topic`` that is not a valid token, saying what is allowed."""
    if not token:
        return TopicError("topic %r has an empty part (two dots in a row, or a dot at an end); "
                          "give %s" % (topic, _ALLOWED))
    return TopicError("topic %r has the part %r; give %s" % (topic, token[:32], _ALLOWED))


def _tokens(topic: object) -> List[str]:
    if not isinstance(topic, str):
        raise TopicError("topic must be a string of %s" % _ALLOWED)
    if not topic:
        raise TopicError("no topic given; give %s" % _ALLOWED)
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise TopicError(f"topic is longer than {MAX_TOPIC_BYTES} bytes")
    return topic.split(".")


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid concrete topic (no wildcards), else raise TopicError."""
    for token in _tokens(topic):
        if not _TOKEN.match(token):
            if token in ("*", ">"):
                raise TopicError("topic %r has a wildcard; publishing and history need a concrete topic "
                                 "(* and > are for subscribing)" % (topic,))
            raise _bad_token(topic, token)  # type: ignore[arg-type]
    return topic  # type: ignore[return-value]


def validate_pattern(pattern: object) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise TopicError."""
    tokens = _tokens(pattern)
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != last:
                raise TopicError("pattern %r has '>' before its end; '>' may only be the last part "
                                 "(news.>)" % (pattern,))
            continue
        if not _TOKEN.match(token):
            raise _bad_token(pattern, token)  # type: ignore[arg-type]
    return pattern  # type: ignore[return-value]


def is_wildcard(pattern: str) -> bool:
    """True when a (valid) pattern contains a wildcard token."""
    return any(t == "*" or t == ">" for t in pattern.split("."))


def pattern_matches(pattern: str, topic: str) -> bool:
    """True when a valid ``pattern`` matches the concrete ``topic``."""
    p = pattern.split(".")
    t = topic.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t):
            return False
        if token != "*" and token != t[i]:
            return False
    return len(p) == len(t)


class _Node(Generic[T]):
    __slots__ = ("children", "star", "rest", "subs")

    def __init__(self) -> None:
        self.children: Dict[str, "_Node[T]"] = {}
        self.star: Optional["_Node[T]"] = None  # child for '*'
        self.rest: Set[T] = set()  # subscribers of '<prefix>.>'
        self.subs: Set[T] = set()  # subscribers of exactly this path

    def empty(self) -> bool:
        return not (self.children or self.star or self.rest or self.subs)


class SubjectTree(Generic[T]):
    """Patterns to subscribers, matched per token; match results are cached per topic.

    Not thread-safe: the owner serialises calls (the hub's lock).
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self._root: _Node[T] = _Node()
        self._cache: Dict[str, FrozenSet[T]] = {}
        self._cache_size = cache_size
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def insert(self, pattern: str, sub: T) -> bool:
        """Add ``sub`` under ``pattern``; False when it was there already."""
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = self._child(node, token)
        last = tokens[-1]
        if last == ">":
            target = node.rest
        else:
            target = self._child(node, last).subs
        if sub in target:
            return False
        target.add(sub)
        self._count += 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, sub: T) -> bool:
        """Remove ``sub`` from ``pattern``; False when it was not there."""
        path: List[tuple] = []
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            nxt = node.star if token == "*" else node.children.get(token)
            if nxt is None:
                return False
            path.append((node, token))
            node = nxt
        last = tokens[-1]
        if last == ">":
            if sub not in node.rest:
                return False
            node.rest.discard(sub)
        else:
            leaf = node.star if last == "*" else node.children.get(last)
            if leaf is None or sub not in leaf.subs:
                return False
            leaf.subs.discard(sub)
            if leaf.empty():
                self._unlink(node, last)
        # prune empty nodes upward
        while path and node.empty():
            parent, token = path.pop()
            self._unlink(parent, token)
            node = parent
        self._count -= 1
        self._cache.clear()
        return True

    def match(self, topic: str) -> FrozenSet[T]:
        """Every subscriber whose pattern matches the concrete ``topic``."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        result: Set[T] = set()
        tokens = topic.split(".")
        self._collect(self._root, tokens, 0, result)
        frozen = frozenset(result)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[topic] = frozen
        return frozen

    def has_match(self, topic: str) -> bool:
        """True when some subscriber's pattern matches the concrete ``topic`` (not cached)."""
        hit = self._cache.get(topic)
        if hit is not None:
            return bool(hit)
        return self._any(self._root, topic.split("."), 0)

    def _any(self, node: _Node[T], tokens: List[str], i: int) -> bool:
        if i == len(tokens):
            return bool(node.subs)
        if node.rest:
            return True
        child = node.children.get(tokens[i])
        if child is not None and self._any(child, tokens, i + 1):
            return True
        return node.star is not None and self._any(node.star, tokens, i + 1)

    def _collect(self, node: _Node[T], tokens: List[str], i: int, out: Set[T]) -> None:
        if i == len(tokens):
            out.update(node.subs)
            return
        if node.rest:
            out.update(node.rest)
        child = node.children.get(tokens[i])
        if child is not None:
            self._collect(child, tokens, i + 1, out)
        if node.star is not None:
            self._collect(node.star, tokens, i + 1, out)

    @staticmethod
    def _child(node: _Node[T], token: str) -> _Node[T]:
        if token == "*":
            if node.star is None:
                node.star = _Node()
            return node.star
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node()
        return child

    @staticmethod
    def _unlink(node: _Node[T], token: str) -> None:
        if token == "*":
            node.star = None
        else:
            node.children.pop(token, None)


def iter_patterns(patterns: Iterable[object]) -> List[str]:
    """Validate each pattern of an iterable (e.g. a token claim) and return them as a list."""
    return [validate_pattern(p) for p in patterns]
