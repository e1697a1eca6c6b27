"""Presence and join/leave across nodes sharing a real Redis (PROTOCOL.md "Presence")."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import wsraw
from conftest import SCALE
from redis_server import RedisServer, require_redis_server
from serverproc import ServerProcess

require_redis_server()

T = 10.0 * SCALE


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """One redis-server for the module; each test uses topics of its own."""
    with RedisServer(str(tmp_path_factory.mktemp("redis"))) as server:
        yield server.url


_passed: dict = {}  # id(ws) -> frames that arrived before a presence answer, in order


def ask(ws: wsraw.RawWS, topic: str, stats: bool = False) -> dict:
    ws.send_json({"type": "presence_stats" if stats else "presence", "topic": topic, "id": "q"})
    while True:
        reply = ws.recv_json(T)
        if reply.get("id") == "q":
            return reply
        _passed.setdefault(id(ws), []).append(reply)


def next_frame(ws: wsraw.RawWS) -> dict:
    """The next frame that no presence answer was waited for past."""
    passed = _passed.get(id(ws))
    return passed.pop(0) if passed else ws.recv_json(T)


def poll(ws: wsraw.RawWS, topic: str, want: int, timeout: float = T) -> dict:
    """Presence of ``topic`` seen from ``ws`` once it counts ``want`` members (polled with a deadline)."""
    deadline = time.monotonic() + timeout
    reply = None
    while time.monotonic() < deadline:
        reply = ask(ws, topic)
        if reply["total"] == want:
            return reply
        time.sleep(0.02)
    raise AssertionError("presence of %s never counted %d: %r" % (topic, want, reply))


@pytest.mark.timeout(60)
def test_presence_and_join_leave_cover_both_nodes(make_server, redis_url):
    a = make_server(redis_url=redis_url)
    b = make_server(redis_url=redis_url)
    lis = wsraw.connect(a.port)  # on node A, asked for join/leave
    assert wsraw.subscribe(lis, "room", 1, join_leave=True)["type"] == "ack"
    quiet = wsraw.connect(a.port)  # on node A, did not ask
    assert wsraw.subscribe(quiet, "room", 1)["type"] == "ack"
    assert [lis.recv_json(T)["type"]] == ["join"]  # quiet joined on the same node
    other = wsraw.connect(b.port)  # on node B
    assert wsraw.subscribe(other, "room", 1)["type"] == "ack"
    joined = lis.recv_json(T)
    assert joined["type"] == "join" and joined["topic"] == "room", joined
    # node B's own view and node A's view both count all three
    for ws in (other, quiet):
        reply = poll(ws, "room", 3)
        assert len({c["conn"] for c in reply["clients"]}) == 3
    assert ask(other, "room", stats=True)["clients"] == 3
    # messages and the events of node B arrive at node A in node B's order
    frames = [{"type": "publish", "topic": "room", "data": 1},
              {"type": "unsubscribe", "topic": "room", "id": "u"},
              {"type": "publish", "topic": "room", "data": 2},
              {"type": "subscribe", "topic": "room", "id": "s"},
              {"type": "publish", "topic": "room", "data": 3}]
    other.sock.sendall(b"".join(wsraw.encode_frame(1, json.dumps(f).encode()) for f in frames))
    got = [lis.recv_json(T) for _ in range(5)]
    kinds = [(g["type"], g.get("data")) for g in got]
    assert kinds == [("message", 1), ("leave", None), ("message", 2), ("join", None), ("message", 3)], got
    assert got[1]["client"]["conn"] == joined["client"]["conn"]
    assert [quiet.recv_json(T)["data"] for _ in range(3)] == [1, 2, 3]
    wsraw.expect_pong_next(quiet)  # no join or leave for one that did not ask
    # a disconnect on node B: a leave at node A, and presence follows everywhere
    other.close()
    left = lis.recv_json(T)
    assert left["type"] == "leave" and left["client"]["conn"] == joined["client"]["conn"]
    assert poll(quiet, "room", 2)["total"] == 2
    lis.close()
    quiet.close()


def late_listener(server) -> None:
    """Make ``server``'s broker listener, once up, apply new interest 0.2 s late (as on a
    loaded machine: what it subscribes to in Redis comes well after the interest was taken;
    the hub waits up to 2 s for it before an ack)."""
    broker = server.broker
    assert wsraw.wait_for(lambda: broker.healthy, timeout=T)
    real = broker._reconcile

    def late(*args, **kwargs):
        time.sleep(0.2)  # (the delay injected, not a wait for anything)
        return real(*args, **kwargs)

    broker._reconcile = late


@pytest.mark.timeout(60)
def test_the_ack_of_join_leave_comes_once_other_nodes_joins_reach_this_node(make_server, redis_url):
    """Joins and leaves are never replayed: a subscribe with join_leave is acked only once this
    node's broker gets the other nodes' joins, so a join right after the ack is not lost."""
    a = make_server(redis_url=redis_url)
    b = make_server(redis_url=redis_url)
    late_listener(a)
    lis = wsraw.connect(a.port)
    assert wsraw.subscribe(lis, "late", 1, join_leave=True)["type"] == "ack"
    other = wsraw.connect(b.port)
    assert wsraw.subscribe(other, "late", 1)["type"] == "ack"
    joined = lis.recv_json(T)
    assert (joined["type"], joined["topic"]) == ("join", "late"), joined
    # a listener of a topic already listened to on this node waits for nothing more
    second = wsraw.connect(a.port)
    assert wsraw.subscribe(second, "late", 1, join_leave=True)["type"] == "ack"
    assert lis.recv_json(T)["type"] == "join"
    other.close()
    for ws in (lis, second):
        left = ws.recv_json(T)
        assert (left["type"], left["client"]["conn"]) == ("leave", joined["client"]["conn"]), left
    for ws in (lis, second):
        ws.close()


@pytest.mark.timeout(60)
def test_a_refused_subscribe_does_not_withdraw_what_another_subscribe_waits_for(make_server, redis_url):
    """Two subscribes with join_leave on their way to their answers hold the broker's interest
    together: the refused one does not withdraw it under the other (whose ack would then come
    while this node is about to miss the other nodes' joins)."""
    a = make_server(redis_url=redis_url, max_subscriptions=1)
    b = make_server(redis_url=redis_url)
    broker = a.broker
    refused, lis = wsraw.connect(a.port), wsraw.connect(a.port)
    assert wsraw.subscribe(refused, "filler", 1)["type"] == "ack"  # at its limit from now on
    lis_waits, refused_answered = threading.Event(), threading.Event()
    real_wait, real_interest = broker.wait_join_leave, broker.interest
    calls = []

    def wait_join_leave(topic, timeout):
        if threading.current_thread().name == refused_thread:
            assert lis_waits.wait(T)  # both hold it before the refused one goes on
        else:
            lis_waits.set()
            assert refused_answered.wait(T)
        return real_wait(topic, timeout)

    def interest(pattern, on, acked=None):
        calls.append(on)
        real_interest(pattern, on, acked)

    broker.wait_join_leave, broker.interest = wait_join_leave, interest
    refused_thread = "wsbroadcast-conn-127.0.0.1:%d" % refused.sock.getsockname()[1]  # its reader
    refused.send_json({"type": "subscribe", "topic": "pair", "id": 2, "join_leave": True})
    lis.send_json({"type": "subscribe", "topic": "pair", "id": 1, "join_leave": True})
    assert refused.recv_json(T).get("code") == "too_many_subscriptions"
    refused_answered.set()
    assert lis.recv_json(T)["type"] == "ack"
    assert False not in calls, calls  # never withdrawn on the way
    other = wsraw.connect(b.port)
    assert wsraw.subscribe(other, "pair", 1)["type"] == "ack"
    joined = lis.recv_json(T)
    assert (joined["type"], joined["topic"]) == ("join", "pair"), joined
    for ws in (refused, lis, other):
        ws.close()


@pytest.mark.timeout(60)
def test_a_resync_of_presence_does_not_deadlock_with_a_publish(make_server, redis_url):
    """The presence thread's resync reads the hub's members (the hub's lock) while a publish,
    holding the hub's lock, sends this node's queued joins first: neither waits for the other."""
    srv = make_server(redis_url=redis_url, presence_ttl=3.0)  # a refresh every second
    broker = srv.broker
    entered, publishing = threading.Event(), threading.Event()
    real_snapshot, real_begin = broker._snapshot, broker._begin_publish

    def snapshot():
        entered.set()
        publishing.wait(T)  # until a publish holds the hub's lock and has a join to send first
        return real_snapshot()

    def begin_publish(items):
        publishing.set()
        return real_begin(items)

    broker._snapshot, broker._begin_publish = snapshot, begin_publish
    with broker._pending_lock:
        broker._resync = True  # as after a reconnect: the next refresh writes every member again
    assert entered.wait(T)
    ws = wsraw.connect(srv.port)
    try:
        assert wsraw.subscribe(ws, "dl", 1)["type"] == "ack"  # a join queued for redis
        reply = wsraw.request(ws, {"type": "publish", "topic": "dl", "data": 1, "id": "p"}, T)
        assert reply["type"] == "ack", reply
        assert publishing.is_set()
        # and the resync went through: another node counts the member
        assert wsraw.wait_for(lambda: not broker._resync, timeout=T)
        watcher = wsraw.connect(make_server(redis_url=redis_url).port)
        assert poll(watcher, "dl", 1)["total"] == 1
        watcher.close()
    finally:
        ws.close()


@pytest.mark.timeout(60)
def test_killed_node_leaves_presence_within_the_ttl(make_server, redis_url):
    a = make_server(redis_url=redis_url)
    watcher = wsraw.connect(a.port)
    with ServerProcess("--redis", redis_url, "--presence-ttl", "1.5") as b:
        member = wsraw.connect(b.port)
        assert wsraw.subscribe(member, "lobby", 1)["type"] == "ack"
        poll(watcher, "lobby", 1)
        # a refresh later it is still there (the node keeps its key alive)
        time.sleep(2.0)  # longer than the TTL: only a refresh can have kept the member
        assert ask(watcher, "lobby")["total"] == 1
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(T)
        killed_at = time.monotonic()
        poll(watcher, "lobby", 0, timeout=T)
        assert time.monotonic() - killed_at < 1.5 + 2.0 * SCALE
        member.close()
    watcher.close()


@pytest.mark.timeout(60)
def test_client_killed_on_another_node_leaves_after_the_keepalive(make_server, redis_url):
    a = make_server(redis_url=redis_url)
    b = make_server(redis_url=redis_url, ping_interval=1.5 * SCALE, ping_timeout=1.5 * SCALE,
                    close_timeout=0.5 * SCALE)
    watcher = wsraw.connect(a.port)
    assert wsraw.subscribe(watcher, "hall", 1, join_leave=True)["type"] == "ack"
    stuck = wsraw.connect(b.port, rcvbuf=4096)  # answers no ping from now on
    assert wsraw.subscribe(stuck, "hall", 1)["type"] == "ack"
    assert watcher.recv_json(T)["type"] == "join"
    assert poll(watcher, "hall", 2)["total"] == 2
    left = next_frame(watcher)  # node B's keepalive ends it: a leave, then presence follows
    assert left["type"] == "leave" and left["topic"] == "hall", left
    assert poll(watcher, "hall", 1)["total"] == 1
    stuck.close()
    watcher.close()
