"""Which ``Host`` headers a server serves: the allowed hosts of PROTOCOL.md section 8 (no I/O).

A page on ``http://evil.example:P`` whose name an attacker re-points at 127.0.0.1
(DNS rebinding) reaches a loopback server with ``Host: evil.example:P`` and, being
same-origin with itself, passes the origin check. A server listening on loopback
therefore serves only loopback names and the hosts configured as allowed.
"""

from __future__ import annotations

import ipaddress
import re
from typing import FrozenSet, Optional, Tuple

from .errors import ConfigError

#: a DNS name or IPv4 literal (checked loosely: no scheme, path, user or space)
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?\Z")


def split_host(value: str) -> Optional[Tuple[str, Optional[int]]]:
    """(lower-case name, port or None) of a ``Host`` value; None when it is not one.

    IPv6 literals keep their brackets (``[::1]``).
    """
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value.partition("]")
        name += sep
        if not sep:
            return None
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    else:
        name, sep, rest = value.partition(":")
        rest = sep + rest
        if not _NAME.match(name):
            return None
    if not rest:
        return name, None
    if rest[0] != ":" or not rest[1:].isdigit() or len(rest) > 6 or int(rest[1:]) > 65535:
        return None
    return name, int(rest[1:])


def is_loopback(name: str) -> bool:
    """True for ``localhost`` and loopback address literals (``127.x.y.z``, ``::1``, ``[::1]``)."""
    name = name.strip().lower()
    if name == "localhost":
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostRule:
    """The ``Host`` names one server serves.

    ``loopback_only``: the server listens on a loopback address, so besides the
    allowed hosts only loopback names are served. Otherwise any ``Host`` is served
    unless allowed hosts are configured, then only those. An allowed host is a
    name (any port), ``name:port``, or ``*`` (any). A request without ``Host``
    (HTTP/1.0 only; no browser sends one) is served: it cannot come from a rebound page.
    """

    def __init__(self, allowed: Tuple[str, ...] = (), loopback_only: bool = False) -> None:
        self.allowed = tuple(allowed)
        self.loopback_only = loopback_only
        self.any = False
        names = set()
        pairs = set()
        for entry in allowed:
            if entry.strip() == "*":
                self.any = True
                continue
            parsed = split_host(entry) if isinstance(entry, str) else None
            if parsed is None:
                raise ConfigError("--allowed-host %r is not a host name: give NAME or NAME:PORT "
                                  "(e.g. example.com or example.com:8080), or '*'" % (entry,))
            if parsed[1] is None:
                names.add(parsed[0])
            else:
                pairs.add(parsed)
        self._names: FrozenSet[str] = frozenset(names)
        self._pairs: FrozenSet[Tuple[str, Optional[int]]] = frozenset(pairs)
        self.configured = bool(allowed)
        #: the last Host value found allowed (clients mostly send the same one): served at once
        self._last_allowed: Optional[str] = None

    def with_loopback_only(self, loopback_only: bool) -> "HostRule":
        """The same allowed hosts for a server that does (or does not) listen on loopback."""
        return HostRule(self.allowed, loopback_only)

    def allows(self, host: Optional[str]) -> bool:
        """True when a request with this ``Host`` header (None: absent) is served."""
        if self.any or host is None or not (self.loopback_only or self.configured):
            return True
        if host == self._last_allowed:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        if (self.loopback_only and is_loopback(parsed[0])) or parsed[0] in self._names or parsed in self._pairs:
            self._last_allowed = host
            return True
        return False
