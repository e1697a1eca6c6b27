#!/usr/bin/env python3
"""Idle TCP connections piling up on a broker: what they cost it, and whether it still answers.

Starts ``python -m wsbroadcast serve`` as a user does (tests/serverproc.py), optionally
under a low open-file limit, opens ``--idle`` TCP connections that never send a byte,
then for ``--seconds`` watches the server: CPU time used, threads and descriptors at
their largest, log volume (and "accept failed" lines), how many idle connections it
closed (and how many of those got a 503 first), and how long /healthz takes to be
answered at all and to answer 200. One line of JSON per run on stdout::

    scripts/bench_overload.py --nofile 256 --idle 400
    scripts/bench_overload.py --max-connections 200 --idle 1500
    scripts/bench_overload.py --squeeze 64 --idle 150      # descriptors run out: EMFILE
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import wsraw  # noqa: E402
from serverproc import ServerProcess  # noqa: E402

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def healthz(port: int, timeout: float) -> Tuple[int, float]:
    """(status, seconds); status 0 for a reset, -1 for no answer within ``timeout``."""
    started = time.monotonic()
    try:
        status, _h, _b = wsraw.http_request(port, HEALTHZ, timeout=timeout)
    except (socket.timeout, TimeoutError):
        status = -1
    except (ConnectionError, OSError):
        status = 0
    return status, time.monotonic() - started


def run(args: argparse.Namespace) -> Dict[str, object]:
    extra: List[str] = ["--store", "memory", "--handshake-timeout", str(args.handshake_timeout)]
    if args.max_connections:
        extra += ["--max-connections", str(args.max_connections)]

    def limit() -> None:
        if args.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with ServerProcess(*extra, cwd=str(ROOT), env=env, preexec_fn=limit, timeout=30.0) as proc:
        start_lines = list(proc.lines)
        cpu0 = cpu_seconds(proc.pid)
        if args.squeeze:  # a limit far below what the server planned for: accept() meets EMFILE
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (args.squeeze, args.squeeze))
        idle = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(args.idle)]
        watcher = wsraw.CloseWatcher(idle)
        threads = fds = 0
        first_answer: Optional[float] = None
        first_ok: Optional[float] = None
        began = time.monotonic()
        next_probe = began + 0.5
        while time.monotonic() - began < args.seconds:
            watcher.poll(0.1)
            try:
                threads = max(threads, proc.threads())
                fds = max(fds, proc.fds())
            except OSError:
                pass
            now = time.monotonic()
            if first_ok is None and now >= next_probe:
                status, took = healthz(proc.port, timeout=2.0)
                if status != -1 and first_answer is None:
                    first_answer = now + took - began
                if status == 200:
                    first_ok = now + took - began
                next_probe = time.monotonic() + 0.5
        cpu = cpu_seconds(proc.pid) - cpu0
        lines = proc.lines[len(start_lines):]
        for s in idle:
            s.close()
        watcher.close()
        closed = watcher.closed
        return {
            "nofile": args.squeeze or args.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "squeezed_after_start": bool(args.squeeze),
            "idle": args.idle,
            "max_connections": args.max_connections or "default",
            "seconds": args.seconds,
            "start_lines": [line.split(": ", 1)[-1] for line in start_lines if "limit" in line],
            "server_cpu_s": round(cpu, 2),
            "threads_max": threads,
            "fds_max": fds,
            "log_lines": len(lines),
            "log_bytes": sum(len(line) + 1 for line in lines),
            "accept_failed_lines": sum("accept failed" in line for line in lines),
            "idle_closed_by_server": len(closed),
            "idle_answered_503": sum(1 for a in closed.values() if a.startswith(b"HTTP/1.1 503")),
            "healthz_first_answer_s": None if first_answer is None else round(first_answer, 2),
            "healthz_first_200_s": None if first_ok is None else round(first_ok, 2),
        }


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--idle", type=int, default=400, help="idle TCP connections (default 400)")
    p.add_argument("--nofile", type=int, default=0, help="the server's RLIMIT_NOFILE (default: inherited)")
    p.add_argument("--squeeze", type=int, default=0,
                   help="lower the running server's RLIMIT_NOFILE to this after its start (prlimit)")
    p.add_argument("--max-connections", type=int, default=0, help="--max-connections of the server")
    p.add_argument("--seconds", type=float, default=8.0, help="how long to watch (default 8)")
    p.add_argument("--handshake-timeout", type=float, default=60.0,
                   help="the server's handshake timeout (default 60: longer than the run)")
    args = p.parse_args(argv)
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
