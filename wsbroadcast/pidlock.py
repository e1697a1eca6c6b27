"""An exclusive, advisory lock file holding the pid of the process that owns it.

``flock`` on ``PATH``: the kernel drops the lock when its holder exits, however it
exits, so a lock file left behind by a killed process never blocks the next one.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class LockHeld(OSError):
    """Another process holds the lock; ``pid`` is its process id when known."""

    def __init__(self, path: str, pid: Optional[int]) -> None:
        super().__init__(errno.EWOULDBLOCK, "held by process %s" % (pid if pid else "(unknown)"), path)
        self.pid = pid


class PidLock:
    """Hold ``path`` locked for this process (exclusive; never waits).

    ``acquire`` raises :class:`LockHeld` when another process (or another
    ``PidLock`` of this one) holds it, and OSError when the file cannot be made.
    ``release`` removes the file, while still holding the lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write this pid in the file (LockHeld when another has it)."""
        if self._fd is not None or fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(self.path, self._holder()) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file between our open and our
            # lock: then we hold a lock on a name nobody sees any more; start again.
            try:
                same = _same_file(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, b"%d\n" % os.getpid())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file and let go of the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _holder(self) -> Optional[int]:
        """The pid written in the file; the holder writes it just after locking."""
        deadline = time.monotonic() + 0.5
        while True:
            try:
                with open(self.path, "rb") as f:
                    text = f.read(32).strip()
                if text:
                    return int(text)
            except (OSError, ValueError):
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)  # the holder is between its flock and its write


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
