"""The Python client across server restarts: resubscribe with ``since``, dedupe, on_gap.

The server runs as a child process (``python -m wsbroadcast serve``) with a SQLite
store and is restarted on the same port, or in-process with a memory store. To
publish "while the client is away" deterministically, the client's dial is held
at a gate (an instance attribute wrapping ``Client._dial``) until the test opens it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conftest import SCALE
from httputil import history
from httputil import publish as http_publish
from serverproc import ServerProcess
from wsraw import wait_for

from wsbroadcast import Server
from wsbroadcast.client import Client, Message

TOPIC = "resume.t"


def history_seqs(port: int, topic: str) -> List[int]:
    return [m["seq"] for m in history(port, topic, limit=1000)]


class Harness:
    """A Client with a gated dial, a consumer thread, and records of its callbacks."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.reconnects: List[float] = []
        self.gaps: List[Tuple[str, Dict[str, Any]]] = []
        self.got: List[Message] = []
        self.errors: List[BaseException] = []
        self.gate = threading.Event()
        self.gate.set()
        self._stop = threading.Event()
        self.client = Client(url, on_reconnect=lambda: self.reconnects.append(time.monotonic()),
                             on_gap=lambda topic, reply: self.gaps.append((topic, reply)),
                             max_backoff=0.5, timeout=10 * SCALE, **kwargs)
        real_dial = self.client._dial

        def gated_dial() -> Any:
            if not self.gate.wait(60 * SCALE):
                raise OSError("test gate stayed closed")
            return real_dial()

        self.client._dial = gated_dial  # type: ignore[method-assign]
        self.client.open()
        self._thread = threading.Thread(target=self._consume, name="test-consumer", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.recv(timeout=0.2)
            except BaseException as exc:  # the application must never see one
                self.errors.append(exc)
                return
            if msg is not None:
                self.got.append(msg)

    def wait_count(self, n: int, timeout: float = 20.0) -> None:
        assert wait_for(lambda: len(self.got) >= n or self.errors, timeout=timeout * SCALE), \
            "got %d of %d messages" % (len(self.got), n)
        assert self.errors == []

    def finish(self) -> None:
        """A round trip, then stop consuming and take what is still queued: all there is."""
        self.client.ping()
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        while True:
            msg = self.client.recv(timeout=0)
            if msg is None:
                break
            self.got.append(msg)
        assert self.errors == []

    def close(self) -> None:
        self.gate.set()
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def seqs_of(msgs: List[Message]) -> List[int]:
    return [m.seq for m in msgs]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_client_rides_through_server_restart(tmp_path, stop: str) -> None:
    path = str(tmp_path / "resume.db")
    args = ("--store", path, "--history-size", "10000")
    server = ServerProcess(*args)
    port = server.port
    h: Optional[Harness] = None
    try:
        h = Harness("ws://127.0.0.1:%d/ws" % port)
        ack = h.client.subscribe(TOPIC)
        assert ack["seq"] == 0 and ack["recovered"] is True
        epoch = ack["epoch"]
        for i in range(1, 51):  # before: over the client's own connection, acked once stored
            assert h.client.publish(TOPIC, {"n": i}) == (i, epoch)
        h.wait_count(50)

        h.gate.clear()  # the client may notice the drop, but not dial again yet
        if stop == "sigterm":
            assert server.terminate() == 0
        else:
            server.kill()
        assert wait_for(lambda: not h.client.connected, timeout=10 * SCALE)
        server = ServerProcess(*args, "--port", str(port))
        assert server.port == port
        for i in range(51, 81):  # during: the client is still away
            assert http_publish(port, TOPIC, {"n": i}) == (200, {"topic": TOPIC, "seq": i,
                                                                 "epoch": epoch})
        assert len(h.got) == 50 and h.reconnects == []
        h.gate.set()
        assert wait_for(lambda: h.reconnects and h.client.connected, timeout=20 * SCALE)
        h.wait_count(80)
        for i in range(81, 91):  # after: over HTTP and over the client itself
            assert http_publish(port, TOPIC, {"n": i})[0] == 200
        for i in range(91, 101):
            assert h.client.publish(TOPIC, {"n": i}) == (i, epoch)
        h.wait_count(100)
        h.finish()
        assert seqs_of(h.got) == list(range(1, 101))
        assert [m.data for m in h.got] == [{"n": i} for i in range(1, 101)]
        assert all(m.topic == TOPIC for m in h.got)
        assert len(h.reconnects) == 1 and h.client.reconnects == 1
        assert h.gaps == []
        assert h.errors == []
    finally:
        if h is not None:
            h.close()
        server.kill()


@pytest.mark.timeout(90)
def test_client_reports_gap_when_history_was_trimmed(tmp_path) -> None:
    path = str(tmp_path / "gap.db")
    args = ("--store", path, "--history-size", "5")
    server = ServerProcess(*args)
    port = server.port
    h: Optional[Harness] = None
    try:
        h = Harness("ws://127.0.0.1:%d/ws" % port)
        epoch = h.client.subscribe(TOPIC)["epoch"]
        for i in range(1, 4):
            h.client.publish(TOPIC, i)
        h.wait_count(3)

        h.gate.clear()
        server.kill()
        assert wait_for(lambda: not h.client.connected, timeout=10 * SCALE)
        server = ServerProcess(*args, "--port", str(port))
        for i in range(4, 24):  # 20 while away, 5 kept
            assert http_publish(port, TOPIC, i)[0] == 200
        # the store trims in the background (about once a second)
        assert wait_for(lambda: history_seqs(port, TOPIC) == [19, 20, 21, 22, 23], timeout=15 * SCALE)
        h.gate.set()
        assert wait_for(lambda: h.gaps, timeout=20 * SCALE)
        [(topic, reply)] = h.gaps
        assert topic == TOPIC
        assert reply["type"] == "ack" and reply["recovered"] is False, reply
        assert (reply["seq"], reply["epoch"]) == (23, epoch)
        h.wait_count(8)
        assert http_publish(port, TOPIC, 24)[0] == 200
        h.wait_count(9)
        h.finish()
        # what was kept, once each, in order; then live
        assert seqs_of(h.got) == [1, 2, 3, 19, 20, 21, 22, 23, 24]
        assert [m.data for m in h.got] == [1, 2, 3, 19, 20, 21, 22, 23, 24]
        assert len(h.reconnects) == 1
        assert h.errors == []
    finally:
        if h is not None:
            h.close()
        server.kill()


def _restart_in_process(old: Server, **settings: Any) -> Server:
    port = old.port
    old.shutdown()
    return Server("127.0.0.1", port, store="memory", close_timeout=2.0 * SCALE, **settings).start()


@pytest.mark.timeout(60)
def test_client_wildcard_topics_after_memory_restart() -> None:
    """Topics received through a wildcard restart at seq 1 under a new epoch.

    The wildcard is resubscribed without ``since`` (a wildcard has no position), so
    the client must not drop the new numbering's seqs as "seen already".
    """
    srv = Server("127.0.0.1", 0, store="memory", close_timeout=2.0 * SCALE).start()
    h: Optional[Harness] = None
    try:
        h = Harness(srv.url)
        h.client.subscribe("resume.*")
        for i in range(1, 6):
            srv.publish("resume.w", "old-%d" % i)
        h.wait_count(5)
        srv = _restart_in_process(srv)
        assert wait_for(lambda: h.reconnects and h.client.connected, timeout=20 * SCALE)
        h.client.ping()  # sent after the resubscribe: the subscription is in place
        assert srv.publish("resume.w", "new-1")[0] == 1
        h.wait_count(6)
        h.finish()
        assert [(m.seq, m.data) for m in h.got] == [(i, "old-%d" % i) for i in range(1, 6)] + \
            [(1, "new-1")]
    finally:
        if h is not None:
            h.close()
        srv.shutdown()


@pytest.mark.timeout(60)
def test_client_subscribe_since_with_stale_epoch_replays_everything() -> None:
    """An explicit subscribe(since=N) carrying an epoch from before a memory restart.

    The server acks recovered false and replays from seq 1 of the new numbering; the
    client must take all of it (the ack's position has to be applied before the
    replayed messages that follow it are deduplicated).
    """
    srv = Server("127.0.0.1", 0, store="memory", history_size=1000,
                 close_timeout=2.0 * SCALE).start()
    h: Optional[Harness] = None
    try:
        h = Harness(srv.url)
        h.client.subscribe(TOPIC)
        for i in range(1, 301):
            srv.publish(TOPIC, i)
        h.wait_count(300)
        h.client.unsubscribe(TOPIC)  # its epoch is still remembered
        srv = _restart_in_process(srv, history_size=1000)
        assert wait_for(lambda: h.reconnects and h.client.connected, timeout=20 * SCALE)
        for i in range(1, 301):
            srv.publish(TOPIC, 1000 + i)
        ack = h.client.subscribe(TOPIC, since=300)
        assert (ack["seq"], ack["recovered"]) == (300, False), ack
        h.wait_count(600)
        h.finish()
        assert [(m.seq, m.data) for m in h.got[300:]] == [(i, 1000 + i) for i in range(1, 301)]
        assert len(h.got) == 600
        assert h.gaps == []  # an explicit subscribe returns its ack; on_gap is for resumes
    finally:
        if h is not None:
            h.close()
        srv.shutdown()
