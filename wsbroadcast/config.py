"""Server settings with their defaults; every limit of the broker lives here."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

from .errors import ConfigError

KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclasses.dataclass
class Config:
    """Settings of one server; the command line maps one flag to each field."""

    host: str = "127.0.0.1"
    port: int = 8080
    path: str = "/ws"
    #: largest message (payload bytes after reassembly) and largest HTTP publish body
    max_message_size: int = 1 * MIB
    #: most frames one WebSocket message may take (fragments, empty ones included)
    max_message_frames: int = 4096
    #: unsent bytes a connection may owe before it is closed as a slow consumer
    max_outbox: int = 1 * MIB
    #: cap of the kernel's send buffer per connection (bytes the outbox limit cannot see)
    socket_sndbuf: int = 256 * KIB
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    handshake_timeout: float = 10.0
    #: how long a closing connection may take to flush its close frame and see the peer go
    close_timeout: float = 3.0
    max_connections: int = 10000
    #: connections not upgraded to WebSocket (handshakes, HTTP requests, keep-alive), counted
    #: from accept; when full, the one idle longest is dropped, or the newcomer is answered 503.
    #: Both limits are lowered at start to what the open-file limit (ulimit -n) holds.
    max_pending: int = 256
    max_subscriptions: int = 1000
    max_connections_per_ip: int = 0  # 0: no limit
    max_publish_rate: float = 0.0  # messages per second per connection; 0: no limit
    publish_burst: int = 0  # token bucket size; 0: max(1, rate)
    #: answer permessage-deflate offers (RFC 7692); off: every frame goes uncompressed
    compression: bool = True
    #: messages smaller than this (payload bytes) go uncompressed even to compressing clients
    compression_threshold: int = 128
    #: writer channel capacity (items); producers wait when it is full
    queue_size: int = 65536
    #: "memory" or a SQLite file path
    store: str = "memory"
    history_size: int = 1000
    history_ttl: Optional[float] = None
    store_full_sync: bool = False
    #: what the memory store may hold in all (messages and topics); the oldest go first
    memory_store_bytes: int = 256 * MIB
    # security
    secret: Optional[str] = None
    public_key: Optional[Union[str, bytes]] = None  # PEM text
    api_key: Optional[str] = None
    allowed_origins: Tuple[str, ...] = ()
    #: Host names served besides the loopback names (listening on loopback), or the only
    #: ones served (listening elsewhere); "name" or "name:port", "*" for any (PROTOCOL.md 8)
    allowed_hosts: Tuple[str, ...] = ()
    #: serve /stats and /dashboard to any client when auth is off (else loopback clients only)
    public_stats: bool = False
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    # scale-out
    redis_url: Optional[str] = None
    #: with Redis: how long a node's members outlive its last refresh (a node killed
    #: without a goodbye leaves every presence answer within this time)
    presence_ttl: float = 30.0
    #: listen with SO_REUSEPORT: several processes bind the same port and the kernel
    #: spreads new connections over them (``wsbroadcast serve --workers N``)
    reuse_port: bool = False
    #: stack size of threads started from now on, process-wide (bytes; 0 = leave as is);
    #: ``wsbroadcast serve`` sets 256 KiB so that ~20,000 connection threads fit
    thread_stack_size: int = 0
    #: readers of idle connections wait in one epoll thread, which wakes at most a few
    #: of them at a time (thousands of clients dropping at once then end at
    #: the writer's pace instead of all asking for the GIL); False: each waits in recv
    idle_park: bool = True
    #: seconds to wait for connections to close on shutdown
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (checked like a new one)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ConfigError naming the first setting outside its range (see ``RANGES``)."""
        for name, rng in RANGES.items():
            rng.check(name, getattr(self, name))
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError("--host is empty: give an address to listen on (127.0.0.1, 0.0.0.0 for all)")
        if not isinstance(self.path, str) or not self.path.startswith("/") or any(
                c.isspace() or c in "?#" for c in self.path):
            raise ConfigError("--path %r is not a URL path: give one that starts with '/' (default /ws)"
                              % (self.path,))
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError("--store is empty: give a SQLite file path, or 'memory'")
        if not isinstance(self.compression, bool):
            raise ConfigError("compression %r is not True or False" % (self.compression,))


_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": KIB, "m": MIB, "g": GIB}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``65536``, ``64K``, ``256MiB`` or ``1G`` (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError("not a size: %r (write e.g. 65536, 64K, 256MiB or 1G)" % (text,))
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def human_bytes(n: float) -> str:
    """A byte count in the largest binary unit that divides it (``1 MiB``, ``256 KiB``, ``1000 bytes``)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n and n % size == 0:
            return "%d %s" % (n // size, unit)
    return "%d bytes" % n


class Range(NamedTuple):
    """The values a numeric setting accepts: ``low <= value <= high`` (None: unbounded)."""

    low: float
    high: Optional[float] = None
    #: what the number counts: "bytes" (shown in KiB/MiB), "seconds", or a noun
    unit: str = ""
    integer: bool = True
    #: None is accepted (and means "no limit")
    optional: bool = False
    #: the command-line flag, when not ``--`` + the field name with dashes
    flag: Optional[str] = None
    #: 0 is accepted too (meaning "off"), below ``low``
    zero: bool = False

    def allowed(self) -> str:
        """What to give, in words."""
        def show(v: float) -> str:
            if self.unit.startswith("bytes") and v:
                return human_bytes(v)
            return "%d" % v if float(v).is_integer() else "%g" % v
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            text = "%s of at least %s" % (kind, show(self.low))
        else:
            text = "%s from %s to %s" % (kind, show(self.low), show(self.high))
        if self.zero:
            text = "0 or " + text
        if self.unit:
            text += " (%s)" % self.unit
        return text

    def check(self, name: str, value: object) -> None:
        """Raise ConfigError unless ``value`` is in this range."""
        if value is None and self.optional:
            return
        flag = self.flag or "--" + name.replace("_", "-")
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (self.integer and not isinstance(value, int))):
            raise ConfigError("%s %r is not %s: give %s" % (
                flag, value, "an integer" if self.integer else "a number", self.allowed()))
        if value == 0 and self.zero:
            return
        if not math.isfinite(value) or value < self.low or (self.high is not None and value > self.high):
            raise ConfigError("%s %s is out of range: give %s" % (flag, value, self.allowed()))


#: Every numeric setting's accepted values, checked by ``Config.validate()`` (so by
#: ``Config(...)``, ``Server(...)`` and ``wsbroadcast serve`` alike). A new numeric
#: field gets its line here.
RANGES: Dict[str, Range] = {
    "port": Range(0, 65535, "0: any free port"),
    "max_message_size": Range(1, 1 * GIB, "bytes"),
    "max_message_frames": Range(1, 100_000_000, "frames"),
    # below a few frames' worth, every reading client would look slow
    "max_outbox": Range(1 * KIB, None, "bytes"),
    "socket_sndbuf": Range(0, 64 * MIB, "bytes", flag="socket_sndbuf"),
    "ping_interval": Range(0, 86400, "seconds; 0: never", integer=False),
    "ping_timeout": Range(0.01, 86400, "seconds", integer=False),
    "handshake_timeout": Range(0.01, 3600, "seconds", integer=False),
    "close_timeout": Range(0.01, 3600, "seconds", integer=False),
    "max_connections": Range(1, 10_000_000, "connections"),
    "max_pending": Range(1, 10_000_000, "connections"),
    "max_subscriptions": Range(1, 10_000_000, "subscriptions"),
    "max_connections_per_ip": Range(0, 10_000_000, "connections; 0: no limit"),
    "max_publish_rate": Range(0, 1_000_000_000, "per second; 0: no limit", integer=False),
    "publish_burst": Range(0, 1_000_000_000, "messages; 0: one second's worth"),
    "queue_size": Range(1, 100_000_000, "items", flag="queue_size"),
    "compression_threshold": Range(0, 1 * GIB, "bytes"),
    "history_size": Range(0, 1_000_000_000, "messages per topic"),
    "history_ttl": Range(0, None, "seconds", integer=False, optional=True),
    "presence_ttl": Range(0.5, 86400, "seconds", integer=False),
    "memory_store_bytes": Range(64 * KIB, None, "bytes"),
    "thread_stack_size": Range(32 * KIB, 1 * GIB, "bytes; 0: the default", zero=True),
    "shutdown_timeout": Range(0, 3600, "seconds", integer=False, flag="shutdown_timeout"),
}
