"""Publishes of several readers committed together (SqliteStore.append_deferred, the writer's STORED).

A publish is given its seq and kept in an open group; the writer writes everything appended
meanwhile in one commit before it sends any ack or delivery of it. Checked here: nothing
about a publish leaves before its commit (a reader of the file sees it when its ack
arrives); a commit that fails answers every publish of the group `unavailable` and
delivers none, and their seqs are given out again; an ack of a subscribe never names a
seq that is not stored; a group is bounded; close and trims commit it; a topic's
messages of one group are one run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any, Callable, List, Tuple

import pytest

from conftest import SCALE
from httputil import publish_ok
from wsraw import RawWS, connect, expect_pong_next, subscribe, wait_for

from wsbroadcast import store as store_mod
from wsbroadcast.errors import StoreError
from wsbroadcast.store import SqliteStore

pytestmark = pytest.mark.timeout(60)
T = 10 * SCALE
DATA = json.dumps("x" * 20)


def committed_rows(path: str, topic: str) -> List[int]:
    """last_seq of the runs of ``topic`` a separate reader of the file sees."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return [r[0] for r in conn.execute(
            "SELECT last_seq FROM runs WHERE topic = ? ORDER BY last_seq", (topic,))]
    finally:
        conn.close()


# --------------------------------------------------------------------------- the store


def test_appends_join_one_open_group_until_settled(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        out1, p1 = store.append_deferred([("a", DATA)])
        out2, p2 = store.append_deferred([("b", DATA), ("a", DATA)])
        assert out1 == [(1, store.epoch)]
        assert out2 == [(1, store.epoch), (2, store.epoch)]
        assert p1 is not None and p1 is p2  # one group
        assert committed_rows(path, "a") == []  # nothing is visible before the commit
        assert store.since("a", 0, 10) == []
        assert not store._conn().in_transaction  # nor is anything written yet
        assert p1.settle() is True
        assert p2.settle() is True  # settled once, answered again
        assert committed_rows(path, "a") == [2]  # a's two messages: one run
        assert [(m.seq, m.data) for m in store.since("a", 0, 10)] == [(1, DATA), (2, DATA)]
        assert [m.seq for m in store.since("b", 0, 10)] == [1]
        _out3, p3 = store.append_deferred([("a", DATA)])
        assert p3 is not None and p3 is not p1  # the next append opens another one
        assert p3.settle()
        assert committed_rows(path, "a") == [2, 3]


def test_latest_of_a_topic_in_the_open_group_commits_it_first(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        store.append_batch([("other", DATA)])
        _out, pending = store.append_deferred([("a", DATA)])
        assert pending is not None
        # another topic's latest is the stored one and leaves the group open
        assert store.latest("other")[0] == 1
        assert committed_rows(path, "a") == []
        # the topic's own latest names its new seq only once it is stored
        assert store.latest("a")[0] == 1
        assert committed_rows(path, "a") == [1]
        assert pending.settle()


def test_append_batch_commits_what_others_appended_before_it(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        _out, pending = store.append_deferred([("a", DATA)])
        assert store.append_batch([("b", DATA)]) == [(1, store.epoch)]
        assert committed_rows(path, "a") == [1] and committed_rows(path, "b") == [1]
        assert pending is not None and pending.settle()


def test_a_failed_commit_stores_nothing_of_the_group_and_gives_its_seqs_again(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        store.append_batch([("a", DATA)])
        out, pending = store.append_deferred([("a", DATA), ("new", DATA)])
        assert out == [(2, store.epoch), (1, store.epoch)] and pending is not None
        # the insert of a later append's run fails in the commit: all of the group goes
        store._conn().execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON runs"
                              " WHEN NEW.topic = 'bad' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        out, bad = store.append_deferred([("bad", DATA)])
        assert out == [(1, store.epoch)] and bad is pending
        assert pending.settle() is False
        assert pending.error is not None and "refused" in pending.error
        assert store.failure is not None and "refused" in store.failure
        assert not store._conn().in_transaction  # rolled back
        assert committed_rows(path, "a") == [1] and committed_rows(path, "new") == []
        assert store.latest("a")[0] == 1 and store.latest("new")[0] == 0
        # the seqs are given out again, and the next commit clears the failure
        assert store.append_batch([("a", DATA), ("new", DATA)]) == [(2, store.epoch), (1, store.epoch)]
        assert store.failure is None
        assert committed_rows(path, "a") == [1, 2] and committed_rows(path, "new") == [1]


def test_a_failed_topic_read_refuses_that_append_only(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        _out, pending = store.append_deferred([("a", DATA)])
        # a topic not cached is read from the table: make that read fail
        store._conn().execute("ALTER TABLE topics RENAME TO gone")
        with pytest.raises(StoreError, match="cannot read topics"):
            store.append_deferred([("b", DATA)])
        store._conn().execute("ALTER TABLE gone RENAME TO topics")
        assert store._group is pending  # the group is as it was
        assert pending is not None and pending.settle() is True
        assert committed_rows(path, "a") == [1] and committed_rows(path, "b") == []
        assert store.append_batch([("b", DATA)]) == [(1, store.epoch)]


def test_a_topics_messages_of_one_group_are_one_run_of_bounded_size(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_RUN_MESSAGES", 4)
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        pending = None
        for i in range(6):
            _out, pending = store.append_deferred([("a", json.dumps(i)), ("b", json.dumps(i))])
        assert pending is not None and pending.settle()
        # six appends, two topics: two runs each (4 + 2), not a row per append
        assert committed_rows(path, "a") == [4, 6] and committed_rows(path, "b") == [4, 6]
        assert [m.data for m in store.since("a", 0, 10)] == [json.dumps(i) for i in range(6)]
        assert [m.seq for m in store.since("b", 3, 10)] == [4, 5, 6]


def test_a_file_deleted_before_the_commit_fails_the_group(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        _out, pending = store.append_deferred([("a", DATA)])
        assert pending is not None
        os.unlink(path)
        assert pending.settle() is False
        assert pending.error is not None and "deleted" in pending.error
        with pytest.raises(StoreError, match="deleted"):
            store.append_deferred([("a", DATA)])


def test_the_open_group_is_bounded(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "_GROUP_APPENDS", 3)
    monkeypatch.setattr(store_mod, "_GROUP_CHARS", 100)
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        pendings = [store.append_deferred([("a", DATA)])[1] for _ in range(3)]
        # the third append reached the bound and committed: the three are stored
        assert committed_rows(path, "a") == [3]
        assert all(p is not None and p.settle() for p in pendings)
        _out, big = store.append_deferred([("a", json.dumps("y" * 99))])
        assert committed_rows(path, "a") == [3, 4]  # past the characters' bound
        _out, small = store.append_deferred([("a", DATA)])
        assert committed_rows(path, "a") == [3, 4]  # below both: left open
        assert big is not None and small is not None and small.settle()


@pytest.mark.parametrize("how", ["close", "trim"])
def test_close_and_trims_commit_the_open_group(tmp_path, how) -> None:
    path = str(tmp_path / "h.db")
    store = SqliteStore(path, history_size=1)
    try:
        store.append_batch([("a", DATA)])
        _out, pending = store.append_deferred([("a", DATA)])
        assert pending is not None
        if how == "close":
            store.close()
        else:
            store.trim()
        assert pending.settle() is True
        # (history_size 1: a trim keeps the last only)
        assert committed_rows(path, "a") == ([1, 2] if how == "close" else [2])
    finally:
        store.close()
    with SqliteStore(path) as again:
        assert again.latest("a")[0] == 2


# --------------------------------------------------------------------------- end to end


def make_sqlite_server(make_server: Any, path: str) -> Any:
    """A server on a SQLite file whose trimmer (which commits open groups) is stopped."""
    srv = make_server(store=path)
    srv._trimmer.stop(T)
    return srv


def hold_writer(srv: Any) -> Callable[[], None]:
    """Stop the writer thread at an item on its channel; returns the release."""
    gate, held = threading.Event(), threading.Event()

    def wait() -> None:
        held.set()
        gate.wait(T)

    srv.hub.writer.call(wait)
    assert held.wait(T)
    return gate.set


def publish(ws: RawWS, topic: str, data: Any, ident: Any) -> None:
    ws.send_text(json.dumps({"type": "publish", "topic": topic, "data": data, "id": ident}))


def subscriber_and_publishers(srv: Any, n: int) -> Tuple[RawWS, List[RawWS]]:
    """A subscriber of "t" and ``n`` more connections."""
    sub = connect(srv.port)
    subscribe(sub, "t")
    return sub, [connect(srv.port) for _ in range(n)]


def publish_each(srv: Any, pubs: List[RawWS]) -> None:
    """Connection i publishes i on "t" with id "p<i>"; returns once the hub took all of them."""
    for i, ws in enumerate(pubs):
        publish(ws, "t", i, "p%d" % i)
    assert wait_for(lambda: srv.hub.received == len(pubs), T)


def test_publishes_of_several_connections_are_acked_and_delivered_after_one_commit(make_server, tmp_path) -> None:
    path = str(tmp_path / "h.db")
    srv = make_sqlite_server(make_server, path)
    sub, pubs = subscriber_and_publishers(srv, 3)
    release = hold_writer(srv)
    try:
        publish_each(srv, pubs)
        # the three appends are in one open group: nothing is in the file yet
        group = srv.hub.broker.store._group
        assert group is not None and group.appends == 3
        assert committed_rows(path, "t") == []
    finally:
        release()
    seq_of = {}
    for i, ws in enumerate(pubs):
        ack = ws.recv_json(timeout=T)
        assert ack["type"] == "ack" and ack["id"] == "p%d" % i, ack
        assert committed_rows(path, "t")[-1] >= ack["seq"]  # stored before its ack left
        seq_of[i] = ack["seq"]
    got = [sub.recv_json(timeout=T) for _ in range(3)]
    # (the three readers ran in any order)
    assert [m["seq"] for m in got] == [1, 2, 3]
    assert {m["data"]: m["seq"] for m in got} == seq_of


def test_a_failed_group_commit_answers_unavailable_and_delivers_nothing(make_server, tmp_path) -> None:
    path = str(tmp_path / "h.db")
    srv = make_sqlite_server(make_server, path)
    sub, pubs = subscriber_and_publishers(srv, 2)
    release = hold_writer(srv)
    try:
        publish_each(srv, pubs)
        os.unlink(path)  # the commit will find the file gone
    finally:
        release()
    for i, ws in enumerate(pubs):
        err = ws.recv_json(timeout=T)
        assert err["type"] == "error" and err["id"] == "p%d" % i and err["code"] == "unavailable", err
        assert "deleted" in err["message"]
    expect_pong_next(sub)  # nothing was delivered before it


def test_a_subscribe_meeting_an_open_group_is_acked_with_stored_seqs_only(make_server, tmp_path) -> None:
    path = str(tmp_path / "h.db")
    srv = make_sqlite_server(make_server, path)
    pub = connect(srv.port)
    late = connect(srv.port)
    release = hold_writer(srv)
    try:
        publish(pub, "t", "one", "p1")
        assert wait_for(lambda: srv.hub.received == 1, T)
        late.send_text(json.dumps({"type": "subscribe", "topic": "t", "since": 0, "id": "s"}))
        # its ack will say seq 1: the subscribe committed it first
        assert wait_for(lambda: committed_rows(path, "t") == [1], T)
    finally:
        release()
    ack = pub.recv_json(timeout=T)
    assert ack["type"] == "ack" and ack["seq"] == 1, ack
    sack = late.recv_json(timeout=T)
    assert sack["type"] == "ack" and sack["id"] == "s" and sack["seq"] == 1, sack
    msg = late.recv_json(timeout=T)
    assert msg["type"] == "message" and msg["seq"] == 1 and msg["data"] == "one", msg
    expect_pong_next(late)  # once: the replay, not also live


def test_the_seqs_of_a_failed_group_are_given_again_with_no_gap_for_a_subscriber(make_server, tmp_path) -> None:
    path = str(tmp_path / "h.db")
    srv = make_sqlite_server(make_server, path)
    store = srv.hub.broker.store
    sub = connect(srv.port)
    subscribe(sub, "t")
    pub, bad = connect(srv.port), connect(srv.port)
    publish(pub, "t", "first", "p0")
    assert pub.recv_json(timeout=T)["seq"] == 1
    with store._wlock:  # the run holding "bad" fails in the commit, and with it its group
        store._conn().execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON runs"
                              " WHEN NEW.data LIKE '%bad%' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    release = hold_writer(srv)
    try:
        publish(pub, "t", "lost", "p1")  # seq 2, in the open group
        assert wait_for(lambda: srv.hub.received == 2, T)
        publish(bad, "t", "bad", "b1")
        assert wait_for(lambda: srv.hub.received == 3, T)
        assert store._group is not None and store._group.appends == 2
    finally:
        release()
    for ws, ident in ((pub, "p1"), (bad, "b1")):
        err = ws.recv_json(timeout=T)
        assert err["type"] == "error" and err["id"] == ident and err["code"] == "unavailable", err
    with store._wlock:
        store._conn().execute("DROP TRIGGER boom")
    publish(pub, "t", "again", "p2")
    ack = pub.recv_json(timeout=T)
    assert ack["type"] == "ack" and ack["seq"] == 2, ack  # seq 2 given again
    got = [sub.recv_json(timeout=T) for _ in range(2)]
    assert [(m["seq"], m["data"]) for m in got] == [(1, "first"), (2, "again")]
    expect_pong_next(sub)
    assert committed_rows(path, "t") == [1, 2]
    assert [m.data for m in store.since("t", 0, 10)] == ['"first"', '"again"']


def test_an_http_publish_commits_the_open_group_and_answers_at_once(make_server, tmp_path) -> None:
    path = str(tmp_path / "h.db")
    srv = make_sqlite_server(make_server, path)
    pub = connect(srv.port)
    release = hold_writer(srv)
    try:
        publish(pub, "t", "ws", "p1")
        assert wait_for(lambda: srv.hub.received == 1, T)
        assert committed_rows(path, "t") == []
        # answered while the writer is held: its own commit took the open group along
        assert publish_ok(srv.port, "t", "http")["seq"] == 2
        assert committed_rows(path, "t") == [2]  # (one run)
    finally:
        release()
    ack = pub.recv_json(timeout=T)
    assert ack["type"] == "ack" and ack["id"] == "p1" and ack["seq"] == 1, ack
