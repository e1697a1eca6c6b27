#!/usr/bin/env python3
"""Baseline echo server for the Autobahn TestSuite, on the ``websockets``
library's threaded synchronous server.

Echoes every text and binary message back unchanged. Used as a reference
point for the figures of wsbroadcast's own echo server::

    python scripts/conformance/run_autobahn.py \\
        --server-cmd "python scripts/conformance/websockets_echo.py --port {port}" \\
        --label websockets-sync
"""

import argparse
import logging
import signal
import sys
import threading

try:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve
except ImportError:  # pragma: no cover - depends on the environment
    sys.stderr.write("websockets_echo: the 'websockets' package (>= 11) is needed: pip install websockets\n")
    sys.exit(2)

MAX_SIZE = 16 * 1024 * 1024

log = logging.getLogger("websockets_echo")


def echo(websocket):
    try:
        for message in websocket:
            websocket.send(message)
    except ConnectionClosed:
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    # Compression off: the suite's compression groups (12, 13) are excluded
    # by default, and wsbroadcast does not negotiate permessage-deflate.
    with serve(echo, args.host, args.port, max_size=MAX_SIZE, compression=None) as server:

        def stop(signum, frame):
            # shutdown() waits for serve_forever(), which runs in this (main)
            # thread: call it from another one.
            log.info("signal %d, shutting down", signum)
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("echo server on ws://%s:%d", args.host, args.port)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
