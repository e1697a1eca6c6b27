"""TLS over a plain socket with memory BIOs, so the writer can keep sending without blocking.

The socket stays an ordinary socket (``send(MSG_DONTWAIT)`` works on it); the TLS
state is an ``ssl.SSLObject`` between two memory BIOs. The connection's reader
thread decrypts what it receives, the writer thread encrypts what it sends, and
one small lock serialises their use of the ``SSLObject`` (no I/O under it).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Optional


class TLSStream:
    """A server-side TLS session on ``raw``, offering the socket calls the server uses."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        # guards: the SSLObject and both BIOs (reader decrypting, writer encrypting)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ handshake
    def handshake(self, timeout: float) -> None:
        """Run the TLS handshake on the calling thread within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._lock:
                    self._obj.do_handshake()
                self._flush(deadline)
                return
            except ssl.SSLWantReadError:
                self._flush(deadline)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("TLS handshake timed out") from None
                self.raw.settimeout(remaining)
                data = self.raw.recv(65536)
                if not data:
                    raise ConnectionError("peer closed during the TLS handshake") from None
                with self._lock:
                    self._in.write(data)

    def _flush(self, deadline: Optional[float] = None) -> None:
        with self._lock:
            data = self._out.read()
        if data:
            if deadline is not None:
                self.raw.settimeout(max(0.001, deadline - time.monotonic()))
            self.raw.sendall(data)

    # ------------------------------------------------------------------ reader side
    def recv(self, size: int) -> bytes:
        """Decrypted bytes (b"" at the end of the stream); blocks like ``socket.recv``.

        A timeout set on the socket bounds the whole call, however slowly the
        bytes of a record trickle in.
        """
        timeout = self.raw.gettimeout()
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            with self._lock:
                try:
                    return self._obj.read(size)
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out")
                self.raw.settimeout(remaining)
            data = self.raw.recv(65536)
            if not data:
                return b""
            with self._lock:
                self._in.write(data)

    def pending_output(self) -> bytes:
        """TLS bytes produced while reading (alerts, key updates), for the writer to send."""
        with self._lock:
            return self._out.read()

    # ------------------------------------------------------------------ writer side
    def encrypt(self, data: Any) -> bytes:
        """The TLS records carrying ``data``."""
        with self._lock:
            self._obj.write(data)
            return self._out.read()

    def sendall(self, data: bytes) -> None:
        """Encrypt and send everything (only before the writer owns the connection)."""
        self.raw.sendall(self.encrypt(data))

    # ------------------------------------------------------------------ socket calls
    def settimeout(self, value: Optional[float]) -> None:
        self.raw.settimeout(value)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()

    def fileno(self) -> int:
        return self.raw.fileno()

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)
