"""A raw WebSocket client on a plain socket, for sending exactly the bytes a test needs."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any, List, Optional, Tuple

DEFAULT_TIMEOUT = 5.0


class RawWS:
    """A client socket after a successful upgrade; frames are built by hand."""

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
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by server")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        deadline = time.monotonic() + timeout
        b0, b1 = self._need(2, deadline)
        assert b1 & 0x80 == 0, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._need(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._need(8, deadline))[0]
        return b0 & 0x0F, self._need(n, deadline)

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


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True,
                 rsv: int = 0) -> bytes:
    """A client frame, masked unless told otherwise."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask(payload, key)
        head += key
    return head + payload


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
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


def read_response(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> Tuple[int, dict, bytes]:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "-1"))
    while length >= 0 and len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def connect(port: int, subprotocol: Optional[str] = "wsbroadcast.v1", path: str = "/ws",
            headers: Optional[List[Tuple[str, str]]] = None, timeout: float = DEFAULT_TIMEOUT) -> RawWS:
    """Open a raw WebSocket connection (raises AssertionError unless answered 101)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port, "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append("Sec-WebSocket-Protocol: " + subprotocol)
    for k, v in headers or []:
        lines.append("%s: %s" % (k, v))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during handshake: %r" % data)
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status != 101:
        sock.close()
        raise AssertionError("handshake answered %d: %r" % (status, head))
    chosen = None
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "sec-websocket-protocol":
            chosen = v.strip()
    return RawWS(sock, chosen, rest)


def wait_for(predicate, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
