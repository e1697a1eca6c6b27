"""The server: listening socket, accept loop, connection threads, and the embedding API.

In the spirit of ``socketserver``::

    with wsbroadcast.Server("127.0.0.1", port=0) as srv:   # started in background threads
        srv.publish("news", {"title": "hello"})
        print(srv.port)

``serve_forever()`` runs until ``shutdown()``; ``start()`` returns at once.
"""

from __future__ import annotations

import errno
import html
import logging
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from .admission import OVER_LIMIT, PendingTable, Slot, TurnAway, open_fds, pending_per_ip, plan_limits
from .auth import Authenticator, install_redaction
from .broker import Broker, LocalBroker
from .config import Config, human_bytes
from .connection import Connection, TokenBucket
from .envelope import PLAIN, encode_json
from .errors import CloseCode, ConfigError, ServerClosed, StoreError, StoreInUse
from .futexhash import ensure_slots as ensure_futex_slots
from .hosts import HostRule, is_loopback
from .http import HttpSession, Upgrade, load_demo_page
from .hub import Hub
from .idlepark import IdlePark, make_park
from .logutil import RateLimitedLog
from .metrics import Metrics
from .reader import Reader
from .store import MessageStore, RetentionTrimmer, open_store
from .tls import TLSStream
from .writer import CLOSE_ALL, Writer

logger = logging.getLogger(__name__)

#: resource errors of accept(): the listener pauses, growing from the first to the last
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: the listen backlog (the kernel caps it at net.core.somaxconn): a burst of reconnects
#: waits there rather than having SYNs dropped, which a client retries only after a second
_BACKLOG = 4096
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
# conditions a client can cause at will: logged at most once per interval, with a count
_accept_failed = RateLimitedLog(logger)
_turned_away = RateLimitedLog(logger)
_no_thread = RateLimitedLog(logger)


def _redact_library_logs() -> None:
    """Redact tokens and keys in every record of the library's loggers, embedded or not."""
    for name in list(logging.root.manager.loggerDict):
        if name == "wsbroadcast" or name.startswith("wsbroadcast."):
            install_redaction(logging.getLogger(name))


def _tls_context(certfile: str, keyfile: Optional[str]) -> ssl.SSLContext:
    """A server TLS context; ConfigError when the certificate or key cannot be loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        raise ConfigError("cannot load the TLS certificate %s: not a PEM certificate matching its key; "
                          "give PEM files with --certfile and --keyfile" % certfile) from exc
    except OSError as exc:
        reason = "%s: %s" % (exc.filename, exc.strerror) if exc.filename else exc.strerror or str(exc)
        raise ConfigError("cannot load the TLS certificate %s (%s); give PEM files with --certfile "
                          "and --keyfile" % (certfile, reason)) from exc
    return ctx


def _store_error(spec: str, exc: StoreError) -> ConfigError:
    """A store that could not be opened, in words, with what to do."""
    if isinstance(exc, StoreInUse):
        return ConfigError("%s; stop that server or give another file with --store" % exc)
    problem = str(exc)
    if not spec.startswith("file:"):
        folder = os.path.dirname(os.path.abspath(spec))
        if os.path.isdir(spec):
            problem = "--store %s is a folder" % spec
        elif not os.path.isdir(folder):
            problem = "cannot create the store %s: the folder %s does not exist" % (spec, folder)
    return ConfigError("%s; give a writable SQLite file with --store, or --store memory" % problem)


def listen_socket(host: str, port: int, reuse_port: bool = False, listen: bool = True,
                  prepare: Optional[Callable[[socket.socket], Any]] = None) -> socket.socket:
    """A non-blocking socket listening on (host, port); ConfigError saying what to change.

    ``reuse_port``: bound with SO_REUSEPORT, so that other processes of this user bind
    the same port and the kernel spreads connections over their listeners.
    ``listen=False``: bound only (holds the port, gets no connections).
    ``prepare``: called with the bound socket before it listens (no connection yet).
    """
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("this system has no SO_REUSEPORT: run one process per port (leave out --workers)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _listen_error(host, port, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if prepare is not None:
            prepare(sock)
        if listen:
            sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _listen_error(host, port, exc) from exc
    return sock


def check_listen(host: str, port: int) -> None:
    """Raise ConfigError now if (host, port) cannot be listened on (before anything is created)."""
    listen_socket(host, port).close()


def _listen_error(host: str, port: int, exc: OSError) -> ConfigError:
    if isinstance(exc, socket.gaierror):
        return ConfigError("cannot listen on host %r: %s; give an address or name with --host "
                           "(127.0.0.1 for this machine only, 0.0.0.0 for all)" % (host, exc.strerror or exc))
    if exc.errno == errno.EADDRINUSE:
        return ConfigError("port %d is in use (another server?); pick one with --port" % port)
    if exc.errno == errno.EACCES:
        return ConfigError("port %d needs privileges this user lacks; pick one from 1024 up with --port"
                           % port)
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError("cannot listen on %s: not an address of this machine; give one with --host "
                           "(127.0.0.1 for this machine only, 0.0.0.0 for all)" % host)
    return ConfigError("cannot listen on %s port %d: %s; check --host and --port"
                       % (host, port, exc.strerror or exc))


_STARTED = threading.Event()
_STARTED.set()


class _StartFlag(threading.Event):
    """A connection thread's start-up flag, which ``Thread.start`` does not wait on."""

    def wait(self, timeout: Optional[float] = None) -> bool:
        return True  # (see _ConnectionThread.join for a real wait)


class _ConnectionThread(threading.Thread):
    """A connection's thread: started without waiting for it to run, lighter once running.

    ``Thread.start`` blocks until the new thread has run its first steps, which costs
    the accept loop two hand-overs of the GIL per connection (a storm of connections
    takes turns twice over). Here ``start`` returns at once; ``join`` and ``is_alive``
    know a thread started but not running yet. Once it runs, its start-up flag (an
    Event: a Condition, a lock and a deque, about 1.2 KiB, only ever read as set from
    then on) is replaced by one shared flag that is set: with thousands of idle
    connections that is a good part of what each costs.
    """

    _launched = False

    def start(self) -> None:
        self._started.__class__ = _StartFlag
        super().start()
        self._launched = True

    def run(self) -> None:
        self._started = _STARTED  # (set before run() is called)
        super().run()

    def join(self, timeout: Optional[float] = None) -> None:
        flag = self._started
        if self._launched and not flag.is_set():  # started, not running yet
            deadline = None if timeout is None else time.monotonic() + timeout
            if not threading.Event.wait(flag, timeout):
                return
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
        super().join(timeout)

    def is_alive(self) -> bool:
        if self._launched and not self._started.is_set():
            return True  # started, not running yet
        return super().is_alive()


class Server:
    """A wsbroadcast server: one port, HTTP and WebSocket, one writer thread."""

    #: the class that runs each WebSocket connection (a subclass may handle messages its own way)
    reader_class = Reader

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, config: Optional[Config] = None,
                 message_store: Optional[MessageStore] = None, **settings: Any) -> None:
        base = config or Config()
        self.config = base.replace(host=host, port=port, **settings)  # ConfigError when out of range
        cfg = self.config
        # settings that can be wrong are checked before the store is opened (or created)
        try:
            self.auth = Authenticator(secret=cfg.secret, public_key=cfg.public_key, api_key=cfg.api_key)
        except ValueError as exc:
            raise ConfigError("%s; check --public-key, --secret and --api-key" % exc) from exc
        #: the Host names served; made loopback-only in start() when the bound address is loopback
        self.host_rule = HostRule(cfg.allowed_hosts)
        self.scheme = "https" if cfg.certfile else "http"
        self._ssl: Optional[ssl.SSLContext] = None
        if cfg.certfile:
            self._ssl = _tls_context(cfg.certfile, cfg.keyfile)
        self.store: Optional[MessageStore] = None
        if (cfg.store == "memory" and message_store is None and not cfg.redis_url
                and cfg.memory_store_bytes < cfg.max_message_size):
            raise ConfigError("--memory-store-bytes %s is below --max-message-size %s: give at least that"
                              % (human_bytes(cfg.memory_store_bytes), human_bytes(cfg.max_message_size)))
        if cfg.redis_url:
            try:
                from .broker_redis import RedisBroker  # the optional extra wsbroadcast[redis]
            except ImportError as exc:
                raise ConfigError("--redis needs the redis package: pip install 'wsbroadcast[redis]' "
                                  "(or pip install redis)") from exc
            from .broker_cluster import ClusterBroker, is_cluster_url

            cluster = is_cluster_url(cfg.redis_url)
            try:
                self.broker: Broker = (ClusterBroker if cluster else RedisBroker)(
                    cfg.redis_url, history_size=cfg.history_size, history_ttl=cfg.history_ttl,
                    presence_ttl=cfg.presence_ttl)
            except ValueError as exc:  # ConfigError from the URL: it says what to give
                raise ConfigError("--redis: %s" % exc) from exc
        else:
            # opened (created, locked) by start(), once the port is bound
            self.store = message_store if message_store is not None else open_store(
                cfg.store, cfg.history_size, cfg.history_ttl, full_sync=cfg.store_full_sync,
                defer_open=True, memory_bytes=cfg.memory_store_bytes)
            self.broker = LocalBroker(self.store)
        self.writer = Writer(cfg.queue_size, cfg.close_timeout, cfg.ping_interval, cfg.ping_timeout,
                             compression_threshold=cfg.compression_threshold)
        self.hub = Hub(self.broker, self.writer, cfg.max_subscriptions)
        self.metrics = Metrics(self)
        _redact_library_logs()
        self.shutting_down = False
        self.started_at = 0.0
        self.accepted = 0  # TCP connections accepted (accept thread only)
        self.upgraded = 0  # WebSocket connections admitted (under _count_lock)
        self._listener: Optional[socket.socket] = None
        self._trimmer: Optional[RetentionTrimmer] = None
        self._park: Optional[IdlePark] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._stopped = threading.Event()
        self._started = False
        # _count_lock guards: _open (admitted WebSocket connections), _per_ip, upgraded, _http_buckets
        self._count_lock = threading.Lock()
        self._open = 0
        #: WebSocket connections at most, and connections not upgraded at most: the settings,
        #: lowered at start to what the open-file limit holds
        self.max_connections = cfg.max_connections
        self.max_pending = cfg.max_pending
        #: connections accepted and not upgraded (created at start, when listening)
        self.pending: Optional[PendingTable] = None
        self._turn_away: Optional[TurnAway] = None
        self._per_ip: Dict[str, int] = {}
        self._http_buckets: Dict[str, TokenBucket] = {}
        # _threads_lock: notified (while shutting down) when a connection ends; shutdown() waits on
        # it. _threads (connection thread -> its socket) is changed and read only by single dict
        # operations (atomic), without the lock: a lock taken by every ending thread convoys
        # when thousands end at once (each waits for the GIL behind all the others)
        self._threads_lock = threading.Condition()
        self._threads: Dict[threading.Thread, socket.socket] = {}
        self._demo: Optional[bytes] = None
        #: the accepted sockets have tune_socket's options from the listener already
        self._tuned_by_listener = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._listener is None:
            raise ServerClosed("server is not started")
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        """The WebSocket URL of this server."""
        scheme = "wss" if self._ssl else "ws"
        return "%s://%s:%d%s" % (scheme, self.config.host, self.port, self.config.path)

    @property
    def http_url(self) -> str:
        """The base HTTP URL of this server."""
        return "%s://%s:%d" % (self.scheme, self.config.host, self.port)

    def start(self, listen: bool = True) -> "Server":
        """Bind, listen and run the accept loop and the writer in background threads.

        With ``listen=False`` no socket is bound and no accept loop runs: the broker
        (hub, writer, store) serves connections handed to ``run_connection``, as
        ``wsbroadcast.wsgi.Broker`` does.

        The store is opened (and locked) only after the port is bound. Raises
        ConfigError when the port cannot be bound or the store cannot be opened.
        """
        if self._started:
            return self
        cfg = self.config
        if listen:
            self._listener = listen_socket(cfg.host, cfg.port, reuse_port=cfg.reuse_port,
                                           prepare=self._tune_listener)
            self.host_rule = self.host_rule.with_loopback_only(
                is_loopback(self._listener.getsockname()[0]))
        try:
            limits = plan_limits(cfg.max_connections, cfg.max_pending if listen else 0, open_fds())
            if limits.raised_from:
                logger.info("open-file limit raised from %d to %d for the connection limits",
                            limits.raised_from, limits.nofile)
            if limits.note:
                logger.warning("%s", limits.note)
            self.max_connections = limits.max_connections
            self.max_pending = limits.max_pending
            if self.store is not None:
                try:
                    self.store.open()
                except StoreError as exc:
                    raise _store_error(getattr(self.store, "path", cfg.store), exc) from exc
        except ConfigError:
            if self._listener is not None:  # not started: the port is free again
                self._listener.close()
                self._listener = None
            raise
        self._started = True
        self.started_at = time.monotonic()
        if cfg.thread_stack_size:
            try:
                threading.stack_size(cfg.thread_stack_size)
            except (ValueError, RuntimeError):
                logger.warning("cannot set thread stack size to %d", cfg.thread_stack_size)
        # a thread per connection: the kernel's futex table sized for as many (Linux 6.16+)
        ensure_futex_slots(self.max_connections + self.max_pending + 64)
        self.writer.start()
        self._park = make_park(cfg.idle_park)
        if self.store is not None:
            self._trimmer = RetentionTrimmer(self.store, step=self.hub.trim_step)
            self._trimmer.start()
        if listen:
            self.pending = PendingTable(self.max_pending, pending_per_ip(cfg.max_connections_per_ip))
            self._turn_away = TurnAway(answer=self._ssl is None)
            sel = selectors.DefaultSelector()
            listener = self._listener
            assert listener is not None  # bound above
            sel.register(listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            self._accept_thread = threading.Thread(target=self._accept_loop, args=(sel,),
                                                   name="wsbroadcast-accept", daemon=True)
            self._accept_thread.start()
            logger.info("listening on %s", self.url)
        else:
            logger.info("broker ready for connections handed over by the web application "
                        "(no port of its own)")
        return self

    def serve_forever(self) -> None:
        """Start if needed and block until ``shutdown()`` has finished."""
        self.start()
        while not self._stopped.wait(0.5):
            pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self, timeout: Optional[float] = None) -> None:
        """Close every connection with 1001, stop all threads and join them."""
        if self._stopping:
            self._stopped.wait(timeout)
            return
        self._stopping = True
        self.shutting_down = True
        if not self._started:  # nothing runs: only the wake-up sockets to give back
            self.writer.stop()
            self._wake_r.close()
            self._wake_w.close()
            self._stopped.set()
            return
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        logger.info("shutting down")
        self.writer.put(((CLOSE_ALL, CloseCode.GOING_AWAY, "server shutting down"),))
        with self._threads_lock:
            while self._open and time.monotonic() < deadline:
                self._threads_lock.wait(max(0.01, deadline - time.monotonic()))
        # stop accepting, then end whatever is left (handshakes, keep-alive HTTP)
        self._wake_w.send(b"\0")
        if self._accept_thread is not None:
            self._accept_thread.join(5.0)
        leftover = list(self._threads.items())
        for _thread, sock in leftover:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _sock in leftover:
            thread.join(max(0.1, deadline + 5.0 - time.monotonic()))
        self.writer.stop()
        if self._park is not None:
            self._park.stop(5.0)
        if self._trimmer is not None:
            self._trimmer.stop(5.0)
        self.broker.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._stopped.set()
        logger.info("stopped")

    # ------------------------------------------------------------------ accept
    def _accept_loop(self, sel: selectors.BaseSelector) -> None:
        listener = self._listener
        turn_away = self._turn_away
        assert listener is not None and turn_away is not None and self.pending is not None
        # what socket.accept() does, without turning the listener's family and type into
        # enums again for every connection
        accept = listener._accept  # type: ignore[attr-defined]
        family, kind, proto = listener.family, listener.type, listener.proto
        backoff = 0.0  # the listener's pause after a resource error (0: none yet)
        resume_at = 0.0  # when a paused listener is watched again (0: not paused)
        try:
            while True:
                timeout = turn_away.poll()
                if resume_at:
                    wait = max(0.0, resume_at - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                events = sel.select(timeout)
                if any(key.fileobj is self._wake_r for key, _ in events):
                    return
                if resume_at:
                    if time.monotonic() < resume_at:
                        continue
                    resume_at = 0.0
                    sel.register(listener, selectors.EVENT_READ)
                elif not events:
                    continue
                for _ in range(64):
                    try:
                        fd, addr = accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                            continue  # that client is gone (or a firewall said no): next one
                        if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                            raise
                        # no descriptor (or memory) for now: turn the waiting clients away rather
                        # than leave them in the backlog, and pause the listener for real
                        if exc.errno in (errno.EMFILE, errno.ENFILE) and not self.pending.evict_idle():
                            turn_away.refuse_without_fd(listener)
                        backoff = min(_BACKOFF_MAX, backoff * 2 if backoff else _BACKOFF_FIRST)
                        _accept_failed.error("accept failed: %s; pausing accepts for %.2f s",
                                             exc.strerror or exc, backoff)
                        sel.unregister(listener)
                        resume_at = time.monotonic() + backoff
                        break
                    backoff = 0.0
                    self.accepted += 1
                    self._admit_tcp(socket.socket(family, kind, proto, fd), addr)
        finally:
            sel.close()
            turn_away.close()

    def _admit_tcp(self, sock: socket.socket, addr: Tuple[str, int]) -> None:
        """A connection just accepted: its own thread, or a 503 when there is no room."""
        assert self.pending is not None and self._turn_away is not None
        slot, why = self.pending.take(sock, addr[0])
        if slot is None and why == OVER_LIMIT and self.pending.wait_room():
            slot, why = self.pending.take(sock, addr[0])  # a burst of connections waits its turn
        if slot is None:
            _turned_away.warning("turning away a connection from %s: %s", addr[0], why)
            self._turn_away.refuse(sock, why)
            return
        if sock.gettimeout() is not None:  # (a default timeout set by the application)
            sock.setblocking(True)
        thread = _ConnectionThread(target=self._handle, args=(sock, addr, slot),
                                   name="wsbroadcast-conn-%s:%s" % (addr[0], addr[1]), daemon=True)
        self._threads[thread] = sock
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a new thread
            _no_thread.error("cannot start a connection thread: %s", exc)
            self._threads.pop(thread, None)
            self.pending.release(slot)
            self._turn_away.refuse(sock)

    def _handle(self, sock: socket.socket, addr: Tuple[str, int], slot: Slot) -> None:
        cfg = self.config
        pending = self.pending
        assert pending is not None
        handed = False  # the socket went to run_connection, which sees it closed
        try:
            if not self._tuned_by_listener:
                self.tune_socket(sock)
            stream: Any = sock
            tls = None
            if self._ssl is not None:
                tls = stream = TLSStream(sock, self._ssl)
                try:
                    tls.handshake(cfg.handshake_timeout)
                except (OSError, ssl.SSLError) as exc:
                    logger.debug("TLS handshake with %s failed: %s", addr[0], exc)
                    return
            upgrade = self._serve_http(stream, addr, slot)
            if upgrade is None:
                return
            if upgrade.refuse is None:
                pending.release(slot)  # counted as a WebSocket connection from here
            handed = True
            self.run_connection(sock, addr, upgrade, tls)
        except OSError as exc:
            logger.debug("connection from %s ended: %s", addr[0], exc)
        except Exception:
            logger.exception("connection thread for %s failed", addr[0])
        finally:
            pending.release(slot)  # before the socket is closed: an eviction may shut it down till then
            if not handed:
                try:
                    sock.close()
                except OSError:
                    pass
            self._threads.pop(threading.current_thread(), None)
            if self._stopping:  # shutdown() waits for the threads to end
                with self._threads_lock:
                    self._threads_lock.notify_all()

    def _serve_http(self, stream: Any, addr: Tuple[str, int], slot: Slot) -> Optional[Upgrade]:
        """The connection's HTTP requests up to its upgrade (None: it ended without one).

        The HTTP session (h11 state, buffers) is dropped on return: an upgraded
        connection keeps none of it.
        """
        pending = self.pending
        assert pending is not None
        session = HttpSession(self, stream, addr)
        session.on_wait = lambda waiting: pending.idle(slot, waiting)
        return session.run()

    def run_connection(self, sock: socket.socket, addr: Tuple[str, int], upgrade: Upgrade,
                       tls: Any = None) -> None:
        """Run an upgraded WebSocket connection in the calling thread until it ends.

        The reader owns the socket from here; when it ends, the writer lets a close
        frame out and closes the socket, and this returns. The connection counted by
        ``admit`` (unless ``upgrade.refuse``) is released at the end.
        """
        cfg = self.config
        claims = upgrade.claims
        try:
            try:
                conn = Connection(
                    sock, addr, upgrade.kind, claims=claims, max_outbox=cfg.max_outbox,
                    rate=(TokenBucket(cfg.max_publish_rate, cfg.publish_burst or max(1.0, cfg.max_publish_rate))
                          if cfg.max_publish_rate > 0 else None),
                    expires=getattr(claims, "exp", None), tls=tls,
                    deflate=upgrade.deflate.server_bits if upgrade.deflate is not None else 0)
                reader = self.reader_class(conn, upgrade.extensions, self.hub, self.writer,
                                           cfg.max_message_size, cfg.close_timeout,
                                           max_message_frames=cfg.max_message_frames, park=self._park)
            except BaseException:
                sock.close()  # no reader to hand it to the writer
                raise
            greeting = upgrade.greeting  # (encrypted by the writer, like the frames, over TLS)
            reader.run(upgrade.trailing, upgrade.refuse,
                       on_open=(lambda c: self._on_open(c, greeting)) if greeting else self._on_open,
                       closing=lambda: self.shutting_down, greeting=greeting)
        finally:
            if upgrade.refuse is None:
                self._release(addr[0])

    def _tune_listener(self, sock: socket.socket) -> None:
        """Linux gives an accepted socket the listener's TCP_NODELAY and SO_SNDBUF: set there
        before it listens (so that no connection is queued untuned), they cost no system
        calls per connection."""
        self._tuned_by_listener = sys.platform.startswith("linux") and self._tune(sock)

    def tune_socket(self, sock: socket.socket) -> None:
        """Options every client socket gets: no Nagle delay, a capped send buffer."""
        self._tune(sock)

    def _tune(self, sock: socket.socket) -> bool:
        """``tune_socket``; False when an option could not be set."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.socket_sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.config.socket_sndbuf)
        except OSError:
            return False
        return True

    def _on_open(self, conn: Connection, greeting: bytes = b"") -> None:
        """The subscriptions a connection starts with; ``greeting``: its deferred 101 answer."""
        if conn.kind == PLAIN:
            self.hub.subscribe_seed(conn)
        elif conn.claims is not None and conn.claims.channels:
            self.hub.grant(conn, conn.claims.channels, greeting)

    # ------------------------------------------------------------------ admission
    def admit(self, ip: str) -> Optional[Tuple[int, str]]:
        """Count a new WebSocket connection, or say why it must be closed (1013)."""
        cfg = self.config
        with self._count_lock:
            if self._open >= self.max_connections:
                return (CloseCode.TRY_AGAIN_LATER, "server over its connection limit")
            per_ip = self._per_ip.get(ip, 0)
            if cfg.max_connections_per_ip and per_ip >= cfg.max_connections_per_ip:
                return (CloseCode.TRY_AGAIN_LATER, "too many connections from this address")
            self._open += 1
            self._per_ip[ip] = per_ip + 1
            self.upgraded += 1
        return None

    def _release(self, ip: str) -> None:
        with self._count_lock:
            self._open -= 1
            left = self._per_ip.get(ip, 1) - 1
            if left > 0:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)
        if self._stopping:  # shutdown() waits for the connections to end
            with self._threads_lock:
                self._threads_lock.notify_all()

    def http_rate_ok(self, ip: str) -> bool:
        """Take a token from the HTTP publish bucket of this address."""
        rate = self.config.max_publish_rate
        if rate <= 0:
            return True
        with self._count_lock:
            bucket = self._http_buckets.get(ip)
            if bucket is None:
                if len(self._http_buckets) > 10000:
                    self._http_buckets.clear()
                bucket = self._http_buckets[ip] = TokenBucket(
                    rate, self.config.publish_burst or max(1.0, rate))
            return bucket.take()

    def host_allowed(self, host: Optional[str]) -> bool:
        """True when a request's ``Host`` header (None: absent) may be served (PROTOCOL.md section 8)."""
        return self.host_rule.allows(host)

    def origin_allowed(self, origin: str, host: Optional[str], scheme: Optional[str] = None) -> bool:
        """True when a browser's Origin is the server's own or an allowed one.

        ``scheme`` is the request's (e.g. a WSGI server's ``wsgi.url_scheme``); the
        server's own by default.
        """
        allowed = self.config.allowed_origins
        if "*" in allowed:
            return True
        origin = origin.strip().rstrip("/").lower()
        if host and origin == ("%s://%s" % (scheme or self.scheme, host.strip())).lower():
            return True
        return origin in (a.rstrip("/").lower() for a in allowed)

    # ------------------------------------------------------------------ API
    def publish(self, topic: str, data: Any) -> Tuple[int, str]:
        """Publish ``data`` (any JSON value) on ``topic`` from any thread; returns (seq, epoch)."""
        if self.shutting_down:
            raise ServerClosed("server is shutting down")
        return self.hub.publish(topic, encode_json(data))

    @property
    def turned_away(self) -> int:
        """Connections answered 503 for want of room (or of a descriptor) since start."""
        return self._turn_away.refused if self._turn_away is not None else 0

    def degraded_reason(self) -> Optional[str]:
        """Why the server is degraded (one line for /healthz and /stats), None while it is not."""
        if self.shutting_down:
            return "shutting down"
        if not self.writer.alive:
            return "the writer thread is not running"
        return self.broker.reason

    def health(self) -> Dict[str, Any]:
        """The /healthz document: status "ok", or "degraded" with the reason (PROTOCOL.md 1)."""
        reason = self.degraded_reason()
        doc: Dict[str, Any] = {"status": "ok" if reason is None else "degraded"}
        if reason is not None:
            doc["reason"] = reason
        doc.update({
            "uptime": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "connections": len(self.hub),
            "writer": {"state": self.writer.state, "alive": self.writer.alive,
                       "queue_depth": self.writer.depth()},
            "broker": self.broker.status(),
            "trim": ({"steps": self._trimmer.steps,
                      "longest_hold_ms": round(self._trimmer.longest_hold * 1000.0, 3),
                      "longest_cpu_ms": round(self._trimmer.longest_cpu * 1000.0, 3)}
                     if self._trimmer is not None else None),
            "idle_park": self._park.status() if self._park is not None else None,
        })
        return doc

    def demo_page(self) -> bytes:
        """The demo page served at /."""
        if self._demo is None:
            path = html.escape(self.config.path, quote=True).encode()
            self._demo = load_demo_page().replace(
                b'<meta name="wsbroadcast-path" content="/ws">',
                b'<meta name="wsbroadcast-path" content="' + path + b'">', 1)
        return self._demo

    def thread_count(self) -> int:
        """Connection threads alive now."""
        return len(self._threads)
