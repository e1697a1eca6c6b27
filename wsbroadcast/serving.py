"""What the HTTP layer, the metrics and /stats read from the server that runs them.

``http`` and ``metrics`` sit below ``server``: they are given a server and see it
through these protocols, so neither imports ``server`` (which imports both).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Tuple

from .admission import PendingTable
from .auth import Authenticator
from .broker import Broker
from .config import Config
from .hub import Hub
from .writer import Writer


class Exposition(Protocol):
    """The metrics as the HTTP layer serves them."""

    def exposition(self) -> Tuple[bytes, str]: ...


class Counted(Protocol):
    """The server's counters that the metrics read at scrape time."""

    writer: Writer
    hub: Hub
    broker: Broker
    started_at: float
    shutting_down: bool
    accepted: int
    upgraded: int
    pending: Optional[PendingTable]

    @property
    def turned_away(self) -> int: ...

    def degraded_reason(self) -> Optional[str]: ...


class Served(Counted, Protocol):
    """The server as one HTTP connection (or WebSocket handshake) uses it."""

    config: Config
    auth: Authenticator

    @property
    def metrics(self) -> Exposition: ...

    def admit(self, ip: str) -> Optional[Tuple[int, str]]: ...

    def _release(self, ip: str) -> None: ...

    def http_rate_ok(self, ip: str) -> bool: ...

    def host_allowed(self, host: Optional[str]) -> bool: ...

    def origin_allowed(self, origin: str, host: Optional[str], scheme: Optional[str] = None) -> bool: ...

    def health(self) -> Dict[str, Any]: ...

    def demo_page(self) -> bytes: ...
