"""A private ``redis-server`` for tests: a free port on 127.0.0.1, its own directory.

    with RedisServer(tmp_path, appendonly=True) as rs:
        url = rs.url
        rs.stop(); rs.start()        # restart on the same port; data survives with appendonly

Tests are skipped (``require_redis_server``) only when no ``redis-server`` binary is
installed; any other failure to start it is an error.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional

REDIS_SERVER = os.environ.get("WSBROADCAST_REDIS_SERVER") or shutil.which("redis-server")


def require_redis_server() -> str:
    """The path of redis-server, or skip the calling test (or module, at import) with the reason."""
    if not REDIS_SERVER:
        import pytest  # here, so that scripts (bench_redis.py) use this module without pytest

        pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)
    return REDIS_SERVER


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info(port: int, section: str) -> Dict[str, Any]:
    """``INFO section`` of the server on 127.0.0.1:port (redis-py; OSError or RedisError if it does not answer)."""
    import redis

    client = redis.Redis(port=port, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return client.info(section)
    finally:
        client.close()


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` keep its port and directory."""

    def __init__(self, directory: str, appendonly: bool = False, port: Optional[int] = None,
                 extra: Optional[List[str]] = None) -> None:
        self.binary = require_redis_server()
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra = list(extra or [])
        self.proc: Optional[subprocess.Popen] = None
        self.logfile = os.path.join(self.dir, "redis.log")

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always" if self.appendonly else "everysec",
            "--logfile", self.logfile, "--databases", "1",
        ] + self.extra
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            if self._wait_ready(deadline):
                return self
            # the port may still be held by the previous process for a moment
            self._terminate()
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start on port %d:\n%s" % (self.port, self.log()))
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> bool:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        """SIGTERM and wait for the process to end."""
        self._terminate()

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def info(self, section: str) -> Dict[str, Any]:
        """``INFO section`` as a dict."""
        return info(self.port, section)

    def wait_in_sync(self, timeout: float = 10.0) -> None:
        """As a replica: wait until its link to the primary is up and the first sync is done."""
        from redis.exceptions import RedisError

        deadline = time.monotonic() + timeout
        while True:
            try:
                rep = self.info("replication")
                if rep.get("master_link_status") == "up" and not rep.get("master_sync_in_progress"):
                    return
            except (OSError, RedisError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("replica on port %d did not sync in %.0f s:\n%s" % (self.port, timeout, self.log()))
            time.sleep(0.02)

    def log(self) -> str:
        try:
            with open(self.logfile) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
