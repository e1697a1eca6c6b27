"""The idle park (wsbroadcast/idlepark.py) and the futex table (wsbroadcast/futexhash.py).

Readers of idle connections wait in the park; it wakes them when their socket is
readable, at most ``slots`` at a time, those with input before those whose peer hung
up. Checked with real sockets and threads; the server-level storm is in test_storm.
"""

from __future__ import annotations

import ctypes
import json
import socket
import threading
from typing import List, Tuple

import pytest

import wsraw
from conftest import SCALE

from wsbroadcast.futexhash import ensure_slots
from wsbroadcast.idlepark import ENDING, LIVE, IdlePark

pytestmark = pytest.mark.timeout(60)
T = 10 * SCALE


class Parked:
    """A thread parked on one end of a socket pair; ``woken`` once the park let it go."""

    def __init__(self, park: IdlePark) -> None:
        self.park = park
        self.ours, self.peer = socket.socketpair()
        self.woken = threading.Event()
        self.got_slot: List[bool] = []
        self.thread = threading.Thread(target=self._run, name="test-parked", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.got_slot.append(self.park.park(self.ours))
        self.woken.set()

    def close(self) -> None:
        self.thread.join(T)
        self.ours.close()
        self.peer.close()


def park_many(park: IdlePark, n: int) -> List[Parked]:
    before = park.parked()
    out = [Parked(park) for _ in range(n)]
    assert wsraw.wait_for(lambda: park.parked() == before + n, T)
    return out


@pytest.fixture
def park():
    p = IdlePark(slots=2).start()
    yield p
    p.stop(T)


def test_a_parked_reader_wakes_when_its_socket_is_readable_and_holds_a_slot(park) -> None:
    [a] = park_many(park, 1)
    assert not a.woken.wait(0.2)  # nothing to read: it stays parked
    a.peer.send(b"x")
    assert a.woken.wait(T) and a.got_slot == [LIVE]
    assert park.parked() == 0 and park.status()["wakes"] == 1
    park.done()
    a.close()


def test_at_most_slots_woken_readers_run_at_once(park) -> None:
    ps = park_many(park, 5)
    for p in ps:
        p.peer.send(b"x")
    assert wsraw.wait_for(lambda: sum(p.woken.is_set() for p in ps) == 2, T)
    assert wsraw.wait_for(lambda: park.status()["queued"] == 3, T)
    assert sum(p.woken.is_set() for p in ps) == 2  # the other three wait for a slot
    for want in (3, 4, 5):
        park.done()  # a slot comes free: exactly one more runs
        assert wsraw.wait_for(lambda w=want: sum(p.woken.is_set() for p in ps) == w, T)
    park.done()
    park.done()
    for p in ps:
        assert p.got_slot == [LIVE]
        p.close()
    # every slot is free again: the next two wake at once
    more = park_many(park, 2)
    for p in more:
        p.peer.send(b"y")
    assert all(p.woken.wait(T) for p in more)
    park.done()
    park.done()
    for p in more:
        p.close()


def test_readers_with_input_go_before_those_whose_peer_hung_up() -> None:
    park = IdlePark(slots=1).start()
    try:
        busy, gone, live = park_many(park, 3)
        busy.peer.send(b"x")
        assert busy.woken.wait(T)  # it holds the one slot
        gone.peer.close()  # hung up first ...
        assert wsraw.wait_for(lambda: park.status()["queued"] == 1, T)
        live.peer.send(b"x")  # ... input later
        assert wsraw.wait_for(lambda: park.status()["queued"] == 2, T)
        park.done()
        assert live.woken.wait(T) and not gone.woken.is_set()
        park.done()
        assert gone.woken.wait(T)
        park.done()
        for p in (busy, gone, live):
            p.close()
    finally:
        park.stop(T)


def test_at_most_ending_slots_hung_up_readers_run_while_live_ones_take_the_other_slots() -> None:
    park = IdlePark(slots=3, ending_slots=1).start()
    try:
        gone = park_many(park, 3)
        live = park_many(park, 2)
        for p in gone:
            p.peer.close()  # three hang-ups: one runs, two wait for the one ending slot
        assert wsraw.wait_for(lambda: sum(p.woken.is_set() for p in gone) == 1, T)
        assert wsraw.wait_for(lambda: park.status()["queued"] == 2, T)
        for p in live:
            p.peer.send(b"x")  # input: the two other slots, at once
        assert all(p.woken.wait(T) for p in live)
        assert all(p.got_slot == [LIVE] for p in live)
        assert sum(p.woken.is_set() for p in gone) == 1
        first = next(p for p in gone if p.woken.is_set())
        assert first.got_slot == [ENDING]
        park.done(LIVE)
        park.done(LIVE)  # live slots free: the hung-up ones still wait for the ending slot
        assert not wsraw.wait_for(lambda: sum(p.woken.is_set() for p in gone) > 1, 0.2)
        for want in (2, 3):
            park.done(ENDING)
            assert wsraw.wait_for(lambda w=want: sum(p.woken.is_set() for p in gone) == w, T)
        park.done(ENDING)
        assert all(p.got_slot == [ENDING] for p in gone)
        for p in gone + live:
            p.close()
        with pytest.raises(ValueError):
            IdlePark(slots=2, ending_slots=0)
        other = IdlePark(slots=2, ending_slots=5)
        assert other.ending_slots == 2
        other.stop(T)
    finally:
        park.stop(T)


def test_stop_wakes_every_parked_and_waiting_reader_and_joins_the_thread() -> None:
    park = IdlePark(slots=1).start()
    ps = park_many(park, 3)
    ps[0].peer.send(b"x")
    ps[1].peer.send(b"x")  # woken by the kernel, waiting for the slot
    assert ps[0].woken.wait(T)
    assert wsraw.wait_for(lambda: park.status()["queued"] == 1, T)
    park.stop(T)
    assert all(p.woken.wait(T) for p in ps)
    assert not any(t.name == "wsbroadcast-idle-park" and t.is_alive() for t in threading.enumerate())
    # parking after the stop returns at once, without a slot
    late = Parked(park)
    assert late.woken.wait(T) and late.got_slot == [0]
    park.done()  # (the slots no longer count: harmless)
    for p in ps + [late]:
        p.close()


def test_parking_a_closed_socket_returns_at_once(park) -> None:
    a, b = socket.socketpair()
    a.close()
    assert park.park(a) == 0  # no slot
    b.close()
    with pytest.raises(ValueError):
        IdlePark(slots=0)


class SlowEpoll:
    """The park's epoll, with a hook run before a call goes through (a slow or racing epoll_ctl)."""

    def __init__(self, real, before=None) -> None:
        self.real = real
        self.before = before or {}

    def __getattr__(self, name):
        call = getattr(self.real, name)
        hook = self.before.get(name)
        if hook is None:
            return call

        def hooked(*args):
            hook(*args)
            return call(*args)
        return hooked


def test_a_reader_parks_while_another_is_inside_epoll_ctl() -> None:
    # epoll_ctl lets the GIL go: a parking reader inside it must not hold the lock that
    # every other parking reader (and the park's thread) needs
    inside, go_on = threading.Event(), threading.Event()
    first = []

    def slow_register(fd, mask):
        if not first:
            first.append(fd)
            inside.set()
            assert go_on.wait(T)

    park = IdlePark(slots=2)
    park._epoll = SlowEpoll(park._epoll, {"register": slow_register})
    park.start()
    try:
        a = Parked(park)
        assert inside.wait(T)  # a is inside its epoll_ctl
        b = Parked(park)
        assert wsraw.wait_for(lambda: park.parked() == 2, T)
        b.peer.send(b"x")
        assert b.woken.wait(T) and b.got_slot == [LIVE]  # served while a's call is not done
        assert not a.woken.is_set()
        go_on.set()
        a.peer.send(b"x")
        assert a.woken.wait(T) and a.got_slot == [LIVE]
        park.done()
        park.done()
        a.close()
        b.close()
    finally:
        go_on.set()
        park.stop(T)


def test_the_park_thread_wakes_readers_without_an_epoll_call_and_they_park_again() -> None:
    # a woken socket stays watched, disarmed: the park's thread makes no epoll_ctl call
    # (each would let the GIL go), and the reader's next park arms it again in one call
    calls: List[Tuple[str, str]] = []

    def record(name):
        return lambda *args: calls.append((name, threading.current_thread().name))

    park = IdlePark(slots=2)
    park._epoll = SlowEpoll(park._epoll, {n: record(n) for n in ("register", "modify", "unregister")})
    park.start()
    try:
        ours, peer = socket.socketpair()
        got: List[bool] = []

        def park_twice() -> None:
            got.append(park.park(ours))
            park.done()
            ours.recv(16)
            got.append(park.park(ours, watched=True))
            park.done()

        t = threading.Thread(target=park_twice, name="test-parked", daemon=True)
        t.start()
        assert wsraw.wait_for(lambda: park.parked() == 1, T)
        peer.send(b"a")
        assert wsraw.wait_for(lambda: len(got) == 1 and park.parked() == 1, T)
        peer.send(b"b")  # wakes it again: the socket was armed again
        t.join(T)
        assert got == [LIVE, LIVE] and park.status()["wakes"] == 2
        assert calls == [("register", "test-parked"), ("modify", "test-parked")]
        ours.close()
        peer.close()
    finally:
        park.stop(T)


def test_a_closed_socket_s_number_taken_by_a_new_one_is_watched_again(park) -> None:
    # closing a socket ends its watch: a new socket given the same number parks and wakes,
    # whether its reader says it was watched or not
    for watched in (False, True, False):
        a = Parked(park)
        assert wsraw.wait_for(lambda: park.parked() == 1, T)
        number = a.ours.fileno()
        a.peer.send(b"x")
        assert a.woken.wait(T)
        park.done()
        a.close()
        ours, peer = socket.socketpair()
        assert ours.fileno() == number or peer.fileno() == number
        side = ours if ours.fileno() == number else peer
        other = peer if side is ours else ours
        got: List[bool] = []
        t = threading.Thread(target=lambda g=got, s=side, w=watched: g.append(park.park(s, watched=w)),
                             name="test-parked", daemon=True)
        t.start()
        assert wsraw.wait_for(lambda: park.parked() == 1, T)
        other.send(b"y")
        t.join(T)
        assert got == [LIVE]
        park.done()
        ours.close()
        peer.close()


def _futex_slots() -> Tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(78, 2, 0, 0, 0), ctypes.get_errno()  # PR_FUTEX_HASH, GET_SLOTS


def test_the_futex_table_is_sized_for_the_threads_and_never_shrunk() -> None:
    got = ensure_slots(20000)
    current, errno = _futex_slots()
    if current < 0:  # a kernel before 6.16: nothing to size
        assert got is None and errno != 0
        return
    assert got is not None and got >= 32768 and current == got
    assert ensure_slots(100) == got  # never smaller
    assert _futex_slots()[0] == got


def test_idle_connections_park_and_are_served_when_they_speak(make_server) -> None:
    srv = make_server(ping_interval=0)
    park = srv._park
    assert park is not None
    clients = [wsraw.connect(srv.port) for _ in range(20)]
    for c in clients:
        assert wsraw.subscribe(c, "t")["type"] == "ack"
    # one input each since the upgrade: every reader waits in the park, none in recv
    assert wsraw.wait_for(lambda: park.parked() == 20, T), park.status()
    srv.publish("t", {"n": 1})  # deliveries do not need the readers
    for c in clients:
        assert c.recv_json(timeout=T)["data"] == {"n": 1}
    # a parked reader is woken by its client's publish, which every client gets
    clients[3].send_text(json.dumps({"type": "publish", "topic": "t", "data": 2, "id": "p"}))
    got = [clients[3].recv_json(timeout=T) for _ in range(2)]
    assert sorted(m["type"] for m in got) == ["ack", "message"], got
    for c in clients[:3] + clients[4:]:
        assert c.recv_json(timeout=T)["data"] == 2
    assert wsraw.wait_for(lambda: park.parked() == 20, T)
    assert srv.health()["idle_park"]["wakes"] >= 21
    for c in clients:
        c.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0 and park.parked() == 0, T)


def test_without_the_park_readers_wait_in_recv(make_server) -> None:
    srv = make_server(idle_park=False)
    assert srv._park is None and srv.health()["idle_park"] is None
    c = wsraw.connect(srv.port)
    assert wsraw.subscribe(c, "t")["type"] == "ack"
    c.send_text(json.dumps({"type": "publish", "topic": "t", "data": 1, "id": "p"}))
    got = [c.recv_json(timeout=T) for _ in range(2)]
    assert {m["type"] for m in got} == {"ack", "message"}
    c.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0, T)


def test_tls_connections_park_too_and_all_end_when_they_drop_at_once(make_server, tmp_path) -> None:
    import certs

    certfile, keyfile = certs.make_cert(str(tmp_path))
    srv = make_server(certfile=certfile, keyfile=keyfile, ping_interval=0)
    park = srv._park
    ctx = certs.client_context(certfile)
    clients = [wsraw.connect(srv.port, ssl_context=ctx, timeout=T) for _ in range(30)]
    for c in clients:
        assert wsraw.subscribe(c, "t")["type"] == "ack"
    # nothing decrypted is left: each waits in the park, on its raw socket
    assert wsraw.wait_for(lambda: park.parked() == 30, T), park.status()
    clients[0].send_text(json.dumps({"type": "publish", "topic": "t", "data": "over tls", "id": "p"}))
    got = [clients[0].recv_json(timeout=T) for _ in range(2)]
    assert sorted(m["type"] for m in got) == ["ack", "message"], got
    for c in clients[1:]:
        assert c.recv_json(timeout=T)["data"] == "over tls"
    for c in clients:
        c.sock.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0 and len(srv.hub) == 0, T)
    assert park.parked() == 0
