"""Fuzz a live server with random and mutated WebSocket input (PROTOCOL.md sections 3, 4 and 7).

Each fuzz connection sends one generated case and is then judged:

- ``usable``: the server answered (error frames, acks, pongs ...) and still answers a probe ping;
- ``close``: a close frame with a contract code (or the code the peer itself closed with,
  echoed as RFC 6455 5.5.1 suggests), then the server closes TCP;
- ``eof``: only where the input was cut off mid-frame (the case half-closes), the server
  closes TCP (with or without a close frame) within its close_timeout plus a margin.

Meanwhile a well-behaved client publishes and receives its own messages the whole time.
Everything is seeded (random.Random(SEED + worker)), so a failure names its worker, case number
and bytes and can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

import pytest

import wsraw
from conftest import SCALE
from httputil import healthz

pytestmark = pytest.mark.timeout(90)

SEED = int(os.environ.get("WSBROADCAST_FUZZ_SEED", "20240607"))
WORKERS = 4
CASES_PER_WORKER = int(os.environ.get("WSBROADCAST_FUZZ_CASES", "400"))
CLOSE_TIMEOUT = 1.0
MAX_MESSAGE = 64 * 1024
CONTRACT_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013}
#: a reply to a case must arrive within this (the server's grace period plus slack)
ANSWER_TIMEOUT = CLOSE_TIMEOUT + 4.0

USABLE, EOF = "usable", "eof"
ECHO = "echo"  # a close frame echoing the code the peer sent
ANY = "any"


def close_(code: int) -> str:
    return "close:%d" % code


# ---------------------------------------------------------------- frame building

def client_frame(rng: random.Random, opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
                 rsv: int = 0, length: Optional[int] = None, width: Optional[int] = None) -> bytes:
    """One client frame, its mask key drawn from ``rng``; ``length``/``width`` may lie."""
    key = bytes(rng.getrandbits(8) for _ in range(4)) if mask else None
    return wsraw.encode_frame(opcode, payload, fin, mask, rsv, length, width, key)


def text(rng, s: str, **kw) -> bytes:
    return client_frame(rng, 0x1, s.encode("utf-8"), **kw)


JSON_CHUNKS = ['{', '}', '[', ']', '"', ':', ',', '"type"', '"publish"', '"subscribe"', '"ping"', '"topic"',
               '"data"', '"id"', '"since"', '"fz.a"', '"fz.*"', '">"', 'true', 'null', 'NaN', '-', '1e999', '0',
               '12', '\\', '\\n', ' ', '\n', 'é', '€', '"\\""', '{"type":"ping"}', '"unsubscribe"', '"epoch"']


def random_command(rng: random.Random) -> dict:
    ident = rng.choice([None, rng.randint(-5, 10 ** 12), "id-%d" % rng.randint(0, 99), [1, {"x": None}],
                        {"k": "é€"}, 1.5, True, ""])
    kind = rng.choice(["subscribe", "unsubscribe", "publish", "ping", "dance", None])
    obj: dict = {}
    if kind is not None:
        obj["type"] = kind
    topic = rng.choice(["fz.a", "fz.b", "fz.*", "fz.>", "", "fz..a", "a b", 5, None, "fz." + "x" * 260])
    if topic is not None:
        obj["topic"] = topic
    if rng.random() < 0.6:
        obj["data"] = rng.choice([1, "s", None, [1, 2], {"a": {"b": [True]}}, "é" * 10, -0.0, 2 ** 70])
    if ident is not None:
        obj["id"] = ident
    if rng.random() < 0.2:
        obj["since"] = rng.choice([0, 1, -1, 1.5, "2", 10 ** 9])
    if rng.random() < 0.1:
        obj["epoch"] = rng.choice(["x", 3, None])
    return obj


def jsonish(rng: random.Random) -> str:
    return "".join(rng.choice(JSON_CHUNKS) for _ in range(rng.randint(0, 25)))


def random_unicode(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x80, 0x7FF), rng.randint(0x800, 0xD7FF),
                         rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x10FFFF), rng.randint(0, 0x1F)])
        out.append(chr(cp))
    return "".join(out)


def invalid_utf8(rng: random.Random) -> bytes:
    good = random_unicode(rng, rng.randint(0, 20)).encode("utf-8")
    bad = rng.choice([b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80",
                      b"\xf8\x88\x80\x80\x80"])
    cut = rng.randint(0, len(good))
    return good[:cut] + bad + good[cut:]


def valid_frames(rng: random.Random) -> bytes:
    return b"".join(text(rng, json.dumps(random_command(rng))) for _ in range(rng.randint(1, 4)))


# ---------------------------------------------------------------- cases
# Each generator returns (bytes to send, cut, expected outcomes). ``cut`` True: the input stops
# mid-frame (or may), so the client half-closes instead of probing.

Case = Tuple[bytes, bool, Sequence[str]]


def case_valid_commands(rng) -> Case:
    return valid_frames(rng), False, (USABLE,)


def case_jsonish(rng) -> Case:
    return b"".join(text(rng, jsonish(rng)) for _ in range(rng.randint(1, 3))), False, (USABLE,)


def case_random_text(rng) -> Case:
    return text(rng, random_unicode(rng, rng.randint(0, 300))), False, (USABLE,)


def case_seed_form_and_json_values(rng) -> Case:
    values = [{"hello": "é"}, [1, 2], "str", 3, None, {"type": 5}, {"type": None, "x": 1}, {}]
    return b"".join(text(rng, json.dumps(rng.choice(values))) for _ in range(3)), False, (USABLE,)


def case_invalid_utf8(rng) -> Case:
    return client_frame(rng, 0x1, invalid_utf8(rng)), False, (close_(1007),)


def case_invalid_utf8_across_fragments(rng) -> Case:
    data = invalid_utf8(rng)
    cut = rng.randint(0, len(data))
    return (client_frame(rng, 0x1, data[:cut], fin=False) + client_frame(rng, 0x0, data[cut:]), False,
            (close_(1007),))


def case_utf8_split_across_fragments(rng) -> Case:
    """Valid: a multi-byte character split between two fragments, with a ping in between."""
    raw = json.dumps({"type": "ping", "id": "€\U0001f600é"}, ensure_ascii=False).encode("utf-8")
    cut = raw.index("€".encode()) + 1
    return (client_frame(rng, 0x1, raw[:cut], fin=False) + client_frame(rng, 0x9, b"mid")
            + client_frame(rng, 0x0, raw[cut:]), False, (USABLE,))


def case_binary(rng) -> Case:
    payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    return client_frame(rng, 0x2, payload), False, (close_(1003),)


def case_reserved_opcode(rng) -> Case:
    op = rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
    return client_frame(rng, op, b"x" * rng.randint(0, 10)), False, (close_(1002),)


def case_continuation_without_start(rng) -> Case:
    return client_frame(rng, 0x0, b'{"type":"ping"}', fin=rng.random() < 0.5), False, (close_(1002),)


def case_rsv_bits(rng) -> Case:
    return text(rng, '{"type":"ping"}', rsv=rng.randint(1, 7)), False, (close_(1002),)


def case_unmasked(rng) -> Case:
    return text(rng, '{"type":"ping"}', mask=False), False, (close_(1002),)


def case_control_too_long(rng) -> Case:
    op = rng.choice([0x8, 0x9, 0xA])
    n = rng.randint(126, 400)
    payload = (b"\x03\xe8" if op == 0x8 else b"") + b"p" * n
    return client_frame(rng, op, payload), False, (close_(1002),)


def case_control_fragmented(rng) -> Case:
    op = rng.choice([0x8, 0x9, 0xA])
    return client_frame(rng, op, b"\x03\xe8" if op == 0x8 else b"x", fin=False), False, (close_(1002),)


def case_non_minimal_length(rng) -> Case:
    payload = b'{"type":"ping"}'
    if rng.random() < 0.5:
        frame = client_frame(rng, 0x1, payload, width=16)  # 2-byte length for 15 bytes
    else:
        frame = client_frame(rng, 0x1, payload, width=64)  # 8-byte length for 15 bytes
    # RFC 6455 5.2 requires the minimal length encoding, whole or split across reads
    # (see also test_non_minimal_length_text_frame_is_a_protocol_error below)
    return frame, False, (close_(1002),)


def case_length_msb_set(rng) -> Case:
    # a protocol error (1002); 1009 is as good an answer to a length over every limit
    return client_frame(rng, 0x1, b"", length=(1 << 63) | rng.randint(65536, 1 << 40), width=64), False, \
        (close_(1002), close_(1009))


def case_new_message_inside_fragmented(rng) -> Case:
    return (client_frame(rng, 0x1, b'{"type":', fin=False) + client_frame(rng, rng.choice([0x1, 0x2]), b"x"),
            False, (close_(1002),))


def case_oversized_message(rng) -> Case:
    """Over the 64 KiB limit in one frame, or summed over fragments."""
    if rng.random() < 0.5:
        return text(rng, "a" * (MAX_MESSAGE + rng.randint(1, 5000))), False, (close_(1009),)
    parts = []
    total = 0
    while total <= MAX_MESSAGE:
        n = rng.randint(5000, 30000)
        parts.append(client_frame(rng, 0x1 if not parts else 0x0, b"b" * n, fin=False))
        total += n
    return b"".join(parts), False, (close_(1009),)


def case_huge_declared_with_data(rng) -> Case:
    """A huge declared length followed by more than the limit: 1009 before the frame ends."""
    n = rng.choice([1 << 32, (1 << 63) - 1, 10 ** 12])
    return client_frame(rng, 0x1, b"c" * (MAX_MESSAGE + 100), length=n, width=64), True, (close_(1009),)


def case_huge_declared_header_only(rng) -> Case:
    n = rng.choice([126, 65535, 1 << 20, 1 << 32, (1 << 63) - 1])
    return client_frame(rng, rng.choice([0x1, 0x2]), b"", length=n), True, (EOF, ANY)


def case_truncated(rng) -> Case:
    frames = valid_frames(rng)
    cut = rng.randint(1, len(frames) - 1)
    return frames[:cut], True, (EOF, ANY)


def case_bit_flipped(rng) -> Case:
    data = bytearray(valid_frames(rng))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data), True, (ANY,)


def case_random_bytes(rng) -> Case:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600))), True, (ANY,)


def case_valid_then_garbage(rng) -> Case:
    garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 100)))
    return valid_frames(rng) + garbage, True, (ANY,)


def case_close_valid_code(rng) -> Case:
    code = rng.choice([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1013, 3000, 3999, 4000, 4999])
    reason = random_unicode(rng, rng.randint(0, 20)).encode("utf-8")[:123]
    reason = reason.decode("utf-8", "ignore").encode("utf-8")
    trailing = text(rng, '{"type":"ping","id":"after-close"}') if rng.random() < 0.3 else b""
    return client_frame(rng, 0x8, struct.pack("!H", code) + reason) + trailing, False, (ECHO + ":%d" % code,)


def case_close_empty(rng) -> Case:
    return client_frame(rng, 0x8, b""), False, (close_(1000),)


def case_close_bad(rng) -> Case:
    kind = rng.randrange(3)
    if kind == 0:
        payload = b"\x03"  # one byte
        expect = 1002
    elif kind == 1:
        payload = struct.pack("!H", rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]))
        expect = 1002
    else:
        payload = b"\x03\xe8" + invalid_utf8(rng)[:100]
        expect = 1007
    return client_frame(rng, 0x8, payload), False, (close_(expect),)


def case_ping_pong(rng) -> Case:
    payload = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 125)))
    data = client_frame(rng, 0x9, payload)
    if rng.random() < 0.5:
        data = client_frame(rng, 0xA, b"unsolicited") + data
    return data, False, ("pong:" + payload.hex(),)


CASES: List[Callable[[random.Random], Case]] = [
    case_valid_commands, case_jsonish, case_jsonish, case_random_text, case_seed_form_and_json_values,
    case_invalid_utf8, case_invalid_utf8_across_fragments, case_utf8_split_across_fragments, case_binary,
    case_reserved_opcode, case_continuation_without_start, case_rsv_bits, case_unmasked,
    case_control_too_long, case_control_fragmented, case_non_minimal_length, case_length_msb_set,
    case_new_message_inside_fragmented, case_oversized_message, case_huge_declared_with_data,
    case_huge_declared_header_only, case_truncated, case_bit_flipped, case_bit_flipped, case_random_bytes,
    case_valid_then_garbage, case_close_valid_code, case_close_empty, case_close_bad, case_ping_pong,
]


# ---------------------------------------------------------------- judging one connection

class Verdict(Exception):
    pass


def _parse_close(payload: bytes) -> int:
    if len(payload) > 125:
        raise Verdict("close frame payload over 125 bytes")
    if len(payload) == 1:
        raise Verdict("close frame with a 1-byte payload")
    if not payload:
        return 1005
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise Verdict("close reason is not UTF-8: %r" % payload) from None
    return struct.unpack("!H", payload[:2])[0]


def judge(c: wsraw.RawWS, cut: bool, probe: str) -> Tuple[str, Optional[int], List[str]]:
    """Read the server's answer to a case: (outcome, close code, notes)."""
    notes: List[str] = []
    deadline = time.monotonic() + ANSWER_TIMEOUT
    pongs = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Verdict("no answer within %.1fs (pongs %r, notes %r)" % (ANSWER_TIMEOUT, pongs, notes))
        try:
            op, payload = c.recv_frame(timeout=remaining)
        except (TimeoutError, socket.timeout):
            continue
        except (ConnectionResetError, ConnectionError, OSError) as exc:
            if not cut:
                raise Verdict("TCP closed without a close frame on complete input: %r" % (exc,)) from None
            return EOF, None, notes + pongs
        if op == 0x1:
            try:
                obj = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise Verdict("text frame that is not JSON: %r" % payload[:200]) from None
            if isinstance(obj, dict) and obj.get("type") == "error":
                if not (isinstance(obj.get("code"), str) and isinstance(obj.get("message"), str)):
                    raise Verdict("malformed error frame %r" % obj)
                notes.append("error:" + obj["code"])
            if obj == {"type": "pong", "id": probe}:
                return USABLE, None, notes + pongs
        elif op == 0x9:
            pass  # keepalive
        elif op == 0xA:
            pongs.append("pong:" + payload.hex())
        elif op == 0x8:
            code = _parse_close(payload)
            if not c.at_eof(timeout=CLOSE_TIMEOUT + 2.0):
                raise Verdict("close frame %d but TCP not closed" % code)
            return "close", code, notes + pongs
        else:
            raise Verdict("unexpected opcode %#x from the server" % op)


def run_case(port: int, rng: random.Random, gen, label: str) -> str:
    kind = rng.choice(["wsbroadcast.v1", None])
    c = wsraw.connect(port, subprotocol=kind)
    try:
        data, cut, expect = gen(rng)
        probe = "probe-" + label
        try:
            if rng.random() < 0.3 and len(data) > 1:
                # dribble it in pieces: the parser must not care where reads split
                i = rng.randint(1, len(data) - 1)
                c.sock.sendall(data[:i])
                c.sock.sendall(data[i:])
            else:
                c.sock.sendall(data)
            if cut:
                c.sock.shutdown(socket.SHUT_WR)
            else:
                c.sock.sendall(client_frame(rng, 0x1, json.dumps({"type": "ping", "id": probe}).encode()))
        except OSError as exc:
            # the server may already have closed after a close frame; judge what it sent
            cut = True
            label += " (send failed: %r)" % exc
        try:
            outcome, code, notes = judge(c, cut, probe)
        except Verdict as v:
            raise AssertionError("%s [%s, kind %s]: %s; sent %d bytes: %s" % (
                label, gen.__name__, kind, v, len(data), data[:300].hex())) from None
        ok = False
        for e in expect:
            if e == ANY:
                ok = outcome == USABLE or (outcome == "close" and code in CONTRACT_CLOSE_CODES) or \
                    (outcome == EOF and cut)
            elif e == USABLE:
                ok = outcome == USABLE
            elif e == EOF:
                ok = outcome == EOF
            elif e.startswith("close:"):
                ok = outcome == "close" and code == int(e[6:])
            elif e.startswith(ECHO):
                ok = outcome == "close" and code == int(e.split(":")[1])
            elif e.startswith("pong:"):
                ok = outcome == USABLE and e in notes
            if ok:
                break
        assert ok, "%s [%s, kind %s]: expected %s, got %s %s %s; sent %d bytes: %s" % (
            label, gen.__name__, kind, expect, outcome, code, notes, len(data), data[:300].hex())
        return outcome if code is None else "%s:%d" % (outcome, code)
    finally:
        c.close()


# ---------------------------------------------------------------- the well-behaved client

class Healthy:
    """A v1 client that publishes on its own topic and must get every message back."""

    def __init__(self, port: int) -> None:
        self.c = wsraw.connect(port)
        self.n = 0
        self.c.send_json({"type": "subscribe", "topic": "healthy.own", "id": "sub"})
        reply = self.c.recv_json()
        assert reply["type"] == "ack" and reply["id"] == "sub", reply

    def round_trip(self) -> None:
        self.n += 1
        n = self.n
        self.c.send_json({"type": "publish", "topic": "healthy.own", "data": {"n": n}, "id": n})
        got_ack = got_msg = False
        deadline = time.monotonic() + 5.0
        while not (got_ack and got_msg):
            msg = self.c.recv_json(timeout=max(0.01, deadline - time.monotonic()))
            if msg.get("type") == "ack" and msg.get("id") == n:
                assert not got_msg, "ack must precede the publisher's own copy"
                got_ack = True
            elif msg.get("type") == "message" and msg.get("topic") == "healthy.own":
                assert msg["data"] == {"n": n}, msg
                got_msg = True
            else:
                raise AssertionError("healthy client got %r" % (msg,))


# ---------------------------------------------------------------- the tests

def test_fuzz_live_server(make_server):
    srv = make_server(close_timeout=CLOSE_TIMEOUT, max_message_size=MAX_MESSAGE)
    healthy = Healthy(srv.port)
    healthy.round_trip()
    failures: List[str] = []
    outcomes: dict = {}
    lock = threading.Lock()
    progress = [0]

    def worker(w: int) -> None:
        rng = random.Random(SEED + w)
        for i in range(CASES_PER_WORKER):
            if failures:
                return
            gen = rng.choice(CASES)
            label = "seed %d worker %d case %d" % (SEED, w, i)
            try:
                got = run_case(srv.port, rng, gen, label)
            except AssertionError as exc:
                failures.append(str(exc))
                return
            except Exception as exc:  # the client side broke: say where
                failures.append("%s [%s]: %r" % (label, gen.__name__, exc))
                return
            with lock:
                key = "%s -> %s" % (gen.__name__, got)
                outcomes[key] = outcomes.get(key, 0) + 1
                progress[0] += 1

    threads = [threading.Thread(target=worker, args=(w,), name="fuzz-%d" % w, daemon=True) for w in range(WORKERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90 * SCALE
    # the well-behaved client keeps working meanwhile: a round trip after every 8 fuzz connections
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline, "fuzzing took too long"
        healthy.round_trip()
        target = progress[0] + 8
        assert wsraw.wait_for(lambda target=target: progress[0] >= target or not any(t.is_alive() for t in threads),
                              timeout=30 * SCALE), "no fuzz progress at %d cases" % progress[0]
    for t in threads:
        t.join(5)
        assert not t.is_alive(), t.name
    assert not failures, "\n".join(failures)
    assert sum(outcomes.values()) == WORKERS * CASES_PER_WORKER
    healthy.round_trip()
    for key in sorted(outcomes):
        print("%5d  %s" % (outcomes[key], key))
    # every kind of answer was seen at least once, so the judge is not vacuous
    kinds = {k.split(" -> ")[1].split(":")[0] for k in outcomes}
    assert {"usable", "close", "eof"} <= kinds, outcomes

    status, health = healthz(srv.port)
    assert status == 200 and health["status"] == "ok" and health["writer"]["alive"], health
    assert srv.writer.alive
    healthy.c.send_frame(0x8, struct.pack("!H", 1000))
    assert healthy.c.expect_close() == (1000, "")
    healthy.c.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=CLOSE_TIMEOUT + 10), \
        "connection threads left: %d" % srv.thread_count()
    assert wsraw.wait_for(lambda: len(srv.hub) == 0, timeout=5)


def test_fuzz_handshake_garbage_and_abrupt_ends(make_server):
    """Garbage before/inside the handshake, and connections that end abruptly at random points."""
    srv = make_server(close_timeout=CLOSE_TIMEOUT, max_message_size=MAX_MESSAGE, handshake_timeout=2.0)
    rng = random.Random(SEED)
    healthy = Healthy(srv.port)
    request = wsraw.upgrade_request(srv.port, subprotocol=None, key="dGhlIHNhbXBsZSBub25jZQ==")
    for i in range(120):
        mode = rng.randrange(4)
        if mode == 0:
            # a mutated or cut handshake, then half-close: an HTTP answer or nothing, then EOF
            data = bytearray(request[:rng.randint(0, len(request))])
            for _ in range(rng.randint(0, 3)):
                if data:
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            try:
                s.sendall(bytes(data))
                s.shutdown(socket.SHUT_WR)
                got = b""
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    got += chunk
                else:
                    raise AssertionError("case %d: server kept the connection open: %r" % (i, bytes(data)))
                assert got == b"" or got.startswith(b"HTTP/1.1 "), (i, bytes(data), got[:200])
                if got.startswith(b"HTTP/1.1 101"):
                    # the handshake survived the mutation: a WebSocket, ended by our half-close
                    pass
            finally:
                s.close()
        else:
            # a connection that ends abruptly after a random prefix of valid traffic
            c = wsraw.connect(srv.port, subprotocol=rng.choice(["wsbroadcast.v1", None]))
            data = valid_frames(rng)
            c.sock.sendall(data[:rng.randint(0, len(data))])
            if mode == 1:
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif mode == 2:
                c.sock.sendall(client_frame(rng, 0x8, b"\x03\xe8"))  # maybe inside a frame: garbage
            c.close()
        if i % 10 == 9:
            healthy.round_trip()
    healthy.round_trip()
    healthy.c.close()
    assert wsraw.wait_for(lambda: srv.thread_count() == 0, timeout=CLOSE_TIMEOUT + 10), \
        "connection threads left: %d" % srv.thread_count()
    status, health = healthz(srv.port)
    assert status == 200 and health["status"] == "ok" and srv.writer.alive, health


# ---------------------------------------------------------------- server bugs, each pinned down

@pytest.mark.timeout(30)
@pytest.mark.parametrize("width", [16, 64])
def test_non_minimal_length_text_frame_is_a_protocol_error(make_server, width):
    srv = make_server(close_timeout=CLOSE_TIMEOUT)
    c = wsraw.connect(srv.port)
    try:
        c.sock.sendall(client_frame(random.Random(width), 0x1, b'{"type":"ping","id":1}', width=width)
                       + client_frame(random.Random(0), 0x1, b'{"type":"ping","id":"probe"}'))
        assert judge(c, False, "probe")[:2] == ("close", 1002)
    finally:
        c.close()


# ---------------------------------------------------------------- lone surrogates (regressions)

@pytest.mark.timeout(30)
def test_lone_surrogate_in_published_data_does_not_kill_the_server(make_server):
    srv = make_server(close_timeout=CLOSE_TIMEOUT, shutdown_timeout=1.0)
    healthy = Healthy(srv.port)
    c = wsraw.connect(srv.port)
    c.send_json({"type": "subscribe", "topic": "s", "id": 1})
    assert c.recv_json()["type"] == "ack"
    c.send_text('{"type":"publish","topic":"s","data":"\\ud800","id":2}')
    # an error frame or an ack, then (with an ack) a delivery that is valid UTF-8, or a close
    reply = c.recv_json(timeout=3)
    assert reply["type"] in ("ack", "error"), reply
    if reply["type"] == "ack":
        msg = c.recv_json(timeout=3)
        assert msg["type"] == "message" and msg["topic"] == "s", msg
    healthy.round_trip()
    assert srv.writer.alive


@pytest.mark.timeout(30)
def test_lone_surrogate_in_an_id_is_answered(make_server):
    srv = make_server(close_timeout=CLOSE_TIMEOUT)
    c = wsraw.connect(srv.port)
    c.send_text('{"type":"ping","id":"\\udc00"}')
    op, payload = c.recv_frame(timeout=3)
    assert op == 0x1, (op, payload)
    assert json.loads(payload)["type"] in ("pong", "error")
    c.send_json({"type": "ping", "id": "next"})
    assert c.recv_json() == {"type": "pong", "id": "next"}
