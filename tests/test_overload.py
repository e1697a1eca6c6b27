"""Overload from one client or many, against ``python -m wsbroadcast serve`` as a user starts it.

Frames: a message's cost is bounded in frames as well as bytes. Connections: the fd
table, threads and the accept loop stay bounded while clients pile up.
"""

from __future__ import annotations

import json

import pytest

import wsraw
from serverproc import ServerProcess

pytestmark = pytest.mark.timeout(60)

#: the default of --max-message-frames
DEFAULT_FRAMES = 4096


def _fragmented(text: bytes, frames: int) -> bytes:
    """``text`` as one message of ``frames`` frames: a first piece, empty continuations, the rest."""
    assert frames >= 2
    empty = wsraw.encode_frame(0x0, b"", fin=False)
    return (wsraw.encode_frame(0x1, text[:1], fin=False) + empty * (frames - 2)
            + wsraw.encode_frame(0x0, text[1:]))


def test_a_message_of_too_many_empty_fragments_is_closed_1009():
    with ServerProcess("--store", "memory") as proc:
        c = wsraw.connect(proc.port)
        try:
            ping = json.dumps({"type": "ping", "id": "edge"}).encode()
            c.sock.sendall(_fragmented(ping, DEFAULT_FRAMES))  # at the limit: served
            assert c.recv_json() == {"type": "pong", "id": "edge"}
            c.sock.sendall(_fragmented(ping, DEFAULT_FRAMES + 1))  # one frame past it
            code, reason = c.expect_close()
            assert code == 1009, (code, reason)
            assert c.at_eof()
        finally:
            c.close()
        # the server goes on serving others
        other = wsraw.connect(proc.port)
        other.send_json({"type": "ping", "id": "after"})
        assert other.recv_json() == {"type": "pong", "id": "after"}
        other.close()
