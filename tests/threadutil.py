"""Threads in tests: a body's failure reaches the test, and a join that times out fails it."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


class Worker(threading.Thread):
    """A named thread whose exception or result is kept for the test thread."""

    def __init__(self, target: Callable[..., Any], *args: Any, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self._args = args
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as exc:  # handed to the test thread by finish()
            self.error = exc

    def finish(self, timeout: float) -> Any:
        """Join; fail if still running after ``timeout``; re-raise the body's exception; its result."""
        self.join(timeout)
        assert not self.is_alive(), "thread %s still running after %.1fs" % (self.name, timeout)
        if self.error is not None:
            raise self.error
        return self.result


def start(target: Callable[..., Any], *args: Any, name: str) -> Worker:
    """Start a Worker running ``target(*args)``."""
    w = Worker(target, *args, name=name)
    w.start()
    return w
