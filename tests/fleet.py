"""Many raw WebSocket subscribers that resume (since + epoch) after a drop, and HTTP publishers.

The check of a broker that runs as several processes on one port (``wsbroadcast serve
--workers N``, gunicorn ``-w N``): every subscriber gets every acked message of one topic,
in seq order, with no gap and no repeat, across the loss of the process it was on.
"""

from __future__ import annotations

import http.client
import json
import os
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

import wsraw

SCALE = float(os.environ.get("WSBROADCAST_TEST_TIMEOUT_SCALE", "1"))


class Subscriber:
    """One subscriber to ``topic`` in its own thread; reconnects and resumes when dropped."""

    def __init__(self, port: int, path: str, topic: str, deadline: float) -> None:
        self.port, self.path, self.topic, self.deadline = port, path, topic, deadline
        self.seqs: List[int] = []
        self.data: Dict[int, object] = {}
        self.epoch: Optional[str] = None
        self.resumes: List[Optional[bool]] = []  # "recovered" of each subscribe after a drop
        self.close_code: Optional[int] = None
        self.error: Optional[str] = None
        self.subscribed = threading.Event()
        self.stopping = False  # set before the broker is stopped: a close is then the end
        self.ws: Optional[wsraw.RawWS] = None
        self.thread = threading.Thread(target=self._run, name="test-subscriber", daemon=True)
        self.thread.start()

    def _connect(self) -> wsraw.RawWS:
        while True:
            try:
                return wsraw.connect(self.port, path=self.path, timeout=5 * SCALE)
            except (OSError, AssertionError) as exc:  # the port is momentarily without a worker
                if time.monotonic() > self.deadline:
                    raise AssertionError("cannot reconnect: %s" % exc) from exc
                time.sleep(0.05)  # pacing of the retries

    def _run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                ws = self.ws = self._connect()
                frame = {"type": "subscribe", "topic": self.topic, "id": "s"}
                resuming = bool(self.seqs)
                if resuming:
                    frame.update(since=self.seqs[-1], epoch=self.epoch)
                try:
                    ws.send_json(frame)
                    if self._pump(ws, resuming):
                        return
                except (OSError, ConnectionError):
                    pass  # its worker is gone: reconnect and resume
                finally:
                    ws.close()
            self.error = "deadline passed"
        except Exception as exc:  # reported by the test through .error
            self.error = "%s: %s" % (type(exc).__name__, exc)

    def _pump(self, ws: wsraw.RawWS, resuming: bool) -> bool:
        """Read frames until the connection ends; True when it ended for good (a close frame)."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed while reading")
            op, payload = ws.recv_frame(left)
            if op == 0x8:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if self.stopping:
                    return True
                raise ConnectionError("closed with %d" % self.close_code)
            if op != 0x1:
                continue
            obj = json.loads(payload)
            kind = obj.get("type")
            if kind == "ack" and obj.get("id") == "s":
                self.epoch = obj["epoch"]
                if resuming:
                    self.resumes.append(obj.get("recovered"))
                self.subscribed.set()
            elif kind == "message" and obj.get("topic") == self.topic:
                self.seqs.append(obj["seq"])
                self.data[obj["seq"]] = obj["data"]
            elif kind == "error":
                raise AssertionError("error frame: %r" % (obj,))


def publish_until_acked(port: int, request: Callable[[http.client.HTTPConnection], Tuple[int, bytes]],
                        deadline: float) -> int:
    """Send one publish over HTTP until a process answers it with its seq (a dropped request is resent)."""
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10 * SCALE)
        try:
            status, body = request(conn)
            if status == 200:
                return int(json.loads(body)["seq"])
            problem = "HTTP %d %r" % (status, body[:200])
        except (OSError, http.client.HTTPException) as exc:
            problem = str(exc)
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise AssertionError("publish not acked: %s" % problem)
        time.sleep(0.05)  # pacing of the retries


class Publisher:
    """Publishes ``count`` texts one after the other in its own thread; ``acked``: seq -> text."""

    def __init__(self, name: str, count: int, port: int,
                 send: Callable[[http.client.HTTPConnection, str], Tuple[int, bytes]], deadline: float) -> None:
        self.acked: Dict[int, str] = {}
        self.error: Optional[str] = None

        def run() -> None:
            try:
                for i in range(count):
                    text = "%s-%d" % (name, i)
                    seq = publish_until_acked(port, lambda conn, text=text: send(conn, text), deadline)
                    self.acked[seq] = text
            except Exception as exc:
                self.error = "%s: %s" % (type(exc).__name__, exc)

        self.thread = threading.Thread(target=run, name="test-publisher-" + name, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "publisher still running"
        assert self.error is None, self.error


def post(conn: http.client.HTTPConnection, path: str, body: bytes, content_type: str,
         headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    """One POST on ``conn``: (status, body)."""
    hdrs = {"Content-Type": content_type, "Accept": "application/json", "Connection": "close"}
    hdrs.update(headers or {})
    conn.request("POST", path, body=body, headers=hdrs)
    resp = conn.getresponse()
    return resp.status, resp.read()


def children(pid: int) -> List[int]:
    """The pids of the child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def established_peers(pid: int, port: int) -> Set[int]:
    """The remote ports of the established TCP connections of process ``pid`` on its local ``port``."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    peers = set()
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, table)) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if (int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "01"
                            and parts[9] in inodes):
                        peers.add(int(parts[2].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return peers


def check_fleet(port: int, path: str, workers: List[int], publish: Callable[[http.client.HTTPConnection, str],
                Tuple[int, bytes]], kill: Callable[[int], None], topic: str = "news",
                subscribers: int = 200, per_publisher: int = 10, timeout: float = 60.0) -> List[Subscriber]:
    """Subscribers spread over ``workers``; 2 publishers; one worker SIGKILLed midway.

    Every subscriber must end with every acked message, in seq order without a gap,
    and every subscriber that lost its worker must have resumed with ``recovered: true``.
    Returns the subscribers (still connected).
    """
    deadline = time.monotonic() + timeout * SCALE
    subs = [Subscriber(port, path, topic, deadline) for _ in range(subscribers)]
    for s in subs:
        assert s.subscribed.wait(max(0.1, deadline - time.monotonic())), s.error or "not subscribed"
    peers = {pid: established_peers(pid, port) for pid in workers}
    spread = {pid: len(p) for pid, p in peers.items()}  # may count a probe's connection too
    assert sum(spread.values()) >= subscribers, spread
    busy = [pid for pid, n in spread.items() if n]
    assert len(busy) >= 2, "the subscribers all went to one process: %r" % spread

    acked: Dict[int, str] = {}

    def run_publishers(tag: str) -> None:
        pubs = [Publisher("%s%d" % (tag, k), per_publisher, port, publish, deadline) for k in range(2)]
        for p in pubs:
            p.join(max(0.1, deadline - time.monotonic()))
            acked.update(p.acked)

    def everyone_has_all() -> bool:
        top = max(acked)
        return all(s.seqs and s.seqs[-1] >= top or s.error for s in subs)

    run_publishers("a")
    assert wsraw.wait_for(everyone_has_all, max(0.1, deadline - time.monotonic())), "phase 1 not delivered"
    victim = max(busy, key=lambda pid: spread[pid])
    on_victim = [s for s in subs if s.ws is not None and s.ws.sock.getsockname()[1] in peers[victim]]
    assert on_victim, (spread, "no subscriber found on the busiest process")
    kill(victim)
    run_publishers("b")  # while the victim's subscribers reconnect
    assert wsraw.wait_for(everyone_has_all, max(0.1, deadline - time.monotonic())), "phase 2 not delivered"
    assert len(acked) == 4 * per_publisher
    resumed = 0
    for s in subs:
        assert s.error is None, s.error
        first = s.seqs[0]
        assert s.seqs == list(range(first, s.seqs[-1] + 1)), "gap or repeat: %r" % s.seqs
        missing = [seq for seq in acked if seq >= first and seq not in s.data]
        assert not missing and first <= min(acked), (first, missing)
        assert all(s.data[seq] == text for seq, text in acked.items())
        assert all(r is True for r in s.resumes), s.resumes
        resumed += bool(s.resumes)
    assert all(s.resumes for s in on_victim), (resumed, len(on_victim), spread)  # each of the victim's came back
    return subs

