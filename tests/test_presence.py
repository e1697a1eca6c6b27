"""Presence, join/leave and subscriptions granted by the token, on one node (PROTOCOL.md "Presence")."""

from __future__ import annotations

import json
import time

import pytest

import wsraw
from conftest import SCALE
from httputil import http_json
from tokens import SECRET
from tokens import token as make_token

from wsbroadcast.presence import MAX_LISTED, Member, PresenceTable, merge


def bearer(tok: str) -> list:
    return [("Authorization", "Bearer " + tok)]


def connect(port: int, sub=None, subscribe=(">",), channels=None, subprotocol="wsbroadcast.v1",
            **kw) -> wsraw.RawWS:
    extra = {"channels": list(channels)} if channels is not None else None
    from wsbroadcast.auth import mint_token
    tok = mint_token(SECRET, sub=sub, subscribe=subscribe, publish=[">"], extra=extra)
    return wsraw.connect(port, subprotocol=subprotocol, headers=bearer(tok), **kw)


def ask(ws: wsraw.RawWS, topic: str, stats: bool = False, ident="q") -> dict:
    ws.send_json({"type": "presence_stats" if stats else "presence", "topic": topic, "id": ident})
    reply = ws.recv_json()
    assert reply.get("id") == ident, reply
    return reply


def members(ws: wsraw.RawWS, topic: str) -> list:
    reply = ask(ws, topic)
    assert reply["type"] == "presence", reply
    assert reply["total"] == len(reply["clients"])
    return [(c.get("sub"), c["conn"]) for c in reply["clients"]]


def subs_of(ws: wsraw.RawWS, topic: str) -> list:
    return [s for s, _ in members(ws, topic)]


def poll_subs(ws: wsraw.RawWS, topic: str, want: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout * SCALE
    got = None
    while time.monotonic() < deadline:
        got = subs_of(ws, topic)
        if got == want:
            return
        time.sleep(0.02)  # polling with a deadline, not a synchronisation
    raise AssertionError("presence of %s is %r, expected %r" % (topic, got, want))


@pytest.fixture
def auth_server(make_server):
    return make_server(secret=SECRET)


def test_presence_follows_subscribe_unsubscribe_and_disconnect(auth_server):
    port = auth_server.port
    watcher = connect(port, sub="watcher")
    ann, bob = connect(port, sub="ann"), connect(port, sub="bob")
    assert subs_of(watcher, "room") == []
    assert wsraw.subscribe(ann, "room", 1)["type"] == "ack"
    assert wsraw.subscribe(bob, "room", 1)["type"] == "ack"
    assert wsraw.subscribe(bob, "room", 2)["type"] == "ack"  # once a member, however often
    assert wsraw.subscribe(bob, "room.*", 3)["type"] == "ack"  # a wildcard makes no member
    reply = ask(watcher, "room")
    assert reply["total"] == 2 and [c["sub"] for c in reply["clients"]] == ["ann", "bob"]
    ids = {c["conn"] for c in reply["clients"]}
    assert len(ids) == 2 and all(isinstance(i, str) for i in ids)
    assert all(abs(c["joined"] - time.time()) < 60 for c in reply["clients"])
    assert subs_of(watcher, "room.x") == []
    assert ask(watcher, "room", stats=True) == {"type": "presence_stats", "id": "q", "topic": "room",
                                                "clients": 2, "users": 2}
    bob.send_json({"type": "unsubscribe", "topic": "room", "id": 4})
    assert bob.recv_json()["type"] == "ack"
    assert subs_of(watcher, "room") == ["ann"]  # the unsubscribe was acked: it is gone
    ann.close()
    poll_subs(watcher, "room", [])
    bob.close()
    watcher.close()


def test_presence_stats_counts_distinct_subs(auth_server):
    port = auth_server.port
    conns = [connect(port, sub="ann"), connect(port, sub="ann"), connect(port, sub="bob"),
             connect(port, sub=None)]
    for c in conns:
        assert wsraw.subscribe(c, "room", 1)["type"] == "ack"
    assert ask(conns[0], "room", stats=True)["clients"] == 4
    assert ask(conns[0], "room", stats=True)["users"] == 2  # no sub: counted in clients only
    listed = ask(conns[0], "room")["clients"]
    assert "sub" not in listed[3] and len({c["conn"] for c in listed}) == 4
    for c in conns:
        c.close()


def test_killed_client_leaves_after_keepalive_timeout(make_server):
    # (the watcher says nothing while the other connects: room for a loaded machine)
    srv = make_server(secret=SECRET, ping_interval=1.5 * SCALE, ping_timeout=1.5 * SCALE,
                      close_timeout=0.5 * SCALE)
    watcher = connect(srv.port, sub="watcher")
    stuck = connect(srv.port, sub="gone", rcvbuf=4096)
    assert wsraw.subscribe(stuck, "room", 1)["type"] == "ack"
    assert subs_of(watcher, "room") == ["gone"]
    # it never answers a ping again (and never reads): the keepalive ends it, presence follows
    deadline = time.monotonic() + 15 * SCALE
    while subs_of(watcher, "room") and time.monotonic() < deadline:
        watcher.send_json({"type": "ping", "id": "alive"})  # the watcher itself stays alive
        assert watcher.recv_json()["type"] == "pong"
        time.sleep(0.05)
    assert subs_of(watcher, "room") == []
    stuck.close()
    watcher.close()


def test_presence_needs_subscribe_permission(auth_server):
    port = auth_server.port
    limited = connect(port, sub="lim", subscribe=["public.*"])
    member = connect(port, sub="x")
    assert wsraw.subscribe(member, "private", 1)["type"] == "ack"
    reply = ask(limited, "private")
    assert reply["type"] == "error" and reply["code"] == "forbidden", reply
    assert ask(limited, "private", stats=True)["code"] == "forbidden"
    assert ask(limited, "public.a")["total"] == 0
    # a wildcard is not a topic; a missing one is bad_request
    assert ask(limited, "public.*")["code"] == "bad_topic"
    limited.send_json({"type": "presence", "id": 7})
    assert limited.recv_json()["code"] == "bad_request"
    # over HTTP, authorized as /history
    status, body = http_json(port, "GET", "/presence?topic=private",
                             headers=bearer(make_token(subscribe=["public.*"])))
    assert status == 403 and body["error"] == "forbidden"
    status, body = http_json(port, "GET", "/presence?topic=private")
    assert status == 401
    status, body = http_json(port, "GET", "/presence?topic=private.*",
                             headers=bearer(make_token(subscribe=[">"])))
    assert status == 400 and body["error"] == "bad_topic"
    status, body = http_json(port, "GET", "/presence?topic=private",
                             headers=bearer(make_token(subscribe=["private"])))
    assert status == 200 and body["total"] == 1 and body["users"] == 1, body
    assert [c["sub"] for c in body["clients"]] == ["x"]
    # the channels claim allows it too
    granted = connect(port, sub="g", subscribe=[], channels=["private"])
    assert granted.recv_json()["type"] == "subscribed"
    assert ask(granted, "private")["total"] == 2
    member.close()


def test_plain_connection_is_unchanged(auth_server):
    port = auth_server.port
    plain = connect(port, sub="p", subprotocol=None, channels=["room"])
    watcher = connect(port, sub="w")
    # no subscribed frame, no presence frame: a presence object is published on broadcast
    plain.send_json({"type": "presence", "topic": "broadcast", "id": 1})
    assert plain.recv_json() == {"type": "presence", "topic": "broadcast", "id": 1}
    # its automatic subscription makes it a member of broadcast, and nothing more
    assert subs_of(watcher, "broadcast") == ["p"]
    assert subs_of(watcher, "room") == []
    # join_leave is not read on a plain connection
    reply = wsraw.subscribe(plain, "room", 2, join_leave="yes")
    assert reply["type"] == "ack", reply


def test_join_leave_bad_values(auth_server):
    ws = connect(auth_server.port, sub="a")
    assert wsraw.subscribe(ws, "room", 1, join_leave="yes")["code"] == "bad_request"
    assert wsraw.subscribe(ws, "room.*", 2, join_leave=True)["code"] == "bad_request"
    assert wsraw.subscribe(ws, "room.*", 3, join_leave=False)["type"] == "ack"


def test_join_leave_in_order_with_messages_and_only_to_listeners(auth_server):
    port = auth_server.port
    listener = connect(port, sub="lis")
    assert wsraw.subscribe(listener, "room", 1, join_leave=True)["type"] == "ack"
    quiet = connect(port, sub="quiet")  # subscribed, did not ask
    assert wsraw.subscribe(quiet, "room", 1)["type"] == "ack"
    stopped = connect(port, sub="stopped")  # asked, then asked again without
    assert wsraw.subscribe(stopped, "room", 1, join_leave=True)["type"] == "ack"
    assert wsraw.subscribe(stopped, "room", 2)["type"] == "ack"
    assert [listener.recv_json()["client"]["sub"] for _ in range(2)] == ["quiet", "stopped"]
    actor = connect(port, sub="act")
    pub = lambda n: json.dumps({"type": "publish", "topic": "room", "data": n})  # noqa: E731
    # one batch: the hub carries it out in this order, under one lock
    actor.sock.sendall(b"".join(wsraw.encode_frame(1, t.encode()) for t in [
        pub(1),
        json.dumps({"type": "subscribe", "topic": "room", "id": "s", "join_leave": True}),
        pub(2),
        json.dumps({"type": "unsubscribe", "topic": "room", "id": "u"}),
        pub(3),
        json.dumps({"type": "subscribe", "topic": "room", "id": "s2"}),
    ]))
    got = [listener.recv_json() for _ in range(5)]
    client = got[1]["client"]
    assert client["sub"] == "act"
    assert got == [
        {"type": "message", "topic": "room", "seq": 1, "data": 1},
        {"type": "join", "topic": "room", "client": client},
        {"type": "message", "topic": "room", "seq": 2, "data": 2},
        {"type": "leave", "topic": "room", "client": client},
        {"type": "message", "topic": "room", "seq": 3, "data": 3},
    ]
    rejoined = listener.recv_json()
    assert rejoined["type"] == "join" and rejoined["client"]["conn"] == client["conn"]
    assert rejoined["client"]["joined"] >= client["joined"]
    # the actor: its own join and leave never reach it
    seen = [actor.recv_json()["type"] for _ in range(4)]
    assert seen == ["ack", "message", "ack", "ack"], seen  # s, message 2, u, s2
    wsraw.expect_pong_next(actor)
    # those who did not ask (or stopped) get only the messages
    for ws in (quiet, stopped):
        assert [ws.recv_json()["data"] for _ in range(3)] == [1, 2, 3]
        wsraw.expect_pong_next(ws)
    # a disconnect is a leave; an existing member's end is announced, new listener gets no backlog
    actor.close()
    left = listener.recv_json()
    assert left == {"type": "leave", "topic": "room", "client": rejoined["client"]}
    quiet.close()
    assert listener.recv_json()["client"]["sub"] == "quiet"
    wsraw.expect_pong_next(listener)


@pytest.mark.timeout(60)
def test_listener_that_stops_reading_is_a_slow_consumer(make_server):
    srv = make_server(secret=SECRET, max_outbox=16384, socket_sndbuf=4096, close_timeout=0.5 * SCALE)
    port = srv.port
    stuck = connect(port, sub="stuck", rcvbuf=4096)
    assert wsraw.subscribe(stuck, "room", 1, join_leave=True)["type"] == "ack"
    churn = connect(port, sub="c" * 200)  # a long sub: big join/leave frames
    watcher = connect(port, sub="w")
    sub = json.dumps({"type": "subscribe", "topic": "room"}).encode()
    unsub = json.dumps({"type": "unsubscribe", "topic": "room"}).encode()
    frames = b"".join(wsraw.encode_frame(1, t) for t in (sub, unsub) * 20)
    deadline = time.monotonic() + 30 * SCALE
    while srv.writer.stats.slow_consumers == 0 and time.monotonic() < deadline:
        churn.sock.sendall(frames)
        for _ in range(40):
            churn.recv_json()  # the acks
    assert srv.writer.stats.slow_consumers == 1
    poll_subs(watcher, "room", [])  # the stuck listener is gone (churn ended unsubscribed)
    churn.close()


@pytest.mark.timeout(60)
def test_join_behind_a_running_replay_keeps_its_place(make_server):
    srv = make_server(secret=SECRET, max_outbox=16384, socket_sndbuf=4096)
    big = "x" * 4000
    for i in range(100):
        srv.publish("hist", [i, big])
    listener = connect(srv.port, sub="lis", rcvbuf=4096)
    listener.send_json({"type": "subscribe", "topic": "hist", "id": 1, "since": 0, "join_leave": True})
    # it does not read yet: the replay waits for room, its live part is buffered meanwhile
    assert wsraw.wait_for(lambda: srv.hub._replaying == 1, 10 * SCALE)
    actor = connect(srv.port, sub="act")
    for frame in ({"type": "publish", "topic": "hist", "data": "live1", "id": "p1"},
                  {"type": "subscribe", "topic": "hist", "id": "s"},
                  {"type": "publish", "topic": "hist", "data": "live2", "id": "p2"}):
        actor.send_json(frame)
        assert actor.recv_json()["type"] == "ack"
    assert srv.hub._replaying == 1  # all of that happened during the replay
    got = []
    while not got or got[-1].get("data") != "live2":
        got.append(listener.recv_json(20 * SCALE))
    assert got[0]["type"] == "ack" and got[0]["seq"] == 100
    assert [g["seq"] for g in got[1:101]] == list(range(1, 101))
    assert [(g["type"], g.get("data")) for g in got[101:]] == [
        ("message", "live1"), ("join", None), ("message", "live2")], got[101:]
    assert got[102]["client"]["sub"] == "act"


def test_granted_subscriptions_come_first_and_see_every_later_message(auth_server):
    port = auth_server.port
    pub = connect(port, sub="pub")
    pub.send_json({"type": "publish", "topic": "room", "data": "old", "id": 1})
    assert pub.recv_json()["seq"] == 1
    for attempt in range(20):
        g = connect(port, sub="g", subscribe=[], channels=["room", "news.*", "room"])
        # published the moment the connection is open, from another connection
        pub.send_json({"type": "publish", "topic": "room", "data": attempt, "id": 2})
        pub.send_json({"type": "publish", "topic": "news.eu", "data": attempt})
        first = g.recv_json()
        assert first["type"] == "subscribed" and first["topic"] == "room" and first["seq"] >= 1, first
        assert set(first) == {"type", "topic", "seq", "epoch"}
        assert g.recv_json() == {"type": "subscribed", "topic": "news.*"}
        got = g.recv_json()
        assert got["type"] == "message" and got["topic"] == "room" and got["data"] == attempt, got
        assert got["seq"] == first["seq"] + 1
        assert g.recv_json()["topic"] == "news.eu"
        assert pub.recv_json()["type"] == "ack"
        g.close()
    poll_subs(pub, "room", [])  # the server has seen every one of those closes
    # ordinary subscriptions from then on: unsubscribe ends one, subscribe adds join_leave
    g = connect(port, sub="g", subscribe=[], channels=["room"])
    assert g.recv_json()["type"] == "subscribed"
    assert wsraw.subscribe(g, "room", 5, join_leave=True)["type"] == "ack"
    other = connect(port, sub="o")
    wsraw.subscribe(other, "room", 1)
    assert g.recv_json()["type"] == "join"
    g.send_json({"type": "unsubscribe", "topic": "room", "id": 6})
    assert g.recv_json()["type"] == "ack"
    assert subs_of(other, "room") == ["o"]


def test_granted_subscriptions_over_the_limit(make_server):
    srv = make_server(secret=SECRET, max_subscriptions=2)
    g = connect(srv.port, sub="g", subscribe=[], channels=["a", "b", "c"])
    assert g.recv_json()["topic"] == "a"
    assert g.recv_json()["topic"] == "b"
    err = g.recv_json()
    assert err["type"] == "error" and err["code"] == "too_many_subscriptions" and "id" not in err
    wsraw.expect_pong_next(g)


def test_bad_channels_claim_is_unauthorized(auth_server):
    from wsbroadcast.auth import mint_token
    for bad in ("room", ["a.>.b"], [1]):
        tok = mint_token(SECRET, sub="x", extra={"channels": bad})
        status, _h, _b = wsraw.handshake(auth_server.port, headers=bearer(tok))
        assert status == 401, bad


def test_table_lists_at_most_max_listed_with_the_total():
    table = PresenceTable()
    for i in range(MAX_LISTED):
        table.join("t", Member("n-%d" % i, "u%d" % (i % 7), 1000.0 + i))
    listed, subs = table.local("t")
    assert len(listed) == MAX_LISTED and len(subs) == 7
    table.join("t", Member("n-last", None, 5000.0))
    listed, subs = table.local("t")
    assert len(listed) == MAX_LISTED and table.count("t") == MAX_LISTED + 1
    assert listed[0].conn == "n-0" and "n-last" not in {m.conn for m in listed}
    view = merge([(table.count("t"), subs, listed), (2, ["zed"], [Member("m-1", "zed", 1.0)])])
    assert view.total == MAX_LISTED + 3 and view.users == 8 and len(view.listed) == MAX_LISTED
    assert view.listed[0].conn == "m-1"  # earliest joined first, over the nodes
    for i in range(MAX_LISTED):
        table.leave("t", "n-%d" % i)
    assert table.count("t") == 1 and table.local("t")[1] == []
    table.leave("t", "n-last")
    assert len(table) == 0


def test_python_client_presence_and_join_leave_callbacks(auth_server):
    import threading

    from wsbroadcast import Client
    from wsbroadcast.errors import ProtocolError
    url = "ws://127.0.0.1:%d/ws" % auth_server.port
    events = []
    seen = threading.Event()

    def on(kind):
        def callback(topic, client):
            events.append((kind, topic, client["sub"]))
            seen.set()
        return callback

    from wsbroadcast.auth import mint_token
    tok = lambda sub, **kw: mint_token(SECRET, sub=sub, publish=[">"], **kw)  # noqa: E731
    with Client(url, token=tok("lis", subscribe=["room"]), on_join=on("join"),
                on_leave=on("leave")) as lis:
        lis.subscribe("room", join_leave=True)
        with Client(url, token=tok("ann", subscribe=[], extra={"channels": ["room"]})) as ann:
            assert lis.presence_stats("room") == {"clients": 2, "users": 2}
            got = lis.presence("room")
            assert got["total"] == 2 and [c["sub"] for c in got["clients"]] == ["lis", "ann"]
            ann.publish("room", "hi")
            assert lis.recv(timeout=10).data == "hi"
            assert "room" in ann.subscriptions  # granted by its token
            assert events == [("join", "room", "ann")]  # before the message, in the same thread
        deadline = time.monotonic() + 10 * SCALE
        while len(events) < 2 and time.monotonic() < deadline:
            seen.wait(0.1)
        assert events == [("join", "room", "ann"), ("leave", "room", "ann")]
        with pytest.raises(ProtocolError) as err:
            lis.presence("other")
        assert err.value.code == "forbidden"
