"""TLS over a plain socket with memory BIOs, so the writer can keep sending without blocking.

The socket stays an ordinary socket (``send(MSG_DONTWAIT)`` works on it); the TLS
state is an ``ssl.SSLObject`` between two memory BIOs. The connection's reader
thread decrypts what it receives, the writer thread encrypts what it sends, and
one small lock serialises their use of the ``SSLObject`` (no I/O under it).

Once the writer owns the connection it is the only reader of the outgoing BIO:
the records there leave in the order they were made (the reader's own output,
such as an answer to a key update, is taken by the writer when told of it).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Callable, Optional


class TLSStream:
    """A server-side TLS session on ``raw``, offering the socket calls the server uses."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        # guards: the SSLObject and both BIOs (reader decrypting, writer encrypting)
        self._lock = threading.Lock()
        #: TLS records made and not yet sent (bytes, a memoryview once partly sent); writer thread only
        self.wire: Any = b""
        #: called with the raw socket before ``recv`` blocks on it with no timeout and
        #: nothing decrypted left (the reader's wait in the idle park)
        self.wait_input: Optional[Callable[[socket.socket], None]] = None

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

        Up to ``size`` bytes from every whole record already received (a read of the
        ``SSLObject`` gives one record), so that one call batches like ``socket.recv``.
        A timeout set on the socket bounds the whole call, however slowly the
        bytes of a record trickle in.
        """
        timeout = self.raw.gettimeout()
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            with self._lock:
                try:
                    data = self._obj.read(size)
                except ssl.SSLWantReadError:
                    data = b""
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""
                if data:
                    if len(data) < size and self._in.pending:
                        data = self._more(data, size)
                    return data
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("timed out")
                self.raw.settimeout(remaining)
            elif self.wait_input is not None:
                self.wait_input(self.raw)
            data = self.raw.recv(65536)
            if not data:
                return b""
            with self._lock:
                self._in.write(data)

    def _more(self, data: bytes, size: int) -> bytes:
        """``data`` and what the records still buffered decrypt to, up to ``size`` bytes (lock held)."""
        parts = [data]
        got = len(data)
        while got < size and self._in.pending:
            try:
                more = self._obj.read(size - got)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break  # a partial record, or the end: the next call sees it
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def output_waiting(self) -> bool:
        """Whether reading made TLS bytes of its own (alerts, key updates) that must be sent."""
        with self._lock:
            return self._out.pending > 0

    def pending_output(self) -> bytes:
        """TLS bytes produced while reading, taken by the writer (once it owns the connection)."""
        with self._lock:
            return self._out.read()

    # ------------------------------------------------------------------ writer side
    def encrypt(self, data: Any) -> bytes:
        """The TLS records carrying ``data``, after any bytes the TLS layer made before."""
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
