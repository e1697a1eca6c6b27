"""Tests of the Autobahn runner's report parsing (no wstest needed)."""

import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "conformance",
                     "run_autobahn.py")
_spec = importlib.util.spec_from_file_location("run_autobahn", _PATH)
run_autobahn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_autobahn)


def _entry(behavior="OK", close="OK", code=1000, report=None):
    return {
        "behavior": behavior,
        "behaviorClose": close,
        "duration": 1,
        "remoteCloseCode": code,
        "reportfile": report or "x.json",
    }


def test_all_ok_passes():
    index = {"agent": {"1.1.1": _entry(), "7.1.6": _entry("INFORMATIONAL", "INFORMATIONAL")}}
    summary = run_autobahn.summarize(index)
    assert summary["agent"] == "agent"
    assert summary["total"] == 2
    assert summary["behavior"] == {"OK": 1, "NON-STRICT": 0, "INFORMATIONAL": 1, "FAILED": 0, "UNIMPLEMENTED": 0}
    assert summary["problems"] == []
    assert run_autobahn.passed(summary)


@pytest.mark.parametrize("behavior", ["FAILED", "NON-STRICT", "UNIMPLEMENTED"])
def test_bad_behavior_fails(behavior):
    index = {"a": {"1.1.1": _entry(), "6.4.1": _entry(behavior, "OK", 1007)}}
    summary = run_autobahn.summarize(index)
    assert summary["behavior"][behavior] == 1
    assert [p["id"] for p in summary["problems"]] == ["6.4.1"]
    assert not run_autobahn.passed(summary)


@pytest.mark.parametrize("close", ["FAILED", "WRONG CODE", "UNCLEAN", "NON-STRICT"])
def test_bad_close_fails_even_when_behavior_ok(close):
    index = {"a": {"7.1.5": _entry("OK", close, 1002)}}
    summary = run_autobahn.summarize(index)
    assert summary["behaviorClose"][close] == 1
    assert summary["problems"][0]["behaviorClose"] == close
    assert not run_autobahn.passed(summary)


def test_no_cases_fails():
    assert not run_autobahn.passed(run_autobahn.summarize({"a": {}}))


def test_agent_selection():
    index = {"a": {"1.1.1": _entry()}, "b": {"1.1.1": _entry("FAILED")}}
    with pytest.raises(ValueError):
        run_autobahn.summarize(index)
    assert run_autobahn.passed(run_autobahn.summarize(index, "a"))
    assert not run_autobahn.passed(run_autobahn.summarize(index, "b"))
    with pytest.raises(ValueError):
        run_autobahn.summarize(index, "c")


def test_problems_in_numeric_case_order():
    index = {"a": {cid: _entry("FAILED") for cid in ("9.10.1", "9.2.1", "10.1.1", "1.1.10", "1.1.2")}}
    ids = [p["id"] for p in run_autobahn.summarize(index)["problems"]]
    assert ids == ["1.1.2", "1.1.10", "9.2.1", "9.10.1", "10.1.1"]


def test_details_and_index_location(tmp_path):
    outdir = tmp_path / "reports" / "servers"
    outdir.mkdir(parents=True)
    case = {
        "description": "Send <b>RSV = 2</b><br>then Ping.",
        "expectation": "Connection is failed.",
        "result": "Actual events differ from any expected.",
        "resultClose": "The close code should have been 1002 or empty",
        "expected": {"OK": [["message", "Hello, world!", False]]},
        "received": [["message", "x" * 10000, False]],
        "remoteCloseCode": 1000,
        "wirelog": ["huge"],
    }
    (outdir / "a_case_3_2.json").write_text(json.dumps(case))
    index = {"a": {"3.2": _entry("FAILED", "WRONG CODE", 1000, "a_case_3_2.json")}}
    (outdir / "index.json").write_text(json.dumps(index))

    assert run_autobahn.find_index(str(tmp_path)) == str(outdir / "index.json")
    summary = run_autobahn.load_summary(str(tmp_path), "a")
    details = summary["problems"][0]["details"]
    assert details["description"] == "Send RSV = 2 then Ping."
    assert "wirelog" not in details
    assert len(details["received"][0][1]) < 400
    text = run_autobahn.format_summary(summary)
    assert "3.2" in text and "WRONG CODE" in text and "expectation:" in text
