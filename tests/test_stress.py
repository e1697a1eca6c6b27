"""scripts/stress.py, the threaded stress client: run as a subprocess against in-process servers."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import pytest

from conftest import SCALE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRESS = os.path.join(ROOT, "scripts", "stress.py")
#: the interpreter's start-up, imports and the report, on top of the script's own limit
STARTUP = 10.0 * SCALE


def stress(*args: str, limit: float) -> Tuple[subprocess.CompletedProcess, float]:
    """Run the script; returns the finished process and its wall time."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, STRESS, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=limit + STARTUP)
    return proc, time.monotonic() - start


def time_limit(duration: float, ramp_up: float, drain: float, timeout: float) -> float:
    """The bound the script promises: ramp-up + duration + drain + 2 x timeout + 3 s."""
    return ramp_up + duration + drain + 2 * timeout + 3.0


def load_module():
    loader = importlib.machinery.SourceFileLoader("wsb_stress", STRESS)
    spec = importlib.util.spec_from_loader("wsb_stress", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def common(url: str, duration: float = 2.0, drain: float = 5.0, timeout: float = 5.0) -> List[str]:
    return ["--url", url, "--duration", str(duration), "--ramp-up", "0.3", "--drain", str(drain),
            "--timeout", str(timeout * SCALE), "--quiet"]


@pytest.mark.timeout(60 * SCALE)
def test_run_reports_every_message_once_and_in_order(make_server):
    srv = make_server()
    limit = time_limit(2.0, 0.3, 5.0, 5.0 * SCALE)
    proc, wall = stress(*common(srv.url), "--subscribers", "4", "--publishers", "2",
                        "--topics", "stress.a,stress.b", "--rate", "300", "--size", "200",
                        "--ack-every", "10", "--json", limit=limit)
    assert proc.returncode == 0, proc.stderr
    report: Dict[str, Any] = json.loads(proc.stdout)
    assert report["connected_subscribers"] == 4 and report["connected_publishers"] == 2
    assert report["published"] > 0
    assert report["delivered"] > 0
    assert report["delivered"] == report["expected"] == 4 * report["published"]
    assert report["lost"] == 0
    assert report["out_of_order"] == 0
    assert report["duplicates"] == 0
    assert report["connect_errors"] == 0 and report["publish_errors"] == 0
    assert report["ok"] is True
    lat = report["latency_ms"]
    assert lat["count"] == report["delivered"]
    assert 0 <= lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert report["deliveries_per_s"] > 0 and report["publish_rate"] > 0
    assert report["per_subscriber"]["received"]["total"] == report["delivered"]
    assert len(report["subscribers_detail"]) == 4
    # it ends by itself, within the bound it promises
    assert report["elapsed_s"] <= report["time_limit_s"] == pytest.approx(limit)
    assert wall <= limit + STARTUP


@pytest.mark.timeout(60 * SCALE)
def test_wildcard_subscribers_expect_only_matching_topics(make_server):
    srv = make_server()
    limit = time_limit(1.0, 0.3, 5.0, 5.0 * SCALE)
    proc, _wall = stress(*common(srv.url, duration=1.0), "--subscribers", "2", "--publishers", "1",
                         "--topics", "w.x,w.y,other", "--subscribe-pattern", "w.*", "--rate", "300",
                         "--json", limit=limit)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    per_pub = report["publishers_detail"][0]["published"]
    matching = sum(1 for n in range(per_pub) if n % 3 != 2)  # the publisher cycles over the topics
    assert report["expected"] == report["delivered"] == 2 * matching
    assert report["lost"] == report["out_of_order"] == report["duplicates"] == 0


@pytest.mark.timeout(60 * SCALE)
def test_text_report(make_server):
    srv = make_server()
    limit = time_limit(1.0, 0.3, 5.0, 5.0 * SCALE)
    proc, _wall = stress(*common(srv.url, duration=1.0), "--subscribers", "2", "--rate", "200",
                         limit=limit)
    assert proc.returncode == 0, proc.stderr
    for text in ("published", "delivered", "latency ms", "p99.9", "lost 0, out of order 0",
                 "per subscriber", "OK"):
        assert text in proc.stdout, (text, proc.stdout)


@pytest.mark.timeout(60 * SCALE)
def test_refused_publishes_show_as_errors_and_loss_and_the_run_still_ends(make_server):
    # the server refuses most publishes (rate limit): the subscribers never get what
    # was sent, so the drain runs out; the run reports it and ends within its bound
    srv = make_server(max_publish_rate=20, publish_burst=20)
    limit = time_limit(1.0, 0.3, 1.0, 5.0 * SCALE)
    proc, wall = stress(*common(srv.url, duration=1.0, drain=1.0), "--subscribers", "2",
                        "--rate", "200", "--ack-every", "0", "--json", limit=limit)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["publish_errors"] > 0
    assert any("rate" in e for e in report["publish_error_samples"]), report["publish_error_samples"]
    assert report["lost"] > 0 and report["drained"] is False
    assert report["ok"] is False
    assert report["elapsed_s"] <= report["time_limit_s"]
    assert wall <= limit + STARTUP


@pytest.mark.timeout(60 * SCALE)
def test_no_server_is_connect_errors_and_a_quick_end():
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        limit = time_limit(5.0, 0.3, 5.0, 5.0 * SCALE)
        proc, wall = stress(*common("ws://127.0.0.1:%d/ws" % port, duration=5.0),
                            "--subscribers", "2", "--publishers", "1", "--json", limit=limit)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["connect_errors"] == 3
    assert report["connected_publishers"] == 0 and report["published"] == 0
    assert wall <= limit + STARTUP


@pytest.mark.timeout(30 * SCALE)
def test_help_lists_every_option_with_an_example():
    proc, _wall = stress("--help", limit=5)
    assert proc.returncode == 0, proc.stderr
    for option in ("--url", "--allow-remote", "--subscribers", "--publishers", "--topics",
                   "--subscribe-pattern", "--rate", "--size", "--duration", "--ramp-up",
                   "--ack-every", "--token", "--insecure", "--cafile", "--json", "--plot",
                   "--max-messages", "--drain", "--timeout"):
        assert option in proc.stdout, option
    assert "default" in proc.stdout and "examples:" in proc.stdout


@pytest.mark.timeout(30 * SCALE)
@pytest.mark.parametrize("url", ["ws://192.0.2.1:8080/ws", "wss://[2001:db8::1]/ws"])
def test_non_loopback_url_is_refused(url):
    proc, wall = stress("--url", url, "--duration", "1", limit=5)
    assert proc.returncode == 2
    assert "loopback" in proc.stderr and "--allow-remote" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.timeout(60 * SCALE)
def test_plot_writes_a_png(make_server, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed in this interpreter (pip install 'wsbroadcast[plot]')")
    srv = make_server()
    out = tmp_path / "stress.png"
    limit = time_limit(1.0, 0.3, 5.0, 5.0 * SCALE)
    proc, _wall = stress(*common(srv.url, duration=1.0), "--subscribers", "2", "--rate", "200",
                         "--json", "--plot", str(out), limit=limit)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["delivered"] > 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


@pytest.mark.timeout(30 * SCALE)
def test_plot_without_matplotlib_is_a_clear_usage_error(tmp_path):
    # a directory shadowing matplotlib with a module that fails to import
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    proc = subprocess.run([sys.executable, STRESS, "--plot", str(tmp_path / "x.png")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=15 * SCALE)
    assert proc.returncode == 2
    assert "matplotlib" in proc.stderr and "pip install" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.timeout(30 * SCALE)
def test_latency_histogram_is_bounded_and_accurate():
    mod = load_module()
    rng = random.Random(5)
    values = sorted(rng.lognormvariate(7, 1.5) for _ in range(20000))  # microseconds
    hist = mod.LogHistogram()
    for v in values:
        hist.add(v)
    assert len(hist.counts) == mod.LogHistogram.BUCKETS
    for q in (50, 90, 99, 99.9):
        exact = values[max(0, math.ceil(len(values) * q / 100) - 1)]
        assert hist.percentile(q) == pytest.approx(exact, rel=0.03), q
    assert hist.percentile(100) == values[-1] and hist.min == values[0]
    other = mod.LogHistogram()
    other.add(10.0)
    hist.merge(other)
    assert hist.count == len(values) + 1


@pytest.mark.timeout(30 * SCALE)
def test_bitmap_tells_duplicates():
    bitmap = load_module().Bitmap()
    assert [bitmap.test_and_set(n) for n in (0, 5, 100000, 5, 0, 99999)] == \
        [False, False, False, True, True, False]
