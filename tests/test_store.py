"""Tests of wsbroadcast.store: the same interface tests against MemoryStore and SqliteStore."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SCALE
from serverproc import without_file_permission_override

from wsbroadcast.errors import StoreError
from wsbroadcast.store import (
    MemoryStore,
    MessageStore,
    RetentionTrimmer,
    SqliteStore,
    StoredMessage,
    open_store,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    """A settable clock for the stores' ``clock`` argument."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Factory = Callable[..., MessageStore]


@pytest.fixture(params=["memory", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_store(kind: str, tmp_path) -> Factory:
    """Return ``make(history_size=..., history_ttl=..., clock=...)`` for the current kind.

    For sqlite every call opens the same file, so a second call is a reopen.
    """
    opened: List[MessageStore] = []

    def make(**kwargs) -> MessageStore:
        if kind == "memory":
            store: MessageStore = MemoryStore(**kwargs)
        else:
            store = SqliteStore(str(tmp_path / "history.db"), **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def seqs(messages: List[StoredMessage]) -> List[int]:
    return [m.seq for m in messages]


# --------------------------------------------------------------------------- interface


def test_seq_numbering_per_topic(make_store: Factory) -> None:
    store = make_store()
    n, epoch = store.latest("a")
    assert n == 0 and isinstance(epoch, str) and epoch
    assert store.append_batch([]) == []
    out = store.append_batch([("a", "1"), ("b", "2"), ("a", "3"), ("c", "4"), ("a", "5")])
    assert [s for s, _ in out] == [1, 1, 2, 1, 3]
    assert all(e == epoch for _, e in out)
    out = store.append_batch([("b", "6"), ("a", "7")])
    assert [s for s, _ in out] == [2, 4]
    assert store.latest("a") == (4, epoch)
    assert store.latest("b") == (2, epoch)
    assert store.latest("c") == (1, epoch)
    assert store.latest("never") == (0, epoch)


def test_since_ranges_and_limits(make_store: Factory) -> None:
    clock = FakeClock(1234.5)
    store = make_store(clock=clock)
    values = [1, "two", {"x": [3]}, None, "\u00e9\u4e2d\U0001f600", 6.5, [], True, "", 10]
    payloads = [json.dumps(v, ensure_ascii=False) for v in values]
    store.append_batch([("t", p) for p in payloads[:4]])
    store.append_batch([("other", "0")])
    store.append_batch([("t", p) for p in payloads[4:]])

    everything = store.since("t", 0, 100)
    assert seqs(everything) == list(range(1, 11))
    assert [m.data for m in everything] == payloads  # verbatim
    assert all(m.topic == "t" and m.time == 1234.5 for m in everything)
    assert all(isinstance(m, StoredMessage) for m in everything)

    assert seqs(store.since("t", 3, 2)) == [4, 5]
    assert seqs(store.since("t", 3, 100)) == list(range(4, 11))
    assert seqs(store.since("t", 0, 1)) == [1]
    assert seqs(store.since("t", 9, 100)) == [10]
    assert store.since("t", 10, 100) == []
    assert store.since("t", 50, 100) == []
    assert store.since("t", 0, 0) == []
    assert store.since("t", 0, -1) == []
    assert seqs(store.since("t", -5, 3)) == [1, 2, 3]
    assert store.since("nothing", 0, 100) == []
    assert seqs(store.since("other", 0, 100)) == [1]
    assert store.oldest("t") == 1
    assert store.oldest("nothing") == 0


def test_since_bounded_by_bytes(make_store: Factory) -> None:
    """A page stops before the message that would take its data past max_bytes; never empty."""
    store = make_store()
    # data sizes in UTF-8 bytes: 10, 20, 30, 40; the third is non-ASCII (8 x 3-byte chars)
    payloads = ['"%s"' % ("a" * 8), '"%s"' % ("b" * 18), '"%s"' % ("\u4e2d" * 8 + "cccc"),
                '"%s"' % ("d" * 38)]
    assert [len(p.encode("utf-8")) for p in payloads] == [10, 20, 30, 40]
    store.append_batch([("t", p) for p in payloads])

    def page(since: int, max_bytes, limit: int = 100) -> List[int]:
        return seqs(store.since("t", since, limit, max_bytes))

    assert page(0, None) == [1, 2, 3, 4]
    assert page(0, 100) == [1, 2, 3, 4]  # exactly at the bound
    assert page(0, 99) == [1, 2, 3]  # one byte short
    assert page(0, 60) == [1, 2, 3]  # counts bytes, not characters (the third is 14 chars)
    assert page(0, 59) == [1, 2]
    assert page(0, 30) == [1, 2] and page(0, 29) == [1]
    assert page(1, 1) == [2]  # one message larger than the bound still comes, alone
    assert page(3, 1) == [4] and page(4, 1) == []
    assert page(0, 100, limit=2) == [1, 2]  # the count limit still applies
    assert [m.data for m in store.since("t", 0, 100, 60)] == payloads[:3]  # verbatim


def test_epoch_is_stable(make_store: Factory) -> None:
    store = make_store()
    _, before = store.latest("fresh")
    assert store.latest("fresh") == (0, before)
    [(seq, epoch)] = store.append_batch([("fresh", "1")])
    assert (seq, epoch) == (1, before)
    store.trim(now=1e12)
    assert store.latest("fresh") == (1, before)


def test_sqlite_reopen_continues_seqs_with_same_epoch(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        store.append_batch([("a", "1"), ("a", "2"), ("b", "3")])
        _, epoch = store.latest("a")
        _, fresh_epoch = store.latest("never")
    with SqliteStore(path) as store:
        assert store.latest("a") == (2, epoch)
        assert store.latest("b") == (1, epoch)
        assert store.latest("never") == (0, fresh_epoch)
        assert store.append_batch([("a", "4"), ("never", "5")]) == [(3, epoch), (1, fresh_epoch)]
        assert [m.data for m in store.since("a", 0, 10)] == ["1", "2", "4"]


def test_memory_new_instance_gets_new_epoch() -> None:
    one, two = MemoryStore(), MemoryStore()
    one.append_batch([("a", "1")])
    assert one.latest("a")[1] != two.latest("a")[1]
    assert two.latest("a") == (0, two.latest("a")[1])


def test_retention_by_count_boundary(make_store: Factory) -> None:
    store = make_store(history_size=5)
    store.append_batch([("t", str(i)) for i in range(1, 6)])  # exactly 5
    store.trim()
    assert seqs(store.since("t", 0, 100)) == [1, 2, 3, 4, 5]
    assert store.oldest("t") == 1

    store.append_batch([("t", "6")])  # 6 > 5: the oldest goes
    store.trim()
    assert seqs(store.since("t", 0, 100)) == [2, 3, 4, 5, 6]
    assert store.oldest("t") == 2
    assert store.latest("t")[0] == 6

    store.append_batch([("t", str(i)) for i in range(7, 20)] + [("u", "x")])  # one big batch
    store.trim()
    assert seqs(store.since("t", 0, 100)) == [15, 16, 17, 18, 19]
    assert store.oldest("t") == 15
    assert seqs(store.since("u", 0, 100)) == [1]
    assert store.trim() == 0


def test_sqlite_trim_counts_removed_rows(tmp_path) -> None:
    with SqliteStore(str(tmp_path / "h.db"), history_size=3) as store:
        store.append_batch([("a", str(i)) for i in range(4)] + [("b", str(i)) for i in range(5)])
        assert store.trim() == 1 + 2
        assert store.trim() == 0
        assert store.oldest("a") == 2 and store.oldest("b") == 3


def test_sqlite_lower_history_size_on_reopen(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=10) as store:
        store.append_batch([("a", str(i)) for i in range(10)])
    with SqliteStore(path, history_size=3) as store:
        assert store.trim() == 7
        assert seqs(store.since("a", 0, 100)) == [8, 9, 10]


def test_retention_by_age(make_store: Factory) -> None:
    clock = FakeClock(100.0)
    store = make_store(history_size=100, history_ttl=50.0, clock=clock)
    store.append_batch([("t", "a"), ("t", "b"), ("t", "c"), ("u", "x")])
    clock.now = 200.0
    store.append_batch([("t", "d"), ("t", "e")])

    assert store.trim(now=150.0) == 0  # age 50 is not older than 50
    assert store.oldest("t") == 1
    assert store.trim(now=150.5) == 4  # the three t messages and u's one from t=100
    assert store.oldest("t") == 4
    assert store.oldest("u") == 0
    assert store.since("u", 0, 10) == []
    assert seqs(store.since("t", 0, 10)) == [4, 5]
    assert store.latest("u")[0] == 1

    assert store.trim(now=250.0) == 0
    assert store.trim(now=250.5) == 2
    assert store.oldest("t") == 0
    assert store.since("t", 0, 10) == []
    # seqs go on after everything expired
    clock.now = 300.0
    assert [s for s, _ in store.append_batch([("t", "f"), ("u", "y")])] == [6, 2]
    assert store.oldest("t") == 6


def test_trim_without_now_uses_clock(make_store: Factory) -> None:
    clock = FakeClock(100.0)
    store = make_store(history_ttl=10.0, clock=clock)
    store.append_batch([("t", "1")])
    clock.now = 110.0
    assert store.trim() == 0
    clock.now = 110.5
    assert store.trim() == 1
    assert store.oldest("t") == 0


def test_history_size_zero_keeps_counting(make_store: Factory) -> None:
    store = make_store(history_size=0)
    assert [s for s, _ in store.append_batch([("t", "1"), ("t", "2")])] == [1, 2]
    assert [s for s, _ in store.append_batch([("t", "3")])] == [3]
    assert store.since("t", 0, 10) == []
    assert store.oldest("t") == 0
    assert store.trim() == 0
    assert store.latest("t")[0] == 3


def test_sqlite_history_size_zero_survives_reopen(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=0) as store:
        store.append_batch([("t", "1"), ("t", "2")])
        epoch = store.latest("t")[1]
    with SqliteStore(path, history_size=0) as store:
        assert store.latest("t") == (2, epoch)
        assert store.append_batch([("t", "3")]) == [(3, epoch)]


def test_bad_items_are_refused_without_effect(make_store: Factory) -> None:
    store = make_store()
    store.append_batch([("t", "1")])
    with pytest.raises(StoreError):
        store.append_batch([("t", "2"), ("t", 3)])  # type: ignore[list-item]
    with pytest.raises(StoreError):
        store.append_batch([("t", "2"), ("t",)])  # type: ignore[list-item]
    assert store.latest("t")[0] == 1
    assert seqs(store.since("t", 0, 10)) == [1]
    assert [s for s, _ in store.append_batch([("t", "2")])] == [2]


def test_closed_store_refuses(make_store: Factory) -> None:
    store = make_store()
    store.append_batch([("t", "1")])
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        store.append_batch([("t", "2")])
    with pytest.raises(StoreError):
        store.since("t", 0, 10)
    with pytest.raises(StoreError):
        store.oldest("t")
    assert store.trim() == 0


def test_bad_retention_settings() -> None:
    with pytest.raises(ValueError):
        MemoryStore(history_size=-1)
    with pytest.raises(ValueError):
        MemoryStore(history_ttl=-1.0)


# --------------------------------------------------------------------------- sqlite failures
#
# The tests run as root, where chmod does not stop writes. Writes are made to fail
# for real instead: by SQLite itself refusing them (a connection opened with the URI
# parameter mode=ro, a trigger that ABORTs, PRAGMA max_page_count making the file
# "full" with SQLITE_FULL, the same error as a full disk), and, where setpriv exists,
# by a child process without CAP_DAC_OVERRIDE for which chmod 444 is binding.


def _fill(store: SqliteStore) -> str:
    store.append_batch([("t", "1"), ("t", "2"), ("u", "1")])
    return store.latest("t")[1]


def _assert_unchanged_then_recovers(store: SqliteStore, epoch: str) -> None:
    assert store.latest("t") == (2, epoch)
    assert store.latest("u") == (1, epoch)
    assert store.latest("new")[0] == 0
    assert seqs(store.since("t", 0, 10)) == [1, 2]
    assert store.since("new", 0, 10) == []
    assert store.oldest("t") == 1
    # the failed call's seqs are reused
    out = store.append_batch([("t", "3"), ("new", "1"), ("t", "4")])
    assert out == [(3, epoch), (1, epoch), (4, epoch)]
    assert [m.data for m in store.since("t", 0, 10)] == ["1", "2", "3", "4"]


def test_sqlite_failure_mid_batch_is_all_or_nothing(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        epoch = _fill(store)
        # A second connection adds a trigger that aborts the INSERT of one row (a run of
        # topic new); the run of t before it in the same executemany was already written.
        other = sqlite3.connect(path)
        other.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON runs WHEN instr(NEW.data, 'boom')"
            " BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
        other.commit()
        with pytest.raises(StoreError, match="boom"):
            store.append_batch([("t", "3"), ("new", "1"), ("new", "boom"), ("t", "5")])
        # a fresh connection sees nothing of the failed batch either
        assert other.execute("SELECT MAX(last_seq) FROM runs WHERE topic = 't'").fetchone() == (2,)
        assert other.execute("SELECT last_seq FROM topics WHERE topic = 't'").fetchone() == (2,)
        assert other.execute("SELECT COUNT(*) FROM topics WHERE topic = 'new'").fetchone() == (0,)
        other.execute("DROP TRIGGER boom")
        other.commit()
        other.close()
        _assert_unchanged_then_recovers(store, epoch)


def test_sqlite_disk_full_is_store_error(tmp_path) -> None:
    with SqliteStore(str(tmp_path / "h.db")) as store:
        epoch = _fill(store)
        # Reaching into the writer connection is the only way to set a per-connection
        # limit; it makes SQLite fail with SQLITE_FULL exactly as a full disk does.
        writer = store._writer  # noqa: SLF001
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute("PRAGMA max_page_count = %d" % pages)
        big = json.dumps("x" * 20000)
        with pytest.raises(StoreError, match="full"):
            store.append_batch([("t", big), ("new", big), ("t", big)])
        assert store.read_only is False
        writer.execute("PRAGMA max_page_count = 1073741823")
        _assert_unchanged_then_recovers(store, epoch)


def test_sqlite_read_only_uri(tmp_path) -> None:
    path = tmp_path / "h.db"
    with SqliteStore(str(path), history_size=1) as store:
        epoch = _fill(store)
    with SqliteStore("file:%s?mode=ro" % path, history_size=1) as store:
        assert store.read_only is True
        assert store.latest("t") == (2, epoch)
        assert seqs(store.since("t", 0, 10)) == [1, 2]
        with pytest.raises(StoreError):
            store.append_batch([("t", "3")])
        assert store.trim() == 0  # nothing can be removed; no error either
        assert store.latest("t") == (2, epoch)
        assert seqs(store.since("t", 0, 10)) == [1, 2]
        assert store.oldest("t") == 1


def test_sqlite_missing_directory_is_store_error(tmp_path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(str(tmp_path / "no" / "such" / "dir" / "h.db"))


def test_sqlite_not_a_database_is_store_error(tmp_path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(StoreError):
        SqliteStore(str(path))


_CHMOD_CHILD = r"""
import sys
from wsbroadcast.errors import StoreError
from wsbroadcast.store import SqliteStore
store = SqliteStore(sys.argv[1])
assert store.read_only, "expected a read-only store"
assert store.latest("t")[0] == 2, store.latest("t")
assert [m.seq for m in store.since("t", 0, 10)] == [1, 2]
try:
    store.append_batch([("t", "3")])
except StoreError:
    pass
else:
    raise AssertionError("append on a read-only file did not fail")
assert store.latest("t")[0] == 2
assert [m.seq for m in store.since("t", 0, 10)] == [1, 2]
store.close()
print("ok")
"""


def test_sqlite_chmod_read_only_file(tmp_path) -> None:
    path = tmp_path / "h.db"
    with SqliteStore(str(path)) as store:
        _fill(store)
    for name in ("h.db-wal", "h.db-shm"):  # normally removed by the last close already
        if (tmp_path / name).exists():
            os.remove(tmp_path / name)
    os.chmod(path, 0o444)
    prefix = without_file_permission_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: chmod cannot stop writes")
    cmd = prefix + [sys.executable, "-c", _CHMOD_CHILD, str(path)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_sqlite_in_memory_database() -> None:
    with SqliteStore(":memory:", history_size=2) as store:
        store.append_batch([("t", "1"), ("t", "2"), ("t", "3")])
        assert store.trim() == 1
        assert seqs(store.since("t", 0, 10)) == [2, 3]
        assert store.oldest("t") == 2


# --------------------------------------------------------------------------- concurrency


@pytest.mark.timeout(120)
@pytest.mark.parametrize("history_size", [100000, 25])
def test_concurrent_since_never_sees_gap_or_torn_batch(make_store: Factory, history_size: int) -> None:
    """Readers and a trimmer run against a stream of batches.

    Every item's data is ``[batch, index, batch_len]``. A reader must see consecutive
    seqs, and the newest message it sees must end its batch (a batch is visible whole
    or not at all). Without trimming, reading on from the last seen seq must continue
    at exactly the next seq.
    """
    store = make_store(history_size=history_size)
    batches = 400
    done = threading.Event()
    errors: List[str] = []

    def writer() -> None:
        try:
            for b in range(batches):
                n = 1 + (b * 7) % 9
                items = [("t", json.dumps([b, i, n])) for i in range(n)]
                items.insert(b % (n + 1), ("u", json.dumps([b, 0, 1])))
                store.append_batch(items)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append("writer: %r" % exc)
        finally:
            done.set()

    def check(msgs: List[StoredMessage], after: Optional[int]) -> None:
        if not msgs:
            return
        got = seqs(msgs)
        if got != list(range(got[0], got[0] + len(got))):
            errors.append("gap: %r" % got)
        if after is not None and history_size > batches * 10 and got[0] != after + 1:
            errors.append("did not continue at %d: %r" % (after + 1, got[:3]))
        b, i, n = json.loads(msgs[-1].data)
        if i != n - 1:
            errors.append("torn batch %d: ends at %d of %d" % (b, i, n))

    def reader() -> None:
        # (latest() is not called here: it belongs to the one appending thread.)
        last = last_oldest = 0
        try:
            while not errors:
                finished = done.is_set()
                check(store.since("t", 0, 1000000), None)
                more = store.since("t", last, 1000000)
                check(more, last)
                if more:
                    last = more[-1].seq
                oldest = store.oldest("t")  # trimming only ever moves it forward
                if oldest < last_oldest:
                    errors.append("oldest went back from %d to %d" % (last_oldest, oldest))
                last_oldest = oldest
                if finished:
                    break
        except Exception as exc:  # pragma: no cover - reported below
            errors.append("reader: %r" % exc)

    def trimmer() -> None:
        try:
            while not errors and not done.is_set():
                store.trim()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append("trimmer: %r" % exc)

    threads = [threading.Thread(target=f) for f in (reader, reader, trimmer, writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    total = sum(1 + (b * 7) % 9 for b in range(batches))
    assert store.latest("t")[0] == total
    assert store.latest("u")[0] == batches
    store.trim()
    kept = seqs(store.since("t", 0, 1000000))
    assert kept == list(range(max(1, total - history_size + 1), total + 1))


# --------------------------------------------------------------------------- trimmer


class _FakeStore:
    def __init__(self, fail_first: int, wanted: int) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.wanted = wanted
        self.reached = threading.Event()
        self.threads: List[threading.Thread] = []

    def checkpoint(self) -> None:
        pass

    def trim(self, now: Optional[float] = None) -> int:
        self.calls += 1
        self.threads.append(threading.current_thread())
        if self.calls >= self.wanted:
            self.reached.set()
        if self.calls <= self.fail_first:
            raise StoreError("disk on fire")
        return 0


@pytest.mark.timeout(30)
def test_trimmer_survives_exceptions_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    fake = _FakeStore(fail_first=3, wanted=5)
    trimmer = RetentionTrimmer(fake, interval=0.001)  # type: ignore[arg-type]
    trimmer.start()
    trimmer.start()  # a second start is ignored
    assert fake.reached.wait(20)
    trimmer.stop()
    thread = fake.threads[0]
    assert thread.name == "wsbroadcast-trimmer"
    assert thread.daemon
    assert not thread.is_alive()
    assert all(t is thread for t in fake.threads)
    assert "retention trim failed" in caplog.text
    calls = fake.calls
    trimmer.stop()  # idempotent
    assert fake.calls == calls


@pytest.mark.timeout(30)
def test_trimmer_trims_a_real_store(tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "h.db"), history_size=2)
    store.append_batch([("t", str(i)) for i in range(10)])
    trimmed = threading.Event()
    real_trim = store.trim

    def trim(now: Optional[float] = None) -> int:
        removed = real_trim(now)
        if removed:
            trimmed.set()
        return removed

    store.trim = trim  # type: ignore[method-assign]
    trimmer = RetentionTrimmer(store, interval=0.001)
    trimmer.start()
    try:
        assert trimmed.wait(20)
    finally:
        trimmer.stop()
        store.close()
    with SqliteStore(str(tmp_path / "h.db"), history_size=2) as again:
        assert seqs(again.since("t", 0, 100)) == [9, 10]


def test_trimmer_stop_before_start() -> None:
    RetentionTrimmer(MemoryStore()).stop()


# --------------------------------------------------------------------------- open_store


def test_open_store(tmp_path) -> None:
    mem = open_store("memory", 7, 3.5)
    assert isinstance(mem, MemoryStore)
    assert (mem.history_size, mem.history_ttl) == (7, 3.5)
    mem.close()
    sql = open_store(str(tmp_path / "x.db"), 0, None)
    assert isinstance(sql, SqliteStore)
    assert (sql.history_size, sql.history_ttl, sql.full_sync) == (0, None, False)
    sql.close()
    sql = open_store(str(tmp_path / "y.db"), 5, None, full_sync=True)
    assert sql.full_sync is True
    assert sql._writer.execute("PRAGMA synchronous").fetchone() == (2,)  # noqa: SLF001 FULL
    assert sql._writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # noqa: SLF001
    sql.close()


# --------------------------------------------------------------------------- model check

_TOPICS = ["a", "b", "c"]

_op = st.one_of(
    st.tuples(
        st.just("append"),
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.lists(st.tuples(st.sampled_from(_TOPICS), st.text(max_size=3)), max_size=6),
    ),
    st.tuples(st.just("trim"), st.floats(min_value=0, max_value=5, allow_nan=False), st.just([])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history_size=st.integers(min_value=0, max_value=5),
    history_ttl=st.one_of(st.none(), st.floats(min_value=0, max_value=8, allow_nan=False)),
    ops=st.lists(_op, max_size=25),
    probe=st.tuples(st.integers(min_value=-1, max_value=30), st.integers(min_value=0, max_value=8)),
)
def test_memory_store_matches_list_model(
    history_size: int,
    history_ttl: Optional[float],
    ops: List[Tuple[str, float, List[Tuple[str, str]]]],
    probe: Tuple[int, int],
) -> None:
    clock = FakeClock(0.0)
    store = MemoryStore(history_size, history_ttl, clock=clock)
    model: Dict[str, List[Tuple[int, str, float]]] = {t: [] for t in _TOPICS}
    last: Dict[str, int] = dict.fromkeys(_TOPICS, 0)
    epoch = store.latest("a")[1]

    for name, dt, items in ops:
        clock.now += dt
        if name == "append":
            expected = []
            for topic, data in items:
                last[topic] += 1
                expected.append((last[topic], epoch))
                model[topic].append((last[topic], data, clock.now))
                if len(model[topic]) > history_size:  # the ring drops the oldest at once
                    del model[topic][: len(model[topic]) - history_size]
            assert store.append_batch(items) == expected
        else:
            before = sum(len(v) for v in model.values())
            if history_ttl is not None:
                for topic in _TOPICS:
                    model[topic] = [m for m in model[topic] if m[2] >= clock.now - history_ttl]
            assert store.trim(now=clock.now) == before - sum(len(v) for v in model.values())
        for topic in _TOPICS:
            kept = model[topic]
            assert store.latest(topic) == (last[topic], epoch)
            assert store.oldest(topic) == (kept[0][0] if kept else 0)
            assert [(m.seq, m.data, m.time) for m in store.since(topic, 0, 1000)] == kept
    since, limit = probe
    for topic in _TOPICS:
        want = [m for m in model[topic] if m[0] > since][:limit]
        assert [(m.seq, m.data, m.time) for m in store.since(topic, since, limit)] == want


def test_sqlite_commits_leave_checkpoints_to_checkpoint(tmp_path) -> None:
    # a publish's commit does not copy the WAL into the database file (SQLite's default
    # does it in the commit that passes 1000 WAL pages, an fsync and a page copy on the
    # publish path): checkpoint(), called by the trimmer thread, does
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=100000) as store:
        base = os.path.getsize(path)
        for _ in range(1500):  # a commit each: well over 1000 WAL pages
            store.append_batch([("t", '"%s"' % ("x" * 300))])
        assert os.path.getsize(path) == base
        store.checkpoint()
        assert os.path.getsize(path) > base + 400_000
        assert len(store.since("t", 0, 2000)) == 1500 and store.latest("t")[0] == 1500


def test_retention_trimmer_checkpoints_the_sqlite_store(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path, history_size=100000) as store:
        base = os.path.getsize(path)
        for _ in range(1500):
            store.append_batch([("t", '"%s"' % ("x" * 300))])
        assert os.path.getsize(path) == base
        trimmer = RetentionTrimmer(store, interval=0.02)
        trimmer.start()
        try:
            deadline = time.monotonic() + 20 * SCALE
            while os.path.getsize(path) <= base + 400_000 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            trimmer.stop(10)
        assert os.path.getsize(path) > base + 400_000
