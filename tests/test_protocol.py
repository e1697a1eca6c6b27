"""The wire protocol end to end: plain and v1 connections, acks, deliveries, order."""

from __future__ import annotations

import json
import threading

import pytest
import simple_websocket

import threadutil
import wsraw

from wsbroadcast import Client
from wsbroadcast.errors import TopicError

pytestmark = pytest.mark.timeout(60)


def test_two_plain_clients_get_the_seed_object(server):
    a = simple_websocket.Client.connect(server.url)
    b = simple_websocket.Client.connect(server.url)
    try:
        assert wsraw.wait_for(lambda: len(server.hub) == 2)
        sent = {"email": "ann@example.org", "content": "hello, world"}
        a.send(json.dumps(sent))
        assert json.loads(a.receive(timeout=5)) == sent
        assert json.loads(b.receive(timeout=5)) == sent
        # no ack for the seed form: the next frame the sender gets is the next message
        b.send(json.dumps({"n": 2}))
        assert json.loads(a.receive(timeout=5)) == {"n": 2}
    finally:
        a.close()
        b.close()


def test_plain_connection_gets_no_envelope_and_v1_does(server):
    plain = wsraw.connect(server.port, subprotocol=None)
    v1 = wsraw.connect(server.port)
    assert plain.subprotocol is None and v1.subprotocol == "wsbroadcast.v1"
    v1.send_json({"type": "subscribe", "topic": "broadcast", "id": 1})
    assert v1.recv_json()["type"] == "ack"
    assert wsraw.wait_for(lambda: len(server.hub._tree.match("broadcast")) == 2)
    server.publish("broadcast", {"k": [1, 2]})
    assert plain.recv_json() == {"k": [1, 2]}
    assert v1.recv_json() == {"type": "message", "topic": "broadcast", "seq": 1, "data": {"k": [1, 2]}}


def test_v1_subscribe_publish_ack_and_envelope(server):
    c = wsraw.connect(server.port)
    c.send_json({"type": "subscribe", "topic": "news.*", "id": "w1"})
    assert c.recv_json() == {"type": "ack", "id": "w1", "topic": "news.*"}
    c.send_json({"type": "subscribe", "topic": "sport.>", "id": 2})
    assert c.recv_json() == {"type": "ack", "id": 2, "topic": "sport.>"}
    c.send_json({"type": "subscribe", "topic": "exact", "id": 3})
    ack = c.recv_json()
    assert ack["seq"] == 0 and ack["recovered"] is True and isinstance(ack["epoch"], str)
    epoch = ack["epoch"]
    c.send_json({"type": "publish", "topic": "news.eu", "data": {"n": 1}, "id": 4})
    assert c.recv_json() == {"type": "ack", "id": 4, "topic": "news.eu", "seq": 1, "epoch": epoch}
    assert c.recv_json() == {"type": "message", "topic": "news.eu", "seq": 1, "data": {"n": 1}}
    # '*' matches one token only, '>' one or more
    c.send_json({"type": "publish", "topic": "news.eu.fr", "data": 0})
    c.send_json({"type": "publish", "topic": "sport", "data": 0})
    c.send_json({"type": "publish", "topic": "sport.a.b.c", "data": "deep"})
    assert c.recv_json() == {"type": "message", "topic": "sport.a.b.c", "seq": 1, "data": "deep"}
    # a publish without id gets no ack; the pong echoes the id
    c.send_json({"type": "ping", "id": [1, "x"]})
    assert c.recv_json() == {"type": "pong", "id": [1, "x"]}
    c.send_json({"type": "unsubscribe", "topic": "news.*", "id": 9})
    assert c.recv_json() == {"type": "ack", "id": 9, "topic": "news.*"}
    c.send_json({"type": "unsubscribe", "topic": "news.*", "id": 10})  # idempotent
    assert c.recv_json() == {"type": "ack", "id": 10, "topic": "news.*"}
    c.send_json({"type": "publish", "topic": "news.eu", "data": 2, "id": 11})
    assert c.recv_json()["type"] == "ack"
    c.send_json({"type": "ping"})
    assert c.recv_json() == {"type": "pong"}  # news.eu no longer delivered


def test_one_delivery_per_connection_with_overlapping_patterns(server):
    c = wsraw.connect(server.port)
    for i, p in enumerate(["a.b", "a.*", "a.>", "*.b"]):
        c.send_json({"type": "subscribe", "topic": p, "id": i})
        c.recv_json()
    server.publish("a.b", 1)
    assert c.recv_json()["seq"] == 1
    c.send_json({"type": "ping", "id": "end"})
    assert c.recv_json() == {"type": "pong", "id": "end"}


def test_ack_precedes_messages_published_after_subscribe(server):
    pub = Client.connect(server.url)
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            pub.publish("t", "x", ack=False)

    t = threadutil.start(publish, name="test-publisher")
    try:
        for _ in range(20):
            c = wsraw.connect(server.port)
            c.send_json({"type": "subscribe", "topic": "t", "id": 1})
            ack = c.recv_json()
            assert ack["type"] == "ack"
            first = c.recv_json()
            assert first["type"] == "message" and first["seq"] == ack["seq"] + 1
            c.close()
    finally:
        stop.set()
        t.finish(10)
        pub.close()


def test_per_topic_order_under_four_concurrent_publishers(server):
    n = 500
    topics = ["o.a", "o.b"]
    sub = Client.connect(server.url)
    sub.subscribe("o.*")
    pubs = [Client.connect(server.url) for _ in range(4)]

    def run(c, k):
        for i in range(n):
            c.publish(topics[i % 2], {"p": k, "i": i}, ack=(i % 50 == 0))

    threads = [threadutil.start(run, c, k, name="test-pub-%d" % k) for k, c in enumerate(pubs)]
    for t in threads:
        t.finish(60)
    seen = {t: [] for t in topics}
    per_publisher = {}
    for _ in range(4 * n):
        m = sub.recv(timeout=10)
        assert m is not None, "missing messages"
        seen[m.topic].append(m.seq)
        per_publisher.setdefault(m.data["p"], []).append(m.data["i"])
    for t in topics:
        assert seen[t] == list(range(1, len(seen[t]) + 1))
    for order in per_publisher.values():
        assert order == list(range(n))  # each publisher's own order is kept too
    for c in pubs + [sub]:
        c.close()


def test_server_publish_with_a_bad_topic_raises_and_stores_nothing(server):
    c = wsraw.connect(server.port)
    assert wsraw.subscribe(c, ">", 1)["type"] == "ack"
    for bad in ("a.*", "a.>", "", "a..b", 5):
        with pytest.raises(TopicError):
            server.publish(bad, 1)
    assert server.publish("a.b", "ok")[0] == 1  # the first seq: nothing was stored before
    assert c.recv_json() == {"type": "message", "topic": "a.b", "seq": 1, "data": "ok"}


def test_a_full_writer_channel_makes_producers_wait_and_loses_nothing(make_server):
    srv = make_server(queue_size=4)
    sub = wsraw.connect(srv.port)
    assert wsraw.subscribe(sub, "bp", 1)["type"] == "ack"
    gate, entered = threading.Event(), threading.Event()
    srv.writer.call(lambda: (entered.set(), gate.wait(30)))  # the writer is held
    assert entered.wait(10)
    published = [0]

    def produce():
        for i in range(1, 21):
            srv.publish("bp", i)
            published[0] = i

    producer = threadutil.start(produce, name="test-producer")
    try:
        # four fill the channel; the fifth waits for room (nothing is dropped or raised)
        assert wsraw.wait_for(lambda: published[0] == 4 and srv.writer.depth() == 4, timeout=10)
        assert producer.is_alive() and published[0] == 4
    finally:
        gate.set()
    producer.finish(10)
    got = [sub.recv_json(10) for _ in range(20)]
    assert [(m["seq"], m["data"]) for m in got] == [(i, i) for i in range(1, 21)]
    wsraw.expect_pong_next(sub)
