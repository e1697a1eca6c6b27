#!/usr/bin/env python3
"""An echo server built from wsbroadcast's own server, reader and writer, for the Autobahn suite.

    python scripts/conformance/echo_server.py --port 9001

Every text or binary message is sent back as it came; limits are raised to what the
suite sends (16 MiB messages).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from wsbroadcast.config import MIB  # noqa: E402
from wsbroadcast.reader import Reader  # noqa: E402
from wsbroadcast.server import Server  # noqa: E402
from wsbroadcast.writer import SEND  # noqa: E402
from wsbroadcast.wsframe import binary_frame, text_frame  # noqa: E402


class EchoReader(Reader):
    """Sends each complete message back through the writer, like any other frame."""

    accept_binary = True

    def on_message(self, data: Any, commands: List[Any]) -> None:
        frame = binary_frame(data) if isinstance(data, bytes) else text_frame(data.encode("utf-8"))
        self.writer.put(((SEND, self.conn, frame),))


class EchoServer(Server):
    """The broker's server with echoing readers and no automatic subscription."""

    reader_class = EchoReader

    def _on_open(self, conn: Any, greeting: bytes = b"") -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = EchoServer(args.host, args.port, store="memory", history_size=0, path="/",
                        max_message_size=16 * MIB + 1024,
                        max_message_frames=1 << 20, max_outbox=64 * MIB,
                        socket_sndbuf=0, ping_interval=0, close_timeout=2.0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print("echo server on %s" % server.url, flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
