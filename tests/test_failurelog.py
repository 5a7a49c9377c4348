"""``failurelog``: a line for what is wrong, a count for the rest, never a line per failed read."""

from __future__ import annotations

import errno
import logging

import pytest

from s3datafs import failurelog
from s3datafs.failurelog import BURST, REPEAT_QUIET, WINDOW, FailureLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="s3datafs.fuse_ops")


def test_one_line_per_subject_then_quiet_for_a_while(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = FailureLog(clock)
    for _ in range(5):
        failures.report("no answer for a.bin", errno.EIO, subject="a.bin", permanent=False)
    failures.report("no answer for b.bin", errno.EIO, subject="b.bin", permanent=False)
    clock.now += REPEAT_QUIET
    failures.report("no answer for a.bin", errno.EIO, subject="a.bin", permanent=False)
    assert caplog.messages == ["no answer for a.bin", "no answer for b.bin", "no answer for a.bin"]


def test_a_permanent_failure_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = FailureLog(clock)
    for _ in range(3):
        failures.report("a.bin changed", errno.ESTALE, subject="a.bin", permanent=True)
        clock.now += WINDOW
    assert caplog.messages == ["a.bin changed"]


def test_a_storm_of_failures_is_a_burst_then_a_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    failures = FailureLog(clock)
    for index in range(3000):  # a loader trying every file of a dataset S3 now refuses
        failures.report(f"denied f{index}", errno.EACCES, subject=f"f{index}", permanent=False)
        failures.report(f"gone f{index}", errno.ESTALE, subject=f"f{index}", permanent=True)
        clock.now += 0.01
    assert len(caplog.messages) == 2 * BURST  # a burst of each kind
    clock.now += WINDOW
    failures.flush()
    assert caplog.messages[-2:] == [
        f"{3000 - BURST} more failed reads (EACCES) were not logged in the last 90 s",
        f"{3000 - BURST} more failed reads (ESTALE) were not logged in the last 90 s",
    ]
    failures.flush()  # nothing more to say
    failures.report("denied again", errno.EACCES, subject="f1", permanent=False)
    assert len(caplog.messages) == 2 * BURST + 3  # a new window, a new burst


def test_the_tables_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failurelog, "BURST", 10**9)
    clock = Clock()
    failures = FailureLog(clock)
    for index in range(10 * failurelog.KEPT):
        failures.report(f"m{index}", errno.EIO, subject=f"s{index}", permanent=index % 2 == 0)
        clock.now += REPEAT_QUIET / 100
    assert len(failures._once) <= failurelog.KEPT
    assert len(failures._last) <= failurelog.KEPT


def test_the_next_report_after_a_window_says_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A window ends at the next report too, not only at the daemon's periodic ``flush``: the
    count of what was held back is told, and a new burst may be logged."""
    clock = Clock()
    failures = FailureLog(clock)
    for index in range(BURST + 5):
        failures.report(f"denied f{index}", errno.EACCES, subject=f"f{index}", permanent=False)
    clock.now += WINDOW
    assert failures.report("denied g", errno.EACCES, subject="g", permanent=False)
    assert caplog.messages[-2:] == [
        f"5 more failed reads (EACCES) were not logged in the last {WINDOW:.0f} s",
        "denied g",
    ]
