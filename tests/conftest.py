"""Shared fixtures: real servers on 127.0.0.1 port 0, stopped after each test."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wsbroadcast import Server  # noqa: E402

#: multiply every timing constant of the tests (slow or loaded machines)
SCALE = float(os.environ.get("WSBROADCAST_TEST_TIMEOUT_SCALE", "1"))


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
