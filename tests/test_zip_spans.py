"""Members read in archive order share spans of the archive; scattered reads fetch only theirs."""

from __future__ import annotations

import functools
import queue
import random
import shutil
import signal
import tempfile
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from fakes import FakeSource
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from test_zip_members import archive
from zipcraft import make_zip, patch, sample_bytes

from s3datafs.archive import members, spans
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache, is_region_file
from s3datafs.errors import ArchiveError, TransientS3Error
from s3datafs.model import MemberRef, ObjectRef

NAMES = [f"d{i % 9}/m{i:04d}.bin" for i in range(400)]
DATA = {name: sample_bytes(i, 20_000 + (i * 7919) % 30_000) for i, name in enumerate(NAMES)}


def archive_members(
    methods: tuple[int, ...], body: bytes | None = None
) -> tuple[FakeSource, list[MemberRef]]:
    """DATA zipped (or ``body``) in a FakeSource, its members in archive order; no GET counted."""
    zipped = archive(body if body is not None else data_zipped(methods))
    return zipped.source, sorted(zipped.members.values(), key=lambda r: r.header_offset)


@functools.cache
def data_zipped(methods: tuple[int, ...]) -> bytes:
    """DATA zipped with ``methods``: made once (bytes cannot change; 25 tests ask for 3 kinds)."""
    return make_zip(DATA, methods=methods)


def test_reading_every_member_in_archive_order_takes_few_gets() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    reader = members.MemberSource(source)
    for ref in refs:
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    archive_bytes = refs[0].archive.size
    # A member per GET would be 400; spans of up to 8 MiB cover the ~14 MiB archive in a few.
    assert source.calls["get_range"] <= 4 + archive_bytes // spans._MIN_SPAN


def read_in_order(reader: members.MemberSource, refs: list[MemberRef], threads: int) -> list[str]:
    """Read every member whole, in archive order, shared by ``threads``; the ones read wrong."""
    queue, lock = iter(refs), threading.Lock()
    wrong: list[str] = []

    def work() -> None:
        while True:
            with lock:
                ref = next(queue, None)
            if ref is None:
                return
            if reader.get_range(ref, 0, ref.size) != DATA[ref.path]:
                wrong.append(ref.path)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return wrong


def test_eight_threads_in_archive_order_share_spans_and_get_the_right_bytes() -> None:
    source, refs = archive_members((zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED))
    reader = members.MemberSource(source)
    assert read_in_order(reader, refs, 8) == []
    assert source.calls["get_range"] < len(refs) // 4


def test_scattered_members_fetch_only_themselves() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    reader = members.MemberSource(source)
    chosen = random.Random(7).sample(refs[::3], 20)  # never two neighbours in a row
    chosen.sort(key=lambda r: -r.header_offset)  # and backwards: no streak
    for ref in chosen:
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    assert source.calls["get_range"] == len(chosen)
    fetched = sum(end - start for _ref, start, end in source.ranges)
    assert fetched <= sum(r.size for r in chosen) + len(chosen) * members._HEADER_GUESS


def test_members_are_kept_on_disk_as_archive_blocks(tmp_path) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    disk = DiskCache(tmp_path, block_size=64 * 1024, capacity=1 << 30)
    scattered = refs[::50]
    first = members.MemberSource(source, disk=disk)
    for ref in scattered:
        assert first.get_range(ref, 0, ref.size) == DATA[ref.path]
    gets = source.calls["get_range"]
    assert gets == len(scattered)
    # Whole blocks only: a scattered member costs at most its blocks, rounded out.
    for (_archive, start, end), ref in zip(source.ranges, scattered, strict=True):
        assert start % disk.block_size == 0
        assert end - start <= ref.compressed_size + 2 * disk.block_size + members._HEADER_GUESS
    first.close()  # the disk writes were behind the reads: the daemon drains them at unmount
    # A new process (a remount) finds them on disk: no GET, the same bytes.
    again = members.MemberSource(source, disk=DiskCache(tmp_path, block_size=64 * 1024,
                                                        capacity=1 << 30))
    for ref in scattered:
        assert again.get_range(ref, 0, ref.size) == DATA[ref.path]
    assert source.calls["get_range"] == gets
    # Only archive blocks were stored: one cache object, not one per member.
    names = [path.name for path in (tmp_path / "blocks").rglob("*")]
    objects = {name.split(".")[0] for name in names if is_region_file(name)}
    assert len(objects) == 1


# -- members at hand: served on the caller's thread, without I/O ---------------------------------


def test_members_in_a_landed_span_are_at_hand_and_others_are_not() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    reader = members.MemberSource(source)
    far = refs[-1]
    assert reader.get_range_now(refs[0], 0, refs[0].size) is None  # nothing fetched yet
    assert source.calls["get_range"] == 0
    for ref in refs[:2]:  # the second continues the first: a span is fetched past it
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    gets = source.calls["get_range"]
    at_hand = [ref for ref in refs[2:] if ref.header_offset < refs[1].header_offset
               + spans._MIN_SPAN - 64 * 1024]
    assert len(at_hand) >= 5
    for ref in at_hand:
        assert reader.get_range_now(ref, 0, ref.size) == DATA[ref.path]
        middle = ref.size // 2  # pieces too (a compressed one is decompressed whole once)
        assert reader.get_range_now(ref, middle, ref.size) == DATA[ref.path][middle:]
    assert reader.get_range_now(far, 0, far.size) is None
    assert source.calls["get_range"] == gets


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflate"])
def test_a_member_at_hand_whose_local_header_outgrows_the_guess_is_served_whole(
    method: int,
) -> None:
    """A member at hand is served whole, even when its local header (a long name) is longer than
    the first fetch's guess (``_HEADER_GUESS``): the header's piece of the span then holds less
    than the range, and the rest must come from the span too, never a short answer (a short
    read is a truncated file to the kernel)."""
    long_name = "n" * 300 + ".bin"  # a local header of 330 bytes: the guess is 158
    content = {"a.bin": sample_bytes(1, 3000), "b.bin": sample_bytes(2, 3000),
               long_name: sample_bytes(3, 20_000)}
    zipped = archive(make_zip(content, methods=(method,)))
    reader = members.MemberSource(zipped.source)
    for name in ("a.bin", "b.bin"):  # the second continues the first: a span past it lands
        ref = zipped.members[name]
        assert reader.get_range(ref, 0, ref.size) == content[name]
    gets = zipped.source.calls["get_range"]
    ref = zipped.members[long_name]
    assert reader.get_range_now(ref, 0, ref.size) == content[long_name]
    assert zipped.source.calls["get_range"] == gets  # it was at hand: no GET


def test_a_member_at_hand_with_a_bad_crc_fails_as_get_range_would() -> None:
    body = patch(make_zip(DATA, methods=(zipfile.ZIP_DEFLATED,)), NAMES[3], crc=0x12345678)
    source, found = archive_members((), body)
    refs = {ref.path: ref for ref in found}
    reader = members.MemberSource(source)
    for name in NAMES[:2]:
        reader.get_range(refs[name], 0, refs[name].size)
    assert reader.get_range_now(refs[NAMES[2]], 0, 10) == DATA[NAMES[2]][:10]
    with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
        reader.get_range_now(refs[NAMES[3]], 0, 10)


# -- the disk cache is written behind the reads ----------------------------------------------------


class HeldDisk(DiskCache):
    """A disk cache whose writes wait until ``release`` is set; it notes which thread wrote."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.writers: list[str] = []

    @property
    def writes(self) -> int:
        return len(self.writers)

    def write(self, *args, **kwargs) -> None:
        assert self.release.wait(10), "the test never released the writes"
        self.writers.append(threading.current_thread().name)
        super().write(*args, **kwargs)


def test_archive_blocks_are_written_behind_served_while_pending_and_drained(tmp_path) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = HeldDisk(tmp_path, block_size=block, capacity=1 << 30)
    blocks = spans.ArchiveBlocks(source, disk, write_behind=2 * block, write_inline=0)
    expected = source.get_range(archive, 0, archive.size)
    source.calls.clear()
    # The read returns while its write is still held; reading it again needs no GET.
    assert blocks.get_range(archive, 100, 5000) == expected[100:5000]
    assert blocks.get_range(archive, 10, 60_000) == expected[10:60_000]
    assert source.calls["get_range"] == 1
    assert disk.writes == 0
    # One more block fills the bound; the next fetch must wait for room.
    assert blocks.get_range(archive, block, block + 10) == expected[block:block + 10]
    done = threading.Event()
    third = threading.Thread(target=lambda: (blocks.get_range(archive, 5 * block, 5 * block + 1),
                                             done.set()))
    third.start()
    assert not done.wait(0.3)  # 2 blocks pending: no room for a third
    disk.release.set()
    assert done.wait(10)
    third.join()
    blocks.close()  # drains: all three are on disk
    assert disk.writes == 3
    again = spans.ArchiveBlocks(source, DiskCache(tmp_path, block_size=block, capacity=1 << 30))
    gets = source.calls["get_range"]
    assert again.get_range(archive, 0, 2 * block) == expected[:2 * block]
    assert again.get_range(archive, 5 * block, 6 * block) == expected[5 * block:6 * block]
    assert source.calls["get_range"] == gets


def test_a_short_fetch_is_on_disk_when_it_returns_and_a_long_one_is_written_behind(
    tmp_path,
) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = HeldDisk(tmp_path, block_size=block, capacity=1 << 30)
    disk.release.set()
    blocks = spans.ArchiveBlocks(source, disk, write_inline=2 * block)
    expected = source.get_range(archive, 0, archive.size)
    assert blocks.get_range(archive, block + 1, 3 * block - 1) == expected[block + 1:3 * block - 1]
    assert blocks.get_range(archive, 3 * block, 6 * block) == expected[3 * block:6 * block]
    blocks.close()  # waits for what went to the writer thread
    # Two blocks: written by the thread that fetched them; three: by the writer thread.
    assert disk.writers == [threading.current_thread().name, "s3datafs-zip-cache_0"]
    again = spans.ArchiveBlocks(source, DiskCache(tmp_path, block_size=block, capacity=1 << 30))
    gets = source.calls["get_range"]
    assert again.get_range(archive, block, 6 * block) == expected[block:6 * block]
    assert source.calls["get_range"] == gets


def test_a_fetch_landing_after_close_is_served_and_frees_its_write_room(tmp_path) -> None:
    """A span read ahead may land as the mount ends: its write is dropped, its room given back
    (otherwise later stores would wait for room forever)."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    blocks = spans.ArchiveBlocks(source, DiskCache(tmp_path, block_size=block, capacity=1 << 30),
                                 write_behind=2 * block, write_inline=0)
    expected = source.get_range(archive, 0, archive.size)
    assert blocks.get_range(archive, 0, block) == expected[:block]
    blocks.close()
    for index in range(1, 4):  # more than the room, one block at a time: none may wait
        start = index * block
        assert blocks.get_range(archive, start, start + block) == expected[start:start + block]


def zip_cache_writers() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate()
            if thread.name.startswith("s3datafs-zip-cache")}


@pytest.mark.parametrize("writer", ["none yet", "started"])
def test_fetches_after_close_start_no_writer_and_fail_no_read(tmp_path, writer: str) -> None:
    """After ``close`` (the mount ends; a span read ahead lands, a read given up on goes on),
    fetches are served: a long one is not written behind, a short one's due scan is not run.
    Before, a close with no writer thread to stop let the first long fetch after it start one
    that nothing stopped (left at unmount, writing after the drain), and after a close that
    stopped one, a short fetch whose scan fell due failed with RuntimeError (its submit)."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = DiskCache(tmp_path, block_size=block, capacity=1 << 30)
    disk.sync_every = 1  # every write makes a scan due
    blocks = spans.ArchiveBlocks(source, disk, write_inline=2 * block)
    expected = source.get_range(archive, 0, archive.size)
    others = zip_cache_writers()  # other tests' that never closed theirs
    if writer == "started":
        assert blocks.get_range(archive, 0, 4 * block) == expected[:4 * block]  # written behind
    blocks.close()
    assert zip_cache_writers() == others
    assert blocks.get_range(archive, 8 * block, 12 * block) == expected[8 * block:12 * block]
    assert blocks.get_range(archive, 16 * block, 16 * block + 10) == \
        expected[16 * block:16 * block + 10]  # short: written by this thread, its scan left
    assert zip_cache_writers() == others
    on_disk = disk.read_run(object_digest(archive), archive.size, range(17), every=True)
    assert sorted(on_disk) == [*(range(4) if writer == "started" else ()), 16]


def test_a_bug_in_the_disk_cache_fails_no_archive_read(tmp_path, caplog) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    disk = DiskCache(tmp_path, block_size=64 * 1024, capacity=1 << 30)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise AttributeError("a bug")

    disk.write = broken  # type: ignore[method-assign]
    blocks = spans.ArchiveBlocks(source, disk)  # short fetches are written by the fetching thread
    expected = source.get_range(archive, 0, archive.size)
    assert blocks.get_range(archive, 10, 5000) == expected[10:5000]
    assert blocks.get_range(archive, 70_000, 80_000) == expected[70_000:80_000]
    blocks.close()
    assert caplog.text.count("unexpected error writing to the block cache") == 1


def test_spans_waiting_for_the_disk_hold_their_bytes_once(tmp_path) -> None:
    # A span's blocks wait for the disk cache (written behind) while the span serves readers.
    # They were two copies, the span's and the write-behind's, so a zip read in archive order
    # held twice what it fetched while the disk lagged (the daemon peaked at ~350 MiB).
    mib = 1 << 20
    source = FakeSource()
    source.create_bucket("b")
    archive = source.put("b", "a.zip", sample_bytes(3, 24 * mib))
    expected = source.get_range(archive, 0, archive.size)
    source.ranges.clear()
    disk = HeldDisk(tmp_path, block_size=64 * 1024, capacity=1 << 30)  # writes wait: pending
    blocks = spans.ArchiveBlocks(source, disk, write_behind=1 << 30, write_inline=0)
    table = spans.Spans(blocks, max_bytes=64 * mib)
    tracemalloc.start()
    try:
        for at in range(1000, archive.size, 300_000):  # a reader going through it in order
            end = min(at + 300_000, archive.size)
            got = table.read(archive, at, end)
            assert got == expected[at:end]
            assert type(got) is bytes  # its own: a reader's cache must not keep a span alive
        del got
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        disk.release.set()
        table.close()
        blocks.close()
    fetched = sum(end - start for _, start, end in source.ranges)
    assert fetched < archive.size + mib
    assert held < 1.25 * fetched


def test_archive_blocks_the_disk_refuses_are_counted(tmp_path) -> None:
    # ``s3datafs prefetch`` of a zip into a full cache said "prefetched" and exited 0, and
    # ``status`` showed no write error, though nothing was cached (review, session 20).
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    disk = DiskCache(tmp_path, block_size=64 * 1024, capacity=1 << 30)

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    disk.write = full  # type: ignore[method-assign]
    blocks = spans.ArchiveBlocks(source, disk)
    expected = source.get_range(archive, 0, archive.size)
    assert blocks.get_range(archive, 10, 5000) == expected[10:5000]  # written by this thread
    assert blocks.get_range(archive, 0, archive.size) == expected  # written behind
    blocks.close()
    assert blocks.stats.cache_write_errors == 2


def test_a_sync_due_after_a_short_fetch_runs_on_the_writer_thread(tmp_path) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive

    class NotedSyncs(DiskCache):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.syncs: list[str] = []

        def sync(self) -> None:
            self.syncs.append(threading.current_thread().name)
            super().sync()

    disk = NotedSyncs(tmp_path, block_size=64 * 1024, capacity=1 << 30)
    disk.sync_every = 1  # every write makes one due
    blocks = spans.ArchiveBlocks(source, disk)
    assert blocks.get_range(archive, 0, 100) == source.get_range(archive, 0, 100)
    blocks.close()
    assert disk.syncs == ["s3datafs-zip-cache_0"]  # not the reader's thread


# -- spans: no byte twice, and read ahead in a streak ----------------------------------------------


def overlap(ranges: list[tuple[MemberRef, int, int]]) -> int:
    """Bytes fetched more than once among ``ranges`` (of one archive)."""
    twice, reach = 0, 0
    for _archive, start, end in sorted(ranges, key=lambda r: r[1]):
        twice += max(0, min(end, reach) - start)
        reach = max(reach, end)
    return twice


def test_a_range_across_two_spans_is_put_together_without_fetching_twice() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    expected = source.get_range(archive, 0, archive.size)
    source.ranges.clear()
    shared = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=1 << 30)
    assert shared.read(archive, 0, 100) == expected[:100]  # alone: exactly what was asked
    assert shared.read(archive, 100, 200) == expected[100:200]  # continues it: a span
    first_end = 100 + spans._MIN_SPAN
    assert source.ranges[-1][1:] == (100, first_end)
    across = (first_end - 400, first_end + 700)
    assert shared.read(archive, *across) == expected[across[0]:across[1]]
    assert source.ranges[-1][1] == first_end  # the next span starts where the first ended
    assert overlap(source.ranges) == 0


@pytest.mark.parametrize("span_memory", [64 << 20, 5 << 20], ids=["roomy", "archive>memory"])
@pytest.mark.parametrize("threads", [1, 8])
def test_reading_every_member_in_order_fetches_each_archive_byte_about_once(
    threads: int, span_memory: int
) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    reader = members.MemberSource(source, span_memory=span_memory)
    assert read_in_order(reader, refs, threads) == []
    reader.close()
    assert overlap(source.ranges) <= 2 * members._HEADER_GUESS
    assert sum(end - start for _a, start, end in source.ranges) <= refs[0].archive.size * 1.01


def test_a_streak_reads_ahead_so_the_next_members_are_at_hand() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    reader = members.MemberSource(source)
    read_to = 0
    for ref in refs:  # until the streak's spans reach the size that reads ahead
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
        read_to = ref.data_limit
        if read_to > 2 * spans._AHEAD_FROM_SPAN:
            break
    # The spans ahead are fetched in the background: GETs that start past everything read.
    deadline = time.monotonic() + 10
    while not (ahead := [(s, e) for _a, s, e in source.ranges if s >= read_to]):
        assert time.monotonic() < deadline, "no span was fetched ahead"
        time.sleep(0.01)
    start, end = ahead[0]
    next_ones = [r for r in refs if start <= r.header_offset and r.data_limit <= end]
    assert next_ones
    deadline = time.monotonic() + 10
    while reader.get_range_now(next_ones[-1], 0, next_ones[-1].size) is None:
        assert time.monotonic() < deadline, "the span ahead never landed"
        time.sleep(0.01)
    for ref in next_ones:  # landed ahead of the readers: served without I/O
        assert reader.get_range_now(ref, 0, ref.size) == DATA[ref.path]
    reader.close()


def test_scattered_reads_never_read_ahead() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    reader = members.MemberSource(source)
    for ref in refs[::-7]:  # backwards, never neighbours
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    time.sleep(0.1)
    assert source.calls["get_range"] == len(refs[::-7])
    reader.close()


def test_bzip2_and_lzma_members_are_never_decompressed_on_the_callers_thread() -> None:
    # The first 40 members (740 KiB) reach past the first span (512 KiB), as all 400 do: the
    # same spans and GETs for the members read, without 4 s of compressing all 400 twice.
    first = {name: DATA[name] for name in NAMES[:40]}
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        source, refs = archive_members((), make_zip(first, methods=(method,)))
        reader = members.MemberSource(source)
        for ref in refs[:2]:  # a streak: the next members lie in a landed span
            assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
        ref = refs[2]
        assert reader.get_range_now(ref, 0, ref.size) is None  # slow to decompress: a thread
        assert reader.get_range(ref, 0, 100) == DATA[ref.path][:100]  # decompressed whole, kept
        assert reader.get_range_now(ref, 100, ref.size) == DATA[ref.path][100:]


class GatedArchive:
    """An archive of zeros whose GETs from ``held_from`` on wait for ``gate`` (slow GETs)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.held_from = 1 << 62

    def get_range(self, archive: ObjectRef, start: int, end: int) -> bytes:
        if start >= self.held_from:
            assert self.gate.wait(30)
        return bytes(end - start)

    get_shared = get_range


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def read_into_a_streak(table: spans.Spans, archive: ObjectRef) -> int:
    """Read an archive of zeros in order, 256 KiB at a time, until its spans have grown enough
    to be read ahead; where the reads stopped."""
    at = 0
    while not any(s.end - s.start >= spans._AHEAD_FROM_SPAN for s in table._spans):
        assert table.read(archive, at, at + 256 * 1024) == bytes(256 * 1024)
        at += 256 * 1024
    return at


def test_a_forgotten_range_whose_write_lands_afterwards_is_not_served_from_the_disk(
    tmp_path,
) -> None:
    """The write-behind of blocks that decoded to damage may land after ``forget`` zeroed their
    entries: they stay forgotten (they were served from the disk again, and the member failed
    once more before S3 was asked), and the blocks written with them stay."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = HeldDisk(tmp_path, block_size=block, capacity=1 << 30)  # writes wait: all pending
    blocks = spans.ArchiveBlocks(source, disk, write_inline=0)
    try:
        blocks.get_range(archive, 0, 4 * block)
        blocks.forget(archive, block + 10, 2 * block + 20)  # blocks 1 and 2
    finally:
        disk.release.set()
        blocks.close()  # the write lands, after the forget
    on_disk = disk.read_run(object_digest(archive), archive.size, range(4), every=True)
    assert sorted(on_disk) == [0, 3]


class EnteredDisk(DiskCache):
    """A disk cache whose writes say when they begin (``entered``), then wait for ``release``:
    a write in flight, held where the test wants it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, *args, **kwargs) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never released the write"
        super().write(*args, **kwargs)


def test_a_range_forgotten_while_a_short_fetch_writes_it_is_not_served_from_the_disk(
    tmp_path,
) -> None:
    """A short fetch is written by the thread that fetched it, not behind: a ``forget`` while
    that write is in flight zeroes entries the write then makes valid again. Those blocks are
    forgotten once more when it lands (as the write-behind's are), and the others stay."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = EnteredDisk(tmp_path, block_size=block, capacity=1 << 30)
    blocks = spans.ArchiveBlocks(source, disk, write_inline=4 * block)
    expected = source.get_range(archive, 0, archive.size)
    got: list[bytes] = []
    fetching = threading.Thread(target=lambda: got.append(blocks.get_range(archive, 0, 4 * block)))
    fetching.start()
    try:
        assert disk.entered.wait(10), "the short fetch never began its write"
        blocks.forget(archive, block + 10, 2 * block + 20)  # blocks 1 and 2, mid-write
    finally:
        disk.release.set()
        fetching.join(10)
    assert got == [expected[:4 * block]]
    on_disk = disk.read_run(object_digest(archive), archive.size, range(4), every=True)
    assert sorted(on_disk) == [0, 3]
    blocks.close()


def test_spans_planned_ahead_by_a_peek_that_finds_nothing_are_fetched_all_the_same() -> None:
    # A member crossing from a landed span into one still in flight is not at hand; the peek
    # had planned the spans after it, and a reader that later finds one waits for it to land
    # (it waited for --read-timeout, then failed, when they were never started).
    mib = 1 << 20
    archive = ObjectRef("b", "a.zip", None, '"e"', 64 * mib, 0.0)
    inner = GatedArchive()
    table = spans.Spans(inner, max_bytes=64 * mib)
    at = read_into_a_streak(table, archive)
    ahead = sorted((s for s in table._spans if s.start >= at), key=lambda s: s.start)
    assert len(ahead) == spans._SPANS_AHEAD
    wait_until(lambda: all(s.done.is_set() for s in ahead), "the spans ahead never landed")
    inner.held_from = ahead[1].end  # the next span planned is a slow GET, still in flight ...
    table.read(archive, ahead[0].start, ahead[0].start + 10)
    crossing = (ahead[1].end - 10, ahead[1].end + 10)  # ... and a member crosses into it
    assert table.peek(archive, *crossing) is None
    inner.gate.set()
    wait_until(lambda: all(s.done.is_set() for s in table._spans), "a planned span never landed")
    last = max(s.end for s in table._spans)
    assert table.read(archive, last - 10, last) == bytes(10)
    table.close()


def test_spans_ahead_that_no_thread_can_be_started_for_fail_and_reading_goes_on(
    monkeypatch,
) -> None:
    # Under a pids limit (a container's), starting a thread fails: the spans planned ahead were
    # counted as having a thread, were never fetched, and readers waited for them, for good.
    mib = 1 << 20
    archive = ObjectRef("b", "a.zip", None, '"e"', 64 * mib, 0.0)
    table = spans.Spans(GatedArchive(), max_bytes=64 * mib)
    start = threading.Thread.start

    def no_thread(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    at = read_into_a_streak(table, archive)
    assert not [s for s in table._spans if s.start >= at]  # failed, out of the table
    monkeypatch.setattr(threading.Thread, "start", start)  # threads to be had again
    reader = threading.Thread(target=table.read, args=(archive, at, at + 8 * mib), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "a reader waits for a span no thread will fetch"
    wait_until(lambda: all(s.done.is_set() for s in table._spans), "no span ahead landed")
    assert table.read(archive, 60 * mib, 61 * mib) == bytes(mib)
    table.close()


def test_a_span_submitted_as_readahead_closes_is_fetched_or_failed_never_left_queued() -> None:
    """``close`` may come between ``submit``'s look at ``_closed`` and its queueing: the span
    went in behind the threads' stop signals, no thread ever took it, and a reader waiting for
    it waited for good. Here ``close`` runs at that moment (or, when it cannot, a second later).
    """
    archive = ObjectRef("b", "a.zip", None, '"e"', 1 << 20, 0.0)

    def fail(span: spans._Span, error: BaseException) -> None:
        span.error = error
        span.done.set()

    ahead = spans._Ahead(lambda span: span.done.set(), fail)

    class ClosedBeforeThePut:
        def __init__(self) -> None:
            self.inner: queue.SimpleQueue[spans._Span | None] = queue.SimpleQueue()

        def put(self, item: spans._Span | None) -> None:
            if item is not None and not ahead._closed:
                closing = threading.Thread(target=ahead.close, daemon=True)
                closing.start()
                closing.join(1.0)
            self.inner.put(item)

        def get(self) -> spans._Span | None:
            return self.inner.get()

    ahead._queue = ClosedBeforeThePut()
    span = spans._Span(archive, 0, 1 << 20)
    ahead.submit(span)
    assert span.done.wait(5), "a span queued behind the stop signals: its readers wait for good"


def test_a_short_range_of_large_blocks_keeps_only_its_own_bytes(tmp_path) -> None:
    """``get_shared`` hands out a view of the blocks only when they are not much larger than
    the range: a span holding a view of a few bytes of 1 MiB blocks would keep all of them
    alive while ``Spans`` counts only the range (memory past ``span_memory``)."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 1 << 20
    blocks = spans.ArchiveBlocks(source, DiskCache(tmp_path, block_size=block, capacity=1 << 30))
    expected = source.get_range(archive, 0, archive.size)
    short = blocks.get_shared(archive, block + 10, block + 1000)
    assert short == expected[block + 10:block + 1000]
    assert type(short) is bytes  # its own 990 bytes, not a view of the 1 MiB block
    whole = blocks.get_shared(archive, 2 * block + 10, 4 * block - 10)
    assert whole == expected[2 * block + 10:4 * block - 10]
    assert isinstance(whole, memoryview)  # nearly all of its blocks: shared, not copied
    blocks.close()


def test_a_fetch_larger_than_the_write_room_does_not_wait_when_nothing_is_pending(
    tmp_path,
) -> None:
    """A fetch whose blocks exceed the write-behind room on their own (a span rounded out to
    whole blocks, on a slow disk whose pace allows only the floor) is taken when nothing is
    pending: waiting for room that can never be made would hang its readers for good."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = DiskCache(tmp_path, block_size=block, capacity=1 << 30)
    blocks = spans.ArchiveBlocks(source, disk, write_behind=2 * block, write_inline=0)
    expected = source.get_range(archive, 0, archive.size)
    done = threading.Event()
    got: list[bytes] = []
    reader = threading.Thread(
        target=lambda: (got.append(blocks.get_range(archive, 10, 3 * block - 10)), done.set()),
        daemon=True)
    reader.start()
    assert done.wait(10), "a fetch of three blocks waits for a room of two forever"
    assert got == [expected[10:3 * block - 10]]
    blocks.close()


def test_blocks_written_behind_leave_memory_once_on_disk(tmp_path) -> None:
    """Pending blocks are held only until the writer has stored them: the write-behind must not
    keep every block it ever wrote (memory growing with all an archive's bytes read)."""
    mib = 1 << 20
    source = FakeSource()
    source.create_bucket("b")
    archive = source.put("b", "a.zip", sample_bytes(4, 16 * mib))
    disk = DiskCache(tmp_path, block_size=64 * 1024, capacity=1 << 30)
    blocks = spans.ArchiveBlocks(source, disk, write_inline=0)
    tracemalloc.start()
    try:
        for at in range(0, archive.size, 2 * mib):
            assert len(blocks.get_range(archive, at, at + 2 * mib)) == 2 * mib
        blocks.close()  # every write done
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 2 * mib  # not the 16 MiB written


def test_a_forgotten_range_still_waiting_for_the_disk_is_fetched_again(tmp_path) -> None:
    """Bytes that decoded to damage are forgotten everywhere, the write-behind's pending blocks
    included: served again from there, the damage would repeat until the write landed."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    disk = HeldDisk(tmp_path, block_size=block, capacity=1 << 30)  # writes wait: all pending
    blocks = spans.ArchiveBlocks(source, disk, write_inline=0)
    expected = source.get_range(archive, 0, archive.size)
    source.calls.clear()
    try:
        assert blocks.get_range(archive, 0, 4 * block) == expected[:4 * block]
        assert blocks.get_range(archive, block, 2 * block) == expected[block:2 * block]
        assert source.calls["get_range"] == 1  # served from the pending blocks
        blocks.forget(archive, block + 10, block + 20)
        assert blocks.get_range(archive, block, 2 * block) == expected[block:2 * block]
        assert source.calls["get_range"] == 2  # fetched again, not the forgotten pending block
    finally:
        disk.release.set()
        blocks.close()


def test_a_span_planned_before_a_later_one_stops_where_that_one_begins() -> None:
    """A new span ends where a span already planned further on begins (the reader goes on into
    that one), however large the streak's spans have grown: no byte is fetched twice."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    expected = source.get_range(archive, 0, archive.size)
    source.ranges.clear()
    shared = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=1 << 30)
    assert shared.read(archive, 0, 100) == expected[:100]
    assert shared.read(archive, 100, 200) == expected[100:200]  # a span of _MIN_SPAN
    first_end = 100 + spans._MIN_SPAN
    later = first_end + 200 * 1024  # past the first's end, too far to continue it
    assert shared.read(archive, later, later + 100) == expected[later:later + 100]
    assert shared.read(archive, later + 100, later + 200) == expected[later + 100:later + 200]
    assert source.ranges[-1][1] == later + 100  # a span begins there
    # Continuing the first span: the streak's next span would be 1 MiB, past ``later + 100``.
    assert shared.read(archive, first_end, first_end + 10) == expected[first_end:first_end + 10]
    assert source.ranges[-1][1:] == (first_end, later + 100)
    shared.close()


def test_spans_are_kept_within_their_memory_bound() -> None:
    """Spans past ``max_bytes`` are dropped, least recently used first: a zip read in archive
    order holds about ``max_bytes`` of spans, not every span it fetched."""
    mib = 1 << 20
    source = FakeSource()
    source.create_bucket("b")
    archive = source.put("b", "a.zip", sample_bytes(5, 24 * mib))
    expected = source.get_range(archive, 0, archive.size)
    table = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=4 * mib)
    tracemalloc.start()
    try:
        for at in range(0, archive.size, 256 * 1024):  # a reader going through it in order
            assert table.read(archive, at, at + 256 * 1024) == expected[at:at + 256 * 1024]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        table.close()
    assert held < 6 * mib  # the bound and one span more, not the 24 MiB read


def test_the_span_read_last_is_the_last_to_be_dropped() -> None:
    """Spans leave least recently *used* first: a span a reader is still reading from outlives
    a newer one nobody reads, so its bytes are not fetched again."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    expected = source.get_range(archive, 0, archive.size)
    size = spans._MIN_SPAN
    table = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=2 * size + 1024)
    assert table.read(archive, 0, 100) == expected[:100]
    assert table.read(archive, 100, 200) == expected[100:200]  # span 1: [100, 100 + size)
    second = 100 + size
    assert table.read(archive, second, second + 10) == expected[second:second + 10]  # span 2
    assert table.read(archive, 200, 300) == expected[200:300]  # span 1 used again
    third = second + size
    assert table.read(archive, third, third + 10) == expected[third:third + 10]  # one too many
    gets = source.calls["get_range"]
    assert table.read(archive, 300, 400) == expected[300:400]
    assert source.calls["get_range"] == gets  # span 2 left, not span 1
    table.close()


def test_what_spans_remember_of_past_fetches_is_bounded() -> None:
    """The ends of recent fetches (what tells a streak) are kept per archive for the last
    ``_RECENT_ENDS`` fetches and ``_RECENT_ARCHIVES`` archives: memory does not grow with the
    reads a mount serves."""
    source = FakeSource()
    source.create_bucket("b")
    archives = [source.put("b", f"a{i}.zip", sample_bytes(i, 8192))
                for i in range(spans._RECENT_ARCHIVES + 2)]
    table = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=8192)
    for each in archives:
        for at in range(8000, 0, -200):  # 40 fetches of each
            assert len(table.read(each, at, at + 10)) == 10
    assert len(table._ends) <= spans._RECENT_ARCHIVES
    assert all(len(ends) <= spans._RECENT_ENDS for ends in table._ends.values())
    table.close()


def test_a_forgotten_range_is_fetched_again_not_served_from_its_span() -> None:
    """``forget`` (bytes that decoded to damage) drops the landed spans holding the range: the
    next read fetches it again instead of decoding the same damage from memory."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    expected = source.get_range(archive, 0, archive.size)
    table = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=1 << 30)
    assert table.read(archive, 0, 100) == expected[:100]
    assert table.read(archive, 100, 200) == expected[100:200]  # a span past it has landed
    gets = source.calls["get_range"]
    assert table.read(archive, 300, 400) == expected[300:400]
    assert source.calls["get_range"] == gets  # from the span
    table.forget(archive, 300, 400)
    assert table.read(archive, 300, 400) == expected[300:400]
    assert source.calls["get_range"] == gets + 1  # fetched anew
    table.close()


class ReadHeldDisk(DiskCache):
    """A disk cache whose reads, once ``hold`` is set, say they have read (``entered``) and wait
    for ``release`` before they return: a span in flight with its bytes taken from the disk."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold, self.entered, self.release = (threading.Event() for _ in range(3))

    def read_run(self, *args, **kwargs) -> dict[int, bytes]:
        found = super().read_run(*args, **kwargs)
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(10), "the test never released the read"
        return found


def test_a_span_in_flight_when_its_range_is_forgotten_is_not_served_afterwards(tmp_path) -> None:
    """Blocks damaged in transit (plain HTTP) and cached as received: a member read on its own
    decodes to damage from them while a streak's span over it, which took the same blocks from
    the disk, has not landed yet. ``forget`` dropped only landed spans, so this one landed after
    it and served the damage again once the member's minute of failing was over (the member
    failed a second time, and only the third read fetched it from S3)."""
    source, refs = archive_members((zipfile.ZIP_STORED,))
    archive = refs[0].archive
    block = 64 * 1024
    expected = source.get_range(archive, 0, archive.size)
    damaged = bytearray(expected[:16 * block])
    damaged[350] ^= 0xFF  # a byte of the member at 300-400, flipped in transit
    disk = ReadHeldDisk(tmp_path, block_size=block, capacity=1 << 30)
    disk.write(archive, object_digest(archive), 0,
               [bytes(damaged[at:at + block]) for at in range(0, len(damaged), block)])
    table = spans.Spans(spans.ArchiveBlocks(source, disk), max_bytes=1 << 30)
    assert table.read(archive, 0, 100) == expected[:100]  # a streak's first read
    disk.hold.set()
    streak: list[bytes] = []
    reading = threading.Thread(target=lambda: streak.append(table.read(archive, 100, 200)))
    reading.start()  # its span (100 onward: all on disk) is in flight once its disk read is done
    try:
        assert disk.entered.wait(10), "the span never read the disk"
        table.forget(archive, 300, 400)  # as the member found bad is (``MemberSource``)
    finally:
        disk.hold.clear()
        disk.release.set()
        reading.join(10)
    assert streak == [expected[100:200]]
    source.calls.clear()
    assert table.read(archive, 300, 400) == expected[300:400]  # not the damage again
    assert source.calls["get_range"] == 1  # fetched anew
    table.close()


def test_a_streak_after_scattered_reads_starts_again_with_the_smallest_span() -> None:
    """Spans grow while a streak lasts; a read that continues nothing starts over: two
    neighbouring reads of a random reader later fetch ``_MIN_SPAN``, not the grown size."""
    mib = 1 << 20
    source = FakeSource()
    source.create_bucket("b")
    archive = source.put("b", "a.zip", sample_bytes(6, 16 * mib))
    table = spans.Spans(spans.ArchiveBlocks(source, None), max_bytes=64 * mib)
    for at in range(0, 3 * mib // 2, 256 * 1024):  # a streak: its next span would be 2 MiB
        table.read(archive, at, at + 256 * 1024)
    far = 12 * mib
    table.read(archive, far, far + 100)  # continues nothing
    table.read(archive, far + 100, far + 200)  # a neighbour: a new streak's first span
    assert source.ranges[-1][1:] == (far + 100, far + 100 + spans._MIN_SPAN)
    table.close()


def test_readahead_uses_at_most_its_threads() -> None:
    """Spans are read ahead by ``_AHEAD_THREADS`` threads, however many spans are planned: a
    long streak must not start a thread per span."""
    mib = 1 << 20
    archive = ObjectRef("b", "a.zip", None, '"e"', 64 * mib, 0.0)
    before = set(threading.enumerate())  # other tests' tables may have theirs
    table = spans.Spans(GatedArchive(), max_bytes=64 * mib)
    for at in range(0, 48 * mib, 256 * 1024):
        assert table.read(archive, at, at + 256 * 1024) == bytes(256 * 1024)
    ahead = [t for t in set(threading.enumerate()) - before
             if t.name.startswith("s3datafs-zip_")]
    table.close()
    assert 0 < len(ahead) <= spans._AHEAD_THREADS


class NotedWait(threading.Event):
    """An event that tells when someone waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited.set()
        return super().wait(timeout)


def test_a_reader_waiting_for_a_span_read_ahead_that_fails_fetches_its_own() -> None:
    """Readahead is nobody's read: when a span read ahead fails, a reader that was waiting for
    it plans and fetches its own bytes, and gets them, not the readahead's error."""
    mib = 1 << 20
    archive = ObjectRef("b", "a.zip", None, '"e"', 64 * mib, 0.0)

    class FailingWhileHeld(GatedArchive):
        """GETs held at the gate fail once it opens (a stalled S3); later ones succeed."""

        def get_range(self, archive: ObjectRef, start: int, end: int) -> bytes:
            held = start >= self.held_from and not self.gate.is_set()
            data = super().get_range(archive, start, end)
            if held:
                raise TransientS3Error("no answer from S3")
            return data

        get_shared = get_range

    inner = FailingWhileHeld()
    table = spans.Spans(inner, max_bytes=64 * mib)
    at = read_into_a_streak(table, archive)
    ahead = sorted((s for s in table._spans if s.start >= at), key=lambda s: s.start)
    wait_until(lambda: all(s.done.is_set() for s in ahead), "the spans ahead never landed")
    inner.held_from = ahead[-1].end  # the spans planned next are held, then fail
    table.read(archive, ahead[0].start, ahead[0].start + 10)
    held = next(s for s in table._spans if s.start == ahead[-1].end)
    held.done = NotedWait()
    got: list[bytes | BaseException] = []

    def read() -> None:
        try:
            got.append(table.read(archive, held.start, held.start + 100))
        except Exception as exc:
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert held.done.waited.wait(10)  # the reader waits for the span read ahead ...
    inner.gate.set()  # ... which fails
    reader.join(10)
    assert got == [bytes(100)]
    table.close()


def test_failed_spans_give_their_room_back() -> None:
    """A span that failed leaves the table and its bytes the count: otherwise failures would
    fill ``max_bytes`` for good, and every new span would evict all the others."""
    mib = 1 << 20
    archive = ObjectRef("b", "a.zip", None, '"e"', 64 * mib, 0.0)

    class Failing:
        fail = True

        def get_range(self, archive: ObjectRef, start: int, end: int) -> bytes:
            if self.fail:
                raise TransientS3Error("no answer from S3")
            return bytes(end - start)

        get_shared = get_range

    inner = Failing()
    table = spans.Spans(inner, max_bytes=4 * mib)
    for at in range(0, 40 * mib, 2 * mib):
        inner.fail = False
        assert table.read(archive, at, at + 100) == bytes(100)  # exactly that
        inner.fail = True
        with pytest.raises(TransientS3Error):
            table.read(archive, at + 100, at + 200)  # continues it: a span, which fails
    assert table._bytes == sum(s.end - s.start for s in table._spans)
    table.close()


def test_a_span_with_a_hole_in_the_disk_cache_is_one_get_and_no_disk_hit(tmp_path) -> None:
    """Blocks on disk that a GET fetches again anyway are not hits: the span is one GET of all
    its blocks (joined with those at hand, it would be a copy held beside the GET's views)."""
    source = FakeSource()
    source.create_bucket("b")
    archive_ref = source.put("b", "a.zip", sample_bytes(3, 1 << 20))
    data = source.get_range(archive_ref, 0, archive_ref.size)
    block = 64 * 1024
    disk = DiskCache(tmp_path, block_size=block, capacity=1 << 30)
    disk.write(archive_ref, object_digest(archive_ref), 0, [data[:block]])  # block 0 only
    source.ranges.clear()
    blocks = spans.ArchiveBlocks(source, disk)
    try:
        assert blocks.get_range(archive_ref, 0, 4 * block) == data[: 4 * block]
        assert [(s, e) for _, s, e in source.ranges] == [(0, 4 * block)]
        assert blocks.stats.disk_hits == 0
        assert blocks.get_range(archive_ref, block, 3 * block) == data[block : 3 * block]
        assert blocks.stats.disk_hits == 2  # all at hand now: a hit saves the GET
    finally:
        blocks.close()


def test_the_writer_of_archive_blocks_takes_no_signal(tmp_path) -> None:
    """It outlives the serving loop (closed after the unmount), where a stop signal it took
    would end the daemon and leave a dead mount (a review; see quietthread)."""
    blocks = spans.ArchiveBlocks(FakeSource(), DiskCache(tmp_path, block_size=4096,
                                                          capacity=1 << 30))
    pool = blocks._writer_pool()
    blocked = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result(5)
    blocks.close()
    assert signal.SIGTERM in blocked


# -- ArchiveBlocks against a model ---------------------------------------------------------------

MODEL_BLOCK = 4096
MODEL_ARCHIVE = 12 * MODEL_BLOCK + 123


class GatedDisk(DiskCache):
    """A disk cache whose write-behind (the writer thread's writes) waits for ``gate``: what is
    pending when is the test's choice, not the scheduler's. The test thread writes at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def write(self, *args, **kwargs) -> None:
        if threading.current_thread() is not threading.main_thread():
            assert self.gate.wait(30), "the test never let the writes land"
        super().write(*args, **kwargs)


class ArchiveBlocksModel(RuleBasedStateMachine):
    """``ArchiveBlocks`` over a real ``DiskCache`` (small, so it evicts) and its write-behind:
    every range read is the archive's bytes, whichever of pending blocks, disk and S3 served it,
    and a block forgotten (``forget``: it decoded to damage) comes from S3 at its next read once
    the writes under way have landed, never from a write that landed after the forget."""

    def __init__(self, base) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(dir=base))
        self.source = FakeSource()
        self.source.create_bucket("bkt")
        self.body = random.Random(5).randbytes(MODEL_ARCHIVE)
        self.archive = self.source.put("bkt", "a.zip", self.body)
        self.disk = GatedDisk(self.tmp, block_size=MODEL_BLOCK, capacity=64 * MODEL_BLOCK)
        self.blocks = spans.ArchiveBlocks(self.source, self.disk, write_inline=2 * MODEL_BLOCK)
        self.forgetting: set[int] = set()  # forgotten, while a write of them may land
        self.forgotten: set[int] = set()  # forgotten, no write under way: to come from S3

    def teardown(self) -> None:
        self.disk.gate.set()
        self.blocks.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        start = data.draw(st.integers(0, MODEL_ARCHIVE - 1), label="start")
        return start, data.draw(st.integers(start + 1, min(MODEL_ARCHIVE, start + 6 * MODEL_BLOCK)),
                                label="end")

    @rule(data=st.data(), shared=st.booleans())
    def read(self, data: st.DataObject, shared: bool) -> None:
        start, end = self._range(data)
        touched = set(range(start // MODEL_BLOCK, (end - 1) // MODEL_BLOCK + 1))
        gets = self.source.calls["get_range"]
        read = self.blocks.get_shared if shared else self.blocks.get_range
        assert bytes(read(self.archive, start, end)) == self.body[start:end]
        if touched & self.forgotten:
            assert self.source.calls["get_range"] > gets, "a forgotten block served from a cache"
        if self.source.calls["get_range"] > gets:  # fetched afresh: fine to serve from now on
            self.forgetting -= touched
            self.forgotten -= touched

    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        start, end = self._range(data)
        self.blocks.forget(self.archive, start, end)
        self.forgetting |= set(range(start // MODEL_BLOCK, (end - 1) // MODEL_BLOCK + 1))

    @rule()
    def writes_land(self) -> None:
        """Every write pending lands (the write-behind is one thread, in order)."""
        self.disk.gate.set()
        self.blocks._writer_pool().submit(lambda: None).result(timeout=30)
        self.disk.gate.clear()
        self.forgotten |= self.forgetting
        self.forgetting.clear()

    @rule(choice=st.integers(0, 2**20))
    def damage(self, choice: int) -> None:
        """A byte flipped in a region file: the disk cache turns it into a miss. (What is on
        disk depends on the write-behind's timing: the choice is drawn blind of it.)"""
        files = sorted(p for p in self.disk.root.rglob("*") if is_region_file(p.name))
        if not files:
            return
        path = files[choice % len(files)]
        at = choice % max(1, path.stat().st_size)
        with open(path, "r+b") as handle:
            handle.seek(at)
            old = handle.read(1) or b"\0"
            handle.seek(at)
            handle.write(bytes([old[0] ^ 0xFF]))


def test_archive_blocks_serve_exact_bytes_and_keep_forgotten_blocks_forgotten(tmp_path) -> None:
    run_state_machine_as_test(
        lambda: ArchiveBlocksModel(tmp_path),
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]),
    )
