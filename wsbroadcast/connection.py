"""One client connection's state, shared by its reader thread, the hub and the writer.

Each field has one owner, named in the comments below; a field read by a
thread that does not own it is a single attribute read (atomic under the GIL)
and tolerates a stale value.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .envelope import PLAIN, V1

_ids = itertools.count(1)


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: Optional[float] = None) -> bool:
        """Take one token; False when none is left."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Flag:
    """A small event flag on one raw lock (an Event costs about 1 KiB per connection)."""

    __slots__ = ("_lock", "_set")

    def __init__(self, value: bool = False) -> None:
        # _lock guards nothing: it is the flag itself, held while the flag is clear, so
        # that wait() blocks acquiring it until set() releases it
        self._lock = threading.Lock()
        self._set = True
        if not value:
            self.clear()

    def set(self) -> None:
        if not self._set:
            self._set = True
            try:
                self._lock.release()
            except RuntimeError:
                pass

    def clear(self) -> None:
        if self._set:
            self._set = False
            self._lock.acquire(False)

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Wait until set or ``timeout`` seconds pass; return whether it is set."""
        if self._set:
            return True
        if self._lock.acquire(True, timeout):
            self._lock.release()
        return self._set


class Connection:
    """A WebSocket connection: identity, subscriptions, outbox and close state."""

    __slots__ = ("id", "sock", "fd", "addr", "tls", "recv", "kind", "is_plain", "deflate", "claims",
                 "max_outbox", "expires", "patterns", "replays", "floors", "registered", "rate",
                 "last_seen", "out", "head_sent", "out_bytes", "waiting_write", "close_sent",
                 "close_code", "close_deadline", "ping_sent_at", "dead", "attached", "flushed",
                 "drained", "replay_queued", "replay_applied", "__weakref__")

    def __init__(self, sock: socket.socket, addr: Tuple[str, int], kind: str = V1,
                 claims: Any = None, max_outbox: int = 1 << 20,
                 rate: Optional[TokenBucket] = None, expires: Optional[float] = None,
                 tls: Any = None, deflate: int = 0) -> None:
        self.id = next(_ids)
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        #: the TLSStream when the connection is encrypted (the writer encrypts as it sends)
        self.tls = tls
        #: blocking read of (decrypted) bytes, for the reader thread
        self.recv = tls.recv if tls is not None else sock.recv
        self.kind = kind
        self.is_plain = kind == PLAIN
        #: window bits of the compressed frames it takes (permessage-deflate); 0: none
        self.deflate = deflate
        self.claims = claims
        self.max_outbox = max_outbox
        #: wall-clock time at which the credentials expire (None: never)
        self.expires = expires

        # --- owned by the hub, under Hub.lock ---
        self.patterns: Set[str] = set()
        #: topic -> (buffered live deliveries, their bytes) while a replay runs
        self.replays: Dict[str, List[Any]] = {}
        #: topic -> (seq, epoch) of its subscribe ack: deliveries at or below it are dropped
        self.floors: Dict[str, Tuple[int, str]] = {}
        self.registered = False

        # --- owned by the reader thread ---
        self.rate = rate
        self.replay_queued = 0  # replayed bytes put on the writer's channel
        self.last_seen = time.monotonic()  # read by the writer for keepalive

        # --- owned by the writer thread ---
        self.out: List[Any] = []  # frames not yet (fully) sent (a memoryview once partly; TLS: unencrypted)
        self.head_sent = 0  # bytes of out[0] already sent
        self.out_bytes = 0  # unsent bytes in out, and over TLS in tls.wire (read by the replaying reader)
        self.replay_applied = 0  # replayed bytes taken from the channel into out
        self.waiting_write = False  # registered in the writer's selector
        self.close_sent = False
        self.close_code: Optional[int] = None
        self.close_deadline = 0.0
        self.ping_sent_at = 0.0
        self.dead = False  # socket failed or was torn down; nothing more is written
        self.attached = False  # known to the writer

        #: the close frame is flushed (or can never be)
        self.flushed = False
        #: set by the writer when the outbox drains below the replay low-water mark
        self.drained = Flag(True)

    def __repr__(self) -> str:
        return "<Connection #%d %s:%s %s>" % (self.id, self.addr[0], self.addr[1], self.kind)

    @property
    def label(self) -> str:
        """Who this is, for logs: connection id and peer address."""
        return "#%d %s:%s" % (self.id, self.addr[0], self.addr[1])
