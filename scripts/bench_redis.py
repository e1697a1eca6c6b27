#!/usr/bin/env python3
"""Scale-out cost: two wsbroadcast nodes on one Redis against one node on the memory broker.

Same run, same workload for both setups: N plain subscribers (auto-subscribed to
``broadcast``) and 2 publishers, split evenly over the nodes (the single node
gets both halves). Each half is one C load generator (scripts/benchlib/loadgen.c)
holding N/2 subscribers and one publisher, so on two nodes every subscriber gets
the messages of both publishers, half of them through the other node and Redis.

  tput      deliveries/s at the highest publish rate the setup sustains: every
            step starts fresh nodes and publishes at a fixed rate per publisher
            (doubling from --start-rate, then bisecting); sustained means at
            least 97% delivered, no subscriber closed, p99 under 250 ms
  latency   p50/p99 publish-to-delivery at a fixed rate (--rate) per publisher

Setups are interleaved and repeated (--repeat); medians are printed with the
ratio redis/memory. A private redis-server runs on a free port in a temp dir.

--workers-table instead compares ``serve --workers 1`` with ``serve --workers 2`` on one
Redis: one load generator in tput mode (send as fast as the subscribers keep up) with
--subs subscribers and one publisher on the one port (the kernel spreads the
connections over the workers; the publisher's messages reach the other worker's
subscribers through Redis). Printed: deliveries/s, and deliveries per CPU-second of
the server (every worker process and the supervisor) and of redis-server, both
measured over the load generator's measured window only (CPU sampled every 50 ms),
with the cores the rest of the machine used meanwhile ("foreign"). With --cluster, the
same two setups on a Redis Cluster of 3 primaries (no replicas, no append-only file, like
the one Redis; redis CPU is the sum of its nodes).

The servers run on this interpreter (``python scripts/bench_redis.py``, with wsbroadcast[redis] installed).

  scripts/bench_redis.py [--subs 100] [--duration 3] [--rate 200] [--repeat 1]
  scripts/bench_redis.py --workers-table [--cluster] [--subs 1000] [--duration 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import RedisServer  # noqa: E402
from serverproc import ServerProcess  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_bench() -> Any:
    """scripts/bench as a module (for building the load generator)."""
    loader = importlib.machinery.SourceFileLoader("wsb_bench", str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("wsb_bench", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def run_loadgens(exe: str, ports: List[int], args: List[str], timeout: float) -> List[dict]:
    """One load generator per port, all at once; their JSON results."""
    procs = [subprocess.Popen([exe, "--path", "/ws", "--port", str(p)] + args, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in ports]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            out.append({"error": "loadgen exit %s: %s" % (p.returncode, stderr.strip()[-300:])})
        else:
            out.append(json.loads(lines[-1]))
    return out


def start_nodes(extra: List[str], count: int) -> List[ServerProcess]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return [ServerProcess("--log-level", "info", "--max-connections", "20000", *extra,
                          cwd=str(ROOT), env=env) for _ in range(count)]


def run_rate(setup: str, extra: List[str], count: int, exe: str, a: argparse.Namespace, rate: float,
             duration: float) -> Dict[str, float]:
    """Fresh nodes, one load generator per half publishing ``rate`` msg/s; the summed results."""
    nodes = start_nodes(extra, count)
    try:
        half = max(1, a.subs // 2)
        ports = [nodes[0].port, nodes[-1].port]
        args = ["--mode", "rate", "--rate", str(rate), "--subs", str(half), "--duration", str(duration),
                "--warmup", str(a.warmup), "--connect-timeout", "60"]
        res = run_loadgens(exe, ports, args, 60 + a.warmup + duration + 20)
    finally:
        for n in nodes:
            n.terminate()
    for r in res:
        if "error" in r:
            raise SystemExit("%s: %s" % (setup, r["error"]))
    sent = sum(r["sent"] for r in res)
    expect = sum(sent * r["subs"] for r in res)
    secs = max(r["seconds"] for r in res)
    return {
        "rate": rate,
        "deliveries_per_s": sum(r["deliveries_per_s"] for r in res),
        "p50_ms": max(r["lat_p50_us"] for r in res) / 1000.0,
        "p99_ms": max(r["lat_p99_us"] for r in res) / 1000.0,
        "delivered": sum(r["deliveries"] for r in res) / expect if expect else 0.0,
        "sent_fraction": sent / (len(res) * rate * secs) if secs else 0.0,
        "closed": sum(r.get("closed_subs", 0) for r in res),
    }


def sustained(r: Dict[str, float]) -> bool:
    return (r["closed"] == 0 and r["delivered"] >= 0.97 and r["sent_fraction"] >= 0.95
            and r["p99_ms"] < 250.0)


def measure(setup: str, extra: List[str], count: int, exe: str, a: argparse.Namespace) -> Dict[str, float]:
    """Latency at --rate, then the highest sustained rate (doubling, then two bisection steps)."""
    lat = run_rate(setup, extra, count, exe, a, a.rate, a.duration)
    log("  %s latency: %s" % (setup, json.dumps(lat)))
    good, bad = None, None
    rate = a.start_rate
    for _ in range(a.max_steps):
        r = run_rate(setup, extra, count, exe, a, rate, a.step_duration)
        ok = sustained(r)
        log("  %s %6.0f msg/s per publisher: %s %s" % (setup, rate, "ok  " if ok else "FAIL", json.dumps(r)))
        if ok:
            good = r
        else:
            bad = r
        if bad is None:
            rate *= 2
        elif good is None:
            rate = bad["rate"] / 2
        else:
            if bad["rate"] / good["rate"] < 1.2:
                break
            rate = (good["rate"] + bad["rate"]) / 2
    best = good or {"deliveries_per_s": 0.0, "rate": 0.0}
    return {"tput": best["deliveries_per_s"], "tput_rate": best["rate"], "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"], "delivered": lat["delivered"]}


class CpuSampler:
    """CPU seconds of some processes (each with its descendants), sampled every 50 ms."""

    def __init__(self, cpu_of: Callable[[int], float], pids: List[int]) -> None:
        self.cpu_of = cpu_of
        self.pids = pids
        self.samples: List[Tuple[float, List[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), [self.cpu_of(p) for p in self.pids]))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, t0: float, t1: float) -> List[float]:
        """CPU seconds each used from t0 to t1 (the nearest samples inside the window)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples[-1:]
        first, last = inside[0], inside[-1]
        span = last[0] - first[0]
        scale = (t1 - t0) / span if span > 0 else 1.0
        return [(b - a) * scale for a, b in zip(first[1], last[1])]


def run_workers(bench: Any, exe: str, url: str, redis_pids: List[int], workers: int,
                a: argparse.Namespace) -> Dict[str, float]:
    """One ``serve --workers N`` process tree, one tput load generator; its figures."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    node = ServerProcess("--log-level", "info", "--max-connections", "20000", "--workers", str(workers),
                         "--redis", url, cwd=str(ROOT), env=env, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while not any("workers serving" in ln for ln in node.lines) and workers > 1:
            if time.monotonic() > deadline or node.proc.poll() is not None:
                raise SystemExit("serve --workers %d did not start:\n%s" % (workers, "\n".join(node.lines)))
            time.sleep(0.05)
        tck = os.sysconf("SC_CLK_TCK")

        def cpu_of(pid: int) -> float:  # pid 0: the whole machine's busy time
            return bench.busy_ticks()[0] / tck if pid == 0 else bench.cpu_s(pid)

        sampler = CpuSampler(cpu_of, [node.pid, 0] + redis_pids)
        launched = time.monotonic()
        try:
            (res,) = run_loadgens(exe, [node.port], [
                "--mode", "tput", "--subs", str(a.subs), "--duration", str(a.duration),
                "--warmup", str(a.warmup), "--connect-timeout", "60"], 60 + a.warmup + a.duration + 20)
        finally:
            sampler.stop()
        pids = bench.proc_tree(node.pid)
    finally:
        node.terminate(30)
    if "error" in res:
        raise SystemExit("--workers %d: %s" % (workers, res["error"]))
    start = launched + res["connect_s"] + res["prefill_s"]
    server_cpu, busy, *redis_cpus = sampler.between(start, start + res["seconds"])
    redis_cpu = sum(redis_cpus)
    loadgen_cores = res["cpu_s"] / (res["connect_s"] + res["prefill_s"] + res["seconds"])
    return {
        "deliveries_per_s": res["deliveries_per_s"],
        "per_server_cpu_s": res["deliveries"] / server_cpu if server_cpu > 0 else 0.0,
        "per_redis_cpu_s": res["deliveries"] / redis_cpu if redis_cpu > 0 else 0.0,
        "server_cores": server_cpu / res["seconds"],
        "redis_cores": redis_cpu / res["seconds"],
        "loadgen_cores": loadgen_cores,
        # anything else running meanwhile (other jobs): a large value makes the run doubtful
        "foreign_cores": max(0.0, busy - server_cpu - redis_cpu) / res["seconds"] - loadgen_cores,
        "p99_ms": res["lat_p99_us"] / 1000.0,
        "processes": float(len(pids)),
        "closed": float(res.get("closed_subs", 0)),
    }


def workers_table(bench: Any, exe: str, a: argparse.Namespace) -> int:
    # (label, workers, cluster?)
    setups: List[Tuple[str, int, bool]] = [("--workers 1", 1, False), ("--workers 2", 2, False)]
    if a.cluster:
        setups += [("cluster, --workers 1", 1, True), ("cluster, --workers 2", 2, True)]
    results: Dict[str, List[Dict[str, float]]] = {s[0]: [] for s in setups}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-"))
        rs = stack.enter_context(RedisServer(os.path.join(tmp, "one")))
        assert rs.proc is not None
        log("redis-server on %s" % rs.url)
        where = {False: (rs.url, [rs.proc.pid])}
        if a.cluster:
            from redis_cluster import RedisCluster

            # three primaries, no replica and no append-only file: the same work per message
            # as the one Redis, spread over shards (the load generator's one topic is on one)
            rc = stack.enter_context(RedisCluster(os.path.join(tmp, "cluster"), replicas=0, appendonly=False))
            where[True] = (rc.url, [n.proc.pid for n in rc.nodes if n.proc is not None])
            log("redis cluster on %s" % rc.url)
        for rep in range(a.repeat):
            for label, n, cluster in (setups if rep % 2 == 0 else list(reversed(setups))):
                url, pids = where[cluster]
                res = run_workers(bench, exe, url, pids, n, a)
                log("%s (run %d): %s" % (label, rep + 1, json.dumps(res)))
                results[label].append(res)
    med = {n: {k: statistics.median(r[k] for r in rs_) for k in rs_[0]} for n, rs_ in results.items()}
    load = os.getloadavg()
    print("serve --workers N on one Redis%s: %d subscribers and 1 publisher (tput mode) on one port, %.0f s "
          "per run, %d CPUs, median of %d, load average before/after %.1f" % (
              " and on a cluster of 3 primaries" if a.cluster else "", a.subs, a.duration,
              os.cpu_count() or 0, a.repeat, load[0]))
    rows = [("setup", "deliveries/s", "per server CPU-s", "per redis CPU-s", "server cores",
             "redis cores", "loadgen cores", "foreign cores", "p99 ms")]
    for label, _n, _c in setups:
        m = med[label]
        rows.append((label, "%.0f" % m["deliveries_per_s"], "%.0f" % m["per_server_cpu_s"],
                     "%.0f" % m["per_redis_cpu_s"], "%.2f" % m["server_cores"], "%.2f" % m["redis_cores"],
                     "%.2f" % m["loadgen_cores"], "%.2f" % m["foreign_cores"], "%.1f" % m["p99_ms"]))

    def ratio(top: str, bottom: str) -> None:
        def r(key: str) -> str:
            return "%.2f" % (med[top][key] / med[bottom][key] if med[bottom][key] else 0)

        rows.append(("%s / %s" % (top, bottom), r("deliveries_per_s"), r("per_server_cpu_s"),
                     r("per_redis_cpu_s"), r("server_cores"), r("redis_cores"), "", "", ""))

    ratio("--workers 2", "--workers 1")
    if a.cluster:
        ratio("cluster, --workers 1", "--workers 1")
    print_rows(rows)
    return 0


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subs", type=int, default=100, help="subscribers in all (split over the nodes)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=200.0, help="messages/s per publisher in the latency test")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--start-rate", type=float, default=500.0,
                   help="first rate (msg/s per publisher) of the throughput search")
    p.add_argument("--step-duration", type=float, default=2.0, help="seconds per search step")
    p.add_argument("--max-steps", type=int, default=7)
    p.add_argument("--workers-table", action="store_true",
                   help="compare serve --workers 1 and --workers 2 on one Redis instead (use --subs 1000)")
    p.add_argument("--cluster", action="store_true",
                   help="with --workers-table: the same on a Redis Cluster of 3 primaries too (redis+cluster://)")
    a = p.parse_args()
    bench = load_bench()
    exe = bench.build(Path.home() / ".cache" / "wsbroadcast-bench")["loadgen"]
    bench.raise_nofile()
    if a.workers_table:
        return workers_table(bench, exe, a)
    results: Dict[str, List[Dict[str, float]]] = {"memory, 1 node": [], "redis, 2 nodes": []}
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp, RedisServer(tmp) as rs:
        log("redis-server on %s" % rs.url)
        for rep in range(a.repeat):
            order = list(results) if rep % 2 == 0 else list(reversed(list(results)))
            for setup in order:
                if setup.startswith("redis"):
                    res = measure(setup, ["--redis", rs.url], 2, exe, a)
                else:
                    res = measure(setup, ["--store", "memory"], 1, exe, a)
                log("%s (run %d): %s" % (setup, rep + 1, json.dumps(res)))
                results[setup].append(res)
    med = {s: {k: statistics.median(r[k] for r in rs_) for k in rs_[0]} for s, rs_ in results.items()}
    mem, red = med["memory, 1 node"], med["redis, 2 nodes"]
    print("%d subscribers, 2 publishers (one per half), %.0f s per measurement, latency at %.0f msg/s "
          "per publisher, %d CPUs, median of %d" % (a.subs, a.duration, a.rate, os.cpu_count() or 0, a.repeat))
    rows = [("setup", "deliveries/s", "at msg/s/pub", "p50 ms", "p99 ms", "delivered")]
    for name, m in (("memory, 1 node", mem), ("redis, 2 nodes", red)):
        rows.append((name, "%.0f" % m["tput"], "%.0f" % m["tput_rate"], "%.2f" % m["p50_ms"],
                     "%.2f" % m["p99_ms"], "%.3f" % m["delivered"]))
    rows.append(("redis / memory", "%.2f" % (red["tput"] / mem["tput"] if mem["tput"] else 0), "",
                 "%.2f" % (red["p50_ms"] / mem["p50_ms"] if mem["p50_ms"] else 0),
                 "%.2f" % (red["p99_ms"] / mem["p99_ms"] if mem["p99_ms"] else 0), ""))
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
