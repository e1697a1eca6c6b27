"""Overload from one client or many, against ``python -m wsbroadcast serve`` as a user starts it.

Frames: a message's cost is bounded in frames as well as bytes. Connections: the fd
table, threads and the accept loop stay bounded while clients pile up.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import pytest

import httputil
import threadutil
import wsraw
from conftest import SCALE
from serverproc import ServerProcess

from wsbroadcast.admission import PENDING_PER_IP_SLACK, pending_per_ip

pytestmark = pytest.mark.timeout(60)

#: the default of --max-message-frames
DEFAULT_FRAMES = 4096


def _fragmented(text: bytes, frames: int) -> bytes:
    """``text`` as one message of ``frames`` frames: a first piece, empty continuations, the rest."""
    assert frames >= 2
    empty = wsraw.encode_frame(0x0, b"", fin=False)
    return (wsraw.encode_frame(0x1, text[:1], fin=False) + empty * (frames - 2)
            + wsraw.encode_frame(0x0, text[1:]))


def test_a_message_of_too_many_empty_fragments_is_closed_1009():
    with ServerProcess("--store", "memory") as proc:
        c = wsraw.connect(proc.port)
        try:
            ping = json.dumps({"type": "ping", "id": "edge"}).encode()
            c.sock.sendall(_fragmented(ping, DEFAULT_FRAMES))  # at the limit: served
            assert c.recv_json() == {"type": "pong", "id": "edge"}
            c.sock.sendall(_fragmented(ping, DEFAULT_FRAMES + 1))  # one frame past it
            code, reason = c.expect_close()
            assert code == 1009, (code, reason)
            assert c.at_eof()
        finally:
            c.close()
        # the server goes on serving others
        other = wsraw.connect(proc.port)
        other.send_json({"type": "ping", "id": "after"})
        assert other.recv_json() == {"type": "pong", "id": "after"}
        other.close()


# ------------------------------------------------------------------ connections


def _closed_by_server(socks: List[socket.socket], want: int, timeout: float) -> Dict[socket.socket, bytes]:
    """Wait until the server has closed ``want`` of ``socks``; {socket: what it sent before}."""
    watcher = wsraw.CloseWatcher(socks)
    try:
        return watcher.wait(want, timeout)
    finally:
        watcher.close()


def _healthz_until_ok(port: int, timeout: float) -> Tuple[int, float]:
    """Ask /healthz until it answers 200; (attempts, seconds). Each attempt must be answered at once."""
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            status, _h, body = wsraw.http_request(
                port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", timeout=5 * SCALE)
        except ConnectionResetError:
            status, body = 0, b""  # refused without a descriptor to spare: still an answer
        if status == 200:
            assert json.loads(body)["status"] == "ok"
            return attempts, time.monotonic() - started
        assert status in (0, 503), (status, body)
        if status == 503:
            assert json.loads(body)["error"] == "unavailable"
        assert time.monotonic() - started < timeout, "no 200 from /healthz in %.0f s" % timeout
        time.sleep(0.1)  # pacing the retries


def _accept_failures(proc: ServerProcess) -> int:
    return sum("accept failed" in line for line in proc.lines)


def _close_all(socks: List[socket.socket]) -> None:
    for s in socks:
        s.close()


NOFILE = 256


def _nofile_256() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.mark.timeout(120)
def test_under_a_low_open_file_limit_idle_connections_are_turned_away_and_healthz_answers():
    idle_count = 400
    # (the handshake timeout is far off: it is not what ends the idle connections here)
    with ServerProcess("--store", "memory", "--max-connections", "200", "--handshake-timeout", "60",
                       preexec_fn=_nofile_256) as proc:
        said = [line for line in proc.lines if "open-file limit" in line]
        assert len(said) == 1 and "256" in said[0], proc.lines  # the lowered limits, in one line
        idle = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(idle_count)]
        try:
            # what the server cannot hold is answered 503 and closed, not left in the backlog
            closed = _closed_by_server(idle, idle_count - NOFILE, timeout=30 * SCALE)
            assert len(closed) >= idle_count - NOFILE, len(closed)
            answered = [a for a in closed.values() if a]
            assert answered and all(a.startswith(b"HTTP/1.1 503 ") for a in answered), answered[:3]
            assert proc.threads() < NOFILE
            # /healthz gets an answer at every attempt, and a 200 as soon as an idle one can be dropped
            _attempts, seconds = _healthz_until_ok(proc.port, timeout=15 * SCALE)
            # a WebSocket client gets in and is served
            c = wsraw.connect(proc.port)
            c.send_json({"type": "ping", "id": "in"})
            assert c.recv_json() == {"type": "pong", "id": "in"}
            c.close()
            assert _accept_failures(proc) <= 3, _accept_failures(proc)
        finally:
            _close_all(idle)


@pytest.mark.timeout(120)
def test_out_of_descriptors_the_accept_loop_backs_off_turns_away_and_keeps_serving():
    with ServerProcess("--store", "memory", "--handshake-timeout", "60") as proc:
        served = wsraw.connect(proc.port)  # a connection the server has, before the table fills
        cpu_start = _cpu_seconds(proc.pid)
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (64, 64))  # far below what it planned for
        idle = [socket.create_connection(("127.0.0.1", proc.port), timeout=10) for _ in range(150)]
        try:
            closed = _closed_by_server(idle, 150 - 64, timeout=30 * SCALE)
            assert len(closed) >= 150 - 64, len(closed)
            # the connection it had is still served
            served.send_json({"type": "ping", "id": "still"})
            assert served.recv_json() == {"type": "pong", "id": "still"}
            _healthz_until_ok(proc.port, timeout=15 * SCALE)
            # no spinning: the failures are logged a few times, not thousands
            assert 1 <= _accept_failures(proc) <= 3, [line for line in proc.lines if "accept" in line][:5]
            assert _cpu_seconds(proc.pid) - cpu_start < 10 * SCALE
        finally:
            _close_all(idle)
            served.close()


def _cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_BODY = json.dumps({"topic": "t", "data": "x" * 20}).encode()


def _publishing(port: int) -> socket.socket:
    """An HTTP publish whose body is still on its way (``_BODY[10:]``): a connection the server is busy with."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BODY) + _BODY[:10])
    return s


def _refused_503(port: int, message: str) -> None:
    status, _h, body = wsraw.http_request(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 503 and json.loads(body) == {"error": "unavailable", "message": message}, (status, body)


def test_pending_connections_at_and_past_the_limit(make_server):
    srv = make_server(max_pending=3)
    busy = [_publishing(srv.port) for _ in range(3)]
    try:
        assert wsraw.wait_for(lambda: len(srv.pending) == 3 and srv.thread_count() == 3)
        _refused_503(srv.port, "server over its connection limit")  # a fourth: no thread, an answer
        assert srv.thread_count() == 3
        done = busy.pop()
        done.sendall(_BODY[10:])
        status, _h, _b = wsraw.read_response(done)
        assert status == 200
        done.close()
        assert wsraw.wait_for(lambda: len(srv.pending) == 2)
        status, _h, _b = wsraw.http_request(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 200  # the third place again
        assert wsraw.wait_for(lambda: len(srv.pending) == 2)
        assert httputil.metric(srv.port, "wsbroadcast_connections_turned_away_total") == 1
        # upgraded connections leave the pending count: WebSockets are limited by max_connections
        ws = []
        for _ in range(3):
            assert wsraw.wait_for(lambda: len(srv.pending) == 2)
            ws.append(wsraw.connect(srv.port))
        assert wsraw.wait_for(lambda: len(srv.pending) == 2 and len(srv.hub) == 3)
        for c in ws:
            c.close()
    finally:
        _close_all(busy)


def test_pending_connections_per_address(make_server):
    srv = make_server(max_connections_per_ip=2)
    allowed = pending_per_ip(2)
    assert allowed == 2 + PENDING_PER_IP_SLACK
    busy = [_publishing(srv.port) for _ in range(allowed)]
    try:
        assert wsraw.wait_for(lambda: len(srv.pending) == allowed)
        _refused_503(srv.port, "too many connections from this address")
        assert srv.thread_count() == allowed
    finally:
        _close_all(busy)
    assert wsraw.wait_for(lambda: len(srv.pending) == 0)
    status, _h, _b = wsraw.http_request(srv.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 200



def test_an_open_file_limit_with_no_room_for_connections_is_a_one_line_start_up_error(tmp_path):
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)); "
            "from wsbroadcast.cli import main; sys.exit(main(sys.argv[1:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, "serve", "--port", "0", "--store", "memory"],
                          cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsbroadcast serve: "), done.stderr
    assert "open-file limit (ulimit -n) is 40" in lines[0] and "raise it" in lines[0], lines[0]


def test_a_newcomer_waits_for_room_in_a_full_pending_table_then_is_turned_away_at_once(make_server):
    srv = make_server(max_pending=3)
    assert srv.pending is not None
    srv.pending.room_wait = 30 * SCALE  # long enough to free a place meanwhile, whatever the load
    busy = [_publishing(srv.port) for _ in range(3)]
    try:
        assert wsraw.wait_for(lambda: len(srv.pending) == 3 and srv.thread_count() == 3)
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        waiting = threadutil.start(wsraw.http_request, srv.port, request, name="newcomer")
        assert wsraw.wait_for(lambda: srv.accepted == 4)  # accepted, waiting for a place
        done = busy.pop()
        done.sendall(_BODY[10:])
        assert wsraw.read_response(done)[0] == 200
        done.close()
        assert waiting.finish(30 * SCALE)[0] == 200  # it got the freed place, not a 503
        # full again: a wait that ends with no room turns the following newcomers away at once
        busy.append(_publishing(srv.port))
        assert wsraw.wait_for(lambda: len(srv.pending) == 3)
        srv.pending.room_wait = 0.05
        _refused_503(srv.port, "server over its connection limit")
        srv.pending.room_wait = 30 * SCALE
        started = time.monotonic()
        _refused_503(srv.port, "server over its connection limit")
        assert time.monotonic() - started < 15 * SCALE  # not after a wait of room_wait
        done = busy.pop()
        done.sendall(_BODY[10:])
        assert wsraw.read_response(done)[0] == 200
        done.close()
        assert wsraw.wait_for(lambda: len(srv.pending) == 2)
        assert httputil.metric(srv.port, "wsbroadcast_connections_turned_away_total") == 2
    finally:
        _close_all(busy)
