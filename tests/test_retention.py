"""Bounded retention (PROTOCOL.md section 6): the memory store's byte budget, forgotten topics,
and retention applied in small steps.

End to end through ``python -m wsbroadcast serve`` (tests/serverproc.py) and real sockets;
the store's own rules sans I/O. Figures for 1,000,000 topics: scripts/bench_memory.py.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from conftest import SCALE
from serverproc import ServerProcess
from wsraw import RawWS, connect, request, wait_for

from wsbroadcast import store as store_mod
from wsbroadcast.errors import ConfigError
from wsbroadcast.store import MemoryStore, SqliteStore, message_cost, topic_cost

MIB = 1024 * 1024


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def healthz(port: int) -> Dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10 * SCALE)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def flood(ws: RawWS, prefix: str, topics: int, size: int) -> None:
    """Publish one message of ``size`` bytes on each of ``topics`` distinct topics, then sync."""
    data = json.dumps("x" * (size - 2))
    batch: List[str] = []
    for i in range(topics):
        batch.append('{"type":"publish","topic":"%s.%d","data":%s}' % (prefix, i, data))
        if len(batch) == 100:
            ws.send_texts(*batch)
            batch = []
    if batch:
        ws.send_texts(*batch)
    assert request(ws, {"type": "ping", "id": "sync"}) == {"type": "pong", "id": "sync"}


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(90)
def test_memory_store_keeps_to_its_budget_and_forgets_topics() -> None:
    """20,000 topics of 2 KB through a 4 MiB memory store: RSS stays near the budget, the
    oldest topic is evicted and forgotten, and comes back at seq 1 under a new epoch."""
    with ServerProcess("--store", "memory", "--memory-store-bytes", "4MiB",
                       "--max-message-size", "65536") as srv:
        ws = connect(srv.port, timeout=10 * SCALE)
        try:
            acks = [request(ws, {"type": "publish", "topic": "keep.me", "data": i, "id": i})
                    for i in (1, 2, 3)]
            assert [a["seq"] for a in acks] == [1, 2, 3]
            epoch = acks[0]["epoch"]
            flood(ws, "warm", 2000, 2048)  # the allocator's and the budget's first fill
            before = srv.rss_kib()
            flood(ws, "many", 20000, 2048)  # ~40 MiB of data, ~60 MiB unbounded
            grown = (srv.rss_kib() - before) / 1024.0
            assert grown < 16, "RSS grew by %.1f MiB over a 4 MiB budget" % grown
            status = healthz(srv.port)["broker"]
            assert status["bytes"] <= status["max_bytes"] == 4 * MIB, status

            # keep.me held the oldest messages: evicted, then forgotten by a trim step
            # (a subscribe that finds it still known is undone, which lets it go again)
            ack: Dict[str, Any] = {}

            def forgotten() -> bool:
                nonlocal ack
                ack = request(ws, {"type": "subscribe", "topic": "keep.me", "id": "s",
                                   "since": 3, "epoch": epoch})
                if ack["seq"] == 0:
                    return True
                assert (ack["seq"], ack["epoch"], ack["recovered"]) == (3, epoch, False), ack
                request(ws, {"type": "unsubscribe", "topic": "keep.me", "id": "u"})
                return False

            assert wait_for(forgotten, timeout=30 * SCALE, interval=0.2)
            assert ack["recovered"] is False and ack["epoch"] != epoch, ack
            new_epoch = ack["epoch"]
            pub = request(ws, {"type": "publish", "topic": "keep.me", "data": "again", "id": "p"})
            assert (pub["seq"], pub["epoch"]) == (1, new_epoch), pub
            msg = ws.recv_json(timeout=10 * SCALE)
            assert msg == {"type": "message", "topic": "keep.me", "seq": 1, "data": "again"}
            # far fewer topics are known than were published: the rest were forgotten
            assert wait_for(lambda: healthz(srv.port)["broker"]["topics"] < 4 * MIB // 2048,
                            timeout=30 * SCALE, interval=0.2)
        finally:
            ws.close()


@pytest.mark.timeout(90)
def test_ttl_trim_of_many_topics_runs_in_short_steps() -> None:
    """20,000 topics expire at once: trimmed and forgotten in steps that each hold the
    hub's lock briefly, while a publisher keeps getting answers."""
    with ServerProcess("--store", "memory", "--history-ttl", "3") as srv:
        ws = connect(srv.port, timeout=10 * SCALE)
        try:
            flood(ws, "ttl", 20000, 64)
            assert healthz(srv.port)["broker"]["topics"] > 1000  # most are not expired yet
            worst = 0.0
            deadline = time.monotonic() + 30 * SCALE
            n = 0
            while healthz(srv.port)["broker"]["topics"] > 1:  # only "probe" is left
                assert time.monotonic() < deadline, healthz(srv.port)
                start = time.monotonic()
                pub = request(ws, {"type": "publish", "topic": "probe", "data": n, "id": n})
                worst = max(worst, time.monotonic() - start)
                assert pub["type"] == "ack", pub
                n += 1
            trim = healthz(srv.port)["trim"]
            assert trim["steps"] > 1, trim  # one big step would not be steps
            assert trim["longest_cpu_ms"] < 100 * SCALE, trim  # about 2 ms; preemption aside
            assert worst < 2.0 * SCALE, worst
        finally:
            ws.close()


def test_memory_store_size_below_largest_message_is_refused(make_server) -> None:
    with pytest.raises(ConfigError, match="memory-store-bytes"):
        make_server(memory_store_bytes=128 * 1024 - 1, max_message_size=128 * 1024)
    srv = make_server(memory_store_bytes=128 * 1024, max_message_size=128 * 1024)  # at the edge
    assert srv.publish("t", "x") == (1, srv.publish("t", "y")[1])


# --------------------------------------------------------------------------- in process


def test_subscribed_topics_keep_their_numbering(make_server) -> None:
    """A topic expired and without messages is forgotten only when no subscription matches it;
    a subscribe ack's epoch holds for the topic's first publish."""
    srv = make_server(history_ttl=0.2)
    store = srv.store
    assert isinstance(store, MemoryStore)
    exact, wild = connect(srv.port), connect(srv.port)
    try:
        ack = request(exact, {"type": "subscribe", "topic": "a.new", "id": 1})
        assert ack["seq"] == 0
        assert request(wild, {"type": "subscribe", "topic": "w.>", "id": 1})["type"] == "ack"
        for topic in ("w.x", "z"):
            srv.publish(topic, 1)
        # expired and trimmed; "z" (no subscriber) forgotten, the others kept
        assert wait_for(lambda: "z" not in store._topics, timeout=20 * SCALE)  # noqa: SLF001
        assert store.oldest("w.x") == 0
        assert srv.publish("w.x", 2)[0] == 2  # a wildcard subscriber sees seqs go on
        assert srv.publish("a.new", 1) == (1, ack["epoch"])
        seq, epoch = srv.publish("z", 2)
        assert seq == 1 and epoch != ack["epoch"]
        # once the wildcard subscription is gone, so is the topic's numbering
        assert request(wild, {"type": "unsubscribe", "topic": "w.>", "id": 2})["type"] == "ack"
        assert wait_for(lambda: "w.x" not in store._topics, timeout=20 * SCALE)  # noqa: SLF001
        assert srv.publish("w.x", 3)[0] == 1
    finally:
        exact.close()
        wild.close()


# --------------------------------------------------------------------------- the store


def test_budget_evicts_oldest_first_across_topics() -> None:
    clock = Clock()
    msg = message_cost('"xxxxxxxx"')
    store = MemoryStore(history_size=10, max_bytes=3 * (topic_cost("t0") + msg) + 8, clock=clock)

    def publish(topic: str) -> None:
        clock.now += 1
        store.append_batch([(topic, '"xxxxxxxx"')])

    for topic in ("t0", "t1", "t2"):
        publish(topic)
    assert store.bytes_used == store.max_bytes - 8 and store.evicted == 0  # at the budget
    publish("t1")  # one message over: the oldest of all (t0's) goes
    assert [store.oldest(t) for t in ("t0", "t1", "t2")] == [0, 1, 1]
    publish("t2")  # then t1's first
    assert [store.oldest(t) for t in ("t0", "t1", "t2")] == [0, 2, 1]
    publish("t0")  # then t2's first, older than t1's second
    assert [store.oldest(t) for t in ("t0", "t1", "t2")] == [2, 2, 2]
    assert store.evicted == 3 and store.bytes_used <= store.max_bytes


def test_budget_never_evicts_the_batch_being_stored() -> None:
    store = MemoryStore(max_bytes=1000)
    big = '"%s"' % ("z" * 2000)
    assert store.append_batch([("a", big), ("b", big)]) == [(1, store.epoch), (1, store.epoch)]
    assert store.oldest("a") == 1 and store.oldest("b") == 1  # over, but acked means stored
    store.append_batch([("c", '"c"')])
    assert store.oldest("a") == 0 and store.oldest("b") == 0 and store.oldest("c") == 1


def test_forgetting_needs_no_messages_and_no_use() -> None:
    clock = Clock()
    store = MemoryStore(history_ttl=10.0, clock=clock)
    store.append_batch([("busy", "1"), ("kept", "1"), ("gone", "1")])
    epoch = store.latest("gone")[1]
    clock.now += 5
    store.append_batch([("busy", "2")])
    clock.now += 5.5
    in_use = {"kept"}
    # without in_use nothing is forgotten; trim alone never forgets
    assert store.trim() == 3
    assert len(store) == 3 and store.latest("gone") == (1, epoch)
    assert store.trim_step(limit=100, in_use=in_use.__contains__) == (0, False)
    assert store.latest("kept") == (1, epoch)
    assert store.latest("busy") == (2, epoch)
    seq, fresh = store.append_batch([("gone", "again")])[0]
    assert seq == 1 and fresh != epoch
    assert store.forgotten == 1
    # the kept topic goes once released, and not before
    assert store.trim_step(limit=100, in_use=in_use.__contains__) == (0, False)
    assert store.latest("kept") == (1, epoch)
    in_use.clear()
    store.release("kept")
    store.trim_step(limit=100, in_use=in_use.__contains__)
    assert store.latest("kept")[0] == 0


def test_wildcard_release_rechecks_kept_topics_in_steps() -> None:
    store = MemoryStore(history_size=0)
    store.append_batch([("k.%d" % i, "1") for i in range(50)])
    used = {"on": True}
    while store.trim_step(limit=10, in_use=lambda t: used["on"])[1]:
        pass
    assert len(store) == 50
    used["on"] = False
    store.release("k.>")
    steps = 0
    while store.trim_step(limit=10, in_use=lambda t: used["on"])[1]:
        steps += 1
    assert len(store) == 0 and steps >= 5
    assert store.bytes_used == 0


def test_ttl_trim_step_is_bounded_by_its_limit() -> None:
    clock = Clock()
    store = MemoryStore(history_ttl=1.0, clock=clock)
    store.append_batch([("t.%d" % i, "1") for i in range(1000)])
    clock.now += 2
    results: List[Tuple[int, bool]] = []
    while True:
        results.append(store.trim_step(limit=100, in_use=lambda t: False))
        if not results[-1][1]:
            break
    assert all(n <= 100 for n, _ in results)
    assert sum(n for n, _ in results) == 1000
    assert len(store) == 0 and store.bytes_used == 0


def test_sqlite_topic_cache_is_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_META_CACHE", 64)
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=2) as store:
        for i in range(500):
            store.append_batch([("t.%d" % i, "1")])
        assert len(store._meta) <= 64  # noqa: SLF001
        epoch = store.epoch
        # topics no longer cached go on from the table
        assert store.latest("t.0") == (1, epoch)
        assert store.append_batch([("t.1", "2"), ("t.1", "3"), ("t.1", "4")]) == [
            (2, epoch), (3, epoch), (4, epoch)]
        assert store.trim() == 2
        assert [m.seq for m in store.since("t.1", 0, 10)] == [3, 4]
        assert len(store._meta) <= 64  # noqa: SLF001


def test_sqlite_ttl_trim_runs_in_steps_and_keeps_numbering(tmp_path) -> None:
    clock = Clock()
    with SqliteStore(str(tmp_path / "h.db"), history_ttl=1.0, clock=clock) as store:
        store.append_batch([("t.%d" % (i % 300), str(i)) for i in range(600)])
        clock.now += 0.5
        store.append_batch([("t.0", "young")])
        clock.now += 0.6
        steps = []
        while True:
            steps.append(store.trim_step(limit=100))
            if not steps[-1][1]:
                break
        assert sum(n for n, _ in steps) == 600 and len(steps) >= 6
        assert [m.seq for m in store.since("t.0", 0, 10)] == [3]
        assert store.latest("t.5") == (2, store.epoch)  # SQLite keeps every topic's numbering


def test_sqlite_count_trim_step_is_bounded_by_its_limit(tmp_path) -> None:
    # a topic far past its size (a burst between two trim rounds) is trimmed in steps of
    # about ``limit`` rows, the oldest first, each step a short hold of the store's lock
    with SqliteStore(str(tmp_path / "h.db"), history_size=10) as store:
        store.append_batch([("t", str(i)) for i in range(1000)])
        store.append_batch([("u", str(i)) for i in range(15)])
        steps = []
        while True:
            steps.append(store.trim_step(limit=100))
            if not steps[-1][1]:
                break
        assert all(n <= 100 for n, _ in steps)
        assert sum(n for n, _ in steps) == 990 + 5 and len(steps) >= 10
        assert [m.seq for m in store.since("t", 0, 100)] == list(range(991, 1001))
        assert [m.seq for m in store.since("u", 0, 100)] == list(range(6, 16))
        assert store.oldest("t") == 991 and store.latest("t") == (1000, store.epoch)
        assert store.trim_step(limit=100) == (0, False)


def test_sqlite_trim_does_not_wait_for_the_hub_lock(make_server, tmp_path) -> None:
    # the SQLite store never forgets a topic, so its trim needs only its own lock: a
    # retention step goes on while the hub's lock is held (by a subscribe, a delivery)
    srv = make_server(store=str(tmp_path / "h.db"), history_size=2)
    srv.hub.publish("t", '"a"')
    srv.hub.publish("t", '"b"')
    srv.hub.publish("t", '"c"')
    done: List[Tuple[bool, float]] = []
    with srv.hub.lock:
        worker = threading.Thread(target=lambda: done.append(srv.hub.trim_step(100)), name="test-trim")
        worker.start()
        worker.join(10 * SCALE)
        assert done, "the trim step waited for the hub's lock"
    assert [m.seq for m in srv.hub.history("t", 0, 10)] == [2, 3]
