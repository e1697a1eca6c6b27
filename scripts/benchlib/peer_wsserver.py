"""Peer: websocket-server 0.6.x (threaded, one thread per client).

Every text message received from any client is sent to all connected clients
(the sender included) with send_message_to_all().  127.0.0.1 only.
usage: python peer_wsserver.py PORT
"""
import logging
import signal
import sys

from websocket_server import WebsocketServer


def main(port):
    # TCPServer's default listen backlog is 5; raise it so connection storms are not
    # throttled by SYN drops (that would measure the backlog, not the broker).
    WebsocketServer.request_queue_size = 4096
    server = WebsocketServer(host="127.0.0.1", port=port, loglevel=logging.WARNING)
    server.set_fn_message_received(lambda client, srv, msg: srv.send_message_to_all(msg))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.run_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
