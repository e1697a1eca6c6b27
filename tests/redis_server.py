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
import threading
import time
from typing import Any, Dict, List, Optional, Set

REDIS_SERVER = os.environ.get("WSBROADCAST_REDIS_SERVER") or shutil.which("redis-server")


def require_redis_server() -> str:
    """The path of redis-server, or skip the calling test (or module, at import) with the reason."""
    if not REDIS_SERVER:
        import pytest  # here, so that scripts (bench_redis.py) use this module without pytest

        pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)
    return REDIS_SERVER


_handed_out: Set[int] = set()  # ports free_port gave before, in this process
_handed_out_lock = threading.Lock()  # guards _handed_out


def free_port() -> int:
    """A loopback port free now that this process was not given before (two servers
    started one after the other must not both get the port the kernel offers twice)."""
    with _handed_out_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


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

    def command_line(self) -> List[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always" if self.appendonly else "everysec",
            "--logfile", self.logfile, "--databases", "1",
        ] + self.extra

    def start(self, timeout: float = 10.0) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = self.command_line()
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

    def kill(self) -> None:
        """SIGKILL: the process ends at once, nothing flushed."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

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


class RedisSentinel(RedisServer):
    """One ``redis-server SENTINEL.CONF --sentinel`` monitoring the primary ``name``.

    Its config file (which Sentinel rewrites) is written on the first start.
    """

    def __init__(self, directory: str, primary_port: int, name: str = "primary", quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        super().__init__(directory)
        self.name = name
        self.conf = os.path.join(self.dir, "sentinel.conf")
        self.settings = [
            "port %d" % self.port, "bind 127.0.0.1", "daemonize no", "dir %s" % self.dir,
            "logfile %s" % self.logfile,
            "sentinel monitor %s 127.0.0.1 %d %d" % (name, primary_port, quorum),
            "sentinel down-after-milliseconds %s %d" % (name, down_after_ms),
            "sentinel failover-timeout %s %d" % (name, failover_timeout_ms),
            "sentinel parallel-syncs %s 1" % name,
        ]

    @property
    def url(self) -> str:
        return "127.0.0.1:%d" % self.port

    def command_line(self) -> List[str]:
        if not os.path.exists(self.conf):
            with open(self.conf, "w") as f:
                f.write("\n".join(self.settings) + "\n")
        return [self.binary, self.conf, "--sentinel"]

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0, protocol=2)

    def primary(self) -> Dict[str, Any]:
        """``SENTINEL MASTER name``: what this Sentinel knows of the primary."""
        client = self.client()
        try:  # raw: redis-py 7.0's callback of SENTINEL MASTER fails
            flat = client.execute_command("SENTINEL", "MASTER", self.name)
        finally:
            client.close()
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}

    def primary_port(self) -> Optional[int]:
        """The port this Sentinel names for the primary now."""
        client = self.client()
        try:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        finally:
            client.close()
        return int(addr[1]) if addr else None


class SentinelSet:
    """A primary (append-only, ``appendfsync always``), replicas and Sentinels, all on loopback.

    ``start`` returns once the replicas are in sync and every Sentinel knows the others
    and the replicas (so that a failover can be voted); ``stop`` ends every process.
    """

    def __init__(self, directory: str, replicas: int = 1, sentinels: int = 3, name: str = "primary",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.name = name
        extra = ["--repl-diskless-sync-delay", "0"]  # sync a new replica at once (not 5 s later)
        self.primary = RedisServer(os.path.join(directory, "primary"), appendonly=True, extra=extra)
        self.replicas = [RedisServer(os.path.join(directory, "replica%d" % i), appendonly=True,
                                     extra=extra + ["--replicaof", "127.0.0.1", str(self.primary.port)])
                         for i in range(replicas)]
        self.sentinels = [RedisSentinel(os.path.join(directory, "sentinel%d" % i), self.primary.port, name,
                                        quorum=sentinels // 2 + 1, down_after_ms=down_after_ms,
                                        failover_timeout_ms=failover_timeout_ms)
                          for i in range(sentinels)]

    def url(self, query: str = "") -> str:
        return "redis+sentinel://%s/%s%s" % (",".join(s.url for s in self.sentinels), self.name,
                                              "?" + query if query else "")

    @property
    def servers(self) -> List[RedisServer]:
        return [self.primary] + self.replicas

    def start(self, timeout: float = 20.0) -> "SentinelSet":
        deadline = time.monotonic() + timeout
        try:
            self.primary.start()
            for r in self.replicas:
                r.start()
            for s in self.sentinels:
                s.start()
            for r in self.replicas:
                r.wait_in_sync(max(0.1, deadline - time.monotonic()))
            self.wait_for(lambda: all(self._sees_all(s) for s in self.sentinels), deadline,
                          "the Sentinels did not find each other and the replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def _sees_all(self, sentinel: RedisSentinel) -> bool:
        state = sentinel.primary()
        return (int(state["num-other-sentinels"]) == len(self.sentinels) - 1
                and int(state["num-slaves"]) >= len(self.replicas))

    def primary_port(self) -> Optional[int]:
        """The primary's port as a majority of the Sentinels name it (None: no majority)."""
        votes: Dict[int, int] = {}
        from redis.exceptions import RedisError

        for s in self.sentinels:
            try:
                port = s.primary_port()
            except (OSError, RedisError):
                continue
            if port is not None:
                votes[port] = votes.get(port, 0) + 1
        for port, n in votes.items():
            if n > len(self.sentinels) // 2:
                return port
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_for(self, check: Any, deadline: float, what: str) -> None:
        from redis.exceptions import RedisError

        while True:
            try:
                if check():
                    return
            except (OSError, RedisError):
                pass
            if time.monotonic() > deadline:
                logs = "\n".join("--- %s\n%s" % (p.dir, p.log()[-1500:]) for p in self.sentinels + self.servers)
                raise RuntimeError("%s in time:\n%s" % (what, logs))
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.sentinels + self.replicas + [self.primary]:
            p.stop()

    def __enter__(self) -> "SentinelSet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
