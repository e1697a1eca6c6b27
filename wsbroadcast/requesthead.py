"""A request head of the common shape, parsed without h11 (sans-I/O).

Nearly every WebSocket upgrade is a short HTTP/1.1 head in printable ASCII with
CRLF line ends, one Host and no body. ``parse_plain_head`` reads that shape in a
few C-level passes and gives what h11 would give for it (method, target, the
headers as (lower-case name, value) pairs, version); for anything else it
declines (None) and the head goes to h11 as before. It never accepts a head h11
refuses, and ``tests/test_requesthead.py`` checks the two agree.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

#: a head longer than this is left to h11 (whose own limit is the same)
MAX_HEAD = 16384
#: bytes a plain head may hold: printable ASCII, space, tab and the CRLF line ends
_HEAD_BYTES = bytes(range(0x20, 0x7F)) + b"\t\r\n"
#: bytes of an HTTP token (RFC 9110 section 5.6.2), as h11 reads a header name
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: method (a token), target (visible ASCII) and HTTP/1.1, as h11's request line allows them
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.1\Z")
#: headers that frame a body: a head with one is left to h11
_BODY_HEADERS = (b"content-length", b"transfer-encoding")


class PlainRequest:
    """A request read by ``parse_plain_head``: the fields of h11's ``Request`` that are used."""

    __slots__ = ("method", "target", "headers", "http_version")

    def __init__(self, method: bytes, target: bytes, headers: List[Tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        #: (lower-case name, value without surrounding spaces and tabs), in order
        self.headers = headers
        self.http_version = b"1.1"


def parse_plain_head(head: bytes) -> Optional[PlainRequest]:
    """The request of ``head`` (request line to the blank line, inclusive) or None.

    None for anything but: HTTP/1.1; every line end CRLF; printable ASCII, space and
    tab only (no obs-text, no control bytes); a token method; header lines
    ``name:value`` with a token name (no obs-fold, no space before the colon);
    exactly one Host; no Content-Length or Transfer-Encoding; at most ``MAX_HEAD``
    bytes. Such a head is read by h11 into the same request.
    """
    if len(head) > MAX_HEAD or not head.endswith(b"\r\n\r\n"):
        return None
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or head.translate(None, _HEAD_BYTES):
        return None
    lines = head[:-4].split(b"\r\n")
    line = _REQUEST_LINE.match(lines[0])
    if line is None:
        return None
    headers = []
    hosts = 0
    for field in lines[1:]:
        name, colon, value = field.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN_BYTES):
            return None
        name = name.lower()
        if name in _BODY_HEADERS:
            return None
        if name == b"host":
            hosts += 1
        headers.append((name, value.strip(b" \t")))
    if hosts != 1:
        return None
    return PlainRequest(line.group(1), line.group(2), headers)
