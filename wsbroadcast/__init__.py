"""wsbroadcast: a threaded, synchronous WebSocket publish/subscribe broker."""

from typing import Any

from .config import Config
from .errors import (
    AuthError,
    BrokerUnavailable,
    ClientError,
    CloseCode,
    ConfigError,
    ConnectionClosed,
    ErrorCode,
    HandshakeRefused,
    ProtocolError,
    ServerClosed,
    StoreError,
    TopicError,
    WsBroadcastError,
)
from .server import Server

__version__ = "0.1.0"

__all__ = [
    "AuthError", "BrokerUnavailable", "Client", "ClientError", "CloseCode", "Config", "ConfigError",
    "ConnectionClosed", "ErrorCode", "HandshakeRefused", "ProtocolError", "Server", "ServerClosed", "StoreError",
    "TopicError", "WsBroadcastError", "__version__",
]


def __getattr__(name: str) -> Any:  # the client imports simple-websocket only when used
    if name == "Client":
        from .client import Client
        return Client
    raise AttributeError(name)
