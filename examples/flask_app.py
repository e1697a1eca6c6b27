"""A Flask app with wsbroadcast mounted on its own route.

    .venv/bin/pip install '.[flask]'
    .venv/bin/python examples/flask_app.py --port 5000        # then open http://127.0.0.1:5000/

The page loads the browser client (``/wsbroadcast.js``, served from the package), connects
to the app's WebSocket route ``/live`` and subscribes to ``news``; the form POSTs to ``/say``, a
plain view that calls ``broker.publish()``. Every open page shows every post.

One broker per process: run it on a threaded server with one process (Werkzeug
``threaded=True``, or ``gunicorn --worker-class gthread --workers 1 --threads 100``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional

from flask import Flask, Response, jsonify, redirect, request, url_for

from wsbroadcast.http import static_file
from wsbroadcast.wsgi import Broker

TOPIC = "news"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wsbroadcast in Flask</title>
<link rel="icon" href="data:,">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
 #status[data-state=connected] { color: #1f8a4c; } #status { color: #b42318; }
 #messages { list-style: none; padding: 0; } #messages li { border-bottom: 1px solid #ddd; padding: 4px 0; }
</style></head>
<body>
<h1>Live news <small id="status" data-state="connecting">connecting</small></h1>
<form id="say" method="post" action="/say">
  <input name="text" id="text" autocomplete="off" required placeholder="say something">
  <button id="send">Post</button>
</form>
<ul id="messages"></ul>
<script src="/wsbroadcast.js"></script>
<script>
(function () {
  "use strict";
  // reconnect, resume (since + epoch) and dedupe are wsbroadcast.js's, served by the app below
  var status = document.getElementById("status"), list = document.getElementById("messages");
  function setStatus(s) { status.textContent = s; status.setAttribute("data-state", s); }
  var client = wsbroadcast.connect((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/live");
  client.on("state", function (e) {
    setStatus(e.state === "connected" ? "subscribing" : e.state === "connecting" ? "connecting" : "reconnecting");
  });
  client.on("subscribed", function () { setStatus("connected"); });   // live from here on
  client.subscribe("news", function (m) {
    var li = document.createElement("li");
    li.className = "msg";
    li.setAttribute("data-seq", m.seq);
    li.textContent = "#" + m.seq + " " + m.data;
    list.insertBefore(li, list.firstChild);
  });
  document.getElementById("say").addEventListener("submit", function (ev) {
    ev.preventDefault();   // post without leaving the page; the update comes back over the WebSocket
    var form = ev.target;
    fetch(form.action, {method: "POST", body: new FormData(form), headers: {Accept: "application/json"}})
      .then(function () { form.reset(); });
  });
})();
</script>
</body></html>
"""


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


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--store", default="memory", help='"memory" or a SQLite file')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    broker = Broker(store=args.store).start()
    try:
        # threaded: every WebSocket holds its request thread; no reloader, no debugger
        create_app(broker).run(args.host, args.port, threaded=True, use_reloader=False, debug=False)
    finally:
        broker.shutdown()


if __name__ == "__main__":
    main()
