"""A raw WebSocket client on a plain socket, for sending exactly the bytes a test needs."""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import struct
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

#: multiply every timing constant of the tests (slow or loaded machines)
SCALE = float(os.environ.get("WSBROADCAST_TEST_TIMEOUT_SCALE", "1"))
DEFAULT_TIMEOUT = 5.0 * SCALE


class RawWS:
    """A client socket after a successful upgrade; frames are built by hand."""

    #: bytes asked of the socket per recv, and a pause before each (a slow reader paces itself)
    chunk = 65536
    pause = 0.0

    def __init__(self, sock: socket.socket, subprotocol: Optional[str], rest: bytes = b"") -> None:
        self.sock = sock
        self.subprotocol = subprotocol
        self.buf = rest

    # ------------------------------------------------------------------ sending
    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
                   rsv: int = 0) -> None:
        self.sock.sendall(encode_frame(opcode, payload, fin, mask, rsv))

    def send_texts(self, *texts: str) -> None:
        """Several text frames in one write (so the server reads them together)."""
        self.sock.sendall(b"".join(encode_frame(0x1, t.encode("utf-8")) for t in texts))

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode("utf-8"))

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    # ------------------------------------------------------------------ receiving
    def _need(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame in time")
            if self.pause:
                time.sleep(self.pause)  # pacing of the reader, not synchronisation
            self.sock.settimeout(remaining)
            data = self.sock.recv(self.chunk)
            if not data:
                raise ConnectionError("connection closed by server")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_raw(self, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, bytes]:
        """(first header byte, payload) of the next frame, as it came."""
        deadline = time.monotonic() + timeout
        b0, b1 = self._need(2, deadline)
        assert b1 & 0x80 == 0, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8, deadline))[0]
        return b0, self._need(n, deadline)

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        b0, payload = self.recv_raw(timeout)
        assert b0 & 0x70 == 0, "reserved bits set on a connection without extensions: %#x" % b0
        return b0 & 0x0F, payload

    def recv_text(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """The payload of the next text frame (pings skipped)."""
        while True:
            op, payload = self.recv_frame(timeout)
            if op == 0x9:
                continue
            assert op == 0x1, "expected a text frame, got opcode %d %r" % (op, payload[:80])
            return payload

    def recv_json(self, timeout: float = DEFAULT_TIMEOUT, skip_pings: bool = True) -> Any:
        """The next text frame, decoded."""
        while True:
            op, payload = self.recv_frame(timeout)
            if op == 0x9 and skip_pings:
                continue
            assert op == 0x1, "expected a text frame, got opcode %d %r" % (op, payload[:80])
            return json.loads(payload)

    def expect_close(self, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, str]:
        """Skip data frames until the close frame; return (code, reason)."""
        while True:
            op, payload = self.recv_frame(timeout)
            if op == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode("utf-8", "replace")

    def at_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when the server closes TCP (after any remaining bytes) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class DeflateWS(RawWS):
    """A raw connection that negotiated permessage-deflate: compressed frames are inflated
    (each on its own, as ``server_no_context_takeover`` allows); ``compressed`` counts them."""

    compressed = 0

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, bytes]:
        b0, payload = self.recv_raw(timeout)
        assert b0 & 0x30 == 0, "RSV2/RSV3 set: %#x" % b0
        if b0 & 0x40:
            assert b0 & 0x0F in (0x1, 0x2), "RSV1 on a frame that is not a data frame: %#x" % b0
            payload = inflate(payload)
            self.compressed += 1
        return b0 & 0x0F, payload


def inflate(data: bytes, bits: int = 15) -> bytes:
    """One message compressed without context takeover (RFC 7692 7.2.2)."""
    d = zlib.decompressobj(-bits)
    return d.decompress(data + b"\x00\x00\xff\xff")


def deflate(data: bytes, bits: int = 15, level: int = 6) -> bytes:
    """``data`` as a client's compressed message payload (RFC 7692 7.2.1); level 0: stored
    blocks, a few bytes longer than ``data``."""
    c = zlib.compressobj(level, zlib.DEFLATED, -bits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def _not_json(token: str) -> Any:
    raise ValueError("not JSON: %s" % token)


def _finite(token: str) -> float:
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number not finite as a double: %s" % token[:40])
    return value


def strict_loads(payload: Any) -> Any:
    """Decode JSON as a strict parser (a browser's JSON.parse) accepts it: no NaN or Infinity,
    and (stricter than JSON.parse, as the contract is) no number beyond a double; raises ValueError."""
    return json.loads(payload, parse_constant=_not_json, parse_float=_finite, parse_int=_finite_int)


def _finite_int(token: str) -> int:
    if len(token) > 308:
        _finite(token)
    return int(token)


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
                 rsv: int = 0, length: Optional[int] = None, width: Optional[int] = None,
                 key: Optional[bytes] = None) -> bytes:
    """A client frame, masked (with ``key``, else a random one) unless told otherwise.

    ``length`` and ``width`` (7, 16 or 64 bits) may lie about the payload.
    """
    b0 = (0x80 if fin else 0) | (rsv << 4) | (opcode & 0x0F)
    n = len(payload) if length is None else length
    if width is None:
        width = 7 if n < 126 else 16 if n < 65536 else 64
    mbit = 0x80 if mask else 0
    if width == 7:
        head = struct.pack("!BB", b0, mbit | n)
    elif width == 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    n = len(payload)
    if mask:
        key = key if key is not None else os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 64 else _mask(payload, key)
        head += key
    return head + payload


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ k).to_bytes(n, "big")


def http_request(port: int, request: bytes, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, dict, bytes]:
    """Send raw request bytes; return (status, headers, body) of the answer (reads until close or length)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request)
        return read_response(sock, timeout)
    finally:
        sock.close()


def read_response(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT,
                  upgrade: bool = False) -> Tuple[int, dict, bytes]:
    """(status, headers, body) of one response; after a 101 (``upgrade``) body is the bytes that followed."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if b"\r\n\r\n" not in data:
        raise ConnectionError("closed before a complete response: %r" % data[:200])
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if upgrade and status == 101:
        return status, headers, body
    length = int(headers.get("content-length", "-1"))
    while length >= 0 and len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def upgrade_request(port: int, path: str = "/ws", subprotocol: Optional[str] = "wsbroadcast.v1",
                    headers: Optional[List[Tuple[str, str]]] = None, key: Optional[str] = None,
                    host: Optional[str] = None) -> bytes:
    """The bytes of a valid WebSocket upgrade request (extra ``headers`` appended).

    ``host`` is the Host header (default ``127.0.0.1:PORT``).
    """
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: " + (host or "127.0.0.1:%d" % port), "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append("Sec-WebSocket-Protocol: " + subprotocol)
    for k, v in headers or []:
        lines.append("%s: %s" % (k, v))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def handshake(port: int, path: str = "/ws", subprotocol: Optional[str] = "wsbroadcast.v1",
              headers: Optional[List[Tuple[str, str]]] = None, timeout: float = DEFAULT_TIMEOUT,
              rcvbuf: Optional[int] = None, cls: type = RawWS,
              host: Optional[str] = None, ssl_context: Any = None) -> Tuple[int, dict, Any]:
    """Send an upgrade request: (101, headers, ``cls`` instance) when accepted, else (status, headers, body).

    ``rcvbuf`` sets SO_RCVBUF before connecting (a small one keeps the server from parking much there);
    ``ssl_context``: speak TLS (wss://) with it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect(("127.0.0.1", port))
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(upgrade_request(port, path, subprotocol, headers, host=host))
        status, hdrs, body = read_response(sock, timeout, upgrade=True)
    except BaseException:
        sock.close()
        raise
    if status == 101:
        return status, hdrs, cls(sock, hdrs.get("sec-websocket-protocol"), body)
    sock.close()
    return status, hdrs, body


def connect(port: int, subprotocol: Optional[str] = "wsbroadcast.v1", path: str = "/ws",
            headers: Optional[List[Tuple[str, str]]] = None, timeout: float = DEFAULT_TIMEOUT,
            rcvbuf: Optional[int] = None, cls: type = RawWS, host: Optional[str] = None,
            ssl_context: Any = None) -> Any:
    """Open a raw WebSocket connection (raises AssertionError unless answered 101)."""
    status, hdrs, conn = handshake(port, path, subprotocol, headers, timeout, rcvbuf, cls, host, ssl_context)
    if status != 101:
        raise AssertionError("handshake answered %d: %r" % (status, conn))
    return conn


def subscribe(ws: RawWS, topic: str, ident: Any = "s", timeout: float = 2 * DEFAULT_TIMEOUT,
              **extra: Any) -> Any:
    """Send a subscribe and return its answer (ack or error), which must carry ``ident``."""
    frame = {"type": "subscribe", "topic": topic, "id": ident}
    frame.update(extra)
    ws.send_json(frame)
    reply = ws.recv_json(timeout)
    assert reply.get("id") == ident, reply
    return reply


def request(ws: RawWS, frame: Dict[str, Any], timeout: float = 2 * DEFAULT_TIMEOUT) -> Dict[str, Any]:
    """Send a frame with an id and return the answer carrying that id (skipping deliveries)."""
    ws.send_json(frame)
    deadline = time.monotonic() + timeout
    while True:
        reply = ws.recv_json(timeout=max(0.1, deadline - time.monotonic()))
        if reply.get("id") == frame["id"]:
            return reply


def expect_pong_next(ws: RawWS, ident: Any = "barrier", timeout: float = 2 * DEFAULT_TIMEOUT) -> None:
    """Ping and require the pong to be the very next frame: nothing was delivered before it."""
    ws.send_json({"type": "ping", "id": ident})
    reply = ws.recv_json(timeout)
    assert reply == {"type": "pong", "id": ident}, "expected the pong next, got %r" % (reply,)


TCP_CLOSE = 7  # tcpi_state of a socket that got a reset (and of one fully closed)


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (1 established, 7 closed), read without touching its data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def wait_reset(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when the peer resets ``sock`` within ``timeout``: its state turns CLOSE while
    this side still holds unread data and never sent a FIN (a FIN from the peer cannot do that)."""
    return wait_for(lambda: tcp_state(sock) == TCP_CLOSE, timeout)


def wait_for(predicate, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class CloseWatcher:
    """Watches many client sockets for the server's close; ``closed`` maps each closed one to
    what it received before (a reset counts as a close)."""

    def __init__(self, socks: List[socket.socket]) -> None:
        self._got = dict.fromkeys(socks, b"")
        self.closed: dict = {}
        self._sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            self._sel.register(s, selectors.EVENT_READ)

    def poll(self, timeout: float) -> None:
        """Read what is there (waiting up to ``timeout``) and note the sockets closed."""
        for key, _ in self._sel.select(timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                self._got[s] += data
            else:
                self.closed[s] = self._got.pop(s)
                self._sel.unregister(s)

    def wait(self, count: int, timeout: float) -> dict:
        """Poll until ``count`` sockets are closed or ``timeout`` passes; ``closed``."""
        deadline = time.monotonic() + timeout
        while len(self.closed) < count and time.monotonic() < deadline:
            self.poll(max(0.0, deadline - time.monotonic()))
        return self.closed

    def close(self) -> None:
        self._sel.close()
