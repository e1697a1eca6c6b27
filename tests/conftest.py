"""Shared fixtures: real servers on 127.0.0.1 port 0, stopped after each test."""

from __future__ import annotations

import os
import sys
from typing import Any, List, Tuple

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wsbroadcast import Server  # noqa: E402

#: multiply every timing constant of the tests (slow or loaded machines)
SCALE = float(os.environ.get("WSBROADCAST_TEST_TIMEOUT_SCALE", "1"))

#: under CI every skipped test fails the run: a skip there is coverage silently missing
STRICT_SKIPS = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

_skipped: List[Tuple[str, str]] = []  # (test or module, reason)


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).replace("Skipped: ", "", 1)
    return str(longrepr)


def pytest_runtest_logreport(report: Any) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report: Any) -> None:
    if report.skipped:
        _skipped.append((report.nodeid, _skip_reason(report)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if STRICT_SKIPS and _skipped:
        terminalreporter.section("skips fail the run under CI=true")
        for nodeid, reason in _skipped:
            terminalreporter.line("MISSING: %s: %s" % (nodeid, reason))


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    if STRICT_SKIPS and _skipped and exitstatus in (0, 5):  # 5: nothing else ran
        session.exitstatus = 1


@pytest.fixture
def make_server():
    """Start servers with test settings; all are shut down at the end of the test."""
    servers = []

    def make(**settings):
        settings.setdefault("store", "memory")
        settings.setdefault("close_timeout", 2.0 * SCALE)
        srv = Server("127.0.0.1", 0, **settings).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()


@pytest.fixture
def server(make_server):
    """One server with the default limits and a memory store."""
    return make_server()
