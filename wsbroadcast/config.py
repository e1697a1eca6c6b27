"""Server settings with their defaults; every limit of the broker lives here."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

KIB = 1024
MIB = 1024 * 1024


@dataclasses.dataclass
class Config:
    """Settings of one server; the command line maps one flag to each field."""

    host: str = "127.0.0.1"
    port: int = 8080
    path: str = "/ws"
    #: largest message (payload bytes after reassembly) and largest HTTP publish body
    max_message_size: int = 1 * MIB
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
    max_subscriptions: int = 1000
    max_connections_per_ip: int = 0  # 0: no limit
    max_publish_rate: float = 0.0  # messages per second per connection; 0: no limit
    publish_burst: int = 0  # token bucket size; 0: max(1, rate)
    #: writer channel capacity (items); producers wait when it is full
    queue_size: int = 65536
    #: "memory" or a SQLite file path
    store: str = "memory"
    history_size: int = 1000
    history_ttl: Optional[float] = None
    store_full_sync: bool = False
    # security
    secret: Optional[str] = None
    public_key: Optional[str] = None
    api_key: Optional[str] = None
    allowed_origins: Tuple[str, ...] = ()
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    # scale-out
    redis_url: Optional[str] = None
    #: stack size of threads started from now on, process-wide (bytes; 0 = leave as is);
    #: ``wsbroadcast serve`` sets 256 KiB so that ~20,000 connection threads fit
    thread_stack_size: int = 0
    #: seconds to wait for connections to close on shutdown
    shutdown_timeout: float = 5.0

    def replace(self, **changes: object) -> "Config":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
