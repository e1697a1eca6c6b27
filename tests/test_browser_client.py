"""wsbroadcast.js in Chromium: a page of another origin loads it from the broker and uses it.

The page is served by a small HTTP server of the test (another port, so another
origin, allowed with ``allowed_origins``), as a web application would load the client.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from typing import Any, Dict, Iterator, List

import pytest
from browserutil import (  # noqa: F401  (driver is a fixture)
    ARTIFACTS,
    NETWORK_ERROR,
    ROOT,
    WAIT,
    assert_no_console_errors,
    driver,
)
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait

from conftest import SCALE

from wsbroadcast import Server
from wsbroadcast.auth import mint_token
from wsbroadcast.store import SqliteStore

#: the page: loads the client from the broker, records what it reports on window.t
PAGE = """<!doctype html>
<meta charset="utf-8"><title>wsbroadcast.js test page</title><link rel="icon" href="data:,">
<script src="%(broker)s/wsbroadcast.js"></script>
<script>
var q = new URLSearchParams(location.search);
window.t = {messages: [], states: [], gaps: [], tokens: 0, errors: []};
var opts = {minDelay: 50, maxDelay: 500, token: q.get("token")};
if (q.get("renew")) opts.getToken = function () { window.t.tokens++; return window.t.nextToken; };
window.client = wsbroadcast.connect("%(ws)s", opts);
client.on("state", function (e) { t.states.push([e.state, e.code || null, e.reason || null]); });
client.on("gap", function (g) { t.gaps.push(g); });
client.on("error", function (e) { t.errors.push(e.code); });
client.subscribe(q.get("topic") || "demo", function (m) { t.messages.push([m.topic, m.seq, m.data]); });
</script>
"""


#: the same client as an ES module, imported from the broker by a page of another origin
MODULE_PAGE = """<!doctype html>
<meta charset="utf-8"><title>wsbroadcast.mjs test page</title><link rel="icon" href="data:,">
<script type="module">
import wsbroadcast, { connect, SUBPROTOCOL } from "%(broker)s/wsbroadcast.mjs";
window.t = {messages: [], protocol: SUBPROTOCOL, same: wsbroadcast.connect === connect};
window.client = connect("%(ws)s", {minDelay: 50});
client.subscribe("demo", (m) => t.messages.push([m.topic, m.seq, m.data]));
</script>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    pages: Dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        page = self.pages.get(self.path.split("?")[0])
        if page is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def app_origin() -> Iterator[Any]:
    """An HTTP server for the test page: ``serve(broker_port)`` returns its URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="test-page-server", daemon=True)
    thread.start()
    origin = "http://127.0.0.1:%d" % httpd.server_port

    def serve(broker_port: int) -> str:
        broker = "http://127.0.0.1:%d" % broker_port
        where = {"broker": broker, "ws": "ws://127.0.0.1:%d/ws" % broker_port}
        _Handler.pages = {"/page.html": (PAGE % where).encode(), "/module.html": (MODULE_PAGE % where).encode()}
        return origin + "/page.html"

    serve.origin = origin  # type: ignore[attr-defined]
    try:
        yield serve
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


def _wait(driver: Any, condition: Any, message: str, timeout: float = WAIT) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


def _t(driver: Any) -> Dict[str, Any]:
    return driver.execute_script("return window.t")


def _messages(driver: Any) -> List[list]:
    return _t(driver)["messages"]


def _connected(driver: Any) -> bool:
    return driver.execute_script("return window.client && window.client.state") == "connected"


def _subscribed(driver: Any) -> bool:
    return driver.execute_script(
        "return window.client.subscriptions().every(function (s) { return s.status === 'active'; })")


def _restart(serve: Any, db: str, driver: Any, gap_expected: bool) -> None:
    """Subscribe, restart the server on the same port and store, check what the page got."""
    origin = serve.origin
    settings: Dict[str, Any] = {"store": db, "allowed_origins": (origin,), "close_timeout": 2.0 * SCALE}
    srv = Server("127.0.0.1", 0, **settings).start()
    port = srv.port
    srv2 = None
    driver.get_log("browser")  # drop what earlier tests left
    try:
        driver.get(serve(port))
        _wait(driver, lambda: _connected(driver) and _subscribed(driver), "the page did not subscribe")
        srv.publish("demo", "one")
        srv.publish("demo", "two")
        _wait(driver, lambda: len(_messages(driver)) == 2, "the live messages did not arrive")
        srv.shutdown()
        _wait(driver, lambda: not _connected(driver), "the page did not see the server go")
        if db != "memory":
            # stored while no server runs: only a resume from the history can bring them
            with SqliteStore(db) as store:
                store.append_batch([("demo", json.dumps("while away %d" % i)) for i in range(3)])
        srv2 = Server("127.0.0.1", port, **settings).start()
        _wait(driver, lambda: _connected(driver) and _subscribed(driver), "the page did not come back")
        srv2.publish("demo", "after")
        if gap_expected:
            _wait(driver, lambda: [m[2] for m in _messages(driver)][-1:] == ["after"],
                  "no message after the restart")
            t = _t(driver)
            assert [m[1:] for m in t["messages"]] == [[1, "one"], [2, "two"], [1, "after"]]
            assert len(t["gaps"]) == 1 and t["gaps"][0]["topic"] == "demo"
            assert t["gaps"][0]["epochChanged"] is True and t["gaps"][0]["since"] == 2
        else:
            _wait(driver, lambda: len(_messages(driver)) >= 6, "the missed messages did not arrive")
            t = _t(driver)
            assert [m[1:] for m in t["messages"]] == [
                [1, "one"], [2, "two"], [3, "while away 0"], [4, "while away 1"], [5, "while away 2"],
                [6, "after"]]
            assert t["gaps"] == []
        states = [s[0] for s in t["states"]]
        assert states[:2] == ["connecting", "connected"] and "disconnected" in states
        assert states[-1] == "connected"
        assert t["errors"] == []
        assert driver.execute_script("return window.__errors") == []
        assert_no_console_errors(driver, allowed=NETWORK_ERROR)
        driver.get("about:blank")  # leave before the server goes: no retries to log
    finally:
        srv.shutdown()
        if srv2 is not None:
            srv2.shutdown()


@pytest.mark.timeout(60)
def test_resumes_after_restart_on_sqlite_in_order_without_duplicates(tmp_path, app_origin, driver):
    _restart(app_origin, str(tmp_path / "h.db"), driver, gap_expected=False)


@pytest.mark.timeout(60)
def test_reports_the_gap_after_restart_on_memory(app_origin, driver):
    _restart(app_origin, "memory", driver, gap_expected=True)


@pytest.mark.timeout(90)
def test_dashboard_shows_live_figures_during_a_stress_run(make_server, driver):
    srv = make_server()
    driver.get_log("browser")
    driver.get(srv.http_url + "/dashboard")
    _wait(driver, lambda: driver.execute_script("return window.wsbDashboard && window.wsbDashboard.stats"),
          "the dashboard read no /stats")
    stress = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "stress.py"), "--url", srv.url,
         "--subscribers", "4", "--publishers", "2", "--rate", "100", "--duration", str(8 * SCALE),
         "--drain", "2", "--quiet"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def live() -> bool:
            d = driver.execute_script("return window.wsbDashboard")
            r = d["rates"]
            return (d["stats"]["connections"] >= 6 and d["stats"]["subscriptions"] >= 4 and r is not None
                    and r["inRate"] > 0 and r["outRate"] > 0 and r["bytes"] > 0 and d["stats"]["topics"] != [])
        _wait(driver, live, "the dashboard showed no live figures", timeout=30 * SCALE)
        _wait(driver, lambda: driver.execute_script("return window.wsbDashboard.points") >= 3,
              "the charts got no points")
        shown = driver.execute_script(
            "return ['v-connections', 'v-in', 'v-out', 'v-bytes'].map(function (id) {"
            " return document.getElementById(id).textContent; })")
        assert all(v not in ("0", "–", "") for v in shown), shown
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert driver.save_screenshot(os.path.join(ARTIFACTS, "dashboard.png"))
        assert driver.execute_script("return window.__errors") == []
        assert_no_console_errors(driver)
    finally:
        stress.kill()
        stress.wait(10)
    driver.get("about:blank")


@pytest.mark.timeout(60)
def test_publish_rejects_with_the_server_code_and_an_expiring_token_is_renewed(app_origin, make_server, driver):
    secret = "browser-client-secret-0123456789abcdef"
    srv = make_server(secret=secret, allowed_origins=(app_origin.origin,))

    def mint(lifetime: float) -> str:
        return mint_token(secret, sub="page", subscribe=["demo"], publish=["demo"], lifetime=lifetime)

    driver.get_log("browser")
    first = mint(8 * SCALE)  # (whole seconds: a page load, a connect and two publishes before it ends)
    driver.get(app_origin(srv.port) + "?renew=1&token=" + first)
    _wait(driver, lambda: _connected(driver) and _subscribed(driver), "the page did not subscribe")
    rejection = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "client.publish('other', 1).then(function (r) { done(['resolved', r]); },"
        " function (e) { done([e.code, e.message, e.name]); });")
    assert rejection == ["forbidden", "not allowed to publish on other", "WsbroadcastError"]
    ack = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "client.publish('demo', 'mine').then(done, function (e) { done(String(e)); });")
    assert ack["seq"] == 1 and ack["topic"] == "demo" and isinstance(ack["epoch"], str)

    # the token runs out: the server closes with 1008, getToken gives a new one, nothing is lost
    driver.execute_script("window.t.nextToken = arguments[0]", mint(600))
    srv.publish("demo", "before expiry")
    _wait(driver, lambda: any(s[1] == 1008 for s in _t(driver)["states"]), "the token did not expire",
          timeout=WAIT + 8 * SCALE)
    srv.publish("demo", "after expiry")
    _wait(driver, lambda: _connected(driver) and len(_messages(driver)) >= 3, "the page did not come back")
    t = _t(driver)
    assert [m[1:] for m in t["messages"]] == [[1, "mine"], [2, "before expiry"], [3, "after expiry"]]
    assert t["tokens"] == 1
    assert ["disconnected", 1008, "token expired"] in t["states"]
    assert t["gaps"] == [] and t["errors"] == []
    assert driver.execute_script("return window.__errors") == []
    assert_no_console_errors(driver)
    driver.get("about:blank")


#: what Chromium logs for a refused handshake and the client's probe of /stats
REFUSED = re.compile(r"WebSocket connection to '[^']*' failed|status of 40[13]")


@pytest.mark.timeout(60)
def test_a_refused_token_stops_reconnecting_until_a_new_one_is_given(app_origin, make_server, driver):
    secret = "browser-client-secret-0123456789abcdef"
    srv = make_server(secret=secret, allowed_origins=(app_origin.origin,))
    bad = mint_token("another-secret-entirely-0123456789-xyz", subscribe=["demo"])
    driver.get_log("browser")
    driver.get(app_origin(srv.port) + "?token=" + bad)
    _wait(driver, lambda: ["disconnected", 401] in [s[:2] for s in _t(driver)["states"]],
          "the page was not told of the 401")
    states = _t(driver)["states"]
    assert states[-1][:2] == ["disconnected", 401] and states[-1][2]  # the server's reason
    assert driver.execute_script("return client.state") == "disconnected"
    # stopped: no new connection within a second (the back-off would retry within 0.1 s)
    tried = srv.accepted
    with pytest.raises(TimeoutException):
        WebDriverWait(driver, 1.0, poll_frequency=0.05).until(lambda d: srv.accepted > tried)
    assert len(_t(driver)["states"]) == len(states)
    driver.execute_script("client.setToken(arguments[0])", mint_token(secret, subscribe=["demo"]))
    _wait(driver, lambda: _connected(driver) and _subscribed(driver), "setToken did not reconnect")
    srv.publish("demo", "welcome")
    _wait(driver, lambda: _messages(driver) == [["demo", 1, "welcome"]], "no message after setToken")
    assert driver.execute_script("return window.__errors") == []
    assert_no_console_errors(driver, allowed=REFUSED)
    driver.get("about:blank")


@pytest.mark.timeout(60)
def test_the_client_imports_as_an_es_module_from_another_origin(app_origin, make_server, driver):
    srv = make_server(allowed_origins=(app_origin.origin,))
    driver.get_log("browser")
    driver.get(app_origin(srv.port).replace("/page.html", "/module.html"))
    _wait(driver, lambda: _connected(driver) and _subscribed(driver), "the module page did not subscribe")
    srv.publish("demo", "via the module")
    _wait(driver, lambda: _messages(driver) == [["demo", 1, "via the module"]], "no message")
    t = _t(driver)
    assert t["protocol"] == "wsbroadcast.v1" and t["same"] is True
    assert driver.execute_script("return window.__errors") == []
    assert_no_console_errors(driver)
    driver.get("about:blank")


@pytest.mark.timeout(60)
def test_a_page_of_an_origin_the_server_refuses_stops_reconnecting(app_origin, make_server, driver):
    srv = make_server()  # the test page's origin is not allowed
    driver.get_log("browser")
    driver.get(app_origin(srv.port))
    _wait(driver, lambda: ["disconnected", 403] in [s[:2] for s in _t(driver)["states"]],
          "the page was not told of the 403")
    assert _t(driver)["states"][-1] == ["disconnected", 403, "origin not allowed"]
    tried = srv.accepted
    with pytest.raises(TimeoutException):
        WebDriverWait(driver, 1.0, poll_frequency=0.05).until(lambda d: srv.accepted > tried)
    assert driver.execute_script("return window.__errors") == []
    assert_no_console_errors(driver, allowed=REFUSED)
    driver.get("about:blank")
