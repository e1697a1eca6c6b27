"""The upgrade's fast paths against what they stand for.

parse_plain_head against h11: for any head it reads the request h11 reads, or declines.

Heads are generated valid and hostile (bare LF or CR, space before the colon, obs-fold,
duplicate headers, NUL, high bytes, huge lines, other versions, lower-case methods,
body framing headers); whatever the fast path accepts, h11 must accept as the same
request (method, target, headers as h11 gives them, version). The one-pass header scan
of the handshake (_Handshake) against the header-by-header checks it replaced.
"""

from typing import Any, Optional

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from wsproto.utilities import split_comma_header

from wsbroadcast.http import _Handshake, _header, _plain_host, check_head, check_plain_head
from wsbroadcast.requesthead import MAX_HEAD, parse_plain_head


def h11_request(head: bytes) -> Optional[Any]:
    """h11's request for ``head`` (None: h11 refuses it or finds none)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def assert_agrees(head: bytes) -> bool:
    """Fail when the fast path reads ``head`` otherwise than h11; True when it read it."""
    fast = parse_plain_head(head)
    if fast is None:
        return False
    req = h11_request(head)
    assert req is not None, "fast path accepted a head h11 refuses: %r" % head
    assert (fast.method, fast.target, fast.http_version) == (req.method, req.target, req.http_version)
    assert fast.headers == list(req.headers)
    # the framing checks of a raw head give the same answer for the head read
    mine, theirs = check_plain_head(fast), check_head(head)
    assert (mine and (mine.status, mine.message)) == (theirs and (theirs.status, theirs.message))
    return True


_NAMES = st.sampled_from([b"Host", b"host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key",
                          b"Sec-WebSocket-Version", b"Origin", b"User-Agent", b"X-A", b"x-b_c.d~e",
                          b"Content-Length", b"Transfer-Encoding", b"Content-Type"])
_VALUES = st.one_of(
    st.sampled_from([b"websocket", b"Upgrade", b"13", b"dGhlIHNhbXBsZSBub25jZQ==", b"127.0.0.1:8080",
                     b"", b"  padded  ", b"\tTAB\t", b"a  b", b"0", b"chunked", b"5, 5"]),
    st.text(alphabet="ab /:=,;\t\"()~", max_size=12).map(lambda s: s.encode("ascii")),
)
_SEPS = st.sampled_from([b": "] * 4 + [b":", b":\t", b":  "])
_METHODS = st.sampled_from([b"GET"] * 12 + [b"get", b"POST", b"HEAD", b"OPTIONS", b"M-SEARCH"])
_TARGETS = st.sampled_from([b"/ws", b"/", b"/ws?token=abc", b"*", b"http://h/ws", b"/%20", b"/a;b=c"])
_VERSIONS = st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1",
                                                 b"HTTP/1", b"HTTP/3.1"])
#: what is put into a head at a random place: bytes h11 or check_head treat specially
_HOSTILE = st.one_of(
    st.sampled_from([b"\x00", b"\x80", b"\xff", b"\n", b"\r", b" ", b"\t", b":", b"\x0b", b"\x0c",
                     b"\x7f", b"\x01", b"\r\n ", b"\r\n\t", b"\r\n\r\n", b"\r\nHost: x",
                     b"\r\nContent-Length: 1", b"\r\nTransfer-Encoding: chunked", b"\r\n: v",
                     b"\r\nX : v", b"\r\nX", b"x" * (MAX_HEAD + 10)]),
    st.binary(min_size=1, max_size=3),
)


@st.composite
def heads(draw: Any) -> bytes:
    """A well-formed head (varied), then up to three hostile edits of its bytes."""
    parts = [draw(_METHODS), b" ", draw(_TARGETS), b" ", draw(_VERSIONS), b"\r\n"]
    fields = draw(st.lists(st.tuples(_NAMES, _SEPS, _VALUES), max_size=6))
    if draw(st.integers(0, 9)):  # most requests have their Host
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b": ", b"example.com"))
    for name, sep, value in fields:
        parts += [name, sep, value, b"\r\n"]
    head = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(head)))
        edit = draw(st.integers(0, 2))
        if edit == 0:
            head[at:at] = draw(_HOSTILE)
        elif edit == 1 and at < len(head):
            head[at] = draw(st.integers(0, 255))
        else:
            del head[at:at + draw(st.integers(1, 4))]
    return bytes(head) + b"\r\n"


@settings(max_examples=1500, deadline=None)
@given(heads())
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost : a\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n")
@example(b"GET /ws HTTP/1.1\nHost: a\n\n")
@example(b"GET /ws HTTP/1.1\r\nHost: a\rb\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost: a\x00\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost: \xe9\r\n\r\n")
@example(b"GET /ws HTTP/1.0\r\n\r\n")
@example(b"\r\nGET /ws HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
@example(b"GET /ws HTTP/1.1\r\nHost: a\r\nOrigin: x\r\norigin: y\r\n\r\n")
def test_fast_path_reads_what_h11_reads_or_declines(head: bytes) -> None:
    assert_agrees(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"))
def test_arbitrary_bytes_are_declined_or_read_alike(head: bytes) -> None:
    assert_agrees(head)


@pytest.mark.parametrize("head", [
    # a browser's upgrade, and the shortest a client library sends
    b"GET /ws?token=a.b-c_d HTTP/1.1\r\nHost: example.com:8080\r\nConnection: Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Upgrade: websocket\r\nOrigin: https://example.com\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Sec-WebSocket-Protocol: wsbroadcast.v1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:h\r\nX-Empty:\r\nX-Pad: \t a \t b \t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nhost: h\r\n" + b"X-Long: " + b"v" * (MAX_HEAD - 60) + b"\r\n\r\n",
])
def test_common_heads_take_the_fast_path(head: bytes) -> None:
    assert assert_agrees(head)


@pytest.mark.parametrize("size", [MAX_HEAD, MAX_HEAD + 1])
def test_head_size_limit_at_and_past_its_edge(size: int) -> None:
    start = b"GET /ws HTTP/1.1\r\nHost: h\r\nX: "
    head = start + b"v" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    assert (parse_plain_head(head) is not None) == (size <= MAX_HEAD)


# ---------------------------------------------------------------------- the upgrade's header scan
def reference_handshake_valid(headers: Any) -> bool:
    """The header-by-header checks _Handshake replaced (RFC 6455 4.2.1), as they were, except
    that a Connection value not in ASCII (which made them raise) fails them, like the other
    token lists."""
    host = upgrade = version = None
    connection = False
    for name, value in headers:
        name = name.lower()
        if name == b"host":
            host = value
            try:
                value.decode("idna")
            except UnicodeError:
                return False
        elif name in (b"sec-websocket-protocol", b"sec-websocket-extensions"):
            if not value.isascii():
                return False
        elif name == b"upgrade":
            upgrade = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"connection":
            if not value.isascii():
                return False
            connection = connection or any(t.lower() == "upgrade" for t in split_comma_header(value))
    return (host is not None and connection and version == b"13"
            and upgrade is not None and upgrade.lower() == b"websocket")


_HS_NAMES = st.sampled_from([b"host", b"upgrade", b"connection", b"sec-websocket-version", b"sec-websocket-key",
                             b"sec-websocket-protocol", b"sec-websocket-extensions", b"origin", b"x-other"])
_HS_VALUES = st.one_of(
    st.sampled_from([b"websocket", b"WebSocket", b"Upgrade", b"keep-alive, upgrade", b"upgrade2", b"13", b"8",
                     b"example.com", b"xn--bcher-kva.example", b"XN--bcher-kva.ch", b"xn--zz-", b"xn--", b"a..b",
                     b"\xe9t\xe9.fr", b"a" * 70 + b".com", b"wsbroadcast.v1, chat", b"permessage-deflate", b""]),
    st.binary(max_size=12))


_VALID_HANDSHAKE = [(b"host", b"example.com"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                    (b"sec-websocket-version", b"13"), (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")]


@st.composite
def handshake_headers(draw: Any) -> Any:
    """A valid handshake's headers, some left out, others added anywhere."""
    headers = [h for h in _VALID_HANDSHAKE if draw(st.integers(0, 5))]
    for extra in draw(st.lists(st.tuples(_HS_NAMES, _HS_VALUES), max_size=4)):
        headers.insert(draw(st.integers(0, len(headers))), extra)
    return headers


@settings(max_examples=1500, deadline=None)
@given(handshake_headers())
@example([(b"host", b"a"), (b"connection", b"upgrade"), (b"sec-websocket-version", b"13"), (b"upgrade", b"WebSocket")])
def test_handshake_scan_agrees_with_the_header_by_header_checks(headers: Any) -> None:
    hs = _Handshake(headers)
    assert hs.valid == reference_handshake_valid(headers)
    assert (hs.first_host, hs.origin, hs.key) == (_header(headers, b"host"), _header(headers, b"origin"),
                                                  _header(headers, b"sec-websocket-key"))
    offered = [p.strip() for k, v in headers if k == b"sec-websocket-protocol" for p in v.decode("latin-1").split(",")]
    assert hs.offered == offered
    assert hs.extension_offers == [v for k, v in headers if k == b"sec-websocket-extensions"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=20), _HS_VALUES, st.text(max_size=12).map(lambda s: s.encode("utf-8"))))
def test_plain_host_is_read_alike_by_the_idna_codec(value: bytes) -> None:
    if _plain_host(value):
        assert value.decode("idna") == value.decode("ascii")
