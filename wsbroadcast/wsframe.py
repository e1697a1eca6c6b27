"""Server-to-client WebSocket frames, encoded once and shared (RFC 6455 section 5.2).

Server frames are never masked, so each frame is a short header plus the payload;
the writer thread sends these bytes as they are, without touching wsproto.
"""

from __future__ import annotations

import struct
from typing import Optional

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
#: the first reserved bit: "compressed" under permessage-deflate (RFC 7692)
RSV1 = 0x40

_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def _head(b0: int, n: int) -> bytes:
    """The header of an unmasked frame whose first byte is ``b0``, with ``n`` payload bytes."""
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return _pack_16(b0, 126, n)
    return _pack_64(b0, 127, n)


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame carrying ``payload`` (``opcode`` may carry RSV1)."""
    return _head(0x80 | opcode, len(payload)) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame; ``payload`` must be valid UTF-8."""
    # _head inlined: the writer frames every delivered message here
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _pack_16(0x81, 126, n) + payload
    return _pack_64(0x81, 127, n) + payload


def text_frame_of(*parts: bytes) -> bytes:
    """A text frame whose payload is ``parts`` joined (one copy of them in all)."""
    return b"".join((_head(0x81, sum(len(p) for p in parts)),) + parts)


def text_payload(frame: bytes) -> Optional[bytes]:
    """The payload of a final, uncompressed, unmasked text frame, or None for any other frame."""
    if len(frame) < 2 or frame[0] != 0x81:
        return None
    n = frame[1] & 0x7F
    head = 2 if n < 126 else (4 if n == 126 else 10)
    return frame[head:]


def compressed_text_frame(data: bytes) -> bytes:
    """A text frame carrying a message compressed with permessage-deflate (RSV1 set)."""
    return frame(RSV1 | OP_TEXT, data)


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


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (RFC 6455 section 5.3)."""
    n = len(payload)
    if not n:
        return payload
    whole = key * (n >> 2) + key[: n & 3]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(whole, "little")).to_bytes(n, "little")


class FrameSplitter:
    """Cuts received bytes into whole client frames; decodes plain text frames itself.

    ``feed(data)`` returns a list of items, each either ``str`` (the text of a
    complete, masked, unfragmented text frame with clear reserved bits and valid
    UTF-8, already unmasked and decoded) or ``bytes`` (one or more whole frames for
    the full protocol parser: control frames, fragments, anything unusual). Bytes
    of an incomplete frame go to the full parser as they arrive. A frame declaring more than
    ``max_payload + slack`` bytes stops the splitting and sets ``too_big``; one within
    the slack goes to the full parser (a compressed frame may be a little longer than
    what it carries, which is bounded as it is inflated).
    """

    __slots__ = ("max_payload", "limit", "too_big", "_buf", "_in_fragment", "_slow_left")

    def __init__(self, max_payload: int, slack: int = 0) -> None:
        self.max_payload = max_payload
        self.limit = max_payload + slack
        self.too_big = False
        self._buf = b""
        self._in_fragment = False  # a fragmented message is under way: all goes to the parser
        self._slow_left = 0  # bytes still to come of a frame the full parser has begun

    def feed(self, data: bytes) -> list:
        out: list = []
        if self._slow_left:
            # the rest of a frame the full parser has begun
            take = min(self._slow_left, len(data))
            out.append(data[:take])
            self._slow_left -= take
            data = data[take:]
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        slow_start = -1  # start of a run of frames for the full parser
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if n > self.limit:
                self.too_big = True
                break
            masked = b1 & 0x80
            if masked:
                head += 4
            total = head + n
            opcode = b0 & 0x0F
            if end - pos < total:
                # an incomplete frame: the full parser takes it as it comes (it fails
                # fast on bad UTF-8 and never needs the whole frame in memory)
                if slow_start < 0:
                    slow_start = pos
                if opcode < 8:
                    self._in_fragment = not (b0 & 0x80)
                self._slow_left = total - (end - pos)
                pos = end
                break
            text = None
            # (a length in a wider form than needed is a protocol error: the parser says so)
            if b0 == 0x81 and masked and not self._in_fragment and n <= self.max_payload and (
                    head == 6 or (head == 8 and n > 125) or (head == 14 and n > 65535)):
                key = buf[pos + head - 4:pos + head]
                try:
                    text = unmask(buf[pos + head:pos + total], key).decode("utf-8")
                except UnicodeDecodeError:
                    text = None  # the full parser reports it (1007)
            if text is not None:
                if slow_start >= 0:
                    out.append(buf[slow_start:pos])
                    slow_start = -1
                out.append(text)
            else:
                if slow_start < 0:
                    slow_start = pos
                if opcode < 8:  # data or continuation frame: track fragmentation
                    self._in_fragment = not (b0 & 0x80)
            pos += total
        if slow_start >= 0:
            out.append(buf[slow_start:pos])
        self._buf = buf[pos:] if pos < end else b""
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

