"""Redis replication and Sentinel: a publish acked only once a replica has it (wait_replicas),
and a broker that follows a failover to the new primary.

Every process is a private redis-server on a free loopback port (tests/redis_server.py).
"""

from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

import threadutil
import wsraw
from conftest import SCALE
from httputil import health_status
from redis_server import RedisServer, SentinelSet, require_redis_server
from wsraw import connect, wait_for

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
    ok = RedisBroker(primary.url.replace("/0", "/0?wait_replicas=1&wait_timeout_ms=%d" % (T * 1000)))
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


class Sink:
    """A handler that records what a broker hands back."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pubs: List[Tuple[int, str]] = []

    def __call__(self, pubs) -> None:
        with self.cond:
            self.pubs.extend((p.seq, p.data) for p in pubs)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = T) -> List[Tuple[int, str]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.pubs) < n and time.monotonic() < deadline:
                self.cond.wait(0.05)
            return list(self.pubs)


def test_a_message_is_shown_only_once_replicas_have_it(pair):
    """Not published, counted by latest() or read by since() before its WAIT succeeded: a
    failover to a replica that lacks it cannot take back what a subscriber already saw."""
    primary, _replica = pair
    query = "/0?wait_replicas=%d&wait_timeout_ms=%d"
    ok = RedisBroker(primary.url.replace("/0", query % (1, T * 1000)))
    short = RedisBroker(primary.url.replace("/0", query % (2, 50)))
    watcher = RedisBroker(primary.url.replace("/0", query % (1, T * 1000)))
    sink = Sink()
    try:
        watcher.start(sink)
        watcher.interest("v", True, acked=0)
        assert watcher.wait_subscribed("v")
        ok.publish([("v", "1")])
        assert sink.wait(1) == [(1, "1")]
        with pytest.raises(BrokerUnavailable):
            short.publish([("v", "2")])  # stored as seq 2; the replica may have it, but WAIT said no
        assert watcher.latest("v")[0] == 1
        assert [m.seq for m in watcher.since("v", 0, 10)] == [1]
        # the next message shown brings seq 2 with it (its own WAIT covers everything before)
        ok.publish([("v", "3")])
        assert sink.wait(3) == [(1, "1"), (2, "2"), (3, "3")]
        assert watcher.latest("v")[0] == 3
        assert [m.data for m in watcher.since("v", 0, 10)] == ["1", "2", "3"]
        assert sink.wait(4, timeout=0.2) == [(1, "1"), (2, "2"), (3, "3")]  # nothing twice
    finally:
        for b in (ok, short, watcher):
            b.close()


# --------------------------------------------------------------------------- failover

TOPICS = ("fo.a", "fo.b")


@pytest.fixture
def sentinel_set(tmp_path):
    """A primary, two replicas and three Sentinels (down after 1 s), all stopped at the end.

    Two replicas: after a failover the new primary still has one, so that WAIT 1 can succeed.
    """
    ss = SentinelSet(str(tmp_path), replicas=2, sentinels=3).start(timeout=3 * T)
    try:
        yield ss
    finally:
        ss.stop()


class Publisher:
    """Publishes 0, 1, 2, ... on one topic over a WebSocket until stopped; keeps every answer."""

    def __init__(self, port: int, topic: str) -> None:
        self.ws = connect(port)
        self.topic = topic
        self.acked: List[Tuple[int, int]] = []  # (seq, data)
        self.unavailable: List[int] = []  # data refused with "unavailable"
        self.acked_at: List[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            self.ws.send_json({"type": "publish", "topic": self.topic, "data": i, "id": i})
            reply = self.ws.recv_json(T)
            assert reply.get("id") == i, reply
            if reply["type"] == "ack":
                assert reply["topic"] == self.topic
                self.acked.append((reply["seq"], i))
                self.acked_at.append(time.monotonic())
            else:
                assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
                self.unavailable.append(i)
                self.stop.wait(0.02)  # pace the retries while there is no primary
            i += 1

    def acked_since(self, when: float) -> int:
        return sum(1 for t in self.acked_at if t >= when)


def read_until_markers(ws, markers: Dict[str, int], replies: Optional[Dict[str, dict]] = None,
                       ) -> Dict[str, List[Tuple[int, object]]]:
    """Every message up to each topic's marker seq: {topic: [(seq, data), ...]}; other frames
    go to ``replies`` by id (or fail the test)."""
    got: Dict[str, List[Tuple[int, object]]] = {t: [] for t in markers}
    deadline = time.monotonic() + 3 * T
    while any(not got[t] or got[t][-1][0] < markers[t] for t in markers):
        msg = ws.recv_json(max(0.01, deadline - time.monotonic()))
        if msg.get("type") == "message":
            got[msg["topic"]].append((msg["seq"], msg["data"]))
        else:
            assert replies is not None and msg.get("id") not in replies, msg
            replies[msg["id"]] = msg
    return got


@pytest.mark.timeout(90)
def test_failover_broker_follows_the_new_primary_and_loses_no_acked_message(sentinel_set, make_server):
    ss = sentinel_set
    url = ss.url("wait_replicas=1&wait_timeout_ms=%d" % (1000 * SCALE))
    a, b = make_server(redis_url=url), make_server(redis_url=url)
    for srv in (a, b):
        srv.broker.reconnect_max = 0.5  # the default (5 s) would only make the test longer
    subs = []
    for port in (b.port, b.port, a.port):
        ws = connect(port)
        for t in TOPICS:
            assert wsraw.subscribe(ws, t, t, T)["type"] == "ack"
        subs.append(ws)
    leaver = connect(a.port)  # leaves during the failover and resumes on the other node
    epochs = {t: wsraw.subscribe(leaver, t, t, T)["epoch"] for t in TOPICS}
    pubs = [Publisher(a.port, t) for t in TOPICS]
    threads = [threadutil.start(p.run, name="test-pub-" + p.topic) for p in pubs]
    try:
        assert wait_for(lambda: all(len(p.acked) >= 20 for p in pubs), timeout=T)
        seen: Dict[str, int] = dict.fromkeys(TOPICS, 0)
        for _ in range(20):
            msg = leaver.recv_json(T)
            seen[msg["topic"]] = msg["seq"]
        leaver.close()

        old = ss.primary.port
        ss.primary.kill()
        killed = time.monotonic()
        ss.wait_for(lambda: ss.primary_port() not in (None, old), killed + 3 * T, "no replica was promoted")
        assert wait_for(lambda: all(p.acked_since(killed) >= 20 for p in pubs), timeout=3 * T), \
            [(len(p.acked), len(p.unavailable)) for p in pubs]
    finally:
        for p in pubs:
            p.stop.set()
        for th in threads:
            th.finish(2 * T)
    assert any(p.unavailable for p in pubs), "no publish met the failover"
    markers = {t: a.publish(t, "marker")[0] for t in TOPICS}

    for p in pubs:  # each publisher's acks: in order, one seq each
        seqs = [s for s, _ in p.acked]
        assert seqs == sorted(set(seqs)), seqs
    for ws in subs:
        got = read_until_markers(ws, markers)
        for p in pubs:
            msgs = got[p.topic]
            # no duplicate and no gap: every seq once, in order, up to the marker
            assert [s for s, _ in msgs] == list(range(1, markers[p.topic] + 1))
            delivered = dict(msgs)
            assert all(delivered[s] == d for s, d in p.acked), "an acked message was lost or replaced"
        ws.close()

    # the leaver resumes on the other node from its last seq: recovered, nothing twice, nothing missing
    back = connect(b.port)
    acks: Dict[str, dict] = {}
    for t in TOPICS:
        back.send_json({"type": "subscribe", "topic": t, "id": t, "since": seen[t], "epoch": epochs[t]})
    got = read_until_markers(back, markers, acks)
    for t in TOPICS:
        ack = acks[t]
        assert (ack["type"], ack["epoch"], ack.get("recovered")) == ("ack", epochs[t], True), ack
    for t in TOPICS:
        assert [s for s, _ in got[t]] == list(range(seen[t] + 1, markers[t] + 1))
    back.close()

    # every acked message is in the new primary's history
    for p in pubs:
        stored = {m.seq: m.data for m in b.broker.since(p.topic, 0, 10000)}
        assert all(stored.get(s) == str(d) for s, d in p.acked)
    assert wait_for(lambda: health_status(a.port) == "ok" and health_status(b.port) == "ok", timeout=T)
    status = a.broker.status()
    assert (status["kind"], status["wait_replicas"]) == ("redis-sentinel", 1)
    # a replica (on a loaded machine Sentinel may even have moved on again since)
    assert status["primary"] in ["127.0.0.1:%d" % r.port for r in ss.replicas], status
    assert status["reconnects"] >= 1


@pytest.mark.timeout(90)
def test_manual_failover_loses_nothing_when_every_replica_must_have_it(sentinel_set):
    """SENTINEL FAILOVER promotes a replica while the old primary still takes writes for a
    moment; with wait_replicas counting every replica, the promoted one lacks none of the acked
    (with fewer, the other replica could ack writes that the failover then throws away)."""
    ss = sentinel_set
    url = ss.url("wait_replicas=%d&wait_timeout_ms=200" % len(ss.replicas))
    pub, sub = RedisBroker(url), RedisBroker(url)
    sink = Sink()
    try:
        sub.start(sink)
        sub.interest("mf", True, acked=0)
        assert sub.wait_subscribed("mf")
        acked: List[Tuple[int, str]] = []
        unavailable = 0
        old = ss.primary.port
        client = ss.sentinels[0].client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", ss.name)
        finally:
            client.close()
        changed = None
        deadline = time.monotonic() + 6 * T
        i = 0
        while changed is None or sum(1 for s, _ in acked if s > changed) < 10:
            assert time.monotonic() < deadline, (len(acked), unavailable, changed)
            if changed is None and ss.primary_port() not in (None, old):
                changed = acked[-1][0] if acked else 0  # acks from here on are the new primary's
            try:
                acked.append((pub.publish([("mf", str(i))])[0][0], str(i)))
            except BrokerUnavailable:
                unavailable += 1
                time.sleep(0.02)  # pace the retries while the replicas move over
            i += 1
        assert unavailable, "no publish met the failover"
        seqs = [s for s, _ in acked]
        assert seqs == sorted(set(seqs))
        got = sink.wait(seqs[-1])
        assert [s for s, _ in got] == list(range(1, seqs[-1] + 1)), "a duplicate or a gap"
        assert set(acked) <= set(got), "an acked message was lost or replaced"
        stored = {m.seq: m.data for m in sub.since("mf", 0, 100000)}
        assert all(stored.get(s) == d for s, d in acked)
    finally:
        pub.close()
        sub.close()
