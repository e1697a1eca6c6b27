#!/usr/bin/env python3
"""Run the Autobahn TestSuite (wstest fuzzingclient) against a WebSocket
echo server and summarize the results.

Examples::

    # start a server (``{port}`` is replaced by a free port, ``{python}`` by
    # this interpreter), run groups 1-10, stop the server, print the summary
    python scripts/conformance/run_autobahn.py \\
        --server-cmd "{python} scripts/conformance/echo_server.py --port {port}" \\
        --label wsbroadcast

    # against a server that is already running
    python scripts/conformance/run_autobahn.py --url ws://127.0.0.1:9001

    # summarize an earlier run again, without running anything
    python scripts/conformance/run_autobahn.py --from-outdir /tmp/autobahn-xyz

wstest itself needs Python 2.7; ``install_autobahn.sh`` beside this file
builds it into ``$AUTOBAHN_ENV`` (default ``~/.cache/wsbroadcast/autobahn-env``)
and this script calls it when wstest is missing.

Exit codes:
    0  every case's behavior is OK or INFORMATIONAL and every behaviorClose
       is OK or INFORMATIONAL
    1  some case is FAILED, NON-STRICT, UNIMPLEMENTED (or any other non-OK
       result), or some close is not OK/INFORMATIONAL, or no case ran
    2  the run could not be made (server did not start, wstest failed or
       timed out, no index.json)
    3  the suite is not installable here (pyenv's Python 2.7.18 absent)
"""

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
INSTALL_SCRIPT = os.path.join(HERE, "install_autobahn.sh")
DEFAULT_ENV = os.path.join(os.path.expanduser("~"), ".cache", "wsbroadcast", "autobahn-env")

DEFAULT_CASES = ",".join("%d.*" % group for group in range(1, 11))
DEFAULT_EXCLUDE = "12.*,13.*"

# The result strings autobahntestsuite uses (autobahntestsuite/case/case.py).
OK = "OK"
NON_STRICT = "NON-STRICT"
INFORMATIONAL = "INFORMATIONAL"
FAILED = "FAILED"
UNIMPLEMENTED = "UNIMPLEMENTED"
STANDARD_RESULTS = (OK, NON_STRICT, INFORMATIONAL, FAILED, UNIMPLEMENTED)
ACCEPTED = (OK, INFORMATIONAL)

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_NOT_INSTALLABLE = 3

# Fields of a per-case report worth showing for a case that is not OK.
DETAIL_FIELDS = (
    "description",
    "expectation",
    "result",
    "resultClose",
    "expected",
    "received",
    "expectedClose",
    "localCloseCode",
    "localCloseReason",
    "remoteCloseCode",
    "remoteCloseReason",
    "wasClean",
    "wasNotCleanReason",
    "droppedByMe",
    "failedByMe",
    "wasCloseHandshakeTimeout",
    "wasServerConnectionDropTimeout",
    "wasOpenHandshakeTimeout",
)


class RunError(Exception):
    """The suite could not be run; carries the exit code to use."""

    def __init__(self, message, code=EXIT_ERROR):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------
# Parsing (importable, no side effects)
# ---------------------------------------------------------------------------


def case_sort_key(case_id: str) -> Tuple:
    """Sort "9.10.2" after "9.2.1": compare the dotted parts as numbers."""
    key = []
    for part in case_id.split("."):
        try:
            key.append((0, int(part), ""))
        except ValueError:
            key.append((1, 0, part))
    return tuple(key)


def _count(values: List[str]) -> Dict[str, int]:
    counts = {name: 0 for name in STANDARD_RESULTS}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def summarize(index_json: Dict[str, Any], agent: Optional[str] = None) -> Dict[str, Any]:
    """Summarize wstest's ``index.json`` (``{agent: {case_id: {...}}}``).

    Returns a dict::

        {
          "agent": "wsbroadcast",
          "total": 301,
          "behavior": {"OK": 282, "NON-STRICT": 12, "INFORMATIONAL": 0,
                       "FAILED": 7, "UNIMPLEMENTED": 0},
          "behaviorClose": {"OK": 301, ...},
          "problems": [{"id": "6.4.1", "behavior": "NON-STRICT",
                        "behaviorClose": "OK", "remoteCloseCode": 1007,
                        "duration": 2003, "reportfile": "..."}, ...],
        }

    Counts always carry the five standard results; any other result string
    met (e.g. "WRONG CODE", "UNCLEAN" for behaviorClose) gets its own key.
    ``problems`` lists, in case order, every case whose behavior or
    behaviorClose is not OK/INFORMATIONAL.

    ``agent`` picks one agent; it may be left out when the index holds one.
    """
    if not isinstance(index_json, dict) or not index_json:
        raise ValueError("index.json holds no agent")
    if agent is None:
        if len(index_json) != 1:
            raise ValueError("index.json holds several agents (%s): pick one" % ", ".join(sorted(index_json)))
        agent = next(iter(index_json))
    if agent not in index_json:
        raise ValueError("agent %r not in index.json (has: %s)" % (agent, ", ".join(sorted(index_json))))

    cases = index_json[agent]
    behaviors = []
    closes = []
    problems = []
    for case_id in sorted(cases, key=case_sort_key):
        entry = cases[case_id]
        behavior = entry.get("behavior", "MISSING")
        close = entry.get("behaviorClose", "MISSING")
        behaviors.append(behavior)
        closes.append(close)
        if behavior not in ACCEPTED or close not in ACCEPTED:
            problems.append(
                {
                    "id": case_id,
                    "behavior": behavior,
                    "behaviorClose": close,
                    "remoteCloseCode": entry.get("remoteCloseCode"),
                    "duration": entry.get("duration"),
                    "reportfile": entry.get("reportfile"),
                }
            )
    return {
        "agent": agent,
        "total": len(cases),
        "behavior": _count(behaviors),
        "behaviorClose": _count(closes),
        "problems": problems,
    }


def passed(summary: Dict[str, Any]) -> bool:
    """True when at least one case ran, no behavior is other than
    OK/INFORMATIONAL (so 0 FAILED, 0 NON-STRICT, 0 UNIMPLEMENTED) and every
    behaviorClose is OK or INFORMATIONAL."""
    if summary.get("total", 0) <= 0:
        return False
    for key in ("behavior", "behaviorClose"):
        for result, count in summary[key].items():
            if result not in ACCEPTED and count:
                return False
    return True


def _shorten(value: Any, limit: int = 240) -> Any:
    """Cut long strings (payloads of 16 MiB messages) inside a JSON value."""
    if isinstance(value, str):
        if len(value) > limit:
            return "%s ... (%d chars)" % (value[:limit], len(value))
        return value
    if isinstance(value, list):
        if len(value) > 20:
            return [_shorten(v, limit) for v in value[:20]] + ["... (%d items)" % len(value)]
        return [_shorten(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _shorten(v, limit) for k, v in value.items()}
    return value


def _plain(text: str) -> str:
    """The suite's descriptions carry HTML (<br>, <b>) and newlines."""
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    return " ".join(text.split())


def case_details(outdir: str, reportfile: str) -> Dict[str, Any]:
    """The interesting fields of one per-case JSON report (payloads cut)."""
    path = os.path.join(outdir, reportfile)
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    details = {}
    for field in DETAIL_FIELDS:
        if field not in report:
            continue
        value = report[field]
        if field in ("description", "expectation") and isinstance(value, str):
            value = _plain(value)
        details[field] = _shorten(value, 2000 if field in ("description", "expectation") else 240)
    return details


def add_details(summary: Dict[str, Any], report_dir: str) -> Dict[str, Any]:
    """Attach ``details`` (from the per-case reports) to every problem."""
    for problem in summary["problems"]:
        reportfile = problem.get("reportfile")
        if not reportfile:
            continue
        try:
            problem["details"] = case_details(report_dir, reportfile)
        except (OSError, ValueError) as exc:
            problem["details"] = {"error": "cannot read %s: %s" % (reportfile, exc)}
    return summary


def find_index(outdir: str) -> Optional[str]:
    """wstest writes index.json straight into the spec's outdir; specs in
    the wild often use ``reports/servers`` under it, so look there too."""
    for candidate in (
        os.path.join(outdir, "index.json"),
        os.path.join(outdir, "reports", "servers", "index.json"),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def format_summary(summary: Dict[str, Any]) -> str:
    lines = []
    verdict = "PASSED" if passed(summary) else "FAILED"
    lines.append("Autobahn TestSuite: agent %s, %d cases: %s" % (summary["agent"], summary["total"], verdict))
    for key in ("behavior", "behaviorClose"):
        counts = summary[key]
        names = list(STANDARD_RESULTS) + sorted(k for k in counts if k not in STANDARD_RESULTS)
        lines.append("  %-14s %s" % (key + ":", "  ".join("%s %d" % (n, counts.get(n, 0)) for n in names)))
    if summary.get("elapsed") is not None:
        lines.append("  wstest run:    %.1f s" % summary["elapsed"])
    if summary.get("outdir"):
        lines.append("  reports:       %s" % os.path.join(summary["outdir"], "index.html"))
    problems = summary["problems"]
    if problems:
        lines.append("")
        lines.append("Cases not OK/INFORMATIONAL (%d):" % len(problems))
        for problem in problems:
            lines.append(
                "  %-9s behavior=%-13s close=%-10s remoteCloseCode=%s"
                % (problem["id"], problem["behavior"], problem["behaviorClose"], problem.get("remoteCloseCode"))
            )
            details = problem.get("details") or {}
            for field in ("description", "expectation", "result", "resultClose", "expected", "received",
                          "expectedClose", "remoteCloseReason", "wasClean", "wasNotCleanReason", "error"):
                if field in details and details[field] not in (None, ""):
                    value = details[field]
                    if not isinstance(value, str):
                        value = json.dumps(value)
                    lines.append("      %-17s %s" % (field + ":", value))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_tcp(host: str, port: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RunError("server exited with code %s before accepting connections" % proc.returncode)
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RunError("nothing accepts TCP on %s:%d after %.0f s" % (host, port, timeout))
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # the process was started in its own session
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wstest_path() -> str:
    env_dir = os.environ.get("AUTOBAHN_ENV") or DEFAULT_ENV
    return os.path.join(env_dir, "bin", "wstest")


def ensure_wstest(install: bool) -> str:
    wstest = wstest_path()
    if os.access(wstest, os.X_OK):
        return wstest
    if not install:
        raise RunError("%s not found; run %s" % (wstest, INSTALL_SCRIPT))
    print("wstest not found, running %s" % INSTALL_SCRIPT, file=sys.stderr)
    rc = subprocess.call(["bash", INSTALL_SCRIPT])
    if rc == EXIT_NOT_INSTALLABLE:
        raise RunError("the Autobahn TestSuite is not installable here (no Python 2.7.18)", EXIT_NOT_INSTALLABLE)
    if rc != 0 or not os.access(wstest, os.X_OK):
        raise RunError("%s failed with code %d" % (INSTALL_SCRIPT, rc))
    return wstest


def split_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def write_spec(path: str, outdir: str, label: str, url: str, cases: List[str], exclude: List[str]) -> Dict:
    spec = {
        "outdir": outdir,
        "servers": [{"agent": label, "url": url}],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
        f.write("\n")
    return spec


def start_server(cmd_template: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = cmd_template.replace("{port}", str(port)).replace("{python}", shlex.quote(sys.executable))
    argv = shlex.split(cmd)
    env = dict(os.environ)
    # Let a script under scripts/ import the package from this checkout.
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_file = open(log_path, "wb")
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise RunError("cannot start server %r: %s" % (cmd, exc))
    finally:
        log_file.close()


def run_wstest(wstest: str, spec_path: str, log_path: str, timeout: float, cwd: str) -> float:
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [wstest, "-m", "fuzzingclient", "-s", spec_path],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc, grace=2.0)
            raise RunError("wstest did not finish within %.0f s (log: %s)" % (timeout, log_path))
        except BaseException:
            stop_process(proc, grace=2.0)
            raise
    if rc != 0:
        raise RunError("wstest exited with code %d (log: %s)" % (rc, log_path))
    return time.monotonic() - started


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run(args: argparse.Namespace) -> Dict[str, Any]:
    label = args.label or "testee"
    wstest = ensure_wstest(install=not args.no_install)
    outdir = os.path.abspath(args.outdir or tempfile.mkdtemp(prefix="autobahn-"))
    os.makedirs(outdir, exist_ok=True)
    stale = os.path.join(outdir, "index.json")
    if os.path.exists(stale):
        os.unlink(stale)

    server = None
    server_log = os.path.join(outdir, "server.log")
    try:
        if args.server_cmd:
            host = "127.0.0.1"
            port = args.port or free_port(host)
            url = "ws://%s:%d" % (host, port)
            server = start_server(args.server_cmd, port, server_log)
        else:
            url = args.url
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise RunError("--url must look like ws://HOST:PORT[/path]")
            host = parts.hostname
            port = parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            wait_for_tcp(host, port, args.startup_timeout, server)
        except RunError as exc:
            if server is not None:
                raise RunError("%s\n--- server log (%s) ---\n%s" % (exc, server_log, tail(server_log)))
            raise

        spec_path = os.path.join(outdir, "spec.json")
        write_spec(spec_path, outdir, label, url, split_list(args.cases), split_list(args.exclude))
        print("running wstest against %s (cases %s, excluding %s), reports in %s"
              % (url, args.cases, args.exclude or "none", outdir), file=sys.stderr)
        elapsed = run_wstest(wstest, spec_path, os.path.join(outdir, "wstest.log"), args.timeout, outdir)
    finally:
        if server is not None:
            stop_process(server)

    summary = load_summary(outdir, label)
    summary["elapsed"] = round(elapsed, 1)
    return summary


def load_summary(outdir: str, agent: Optional[str]) -> Dict[str, Any]:
    index_path = find_index(outdir)
    if index_path is None:
        raise RunError("no index.json under %s (wstest log: %s)" % (outdir, os.path.join(outdir, "wstest.log")))
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    if agent is not None and agent not in index and len(index) == 1:
        agent = None
    try:
        summary = summarize(index, agent)
    except ValueError as exc:
        raise RunError(str(exc))
    summary["outdir"] = os.path.dirname(index_path)
    return add_details(summary, os.path.dirname(index_path))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the Autobahn TestSuite fuzzingclient against an echo server and summarize.",
        epilog="Exit codes: 0 passed, 1 failed cases, 2 could not run, 3 suite not installable here.",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server-cmd", help="command starting the echo server; {port} is replaced by the port "
                        "(a free one unless --port), {python} by this interpreter")
    target.add_argument("--url", help="test an already running server, e.g. ws://127.0.0.1:9001")
    target.add_argument("--from-outdir", metavar="DIR", help="only summarize the reports of an earlier run in DIR")
    parser.add_argument("--port", type=int, help="port for --server-cmd (default: a free one)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case patterns (default: %(default)s)")
    parser.add_argument("--exclude", default=DEFAULT_EXCLUDE,
                        help="comma-separated case patterns to leave out (default: %(default)s; '' for none)")
    parser.add_argument("--outdir", help="where spec, logs and reports go (default: a new temp dir)")
    parser.add_argument("--label", help="agent name in the reports (default: testee)")
    parser.add_argument("--timeout", type=float, default=900.0, help="time limit for wstest, s (default: %(default)s)")
    parser.add_argument("--startup-timeout", type=float, default=20.0,
                        help="time allowed for the server to accept TCP, s (default: %(default)s)")
    parser.add_argument("--no-install", action="store_true", help="do not run install_autobahn.sh when wstest is missing")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.from_outdir:
            summary = load_summary(os.path.abspath(args.from_outdir), args.label)
        else:
            summary = run(args)
    except RunError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "exit_code": exc.code}, indent=2))
        print("run_autobahn: %s" % exc, file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("run_autobahn: interrupted", file=sys.stderr)
        return EXIT_ERROR

    summary["passed"] = passed(summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return EXIT_PASSED if summary["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
