"""Chromium headless for the browser tests: Debian's chromium and chromedriver, driven by Selenium.

Importing this module skips the importing test module when /usr/bin/chromium or
/usr/bin/chromedriver is missing (``scripts/test`` installs both). No browser or
driver is ever downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any

import pytest

from conftest import SCALE

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("needs Debian's chromium and chromium-driver (%s, %s)" % (CHROMIUM, CHROMEDRIVER),
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look anything up

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "artifacts")
WAIT = 10.0 * SCALE

#: collects uncaught errors and unhandled rejections before the page's own script runs
ERROR_HOOK = """
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || e) + ' @' + (e.filename || '') + ':' + (e.lineno || 0));
});
window.addEventListener('unhandledrejection', function (e) {
  window.__errors.push('unhandled rejection: ' + String(e.reason));
});
"""
#: console errors a browser reports while the server is down (restart test only)
NETWORK_ERROR = re.compile(r"WebSocket connection to '[^']*' failed|net::ERR_CONNECTION_(REFUSED|RESET)")


@pytest.fixture(scope="module")
def driver():
    profile = tempfile.mkdtemp(prefix="wsb-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 "--disable-default-apps", "--disable-background-timer-throttling",
                 "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
                 "--window-size=1280,860", "--user-data-dir=" + profile):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=os.devnull)
    drv = webdriver.Chrome(service=service, options=options)
    try:
        drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
        drv.set_page_load_timeout(WAIT)
        yield drv
    finally:
        try:
            drv.quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)


def assert_no_console_errors(driver: Any, allowed: Any = None) -> None:
    severe = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    if allowed is not None:
        severe = [m for m in severe if not allowed.search(m)]
    assert not severe, "errors in the browser console: %s" % severe
