"""Tests whose whole work is one subprocess with a Ray cluster of its own, started when the suite starts.

A Ray test spends most of its wall time starting processes one after another (a controller, then its
workers, each importing torch) with one of the two cores idle: 0.36 of the machine's two cores were
busy over a Ray-heavy third of the suite, 0.56 over the whole suite (a subreaper's rusage, 2026-12-02).
Such a test's subprocess therefore runs beside the rest of the suite: once collection is done,
``conftest.py`` hands the registered cases selected for the run to one background lane that runs them
one after another, in the suite's order, and each case's test only waits for its subprocess and checks
its exit code. One lane, not one process per case: three such cases at once (the multi-node cases, two
Tune searches, the `ray start` cluster) made the whole suite slower (1,754 s against 1,572 s with only
the multi-node cases beside it, 2026-12-02), the machine then being CPU-bound. Each subprocess gets a
``RAY_TMPDIR`` of its own (Ray records a running cluster there), so no other test can join its cluster by
accident, and its own process group, stopped if the suite ends first.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BackgroundCase:
    """The test ``nodeid`` is the exit code of ``python argv`` (run in the repository with ``env`` added,
    ``timeout_s`` at most); ``skip_reason()`` says why it cannot run here (None: it can)."""

    nodeid: str
    argv: tuple[str, ...]
    timeout_s: float
    env: tuple[tuple[str, str], ...] = ()
    skip_reason: Callable[[], str | None] = lambda: None


@dataclass
class BackgroundRun:
    """A started case: its process, its output file, its private temp dir."""

    process: subprocess.Popen
    log: Path
    temp_dir: str

    def finish(self, timeout_s: float) -> tuple[int, str]:
        """Wait for the case (killed after ``timeout_s``); its exit code (-9 when killed) and output."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        output = self.log.read_text(errors="replace")
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return code, output

    def kill(self) -> None:
        """Kill the case and every process it started (its own process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


CASES: dict[str, BackgroundCase] = {}


class Lane:
    """Runs cases one after another in a thread; ``outcome(nodeid)`` waits for one of them."""

    def __init__(self, cases: list[BackgroundCase]) -> None:
        self.cases = cases
        self.done = {case.nodeid: threading.Event() for case in cases}
        self.outcomes: dict[str, tuple[int, str]] = {}
        self.running: BackgroundRun | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="background-lane", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for case in self.cases:
            try:
                if not self.stopped:
                    self.running = start(case)
                    self.outcomes[case.nodeid] = self.running.finish(case.timeout_s)
            except Exception as err:  # noqa: BLE001 - the case's test reports it
                self.outcomes[case.nodeid] = (-1, f"the lane could not run the case: {err!r}")
            finally:
                self.running = None
                self.done[case.nodeid].set()

    def outcome(self, nodeid: str) -> tuple[int, str] | None:
        """The exit code and output of case ``nodeid`` once run (None if the lane was stopped first)."""
        self.done[nodeid].wait()
        return self.outcomes.get(nodeid)

    def stop(self) -> None:
        """Run no further case and kill the one running."""
        self.stopped = True
        running = self.running
        if running is not None:
            running.kill()


LANE = pytest.StashKey[Lane]()


def background_case(nodeid: str, argv: list[str], timeout_s: float, env: dict[str, str] | None = None,
                    skip_reason: Callable[[], str | None] = lambda: None) -> BackgroundCase:
    """Register a case (at import of its test module) and return it."""
    CASES[nodeid] = BackgroundCase(nodeid, tuple(argv), timeout_s, tuple((env or {}).items()), skip_reason)
    return CASES[nodeid]


def start(case: BackgroundCase) -> BackgroundRun:
    """Start ``case.argv`` in the repository, in a new process group, with a private ``RAY_TMPDIR``."""
    temp_dir = tempfile.mkdtemp(prefix="rbg", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(dict(case.env), RAY_TMPDIR=temp_dir,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = Path(temp_dir) / "output.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, *case.argv], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return BackgroundRun(process, log, temp_dir)


def start_selected(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the lane of the registered cases among ``items`` that can run here, in the items' order
    (``conftest.py``, after collection)."""
    cases = [CASES[item.nodeid] for item in items
             if item.nodeid in CASES and CASES[item.nodeid].skip_reason() is None]
    if cases:
        config.stash[LANE] = Lane(cases)


def stop_all(config: pytest.Config) -> None:
    """Stop the lane if the suite ended before every case's test collected it (``-x``, Ctrl-C)."""
    lane = config.stash.get(LANE, None)
    if lane is not None:
        lane.stop()


def check(request: pytest.FixtureRequest, case: BackgroundCase) -> None:
    """The test of ``case``: skip where it cannot run, else wait for its run in the lane (or run it now if
    the lane does not hold it) and fail with the end of its output unless it exited 0."""
    reason = case.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    lane = request.config.stash.get(LANE, None)
    outcome = lane.outcome(case.nodeid) if lane is not None and case.nodeid in lane.done else None
    code, output = outcome if outcome is not None else start(case).finish(case.timeout_s)
    assert code == 0, f"exit code {code}; output:\n{failure_report(output)}"


FAILURE_SECTION = re.compile(r"^_{3,} (\S+) _{3,}$(.*?)(?=^-{3,} Captured|^_{3,} \S+ _{3,}$|^={3,})",
                             re.MULTILINE | re.DOTALL)


def failure_report(output: str, section_chars: int = 4000, tail_chars: int = 6000) -> str:
    """What a failed case printed, for its test's message: the traceback of each failed test of a pytest
    output (each section up to its captured output, whose Ray cluster logs can fill the whole tail),
    then the output's end."""
    sections = [f"___ {name} ___{body[:section_chars]}" for name, body in FAILURE_SECTION.findall(output)]
    if not sections or len(output) <= tail_chars:
        return output[-(tail_chars + section_chars):]
    return "\n".join([*sections, f"[... the output's last {tail_chars} characters:]", output[-tail_chars:]])


IN_BACKGROUND = os.environ.get("ADRE_TEST_IN_BACKGROUND") == "1"
"""True inside a pytest started by ``background_pytest``."""

runs_beside_the_suite = pytest.mark.skipif(
    not IN_BACKGROUND, reason="runs in a pytest beside the suite, checked by its module's *_beside_the_suite "
    "test (tests/background.py); ADRE_TEST_IN_BACKGROUND=1 runs it here")
"""Mark of a test that ``background_pytest`` runs: skipped in the suite's own process."""


def background_pytest(nodeid: str, tests: list[str], timeout_s: float) -> BackgroundCase:
    """A case whose subprocess is a pytest of ``tests`` (node ids, each marked ``runs_beside_the_suite``)
    with a session Ray cluster of its own; the test ``nodeid`` calls ``check`` on it."""
    return background_case(nodeid, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *tests], timeout_s,
                           env={"ADRE_TEST_IN_BACKGROUND": "1"})
