"""The Autobahn TestSuite against the echo server built from the broker's own code: groups 1-10,
and a sample of groups 12 and 13 (permessage-deflate) on the newest interpreter only.

Groups 12 and 13 (216 cases, 1000 round trips each) take 20-35 minutes on a loaded 2-core
machine; run them all with::

    python scripts/conformance/run_autobahn.py --cases '12.*,13.*' --exclude '' \
        --server-cmd '{python} scripts/conformance/echo_server.py --port {port}'
"""

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


#: 1 KiB messages: JSON and binary data (group 12), and five offer/answer pairs of group 13
#: (default, client no context takeover, 9-bit windows, both, a list of three offers);
#: 8 KiB messages in 256-byte fragments under the list of three offers
DEFLATE_SAMPLE = ["12.1.4", "12.2.4", "13.1.4", "13.2.4", "13.3.4", "13.5.4", "13.7.4", "13.7.11"]

if sys.version_info >= (3, 13):  # one interpreter of the CI matrix: the sample takes 20-40 s
    @pytest.mark.timeout(900)
    @pytest.mark.skipif(not os.path.exists(PY27),
                        reason="pyenv's Python 2.7.18 is absent: the Autobahn suite cannot run")
    def test_autobahn_permessage_deflate_sample(tmp_path):
        cmd = [sys.executable, RUNNER, "--server-cmd", "{python} scripts/conformance/echo_server.py --port {port}",
               "--label", "wsbroadcast", "--outdir", str(tmp_path), "--json",
               "--cases", ",".join(DEFLATE_SAMPLE), "--exclude", ""]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=880)
        if proc.returncode == 3:
            pytest.skip("the Autobahn suite is not installable here: " + proc.stdout[-500:])
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        print(json.dumps(summary, indent=1))
        assert proc.returncode == 0, proc.stdout[-5000:]
        assert summary["behavior"] == dict.fromkeys(summary["behavior"], 0) | {"OK": len(DEFLATE_SAMPLE)}
        assert summary["behaviorClose"] == dict.fromkeys(summary["behaviorClose"], 0) | {"OK": len(DEFLATE_SAMPLE)}
