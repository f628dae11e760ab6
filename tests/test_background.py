"""The background lane of ``tests/background.py``: cases run one after another, outcomes are kept, a
failing case fails its test, and a stopped lane runs nothing more."""

from __future__ import annotations

import time

import pytest
from background import BackgroundCase, Lane, check


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


def test_a_stopped_lane_runs_nothing_more():
    slow, never = _case("slow", "import time; time.sleep(60)"), _case("never", "print('ran')")
    lane = Lane([slow, never])
    while lane.running is None:
        time.sleep(0.05)
    lane.stop()
    assert lane.outcome(slow.nodeid)[0] == -9
    assert lane.outcome(never.nodeid) is None
