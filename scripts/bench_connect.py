#!/usr/bin/env python3
"""Server CPU per WebSocket connection: set-up (accept -> 101 -> registered) and close.

    python scripts/bench_connect.py [--connections 500] [--rounds 5]
        [--servers wsbroadcast,websocket-server] [--python PY] [--profile-python PY]

Each server runs in a subprocess (``--serve NAME``, told what to do on stdin). One
client thread opens K raw sockets at once (non-blocking connects), sends each a
fixed upgrade request and reads its 101, until the server has registered all K;
then it closes them all (``--close abrupt``: TCP close; ``clean``: a close frame
first, the server's close frame read back) until the server holds none. The
figure is the server process's CPU (utime + stime from /proc/PID/stat) over each
phase divided by K: CPU, not wall time, so that it holds on a busy machine (run
it under ``nice -n 19``; wall rates are printed for information only). Rounds
run on the same servers, which take turns; the median round is reported.

``--profile-python`` (3.11 or older: cProfile there is per thread) runs
wsbroadcast once more with every thread profiled and prints the top functions
of the connect phase by internal time.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_KEY = base64.b64encode(b"0123456789abcdef").decode()
_CLOSE_FRAME = bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2])  # masked close, code 1000


# ---------------------------------------------------------------------- server side
def _thread_cpu() -> Dict[str, float]:
    """CPU seconds (from the scheduler, in ns) of the live threads of this process by kind."""
    out: Dict[str, float] = {}
    for t in threading.enumerate():
        try:
            with open("/proc/self/task/%d/schedstat" % t.native_id) as f:  # type: ignore[str-format]
                ns = int(f.read().split()[0])
        except OSError:
            continue
        kind = re.sub(r"^Thread-[0-9]+ ", "", re.sub(r"-conn-.*", "-conn", t.name))
        out[kind] = out.get(kind, 0.0) + ns / 1e9
    return out


def _serve(name: str, profile: bool) -> None:
    """Run one server on a free port; answer 'count' and 'profile' on stdin."""
    profiles: List[Any] = []
    if profile:
        import cProfile

        plock = threading.Lock()
        run = threading.Thread.run

        def profiled_run(self: threading.Thread) -> None:
            p = cProfile.Profile(time.thread_time)  # CPU, not the time spent waiting
            with plock:
                profiles.append(p)
            p.enable()
            try:
                run(self)
            finally:
                p.disable()

        threading.Thread.run = profiled_run  # type: ignore[method-assign]
    count: Callable[[], Tuple[int, int]]
    base_threads = threading.active_count()
    if name.partition("=")[0] == "wsbroadcast":
        sys.path.insert(0, name.partition("=")[2] or str(ROOT))
        import logging

        from wsbroadcast import Server

        logging.disable(logging.WARNING)

        srv = Server("127.0.0.1", port=0, store="memory", max_connections=20000,
                     max_connections_per_ip=0)
        srv.start()
        port = srv.port
        base_threads = threading.active_count()

        def count() -> Tuple[int, int]:
            return len(srv.hub), srv.thread_count()
    else:
        import logging

        from websocket_server import WebsocketServer

        WebsocketServer.request_queue_size = 4096  # (TCPServer's default backlog is 5)
        wss = WebsocketServer(host="127.0.0.1", port=0, loglevel=logging.ERROR)
        wss.run_forever(threaded=True)
        port = wss.server_address[1]
        base_threads = threading.active_count()

        def count() -> Tuple[int, int]:
            # its client list may keep a client whose thread has ended: a client thread is one held
            threads = threading.active_count() - base_threads
            return threads, threads
    print("PORT %d" % port, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "count":
            print("%d %d" % count(), flush=True)
        elif cmd == "profile":
            import pstats

            out = io.StringIO()
            stats = None
            with (threading.Lock() if not profile else plock):
                for p in profiles:
                    p.snapshot_stats()  # (without disabling: the threads still run)
                    if not p.stats:
                        continue  # (a thread that has not run a profiled call yet)
                    holder = type("S", (), {"stats": p.stats, "create_stats": lambda self: None})()
                    if stats is None:
                        stats = pstats.Stats(holder, stream=out)
                    else:
                        stats.add(holder)
            if stats is not None:
                rows = int(os.environ.get("BENCH_ROWS", "30"))
                stats.sort_stats(os.environ.get("BENCH_SORT", "tottime")).print_stats(rows)
                for fn in filter(None, os.environ.get("BENCH_CALLEES", "").split(",")):
                    stats.print_callees(fn)
            text = out.getvalue()
            print("%d" % len(text.encode()), flush=True)
            sys.stdout.write(text)
            sys.stdout.flush()
        elif cmd == "threads":
            print(json.dumps(_thread_cpu()), flush=True)
        elif cmd == "quit":
            break
    os._exit(0)


# ---------------------------------------------------------------------- client side
class ServerProc:
    def __init__(self, python: str, name: str, profile: bool = False) -> None:
        env = dict(os.environ, PYTHONPATH=name.partition("=")[2] or str(ROOT))
        args = [python, str(Path(__file__).resolve()), "--serve", name] + (["--profiling"] if profile else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise SystemExit("%s did not start: %r" % (name, line))
        self.port = int(line.split()[1])
        self.name = name

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def count(self) -> Tuple[int, int]:
        a, b = self.ask("count").split()
        return int(a), int(b)

    def profile(self) -> str:
        size = int(self.ask("profile"))
        assert self.proc.stdout is not None
        return self.proc.stdout.read(size).decode()

    def threads(self) -> Dict[str, float]:
        return json.loads(self.ask("threads"))

    def cpu(self) -> Tuple[float, float]:
        """The server's (user, system) CPU seconds so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / _TICK, int(fields[12]) / _TICK

    def wait_count(self, registered: Optional[int], threads: Optional[int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r, t = self.count()
            if (registered is None or r == registered) and (threads is None or t == threads):
                return
            if time.monotonic() > deadline:
                raise SystemExit("%s did not reach %s registered / %s threads (has %d / %d)"
                                 % (self.name, registered, threads, r, t))
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self.ask("quit")
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _request(port: int) -> bytes:
    return ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
            "User-Agent: bench_connect\r\n\r\n" % (port, _KEY)).encode()


def open_all(port: int, k: int, timeout: float = 60.0) -> List[socket.socket]:
    """K connections upgraded at once: connect all, send each request when writable, read the 101s."""
    request = _request(port)
    sel = selectors.DefaultSelector()
    socks: List[socket.socket] = []
    bufs: Dict[socket.socket, bytes] = {}
    for _ in range(k):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE)
        socks.append(s)
    left = k
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            raise SystemExit("%d of %d upgrades not answered" % (left, k))
        for key, ev in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            if ev & selectors.EVENT_WRITE:
                s.send(request)
                sel.modify(s, selectors.EVENT_READ)
                bufs[s] = b""
                continue
            data = s.recv(4096)
            if not data:
                raise SystemExit("server closed a connection during the handshake")
            bufs[s] += data
            if b"\r\n\r\n" in bufs[s]:
                if not bufs[s].startswith(b"HTTP/1.1 101"):
                    raise SystemExit("not upgraded: %r" % bufs[s][:80])
                sel.unregister(s)
                left -= 1
    sel.close()
    return socks


def close_all(socks: List[socket.socket], clean: bool, timeout: float = 60.0) -> None:
    """Close every connection: at once (abrupt), or by a close frame and the server's EOF (clean)."""
    if not clean:
        for s in socks:
            s.close()
        return
    sel = selectors.DefaultSelector()
    for s in socks:
        s.send(_CLOSE_FRAME)
        sel.register(s, selectors.EVENT_READ)
    left = len(socks)
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            raise SystemExit("%d connections not closed by the server" % left)
        for key, _ev in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                left -= 1
    sel.close()


def one_round(srv: ServerProc, k: int, clean: bool) -> Dict[str, float]:
    c0, w0 = srv.cpu(), time.monotonic()
    socks = open_all(srv.port, k)
    srv.wait_count(k, None)
    c1, w1 = srv.cpu(), time.monotonic()
    close_all(socks, clean)
    srv.wait_count(0, 0)
    c2, w2 = srv.cpu(), time.monotonic()
    return {"connect_us": (sum(c1) - sum(c0)) / k * 1e6, "close_us": (sum(c2) - sum(c1)) / k * 1e6,
            "connect_sys_us": (c1[1] - c0[1]) / k * 1e6, "close_sys_us": (c2[1] - c1[1]) / k * 1e6,
            "connect_rate": k / (w1 - w0), "close_rate": k / (w2 - w1)}


def measure(python: str, names: List[str], k: int, rounds: int, clean: bool) -> Dict[str, Dict[str, float]]:
    """The median round of each server; the servers take turns, round by round (same conditions)."""
    procs = {}
    try:
        for name in names:
            procs[name] = ServerProc(python, name)
        results: Dict[str, List[Dict[str, float]]] = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:
                results[name].append(one_round(procs[name], k, clean))
    finally:
        for srv in procs.values():
            srv.close()
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}


def profile(python: str, k: int, name: str = "wsbroadcast") -> str:
    srv = ServerProc(python, name, profile=True)
    try:
        socks = open_all(srv.port, k)
        srv.wait_count(k, None)
        text = srv.profile()
        close_all(socks, False)
        srv.wait_count(0, 0)
    finally:
        srv.close()
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--profiling", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--connections", "-k", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--servers", default="wsbroadcast,websocket-server",
                    help="wsbroadcast (this tree), wsbroadcast=DIR (the package in DIR: another "
                         "version, to compare in the same run), websocket-server")
    ap.add_argument("--close", choices=("abrupt", "clean"), default="abrupt")
    ap.add_argument("--python", default="/work/venvs/bench/bin/python"
                    if os.path.exists("/work/venvs/bench/bin/python") else sys.executable)
    ap.add_argument("--profile-python", help="also profile wsbroadcast's connect phase with this Python "
                                             "(3.11 or older)")
    ap.add_argument("--profile-server", default="wsbroadcast", help="the wsbroadcast to profile (or wsbroadcast=DIR)")
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.profiling)
        return
    print("K=%d connections at once, %d rounds (median), close %s, %s; load %s"
          % (args.connections, args.rounds, args.close, args.python, os.getloadavg()[0]))
    print("%-18s %20s %20s %11s %9s" % ("server", "connect us CPU (sys)", "close us CPU (sys)",
                                         "connects/s", "closes/s"))
    names = []
    for name in args.servers.split(","):
        if name == "websocket-server":
            probe = subprocess.run([args.python, "-c", "import websocket_server"], capture_output=True)
            if probe.returncode:
                print("%-18s not importable from %s" % (name, args.python))
                continue
        names.append(name)
    for name, r in measure(args.python, names, args.connections, args.rounds, args.close == "clean").items():
        print("%-18s %14.0f (%3.0f) %14.0f (%3.0f) %11.0f %9.0f" % (
            name.replace("wsbroadcast=", "wsbroadcast@"), r["connect_us"], r["connect_sys_us"], r["close_us"],
            r["close_sys_us"], r["connect_rate"], r["close_rate"]), flush=True)
    print("(server CPU per connection, from /proc/PID/stat; wall rates depend on the machine's load)")
    if args.profile_python:
        print("\ncProfile of %s's connect phase (%d connections, all threads, thread CPU time):"
              % (args.profile_server, args.connections))
        print(profile(args.profile_python, args.connections, args.profile_server))


if __name__ == "__main__":
    main()
