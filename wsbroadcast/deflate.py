"""permessage-deflate (RFC 7692): negotiation, shared compression, bounded inflation.

The server always answers with ``server_no_context_takeover``: each message it
sends is an independent raw deflate stream, so every receiver that negotiated
the same window gets the same bytes and a message is deflated once per
(delivery format, window bits), however many receive it. What clients send is
inflated per connection (their context takeover is allowed), never past the
message size limit.
"""

from __future__ import annotations

import zlib
from typing import Dict, Iterable, List, NamedTuple, Optional

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits

from .wsframe import compressed_text_frame

NAME = "permessage-deflate"
#: the empty stored block that ends a sync flush; RFC 7692 7.2.1 removes it
_TAIL = b"\x00\x00\xff\xff"
#: compression level (zlib's default: at 1 KB JSON it costs about what level 1 costs)
LEVEL = 6


class Agreement(NamedTuple):
    """A permessage-deflate offer the server accepts, and its answer."""

    #: the Sec-WebSocket-Extensions value of the 101 answer
    answer: str
    #: window bits of what the server sends (8..15; 8 is compressed with zlib's 9, see ``Compressors``)
    server_bits: int
    #: the client compresses each message on its own (its inflater can be freed between messages)
    client_no_context_takeover: bool


# ---------------------------------------------------------------- negotiation
def _split_offers(values: Iterable[str]) -> List[str]:
    offers: List[str] = []
    for value in values:
        offers.extend(part.strip() for part in value.split(","))
    return [o for o in offers if o]


def _window_bits(value: Optional[str]) -> Optional[int]:
    """8..15 written as RFC 7692 7.1.2 says (no sign, no leading zero), else None."""
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # a quoted-string whose content is the token
    if value in ("8", "9", "10", "11", "12", "13", "14", "15"):
        return int(value)
    return None


def _parse_offer(offer: str) -> Optional[Dict[str, Optional[str]]]:
    """The parameters of one permessage-deflate offer, or None when it is another
    extension or breaks RFC 7692 (unknown or repeated parameter, bad value)."""
    parts = [p.strip() for p in offer.split(";")]
    if parts[0] != NAME:  # as wsproto compares it, so that it answers what is chosen here
        return None
    params: Dict[str, Optional[str]] = {}
    for part in parts[1:]:
        if not part:
            return None
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if name in params:
            return None
        params[name] = value.strip() if eq else None
    for name, given in params.items():
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if given is not None:
                return None
        elif name == "server_max_window_bits":
            if _window_bits(given) is None:
                return None
        elif name == "client_max_window_bits":
            if given is not None and _window_bits(given) is None:
                return None
        else:
            return None
    return params


def negotiate(values: Iterable[str]) -> Optional[Agreement]:
    """The answer to the first acceptable permessage-deflate offer among the
    Sec-WebSocket-Extensions ``values``, or None (no compression)."""
    for offer in _split_offers(values):
        params = _parse_offer(offer)
        if params is None:
            continue
        answer = [NAME, "server_no_context_takeover"]
        client_nct = "client_no_context_takeover" in params
        if client_nct:
            answer.append("client_no_context_takeover")
        bits = 15
        if "server_max_window_bits" in params:
            bits = _window_bits(params["server_max_window_bits"]) or 15
            answer.append("server_max_window_bits=%d" % bits)
        # client_max_window_bits offered: the client takes any window the server
        # names; not naming one leaves it at its own (an inflater of 15 bits reads all)
        return Agreement("; ".join(answer), bits, client_nct)
    return None


# ---------------------------------------------------------------- sending
class Compressors:
    """One compressor per window size, shared by every message (the writer's thread only).

    Each message ends with a full flush, which empties the compressor's history:
    the next message refers to nothing before it, exactly what a new compressor
    would produce, without allocating one per message. zlib has no raw deflate
    with an 8-bit window; its 9-bit one never reaches back more than 250 bytes
    (512 - 262), within what an 8-bit inflater reads.
    """

    def __init__(self, level: int = LEVEL) -> None:
        self.level = level
        self._by_bits: Dict[int, "zlib._Compress"] = {}
        #: deflate calls, bytes given, bytes produced (payloads, without frame headers)
        self.calls = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, payload: bytes, bits: int) -> bytes:
        """``payload`` as one message's compressed data (RFC 7692 7.2.1)."""
        c = self._by_bits.get(bits)
        if c is None:
            c = self._by_bits[bits] = zlib.compressobj(self.level, zlib.DEFLATED, -max(9, bits))
        data = c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH)
        if data.endswith(_TAIL):
            data = data[:-4]
        self.calls += 1
        self.bytes_in += len(payload)
        self.bytes_out += len(data)
        return data

    def text_frame(self, payload: bytes, bits: int) -> bytes:
        """A compressed text frame (RSV1 set) carrying ``payload``."""
        return compressed_text_frame(self.compress(payload, bits))


# ---------------------------------------------------------------- receiving
class InboundDeflate(Extension):
    """wsproto's side of a negotiated permessage-deflate: inflates what the client sends.

    The inflated size of each message is bounded by ``max_size`` while inflating:
    past it the frame parser fails with 1009 without producing the excess. The
    server's own frames never go through wsproto, so nothing is compressed here.
    """

    name = NAME

    def __init__(self, agreement: Agreement, max_size: int) -> None:
        self.agreement = agreement
        self.max_size = max_size
        self._inflater: Optional["zlib._Decompress"] = None
        self._compressed = False  # the message under way is compressed
        self._size = 0  # its inflated bytes so far
        self._in_message = False
        self._control = False  # the frame under way is a control frame (never compressed)

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:  # pragma: no cover - a server never offers
        return False

    def accept(self, offer: str) -> str:
        """The answer chosen by ``negotiate`` (wsproto asks once per offer)."""
        return self.agreement.answer[len(NAME) + 2:]

    def frame_inbound_header(self, proto: object, opcode: Opcode, rsv: RsvBits,
                             payload_length: int) -> "CloseReason | RsvBits":
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR
        self._control = opcode.iscontrol()
        if not self._control and opcode is not Opcode.CONTINUATION:
            self._compressed = rsv.rsv1
            self._size = 0
            self._in_message = True
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto: object, data: bytes) -> "bytes | CloseReason":
        if not self._compressed or self._control or not data:
            return data
        return self._inflate(data)

    def _inflate(self, data: bytes) -> "bytes | CloseReason":
        inflater = self._inflater
        if inflater is None:
            inflater = self._inflater = zlib.decompressobj(-15)
        room = self.max_size - self._size
        try:
            # one byte more than the room left tells "too big" without inflating the rest
            out = inflater.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(out) > room:
            self._inflater = None
            return CloseReason.MESSAGE_TOO_BIG
        self._size += len(out)
        return out

    def frame_inbound_complete(self, proto: object, fin: bool) -> "bytes | CloseReason | None":
        if not fin or self._control or not self._in_message:
            return None  # a control frame, or a fragment of a message under way
        self._in_message = False
        if not self._compressed:
            return None
        self._compressed = False
        out = self._inflate(_TAIL)
        if self.agreement.client_no_context_takeover:
            self._inflater = None  # nothing later refers to this message
        return out
