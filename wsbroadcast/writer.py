"""The writer: ONE thread draining the broadcast channel into non-blocking sockets.

Producers (readers, the hub, ``Server.publish``) put lists of operations on a
bounded ``queue.Queue``. The writer turns each delivery into frames once per
delivery format, appends them to each recipient's outbox, and sends each
connection's pending frames joined in one ``send(MSG_DONTWAIT)``. Connections that
negotiated permessage-deflate get compressed frames, deflated once per (delivery
format, window bits) and shared like the plain ones. What does not
fit waits in the outbox and the socket waits in a selector for writability. A
connection whose unsent bytes pass its limit is closed with 1008 "slow consumer".
The writer never blocks on a socket and never takes the hub's lock.

Over TLS the outbox holds plain frames too: each send seals everything pending
into TLS records with one encryption (one record per 16 KiB, not one per frame),
and a slow consumer's frames not yet sealed can still be dropped for its close.

It also keeps the clock: keepalive pings, pong deadlines, credential expiry and
the grace period of closing connections.
"""

from __future__ import annotations

import collections
import logging
import queue
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from .connection import Connection, Flag
from .deflate import Compressors
from .envelope import message_text
from .errors import CloseCode
from .logutil import RateLimitedLog
from .wsframe import close_frame, ping_frame, text_frame, text_payload

logger = logging.getLogger(__name__)
#: what a reader waits on for its connection to be detached (set by the writer)
Done = Union[threading.Event, Flag]

# per connection, and any client can cause them: at most one record per interval, with a count
_slow_log = RateLimitedLog(logger)
_reset_log = RateLimitedLog(logger)
_no_pong_log = RateLimitedLog(logger)

# Operations: tuples whose first item is one of these.
DELIVER = 1  # (DELIVER, topic, seq, data_json, recipients, publish_time)
SEND = 2  # (SEND, conn, frame_bytes)
REPLAY = 3  # (REPLAY, conn, [frame_bytes, ...])  not counted against the outbox limit
CLOSE = 4  # (CLOSE, conn, code, reason)
# 5: no longer used (a reader's start is Writer.attach)
# 6: no longer used (a reader's end is Writer.release)
CLOSE_ALL = 7  # (CLOSE_ALL, code, reason)
CALL = 8  # (CALL, callable)  runs in the writer thread, in order
SLOW = 9  # (SLOW, conn)  close as a slow consumer
SEND_WIRE = 10  # (SEND_WIRE, conn, bytes)  bytes as they are (not a frame); b"": the TLS layer's own output
RELEASE = 11  # (RELEASE, conn, Done or None)  its reader has ended: close the socket
#: (STORED, pending, ops, if_not)  ``ops`` once ``pending.settle()`` says stored, else
#: ``if_not()``'s ops: publications whose commit is left to the writer, which makes one
#: commit of all the appends made meanwhile (see MessageStore.append_deferred)
STORED = 12

_LINGER_RESET = struct.pack("ii", 1, 0)
#: released connections reaped per round of the writer (see Writer._released)
_REAP_PER_ROUND = 256
_DONTWAIT = socket.MSG_DONTWAIT
#: over TLS, pending frames are sealed into records only while fewer record bytes than this wait
#: unsent: what a slow consumer is owed stays mostly frames, which its close can drop
_SEAL_BELOW = 65536


class WriterStats:
    """Counters kept by the writer thread as plain integers, read at scrape time."""

    def __init__(self) -> None:
        self.delivered = 0
        self.bytes_out = 0
        self.slow_consumers = 0
        self.close_codes: dict = {}
        #: publish-to-write seconds, drained by the metrics collector (bounded)
        self.latency_samples: List[float] = []


class Writer:
    """Owns the broadcast channel, the writer thread and every connection's outbox."""

    def __init__(self, queue_size: int = 65536, close_timeout: float = 3.0,
                 ping_interval: float = 20.0, ping_timeout: float = 20.0,
                 compression_threshold: int = 128) -> None:
        self.queue: "queue.Queue[Sequence[tuple]]" = queue.Queue(maxsize=queue_size)
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.stats = WriterStats()
        #: shared compressors and their counters (writer thread only)
        self.compressors = Compressors()
        #: messages with fewer payload bytes go uncompressed
        self.compression_threshold = compression_threshold
        self.state = "new"
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        # True while the writer may sleep in select(): producers then write a wake-up byte.
        self._sleeping = False
        #: connections to attach (see attach): a deque, so that thousands of readers starting
        #: at once append without a lock or a wake-up
        self._attaching: Deque[Connection] = collections.deque()
        self._stop = False
        # --- writer-thread-only state ---
        self._conns: Set[Connection] = set()
        self._dirty: List[Connection] = []
        self._closing: Set[Connection] = set()
        #: released connections whose close frame is still on its way -> their ``done``
        self._lingering: Dict[Connection, Optional[Done]] = {}
        # connections released (RELEASE) and not reaped yet: taken off the channel at once
        # and reaped at most _REAP_PER_ROUND a round, after the round's deliveries, so that
        # thousands of connections ending at once do not queue the living's messages
        # behind them (at most one entry per connection)
        self._released: Deque[Tuple[Connection, Optional[Done]]] = collections.deque()
        self._n_waiting = 0
        self._round_t0: List[float] = []  # publish times of the messages of this round
        self._run_msgs: List[tuple] = []  # DELIVER ops of the current run
        self._run_to: Any = None  # the recipients they share
        self._ping = ping_frame(b"ka")
        self._tick_every = max(0.02, min(0.5, ping_interval / 4, close_timeout / 4))
        self._thread = threading.Thread(target=self._run, name="wsbroadcast-writer", daemon=True)

    # ------------------------------------------------------------------ producers
    def put(self, ops: Sequence[tuple]) -> None:
        """Queue a list of operations; safe from any thread (waits while the channel is full)."""
        self.queue.put(ops)
        if self._sleeping:
            self._wake()

    def attach(self, conn: Connection) -> None:
        """Make ``conn`` known to the writer (keepalive, expiry, close-all); never waits.

        Taken at the writer's next round, before what is queued then; it needs no wake-up
        (deliveries and closes reach a connection whether attached or not).
        """
        self._attaching.append(conn)

    def release(self, conn: Connection, done: Optional[Done] = None) -> None:
        """The reader of ``conn`` has ended: the writer detaches it, never to touch it again.

        Queued after what was put before (a close frame among it gets out first, within
        the close grace); ``done`` is set once detached: the socket may be closed then.
        """
        self.put(((RELEASE, conn, done),))

    def release_all(self, ended: Sequence[Tuple[Connection, Optional[Done]]]) -> None:
        """``release`` of several connections, as one item on the channel."""
        self.put(tuple((RELEASE, conn, done) for conn, done in ended))

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in the writer thread after everything queued before it."""
        self.put(((CALL, fn),))

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call has been processed."""
        done = threading.Event()
        self.call(done.set)
        return done.wait(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0", _DONTWAIT)
        except OSError:
            pass  # a byte is already pending, or the writer is gone

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the writer thread."""
        self.state = "running"
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the writer thread and join it."""
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = "stopped"
        for s in (self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def holding(self) -> int:
        """Connections attached to the writer: open, or released and their sockets not closed yet."""
        return len(self._conns) + len(self._attaching)

    def depth(self) -> int:
        """Items waiting in the broadcast channel."""
        return self.queue.qsize()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        get = self.queue.get_nowait
        next_tick = time.monotonic() + self._tick_every
        try:
            while not self._stop:
                if self._attaching:
                    self._attach()
                # 1. drain what is queued (bounded per round so sockets get serviced; a
                # release is only noted here, and does not count)
                budget = 512
                while budget:
                    try:
                        ops = get()
                    except queue.Empty:
                        break
                    if not ops or ops[0][0] != RELEASE:
                        budget -= 1
                    try:
                        self._apply(ops)
                    except Exception:  # a bug must not stop delivery to everyone
                        logger.exception("writer failed on an operation; it is dropped")
                        self._run_msgs = []
                        self._run_to = None
                try:
                    if self._run_msgs:
                        self._fan_out()
                except Exception:
                    logger.exception("writer failed on a delivery; it is dropped")
                    self._run_msgs = []
                    self._run_to = None
                # 2. write what became pending
                if self._round_t0:
                    self._record_latency(time.monotonic())
                if self._dirty:
                    self._flush_dirty()
                if self._released:
                    self._reap_released()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + self._tick_every
                # 3. wait for work or writability, never blocking while work is queued
                timeout: Optional[float] = 0.0
                if self.queue.empty() and not self._released:
                    self._sleeping = True
                    if self.queue.empty():
                        timeout = max(0.0, next_tick - time.monotonic())
                if timeout or self._n_waiting:
                    events = self._sel.select(timeout)
                else:
                    events = []
                self._sleeping = False
                for key, _mask in events:
                    conn = key.data
                    if conn is None:
                        try:  # (one read takes every wake-up byte but in a flood of them)
                            while len(self._wake_r.recv(4096)) == 4096:
                                pass
                        except OSError:
                            pass
                    else:
                        self._send(conn)
        except Exception:  # pragma: no cover - a bug; keep it visible
            logger.exception("writer thread failed")
            self.state = "failed"
            raise
        finally:
            if self.state != "failed":
                self.state = "stopped"
            self._attach()
            for conn in list(self._conns):
                conn.drained.set()
            while self._released:
                self._end(*self._released.popleft())
            for conn in list(self._lingering):
                self._end(conn)
            while True:  # connections released but not reaped: detached all the same
                try:
                    ops = self.queue.get_nowait()
                except queue.Empty:
                    break
                for op in ops:
                    if op[0] == RELEASE:
                        self._end(op[1], op[2])

    def _apply(self, ops: Iterable[tuple]) -> None:
        stats = self.stats
        for op in ops:
            kind = op[0]
            if kind == DELIVER:
                # consecutive deliveries to the same recipients form a run, fanned out at once
                if op[4] is not self._run_to:
                    if self._run_msgs:
                        self._fan_out()
                    self._run_to = op[4]
                self._run_msgs.append(op)
                continue
            if kind == STORED:  # (its deliveries may join the current run)
                self._apply(op[2] if op[1].settle() else op[3]())
                continue
            if self._run_msgs:
                self._fan_out()
            if kind == SEND:
                conn = op[1]
                if not (conn.close_sent or conn.dead):
                    self._append(conn, self._compress(op[2], conn.deflate) if conn.deflate else op[2])
            elif kind == REPLAY:
                conn = op[1]
                if not (conn.close_sent or conn.dead):
                    frames = op[2]
                    size = sum(len(f) for f in frames)
                    conn.replay_applied += size
                    if conn.deflate:
                        frames = [self._compress(f, conn.deflate) for f in frames]
                        size = sum(len(f) for f in frames)
                    conn.out.extend(frames)
                    conn.out_bytes += size
                    stats.delivered += len(frames)
                    self._mark(conn)
            elif kind == CLOSE:
                self._close(op[1], op[2], op[3])
            elif kind == RELEASE:
                self._released.append((op[1], op[2]))
            elif kind == CLOSE_ALL:
                for conn in list(self._conns):
                    self._close(conn, op[1], op[2])
            elif kind == CALL:
                op[1]()
            elif kind == SEND_WIRE:
                conn = op[1]
                if not conn.dead:
                    if op[2]:
                        conn.out.append(op[2])
                        conn.out_bytes += len(op[2])
                    elif conn.tls is not None:
                        # the reader's decryption made records: they precede every frame not yet sealed
                        wire = conn.tls.pending_output()
                        if wire:
                            conn.tls.wire = b"".join((conn.tls.wire, wire)) if conn.tls.wire else wire
                            conn.out_bytes += len(wire)
                    self._mark(conn)
            elif kind == SLOW:
                if not (op[1].close_sent or op[1].dead):
                    self._slow(op[1])

    def _fan_out(self) -> None:
        """Append the current run's messages to each recipient: one block per delivery format."""
        msgs, recipients = self._run_msgs, self._run_to
        self._run_msgs = []
        self._run_to = None
        v1 = plain = None
        packed: Optional[dict] = None  # (is_plain, window bits) -> block of compressed frames
        n = 0
        dirty = self._dirty
        for conn in recipients:
            if conn.close_sent or conn.dead:
                continue
            if conn.deflate:
                if packed is None:
                    packed = {}
                key = (conn.is_plain, conn.deflate)
                block = packed.get(key)
                if block is None:
                    block = packed[key] = self._deflated(msgs, conn.is_plain, conn.deflate)
            elif conn.is_plain:
                if plain is None:
                    plain = b"".join([text_frame(m[3].encode("utf-8")) for m in msgs])
                block = plain
            else:
                if v1 is None:
                    v1 = b"".join([text_frame(message_text(m[1], m[2], m[3]).encode("utf-8"))
                                   for m in msgs])
                block = v1
            out = conn.out
            if out and (conn.out_bytes - len(out[0])) > conn.max_outbox and self._over(conn):
                self._slow(conn)
                continue
            out.append(block)
            conn.out_bytes += len(block)
            if len(out) == 1 and not conn.waiting_write:
                dirty.append(conn)
            n += 1
        if n:
            self.stats.delivered += n * len(msgs)
            self._round_t0.extend(m[5] for m in msgs)

    def _deflated(self, msgs: List[tuple], plain: bool, bits: int) -> bytes:
        """The frames of a run of messages for receivers of one format and window."""
        threshold = self.compression_threshold
        frame = self.compressors.text_frame
        out = []
        for m in msgs:
            payload = (m[3] if plain else message_text(m[1], m[2], m[3])).encode("utf-8")
            out.append(frame(payload, bits) if len(payload) >= threshold else text_frame(payload))
        return b"".join(out)

    def _compress(self, frame: bytes, bits: int) -> bytes:
        """A frame for one compressing receiver: text at or over the threshold compressed."""
        if len(frame) < self.compression_threshold + 2:
            return frame
        payload = text_payload(frame)
        if payload is None or len(payload) < self.compression_threshold:
            return frame
        return self.compressors.text_frame(payload, bits)

    def _record_latency(self, now: float) -> None:
        samples = self.stats.latency_samples
        if len(samples) < 10000:
            samples.extend(now - t0 for t0 in self._round_t0)
        self._round_t0 = []

    # ------------------------------------------------------------------ outboxes
    def _mark(self, conn: Connection) -> None:
        if not conn.waiting_write and not conn.dead:
            self._dirty.append(conn)

    @staticmethod
    def _over(conn: Connection) -> bool:
        """Past the limit by a closer count: over TLS the records in flight are not counted either."""
        tls = conn.tls
        return tls is None or conn.out_bytes - len(conn.out[0]) - len(tls.wire) > conn.max_outbox

    def _append(self, conn: Connection, frame: bytes) -> None:
        out = conn.out
        pending = conn.out_bytes
        if out and (pending - len(out[0])) > conn.max_outbox and self._over(conn):
            # unsent bytes, not counting the frame in flight, are past the limit
            self._slow(conn)
            return
        out.append(frame)
        conn.out_bytes = pending + len(frame)
        if not conn.waiting_write and len(out) == 1:
            self._dirty.append(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        sent_all = 0
        for conn in dirty:
            if conn.waiting_write:
                continue
            out = conn.out
            if len(out) == 1 and conn.tls is None and not (conn.dead or conn.close_sent):
                # _send's common case inline (a call less per recipient): one frame, or one block
                # of them, most often taken whole
                data = out[0]
                try:
                    sent = conn.sock.send(data, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._send(conn)  # (it sends again: the same error ends the connection there)
                    continue
                sent_all += sent
                if sent == len(data):
                    out.clear()
                    conn.out_bytes = 0
                    conn.drained.set()
                else:
                    self._advance(conn, data, sent)
                    self._settle(conn)
            elif out or conn.tls is not None:
                self._send(conn)
        self.stats.bytes_out += sent_all

    def _send(self, conn: Connection) -> None:
        if conn.dead:
            return
        tls = conn.tls
        if tls is not None:
            if not self._send_tls(conn, tls):
                return
        elif conn.out:
            out = conn.out
            data = out[0] if len(out) == 1 else b"".join(out)
            sent = self._write(conn, data)
            if sent < 0:
                return
            self._advance(conn, data, sent)
        self._settle(conn)

    @staticmethod
    def _advance(conn: Connection, data: Any, sent: int) -> None:
        """Take out of the outbox the ``sent`` bytes of ``data`` (its frames joined) that went out."""
        out = conn.out
        if sent == len(data):
            out.clear()
            conn.out_bytes = 0
            return
        conn.out_bytes -= sent
        i = 0
        while sent >= len(out[i]):
            sent -= len(out[i])
            i += 1
        if i:
            del out[:i]
        if sent:
            out[0] = memoryview(out[0])[sent:]

    def _settle(self, conn: Connection) -> None:
        """After a send: wait for writability while anything is left, else stop waiting (and
        finish a close); a replay waiting for room goes on once the outbox is low."""
        tls = conn.tls
        if conn.out or (tls is not None and tls.wire):
            if not conn.waiting_write:
                try:
                    self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
                    conn.waiting_write = True
                    self._n_waiting += 1
                except (ValueError, KeyError, OSError):
                    self._kill(conn)
                    return
        else:
            if conn.waiting_write:
                self._unregister(conn)
            if conn.close_sent:
                self._flushed(conn)
        if conn.out_bytes <= conn.max_outbox // 4:
            conn.drained.set()

    def _write(self, conn: Connection, data: Any) -> int:
        """Bytes of ``data`` the socket took without waiting; -1 when it failed (the connection is killed)."""
        try:
            sent = conn.sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            logger.debug("send to %s failed: %s", conn.label, exc)
            self._kill(conn)
            return -1
        self.stats.bytes_out += sent
        return sent

    def _send_tls(self, conn: Connection, tls: Any) -> bool:
        """Seal the pending frames into TLS records with one encryption and send what fits;
        False when the connection is dead. Unsent records wait in ``tls.wire``: TLS bytes
        cannot be dropped or re-made, so that is what the next send starts with."""
        out = conn.out
        while True:
            if out and len(tls.wire) < _SEAL_BELOW:
                plain = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                try:
                    sealed = tls.encrypt(plain)
                except Exception as exc:  # a broken TLS state (a fatal alert): nothing more can be said
                    logger.debug("TLS to %s failed: %s", conn.label, exc)
                    self._kill(conn)
                    return False
                conn.out_bytes += len(sealed) - len(plain)
                tls.wire = b"".join((tls.wire, sealed)) if tls.wire else sealed
            wire = tls.wire
            if not wire:
                return True
            sent = self._write(conn, wire)
            if sent < 0:
                return False
            conn.out_bytes -= sent
            if sent < len(wire):
                if sent:
                    tls.wire = memoryview(wire)[sent:]
                return True
            tls.wire = b""
            if not out:
                return True
            # all sent, and frames left unsealed behind a big block: their turn

    def _unregister(self, conn: Connection) -> None:
        if conn.waiting_write:
            conn.waiting_write = False
            self._n_waiting -= 1
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    # ------------------------------------------------------------------ closing
    def _slow(self, conn: Connection) -> None:
        self.stats.slow_consumers += 1
        _slow_log.warning("closing slow consumer %s (%d bytes unsent)", conn.label, conn.out_bytes)
        self._close(conn, CloseCode.POLICY_VIOLATION, "slow consumer", drop_pending=True)

    def _close(self, conn: Connection, code: int, reason: str, drop_pending: bool = False) -> None:
        if conn.close_sent or conn.dead:
            return
        if drop_pending and conn.out and conn.tls is not None:
            # the frames not sealed yet go; the TLS records made (in flight) must go out whole
            conn.out.clear()
            conn.out_bytes = len(conn.tls.wire)
        elif drop_pending and conn.out:
            # keep only the frame in flight, so the close frame follows whole frames
            head = conn.out[0]
            if isinstance(head, memoryview):
                conn.out[:] = [head]
                conn.out_bytes = len(head)
            else:
                conn.out.clear()
                conn.out_bytes = 0
        frame = close_frame(int(code), reason)
        conn.out.append(frame)
        conn.out_bytes += len(frame)
        conn.close_sent = True
        conn.close_code = int(code)
        conn.close_deadline = time.monotonic() + self.close_timeout
        codes = self.stats.close_codes
        codes[int(code)] = codes.get(int(code), 0) + 1
        self._closing.add(conn)
        self._mark(conn)

    def _flushed(self, conn: Connection) -> None:
        """The close frame is out: half-close so the peer sees it followed by EOF."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.flushed = True
        if conn in self._lingering:
            self._end(conn)

    def _kill(self, conn: Connection) -> None:
        """The socket is unusable: drop its outbox and wake its reader."""
        if conn.dead:
            return
        self._unregister(conn)
        conn.dead = True
        self._drop(conn)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.flushed = True
        conn.drained.set()
        if conn in self._lingering:
            self._end(conn)

    @staticmethod
    def _drop(conn: Connection) -> None:
        """Forget everything unsent (frames, and TLS records)."""
        conn.out.clear()
        conn.out_bytes = 0
        if conn.tls is not None:
            conn.tls.wire = b""

    def _abort(self, conn: Connection) -> None:
        """The grace period ran out: reset the connection (SO_LINGER 0)."""
        if conn.out_bytes:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            _reset_log.log(logging.INFO, "resetting %s: close frame not delivered in time", conn.label)
        self._kill(conn)

    def _attach(self) -> None:
        attaching = self._attaching
        while attaching:
            conn = attaching.popleft()
            if not conn.dead:  # (a connection released at once may be gone already)
                conn.attached = True
                self._conns.add(conn)

    def _reap_released(self) -> None:
        """Reap the oldest released connections, at most _REAP_PER_ROUND of them."""
        released = self._released
        for _ in range(min(_REAP_PER_ROUND, len(released))):
            conn, done = released.popleft()
            self._reap(conn, done)

    def _reap(self, conn: Connection, done: Optional[Done]) -> None:
        """End a connection whose reader has ended (see release)."""
        if conn.close_sent and not conn.flushed and not conn.dead:
            # its close frame is still on its way: ended when flushed, or at the deadline
            self._lingering[conn] = done
        else:
            self._end(conn, done)

    def _end(self, conn: Connection, done: Optional[Done] = None) -> None:
        """Detach a released connection: its reader, told by ``done``, closes the socket.

        (Not closed here: a close lets go of the GIL, and the writer would then wait for
        it again behind every thread of a storm, once per connection.)
        """
        done = self._lingering.pop(conn, done)
        self._detach(conn)
        if done is not None:
            done.set()

    def _detach(self, conn: Connection) -> None:
        if conn.out_bytes:
            # bytes that will never be sent: the reader's close then resets the connection
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self._unregister(conn)
        self._conns.discard(conn)
        self._closing.discard(conn)
        conn.attached = False
        conn.dead = True
        self._drop(conn)

    # ------------------------------------------------------------------ the clock
    def _tick(self, now: float) -> None:
        for conn in [c for c in self._closing if now >= c.close_deadline]:
            self._closing.discard(conn)
            self._abort(conn)
        interval, timeout = self.ping_interval, self.ping_timeout
        wall = time.time()
        for conn in self._conns:
            if conn.close_sent or conn.dead:
                continue
            if conn.expires is not None and wall >= conn.expires:
                self._close(conn, CloseCode.POLICY_VIOLATION, "token expired")
                continue
            if interval <= 0:
                continue
            if conn.ping_sent_at:
                if conn.last_seen >= conn.ping_sent_at:
                    conn.ping_sent_at = 0.0
                elif now - conn.ping_sent_at >= timeout:
                    _no_pong_log.log(logging.INFO, "closing %s: no pong within %.1fs", conn.label, timeout)
                    self._close(conn, CloseCode.INTERNAL_ERROR, "keepalive timeout")
                    continue
            if not conn.ping_sent_at and now - conn.last_seen >= interval:
                conn.ping_sent_at = now
                self._append(conn, self._ping)
        if self._dirty:
            self._flush_dirty()
