"""Server-to-client WebSocket frames, encoded once and shared (RFC 6455 section 5.2).

Server frames are never masked, so each frame is a short header plus the payload;
the writer thread sends these bytes as they are, without touching wsproto.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame carrying ``payload``."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _pack_16(b0, 126, n) + payload
    return _pack_64(b0, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame; ``payload`` must be valid UTF-8."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _pack_16(0x81, 126, n) + payload
    return _pack_64(0x81, 127, n) + payload


def binary_frame(payload: bytes) -> bytes:
    """A binary frame."""
    return frame(OP_BINARY, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with a status code and a reason (truncated to fit 125 bytes)."""
    raw = reason.encode("utf-8")[:123]
    # never cut a multi-byte character in half
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError:
            raw = raw[:-1]
    return frame(OP_CLOSE, struct.pack("!H", code) + raw)


def ping_frame(payload: bytes = b"") -> bytes:
    """A ping frame (payload at most 125 bytes)."""
    return frame(OP_PING, payload[:125])


def pong_frame(payload: bytes = b"") -> bytes:
    """A pong frame answering a ping with the same payload."""
    return frame(OP_PONG, payload[:125])
