"""HTTP on the broker's port: request parsing with h11, routing, and the upgrade decision.

Every connection starts here, in its own thread. Plain HTTP requests are answered
(keep-alive supported); a WebSocket upgrade on the configured path that passes
the origin, auth and limit checks is handed back as an ``Upgrade`` for the
reader to run.

Every request gets an answer: a head whose framing a proxy could read otherwise
(``check_head``) gets 400, another HTTP version 505, a fault 500, each with the
connection closed; a ``Host`` the server does not serve gets 403 ``forbidden_host``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import socket
import struct
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto.extensions import Extension
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import generate_accept_token, split_comma_header

from .deflate import Agreement, InboundDeflate, negotiate
from .envelope import PLAIN, SUBPROTOCOL, V1, encode_json, parse_json
from .errors import AuthError, BrokerUnavailable, ErrorCode, StoreError, TopicError
from .hosts import is_loopback
from .metrics import stats_document
from .requesthead import PlainRequest, parse_plain_head
from .serving import Served
from .store import StoredMessage, data_bytes
from .topics import is_wildcard, validate_pattern, validate_topic

logger = logging.getLogger(__name__)

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 413: b"Payload Too Large",
    415: b"Unsupported Media Type", 426: b"Upgrade Required", 429: b"Too Many Requests",
    500: b"Internal Server Error", 503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
_STATUS_OF = {
    ErrorCode.BAD_JSON: 400, ErrorCode.BAD_REQUEST: 400, ErrorCode.BAD_TOPIC: 400,
    ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.FORBIDDEN_ORIGIN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405, ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415, ErrorCode.RATE_LIMITED: 429, ErrorCode.FORBIDDEN_HOST: 403,
    ErrorCode.UNAVAILABLE: 503, ErrorCode.UPGRADE_REQUIRED: 426,
}
#: known paths and the methods each accepts (the WebSocket path is added per server)
_ROUTES = {"/": ("GET", "HEAD"), "/healthz": ("GET", "HEAD"), "/metrics": ("GET", "HEAD"),
           "/publish": ("POST",), "/history": ("GET", "HEAD"), "/stats": ("GET", "HEAD"),
           "/dashboard": ("GET", "HEAD"), "/wsbroadcast.js": ("GET", "HEAD"),
           "/wsbroadcast.mjs": ("GET", "HEAD"), "/presence": ("GET", "HEAD")}
#: files of the package served as they are: path -> (file in static/, content type)
_FILES = {"/wsbroadcast.js": ("wsbroadcast.js", "text/javascript; charset=utf-8"),
          "/wsbroadcast.mjs": ("wsbroadcast.mjs", "text/javascript; charset=utf-8"),
          "/dashboard": ("dashboard.html", "text/html; charset=utf-8")}
_MAX_HEADER = 16384
#: the end of a request head as h11 finds it (bare LF included, so that check_head sees it)
_HEAD_END = re.compile(rb"\n\r?\n")
_REQUEST_LINE = re.compile(rb"[^ ]+ [^ ]+ HTTP/([0-9]+(?:\.[0-9]+)?)\Z")
#: headers a request may carry once: a second copy is one that a proxy in front may read instead
_SINGLE = frozenset((b"host", b"content-length", b"content-type", b"origin", b"authorization",
                     b"x-api-key", b"upgrade", b"sec-websocket-key", b"sec-websocket-version"))
#: the largest seq a store holds (SQLite INTEGER); a larger ``since`` is past every message
_MAX_SEQ = 2 ** 63 - 1
#: after a closing error answer: how long and how much the rest of the request is read and
#: dropped, so that the close does not reset the connection before the client reads the answer
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 256 * 1024
#: a GET /history body stops before the message that would take it past this (PROTOCOL.md 1)
HISTORY_MAX_BYTES = 1024 * 1024
#: bytes handed to the socket per send of a streamed answer
_CHUNK = 65536
#: a streamed answer must be taken within this many handshake timeouts in all (and each
#: chunk within one): a client that stops reading costs one chunk and is then dropped
_ANSWER_TIMEOUTS = 6
_LINGER_RESET = struct.pack("ii", 1, 0)
#: a request as routed: h11's, or one read by the fast path (a WebSocket upgrade)
_Request = Union[h11.Request, PlainRequest]


class HttpError(Exception):
    """An HTTP error answer: status from the code, JSON body."""

    def __init__(self, code: ErrorCode, message: str, headers: Optional[List[Tuple[str, str]]] = None,
                 status: Optional[int] = None, close: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or _STATUS_OF.get(code, 400)
        self.headers = headers or []
        #: the connection cannot go on after the answer (framing in doubt, server fault)
        self.close = close


class Upgrade:
    """An accepted WebSocket upgrade, ready for the reader."""

    __slots__ = ("extensions", "kind", "claims", "trailing", "refuse", "deflate", "greeting")

    def __init__(self, extensions: List[Extension], kind: str, claims: Any, trailing: bytes,
                 refuse: Optional[Tuple[int, str]] = None) -> None:
        #: the extensions agreed (wsproto's side of permessage-deflate, or none): the reader
        #: makes its wsproto frame parser with them when a frame first needs one
        self.extensions = extensions
        self.kind = kind
        self.claims = claims
        self.trailing = trailing
        #: (close code, reason) when the connection must be closed right after the upgrade
        self.refuse = refuse
        #: the permessage-deflate agreement, or None (no compression)
        self.deflate: Optional[Agreement] = None
        #: the 101 answer when it is left to the writer, queued with the subscriptions the
        #: token grants (b"": already sent)
        self.greeting = b""


class _Timeout(Exception):
    pass


def _header(headers: Sequence[Tuple[bytes, bytes]], name: bytes) -> Optional[str]:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def check_head(head: bytes) -> Optional[HttpError]:
    """Why a raw request head (request line to blank line) must be refused, or None.

    What h11 accepts but a proxy in front may read differently (request smuggling,
    RFC 9112) is refused with 400 and the connection closed: a bare LF line end
    (section 2.2 allows either), obs-fold (section 5.2), Content-Length with
    Transfer-Encoding, Transfer-Encoding other than exactly ``chunked`` or on
    HTTP/1.0 (section 6.1), a Content-Length list or a second copy of a header in
    ``_SINGLE``. An HTTP version other than 1.0 and 1.1 (the HTTP/2 preface
    included) is 505. Anything else malformed is left to h11.
    """
    line = head.partition(b"\n")[0]
    version = _REQUEST_LINE.match(line.rstrip(b"\r"))
    if version is not None and version.group(1) not in (b"1.0", b"1.1"):
        return HttpError(ErrorCode.BAD_REQUEST, "HTTP version not supported (use HTTP/1.1)",
                         status=505, close=True)
    if head.count(b"\n") != head.count(b"\r\n"):
        return _framing("line ends must be CRLF")
    seen = set()
    codings: Optional[List[bytes]] = None  # every coding of every Transfer-Encoding, in order
    for field in head.split(b"\r\n")[1:]:
        if field[:1] in (b" ", b"\t"):
            return _framing("obsolete line folding")
        name, colon, value = field.partition(b":")
        name = name.lower()
        if not colon:
            continue
        if name in _SINGLE:
            if name in seen:
                return _framing("more than one %s header" % name.decode("latin-1"))
            seen.add(name)
        if name == b"content-length" and b"," in value:
            return _framing("a list in Content-Length")
        if name == b"transfer-encoding":
            codings = codings if codings is not None else []
            codings.extend(c.strip().lower() for c in value.split(b","))
    if codings is not None:
        if b"content-length" in seen:
            return _framing("both Content-Length and Transfer-Encoding")
        if version is not None and version.group(1) == b"1.0":
            return _framing("Transfer-Encoding on HTTP/1.0")
        if codings != [b"chunked"]:
            return _framing("chunked must be the last and only transfer coding")
    return None


def check_plain_head(req: PlainRequest) -> Optional[HttpError]:
    """``check_head`` of a head ``parse_plain_head`` read: of its rules, only the
    second copy of a header in ``_SINGLE`` can apply to one."""
    seen = set()
    for name, _value in req.headers:
        if name in _SINGLE:
            if name in seen:
                return _framing("more than one %s header" % name.decode("latin-1"))
            seen.add(name)
    return None


def _error_parts(err: HttpError) -> Tuple[bytes, List[Tuple[str, str]]]:
    """The JSON body and extra headers of an error answer."""
    body = encode_json({"error": str(err.code), "message": err.message}).encode()
    hdrs = list(err.headers)
    if err.status == 401:
        hdrs.append(("www-authenticate", "Bearer"))
    return body, hdrs


def _framing(why: str) -> HttpError:
    return HttpError(ErrorCode.BAD_REQUEST, "ambiguous request framing: " + why, close=True)


def _load_static(name: str) -> bytes:
    with open(os.path.join(_STATIC, name), "rb") as f:
        return f.read()


class HttpSession:
    """Serves one TCP connection's HTTP requests until an upgrade or the end."""

    def __init__(self, server: Served, sock: socket.socket, addr: Tuple[str, int]) -> None:
        self.server = server
        self.config = server.config
        self.sock = sock
        self.addr = addr
        # h11's state machine, made when a request needs it: an upgrade read by the fast
        # path (parse_plain_head) never does; till then what is received waits in _unparsed
        self._h11: Optional[h11.Connection] = None
        self._unparsed = bytearray()
        self._eof = False
        #: what followed a request read by the fast path
        self._trailing = b""
        #: told True when the connection begins to wait for a request (after the first), False
        #: when one has come: an idle connection may be evicted when the server is full
        self.on_wait: Optional[Callable[[bool], None]] = None

    @property
    def http11(self) -> h11.Connection:
        """h11's connection state (made on first use, given what was received till then)."""
        conn = self._h11
        if conn is None:
            conn = self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER)
            if self._unparsed:
                conn.receive_data(bytes(self._unparsed))
                self._unparsed = bytearray()
            if self._eof:
                conn.receive_data(b"")
        return conn

    # ------------------------------------------------------------------ I/O
    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout()
        data = self._recv_now()
        if data is None:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise _Timeout() from None
        if self._h11 is not None:
            self._h11.receive_data(data)
        elif data:
            self._unparsed += data
        else:
            self._eof = True
        return data

    def _recv_now(self) -> Optional[bytes]:
        """What a plain socket holds already (one call, no wait; None: nothing yet, or TLS).

        Most requests are there when the connection is taken: reading them without
        first setting a timeout (and so polling) saves two system calls, each a
        hand-over of the GIL, which a storm of new connections waits for in turn.
        """
        sock = self.sock
        if type(sock) is not socket.socket or sock.gettimeout() is not None:
            return None  # (with a timeout set, CPython polls before it reads, flags or not)
        try:
            return sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def _send_now(self, data: bytes) -> bytes:
        """Send what a plain socket takes at once (no wait); the rest (all under TLS)."""
        sock = self.sock
        if type(sock) is not socket.socket or sock.gettimeout() is not None:
            return data
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return data
        return data[sent:]

    def _next_request(self, deadline: float) -> Any:
        """The next request's event, once its raw head has passed ``check_head``.

        Raises the ``HttpError`` of a refused head. The head is checked as sent,
        before h11 unfolds and normalises it: the bytes h11 already holds (what
        followed the previous request) and those received here, to the blank line.
        A WebSocket upgrade of the common shape comes back as a ``PlainRequest``
        read without h11 (``parse_plain_head``, ``_is_upgrade_here``); h11 reads it
        only if it is answered otherwise (``_catch_up``).
        """
        head = bytearray(self._unparsed if self._h11 is None else self._h11.trailing_data[0])
        start = 0
        while True:
            end = _HEAD_END.search(head, start)
            if end is not None:
                raw = bytes(head[:end.end()])
                plain = parse_plain_head(raw)
                problem = check_head(raw) if plain is None else check_plain_head(plain)
                if problem is not None:
                    raise problem
                if plain is not None and self._is_upgrade_here(plain):
                    self._trailing = bytes(head[end.end():])
                    return plain
                break
            if len(head) > _MAX_HEADER:
                break  # h11 refuses it
            start = max(0, len(head) - 2)
            data = self._recv(deadline)
            if not data:
                break
            head += data
        return self._next(deadline)

    def _is_upgrade_here(self, req: PlainRequest) -> bool:
        """True when ``req`` is a GET upgrade to the WebSocket path (the fast path's requests)."""
        if req.method != b"GET" or (_header(req.headers, b"upgrade") or "").lower() != "websocket":
            return False
        path = self.config.path
        target = req.target.decode("latin-1")
        # (a path has no '?' or '#', and a target read by the fast path no space or control byte)
        return target == path or target.startswith(path + "?") or urlsplit(target).path == path

    def _catch_up(self, event: Any) -> Any:
        """The h11 event of a request the fast path read, when it gets another answer than
        the upgrade (h11 reads the same request from what it is given: the head and on)."""
        if type(event) is not PlainRequest:
            return event
        caught = self.http11.next_event()
        if not isinstance(caught, h11.Request):  # (parse_plain_head reads only what h11 reads)
            raise h11.RemoteProtocolError("request not read alike")
        return caught

    def _next(self, deadline: float) -> Any:
        while True:
            event = self.http11.next_event()
            if event is h11.NEED_DATA:
                self._recv(deadline)
                continue
            return event

    def _send(self, *events: Any) -> None:
        data = b"".join(self.http11.send(e) or b"" for e in events)
        self.sock.settimeout(self.config.handshake_timeout)
        self.sock.sendall(data)

    def respond(self, status: int, body: bytes, content_type: str = "application/json",
                headers: Optional[List[Tuple[str, str]]] = None, head: bool = False) -> None:
        """Send one complete response."""
        hdrs = self._headers(content_type, len(body), headers)
        self._send(h11.Response(status_code=status, headers=hdrs, reason=_REASONS.get(status, b"")),
                   h11.Data(data=b"" if head else body), h11.EndOfMessage())

    def _headers(self, content_type: str, length: int,
                 extra: Optional[List[Tuple[str, str]]] = None) -> List[Tuple[str, str]]:
        """The headers of an answer: its body's type and length, no caching, ``extra``,
        and ``Connection: close`` while the server shuts down."""
        hdrs = [("content-type", content_type), ("content-length", str(length)),
                ("cache-control", "no-store")]
        if extra:
            hdrs.extend(extra)
        if self.server.shutting_down:
            hdrs.append(("connection", "close"))
        return hdrs

    def error(self, err: HttpError, head: bool = False) -> None:
        """Send the JSON error answer of ``err``."""
        body, hdrs = _error_parts(err)
        self.respond(err.status, body, headers=hdrs, head=head)

    # ------------------------------------------------------------------ loop
    def run(self) -> Optional[Upgrade]:
        """Answer requests; return an ``Upgrade`` or None when the connection is done."""
        timeout = self.config.handshake_timeout
        on_wait = self.on_wait
        first = True
        while True:
            deadline = time.monotonic() + timeout
            if on_wait is not None and not first:
                on_wait(True)
            first = False
            try:
                event = self._next_request(deadline)
            except _Timeout:
                logger.debug("handshake timeout from %s", self.addr[0])
                return None
            except HttpError as err:  # a head refused before h11 parsed it
                logger.debug("request from %s refused: %s", self.addr[0], err.message)
                self.refuse(err)
                return None
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return None
            if isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED:
                return None
            if not isinstance(event, (h11.Request, PlainRequest)):
                return None
            if on_wait is not None:
                on_wait(False)
            try:
                if type(event) is PlainRequest:  # (routed already: an upgrade on the WebSocket path)
                    upgrade = self._upgrade(event, deadline)
                else:
                    upgrade = self._route(event, deadline)
            except HttpError as err:
                if err.close:
                    self.refuse(err, head=event.method == b"HEAD")
                    return None
                try:
                    event = self._catch_up(event)
                    self.error(err, head=event.method == b"HEAD")
                except h11.LocalProtocolError:
                    return None
                except h11.RemoteProtocolError as exc:
                    self._bad_request(exc)
                    return None
            except _Timeout:
                return None
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return None
            except OSError:
                raise  # the connection is gone: nobody to answer
            except Exception as exc:
                self._fault(event, exc)
                return None
            else:
                if upgrade is not None:
                    return upgrade
            if self.server.shutting_down:
                return None
            try:
                self._drain_body(deadline)
            except (_Timeout, h11.RemoteProtocolError):
                return None
            if self.http11.our_state is h11.DONE and self.http11.their_state is h11.DONE:
                self.http11.start_next_cycle()
            else:
                return None

    def _drain_body(self, deadline: float) -> None:
        """Read the rest of a request body nobody wanted (bounded), so keep-alive can go on."""
        left = self.config.max_message_size
        while self.http11.their_state is h11.SEND_BODY and left >= 0:
            event = self._next(deadline)
            if isinstance(event, h11.Data):
                left -= len(event.data)
            elif not isinstance(event, h11.EndOfMessage):
                return

    def _bad_request(self, exc: Exception) -> None:
        logger.debug("malformed request from %s: %s", self.addr[0], exc)
        self.refuse(HttpError(ErrorCode.BAD_REQUEST, "malformed HTTP request", close=True))

    def refuse(self, err: HttpError, head: bool = False) -> None:
        """Answer ``err`` unless an answer was begun, with ``Connection: close``, and end the stream.

        The answer is written without h11 (whose state may be an error by now); then
        the sending side is shut and what the client still sends is read and dropped,
        for at most ``_LINGER_SECONDS`` and ``_LINGER_BYTES``, so that closing does not
        reset the connection before the client has read the answer.
        """
        if self.http11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body, hdrs = _error_parts(err)
        lines = [b"HTTP/1.1 %d %s" % (err.status, _REASONS.get(err.status, b"Error")),
                 b"content-type: application/json", b"content-length: %d" % len(body),
                 b"cache-control: no-store", b"connection: close"]
        lines.extend(("%s: %s" % kv).encode("latin-1") for kv in hdrs)
        try:
            self.sock.settimeout(self.config.handshake_timeout)
            self.sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body))
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        raw = getattr(self.sock, "raw", self.sock)  # under TLS, drop the records undecrypted
        deadline = time.monotonic() + _LINGER_SECONDS
        left = _LINGER_BYTES
        try:
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                raw.settimeout(remaining)
                data = raw.recv(65536)
                if not data:
                    return
                left -= len(data)
        except OSError:
            pass

    def _fault(self, req: _Request, exc: Exception) -> None:
        """A request that raised: one log line (the traceback at debug level), then a 500."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = "%s:%d" % (os.path.basename(tb.tb_frame.f_code.co_filename), tb.tb_lineno) if tb else "?"
        logger.error("%s %s from %s failed: %s: %s (at %s); answered 500",
                     req.method.decode("latin-1"), urlsplit(req.target.decode("latin-1")).path,
                     self.addr[0], type(exc).__name__, exc, where)
        logger.debug("traceback of the failed request", exc_info=exc)
        self.refuse(HttpError(ErrorCode.INTERNAL, "internal server error", status=500, close=True),
                    head=req.method == b"HEAD")

    def _route(self, req: _Request, deadline: float) -> Optional[Upgrade]:
        target = req.target.decode("latin-1")
        url = urlsplit(target)
        path = url.path
        method = req.method.decode("latin-1")
        upgrade = (_header(req.headers, b"upgrade") or "").lower() == "websocket"
        if not self.server.host_allowed(_header(req.headers, b"host")):
            raise HttpError(ErrorCode.FORBIDDEN_HOST, "this Host is not served here (see --allowed-host)")
        if path == self.config.path:
            if not upgrade:
                if method != "GET":
                    raise HttpError(ErrorCode.METHOD_NOT_ALLOWED, "use GET with an upgrade",
                                    [("allow", "GET")])
                raise HttpError(ErrorCode.UPGRADE_REQUIRED, "this endpoint speaks WebSocket",
                                [("upgrade", "websocket"), ("connection", "Upgrade")])
            return self._upgrade(req, deadline)
        if upgrade:
            raise HttpError(ErrorCode.NOT_FOUND, "no WebSocket endpoint at this path")
        methods = _ROUTES.get(path)
        if methods is None:
            raise HttpError(ErrorCode.NOT_FOUND, "not found")
        if method not in methods:
            raise HttpError(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed",
                            [("allow", ", ".join(methods))])
        head = method == "HEAD"
        if path == "/":
            self.respond(200, self.server.demo_page(), "text/html; charset=utf-8", head=head)
        elif path == "/healthz":
            health = self.server.health()
            status = 200 if health["status"] == "ok" else 503
            self.respond(status, encode_json(health).encode(), head=head)
        elif path == "/metrics":
            body, ctype = self.server.metrics.exposition()
            self.respond(200, body, ctype, head=head)
        elif path == "/publish":
            self._publish(req, url, deadline)
        elif path == "/history":
            self._history(req, url, head)
        elif path == "/stats":
            # an allowed origin may read the answer: wsbroadcast.js tells a refused token this way
            cors = self._cors(req)
            try:
                origin = _header(req.headers, b"origin")
                if origin is not None and not cors:
                    # told in an answer that page may read: wsbroadcast.js stops retrying on it
                    raise HttpError(ErrorCode.FORBIDDEN_ORIGIN, "origin not allowed",
                                    [("access-control-allow-origin", origin.strip())])
                self._check_stats_access(req, url)
            except HttpError as err:
                err.headers.extend(cors)
                raise
            self.respond(200, encode_json(stats_document(self.server)).encode(), headers=cors, head=head)
        elif path == "/dashboard":
            self._check_stats_access(req, url)
            self.respond(200, static_file(path), _FILES[path][1], head=head)
        elif path in _FILES:  # the client scripts: public, loadable by any page (ES modules need CORS)
            self.respond(200, static_file(path), _FILES[path][1],
                         headers=[("access-control-allow-origin", "*")], head=head)
        elif path == "/presence":
            self._presence(req, url, head)
        return None

    # ------------------------------------------------------------------ endpoints
    def _credentials(self, req: _Request, url: Any) -> Any:
        """Claims of an HTTP request (API key or token); None when it may do anything."""
        try:
            claims = self.server.auth.authenticate_http(req.headers, _query_token(url))
        except AuthError as exc:
            raise HttpError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        return None if claims.is_allow_all else claims

    def _cors(self, req: _Request) -> List[Tuple[str, str]]:
        """Headers letting the request's Origin read the answer, when it is an allowed one."""
        origin = _header(req.headers, b"origin")
        if origin is None or not self.server.origin_allowed(origin, _header(req.headers, b"host")):
            return []
        return [("access-control-allow-origin", origin), ("vary", "Origin")]

    def _check_stats_access(self, req: _Request, url: Any) -> None:
        """/stats and /dashboard: the API key or a token for every topic when auth is on,
        else loopback clients only (unless ``public_stats``)."""
        if self.server.auth.enabled or self.server.auth.has_api_key:
            claims = self._credentials(req, url)
            if claims is not None and not claims.can_subscribe(">"):
                raise HttpError(ErrorCode.FORBIDDEN, "this token may not read every topic: "
                                                     "/stats needs the API key or subscribe: ['>']")
        elif not self.config.public_stats and not is_loopback(self.addr[0]):
            raise HttpError(ErrorCode.FORBIDDEN, "served to loopback clients only "
                                                 "(start the server with --public-stats)")

    def _read_body(self, req: _Request, deadline: float) -> bytes:
        limit = self.config.max_message_size
        length = _header(req.headers, b"content-length")
        # a body over the limit is not read: the answer says Connection: close and the
        # connection ends with a lingering close, so the client gets the 413 (not a reset)
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpError(ErrorCode.TOO_LARGE, "body over %d bytes" % limit, close=True)
        # one buffer, not a list of pieces: a body in tiny chunks would cost ~40 bytes a piece
        body = bytearray()
        while True:
            event = self._next(deadline)
            if isinstance(event, h11.Data):
                if len(body) + len(event.data) > limit:
                    raise HttpError(ErrorCode.TOO_LARGE, "body over %d bytes" % limit, close=True)
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise HttpError(ErrorCode.BAD_REQUEST, "incomplete body")

    def _publish(self, req: _Request, url: Any, deadline: float) -> None:
        server = self.server
        if server.shutting_down:
            raise HttpError(ErrorCode.UNAVAILABLE, "server is shutting down")
        ctype = (_header(req.headers, b"content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        body = self._read_body(req, deadline)
        claims = self._credentials(req, url)
        try:
            obj = parse_json(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise HttpError(ErrorCode.BAD_JSON, "body is not valid JSON") from None
        if not isinstance(obj, dict) or "data" not in obj or "topic" not in obj:
            raise HttpError(ErrorCode.BAD_REQUEST, "body must be {\"topic\": T, \"data\": D}")
        topic = obj["topic"]
        try:
            validate_topic(topic)
        except TopicError as exc:
            raise HttpError(ErrorCode.BAD_TOPIC, exc.message) from None
        if claims is not None and not claims.can_publish(topic):
            raise HttpError(ErrorCode.FORBIDDEN, "not allowed to publish on %s" % topic)
        if not server.http_rate_ok(self.addr[0]):
            raise HttpError(ErrorCode.RATE_LIMITED, "publish rate limit exceeded")
        try:
            seq, epoch = server.hub.publish(topic, encode_json(obj["data"]))
        except (StoreError, BrokerUnavailable) as exc:
            raise HttpError(ErrorCode.UNAVAILABLE, "message not stored: %s" % exc) from None
        self.respond(200, encode_json({"topic": topic, "seq": seq, "epoch": epoch}).encode())

    @staticmethod
    def _topic_param(query: Dict[str, List[str]], what: str) -> str:
        """The concrete topic a /history or /presence request is about."""
        topic = (query.get("topic") or [""])[0]
        if not topic:
            raise HttpError(ErrorCode.BAD_TOPIC, "no topic given; ask for one: /%s?topic=news.eu" % what)
        try:
            validate_pattern(topic)
        except TopicError as exc:
            raise HttpError(ErrorCode.BAD_TOPIC, exc.message) from None
        if is_wildcard(topic):
            raise HttpError(ErrorCode.BAD_TOPIC, "%s needs a concrete topic, not the pattern %r "
                                                 "(ask for one topic at a time)" % (what, topic))
        return topic

    def _presence(self, req: _Request, url: Any, head: bool) -> None:
        topic = self._topic_param(parse_qs(url.query, keep_blank_values=True), "presence")
        claims = self._credentials(req, url)
        if claims is not None and not claims.can_subscribe(topic):
            raise HttpError(ErrorCode.FORBIDDEN, "not allowed to see who is subscribed to %s" % topic)
        try:
            view = self.server.hub.presence_view(topic)
        except BrokerUnavailable as exc:
            raise HttpError(ErrorCode.UNAVAILABLE, "presence unavailable: %s" % exc) from None
        body = '{"topic":"%s","total":%d,"users":%d,"clients":[%s]}' % (
            topic, view.total, view.users, ",".join(m.text for m in view.listed))
        self.respond(200, body.encode("utf-8"), head=head)

    def _history(self, req: _Request, url: Any, head: bool) -> None:
        query = parse_qs(url.query, keep_blank_values=True)
        topic = self._topic_param(query, "history")
        since = min(_int_param(query, "since", 0, 0, None), _MAX_SEQ)
        limit = _int_param(query, "limit", 100, 1, 1000)
        claims = self._credentials(req, url)
        if claims is not None and not claims.can_subscribe(topic):
            raise HttpError(ErrorCode.FORBIDDEN, "not allowed to read %s" % topic)
        try:
            rows = self.server.hub.history(topic, since, limit, HISTORY_MAX_BYTES)
        except StoreError as exc:
            raise HttpError(ErrorCode.UNAVAILABLE, "history unavailable: %s" % exc) from None
        rows, length = history_page(rows, HISTORY_MAX_BYTES)
        self._stream(history_parts(rows), length, head)

    def _stream(self, parts: Iterator[str], length: int, head: bool) -> None:
        """A 200 JSON answer of ``length`` bytes whose text is ``parts``, sent chunk by chunk.

        Only about one chunk is encoded at a time; a client that takes nothing for a
        handshake timeout, or not the whole answer within a few, is dropped (OSError).
        """
        hdrs = self._headers("application/json", length)
        timeout = self.config.handshake_timeout
        deadline = time.monotonic() + _ANSWER_TIMEOUTS * timeout

        def send(data: bytes) -> None:
            try:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("answer not taken in time")
                self.sock.settimeout(min(timeout, remaining))
                self.sock.sendall(data)
            except socket.timeout:
                # what the kernel still holds would never get out: reset on close
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                raise

        send(self.http11.send(h11.Response(status_code=200, headers=hdrs, reason=_REASONS[200])))
        if not head:
            pending: List[bytes] = []
            size = 0
            for part in parts:
                for i in range(0, len(part), _CHUNK):
                    piece = part[i:i + _CHUNK].encode("utf-8")
                    pending.append(piece)
                    size += len(piece)
                    if size >= _CHUNK:
                        send(self.http11.send(h11.Data(data=b"".join(pending))))
                        pending, size = [], 0
            if pending:
                send(self.http11.send(h11.Data(data=b"".join(pending))))
        send(self.http11.send(h11.EndOfMessage()))

    # ------------------------------------------------------------------ upgrade
    def _upgrade(self, req: _Request, deadline: float) -> Optional[Upgrade]:
        upgrade, accept = negotiate_upgrade(self.server, req.headers, req.target, self.addr[0])
        if (upgrade.refuse is None and upgrade.kind == V1 and upgrade.claims is not None
                and upgrade.claims.channels):
            # sent by the writer after the granted subscriptions are in place (Hub.grant)
            upgrade.greeting = accept
            upgrade.trailing = self._upgrade_trailing(req)
            return upgrade
        try:
            rest = self._send_now(accept)
            if rest:
                self.sock.settimeout(self.config.handshake_timeout)
                self.sock.sendall(rest)
        except OSError:
            if upgrade.refuse is None:
                self.server._release(self.addr[0])  # admitted, but it never started
            raise
        upgrade.trailing = self._upgrade_trailing(req)
        return upgrade

    def _upgrade_trailing(self, req: _Request) -> bytes:
        """What the client sent after the upgrade request (its first frames, perhaps)."""
        if type(req) is PlainRequest:
            return self._trailing
        return self.http11.trailing_data[0]


def negotiate_upgrade(server: Served, headers: Sequence[Tuple[bytes, bytes]], target: bytes,
                      ip: str, scheme: Optional[str] = None) -> Tuple[Upgrade, bytes]:
    """The checks and handshake of a WebSocket upgrade request, without I/O.

    ``headers`` are (lower-case name, value) byte pairs as h11 gives them. Raises
    ``HttpError`` for an answer to send instead of the upgrade (origin, auth,
    shutdown, bad handshake). Otherwise the connection is counted by
    ``server.admit`` (``Upgrade.refuse`` says when it must be closed at once) and
    the bytes of the 101 answer are returned with the ``Upgrade``.
    """
    hs = _Handshake(headers)
    host = hs.first_host
    if not server.host_allowed(host):
        raise HttpError(ErrorCode.FORBIDDEN_HOST, "this Host is not served here (see --allowed-host)")
    if server.shutting_down:
        raise HttpError(ErrorCode.UNAVAILABLE, "server is shutting down")
    origin = hs.origin
    if origin is not None and not server.origin_allowed(origin, host, scheme):
        raise HttpError(ErrorCode.FORBIDDEN_ORIGIN, "origin not allowed")
    claims = None
    if server.auth.enabled:
        try:
            token = _query_token(urlsplit(target.decode("latin-1")))
            claims = server.auth.authenticate_request(list(headers), token)
        except AuthError as exc:
            raise HttpError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        if claims.is_allow_all and claims.sub is None and not claims.channels:
            claims = None
    kind = V1 if SUBPROTOCOL in hs.offered else PLAIN
    key = hs.key
    if key is not None and not _valid_key(key):
        raise HttpError(ErrorCode.BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64")
    if key is None or not hs.valid:
        raise HttpError(ErrorCode.BAD_REQUEST, "invalid WebSocket handshake")
    agreement = None
    extensions: List[Extension] = []
    answer = b"%s%s\r\n" % (_SWITCHING, generate_accept_token(key.encode("latin-1")))
    if kind == V1:
        answer += _V1_PROTOCOL
    if server.config.compression and hs.extension_offers:
        offers = [v.decode("latin-1") for v in hs.extension_offers]
        agreement = negotiate(offers)
        if agreement is not None:
            extensions.append(InboundDeflate(agreement, server.config.max_message_size))
            accepts = server_extensions_handshake(
                [o for value in offers for o in split_comma_header(value.encode("latin-1"))], extensions)
            if accepts:
                answer += b"Sec-WebSocket-Extensions: " + accepts + b"\r\n"
    refuse = server.admit(ip)
    upgrade = Upgrade(extensions, kind, claims, b"", refuse)
    upgrade.deflate = agreement
    return upgrade, answer + b"\r\n"


#: the start of every 101 answer, up to the value of Sec-WebSocket-Accept
_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: ")
_V1_PROTOCOL = b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode("ascii") + b"\r\n"


class _Handshake:
    """What an upgrade request's headers say, read in one pass.

    ``valid``: the headers of an opening handshake (RFC 6455 4.2.1): Host,
    Upgrade: websocket, Connection: Upgrade and version 13 (the key is checked by
    the caller), every Host a name IDNA can read, ASCII Connection, subprotocol and
    extension lists. (Host, Upgrade and the version are single headers: ``check_head``
    refuses a second copy; the last copy counts otherwise.)
    """

    __slots__ = ("first_host", "origin", "key", "offered", "extension_offers", "valid")

    def __init__(self, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        first_host = origin = key = None
        host = upgrade = version = None
        connection = False
        lists_ok = hosts_ok = True
        offered: List[str] = []
        extension_offers: List[bytes] = []
        for name, value in headers:
            if name == b"host":
                if first_host is None:
                    first_host = value.decode("latin-1")
                host = value
                if hosts_ok and not _plain_host(value):
                    try:
                        value.decode("idna")
                    except UnicodeError:
                        hosts_ok = False
            elif name == b"sec-websocket-protocol":
                offered.extend(p.strip() for p in value.decode("latin-1").split(","))
                lists_ok = lists_ok and value.isascii()  # (token lists: ASCII only)
            elif name == b"sec-websocket-extensions":
                extension_offers.append(value)
                lists_ok = lists_ok and value.isascii()
            elif name == b"upgrade":
                upgrade = value
            elif name == b"sec-websocket-version":
                version = value
            elif name == b"connection":
                if not value.isascii():
                    lists_ok = False
                elif not connection:
                    connection = any(t.lower() == "upgrade" for t in split_comma_header(value))
            elif name == b"origin":
                if origin is None:
                    origin = value.decode("latin-1")
            elif name == b"sec-websocket-key":
                if key is None:
                    key = value.decode("latin-1")
        self.first_host = first_host
        self.origin = origin
        self.key = key
        self.offered = offered
        self.extension_offers = extension_offers
        self.valid = (hosts_ok and lists_ok and host is not None and connection and version == b"13"
                      and upgrade is not None and upgrade.lower() == b"websocket")


def _plain_host(value: bytes) -> bool:
    """True for a Host the IDNA codec reads as it is (its own shortcut, on 3.9 to 3.13 alike):
    ASCII without an ACE prefix ("xn--")."""
    return value.isascii() and b"xn--" not in value.lower()


def _valid_key(key: str) -> bool:
    """True when a Sec-WebSocket-Key is 16 bytes in base64 (RFC 6455 section 4.1)."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _history_item_head(m: StoredMessage) -> str:
    return '{"topic":"%s","seq":%d,"data":' % (m.topic, m.seq)


def history_page(rows: List[StoredMessage], max_bytes: int) -> Tuple[List[StoredMessage], int]:
    """The leading ``rows`` whose JSON list fits in ``max_bytes`` (at least one), and its length."""
    length = 2  # the brackets
    for n, m in enumerate(rows):
        size = data_bytes(_history_item_head(m)) + data_bytes(m.data) + 1 + (1 if n else 0)
        if n and length + size > max_bytes:
            return rows[:n], length
        length += size
    return rows, length


def history_parts(rows: List[StoredMessage]) -> Iterator[str]:
    """The text of the JSON list of ``rows`` (as ``history_page`` measured it), in parts."""
    yield "["
    for n, m in enumerate(rows):
        yield ("," if n else "") + _history_item_head(m)
        yield m.data
        yield "}"
    yield "]"


def _query_token(url: Any) -> Optional[str]:
    values = parse_qs(url.query).get("token")
    return values[0] if values else None


def _int_param(query: Dict[str, List[str]], name: str, default: int, low: int,
               high: Optional[int]) -> int:
    values = query.get(name)
    if not values:
        return default
    raw = values[0]
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(ErrorCode.BAD_REQUEST, "%r must be an integer" % name) from None
    if value < low or (high is not None and value > high):
        bound = "%d..%d" % (low, high) if high is not None else ">= %d" % low
        raise HttpError(ErrorCode.BAD_REQUEST, "%r must be %s" % (name, bound))
    return value


_static_cache: Dict[str, bytes] = {}


def static_file(path: str) -> bytes:
    """The bytes of a file of the package served at ``path`` (read once)."""
    body = _static_cache.get(path)
    if body is None:
        body = _static_cache[path] = _load_static(_FILES[path][0])
    return body


def load_demo_page() -> bytes:
    """The demo page's HTML."""
    try:
        return _load_static("index.html")
    except OSError:
        return b"<!doctype html><title>wsbroadcast</title><p>demo page missing</p>"
