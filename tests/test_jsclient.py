"""wsbroadcast.js's own tests, in node's test runner (tests/js/), without a browser.

``fake.test.js`` drives the client with an injected WebSocket (back-off, resume, dedupe,
gaps, tokens, offline); ``server.test.js`` runs it against a real broker started here, over
node's WebSocket (node 22, or node 20 with --experimental-websocket). ``scripts/test``
installs Debian's nodejs when ``node`` is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import List, Optional

import pytest

from conftest import SCALE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JS_TESTS = os.path.join(ROOT, "tests", "js")
NODE = shutil.which("node")

if NODE is None:
    pytest.skip("needs node (scripts/test installs Debian's nodejs)", allow_module_level=True)


def _websocket_flags() -> Optional[List[str]]:
    """The flags that give this node a global WebSocket, or None when it has none."""
    for flags in ([], ["--experimental-websocket"]):
        done = subprocess.run([NODE] + flags + ["-e", "process.stdout.write(typeof WebSocket)"],
                              capture_output=True, text=True, timeout=30 * SCALE)
        if done.returncode == 0 and done.stdout == "function":
            return flags
    return None


def _run(flags: List[str], test_file: str, env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    done = subprocess.run([NODE] + flags + ["--test", os.path.join(JS_TESTS, test_file)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=90 * SCALE)
    out = done.stdout + done.stderr
    assert done.returncode == 0, "node --test %s failed:\n%s" % (test_file, out[-6000:])
    counts = dict(re.findall(r"^# (pass|fail|skipped) (\d+)$", out, re.M))
    assert int(counts.get("pass", 0)) > 0 and counts.get("fail") == "0", out[-3000:]
    return out


@pytest.mark.timeout(120)
def test_js_client_logic_with_an_injected_socket():
    out = _run([], "fake.test.js", {})
    assert re.search(r"^# skipped 0$", out, re.M), out[-3000:]


@pytest.mark.timeout(120)
def test_js_client_against_a_real_broker(make_server):
    flags = _websocket_flags()
    if flags is None:
        pytest.skip("this node has no WebSocket (node 22, or 20.10+ with --experimental-websocket); "
                    "the Chromium tests cover the client against a real broker")
    srv = make_server()
    out = _run(flags, "server.test.js", {"WSB_URL": srv.url})
    assert re.search(r"^# skipped 0$", out, re.M), out[-3000:]
