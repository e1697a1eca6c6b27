"""The reader: one thread per WebSocket connection, where a message enters the broker.

It feeds received bytes to wsproto, turns each complete text message into a
command (``envelope.parse_client_frame``) and hands the commands of one chunk to
the hub as one batch. It never writes to the socket: replies go through the
writer's channel. It owns the end of the connection: after the close handshake
(or its grace period) it detaches the connection from the writer and closes
the socket.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from wsproto.connection import Connection as FrameProtocol
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from .connection import Connection, Flag
from .envelope import parse_client_frame
from .errors import CloseCode
from .idlepark import wait_readable
from .writer import CLOSE, SEND, SEND_WIRE
from .wsframe import FrameSplitter, pong_frame

if TYPE_CHECKING:  # pragma: no cover
    from wsproto.extensions import Extension

    from .hub import Hub
    from .idlepark import IdlePark
    from .writer import Writer

logger = logging.getLogger(__name__)

RECV_SIZE = 65536
RECV_IDLE = 1024
_PEEK = socket.MSG_PEEK


class Reader:
    """Runs one WebSocket connection from the upgrade to the closed socket."""

    #: binary messages are refused with 1003 unless a subclass handles them
    accept_binary = False

    __slots__ = ("conn", "_ws", "extensions", "hub", "writer", "max_message_size", "max_message_frames",
                 "close_timeout", "_parts", "_size", "_frames", "_failed", "_close_requested", "splitter",
                 "park", "_slot", "_busy", "_watched")

    def __init__(self, conn: Connection, extensions: Sequence["Extension"], hub: "Hub", writer: "Writer",
                 max_message_size: int, close_timeout: float, max_message_frames: int = 4096,
                 park: Optional["IdlePark"] = None) -> None:
        self.conn = conn
        #: where the thread waits once the connection is idle (None: always in recv)
        self.park = park
        self._slot = 0  # woken by the park: the kind of slot it holds until done() (0: none)
        self._busy = False  # the last two inputs came less than park.idle_after apart
        self._watched = False  # the socket was parked before (the park still watches it)
        #: the extensions agreed in the handshake, for the frame parser
        self.extensions = extensions
        # wsproto's frame parser, made when a frame first needs it (most connections never do)
        self._ws: Optional[FrameProtocol] = None
        self.hub = hub
        self.writer = writer
        self.max_message_size = max_message_size
        #: frames one message may take (empty fragments cost a frame each, not a byte)
        self.max_message_frames = max_message_frames
        self.close_timeout = close_timeout
        self._parts: List[Any] = []  # the non-empty pieces (str, or bytes when binary) of the message under way
        self._size = 0  # its payload bytes so far
        self._frames = 0  # its complete frames so far
        self._failed = False  # wsproto reported a protocol error or we refused the input
        self._close_requested = False  # this reader asked the writer for a close frame
        #: whole frames; ordinary text frames decoded without wsproto (the fast path)
        # (deflated, incompressible data grows a little: at most about n/4096 + 13 bytes, zlib's
        # deflateBound; the limit itself applies to the inflated size, as it is inflated)
        self.splitter = FrameSplitter(max_message_size,
                                      (max_message_size >> 10) + 64 if conn.deflate else 0)

    # ------------------------------------------------------------------ lifecycle
    def run(self, trailing: bytes = b"", refuse: Optional[tuple] = None,
            on_open: Any = None, closing: Any = None, greeting: bytes = b"") -> None:
        """Serve the connection until it is closed; always releases the socket.

        ``refuse`` (code, reason) closes it at once; ``closing()`` tells whether the
        server is shutting down, checked after the writer knows the connection so
        that either this check or the server's close-all reaches it. ``greeting``: the
        upgrade's answer when not sent yet (``on_open`` queues it; sent first if refused).
        """
        conn = self.conn
        try:
            if self._open(trailing, refuse, on_open, closing, greeting):
                return
            del trailing, on_open, closing, greeting  # an idle connection keeps none of them
            self._loop()
        except Exception:
            logger.exception("reader of %s failed", conn.label)
            self._close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._finish()

    def _open(self, trailing: bytes, refuse: Optional[tuple], on_open: Any, closing: Any,
              greeting: bytes) -> bool:
        """Attach the connection and begin it (see run); True when it is finished already."""
        conn = self.conn
        if conn.sock.gettimeout() is not None:
            conn.sock.settimeout(None)  # the writer needs a socket without timeout
        self.writer.attach(conn)
        if refuse is None and closing is not None and closing():
            refuse = (CloseCode.GOING_AWAY, "server shutting down")
        if refuse is not None:
            if greeting:
                self.writer.put(((SEND_WIRE, conn, greeting),))
            self._close(refuse[0], refuse[1])
            return False
        self.hub.add(conn)
        if on_open is not None:
            on_open(conn)
        return bool(trailing) and self._feed(trailing)

    def _loop(self) -> None:
        conn = self.conn
        recv = conn.recv
        # an idle connection waits without a receive buffer (recv allocates its buffer
        # before it blocks): it peeks one byte, or with a park waits (see _wait), then
        # reads what came. Over TLS the TLS layer waits (_wait) once it holds nothing
        # decrypted.
        sock = conn.sock if conn.tls is None else None
        park = self.park
        if park is not None and conn.tls is not None:
            conn.tls.wait_input = self._wait
        size = RECV_IDLE
        last = 0.0
        while True:
            self._give_slot_back()  # what the park woke this thread for is handled
            try:
                if sock is not None and size == RECV_IDLE:
                    if park is None:
                        if not sock.recv(1, _PEEK):
                            return
                    else:
                        self._wait(sock)
                data = recv(size)
            except OSError:
                return
            # a big buffer only while busy
            size = RECV_SIZE if len(data) >= size else RECV_IDLE
            if not data:
                return
            now = conn.last_seen = time.monotonic()
            if park is not None:
                self._busy = now - last < park.idle_after
                last = now
            if self._failed:
                continue  # discard until the peer closes or the grace period ends
            if conn.tls is not None and conn.tls.output_waiting():
                self.writer.put(((SEND_WIRE, conn, b""),))  # the writer takes it, in order
            if self._feed(data):
                return

    def _wait(self, sock: socket.socket) -> None:
        """Block until ``sock`` is readable: in the park, or, for a busy connection, in
        this thread for up to park.idle_after seconds first."""
        park = self.park
        assert park is not None
        self._give_slot_back()  # (TLS: a record still incomplete; its slot goes on while it waits)
        if not (self._busy and wait_readable(sock, park.idle_after)):
            self._slot = park.park(sock, self._watched)
            self._watched = True

    def _give_slot_back(self) -> None:
        """Hand the park's slot this thread holds, if any, to the next woken reader."""
        kind = self._slot
        if kind:
            self._slot = 0
            self.park.done(kind)  # type: ignore[union-attr]  # (a slot comes from the park)

    def _finish(self) -> None:
        conn = self.conn
        self.hub.remove(conn)
        # the writer lets a close frame out and detaches the connection; the thread waits
        # for that, blocked (so that thousands of connections dropping at once end at the
        # writer's pace, instead of all asking for the GIL at once), then closes the socket
        done = Flag()  # (lighter than an Event: one lock, set by the writer)
        self.writer.release(conn, done)
        self._give_slot_back()  # the wait is the writer's: the park's next reader need not wait too
        while not done.wait(30.0):
            if not self.writer.alive:  # (stopped: it detached what it was handed as it stopped)
                break
        try:
            conn.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ input
    def _feed(self, data: bytes) -> bool:
        """Process received bytes; True when the connection is finished."""
        splitter = self.splitter
        commands: List[Any] = []
        finished = False
        for item in splitter.feed(data):
            if type(item) is str:
                if not self.conn.close_sent:
                    self.on_message(item, commands)
            elif self._parse(item, commands):
                finished = True
                break
            if self._failed:
                break
        if splitter.too_big and not (finished or self._failed):
            self._refuse(CloseCode.MESSAGE_TOO_BIG, "message too big")
        if commands and not self.conn.close_sent:
            self.hub.handle(self.conn, commands)
        return finished

    def _parse(self, data: bytes, commands: List[Any]) -> bool:
        """Whole frames through wsproto; True when the connection is finished."""
        ws = self.ws
        ws.receive_data(data)
        conn = self.conn
        finished = False
        event: Any  # wsproto's Event subclasses, told apart by their type
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                if conn.close_sent:
                    continue
                msg: Any = event.data
                if kind is BytesMessage:
                    if not self.accept_binary:
                        self._refuse(CloseCode.UNSUPPORTED_DATA, "binary messages are not accepted")
                        break
                    msg = bytes(msg)  # wsproto 1.2 hands out bytearrays
                    self._size += len(msg)
                else:
                    self._size += len(msg) if msg.isascii() else len(msg.encode("utf-8"))
                if self._size > self.max_message_size:
                    self._refuse(CloseCode.MESSAGE_TOO_BIG, "message too big")
                    break
                if event.frame_finished:
                    self._frames += 1
                    if self._frames > self.max_message_frames:
                        self._refuse(CloseCode.MESSAGE_TOO_BIG, "message in too many frames")
                        break
                if not event.message_finished:
                    if msg:
                        self._parts.append(msg)
                    continue
                if self._parts:
                    self._parts.append(msg)
                    msg = msg[:0].join(self._parts)
                    self._parts = []
                self._size = 0
                self._frames = 0
                self.on_message(msg, commands)
            elif kind is Ping:
                self.writer.put(((SEND, conn, pong_frame(event.payload)),))
            elif kind is Pong:
                pass
            elif kind is CloseConnection:
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    # a close from the peer: echo its code (1000 when it gave none)
                    code = event.code if event.code not in (1005, 1006) else 1000
                    if commands:  # what came before the close is still carried out
                        self.hub.handle(conn, commands)
                        del commands[:]
                    self._close(code, "")
                    finished = True
                else:
                    # a protocol error found by wsproto, state still OPEN
                    self._refuse(event.code, "message too big" if event.code == CloseCode.MESSAGE_TOO_BIG
                                 else event.reason or "protocol error")
                break
        return finished

    @property
    def ws(self) -> FrameProtocol:
        """wsproto's frame parser of this connection (made on first use)."""
        ws = self._ws
        if ws is None:
            ws = self._ws = FrameProtocol(ConnectionType.SERVER, list(self.extensions))
        return ws

    def on_message(self, data: Any, commands: List[Any]) -> None:
        """A complete message (str, or bytes when binary is accepted): parse it into a command."""
        commands.append(parse_client_frame(data, self.conn.kind))

    def _refuse(self, code: int, reason: str) -> None:
        """Fail the connection: close frame, then discard input until the peer goes."""
        self._failed = True
        self._parts = []
        self._close(code, reason)

    def _close(self, code: int, reason: str) -> None:
        self._close_requested = True
        self.writer.put(((CLOSE, self.conn, int(code), reason),))

