"""RedisBroker against a private redis-server: the broker itself, then two server nodes on one Redis."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, List, Tuple

import pytest

import httputil
import threadutil
import wsraw
from conftest import SCALE
from httputil import health_status
from redis_server import RedisServer, require_redis_server
from wsraw import connect, wait_for

require_redis_server()

import redis  # noqa: E402

from wsbroadcast import Server  # noqa: E402
from wsbroadcast.broker import Publication  # noqa: E402
from wsbroadcast.broker_redis import RedisBroker  # noqa: E402
from wsbroadcast.errors import BrokerUnavailable  # noqa: E402

T = 10.0 * SCALE


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    """One redis-server for the module (no persistence); flushed before each test using it."""
    with RedisServer(str(tmp_path_factory.mktemp("redis"))) as rs:
        yield rs


@pytest.fixture
def rs(shared_redis):
    r = redis.Redis.from_url(shared_redis.url)
    r.flushall()
    r.close()
    return shared_redis


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone, with an append-only file (survives restarts)."""
    server = RedisServer(str(tmp_path / "redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def brokers():
    made: List[RedisBroker] = []

    def make(url: str, **kw: Any) -> RedisBroker:
        b = RedisBroker(url, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


class Sink:
    """A handler that records what a broker hands back."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pubs: List[Publication] = []

    def __call__(self, pubs) -> None:
        with self.cond:
            self.pubs.extend(pubs)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = T) -> List[Publication]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.pubs) < n and time.monotonic() < deadline:
                self.cond.wait(0.05)
            return list(self.pubs)

    def seqs(self, topic: str) -> List[int]:
        with self.cond:
            return [p.seq for p in self.pubs if p.topic == topic]


def listener_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wsbroadcast-redis"]


# --------------------------------------------------------------------------- the broker


def test_publish_latest_since_oldest(rs, brokers):
    b = brokers(rs.url, history_size=3)
    assert b.latest("t")[0] == 0
    epoch = b.latest("t")[1]
    assert b.latest("t") == (0, epoch)  # created once, then stable
    out = b.publish([("t", "1"), ("u", '"x"'), ("t", '{"a": 2}')])
    assert out == [(1, epoch), (1, out[1][1]), (2, epoch)]
    assert b.latest("t") == (2, epoch)
    msgs = b.since("t", 0, 10)
    assert [(m.topic, m.seq, m.data) for m in msgs] == [("t", 1, "1"), ("t", 2, '{"a": 2}')]
    assert abs(msgs[0].time - time.time()) < 60
    assert b.since("t", 1, 10)[0].seq == 2 and b.since("t", 0, 1)[0].seq == 1
    assert b.since("t", 2, 10) == [] and b.since("nothing", 0, 10) == []
    assert b.oldest("t") == 1 and b.oldest("nothing") == 0
    for i in range(5):
        b.publish([("t", str(i))])
    assert b.latest("t") == (7, epoch)
    assert [m.seq for m in b.since("t", 0, 10)] == [5, 6, 7]  # MAXLEN history_size
    assert b.oldest("t") == 5
    # another node sees the same numbering
    other = brokers(rs.url)
    assert other.latest("t") == (7, epoch)
    assert other.publish([("t", "8")]) == [(8, epoch)]


def test_since_bounded_by_bytes(rs, brokers):
    b = brokers(rs.url, history_size=100)
    sizes = [10, 20, 30, 40, 5, 5, 5, 1000]
    b.publish([("t", '"%s"' % ("x" * (n - 2))) for n in sizes])

    def page(since, max_bytes, limit=100):
        return [m.seq for m in b.since("t", since, limit, max_bytes)]

    assert page(0, None) == list(range(1, 9))
    assert page(0, 100) == [1, 2, 3, 4] and page(0, 99) == [1, 2, 3]
    assert page(0, 115) == [1, 2, 3, 4, 5, 6, 7]  # at the bound, read in batches
    assert page(0, 114) == [1, 2, 3, 4, 5, 6]
    assert page(7, 1) == [8]  # a message over the bound comes alone
    assert page(0, 10 ** 6, limit=5) == [1, 2, 3, 4, 5]
    assert page(8, 10) == []


def test_history_size_zero_still_counts(rs, brokers):
    b = brokers(rs.url, history_size=0)
    assert [s for s, _ in b.publish([("z", "1"), ("z", "2")])] == [1, 2]
    assert b.latest("z")[0] == 2
    assert b.since("z", 0, 10) == [] and b.oldest("z") == 0


def test_history_ttl_trims_on_publish_and_expires_quiet_topics(rs, brokers):
    b = brokers(rs.url, history_ttl=1.0)  # (long enough for the next call on a loaded machine)
    b.publish([("q", "1"), ("q", "2")])
    assert b.oldest("q") == 1
    time.sleep(1.2)  # past the TTL (the subject, not a wait for anything)
    b.publish([("q", "3")])
    assert [m.seq for m in b.since("q", 0, 10)] == [3]
    assert wait_for(lambda: b.oldest("q") == 0, timeout=5.0)  # the quiet stream expires
    assert b.latest("q")[0] == 3  # seqs live on


def test_epoch_changes_when_redis_loses_its_data(tmp_path, brokers):
    server = RedisServer(str(tmp_path / "r"), appendonly=False).start()
    try:
        b = brokers(server.url)
        sink = Sink()
        b.start(sink)
        (s1, e1), = b.publish([("e", "1")])
        b.interest("e", True, acked=1)
        assert b.wait_subscribed("e")
        b.publish([("e", "2")])
        assert [p.seq for p in sink.wait(1)] == [2]
        server.restart()  # no persistence: everything is gone
        assert wait_for(lambda: b.healthy and b.wait_subscribed("e", 0.1), timeout=T)
        (s2, e2), = b.publish([("e", "new")])
        assert s2 == 1 and e2 != e1
        pubs = sink.wait(2)
        assert (pubs[-1].seq, pubs[-1].epoch, pubs[-1].data) == (1, e2, "new")
    finally:
        server.stop()


def test_handback_in_order_from_another_node(rs, brokers):
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    b.start(sink)
    b.interest("o", True, acked=0)
    assert b.wait_subscribed("o")
    for i in range(1, 201):
        a.publish([("o", json.dumps(i))])
    pubs = sink.wait(200)
    assert [p.seq for p in pubs] == list(range(1, 201))
    assert [json.loads(p.data) for p in pubs] == list(range(1, 201))
    assert {p.epoch for p in pubs} == {a.latest("o")[1]}
    # nothing more (no duplicate): a marker published after, on the same path, comes next
    a.publish([("o", '"marker"')])
    assert [(p.seq, p.data) for p in sink.wait(201)[200:]] == [(201, '"marker"')]


def test_acked_topic_catches_up_what_came_before_the_subscription(rs, brokers):
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    b.start(sink)
    a.publish([("c", "1"), ("c", "2"), ("c", "3")])
    # the hub acked seq 1; 2 and 3 were published before the SUBSCRIBE took effect
    b.interest("c", True, acked=1)
    assert [p.seq for p in sink.wait(2)] == [2, 3]
    a.publish([("c", "4")])
    assert [p.seq for p in sink.wait(3)] == [2, 3, 4]


def test_refill_after_a_lost_pubsub_message(rs, brokers):
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    b.start(sink)
    b.interest("g", True, acked=0)
    assert b.wait_subscribed("g")
    a.publish([("g", "1")])
    sink.wait(1)
    # seqs 2 and 3 are stored but their PUBLISH never reached this node
    r = redis.Redis.from_url(rs.url)
    for seq in (2, 3):
        r.hincrby("wsb:topic:g", "seq", 1)
        r.xadd("wsb:stream:g", {"data": str(seq), "time": 0}, id="%d-0" % seq)
    r.close()
    a.publish([("g", "4")])
    pubs = sink.wait(4)
    assert [(p.seq, p.data) for p in pubs] == [(1, "1"), (2, "2"), (3, "3"), (4, "4")]
    # 2 and 3 came by refill; so does 4 when the refill reads the stream before 4's PUBLISH
    # arrives (seen on a loaded machine); either way each was handed back once, in order
    assert b.refilled in (2, 3), b.refilled


def test_a_pattern_sharing_a_subscribed_glob_is_waited_for_until_the_listener_applied_it(rs, brokers):
    """d.* and d.> are one Redis glob: the glob being confirmed must not make wait_subscribed
    say yes for d.> before the listener took d.> in (its messages were dropped meanwhile)."""
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    entered = threading.Event()
    release = threading.Event()

    def blocking(pubs) -> None:
        if any(p.topic == "d.block" for p in pubs):
            entered.set()
            release.wait(T)  # the listener is held here: it applies nothing new meanwhile
        sink(pubs)

    b.start(blocking)
    b.interest("d.*", True)
    assert b.wait_subscribed("d.*")
    a.publish([("d.block", "1")])
    assert entered.wait(T)
    b.interest("d.>", True)
    # the glob is confirmed, but d.> is not applied while the listener is held
    in_effect_once_released(a, b, sink, "d.>", "d.y.z", release)


def in_effect_once_released(a: RedisBroker, b: RedisBroker, sink: Sink, pattern: str, topic: str,
                            release: threading.Event) -> None:
    """``pattern`` is not in effect on ``b`` while its listener is held; released, it is, and
    none of 30 messages to ``topic`` published through ``a`` right after the yes is lost."""
    try:
        assert not b.wait_subscribed(pattern, timeout=0.3)
    finally:
        release.set()
    assert b.wait_subscribed(pattern, timeout=T)
    for i in range(30):
        a.publish([(topic, str(i))])
    assert wait_for(lambda: len(sink.seqs(topic)) == 30, timeout=T)
    assert sink.seqs(topic) == list(range(1, 31))


@pytest.mark.timeout(30)
def test_a_new_pattern_is_never_withdrawn_from_the_broker_on_its_way_to_the_ack(rs, make_server):
    """The early interest a pattern's subscribe takes (waited for before the ack) is kept by
    the subscription, never withdrawn and taken again: in between, the listener could leave
    the Redis subscription and lose what was published meanwhile."""
    srv = make_server(redis_url=rs.url, max_subscriptions=1)
    broker = srv.broker
    calls: List[Tuple[str, bool]] = []
    real = broker.interest

    def recorded(pattern: str, on: bool, acked: Any = None) -> None:
        calls.append((pattern, on))
        real(pattern, on, acked)

    broker.interest = recorded
    ws = connect(srv.port)
    try:
        assert wsraw.subscribe(ws, "w.*", 1)["type"] == "ack"
        refused = wsraw.subscribe(ws, "v.>", 2)  # over the limit: its early interest is withdrawn
        assert refused.get("code") == "too_many_subscriptions", refused
        # (taking interest again is harmless: the broker keeps a set)
        assert [c for c in calls if c[0] == "w.*"] == [("w.*", True)] * len(calls[:-2]), calls
        assert calls[-2:] == [("v.>", True), ("v.>", False)], calls
        # the same for the joins and leaves of a topic: taken before the ack, withdrawn when refused
        del calls[:]
        refused = wsraw.subscribe(ws, "jl", 3, join_leave=True)
        assert refused.get("code") == "too_many_subscriptions", refused
        assert [on for _name, on in calls] == [True, False] and calls[0][0] == calls[1][0], calls
        assert wsraw.subscribe(ws, "w.*", 4, join_leave=True).get("code") == "bad_request"
        wsraw.expect_pong_next(ws)
    finally:
        ws.close()


def test_a_pattern_withdrawn_and_wanted_again_is_waited_for_until_subscribed_again(rs, brokers):
    """Withdrawn, then wanted again before the listener applied the withdrawal: the Redis
    subscription still in effect is about to go, so wait_subscribed must not say yes on it."""
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    b.start(sink)
    b.interest("q.*", True)
    assert b.wait_subscribed("q.*")
    taken, release = threading.Event(), threading.Event()
    real = b._take_interest

    def held():
        out = real()
        if "q.*" not in out[0]:  # the withdrawal, taken: the listener stops here a while
            taken.set()
            release.wait(T)
        return out

    b._take_interest = held
    b.interest("q.*", False)
    assert taken.wait(T)
    b.interest("q.*", True)
    in_effect_once_released(a, b, sink, "q.*", "q.x", release)


def test_a_subscribe_reply_due_from_before_an_unsubscribe_does_not_confirm_the_next_subscribe(rs, brokers):
    """PSUBSCRIBE, PUNSUBSCRIBE, PSUBSCRIBE of one name sent before any reply is read: the
    first PSUBSCRIBE reply is the first command's, so the name is in effect only at the second."""
    b = brokers(rs.url)
    b.start(Sink())
    b.interest("warm", True)
    assert b.wait_subscribed("warm")
    name = b._name("u.*")
    real_reconcile, real_confirmed = b._reconcile, b._on_confirmed
    done: List[bool] = []
    seen: List[bool] = []  # at each PSUBSCRIBE reply: in effect?

    def reconcile(*args: Any, **kwargs: Any) -> None:
        real_reconcile(*args, **kwargs)
        if b._sent.get(name) and not done:  # the first PSUBSCRIBE is sent: withdraw, want again
            done.append(True)
            for on in (False, True):
                b.interest("u.*", on)
                real_reconcile(*args, **kwargs)

    def confirmed(n: str) -> None:
        real_confirmed(n)
        if n == name:
            seen.append("u.*" in b._in_effect)  # (the listener's thread: nothing moves meanwhile)

    b._reconcile, b._on_confirmed = reconcile, confirmed
    b.interest("u.*", True)
    assert b.wait_subscribed("u.*", timeout=T)
    assert seen == [False, True], seen


@pytest.mark.timeout(60)
def test_a_batch_of_new_patterns_waits_for_the_broker_once_not_once_each(rs, make_server):
    """While the listener takes up no interest (Redis slow or away), a batch of subscribes to
    new patterns is answered after one wait (EARLY_WAIT, 2 s), not one wait per pattern."""
    srv = make_server(redis_url=rs.url)
    broker = srv.broker
    assert wait_for(lambda: broker.healthy, timeout=T)
    release = threading.Event()
    real = broker._take_interest

    def stuck():
        release.wait(T)  # the listener applies nothing new meanwhile
        return real()

    broker._take_interest = stuck
    ws = connect(srv.port)
    try:
        frames = [{"type": "subscribe", "topic": "b%d.*" % i, "id": i} for i in range(5)]
        started = time.monotonic()
        ws.sock.sendall(b"".join(wsraw.encode_frame(1, json.dumps(f).encode()) for f in frames))
        answers = [ws.recv_json(T) for _ in frames]
        took = time.monotonic() - started
        assert [a["type"] for a in answers] == ["ack"] * 5, answers
        assert took < 2.0 + 4.0 * SCALE, took  # one wait per pattern: 10 s
    finally:
        release.set()
        ws.close()


def test_channel_and_pattern_hand_back_once(rs, brokers):
    a = brokers(rs.url)
    b = brokers(rs.url)
    sink = Sink()
    b.start(sink)
    b.interest("d.x", True, acked=0)
    b.interest("d.*", True)
    b.interest("d.>", True)
    for p in ("d.x", "d.*", "d.>"):
        assert b.wait_subscribed(p)
    for i in range(50):
        a.publish([("d.x", str(i)), ("d.y", str(i)), ("d.y.z", str(i)), ("e.x", str(i))])
    sink.wait(150)
    # a marker on the channel and both patterns, published after: all else arrives before it
    a.publish([("d.x", '"marker"')])
    assert wait_for(lambda: sink.seqs("d.x")[-1:] == [51], timeout=T)
    assert sink.seqs("d.x") == list(range(1, 52))
    assert sink.seqs("d.y") == list(range(1, 51))
    assert sink.seqs("d.y.z") == list(range(1, 51))
    assert sink.seqs("e.x") == []
    assert b.duplicates >= 50
    # losing d.* keeps d.> (same Redis glob): still one copy of everything
    b.interest("d.*", False)
    a.publish([("d.y", "late")])
    assert wait_for(lambda: sink.seqs("d.y") == list(range(1, 52)), timeout=T)
    b.interest("d.>", False)
    b.interest("d.x", False)
    assert wait_for(lambda: b.status()["subscriptions"] == 0, timeout=T)
    b.interest("mark", True)
    assert b.wait_subscribed("mark")
    a.publish([("d.x", "gone")])
    a.publish([("mark", '"marker"')])  # same publisher, same listener: "gone" would come first
    assert wait_for(lambda: sink.seqs("mark") == [1], timeout=T)
    assert sink.seqs("d.x") == list(range(1, 52))


def test_glob_specials_in_the_prefix_are_escaped(rs, brokers):
    a = brokers(rs.url, key_prefix="x[1]*?:")
    b = brokers(rs.url, key_prefix="x[1]*?:")
    noise = brokers(rs.url, key_prefix="x1zz:")
    sink = Sink()
    b.start(sink)
    b.interest("w.*", True)
    assert b.wait_subscribed("w.*")
    noise.publish([("w.a", '"noise"')])
    a.publish([("w.a", '"real"')])
    noise.publish([("w.a", '"noise"')])
    a.publish([("w.a", '"marker"')])  # Redis hands out in publish order: noise would come first
    sink.wait(2)
    assert [(p.topic, p.data) for p in sink.pubs] == [("w.a", '"real"'), ("w.a", '"marker"')]


def test_unavailable_while_redis_is_away_then_reconnect_and_refill(own_redis, brokers):
    a = brokers(own_redis.url, reconnect_max=0.5)
    b = brokers(own_redis.url, reconnect_max=0.5)
    sink = Sink()
    b.start(sink)
    a.start(Sink())
    b.interest("k", True, acked=0)
    b.interest("k2.*", True)
    assert b.wait_subscribed("k") and b.wait_subscribed("k2.*")
    acked = [s for s, _ in a.publish([("k", "1"), ("k", "2"), ("k2.a", "1")])]
    sink.wait(3)
    assert b.healthy
    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        a.publish([("k", "lost")])
    # refused at once: no retry loop (the connect and socket timeouts are 1 s and 2 s)
    assert time.monotonic() - started < 3.0 * SCALE
    with pytest.raises(BrokerUnavailable):
        a.latest("k")
    assert wait_for(lambda: not a.healthy and not b.healthy, timeout=T)
    assert a.status()["healthy"] is False
    own_redis.start()
    # publish at once, before b's listener is back: b must catch these up from the stream
    deadline = time.monotonic() + T
    while True:
        try:
            more = a.publish([("k", "3"), ("k", "4"), ("k2.a", "2")])
            break
        except BrokerUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert [s for s, _ in more] == [3, 4, 2]
    pubs = sink.wait(6)
    assert [(p.topic, p.seq) for p in pubs if p.topic == "k"] == [("k", s) for s in (1, 2, 3, 4)]
    assert [(p.topic, p.seq) for p in pubs if p.topic == "k2.a"] == [("k2.a", 1), ("k2.a", 2)]
    assert wait_for(lambda: a.healthy and b.healthy, timeout=T)
    assert b.reconnects >= 1
    assert [m.seq for m in a.since("k", 0, 10)] == acked[:2] + [3, 4]


def test_close_joins_the_listener(rs):
    before = len(listener_threads())
    b = RedisBroker(rs.url)
    b.start(Sink())
    assert len(listener_threads()) == before + 1
    b.interest("t", True, acked=0)
    b.close()
    assert len(listener_threads()) == before
    b.close()  # idempotent


# --------------------------------------------------------------------------- two nodes


@pytest.fixture
def nodes(make_server):
    """Servers on one Redis: nodes(url, n) -> [Server, ...]."""

    def make(url: str, n: int = 2, **settings: Any) -> List[Server]:
        return [make_server(redis_url=url, **settings) for _ in range(n)]

    return make


def subscribe(port: int, topic: str, **extra: Any):
    """A new connection subscribed to ``topic``: (RawWS, its ack)."""
    ws = connect(port)
    ack = wsraw.subscribe(ws, topic, "s", T, **extra)
    assert ack["type"] == "ack", ack
    return ws, ack


def collect(ws, n: int, timeout: float = T) -> List[dict]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = ws.recv_json(max(0.01, deadline - time.monotonic()))
        if msg.get("type") == "message":
            out.append(msg)
    return out


def assert_marker_next(publish: Callable[[str, Any], Tuple[int, Any]], topic: str, *subs: Any) -> None:
    """Nothing more is on its way: a marker published after, on the same path, comes next to each."""
    seq, _epoch = publish(topic, "marker")
    for ws in subs:
        msg = ws.recv_json(T)
        assert msg == {"type": "message", "topic": topic, "seq": seq, "data": "marker"}, msg


def http_publisher_of(port: int) -> Callable[[str, Any], Tuple[int, Any]]:
    return lambda topic, data: (httputil.publish_ok(port, topic, data)["seq"], None)


def test_two_nodes_concurrent_publishers_in_order(rs, nodes):
    a, b = nodes(rs.url)
    subs = [subscribe(b.port, "news")[0], subscribe(a.port, "news")[0], subscribe(b.port, "news")[0]]
    per = 60
    errors: List[BaseException] = []
    acked: List[int] = []
    lock = threading.Lock()

    def ws_publisher(port: int, name: str) -> None:
        try:
            ws = connect(port)
            for i in range(per):
                ws.send_json({"type": "publish", "topic": "news", "data": [name, i], "id": i})
                ack = ws.recv_json(T)
                assert ack["type"] == "ack", ack
                with lock:
                    acked.append(ack["seq"])
            ws.close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def http_publisher(port: int, name: str) -> None:
        try:
            for i in range(per):
                status, body = httputil.publish(port, "news", [name, i])
                assert status == 200, body
                with lock:
                    acked.append(body["seq"])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threadutil.start(ws_publisher, a.port, "wa", name="test-wa"),
               threadutil.start(ws_publisher, b.port, "wb", name="test-wb"),
               threadutil.start(http_publisher, a.port, "ha", name="test-ha"),
               threadutil.start(http_publisher, b.port, "hb", name="test-hb")]
    for t in threads:
        t.finish(3 * T)
    assert not errors, errors
    total = 4 * per
    assert sorted(acked) == list(range(1, total + 1))
    for ws in subs:
        msgs = collect(ws, total)
        assert [m["seq"] for m in msgs] == list(range(1, total + 1))
        assert all(m["topic"] == "news" for m in msgs)
        for name in ("wa", "wb", "ha", "hb"):  # each publisher's own order survives
            assert [m["data"][1] for m in msgs if m["data"][0] == name] == list(range(per))
    assert_marker_next(http_publisher_of(a.port), "news", *subs)
    for ws in subs:
        ws.close()


def test_reconnect_to_another_node_recovers_from_the_shared_stream(rs, nodes):
    a, b = nodes(rs.url)
    ws, ack = subscribe(a.port, "r")
    epoch = ack["epoch"]
    for i in range(1, 4):
        a.publish("r", i)
    assert [m["seq"] for m in collect(ws, 3)] == [1, 2, 3]
    ws.close()
    for i in range(4, 9):
        a.publish("r", i)
    ws2, ack2 = subscribe(b.port, "r", since=3, epoch=epoch)
    assert (ack2["seq"], ack2["epoch"], ack2["recovered"]) == (8, epoch, True)
    a.publish("r", 9)
    msgs = collect(ws2, 6)
    assert [(m["seq"], m["data"]) for m in msgs] == [(s, s) for s in range(4, 10)]
    assert_marker_next(a.publish, "r", ws2)
    ws2.close()


def test_wildcards_across_nodes(rs, nodes):
    a, b = nodes(rs.url)
    ws, ack = subscribe(b.port, "sport.*")
    assert ack == {"type": "ack", "id": "s", "topic": "sport.*"}
    ws_all, _ = subscribe(b.port, "sport.>")
    # the hub acks a pattern before Redis has the PSUBSCRIBE (see the report)
    assert b.broker.wait_subscribed("sport.*") and b.broker.wait_subscribed("sport.>")
    a.publish("sport.tennis", "t1")
    a.publish("sport.golf.uk", "g1")
    a.publish("news.x", "n")
    a.publish("sport.tennis", "t2")
    msgs = collect(ws, 2)
    assert [(m["topic"], m["seq"], m["data"]) for m in msgs] == [("sport.tennis", 1, "t1"), ("sport.tennis", 2, "t2")]
    msgs = collect(ws_all, 3)
    assert sorted((m["topic"], m["seq"], m["data"]) for m in msgs) == [
        ("sport.golf.uk", 1, "g1"), ("sport.tennis", 1, "t1"), ("sport.tennis", 2, "t2")]
    assert_marker_next(a.publish, "sport.tennis", ws, ws_all)
    ws.close()
    ws_all.close()


def test_redis_outage_nodes_survive_and_no_acked_message_is_lost(own_redis, nodes):
    a, b = nodes(own_redis.url)
    for srv in (a, b):
        srv.broker.reconnect_max = 0.5  # the servers' brokers use the default; keep the test short
    sub, _ = subscribe(b.port, "o")
    pub = connect(a.port)
    acked: List[int] = []

    def ws_publish(ws, i: int) -> dict:
        ws.send_json({"type": "publish", "topic": "o", "data": i, "id": i})
        return ws.recv_json(T)

    for i in range(5):
        reply = ws_publish(pub, i)
        assert reply["type"] == "ack"
        acked.append(reply["seq"])
    assert [m["seq"] for m in collect(sub, 5)] == [1, 2, 3, 4, 5]
    assert health_status(a.port) == "ok" and health_status(b.port) == "ok"

    own_redis.stop()
    reply = ws_publish(pub, 100)
    assert reply["type"] == "error" and reply["id"] == 100, reply
    status, body = httputil.publish(b.port, "o", 101)
    assert status == 503 and body["error"] == "unavailable", body
    assert wait_for(lambda: health_status(a.port) == "degraded" and health_status(b.port) == "degraded", timeout=T)
    # connections stay up
    for ws in (sub, pub):
        ws.send_json({"type": "ping", "id": "p"})
        assert ws.recv_json(T) == {"type": "pong", "id": "p"}
    time.sleep(1.0)

    own_redis.start()
    deadline = time.monotonic() + T
    i = 5
    while len(acked) < 10:
        reply = ws_publish(pub, i)
        if reply["type"] == "ack":
            acked.append(reply["seq"])
            i += 1
        else:
            assert time.monotonic() < deadline, reply
            time.sleep(0.05)
    status, body = httputil.publish(b.port, "o", 10)
    assert status == 200
    acked.append(body["seq"])
    assert acked == list(range(1, 12))
    msgs = collect(sub, 6)
    assert [(m["seq"], m["data"]) for m in msgs] == [(s, s - 1) for s in range(6, 12)]
    assert wait_for(lambda: health_status(a.port) == "ok" and health_status(b.port) == "ok", timeout=T)
    stored = b.broker.since("o", 0, 100)
    assert [m.seq for m in stored] == acked
    assert_marker_next(http_publisher_of(b.port), "o", sub)
    sub.close()
    pub.close()
