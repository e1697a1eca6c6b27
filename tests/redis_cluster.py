"""A private Redis Cluster for tests: 3 primaries + 3 replicas of ``redis-server`` on loopback
(``replicas=0``: the primaries alone).

    with RedisCluster(tmp_path) as rc:
        url = rc.url                       # redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...
        rc.kill(port)                      # SIGKILL one node
        rc.wait(lambda info: ...)          # poll CLUSTER state with a deadline

Every node runs with ``appendfsync always`` (unless ``appendonly=False``) and a short ``cluster-node-timeout`` so that
a failover takes a few seconds. ``stop`` ends every process it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Dict, List, Optional

from redis_server import RedisServer, free_port, require_redis_server

REDIS_CLI = shutil.which("redis-cli")
NODE_TIMEOUT_MS = 1000


def command(port: int, *args: str, timeout: float = 2.0) -> str:
    """One command to one node through a raw socket (RESP); its reply as text, errors included."""
    parts = [b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(parts))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                n = int(head[1:])
                if n < 0 or len(rest) >= n + 2:
                    break
    text = data.decode("utf-8", "replace")
    if text.startswith("$"):
        return text.partition("\r\n")[2][:-2]
    return text.strip()


def cluster_info(port: int) -> Dict[str, str]:
    try:
        text = command(port, "CLUSTER", "INFO")
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class ClusterNodeInfo:
    """One line of CLUSTER NODES."""

    def __init__(self, line: str) -> None:
        fields = line.split()
        self.id = fields[0]
        self.port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        self.flags = fields[2].split(",")
        self.primary_id = fields[3]
        self.connected = fields[7] == "connected"
        self.slots = fields[8:]

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags and "fail" not in self.flags and "fail?" not in self.flags


class RedisCluster:
    """Three primaries (each with ``replicas`` replicas) made into a cluster by ``redis-cli --cluster create``."""

    def __init__(self, directory: str, replicas: int = 1, appendonly: bool = True) -> None:
        require_redis_server()
        if REDIS_CLI is None:
            import pytest

            pytest.skip("redis-cli is not installed (apt-get install redis-tools)", allow_module_level=True)
        self.dir = str(directory)
        self.replicas = replicas
        self.nodes: List[RedisServer] = []
        for i in range(3 * (1 + replicas)):
            self.nodes.append(RedisServer(
                os.path.join(self.dir, "n%d" % i), appendonly=appendonly, port=free_port(),
                extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-port", str(free_port()),  # the bus: not port + 10000
                       "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                       "--cluster-replica-validity-factor", "0",
                       "--cluster-require-full-coverage", "no"]))

    @property
    def ports(self) -> List[int]:
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join("127.0.0.1:%d" % p for p in self.ports[:3])

    def start(self, timeout: float = 60.0) -> "RedisCluster":
        try:
            for n in self.nodes:
                n.start()
            assert REDIS_CLI is not None
            subprocess.run([REDIS_CLI, "--cluster", "create"] + ["127.0.0.1:%d" % p for p in self.ports]
                           + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            self.wait(self.healthy, timeout, "the cluster to form")
        except BaseException:
            self.stop()
            raise
        return self

    def topology(self, port: Optional[int] = None) -> List[ClusterNodeInfo]:
        """CLUSTER NODES as seen by ``port`` (the first live node by default)."""
        for p in ([port] if port else self.live_ports()):
            try:
                text = command(p, "CLUSTER", "NODES")
            except OSError:
                continue
            return [ClusterNodeInfo(line) for line in text.splitlines() if line.strip()]
        return []

    def live_ports(self) -> List[int]:
        return [n.port for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def primaries(self) -> List[int]:
        return [n.port for n in self.topology() if n.is_primary and n.slots]

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and agrees on three primaries each with a replica."""
        live = self.live_ports()
        if not all(cluster_info(p).get("cluster_state") == "ok" for p in live):
            return False
        for p in live:
            nodes = self.topology(p)
            primaries = [n for n in nodes if n.is_primary and n.slots]
            if len(primaries) != 3:
                return False
            replicas = [n for n in nodes if "slave" in n.flags and n.connected and "fail" not in n.flags]
            if self.replicas and len({r.primary_id for r in replicas} & {m.id for m in primaries}) != 3:
                return False
        if not self.replicas:
            return True
        return all(self.replicated(p) for p in self.primaries())

    def replicated(self, port: int) -> bool:
        """The primary on ``port`` has a replica online (one that a WAIT can count)."""
        try:
            text = command(port, "INFO", "replication")
        except OSError:
            return False
        return "connected_slaves:0" not in text and "state=online" in text

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "the cluster") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s:\n%s" % (
                    what, "\n".join("%s %s" % (n.port, n.flags) for n in self.topology())))
            time.sleep(0.05)

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (no shutdown, no last write)."""
        proc = self.node(port).proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.node(port).proc = None

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
