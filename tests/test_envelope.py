"""Property tests of envelope.py (PROTOCOL.md sections 3 and 4) and wsframe.py (RFC 6455 5.2)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from wsbroadcast import envelope, wsframe
from wsbroadcast.envelope import (
    PLAIN,
    SEED_TOPIC,
    V1,
    Invalid,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    ack_text,
    encode_json,
    error_text,
    has_id,
    message_text,
    parse_client_frame,
    pong_text,
)
from wsbroadcast.errors import ErrorCode

pytestmark = pytest.mark.timeout(120)

COMMANDS = (Subscribe, Unsubscribe, Publish, Ping, Invalid)
#: the error codes a WebSocket client may see (PROTOCOL.md section 4), plus a store failure
FRAME_ERROR_CODES = {"bad_json", "bad_request", "bad_topic", "unknown_type", "forbidden",
                     "rate_limited", "too_many_subscriptions", "internal_error"}

# ---------------------------------------------------------------- strategies

#: JSON values as Python's json module produces them (no NaN/Infinity; any text without lone surrogates)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20)

legal_token = st.text(alphabet="abcXYZ019_-:@", min_size=1, max_size=6)
topics = st.lists(legal_token, min_size=1, max_size=4).map(".".join)
patterns = st.one_of(topics, topics.map(lambda t: t + ".*"), topics.map(lambda t: t + ".>"),
                     st.just(">"), st.just("*"), topics.map(lambda t: "*." + t))

TYPES = ["subscribe", "unsubscribe", "publish", "ping", "dance", "", "PUBLISH"]


@st.composite
def frame_like_objects(draw):
    """Objects that look like client frames: known and unknown types, right and wrong fields."""
    obj = {}
    if draw(st.booleans()):
        obj["type"] = draw(st.one_of(st.sampled_from(TYPES), json_values))
    for field, good in (("topic", st.one_of(topics, patterns)), ("data", json_values), ("id", json_values),
                        ("since", st.integers(-3, 10)), ("epoch", st.text(max_size=8))):
        if draw(st.booleans()):
            obj[field] = draw(st.one_of(good, json_values)) if draw(st.booleans()) else draw(good)
    extra = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
    for k, v in extra.items():
        obj.setdefault(k, v)
    return obj


jsonish_chunks = st.sampled_from(['{', '}', '[', ']', '"', ':', ',', '"type"', '"publish"', '"topic"',
                                  '"a.b"', 'true', 'null', 'NaN', 'Infinity', '-', '1e999', '0', '\\', '\\u',
                                  ' ', '\n', 'é', '"\\"', '{"type":"ping"}'])
jsonish_text = st.lists(jsonish_chunks, max_size=30).map("".join)


def _check_command(cmd, kind):
    assert isinstance(cmd, COMMANDS), cmd
    if isinstance(cmd, Invalid):
        assert str(cmd.code) in FRAME_ERROR_CODES
        assert isinstance(cmd.message, str) and cmd.message
        json.loads(error_text(cmd.id, cmd.code, cmd.message))
    elif isinstance(cmd, Publish):
        json.loads(cmd.data)  # the data is JSON text
    elif isinstance(cmd, (Subscribe, Unsubscribe)):
        assert isinstance(cmd.topic, str)


# ---------------------------------------------------------------- never raises

@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(max_size=60), jsonish_text), st.sampled_from([PLAIN, V1]))
@example("", V1)
@example("[" * 100000, V1)
@example('{"a":' * 100000, PLAIN)
@example('{"type":"publish","topic":"a","data":' + "[" * 5000 + "]" * 5000 + "}", V1)
@example('{"type":"publish","topic":"a","data":NaN}', V1)
@example('{"type":"publish","topic":"a","data":1e999}', V1)
@example("\ufeff{}", PLAIN)
def test_random_text_never_raises(text, kind):
    _check_command(parse_client_frame(text, kind), kind)


@settings(max_examples=600, deadline=None)
@given(st.one_of(json_values, frame_like_objects()), st.sampled_from([PLAIN, V1]))
def test_random_json_values_never_raise(value, kind):
    text = json.dumps(value)
    cmd = parse_client_frame(text, kind)
    _check_command(cmd, kind)
    if not isinstance(value, dict):
        assert cmd == Invalid(ErrorCode.BAD_REQUEST, cmd.message, cmd.id) and not has_id(cmd.id)


@settings(max_examples=600, deadline=None)
@given(frame_like_objects())
def test_plain_connection_publishes_unknown_objects_verbatim_on_broadcast(obj):
    text = json.dumps(obj, indent=1)  # spacing kept: the text goes out as it came
    cmd = parse_client_frame(text, PLAIN)
    known = obj.get("type") in ("subscribe", "unsubscribe", "publish", "ping")
    if not known:
        assert cmd == Publish(SEED_TOPIC, text, cmd.id) and not has_id(cmd.id)
        assert parse_client_frame(text, V1).code == ErrorCode.UNKNOWN_TYPE  # never a broadcast on v1
    else:
        assert not (isinstance(cmd, Publish) and cmd.data == text and cmd.topic == SEED_TOPIC
                    and obj.get("topic") != SEED_TOPIC)


@settings(max_examples=300, deadline=None)
@given(frame_like_objects())
def test_v1_unknown_or_missing_type_is_unknown_type_with_id(obj):
    assume(obj.get("type") not in ("subscribe", "unsubscribe", "publish", "ping"))
    cmd = parse_client_frame(json.dumps(obj), V1)
    assert isinstance(cmd, Invalid) and cmd.code == ErrorCode.UNKNOWN_TYPE
    if "id" in obj:
        assert cmd.id == obj["id"]
    else:
        assert not has_id(cmd.id)


# ---------------------------------------------------------------- round trips

def _same_json(a, b):
    """Equality of JSON values where -0.0 == 0.0 and 1 != True."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=400, deadline=None)
@given(patterns, st.one_of(st.none(), json_values), st.sampled_from([PLAIN, V1]),
       st.one_of(st.none(), st.integers(0, 2 ** 40)), st.one_of(st.none(), st.text(max_size=10)))
def test_subscribe_round_trip(pattern, ident, kind, since, epoch):
    obj = {"type": "subscribe", "topic": pattern}
    if ident is not None:
        obj["id"] = ident
    if since is not None:
        obj["since"] = since
    if epoch is not None:
        obj["epoch"] = epoch
    cmd = parse_client_frame(json.dumps(obj), kind)
    wildcard = "*" in pattern.split(".") or ">" in pattern.split(".")
    if since is not None and wildcard:
        assert isinstance(cmd, Invalid) and cmd.code == ErrorCode.BAD_REQUEST
        return
    assert cmd == Subscribe(pattern, cmd.id, since, epoch)
    assert has_id(cmd.id) == ("id" in obj)
    ack = json.loads(ack_text(cmd.id, cmd.topic, 7, "e", True))
    expect = {"type": "ack", "topic": pattern, "seq": 7, "epoch": "e", "recovered": True}
    if "id" in obj:
        expect["id"] = ident
    assert _same_json(ack, expect)


@settings(max_examples=300, deadline=None)
@given(patterns, json_values, st.sampled_from([PLAIN, V1]), st.booleans())
def test_unsubscribe_round_trip(pattern, ident, kind, with_id):
    obj = {"type": "unsubscribe", "topic": pattern}
    if with_id:
        obj["id"] = ident
    cmd = parse_client_frame(json.dumps(obj), kind)
    assert cmd == Unsubscribe(pattern, cmd.id)
    ack = json.loads(ack_text(cmd.id, cmd.topic))
    expect = {"type": "ack", "topic": pattern}
    if with_id:
        expect["id"] = ident
    assert _same_json(ack, expect)


@settings(max_examples=400, deadline=None)
@given(topics, json_values, json_values, st.sampled_from([PLAIN, V1]), st.booleans(), st.integers(1, 2 ** 53))
def test_publish_round_trip(topic, data, ident, kind, with_id, seq):
    obj = {"type": "publish", "topic": topic, "data": data}
    if with_id:
        obj["id"] = ident
    cmd = parse_client_frame(json.dumps(obj), kind)
    assert isinstance(cmd, Publish) and cmd.topic == topic
    assert _same_json(json.loads(cmd.data), data)
    assert has_id(cmd.id) == with_id
    ack = json.loads(ack_text(cmd.id, topic, seq, "ep"))
    expect = {"type": "ack", "topic": topic, "seq": seq, "epoch": "ep"}
    if with_id:
        expect["id"] = ident
    assert _same_json(ack, expect)
    # the delivery envelope is valid JSON equal to the expected dict
    msg = json.loads(message_text(topic, seq, cmd.data))
    assert _same_json(msg, {"type": "message", "topic": topic, "seq": seq, "data": data})


@settings(max_examples=300, deadline=None)
@given(topics, st.one_of(patterns, st.integers(), st.none()), json_values, st.sampled_from([PLAIN, V1]))
def test_publish_to_a_wildcard_or_non_string_topic_is_bad_topic(topic, bad, ident, kind):
    assume(not (isinstance(bad, str) and "*" not in bad.split(".") and ">" not in bad.split(".")))
    cmd = parse_client_frame(json.dumps({"type": "publish", "topic": bad, "data": 1, "id": ident}), kind)
    assert isinstance(cmd, Invalid) and cmd.code == ErrorCode.BAD_TOPIC
    assert _same_json(cmd.id, ident)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from([PLAIN, V1]), st.booleans())
def test_ping_round_trip(ident, kind, with_id):
    obj = {"type": "ping", "id": ident} if with_id else {"type": "ping"}
    cmd = parse_client_frame(json.dumps(obj), kind)
    assert cmd == Ping(cmd.id)
    pong = json.loads(pong_text(cmd.id))
    assert _same_json(pong, {"type": "pong", "id": ident} if with_id else {"type": "pong"})


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(list(ErrorCode)), st.text(min_size=1, max_size=40))
def test_error_text_echoes_any_id(ident, code, message):
    err = json.loads(error_text(ident, code, message))
    assert _same_json(err, {"type": "error", "id": ident, "code": code.value, "message": message})
    assert json.loads(error_text(envelope._MISSING, code, message)) == {
        "type": "error", "code": code.value, "message": message}


@settings(max_examples=300, deadline=None)
@given(topics, st.integers(0, 2 ** 63), json_values)
def test_message_text_is_the_expected_json(topic, seq, data):
    out = message_text(topic, seq, encode_json(data))
    assert _same_json(json.loads(out), {"type": "message", "topic": topic, "seq": seq, "data": data})
    out.encode("utf-8")


def test_since_and_epoch_checks():
    bad = [{"since": -1}, {"since": 1.0}, {"since": True}, {"since": "1"}, {"epoch": 1}, {"epoch": []}]
    for extra in bad:
        cmd = parse_client_frame(json.dumps(dict({"type": "subscribe", "topic": "a", "id": 3}, **extra)), V1)
        assert isinstance(cmd, Invalid) and cmd.code == ErrorCode.BAD_REQUEST and cmd.id == 3, extra
    cmd = parse_client_frame('{"type":"subscribe","topic":"a","since":0,"epoch":"x"}', V1)
    assert cmd == Subscribe("a", cmd.id, 0, "x")


# ---------------------------------------------------------------- text that cannot be sent as UTF-8

@pytest.mark.parametrize("text", [
    '{"type":"publish","topic":"a","data":"\\ud800"}',
    '{"type":"ping","id":"\\udc00"}',
    '{"type":"publish","topic":"a","data":{"\\ud83d":1}}',
])
def test_every_command_can_be_sent_as_utf8(text):
    # a lone surrogate cannot be encoded: the command is refused, or its answer escapes it
    cmd = parse_client_frame(text, V1)
    if isinstance(cmd, Publish):
        out = message_text(cmd.topic, 1, cmd.data)
        assert json.loads(out.encode("utf-8"))["data"] == json.loads(cmd.data)
    elif isinstance(cmd, Ping):
        out = pong_text(cmd.id)
        assert json.loads(out.encode("utf-8")) == {"type": "pong", "id": cmd.id}
    else:
        out = error_text(cmd.id, cmd.code, cmd.message)
        assert json.loads(out.encode("utf-8"))["type"] == "error"


def test_surrogate_pairs_in_escapes_are_fine():
    cmd = parse_client_frame('{"type":"publish","topic":"a","data":"\\ud83d\\ude00"}', V1)
    assert json.loads(message_text("a", 1, cmd.data))["data"] == "\U0001f600"
    message_text("a", 1, cmd.data).encode("utf-8")


# ================================================================ wsframe.py

def ref_parse(buf: bytes):
    """A small reference parser of one server frame: (fin, rsv, opcode, payload, rest)."""
    assert len(buf) >= 2
    b0, b1 = buf[0], buf[1]
    fin, rsv, opcode = b0 >> 7, (b0 >> 4) & 7, b0 & 0x0F
    assert b1 & 0x80 == 0, "server frames are never masked"
    n, i = b1 & 0x7F, 2
    if n == 126:
        (n,) = struct.unpack_from("!H", buf, 2)
        i = 4
        assert n >= 126, "minimal length encoding"
    elif n == 127:
        (n,) = struct.unpack_from("!Q", buf, 2)
        i = 10
        assert n >= 65536 and n < 2 ** 63, "minimal length encoding, MSB 0"
    assert len(buf) >= i + n, "truncated frame"
    return fin, rsv, opcode, buf[i:i + n], buf[i + n:]


LENGTHS = [0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537, 1 << 20]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("build, opcode", [
    (wsframe.text_frame, 0x1), (wsframe.binary_frame, 0x2), (lambda p: wsframe.frame(0x1, p), 0x1)])
def test_frames_of_every_length_boundary_parse_back(n, build, opcode):
    payload = bytes((i * 7 + 3) % 128 for i in range(n))  # ASCII, so valid text too
    raw = build(payload)
    fin, rsv, op, got, rest = ref_parse(raw)
    assert (fin, rsv, op, rest) == (1, 0, opcode, b"")
    assert got == payload
    header = {True: 2, False: 4 if n < 65536 else 10}[n < 126]
    assert len(raw) == header + n


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0x1, 0x2, 0x8, 0x9, 0xA]))
def test_random_frames_parse_back(payload, opcode):
    fin, rsv, op, got, rest = ref_parse(wsframe.frame(opcode, payload))
    assert (fin, rsv, op, got, rest) == (1, 0, opcode, payload, b"")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_ping_and_pong_payloads_are_capped_at_125(payload):
    for build, opcode in ((wsframe.ping_frame, 0x9), (wsframe.pong_frame, 0xA)):
        fin, _rsv, op, got, rest = ref_parse(build(payload))
        assert (fin, op, rest) == (1, opcode, b"")
        assert got == payload[:125]


close_reasons = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="aé€\U0001f600", max_size=130),  # 1-, 2-, 3- and 4-byte characters
    st.integers(0, 130).flatmap(lambda k: st.sampled_from(["é", "€", "\U0001f600"]).map(lambda c: "a" * k + c * 40)),
)


@settings(max_examples=600, deadline=None)
@given(st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013, 4999]), close_reasons)
@example(1000, "a" * 122 + "é")  # the 2-byte character would end at byte 124 of 123
@example(1000, "a" * 121 + "é")  # exactly 123
@example(1000, "a" * 120 + "\U0001f600")  # 4 bytes from 121: cut
@example(1000, "€" * 41)  # 123 bytes exactly
@example(1000, "€" * 42)
def test_close_frame_truncation_keeps_whole_characters(code, reason):
    fin, _rsv, op, payload, rest = ref_parse(wsframe.close_frame(code, reason))
    assert (fin, op, rest) == (1, 0x8, b"")
    assert len(payload) <= 125
    assert struct.unpack("!H", payload[:2])[0] == code
    text = payload[2:].decode("utf-8")  # never a split character
    assert reason.startswith(text)
    if text != reason:
        # as long as possible: the next character would not have fitted
        assert len(text.encode("utf-8")) + len(reason[len(text)].encode("utf-8")) > 123


# ---------------------------------------------------------------- the reader's frame splitter

from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,  # noqa: E402
    TextMessage,
)
from wsproto.events import Ping as WsPing
from wsproto.events import Pong as WsPong

SPLIT_MAX = 4096


def _open_wsproto_server() -> WSConnection:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/ws")))
    assert [type(e) for e in server.events()] == [Request]
    server.send(AcceptConnection())
    return server


class _Normalizer:
    """wsproto events as a list of whole messages and control frames, up to the first close."""

    def __init__(self) -> None:
        self.out: list = []
        self.parts: list = []
        self.closed = False

    def add(self, events) -> None:
        for ev in events:
            if self.closed:
                return
            if isinstance(ev, (TextMessage, BytesMessage)):
                self.parts.append(ev.data)
                if ev.message_finished:
                    kind = "text" if isinstance(ev, TextMessage) else "bytes"
                    self.out.append((kind, self.parts[0][:0].join(self.parts)))
                    self.parts = []
            elif isinstance(ev, WsPing):
                self.out.append(("ping", bytes(ev.payload)))
            elif isinstance(ev, WsPong):
                self.out.append(("pong", bytes(ev.payload)))
            elif isinstance(ev, CloseConnection):
                self.out.append(("close", int(ev.code)))
                self.closed = True


def _reference(stream: bytes, chunks) -> list:
    ws = _open_wsproto_server()
    norm = _Normalizer()
    for chunk in chunks:
        ws.receive_data(chunk)
        norm.add(ws.events())
    return norm.out


def _through_splitter(stream: bytes, chunks) -> list:
    ws = _open_wsproto_server()
    splitter = wsframe.FrameSplitter(SPLIT_MAX)
    norm = _Normalizer()
    for chunk in chunks:
        for item in splitter.feed(chunk):
            if norm.closed:
                break
            if type(item) is str:
                assert not norm.parts, "fast-path text inside a fragmented message"
                norm.out.append(("text", item))
            else:
                ws.receive_data(item)
                norm.add(ws.events())
        if splitter.too_big:
            norm.out.append(("too_big",))
            break
        if norm.closed:
            break
    return norm.out


def _cframe(draw, opcode, payload, fin=True, rsv=0, mask=True):
    key = draw(st.binary(min_size=4, max_size=4))
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    m = 0x80 if mask else 0
    head = bytes((b0, m | n)) if n < 126 else struct.pack("!BBH", b0, m | 126, n) if n < 65536 else \
        struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def client_streams(draw, bad=True):
    """A stream of client frames: whole and fragmented texts, controls, and maybe one bad frame."""
    frames = []
    for _ in range(draw(st.integers(1, 6))):
        what = draw(st.sampled_from(["text", "text", "fragments", "ping", "pong", "long"]))
        if what == "text":
            frames.append(_cframe(draw, 0x1, draw(st.text(max_size=40)).encode("utf-8")))
        elif what == "long":
            frames.append(_cframe(draw, 0x1, ("é" * draw(st.integers(60, 400))).encode("utf-8")))
        elif what == "fragments":
            raw = draw(st.text(min_size=1, max_size=40)).encode("utf-8")
            cuts = sorted(draw(st.lists(st.integers(0, len(raw)), min_size=1, max_size=3)))
            pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
            for i, piece in enumerate(pieces):
                frames.append(_cframe(draw, 0x1 if i == 0 else 0x0, piece, fin=i == len(pieces) - 1))
                if i < len(pieces) - 1 and draw(st.booleans()):
                    frames.append(_cframe(draw, 0x9, b"mid"))  # control frames may interleave
        else:
            frames.append(_cframe(draw, 0x9 if what == "ping" else 0xA, draw(st.binary(max_size=125))))
    if bad and draw(st.booleans()):
        kind = draw(st.sampled_from(["rsv", "unmasked", "utf8", "opcode", "control_long", "close", "binary",
                                     "too_big", "continuation"]))
        if kind == "rsv":
            f = _cframe(draw, 0x1, b"x", rsv=draw(st.integers(1, 7)))
        elif kind == "unmasked":
            f = _cframe(draw, 0x1, b"x", mask=False)
        elif kind == "utf8":
            f = _cframe(draw, 0x1, b"ok\xff")
        elif kind == "opcode":
            f = _cframe(draw, draw(st.sampled_from([3, 7, 0xB, 0xF])), b"")
        elif kind == "control_long":
            f = _cframe(draw, 0x9, b"p" * 126)
        elif kind == "close":
            f = _cframe(draw, 0x8, b"\x03\xe8bye")
        elif kind == "binary":
            f = _cframe(draw, 0x2, b"\x00\x01")
        elif kind == "too_big":
            f = _cframe(draw, 0x1, b"z" * (SPLIT_MAX + 1))
        else:
            f = _cframe(draw, 0x0, b"x")
        frames.insert(draw(st.integers(0, len(frames))), f)
        frames.append(_cframe(draw, 0x1, b"after"))
    stream = b"".join(frames)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=8))))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    return stream, [c for c in chunks if c]


@settings(max_examples=400, deadline=None)
@given(client_streams(bad=False))
def test_frame_splitter_delivers_what_wsproto_delivers(stream_chunks):
    stream, chunks = stream_chunks
    want = _reference(stream, [stream])
    assert _through_splitter(stream, chunks) == want
    assert _through_splitter(stream, [stream]) == want


@settings(max_examples=400, deadline=None)
@given(client_streams(bad=True))
def test_frame_splitter_refuses_what_wsproto_refuses(stream_chunks):
    stream, chunks = stream_chunks
    want = _reference(stream, [stream])
    for got in (_through_splitter(stream, chunks), _through_splitter(stream, [stream])):
        if got and got[-1] == ("too_big",):
            # refused by size before wsproto saw the frame: everything before it agrees
            assert want[:len(got) - 1] == got[:-1]
            continue
        assert got == want


@pytest.mark.parametrize("width", [16, 64])
def test_frame_splitter_refuses_non_minimal_lengths_like_wsproto(width):
    payload = b'{"type":"ping"}'
    key = b"\x01\x02\x03\x04"
    head = struct.pack("!BBH", 0x81, 0x80 | 126, len(payload)) if width == 16 else \
        struct.pack("!BBQ", 0x81, 0x80 | 127, len(payload))
    stream = head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert _reference(stream, [stream])[-1] == ("close", 1002)
    assert _through_splitter(stream, [stream]) == _reference(stream, [stream])


# ---------------------------------------------------------------- JSON depth and finite numbers

def _reference_depth(text: str) -> int:
    """The deepest bracket nesting outside strings, char by char, up to a backslash outside a
    string (a fault a decoder stops at; so does an unterminated string): at least as deep as
    any JSON decoder recurses before it finishes or finds a fault."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "\\":
            break
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _value_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_value_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_value_depth, value.values()), default=0)
    return 0


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(alphabet='[]{}"\\ a,:1é', max_size=200),
                 st.integers(0, 80).map(lambda n: "[" * n + '"]' + "{" * n),
                 st.integers(0, 80).map(lambda n: '"\\\\"' + "[" * n),
                 st.integers(0, 80).map(lambda n: '"\\""' + "[" * n)),
       st.sampled_from([0, 1, 2, 5, 64]))
def test_depth_within_never_trusts_a_decoder_with_deeper_text(text, limit):
    if envelope.depth_within(text, limit):
        assert _reference_depth(text) <= limit


deep_values = st.recursive(
    st.one_of(st.text(alphabet='[]{}"\\x', max_size=5), st.integers()),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(alphabet='[{"\\', max_size=3), c, max_size=3)),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(deep_values, st.integers(0, 40), st.sampled_from([0, 1, 3, 8, 64]))
@example(['"', [[[[["\\"]]]]]], 0, 3)  # escaped quote, escaped backslash: then the nesting
def test_depth_within_is_exact_on_json(value, wrap, limit):
    for _ in range(wrap):
        value = [value]
    text = json.dumps(value, ensure_ascii=False)
    assert envelope.depth_within(text, limit) == (_value_depth(value) <= limit)


@pytest.mark.parametrize("depth", [envelope.MAX_DEPTH, envelope.MAX_DEPTH + 1, 5000])
@pytest.mark.parametrize("opener", ["[", '{"k":'])
def test_depth_limit_at_and_past_its_edge(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "0" + closer * depth
    ok = depth <= envelope.MAX_DEPTH
    assert envelope.depth_within(text) is ok
    result = parse_client_frame(text, V1)
    assert isinstance(result, Invalid) and (result.code == ErrorCode.BAD_JSON) is not ok


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E309", "NaN", "Infinity", "-Infinity",
                                    "1" + "0" * 309, str(2 ** 1024 - 2 ** 970)])
def test_numbers_not_finite_as_doubles_are_bad_json(number):
    for text in ('{"type":"publish","topic":"t","data":%s}' % number, '{"type":"ping","id":[%s]}' % number,
                 '{"x":%s}' % number):
        for kind in (V1, PLAIN):
            assert parse_client_frame(text, kind) == Invalid(ErrorCode.BAD_JSON, "frame is not valid JSON",
                                                             envelope._MISSING)
    value = json.loads(number)
    if isinstance(value, float):  # nothing such is ever written either
        with pytest.raises(ValueError):
            encode_json(value)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.one_of(st.floats(), st.text(alphabet="NaInfity", max_size=9), st.integers()),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=3), c, max_size=3)),
                    max_leaves=10))
def test_strict_text_turns_what_older_versions_stored_into_strict_json(value):
    def finite(v):
        if isinstance(v, float):
            return v if v == v and v not in (float("inf"), float("-inf")) else None
        if isinstance(v, list):
            return [finite(x) for x in v]
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return v

    stored = json.dumps(value)  # Python's default writes NaN and Infinity
    out = envelope.strict_text(stored)
    assert envelope.parse_json(out) == finite(value)
    if finite(value) == value and value == value:
        assert out == stored  # nothing to change: the text is kept as it is
