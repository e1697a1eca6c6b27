"""Where idle connections' readers wait: one epoll thread wakes them, a few at a time.

A reader blocked in ``recv`` is woken by the kernel. When thousands of clients drop
at once (a network blip, a load balancer restart), thousands of readers wake in the
same moment and all ask for the GIL: every hand-over of the GIL then signals one
condition variable with thousands of waiters, and the process stalls for tens of
seconds while the writer, whose work they wait for, gets almost none of it.

So an idle connection's reader parks here instead: it blocks on a lock of its own, and
the park's thread watches its socket. (A busy connection, whose last two inputs came
less than ``IDLE_AFTER`` seconds apart, first waits up to that long in its own thread:
a steady sender does not go through the park for every message.)
When the socket becomes readable (data, end of stream, an error, the server's
shutdown), the park wakes the reader, but lets at most ``slots`` woken readers run at
once: a reader holds its slot until it has handled what it read (or handed its ended
connection to the writer) and then calls :meth:`IdlePark.done`, which hands the slot
to the next reader whose socket is ready: first those with input, then those whose
peer hung up, of which at most ``ending_slots`` run at once, so that while thousands
of connections end, the writer and the living connections are still served.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import threading
from typing import Deque, Dict, Optional

logger = logging.getLogger(__name__)

#: inputs closer than this (seconds) make a connection busy: it waits that long in its
#: own thread before it parks
IDLE_AFTER = 0.5
#: woken readers that run at once
SLOTS = 16
#: of them, readers whose peer hung up: when thousands of connections end at once, their
#: readers must leave most of the GIL to the writer and to the connections still alive
ENDING_SLOTS = 2
#: what :meth:`IdlePark.park` returns: the kind of slot its caller holds (0: none)
LIVE, ENDING = 1, 2

_HANGUP = (getattr(select, "EPOLLRDHUP", 0x2000) | getattr(select, "EPOLLHUP", 0x10)
           | getattr(select, "EPOLLERR", 0x8))
_WATCH = getattr(select, "EPOLLIN", 1) | _HANGUP | getattr(select, "EPOLLONESHOT", 1 << 30)
_POLLIN = getattr(select, "POLLIN", 1)


def supported() -> bool:
    """Whether this platform has what the park needs (epoll and poll)."""
    return hasattr(select, "epoll") and hasattr(select, "poll")


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Block (without the GIL) until ``sock`` is readable or ``timeout`` seconds pass."""
    poller = select.poll()
    poller.register(sock.fileno(), _POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


class _Gate:
    """What a parked reader waits on: a lock held until it is woken, and the slot it got."""

    __slots__ = ("lock", "kind")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.kind = 0  # LIVE or ENDING once woken with a slot; 0 when woken by stop()


class IdlePark:
    """Parked readers and the thread that wakes them (see the module's docstring).

    ``_lock`` guards ``_parked``, ``_live``, ``_ending``, ``_active``, ``_ending_active`` and
    ``_stopping``; the epoll object is used by the parking threads (register, modify) and the
    park's thread (poll), which the kernel allows concurrently.
    """

    def __init__(self, slots: int = SLOTS, idle_after: float = IDLE_AFTER,
                 ending_slots: int = ENDING_SLOTS) -> None:
        if slots < 1 or ending_slots < 1:
            raise ValueError("slots and ending_slots must be >= 1, got %r and %r" % (slots, ending_slots))
        self.slots = slots
        self.ending_slots = min(ending_slots, slots)
        self.idle_after = idle_after
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        # guards _parked, _live, _ending, _active, _ending_active, _stopping and the counters
        self._lock = threading.Lock()
        self._parked: Dict[int, _Gate] = {}  # fd -> the gate its reader waits on
        # readable, waiting for a slot: with input, and hung up (served after the others)
        self._live: Deque[_Gate] = collections.deque()
        self._ending: Deque[_Gate] = collections.deque()
        self._active = 0  # readers woken and not done yet
        self._ending_active = 0  # of them, those woken because their peer hung up
        self._stopping = False
        #: readers woken so far, and how many of them waited for a slot
        self.wakes = 0
        self.queued = 0
        self._thread = threading.Thread(target=self._run, name="wsbroadcast-idle-park", daemon=True)

    def start(self) -> "IdlePark":
        self._thread.start()
        return self

    def parked(self) -> int:
        """Readers waiting here now (not counting those woken and waiting for a slot)."""
        return len(self._parked)

    def status(self) -> Dict[str, int]:
        """Counters for /healthz: parked now, woken so far, woken after waiting for a slot."""
        return {"parked": self.parked(), "wakes": self.wakes, "queued": self.queued}

    def park(self, sock: socket.socket, watched: bool = False) -> int:
        """Block until ``sock`` is readable and a slot is free: LIVE or ENDING (the peer hung
        up), the slot the caller holds and hands back with :meth:`done`; 0 (no slot) at
        once when the park is stopping, or when it stopped meanwhile.

        A socket stays watched once parked (a wake-up only disarms it; closing it ends
        the watch): ``watched`` says that this socket was parked here before, so that
        one call arms it again.
        """
        fd = sock.fileno()
        gate = _Gate()
        with self._lock:
            if self._stopping:
                return 0
            self._parked[fd] = gate
        # epoll_ctl lets the GIL go: not under _lock, which every parking reader takes (nothing
        # wakes this gate before the socket is armed)
        epoll = self._epoll
        try:
            try:
                if watched:
                    epoll.modify(fd, _WATCH)
                else:
                    epoll.register(fd, _WATCH)
            except FileNotFoundError:  # (not watched after all)
                epoll.register(fd, _WATCH)
            except FileExistsError:  # (watched already)
                epoll.modify(fd, _WATCH)
        except (OSError, ValueError):  # closed meanwhile: read at once, it will say so
            with self._lock:
                if self._parked.get(fd) is gate:
                    del self._parked[fd]
            return 0
        gate.lock.acquire()
        return gate.kind

    def done(self, kind: int = LIVE) -> None:
        """A woken reader has handled what it read: its slot (``kind``, what park returned)
        goes to the next in line."""
        with self._lock:
            self._active -= 1
            if kind == ENDING:
                self._ending_active -= 1
            if self._live:
                self._grant(self._live.popleft(), LIVE)
            elif self._ending and self._room(ENDING):
                self._grant(self._ending.popleft(), ENDING)

    def _room(self, kind: int) -> bool:
        """Under _lock: whether a slot of ``kind`` is free."""
        return self._active < self.slots and (kind == LIVE or self._ending_active < self.ending_slots)

    def _grant(self, gate: _Gate, kind: int) -> None:
        """Under _lock: wake ``gate``'s reader with a slot of ``kind``."""
        self._active += 1
        if kind == ENDING:
            self._ending_active += 1
        gate.kind = kind
        gate.lock.release()

    def stop(self, timeout: float) -> None:
        """Wake every parked reader (no slots from now on), stop the thread and join it."""
        with self._lock:
            self._stopping = True
            gates = list(self._parked.values()) + list(self._live) + list(self._ending)
            self._parked.clear()
            self._live.clear()
            self._ending.clear()
        for gate in gates:
            gate.lock.release()  # (kind 0: no slot)
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._epoll.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        epoll = self._epoll
        while True:
            try:
                events = epoll.poll()
            except InterruptedError:  # (only before Python 3.5 retried it)
                continue
            # A socket that fired is disarmed (EPOLLONESHOT) and stays in the epoll set
            # until its reader parks it again (re-armed) or closes it (which ends the
            # watch; a number reused by a new socket is a new watch): no epoll_ctl here,
            # which would let the GIL go once per woken reader.
            with self._lock:
                if self._stopping:
                    return
                for fd, mask in events:
                    if fd == self._wake_r:
                        continue
                    gate = self._parked.pop(fd, None)
                    if gate is None:
                        continue
                    self.wakes += 1
                    kind = ENDING if mask & _HANGUP else LIVE
                    if self._room(kind):
                        self._grant(gate, kind)
                    else:
                        self.queued += 1
                        (self._ending if kind == ENDING else self._live).append(gate)


def make_park(enabled: bool = True) -> Optional[IdlePark]:
    """A started park, or None where the platform lacks epoll (readers then wait in recv)."""
    if not enabled or not supported():
        return None
    return IdlePark().start()
