"""Property: whatever clients send, every frame and HTTP body the server sends is strict JSON.

PROTOCOL.md section 3: "every frame and body the server sends is strict JSON" (no NaN or
Infinity; no number beyond a double). Hypothesis writes JSON texts whose numbers include
overflowing exponents, huge integers and the NaN/Infinity literals Python would take, in every
field of every kind of frame, and sends them through real sockets to one command-line server:
on a v1 connection, on a plain one (the seed's form) and as POST /publish bodies. A v1
subscriber to everything and a plain subscriber read every delivery; /history is read back.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wsraw
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(120)

# ---------------------------------------------------------------- JSON texts, written by hand

NUMBERS = st.one_of(
    st.integers(-10 ** 20, 10 ** 20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e400", "-1e400", "1E+309", "-2.5e999", "1e308", "-1.7976931348623157e308",
                     "1e-400", "0.1e310", "NaN", "Infinity", "-Infinity", "1" + "0" * 310,
                     "-" + "9" * 308, str(2 ** 1024 - 2 ** 970), str(2 ** 1024 - 2 ** 971)]),
    st.tuples(st.integers(1, 9), st.integers(-400, 400)).map(lambda t: "%de%d" % t),
)
STRINGS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10).map(json.dumps),
    st.sampled_from(['"\\ud800"', '"[[[{{{"', '"NaN"', '"\\u0000"']),
)
SCALARS = st.one_of(NUMBERS, STRINGS, st.sampled_from(["null", "true", "false"]))


def _array(items):
    return "[" + ",".join(items) + "]"


def _object(pairs):
    return "{" + ",".join("%s:%s" % kv for kv in pairs) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(_array),
                            st.lists(st.tuples(STRINGS, inner), max_size=4).map(_object)),
    max_leaves=12)
TOPICS = st.sampled_from(['"broadcast"', '"t.a"', '"t.b"', '"t.*"', "1"])


@st.composite
def frames(draw) -> str:
    """One client text: a frame of a known type with drawn fields, the seed's form, or any value."""
    kind = draw(st.sampled_from(["publish", "subscribe", "unsubscribe", "ping", "other", "value"]))
    if kind == "value":
        return draw(VALUES)
    fields = [('"type"', json.dumps(kind))] if kind != "other" else []
    if kind in ("publish", "subscribe", "unsubscribe"):
        fields.append(('"topic"', draw(TOPICS)))
    if kind == "publish":
        fields.append(('"data"', draw(VALUES)))
    if kind == "subscribe" and draw(st.booleans()):
        fields.append(('"since"', draw(NUMBERS)))
    if draw(st.booleans()):
        fields.append(('"id"', draw(VALUES)))
    fields.extend(draw(st.lists(st.tuples(STRINGS, VALUES), max_size=2)))
    return _object(fields)


@st.composite
def bodies(draw) -> str:
    """A POST /publish body: mostly {"topic": T, "data": D} with drawn parts."""
    if draw(st.integers(0, 4)) == 0:
        return draw(VALUES)
    return _object([('"topic"', draw(TOPICS)), ('"data"', draw(VALUES))]
                   + draw(st.lists(st.tuples(STRINGS, VALUES), max_size=1)))


# ---------------------------------------------------------------- one server, long-lived peers

class Peers:
    """Connections kept across examples; every text frame any of them gets is checked strictly."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.v1 = wsraw.connect(port)
        self.plain = wsraw.connect(port, subprotocol=None)
        self.watcher = wsraw.connect(port)  # v1, subscribed to everything
        self.plain_watcher = wsraw.connect(port, subprotocol=None)
        for conn in (self.v1, self.plain):  # no Nagle wait behind a frame that gets no answer
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.watcher.send_text('{"type":"subscribe","topic":">","id":"w"}')
        assert self.read_until(self.watcher, lambda f: f.get("id") == "w")[-1]["type"] == "ack"
        self.latest = {}  # topic: the highest seq the watcher got

    def read_until(self, conn: wsraw.RawWS, done) -> list:
        got = []
        while True:
            payload = conn.recv_text(timeout=10)
            frame = wsraw.strict_loads(payload)  # raises on anything a strict parser refuses
            got.append(frame)
            if conn is self.watcher and frame.get("type") == "message":
                self.latest[frame["topic"]] = max(self.latest.get(frame["topic"], 0), frame["seq"])
            if isinstance(frame, dict) and done(frame):
                return got

    def sync(self) -> None:
        """Every sender's replies and every subscriber's deliveries so far have been read."""
        marker = uuid.uuid4().hex
        for conn in (self.v1, self.plain):
            conn.send_text('{"type":"ping","id":"%s"}' % marker)
            self.read_until(conn, lambda f: f == {"type": "pong", "id": marker})
        self.v1.send_text('{"type":"publish","topic":"broadcast","data":{"end":"%s"}}' % marker)
        self.read_until(self.watcher, lambda f: f.get("data") == {"end": marker})
        self.read_until(self.plain_watcher, lambda f: f == {"end": marker})


def http(port: int, request: bytes) -> int:
    status, _, body = wsraw.http_request(port, request, timeout=10)
    wsraw.strict_loads(body)
    return status


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("strict")
    env = {k: v for k, v in os.environ.items() if k not in ("WSBROADCAST_SECRET", "WSBROADCAST_API_KEY")}
    with ServerProcess("--store", str(folder / "h.db"), "--max-publish-rate", "0", env=env) as proc:
        p = Peers(proc.port)
        yield p
        assert proc.proc.poll() is None, "\n".join(proc.lines)
        assert proc.terminate() == 0


@settings(max_examples=int(os.environ.get("WSBROADCAST_STRICT_EXAMPLES", "100")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(v1_texts=st.lists(frames(), min_size=1, max_size=4), plain_texts=st.lists(frames(), max_size=3),
       body=bodies())
def test_every_frame_and_body_the_server_sends_is_strict_json(peers, v1_texts, plain_texts, body):
    peers.v1.send_texts(*v1_texts)
    if plain_texts:
        peers.plain.send_texts(*plain_texts)
    raw = body.encode("utf-8", "surrogatepass")
    status = http(peers.port, ("POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(raw)).encode() + raw)
    assert status in (200, 400), status
    peers.sync()
    for topic in ("broadcast", "t.a", "t.b"):  # the latest stored messages, read back
        since = max(0, peers.latest.get(topic, 0) - 20)
        assert http(peers.port, ("GET /history?topic=%s&since=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 "Connection: close\r\n\r\n" % (topic, since)).encode()) == 200
