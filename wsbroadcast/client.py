"""A synchronous Python client on simple-websocket, safe to share between threads.

    with wsbroadcast.Client("ws://127.0.0.1:8080/ws") as c:
        c.subscribe("news.*")
        c.publish("news.eu", {"title": "hello"})
        for msg in c:                     # Message(topic, seq, data)
            print(msg.topic, msg.seq, msg.data)

On a dropped connection it reconnects with backoff and jitter and resubscribes
every topic with ``since`` = the last seq it saw, so the application sees each
message once and in order; ``on_reconnect`` and ``on_gap`` tell it what happened.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import random
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple
from urllib.parse import quote

import simple_websocket
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .envelope import MAX_DEPTH, SUBPROTOCOL, encode_json, parse_json
from .errors import ClientError, ConnectionClosed, ErrorCode, HandshakeRefused, ProtocolError
from .topics import is_wildcard, validate_pattern, validate_topic

logger = logging.getLogger(__name__)


#: the most of a refusal's body read for its error code and message
_MAX_REFUSAL_BODY = 64 * 1024

#: the values of ``Client.state``, in the order a connection goes through them
STATES = ("connecting", "connected", "reconnecting", "closed")


class Message(NamedTuple):
    """One delivery: the topic, its seq and the published value."""

    topic: str
    seq: int
    data: Any


class _LockedSocket:
    """A socket whose ``send`` writes everything under one lock: no partial or mixed frames."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # guards: every write to the socket

    def send(self, data: bytes, *flags: int) -> int:
        with self._lock:
            self._sock.sendall(data)
        return len(data)

    sendall = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _SafeWebSocket(simple_websocket.Client):
    """simple-websocket's client with serialised writes (its send and ping share a socket),
    a deadline on the handshake, and the server's refusal as a HandshakeRefused."""

    def __init__(self, url: str, handshake_timeout: float = 10.0, compression: bool = True,
                 **kwargs: Any) -> None:
        self._handshake_timeout = handshake_timeout
        self._compression = compression
        super().__init__(url, **kwargs)

    def handshake(self) -> None:
        sock: socket.socket = self.sock  # set by simple-websocket's connect()
        try:
            sock.settimeout(self._handshake_timeout)
            sock.sendall(self.ws.send(Request(host=self.host, target=self.path,
                                              subprotocols=self.subprotocols,
                                              extensions=[PerMessageDeflate()] if self._compression else [],
                                              extra_headers=self.extra_headeers)))
            event = self._next_event()
            if isinstance(event, RejectConnection):
                raise self._refusal(event)
            if not isinstance(event, AcceptConnection):
                raise HandshakeRefused(400, message="unexpected answer to the handshake")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.subprotocol = event.subprotocol
        self.connected = True
        self.sock: Any = _LockedSocket(sock)
        self._send_lock = threading.Lock()  # guards: the wsproto object when sending

    def _next_event(self) -> Any:
        while True:
            for event in self.ws.events():
                return event
            data = self.sock.recv(self.receive_bytes)
            if not data:
                raise ClientError("the server closed the connection during the handshake")
            self.ws.receive_data(data)

    def _refusal(self, reject: RejectConnection) -> HandshakeRefused:
        """The refusal with the server's error code and message from its JSON body, if any."""
        body = b""
        event: Any = reject
        try:
            while reject.has_body and len(body) < _MAX_REFUSAL_BODY:
                event = self._next_event()
                if not isinstance(event, RejectData):
                    break
                body += event.data
                if event.body_finished:
                    break
        except (OSError, ClientError, LocalProtocolError, RemoteProtocolError):
            pass  # the status alone still says what happened
        code: Optional[str] = None
        message = ""
        try:
            doc = parse_json(body.decode("utf-8"))
            if isinstance(doc, dict):
                if isinstance(doc.get("error"), str):
                    code = doc["error"]
                if isinstance(doc.get("message"), str):
                    message = doc["message"]
        except ValueError:
            pass
        return HandshakeRefused(reject.status_code, code, message)

    def send(self, data: Any) -> None:
        with self._send_lock:
            super().send(data)

    def close(self, reason: Any = None, message: Any = None) -> None:
        with self._send_lock:
            super().close(reason=reason, message=message)


class Client:
    """A wsbroadcast v1 client: subscribe, publish, iterate over messages, close."""

    def __init__(self, url: str, token: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None, reconnect: bool = True,
                 timeout: float = 10.0, max_backoff: float = 5.0, queue_size: int = 10000,
                 on_reconnect: Optional[Callable[[], None]] = None,
                 on_gap: Optional[Callable[[str, Dict[str, Any]], None]] = None,
                 headers: Optional[Dict[str, str]] = None,
                 on_state: Optional[Callable[[str], None]] = None, compression: bool = True,
                 on_join: Optional[Callable[[str, Dict[str, Any]], None]] = None,
                 on_leave: Optional[Callable[[str, Dict[str, Any]], None]] = None) -> None:
        self.url = url
        #: offer permessage-deflate (the server's messages then come compressed)
        self.compression = compression
        self.token = token
        self.ssl_context = ssl_context
        self.reconnect = reconnect
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.on_reconnect = on_reconnect
        self.on_gap = on_gap
        #: called with each new ``state`` (in the client's thread, or the one calling open/close)
        self.on_state = on_state
        #: called with (topic, client object) for each join and leave of a topic subscribed to
        #: with ``join_leave`` (in the client's thread, in order with the messages)
        self.on_join = on_join
        self.on_leave = on_leave
        #: "connecting", "connected", "reconnecting" (messages wait until it is back) or "closed"
        self.state = "connecting"
        self._state_lock = threading.Lock()  # guards: state changes (one callback per change)
        self.headers = dict(headers or {})
        self.reconnects = 0
        self._ids = itertools.count(1)
        # _lock guards: _ws, _waiters, _subs, _join_leave, _granted_subs, _last, _epochs
        self._lock = threading.Lock()
        self._ws: Optional[_SafeWebSocket] = None
        self._waiters: Dict[int, List[Any]] = {}  # id -> [Event, reply]
        self._subs: Dict[str, None] = {}  # patterns, in subscription order
        self._join_leave: Set[str] = set()  # topics subscribed to with join_leave
        self._granted_subs: Set[str] = set()  # patterns granted by the token (channels)
        self._last: Dict[str, int] = {}  # topic -> last seq seen
        self._epochs: Dict[str, str] = {}  # topic -> epoch of its last ack
        self._messages: "queue.Queue[Any]" = queue.Queue(maxsize=queue_size)
        self._connected = threading.Event()
        self._closed = threading.Event()
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def connect(cls, url: str, **kwargs: Any) -> "Client":
        """Create a client and connect it."""
        return cls(url, **kwargs).open()

    def open(self) -> "Client":
        """Connect; HandshakeRefused when the server says no (401, 403, 404), OSError when
        it cannot be reached."""
        try:
            self._ws = self._dial()
        except BaseException:
            self._set_state("closed")
            raise
        self._connected.set()
        self._set_state("connected")
        self._thread = threading.Thread(target=self._run, name="wsbroadcast-client", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Client":
        return self if self._ws is not None else self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        self._closed.set()
        ws = self._ws
        if ws is not None and ws.connected:
            try:
                ws.close()
            except (simple_websocket.ConnectionClosed, OSError):
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout)
        self._fail_waiters()
        self._set_state("closed")

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting and once closed)."""
        return self._connected.is_set() and not self._closed.is_set()

    def _set_state(self, state: str) -> None:
        with self._state_lock:
            if self.state == state or self.state == "closed":
                return
            self.state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                logger.exception("on_state callback failed")

    def _dial(self) -> _SafeWebSocket:
        url = self.url
        if self.token:
            url += ("&" if "?" in url else "?") + "token=" + quote(self.token)
        return _SafeWebSocket(url, handshake_timeout=self.timeout, compression=self.compression,
                              subprotocols=[SUBPROTOCOL],
                              headers=self.headers or None, ssl_context=self.ssl_context,
                              receive_bytes=65536)

    # ------------------------------------------------------------------ requests
    def _request(self, frame: Dict[str, Any], wait: bool = True,
                 timeout: Optional[float] = None,
                 on_reply: Optional[Callable[[Any], None]] = None) -> Optional[Dict[str, Any]]:
        """Send ``frame``; with ``wait``, return its answer.

        ``on_reply`` runs in the client's thread when the answer arrives, before any
        later frame is handled (or with the exception when the connection is lost).
        """
        timeout = self.timeout if timeout is None else timeout
        waiter: Optional[List[Any]] = None
        if wait:
            frame["id"] = next(self._ids)
        text = encode_json(frame)  # ValueError for NaN/Infinity, which the server refuses
        if wait:
            waiter = [threading.Event(), None, on_reply]
            with self._lock:
                self._waiters[frame["id"]] = waiter
        deadline = time.monotonic() + timeout
        while True:
            if self._closed.is_set():
                raise ConnectionClosed(self.close_code, "client closed")
            if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                raise ConnectionClosed(self.close_code, "not connected")
            ws = self._ws
            try:
                assert ws is not None
                ws.send(text)
                break
            except (simple_websocket.ConnectionClosed, OSError):
                self._connected.clear()
                if not self.reconnect:
                    raise ConnectionClosed(self.close_code, self.close_reason) from None
        if waiter is None:
            return None
        if not waiter[0].wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._waiters.pop(frame["id"], None)
            raise ClientError("no answer within %.1fs" % timeout)
        reply = waiter[1]
        if isinstance(reply, Exception):
            raise reply
        if reply.get("type") == "error":
            raise ProtocolError(reply.get("message", ""), ErrorCode(reply.get("code", "bad_request")))
        return reply

    def subscribe(self, pattern: str, since: Optional[int] = None,
                  timeout: Optional[float] = None, join_leave: bool = False) -> Dict[str, Any]:
        """Subscribe (optionally replaying from ``since``); returns the ack.

        With ``join_leave`` (a concrete topic only) the topic's joins and leaves go to
        ``on_join`` and ``on_leave``.
        """
        validate_pattern(pattern)
        frame: Dict[str, Any] = {"type": "subscribe", "topic": pattern}
        if join_leave:
            frame["join_leave"] = True
        if since is not None:
            frame["since"] = since
            with self._lock:
                if pattern in self._epochs:
                    frame["epoch"] = self._epochs[pattern]
                self._last[pattern] = since

        def on_reply(reply: Any) -> None:
            # In the client's thread, before the frames that follow the ack (a replay
            # after a new epoch, live messages) are deduplicated against _last.
            if isinstance(reply, dict) and reply.get("type") == "ack":
                with self._lock:
                    self._subs[pattern] = None
                    if join_leave:
                        self._join_leave.add(pattern)
                    else:
                        self._join_leave.discard(pattern)
                    self._note_ack(pattern, reply, since is None)

        ack = self._request(frame, timeout=timeout, on_reply=on_reply)
        assert ack is not None
        return ack

    def unsubscribe(self, pattern: str, timeout: Optional[float] = None) -> None:
        """Unsubscribe (idempotent)."""
        with self._lock:
            self._subs.pop(pattern, None)
            self._join_leave.discard(pattern)
        self._request({"type": "unsubscribe", "topic": pattern}, timeout=timeout)

    def presence(self, topic: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Who is subscribed to ``topic``: ``{"total": N, "clients": [{"conn", "sub", "joined"}, ...]}``
        (at most 1000 clients listed, N counts all); ProtocolError ``forbidden`` without
        permission to subscribe to it."""
        validate_topic(topic)
        reply = self._request({"type": "presence", "topic": topic}, timeout=timeout)
        assert reply is not None
        return {"total": reply["total"], "clients": reply["clients"]}

    def presence_stats(self, topic: str, timeout: Optional[float] = None) -> Dict[str, int]:
        """How many are subscribed to ``topic``: ``{"clients": N, "users": distinct subs}``."""
        validate_topic(topic)
        reply = self._request({"type": "presence_stats", "topic": topic}, timeout=timeout)
        assert reply is not None
        return {"clients": reply["clients"], "users": reply["users"]}

    @property
    def subscriptions(self) -> List[str]:
        """The patterns this client is subscribed to (acked or granted by its token)."""
        with self._lock:
            return list(self._subs)

    def publish(self, topic: str, data: Any, ack: bool = True,
                timeout: Optional[float] = None) -> Optional[Tuple[int, str]]:
        """Publish ``data``; with ``ack`` waits for the stored position (seq, epoch)."""
        validate_topic(topic)
        reply = self._request({"type": "publish", "topic": topic, "data": data}, wait=ack,
                              timeout=timeout)
        if reply is None:
            return None
        return reply["seq"], reply["epoch"]

    def ping(self, timeout: Optional[float] = None) -> float:
        """Round trip time of a ping, in seconds."""
        start = time.monotonic()
        self._request({"type": "ping"}, timeout=timeout)
        return time.monotonic() - start

    def recv(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message, or None after ``timeout`` seconds; raises once closed and drained.

        None also while the client is reconnecting: ``state`` and ``connected`` tell.
        """
        try:
            item = self._messages.get(timeout=timeout) if timeout != 0 else self._messages.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            self._messages.put(item)  # keep telling later callers
            raise item
        return item

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                msg = self.recv()
            except ConnectionClosed:
                return
            if msg is not None:
                yield msg

    # ------------------------------------------------------------------ receiving
    def _note_ack(self, pattern: str, ack: Dict[str, Any], fresh: bool) -> None:
        """Record a topic ack's position (under _lock)."""
        if "epoch" not in ack:
            return
        old_epoch = self._epochs.get(pattern)
        self._epochs[pattern] = ack["epoch"]
        if fresh or (old_epoch is not None and old_epoch != ack["epoch"]):
            # a fresh subscription starts after the ack; a new numbering starts over
            self._last[pattern] = ack.get("seq", 0) if fresh else 0

    def _run(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            ws = self._ws
            assert ws is not None
            self._pump(ws)
            self._connected.clear()
            if self._closed.is_set():
                break
            self.close_code = ws.close_reason
            self.close_reason = ws.close_message or ""
            if not self.reconnect:
                break
            logger.warning("connection to %s lost (close code %s%s); reconnecting", self.url,
                           self.close_code, ", " + self.close_reason if self.close_reason else "")
            self._set_state("reconnecting")
            self._fail_waiters()
            while not self._closed.is_set():
                delay = min(self.max_backoff, backoff) * (0.5 + random.random() / 2)
                if self._closed.wait(delay):
                    break
                backoff = min(self.max_backoff, backoff * 2)
                try:
                    self._ws = self._dial()
                except HandshakeRefused as exc:
                    if exc.status in (401, 403):
                        # credentials refused (e.g. an expired token): retrying cannot help
                        logger.warning("reconnect to %s refused, giving up: %s", self.url, exc)
                        self.close_reason = str(exc)
                        self._closed.set()
                        break
                    logger.debug("reconnect failed: %s", exc)
                    continue
                except (OSError, ClientError, simple_websocket.ConnectionError) as exc:
                    logger.debug("reconnect failed: %s", exc)
                    continue
                self.reconnects += 1
                backoff = 0.1
                self._resubscribe()
                logger.info("reconnected to %s", self.url)
                self._set_state("connected")
                break
        self._connected.clear()
        self._set_state("closed")
        self._fail_waiters()
        self._put(ConnectionClosed(self.close_code, self.close_reason))

    def _pump(self, ws: _SafeWebSocket) -> None:
        while not self._closed.is_set():
            try:
                text = ws.receive(timeout=0.5)
            except simple_websocket.ConnectionClosed:
                return
            if text is None:
                if not ws.connected:
                    return
                continue
            try:
                obj = parse_json(text, MAX_DEPTH + 1)  # a message's envelope adds a level
            except ValueError:
                logger.warning("undecodable frame from server")
                continue
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "message":
                self._deliver(obj)
            elif kind == "join" or kind == "leave":
                self._event(kind, obj)
            elif kind == "subscribed":
                self._granted(obj)
            elif kind in ("ack", "error", "pong", "presence", "presence_stats") and "id" in obj:
                with self._lock:
                    waiter = self._waiters.pop(obj["id"], None)
                if waiter is not None:
                    self._answer(waiter, obj)
            elif kind == "error":
                logger.warning("server error: %s %s", obj.get("code"), obj.get("message"))

    def _deliver(self, obj: Dict[str, Any]) -> None:
        topic: Any = obj.get("topic")
        seq: Any = obj.get("seq")
        with self._lock:
            last = self._last.get(topic, 0)
            if isinstance(seq, int) and seq <= last:
                return  # seen already (a replay overlapping what arrived live)
            self._last[topic] = seq
        self._put(Message(topic, seq, obj.get("data")))

    def _event(self, kind: str, obj: Dict[str, Any]) -> None:
        callback = self.on_join if kind == "join" else self.on_leave
        if callback is None:
            return
        topic, client = obj.get("topic"), obj.get("client")
        if not (isinstance(topic, str) and isinstance(client, dict)):
            return  # not an event this client understands
        try:
            callback(topic, client)
        except Exception:
            logger.exception("on_%s callback failed", kind)

    def _granted(self, obj: Dict[str, Any]) -> None:
        """A subscription granted by the token, on every connect.

        The server grants it again after a reconnect, from its latest seq: messages
        published meanwhile are not replayed, and ``on_gap`` says when some were missed.
        """
        pattern = obj.get("topic")
        if not isinstance(pattern, str):
            return
        with self._lock:
            known = pattern in self._subs
            self._subs[pattern] = None
            self._granted_subs.add(pattern)
            last = self._last.get(pattern)
            missed = (known and last is not None and obj.get("epoch") == self._epochs.get(pattern)
                      and isinstance(obj.get("seq"), int) and obj["seq"] > last)
            if known and obj.get("epoch") != self._epochs.get(pattern):
                missed = "epoch" in obj
            self._note_ack(pattern, obj, True)
        if missed and self.on_gap is not None:
            self.on_gap(pattern, obj)

    def _put(self, item: Any) -> None:
        while not self._closed.is_set() or isinstance(item, Exception):
            try:
                self._messages.put(item, timeout=0.5)
                return
            except queue.Full:
                if isinstance(item, Exception):
                    return

    def _resubscribe(self) -> None:
        """Send the subscriptions again, each concrete topic from its last seq."""
        ws = self._ws
        assert ws is not None
        with self._lock:
            # concrete topics first: their replays then buffer what a wildcard would
            # otherwise deliver live ahead of them (and move _last past the replay)
            # granted by the token: granted again by the server on connect (no replay)
            patterns = sorted((p for p in self._subs
                               if p not in self._granted_subs or p in self._join_leave), key=is_wildcard)
            positions = {p: (self._last.get(p), self._epochs.get(p)) for p in patterns}
            join_leave = set(self._join_leave)
            # Topics seen only through a wildcard have no position to resume from (no
            # since, no epoch): forget their last seq, or a new numbering (a restarted
            # memory store) would be dropped as "seen already" until it passed the old one.
            for topic in [t for t in self._last if t not in self._subs or is_wildcard(t)]:
                del self._last[topic]
        self._connected.set()
        for pattern in patterns:
            frame: Dict[str, Any] = {"type": "subscribe", "topic": pattern}
            if pattern in join_leave:
                frame["join_leave"] = True
            since, epoch = positions[pattern]
            if not is_wildcard(pattern) and since is not None and pattern not in self._granted_subs:
                frame["since"] = since
                if epoch is not None:
                    frame["epoch"] = epoch
            self._send_async(frame, functools.partial(self._resubscribed, pattern, frame))
        if self.on_reconnect is not None:
            self.on_reconnect()

    def _send_async(self, frame: Dict[str, Any], callback: Callable[[Any], None]) -> None:
        """Send a request from the client's thread; ``callback`` gets the reply there."""
        ident = next(self._ids)
        frame["id"] = ident
        with self._lock:
            self._waiters[ident] = [None, None, callback]
        try:
            assert self._ws is not None
            self._ws.send(encode_json(frame))
        except (simple_websocket.ConnectionClosed, OSError):
            with self._lock:
                self._waiters.pop(ident, None)

    def _resubscribed(self, pattern: str, frame: Dict[str, Any], reply: Any) -> None:
        if not isinstance(reply, dict):
            return  # connection lost again; the next reconnect resubscribes
        if reply.get("type") == "error":
            if reply.get("code") == "bad_request" and "since" in frame:
                # the server's history starts over (a since ahead of it): plain subscribe
                with self._lock:
                    self._last[pattern] = 0
                retry = {"type": "subscribe", "topic": pattern}
                self._send_async(retry, functools.partial(self._resubscribed, pattern, retry))
                if self.on_gap is not None:
                    self.on_gap(pattern, reply)
            else:
                logger.warning("resubscribe to %s refused: %s", pattern, reply.get("message"))
            return
        with self._lock:
            self._note_ack(pattern, reply, "since" not in frame)
        if reply.get("recovered") is False and self.on_gap is not None:
            self.on_gap(pattern, reply)

    def _fail_waiters(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            self._answer(waiter, ConnectionClosed(self.close_code, "connection lost before the answer"))

    @staticmethod
    def _answer(waiter: List[Any], reply: Any) -> None:
        if waiter[0] is None:
            waiter[2](reply)
        else:
            if waiter[2] is not None:
                waiter[2](reply)
            waiter[1] = reply
            waiter[0].set()
