"""A store that fails or is shared, seen from outside: `python -m wsbroadcast serve` processes.

A store that cannot be opened, or is locked by another server, or whose port is taken,
is one line on stderr and exit 2, with nothing written to the store. A store that
cannot take publishes (read-only, deleted or replaced while running, full) refuses
them with `unavailable`, `/healthz` answers 503 degraded with the reason, and the log
does not repeat a line per refused publish.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
from typing import Any, List, Tuple

import pytest

import wsraw
from conftest import SCALE
from serverproc import ServerProcess, run_serve, without_file_permission_override

from wsbroadcast.errors import StoreError
from wsbroadcast.logutil import RateLimitedLog
from wsbroadcast.store import SqliteStore, open_store

TOPIC = "store.t"
T = 10 * SCALE


def healthz(port: int) -> Tuple[int, dict]:
    status, _headers, body = wsraw.http_request(
        port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", T)
    return status, json.loads(body)


def publish_ws(ws: wsraw.RawWS, n: int, first_id: int = 1) -> List[dict]:
    """Publish n messages with ids and return the n answers (acks or errors)."""
    ws.send_texts(*(json.dumps({"type": "publish", "topic": TOPIC, "data": i, "id": i})
                    for i in range(first_id, first_id + n)))
    return [ws.recv_json(timeout=T) for _ in range(n)]


def assert_one_line_exit_2(done: Any) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("wsbroadcast serve: "), lines
    return lines[0]


def error_lines(proc: ServerProcess) -> List[str]:
    return [line for line in proc.lines if " ERROR " in line]


def make_store_file(path: str) -> str:
    with SqliteStore(path) as store:
        store.append_batch([(TOPIC, '"kept-1"'), (TOPIC, '"kept-2"')])
        return store.latest(TOPIC)[1]


# --------------------------------------------------------------------------- start-up


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["not a database", "missing directory"])
def test_store_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path, case) -> None:
    if case == "not a database":
        path = tmp_path / "wsbroadcast.db"
        path.write_bytes(b"this is not an sqlite file" * 100)
    else:
        path = tmp_path / "no" / "such" / "wsbroadcast.db"
    before = sorted(os.listdir(tmp_path))
    line = assert_one_line_exit_2(run_serve("--store", str(path)))
    assert str(path) in line, line
    if case == "missing directory":
        assert "does not exist" in line, line
    assert sorted(os.listdir(tmp_path)) == before  # nothing made beside it (no lock file)


@pytest.mark.timeout(60)
def test_port_in_use_is_one_line_and_touches_no_store(tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        line = assert_one_line_exit_2(
            run_serve("--port", str(port), "--store", str(tmp_path / "wsbroadcast.db")))
    finally:
        taken.close()
    assert str(port) in line, line
    assert os.listdir(tmp_path) == []  # the port is bound before anything is written


@pytest.mark.timeout(60)
def test_second_server_on_the_same_store_exits_2_naming_the_holder(tmp_path) -> None:
    path = str(tmp_path / "wsbroadcast.db")
    with ServerProcess("--store", path) as first:
        line = assert_one_line_exit_2(run_serve("--store", path))
        assert path in line and "process %d" % first.pid in line, line
        # the first server was not disturbed: it still stores and acknowledges
        ws = wsraw.connect(first.port)
        try:
            answers = publish_ws(ws, 3)
        finally:
            ws.close()
        assert [(a["type"], a["seq"]) for a in answers] == [("ack", 1), ("ack", 2), ("ack", 3)]
        assert healthz(first.port)[0] == 200
        assert first.terminate() == 0
    # the lock went with the first server: the next one starts and continues the seqs
    with ServerProcess("--store", path) as again:
        ws = wsraw.connect(again.port)
        try:
            assert publish_ws(ws, 1, first_id=4)[0]["seq"] == 4
        finally:
            ws.close()


# --------------------------------------------------------------------------- while running


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["directory deleted", "file replaced"])
def test_store_deleted_or_replaced_stops_acknowledging(tmp_path, how) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "wsbroadcast.db"
    with ServerProcess("--store", str(path)) as proc:
        ws = wsraw.connect(proc.port)
        try:
            assert publish_ws(ws, 1)[0]["type"] == "ack"
            assert healthz(proc.port)[0] == 200
            if how == "directory deleted":
                shutil.rmtree(folder)
            else:
                other = str(tmp_path / "other.db")
                sqlite3.connect(other).close()
                os.replace(other, path)
            answers = publish_ws(ws, 200, first_id=2)
            assert all(a["type"] == "error" and a["code"] == "unavailable" for a in answers), \
                [a for a in answers if a["type"] != "error"][:3]
            status, health = healthz(proc.port)
            assert (status, health["status"]) == (503, "degraded"), (status, health)
            assert ("deleted" if how == "directory deleted" else "replaced") in health["reason"]
            # history is what this server stored, not what another file holds
            status, _h, body = wsraw.http_request(
                proc.port, b"GET /history?topic=" + TOPIC.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                b"Connection: close\r\n\r\n", T)
            assert (status, [m["seq"] for m in json.loads(body)]) == (200, [1]), body
            # the connection stays usable
            ws.send_json({"type": "ping", "id": "p"})
            assert ws.recv_json(timeout=T)["type"] == "pong"
        finally:
            ws.close()
        # 200 refusals, a handful of ERROR lines (rate-limited), not one or two per refusal
        assert 1 <= len(error_lines(proc)) <= 4, error_lines(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["file", "directory"])
def test_read_only_store_serves_history_and_says_degraded(tmp_path, what) -> None:
    prefix = without_file_permission_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: file modes cannot stop writes")
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "wsbroadcast.db"
    epoch = make_store_file(str(path))
    os.chmod(path, 0o444)
    if what == "directory":
        os.chmod(folder, 0o555)
    try:
        with ServerProcess("--store", str(path), prefix=prefix) as proc:
            status, health = healthz(proc.port)
            assert (status, health["status"]) == (503, "degraded"), (status, health)
            assert "read-only" in health["reason"], health
            ws = wsraw.connect(proc.port)
            try:
                answer = publish_ws(ws, 1, first_id=3)[0]
                assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
                ws.send_json({"type": "subscribe", "topic": TOPIC, "id": "s", "since": 0})
                ack = ws.recv_json(timeout=T)
                assert (ack["type"], ack["seq"], ack["epoch"]) == ("ack", 2, epoch), ack
                got = [ws.recv_json(timeout=T) for _ in range(2)]
                assert [m["data"] for m in got] == ["kept-1", "kept-2"], got
            finally:
                ws.close()
        if what == "directory":
            assert os.listdir(folder) == ["wsbroadcast.db"]  # nothing could be made there
    finally:
        os.chmod(folder, 0o755)


# --------------------------------------------------------------------------- disk full


@pytest.mark.timeout(60)
def test_full_store_refuses_publishes_with_rate_limited_errors(make_server, tmp_path, caplog) -> None:
    store = SqliteStore(str(tmp_path / "h.db"))
    srv = make_server(message_store=store)
    ws = wsraw.connect(srv.port)
    try:
        assert publish_ws(ws, 1)[0]["type"] == "ack"
        # SQLITE_FULL, the error a full disk gives: the file may not grow past its size now
        writer = store._writer  # noqa: SLF001 - the only way to set a per-connection limit
        writer.execute("PRAGMA max_page_count = %d" % writer.execute("PRAGMA page_count").fetchone()[0])
        big = "x" * 20000
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="wsbroadcast"):
            for i in range(40):
                ws.send_json({"type": "publish", "topic": TOPIC, "data": big, "id": 100 + i})
                answer = ws.recv_json(timeout=T)
                assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert 1 <= len(errors) <= 4, [r.getMessage() for r in errors]
        status, health = healthz(srv.port)
        assert (status, health["status"]) == (503, "degraded") and "full" in health["reason"], health
        # room again: publishes are stored and /healthz is ok once one succeeds
        writer.execute("PRAGMA max_page_count = 1073741823")
        assert publish_ws(ws, 1, first_id=2)[0] == {"type": "ack", "id": 2, "topic": TOPIC,
                                                    "seq": 2, "epoch": store.epoch}
        assert healthz(srv.port)[0] == 200
    finally:
        ws.close()


# --------------------------------------------------------------------------- the parts


def test_second_store_on_one_file_in_one_process_is_refused(tmp_path) -> None:
    path = str(tmp_path / "h.db")
    with SqliteStore(path) as store:
        assert os.path.exists(path + ".lock")
        with pytest.raises(StoreError, match="in use by process %d" % os.getpid()):
            SqliteStore(path)
        store.append_batch([(TOPIC, "1")])  # the holder is unaffected
    assert not os.path.exists(path + ".lock")  # removed on close
    with SqliteStore(path) as again:
        assert again.latest(TOPIC)[0] == 1


def test_deferred_store_touches_nothing_until_opened(tmp_path) -> None:
    store = open_store(str(tmp_path / "h.db"), 10, None, defer_open=True)
    assert os.listdir(tmp_path) == [] and store.failure == "store is not open"
    with pytest.raises(StoreError, match="not open"):
        store.append_batch([(TOPIC, "1")])
    store.open()
    store.open()  # idempotent
    assert store.failure is None and store.append_batch([(TOPIC, "1")])[0][0] == 1
    store.close()


def test_rate_limited_log_at_and_past_its_interval(caplog) -> None:
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("wsbroadcast.test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="wsbroadcast.test"):
        assert log.error("failed: %s", "a") is True
        now[0] = 109.999
        assert [log.error("failed: %s", "b") for _ in range(5)] == [False] * 5
        now[0] = 110.0  # exactly one interval later: a line again, with the count held back
        assert log.warning("failed: %s", "c") is True
        assert log.error("failed: %s", "d") is False
    assert [r.getMessage() for r in caplog.records] == [
        "failed: a", "failed: c (5 more like it since the last such line)"]
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
