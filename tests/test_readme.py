"""README.md runs as written: every block, in order, in a fresh clone and the README's own venv.

The README's first command makes ``.venv`` (with the interpreter under test in place of
``python3``) and starts the server every later example talks to. Then each fenced
block runs in order: ``sh`` blocks with bash, ``python`` blocks with ``.venv/bin/python``;
each must exit 0. An HTML comment before a block may say how to run it:

* ``<!-- readme-test: server PORT -->``: it serves on PORT until the end of the test;
  it must be accepting connections there before the next block runs;
* ``<!-- readme-test: skip (REASON) -->``: not run (only the test command itself).

Every port the README names (``8080``, ``6379``, ...) is mapped to a free one (a
private redis-server stands for Redis on 6379), so the test never needs fixed ports.
The commands of the "Measuring" table take minutes: each is run with ``--help``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import pytest

from redis_server import RedisServer, free_port, require_redis_server

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = os.path.join(ROOT, "README.md")

_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<note>[^\n]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$",
                    re.S | re.M)
_TABLE_COMMAND = re.compile(r"^\| `(?P<cmd>(?:\.venv/bin/|scripts/)[^`]+)`", re.M)
_PORT = re.compile(r"\b(?:80[0-9]{2}|500[0-9]|6379)\b")


class Block(NamedTuple):
    line: int
    lang: str
    body: str
    note: str


def readme_blocks(text: str) -> List[Block]:
    return [Block(text.count("\n", 0, m.start("body")), m.group("lang"), m.group("body"), m.group("note") or "")
            for m in _BLOCK.finditer(text)]


def _read() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_readme_opens_with_the_two_commands():
    blocks = readme_blocks(_read())
    serve, tests = blocks[0], blocks[1]
    assert serve.body.strip() == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/wsbroadcast serve"
    assert tests.body.strip() == "scripts/test" and tests.note.startswith("skip (")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "exec scripts/test" in f.read()


def test_every_example_is_a_block_the_readme_test_runs():
    text = _read()
    outside = _BLOCK.sub("", text)
    indented = [line for line in outside.splitlines() if line.startswith("    ") and line.strip()]
    assert not indented, "indented code is not run by the README test; fence it:\n" + "\n".join(indented)
    for block in readme_blocks(text):
        assert block.lang in ("sh", "python"), "block at line %d: say sh or python" % block.line
        assert block.note == "" or re.fullmatch(r"server \d+|skip \(.+\)", block.note), block.note
        if block.lang == "python":
            compile(block.body, "README.md:%d" % block.line, "exec")
    assert len([b for b in readme_blocks(text) if b.note.startswith("skip")]) == 1
    assert _TABLE_COMMAND.findall(text), "the Measuring table's commands were not found"


class _Runner:
    """Runs README blocks in ``clone`` with the README's ports mapped to ``ports``."""

    def __init__(self, clone: str, ports: Dict[str, str]) -> None:
        self.clone = clone
        self.ports = ports
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("WSBROADCAST_", "PYTEST_", "VIRTUAL_ENV"))}
        self.env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.env["PIP_VERBOSE"] = "1"  # the build backend's warnings too
        self.background: List[subprocess.Popen] = []

    def text(self, body: str) -> str:
        return _PORT.sub(lambda m: self.ports.get(m.group(0), m.group(0)), body)

    def command(self, block: Block) -> List[str]:
        if block.lang == "python":
            return [os.path.join(self.clone, ".venv", "bin", "python"), "-c", self.text(block.body)]
        return ["bash", "-e", "-o", "pipefail", "-c", self.text(block.body)]

    def run(self, block: Block, timeout: float = 300) -> None:
        start = time.monotonic()
        done = subprocess.run(self.command(block), cwd=self.clone, env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        assert done.returncode == 0, "README.md line %d exited %d:\n%s\n--- output:\n%s" % (
            block.line, done.returncode, block.body, done.stdout[-3000:])
        print("README.md line %d: %.1f s" % (block.line, time.monotonic() - start))

    def serve(self, block: Block, port: str, timeout: float = 300) -> subprocess.Popen:
        log = open(os.path.join(self.clone, "readme-server-%d.log" % block.line), "w+")
        proc = subprocess.Popen(self.command(block), cwd=self.clone, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append(proc)
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                print("README.md line %d: serving after %.1f s" % (block.line, time.monotonic() - start))
                return proc
            except OSError:
                time.sleep(0.1)  # polling a port with a deadline: nothing to wait on
        log.seek(0)
        raise AssertionError("README.md line %d did not serve on %s (exit %s):\n%s\n--- output:\n%s" % (
            block.line, port, proc.poll(), block.body, log.read()[-3000:]))

    def stop_all(self) -> List[Optional[int]]:
        codes = []
        for proc in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                codes.append(proc.wait(15))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait(15))
        return list(reversed(codes))


#: The fresh-clone run costs about a minute (a venv, three installs, six servers), so CI does
#: it once, on its newer interpreter: it is not defined on 3.9 (rather than skipped there,
#: since a skip fails a CI run). Every block is still compiled on 3.9 by the test above.
RUNS_THE_README = sys.version_info >= (3, 10)


def _every_block_of_the_readme_runs_in_a_fresh_clone(tmp_path):
    assert shutil.which("git"), "git is needed to clone the repository"
    assert subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode == 0, \
        "the README test clones the repository: run it in a git checkout with commits"
    require_redis_server()
    clone = str(tmp_path / "clone")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True, timeout=120)
    text = _read()
    with RedisServer(str(tmp_path / "redis")) as redis:
        ports = {p: str(free_port()) for p in set(_PORT.findall(text))}
        ports["6379"] = str(redis.port)
        runner = _Runner(clone, ports)
        first: Optional[subprocess.Popen] = None
        try:
            for i, block in enumerate(readme_blocks(text)):
                if block.note.startswith("skip"):
                    continue
                if i == 0:  # the install-and-serve command: the interpreter under test, a free port
                    block = block._replace(body=block.body.replace("python3 ", sys.executable + " ", 1).replace(
                        "wsbroadcast serve", "wsbroadcast serve --port 8080"))
                if block.note.startswith("server "):
                    proc = runner.serve(block, runner.text(block.note.split()[1]))
                    first = first or proc
                else:
                    runner.run(block)
            for cmd in _TABLE_COMMAND.findall(text):
                runner.run(Block(0, "sh", cmd + " --help >/dev/null", ""), timeout=120)
        finally:
            codes = runner.stop_all()
    assert first is not None and codes[0] == 0, "the first server did not stop cleanly: %s" % codes
    assert os.path.exists(os.path.join(clone, "wsbroadcast.db"))  # the default store, where it says
    with open(os.path.join(clone, "readme-server-%d.log" % readme_blocks(text)[0].line)) as f:
        install = f.read()
    assert "Successfully installed" in install, install[-3000:]
    warned = [line for line in install.splitlines() if re.search("deprecat", line, re.I)]
    assert not warned, "pip install . warned:\n" + "\n".join(warned)


if RUNS_THE_README:
    test_every_block_of_the_readme_runs_in_a_fresh_clone = pytest.mark.timeout(900)(
        _every_block_of_the_readme_runs_in_a_fresh_clone)
