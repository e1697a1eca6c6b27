"""Logging helpers: a log line that repeats at most once per interval."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable


class RateLimitedLog:
    """Emit a recurring message at most once per ``interval`` seconds.

    Calls within the interval are counted, not logged; the next line that is
    emitted says how many were held back, so a flood of identical failures costs
    one line per interval and nothing is hidden without a trace.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.logger = logger
        self.interval = interval
        self._clock = clock
        # _lock guards _last (clock time of the last emitted line) and _held (calls since then)
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._held = 0

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at ``level`` unless a line went out less than ``interval`` ago.

        Returns True when the line was emitted.
        """
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval:
                self._held += 1
                return False
            held, self._held = self._held, 0
            self._last = now
        if held:
            msg += " (%d more like it since the last such line)"
            args = args + (held,)
        self.logger.log(level, msg, *args)
        return True

    def error(self, msg: str, *args: Any) -> bool:
        """``log(logging.ERROR, ...)``."""
        return self.log(logging.ERROR, msg, *args)

    def warning(self, msg: str, *args: Any) -> bool:
        """``log(logging.WARNING, ...)``."""
        return self.log(logging.WARNING, msg, *args)
