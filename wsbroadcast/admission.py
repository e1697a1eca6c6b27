"""Which TCP connections get a file descriptor and a thread, and how the others are turned away.

- ``plan_limits``: the connection limits that the process's open-file limit
  (``RLIMIT_NOFILE``) can hold, read (and raised towards what the settings need,
  within the hard limit) at start.
- ``PendingTable``: connections accepted and not upgraded to WebSocket (handshakes,
  HTTP requests, keep-alive), counted in all and per address from ``accept``. When
  it is full, the one that has waited longest for a request is evicted for the
  newcomer; when none is idle, the newcomer is turned away.
- ``TurnAway``: answers a turned-away connection ``503`` and closes it, without a
  thread; a reserve descriptor lets it do so even when the fd table is full.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from typing import Deque, Dict, List, NamedTuple, Optional, Tuple

from .errors import ConfigError

#: descriptors kept free of connections: store, broker, evictions and refusals under way
FD_HEADROOM = 48
#: a pending connection waiting for a request this long may be evicted for a newcomer
EVICT_AFTER = 1.0
#: evicted connections whose threads have not ended yet, at most (their fds are still open)
MAX_EVICTING = 8
#: refused sockets kept open at once to read the request (so the 503 is not lost to a reset)
MAX_LINGERING = 16
#: seconds a refused socket is kept open for that
LINGER_TIME = 1.0

#: seconds a connection waits for room in a full pending table before it is turned away
#: (handshakes take well under a millisecond: a burst of reconnects waits its turn instead of
#: getting 503s). Once such a wait ends with no room, newcomers are turned away at once until
#: a place is freed.
ROOM_WAIT = 0.25

#: connections not yet upgraded that one address may hold beyond its WebSocket allowance
#: (``max_connections_per_ip``): a few plain HTTP requests beside its handshakes
PENDING_PER_IP_SLACK = 8

OVER_LIMIT = "server over its connection limit"
PER_IP = "too many connections from this address"


def busy_answer(message: str) -> bytes:
    """The whole ``503 unavailable`` answer of a connection turned away."""
    body = ('{"error": "unavailable", "message": "%s"}' % message).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\ncache-control: no-store\r\nretry-after: 1\r\n"
            b"connection: close\r\n\r\n" % len(body)) + body


_ANSWERS = {m: busy_answer(m) for m in (OVER_LIMIT, PER_IP)}


# ---------------------------------------------------------------------- fd budget


class Limits(NamedTuple):
    """Connection limits that fit the open-file limit."""

    max_connections: int  # WebSocket connections
    max_pending: int  # connections not upgraded
    nofile: int  # the soft RLIMIT_NOFILE (0: unknown or unlimited)
    note: Optional[str]  # one line for the log when the settings were lowered
    raised_from: int  # the soft limit before it was raised for these limits (0: not raised)


def open_fds() -> int:
    """Descriptors this process has open now (an estimate where /proc is missing)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(0, len(os.listdir(folder)) - 1)  # less the listing's own
        except OSError:
            continue
    return 64


def nofile_limit(want: int) -> Tuple[int, int]:
    """The soft RLIMIT_NOFILE (0: unlimited), first raised towards ``want`` within the hard
    limit, and the soft limit it had before (0 when not raised)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    before = 0
    if soft != infinity and soft < want:
        target = want if hard == infinity else min(want, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft, before = target, soft
            except (ValueError, OSError):
                pass
    return (0 if soft == infinity else int(soft)), int(before)


def plan_limits(max_connections: int, max_pending: int, in_use: int) -> Limits:
    """Lower the limits to what the open-file limit can hold beside ``in_use`` descriptors.

    ``max_pending`` 0 means no accept loop (only WebSocket connections handed over).
    Raises ConfigError when not even one connection fits.
    """
    want = max_connections + max_pending + in_use + FD_HEADROOM
    nofile, before = nofile_limit(want)
    if not nofile or want <= nofile:
        return Limits(max_connections, max_pending, nofile, None, before)
    room = nofile - in_use - FD_HEADROOM
    if room < (2 if max_pending else 1):
        raise ConfigError("the open-file limit (ulimit -n) is %d: no room for connections beside the %d "
                          "descriptors in use; raise it (ulimit -n 65536)" % (nofile, in_use + FD_HEADROOM))
    pending = min(max_pending, max(1, room // 4)) if max_pending else 0
    conns = min(max_connections, room - pending)
    pending = min(max_pending, room - conns)
    parts = []
    if conns < max_connections:
        parts.append("max connections %d lowered to %d" % (max_connections, conns))
    if pending < max_pending:
        parts.append("max pending %d lowered to %d" % (max_pending, pending))
    note = ("the open-file limit (ulimit -n) is %d: %s (%d descriptors kept for the rest); "
            "raise it to allow more" % (nofile, ", ".join(parts), in_use + FD_HEADROOM))
    return Limits(conns, pending, nofile, note, before)


# ---------------------------------------------------------------------- pending connections

LIVE, EVICTED, DONE = 0, 1, 2


class Slot:
    """A pending connection's place in the table."""

    __slots__ = ("sock", "ip", "idle_since", "state")

    def __init__(self, sock: socket.socket, ip: str, now: float) -> None:
        self.sock = sock
        self.ip = ip
        self.idle_since = now  # when it began to wait for a request (0.0: a request is being served)
        self.state = LIVE


def pending_per_ip(max_connections_per_ip: int) -> int:
    """How many connections not yet upgraded one address may hold (0: no per-address bound)."""
    return max_connections_per_ip + PENDING_PER_IP_SLACK if max_connections_per_ip else 0


class PendingTable:
    """Connections accepted and not upgraded: at most ``limit``, ``per_ip`` per address (0: any)."""

    def __init__(self, limit: int, per_ip: int = 0, evict_after: float = EVICT_AFTER) -> None:
        self.limit = limit
        self.per_ip = per_ip
        self.evict_after = evict_after
        # _lock guards _slots (insertion order: oldest first), _per_ip, _evicting, freed and each
        # slot's state; _room (on _lock) is notified when a place is freed
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        #: places freed in all (a wait for room that ended with none records this count)
        self.freed = 0
        self._stalled_at = -1  # freed when a wait for room last ended with none
        #: seconds a newcomer waits for room when the table is full (see ROOM_WAIT)
        self.room_wait = ROOM_WAIT
        self._slots: Dict[Slot, None] = {}
        self._per_ip: Dict[str, int] = {}
        self._evicting = 0  # evicted slots whose connection thread has not released them yet
        self.evicted = 0  # connections evicted in all

    def __len__(self) -> int:
        return len(self._slots)

    def take(self, sock: socket.socket, ip: str, now: Optional[float] = None) -> Tuple[Optional[Slot], str]:
        """A slot for a new connection (evicting the idlest if needed), or (None, why not)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self.per_ip and self._per_ip.get(ip, 0) >= self.per_ip:
                return None, PER_IP
            if len(self._slots) >= self.limit and not self._evict(now):
                return None, OVER_LIMIT
            slot = Slot(sock, ip, now)
            self._slots[slot] = None
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            return slot, ""

    def wait_room(self) -> bool:
        """Wait (the accept thread) until the table has room, at most ``room_wait`` seconds.

        False at once when an earlier wait found no room and no place was freed since.
        """
        deadline = time.monotonic() + self.room_wait
        with self._lock:
            if self._stalled_at == self.freed:
                return False
            while len(self._slots) >= self.limit:
                now = time.monotonic()
                if self._evict(now):  # one idle long enough meanwhile
                    return True
                if now >= deadline:
                    self._stalled_at = self.freed
                    return False
                self._room.wait(min(deadline - now, self.evict_after / 4))
            return True

    def evict_idle(self) -> bool:
        """End the connection that has waited longest for a request (to free its descriptor)."""
        with self._lock:
            return self._evict(time.monotonic())

    def _evict(self, now: float) -> bool:
        """Under the lock: end the connection that has waited longest for a request, if it is idle."""
        if self._evicting >= MAX_EVICTING:
            return False
        victim = None
        for slot in self._slots:
            if slot.idle_since and now - slot.idle_since >= self.evict_after and (
                    victim is None or slot.idle_since < victim.idle_since):
                victim = slot
        if victim is None:
            return False
        self._drop(victim)
        victim.state = EVICTED
        self._evicting += 1
        self.evicted += 1
        try:
            # its thread wakes and closes it; the socket is not closed before the slot is released
            victim.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True

    def _drop(self, slot: Slot) -> None:
        del self._slots[slot]
        self.freed += 1
        self._room.notify()
        left = self._per_ip.get(slot.ip, 1) - 1
        if left > 0:
            self._per_ip[slot.ip] = left
        else:
            self._per_ip.pop(slot.ip, None)

    def idle(self, slot: Slot, waiting: bool) -> None:
        """The connection begins to wait for a request (True) or has one to serve (False)."""
        with self._lock:  # not while an eviction picks its victim
            slot.idle_since = time.monotonic() if waiting else 0.0

    def release(self, slot: Slot) -> None:
        """The connection was upgraded or ends: its slot is free (call before closing the socket)."""
        if slot.state == DONE:  # released already (DONE is final: no lock needed to see it)
            return
        with self._lock:
            if slot.state == LIVE:
                self._drop(slot)
            elif slot.state == EVICTED:
                self._evicting -= 1
            slot.state = DONE


# ---------------------------------------------------------------------- turning away


class TurnAway:
    """Answers connections that get no slot with 503 and closes them, in the accept thread.

    Not thread-safe: only the accept thread uses it.
    """

    def __init__(self, answer: bool = True) -> None:
        #: write the 503 (False for TLS, where a plain answer means nothing to the client)
        self.answer = answer
        self._lingering: Deque[Tuple[socket.socket, float]] = collections.deque()
        self._reserve: Optional[int] = None
        self.refused = 0  # connections turned away in all
        self._take_reserve()

    def _take_reserve(self) -> None:
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass

    def refuse(self, sock: socket.socket, message: str = OVER_LIMIT, linger: bool = True) -> None:
        """Answer 503 (non-blocking) and close; kept open a moment to read the request first."""
        self.refused += 1
        try:
            if self.answer:
                sock.send(_ANSWERS.get(message) or busy_answer(message), socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            linger = False
        if not linger:
            try:  # what the client already sent, so that the close is no reset
                sock.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        if len(self._lingering) >= MAX_LINGERING:
            self._lingering.popleft()[0].close()
        self._lingering.append((sock, time.monotonic() + LINGER_TIME))

    def poll(self) -> Optional[float]:
        """Read what refused clients sent, close those done; seconds until the next deadline."""
        if not self._lingering:
            return None
        now = time.monotonic()
        keep: List[Tuple[socket.socket, float]] = []
        for sock, deadline in self._lingering:
            done = now >= deadline
            while not done:
                try:
                    if not sock.recv(4096):
                        done = True
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    done = True
            if done:
                sock.close()
            else:
                keep.append((sock, deadline))
        self._lingering = collections.deque(keep)
        return min(d for _, d in keep) - now if keep else None

    def refuse_without_fd(self, listener: socket.socket, most: int = 64) -> int:
        """The fd table is full: accept and refuse up to ``most`` waiting connections with the reserve."""
        done = 0
        while done < most:
            if self._reserve is None:
                self._take_reserve()
                if self._reserve is None:
                    break
            os.close(self._reserve)
            self._reserve = None
            try:
                sock, _addr = listener.accept()
            except OSError:  # none waiting (EAGAIN), or still no descriptor: try later
                self._take_reserve()
                break
            self.refuse(sock, linger=False)  # no descriptor to spare for lingering
            done += 1
            self._take_reserve()
        return done

    def close(self) -> None:
        """Close the lingering sockets and the reserve."""
        for sock, _deadline in self._lingering:
            sock.close()
        self._lingering.clear()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
