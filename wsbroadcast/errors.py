"""Errors, error codes and close codes of wsbroadcast.

Exception tree::

    WsBroadcastError
    ├── ProtocolError            a client frame the contract refuses (has ``code``)
    │   ├── TopicError           bad_topic
    │   └── PermissionDenied     forbidden
    ├── AuthError                a token or key that does not authenticate (HTTP 401)
    ├── StoreError               the message store could not read or write
    │   └── StoreInUse           its file is locked by another store (another server)
    ├── BrokerUnavailable        the broker (e.g. Redis) cannot take a publish now
    ├── ServerClosed             an operation on a server that is shut down
    ├── ConfigError              a setting or start-up condition the user must fix
    └── ClientError              the Python client's failures
        ├── ConnectionClosed     the client's connection is closed (has ``code``)
        └── HandshakeRefused     the server refused to connect (has ``status``, ``code``)

Every error that reaches a WebSocket client is an error frame with one of the
``ErrorCode`` values; every close uses a ``CloseCode``.
"""

from __future__ import annotations

import enum
from typing import Optional


class ErrorCode(str, enum.Enum):
    """Error codes of error frames and HTTP error bodies (PROTOCOL.md sections 1 and 4)."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    # HTTP only
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    FORBIDDEN_HOST = "forbidden_host"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAVAILABLE = "unavailable"
    UPGRADE_REQUIRED = "upgrade_required"
    # store/broker failure seen by a publisher
    INTERNAL = "internal_error"

    def __str__(self) -> str:
        return self.value


class CloseCode(enum.IntEnum):
    """WebSocket close codes (PROTOCOL.md section 7)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class WsBroadcastError(Exception):
    """Base of every wsbroadcast exception."""


class ProtocolError(WsBroadcastError):
    """A client frame refused by the contract; answered with an error frame."""

    code: ErrorCode = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, code: Optional[ErrorCode] = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class TopicError(ProtocolError):
    """An invalid topic or pattern."""

    code = ErrorCode.BAD_TOPIC


class PermissionDenied(ProtocolError):
    """A subscribe or publish outside the connection's permissions."""

    code = ErrorCode.FORBIDDEN


class AuthError(WsBroadcastError):
    """Credentials that are missing, malformed, badly signed or expired."""


class StoreError(WsBroadcastError):
    """The message store failed to read or write."""


class StoreInUse(StoreError):
    """The store's file is locked by another store: ``pid`` holds it (None when unknown)."""

    def __init__(self, message: str, pid: Optional[int] = None) -> None:
        super().__init__(message)
        self.pid = pid


class BrokerUnavailable(WsBroadcastError):
    """The broker cannot accept a publish right now (for example Redis is down)."""


class ServerClosed(WsBroadcastError, RuntimeError):
    """The server is shut down or not started."""


class ConfigError(WsBroadcastError, ValueError):
    """A setting or start-up condition the user must fix (bad flag, port in use, store locked).

    Its message is one line saying what is wrong and what to do; the command line prints
    it as ``wsbroadcast serve: MESSAGE`` and exits with status 2.
    """


class ClientError(WsBroadcastError):
    """A failure of the Python client."""


class ConnectionClosed(ClientError):
    """The client's connection is closed."""

    def __init__(self, code: Optional[int] = None, reason: str = "") -> None:
        super().__init__(f"connection closed (code={code}, reason={reason!r})")
        self.code = code
        self.reason = reason


_STATUS_WORDS = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "not found",
                 426: "upgrade required", 429: "too many requests", 503: "unavailable"}


class HandshakeRefused(ClientError):
    """The server answered the WebSocket handshake with an HTTP error instead of upgrading.

    ``status`` is the HTTP status, ``code`` the body's ``error`` (``unauthorized``,
    ``forbidden_origin``, ``not_found``, ...) and ``message`` its ``message``, when given.
    """

    def __init__(self, status: int, code: Optional[str] = None, message: str = "") -> None:
        self.status = status
        self.code = code
        self.message = message
        what = code or _STATUS_WORDS.get(status, "refused")
        super().__init__("server refused the connection: HTTP %d %s%s"
                         % (status, what, ": " + message if message else ""))
