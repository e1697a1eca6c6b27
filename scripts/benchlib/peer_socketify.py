"""Peer: socketify.py (uWebSockets) broadcast server.

Every client subscribes to topic "broadcast" on open; every text message is
published with app.publish() to all subscribers (the sender included).
No compression; uWS defaults otherwise (max_backpressure 64 KiB: a slow client's
messages are dropped past it).  127.0.0.1 only.
usage: python peer_socketify.py PORT
"""
import sys

from socketify import App, CompressOptions, OpCode


def main(port):
    app = App()

    def on_open(ws):
        ws.subscribe("broadcast")

    def on_message(ws, msg, opcode):
        if opcode == OpCode.TEXT:
            app.publish("broadcast", msg, OpCode.TEXT)

    app.ws("/*", {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": 1 << 20,
        "idle_timeout": 0,
        "open": on_open,
        "message": on_message,
    })
    app.listen({"port": port, "host": "127.0.0.1"}, lambda config: None)
    app.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
