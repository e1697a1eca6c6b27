"""Pure helpers of scripts/bench: medians with their spread, and the performance targets checked from them.

No I/O and no timing here (tests/test_bench_targets.py checks them without a benchmark).
A measurement's values are given per repeat: a list (index = repeat) or a dict {repeat: value};
None stands for a repeat whose measurement failed.
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

Values = Union[Sequence[Optional[float]], Mapping[int, Optional[float]]]
#: per-repeat values by server, then by metric
Figures = Mapping[str, Mapping[str, Values]]

MEMORY, SQLITE = "wsbroadcast", "wsbroadcast-sqlite"


def by_repeat(vals: Optional[Values]) -> Dict[int, float]:
    """The values that were measured, by repeat."""
    if not vals:
        return {}
    items = vals.items() if isinstance(vals, Mapping) else enumerate(vals)
    return {int(k): v for k, v in items if v is not None}


def median(vals: Optional[Values]) -> Optional[float]:
    """The median of the measured values; None when nothing was measured."""
    v = list(by_repeat(vals).values())
    return statistics.median(v) if v else None


def spread(vals: Optional[Values]) -> Optional[Tuple[float, float]]:
    """(min, max) of the measured values; None when nothing was measured."""
    v = list(by_repeat(vals).values())
    return (min(v), max(v)) if v else None


def half_range_pct(vals: Optional[Values]) -> Optional[float]:
    """Half the min-max range in percent of the median (the "±" printed next to a median).

    None with fewer than two values or a zero median.
    """
    v = list(by_repeat(vals).values())
    med = median(vals)
    if len(v) < 2 or not med:
        return None
    return 50.0 * (max(v) - min(v)) / abs(med)


class Target(NamedTuple):
    """One target: ``num`` (server, metric), divided by ``den`` when given, compared with ``limit``."""

    point: int                        # the point of the targets list it belongs to
    what: str
    num: Tuple[str, str]
    den: Optional[Tuple[str, str]]    # None: ``num`` is compared as it is
    op: str                           # ">=", ">", "<=", "<"
    limit: float
    kind: str = "ratio"               # how to print the figure: ratio, s, bytes, count


def _store_pair(point: int, what: str, metric: str, peer: Optional[Tuple[str, str]], op: str, limit: float,
                kind: str = "ratio") -> List[Target]:
    """The same target on the memory and on the SQLite store."""
    return [Target(point, what.format(store=label), (server, metric), peer, op, limit, kind)
            for server, label in ((MEMORY, "memory"), (SQLITE, "sqlite"))]


KIB = 1024.0

TARGETS: List[Target] = [
    # 1. the default store is not a tax
    Target(1, "sqlite N=10 vs socketify", (SQLITE, "tput_n10"), ("socketify", "tput_n10"), ">=", 1.0),
    Target(1, "sqlite N=10 vs memory", (SQLITE, "tput_n10"), (MEMORY, "tput_n10"), ">=", 0.9),
    Target(1, "sqlite N=100 vs memory", (SQLITE, "tput_n100"), (MEMORY, "tput_n100"), ">=", 0.95),
    Target(1, "sqlite N=1000 vs memory", (SQLITE, "tput_n1000"), (MEMORY, "tput_n1000"), ">=", 0.95),
    *_store_pair(1, "1 stuck reader: the others keep, {store}", "stuck_ratio", None, ">=", 0.95),
    # 2. connection storms
    Target(2, "connects/s 1,000 at once vs websocket-server", (MEMORY, "connect_1000"),
           ("websocket-server", "connect_1000"), ">=", 1.0),
    Target(2, "connects/s 5,000 at once vs websocket-server", (MEMORY, "connect_5000"),
           ("websocket-server", "connect_5000"), ">=", 1.0),
    Target(2, "cleanup after 19,900 close at once", (MEMORY, "storm_cleanup_s"), None, "<", 5.0, "s"),
    Target(2, "error lines during that cleanup", (MEMORY, "storm_errors_logged"), None, "<=", 0, "count"),
    Target(2, "publish answered during the storm", (MEMORY, "storm_probe_publish_s"), None, "<=", 1.0, "s"),
    Target(2, "new connection during the storm", (MEMORY, "storm_probe_connect_s"), None, "<=", 1.0, "s"),
    Target(2, "/healthz during the storm", (MEMORY, "storm_probe_healthz_s"), None, "<=", 1.0, "s"),
    Target(2, "10,000 resumed with since after a restart", (MEMORY, "resume_s"), None, "<", 5.0, "s"),
    # 3. memory per idle connection
    *_store_pair(3, "RSS per idle connection N=1,000, {store}", "rss_1000", None, "<=", 20 * KIB, "bytes"),
    *_store_pair(3, "RSS per idle connection N=10,000, {store}", "rss_10000", None, "<=", 20 * KIB, "bytes"),
    Target(3, "19,900 idle connections held", (MEMORY, "storm_held"), None, ">=", 19900, "count"),
    # 4. TLS (tls_ratio_*: TLS / plain TCP measured back to back, per repeat)
    *_store_pair(4, "TLS/plain N=100, {store}", "tls_ratio_n100", None, ">=", 0.5),
    *_store_pair(4, "TLS/plain N=1000, {store}", "tls_ratio_n1000", None, ">=", 0.5),
    *_store_pair(4, "1 stuck reader over TLS: the others keep, {store}", "tls_stuck_ratio", None, ">=", 0.95),
    # 5. tail latency at 200 msg/s, N=100
    *_store_pair(5, "p99 vs C epoll, {store}", "lat_p99", ("c-epoll", "lat_p99"), "<=", 1.0),
    *_store_pair(5, "p99.9 vs C epoll, {store}", "lat_p999", ("c-epoll", "lat_p999"), "<=", 1.5),
    # 6. keep what is ahead
    *_store_pair(6, "N=1000 vs C epoll batched, {store}", "tput_n1000", ("c-epoll", "tput_n1000"), ">=", 0.9),
]

_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def fmt_value(v: Optional[float], kind: str) -> str:
    """A target's figure for the table."""
    if v is None:
        return "-"
    if kind == "ratio":
        return f"{v:.2f}x"
    if kind == "s":
        return f"{v:.2f} s"
    if kind == "bytes":
        return f"{v / KIB:.1f} KiB"
    return f"{v:g}"


def fmt_figure(v: Optional[float], metric: str) -> str:
    """One side of a comparison: a rate (tput_*, connect_*: per second) or a latency (lat_*: µs)."""
    if v is None:
        return "-"
    if metric.startswith("lat_"):
        return f"{v / 1000:.1f}ms" if v >= 10000 else f"{v:.0f}us"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


class Verdict(NamedTuple):
    """A target evaluated: the figure from the medians, its per-repeat range, and whether it is met."""

    target: Target
    value: Optional[float]
    sides: Optional[Tuple[Optional[float], Optional[float]]]   # the two medians compared, if any
    low: Optional[float]
    high: Optional[float]
    met: Optional[bool]       # None: not run
    borderline: bool          # met or not, some repeats fall on the other side of the limit

    def row(self) -> List[str]:
        """[point, what, medians compared, measured, per-repeat range, target, met?]."""
        t = self.target
        sides = "-"
        if self.sides is not None and t.den is not None:
            sides = f"{fmt_figure(self.sides[0], t.num[1])} / {fmt_figure(self.sides[1], t.den[1])}"
        rng = "-" if self.low is None or self.high is None else \
            f"{fmt_value(self.low, t.kind)} - {fmt_value(self.high, t.kind)}"
        met = "not run" if self.met is None else ("yes" if self.met else "NO")
        if self.met is not None and self.borderline:
            met += " (not every repeat)" if self.met else " (some repeats meet it)"
        return [str(t.point), t.what, sides, fmt_value(self.value, t.kind) if self.met is not None else "not run",
                rng, f"{t.op} {fmt_value(t.limit, t.kind)}", met]


def per_repeat(figures: Figures, target: Target) -> Dict[int, float]:
    """The target's figure in each repeat where both sides were measured."""
    num = by_repeat(figures.get(target.num[0], {}).get(target.num[1]))
    if target.den is None:
        return num
    den = by_repeat(figures.get(target.den[0], {}).get(target.den[1]))
    return {r: num[r] / den[r] for r in num if r in den and den[r]}


def evaluate(target: Target, figures: Figures) -> Verdict:
    """The target from the medians (a ratio of the two medians when it compares two figures)."""
    a = median(figures.get(target.num[0], {}).get(target.num[1]))
    sides = None
    if target.den is not None:
        b = median(figures.get(target.den[0], {}).get(target.den[1]))
        sides = (a, b)
        value = a / b if a is not None and b else None
    else:
        value = a
    if value is None:
        return Verdict(target, None, sides, None, None, None, False)
    test = _OPS[target.op]
    met = test(value, target.limit)
    reps = list(per_repeat(figures, target).values())
    low, high = (min(reps), max(reps)) if len(reps) >= 2 else (None, None)
    borderline = any(test(v, target.limit) != met for v in reps)
    return Verdict(target, value, sides, low, high, met, borderline)


def targets_table(figures: Figures, targets: Sequence[Target] = TARGETS) -> List[List[str]]:
    """The targets table: a header and one row per target."""
    rows = [["#", "what", "medians", "measured", "range over repeats", "target", "met?"]]
    rows.extend(evaluate(t, figures).row() for t in targets)
    return rows
