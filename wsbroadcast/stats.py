"""The ``GET /stats`` document (the dashboard's source) and the busiest-topics counter.

Everything here reads counters the server keeps anyway for ``/metrics``, plus a
bounded per-topic publish count, so an answer costs a few microseconds and can be
polled every second. Rates are left to the reader (the difference of two answers).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

#: topics counted per window at most: a flood of distinct topics costs no more than this
MAX_TOPICS = 1024
#: seconds per counting window; the busiest topics are measured over the last one or two
WINDOW = 5.0
#: busiest topics listed in /stats
TOP = 10


class TopicRates:
    """Publishes per topic over the last window or two, in bounded memory.

    ``add`` is called by the hub under its lock with each batch's topics; the lock
    here only guards the two dicts against a concurrent ``top``. Topics beyond
    ``max_topics`` in a window are not counted (the busiest come early anyway).
    """

    def __init__(self, window: float = WINDOW, max_topics: int = MAX_TOPICS,
                 clock: Any = time.monotonic) -> None:
        self.window = window
        self.max_topics = max_topics
        self._clock = clock
        # _lock guards _current, _previous and _started
        self._lock = threading.Lock()
        self._current: Dict[str, int] = {}
        self._previous: Dict[str, int] = {}
        self._started = clock()
        self._previous_span = 0.0

    def _rotate(self, now: float) -> None:
        span = now - self._started
        if span >= 2 * self.window:  # a quiet spell: nothing is recent
            self._previous, self._previous_span = {}, 0.0
        else:
            self._previous, self._previous_span = self._current, span
        self._current = {}
        self._started = now

    def add(self, topics: Iterable[str]) -> None:
        """Count one publish on each of ``topics``."""
        now = self._clock()
        with self._lock:
            if now - self._started >= self.window:
                self._rotate(now)
            counts = self._current
            room = self.max_topics - len(counts)
            for topic in topics:
                n = counts.get(topic)
                if n is not None:
                    counts[topic] = n + 1
                elif room > 0:
                    counts[topic] = 1
                    room -= 1

    def top(self, n: int = TOP) -> List[Dict[str, Any]]:
        """The ``n`` busiest topics: ``[{"topic": T, "rate": messages per second}]``."""
        now = self._clock()
        with self._lock:
            if now - self._started >= self.window:
                self._rotate(now)
            merged = dict(self._previous)
            for topic, c in self._current.items():
                merged[topic] = merged.get(topic, 0) + c
            span = self._previous_span + (now - self._started)
        span = max(span, 1.0)
        best = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [{"topic": t, "rate": round(c / span, 2)} for t, c in best]


def stats_document(server: "Server") -> Dict[str, Any]:
    """The JSON document of ``GET /stats`` (PROTOCOL.md section 1, README)."""
    writer = server.writer
    wstats = writer.stats
    hub = server.hub
    health = server.broker.reason
    pending = server.pending
    turn_away = server._turn_away
    status: Optional[str] = "ok"
    if server.shutting_down:
        status, health = "degraded", "shutting down"
    elif health is not None:
        status = "degraded"
    doc: Dict[str, Any] = {
        "time": round(time.time(), 3),
        "uptime": round(time.monotonic() - server.started_at, 3) if server.started_at else 0.0,
        "status": status,
        "connections": len(hub),
        "pending_connections": len(pending) if pending is not None else 0,
        "connections_accepted": server.accepted,
        "websockets_accepted": server.upgraded,
        "turned_away": turn_away.refused if turn_away is not None else 0,
        "subscriptions": hub.subscriptions,
        "messages_in": hub.received,
        "messages_out": wstats.delivered,
        "bytes_out": wstats.bytes_out,
        "slow_consumer_closes": wstats.slow_consumers,
        "close_codes": {str(code): n for code, n in sorted(list(wstats.close_codes.items()))},
        "writer": {"state": writer.state, "alive": writer.alive, "queue_depth": writer.depth()},
        "store": server.broker.status(),
        "topics": hub.topic_rates.top(),
    }
    if health is not None:
        doc["reason"] = health
    return doc
