"""The cache disk's write pace (``cache.pace``): the write-behind budget a disk allows."""

from __future__ import annotations

import pytest

from s3datafs.cache import pace as pace_module
from s3datafs.cache.pace import WritePace

MB = 1_000_000
FLOOR, CEILING = 8 * MB, 64 * MB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(pace_module.time, "monotonic", clock)
    return clock


def write(pace: WritePace, clock: Clock, nbytes: int, seconds: float) -> None:
    with pace.writing(nbytes):
        clock.now += seconds


def test_until_the_disks_pace_is_known_the_whole_budget_may_wait(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    assert pace.bytes_per_second is None
    assert pace.allowance == CEILING


def test_a_disk_that_keeps_up_gets_the_whole_budget_and_a_slow_one_a_second_of_its_rate(
    clock,
) -> None:
    fast, slow = WritePace(FLOOR, CEILING), WritePace(FLOOR, CEILING)
    write(fast, clock, 8 * MB, 0.02)  # 400 MB/s
    write(slow, clock, 8 * MB, 0.4)  # 20 MB/s
    assert fast.allowance == CEILING
    assert slow.bytes_per_second == pytest.approx(20 * MB)
    assert slow.allowance == pytest.approx(20 * MB)
    write(slow, clock, 1 * MB, 1.0)  # slower still: never below one run
    assert slow.allowance == FLOOR


def test_writes_in_parallel_share_the_disk_and_count_its_busy_time_once(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    with pace.writing(10 * MB), pace.writing(10 * MB):  # two writes over the same second
        clock.now += 1.0
    assert pace.bytes_per_second == pytest.approx(20 * MB)  # not 10 MB/s each
    clock.now += 5.0  # idle time is not the disk's
    write(pace, clock, 20 * MB, 1.0)
    assert pace.bytes_per_second == pytest.approx(20 * MB)


def test_a_failed_write_adds_time_not_bytes(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    write(pace, clock, 30 * MB, 1.0)

    def disk_full() -> None:
        with pace.writing(30 * MB):
            clock.now += 1.0
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        disk_full()
    assert pace.bytes_per_second == pytest.approx(15 * MB)


def test_the_rate_follows_a_disk_that_slows_down_within_seconds(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    for _ in range(10):
        write(pace, clock, 200 * MB, 1.0)
    assert pace.allowance == CEILING
    for _ in range(12):  # out of burst credits: 10 MB/s
        write(pace, clock, 10 * MB, 1.0)
    assert pace.allowance < 20 * MB


def test_a_ceiling_below_the_floor_wins() -> None:
    pace = WritePace(FLOOR, 1 * MB)
    assert pace.allowance == 1 * MB


def test_a_disk_that_has_not_finished_a_write_for_a_while_is_known_to_be_slow(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    with pace.writing(8 * MB):
        clock.now += 0.1
        assert pace.bytes_per_second is None  # too soon to tell
        clock.now += 0.4  # half a second for 8 MB, and not done: at most 16 MB/s
        assert pace.bytes_per_second == pytest.approx(16 * MB)
        assert pace.allowance == 16 * MB


def test_a_write_just_begun_does_not_make_a_fast_disk_look_slow(clock) -> None:
    pace = WritePace(FLOOR, CEILING)
    write(pace, clock, 8 * MB, 0.01)
    with pace.writing(64 * MB):
        assert pace.allowance == CEILING
