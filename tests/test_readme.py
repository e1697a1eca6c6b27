"""The README's first command, run from a fresh clone in a fresh virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()][:2]


def _port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_readme_opens_with_the_two_commands():
    serve, test = _readme_commands()
    assert "pip install ." in serve and "wsbroadcast serve" in serve
    assert test == "scripts/test"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "exec scripts/test" in f.read()


@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to clone")
def test_install_and_serve_command_from_a_fresh_clone(tmp_path):
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout with commits")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True, timeout=120)
    command = _readme_commands()[0]
    if not _port_free(8080):
        command = command.replace("wsbroadcast serve", "wsbroadcast serve --port 0")
    command = command.replace("python3 ", sys.executable + " ", 1)  # the interpreter under test
    proc = subprocess.Popen(["bash", "-c", command], cwd=str(clone),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    port = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)/ws", line)
            if m:
                port.append(int(m.group(1)))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, name="test-readme-log", daemon=True)
    reader.start()
    try:
        assert ready.wait(540) and port, "server did not start:\n" + "".join(lines[-40:])
        base = "http://127.0.0.1:%d" % port[0]
        page = urllib.request.urlopen(base + "/", timeout=10)
        assert page.status == 200 and b"wsbroadcast" in page.read()
        assert urllib.request.urlopen(base + "/healthz", timeout=10).status == 200
        assert (clone / "wsbroadcast.db").exists()  # the embedded default store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(30)
        reader.join(10)
    assert code == 0, "".join(lines[-20:])
