"""The SQLite store's layout: one row per run of a topic's messages appended together
(schema 2), reads and retention across and inside runs, and the migration of a file
written with one row per message (schema 1)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_startup_errors import run_serve

import wsbroadcast.store as store_module
from wsbroadcast.errors import StoreError
from wsbroadcast.store import SqliteStore, StoredMessage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_MESSAGES = getattr(store_module, "_RUN_MESSAGES", 256)
RUN_CHARS = getattr(store_module, "_RUN_CHARS", 65536)

#: texts that must come back exactly: empty, NUL, non-BMP (one code point, four UTF-8
#: bytes), combining and CJK characters, the largest code point
EDGE_TEXTS = ["", "\x00", "\U0001f600", "e\u0301\u4e2d", "\U0010ffff\x00\U0001f600", "", '"x"']


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def runs(path: str, topic: str) -> List[Tuple[int, int]]:
    """(first_seq, last_seq) of each row holding ``topic``'s messages, as the file has them."""
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return db.execute("SELECT first_seq, last_seq FROM runs WHERE topic = ? ORDER BY last_seq",
                          (topic,)).fetchall()
    finally:
        db.close()


def model_since(msgs: Sequence[StoredMessage], seq: int, limit: int,
                max_bytes: Optional[int]) -> List[StoredMessage]:
    """What since() returns: stops at ``limit``, and before the message that would take the
    UTF-8 sum past ``max_bytes`` (the first always, unless the bound is already reached)."""
    out: List[StoredMessage] = []
    left = max_bytes
    for m in msgs:
        if m.seq <= seq:
            continue
        if len(out) >= limit:
            break
        if left is not None:
            size = len(m.data.encode("utf-8"))
            if left <= 0 or (out and size > left):
                break
            left -= size
        out.append(m)
    return out


def test_a_batch_is_stored_as_one_run_per_topic_and_read_back_exactly(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=1000) as store:
        items = [("t", x) for x in EDGE_TEXTS] + [("u", "\U0001f600")] + [("t", "last")]
        items.insert(3, ("u", ""))
        store.append_batch(items)
        store.append_batch([("t", "")])  # a run of one empty text
        store.append_batch([("u", ""), ("u", "")])  # a run of empty texts only
        # a lone surrogate cannot be stored: the batch is refused whole, as before
        with pytest.raises(StoreError, match="surrogates"):
            store.append_batch([("t", "fine"), ("t", "\ud83d"), ("t", "\ude00")])
        epoch = store.epoch
    want_t = EDGE_TEXTS + ["last", ""]
    want_u = ["", "\U0001f600", "", ""]
    assert runs(path, "t") == [(1, len(EDGE_TEXTS) + 1), (len(EDGE_TEXTS) + 2,) * 2]
    assert runs(path, "u") == [(1, 2), (3, 4)]
    with SqliteStore(path, history_size=1000) as store:
        assert store.epoch == epoch
        assert [m.data for m in store.since("t", 0, 100)] == want_t
        assert [m.seq for m in store.since("t", 0, 100)] == list(range(1, len(want_t) + 1))
        assert [m.data for m in store.since("u", 0, 100)] == want_u
        assert store.latest("t") == (len(want_t), epoch)
        # the seqs of the refused batch are given again
        assert store.append_batch([("t", "again")]) == [(len(want_t) + 1, epoch)]


def test_runs_are_bounded_in_messages_and_characters(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    quarter = RUN_CHARS // 4  # four fill a run exactly (code points, not UTF-8 bytes)
    n = 2 * RUN_MESSAGES + 3
    with SqliteStore(path, history_size=100000) as store:
        store.append_batch([("exact", "1")] * RUN_MESSAGES)
        store.append_batch([("many", str(i)) for i in range(n)])
        store.append_batch([("huge", "h" * (2 * RUN_CHARS))] * 2)  # one text past the bound
        store.append_batch([("chars", "\u00e9" * quarter)] * 4)
        store.append_batch([("chars", "\u00e9" * quarter)] * 5)
        store.append_batch([("over", "o" * (quarter + 1))] * 4)
        assert runs(path, "exact") == [(1, RUN_MESSAGES)]
        assert runs(path, "many") == [(1, RUN_MESSAGES), (RUN_MESSAGES + 1, 2 * RUN_MESSAGES),
                                      (2 * RUN_MESSAGES + 1, n)]
        assert runs(path, "huge") == [(1, 1), (2, 2)]
        assert runs(path, "chars") == [(1, 4), (5, 8), (9, 9)]
        assert runs(path, "over") == [(1, 3), (4, 4)]
        assert [m.data for m in store.since("many", 0, n)] == [str(i) for i in range(n)]
        assert [len(m.data) for m in store.since("huge", 0, 10)] == [2 * RUN_CHARS] * 2
        assert [m.seq for m in store.since("chars", 2, 100)] == list(range(3, 10))
        assert {m.data for m in store.since("chars", 0, 100)} == {"\u00e9" * quarter}


def _fill_runs(store: SqliteStore) -> List[StoredMessage]:
    """Topic t in runs 1-3, 4, 5-8, 9-10 (other topics between) of texts of varied UTF-8
    sizes; returns t's messages."""
    sizes = [[3, 1, 4], [2], [1, 5, 9, 2], [6, 5]]
    clock = store._clock  # noqa: SLF001
    msgs: List[StoredMessage] = []
    for batch in sizes:
        items = [("other", "o")]
        for n in batch:
            text = "\u00e9" * n if len(msgs) % 2 else "a" * n  # 2 or 1 UTF-8 bytes a character
            items.append(("t", text))
            msgs.append(StoredMessage("t", len(msgs) + 1, text, clock()))
        items.append(("other", "o"))
        store.append_batch(items)
    return msgs


def test_since_at_and_inside_run_boundaries_with_limit_and_bytes(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=1000, clock=Clock()) as store:
        msgs = _fill_runs(store)
        assert runs(path, "t") == [(1, 3), (4, 4), (5, 8), (9, 10)]
        sums = set()
        total = 0
        for m in msgs:
            total += len(m.data.encode("utf-8"))
            sums.update((total - 1, total, total + 1))
        for seq in range(-1, 12):
            for limit in range(0, 12):
                assert store.since("t", seq, limit) == model_since(msgs, seq, limit, None), \
                    (seq, limit)
            for max_bytes in sorted(sums | {0, 1, 1000}):
                for limit in (1, 2, 5, 100):
                    assert store.since("t", seq, limit, max_bytes) == \
                        model_since(msgs, seq, limit, max_bytes), (seq, limit, max_bytes)
        # the bound reached exactly stops before an empty text too
        store.append_batch([("e", "ab"), ("e", ""), ("e", "c")])
        assert [m.data for m in store.since("e", 0, 10, max_bytes=2)] == ["ab"]
        assert [m.data for m in store.since("e", 0, 10, max_bytes=3)] == ["ab", "", "c"]
        assert store.oldest("t") == 1


def test_count_trim_cuts_inside_a_run_and_keeps_exactly_history_size(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=5, clock=Clock()) as store:
        msgs = _fill_runs(store)  # t: 1-3, 4, 5-8, 9-10
        assert store.trim() == 5 + 3  # t keeps 6-10 (8 of other: 3 go)
        assert runs(path, "t") == [(6, 8), (9, 10)]
        assert store.oldest("t") == 6
        for seq in range(0, 11):
            assert store.since("t", seq, 100) == model_since(msgs[5:], seq, 100, None)
        assert store.trim() == 0
    with SqliteStore(path, history_size=1) as store:  # smaller on reopen
        assert store.trim() == 4 + 4
        assert runs(path, "t") == [(10, 10)]
        assert store.since("t", 0, 10) == msgs[9:] and store.oldest("t") == 10


def test_a_count_trim_step_cuts_a_long_run_at_its_limit(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=2) as store:
        store.append_batch([("t", str(i)) for i in range(1, 11)])
        assert runs(path, "t") == [(1, 10)]
        seen = []
        while True:
            n, more = store.trim_step(limit=3)
            seen.append((n, runs(path, "t"), store.oldest("t")))
            if not more:
                break
        assert seen == [(3, [(4, 10)], 4), (3, [(7, 10)], 7), (2, [(9, 10)], 9)]
        assert [m.data for m in store.since("t", 0, 10)] == ["9", "10"]


def test_age_trim_removes_whole_runs_of_one_time(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    clock = Clock(100.0)
    with SqliteStore(path, history_size=1000, history_ttl=5.0, clock=clock) as store:
        store.append_batch([("a", "1"), ("b", "1"), ("a", "2"), ("a", "3")])
        clock.now = 110.0
        store.append_batch([("a", "4"), ("c", "1"), ("a", "5")])
        clock.now = 112.0
        assert store.trim() == 4
        assert runs(path, "a") == [(4, 5)] and runs(path, "b") == []
        assert [m.seq for m in store.since("a", 0, 10)] == [4, 5]
        assert store.oldest("a") == 4 and store.oldest("b") == 0
        assert store.latest("b") == (1, store.epoch)
        clock.now = 115.1
        assert store.trim() == 3
        assert store.since("a", 0, 10) == [] and store.oldest("c") == 0


def test_an_age_trim_step_removes_about_its_limit_in_whole_runs(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    clock = Clock(100.0)
    with SqliteStore(path, history_size=1000, history_ttl=5.0, clock=clock) as store:
        for _ in range(10):  # ten runs of three
            store.append_batch([("t", "x")] * 3)
        store.append_batch([("long", "y")] * 10)  # a run longer than a step's limit
        clock.now = 200.0
        steps = []
        while True:
            steps.append(store.trim_step(limit=4))
            if not steps[-1][1]:
                break
        # a step stops at the run that reaches its limit
        assert steps == [(6, True)] * 5 + [(10, False)]
        assert store.oldest("t") == 0 and store.latest("t")[0] == 30


# --------------------------------------------------------------------------- schema 1

#: the statements version 1 created its file with
V1_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta ("
    " key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS topics ("
    " topic TEXT PRIMARY KEY, epoch TEXT NOT NULL, last_seq INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS messages ("
    " topic TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL, time REAL NOT NULL,"
    " PRIMARY KEY (topic, seq))",
)
V1_EPOCH = "0123456789abcdef"


def make_v1(path: str) -> Dict[str, List[StoredMessage]]:
    """A file as version 1 left it (a row per message, rows inserted batch by batch, a
    trimmed front, a topic whose messages all expired); returns each topic's messages."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for stmt in V1_SCHEMA:
        db.execute(stmt)
    db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (V1_EPOCH,))
    db.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')")
    batches = [
        (100.0, [("a", '"a1"'), ("b", "1"), ("a", '"a2"'), ("a", '"a3"'), ("b", "2")]),
        (200.0, [("a", x) for x in EDGE_TEXTS] + [("c", "[1]")]),
        (300.0, [("big", str(i)) for i in range(RUN_MESSAGES + 10)]),
        # the characters of a run: four fill it exactly, one character more is another run
        (350.0, [("wide", "w" * (RUN_CHARS // 4))] * 4 + [("wide", "x")]),
        (400.0, [("a", "Infinity"), ("c", "[2]")]),  # as an older version may have stored
    ]
    last: Dict[str, int] = {}
    for tm, items in batches:
        db.execute("BEGIN")
        for topic, data in items:
            last[topic] = last.get(topic, 0) + 1
            db.execute("INSERT INTO messages (topic, seq, data, time) VALUES (?, ?, ?, ?)",
                       (topic, last[topic], data, tm))
        db.execute("COMMIT")
    last["gone"] = 7  # every message of it expired
    for topic, seq in last.items():
        db.execute("INSERT INTO topics (topic, epoch, last_seq) VALUES (?, ?, ?)",
                   (topic, V1_EPOCH, seq))
    db.execute("DELETE FROM messages WHERE topic = 'a' AND seq = 1")  # a count trim
    rows = db.execute("SELECT topic, seq, data, time FROM messages ORDER BY topic, seq").fetchall()
    db.close()
    want: Dict[str, List[StoredMessage]] = {t: [] for t in last}
    for topic, seq, data, tm in rows:
        want[topic].append(StoredMessage(topic, seq, "null" if data == "Infinity" else data, tm))
    return want


def schema_of(path: str) -> Tuple[str, List[str]]:
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                           " ORDER BY name")]
        return version, tables
    finally:
        db.close()


def assert_holds(store: SqliteStore, want: Dict[str, List[StoredMessage]]) -> None:
    assert store.epoch == V1_EPOCH
    for topic, msgs in want.items():
        assert store.since(topic, 0, 1000) == msgs, topic
        assert store.oldest(topic) == (msgs[0].seq if msgs else 0), topic
        if msgs:
            assert store.since(topic, msgs[0].seq, 2) == msgs[1:3], topic
    assert store.latest("gone") == (7, V1_EPOCH)
    assert store.latest("a")[0] == len(EDGE_TEXTS) + 4


@pytest.mark.parametrize("step, chars", [(3, 1 << 30), (4096, 5), (4096, 1 << 30)])
def test_a_version_1_file_is_migrated_on_a_writable_open(tmp_path, monkeypatch, step, chars) -> None:
    # rows, and characters of them, held at once
    monkeypatch.setattr(store_module, "_MIGRATE_STEP", step, raising=False)
    monkeypatch.setattr(store_module, "_MIGRATE_CHARS", chars, raising=False)
    path = str(tmp_path / "h.db")
    want = make_v1(path)
    with SqliteStore(path, history_size=100000) as store:
        assert os.path.getsize(path + "-wal") == 0  # emptied into the file after migrating
        assert_holds(store, want)
    assert schema_of(path) == ("2", ["meta", "runs", "topics"])
    if step > 100 and chars > 1000:  # one read: each batch's messages of a topic are one run
        assert runs(path, "a") == [(2, 3), (4, 3 + len(EDGE_TEXTS)), (4 + len(EDGE_TEXTS),) * 2]
        assert runs(path, "big") == [(1, RUN_MESSAGES), (RUN_MESSAGES + 1, RUN_MESSAGES + 10)]
        assert runs(path, "wide") == [(1, 4), (5, 5)]
    # reopened: nothing to migrate, the same history; numbering goes on
    clock = Clock(400.5)
    with SqliteStore(path, history_size=100000, history_ttl=150.0, clock=clock) as store:
        assert_holds(store, want)
        assert store.append_batch([("a", "next"), ("gone", "back")]) == \
            [(len(EDGE_TEXTS) + 5, V1_EPOCH), (8, V1_EPOCH)]
        # age order survived: what was stored at 100 and 200 goes, 300 and later stays
        assert store.trim() == sum(1 for ms in want.values() for m in ms if m.time < 250.5)
        assert [m.time for m in store.since("a", 0, 100)] == [400.0, 400.5]
        assert store.oldest("big") == 1 and store.oldest("b") == 0


def test_an_interrupted_migration_leaves_the_version_1_file_as_it_was(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    want = make_v1(path)
    # the migration fails at its third run (as a full disk would): its transaction is
    # rolled back whole
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(store_module._SCHEMA[2])  # noqa: SLF001
    db.execute("CREATE TRIGGER boom BEFORE INSERT ON runs WHEN (SELECT count(*) FROM runs) >= 2"
               " BEGIN SELECT RAISE(ABORT, 'boom'); END")
    db.close()
    with pytest.raises(StoreError, match="cannot migrate .* boom"):
        SqliteStore(path)
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM messages").fetchone() == \
        (sum(len(ms) for ms in want.values()),)
    db.execute("DROP TRIGGER boom")
    db.close()
    assert schema_of(path)[0] == "1"
    with SqliteStore(path, history_size=100000) as store:
        assert_holds(store, want)
    assert schema_of(path)[0] == "2"


#: a process that migrates a file three rows at a time and dies (no cleanup at all)
#: while reading its third group of rows, with runs written and nothing committed
_DIE_MIGRATING = """
import os, sys
import wsbroadcast.store as store
store._MIGRATE_STEP = 3
real, calls = store.runs_of_messages, []
def dying(rows):
    calls.append(1)
    if len(calls) == 3:
        os._exit(9)
    return real(rows)
store.runs_of_messages = dying
store.SqliteStore(sys.argv[1])
"""


def test_a_process_dying_mid_migration_loses_nothing(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    want = make_v1(path)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", _DIE_MIGRATING, path], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert schema_of(path) == ("1", ["messages", "meta", "topics"])
    with SqliteStore(path, history_size=100000) as store:  # its lock is stale: taken over
        assert_holds(store, want)
    assert schema_of(path) == ("2", ["meta", "runs", "topics"])

def test_a_read_only_version_1_file_is_read_as_it_is(tmp_path, caplog) -> None:
    path = str(tmp_path / "h.db")
    want = make_v1(path)
    with SqliteStore("file:%s?mode=ro" % path) as store:
        assert store.read_only
        assert_holds(store, want)
        with pytest.raises(StoreError, match="read-only"):
            store.append_batch([("a", "1")])
        assert store.trim() == 0
    assert "open it writable once to migrate it" in caplog.text
    assert schema_of(path) == ("1", ["messages", "meta", "topics"])
    with SqliteStore(path) as store:  # then writable: migrated
        assert_holds(store, want)
    assert schema_of(path)[0] == "2"


def test_a_file_of_a_newer_schema_is_refused(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        store.append_batch([("t", "1")])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    db.close()
    for spec in (path, "file:%s?mode=ro" % path, path):  # the lock was given back
        with pytest.raises(StoreError, match="schema version 3, which this wsbroadcast does not"):
            SqliteStore(spec)
    assert schema_of(path)[0] == "3"
    done = run_serve(tmp_path, "--port", "0", "--store", path)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "schema version 3" in lines[0] and "Traceback" not in lines[0], \
        done.stderr



# --------------------------------------------------------------------------- model

_TOPICS = ("a", "b")
_op = st.one_of(
    st.tuples(
        st.just("append"),
        st.floats(min_value=0, max_value=5, allow_nan=False),
        # (NaN would be read back as null: see test_json_limits)
        st.lists(st.tuples(st.sampled_from(_TOPICS), st.text(max_size=3).filter(lambda t: t != "NaN")),
                 max_size=8),
    ),
    st.tuples(st.just("trim"), st.floats(min_value=0, max_value=5, allow_nan=False),
              st.integers(min_value=1, max_value=4)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history_size=st.integers(min_value=0, max_value=6),
    history_ttl=st.one_of(st.none(), st.floats(min_value=0, max_value=8, allow_nan=False)),
    ops=st.lists(_op, max_size=20),
    probes=st.lists(st.tuples(st.integers(min_value=-1, max_value=40),
                              st.integers(min_value=0, max_value=9),
                              st.one_of(st.none(), st.integers(min_value=0, max_value=12))),
                    max_size=6),
)
def test_sqlite_runs_match_a_list_model(history_size, history_ttl, ops, probes) -> None:
    """Batches, trims in steps of a few messages (cutting runs) and reads against a list
    per topic; the rows are runs of consecutive seqs that hold exactly what is kept."""
    clock = Clock(0.0)
    model: Dict[str, List[StoredMessage]] = {t: [] for t in _TOPICS}
    last = dict.fromkeys(_TOPICS, 0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "h.db")
        with SqliteStore(path, history_size, history_ttl, clock=clock) as store:

            def check() -> None:
                for topic in _TOPICS:
                    kept = model[topic]
                    assert store.latest(topic)[0] == last[topic]
                    assert store.oldest(topic) == (kept[0].seq if kept else 0)
                    assert store.since(topic, 0, 1000) == kept
                    stored = runs(path, topic)
                    assert [s for first, end in stored for s in range(first, end + 1)] == \
                        [m.seq for m in kept]
                    assert all(end - first < RUN_MESSAGES for first, end in stored)
                    for seq, limit, max_bytes in probes:
                        assert store.since(topic, seq, limit, max_bytes) == \
                            model_since(kept, seq, limit, max_bytes), (topic, seq, limit, max_bytes)

            for name, dt, arg in ops:
                clock.now += dt
                if name == "append":
                    for topic, data in arg:
                        last[topic] += 1
                        if history_size:
                            model[topic].append(StoredMessage(topic, last[topic], data, clock.now))
                    store.append_batch(arg)
                else:
                    before = sum(map(len, model.values()))
                    for topic in _TOPICS:
                        model[topic] = [
                            m for m in model[topic] if m.seq > last[topic] - history_size
                            and (history_ttl is None or m.time >= clock.now - history_ttl)
                        ]
                    removed = 0
                    while True:
                        n, more = store.trim_step(limit=arg)
                        removed += n
                        if not more:
                            break
                    assert removed == before - sum(map(len, model.values()))
                check()


def test_rows_an_older_version_added_to_a_schema_2_file_are_taken_in(tmp_path) -> None:
    """Version 1 did not check the schema: run on a file of schema 2 it made its table
    again and added a row per message, numbered on from the topics table."""
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=100) as store:
        store.append_batch([("t", "1"), ("t", "2")])
        epoch = store.epoch
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(V1_SCHEMA[2])
    db.execute("INSERT INTO messages (topic, seq, data, time) VALUES ('t', 3, '3', 5.0)")
    db.execute("INSERT INTO messages (topic, seq, data, time) VALUES ('t', 4, '4', 5.0)")
    db.execute("UPDATE topics SET last_seq = 4 WHERE topic = 't'")
    db.close()
    with SqliteStore(path, history_size=100) as store:
        assert [(m.seq, m.data) for m in store.since("t", 0, 10)] == \
            [(1, "1"), (2, "2"), (3, "3"), (4, "4")]
        assert store.latest("t") == (4, epoch) and store.oldest("t") == 1
    assert schema_of(path) == ("2", ["meta", "runs", "topics"])
    assert runs(path, "t") == [(1, 2), (3, 4)]


def test_a_count_trim_step_stops_before_a_run_it_would_cut(tmp_path) -> None:
    # a run that goes whole later is not rewritten now: the step ends before it
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=1) as store:
        for first in (1, 4, 7):
            store.append_batch([("t", str(seq)) for seq in range(first, first + 3)])
        seen = []
        while True:
            n, more = store.trim_step(limit=4)
            seen.append((n, more, runs(path, "t")))
            if not more:
                break
        assert seen == [(3, True, [(4, 6), (7, 9)]), (4, True, [(8, 9)]), (1, False, [(9, 9)])]
        assert [m.data for m in store.since("t", 0, 10)] == ["9"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("lens, data, count", [
    (b"", "", 0),  # a damaged row: last_seq below first_seq, no lengths
    (None, "a", 0),
    (b"\x01\x00\x00\x00", "a", 2),
    (b"\x01\x00\x00", "a", 1),  # not a whole length
    (b"\x01\x00\x00\x00\x01\x00\x00\x00", "abc", 2),
])
def test_a_run_whose_lengths_do_not_match_is_a_value_error(lens, data, count):
    with pytest.raises(ValueError):
        store_module.unpack_run(lens, data, count)
