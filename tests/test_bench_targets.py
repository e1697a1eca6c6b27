"""scripts/benchlib/targets.py: medians, their spread and the targets table, on made-up figures (no benchmark)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

from benchlib import targets
from benchlib.targets import MEMORY, SQLITE, Target, evaluate, targets_table


def test_median_and_spread_skip_failed_repeats():
    assert targets.median([3.0, None, 1.0, 2.0]) == 2.0
    assert targets.median({0: 4.0, 2: 2.0}) == 3.0
    assert targets.median([None, None]) is None and targets.median(None) is None
    assert targets.spread({0: 5.0, 1: None, 3: 1.0}) == (1.0, 5.0)
    assert targets.spread([]) is None


def test_half_range_is_relative_to_the_median_and_needs_two_values():
    assert targets.half_range_pct([90.0, 100.0, 110.0]) == pytest.approx(10.0)
    assert targets.half_range_pct([100.0]) is None
    assert targets.half_range_pct([100.0, None]) is None
    assert targets.half_range_pct([0.0, 0.0]) is None


RATIO = Target(1, "sqlite N=10 vs socketify", (SQLITE, "tput_n10"), ("socketify", "tput_n10"), ">=", 1.0)


def test_a_ratio_is_of_the_two_medians_and_its_range_pairs_the_repeats():
    figures = {SQLITE: {"tput_n10": {0: 1.10e6, 1: 1.00e6, 2: 1.30e6}},
               "socketify": {"tput_n10": {0: 1.00e6, 1: 1.25e6, 2: 1.00e6}}}
    v = evaluate(RATIO, figures)
    assert v.value == pytest.approx(1.10e6 / 1.00e6)
    assert (v.low, v.high) == (pytest.approx(0.8), pytest.approx(1.3))
    assert v.met is True and v.borderline is True   # repeat 1 alone falls short
    row = v.row()
    assert row[:4] == ["1", "sqlite N=10 vs socketify", "1.10M / 1.00M", "1.10x"]
    assert row[5:] == [">= 1.00x", "yes (not every repeat)"]


def test_a_repeat_measured_on_one_side_only_is_left_out_of_the_range():
    figures = {SQLITE: {"tput_n10": {0: 2.0, 1: 3.0, 2: None}}, "socketify": {"tput_n10": {1: 1.0, 2: 1.0}}}
    v = evaluate(RATIO, figures)
    assert v.value == pytest.approx(2.5)
    assert v.low is None and v.high is None   # one common repeat is no range
    assert v.met is True and not v.borderline


@pytest.mark.parametrize("op,limit,value,met", [
    ("<", 5.0, 4.99, True), ("<", 5.0, 5.0, False),
    ("<=", 1.0, 1.0, True), ("<=", 1.0, 1.01, False),
    (">=", 0.95, 0.95, True), (">=", 0.95, 0.9499, False),
    (">", 0.0, 0.0, False),
])
def test_each_comparison_at_and_past_its_limit(op, limit, value, met):
    t = Target(2, "x", (MEMORY, "m"), None, op, limit, "s")
    assert evaluate(t, {MEMORY: {"m": [value]}}).met is met


def test_a_target_whose_measurement_did_not_run_says_not_run():
    figures = {MEMORY: {"tput_n10": [1.0]}}   # socketify and the SQLite row missing
    row = evaluate(RATIO, figures).row()
    assert row[3] == "not run" and row[-1] == "not run"
    zero_peer = {SQLITE: {"tput_n10": [1.0]}, "socketify": {"tput_n10": [0.0]}}
    assert evaluate(RATIO, zero_peer).met is None


def test_a_failed_target_is_marked_loudly():
    t = Target(3, "RSS", (MEMORY, "rss_1000"), None, "<=", 20 * 1024, "bytes")
    row = evaluate(t, {MEMORY: {"rss_1000": [27545.6]}}).row()
    assert row[3:] == ["26.9 KiB", "-", "<= 20.0 KiB", "NO"]


def test_the_table_has_a_row_per_target_of_each_point():
    rows = targets_table({})
    assert rows[0] == ["#", "what", "medians", "measured", "range over repeats", "target", "met?"]
    assert len(rows) == len(targets.TARGETS) + 1
    assert {r[0] for r in rows[1:]} == {"1", "2", "3", "4", "5", "6"}
    assert all(r[-1] == "not run" for r in rows[1:])
    # each target's figure names a server and a metric; the comparisons are the ones evaluate knows
    assert all(t.op in (">=", ">", "<=", "<") and t.num[0] and t.num[1] for t in targets.TARGETS)
