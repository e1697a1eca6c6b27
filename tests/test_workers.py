"""``wsbroadcast serve --workers N``: N broker processes on one port sharing one Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time

import pytest

import fleet
import wsraw
from redis_server import RedisServer
from serverproc import ServerProcess, run_serve

pytest.importorskip("redis")

SCALE = fleet.SCALE
_WORKER = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def _workers(proc: ServerProcess, count: int, timeout: float = 20.0):
    """The pids of the workers running now, once ``count`` of them are serving."""
    assert wsraw.wait_for(lambda: any("%d workers serving" % count in line for line in proc.lines),
                          timeout * SCALE), "\n".join(proc.lines)
    alive = fleet.children(proc.pid)
    assert len(alive) == count, (alive, proc.lines)
    return alive


def test_workers_need_redis():
    """Without --redis there is nothing to share: one line saying so, exit 2."""
    done = run_serve("--workers", "2", "--store", "memory")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "wsbroadcast serve: --workers 2 needs --redis URL: the workers share seqs, history and "
        "fan-out through Redis, and a store of their own would number each topic 2 ways"]
    for count in ("0", "1025"):  # 1 is one broker without a supervisor; 1024 is the most
        done = run_serve("--workers", count, "--redis", "redis://127.0.0.1:1/0")
        assert done.returncode == 2 and "--workers %s is out of range" % count in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_workers_refuse_a_port_another_process_shares():
    """A port held by another SO_REUSEPORT listener is in use: the workers must not join it."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        port = other.getsockname()[1]
        done = run_serve("--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--port", str(port))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "wsbroadcast serve: port %d is in use (another server?); pick one with --port" % port]


def test_worker_start_up_mistake_reported_once(tmp_path):
    """A mistake only a worker finds (a public key that is no PEM key) is said once; exit 2."""
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    done = run_serve("--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--public-key", str(key),
                     timeout=60 * SCALE)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("wsbroadcast serve:")]
    assert len(lines) == 1 and "--public-key" in lines[0], done.stderr
    assert "worker 2 started" not in done.stderr


@pytest.mark.timeout(120)
def test_two_workers_share_everything_and_survive_a_kill(tmp_path):
    """200 subscribers over 2 workers get every message of 2 publishers in order; a SIGKILLed
    worker is restarted and its clients resume on a live one with recovered: true; SIGTERM
    closes every connection with 1001 and the supervisor exits 0."""
    with RedisServer(str(tmp_path / "redis")) as rs, \
            ServerProcess("--workers", "2", "--redis", rs.url, "--max-publish-rate", "0") as proc:
        pids = _workers(proc, 2)

        def publish(conn, text):
            return fleet.post(conn, "/publish", json.dumps({"topic": "news", "data": text}).encode(),
                              "application/json")

        subs = fleet.check_fleet(proc.port, "/ws", pids, publish, lambda pid: os.kill(pid, signal.SIGKILL))
        killed = [pid for pid in pids if pid not in fleet.children(proc.pid)]
        assert len(killed) == 1
        # the supervisor saw it and started another in its place
        assert wsraw.wait_for(lambda: len(fleet.children(proc.pid)) == 2, 20 * SCALE), proc.lines
        assert any("died (killed by SIGKILL); restarting it" in line and str(killed[0]) in line
                   for line in proc.lines), proc.lines
        (new,) = set(fleet.children(proc.pid)) - set(pids)
        assert wsraw.wait_for(lambda: any("[%d]: listening on" % new in line for line in proc.lines),
                              20 * SCALE), proc.lines
        for s in subs:
            s.stopping = True
        started = time.monotonic()
        assert proc.terminate(timeout=30 * SCALE) == 0, proc.lines
        for s in subs:
            s.thread.join(max(0.1, started + 20 * SCALE - time.monotonic()))
            assert s.close_code == 1001, (s.close_code, s.error)
        assert fleet.children(proc.pid) == [] if os.path.exists("/proc/%d" % proc.pid) else True
