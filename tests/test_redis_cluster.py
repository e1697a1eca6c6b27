"""ClusterBroker on a private Redis Cluster (3 primaries, 3 replicas): spread, order, wildcards,
a slot migration and a primary killed mid-stream. One cluster for the module; the tests that
change its shape (migration, failover) come last."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest
from redis_cluster import RedisCluster, command
from test_presence_redis import test_presence_and_join_leave_cover_both_nodes as presence_on_two_nodes
from test_presence_redis import (
    test_the_ack_of_join_leave_comes_once_other_nodes_joins_reach_this_node as join_leave_acked_in_effect,
)

import wsraw
from conftest import SCALE
from redis_server import require_redis_server
from wsraw import connect

require_redis_server()

import redis  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from wsbroadcast.broker_cluster import PUBLISH_LUA, ClusterBroker  # noqa: E402
from wsbroadcast.errors import ConfigError  # noqa: E402
from wsbroadcast.redis_url import parse_redis_url  # noqa: E402

T = 10.0 * SCALE
PREFIX = "wsb:"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisCluster(str(tmp_path_factory.mktemp("cluster"))) as rc:
        yield rc


def owner(rc: RedisCluster, topic: str) -> int:
    """The port of the primary owning ``topic``'s slot now (0 while none does: a failover)."""
    slot = key_slot((PREFIX + "{%s}:topic" % topic).encode())
    for node in rc.topology():
        if not node.is_primary:
            continue
        for r in node.slots:
            if r.startswith("["):
                continue  # a slot being migrated
            lo, _, hi = r.partition("-")
            if int(lo) <= slot <= int(hi or lo):
                return node.port
    return 0


def spread_topics(rc: RedisCluster, base: str) -> List[str]:
    """Three topics ``base.N``, one on each primary."""
    found: Dict[int, str] = {}
    i = 0
    while len(found) < 3:
        topic = "%s.t%d" % (base, i)
        found.setdefault(owner(rc, topic), topic)
        i += 1
    return sorted(found.values())


def subscribe(port: int, topic: str) -> Any:
    ws = connect(port)
    ack = wsraw.subscribe(ws, topic, "s", T)
    assert ack["type"] == "ack", ack
    return ws


def read_until_markers(ws: Any, markers: Dict[str, str], timeout: float = 3 * T) -> List[dict]:
    """Messages up to the marker of every topic in ``markers`` (topic -> marker data)."""
    out: List[dict] = []
    left = dict(markers)
    deadline = time.monotonic() + timeout
    while left:
        msg = ws.recv_json(max(0.01, deadline - time.monotonic()))
        if msg.get("type") != "message":
            continue
        out.append(msg)
        if left.get(msg["topic"]) == msg["data"]:
            del left[msg["topic"]]
    return out


def publish_retrying(srv: Any, topic: str, data: Any, timeout: float = 3 * T) -> int:
    """Publish through ``srv``, again while the broker says unavailable; the seq."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return srv.publish(topic, data)[0]
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def check_stream(msgs: List[dict], topic: str) -> List[int]:
    """The seqs of ``topic`` in ``msgs``: strictly consecutive (no duplicate, no gap)."""
    seqs = [m["seq"] for m in msgs if m["topic"] == topic]
    assert seqs, topic
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (topic, seqs)
    return seqs


class Publisher:
    """A WebSocket publisher looping over topics, one publish at a time; every reply kept."""

    def __init__(self, port: int, topics: List[str], name: str) -> None:
        self.ws = connect(port)
        self.topics = topics
        self.name = name
        self.replies: List[Tuple[str, Any, dict]] = []  # (topic, data, reply)
        self.stop = threading.Event()
        self.error: List[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-publisher-" + name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                topic = self.topics[i % len(self.topics)]
                data = [self.name, i]
                self.ws.send_json({"type": "publish", "topic": topic, "data": data, "id": i})
                reply = self.ws.recv_json(T)
                assert reply.get("id") == i, reply
                self.replies.append((topic, data, reply))
                i += 1
        except BaseException as exc:  # pragma: no cover - reported by finish()
            self.error.append(exc)

    def acked(self, topic: str) -> List[Tuple[int, Any]]:
        return [(r["seq"], d) for t, d, r in list(self.replies) if t == topic and r["type"] == "ack"]

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(2 * T)
        assert not self.thread.is_alive()
        assert not self.error, self.error
        self.ws.close()


def test_url_forms():
    u = parse_redis_url("redis+cluster://u:p%40ss@10.0.0.1:7000,h2:7001/?wait_replicas=1&wait_timeout_ms=300")
    assert (u.kind, u.nodes, u.username, u.password, u.ssl, u.wait_replicas, u.wait_timeout_ms) == (
        "cluster", (("10.0.0.1", 7000), ("h2", 7001)), "u", "p@ss", False, 1, 300)
    assert parse_redis_url("rediss+cluster://h").nodes == (("h", 6379),)
    assert parse_redis_url("rediss+cluster://h:1").ssl
    for bad in ("redis+cluster://", "redis+cluster://h:1/3", "redis+cluster://h:1?db=2",
                "redis+cluster://h:99999", "redis+cluster://h:1?wait=1", "redis+cluster://h:1?wait_replicas=x",
                "redis+cluster://h:1?wait_timeout_ms=0"):
        with pytest.raises(ConfigError):
            parse_redis_url(bad)
    # the script fans out by SPUBLISH, and by PUBLISH only when classic channels are given
    assert "SPUBLISH" in PUBLISH_LUA and "if classic then" in PUBLISH_LUA


def test_bad_cluster_url_is_a_config_error(make_server):
    with pytest.raises(ConfigError, match="wait_replicas"):
        make_server(redis_url="redis+cluster://127.0.0.1:1?wait_replicas=x")
    with pytest.raises(ConfigError, match="cannot load the cluster's map"):
        make_server(redis_url="redis+cluster://127.0.0.1:1")  # nothing listens on port 1
    with pytest.raises(ConfigError, match="not a redis\\+cluster"):
        ClusterBroker("redis://127.0.0.1:1")


def test_spread_order_and_wildcards_through_two_servers(cluster, make_server):
    a, b = make_server(redis_url=cluster.url), make_server(redis_url=cluster.url)
    topics = spread_topics(cluster, "spread")
    assert len({owner(cluster, t) for t in topics}) == 3
    subs = [subscribe(srv.port, t) for t in topics for srv in (a, b)]
    # on a server of its own (no sharded subscription to lean on); acked once every publisher
    # does the classic PUBLISH too
    wild = subscribe(make_server(redis_url=cluster.url).port, "spread.>")
    pubs = [Publisher(a.port, topics, "pa"), Publisher(b.port, topics, "pb")]
    deadline = time.monotonic() + 3 * T
    while min(len(p.acked(t)) for p in pubs for t in topics) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for p in pubs:
        p.finish()
        assert all(r["type"] == "ack" for _, _, r in p.replies), p.replies
    # each topic's keys and sharded channel (one subscription per server) are on its primary only
    for t in topics:
        for port in cluster.primaries():
            mine = port == owner(cluster, t)
            assert command(port, "EXISTS", PREFIX + "{%s}:stream" % t) == (
                ":1" if mine else "-MOVED %d 127.0.0.1:%d" % (key_slot(b"{%s}" % t.encode()), owner(cluster, t)))
            with redis.Redis(port=port) as r:
                assert r.execute_command("PUBSUB", "SHARDNUMSUB", PREFIX + "{%s}:ch" % t)[1] == (2 if mine else 0)
    markers = {t: "end-" + t for t in topics}
    for t in topics:
        a.publish(t, markers[t])
    acked = {t: sorted(s for p in pubs for s, _ in p.acked(t)) for t in topics}
    for i, t in enumerate(topics):
        for ws in subs[2 * i:2 * i + 2]:
            msgs = read_until_markers(ws, {t: markers[t]})
            assert check_stream(msgs, t) == acked[t] + [acked[t][-1] + 1]
            for p in pubs:  # each publisher's order survives
                got = [m["data"] for m in msgs if isinstance(m["data"], list) and m["data"][0] == p.name]
                assert got == [d for _, d in p.acked(t)]
    msgs = read_until_markers(wild, markers)
    for t in topics:  # the wildcard subscriber has every shard's messages, in order
        assert check_stream(msgs, t) == acked[t] + [acked[t][-1] + 1]
    for ws in subs + [wild]:
        ws.close()


def test_presence_and_join_leave_on_a_cluster(cluster, make_server):
    """One Redis's presence test on the cluster: joins and leaves (sharded, like the messages)
    reach the other node in order with its messages, and presence counts both nodes."""
    presence_on_two_nodes(make_server, cluster.url)


@pytest.mark.timeout(60)
def test_the_ack_of_join_leave_on_a_cluster_comes_once_other_nodes_joins_reach_this_node(cluster, make_server):
    """One Redis's test on the cluster: a join right after the ack is not lost, however late
    this node subscribes to the topic's shard."""
    join_leave_acked_in_effect(make_server, cluster.url)


def ws_publish(ws: Any, topic: str, data: Any, ident: str) -> dict:
    """Publish over the WebSocket; the answer carrying ``ident``."""
    return wsraw.request(ws, {"type": "publish", "topic": topic, "data": data, "id": ident}, T)


@pytest.mark.timeout(60)
def test_a_connection_closed_under_a_command_is_unavailable_not_a_fault(cluster, make_server):
    """redis-py's cluster client, resetting a node after a failure, closes connections other
    threads are reading: they see ValueError or AttributeError, not a Redis error. The
    publisher gets an answer and keeps its connection (not a 1011 close)."""
    srv = make_server(redis_url=cluster.url)
    broker = srv.broker
    ws = connect(srv.port)
    try:
        # the wildcard set's read fails so: the publish goes on (to the classic channels too)
        def closed_file(**_kw: Any) -> Any:
            raise ValueError("I/O operation on closed file.")

        real_read, broker._wild_read = broker._wild_read, closed_file
        broker._wild_until = 0.0
        try:
            assert ws_publish(ws, "under.a", 1, "p1")["type"] == "ack"
        finally:
            broker._wild_read = real_read
        # the publish's connection: answered unavailable, the next publish goes through
        real_conn = broker._redis.get_redis_connection
        failed: List[Any] = []

        def buffer_gone(node: Any) -> Any:
            # (the publish's own call: the listener and presence threads use this too)
            if not failed and threading.current_thread().name.startswith("wsbroadcast-conn-"):
                failed.append(node)
                raise AttributeError("'NoneType' object has no attribute 'readline'")
            return real_conn(node)

        broker._redis.get_redis_connection = buffer_gone
        try:
            reply = ws_publish(ws, "under.b", 2, "p2")
            assert failed and (reply["type"], reply.get("code")) == ("error", "unavailable"), reply
            assert ws_publish(ws, "under.b", 3, "p3")["type"] == "ack"
        finally:
            broker._redis.get_redis_connection = real_conn
        wsraw.expect_pong_next(ws)
    finally:
        ws.close()


def migrate_slot(rc: RedisCluster, slot: int, src: int, dst: int, between: Any = None,
                 moved: Any = None) -> None:
    """Move ``slot`` from the primary on ``src`` to the one on ``dst`` key by key (redis-cli's steps)."""
    ids = {n.port: n.id for n in rc.topology()}
    with redis.Redis(port=src, decode_responses=True) as s, redis.Redis(port=dst, decode_responses=True) as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        keys = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert keys
        for i, key in enumerate(keys):
            s.execute_command("MIGRATE", "127.0.0.1", dst, key, 0, 5000)
            if i == 0 and between is not None:
                between()  # half migrated: TRYAGAIN for a script needing keys on both sides
        if moved is not None:
            moved()  # every key moved, the slot not yet: ASK to the new node
    for port in [dst, src] + [p for p in rc.primaries() if p not in (src, dst)]:
        with redis.Redis(port=port) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])


@pytest.mark.timeout(60)
def test_slot_migration_mid_stream(cluster, make_server):
    a, b = make_server(redis_url=cluster.url), make_server(redis_url=cluster.url)
    for srv in (a, b):
        srv.broker.reconnect_max = 0.5
    topic = spread_topics(cluster, "move")[0]
    src = owner(cluster, topic)
    dst = next(p for p in cluster.primaries() if p != src)
    subs = [subscribe(a.port, topic), subscribe(b.port, topic)]
    pub = Publisher(a.port, [topic], "p")
    wait_acks(pub, topic, 20)
    before = len(pub.acked(topic))
    asked: List[Tuple[str, Any, dict]] = []

    def moved() -> None:
        # the publish answered next may have been sent before the last key moved (TRYAGAIN):
        # the ones after it were all sent once every key was on the new node
        start = len(pub.replies) + 1
        wait_replies(pub, 6)
        asked.extend(pub.replies[start:])

    migrate_slot(cluster, key_slot((PREFIX + "{%s}:topic" % topic).encode()), src, dst,
                 between=lambda: wait_replies(pub, 5), moved=moved)
    assert len(asked) >= 5 and all(r["type"] == "ack" for _, _, r in asked), asked  # ASK followed
    assert owner(cluster, topic) == dst
    wait_acks(pub, topic, before + 20)
    pub.finish()
    for _, _, r in pub.replies:
        assert r["type"] == "ack" or r.get("code") == "unavailable", r
    seq = publish_retrying(a, topic, "end")
    acked = [s for s, _ in pub.acked(topic)] + [seq]
    for ws in subs:
        msgs = read_until_markers(ws, {topic: "end"})
        seqs = check_stream(msgs, topic)
        assert set(acked) <= set(seqs)
    assert [m.seq for m in b.broker.since(topic, 0, 10000)][-1] == seq
    for ws in subs:
        ws.close()


def wait_acks(pub: Publisher, topic: str, n: int, timeout: float = 3 * T) -> None:
    deadline = time.monotonic() + timeout
    while len(pub.acked(topic)) < n:
        assert not pub.error, pub.error
        assert time.monotonic() < deadline, "only %d acks" % len(pub.acked(topic))
        time.sleep(0.01)


def wait_replies(pub: Publisher, n: int, timeout: float = T) -> None:
    start = len(pub.replies)
    deadline = time.monotonic() + timeout
    while len(pub.replies) < start + n and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.timeout(90)
def test_primary_killed_mid_stream(cluster, make_server):
    url = cluster.url + "?wait_replicas=1&wait_timeout_ms=500"
    a, b = make_server(redis_url=url), make_server(redis_url=url)
    for srv in (a, b):
        srv.broker.reconnect_max = 0.5
    topics = spread_topics(cluster, "kill")
    victim = topics[0]
    dead = owner(cluster, victim)
    subs = {t: [subscribe(a.port, t), subscribe(b.port, t)] for t in topics}
    wild = subscribe(make_server(redis_url=url).port, "kill.>")
    probe = connect(a.port)
    epoch = wsraw.subscribe(probe, victim, "e", T)["epoch"]
    probe.close()
    pubs = [Publisher(a.port, topics, "pa"), Publisher(b.port, topics, "pb")]
    for p in pubs:
        wait_acks(p, victim, 10)
    cluster.kill(dead)
    cluster.wait(lambda: owner(cluster, victim) not in (0, dead), 30, "the replica to take over")
    cluster.node(dead).start()  # back as the new primary's replica: WAIT 1 can be met again
    cluster.wait(lambda: cluster.replicated(owner(cluster, victim)), 30, "the old primary to rejoin")
    after = [len(p.acked(victim)) for p in pubs]
    for p, n in zip(pubs, after):
        wait_acks(p, victim, n + 10)
    for p in pubs:
        p.finish()
        for _, _, r in p.replies:  # acked or said unavailable, never anything else
            assert r["type"] == "ack" or r.get("code") == "unavailable", r
    # the victim's publishes during the failover were refused, the other shards' went on
    assert any(t == victim and r["type"] == "error" for p in pubs for t, _, r in p.replies)
    markers = {t: "end-" + t for t in topics}
    for t in topics:
        publish_retrying(a, t, markers[t])
    for t in topics:
        acked = {s: d for p in pubs for s, d in p.acked(t)}
        history = {m.seq: m.data for m in b.broker.since(t, 0, 100000)}
        for s, d in acked.items():  # every acked message is in history, as it was acked
            assert s in history and json.loads(history[s]) == d, (t, s, d)
        for ws in subs[t]:
            msgs = read_until_markers(ws, {t: markers[t]})
            assert set(acked) <= set(check_stream(msgs, t))
    msgs = read_until_markers(wild, markers)
    for t in topics:
        assert {s for p in pubs for s, _ in p.acked(t)} <= set(check_stream(msgs, t))
    # a client that left before the failover resumes after it on the other server
    first = min(s for p in pubs for s, _ in p.acked(victim))
    late = connect(b.port)
    ack = wsraw.subscribe(late, victim, "r", T, since=first, epoch=epoch)
    assert ack["type"] == "ack" and ack["recovered"] is True, ack
    rest = read_until_markers(late, {victim: markers[victim]})
    assert check_stream(rest, victim)[0] == first + 1 and rest[-1]["seq"] == ack["seq"]
    late.close()
    for ws in [w for pair in subs.values() for w in pair] + [wild]:
        ws.close()
