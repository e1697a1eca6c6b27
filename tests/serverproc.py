"""Run ``python -m wsbroadcast serve`` as a child process and learn its port from the log."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Callable, List, Optional, Sequence

_LISTEN = re.compile(r"listening on wss?://[^:]+:(\d+)/")
_SERVE = [sys.executable, "-m", "wsbroadcast", "serve", "--host", "127.0.0.1"]


def without_file_permission_override() -> Optional[List[str]]:
    """A command prefix under which file modes bind (chmod 444 stops writes), or None.

    Root ignores file modes through CAP_DAC_OVERRIDE: as root the prefix is setpriv
    dropping that capability (the process stays root, so it can still read the
    interpreter and the repository it owns). Not root: no prefix is needed. None
    when running as root without setpriv.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    drop = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set=" + drop, "--inh-caps=" + drop]


def run_serve(*args: str, prefix: Sequence[str] = (), env: Optional[dict] = None,
              timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``wsbroadcast serve ARGS`` (port 0 unless given) expecting it to exit by itself."""
    cmd = list(prefix) + _SERVE + ([] if "--port" in args else ["--port", "0"]) + list(args)
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


class ServerProcess:
    """A broker process on 127.0.0.1 and a free port; its log lines are kept in ``lines``."""

    def __init__(self, *args: str, cwd: Optional[str] = None, env: Optional[dict] = None,
                 timeout: float = 20.0, prefix: Sequence[str] = (),
                 preexec_fn: Optional[Callable[[], None]] = None) -> None:
        cmd = list(prefix) + _SERVE + ["--port", "0"]
        cmd.extend(args)
        self.lines: List[str] = []
        self.port = 0
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=preexec_fn)
        self._thread = threading.Thread(target=self._read, name="test-server-log", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = _LISTEN.search(line)
            if m and not self.port:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self, field: str = "VmRSS") -> int:
        """Resident memory now (VmHWM: the peak so far), KiB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError("no " + field)

    def threads(self) -> int:
        return len(os.listdir("/proc/%d/task" % self.pid))

    def fds(self) -> int:
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def terminate(self, timeout: float = 10.0, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` (SIGTERM by default) and wait for the exit code."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self._thread.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._thread.join(5)
        if not self._thread.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()  # read to its end by _read

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
