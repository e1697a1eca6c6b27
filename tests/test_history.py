"""History, replay and recovery (PROTOCOL.md sections 4 and 6), end to end on real sockets.

Covers: a ``since`` subscribe in the middle of a concurrent publish stream (memory
and SQLite, a fast and a slowly reading subscriber), durability across SIGKILL of
the CLI process, epochs across a memory store restart, retention by count and by
age, a read-only store, GET /history, and a ``since`` subscribe that overlaps a
live subscription of the same connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import wsraw
from conftest import SCALE
from httputil import history, http_json
from httputil import publish as http_publish
from serverproc import ServerProcess
from wsraw import RawWS, connect, expect_pong_next, subscribe, wait_for

from wsbroadcast.store import SqliteStore, unpack_run

TOPIC = "hist.t"


# --------------------------------------------------------------------------- helpers


def store_spec(kind: str, tmp_path) -> str:
    return "memory" if kind == "memory" else str(tmp_path / "history.db")


def read_until(ws: RawWS, topic: str, last_seq: int, timeout: float = 30.0,
               pongs: Optional[List[Any]] = None) -> List[Tuple[int, Any]]:
    """(seq, data) of every message of ``topic`` up to and including ``last_seq``.

    Pongs are appended to ``pongs`` when it is given; any other frame (error,
    close, another topic) fails the test.
    """
    deadline = time.monotonic() + timeout * SCALE
    out: List[Tuple[int, Any]] = []
    while not out or out[-1][0] < last_seq:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out at %r after %d messages" % (out[-1:] or None, len(out)))
        op, payload = ws.recv_frame(timeout=remaining)
        if op == 0x9:
            continue
        if op == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            raise AssertionError("closed with %d %r after %d messages (last %r)"
                                 % (code, payload[2:], len(out), out[-1:] or None))
        obj = json.loads(payload)
        if pongs is not None and obj.get("type") == "pong":
            pongs.append((obj.get("id"), len(out)))
            continue
        assert obj.get("type") == "message" and obj.get("topic") == topic, obj
        out.append((obj["seq"], obj["data"]))
    return out


def assert_exact(got: List[Tuple[int, Any]], first: int, last: int) -> None:
    seqs = [s for s, _ in got]
    if seqs != list(range(first, last + 1)):
        dups = sorted({s for s in seqs if seqs.count(s) > 1})[:10]
        missing = sorted(set(range(first, last + 1)) - set(seqs))[:10]
        raise AssertionError("expected seqs %d..%d exactly once in order; got %d frames, "
                             "duplicates %r, missing %r, first out of order at %r"
                             % (first, last, len(seqs), dups, missing,
                                next((i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]), None)))


class AckBook:
    """What the publishers learned from their acks: seq -> data, and the epochs seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_seq: Dict[int, Any] = {}
        self.epochs: set = set()
        self.errors: List[str] = []

    def add(self, seq: int, epoch: str, data: Any) -> None:
        with self.lock:
            if seq in self.by_seq:
                self.errors.append("seq %d acked twice" % seq)
            self.by_seq[seq] = data
            self.epochs.add(epoch)

    def count(self) -> int:
        with self.lock:
            return len(self.by_seq)

    def seqs(self) -> List[int]:
        with self.lock:
            return sorted(self.by_seq)


def publisher(port: int, topic: str, tag: int, plan: List[Tuple[int, float]], book: AckBook,
              batch: int = 25, pad: str = "", checkpoints: Optional[Dict[int, Tuple[threading.Event,
                                                                                     threading.Event]]] = None,
              ) -> None:
    """Publish on its own raw connection, in pipelined batches with acks.

    ``plan`` is a list of (count, pause): publish ``count`` messages, sleeping ``pause``
    seconds between batches (pacing only). ``checkpoints`` maps a message index to
    (reached, go): after that many messages the thread sets ``reached`` and waits for ``go``.
    """
    ws = connect(port)
    try:
        i = 0
        for count, pause in plan:
            end = i + count
            while i < end:
                if checkpoints and i in checkpoints:
                    reached, go = checkpoints[i]
                    reached.set()
                    assert go.wait(30 * SCALE), "never released"
                n = min(batch, end - i)
                if checkpoints:
                    nxt = min((c for c in checkpoints if c > i), default=None)
                    if nxt is not None:
                        n = min(n, nxt - i)
                sent = {}
                for k in range(i, i + n):
                    data = {"p": tag, "i": k, "pad": pad}
                    sent[k] = data
                    ws.send_json({"type": "publish", "topic": topic, "data": data, "id": k})
                for _ in range(n):
                    ack = ws.recv_json(timeout=20 * SCALE)
                    assert ack.get("type") == "ack" and ack.get("topic") == topic, ack
                    book.add(ack["seq"], ack["epoch"], sent[ack["id"]])
                i += n
                if pause:
                    time.sleep(pause)
    except BaseException as exc:  # reported by the test
        book.errors.append("publisher %d: %r" % (tag, exc))
        raise
    finally:
        ws.close()


def run_threads(targets: List[Any]) -> List[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def join_all(threads: List[threading.Thread], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout * SCALE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "publisher threads did not finish"


# --------------------------------------------------------------------------- since mid-stream


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_since_subscribe_mid_stream_gets_every_seq_once(make_server, tmp_path, kind: str) -> None:
    """4 publishers, 5000 messages; a subscriber joins with ``since`` after 2000 acks.

    The publishers pause at 500 messages each (2000 in all) until the subscribe is
    on the wire, then go on, so the subscribe meets a live stream: the replayed part
    and the live part must join without a gap or a duplicate.
    """
    srv = make_server(store=store_spec(kind, tmp_path), history_size=10000)
    book = AckBook()
    per, nthreads = 1250, 4
    total = per * nthreads
    gates = [(threading.Event(), threading.Event()) for _ in range(nthreads)]
    go = threading.Event()
    threads = run_threads([
        (lambda k=k: publisher(srv.port, TOPIC, k, [(per, 0.0)], book,
                               checkpoints={500: (gates[k][0], go)}))
        for k in range(nthreads)])
    sub = connect(srv.port)
    try:
        for reached, _ in gates:
            assert reached.wait(30 * SCALE), book.errors
        assert book.count() == 2000
        acked = book.seqs()
        since = acked[len(acked) // 2]  # an acked seq in the middle: about 1000 to replay
        sub.send_json({"type": "subscribe", "topic": TOPIC, "id": "mid", "since": since})
        go.set()
        ack = sub.recv_json(timeout=10 * SCALE)
        assert ack["type"] == "ack" and ack["id"] == "mid", ack
        assert ack["recovered"] is True
        assert ack["epoch"] in book.epochs
        # the subscribe met the stream: some replay, and live messages still to come
        assert since <= 2000 <= ack["seq"] < total, ack
        got = read_until(sub, TOPIC, total)
        join_all(threads)
        assert book.errors == []
        assert len(book.epochs) == 1
        assert_exact(got, since + 1, total)
        assert all(data == book.by_seq[seq] for seq, data in got)
        expect_pong_next(sub)  # and nothing after the last one
    finally:
        go.set()
        sub.close()


class SlowWS(RawWS):
    """A raw client that reads its socket in small pieces with a pause between them."""

    chunk = 4096
    pause = 0.002


def connect_slow(port: int) -> SlowWS:
    """Upgrade a socket whose receive buffer is small, so the server cannot park the replay in it."""
    return wsraw.connect(port, rcvbuf=16 * 1024, timeout=10 * SCALE, cls=SlowWS)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_large_replay_to_slow_reader_is_paced(make_server, tmp_path, kind: str) -> None:
    """A replay of ~1.2 MB to a reader that takes ~2 MB/s, with a 64 KiB outbox limit.

    4800 messages (~270 bytes each) are stored first; the slow subscriber then asks
    for everything after seq 300 while 4 publishers go on at a trickle (200 messages
    over about a second, spread over the replay and after it). The reader keeps up
    with the live rate, so it must never be closed as a slow consumer, and it must
    get 301..5000 exactly once in order.
    """
    srv = make_server(store=store_spec(kind, tmp_path), history_size=10000, max_outbox=64 * 1024)
    pad = "x" * 180
    book = AckBook()
    threads = run_threads([
        (lambda k=k: publisher(srv.port, TOPIC, k, [(1200, 0.0)], book, batch=50, pad=pad))
        for k in range(4)])
    join_all(threads)
    assert book.errors == [] and book.count() == 4800
    since = 300
    sub = connect_slow(srv.port)
    try:
        # the ping is read with the subscribe but answered after the replay (same reader
        # thread): its pong lands on an outbox the replay has just filled
        sub.send_json({"type": "subscribe", "topic": TOPIC, "id": "slow", "since": since})
        sub.send_json({"type": "ping", "id": "during"})
        reply = sub.recv_json(timeout=10 * SCALE)
        assert reply["type"] == "ack" and reply["recovered"] is True and reply["seq"] == 4800, reply
        trickle = run_threads([
            (lambda k=k: publisher(srv.port, TOPIC, 10 + k, [(50, 0.02)], book, batch=1, pad=pad))
            for k in range(4)])
        pongs: List[Any] = []
        got = read_until(sub, TOPIC, 5000, timeout=60, pongs=pongs)
        join_all(trickle)
        assert book.errors == []
        assert_exact(got, since + 1, 5000)
        assert all(data == book.by_seq[seq] for seq, data in got)
        assert [p[0] for p in pongs] == ["during"]
        expect_pong_next(sub)
    finally:
        sub.close()
    assert srv.writer.stats.slow_consumers == 0


# --------------------------------------------------------------------------- crash and restart


@pytest.mark.timeout(90)
def test_sigkill_keeps_every_acked_message(tmp_path) -> None:
    """SIGKILL right after the last ack; the restarted process on the same file has them all."""
    path = str(tmp_path / "crash.db")
    n = 600
    first = ServerProcess("--store", path, "--history-size", "10000")
    port = first.port
    book = AckBook()
    try:
        threads = run_threads([
            (lambda k=k: publisher(port, TOPIC, k, [(n // 3, 0.0)], book, batch=40))
            for k in range(3)])
        join_all(threads)
        assert book.errors == []
        assert book.seqs() == list(range(1, n + 1)), "acked seqs are not 1..%d" % n
        assert len(book.epochs) == 1, book.epochs
        [epoch] = book.epochs
        first.kill()  # SIGKILL: no shutdown, no checkpoint, no close of the store
        assert first.proc.returncode == -9, (first.proc.returncode, first.lines[-5:])
    finally:
        first.kill()

    second = ServerProcess("--store", path, "--history-size", "10000", "--port", str(port))
    try:
        assert second.port == port, second.lines[-5:]
        sub = connect(port)
        try:
            ack = subscribe(sub, TOPIC, "all", since=0)
            assert ack["type"] == "ack", ack
            assert (ack["seq"], ack["epoch"], ack["recovered"]) == (n, epoch, True)
            got = read_until(sub, TOPIC, n)
            assert_exact(got, 1, n)
            assert all(data == book.by_seq[seq] for seq, data in got)
            # GET /history reads the same file
            rows = history(port, TOPIC, since=n - 10, limit=1000)
            assert [r["seq"] for r in rows] == list(range(n - 9, n + 1))
            assert all(r["data"] == book.by_seq[r["seq"]] for r in rows)
            # numbering goes on in the same epoch, over WebSocket and HTTP
            pub = connect(port)
            try:
                pub.send_json({"type": "publish", "topic": TOPIC, "data": "next", "id": 1})
                assert pub.recv_json() == {"type": "ack", "id": 1, "topic": TOPIC,
                                           "seq": n + 1, "epoch": epoch}
            finally:
                pub.close()
            assert http_publish(port, TOPIC, "after") == (200, {"topic": TOPIC, "seq": n + 2,
                                                                "epoch": epoch})
            assert read_until(sub, TOPIC, n + 2) == [(n + 1, "next"), (n + 2, "after")]
        finally:
            sub.close()
    finally:
        second.kill()


@pytest.mark.timeout(60)
def test_memory_store_restart_changes_epoch(make_server) -> None:
    old = make_server(history_size=100)
    for i in range(1, 6):
        old.publish(TOPIC, i)
    old_epoch = old.store.latest(TOPIC)[1]
    old.shutdown()

    new = make_server(history_size=100)
    for i in range(1, 4):
        seq, new_epoch = new.publish(TOPIC, "new-%d" % i)
    assert seq == 3 and new_epoch != old_epoch

    # the old epoch: the client's since is from another numbering -> everything, recovered false
    for since in (4, 5, 2, 0):  # above, equal to and below the new latest seq
        ws = connect(new.port)
        try:
            ack = subscribe(ws, TOPIC, since=since, epoch=old_epoch)
            assert ack == {"type": "ack", "id": "s", "topic": TOPIC, "seq": 3, "epoch": new_epoch,
                           "recovered": False}, (since, ack)
            assert read_until(ws, TOPIC, 3) == [(1, "new-1"), (2, "new-2"), (3, "new-3")]
            expect_pong_next(ws)
        finally:
            ws.close()

    ws = connect(new.port)
    try:
        # a since above the latest seq, with the matching epoch or none: bad_request
        for extra in ({"epoch": new_epoch}, {}):
            reply = subscribe(ws, TOPIC, "ahead", since=4, **extra)
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        # and nothing was subscribed by those
        new.publish("other.topic", 0)
        expect_pong_next(ws)
        # the matching epoch at the latest seq: nothing to replay, recovered
        ack = subscribe(ws, TOPIC, since=3, epoch=new_epoch)
        assert ack["recovered"] is True and ack["seq"] == 3, ack
        expect_pong_next(ws)
        new.publish(TOPIC, "live")
        assert read_until(ws, TOPIC, 4) == [(4, "live")]
    finally:
        ws.close()


# --------------------------------------------------------------------------- retention


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_history_size_retention_and_recovered_edge(make_server, tmp_path, kind: str) -> None:
    srv = make_server(store=store_spec(kind, tmp_path), history_size=10)
    for i in range(1, 26):
        srv.publish(TOPIC, i)
    # the SQLite store trims in the background (about once a second)
    assert wait_for(lambda: [r["seq"] for r in history(srv.port, TOPIC)] == list(range(16, 26)),
                    timeout=15 * SCALE), history(srv.port, TOPIC)

    cases = [(5, False), (14, False), (15, True), (20, True)]
    for since, recovered in cases:
        ws = connect(srv.port)
        try:
            ack = subscribe(ws, TOPIC, since=since)
            assert (ack["type"], ack["seq"], ack["recovered"]) == ("ack", 25, recovered), (since, ack)
            # what is kept after since is replayed either way
            first = max(since + 1, 16)
            assert read_until(ws, TOPIC, 25) == [(s, s) for s in range(first, 26)]
            expect_pong_next(ws)
        finally:
            ws.close()
    ws = connect(srv.port)
    try:
        ack = subscribe(ws, TOPIC, since=25)
        assert ack["recovered"] is True
        expect_pong_next(ws)
    finally:
        ws.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_history_ttl_background_trim(make_server, tmp_path, kind: str) -> None:
    srv = make_server(store=store_spec(kind, tmp_path), history_ttl=0.5)
    start = time.monotonic()
    for i in range(1, 6):
        _seq, epoch = srv.publish(TOPIC, i)
    kept = history(srv.port, TOPIC)
    if time.monotonic() - start < 0.4:  # younger than the ttl for sure
        assert [r["seq"] for r in kept] == [1, 2, 3, 4, 5]
    assert wait_for(lambda: history(srv.port, TOPIC) == [], timeout=15 * SCALE)
    assert time.monotonic() - start >= 0.5

    ws = connect(srv.port)
    try:
        if kind == "memory":
            # nothing stored, nobody subscribed: the memory store forgets the topic (in the
            # trim step after the one that emptied it), which comes back at seq 1 under a new
            # epoch (PROTOCOL.md section 6)
            assert wait_for(lambda: srv.store.forgotten >= 1, timeout=15 * SCALE)
            ack = subscribe(ws, TOPIC, "gone", since=2, epoch=epoch)
            assert (ack["seq"], ack["recovered"]) == (0, False) and ack["epoch"] != epoch, ack
            expect_pong_next(ws)
            assert srv.publish(TOPIC, 6) == (1, ack["epoch"])
            assert read_until(ws, TOPIC, 1) == [(1, 6)]
            return
        ack = subscribe(ws, TOPIC, "gone", since=2)
        assert (ack["seq"], ack["recovered"]) == (5, False), ack
        expect_pong_next(ws)  # nothing left to replay
        ack = subscribe(ws, TOPIC, "same", since=5)
        assert (ack["seq"], ack["recovered"]) == (5, True), ack
        expect_pong_next(ws)
        assert srv.publish(TOPIC, 6)[0] == 6  # seqs go on after everything expired
        assert read_until(ws, TOPIC, 6) == [(6, 6)]
    finally:
        ws.close()


# --------------------------------------------------------------------------- read-only store


def _make_store_file(path: str) -> str:
    with SqliteStore(path) as store:
        store.append_batch([(TOPIC, json.dumps("kept-1")), (TOPIC, json.dumps("kept-2"))])
        return store.latest(TOPIC)[1]


@pytest.mark.timeout(60)
def test_read_only_store_refuses_publishes_and_keeps_serving(make_server, tmp_path) -> None:
    path = tmp_path / "ro.db"
    epoch = _make_store_file(str(path))
    store = SqliteStore("file:%s?mode=ro" % path)
    assert store.read_only is True
    srv = make_server(message_store=store)

    sub = connect(srv.port)
    pub = connect(srv.port)
    try:
        ack = subscribe(sub, TOPIC)
        assert (ack["seq"], ack["epoch"], ack["recovered"]) == (2, epoch, True), ack
        # WebSocket publish with an id: an error frame for that id, no ack
        pub.send_json({"type": "publish", "topic": TOPIC, "data": "lost", "id": 7})
        err = pub.recv_json()
        assert err["type"] == "error" and err["id"] == 7, err
        assert err["code"] in ("internal_error", "unavailable"), err
        # without an id the error still comes (errors are always sent)
        pub.send_json({"type": "publish", "topic": TOPIC, "data": "lost too"})
        err = pub.recv_json()
        assert err["type"] == "error" and "id" not in err, err
        # HTTP publish: 503 unavailable
        status, body = http_publish(srv.port, TOPIC, "lost over http")
        assert status == 503 and body["error"] == "unavailable", (status, body)
        # nothing was delivered as if stored; the subscriber is served as before
        expect_pong_next(sub)
        assert srv.store.latest(TOPIC) == (2, epoch)
        # history is still readable: GET /history and a replay
        assert history(srv.port, TOPIC) == [{"topic": TOPIC, "seq": 1, "data": "kept-1"},
                                            {"topic": TOPIC, "seq": 2, "data": "kept-2"}]
        late = connect(srv.port)
        try:
            ack = subscribe(late, TOPIC, since=0)
            assert (ack["seq"], ack["recovered"]) == (2, True), ack
            assert read_until(late, TOPIC, 2) == [(1, "kept-1"), (2, "kept-2")]
            expect_pong_next(late)
        finally:
            late.close()
        # /healthz tells that publishes cannot be stored (PROTOCOL.md section 1)
        status, health = http_json(srv.port, "GET", "/healthz")
        assert (status, health["status"]) == (503, "degraded"), (status, health)
        assert "read-only" in health["reason"], health
        # the publisher's connection is still open and usable
        expect_pong_next(pub)
    finally:
        sub.close()
        pub.close()


@pytest.mark.timeout(60)
def test_read_only_store_uri_on_the_command_line(tmp_path) -> None:
    path = tmp_path / "ro.db"
    epoch = _make_store_file(str(path))
    with ServerProcess("--store", "file:%s?mode=ro" % path) as proc:
        status, body = http_publish(proc.port, TOPIC, "x")
        assert status == 503 and body["error"] == "unavailable", (status, body)
        assert [r["data"] for r in history(proc.port, TOPIC)] == ["kept-1", "kept-2"]
        ws = connect(proc.port)
        try:
            ack = subscribe(ws, TOPIC, since=1, epoch=epoch)
            assert (ack["seq"], ack["recovered"]) == (2, True), ack
            assert read_until(ws, TOPIC, 2) == [(2, "kept-2")]
            expect_pong_next(ws)
        finally:
            ws.close()
        assert proc.proc.poll() is None


# --------------------------------------------------------------------------- GET /history


@pytest.mark.timeout(60)
def test_get_history_reads_the_sqlite_store(make_server, tmp_path) -> None:
    path = tmp_path / "h.db"
    srv = make_server(store=str(path), history_size=1000)
    values = [i if i % 3 else {"n": i, "s": "\u00e9\u4e2d"} for i in range(1, 31)]
    for v in values:
        srv.publish(TOPIC, v)
    srv.publish("hist.other", "not this one")

    everything = history(srv.port, TOPIC)
    assert [r["seq"] for r in everything] == list(range(1, 31))
    assert [r["data"] for r in everything] == values
    assert all(r["topic"] == TOPIC for r in everything)
    assert [r["seq"] for r in history(srv.port, TOPIC, since=5, limit=10)] == list(range(6, 16))
    assert [r["seq"] for r in history(srv.port, TOPIC, since=25)] == list(range(26, 31))
    assert [r["seq"] for r in history(srv.port, TOPIC, limit=1)] == [1]
    assert history(srv.port, TOPIC, since=30) == []
    assert history(srv.port, TOPIC, since=1000) == []
    assert history(srv.port, "hist.never") == []
    # the answer is what the file holds
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        runs = db.execute("SELECT first_seq, last_seq, lens, data FROM runs WHERE topic = ?"
                          " ORDER BY last_seq", (TOPIC,)).fetchall()
    finally:
        db.close()
    rows = [(first + i, text) for first, last, lens, data in runs
            for i, text in enumerate(unpack_run(lens, data, last - first + 1))
            if first + i > 20]
    assert [(r["seq"], r["data"]) for r in history(srv.port, TOPIC, since=20)] == \
        [(seq, json.loads(data)) for seq, data in rows]
    status, body = http_json(srv.port, "GET", "/history?topic=hist.*")
    assert status == 400 and body["error"] == "bad_topic"


# --------------------------------------------------------------------------- overlap


@pytest.mark.timeout(60)
@pytest.mark.parametrize("existing", ["hist.a", "hist.*", "hist.>"])
def test_since_subscribe_overlapping_a_live_subscription(make_server, existing: str) -> None:
    """Exact behaviour (hub._subscribe_locked): the connection already receives TOPIC
    live (the same topic or a wildcard); a second subscribe with ``since`` is acked with
    S = the latest seq, then replays (since, S] -- messages the connection already got
    live before the ack, so they arrive a second time, after the ack -- and then every
    message after S exactly once (the live copy is buffered during the replay and the
    tree delivers one copy per connection however many patterns match).
    So after the ack the stream is since+1, since+2, ... in order with no duplicate.
    """
    topic = "hist.a"
    srv = make_server(history_size=1000000)
    ws = connect(srv.port)
    try:
        ack = subscribe(ws, existing, "first")
        assert ack["type"] == "ack", ack
        for i in range(1, 11):
            srv.publish(topic, i)
        assert read_until(ws, topic, 10) == [(i, i) for i in range(1, 11)]

        paused, go, acked = threading.Event(), threading.Event(), threading.Event()
        errors: List[str] = []
        published = [10]

        def publish() -> None:
            # 11..500, a pause until the subscribe is on the wire, then on until the
            # test has seen its ack, and 100 more: the replay always meets live traffic
            try:
                i, stop_at = 11, None
                while stop_at is None or i <= stop_at:
                    if i == 501:
                        paused.set()
                        assert go.wait(30 * SCALE)
                    if stop_at is None and acked.is_set():
                        stop_at = i + 99
                    assert i < 500000, "the ack never came"
                    srv.publish(topic, i)
                    published[0] = i
                    i += 1
            except BaseException as exc:
                errors.append(repr(exc))

        thread = run_threads([publish])[0]
        assert paused.wait(30 * SCALE)
        ws.send_json({"type": "subscribe", "topic": topic, "id": "again", "since": 5})
        go.set()
        before: List[int] = []
        while True:  # live messages queued before the ack
            obj = ws.recv_json(timeout=10 * SCALE)
            if obj.get("type") != "message":
                break
            before.append(obj["seq"])
        acked.set()
        assert obj["type"] == "ack" and obj["id"] == "again" and obj["recovered"] is True, obj
        s = obj["seq"]
        assert s >= 500, obj
        assert before == list(range(11, s + 1))
        join_all([thread])
        assert errors == []
        last = published[0]
        assert last >= s + 100
        after = read_until(ws, topic, last)
        assert_exact(after, 6, last)  # replay 6..S (again), then S+1..last once
        assert all(seq == data for seq, data in after)
        expect_pong_next(ws)
        # later live messages: still one copy each
        srv.publish(topic, last + 1)
        assert read_until(ws, topic, last + 1) == [(last + 1, last + 1)]
        expect_pong_next(ws)
    finally:
        go.set()
        ws.close()


@pytest.mark.timeout(30)
def test_two_since_subscribes_in_one_read_replay_from_the_lower(make_server) -> None:
    srv = make_server(history_size=100)
    for i in range(10):
        srv.publish("twice", i)
    c = wsraw.connect(srv.port)
    c.send_texts(json.dumps({"type": "subscribe", "topic": "twice", "id": 1, "since": 6}),
                 json.dumps({"type": "subscribe", "topic": "twice", "id": 2, "since": 2}))
    got = []
    acks = 0
    while len(got) < 8 or acks < 2:
        m = c.recv_json()
        if m["type"] == "ack":
            acks += 1
        else:
            got.append(m["seq"])
    assert acks == 2
    # one replay, from the lower since, each message once and in order; the first
    # subscribe's own range (7..10) is part of it
    assert got == list(range(3, 11))
