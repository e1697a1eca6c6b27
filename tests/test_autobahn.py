"""The Autobahn TestSuite, groups 1-10, against the echo server built from the broker's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RUNNER = os.path.join(ROOT, "scripts", "conformance", "run_autobahn.py")


def _pyenv_root() -> str:
    """$PYENV_ROOT, else what ``pyenv root`` says, else ~/.pyenv (as install_autobahn.sh does)."""
    if os.environ.get("PYENV_ROOT"):
        return os.environ["PYENV_ROOT"]
    try:
        out = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or os.path.expanduser("~/.pyenv")


PY27 = os.environ.get("AUTOBAHN_PY27") or os.path.join(_pyenv_root(), "versions", "2.7.18", "bin", "python")


@pytest.mark.timeout(900)
@pytest.mark.skipif(not os.path.exists(PY27), reason="pyenv's Python 2.7.18 is absent: the Autobahn suite cannot run")
def test_autobahn_groups_1_to_10(tmp_path):
    cmd = [sys.executable, RUNNER, "--server-cmd", "{python} scripts/conformance/echo_server.py --port {port}",
           "--label", "wsbroadcast", "--outdir", str(tmp_path), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=880)
    if proc.returncode == 3:
        pytest.skip("the Autobahn suite is not installable here: " + proc.stdout[-500:])
    summary = None
    try:
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        pass
    print(json.dumps(summary, indent=1) if summary else proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-5000:]
    behavior = summary["behavior"]
    assert behavior.get("FAILED", 0) == behavior.get("NON-STRICT", 0) == behavior.get("UNIMPLEMENTED", 0) == 0
    assert set(summary["behaviorClose"]) <= {"OK", "INFORMATIONAL"} or all(
        summary["behaviorClose"].get(k, 0) == 0 for k in summary["behaviorClose"] if k not in ("OK", "INFORMATIONAL"))
    assert sum(behavior.values()) == 301
