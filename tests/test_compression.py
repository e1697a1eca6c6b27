"""permessage-deflate (RFC 7692): the offer and answer, one deflate per message shared by its
receivers, compressed client frames inflated within the size limit, and the switches."""

from __future__ import annotations

import json
import os
import urllib.request
import zlib

import pytest

import wsraw
from serverproc import ServerProcess

from wsbroadcast import Client, ConfigError, Server
from wsbroadcast.deflate import Compressors, negotiate

OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")
JSON_1K = json.dumps({"user": "someone@example.com", "items": [
    {"sku": "SKU-%05d" % i, "qty": i % 7, "price": 9.99 + i, "name": "widget"} for i in range(14)]})


def _answer(*values: str):
    agreement = negotiate(values)
    return None if agreement is None else agreement.answer


# ------------------------------------------------------------------ negotiation (no sockets)
@pytest.mark.parametrize("offer, answer", [
    ("permessage-deflate", "permessage-deflate; server_no_context_takeover"),
    ("permessage-deflate; client_max_window_bits", "permessage-deflate; server_no_context_takeover"),
    ("permessage-deflate; client_max_window_bits=15; server_max_window_bits=15",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=15"),
    ("permessage-deflate; server_max_window_bits=8",
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=8"),
    ('permessage-deflate; server_max_window_bits="10"',
     "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"),
    ("permessage-deflate; client_no_context_takeover; server_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7, permessage-deflate",
     "permessage-deflate; server_no_context_takeover"),  # the first acceptable offer
    ("permessage-deflate; server_max_window_bits=16", None),
    ("permessage-deflate; server_max_window_bits=08", None),
    ("permessage-deflate; server_max_window_bits", None),  # a value is required
    ("permessage-deflate; client_max_window_bits=7", None),
    ("permessage-deflate; server_no_context_takeover=1", None),
    ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
    ("permessage-deflate; mystery", None),
    ("permessage-deflate;", None),
    ("x-webkit-deflate-frame", None),
])
def test_offers_and_answers(offer, answer):
    assert _answer(offer) == answer


def test_offers_across_header_lines():
    assert _answer("foo", "permessage-deflate; server_max_window_bits=12") == (
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=12")


@pytest.mark.parametrize("bits", [8, 9, 10, 15])
def test_each_message_inflates_on_its_own_within_the_window(bits):
    """Messages compressed one after the other (a shared compressor) each inflate with a fresh
    inflater of the negotiated window; 8 bits (zlib compresses with 9) included."""
    comp = Compressors()
    texts = [(JSON_1K * 3)[i:] for i in range(0, 600, 97)] + ["abc" * 400, os.urandom(300).hex()]
    for text in texts:
        data = comp.compress(text.encode(), bits)
        assert zlib.decompressobj(-bits).decompress(data + b"\x00\x00\xff\xff") == text.encode()
    assert comp.calls == len(texts)
    assert comp.bytes_in == sum(len(t) for t in texts)


# ------------------------------------------------------------------ the upgrade
def test_answer_header_and_plain_fallback(make_server):
    srv = make_server()
    status, headers, ws = wsraw.handshake(srv.port, headers=[OFFER], cls=wsraw.DeflateWS)
    assert status == 101
    assert headers["sec-websocket-extensions"] == "permessage-deflate; server_no_context_takeover"
    ws.close()
    # an offer that cannot be met: no compression, the connection still works
    status, headers, ws = wsraw.handshake(
        srv.port, headers=[("Sec-WebSocket-Extensions", "permessage-deflate; server_max_window_bits=7")])
    assert status == 101 and "sec-websocket-extensions" not in headers
    assert wsraw.subscribe(ws, "t")["type"] == "ack"
    ws.close()


def test_compression_off(make_server):
    srv = make_server(compression=False)
    status, headers, ws = wsraw.handshake(srv.port, headers=[OFFER])
    assert status == 101 and "sec-websocket-extensions" not in headers
    wsraw.subscribe(ws, "t")
    srv.publish("t", json.loads(JSON_1K))
    assert json.loads(ws.recv_text())["data"] == json.loads(JSON_1K)  # recv_frame asserts RSV1 clear
    ws.close()


def test_settings_checked():
    with pytest.raises(ConfigError):
        Server("127.0.0.1", 0, compression_threshold=-1)
    with pytest.raises(ConfigError):
        Server("127.0.0.1", 0, compression="yes")


# ------------------------------------------------------------------ sending: one deflate, shared bytes
def _plain_subscribed(srv, n):
    return sum(1 for c in srv.hub.connections() if c.is_plain and "broadcast" in c.patterns) == n


@pytest.mark.timeout(60)
def test_one_deflate_per_format_and_window_shared_by_all(make_server):
    srv = make_server(max_connections_per_ip=0)
    big = [wsraw.connect(srv.port, headers=[OFFER], cls=wsraw.DeflateWS) for _ in range(100)]
    small_window = [wsraw.connect(srv.port, headers=[("Sec-WebSocket-Extensions",
                                                      "permessage-deflate; server_max_window_bits=10")],
                                  cls=wsraw.DeflateWS) for _ in range(5)]
    uncompressed = [wsraw.connect(srv.port) for _ in range(5)]
    plain_deflate = [wsraw.connect(srv.port, subprotocol=None, headers=[OFFER], cls=wsraw.DeflateWS)
                     for _ in range(5)]
    plain = [wsraw.connect(srv.port, subprotocol=None) for _ in range(5)]
    try:
        for ws in big + small_window + uncompressed:
            assert wsraw.subscribe(ws, "broadcast")["type"] == "ack"
        assert wsraw.wait_for(lambda: _plain_subscribed(srv, 10))
        before = srv.writer.compressors.calls
        data = json.loads(JSON_1K)
        srv.publish("broadcast", data)
        assert srv.writer.sync()
        # v1 at 15 bits, v1 at 10 bits, the plain format at 15 bits: three calls in all
        assert srv.writer.compressors.calls - before == 3

        def frames(group):
            return [ws.recv_raw() for ws in group]
        got = frames(big)
        assert len(set(got)) == 1, "every receiver of one format and window gets the same bytes"
        b0, payload = got[0]
        assert b0 == 0xC1 and len(payload) < len(JSON_1K) / 2
        assert json.loads(wsraw.inflate(payload))["data"] == data
        got10 = frames(small_window)
        assert len(set(got10)) == 1 and got10[0][0] == 0xC1
        assert json.loads(wsraw.inflate(got10[0][1], 10))["data"] == data
        for b0, payload in frames(uncompressed):
            assert b0 == 0x81 and json.loads(payload)["data"] == data
        gotp = frames(plain_deflate)
        assert len(set(gotp)) == 1 and gotp[0][0] == 0xC1
        assert json.loads(wsraw.inflate(gotp[0][1])) == data
        for b0, payload in frames(plain):
            assert b0 == 0x81 and json.loads(payload) == data
    finally:
        for ws in big + small_window + uncompressed + plain_deflate + plain:
            ws.close()


def test_threshold_edge_and_acks_and_replays(make_server):
    srv = make_server(compression_threshold=200, history_size=10)
    ws = wsraw.connect(srv.port, subprotocol=None, headers=[OFFER], cls=wsraw.DeflateWS)
    assert wsraw.wait_for(lambda: _plain_subscribed(srv, 1))
    for size in (199, 200):  # the plain format's payload is the data's JSON text itself
        text = '"%s"' % ("x" * (size - 2))
        srv.publish("broadcast", json.loads(text))
        b0, payload = ws.recv_raw()
        if size < 200:
            assert (b0, payload) == (0x81, text.encode())
        else:
            assert b0 == 0xC1 and wsraw.inflate(payload) == text.encode()
    ws.close()
    # a replay and an answer follow the same rule: over the threshold compressed
    ws = wsraw.connect(srv.port, headers=[OFFER], cls=wsraw.DeflateWS)
    ack = wsraw.subscribe(ws, "broadcast", since=0)
    assert ack["type"] == "ack" and ws.compressed == 0
    replayed = [ws.recv_json()["data"] for _ in range(2)]
    assert [len(json.dumps(d)) for d in replayed] == [199, 200]
    assert ws.compressed == 2  # both over 200 bytes as v1 envelopes
    ws.send_json({"type": "ping", "id": "p" * 300})
    assert ws.recv_json()["id"] == "p" * 300 and ws.compressed == 3
    ws.close()


# ------------------------------------------------------------------ receiving: bounded inflation
def _publish_text(size: int) -> bytes:
    head, tail = '{"type":"publish","topic":"t","id":1,"data":"', '"}'
    return (head + "a" * (size - len(head) - len(tail)) + tail).encode()


def test_inflated_size_limit_at_and_past_the_edge(make_server):
    limit = 64 * 1024
    srv = make_server(max_message_size=limit)
    for size, fragmented, level in ((limit, False, 6), (limit, True, 6), (limit, False, 0),
                                    (limit + 1, False, 6), (limit + 1, True, 6), (limit + 1, False, 0)):
        ws = wsraw.connect(srv.port, headers=[OFFER], cls=wsraw.DeflateWS)
        data = wsraw.deflate(_publish_text(size), level=level)
        if level == 0:  # stored: the frame is longer than the limit, what it carries is not
            assert len(data) > limit
        if fragmented:  # the bound counts the whole message, across frames and a ping between them
            ws.sock.sendall(wsraw.encode_frame(0x1, data[:40], fin=False, rsv=4)
                            + wsraw.encode_frame(0x9, b"hi")
                            + wsraw.encode_frame(0x0, data[40:]))
        else:
            ws.send_frame(0x1, data, rsv=4)
        if size <= limit:
            if fragmented:
                assert ws.recv_frame() == (0xA, b"hi")
            assert ws.recv_json()["type"] == "ack", size
        else:
            assert ws.expect_close() == (1009, "message too big"), size
            assert ws.at_eof()
        ws.close()


@pytest.mark.parametrize("frame, code", [
    (wsraw.encode_frame(0x9, b"x", rsv=4), 1002),  # RSV1 on a control frame
    (wsraw.encode_frame(0x1, b"\xff\xff\xff\xff", rsv=4), 1007),  # not deflate data
], ids=["rsv1-on-a-control-frame", "not-deflate-data"])
def test_bad_compressed_frames(make_server, frame, code):
    srv = make_server()
    ws = wsraw.connect(srv.port, headers=[OFFER], cls=wsraw.DeflateWS)
    ws.sock.sendall(frame)
    assert ws.expect_close()[0] == code
    ws.close()


def test_rsv1_without_compression_is_a_protocol_error(make_server):
    srv = make_server()
    ws = wsraw.connect(srv.port)
    ws.send_frame(0x1, wsraw.deflate(b'{"type":"ping","id":1}'), rsv=4)
    assert ws.expect_close()[0] == 1002
    ws.close()


def _bomb(gib: int = 1) -> bytes:
    """A raw deflate stream of ``gib`` GiB of zeros (about 1 MB): after the first MiB every
    MiB compresses to the same bytes, so the stream is built without compressing it all."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_SYNC_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_SYNC_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_SYNC_FLUSH) == again
    return (first + again * ((gib << 10) - 1))[:-4]


@pytest.mark.timeout(60)
def test_zip_bomb_is_refused_at_the_limit_without_inflating_it():
    limit = 4 << 20
    bomb = _bomb()
    assert len(bomb) < limit // 3
    with ServerProcess("--store", "memory", "--max-message-size", str(limit)) as proc:
        warm = wsraw.connect(proc.port, headers=[OFFER], cls=wsraw.DeflateWS)
        warm.send_frame(0x1, wsraw.deflate(_publish_text(limit // 2)), rsv=4)  # the path taken once
        assert warm.recv_json()["type"] == "ack"
        before = proc.rss_kib("VmHWM")
        ws = wsraw.connect(proc.port, headers=[OFFER], cls=wsraw.DeflateWS)
        ws.sock.sendall(wsraw.encode_frame(0x1, bomb, rsv=4))
        assert ws.expect_close(timeout=30 * wsraw.SCALE) == (1009, "message too big")
        grown = proc.rss_kib("VmHWM") - before
        # the peak: the frame (1 MB) and at most the limit of inflated bytes, not 1 GiB (nor the
        # 64 MiB that one 64 KiB read of it inflates to)
        assert grown * 1024 < limit + 2 * len(bomb) + (4 << 20), grown
        # the server goes on
        warm.send_json({"type": "ping", "id": 2})
        assert warm.recv_json() == {"type": "pong", "id": 2}
        ws.close()
        warm.close()


# ------------------------------------------------------------------ the Python client, metrics
def test_client_negotiates_by_default_and_can_decline(make_server):
    srv = make_server()
    data = json.loads(JSON_1K)
    for compression in (True, False):
        before = srv.writer.compressors.calls
        with Client(srv.url, compression=compression) as c:
            c.subscribe("t")
            c.publish("t", data)
            assert next(iter(c)).data == data
        assert srv.writer.compressors.calls - before == (1 if compression else 0)
    body = urllib.request.urlopen(srv.http_url + "/metrics", timeout=10).read().decode()
    metrics = {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
               if line.startswith("wsbroadcast_deflate")}
    assert metrics["wsbroadcast_deflate_calls_total"] >= 1
    assert 0 < metrics["wsbroadcast_deflate_out_bytes_total"] < metrics["wsbroadcast_deflate_in_bytes_total"]


def test_command_line_flags(monkeypatch):
    from test_cli_serve import parsed_config
    cfg = parsed_config(monkeypatch)
    assert (cfg.compression, cfg.compression_threshold) == (True, 128)
    cfg = parsed_config(monkeypatch, "--no-compression", "--compression-threshold", "300")
    assert (cfg.compression, cfg.compression_threshold) == (False, 300)
    with ServerProcess("--store", "memory", "--no-compression") as proc:
        status, headers, ws = wsraw.handshake(proc.port, headers=[OFFER])
        assert status == 101 and "sec-websocket-extensions" not in headers
        ws.close()
