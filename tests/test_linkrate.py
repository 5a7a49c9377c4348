"""LinkRate: when GETs made nearly alone show a slow link, and which GETs are no sample."""

from __future__ import annotations

import pytest

from s3datafs.commands.status import _counters as status_line
from s3datafs.linkrate import (
    ALONE,
    MIN_SAMPLE_BYTES,
    MIN_SAMPLES,
    SLOW_BYTES_PER_SECOND,
    WINDOW,
    LinkRate,
)

MiB = 1024 * 1024
SLOW_SECONDS = MiB / 100e6  # a 1 MiB body at S3's ~100 MB/s per connection
FAST_SECONDS = MiB / (4 * SLOW_BYTES_PER_SECOND)


def get_alone(link: LinkRate, nbytes: int = MiB, seconds: float = SLOW_SECONDS) -> None:
    link.end(link.begin(), nbytes, seconds)


def test_a_link_without_samples_is_not_slow() -> None:
    link = LinkRate()
    assert not link.slow
    assert link.bytes_per_second == 0


def test_slow_once_enough_slow_bodies_are_in() -> None:
    link = LinkRate()
    for _ in range(MIN_SAMPLES - 1):
        get_alone(link)
        assert not link.slow
    get_alone(link)
    assert link.slow
    assert link.bytes_per_second == int(MiB / SLOW_SECONDS)


def test_small_bodies_and_failed_gets_are_no_samples() -> None:
    link = LinkRate()
    for _ in range(WINDOW):
        get_alone(link, MIN_SAMPLE_BYTES - 1, 1.0)
        link.end(link.begin())  # failed: no body
    assert not link.slow
    assert link.bytes_per_second == 0


def test_gets_in_a_crowd_are_no_samples() -> None:
    """Many GETs at once share the bottleneck; each looks slow, though none is held back."""
    link = LinkRate()
    for _ in range(WINDOW):
        crowd = [link.begin() for _ in range(ALONE + 1)]
        for get in crowd:
            link.end(get, MiB, SLOW_SECONDS)
    assert not link.slow
    # A GET counts the crowd it met at any moment, not only the one it started in.
    first = link.begin()
    later = [link.begin() for _ in range(ALONE)]
    for get in later:
        link.end(get)
    link.end(first, MiB, SLOW_SECONDS)
    assert link.bytes_per_second == 0
    # ALONE at once still counts: a read split in two is two GETs.
    for _ in range(MIN_SAMPLES):
        pair = [link.begin() for _ in range(ALONE)]
        for get in pair:
            link.end(get, MiB, SLOW_SECONDS)
    assert link.slow


def test_the_median_ignores_an_outlier_and_follows_a_link_that_speeds_up() -> None:
    link = LinkRate()
    for _ in range(WINDOW - 1):
        get_alone(link)
    get_alone(link, seconds=0.0)  # a body buffered whole before it was read: no error either
    assert link.slow
    for _ in range(WINDOW // 2 + 1):  # most of the window fast: not slow any more
        get_alone(link, seconds=FAST_SECONDS)
    assert not link.slow


def test_status_tells_the_link_once_it_was_measured() -> None:
    counters = {"s3_requests": 7, "split_reads": 0, "link_bytes_per_second": 0}
    assert "connection" not in status_line(counters)  # nothing measured yet: nothing said
    counters |= {"link_bytes_per_second": 100 * MiB, "split_reads": 2}
    assert status_line(counters).endswith("; a connection brings 100.0 MiB/s, 2 reads split in two")


def test_the_counter_is_the_median_of_the_samples() -> None:
    link = LinkRate()
    get_alone(link, seconds=MiB / 100e6)
    get_alone(link, seconds=MiB / 300e6)
    assert link.bytes_per_second == pytest.approx(200e6)  # an even count: the middle two's mean
    get_alone(link, seconds=MiB / 250e6)
    assert link.bytes_per_second == pytest.approx(250e6)


def test_bodies_of_exactly_the_minimum_are_samples() -> None:
    """A body of ``MIN_SAMPLE_BYTES`` (a 512 KiB run, a common GET) is a sample: "at least"."""
    link = LinkRate()
    for _ in range(MIN_SAMPLES):
        get_alone(link, MIN_SAMPLE_BYTES, 1.0)
    assert link.slow
