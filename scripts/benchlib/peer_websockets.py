"""Peer: websockets (asyncio) broadcast server.

Every text message received from any client is sent to all connected clients
(the sender included) with websockets.broadcast().  No compression (--compress: websockets'
default permessage-deflate, compressed per connection), 127.0.0.1.
usage: python peer_websockets.py PORT [--compress]
"""
import asyncio
import signal
import sys

import websockets
from websockets.asyncio.server import broadcast, serve

CLIENTS = set()


async def handler(ws):
    CLIENTS.add(ws)
    try:
        async for msg in ws:
            if isinstance(msg, str):
                broadcast(CLIENTS, msg)
    except websockets.ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main(port, compression):
    stop = asyncio.get_running_loop().create_future()
    for s in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(s, stop.set_result, None)
    async with serve(handler, "127.0.0.1", port, compression=compression, max_size=1 << 20,
                     ping_interval=None, backlog=4096):
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "deflate" if "--compress" in sys.argv[2:] else None))
