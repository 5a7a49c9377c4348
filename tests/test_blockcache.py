"""The persistent block cache: format, chunking, verification, eviction, sweeping, sharing."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from s3datafs.cache import blockfile, disk
from s3datafs.cache.disk import DiskCache
from s3datafs.model import ObjectRef

BLOCK = 4096
CHUNK_BLOCKS = disk.CHUNK_BYTES // BLOCK
BIG_BLOCKS = disk.BIG_CHUNK_BYTES // BLOCK


def file_size(payload: int) -> int:
    """Bytes on disk of a cache file holding ``payload`` bytes of blocks."""
    return blockfile.head_size(payload, BLOCK) + payload


def make_ref(size: int, key: str = "k", version: str | None = "v1") -> ObjectRef:
    return ObjectRef("bkt", key, version, '"etag"', size, 0.0)


def blocks_of(data: bytes) -> list[bytes]:
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def make_cache(tmp_path: Path, capacity: int = 64 * 1024 * 1024, **kwargs) -> DiskCache:
    return DiskCache(tmp_path, block_size=BLOCK, capacity=capacity, **kwargs)


def files_of(cache: DiskCache, ref: ObjectRef) -> list[str]:
    digest = blockfile.object_digest(ref)
    return sorted(p.name for p in (cache.root / digest[:2] / digest).iterdir())


def test_blockfile_round_trip_and_every_mismatch_is_a_miss() -> None:
    digest = "ab" * 32
    encoded = blockfile.encode(digest, 7, b"payload")
    assert blockfile.decode(encoded, digest, 7, 7) == b"payload"
    assert blockfile.decode(encoded, "cd" * 32, 7, 7) is None  # another object
    assert blockfile.decode(encoded, digest, 8, 7) is None  # another block
    assert blockfile.decode(encoded, digest, 7, 6) is None  # unexpected length
    assert blockfile.decode(encoded[:-1], digest, 7, 7) is None  # truncated
    flipped = encoded[:-1] + bytes([encoded[-1] ^ 1])
    assert blockfile.decode(flipped, digest, 7, 7) is None  # corrupted payload


def test_digest_names_the_pinned_version() -> None:
    assert blockfile.object_digest(make_ref(1)) == blockfile.object_digest(make_ref(1))
    assert blockfile.object_digest(make_ref(1)) != blockfile.object_digest(
        make_ref(1, version="v2")
    )
    assert blockfile.object_digest(make_ref(1)) != blockfile.object_digest(make_ref(1, key="x"))


def test_write_then_read_whole_chunks_and_single_blocks(tmp_path: Path) -> None:
    size = (BIG_BLOCKS + CHUNK_BLOCKS * 2 + 3) * BLOCK + 100  # a big chunk, then a short one
    data = os.urandom(size)
    blocks = len(blocks_of(data))
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data))  # readahead: whole big chunks, one file each
    assert files_of(cache, ref) == ["C0", "C1", "meta.json"]
    found = cache.read_run(digest, size, range(0, blocks))
    assert b"".join(found[i] for i in sorted(found)) == data
    part = cache.read_run(digest, size, range(300, 302))  # only the blocks asked for are read
    assert part == {300: data[300 * BLOCK : 301 * BLOCK], 301: data[301 * BLOCK : 302 * BLOCK]}
    tail = cache.read_run(digest, size, range(blocks - 2, blocks + 5))  # clamped to the object
    assert b"".join(tail.values()) == data[(blocks - 2) * BLOCK :]

    mid = make_ref(size, key="mid")  # a 1 MiB read not at a big chunk's start: chunk files
    mid_digest = blockfile.object_digest(mid)
    run = blocks_of(data)[CHUNK_BLOCKS : 3 * CHUNK_BLOCKS + 2]
    cache.write(mid, mid_digest, CHUNK_BLOCKS, run)
    ends = [str(3 * CHUNK_BLOCKS), str(3 * CHUNK_BLOCKS + 1)]
    assert files_of(cache, mid) == [*ends, "c1", "c2", "meta.json"]
    found = cache.read_run(mid_digest, size, range(CHUNK_BLOCKS, blocks))
    assert sorted(found) == list(range(CHUNK_BLOCKS, 3 * CHUNK_BLOCKS + 2))

    lone = make_ref(size, key="lone")
    lone_digest = blockfile.object_digest(lone)
    cache.write(lone, lone_digest, 5, [data[5 * BLOCK : 6 * BLOCK]])  # a random read's block
    assert files_of(cache, lone) == ["5", "meta.json"]
    assert cache.read_run(lone_digest, size, range(5, 6)) == {5: data[5 * BLOCK : 6 * BLOCK]}
    assert cache.read_run(lone_digest, size, range(4, 6)) == {}  # stops at the first miss


@pytest.mark.parametrize("refuse", [False, True])
def test_files_are_exact_with_o_direct_and_where_a_filesystem_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse: bool
) -> None:
    real_open, direct = os.open, getattr(os, "O_DIRECT", 0)
    opened_direct = []

    def fake_open(path, flags, *args):  # a filesystem without O_DIRECT (tmpfs before 6.6)
        if flags & direct:
            opened_direct.append(path)
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", fake_open)
    size = CHUNK_BLOCKS * BLOCK + 3 * BLOCK + 100  # a chunk, then an odd-sized tail chunk
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data)[:CHUNK_BLOCKS])
    cache.write(ref, digest, CHUNK_BLOCKS, blocks_of(data)[CHUNK_BLOCKS:])
    assert len(opened_direct) == (1 if refuse else 2)  # refused once, then buffered
    split = CHUNK_BLOCKS * BLOCK
    for name, length in [("c0", split), ("c1", size - split)]:
        path = cache.root / digest[:2] / digest / name
        assert path.stat().st_size == file_size(length)  # the padding is cut off
    found = cache.read_run(digest, size, range(0, len(blocks_of(data))))
    assert b"".join(found[i] for i in sorted(found)) == data
    assert not list(tmp_path.rglob(".tmp.*"))


def test_a_file_larger_than_the_write_buffer_is_written_in_pieces(tmp_path: Path) -> None:
    size = BIG_BLOCKS * BLOCK - 100  # one big chunk file, 8 buffers' worth, odd-sized
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data))
    assert files_of(cache, ref) == ["C0", "meta.json"]
    assert (cache.root / digest[:2] / digest / "C0").stat().st_size == file_size(size)
    found = cache.read_run(digest, size, range(0, BIG_BLOCKS))
    assert b"".join(found[i] for i in sorted(found)) == data


def test_a_run_not_covering_its_chunk_is_stored_as_blocks(tmp_path: Path) -> None:
    size = CHUNK_BLOCKS * BLOCK * 2
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, CHUNK_BLOCKS - 2, blocks_of(data)[CHUNK_BLOCKS - 2 :])
    assert files_of(cache, ref) == [str(CHUNK_BLOCKS - 2), str(CHUNK_BLOCKS - 1), "c1", "meta.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "swap"])
def test_corrupt_files_are_misses_and_are_deleted(tmp_path: Path, damage: str) -> None:
    size = CHUNK_BLOCKS * BLOCK
    data = os.urandom(size)
    ref, other = make_ref(size), make_ref(size, key="other")
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data))
    cache.write(other, blockfile.object_digest(other), 0, blocks_of(os.urandom(size)))
    path = cache.root / digest[:2] / digest / "C0"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:  # a whole valid file of another object renamed into place
        other_digest = blockfile.object_digest(other)
        path.write_bytes((cache.root / other_digest[:2] / other_digest / "C0").read_bytes())
    assert cache.read_run(digest, size, range(0, CHUNK_BLOCKS)) == {}
    assert not path.exists()


def test_a_partial_read_verifies_what_it_serves(tmp_path: Path) -> None:
    size = CHUNK_BLOCKS * BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data))
    path = cache.root / digest[:2] / digest / "C0"
    raw = bytearray(path.read_bytes())
    raw[blockfile.head_size(size, BLOCK) + 5 * BLOCK + 7] ^= 0xFF  # damage block 5 only
    path.write_bytes(bytes(raw))
    assert cache.read_run(digest, size, range(0, 2)) == {
        0: data[:BLOCK],
        1: data[BLOCK : 2 * BLOCK],
    }
    assert cache.read_run(digest, size, range(4, 6)) == {}  # block 4 is fine, but in a bad file
    assert not path.exists()


def test_a_file_of_the_previous_format_is_a_quiet_miss(tmp_path: Path, caplog) -> None:
    size = BLOCK
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, [data])
    path = cache.root / digest[:2] / digest / "C0"
    old = bytearray(path.read_bytes())
    old[4:6] = (1).to_bytes(2, "little")  # format version 1
    path.write_bytes(bytes(old))
    with caplog.at_level("INFO"):
        assert cache.read_run(digest, size, range(0, 1)) == {}
    assert "another format version" in caplog.text
    assert "corrupt" not in caplog.text
    assert not path.exists()


def test_eviction_is_lru_by_bytes_and_deletes_files(tmp_path: Path) -> None:
    chunk_file = file_size(disk.CHUNK_BYTES)
    cache = make_cache(tmp_path, capacity=3 * chunk_file)
    refs = [make_ref(disk.CHUNK_BYTES, key=f"k{i}") for i in range(4)]
    payload = blocks_of(os.urandom(disk.CHUNK_BYTES))
    for ref in refs[:3]:
        cache.write(ref, blockfile.object_digest(ref), 0, payload)
    cache.read_run(blockfile.object_digest(refs[0]), disk.CHUNK_BYTES, range(0, 1))  # k0 is hot
    cache.write(refs[3], blockfile.object_digest(refs[3]), 0, payload)  # evicts k1, the coldest
    assert cache.used_bytes == 3 * chunk_file
    present = {r.key for r in refs if "C0" in files_of(cache, r)}
    assert present == {"k0", "k2", "k3"}


def test_sync_counts_files_of_others_and_sweeps_dead_temps(tmp_path: Path) -> None:
    chunk_file = file_size(disk.CHUNK_BYTES)
    first = make_cache(tmp_path, capacity=2 * chunk_file)
    second = make_cache(tmp_path, capacity=2 * chunk_file)
    payload = blocks_of(os.urandom(disk.CHUNK_BYTES))
    refs = [make_ref(disk.CHUNK_BYTES, key=f"k{i}") for i in range(3)]
    for ref in refs:  # three files through two caches: each one alone is within its bound
        cache = first if ref.key != "k2" else second
        cache.write(ref, blockfile.object_digest(ref), 0, payload)
        time.sleep(0.01)
    digest = blockfile.object_digest(refs[0])
    stale_temp = first.root / digest[:2] / digest / ".tmp.999999999.1.c5"
    stale_temp.write_bytes(b"half a block")
    first.sync()
    assert not stale_temp.exists()
    assert first.used_bytes == 2 * chunk_file
    on_disk = sorted(p.parent.name for p in first.root.rglob("C0"))
    assert len(on_disk) == 2  # the oldest file (k0) went


def _hammer(cache_dir: str, seed: int) -> None:
    cache = DiskCache(Path(cache_dir), block_size=BLOCK, capacity=8 * disk.CHUNK_BYTES)
    payload = blocks_of(bytes([seed]) * disk.CHUNK_BYTES)
    for i in range(12):
        ref = make_ref(disk.CHUNK_BYTES, key=f"shared{i % 6}")  # both processes write these
        cache.write(ref, blockfile.object_digest(ref), 0, [bytes(p) for p in payload])
        cache.read_run(blockfile.object_digest(ref), disk.CHUNK_BYTES, range(0, CHUNK_BLOCKS))
    cache.sync()


def test_two_processes_share_a_cache_without_torn_blocks(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_hammer, args=(str(tmp_path), s)) for s in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    reader = make_cache(tmp_path, capacity=8 * file_size(disk.CHUNK_BYTES))
    reader.sync()
    for i in range(6):
        ref = make_ref(disk.CHUNK_BYTES, key=f"shared{i}")
        found = reader.read_run(blockfile.object_digest(ref), ref.size, range(0, CHUNK_BLOCKS))
        if found:  # present: whole, and all of one writer's bytes, never a mix
            data = b"".join(found[j] for j in range(CHUNK_BLOCKS))
            assert data in (bytes([1]) * ref.size, bytes([2]) * ref.size)
    assert not list(tmp_path.rglob(".tmp.*"))
    assert reader.used_bytes <= 8 * file_size(disk.CHUNK_BYTES)


def test_min_free_refuses_to_fill_the_filesystem(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, min_free_ratio=1.0)  # nothing may be written
    ref = make_ref(BLOCK)
    with pytest.raises(OSError, match="free on the cache filesystem"):
        cache.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])


def test_usage_and_clear_by_uri(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, dataset="s3://bkt/")
    for key in ("a/1", "a/2", "b/1"):
        ref = make_ref(BLOCK, key=key)
        cache.write(ref, blockfile.object_digest(ref), 0, [b"x" * BLOCK])
    usage = disk.usage(tmp_path)
    assert usage.blocks == 3
    assert usage.by_dataset == {"s3://bkt/": usage.bytes}
    assert disk.clear(tmp_path, "s3://bkt/a/") == 2
    assert disk.usage(tmp_path).blocks == 1
    assert disk.clear(tmp_path) == 1
    assert disk.usage(tmp_path).bytes == 0
