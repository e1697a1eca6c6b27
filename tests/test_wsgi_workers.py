"""The mounted broker under gunicorn with several ``gthread`` workers sharing one Redis.

The Flask and the Django example, each with ``-w 4``: a client on any worker gets every
message posted through any worker, in seq order, and resumes with ``recovered: true``
on another worker when its own is killed.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import List

import pytest

import fleet
import wsraw
from redis_server import RedisServer

pytest.importorskip("redis")
pytest.importorskip("simple_websocket")
gunicorn = pytest.importorskip("gunicorn")

SCALE = fleet.SCALE
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
WORKERS = 4


class Gunicorn:
    """gunicorn with ``workers`` gthread workers on 127.0.0.1 and a free port."""

    def __init__(self, app: str, env: dict, workers: int = WORKERS, threads: int = 220) -> None:
        from gunicorn.config import KNOWN_SETTINGS

        cmd = [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", str(workers),
               "--threads", str(threads), "--bind", "127.0.0.1:0", "--chdir", EXAMPLES,
               "--graceful-timeout", str(int(10 * SCALE)), app]
        if any("--no-control-socket" in (s.cli or ()) for s in KNOWN_SETTINGS):
            cmd.insert(3, "--no-control-socket")  # gunicorn >= 25 would make ~/.gunicorn/ otherwise
        # the workers import wsbroadcast from this tree, installed or not
        env = dict(os.environ, **env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        self.lines: List[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=EXAMPLES, env=env)
        self._reader = threading.Thread(target=self._read, name="test-gunicorn-log", daemon=True)
        self._reader.start()
        found = wsraw.wait_for(lambda: self.port or self.proc.poll() is not None, 30 * SCALE)
        assert found and self.port, "gunicorn %s did not start:\n%s" % (gunicorn.__version__,
                                                                        "\n".join(self.lines))

    port = 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def workers(self) -> List[int]:
        """The worker pids once all ``WORKERS`` run their app (their brokers are ready)."""
        assert wsraw.wait_for(lambda: sum("broker ready" in line for line in self.lines) >= WORKERS
                              and len(fleet.children(self.proc.pid)) == WORKERS, 30 * SCALE), \
            "\n".join(self.lines)
        return fleet.children(self.proc.pid)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30 * SCALE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self._reader.join(5)


def _check(app: str, publish, tmp_path) -> None:
    with RedisServer(str(tmp_path / "redis")) as rs:
        g = Gunicorn(app, {"WSBROADCAST_REDIS": rs.url})
        try:
            pids = g.workers()
            subs = fleet.check_fleet(g.port, "/live", pids, lambda conn, text: publish(g.port, conn, text),
                                     lambda pid: os.kill(pid, signal.SIGKILL))
            # gunicorn starts another worker in place of the killed one
            assert wsraw.wait_for(lambda: len(fleet.children(g.proc.pid)) == WORKERS, 30 * SCALE)
            for s in subs:
                s.stopping = True
            started = time.monotonic()
            assert g.stop() == 0, "\n".join(g.lines[-30:])
            for s in subs:  # every worker's broker closed its clients with 1001 at exit
                s.thread.join(max(0.1, started + 20 * SCALE - time.monotonic()))
                assert s.close_code == 1001, (s.close_code, s.error)
        finally:
            if g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait(5)


def _form(text: str, **extra: str) -> bytes:
    return urllib.parse.urlencode(dict(text=text, **extra)).encode()


@pytest.mark.timeout(120)
def test_flask_example_under_gunicorn_four_workers(tmp_path):
    def publish(port: int, conn: http.client.HTTPConnection, text: str):
        return fleet.post(conn, "/say", _form(text), "application/x-www-form-urlencoded")

    pytest.importorskip("flask")
    _check("flask_app:from_environment()", publish, tmp_path)


@pytest.mark.timeout(120)
def test_django_example_under_gunicorn_four_workers(tmp_path):
    """The view publishes (with Django's CSRF check), the mounted endpoint serves /live."""
    pytest.importorskip("django")

    def publish(port: int, conn: http.client.HTTPConnection, text: str):
        conn.request("GET", "/")
        page = conn.getresponse()
        body = page.read().decode()
        cookie = page.getheader("Set-Cookie", "")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', body)
        secret = re.search(r"csrftoken=([^;]+)", cookie)
        assert page.status == 200 and token and secret, (page.status, cookie)
        return fleet.post(conn, "/say", _form(text, csrfmiddlewaretoken=token.group(1)),
                          "application/x-www-form-urlencoded", {"Cookie": "csrftoken=" + secret.group(1)})

    _check("django_app:application", publish, tmp_path)
