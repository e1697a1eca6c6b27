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
