"""A Flask app with wsbroadcast mounted on its own route.

    .venv/bin/pip install '.[flask]'
    .venv/bin/python examples/flask_app.py --port 5000        # then open http://127.0.0.1:5000/

The page loads the browser client (``/wsbroadcast.js``, served from the package), connects
to the app's WebSocket route ``/live`` and subscribes to ``news``; the form POSTs to ``/say``, a
plain view that calls ``broker.publish()``. Every open page shows every post.

One broker per process, on a threaded server (Werkzeug ``threaded=True``, gunicorn's
``gthread`` worker). Several gunicorn workers share one Redis (the brokers number,
keep and fan out every message there), so a client on any worker gets every post::

    WSBROADCAST_REDIS=redis://127.0.0.1:6379/0 .venv/bin/gunicorn --chdir examples \
        --worker-class gthread --workers 4 --threads 100 --bind 127.0.0.1:5000 'flask_app:from_environment()'
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
from typing import Optional

from flask import Flask, Response, jsonify, redirect, request, url_for

from wsbroadcast.http import static_file
from wsbroadcast.wsgi import Broker

TOPIC = "news"

#: the page (shared with the Django example, which adds its CSRF field to the form)
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "news_page.html"), encoding="utf-8") as _f:
    PAGE = _f.read()


def create_app(broker: Broker, ws_rule: str = "/live") -> Flask:
    """The demo app, serving ``broker``'s endpoint at ``ws_rule``."""
    app = Flask(__name__)
    broker.add_flask_route(app, ws_rule)

    @app.get("/")
    def index() -> str:
        return PAGE

    @app.get("/wsbroadcast.js")
    def client_script() -> Response:  # the browser client, from the package
        return Response(static_file("/wsbroadcast.js"), mimetype="text/javascript")

    @app.post("/say")
    def say():  # type: ignore[no-untyped-def]
        text = request.form.get("text", "").strip()
        if not text:
            return jsonify(error="empty"), 400
        seq, _epoch = broker.publish(TOPIC, text)
        if request.accept_mimetypes.best == "application/json":
            return jsonify(topic=TOPIC, seq=seq)
        return redirect(url_for("index"), code=303)  # a plain form post without JavaScript

    return app


def from_environment() -> Flask:
    """The app with a broker of its own, for a WSGI server such as gunicorn (one per worker).

    ``$WSBROADCAST_REDIS`` (redis://HOST:PORT/DB): the broker shares seqs, history and
    fan-out through it with the other workers; without it, history is in memory and
    only one worker may run.
    """
    # the broker's log lines (ready, Redis lost and back, slow consumers), with the worker's pid
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    broker = Broker(store="memory", redis_url=os.environ.get("WSBROADCAST_REDIS") or None).start()
    broker.shutdown_on_signal()  # gunicorn stops a worker with SIGTERM: 1001 to its clients at once
    atexit.register(broker.shutdown)  # and the shutdown is over before the worker exits
    return create_app(broker)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--store", default="memory", help='"memory" or a SQLite file')
    parser.add_argument("--redis", metavar="URL", help="share seqs, history and fan-out through Redis")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    broker = Broker(store=args.store, redis_url=args.redis).start()
    try:
        # threaded: every WebSocket holds its request thread; no reloader, no debugger
        create_app(broker).run(args.host, args.port, threaded=True, use_reloader=False, debug=False)
    finally:
        broker.shutdown()


if __name__ == "__main__":
    main()
