"""crc32_combine against zlib, and Coverage: a member's CRC from pieces read in any order."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3datafs.archive.crc import Coverage, crc32_combine


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=2000), b=st.binary(max_size=2000))
def test_combine_equals_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("length", [1, 2, 3, 7, 8, 255, 256, 4096, 65_537, 1 << 20])
def test_combine_over_odd_and_long_lengths(length: int) -> None:
    a = b"prefix bytes"
    b = random.Random(length).randbytes(length)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), length) == zlib.crc32(a + b)


def test_combine_over_a_large_member() -> None:
    zeros = bytes(16 << 20)
    a = zlib.crc32(b"head")
    assert crc32_combine(a, zlib.crc32(zeros), len(zeros)) == zlib.crc32(zeros, a)


@pytest.mark.parametrize("length", [(1 << 32) + 5, 10**12 + 3])
def test_combine_over_lengths_beyond_4_gib_is_consistent(length: int) -> None:
    """crc(A + B) = x^(8 len B) crc(A) + crc(B): shifting in two steps is shifting once."""
    a, b = zlib.crc32(b"head"), zlib.crc32(b"tail")
    half = length // 3
    assert crc32_combine(crc32_combine(a, 0, half), 0, length - half) == crc32_combine(a, 0, length)
    assert crc32_combine(a, b, length) == crc32_combine(a, 0, length) ^ b


def test_combine_with_nothing() -> None:
    assert crc32_combine(0x12345678, zlib.crc32(b""), 0) == 0x12345678
    assert crc32_combine(zlib.crc32(b""), zlib.crc32(b"abc"), 3) == zlib.crc32(b"abc")


@st.composite
def partitions(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Some bytes, and a partition of them into ranges, shuffled."""
    data = draw(st.binary(min_size=1, max_size=3000))
    cuts = draw(st.sets(st.integers(1, len(data) - 1), max_size=20)) if len(data) > 1 else set()
    bounds = sorted({0, len(data), *cuts})
    ranges = list(zip(bounds, bounds[1:], strict=False))
    return data, draw(st.permutations(ranges))


@settings(max_examples=200, deadline=None)
@given(case=partitions(), repeats=st.lists(st.integers(0, 10**6), max_size=5))
def test_coverage_gives_the_whole_crc_exactly_once_at_completion(
    case: tuple[bytes, list[tuple[int, int]]], repeats: list[int]
) -> None:
    data, ranges = case
    coverage = Coverage(len(data))
    results = []
    for number, (start, end) in enumerate(ranges):
        results.append(coverage.add(start, data[start:end]))
        # Pieces read again (overlapping what was seen) are ignored: they decide nothing.
        for pick in repeats:
            if number < len(ranges) - 1:
                again_start, again_end = ranges[pick % (number + 1)]
                assert coverage.add(again_start, data[again_start:again_end]) is None
    assert results[:-1] == [None] * (len(ranges) - 1)
    assert results[-1] == zlib.crc32(data)
    assert len(coverage) == 1


def test_overlapping_pieces_add_the_bytes_not_seen_yet() -> None:
    data = bytes(range(200)) * 2
    coverage = Coverage(len(data))
    assert coverage.add(0, data[0:100]) is None
    assert coverage.add(50, data[50:150]) is None  # adds 100..150
    assert coverage.add(300, data[300:400]) is None
    assert coverage.add(250, data[250:350]) is None  # adds 250..300
    assert len(coverage) == 2
    # Bytes seen before count as they were first seen: wrong ones over them change nothing.
    assert coverage.add(120, b"\xff" * 10) is None
    assert coverage.add(90, data[90:310]) == zlib.crc32(data)  # overlaps both, fills the gap
    assert len(coverage) == 1
    assert coverage.add(0, data) is None  # nothing new: the CRC was told once


@st.composite
def overlapping_ranges(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Some bytes and ranges of them in any order, overlapping at will, covering them all."""
    data = draw(st.binary(min_size=1, max_size=2000))
    bound = st.integers(0, len(data))
    ranges = [tuple(sorted(pair)) for pair in draw(st.lists(st.tuples(bound, bound), max_size=30))]
    ranges.append((0, len(data)))  # the last read covers whatever is left
    return data, ranges


@settings(max_examples=300, deadline=None)
@given(case=overlapping_ranges())
def test_overlapping_pieces_give_the_crc_once_when_every_byte_was_seen(
    case: tuple[bytes, list[tuple[int, int]]],
) -> None:
    data, ranges = case
    coverage, seen = Coverage(len(data)), set()
    for start, end in ranges:
        was_whole = len(seen) == len(data)
        seen.update(range(start, end))
        crc = coverage.add(start, data[start:end])
        now_whole = len(seen) == len(data)
        assert crc == (zlib.crc32(data) if now_whole and not was_whole else None)


def test_whole_member_in_one_piece_and_empty_member() -> None:
    assert Coverage(5).add(0, b"hello") == zlib.crc32(b"hello")
    assert Coverage(0).add(0, b"") == 0


def test_wrong_bytes_give_a_different_crc() -> None:
    data = random.Random(3).randbytes(1000)
    coverage = Coverage(len(data))
    assert coverage.add(500, data[500:]) is None
    assert coverage.add(0, data[:499] + b"\x00") != zlib.crc32(data)
