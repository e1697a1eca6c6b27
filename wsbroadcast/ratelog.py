"""Log records an attacker can trigger at will, at most once per interval each, with a count.

One ``RateLimitedLog`` per condition (e.g. "accept failed")::

    _accept_failed = RateLimitedLog(logger, logging.ERROR, "accept failed: %s")
    _accept_failed.log(exc)   # the first call logs; the next ones in 10 s are counted

A record after a quiet spell says how many were left out since the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

#: seconds between two records of one condition
DEFAULT_INTERVAL = 10.0


class RateLimitedLog:
    """One condition's log record: at most one per ``interval``; the others are counted."""

    def __init__(self, logger: logging.Logger, level: int, message: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.level = level
        self.message = message
        self.interval = interval
        # _lock guards _last and _suppressed (any thread may log)
        self._lock = threading.Lock()
        self._last = float("-inf")  # monotonic time of the last record
        self._suppressed = 0  # occurrences left out since the last record
        #: occurrences in all (logged or not)
        self.count = 0

    def log(self, *args: Any) -> bool:
        """Log the message with ``args`` unless one went out within the interval; True if logged."""
        now = time.monotonic()
        with self._lock:
            self.count += 1
            if now - self._last < self.interval:
                self._suppressed += 1
                return False
            self._last = now
            suppressed, self._suppressed = self._suppressed, 0
        if not self.logger.isEnabledFor(self.level):
            return True
        if suppressed:
            self.logger.log(self.level, self.message + " (%d more since the last such record)",
                            *args, suppressed)
        else:
            self.logger.log(self.level, self.message, *args)
        return True
