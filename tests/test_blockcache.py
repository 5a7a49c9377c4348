"""The persistent block cache: region format, verification, eviction, sweeping, sharing."""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import multiprocessing
import os
import shutil
import threading
import time
import zlib
from pathlib import Path

import pytest

from s3datafs.cache import blockfile, disk, files
from s3datafs.cache.disk import DiskCache
from s3datafs.model import ObjectRef
from s3datafs.uri import parse_s3_uri

BLOCK = 4096
MiB = 1024 * 1024
REGION_BLOCKS = disk.REGION_BYTES // BLOCK
LAYOUT = blockfile.Layout(BLOCK, REGION_BLOCKS)


def make_ref(size: int, key: str = "k", version: str | None = "v1") -> ObjectRef:
    return ObjectRef("bkt", key, version, '"etag"', size, 0.0)


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def make_cache(tmp_path: Path, capacity: int = 64 * 1024 * 1024, **kwargs) -> DiskCache:
    return DiskCache(tmp_path, block_size=BLOCK, capacity=capacity, **kwargs)


def stored(cache: DiskCache, ref: ObjectRef, data: bytes, first: int = 0, count: int = 0):
    """Write blocks ``first`` .. (``count`` of them, or to the end) of ``data`` as ``ref``'s."""
    blocks = blocks_of(data)[first : first + count if count else None]
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, first, blocks)
    return digest


def read_all(cache: DiskCache, ref: ObjectRef, indices: range) -> dict[int, bytes]:
    return cache.read_run(blockfile.object_digest(ref), ref.size, indices)


def region_file(cache: DiskCache, ref: ObjectRef, region: int = 0) -> Path:
    digest = blockfile.object_digest(ref)
    return cache.root / digest[:2] / f"{digest}.r{region}"


def files_of(cache: DiskCache, ref: ObjectRef) -> list[str]:
    """The object's region files, by their suffix (``r0``, ``r1``...)."""
    digest = blockfile.object_digest(ref)
    fan = cache.root / digest[:2]
    if not fan.is_dir():
        return []
    return sorted(p.suffix[1:] for p in fan.iterdir() if p.name.startswith(digest))


def damage(path: Path, offset: int, raw: bytes | None = None) -> None:
    """Flip the byte at ``offset`` of ``path`` (or write ``raw`` there)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(1)
        handle.seek(offset)
        handle.write(raw if raw is not None else bytes([old[0] ^ 0xFF]))


def test_region_header_and_entries_name_their_object_and_block() -> None:
    digest, other = "ab" * 32, "cd" * 32
    head = blockfile.header(digest, 3, LAYOUT)
    assert blockfile.check_header(head, digest, 3, LAYOUT) is blockfile.HeaderState.VALID
    assert blockfile.check_header(head, other, 3, LAYOUT) is blockfile.HeaderState.DAMAGED
    assert blockfile.check_header(head, digest, 4, LAYOUT) is blockfile.HeaderState.DAMAGED
    assert blockfile.check_header(bytes(64), digest, 3, LAYOUT) is blockfile.HeaderState.ABSENT
    assert blockfile.check_header(b"", digest, 3, LAYOUT) is blockfile.HeaderState.ABSENT
    older = head[:4] + (2).to_bytes(2, "little") + head[6:]
    assert blockfile.check_header(older, digest, 3, LAYOUT) is blockfile.HeaderState.OTHER_VERSION

    entry = blockfile.entries(digest, 7, [b"payload"])
    assert blockfile.parse_entry(entry, digest, 7) == (7, zlib.crc32(b"payload"))
    assert blockfile.parse_entry(entry, other, 7) is False  # another object's entry
    assert blockfile.parse_entry(entry, digest, 8) is False  # another block's entry
    assert blockfile.parse_entry(entry[:-1] + bytes([entry[-1] ^ 1]), digest, 7) is False
    assert blockfile.parse_entry(bytes(blockfile.ENTRY_SIZE), digest, 7) is None  # never written
    assert LAYOUT.table_size % blockfile.PAGE == 0
    assert LAYOUT.slot_offset(REGION_BLOCKS + 1) == LAYOUT.table_size + BLOCK
    assert list(LAYOUT.runs(REGION_BLOCKS - 1, REGION_BLOCKS + 2)) == [
        range(REGION_BLOCKS - 1, REGION_BLOCKS),
        range(REGION_BLOCKS, REGION_BLOCKS + 2),
    ]


def test_digest_names_the_pinned_version() -> None:
    assert blockfile.object_digest(make_ref(1)) == blockfile.object_digest(make_ref(1))
    assert blockfile.object_digest(make_ref(1)) != blockfile.object_digest(
        make_ref(1, version="v2")
    )
    assert blockfile.object_digest(make_ref(1)) != blockfile.object_digest(make_ref(1, key="x"))


def test_a_run_reads_its_cached_ends_not_what_lies_between_its_misses(tmp_path: Path) -> None:
    """A GET fetches from a run's first missing block to its last, so blocks cached between
    them would be read and checked for nothing (a review: 6.4 MiB read, 6.3 MiB of it
    discarded, in a run of 128 blocks a tenth cached by random reads)."""
    size = (2 * REGION_BLOCKS + 3) * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    last = size // BLOCK - 1
    for index in (0, 1, 5, REGION_BLOCKS + 7, last - 1, last):
        stored(cache, ref, data, index, 1)
    assert sorted(read_all(cache, ref, range(0, last + 1))) == [0, 1, last - 1, last]
    assert sorted(cache.read_run(blockfile.object_digest(ref), size, range(0, last + 1),
                                 ends=False)) == [0, 1]
    assert sorted(read_all(cache, ref, range(5, 6))) == [5]  # still there, when asked for


def test_a_runs_cached_end_stops_at_its_last_miss_across_regions(tmp_path: Path) -> None:
    """Read from its end back, a run stops at the first block missing there, even where that
    block is in its last region and the region before ends with cached blocks."""
    size = (2 * REGION_BLOCKS + 3) * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    last = size // BLOCK - 1
    for index in (0, 2 * REGION_BLOCKS - 1, last):
        stored(cache, ref, data, index, 1)
    assert sorted(read_all(cache, ref, range(0, last + 1))) == [0, last]


def test_a_run_with_two_damaged_blocks_stops_at_the_nearer_one_from_where_it_is_read(
    tmp_path: Path,
) -> None:
    """Blocks 2 and 5 of eight damaged: read from its start, a run is blocks 0-1; blocks 3-4,
    between the two, are no part of it. Read from its end (its first block missing), 6-7."""
    size = 8 * BLOCK
    data = os.urandom(size)
    cache = make_cache(tmp_path)
    from_start, from_end = make_ref(size, key="start"), make_ref(size, key="end")
    stored(cache, from_start, data, 0, 8)
    stored(cache, from_end, data, 1, 7)
    for ref in (from_start, from_end):
        for index in (2, 5):
            damage(region_file(cache, ref), LAYOUT.slot_offset(index) + 3)
    assert sorted(cache.read_run(blockfile.object_digest(from_start), size, range(8),
                                 ends=False)) == [0, 1]
    assert sorted(read_all(cache, from_end, range(8))) == [6, 7]


def test_a_run_read_for_readahead_gives_every_cached_block_and_skips_damaged_ones(
    tmp_path: Path, caplog
) -> None:
    """Readahead GETs around the cached stretches of its run (``reader._pieces``), so it asks
    for every one of them, across regions; a damaged block is a miss, and the rest stand."""
    size = (2 * REGION_BLOCKS + 3) * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    last = size // BLOCK - 1
    cached = [0, 1, 5, 6, 7, REGION_BLOCKS + 7, last - 1, last]
    for index in cached:
        stored(cache, ref, data, index, 1)
    damage(region_file(cache, ref), LAYOUT.slot_offset(6) + 3)
    found = cache.read_run(blockfile.object_digest(ref), size, range(0, last + 1), every=True)
    assert found == {index: data[index * BLOCK : (index + 1) * BLOCK]
                     for index in cached if index != 6}
    assert "discarding corrupt cache block 6" in caplog.text


def test_runs_and_scattered_blocks_share_their_region_files(tmp_path: Path) -> None:
    size = (2 * REGION_BLOCKS + 3) * BLOCK + 100  # two whole regions, then a short one
    data = os.urandom(size)
    count = len(blocks_of(data))
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    stored(cache, ref, data, 5, 1)  # a random read's block: its region file is made
    assert files_of(cache, ref) == ["r0"]
    assert read_all(cache, ref, range(5, 6)) == {5: data[5 * BLOCK : 6 * BLOCK]}
    assert read_all(cache, ref, range(4, 6)) == {5: data[5 * BLOCK : 6 * BLOCK]}  # past a hole
    assert read_all(cache, ref, range(5, 8)) == {5: data[5 * BLOCK : 6 * BLOCK]}

    stored(cache, ref, data, 2, 2)  # more blocks of the same region: into the same file
    stored(cache, ref, data, REGION_BLOCKS - 1, 3)  # across a region boundary
    assert files_of(cache, ref) == ["r0", "r1"]
    assert sorted(read_all(cache, ref, range(2, 6))) == [2, 3, 5]  # block 4 was never written
    run = read_all(cache, ref, range(REGION_BLOCKS - 1, count))
    assert sorted(run) == list(range(REGION_BLOCKS - 1, REGION_BLOCKS + 2))

    stored(cache, ref, data)  # readahead: whole regions, one write each, and the short tail
    assert files_of(cache, ref) == ["r0", "r1", "r2"]
    found = read_all(cache, ref, range(0, count + 5))  # clamped to the object
    assert b"".join(found[i] for i in sorted(found)) == data
    part = read_all(cache, ref, range(300, 302))  # only the blocks asked for are read
    assert part == {300: data[300 * BLOCK : 301 * BLOCK], 301: data[301 * BLOCK : 302 * BLOCK]}


@pytest.mark.parametrize("block_size", [BLOCK, 64 * 1024], ids=["4k", "64k"])
def test_a_write_across_a_region_boundary_leaves_every_block_of_both_regions_readable(
    tmp_path: Path, block_size: int
) -> None:
    """A run is cut at region boundaries and each region gets exactly its own blocks. With 64 KiB
    blocks (the default) the table ends where slot 0 begins, so a stray entry past the table
    (a run's part one block too long) would land on block 0's payload."""
    per_region = disk.REGION_BYTES // block_size
    count = per_region + 3
    data = os.urandom(count * block_size)
    blocks = [data[i * block_size : (i + 1) * block_size] for i in range(count)]
    ref = make_ref(len(data))
    cache = DiskCache(tmp_path, block_size=block_size, capacity=64 * MiB)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks[:2])  # a random read cached block 0 and 1 first
    cache.write(ref, digest, 1, blocks[1:])  # then readahead, across the boundary
    found = cache.read_run(digest, ref.size, range(count))
    assert sorted(found) == list(range(count))
    assert b"".join(found[i] for i in range(count)) == data


def test_an_entry_whose_length_is_not_its_blocks_is_a_miss(tmp_path: Path) -> None:
    """Every block but the object's last is a whole block: an entry that says otherwise (a
    short payload written by mistake, a truncated body) is a miss, never a short block that
    would shift every byte after it in the read."""
    data = os.urandom(3 * BLOCK)
    ref = make_ref(len(data))
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, [data[:BLOCK], data[BLOCK : 2 * BLOCK - 1]])  # block 1 short
    assert read_all(cache, ref, range(0, 3)) == {0: data[:BLOCK]}
    cache.write(ref, digest, 2, [data[2 * BLOCK :] + b"x"])  # the last block one byte long
    assert read_all(cache, ref, range(2, 3)) == {}


def test_region_files_are_sparse_and_counted_by_what_they_hold(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    data = os.urandom(size)
    stored(cache, ref, data, 100, 1)
    path = region_file(cache, ref)
    assert path.stat().st_size == LAYOUT.slot_offset(101)  # the file reaches block 100's end
    allocated = path.stat().st_blocks * 512
    assert allocated <= LAYOUT.table_size + 2 * BLOCK  # ... but holds the table and one block
    assert cache.used_bytes == allocated
    stored(cache, ref, data)
    assert cache.used_bytes == path.stat().st_blocks * 512 >= size


@pytest.mark.parametrize("refuse", [False, True])
def test_blocks_are_exact_with_o_direct_and_where_a_filesystem_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    real_fcntl, direct = fcntl.fcntl, getattr(os, "O_DIRECT", 0)
    asked_direct = []

    def fake_fcntl(fd, command, arg=0):  # a filesystem without O_DIRECT (tmpfs before 6.6)
        if command == fcntl.F_SETFL and arg & direct:
            asked_direct.append(fd)
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    tail_size = disk.DIRECT_MIN + 100  # odd-sized, long enough for O_DIRECT
    size = REGION_BLOCKS * BLOCK + tail_size  # a region, then the tail
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    stored(cache, ref, data, 0, REGION_BLOCKS)
    stored(cache, ref, data, REGION_BLOCKS)
    assert len(asked_direct) == (1 if refuse else 2)  # refused once, then buffered
    found = read_all(cache, ref, range(0, len(blocks_of(data))))
    assert b"".join(found[i] for i in sorted(found)) == data
    tail = region_file(cache, ref, 1)
    padded = LAYOUT.table_size + blockfile.padded(tail_size)
    assert tail.stat().st_size == (padded if not refuse else LAYOUT.table_size + tail_size)
    short = make_ref(3 * BLOCK + 100, key="short")  # shorter than DIRECT_MIN: buffered at once
    stored(cache, short, data[: short.size])
    assert len(asked_direct) == (1 if refuse else 2)
    assert region_file(cache, short).stat().st_size == LAYOUT.table_size + short.size
    found = read_all(cache, short, range(0, 4))
    assert b"".join(found[i] for i in range(4)) == data[: short.size]


def test_a_write_under_way_when_another_thread_gives_up_o_direct_still_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(tmp_path)
    real_fcntl, direct = fcntl.fcntl, getattr(os, "O_DIRECT", 0)

    def fake_fcntl(fd, command, arg=0):  # meanwhile, another write found O_DIRECT refused
        if command == fcntl.F_SETFL and arg & direct:
            cache._direct = None
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    size = REGION_BLOCKS * BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    stored(cache, ref, data)
    found = read_all(cache, ref, range(REGION_BLOCKS))
    assert b"".join(found[i] for i in sorted(found)) == data


def test_a_run_larger_than_the_write_buffer_is_written_in_pieces(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK - 100  # one region, 8 buffers' worth, odd-sized
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    stored(cache, ref, data)
    assert files_of(cache, ref) == ["r0"]
    found = read_all(cache, ref, range(0, REGION_BLOCKS))
    assert b"".join(found[i] for i in sorted(found)) == data


def test_a_damaged_block_is_a_miss_and_is_written_again(tmp_path: Path, caplog) -> None:
    size = 16 * BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    stored(cache, ref, data)
    path = region_file(cache, ref)
    damage(path, LAYOUT.slot_offset(5) + 7)  # one flipped payload bit in block 5
    damage(path, LAYOUT.entry_offset(9) + 5)  # a damaged table entry of block 9
    assert read_all(cache, ref, range(0, 2)) == {0: data[:BLOCK], 1: data[BLOCK : 2 * BLOCK]}
    assert read_all(cache, ref, range(4, 7)) == {4: data[4 * BLOCK : 5 * BLOCK],
                                                 6: data[6 * BLOCK : 7 * BLOCK]}  # 5 is not
    assert read_all(cache, ref, range(5, 6)) == {}  # now a plain miss: its entry was zeroed
    assert sorted(read_all(cache, ref, range(6, 12))) == [6, 7, 8, 10, 11]
    assert "discarding corrupt cache block 5" in caplog.text
    assert "discarding corrupt cache block 9" in caplog.text
    stored(cache, ref, data, 5, 1)  # fetched again: stored again
    stored(cache, ref, data, 9, 1)
    found = read_all(cache, ref, range(0, 16))
    assert b"".join(found[i] for i in range(16)) == data


def test_a_damaged_block_met_reading_a_run_from_its_end_is_a_miss_and_so_is_what_lies_before(
    tmp_path: Path, caplog
) -> None:
    """A run whose start is cached up to a miss is read from its end back too (``read_run``):
    a block found damaged there is a miss, and so are the blocks before it, which that read
    reached only past the damage; the blocks after it are exact hits."""
    size = 16 * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    stored(cache, ref, data, 0, 4)
    stored(cache, ref, data, 5)  # block 4 was never fetched
    damage(region_file(cache, ref), LAYOUT.slot_offset(13) + 3)  # one flipped payload bit
    found = read_all(cache, ref, range(0, 16))
    assert found == {i: data[i * BLOCK : (i + 1) * BLOCK] for i in (0, 1, 2, 3, 14, 15)}
    assert "discarding corrupt cache block 13" in caplog.text
    assert read_all(cache, ref, range(13, 14)) == {}  # its entry zeroed: a plain miss now
    assert read_all(cache, ref, range(5, 13)) == {i: data[i * BLOCK : (i + 1) * BLOCK]
                                                  for i in range(5, 13)}


@pytest.mark.parametrize("harm", ["truncate", "header", "swap", "empty"])
def test_a_file_that_is_not_its_region_is_a_miss(tmp_path: Path, harm: str) -> None:
    size = 16 * BLOCK
    data = os.urandom(size)
    ref, other = make_ref(size), make_ref(size, key="other")
    cache = make_cache(tmp_path)
    stored(cache, ref, data)
    stored(cache, other, os.urandom(size))
    path = region_file(cache, ref)
    if harm == "truncate":  # the last blocks lost: those are misses, the others are served
        os.truncate(path, LAYOUT.slot_offset(12) + 10)
        assert sorted(read_all(cache, ref, range(0, 16))) == list(range(12))
        return
    if harm == "header":
        damage(path, 20)
    elif harm == "swap":  # a whole valid file of another object put in its place
        path.write_bytes(region_file(cache, other).read_bytes())
    else:
        path.write_bytes(b"")
    assert read_all(cache, ref, range(0, 16)) == {}
    assert path.exists() == (harm == "empty")  # an empty file is a new region, not damage


def test_a_region_file_left_without_its_header_is_mended_by_the_next_write(
    tmp_path: Path,
) -> None:
    """Its creator died (or hit ENOSPC) between creating it and writing its header."""
    size = 4 * BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    stored(cache, ref, data, 0, 1)
    region = region_file(cache, ref)
    os.truncate(region, 0)
    assert read_all(cache, ref, range(0, 1)) == {}  # a quiet miss: nothing written yet
    assert region.exists()
    stored(cache, ref, data, 1, 3)
    expected = {i: data[i * BLOCK : (i + 1) * BLOCK] for i in (1, 2, 3)}
    assert read_all(cache, ref, range(1, 4)) == expected


def test_forgetting_blocks_a_region_file_does_not_hold_allocates_nothing(tmp_path: Path) -> None:
    """``forget_blocks`` zeroes written entries only: zeros written over a hole (an empty file,
    whose creator died before its header; a page of the table no write reached) took a page the
    byte bound did not count until the next scan. The blocks it holds are still forgotten."""
    size = REGION_BLOCKS * BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = stored(cache, ref, data, 0, 1)
    region = region_file(cache, ref)
    os.truncate(region, 0)
    cache.forget_blocks(digest, range(0, 3))
    assert (region.stat().st_blocks, region.stat().st_size) == (0, 0)
    stored(cache, ref, data, 0, 2)
    allocated = region.stat().st_blocks * 512
    far = (blockfile.PAGE - blockfile.TABLE_OFFSET) // blockfile.ENTRY_SIZE  # on the next page
    assert LAYOUT.entry_offset(far) // blockfile.PAGE != LAYOUT.entry_offset(1) // blockfile.PAGE
    cache.forget_blocks(digest, range(far, far + 2))
    cache.forget_blocks(digest, range(1, far + 2))  # one written block among holes
    assert region.stat().st_blocks * 512 == allocated == cache.used_bytes
    assert read_all(cache, ref, range(0, 2)) == {0: data[:BLOCK]}


def test_forgetting_blocks_forgets_those_written_past_the_start_of_the_range(
    tmp_path: Path,
) -> None:
    size = 8 * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    digest = stored(cache, ref, data, 0, 1)
    stored(cache, ref, data, 4, 2)
    cache.forget_blocks(digest, range(2, 8))  # blocks 4 and 5 written, 2 and 3 holes
    assert read_all(cache, ref, range(4, 6)) == {}
    assert read_all(cache, ref, range(0, 1)) == {0: data[:BLOCK]}


def test_dropping_an_object_deletes_its_last_region_of_one_block(tmp_path: Path) -> None:
    """An object whose last block is alone in a region file: ``holds_files`` asks for that
    file too, and ``drop`` deletes it with the others."""
    size = (REGION_BLOCKS + 1) * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    digest = stored(cache, ref, data, 0, REGION_BLOCKS)
    assert not cache.holds_files(digest, size)
    stored(cache, ref, data, REGION_BLOCKS, 1)
    assert cache.holds_files(digest, size)
    cache.drop(digest, size)
    assert files_of(cache, ref) == []


def test_a_region_file_of_another_format_version_is_a_quiet_miss(tmp_path: Path, caplog) -> None:
    ref = make_ref(BLOCK)
    cache = make_cache(tmp_path)
    stored(cache, ref, os.urandom(BLOCK))
    region = region_file(cache, ref)
    damage(region, 4, (3).to_bytes(2, "little")[:1])  # format version 3
    with caplog.at_level("INFO"):
        assert read_all(cache, ref, range(0, 1)) == {}
    assert "another format version" in caplog.text
    assert "corrupt" not in caplog.text
    assert not region.exists()


def swept() -> None:
    """Until the threads removing what earlier formats left have ended."""
    for remover in list(disk._earlier_removers.values()):
        remover.join(timeout=30)
        assert not remover.is_alive()


def removers() -> int:
    return sum(thread.name == "cache-format-sweep" for thread in threading.enumerate())


def test_what_earlier_formats_left_goes_in_a_thread_the_scan_does_not_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgraded host's cache of 100,000 objects held the scan's lock for 47 s while it was
    removed, and every mount of the cache waited, unmounts too. Other block sizes' leftovers
    were never removed at all."""
    cache = make_cache(tmp_path)
    other_block_size = cache.root.parent / "1048576"
    leftovers = [cache.root / "ab" / ("ab" * 32), other_block_size / "cd" / ("cd" * 32)]
    for old in leftovers:
        old.mkdir(parents=True)
        (old / "meta.json").write_bytes(b"{}")
    may_go, real_rmtree = threading.Event(), shutil.rmtree

    def slow_rmtree(path, ignore_errors=False) -> None:
        assert may_go.wait(timeout=30)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(disk.shutil, "rmtree", slow_rmtree)
    swept()
    cache.sync()  # returns while the removal waits
    cache.sync()  # and a second scan starts no second remover
    assert removers() == 1
    other = make_cache(tmp_path / "other")  # another cache of the process has its own
    (other.root / "ef" / ("ef" * 32)).mkdir(parents=True)
    other.sync()
    assert removers() == 2
    assert all(old.exists() for old in leftovers)
    may_go.set()
    swept()
    assert not any(old.exists() for old in leftovers)


def test_what_earlier_formats_left_after_a_sweep_ended_is_swept_by_the_next_scan(
    tmp_path: Path,
) -> None:
    """A sweep that has ended leaves the next one to the next scan that meets leftovers (a
    host that ran an older release again meanwhile)."""
    cache = make_cache(tmp_path)
    for name in ("ab", "cd"):
        old = cache.root / name / (name * 32)
        old.mkdir(parents=True)
        cache.sync()
        swept()
        assert not old.exists()


def test_a_scan_that_cannot_start_the_sweep_fails_nothing_and_the_next_scan_sweeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a pids limit no thread can be started: the ``RuntimeError`` went up through
    ``try_sync`` into the mount's nursery (its start-up scan, a due scan behind the writes),
    which it ended, and ``s3datafs prefetch`` failed. Now the scan is done all the same, and
    the next one sweeps."""
    cache = make_cache(tmp_path)
    old = cache.root / "ab" / ("ab" * 32)
    old.mkdir(parents=True)
    real_start = disk.start_quiet_thread

    def no_thread(*args: object, **kwargs: object) -> threading.Thread:
        raise RuntimeError("can't start new thread")

    swept()
    monkeypatch.setattr(disk, "start_quiet_thread", no_thread)
    cache.sync()
    assert old.exists()
    monkeypatch.setattr(disk, "start_quiet_thread", real_start)
    cache.sync()
    swept()
    assert not old.exists()


def test_what_earlier_formats_left_is_counted_then_swept(tmp_path: Path, caplog) -> None:
    """Formats 1-3 kept a directory per object (meta.json, block or region files, temps)."""
    cache = make_cache(tmp_path, dataset="s3://bkt/")
    kept = make_ref(BLOCK, key="kept")
    stored(cache, kept, os.urandom(BLOCK))
    old = cache.root / "ab" / ("ab" * 32)
    old.mkdir(parents=True)
    for name in ("meta.json", "r0", "C0", ".tmp.999999999.1.meta.json"):
        (old / name).write_bytes(b"S3DB" + bytes(5000))
    usage = disk.usage(tmp_path)
    assert usage.by_dataset[disk.EARLIER_FORMAT] >= 4 * 8192
    assert usage.blocks == 1  # ours only
    with caplog.at_level("INFO"):
        cache.sync()
        swept()
    assert "removed 1 cached objects of an earlier cache format" in caplog.text
    assert not old.exists()
    assert files_of(cache, kept) == ["r0"]
    assert disk.usage(tmp_path).by_dataset == {"s3://bkt/": cache.used_bytes}
    old.mkdir()
    assert disk.clear(tmp_path, parse_s3_uri("s3://elsewhere/")) == 0  # a clear takes them too
    assert not old.exists()
    assert files_of(cache, kept) == ["r0"]


def test_eviction_is_lru_by_bytes_and_deletes_files(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(size), bytes(size))
    one_region = probe.used_bytes  # what one full region takes on this filesystem
    cache = make_cache(tmp_path / "cache", capacity=3 * one_region)
    refs = [make_ref(size, key=f"k{i}") for i in range(4)]
    payload = os.urandom(size)
    for ref in refs[:3]:
        stored(cache, ref, payload)
    read_all(cache, refs[0], range(0, 1))  # k0 is hot
    stored(cache, refs[3], payload)  # evicts k1, the coldest
    assert cache.used_bytes == 3 * one_region
    present = {r.key for r in refs if "r0" in files_of(cache, r)}
    assert present == {"k0", "k2", "k3"}


def test_a_region_growing_past_others_evicts_them_not_itself(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(size), bytes(size), 0, REGION_BLOCKS // 2)
    half = probe.used_bytes
    cache = make_cache(tmp_path / "cache", capacity=2 * half + half // 2)
    grows, other = make_ref(size, key="grows"), make_ref(size, key="other")
    data = os.urandom(size)
    stored(cache, grows, data, 0, REGION_BLOCKS // 2)
    stored(cache, other, data, 0, REGION_BLOCKS // 2)
    stored(cache, grows, data, REGION_BLOCKS // 2)  # now the oldest entry, and growing
    assert files_of(cache, other) == []
    assert len(read_all(cache, grows, range(0, REGION_BLOCKS))) == REGION_BLOCKS


def test_a_cache_smaller_than_a_region_stays_within_its_bound(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK
    cache = make_cache(tmp_path, capacity=size // 2)
    ref = make_ref(size)
    data = os.urandom(size)
    stored(cache, ref, data, 0, 8)  # a few blocks fit
    assert len(read_all(cache, ref, range(0, 8))) == 8
    stored(cache, ref, data)  # the whole region does not: it is not kept
    assert files_of(cache, ref) == []
    assert cache.used_bytes == 0
    big = make_cache(tmp_path)  # written by a process with a larger bound ...
    stored(big, ref, data)
    cache.sync()  # ... and dropped by the scan of the small one
    assert files_of(cache, ref) == []


def test_a_disk_hit_keeps_its_file_from_other_mounts_evictions_touching_it_once_a_minute(
    tmp_path: Path,
) -> None:
    """Other mounts' scans evict the oldest files by mtime: a file read here must look recent
    to them, or the hot file goes before the cold. A minute of slack spares a utime per hit."""
    cache = make_cache(tmp_path)
    hot, cold = make_ref(BLOCK, key="hot"), make_ref(BLOCK, key="cold")
    hour_ago = time.time() - 3600
    for ref in (cold, hot):
        stored(cache, ref, os.urandom(BLOCK))
        os.utime(region_file(cache, ref), (hour_ago, hour_ago))
    assert len(read_all(cache, hot, range(1))) == 1
    assert region_file(cache, hot).stat().st_mtime > time.time() - 60
    assert region_file(cache, cold).stat().st_mtime == pytest.approx(hour_ago)
    half_a_minute_ago = time.time() - 30
    os.utime(region_file(cache, hot), (half_a_minute_ago, half_a_minute_ago))
    assert len(read_all(cache, hot, range(1))) == 1
    assert region_file(cache, hot).stat().st_mtime == pytest.approx(half_a_minute_ago)
    make_cache(tmp_path, capacity=cache.used_bytes // 2).sync()  # room for one of the two
    assert (files_of(cache, hot), files_of(cache, cold)) == (["r0"], [])


def test_sync_counts_files_of_others(tmp_path: Path) -> None:
    size = REGION_BLOCKS * BLOCK
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(size), bytes(size))
    one_region = probe.used_bytes
    first = make_cache(tmp_path / "shared", capacity=2 * one_region)
    second = make_cache(tmp_path / "shared", capacity=2 * one_region)
    refs = [make_ref(size, key=f"k{i}") for i in range(3)]
    for ref in refs:  # three files through two caches: each one alone is within its bound
        stored(first if ref.key != "k2" else second, ref, os.urandom(size))
        time.sleep(0.01)
    first.sync()
    assert first.used_bytes == 2 * one_region
    assert len(list(first.root.rglob("*.r0"))) == 2  # the oldest file (k0) went


def test_files_written_again_after_another_mount_evicted_them_count_towards_the_bound(
    tmp_path: Path,
) -> None:
    """Mount X still lists files that mount Y's scans evicted; X writes them again (its job
    reads them again). That growth must count towards X's next scan: counted against X's stale
    index entries it was nothing, no scan fell due, and the directory held both mounts' bounds
    (found by the model, tests/test_blockcache_model.py)."""
    size = 2 * BLOCK
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(size), bytes(size))
    one_file = probe.used_bytes
    shared = tmp_path / "shared"
    x, y = (make_cache(shared, capacity=4 * one_file) for _ in range(2))
    for cache in (x, y):
        cache.sync_every = one_file
    data = os.urandom(size)
    xs, ys = [[make_ref(size, key=f"{m}{i}") for i in range(4)] for m in "xy"]
    for age, ref in enumerate(xs):
        stored(x, ref, data)
        os.utime(region_file(x, ref), (time.time() - 600 + age,) * 2)  # the oldest
    for ref in ys:  # each write falls due for a scan: X's files go, oldest first
        stored(y, ref, data)
    assert not any(files_of(x, ref) for ref in xs)
    for ref in xs:
        stored(x, ref, data)
    assert disk.usage(shared).bytes <= 4 * one_file + x.sync_every + y.sync_every


def test_a_write_runs_a_due_sync_unless_asked_to_leave_it_to_the_caller(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    cache.sync_every = 2 * BLOCK
    scans: list[int] = []
    scan = cache.sync
    cache.sync = lambda: (scans.append(1), scan())  # type: ignore[method-assign]
    ref = make_ref(4 * BLOCK)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, [bytes(BLOCK)] * 2, sync=False)
    assert cache.sync_due  # due, and left to the caller
    assert scans == []
    cache.write(ref, digest, 2, [bytes(BLOCK)])
    assert scans == [1]
    assert not cache.sync_due


def test_a_scan_that_fails_is_said_once_fails_no_write_and_is_tried_again_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mount's scan may fail (the cache directory unreadable, its lock refused, an I/O
    error): the write it fell due after is not failed for it, one warning says so, and the next
    scan falls due after ``sync_every`` more bytes (not at every write: a scan failing half way
    would walk the cache again each time). ``.lock`` made a directory makes it fail, root or not.
    """
    cache = make_cache(tmp_path)
    cache.sync_every = 2 * BLOCK
    lock = cache.root / ".lock"
    lock.mkdir()
    scans: list[int] = []
    scan = cache.sync
    cache.sync = lambda: (scans.append(1), scan())  # type: ignore[method-assign]
    ref = make_ref(8 * BLOCK)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, [bytes(BLOCK)] * 2)  # falls due: the scan fails
    assert scans == [1]
    assert not cache.sync_due
    cache.write(ref, digest, 2, [bytes(BLOCK)])  # not due again yet
    assert scans == [1]
    cache.try_sync()  # due or not, as a mount's start does
    assert scans == [1, 1]
    cache.write(ref, digest, 3, [bytes(BLOCK)] * 2)
    assert scans == [1, 1, 1]
    warnings = [r.getMessage() for r in caplog.records if "cannot scan" in r.getMessage()]
    assert len(warnings) == 1  # once a minute at most
    assert "Is a directory" in warnings[0]
    lock.rmdir()
    cache.write(ref, digest, 5, [bytes(BLOCK)] * 2)
    assert scans == [1, 1, 1, 1]
    assert lock.is_file()  # this scan took the lock: it ran
    assert read_all(cache, ref, range(0, 7)) == {i: bytes(BLOCK) for i in range(7)}


class _BlocksReportedLate:
    """``os.fstat`` of a filesystem that reports a file's blocks only once its writes commit
    (ZFS: ``st_blocks`` is 1 until the transaction group is written, seconds later)."""

    def __init__(self, real: os.stat_result) -> None:
        self._real = real
        self.st_blocks = 1

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_writes_make_a_scan_fall_due_where_the_filesystem_reports_blocks_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a write adds is counted towards the next scan even when ``st_blocks`` lags behind
    the write: counted by ``st_blocks`` alone, a cache on ZFS never fell due for a scan between
    mounts and grew past its bound by all it wrote (held back only by --cache-min-free)."""
    real_fstat = os.fstat
    monkeypatch.setattr(disk.os, "fstat", lambda fd: _BlocksReportedLate(real_fstat(fd)))
    cache = make_cache(tmp_path)
    cache.sync_every = 8 * BLOCK
    for number in range(4):  # a new region file each, two blocks written into it
        ref = make_ref(2 * BLOCK, key=f"k{number}")
        cache.write(ref, blockfile.object_digest(ref), 0, [bytes(BLOCK)] * 2, sync=False)
    assert cache.sync_due


def _write_every_other_block(cache_dir: str, parity: int, data: bytes) -> None:
    cache = DiskCache(Path(cache_dir), block_size=BLOCK, capacity=64 * disk.REGION_BYTES)
    blocks = blocks_of(data)
    for round_ in range(3):
        for i in range(4):
            ref = make_ref(len(data), key=f"shared{i}")
            digest = blockfile.object_digest(ref)
            for index in range(parity, len(blocks), 2):  # the other process takes the others
                cache.write(ref, digest, index, [blocks[index]])
            if round_:  # and whole runs over the same slots, as readahead would
                cache.write(ref, digest, 0, blocks)
            found = cache.read_run(digest, ref.size, range(0, len(blocks)))
            assert all(found[j] == blocks[j] for j in found)
    cache.sync()


def test_two_processes_writing_one_region_lose_nothing_and_mix_nothing(tmp_path: Path) -> None:
    data = os.urandom(REGION_BLOCKS * BLOCK // 4 + 100)
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_write_every_other_block, args=(str(tmp_path), p, data))
        for p in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    reader = make_cache(tmp_path)
    for i in range(4):
        ref = make_ref(len(data), key=f"shared{i}")
        found = read_all(reader, ref, range(0, len(blocks_of(data))))
        assert b"".join(found[j] for j in sorted(found)) == data  # every block, each exact


def test_min_free_refuses_to_fill_the_filesystem(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, min_free_ratio=1.0)  # nothing may be written
    ref = make_ref(BLOCK)
    with pytest.raises(OSError, match="free on the cache filesystem"):
        cache.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])


class FakeFs:
    """``os.statvfs`` of a 100 MiB filesystem with ``free`` bytes free."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, _path: object) -> os.statvfs_result:
        size = 1024
        return os.statvfs_result((size, size, 100 * MiB // size, 0, self.free // size, 0, 0, 0,
                                  0, 255))


def test_min_free_counts_writes_that_have_not_landed_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several threads write at once: one that checked free space and has not landed is not in
    # the filesystem's free space yet, and a check in between let others overshoot (8 readers
    # filled a cache filesystem to 100 % with 5 % to keep free: review, session 20).
    fs = FakeFs(free=20 * MiB)
    monkeypatch.setattr(disk.os, "statvfs", fs)
    cache = make_cache(tmp_path, min_free_ratio=0.05)  # keep 5 MiB free
    first = cache._make_room(8 * MiB)  # a write under way: 12 MiB will be left
    cache._free_checked_at = -1e9  # the next write checks the filesystem again
    with pytest.raises(OSError, match="less than 5% free"):
        cache._make_room(8 * MiB)  # would leave 4 MiB
    cache._reserved -= first
    fs.free -= first  # the first write landed
    cache._free_checked_at = -1e9
    assert cache._make_room(4 * MiB) == 4 * MiB  # leaves 8 MiB


def test_min_free_evicts_our_oldest_files_to_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cache-min-free on a filesystem that others fill: the write goes on once this cache
    has given back enough of its own oldest region files; the newer ones stay."""
    fs = FakeFs(free=50 * MiB)
    monkeypatch.setattr(disk.os, "statvfs", fs)
    cache = make_cache(tmp_path, min_free_ratio=0.05)  # keep 5 MiB free
    refs = [make_ref(BLOCK, key=f"k{number}") for number in range(4)]
    for ref in refs[:3]:  # oldest first
        stored(cache, ref, b"o" * BLOCK)
    fs.free = 5 * MiB + BLOCK - 1024  # someone else filled the disk: 1 KiB short for a block
    cache._free_checked_at = -1e9  # the next write checks the filesystem again
    digest = stored(cache, refs[3], b"n" * BLOCK)
    assert [bool(files_of(cache, ref)) for ref in refs] == [False, True, True, True]
    assert cache.read_run(digest, BLOCK, range(1)) == {0: b"n" * BLOCK}


def test_made_room_since_tells_evictions_for_min_free_from_that_moment_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``made_room_since`` (``archive.decompressed``: a copy that lost its first regions to
    --cache-min-free) is true of evictions made at the moment given or after it, not before."""
    fs = FakeFs(free=50 * MiB)
    monkeypatch.setattr(disk.os, "statvfs", fs)
    cache = make_cache(tmp_path, min_free_ratio=0.05)  # keep 5 MiB free
    refs = [make_ref(BLOCK, key=f"k{number}") for number in range(2)]
    stored(cache, refs[0], b"o" * BLOCK)
    monkeypatch.setattr(disk.time, "monotonic", lambda: 100.0)
    assert not cache.made_room_since(100.0)
    fs.free = 5 * MiB + BLOCK - 1024  # 1 KiB short for a block: the oldest file goes
    cache._free_checked_at = -1e9
    stored(cache, refs[1], b"n" * BLOCK)
    assert files_of(cache, refs[0]) == []
    assert cache.made_room_since(100.0)
    assert not cache.made_room_since(100.5)


@pytest.mark.parametrize("evicts", ["a write", "a read", "--cache-min-free"])
def test_files_evicted_are_deleted_once_the_index_lock_is_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evicts: str
) -> None:
    """The index's lock guards no file I/O: the trio thread takes it (``may_hold``), and so
    does every disk hit, which would otherwise wait for the unlinks of a whole eviction."""
    size = REGION_BLOCKS * BLOCK
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(size), bytes(size))
    one_region = probe.used_bytes
    fs = FakeFs(free=50 * MiB)
    monkeypatch.setattr(disk.os, "statvfs", fs)
    bound = 2 * one_region if evicts != "--cache-min-free" else 64 * MiB
    cache = make_cache(tmp_path / "cache", capacity=bound, min_free_ratio=0.05)
    refs = [make_ref(size, key=f"k{number}") for number in range(3)]
    for ref in refs[:2]:
        stored(cache, ref, b"o" * size)
    unlinked_under_lock: list[bool] = []
    real_unlink = os.unlink

    def unlink(path: object, *args: object, **kwargs: object) -> None:
        unlinked_under_lock.append(cache._lock.locked())
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    if evicts == "a read":  # written by a mount with a larger bound, then read here
        digest = stored(make_cache(tmp_path / "cache"), refs[2], b"n" * size)
        assert len(cache.read_run(digest, size, range(REGION_BLOCKS))) == REGION_BLOCKS
    else:
        if evicts == "--cache-min-free":
            fs.free = 5 * MiB + BLOCK  # room for less than a region
            cache._free_checked_at = -1e9
        stored(cache, refs[2], b"n" * size)
    assert files_of(cache, refs[0]) == []  # the oldest went
    assert unlinked_under_lock == [False]


def test_usage_and_clear_by_uri(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, dataset="s3://bkt/")
    for key in ("a/1", "a/2", "a", "a2.csv", "ab/1", "b/1"):
        ref = make_ref(BLOCK, key=key)
        cache.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])
    usage = disk.usage(tmp_path)
    assert usage.blocks == 6
    assert usage.by_dataset == {"s3://bkt/": usage.bytes}
    assert disk.clear(tmp_path, parse_s3_uri("s3://bkt/a/")) == 2
    assert disk.clear(tmp_path, parse_s3_uri("s3://bkt/a")) == 1  # the object a, not a2.csv
    assert disk.clear(tmp_path, parse_s3_uri("s3://bkt2")) == 0  # another bucket
    assert disk.usage(tmp_path).blocks == 3
    assert disk.clear(tmp_path) == 3
    assert disk.usage(tmp_path).bytes == 0


def test_stats_and_clear_get_past_a_region_file_whose_header_is_damaged(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    ref = make_ref(2 * BLOCK)
    stored(cache, ref, os.urandom(ref.size))
    with open(region_file(cache, ref), "r+b") as damaged:  # its block count: ~2**31 blocks
        damaged.seek(20)
        damaged.write(b"\xff\xff\xff\x7f")
    assert disk.usage(tmp_path).blocks == 0  # counted as a file with no blocks
    assert disk.clear(tmp_path) == 1


@pytest.mark.parametrize("forged", ["block count", "identity"])
def test_stats_and_clear_get_past_a_region_file_forged_with_valid_checks(
    tmp_path: Path, forged: str
) -> None:
    """Fields that pass their crc but no writer makes (test_blockcache_fuzz found the first): a
    header saying 2**32 - 1 blocks, whose table read whole asked for 64 GiB (MemoryError), and
    an identity nested deeper than ``json`` parses (RecursionError). Both failed ``cache stats``
    and ``cache clear``; reads never looked at either (the header must be the expected one)."""
    cache = make_cache(tmp_path, dataset="train")
    ref = make_ref(2 * BLOCK)
    digest = stored(cache, ref, os.urandom(ref.size))
    if forged == "block count":
        fields = blockfile._HEADER.pack(blockfile.MAGIC, blockfile.FORMAT_VERSION, 0, 0, BLOCK,
                                        2**32 - 1, bytes.fromhex(digest))
        raw, at = fields + blockfile._HEADER_CRC.pack(zlib.crc32(fields)), 0
    else:
        depth = (blockfile.IDENTITY_SIZE - blockfile._IDENTITY_HEAD.size) // 2
        body = b"[" * depth + b"]" * depth
        raw = blockfile._IDENTITY_HEAD.pack(len(body), zlib.crc32(body)) + body
        at = blockfile.HEADER_SIZE
    damage(region_file(cache, ref), at, raw)
    usage = disk.usage(tmp_path)  # what it counts of a forged table is of no matter
    assert usage.by_dataset == {"train" if forged == "block count" else "?": cache.used_bytes}
    assert disk.clear(tmp_path) == 1


def _allocated_below_fans(root: Path) -> int:
    """Disk taken by everything under the fan directories (files and directories alike)."""
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*") if p.parent != root)


def test_the_bound_holds_for_all_that_small_objects_take_on_disk(tmp_path: Path) -> None:
    """A small object is one file, all of it counted. (Format 3 added a directory and a
    meta.json per object outside the bound: objects of one block took twice the bound.)"""
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(100), os.urandom(100))
    one_object = probe.used_bytes
    assert _allocated_below_fans(probe.root) == one_object
    cache = make_cache(tmp_path / "cache", capacity=50 * one_object)
    for i in range(200):
        stored(cache, make_ref(100, key=f"small/{i}"), os.urandom(100))
    cache.sync()
    assert cache.used_bytes == 50 * one_object
    assert _allocated_below_fans(cache.root) == 50 * one_object


def test_the_index_is_bounded_and_a_partial_one_still_finds_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Millions of small objects must not be millions of index entries: past INDEX_ENTRIES the
    least recently used are forgotten (not deleted), and then every file may be on disk."""
    monkeypatch.setattr(disk, "INDEX_ENTRIES", 8)
    cache = make_cache(tmp_path)
    refs = [make_ref(100, key=f"small/{i}") for i in range(20)]
    for ref in refs:
        stored(cache, ref, bytes(100))
    assert len(cache._index) == 8
    assert cache._index.partial
    first = blockfile.object_digest(refs[0])
    assert cache.may_hold(first, range(0, 1))  # forgotten by the index, still on disk
    assert read_all(cache, refs[0], range(0, 1)) == {0: bytes(100)}
    other = make_cache(tmp_path)  # a remount: its scan indexes the newest 8
    other.sync()
    assert len(other._index) == 8
    assert other._index.partial
    assert all(len(files_of(other, ref)) == 1 for ref in refs)


def test_an_empty_run_may_be_held_whatever_the_cache_knows(tmp_path: Path) -> None:
    """Every block of an empty run is at hand (there is none): yes, as for a run of blocks a
    known region file may hold, never an IndexError."""
    cache = make_cache(tmp_path)
    ref = make_ref(4 * BLOCK)
    digest = blockfile.object_digest(ref)
    assert cache.may_hold(digest, range(0))
    assert cache.may_hold(digest, range(5, 5))
    assert not cache.may_hold(digest, range(0, 1))
    stored(cache, ref, bytes(4 * BLOCK))
    assert cache.may_hold(digest, range(3, 3))
    assert cache.may_hold(digest, range(0, 4))


def test_a_run_across_two_regions_may_be_held_when_either_region_is_known(
    tmp_path: Path,
) -> None:
    size = 2 * REGION_BLOCKS * BLOCK
    data = os.urandom(size)
    ref, cache = make_ref(size), make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    across = range(REGION_BLOCKS - 2, REGION_BLOCKS + 2)
    assert not cache.may_hold(digest, across)
    stored(cache, ref, data, REGION_BLOCKS + 1, 1)  # in its second region only
    assert cache.may_hold(digest, across)


def test_a_scan_evicts_exactly_the_oldest_files_worth_the_excess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk, "INDEX_ENTRIES", 4)  # fewer than the files: scanned, not indexed
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(100), bytes(100))
    one_object = probe.used_bytes
    writer = make_cache(tmp_path / "cache")
    refs = [make_ref(100, key=f"small/{i}") for i in range(12)]
    for age, ref in zip(range(12, 0, -1), refs, strict=True):  # refs[0] is the oldest
        stored(writer, ref, bytes(100))
        os.utime(region_file(writer, ref), (time.time() - age * 60,) * 2)
    cache = make_cache(tmp_path / "cache", capacity=5 * one_object)
    cache.sync()  # evicts 7
    present = [ref.key for ref in refs if files_of(cache, ref)]
    assert present == [f"small/{i}" for i in range(7, 12)]
    assert list(cache._index) == [disk._region_name(blockfile.object_digest(ref), 0)
                                  for ref in refs[8:]]  # the newest 4, oldest first
    assert cache._index.partial


def test_a_scan_that_evicts_indexes_exactly_the_files_it_left(tmp_path: Path) -> None:
    """The oldest files are this block size's, the excess another block size's newer files: the
    scan evicts ours, and its index holds none of them (nor counts their bytes)."""
    probe = make_cache(tmp_path / "probe")
    stored(probe, make_ref(100), bytes(100))
    one_object = probe.used_bytes
    ours = make_cache(tmp_path / "cache")
    theirs = DiskCache(tmp_path / "cache", block_size=2 * BLOCK, capacity=1 << 30)
    refs = [make_ref(100, key=f"small/{i}") for i in range(8)]
    for age, ref in zip(range(8, 0, -1), refs, strict=True):  # refs[0] is the oldest
        writer = ours if age > 5 else theirs
        digest = stored(writer, ref, bytes(100))
        path = writer.root / disk._region_name(digest, 0)
        os.utime(path, (time.time() - age * 60,) * 2)
    cache = make_cache(tmp_path / "cache", capacity=5 * one_object)
    cache.sync()  # evicts our 3
    assert [ref.key for ref in refs if files_of(cache, ref)] == []
    assert (list(cache._index), cache.used_bytes) == ([], 0)


def test_a_mounts_own_writes_before_its_first_scan_are_no_cache_over_its_bound(
    tmp_path: Path, caplog
) -> None:
    """The first scan warns of a cache that held more than the mount's bound before it (other
    datasets' blocks are evicted too), not of what the mount wrote itself before that scan:
    another mount's files and this one's are over the bound together, each alone is not."""
    other, cache = (make_cache(tmp_path, capacity=16 * BLOCK) for _ in range(2))
    refs = [make_ref(BLOCK, key=f"k{number}") for number in range(12)]
    for writer, ref in zip([other] * 6 + [cache] * 6, refs, strict=True):
        stored(writer, ref, os.urandom(BLOCK))
    assert other.used_bytes + cache.used_bytes > cache.capacity >= other.used_bytes
    with caplog.at_level(logging.WARNING, "s3datafs.cache.disk"):
        cache.sync()
    assert "more than this mount's bound" not in caplog.text


def test_a_region_file_that_is_a_symlink_is_never_followed(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "cache")
    ref = make_ref(100)
    path = region_file(cache, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "elsewhere"
    path.symlink_to(target)
    too_many_links = os.strerror(errno.ELOOP)  # O_NOFOLLOW's answer; the reader warns, reads S3
    with pytest.raises(OSError, match=too_many_links):
        stored(cache, ref, bytes(100))
    assert not target.exists()
    with pytest.raises(OSError, match=too_many_links):
        read_all(cache, ref, range(0, 1))


def test_the_bound_is_the_directorys_whatever_block_sizes_share_it(tmp_path: Path) -> None:
    """Two mounts (or a mount and a prefetch) with another --block-size on one --cache-dir."""
    region = REGION_BLOCKS * BLOCK
    small = make_cache(tmp_path, capacity=4 * region)
    large = DiskCache(tmp_path, block_size=2 * BLOCK, capacity=4 * region)
    for i in range(3):
        stored(small, make_ref(region, key=f"small/{i}"), os.urandom(region))
        time.sleep(0.01)  # distinct mtimes: the oldest go first, whichever size they are
        ref, data = make_ref(region, key=f"large/{i}"), os.urandom(region)
        blocks = [data[at : at + 2 * BLOCK] for at in range(0, region, 2 * BLOCK)]
        large.write(ref, blockfile.object_digest(ref), 0, blocks)
    large.sync()
    assert disk.usage(tmp_path).bytes <= 4 * region + 6 * LAYOUT.table_size
    assert files_of(small, make_ref(region, key="small/0")) == []  # the oldest of all
    newest = make_ref(region, key="large/2")
    assert len(read_all(large, newest, range(REGION_BLOCKS // 2))) == REGION_BLOCKS // 2
    assert len(read_all(small, make_ref(region, key="small/2"), range(REGION_BLOCKS))) == \
        REGION_BLOCKS


def test_every_region_file_names_its_object_and_dataset(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, dataset="train")
    ref = make_ref(REGION_BLOCKS * BLOCK + BLOCK, key="dir/ünïcode \udcff\x01 key")
    stored(cache, ref, os.urandom(ref.size))
    for region in (0, 1):
        head = region_file(cache, ref, region).read_bytes()[: blockfile.TABLE_OFFSET]
        assert blockfile.parse_identity(head) == {
            "bucket": "bkt",
            "key": ref.key,
            "version_id": "v1",
            "etag": '"etag"',
            "size": ref.size,
            "dataset": "train",
        }


def test_an_identity_too_long_is_shortened_and_says_so() -> None:
    ref = make_ref(1, key="k/" + "\x01" * 1022)  # JSON escapes each control byte in 6 bytes
    record = blockfile.identity(ref, "d" * 900)
    assert len(record) <= blockfile.IDENTITY_SIZE
    fields = blockfile.parse_identity(bytes(blockfile.HEADER_SIZE) + record)
    assert fields is not None
    assert fields["truncated"] is True
    assert ref.key.startswith(fields["key"])
    assert len(fields["key"]) >= 2
    assert fields["bucket"] == "bkt"
    assert fields["etag"] == '"etag"'


def test_a_damaged_identity_changes_what_stats_say_never_the_blocks(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, dataset="train")
    ref = make_ref(2 * BLOCK)
    data = os.urandom(ref.size)
    stored(cache, ref, data)
    damage(region_file(cache, ref), blockfile.HEADER_SIZE + 12)  # a byte of the JSON
    assert disk.usage(tmp_path).by_dataset == {"?": cache.used_bytes}
    assert read_all(cache, ref, range(0, 2)) == {0: data[:BLOCK], 1: data[BLOCK:]}
    assert disk.clear(tmp_path, parse_s3_uri("s3://bkt/")) == 0  # unknown: kept (clear takes it)
    assert disk.clear(tmp_path) == 1


def test_clear_by_uri_takes_an_object_whose_shortened_key_may_be_under_it(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, dataset="d" * 1500)
    long_key = "a/" + "x" * 1000
    refs = [make_ref(BLOCK, key=long_key), make_ref(BLOCK, key="b/1")]
    for ref in refs:
        stored(cache, ref, os.urandom(BLOCK))
    assert disk.clear(tmp_path, parse_s3_uri(f"s3://bkt/{long_key}")) == 1
    assert files_of(cache, refs[0]) == []
    assert files_of(cache, refs[1]) == ["r0"]


@pytest.mark.parametrize("min_free", [0.0, 0.0001], ids=["no-min-free", "min-free"])
def test_a_cache_directory_removed_meanwhile_is_made_again_by_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_free: float
) -> None:
    monkeypatch.setattr(disk, "_FREE_CHECK_SECONDS", 0.0)  # --cache-min-free looks every time
    cache = make_cache(tmp_path / "cache", min_free_ratio=min_free)
    stored(cache, make_ref(BLOCK, key="before"), b"b" * BLOCK)
    shutil.rmtree(tmp_path / "cache")  # rm -rf while mounted
    after = make_ref(BLOCK, key="after")
    stored(cache, after, b"a" * BLOCK)
    assert read_all(cache, after, range(1)) == {0: b"a" * BLOCK}
    cache.sync()
    assert cache.used_bytes > 0


def test_min_free_checks_the_filesystem_at_most_once_a_second_while_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_statvfs, checks = os.statvfs, []
    monkeypatch.setattr(os, "statvfs", lambda path: checks.append(path) or real_statvfs(path))
    cache = make_cache(tmp_path, min_free_ratio=0.0001)
    for i in range(50):
        ref = make_ref(BLOCK, key=f"k{i}")
        cache.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])
    assert len(checks) == 1
    full = make_cache(tmp_path / "full", min_free_ratio=1.0)  # no room: checked every time
    for i in range(3):
        ref = make_ref(BLOCK, key=f"k{i}")
        with pytest.raises(OSError, match="free on the cache filesystem"):
            full.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])
    assert len(checks) == 4


# -- the writes themselves (cache.files) -----------------------------------------------------------


def test_a_buffered_write_the_kernel_takes_in_pieces_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pwritev may write less than it was given, even part of a part: the rest follows from
    there. More parts than one call takes (IOV_MAX) and nothing at all are writes too."""
    real_pwritev, calls = os.pwritev, []

    def short_pwritev(fd: int, parts: list, offset: int) -> int:  # 4 bytes at most per call
        calls.append(offset)
        assert len(calls) <= 3, "the same bytes written again and again"
        return real_pwritev(fd, [b"".join(bytes(part) for part in parts)[:4]], offset)

    with open(tmp_path / "f", "w+b") as f:
        monkeypatch.setattr(os, "pwritev", short_pwritev)
        files.pwrite_all(f.fileno(), [b"abc", b"", b"defgh", b"ij"], 0)
        monkeypatch.undo()
        assert os.pread(f.fileno(), 100, 0) == b"abcdefghij"
        files.pwrite_all(f.fileno(), [b"", b""], 10)
        many = [bytes([i % 256]) for i in range(files._IOV_MAX + 10)]
        files.pwrite_all(f.fileno(), many, 10)
        assert os.pread(f.fileno(), len(many) + 100, 10) == b"".join(many)


def test_a_direct_write_is_padded_with_zeros_to_a_page_and_no_further(tmp_path: Path) -> None:
    """The padding never carries bytes of an earlier write through the reused buffer."""
    buffers = files.AlignedBuffers(keep=1)
    page = mmap.PAGESIZE
    with open(tmp_path / "a", "w+b") as a, open(tmp_path / "b", "w+b") as b:
        files.pwrite_direct(a.fileno(), [b"\xff" * page, b"\xff" * page], 0, buffers)
        assert os.fstat(a.fileno()).st_size == 2 * page  # whole pages: no padding
        files.pwrite_direct(b.fileno(), [b"ok"], 0, buffers)
        assert os.pread(b.fileno(), 2 * page, 0) == b"ok" + bytes(page - 2)


def test_a_short_direct_write_is_an_error_not_a_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, data[:-1], offset))
    with open(tmp_path / "f", "w+b") as f, pytest.raises(OSError, match="short write"):
        files.pwrite_direct(f.fileno(), [b"x" * 100], 0, files.AlignedBuffers())


def test_buffers_given_back_beyond_keep_are_released() -> None:
    buffers = files.AlignedBuffers(size=1000, keep=2)
    taken = [buffers.take() for _ in range(3)]
    assert {len(buffer) for buffer in taken} == {mmap.PAGESIZE}  # rounded up to a page
    for buffer in taken:
        buffers.give(buffer)
    assert [buffer.closed for buffer in taken] == [False, False, True]
    assert buffers.take() is taken[1]  # the kept ones are used again
