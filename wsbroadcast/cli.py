"""The command line: ``wsbroadcast serve`` and ``wsbroadcast token``."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform
import signal
import sys
import threading
from typing import Callable, List, Optional

from . import __version__
from .config import Config, human_bytes, parse_size

logger = logging.getLogger("wsbroadcast")

_DEFAULT_STORE = "wsbroadcast.db"
#: stack of each connection thread: room for the deepest path input can reach on every
#: supported Python (scripts/stack_use.py measures it), small enough for ~20,000 threads
_STACK_SIZE = 256 * 1024


def _d(text: str, default: object) -> str:
    """Help text with its default, said once."""
    return "%s (default: %s)" % (text, default)


def _serve_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    d = Config()
    p = sub.add_parser("serve", help="run the broker",
                       description="Run the broker: WebSocket at PATH, the demo page at /, "
                                   "/healthz, /metrics, POST /publish and GET /history on one port. "
                                   "By default history is kept in ./%s." % _DEFAULT_STORE)
    p.add_argument("--host", default=d.host, help=_d("address to listen on (0.0.0.0: every interface)", d.host))
    p.add_argument("--port", type=int, default=d.port, help=_d("port to listen on (0: any free port)", d.port))
    p.add_argument("--path", default=d.path, help=_d("the WebSocket endpoint's path", d.path))
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help=_d("log level on stderr (debug adds tracebacks to start-up errors)", "info"))
    g = p.add_argument_group("limits")
    g.add_argument("--max-message-size", type=int, default=d.max_message_size, metavar="BYTES",
                   help=_d("largest message (after reassembly); also the HTTP publish body",
                           human_bytes(d.max_message_size)))
    g.add_argument("--max-message-frames", type=int, default=d.max_message_frames, metavar="N",
                   help=_d("frames (fragments) one WebSocket message may take; past it: 1009",
                           d.max_message_frames))
    g.add_argument("--no-compression", dest="compression", action="store_false",
                   help="turn down permessage-deflate offers: every frame goes uncompressed "
                        "(default: compress, once per message however many receive it)")
    g.add_argument("--compression-threshold", type=int, default=d.compression_threshold, metavar="BYTES",
                   help=_d("messages smaller than this go uncompressed", "%d bytes" % d.compression_threshold))
    g.add_argument("--max-outbox", type=int, default=d.max_outbox, metavar="BYTES",
                   help=_d("unsent bytes a connection may owe before it is closed as a slow consumer (1008)",
                           human_bytes(d.max_outbox)))
    g.add_argument("--ping-interval", type=float, default=d.ping_interval, metavar="SECONDS",
                   help=_d("silence before the server pings a connection (0: never)", "%g" % d.ping_interval))
    g.add_argument("--ping-timeout", type=float, default=d.ping_timeout, metavar="SECONDS",
                   help=_d("time to wait for any answer to a ping before closing", "%g" % d.ping_timeout))
    g.add_argument("--handshake-timeout", type=float, default=d.handshake_timeout, metavar="SECONDS",
                   help=_d("time a client has to send a complete request (covers TLS and slow headers), "
                           "and to take each 64 KiB of a /history answer (six times it for a whole answer)",
                           "%g" % d.handshake_timeout))
    g.add_argument("--close-timeout", type=float, default=d.close_timeout, metavar="SECONDS",
                   help=_d("time a closing connection gets to take its close frame before a reset",
                           "%g" % d.close_timeout))
    g.add_argument("--max-connections", type=int, default=d.max_connections, metavar="N",
                   help=_d("open WebSocket connections; past it new ones are closed with 1013",
                           d.max_connections))
    g.add_argument("--max-pending", type=int, default=d.max_pending, metavar="N",
                   help=_d("connections not upgraded (handshakes, HTTP); past it the one idle longest is "
                           "dropped, or the newcomer gets 503; both limits are lowered to fit ulimit -n",
                           d.max_pending))
    g.add_argument("--max-connections-per-ip", type=int, default=d.max_connections_per_ip, metavar="N",
                   help=_d("open WebSocket connections per client address (1013); "
                           "pending ones: this plus 8 (503); 0: no limit",
                           d.max_connections_per_ip))
    g.add_argument("--thread-stack-size", type=int, default=_STACK_SIZE, metavar="BYTES",
                   help=_d("stack size of each connection thread (small lets ~20,000 fit; 0: Python's)",
                           human_bytes(_STACK_SIZE)))
    g.add_argument("--max-subscriptions", type=int, default=d.max_subscriptions, metavar="N",
                   help=_d("subscriptions per connection", d.max_subscriptions))
    g.add_argument("--max-publish-rate", type=float, default=d.max_publish_rate, metavar="PER_SECOND",
                   help=_d("publishes per second per connection, and per address over HTTP (0: no limit)",
                           "%g" % d.max_publish_rate))
    g.add_argument("--publish-burst", type=int, default=d.publish_burst, metavar="N",
                   help=_d("publishes allowed at once above the rate (0: one second's worth)", d.publish_burst))
    h = p.add_argument_group("history")
    h.add_argument("--store", default=_DEFAULT_STORE, metavar="FILE",
                   help=_d("SQLite file for history and seqs, or 'memory' for none that survives a restart",
                           _DEFAULT_STORE))
    h.add_argument("--history-size", type=int, default=d.history_size, metavar="N",
                   help=_d("messages kept per topic", d.history_size))
    h.add_argument("--history-ttl", type=float, default=None, metavar="SECONDS",
                   help=_d("how long a message is kept", "no limit"))
    h.add_argument("--memory-store-bytes", type=_size, default=d.memory_store_bytes, metavar="SIZE",
                   help=_d("what the memory store may hold in all, messages and topics (e.g. 64MiB, "
                           "1G); past it the oldest messages go first, and topics left without "
                           "messages or subscribers are forgotten", human_bytes(d.memory_store_bytes)))
    h.add_argument("--full-sync", action="store_true",
                   help="sync the store to disk on every commit (survives power loss, slower)")
    r = p.add_argument_group("scale-out")
    r.add_argument("--redis", metavar="URL",
                   help="share seqs, history and fan-out with other nodes through Redis: "
                        "redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS, unix:///PATH?db=DB), or "
                        "redis+sentinel://HOST:PORT,HOST:PORT/MASTER?db=DB to follow the primary that "
                        "Sentinel names through its failovers, or redis+cluster://HOST:PORT,HOST:PORT "
                        "for a Redis Cluster (topics spread over its shards by hash tag, sharded pub/sub); "
                        "add ?wait_replicas=1&wait_timeout_ms=1000 "
                        "to ack a publish only once a replica has it (with appendfsync always on the "
                        "primary, an acked message survives a failover); needs pip install "
                        "'wsbroadcast[redis]'; replaces --store")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help=_d("broker processes on the one port, e.g. one per core (SO_REUSEPORT: the "
                           "kernel spreads connections); they share everything through --redis, which "
                           "they need; a worker that dies is restarted", 1))
    r.add_argument("--presence-ttl", type=float, default=d.presence_ttl, metavar="SECONDS",
                   help=_d("with --redis: how soon the members of a node that died without a "
                           "goodbye leave every presence answer", d.presence_ttl))
    s = p.add_argument_group("security")
    s.add_argument("--secret", help="HS256 secret for tokens (prefer --secret-file or $WSBROADCAST_SECRET)")
    s.add_argument("--secret-file", metavar="FILE", help="file holding the HS256 secret")
    s.add_argument("--public-key", metavar="FILE", help="PEM file of the RS256/ES256 public key for tokens")
    s.add_argument("--api-key", help="key for back-end publishers (X-API-Key header); also $WSBROADCAST_API_KEY")
    s.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed besides the server's own (repeatable; '*' allows any)")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="Host header served: on a loopback address besides localhost, 127.0.0.1 and "
                        "[::1] (which is all it serves by default, against DNS rebinding); elsewhere "
                        "the only names served once one is given (repeatable; '*' serves any)")
    s.add_argument("--public-stats", action="store_true",
                   help="serve /stats and /dashboard to any client when no secret or API key is set "
                        "(by default only to loopback clients; with auth they need the key or a token)")
    s.add_argument("--certfile", metavar="FILE", help="TLS certificate (PEM): serve wss:// and https://")
    s.add_argument("--keyfile", metavar="FILE", help="TLS private key (PEM)")
    p.set_defaults(func=_serve)
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    p = sub.add_parser("token", help="print a signed token",
                       description="Print a JWT for the given claims, signed with the secret "
                                   "(HS256) or a private key (RS256/ES256). A client passes it as "
                                   "?token=... on the WebSocket URL or as 'Authorization: Bearer ...'.")
    p.add_argument("--secret", help="HS256 secret (or --secret-file, or $WSBROADCAST_SECRET)")
    p.add_argument("--secret-file", metavar="FILE", help="file holding the HS256 secret")
    p.add_argument("--private-key", metavar="FILE", help="PEM private key file (RS256 or ES256)")
    p.add_argument("--algorithm", default=None,
                   help=_d("HS256, RS256 or ES256", "HS256 with a secret, else from the key's type"))
    p.add_argument("--sub", help=_d("who the token is for", "none"))
    p.add_argument("--subscribe", action="append", default=[], metavar="PATTERN",
                   help=_d("topic pattern it may subscribe to (repeatable)", "none"))
    p.add_argument("--publish", action="append", default=[], metavar="TOPIC",
                   help=_d("topic it may publish on (repeatable)", "none"))
    p.add_argument("--lifetime", type=float, default=3600.0, metavar="SECONDS",
                   help=_d("time until it expires (0: never)", "3600"))
    p.set_defaults(func=_token)
    return p


def _fail(command: str, message: str) -> int:
    """Report a usage or configuration error (never with key material) and give exit code 2."""
    print("wsbroadcast %s: %s" % (command, message), file=sys.stderr)
    return 2


def _private_key_algorithm(pem: bytes) -> str:
    """The JWT algorithm of a PEM private key, from its type (any PEM flavour, PKCS#8 included)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    from .auth import _EC_ALGORITHMS

    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError("unsupported EC curve %s" % key.curve.name)
        return alg
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return "EdDSA"
    raise ValueError("unsupported private key type")


def _token(args: argparse.Namespace) -> int:
    import jwt

    from .auth import load_secret, mint_token
    from .errors import TopicError

    try:
        if args.private_key:
            with open(args.private_key, "rb") as f:
                key = f.read()
            algorithm = args.algorithm or _private_key_algorithm(key)
        else:
            secret = load_secret(args.secret, args.secret_file)
            if not secret:
                return _fail("token", "give --secret, --secret-file, --private-key or $WSBROADCAST_SECRET")
            key, algorithm = secret.encode("utf-8"), args.algorithm or "HS256"
        text = mint_token(key, algorithm=algorithm, sub=args.sub, subscribe=args.subscribe,
                          publish=args.publish, lifetime=args.lifetime or None)
    except OSError as exc:
        return _fail("token", "cannot read %s: %s" % (exc.filename or "a file", exc.strerror or exc))
    except TopicError as exc:
        return _fail("token", "bad topic pattern: %s" % exc)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        return _fail("token", str(exc))
    print(text)
    return 0


#: glibc's mallopt parameter, and blocks from this size up that go back to the OS when freed
_M_MMAP_THRESHOLD = -3
_LARGE_BLOCK = 256 * 1024


def _return_large_blocks() -> None:
    """Have glibc map large blocks (big messages, their frames, history pages) one by one.

    Left alone, glibc raises its mmap threshold after the first large block is freed and
    serves later ones from per-thread arenas, which keep the freed space: every thread
    that once handled a ~1 MiB message would hold a few MiB more for good.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return
    try:
        if not ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK):
            logger.debug("mallopt(M_MMAP_THRESHOLD) refused")
    except (OSError, AttributeError) as exc:  # pragma: no cover - no such libc function
        logger.debug("mallopt unavailable: %s", exc)


def _serve(args: argparse.Namespace) -> int:
    from .auth import install_redaction_on_handlers
    from .server import check_listen
    from .workers import Supervisor

    try:
        config = _serve_config(args)
        install_redaction_on_handlers()
        if args.workers != 1:
            supervisor = Supervisor(config, args.workers, _serve_one)
        else:
            check_listen(config.host, config.port)  # before the store file is created
    except ValueError as exc:  # ConfigError, or e.g. a --public-key that is not a PEM public key
        logger.debug("start-up failed", exc_info=True)
        return _fail("serve", str(exc))
    if args.workers != 1:
        return supervisor.run()
    return _serve_one(config)


def _serve_config(args: argparse.Namespace) -> Config:
    """The Config of ``serve``'s options; ConfigError (a ValueError) on a mistake."""
    from .auth import load_secret
    from .errors import ConfigError

    public_key = None
    if args.public_key:
        try:
            with open(args.public_key, "rb") as f:
                public_key = f.read()
        except OSError as exc:
            raise ConfigError("cannot read the public key %s: %s; give a PEM file with --public-key"
                              % (args.public_key, exc.strerror or exc)) from exc
    secret = load_secret(args.secret, args.secret_file)
    if args.redis is not None:
        from .redis_url import parse_redis_url

        try:
            parse_redis_url(args.redis)  # checked here: before --workers forks or a store is made
        except ConfigError as exc:
            raise ConfigError("--redis: %s" % exc) from exc
    if args.api_key == "":
        raise ConfigError("--api-key is empty: give a key, or leave the option out")
    return Config(
        host=args.host, port=args.port, path=args.path,
        max_message_size=args.max_message_size, max_message_frames=args.max_message_frames,
        max_outbox=args.max_outbox, compression=args.compression,
        compression_threshold=args.compression_threshold,
        ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
        handshake_timeout=args.handshake_timeout, close_timeout=args.close_timeout,
        max_connections=args.max_connections, max_connections_per_ip=args.max_connections_per_ip,
        max_pending=args.max_pending,
        max_subscriptions=args.max_subscriptions, max_publish_rate=args.max_publish_rate,
        publish_burst=args.publish_burst, store=args.store, history_size=args.history_size,
        history_ttl=args.history_ttl, store_full_sync=args.full_sync,
        memory_store_bytes=args.memory_store_bytes,
        secret=secret,
        public_key=public_key, api_key=args.api_key or os.environ.get("WSBROADCAST_API_KEY") or None,
        allowed_origins=tuple(args.allowed_origin), allowed_hosts=tuple(args.allowed_host),
        certfile=args.certfile, keyfile=args.keyfile, public_stats=args.public_stats,
        redis_url=args.redis, presence_ttl=args.presence_ttl, thread_stack_size=args.thread_stack_size,
    )


def _serve_one(config: Config, ready: Optional[Callable[[], None]] = None) -> int:
    """Run one broker until SIGTERM or SIGINT (``ready``: called once it listens); the exit code."""
    from .errors import ConfigError
    from .server import Server

    try:
        server = Server(config.host, config.port, config=config)
    except ValueError as exc:
        logger.debug("start-up failed", exc_info=True)
        return _fail("serve", str(exc))
    _return_large_blocks()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except ConfigError as exc:
        logger.debug("start-up failed", exc_info=True)
        server.shutdown()
        return _fail("serve", str(exc))
    logger.info("demo page at %s/ ; WebSocket at %s ; %s", server.http_url, server.url,
                "redis: " + config.redis_url if config.redis_url else "store: " + config.store)
    sys.stderr.flush()
    if ready is not None:
        ready()
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``wsbroadcast`` command."""
    parser = argparse.ArgumentParser(prog="wsbroadcast",
                                     description="A threaded WebSocket publish/subscribe broker.")
    parser.add_argument("--version", action="version", version="wsbroadcast " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {"serve": _serve_parser(sub), "token": _token_parser(sub)}
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo under a command gets that command's usage
        (commands.get(args.command) or parser).error("unrecognized arguments: %s" % " ".join(unknown))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = getattr(args, "log_level", "info")
    several = getattr(args, "workers", 1) != 1  # each line says which process wrote it
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s" + ("[%(process)d]" if several else "")
                        + ": %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
