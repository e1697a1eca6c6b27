"""``wsbroadcast serve --workers N``: N broker processes on one port, and their supervisor.

The parent holds the port (bound with SO_REUSEPORT, never listening, so it gets no
connections) and forks the workers before it has any thread. Each worker is a whole
broker listening on that port with SO_REUSEPORT: the kernel spreads new connections
over them, and they share seqs, history and fan-out through Redis. The parent restarts
a worker that dies (logged), and on SIGTERM or SIGINT passes SIGTERM on, so every
worker closes its connections with 1001, and exits 0 once all have ended.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

from .config import Config
from .errors import ConfigError
from .server import check_listen, listen_socket

logger = logging.getLogger(__name__)

#: runs one worker's broker on the given config until SIGTERM; calls ``ready`` once
#: listening; returns the exit code (2: a start-up mistake)
RunWorker = Callable[[Config, Callable[[], None]], int]

#: a worker that dies sooner than this after its start is restarted after a growing pause
_QUICK_DEATH = 1.0
_RESTART_PAUSE_MAX = 10.0
_PR_SET_PDEATHSIG = 1


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return "killed by %s" % signal.Signals(sig).name
        except ValueError:
            return "killed by signal %d" % sig
    return "exit code %d" % os.WEXITSTATUS(status)


def _exit_code(status: int) -> Optional[int]:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


class Supervisor:
    """Forks ``count`` workers running ``run`` on one port and keeps them running."""

    def __init__(self, config: Config, count: int, run: RunWorker) -> None:
        if count < 1 or count > 1024:
            raise ConfigError("--workers %d is out of range: give 1 to 1024 (one per core is plenty)" % count)
        if not config.redis_url:
            raise ConfigError("--workers %d needs --redis URL: the workers share seqs, history and "
                              "fan-out through Redis, and a store of their own would number each "
                              "topic %d ways" % (count, count))
        if not hasattr(os, "fork"):
            raise ConfigError("--workers needs fork() (Linux, macOS): run one process per port")
        self.count = count
        self._run = run
        check_listen(config.host, config.port)  # a port held by anyone else: refused here
        # held (bound, not listening) until exit: a restarted worker finds the port free for it
        self._holder = listen_socket(config.host, config.port, reuse_port=True, listen=False)
        self.port: int = self._holder.getsockname()[1]
        self.config = config.replace(port=self.port, reuse_port=True)
        self._workers: Dict[int, Tuple[int, float]] = {}  # pid -> (slot, started at)
        self._restarts: List[Tuple[float, int]] = []  # (due at, slot) of workers to start again
        self._pause: Dict[int, float] = {}  # slot -> pause before its next quick restart
        self._stop_signal = 0

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: int) -> Tuple[int, int]:
        """Fork worker ``slot``; returns (pid, read end of its ready pipe)."""
        ready_r, ready_w = os.pipe()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 1
            try:
                os.close(ready_r)
                self._holder.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                self._die_with_parent()

                def ready() -> None:
                    try:  # a restarted worker's pipe is closed at the other end: nothing to say
                        os.write(ready_w, b"1")
                    except OSError:
                        pass
                    os.close(ready_w)

                code = self._run(self.config, ready)
            except BaseException:  # noqa: B902 - whatever it is, the worker must not return
                logger.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                sys.stderr.flush()
                os._exit(code)
        os.close(ready_w)
        self._workers[pid] = (slot, time.monotonic())
        logger.info("worker %d started (pid %d)", slot, pid)
        return pid, ready_r

    @staticmethod
    def _die_with_parent() -> None:
        """Have the kernel send SIGTERM to this worker if the supervisor dies (Linux)."""
        if not sys.platform.startswith("linux"):
            return
        parent = os.getppid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # pragma: no cover - no prctl in this libc
            return
        if os.getppid() != parent:  # pragma: no cover - the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    def _wait_ready(self, pid: int, ready_r: int, timeout: float) -> Optional[int]:
        """Wait for worker ``pid`` to listen: None when it does, else its exit code (or 1)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.error("worker (pid %d) did not start within %.0f s", pid, timeout)
                    return 1
                try:
                    readable, _, _ = select.select([ready_r], [], [], min(left, 0.5))
                except InterruptedError:  # pragma: no cover - Python retries select itself
                    readable = []
                if readable:
                    if os.read(ready_r, 1):
                        return None
                    # closed without a word: the worker has ended
                    _, status = os.waitpid(pid, 0)
                    self._workers.pop(pid, None)
                    code = _exit_code(status)
                    return code if code else 1
                if self._stop_signal:
                    return 0
        finally:
            os.close(ready_r)

    def _reap(self) -> None:
        """Collect the workers that ended; schedule a restart of each (unless stopping)."""
        while self._workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._workers.clear()
                return
            if pid == 0:
                return
            entry = self._workers.pop(pid, None)
            if entry is None:
                continue
            slot, started = entry
            if self._stop_signal:
                continue
            now = time.monotonic()
            pause = 0.0
            if now - started < _QUICK_DEATH:
                pause = self._pause[slot] = min(_RESTART_PAUSE_MAX, self._pause.get(slot, 0.25) * 2)
            else:
                self._pause.pop(slot, None)
            logger.warning("worker %d (pid %d) died (%s); restarting it%s", slot, pid, _describe(status),
                           " in %.1f s" % pause if pause else "")
            self._restarts.append((now + pause, slot))

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum

    def _terminate_all(self, timeout: float) -> None:
        for pid in list(self._workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self._workers and time.monotonic() < deadline:
            for pid in list(self._workers):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done:
                    slot, _ = self._workers.pop(pid)
                    if os.WIFSIGNALED(status) or (_exit_code(status) or 0) != 0:
                        logger.warning("worker %d (pid %d) ended: %s", slot, pid, _describe(status))
            if self._workers:
                time.sleep(0.05)
        for pid in list(self._workers):
            logger.error("worker (pid %d) did not stop in %.0f s: killing it", pid, timeout)
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._workers.pop(pid, None)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        """Start the workers and supervise them until SIGTERM or SIGINT; the exit code.

        The first worker starts alone: a start-up mistake (Redis unreachable, a bad
        key file) is reported once, by it, and the supervisor exits 2.
        """
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        stop_timeout = self.config.shutdown_timeout + self.config.close_timeout + 10.0
        try:
            for slot in range(1, self.count + 1):
                pid, ready_r = self._spawn(slot)
                failed = self._wait_ready(pid, ready_r, 60.0)
                if self._stop_signal:
                    break
                if failed:
                    self._terminate_all(stop_timeout)
                    return 2 if failed == 2 else 1
            if not self._stop_signal:
                logger.info("%d workers serving %s://%s:%d%s", self.count,
                            "wss" if self.config.certfile else "ws", self.config.host, self.port,
                            self.config.path)
            while not self._stop_signal:
                time.sleep(0.2)  # a signal handler runs at once; its flag is seen within this
                self._reap()
                now = time.monotonic()
                for due, slot in [r for r in self._restarts if r[0] <= now]:
                    self._restarts.remove((due, slot))
                    if not self._stop_signal:
                        _, ready_r = self._spawn(slot)
                        os.close(ready_r)
            logger.info("signal %d: stopping %d workers", self._stop_signal, len(self._workers))
            self._terminate_all(stop_timeout)
            return 0
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOMEM):
                raise
            logger.error("cannot start a worker: %s", exc.strerror or exc)
            self._terminate_all(stop_timeout)
            return 1
        finally:
            self._holder.close()
