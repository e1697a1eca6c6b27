"""The broker inside a WSGI application: the WebSocket endpoint on the app's own routes.

A ``Broker`` is a ``Server`` without a listening socket: one hub, one writer
thread and one store in the application's process. Its endpoint runs in the WSGI
server's request thread (Werkzeug's threaded server, gunicorn's ``gthread``
worker): it takes the raw socket from the environ the way simple-websocket
does, runs the standalone server's upgrade checks and 101 handshake, then the
same reader as the standalone server until the connection ends. The writer
thread writes to the socket, with the same outbox and slow-consumer rules.

Flask (``websocket=True``: Werkzeug's router sends upgrade requests only to such rules)::

    broker = Broker(store="memory").start()

    @app.route("/ws", websocket=True)
    def ws():
        return broker.handle(request.environ, app.response_class)

    # or, with the standalone's 426 answer for a plain GET as well:
    broker.add_flask_route(app, "/ws")

    @app.post("/say")
    def say():
        broker.publish("news", request.form["text"])
        return "", 204

Any WSGI app (Django included)::

    application = broker.mount(application, path="/ws")
"""

from __future__ import annotations

import functools
import io
import logging
import os
import signal
import socket
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type
from urllib.parse import quote

from .config import Config
from .envelope import encode_json
from .errors import ErrorCode
from .http import HttpError, negotiate_upgrade
from .server import Server
from .store import MessageStore

logger = logging.getLogger(__name__)

__all__ = ["Broker", "socket_from_environ"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 405: "Method Not Allowed",
            426: "Upgrade Required", 500: "Internal Server Error", 503: "Service Unavailable"}


def socket_from_environ(environ: Dict[str, Any]) -> Tuple[Optional[socket.socket], str]:
    """(socket, mode) of a WSGI request, found where simple-websocket looks for it.

    The lookup is simple-websocket's own (``simple_websocket.Server.__init__``);
    only its handshake and background thread are left out. ``(None, "unknown")``
    when the WSGI server does not expose its socket.
    """
    try:
        probe = _SocketProbe(environ)
    except RuntimeError:  # "Cannot obtain socket from WSGI environment."
        return None, "unknown"
    except Exception:  # a simple-websocket that works differently: look up the two common keys
        logger.debug("simple-websocket's socket lookup failed; using the environ keys", exc_info=True)
        for key, mode in (("werkzeug.socket", "werkzeug"), ("gunicorn.socket", "gunicorn")):
            if environ.get(key) is not None:
                return environ[key], mode
        return None, "unknown"
    return probe.sock, probe.mode


@functools.lru_cache(maxsize=None)
def _make_probe() -> Type[Any]:
    import simple_websocket.ws as sw

    class _NoHandshake(sw.Base):
        """Sits between ``simple_websocket.Server`` and ``Base``: keeps the socket, does nothing else."""

        def __init__(self, sock: Any = None, *args: Any, **kwargs: Any) -> None:
            self.sock = sock

    class Probe(sw.Server, _NoHandshake):
        """``simple_websocket.Server.__init__`` finds the socket; ``_NoHandshake`` stops it there."""

    return Probe


def _SocketProbe(environ: Dict[str, Any]) -> Any:
    return _make_probe()(environ)


def _headers(environ: Dict[str, Any]) -> List[Tuple[bytes, bytes]]:
    """The request headers as h11 gives them: (lower-case name, value) bytes."""
    out = []
    for key, value in environ.items():
        if key.startswith("HTTP_") and isinstance(value, str):
            out.append((key[5:].replace("_", "-").lower().encode("latin-1"), value.encode("latin-1")))
    return out


def _target(environ: Dict[str, Any]) -> bytes:
    raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if isinstance(raw, str) and raw.startswith("/"):
        return raw.encode("latin-1")
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;=,:@")
    query = environ.get("QUERY_STRING", "")
    return (path + ("?" + query if query else "")).encode("latin-1") or b"/"


def _buffered_input(environ: Dict[str, Any], sock: socket.socket, mode: str) -> bytes:
    """Bytes the WSGI server read past the request head (frames sent right after it)."""
    stream = environ.get("wsgi.input")
    if mode != "werkzeug" or not isinstance(stream, io.BufferedReader):
        return b""
    try:
        sock.setblocking(False)
        try:
            return stream.read1(65536) or b""
        finally:
            sock.setblocking(True)
    except (OSError, ValueError):
        return b""


def _end_of_hijacked_request(mode: str) -> List[bytes]:
    """End a request whose socket was taken over, so that the WSGI server writes nothing."""
    if mode == "werkzeug":
        # the dev server takes this as a dropped connection: nothing written, nothing logged
        raise ConnectionError("WebSocket connection ended")
    if mode == "gunicorn":
        raise StopIteration()  # gunicorn then closes the connection without an answer
    return []


class _Mounted:
    """A mounted connection in ``Server._threads``: ``shutdown()`` resets its socket and joins this."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()

    def join(self, timeout: Optional[float] = None) -> None:
        self.done.wait(timeout)


class Broker(Server):
    """A wsbroadcast broker without a listening socket, serving WebSockets inside a WSGI app.

    Same settings as ``Server`` (``Config`` fields as keywords). ``start()`` runs the
    writer and retention threads; ``shutdown()`` closes every mounted connection with
    1001 and joins them. ``publish()`` may be called from any thread, e.g. a view.

    The ``Host`` check (PROTOCOL.md section 8) applies only with ``allowed_hosts``
    set: the broker listens on nothing, the WSGI server does; the app's own Host
    check (Django's ``ALLOWED_HOSTS``, Flask's ``TRUSTED_HOSTS``) covers its pages too.
    """

    def __init__(self, config: Optional[Config] = None, message_store: Optional[MessageStore] = None,
                 **settings: Any) -> None:
        host = settings.pop("host", "127.0.0.1")
        port = settings.pop("port", 0)
        super().__init__(host, port, config=config, message_store=message_store, **settings)
        self._response_classes: Dict[type, type] = {}
        #: the thread a signal started to shut down (see shutdown_on_signal); shutdown() joins it
        self._signal_shutdown: Optional[threading.Thread] = None

    def start(self, listen: bool = False) -> "Broker":
        """Start the writer and retention threads (no listening socket unless ``listen``)."""
        super().start(listen=listen)
        return self

    def shutdown_on_signal(self, signum: int = signal.SIGTERM) -> None:
        """Shut down (1001 to every client) when the process gets ``signum``, then do as before.

        For WSGI servers whose workers stop on a signal but wait for running requests
        first (gunicorn's ``gthread`` worker on SIGTERM waits up to its graceful
        timeout, and every WebSocket is a running request): the connections end at
        once, and the server's own handler still runs. Call it from the main thread
        once the server has set up its signals (gunicorn: when the app is loaded).
        """
        previous = signal.getsignal(signum)

        def on_signal(number: int, frame: Any) -> None:
            # shutdown() waits for the connections to close: not in a signal handler
            if self._signal_shutdown is None:
                thread = threading.Thread(target=self.shutdown, name="wsbroadcast-shutdown", daemon=True)
                self._signal_shutdown = thread
                thread.start()
            if callable(previous):
                previous(number, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        signal.signal(signum, on_signal)

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Close every connection with 1001, stop all threads and join them (also the thread
        a signal started to do so)."""
        super().shutdown(timeout)
        thread = self._signal_shutdown
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.config.shutdown_timeout if timeout is None else timeout)

    # ------------------------------------------------------------------ the endpoint
    def serve(self, environ: Dict[str, Any]) -> Tuple[Optional[HttpError], str]:
        """Serve one WebSocket request in the calling (request) thread.

        Returns ``(error, mode)``: ``error`` is the HTTP answer to give instead of an
        upgrade (403, 401, 426, ...), or None when the connection was upgraded, has
        been served and has ended; the request must then end without output, which
        ``end_request(mode)`` does.
        """
        if environ.get("REQUEST_METHOD", "GET") != "GET":
            return HttpError(ErrorCode.METHOD_NOT_ALLOWED, "use GET with an upgrade", [("Allow", "GET")]), ""
        if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return HttpError(ErrorCode.UPGRADE_REQUIRED, "this endpoint speaks WebSocket",
                             [("Upgrade", "websocket")]), ""
        if not self._started or self.shutting_down:
            return HttpError(ErrorCode.UNAVAILABLE, "broker is not running"), ""
        sock, mode = socket_from_environ(environ)
        if sock is None or mode not in ("werkzeug", "gunicorn"):
            logger.error("cannot take the WebSocket's socket from this WSGI server (%s)",
                         environ.get("SERVER_SOFTWARE", "unknown"))
            if sock is not None:  # eventlet, gevent: green threads, not supported
                logger.error("%s servers are not supported: the writer needs OS threads and sockets", mode)
                if mode == "gevent":
                    sock.close()  # simple-websocket's lookup made a dup() of it
            err = HttpError(ErrorCode.INTERNAL, "WebSockets are not supported on this server")
            err.status = 500
            return err, ""
        ip = environ.get("REMOTE_ADDR") or "?"
        try:
            port = int(environ.get("REMOTE_PORT") or 0)
        except ValueError:
            port = 0
        addr = (ip, port)
        try:
            upgrade, accept = negotiate_upgrade(self, _headers(environ), _target(environ), ip,
                                                environ.get("wsgi.url_scheme"))
        except HttpError as err:
            return err, mode
        # from here the socket is ours: the WSGI server must not write on it again
        cfg = self.config
        handle = _Mounted()
        self._threads[handle] = sock  # type: ignore[index]
        try:
            try:
                sock.settimeout(cfg.handshake_timeout)
                upgrade.trailing = _buffered_input(environ, sock, mode)
                sock.sendall(accept)
            except OSError as exc:
                logger.debug("handshake with %s failed: %s", ip, exc)
                if upgrade.refuse is None:
                    self._release(ip)
                return None, mode
            self.tune_socket(sock)
            try:
                self.run_connection(sock, addr, upgrade)
            except OSError as exc:
                logger.debug("connection from %s ended: %s", ip, exc)
            except Exception:
                logger.exception("mounted connection of %s failed", ip)
        finally:
            try:
                # the reader closed the socket, but the WSGI server may hold a reference to it
                # (Werkzeug's rfile): make sure it sees the end, never a request to answer
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
            handle.done.set()
            self._threads.pop(handle, None)  # type: ignore[call-overload]
            if self._stopping:
                with self._threads_lock:
                    self._threads_lock.notify_all()
        return None, mode

    @staticmethod
    def end_request(mode: str) -> List[bytes]:
        """What a WSGI app returns (or raises) after a served WebSocket; see ``serve``."""
        return _end_of_hijacked_request(mode)

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """The endpoint as a WSGI application (mount it on any path)."""
        error, mode = self.serve(environ)
        return _WsgiAnswer(error, mode)(environ, start_response)

    def handle(self, environ: Dict[str, Any], response_class: Optional[type] = None) -> Any:
        """Serve a WebSocket request from a view; returns the view's response.

        ``response_class`` is the framework's (Flask: ``app.response_class``, any
        Werkzeug ``Response`` subclass). Without one, a WSGI callable is returned.
        """
        error, mode = self.serve(environ)
        if response_class is None:
            return _WsgiAnswer(error, mode)
        if error is None:
            cls = self._response_classes.get(response_class)
            if cls is None:
                cls = self._response_classes[response_class] = _hijacked_class(response_class)
            resp = cls()
            resp.wsbroadcast_mode = mode
            return resp
        status, headers, body = _error_parts(error)
        return response_class(body, status=status, headers=headers)

    def add_flask_route(self, app: Any, rule: str = "/ws", endpoint: str = "wsbroadcast") -> None:
        """Serve the endpoint at ``rule`` of a Flask app or blueprint.

        Registers the rule for WebSocket requests (``websocket=True``) and for plain
        GETs, which are answered 426 as by the standalone server.
        """
        from flask import current_app, request

        def view() -> Any:
            return self.handle(request.environ, current_app.response_class)

        app.add_url_rule(rule, endpoint, view, methods=["GET"], websocket=True)
        app.add_url_rule(rule, endpoint, view, methods=["GET"])

    def mount(self, app: WSGIApp, path: str = "/ws") -> WSGIApp:
        """A WSGI app that serves the endpoint at ``path`` and passes everything else to ``app``."""

        def dispatch(environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "") == path:
                return self(environ, start_response)
            return app(environ, start_response)

        return dispatch


class _WsgiAnswer:
    """The WSGI callable ``handle`` returns without a response class."""

    def __init__(self, error: Optional[HttpError], mode: str) -> None:
        self.error = error
        self.mode = mode

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self.error is None:
            return _end_of_hijacked_request(self.mode)
        status, headers, body = _error_parts(self.error)
        start_response(status, headers)
        return [body]


def _error_parts(error: HttpError) -> Tuple[str, List[Tuple[str, str]], bytes]:
    body = encode_json({"error": str(error.code), "message": error.message}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store")]
    headers.extend(error.headers)
    if error.status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    return "%d %s" % (error.status, _REASONS.get(error.status, "Error")), headers, body


def _hijacked_class(base: type) -> type:
    """A subclass of a framework's response class that ends a hijacked request when called."""

    class HijackedResponse(base):  # type: ignore[misc, valid-type]
        wsbroadcast_mode = ""

        def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            return _end_of_hijacked_request(self.wsbroadcast_mode)

    HijackedResponse.__name__ = HijackedResponse.__qualname__ = "WsBroadcast" + base.__name__
    return HijackedResponse
