"""The background lane of ``tests/background.py``: cases run one after another, outcomes are kept, a
failing case fails its test, and a stopped lane runs nothing more."""

from __future__ import annotations

import time

import pytest
from background import BackgroundCase, Lane, check, failure_report


def _case(name: str, code: str, timeout_s: float = 60) -> BackgroundCase:
    return BackgroundCase(f"tests/test_background.py::{name}", ("-c", code), timeout_s)


def test_lane_runs_cases_in_order_and_keeps_each_outcome():
    stamp = "import time; print(time.time())"
    first, second = _case("a", f"{stamp}; import sys; sys.exit(3)"), _case("b", stamp)
    lane = Lane([first, second])
    code_a, out_a = lane.outcome(first.nodeid)
    code_b, out_b = lane.outcome(second.nodeid)
    assert (code_a, code_b) == (3, 0)
    assert float(out_a) < float(out_b)  # one after another, in the order given


def test_a_case_past_its_timeout_is_killed():
    slow = _case("slow", "import time; time.sleep(60)", timeout_s=0.5)
    began = time.monotonic()
    code, _ = Lane([slow]).outcome(slow.nodeid)
    assert code == -9 and time.monotonic() - began < 30


def test_check_fails_with_the_cases_output(request):
    failing = _case("failing", "print('the case said why'); raise SystemExit(1)")
    with pytest.raises(AssertionError, match="(?s)exit code 1.*the case said why"):
        check(request, failing)  # not in the suite's lane: run now


def test_the_failure_report_shows_each_failed_tests_traceback_before_its_captured_logs():
    chatter = "(raylet) store.cc:366: Disconnecting client\n" * 2000
    output = ("....F.F\n= FAILURES =\n"
              f"___ test_one ___\n    assert x\nE   assert 1 == 2\n--- Captured stdout call ---\n{chatter}"
              f"___ test_two ___\nE   ValueError: the node was gone\n--- Captured stdout call ---\n{chatter}"
              "= short test summary info =\nFAILED tests/x.py::test_one\nFAILED tests/x.py::test_two\n")
    report = failure_report(output)
    assert "E   assert 1 == 2" in report and "E   ValueError: the node was gone" in report
    assert report.endswith("FAILED tests/x.py::test_two\n") and len(report) < 20_000
    assert failure_report("short output") == "short output"


def test_a_stopped_lane_runs_nothing_more():
    slow, never = _case("slow", "import time; time.sleep(60)"), _case("never", "print('ran')")
    lane = Lane([slow, never])
    while lane.running is None:
        time.sleep(0.05)
    lane.stop()
    assert lane.outcome(slow.nodeid)[0] == -9
    assert lane.outcome(never.nodeid) is None
