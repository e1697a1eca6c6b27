"""The test suite's own rules: a missing tool skips only what needs it, and CI fails on any skip."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_pytest(args: List[str], env_extra: Optional[Dict[str, str]] = None,
               path: Optional[str] = None) -> Tuple[int, str]:
    """Run pytest on the repository in a child process; (exit code, output)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "WSBROADCAST_REDIS_SERVER", "PYTEST_ADDOPTS")}
    if path is not None:
        env["PATH"] = path
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + args,
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    return proc.returncode, proc.stdout


def test_missing_redis_server_skips_its_module_only(tmp_path):
    # a PATH without redis-server: test_redis.py is skipped whole, the other file still collected
    rc, out = run_pytest(["--collect-only", "tests/test_redis.py", "tests/test_envelope.py"],
                         path=str(tmp_path))
    assert rc == 0, out
    assert "redis-server is not installed" in out, out
    assert "ERROR" not in out and "error during collection" not in out, out
    assert "tests/test_envelope.py::" in out, out


SKIPPING = '''
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no frobnicator here")
'''


def test_a_skip_fails_the_run_under_ci_and_says_what_is_missing(tmp_path):
    (tmp_path / "conftest.py").write_text("from conftest import *  # noqa: F401,F403\n")
    f = tmp_path / "test_skipping.py"
    f.write_text(SKIPPING)
    pythonpath = {"PYTHONPATH": os.pathsep.join([HERE, ROOT])}
    args = ["-p", "conftest", "--rootdir", str(tmp_path), str(f)]
    rc, out = run_pytest(args, dict(pythonpath, CI="true"))
    assert rc == 1, out
    assert "MISSING: test_skipping.py::test_skips: no frobnicator here" in out, out
    rc, out = run_pytest(args, pythonpath)  # outside CI a skip is only reported
    assert rc == 0 and "1 skipped" in out and "MISSING" not in out, out
    f.write_text(SKIPPING.replace('pytest.skip("no frobnicator here")', "pass"))
    rc, out = run_pytest(args, dict(pythonpath, CI="true"))  # nothing skipped: CI passes
    assert rc == 0 and "2 passed" in out, out


def test_a_module_skipped_at_collection_fails_the_run_under_ci(tmp_path):
    rc, out = run_pytest(["tests/test_redis.py", "-k", "nothing_matches_this"], {"CI": "true"},
                         path=str(tmp_path))
    assert rc == 1, out
    assert "MISSING: tests/test_redis.py: redis-server is not installed" in out, out
