"""MemberSource against FakeSource: exact member bytes by every method, few GETs, errors as errors.

Archives are made with ``zipfile`` and indexed with ``read_index``; every answer is compared with
the bytes the member was made from. GETs are counted from ``FakeSource.ranges``.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import trio
from fakes import FakeSource, trio_test
from hypothesis import given, settings
from hypothesis import strategies as st
from zipcraft import (
    header_offset,
    lzma_zip_without_end_marker,
    make_zip,
    patch,
    sample_bytes,
    set_local_extra_length,
)

from s3datafs.archive import members as members_module
from s3datafs.archive import spans as spans_module
from s3datafs.archive.index import read_index
from s3datafs.archive.members import MemberSource
from s3datafs.cache.disk import DiskCache
from s3datafs.errors import ArchiveError
from s3datafs.model import MemberRef, ObjectRef
from s3datafs.prefetch import Readahead
from s3datafs.reader import BlockReader

BUCKET = "bkt"
KIB, MIB = 1024, 1024 * 1024
METHODS = {"stored": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED,
           "bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}
each_compression = pytest.mark.parametrize(
    "method", [METHODS[name] for name in ("deflate", "bzip2", "lzma")],
    ids=["deflate", "bzip2", "lzma"])


@dataclasses.dataclass
class Archive:
    source: FakeSource
    ref: ObjectRef
    members: dict[str, MemberRef]

    def fetched(self) -> int:
        """Archive bytes fetched so far (every GET counted)."""
        return sum(end - start for _, start, end in self.source.ranges)

    def reset(self) -> None:
        self.source.calls.clear()
        self.source.ranges.clear()


def archive(data: bytes, key: str = "d.zip") -> Archive:
    """``data`` put in a FakeSource and indexed; the index GETs are not counted."""
    source = FakeSource()
    source.create_bucket(BUCKET)
    ref = source.put(BUCKET, key, data)
    found, skipped = read_index(source, ref)
    assert skipped == []
    refs = {m.name: MemberRef(ref, m.name, m.header_offset, m.data_limit, m.method, m.flags,
                              m.compressed_size, m.size, m.crc32, m.mtime)
            for m in found if not m.is_dir}
    result = Archive(source, ref, refs)
    result.reset()
    return result


def pieces(size: int, seed: int, count: int = 7) -> list[tuple[int, int]]:
    """``[0, size)`` cut at random places into ``count`` ranges, shuffled."""
    rng = random.Random(seed)
    cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(count - 1))})
    ranges = list(zip(cuts, cuts[1:], strict=False))
    rng.shuffle(ranges)
    return ranges


@pytest.mark.parametrize("peek", [False, True], ids=["get", "at hand"])
def test_a_first_read_far_into_a_member_fetches_its_header_and_its_range_only(
    peek: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A footer read first (Parquet, ``tail``) must not fetch the member up to it."""
    footer = 64 * KIB
    content = {"big.bin": sample_bytes(7, 8 * MIB)}
    zipped = archive(make_zip(content, methods=(zipfile.ZIP_STORED,)))
    source, ref = MemberSource(zipped.source), zipped.members["big.bin"]
    asked: list[tuple[int, int]] = []
    if peek:  # the at-hand path plans the same fetch: record what it would ask the spans for
        real_peek = spans_module.Spans.peek
        monkeypatch.setattr(spans_module.Spans, "peek", lambda spans, archive, start, end: (
            asked.append((start, end)) or real_peek(spans, archive, start, end)))
        assert source.get_range_now(ref, ref.size - footer, ref.size) is None
        assert max(end - start for start, end in asked) <= footer + 200
    assert source.get_range(ref, ref.size - footer, ref.size) == content["big.bin"][-footer:]
    assert zipped.fetched() <= footer + 64 * KIB  # the header's GET is small
    assert source.get_range(ref, 0, 1000) == content["big.bin"][:1000]


@pytest.fixture
def small_interval(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(members_module, "_MIN_INTERVAL", 64 * KIB)
    return 64 * KIB


@pytest.fixture
def no_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fetch counts as continuing another: every GET is what the member code asked for."""
    monkeypatch.setattr(spans_module, "_NEAR_BEFORE", -1)
    monkeypatch.setattr(spans_module, "_NEAR_AFTER", -1)


def interval(ref: MemberRef) -> int:
    return max(members_module._MIN_INTERVAL, ref.size // members_module._SAVED_PER_MEMBER)


CONTENT = {
    "tiny.txt": b"hello, member\n",
    "text.csv": b"".join(b"%d,%d,label-%d\n" % (i, i * i, i % 10) for i in range(20_000)),
    "mixed.bin": sample_bytes(7, 600_000),
    "n" * 200 + ".bin": sample_bytes(8, 5000),  # a local header longer than the first GET guess
}


# -- bytes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_zip64", [False, True], ids=["plain", "zip64-local-headers"])
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_every_method_whole_and_in_shuffled_chunks(method: int, force_zip64: bool) -> None:
    zipped = archive(make_zip(CONTENT, methods=(method,), force_zip64=force_zip64))
    for seed, (name, expected) in enumerate(CONTENT.items()):
        ref = zipped.members[name]
        assert ref.method == method
        assert MemberSource(zipped.source).get_range(ref, 0, ref.size) == expected, name
        # Small compressed members are decompressed whole and kept for the next piece; with
        # whole_max=0 every piece goes through the saved and paused positions.
        for source in (MemberSource(zipped.source), MemberSource(zipped.source, whole_max=0)):
            for start, end in pieces(len(expected), seed):
                assert source.get_range(ref, start, end) == expected[start:end], (name, start)
            # A second pass over the same MemberSource (saved and paused positions in play).
            for start, end in pieces(len(expected), seed + 100, count=11):
                assert source.get_range(ref, start, end) == expected[start:end], (name, start)


@pytest.mark.parametrize("whole_max", [members_module._WHOLE_MAX, 0], ids=["whole", "pieces"])
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_a_range_past_the_members_end_is_answered_to_its_end_and_marks_nothing_bad(
    method: int, whole_max: int
) -> None:
    """As a file read past its end: the bytes up to it, or none. FUSE clamps reads to the size
    first, but a range past the end is no evidence of a bad member: a stored one answered the
    archive's next bytes, a compressed one in pieces failed, and failed every read after."""
    zipped = archive(make_zip(CONTENT, methods=(method,)))
    ref = zipped.members["mixed.bin"]
    expected = CONTENT["mixed.bin"]
    size = ref.size
    source = MemberSource(zipped.source, whole_max=whole_max)
    for start, end in [(size - 10, size + 100), (size, size + 1), (size + 5, size + 50),
                       (0, size + 4096)]:
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
        now = source.get_range_now(ref, start, end)
        assert now is None or now == expected[start:end], (start, end)
    assert source.get_range(ref, 0, size) == expected
    assert not source._failed


def test_first_read_is_one_get_when_the_header_guess_holds() -> None:
    zipped = archive(make_zip(CONTENT, methods=(zipfile.ZIP_STORED,)))
    source = MemberSource(zipped.source)
    ref = zipped.members["text.csv"]
    assert source.get_range(ref, 0, 1000) == CONTENT["text.csv"][:1000]
    assert zipped.source.calls["get_range"] == 1  # the local header and the data together
    assert source.get_range(ref, 5000, 6000) == CONTENT["text.csv"][5000:6000]
    assert zipped.source.calls["get_range"] == 2  # the data offset is known: no header again
    assert zipped.source.ranges[-1][1] == ref.header_offset + 30 + 8 + 5000
    long_name = zipped.members["n" * 200 + ".bin"]
    zipped.reset()
    assert source.get_range(long_name, 0, 100) == CONTENT["n" * 200 + ".bin"][:100]
    assert zipped.source.calls["get_range"] == 2  # the guess was short: one more GET


def test_archive_behind_a_stub() -> None:
    stub = b"#!/bin/sh\nexit 0\n" + bytes(3000)
    zipped = archive(stub + make_zip(CONTENT, methods=(zipfile.ZIP_DEFLATED,)))
    source = MemberSource(zipped.source)
    for name, expected in CONTENT.items():
        ref = zipped.members[name]
        assert source.get_range(ref, 0, ref.size) == expected
        assert source.get_range(ref, ref.size // 2, ref.size) == expected[ref.size // 2:]


def test_plain_objects_pass_straight_through() -> None:
    zipped = archive(make_zip(CONTENT))
    other = zipped.source.put(BUCKET, "plain.bin", b"0123456789" * 10)
    source = MemberSource(zipped.source)
    assert source.get_range(other, 5, 50) == (b"0123456789" * 10)[5:50]
    assert zipped.source.ranges == [(other, 5, 50)]
    assert source.head(BUCKET, "plain.bin") == other
    assert [r.key for r in source.list_latest(BUCKET, "", versioned=False)] == \
        ["d.zip", "plain.bin"]


# -- random access in a large deflated member ------------------------------------------------------


@functools.cache
def big() -> tuple[bytes, bytes]:
    """A 3 MiB member, deflated, with a small stored neighbour after it."""
    data = sample_bytes(11, 3 * MIB + 12_345)
    return data, make_zip({"big.bin": data, "after.txt": b"after"},
                          methods=(zipfile.ZIP_DEFLATED,))


_READS = st.lists(
    st.tuples(st.integers(0, 3 * MIB + 12_344), st.integers(1, 700 * KIB)), min_size=1,
    max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(reads=_READS, near_end=st.lists(st.integers(1, 600), max_size=3))
def test_random_reads_of_a_deflated_member(
    reads: list[tuple[int, int]], near_end: list[int]
) -> None:
    expected, data = big()
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(members_module, "_MIN_INTERVAL", 64 * KIB)
        zipped = archive(data)
        ref = zipped.members["big.bin"]
        source = MemberSource(zipped.source)
        reads = reads + [(ref.size - back, back) for back in near_end]
        for offset, length in reads:
            end = min(offset + length, ref.size)
            assert source.get_range(ref, offset, end) == expected[offset:end], (offset, end)


NEAR_END = {
    "rows": b"".join(b"row %d: %s\n" % (i, b"ab" * (i % 50)) for i in range(2000)),
    "run": b"x" * 5518,  # deflate ends in a long match: zlib takes its input before its output
    "zeros": bytes(70_001),
}


@each_compression
@pytest.mark.parametrize("content", NEAR_END.keys())
def test_continuing_from_every_place_near_the_end(method: int, content: str) -> None:
    """A range may stop anywhere in the last symbols of the stream; the next one continues."""
    expected = NEAR_END[content]
    zipped = archive(make_zip({"m.txt": expected}, methods=(method,)))
    ref = zipped.members["m.txt"]
    for cut in range(ref.size - 300, ref.size):
        source = MemberSource(zipped.source)
        assert source.get_range(ref, 0, cut) == expected[:cut]
        assert source.get_range(ref, cut, ref.size) == expected[cut:], cut


@pytest.mark.parametrize("spans", [True, False], ids=["spans", "no-spans"])
def test_sequential_read_fetches_the_compressed_data_once(
    small_interval: int, monkeypatch: pytest.MonkeyPatch, spans: bool
) -> None:
    if not spans:
        monkeypatch.setattr(spans_module, "_NEAR_BEFORE", -1)
        monkeypatch.setattr(spans_module, "_NEAR_AFTER", -1)
    expected = sample_bytes(12, 6 * MIB + 999)
    zipped = archive(make_zip({"big.bin": expected}, methods=(zipfile.ZIP_DEFLATED,)))
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    for start in range(0, ref.size, MIB):
        end = min(start + MIB, ref.size)
        assert source.get_range(ref, start, end) == expected[start:end]
    # Every compressed byte about once: the local header and the guess that came with it; with
    # spans, the archive's end and a stretch re-fetched where a read straddles two spans.
    gets = zipped.source.calls["get_range"]
    assert gets <= 20
    if spans:
        assert ref.compressed_size <= zipped.fetched() <= \
            zipped.ref.size + gets * spans_module._NEAR_BEFORE
        return
    assert ref.compressed_size <= zipped.fetched() <= \
        ref.compressed_size + members_module._HEADER_GUESS

    # After the pass, a read near the end starts from a saved position close to it.
    zipped.reset()
    start = ref.size - 5000
    assert source.get_range(ref, start, start + 4000) == expected[start: start + 4000]
    assert zipped.fetched() <= interval(ref) + members_module._MIN_CHUNK
    assert zipped.fetched() < ref.compressed_size // 8
    # And one in the middle too.
    zipped.reset()
    start = ref.size // 2 + 12_345
    assert source.get_range(ref, start, start + 100) == expected[start: start + 100]
    assert zipped.fetched() <= interval(ref) + members_module._MIN_CHUNK


def test_saved_positions_keep_little_compressed_input(small_interval: int) -> None:
    """A saved position is a copy of the decompressor, with the input it had not used yet: it
    must not keep the rest of a chunk of up to 8 MiB (256 of them would hold gigabytes)."""
    expected, data = big()
    zipped = archive(data)
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    assert source.get_range(ref, ref.size - 1000, ref.size) == expected[-1000:]  # one chunk
    saved = source._states[ref].saved
    assert len(saved) >= 30
    assert all(len(position.decompressor._inner.unconsumed_tail) <= 64 * KIB
               for position in saved)
    assert source.get_range(ref, 100 * KIB, 300 * KIB) == expected[100 * KIB: 300 * KIB]


def test_backward_reads_use_saved_positions(small_interval: int, no_spans: None) -> None:
    expected = sample_bytes(13, 4 * MIB)
    zipped = archive(make_zip({"big.bin": expected}, methods=(zipfile.ZIP_DEFLATED,)))
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    assert source.get_range(ref, 0, ref.size // 2) == expected[: ref.size // 2]
    zipped.reset()
    for start in range(ref.size // 2 - 100_000, 0, -300_000):  # backwards, inside the first pass
        assert source.get_range(ref, start, start + 50_000) == expected[start: start + 50_000]
    per_read = interval(ref) + members_module._MIN_CHUNK
    assert zipped.fetched() <= per_read * zipped.source.calls["get_range"]
    assert zipped.fetched() < ref.compressed_size  # never from the start each time


def test_evicted_positions_still_give_the_right_bytes(small_interval: int) -> None:
    one, two = sample_bytes(21, 1 * MIB + 3), sample_bytes(22, 1 * MIB + 5)
    zipped = archive(make_zip({"one.bin": one, "two.bin": two}, methods=(zipfile.ZIP_DEFLATED,)))
    expected = {"one.bin": one, "two.bin": two}
    source = MemberSource(zipped.source, max_positions=1)
    rng = random.Random(3)
    for step in range(40):
        name = ("one.bin", "two.bin")[step % 2]
        ref = zipped.members[name]
        start = rng.randrange(ref.size)
        end = min(ref.size, start + rng.randrange(1, 300_000))
        assert source.get_range(ref, start, end) == expected[name][start:end], (name, start)


def read_at_once(source: MemberSource, ref: MemberRef, ranges: list[tuple[int, int]],
                 threads: int = 8, catching: tuple[type[Exception], ...] = ()
                 ) -> list[bytes | Exception]:
    """``ranges`` of ``ref`` read by ``threads`` threads, whose first reads start at once; an
    exception of a type in ``catching`` is that read's result, any other is raised."""
    barrier = threading.Barrier(threads)
    started: set[str] = set()

    def read(job: tuple[int, int]) -> bytes | Exception:
        if threading.current_thread().name not in started:
            started.add(threading.current_thread().name)
            barrier.wait(timeout=10)
        try:
            return source.get_range(ref, *job)
        except catching as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(read, ranges))


def test_threads_reading_one_deflated_member(small_interval: int) -> None:
    expected, data = big()
    zipped = archive(data)
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    rng = random.Random(4)
    ranges = []
    for _ in range(48):
        start = rng.randrange(ref.size)
        ranges.append((start, min(ref.size, start + rng.randrange(1, 400_000))))
    results = read_at_once(source, ref, ranges)
    for (start, end), got in zip(ranges, results, strict=True):
        assert got == expected[start:end], (start, end)


# -- bad members -----------------------------------------------------------------------------------


BAD = {f"m{i}.bin": sample_bytes(30 + i, 50_000) for i in range(3)}


def bad(made_with: int, **fields: int) -> tuple[Archive, MemberRef]:
    """A three-member archive whose middle member ``m1.bin`` got ``fields`` patched."""
    data = make_zip(BAD, methods=(made_with,))
    zipped = archive(patch(data, "m1.bin", **fields))
    return zipped, zipped.members["m1.bin"]


def test_stored_crc_mismatch_read_whole() -> None:
    zipped, ref = bad(zipfile.ZIP_STORED, crc=0x12345678)
    with pytest.raises(ArchiveError, match=r"member 'm1.bin' of s3://bkt/d.zip: CRC-32 mismatch "
                                           r"\([0-9a-f]{8}, the archive says 12345678\)"):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)


@pytest.mark.parametrize("seed", range(5))
def test_stored_crc_mismatch_found_when_the_last_piece_completes_coverage(seed: int) -> None:
    zipped, ref = bad(zipfile.ZIP_STORED, crc=0x12345678)
    source = MemberSource(zipped.source)
    ranges = pieces(ref.size, seed)
    *first, last = ranges
    for start, end in first:
        assert source.get_range(ref, start, end) == BAD["m1.bin"][start:end]
    # Reading again what was read adds nothing and decides nothing.
    again_start, again_end = first[0]
    assert source.get_range(ref, again_start, again_end) == BAD["m1.bin"][again_start:again_end]
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, *last)


def test_stored_crc_mismatch_found_when_overlapping_pieces_cover_the_member() -> None:
    """As the block reader reads a member whose head came another way: whole blocks around
    bytes already served (pieces overlapping what was seen must still count their new bytes)."""
    zipped, ref = bad(zipfile.ZIP_STORED, crc=0x12345678)
    source = MemberSource(zipped.source)
    assert ref.size == 50_000
    for start, end in [(0, 20_000), (16_384, 32_768), (10_000, 40_000)]:
        assert source.get_range(ref, start, end) == BAD["m1.bin"][start:end]
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, 32_768, ref.size)


@pytest.mark.parametrize("damaged_at", [20 * KIB, 600 * KIB, 3 * MIB])
@trio_test
async def test_a_damaged_stored_member_read_head_first_then_whole_is_never_served_whole(
    damaged_at: int,
) -> None:
    """The mount's way: members walked in archive order (the spans land and serve reads at hand),
    a big one read 16 KiB first (``head``), then whole in the kernel's 128 KiB reads."""
    content = {f"small{i}.bin": sample_bytes(i, 300 * KIB) for i in range(4)}
    content["big.bin"] = sample_bytes(99, 6 * MIB + 12345)
    data = bytearray(make_zip(content))
    data[header_offset(bytes(data), "big.bin") + 30 + len("big.bin") + damaged_at] ^= 0xFF
    zipped = archive(bytes(data))
    members = MemberSource(zipped.source)
    served: bytes | None = b""
    try:
        async with trio.open_nursery() as tasks:
            reader = BlockReader(members, block_size=64 * KIB, memory_cache_bytes=32 * MIB,
                                 s3_limiter=trio.CapacityLimiter(8))
            reader.attach(tasks)
            for name, ref in zipped.members.items():
                readahead = Readahead(MIB, 64 * MIB)
                first = 16 * KIB if name == "big.bin" else 128 * KIB
                served = await reader.read(ref, 0, first, readahead)
                for offset in range(first, ref.size, 128 * KIB):
                    served += await reader.read(ref, offset, 128 * KIB, readahead)
            tasks.cancel_scope.cancel()
    except* ArchiveError:
        served = None
    finally:
        members.close()
    assert served is None, "a damaged member was served whole"


def test_stored_pieces_with_the_right_crc_raise_nothing() -> None:
    zipped = archive(make_zip(BAD))
    ref = zipped.members["m1.bin"]
    source = MemberSource(zipped.source)
    got = {start: source.get_range(ref, start, end) for start, end in pieces(ref.size, 10)}
    assert b"".join(got[s] for s in sorted(got)) == BAD["m1.bin"]


def test_deflated_crc_mismatch() -> None:
    zipped, ref = bad(zipfile.ZIP_DEFLATED, crc=0x12345678)
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)
    half = ref.size // 2
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):  # small: decompressed whole
        MemberSource(zipped.source).get_range(ref, 0, half)
    source = MemberSource(zipped.source, whole_max=0)  # as a large member is read
    assert source.get_range(ref, 0, half) == BAD["m1.bin"][:half]  # not known yet
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, half, ref.size)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_a_bad_member_fails_every_later_read(method: int) -> None:
    """Once found bad, even pieces that alone look fine fail, and nothing is fetched again
    (for a minute: see the next test)."""
    zipped, ref = bad(method, crc=0x12345678)
    source = MemberSource(zipped.source, whole_max=0)
    half = ref.size // 2
    assert source.get_range(ref, 0, half) == BAD["m1.bin"][:half]  # not known yet
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, half, ref.size)
    gets = zipped.source.calls["get_range"]
    for start, end in [(0, half), (half, ref.size), (0, ref.size), (10, 20)]:
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            source.get_range(ref, start, end)
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            source.get_range_now(ref, start, end)
    assert zipped.source.calls["get_range"] == gets


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_damage_met_in_transit_is_not_kept_a_member_is_fetched_again_after_a_while(
    tmp_path, monkeypatch: pytest.MonkeyPatch, method: int
) -> None:
    """A byte flipped on its way (plain HTTP) fails the member's CRC: the member fails at once
    for a while, but its archive bytes leave the caches, memory and disk, so the read after
    that and a remount fetch them again and get the right bytes."""
    zipped = archive(make_zip(BAD, methods=(method,)))
    ref = zipped.members["m1.bin"]
    real_get = zipped.source.get_range
    flips = [True]

    def flipping_once(archive_ref: ObjectRef, start: int, end: int) -> bytes:
        data = bytearray(real_get(archive_ref, start, end))
        if flips and start <= ref.header_offset + 1000 < end:
            flips.clear()
            data[ref.header_offset + 1000 - start] ^= 0xFF
        return bytes(data)

    monkeypatch.setattr(zipped.source, "get_range", flipping_once)
    disk = DiskCache(tmp_path, block_size=64 * KIB, capacity=1 << 30)
    source = MemberSource(zipped.source, disk=disk)
    with pytest.raises(ArchiveError):
        source.get_range(ref, 0, ref.size)
    with pytest.raises(ArchiveError):  # at once, nothing fetched
        source.get_range(ref, 0, ref.size)
    source.close()
    remounted = MemberSource(zipped.source, disk=disk)  # the damage did not stay on disk
    assert remounted.get_range(ref, 0, ref.size) == BAD["m1.bin"]
    monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)  # and in time, the same mount too
    assert source.get_range(ref, 0, ref.size) == BAD["m1.bin"]


def test_bytes_a_member_found_bad_decompressed_before_are_not_served_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte flipped on its way in a large deflated member's stored block is served before its
    CRC fails at the member's end, as a large member's pieces are. Once it failed, the output
    kept for reads just behind the live position (its trail) goes with the rest: after the
    wait, a read of those bytes decompresses the member again, from bytes fetched again."""
    data = sample_bytes(44, 3 * MIB)  # its second half random: deflate stores it as it is
    zipped = archive(make_zip({"big.bin": data}, methods=(zipfile.ZIP_DEFLATED,)))
    ref = zipped.members["big.bin"]
    real_get = zipped.source.get_range
    flipped = ref.data_limit - 50_000
    flips = [True]

    def flipping_once(archive_ref: ObjectRef, start: int, end: int) -> bytes:
        chunk = bytearray(real_get(archive_ref, start, end))
        if flips and start <= flipped < end:
            flips.clear()
            chunk[flipped - start] ^= 0x55
        return bytes(chunk)

    monkeypatch.setattr(zipped.source, "get_range", flipping_once)
    source = MemberSource(zipped.source)
    served = b"".join(source.get_range(ref, start, min(start + 128 * KIB, ref.size - 1))
                      for start in range(0, ref.size - 1, 128 * KIB))
    damaged = next(at for at, got in enumerate(served) if got != data[at])
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, ref.size - 1, ref.size)
    monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)
    assert source.get_range(ref, damaged - 10, damaged + 10) == data[damaged - 10: damaged + 10]


def test_a_read_far_into_a_member_keeps_one_trail_of_output_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read 7 MiB into a member decompresses it from its start, but keeps (and joins) only
    up to ``_TRAIL`` of the output before it, for reads just behind: not all 7 MiB."""
    monkeypatch.setattr(members_module, "_TRAIL", 128 * KIB)
    data = sample_bytes(45, 8 * MIB)
    zipped = archive(make_zip({"big.bin": data}, methods=(zipfile.ZIP_DEFLATED,)))
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    start = 7 * MIB
    assert source.get_range(ref, start, start + 4 * KIB) == data[start: start + 4 * KIB]
    trail_start, trail = source._trails[ref]
    assert (trail_start, len(trail)) == (start - 128 * KIB, 132 * KIB)
    behind = start - 100 * KIB
    assert source.get_range(ref, behind, behind + 4 * KIB) == data[behind: behind + 4 * KIB]
    assert source.stats.decompressions == 1


def test_a_member_read_to_its_end_keeps_no_live_position() -> None:
    """At its end a member's decompressor serves no read any more: it is let go (a bzip2 or
    LZMA decompressor holds megabytes, and the positions kept count against their bound)."""
    data = sample_bytes(46, 3 * MIB)
    zipped = archive(make_zip({"big.bin": data}, methods=(zipfile.ZIP_BZIP2,)))
    ref = zipped.members["big.bin"]
    source = MemberSource(zipped.source)
    for start in range(0, ref.size, MIB):
        assert source.get_range(ref, start, start + MIB) == data[start: start + MIB]
    assert source._states[ref].positions == 0


@each_compression
def test_zip_bomb_inflates_past_its_declared_size(method: int) -> None:
    # Declared no smaller than its compressed size (~28 KB): smaller would be skipped at mount.
    zipped, ref = bad(method, size=30_000)
    message = (r"member 'm1.bin' of s3://bkt/d.zip inflates past its declared size of 30000 "
               r"bytes \(a zip bomb or a corrupt archive\); not served")
    with pytest.raises(ArchiveError, match=message):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)
    with pytest.raises(ArchiveError, match="inflates past"):  # small: decompressed whole
        MemberSource(zipped.source).get_range(ref, 0, 500)
    source = MemberSource(zipped.source, whole_max=0)
    assert source.get_range(ref, 0, 500) == BAD["m1.bin"][:500]
    with pytest.raises(ArchiveError, match="inflates past"):
        source.get_range(ref, 500, ref.size)


@pytest.mark.parametrize("declared", [5517, 5508, 5300])
def test_zip_bomb_whose_excess_is_the_rest_of_the_last_match(declared: int) -> None:
    """zlib has taken all the input for output it still holds: that output counts too."""
    data = patch(make_zip({"m.txt": b"x" * 5518}, methods=(zipfile.ZIP_DEFLATED,)), "m.txt",
                 size=declared)
    zipped = archive(data)
    ref = zipped.members["m.txt"]
    with pytest.raises(ArchiveError, match="inflates past its declared size"):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)
    source = MemberSource(zipped.source, whole_max=0)
    assert source.get_range(ref, 0, declared - 1) == b"x" * (declared - 1)
    with pytest.raises(ArchiveError, match="inflates past its declared size"):
        source.get_range(ref, declared - 1, declared)


@each_compression
def test_data_that_ends_early(method: int) -> None:
    zipped, ref = bad(method, size=51_000)
    message = (r"member 'm1.bin' of s3://bkt/d.zip: its data ends after 50000 of its 51000 "
               r"bytes \(a corrupt archive\)")
    with pytest.raises(ArchiveError, match=message):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)
    with pytest.raises(ArchiveError, match=message):
        MemberSource(zipped.source).get_range(ref, 49_000, 51_000)


@functools.cache
def unmarked() -> bytes:
    """The member of ``lzma_unmarked``: half text, half random, 100 KB."""
    return sample_bytes(61, 100_000)


def lzma_unmarked(declared: int | None = None) -> tuple[Archive, MemberRef]:
    """An archive of one LZMA member whose stream has no end marker (7-Zip writes them so,
    flag bit 1 unset): its header's size alone says where it ends."""
    zipped = archive(_lzma_unmarked_zip(declared))
    ref = zipped.members["m.bin"]
    assert (ref.method, ref.flags & 0x2) == (zipfile.ZIP_LZMA, 0)
    return zipped, ref


@functools.cache
def _lzma_unmarked_zip(declared: int | None) -> bytes:
    return lzma_zip_without_end_marker("m.bin", unmarked(), declared=declared)


@pytest.mark.parametrize("whole_max", [members_module._WHOLE_MAX, 0], ids=["whole", "pieces"])
def test_an_lzma_member_without_an_end_marker_is_read_to_its_declared_size(whole_max: int) -> None:
    zipped, ref = lzma_unmarked()
    expected = unmarked()
    source = MemberSource(zipped.source, whole_max=whole_max)
    assert source.get_range(ref, 0, ref.size) == expected
    for start, end in pieces(ref.size, seed=5):  # in any order: from the start again each time
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
    assert source.get_range(ref, ref.size - 1, ref.size) == expected[-1:]
    assert not source._failed


def test_an_lzma_member_without_an_end_marker_is_kept_decompressed(tmp_path) -> None:
    """The disk cache's copy (``s3datafs prefetch``, random reads) is written to the declared
    size, checked, and served."""
    zipped, ref = lzma_unmarked()
    source = MemberSource(zipped.source, disk=DiskCache(tmp_path, block_size=64 * KIB,
                                                        capacity=1 << 30), whole_max=0)
    assert source.keep(ref)
    zipped.reset()
    for start, end in [(0, ref.size), (50_000, 50_001), (ref.size - 10, ref.size)]:
        assert source.get_range(ref, start, end) == unmarked()[start:end]
    assert zipped.source.calls["get_range"] == 0
    source.close()


@pytest.mark.parametrize("whole_max", [members_module._WHOLE_MAX, 0], ids=["whole", "pieces"])
def test_an_lzma_member_without_an_end_marker_is_what_its_header_says(whole_max: int) -> None:
    """With no end marker the header's size alone ends the member, and its CRC checks it: a
    stream that goes on past that size is read to it (what follows cannot be told from the
    symbols a decoder makes up of the range coder's flush), one that stops short of it fails."""
    short_zip, short = lzma_unmarked(declared=80_000)
    source = MemberSource(short_zip.source, whole_max=whole_max)
    assert source.get_range(short, 0, short.size) == unmarked()[:80_000]
    long_zip, long = lzma_unmarked(declared=100_001)
    with pytest.raises(ArchiveError, match="CRC-32 mismatch|its data ends after 100000 of"):
        MemberSource(long_zip.source, whole_max=whole_max).get_range(long, 0, long.size)


def test_corrupt_deflate_stream() -> None:
    data = bytearray(make_zip(BAD, methods=(zipfile.ZIP_DEFLATED,)))
    zipped = archive(bytes(data))
    ref = zipped.members["m1.bin"]
    at = ref.header_offset + 30 + 6
    data[at: at + 64] = bytes(range(64))
    zipped.source.put(BUCKET, "d.zip", bytes(data))
    ref = dataclasses.replace(ref, archive=zipped.source.head(BUCKET, "d.zip"))
    with pytest.raises(ArchiveError, match="CRC-32 mismatch|cannot be decompressed|ends after"):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)


@pytest.mark.parametrize(
    ("method", "fields", "message"),
    [
        (zipfile.ZIP_DEFLATED, {"flags": 1}, "member 'm1.bin' of s3://bkt/d.zip is encrypted; "
                                             "s3datafs cannot decrypt zip members"),
        (zipfile.ZIP_STORED, {"flags": 1}, "is encrypted"),
        (zipfile.ZIP_DEFLATED, {"method": 9}, r"is compressed with deflate64, which s3datafs does "
                                              r"not support \(stored, deflate, bzip2 and lzma "
                                              r"are\)"),
        (zipfile.ZIP_DEFLATED, {"method": 93}, "is compressed with zstd"),
        (zipfile.ZIP_DEFLATED, {"method": 77}, "is compressed with method 77"),
        (zipfile.ZIP_STORED, {"size": 49_999}, r"is stored, yet its sizes disagree \(49999 and "
                                               r"50000 bytes\)"),
    ],
    ids=["encrypted", "encrypted-stored", "deflate64", "zstd", "unknown", "stored-sizes"],
)
def test_unreadable_members_fail_every_read_without_a_get(
    method: int, fields: dict[str, int], message: str
) -> None:
    zipped, ref = bad(method, **fields)
    source = MemberSource(zipped.source)
    for start, end in [(0, ref.size), (10, 20)]:
        with pytest.raises(ArchiveError, match=message):
            source.get_range(ref, start, end)
    assert zipped.source.calls["get_range"] == 0
    assert source.get_range(zipped.members["m0.bin"], 0, 50_000) == BAD["m0.bin"]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_header_offset_not_at_a_local_header(method: int) -> None:
    zipped = archive(make_zip(BAD, methods=(method,)))
    ref = dataclasses.replace(zipped.members["m1.bin"],
                              header_offset=zipped.members["m1.bin"].header_offset + 1)
    message = (f"member 'm1.bin' of s3://bkt/d.zip: no local file header at archive offset "
               f"{ref.header_offset} \\(a corrupt archive\\)")
    for start, end in [(0, ref.size), (100, 200)]:
        with pytest.raises(ArchiveError, match=message):
            MemberSource(zipped.source).get_range(ref, start, end)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_local_extra_field_pushing_data_into_the_next_member(method: int) -> None:
    data = set_local_extra_length(make_zip(BAD, methods=(method,)), "m1.bin", 4000)
    zipped = archive(data)
    ref = zipped.members["m1.bin"]
    message = ("member 'm1.bin' of s3://bkt/d.zip: its data runs into the next member "
               r"\(a corrupt archive or a zip bomb\); not served")
    for start, end in [(0, ref.size), (100, 200), (ref.size - 10, ref.size)]:
        with pytest.raises(ArchiveError, match=message):
            MemberSource(zipped.source).get_range(ref, start, end)
    assert MemberSource(zipped.source).get_range(zipped.members["m0.bin"], 0, 50_000) == \
        BAD["m0.bin"]


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_data_one_byte_into_the_next_member_is_refused(method: int) -> None:
    """The bound is exact: data ending at the next member's header is served (every member of
    ``BAD`` does), data ending one byte past it is not (overlapping members are a zip bomb's
    trick, and their bytes are not the member's)."""
    data = make_zip(BAD, methods=(method,))
    intact = archive(data)
    assert MemberSource(intact.source).get_range(intact.members["m1.bin"], 0, 50_000) == \
        BAD["m1.bin"]
    zipped = archive(set_local_extra_length(data, "m1.bin", 1))  # its data moves 1 byte on
    ref = zipped.members["m1.bin"]
    with pytest.raises(ArchiveError, match="its data runs into the next member"):
        MemberSource(zipped.source).get_range(ref, 0, ref.size)
