"""The busiest-topics counter of ``GET /stats`` (the document itself is built in ``metrics``).

A bounded per-topic publish count, fed by the hub, so that an answer costs a few
microseconds and can be polled every second.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterable, List

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
