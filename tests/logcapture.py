"""Capture log records in tests: a handler that keeps records and their full texts."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Sequence


class Records(logging.Handler):
    """Keeps every record, its formatted line and its full text (message, exception, stack)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self.lines: List[str] = []
        self.texts: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        self.texts.append("%s %s" % (record.name, text))


@contextlib.contextmanager
def capture(name: str = "", also: Sequence[str] = (), level: int = logging.DEBUG) -> Iterator[Records]:
    """A ``Records`` handler on logger ``name`` (root by default), that logger and those named in
    ``also`` set to ``level``; all restored afterwards."""
    target = logging.getLogger(name or None)
    loggers = [target] + [logging.getLogger(n) for n in also]
    saved = [lg.level for lg in loggers]
    handler = Records()
    target.addHandler(handler)
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)
