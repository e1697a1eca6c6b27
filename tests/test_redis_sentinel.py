"""Redis replication and Sentinel: a publish acked only once a replica has it (wait_replicas),
and a broker that follows a failover to the new primary.

Every process is a private redis-server on a free loopback port (tests/redis_server.py).
"""

from __future__ import annotations

import time

import pytest

from conftest import SCALE
from redis_server import RedisServer, require_redis_server

require_redis_server()

from wsbroadcast.broker_redis import RedisBroker  # noqa: E402
from wsbroadcast.errors import BrokerUnavailable  # noqa: E402

T = 10.0 * SCALE
#: a primary syncs a new replica at once (Redis waits 5 s for more replicas by default)
PRIMARY = ["--repl-diskless-sync-delay", "0"]


@pytest.fixture
def pair(tmp_path):
    """A primary (appendfsync always) and one replica of it, in sync."""
    primary = RedisServer(str(tmp_path / "primary"), appendonly=True, extra=PRIMARY).start()
    replica = RedisServer(str(tmp_path / "replica"), appendonly=True,
                          extra=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        replica.wait_in_sync(T)
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def test_wait_replicas_acks_at_the_replica_count_and_refuses_past_it(pair):
    primary, replica = pair
    ok = RedisBroker(primary.url.replace("/0", "/0?wait_replicas=1&wait_timeout_ms=%d" % (2000 * SCALE)))
    short = RedisBroker(primary.url.replace("/0", "/0?wait_replicas=2&wait_timeout_ms=100"))
    try:
        assert ok.publish([("w", "a"), ("w", "b")]) == [(1, ok.latest("w")[1]), (2, ok.latest("w")[1])]
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="1 of the 2 replica"):
            short.publish([("w", "c")])  # one replica, two asked for: never acked
        assert time.monotonic() - started >= 0.09
        assert not short.healthy
        assert ok.publish([("w", "d")])[0][0] == 4  # "c" is stored (seq 3), only not acked
        # what was acked is on the replica
        replica_view = RedisBroker(replica.url)
        try:
            assert [m.data for m in replica_view.since("w", 0, 10)][:2] == ["a", "b"]
        finally:
            replica_view.close()
    finally:
        ok.close()
        short.close()
