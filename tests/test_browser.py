"""The demo page in a real browser: Debian's chromium, headless, driven by Selenium.

Skipped only when /usr/bin/chromium or /usr/bin/chromedriver is missing
(``scripts/test`` installs both). No browser or driver is ever downloaded.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, List

import pytest
from browserutil import (  # noqa: F401  (driver is a fixture)
    ARTIFACTS,
    NETWORK_ERROR,
    ROOT,
    WAIT,
    assert_no_console_errors,
    driver,
)
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import wsraw
from conftest import SCALE
from httputil import publish_ok

from wsbroadcast import Server
from wsbroadcast.auth import mint_token
from wsbroadcast.store import SqliteStore


class Page:
    """One browser window on the demo page."""

    def __init__(self, driver: Any, handle: str) -> None:
        self.driver = driver
        self.handle = handle

    def focus(self) -> "Page":
        if self.driver.current_window_handle != self.handle:
            self.driver.switch_to.window(self.handle)
        return self

    def wait(self, condition: Any, timeout: float = WAIT, message: str = "") -> Any:
        self.focus()
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: condition(d), message)

    def js(self, script: str, *args: Any) -> Any:
        return self.focus().driver.execute_script(script, *args)

    def state(self) -> str:
        return self.js("return window.wsbDemo ? window.wsbDemo.state : null")

    def wait_connected(self) -> None:
        self.wait(lambda d: d.find_element(By.ID, "status").text == "connected"
                  and d.find_element(By.ID, "status").get_attribute("data-state") == "connected",
                  message="the page did not connect")

    def subscribe(self, topic: str) -> None:
        self.focus()
        box = self.driver.find_element(By.ID, "sub-topic")
        box.clear()
        box.send_keys(topic)
        self.driver.find_element(By.ID, "subscribe-btn").click()
        self.wait(lambda d: d.find_elements(By.CSS_SELECTOR, '#subscriptions li.sub.active[data-topic="%s"]'
                                            % topic), message="subscription to %s not acknowledged" % topic)
        assert topic in self.js("return window.wsbDemo.subscriptions")

    def publish(self, topic: str, text: str) -> None:
        self.focus()
        box = self.driver.find_element(By.ID, "pub-topic")
        box.clear()
        box.send_keys(topic)
        data = self.driver.find_element(By.ID, "pub-data")
        data.clear()
        data.send_keys(text)
        self.driver.find_element(By.ID, "publish-btn").click()

    def messages(self, topic: str) -> List[tuple]:
        """(seq, shown data) of the message rows of ``topic``, in page order."""
        return [tuple(r) for r in self.js(
            "var topic = arguments[0];"
            "return Array.from(document.querySelectorAll('#messages div.line.msg'))"
            ".filter(function (r) { return r.getAttribute('data-topic') === topic; })"
            ".map(function (r) { return [parseInt(r.getAttribute('data-seq'), 10),"
            " r.querySelector('.data').textContent]; })", topic)]

    def wait_message(self, topic: str, seq: int, text: str) -> None:
        self.wait(lambda d: (seq, text) in self.messages(topic),
                  message="message #%d %r on %s not shown" % (seq, text, topic))

    def lines(self, kind: str) -> List[str]:
        return [e.text for e in self.focus().driver.find_elements(By.CSS_SELECTOR, "#messages div.line." + kind)]

    def js_errors(self) -> List[str]:
        return self.js("return window.__errors || []")


@pytest.fixture
def pages(driver):
    """Open demo pages in new windows; checks for JS errors and closes them at the end."""
    first = driver.current_window_handle
    driver.get_log("browser")  # drop what earlier tests left
    opened: List[Page] = []

    def open_page(url: str) -> Page:
        driver.switch_to.new_window("window")
        page = Page(driver, driver.current_window_handle)
        driver.get(url)
        opened.append(page)
        return page

    yield open_page
    try:
        errors = []
        for page in opened:
            errors.extend(page.js_errors())
        assert not errors, "JavaScript errors on the page: %s" % errors
        assert_no_console_errors(driver)
    finally:
        for page in opened:
            try:
                driver.switch_to.window(page.handle)
                driver.close()
            except WebDriverException:
                pass
        driver.switch_to.window(first)


@pytest.mark.timeout(60)
def test_two_pages_exchange_messages(make_server, pages):
    srv = make_server()
    url = srv.http_url + "/"
    a, b = pages(url), pages(url)
    for page in (a, b):
        page.wait_connected()
        page.subscribe("demo")
    a.publish("demo", "hello from A")
    b.wait_message("demo", 1, "hello from A")
    a.wait_message("demo", 1, "hello from A")  # the publisher's own copy
    a.wait(lambda d: d.find_element(By.ID, "pub-note").text == "sent #1 on demo")
    b.publish("demo", '{"n": 2}')  # valid JSON goes as JSON
    a.wait_message("demo", 2, '{"n":2}')
    b.wait_message("demo", 2, '{"n":2}')
    srv.publish("demo", {"from": "server"})
    for page in (a, b):
        page.wait_message("demo", 3, '{"from":"server"}')
        assert page.messages("demo") == [(1, "hello from A"), (2, '{"n":2}'), (3, '{"from":"server"}')]
        assert page.js("return window.wsbDemo.lastSeq")["demo"] == 3
        assert page.lines("error") == []
    os.makedirs(ARTIFACTS, exist_ok=True)
    a.focus()
    assert a.driver.save_screenshot(os.path.join(ARTIFACTS, "demo-two-pages.png"))


@pytest.mark.timeout(60)
def test_page_with_compression_negotiated(make_server, pages):
    """Chromium offers permessage-deflate: the answer names server_no_context_takeover, the
    server's messages over the threshold come compressed and the page's compressed ones are read."""
    srv = make_server()
    page = pages(srv.http_url + "/")
    page.wait_connected()
    assert page.js("return window.wsbDemo.extensions") == "permessage-deflate; server_no_context_takeover"
    assert [c.deflate for c in srv.hub.connections()] == [15]
    page.subscribe("demo")
    text = "compressible words " * 100
    before = srv.writer.compressors.calls
    page.publish("demo", text)  # the browser compresses it; the server inflates it
    page.wait_message("demo", 1, text)
    srv.publish("demo", {"from": "server", "text": text})
    page.wait_message("demo", 2, json.dumps({"from": "server", "text": text}, separators=(",", ":")))
    assert srv.writer.compressors.calls - before == 2
    assert page.lines("error") == []


@pytest.mark.timeout(60)
def test_page_and_plain_clients_see_each_other_without_a_click(make_server, pages):
    """The page opens on ``broadcast``, where the seed's plain clients talk."""
    srv = make_server()
    page = pages(srv.http_url + "/")
    page.wait_connected()
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, '#subscriptions li.sub.active[data-topic="broadcast"]'),
              message="the page did not start subscribed to broadcast")
    plain = wsraw.connect(srv.port, subprotocol=None)  # the seed's client: no subprotocol
    plain.send_json({"email": "ann@example.com", "content": "hello from the seed"})
    page.wait_message("broadcast", 1, "hello from the seed")
    assert page.js("return document.querySelector('#messages div.line.msg[data-seq=\"1\"] .from')"
                   ".textContent") == "ann@example.com"
    assert plain.recv_json() == {"email": "ann@example.com", "content": "hello from the seed"}

    # the page's own publish, on the default topic, shows in its own list and reaches the seed
    page.focus()
    assert page.driver.find_element(By.ID, "pub-topic").get_attribute("value") == "broadcast"
    page.driver.find_element(By.ID, "pub-data").send_keys("hi from the page")
    page.driver.find_element(By.ID, "publish-btn").click()
    page.wait_message("broadcast", 2, "hi from the page")
    assert plain.recv_json() == "hi from the page"
    # on a topic it does not follow, what it sent is shown once, marked as sent
    page.publish("elsewhere", "a note")
    page.wait_message("elsewhere", 1, "a note")
    assert page.js("return document.querySelectorAll('#messages div.line.msg.sent').length") == 1
    assert page.messages("broadcast") == [(1, "hello from the seed"), (2, "hi from the page")]
    assert page.lines("error") == []
    plain.close()
    os.makedirs(ARTIFACTS, exist_ok=True)
    assert page.driver.save_screenshot(os.path.join(ARTIFACTS, "demo-seed-and-page.png"))


@pytest.mark.timeout(60)
def test_disconnect_and_connect_buttons_resume_where_the_page_was(make_server, pages):
    srv = make_server()
    page = pages(srv.http_url + "/")
    page.wait_connected()
    page.subscribe("demo")
    srv.publish("demo", "first")
    page.wait_message("demo", 1, "first")
    page.driver.find_element(By.ID, "disconnect-btn").click()
    page.wait(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "disconnected",
              message="the page did not disconnect")
    assert page.driver.find_element(By.ID, "status").text == "offline"
    assert wsraw.wait_for(lambda: len(srv.hub) == 0)
    srv.publish("demo", "while disconnected")
    page.driver.find_element(By.ID, "connect-btn").click()
    page.wait_connected()
    page.wait_message("demo", 2, "while disconnected")  # resumed from #1, not from the latest
    assert page.messages("demo") == [(1, "first"), (2, "while disconnected")]
    assert page.lines("error") == []


@pytest.mark.timeout(60)
def test_refused_publish_shows_code_and_message(make_server, pages):
    srv = make_server()
    page = pages(srv.http_url + "/")
    page.wait_connected()
    page.publish("bad topic", "x")
    page.wait(lambda d: any("bad_topic" in line for line in page.lines("error")),
              message="the bad_topic error is not shown")
    line = [x for x in page.lines("error") if "bad_topic" in x][0]
    assert "publish to bad topic refused" in line
    assert re.search(r"bad_topic \u2014 \S", line), "no message after the code: %r" % line
    assert page.state() == "connected"  # the connection stays open

    # a token-restricted server: forbidden, with the server's message
    secret = "browser-test-secret-0123456789abcdef"
    guarded = make_server(secret=secret)
    token = mint_token(secret, sub="page", subscribe=["demo"], publish=["demo"])
    page2 = pages(guarded.http_url + "/?token=" + token)
    page2.wait_connected()
    page2.subscribe("demo")
    page2.publish("other", "nope")
    page2.wait(lambda d: any("forbidden" in line for line in page2.lines("error")),
               message="the forbidden error is not shown")
    line = [x for x in page2.lines("error") if "forbidden" in x][0]
    assert "publish to other refused: forbidden \u2014 not allowed to publish on other" in line
    page2.publish("demo", "allowed")
    page2.wait_message("demo", 1, "allowed")


@pytest.mark.timeout(60)
def test_page_reconnects_after_restart_and_shows_what_it_missed(tmp_path, pages, driver):
    db = str(tmp_path / "history.db")
    settings = {"store": db, "close_timeout": 2.0 * SCALE}
    srv = Server("127.0.0.1", 0, **settings).start()
    port = srv.port
    srv2 = None
    try:
        page = pages(srv.http_url + "/")
        page.wait_connected()
        page.subscribe("demo")
        page.publish("demo", "before")
        page.wait_message("demo", 1, "before")
        assert_no_console_errors(driver)
        epoch = page.js("return window.wsbDemo.epochs")["demo"]

        srv.shutdown()
        page.wait(lambda d: page.state() in ("reconnecting", "connecting"), message="the page missed the close")
        # a message is stored in the history file while no server listens, so the page can
        # only get it from the history when it resubscribes to the new server
        with SqliteStore(db) as store:
            store.append_batch([("demo", json.dumps("while away"))])
        srv2 = Server("127.0.0.1", port, **settings).start()
        publish_ok(port, "demo", "after restart")  # by replay or live, whichever comes first
        page.wait_connected()
        page.wait_message("demo", 2, "while away")
        page.wait_message("demo", 3, "after restart")
        srv2.publish("demo", "live again")
        page.wait_message("demo", 4, "live again")
        assert page.messages("demo") == [(1, "before"), (2, "while away"), (3, "after restart"),
                                         (4, "live again")]
        assert page.js("return window.wsbDemo.epochs")["demo"] == epoch  # the same numbering
        assert page.js("return window.wsbDemo.subscriptionInfo")["demo"]["status"] == "active"
        assert not [x for x in page.lines("info") if "could not be recovered" in x]
        # only the expected network errors while the server was away
        assert_no_console_errors(driver, allowed=NETWORK_ERROR)
        page.focus().driver.get("about:blank")  # leave before the server goes: no retries to log
    finally:
        srv.shutdown()
        if srv2 is not None:
            srv2.shutdown()


@pytest.mark.timeout(60)
def test_flask_example_page_shows_posts_live(pages):
    """examples/flask_app.py: the broker mounted in Flask, its page in the browser."""
    import importlib.util
    import threading

    pytest.importorskip("flask")
    from werkzeug.serving import make_server

    from wsbroadcast.wsgi import Broker

    spec = importlib.util.spec_from_file_location("wsbroadcast_flask_example_browser",
                                                  os.path.join(ROOT, "examples", "flask_app.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    broker = Broker(store="memory", close_timeout=2.0 * SCALE).start()
    httpd = make_server("127.0.0.1", 0, example.create_app(broker), threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="test-werkzeug", daemon=True)
    thread.start()
    try:
        url = "http://127.0.0.1:%d/" % httpd.server_port
        a, b = pages(url), pages(url)
        for page in (a, b):
            page.wait(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "connected",
                      message="the example page did not connect and subscribe")
        a.focus()
        a.driver.find_element(By.ID, "text").send_keys("hello from the form")
        a.driver.find_element(By.ID, "send").click()
        for page in (a, b):
            page.wait(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#messages li.msg")]
                      == ["#1 hello from the form"], message="the post did not show up live")
        broker.publish("news", "from the server")
        b.wait(lambda d: d.find_elements(By.CSS_SELECTOR, '#messages li.msg[data-seq="2"]'))
        assert not a.js_errors() + b.js_errors()
        assert_no_console_errors(a.driver)
        for page in (a, b):  # leave the pages before the server goes, or they retry and log errors
            page.focus().driver.get("about:blank")
    finally:
        broker.shutdown()
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()
