"""Large compressed members kept decompressed in the disk cache (``archive.decompressed``).

Against FakeSource and a real ``DiskCache`` in ``tmp_path``, with region files of 1 MiB so a
member of a few MiB spans several. Decompressions are ``MemberSource.stats.decompressions``
(every decompression that starts at a member's start); GETs are counted from the FakeSource.
bzip2 and LZMA members are kept when a read would start over; deflated ones (larger than
``members._TRAIL``) when a read would also inflate ``members._NEAR_SAVED`` bytes or more from the
nearest saved position (the test member is smaller than ``members._MIN_INTERVAL``: it has none
unless a test makes the interval small).
"""

from __future__ import annotations

import functools
import random
import threading
import time
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_zip_members import BUCKET, KIB, MIB, Archive, archive, read_at_once
from zipcraft import make_zip, patch, sample_bytes

from s3datafs.archive import decompressed as decompressed_module
from s3datafs.archive import members as members_module
from s3datafs.archive.members import MemberSource
from s3datafs.cache import disk as disk_module
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache
from s3datafs.errors import ArchiveError, StaleObjectError
from s3datafs.model import UnzippedRef
from s3datafs.uri import parse_s3_uri

BLOCK = 64 * KIB
KEPT = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA, "deflate": zipfile.ZIP_DEFLATED}
each_kept_method = pytest.mark.parametrize("method", KEPT.values(), ids=KEPT.keys())


@pytest.fixture(autouse=True)
def small_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Region files of 1 MiB, a trail of 128 KiB (``members._TRAIL``, 8 MiB: a first read
    within it goes the live way) and ``members._NEAR_SAVED`` of 16 KiB (1 MiB), so a member of
    3 MiB is like one of many MiB."""
    monkeypatch.setattr(disk_module, "REGION_BYTES", MIB)
    monkeypatch.setattr(members_module, "_TRAIL", 128 * KIB)
    monkeypatch.setattr(members_module, "_NEAR_SAVED", 16 * KIB)


@functools.cache
def content() -> bytes:
    return sample_bytes(41, 3 * MIB + 4321)  # more than _WHOLE_MAX, four region files


@functools.cache
def zip_bytes(method: int) -> bytes:
    return make_zip({"big.bin": content(), "after.txt": b"after"}, methods=(method,))


def zipped(method: int, **fields: int) -> Archive:
    data = zip_bytes(method)
    return archive(patch(data, "big.bin", **fields) if fields else data)


def big_member(method: int) -> tuple[bytes, Archive, members_module.MemberRef]:
    """The test member's bytes, an archive holding it compressed with ``method``, its ref."""
    archived = zipped(method)
    return content(), archived, archived.members["big.bin"]


def cache(directory: Path, capacity: int = 1 << 30) -> DiskCache:
    return DiskCache(directory, block_size=BLOCK, capacity=capacity, dataset="s3://bkt/d.zip")


def settled(source: MemberSource) -> None:
    """The decompression a read started has ended (its reader may be served before that)."""
    assert source._kept is not None
    assert source._kept.wait_idle(30)


def held_after_first_piece(source: MemberSource) -> threading.Event:
    """Make each decompression of ``source`` into the cache wait after its first piece of
    output (1 MiB) until the event returned is set."""
    go_on = threading.Event()
    pieces = source._whole_pieces

    def held_pieces(member: members_module.MemberRef):
        for number, piece in enumerate(pieces(member)):
            if number == 1:
                assert go_on.wait(30)
            yield piece

    source._whole_pieces = held_pieces
    return go_on


def random_ranges(size: int, seed: int, count: int = 30) -> list[tuple[int, int]]:
    """Scattered ranges, none near the member's start (a first read there goes the live way,
    as a sequential reader's would: see ``members._restarts``)."""
    rng = random.Random(seed)
    starts = [rng.randrange(256 * KIB, size) for _ in range(count)]
    return [(start, min(size, start + rng.choice([1, 4 * KIB, BLOCK, 300 * KIB])))
            for start in starts]


def kept_files(directory: Path, ref: members_module.MemberRef) -> list[Path]:
    """Region files of the member's verified copy (its marker's attempt) and of the marker."""
    marker = object_digest(UnzippedRef.of(ref))
    return [p for p in directory.rglob("*.r*") if p.name.startswith(marker)]


@each_kept_method
def test_random_reads_decompress_a_large_member_once(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for number, (start, end) in enumerate(random_ranges(ref.size, seed=1)):
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
        if number == 0:
            settled(source)
            gets = archived.source.calls["get_range"]
    assert source.stats.decompressions == 1
    assert archived.source.calls["get_range"] == gets  # every read after the first: the disk
    # The whole member too, and the member's end.
    assert source.get_range(ref, 0, ref.size) == expected
    assert source.get_range(ref, ref.size - 1, ref.size) == expected[-1:]
    assert source.stats.decompressions == 1


@each_kept_method
def test_a_remount_decompresses_and_fetches_nothing(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    first = MemberSource(archived.source, disk=cache(tmp_path))
    assert first.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(first)
    first.close()
    archived.reset()
    again = MemberSource(archived.source, disk=cache(tmp_path))  # another process, say
    for start, end in [(0, BLOCK), *random_ranges(ref.size, seed=2)]:
        assert again.get_range(ref, start, end) == expected[start:end], (start, end)
    assert again.stats.decompressions == 0
    assert archived.source.calls["get_range"] == 0


def starting_over_keeps_it(
    source: MemberSource, ref: members_module.MemberRef, expected: bytes, directory: Path,
    start: int = 0,
) -> None:
    """A read at ``start`` behind the live position: one more decompression, and the member is
    kept."""
    decompressions = source.stats.decompressions
    assert source.get_range(ref, start, start + BLOCK) == expected[start: start + BLOCK]
    settled(source)
    assert source.stats.decompressions == decompressions + 1
    assert kept_files(directory, ref) != []


@each_kept_method
def test_a_sequential_reader_keeps_the_live_position(tmp_path: Path, method: int) -> None:
    """From a first read at the member's start, in order: no whole decompression ahead of the
    reader, no copy written; one decompression, as before."""
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start in range(0, ref.size, 128 * KIB):
        end = min(ref.size, start + 128 * KIB)
        assert source.get_range(ref, start, end) == expected[start:end]
    assert source.stats.decompressions == 1
    assert kept_files(tmp_path, ref) == []
    if method == zipfile.ZIP_DEFLATED:
        # A second pass starts over from the member's start, as before: inflating from there
        # is what a read from the cache would save, and no copy is written.
        for start in range(0, ref.size, 128 * KIB):
            end = min(ref.size, start + 128 * KIB)
            assert source.get_range(ref, start, end) == expected[start:end]
        assert source.stats.decompressions == 2
        assert kept_files(tmp_path, ref) == []
        return
    # A second pass starts over: that member is then kept, and the pass after reads the disk.
    starting_over_keeps_it(source, ref, expected, tmp_path)
    assert source.get_range(ref, 5 * BLOCK, 6 * BLOCK) == expected[5 * BLOCK: 6 * BLOCK]
    assert source.stats.decompressions == 2


@each_kept_method
def test_readahead_runs_arriving_out_of_order_are_served_from_the_trail(
    tmp_path: Path, method: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential reader's readahead runs reach the member out of order (worker threads): a
    run behind the live position, by no more than the trail, is served from its latest
    output, neither by starting over nor by decompressing the member into the cache."""
    monkeypatch.setattr(members_module, "_TRAIL", 512 * KIB)
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start, end in [(0, 256 * KIB), (768 * KIB, MIB), (256 * KIB, 768 * KIB),
                       (MIB, 1536 * KIB), (2 * MIB, 3 * MIB), (1536 * KIB, 2 * MIB)]:
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
    assert source.stats.decompressions == 1
    assert kept_files(tmp_path, ref) == []
    # Further behind than the trail (and from the member's start): the member goes to the
    # cache, once.
    starting_over_keeps_it(source, ref, expected, tmp_path, start=MIB)


@each_kept_method
def test_a_first_readahead_run_near_the_start_goes_the_live_way(
    tmp_path: Path, method: int
) -> None:
    """Within the trail of the start, a first read is a sequential reader's (or its first
    readahead run, ahead of its first read): the live position serves it, and the trail the
    read before it; nothing goes to the cache, one decompression."""
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start, end in [(64 * KIB, 128 * KIB), (0, 64 * KIB), (128 * KIB, 256 * KIB)]:
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
    assert source.stats.decompressions == 1
    assert kept_files(tmp_path, ref) == []


@each_kept_method
def test_a_first_read_behind_the_first_readahead_run_joins_its_decompression(
    tmp_path: Path, method: int
) -> None:
    """The first readahead run of a sequential reader can reach a member before its first read
    (worker threads): the run starts the decompression into the cache, and the first read
    joins it rather than decompressing the member a second time beside it."""
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    archived.source.gate = threading.Event()  # the decompression waits for its first GET
    flights = source._kept._flights

    def waiting(count: int) -> bool:
        """Until ``count`` reads wait for the member's decompression (False after 5 s)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if ref in flights and len(flights[ref].wants) >= count:
                return True
            time.sleep(0.01)
        return False

    with ThreadPoolExecutor(2) as pool:
        run = pool.submit(source.get_range, ref, MIB, 2 * MIB)
        assert waiting(1)
        first = pool.submit(source.get_range, ref, 0, MIB)
        joined = waiting(2)
        archived.source.gate.set()
        assert joined, "the first read did not join the decompression under way"
        assert first.result() == expected[:MIB]
        assert run.result() == expected[MIB: 2 * MIB]
    settled(source)
    assert source.stats.decompressions == 1


def test_a_read_that_ends_where_a_piece_of_output_ends_is_served_with_that_piece(
    tmp_path: Path,
) -> None:
    """A reader waits for the output no longer than it must: a range that ends exactly where
    a piece of the decompression's output ends is served with that piece, not once the next
    one comes (the next piece may wait for the member's next chunk from S3)."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    go_on = threading.Event()

    def held_pieces(_member: members_module.MemberRef):
        yield expected[:MIB]
        assert go_on.wait(30)
        yield expected[MIB:]

    source._whole_pieces = held_pieces
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(source.get_range, ref, MIB - BLOCK, MIB)  # past the trail: kept
        try:
            assert read.result(timeout=5) == expected[MIB - BLOCK: MIB]
        finally:
            go_on.set()
    settled(source)


def test_a_member_is_decompressing_only_while_its_copy_is_being_made(tmp_path: Path) -> None:
    """``decompressing`` tells the block reader that a read waits for this process, not for S3
    (it then holds no S3 slot): true of a member only while its copy is being made."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    go_on = held_after_first_piece(source)
    assert not source.decompressing(ref)
    try:
        assert source.get_range(ref, MIB // 2, MIB // 2 + BLOCK) == expected[
            MIB // 2: MIB // 2 + BLOCK]  # served from the first piece
        assert source.decompressing(ref)
    finally:
        go_on.set()
    settled(source)
    assert not source.decompressing(ref)
    assert not source.decompressing(archived.members["after.txt"])


def test_a_read_joins_the_decompression_under_way_nearer_than_the_live_position(
    tmp_path: Path,
) -> None:
    """A sequential reader's live position is at 512 KiB and a decompression into the cache
    (a read behind it started one) has passed 1 MiB: a read at 1.1 MiB waits for that
    decompression's output rather than decompress 600 KiB more from the live position."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start in range(0, 512 * KIB, BLOCK):  # from the member's start: the live way
        assert source.get_range(ref, start, start + BLOCK) == expected[start: start + BLOCK]
    state = source._states[ref]
    assert state.live.out_pos == 512 * KIB
    go_on = held_after_first_piece(source)
    behind = 200 * KIB  # behind the live position: the member is kept
    try:
        assert source.get_range(ref, behind, behind + BLOCK) == expected[
            behind: behind + BLOCK]
        assert source._kept.produced(ref) >= MIB
        with ThreadPoolExecutor(1) as pool:
            start = MIB + 100 * KIB
            read = pool.submit(source.get_range, ref, start, start + BLOCK)
            deadline = time.monotonic() + 5
            while not read.done() and not source._kept._flights[ref].wants:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            go_on.set()
            assert read.result() == expected[start: start + BLOCK]
    finally:
        go_on.set()
    settled(source)
    assert state.live.out_pos == 512 * KIB


@each_kept_method
def test_concurrent_random_readers_decompress_once(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    ranges = random_ranges(ref.size, seed=3, count=48)
    results = read_at_once(source, ref, ranges)
    for (start, end), got in zip(ranges, results, strict=True):
        assert got == expected[start:end], (start, end)
    assert source.stats.decompressions == 1


@each_kept_method
def test_a_read_that_found_no_copy_as_the_decompression_ended_reads_its_copy(
    tmp_path: Path, method: int
) -> None:
    """A read looks at the disk first (no copy yet: the decompression is under way), and that
    decompression ends before the read gets to join it: the read finds the copy it left, and
    does not decompress the member a second time."""
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    kept = source._kept
    assert kept is not None
    last_piece = threading.Event()  # the decompression waits before its last piece
    pieces = source._whole_pieces

    def held_pieces(member: members_module.MemberRef):
        for piece in pieces(member):
            if not last_piece.is_set() and kept.produced(member) + len(piece) >= member.size:
                assert last_piece.wait(10)
            yield piece

    source._whole_pieces = held_pieces
    looked = kept.read

    def look_then_let_it_end(member, start, end):
        found = looked(member, start, end)
        if found is None and kept.produced(member) is not None:  # one under way: let it end
            last_piece.set()
            assert kept.wait_idle(30)
        return found

    assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    kept.read = look_then_let_it_end
    start = 2 * MIB
    assert source.get_range(ref, start, start + BLOCK) == expected[start: start + BLOCK]
    settled(source)
    assert source.stats.decompressions == 1


def test_decompressions_into_the_cache_under_way_at_once_are_bounded(tmp_path: Path) -> None:
    """A random reader over many large members starts a decompression per member it reaches,
    and each runs on, in a thread of its own holding a region of output and a chunk of input,
    after its reader was served and moved on: their number is bounded, and a read beyond the
    bound goes the old way (from the member's start, in the reader's thread)."""
    count = decompressed_module._FLIGHTS + 3
    files = {f"m{number}.bin": sample_bytes(50 + number, MIB + 300 * KIB)
             for number in range(count)}
    archived = archive(make_zip(files, methods=(zipfile.ZIP_BZIP2,)))
    source = MemberSource(archived.source, disk=cache(tmp_path))
    kept = source._kept
    assert kept is not None
    go_on = held_after_first_piece(source)  # each decompression waits after 1 MiB
    most = 0
    try:
        for name, data in files.items():
            ref = archived.members[name]
            start = 256 * KIB  # past the trail: a read the live position cannot serve
            assert source.get_range(ref, start, start + BLOCK) == data[start: start + BLOCK]
            most = max(most, len(kept._flights))
    finally:
        go_on.set()
    settled(source)
    assert most <= decompressed_module._FLIGHTS
    for name, data in files.items():
        ref = archived.members[name]
        assert source.get_range(ref, 0, ref.size) == data


@each_kept_method
def test_a_member_failing_its_crc_is_never_kept_nor_read_to_its_end(
    tmp_path: Path, method: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    archived = zipped(method, crc=0x12345678)
    ref = archived.members["big.bin"]
    source = MemberSource(archived.source, disk=cache(tmp_path))
    # A read ahead of the decompression is served as it passes (the CRC is not known yet: as
    # the live position serves pieces); one that reaches the member's end waits for the check.
    assert source.get_range(ref, MIB, MIB + BLOCK) == content()[MIB: MIB + BLOCK]
    settled(source)
    for start, end in [(MIB, MIB + BLOCK), (ref.size - 1, ref.size)]:  # found bad: at once
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            source.get_range(ref, start, end)
    assert kept_files(tmp_path, ref) == []
    # The attempt's blocks are gone too: only the archive's own region files are left.
    archive_digest = object_digest(archived.ref)
    assert all(p.name.startswith(archive_digest) for p in tmp_path.rglob("*.r*"))
    monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)  # tried again: still bad
    for start, end in [(ref.size - BLOCK, ref.size), (0, ref.size)]:
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            source.get_range(ref, start, end)
    settled(source)
    assert kept_files(tmp_path, ref) == []
    remounted = MemberSource(archived.source, disk=cache(tmp_path))
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        remounted.get_range(ref, ref.size - 10, ref.size)


@each_kept_method
def test_readers_of_a_bad_member_get_its_bytes_before_its_end_or_its_error(
    tmp_path: Path, method: int
) -> None:
    """Readers waiting ahead of the decompression get their bytes as it passes them (the CRC is
    not known yet, as with the live position); those behind it wait for its end and get the
    error; nobody gets wrong bytes, and it is one decompression."""
    archived = zipped(method, crc=0x12345678)
    ref = archived.members["big.bin"]
    source = MemberSource(archived.source, disk=cache(tmp_path))
    starts = [MIB * k // 2 + 1 for k in range(1, 7)]
    results = read_at_once(source, ref, [(start, start + BLOCK) for start in starts],
                           threads=len(starts), catching=(ArchiveError,))
    for start, result in zip(starts, results, strict=True):
        assert result == content()[start: start + BLOCK] or (
            isinstance(result, ArchiveError) and "CRC-32 mismatch" in str(result)), start
    settled(source)
    assert source.stats.decompressions == 1
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.get_range(ref, starts[0], starts[0] + BLOCK)


@each_kept_method
def test_readers_of_a_member_whose_archive_changed_after_mount_all_get_estale(
    tmp_path: Path, method: int
) -> None:
    """The archive replaced in S3 after mount: the decompression into the cache (a thread of
    its own) fails on its first GET. Every reader waiting for it gets that error, typed
    (ESTALE), each its own copy; nothing is kept, and nothing is left waiting."""
    _expected, archived, ref = big_member(method)
    archived.source.put(BUCKET, archived.ref.key, b"another archive now")
    source = MemberSource(archived.source, disk=cache(tmp_path))
    starts = [MIB * k // 2 + 1 for k in range(1, 5)]  # far from the start: the kept way
    results = read_at_once(source, ref, [(start, start + BLOCK) for start in starts],
                           threads=len(starts), catching=(StaleObjectError,))
    settled(source)
    assert all(isinstance(result, StaleObjectError) for result in results), results
    assert all("changed or was deleted since it was pinned" in str(result) for result in results)
    assert len({id(result) for result in results}) == len(results)  # one exception per reader
    assert kept_files(tmp_path, ref) == []
    with pytest.raises(StaleObjectError):
        source.get_range(ref, MIB, MIB + BLOCK)


@each_kept_method
def test_damage_in_transit_leaves_nothing_and_the_next_try_is_kept(
    tmp_path: Path, method: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte flipped on its way fails the CRC: nothing kept; tried again, the member is."""
    expected, archived, ref = big_member(method)
    real_get = archived.source.get_range
    flips = [True]

    def flipping_once(archive_ref, start: int, end: int) -> bytes:
        data = bytearray(real_get(archive_ref, start, end))
        at = ref.header_offset + 200_000
        if flips and start <= at < end:
            flips.clear()
            data[at - start] ^= 0x55
        return bytes(data)

    monkeypatch.setattr(archived.source, "get_range", flipping_once)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    with pytest.raises(ArchiveError):
        source.get_range(ref, ref.size - BLOCK, ref.size)  # its end: after the CRC is checked
    settled(source)
    assert kept_files(tmp_path, ref) == []
    monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)
    for start, end in random_ranges(ref.size, seed=4, count=10):
        assert source.get_range(ref, start, end) == expected[start:end]
    settled(source)
    assert kept_files(tmp_path, ref) != []


@each_kept_method
def test_evicted_blocks_are_decompressed_again(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    disk = cache(tmp_path)
    source = MemberSource(archived.source, disk=disk)
    assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(source)
    # One region file of the copy goes (eviction, another mount's scan): reads in it decompress
    # again, right; reads elsewhere were and stay disk reads.
    attempt = source._kept._attempts[ref]
    copy = object_digest(UnzippedRef.of(ref, attempt))
    (region,) = [p for p in tmp_path.rglob(f"{copy}.r2")]
    region.unlink()
    start = 2 * MIB + 5
    assert source.get_range(ref, start, start + 5000) == expected[start: start + 5000]
    settled(source)
    assert source.stats.decompressions == 2
    for start, end in random_ranges(ref.size, seed=5):
        assert source.get_range(ref, start, end) == expected[start:end]
    assert source.stats.decompressions == 2
    # The marker goes: the same.
    for marker in kept_files(tmp_path, ref):
        marker.unlink()
    remounted = MemberSource(archived.source, disk=cache(tmp_path))
    assert remounted.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(remounted)
    assert remounted.stats.decompressions == 1


def test_a_mount_whose_copy_was_evicted_reads_the_copy_another_mount_made_since(
    tmp_path: Path,
) -> None:
    """A mount remembers the attempt its marker named; once that attempt's blocks are gone
    (evicted), it reads the marker again and finds the copy another mount made meanwhile,
    rather than decompressing the member once more."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    first = MemberSource(archived.source, disk=cache(tmp_path))
    assert first.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(first)
    attempt = object_digest(UnzippedRef.of(ref, first._kept._attempts[ref]))
    for path in tmp_path.rglob(f"{attempt}.r*"):  # evicted by another mount's scan
        path.unlink()
    other = MemberSource(archived.source, disk=cache(tmp_path))
    assert other.get_range(ref, 2 * MIB, 2 * MIB + BLOCK) == expected[2 * MIB: 2 * MIB + BLOCK]
    settled(other)
    assert other.stats.decompressions == 1  # a new copy, a new attempt in the marker
    start = MIB + 4 * BLOCK
    assert first.get_range(ref, start, start + BLOCK) == expected[start: start + BLOCK]
    assert first.stats.decompressions == 1  # the other mount's copy


@each_kept_method
def test_a_small_cache_evicts_and_reads_stay_right(tmp_path: Path, method: int) -> None:
    """The real eviction: a bound that holds the copy and little more, then other data."""
    expected, archived, ref = big_member(method)
    disk = cache(tmp_path, capacity=16 * MIB)
    source = MemberSource(archived.source, disk=disk)
    assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(source)
    other = archived.source.put("bkt", "other.bin", sample_bytes(1, 16 * MIB))
    disk.write(other, object_digest(other), 0,
               [bytes(BLOCK)] * (16 * MIB // BLOCK))  # pushes out everything older
    for start, end in random_ranges(ref.size, seed=6, count=10):
        assert source.get_range(ref, start, end) == expected[start:end]
    settled(source)
    assert source.stats.decompressions == 2


@each_kept_method
def test_a_member_over_a_quarter_of_the_bound_is_not_kept(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path, capacity=ref.size * 4 - 1))
    for start, end in random_ranges(ref.size, seed=7, count=5):
        assert source.get_range(ref, start, end) == expected[start:end]
    assert kept_files(tmp_path, ref) == []


def test_a_member_of_a_quarter_of_the_bound_is_kept(tmp_path: Path) -> None:
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    source = MemberSource(archived.source, disk=cache(tmp_path, capacity=ref.size * 4))
    assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(source)
    assert kept_files(tmp_path, ref) != []


def test_a_member_of_whole_blocks_is_read_to_its_end_from_its_copy(tmp_path: Path) -> None:
    """A member whose size is a whole number of blocks: a read that ends at a block's end, its
    last one's too, reads its blocks from the copy, no decompression again."""
    data = sample_bytes(43, 3 * MIB)
    archived = archive(make_zip({"whole.bin": data}, methods=(zipfile.ZIP_BZIP2,)))
    ref = archived.members["whole.bin"]
    source = MemberSource(archived.source, disk=cache(tmp_path))
    assert source.get_range(ref, MIB, MIB + BLOCK) == data[MIB: MIB + BLOCK]
    settled(source)
    for start in (2 * MIB, ref.size - BLOCK):
        assert source.get_range(ref, start, start + BLOCK) == data[start: start + BLOCK]
    assert source.stats.decompressions == 1
    assert (source.stats.disk_hits, source.stats.disk_bytes) == (2, 2 * BLOCK)  # counted


@each_kept_method
def test_without_a_disk_cache_reads_go_as_before(tmp_path: Path, method: int) -> None:
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=None)
    for start, end in random_ranges(ref.size, seed=8, count=10):
        assert source.get_range(ref, start, end) == expected[start:end]
    assert source._kept is None


def saved_positions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[
        bytes, Archive, members_module.MemberRef, MemberSource, list[int]]:
    """The test member deflated, read once in order by a source that saved a position every
    96 KiB on the way (``size / 32``); those positions, but the last ones near its end."""
    monkeypatch.setattr(members_module, "_MIN_INTERVAL", 64 * KIB)
    expected, archived, ref = big_member(zipfile.ZIP_DEFLATED)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start in range(0, ref.size, 256 * KIB):
        end = min(ref.size, start + 256 * KIB)
        assert source.get_range(ref, start, end) == expected[start:end]
    saved = [position.out_pos for position in source._states[ref].saved
             if position.out_pos + 12 * KIB <= ref.size]
    assert len(saved) >= 30
    return expected, archived, ref, source, saved


@pytest.mark.parametrize("other_mount", [False, True], ids=["same-mount", "remounted"])
def test_deflate_reads_near_a_saved_position_are_not_kept_far_ones_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_mount: bool
) -> None:
    """After a pass saved positions along a deflated member (every 96 KiB here: ``size / 32``),
    reads just after one (within ``_NEAR_SAVED``) resume from it: no copy. The first read
    further from any (a random reader's) has the member kept; in another mount, where the
    saved positions are gone, so does the first read far from the member's start."""
    expected, archived, ref, source, saved = saved_positions(tmp_path, monkeypatch)
    for at in reversed(saved[4:]):  # backwards: each read is behind the one before
        start = at + 8 * KIB
        assert source.get_range(ref, start, start + 4 * KIB) == expected[start: start + 4 * KIB]
    settled(source)
    assert (source.stats.decompressions, kept_files(tmp_path, ref)) == (1, [])
    if other_mount:
        source = MemberSource(archived.source, disk=cache(tmp_path))
        far = saved[3] + 8 * KIB  # near a position the first mount saved: far from 0 here
    else:
        far = saved[3] + 48 * KIB  # behind the last read, half an interval from a position
    assert source.get_range(ref, far, far + BLOCK) == expected[far: far + BLOCK]
    settled(source)
    assert kept_files(tmp_path, ref) != []


def test_a_deflate_read_as_far_from_a_saved_position_as_near_reaches_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_NEAR_SAVED`` (16 KiB here) is as far as a deflate read resumes from a saved position:
    one byte nearer it resumes, that far the member is kept."""
    expected, _archived, ref, source, saved = saved_positions(tmp_path, monkeypatch)
    near = saved[3] + 16 * KIB - 1
    assert source.get_range(ref, near, near + 4 * KIB) == expected[near: near + 4 * KIB]
    settled(source)
    assert kept_files(tmp_path, ref) == []
    far = saved[2] + 16 * KIB  # behind the last read
    assert source.get_range(ref, far, far + 4 * KIB) == expected[far: far + 4 * KIB]
    settled(source)
    assert kept_files(tmp_path, ref) != []


@each_kept_method
def test_a_deflated_member_no_larger_than_the_trail_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: int
) -> None:
    """A deflated member of up to ``_TRAIL`` (8 MiB): its random reads inflate at most a
    saved interval each, and the caches hold much of it anyway: as before, no copy on disk per
    member. bzip2 and LZMA ones, whose reads would start over, are kept."""
    monkeypatch.setattr(members_module, "_TRAIL", 4 * MIB)  # the member is 3 MiB
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    for start, end in [(2 * MIB, 2 * MIB + BLOCK), *random_ranges(ref.size, seed=11, count=8)]:
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
    settled(source)
    assert (kept_files(tmp_path, ref) == []) == (method == zipfile.ZIP_DEFLATED)


def test_a_deflated_member_read_whole_is_not_kept(tmp_path: Path) -> None:
    """Read whole in one range (``prefetch``, or a reader asking for all of it): inflated as
    before, no copy written for reads that may never come; once kept, it is read from there."""
    expected, archived, ref = big_member(zipfile.ZIP_DEFLATED)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    assert source.get_range(ref, 0, ref.size) == expected
    assert kept_files(tmp_path, ref) == []
    start = 2 * MIB
    assert source.get_range(ref, start, start + BLOCK) == expected[start: start + BLOCK]
    settled(source)
    assert source.stats.decompressions == 2
    assert kept_files(tmp_path, ref) != []
    assert source.get_range(ref, 0, ref.size) == expected
    assert source.stats.decompressions == 2


@each_kept_method
def test_a_zip_bomb_is_never_kept(tmp_path: Path, method: int) -> None:
    """Declared smaller than it inflates: reads ahead of the decompression into the cache get
    their bytes as it passes them (as from the live position: the end is not known yet), a
    read of its end fails, nothing is kept, and every read fails at once after that."""
    declared = 3 * MIB  # 4,321 bytes short: the read at 1 MiB is passed well before the end
    archived = zipped(method, size=declared)
    ref = archived.members["big.bin"]
    assert ref.size == declared
    source = MemberSource(archived.source, disk=cache(tmp_path))
    start = MIB
    assert source.get_range(ref, start, start + BLOCK) == content()[start: start + BLOCK]
    with pytest.raises(ArchiveError, match="inflates past its declared size"):
        source.get_range(ref, declared - BLOCK, declared)
    settled(source)
    assert kept_files(tmp_path, ref) == []
    with pytest.raises(ArchiveError, match="inflates past its declared size"):
        source.get_range(ref, start, start + BLOCK)
    remounted = MemberSource(archived.source, disk=cache(tmp_path))
    with pytest.raises(ArchiveError, match="inflates past its declared size"):
        remounted.get_range(ref, declared - BLOCK, declared)
    settled(remounted)
    assert kept_files(tmp_path, ref) == []


@each_kept_method
def test_a_disk_that_refuses_the_writes_serves_the_bytes_the_old_way(
    tmp_path: Path, method: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, archived, ref = big_member(method)
    disk = cache(tmp_path)
    source = MemberSource(archived.source, disk=disk)
    real_write = disk.write
    writes = []

    def refusing(written_ref, *args, **kwargs) -> None:
        if isinstance(written_ref, UnzippedRef):
            writes.append(written_ref)
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
        real_write(written_ref, *args, **kwargs)

    monkeypatch.setattr(disk, "write", refusing)
    for start, end in random_ranges(ref.size, seed=9, count=6):
        assert source.get_range(ref, start, end) == expected[start:end]
    assert len(writes) == 2  # then the member is read the old way, not tried on every read
    assert [p for p in tmp_path.rglob("*.r*")
            if not p.name.startswith(object_digest(archived.ref))] == []
    assert source.stats.cache_write_errors == 1


@each_kept_method
def test_a_disk_that_fails_its_reads_serves_the_bytes_from_s3(
    tmp_path: Path, method: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A cache disk that fails every read (EIO: a dying disk, a yanked volume) costs a warning:
    the archive's blocks come from S3 and the member is decompressed, never a failed read."""
    expected, archived, ref = big_member(method)
    disk = cache(tmp_path)

    def failing(*_args: object, **_kwargs: object) -> dict:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk, "read_run", failing)
    source = MemberSource(archived.source, disk=disk)
    for start, end in [(0, BLOCK), *random_ranges(ref.size, seed=11, count=6), (0, ref.size)]:
        assert source.get_range(ref, start, end) == expected[start:end], (start, end)
    settled(source)
    assert "cannot read the block cache ([Errno 5] Input/output error)" in caplog.text
    assert source.stats.cache_write_errors == 0


def test_a_member_is_written_a_region_at_a_time_never_held_whole(tmp_path: Path) -> None:
    """24 MiB of text (1.5 MiB compressed) decompressed whole for one read: the memory the read
    takes at its peak is a few regions (1 MiB here), never the member."""
    lines = (b"record %d: label %d, weight %d\n" % (i, i % 7, i * 31 % 1000) for i in range(10**6))
    expected = b"".join(lines)[: 24 * MIB]
    archived = archive(make_zip({"huge.bin": expected}, methods=(zipfile.ZIP_BZIP2,)))
    ref = archived.members["huge.bin"]
    source = MemberSource(archived.source, disk=cache(tmp_path))
    tracemalloc.start()  # traces every thread's allocations
    try:
        assert source.get_range(ref, 20 * MIB, 20 * MIB + BLOCK) == \
            expected[20 * MIB: 20 * MIB + BLOCK]
        settled(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept_files(tmp_path, ref) != []
    assert peak < 12 * MIB, peak  # measured ~7 MiB (the compressed archive included): not 24


def test_cache_stats_and_clear_count_the_copy_with_its_archive(tmp_path: Path) -> None:
    archived = zipped(zipfile.ZIP_LZMA)
    ref = archived.members["big.bin"]
    disk = cache(tmp_path)
    source = MemberSource(archived.source, disk=disk)
    source.get_range(ref, MIB, MIB + BLOCK)
    settled(source)
    source.close()
    usage = disk_module.usage(tmp_path)
    assert set(usage.by_dataset) == {"s3://bkt/d.zip"}
    assert usage.bytes >= ref.size  # the copy (and the archive's blocks)
    assert disk_module.clear(tmp_path, parse_s3_uri("s3://bkt/other.zip")) == 0
    assert disk_module.clear(tmp_path, parse_s3_uri("s3://bkt/d.zip")) >= 2
    assert list(tmp_path.rglob("*.r*")) == []


def test_marker_of_another_kind_is_not_taken_for_one(tmp_path: Path) -> None:
    """A marker block must start with the magic: anything else is a miss, never an attempt,
    even where the rest of it names an attempt whose blocks are there."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    disk = cache(tmp_path)
    first = MemberSource(archived.source, disk=disk)
    assert first.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(first)
    marker = UnzippedRef.of(ref)
    disk.write(marker, object_digest(marker), 0, [b"XXXX" + first._kept._attempts[ref].encode()])
    source = MemberSource(archived.source, disk=disk)
    assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
    settled(source)
    assert source.stats.decompressions == 1


@each_kept_method
def test_keep_decompresses_a_member_before_its_reads(tmp_path: Path, method: int) -> None:
    """``s3datafs prefetch``: a bzip2 or LZMA member is decompressed into the cache ahead of
    any read, and a later mount's reads are disk reads (no decompression, no GET). Deflate is
    not kept ahead: only a random reader gains from its copy, and a mount keeps it then."""
    expected, archived, ref = big_member(method)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    ahead = method != zipfile.ZIP_DEFLATED
    assert source.keeps_ahead(ref) is ahead
    assert source.keep(ref) is ahead
    assert (kept_files(tmp_path, ref) != []) is ahead
    if not ahead:
        assert source.stats.decompressions == 0
        return
    assert source.keep(ref)  # kept already: nothing more done
    assert source.stats.decompressions == 1
    source.close()
    archived.reset()
    again = MemberSource(archived.source, disk=cache(tmp_path))
    for start, end in [(0, BLOCK), (0, ref.size), *random_ranges(ref.size, seed=12)]:
        assert again.get_range(ref, start, end) == expected[start:end], (start, end)
    assert again.stats.decompressions == 0
    assert archived.source.calls["get_range"] == 0


def test_keep_of_a_bad_member_raises_and_keeps_nothing(tmp_path: Path) -> None:
    archived = zipped(zipfile.ZIP_BZIP2, crc=0x12345678)
    ref = archived.members["big.bin"]
    source = MemberSource(archived.source, disk=cache(tmp_path))
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        source.keep(ref)
    assert kept_files(tmp_path, ref) == []
    assert not MemberSource(archived.source, disk=None).keeps_ahead(ref)  # --no-cache
