#!/usr/bin/env python3
"""CPU per message of the SQLite store, one row per message (schema 1) against one row
per run (schema 2, this tree), and of the memory store, measured in one process.

The old layout is this tree's wsbroadcast/store.py as of ``--old-rev`` (read with ``git
show``, loaded as a module of this tree's package). For each batch size and number of
topics, a fresh store file (WAL, synchronous=NORMAL, the defaults) gets ``append_batch``
calls of that many 100-byte messages, spread round-robin over the topics; the CPU time
of the appending thread (``time.thread_time``: SQLite's work included, waits for the
disk not) is divided by the messages appended. Then a count trim (to 1000 messages a
topic, after 20000 appended in batches of 234: one round of RetentionTrimmer's steps,
the trimmer thread's work, which the memory store does as it appends) per message
removed, and ``since()`` pages of 100
and 1000 messages read from a topic filled in batches of 234. Layouts are interleaved, each
figure is the median of ``--repeat`` rounds, and the ratios are of the same run.

    nice -n 19 scripts/bench_store_cpu.py [--repeat 3] [--messages 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wsbroadcast.store as new_store  # noqa: E402

#: the last version of store.py that stored one row per message
OLD_REV = "6c321a7"
BATCHES = (1, 10, 64, 234, 1000)
TOPICS = (1, 10)
PAGES = (100, 1000)


def load_old(rev: str) -> ModuleType:
    """wsbroadcast/store.py at ``rev``, as the module wsbroadcast._store_at_rev."""
    source = subprocess.run(["git", "show", "%s:wsbroadcast/store.py" % rev], cwd=str(ROOT),
                            check=True, capture_output=True, text=True).stdout
    name = "wsbroadcast._store_at_rev"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "wsbroadcast"
    sys.modules[name] = module
    exec(compile(source, "store.py@%s" % rev, "exec"), module.__dict__)  # noqa: S102
    return module


def text(i: int) -> str:
    """A 100-byte JSON text."""
    return json.dumps("m%06d" % i + "x" * 91)


@contextmanager
def opened(module: Optional[ModuleType], path: str, history_size: int) -> Iterator[Any]:
    """A store of ``module`` at ``path`` (None: a MemoryStore of this tree), closed and
    its files removed afterwards."""
    store = (new_store.MemoryStore(history_size) if module is None
             else module.SqliteStore(path, history_size))
    try:
        yield store
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def cpu_append(module: Optional[ModuleType], folder: str, batch: int, topics: int, messages: int) -> float:
    """Microseconds of CPU per message appended (module None: a MemoryStore of this tree)."""
    with opened(module, os.path.join(folder, "a%d-%d.db" % (batch, topics)), 1000) as store:
        names = ["bench.t%d" % t for t in range(topics)]
        batches = [[(names[(b * batch + i) % topics], text(b * batch + i)) for i in range(batch)]
                   for b in range(max(1, messages // batch))]
        store.append_batch(batches[0])  # the topics exist, the statements are prepared
        start = time.thread_time()
        for items in batches[1:]:
            store.append_batch(items)
        spent = time.thread_time() - start
        return spent * 1e6 / (sum(map(len, batches[1:])) or 1)


def cpu_since(module: Optional[ModuleType], folder: str, page: int, reads: int) -> float:
    """Microseconds of CPU per message read by since() pages of ``page`` messages."""
    with opened(module, os.path.join(folder, "s%d.db" % page), 100000) as store:
        total = 20000
        for b in range(0, total, 234):
            store.append_batch([("bench.read", text(i)) for i in range(b, min(total, b + 234))])
        store.checkpoint()
        starts = [(i * 7919) % (total - page) for i in range(reads)]
        store.since("bench.read", 0, page)  # a reader connection in the pool
        got = 0
        start = time.thread_time()
        for seq in starts:
            got += len(store.since("bench.read", seq, page))
        spent = time.thread_time() - start
        assert got == reads * page, got
        return spent * 1e6 / got


def cpu_trim(module: Optional[ModuleType], folder: str, batch: int, topics: int) -> float:
    """Microseconds of CPU per message a count trim removes (to 1000 a topic), after
    20000 messages appended in batches of ``batch`` over ``topics`` topics."""
    if module is None:
        return 0.0  # the memory store drops the oldest as it appends
    with opened(module, os.path.join(folder, "t%d-%d.db" % (batch, topics)), 1000) as store:
        names = ["bench.t%d" % t for t in range(topics)]
        total = 20000
        for b in range(0, total, batch):
            store.append_batch([(names[i % topics], text(i)) for i in range(b, min(total, b + batch))])
        store.checkpoint()
        trimmer = module.RetentionTrimmer(store)  # its steps, not its thread
        start = time.thread_time()
        trimmer.run_once()
        spent = time.thread_time() - start
        removed = total - 1000 * topics
        assert len(store.since(names[0], 0, 2000)) == 1000
        return spent * 1e6 / removed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the one-row-per-message store")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000, help="messages per append figure")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    old = load_old(args.old_rev)
    layouts: Dict[str, Optional[ModuleType]] = {"old": old, "new": new_store, "memory": None}
    cases: List[Tuple[str, Callable[[Optional[ModuleType], str], float]]] = []
    for topics in TOPICS:
        for batch in BATCHES:
            n = args.messages if batch > 1 else args.messages // 4
            cases.append(("append batch=%d topics=%d" % (batch, topics),
                          lambda m, f, b=batch, t=topics, n=n: cpu_append(m, f, b, t, n)))
    for topics in TOPICS:
        cases.append(("trim batch=234 topics=%d" % topics,
                      lambda m, f, t=topics: cpu_trim(m, f, 234, t)))
    for page in PAGES:
        cases.append(("since limit=%d" % page,
                      lambda m, f, p=page: cpu_since(m, f, p, max(20, 20000 // p))))
    figures: Dict[str, Dict[str, List[float]]] = {name: {k: [] for k in layouts} for name, _ in cases}
    folder = tempfile.mkdtemp(prefix="bench_store_cpu.")
    try:
        for _ in range(args.repeat):
            for name, run in cases:
                for kind, module in layouts.items():
                    figures[name][kind].append(run(module, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("CPU per message (us), median of %d; load average %s; Python %s, SQLite %s"
          % (args.repeat, " ".join("%.2f" % x for x in os.getloadavg()),
             sys.version.split()[0], new_store.sqlite3.sqlite_version))
    print("%-28s %8s %8s %8s %8s %8s" % ("case", "old", "new", "memory", "new/old", "new/mem"))
    out: Dict[str, Dict[str, float]] = {}
    for name, _ in cases:
        o, n, m = (statistics.median(figures[name][k]) for k in ("old", "new", "memory"))
        out[name] = {"old_us": o, "new_us": n, "memory_us": m, "new_old": n / o,
                     "new_memory": n / m if m else None}
        print("%-28s %8.3f %8.3f %8s %8.2f %8s" % (name, o, n, "%.3f" % m if m else "-", n / o,
                                                   "%.2f" % (n / m) if m else "-"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
