"""The persistent block cache: format, chunking, verification, eviction, sweeping, sharing."""

from __future__ import annotations

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
    size = CHUNK_BLOCKS * BLOCK * 2 + 3 * BLOCK + 100  # two chunks and a short tail chunk
    data = os.urandom(size)
    ref = make_ref(size)
    cache = make_cache(tmp_path)
    digest = blockfile.object_digest(ref)
    cache.write(ref, digest, 0, blocks_of(data))
    assert files_of(cache, ref) == ["c0", "c1", "c2", "meta.json"]
    found = cache.read_run(digest, size, range(0, len(blocks_of(data))))
    assert b"".join(found[i] for i in sorted(found)) == data

    lone = make_ref(size, key="lone")
    lone_digest = blockfile.object_digest(lone)
    cache.write(lone, lone_digest, 5, [data[5 * BLOCK : 6 * BLOCK]])  # a random read's block
    assert files_of(cache, lone) == ["5", "meta.json"]
    assert cache.read_run(lone_digest, size, range(5, 6)) == {5: data[5 * BLOCK : 6 * BLOCK]}
    assert cache.read_run(lone_digest, size, range(4, 6)) == {}  # stops at the first miss


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
    path = cache.root / digest[:2] / digest / "c0"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:  # a whole valid file of another object renamed into place
        other_digest = blockfile.object_digest(other)
        path.write_bytes((cache.root / other_digest[:2] / other_digest / "c0").read_bytes())
    assert cache.read_run(digest, size, range(0, 1)) == {}
    assert not path.exists()


def test_eviction_is_lru_by_bytes_and_deletes_files(tmp_path: Path) -> None:
    chunk_file = blockfile.HEADER_SIZE + disk.CHUNK_BYTES
    cache = make_cache(tmp_path, capacity=3 * chunk_file)
    refs = [make_ref(disk.CHUNK_BYTES, key=f"k{i}") for i in range(4)]
    payload = blocks_of(os.urandom(disk.CHUNK_BYTES))
    for ref in refs[:3]:
        cache.write(ref, blockfile.object_digest(ref), 0, payload)
    cache.read_run(blockfile.object_digest(refs[0]), disk.CHUNK_BYTES, range(0, 1))  # k0 is hot
    cache.write(refs[3], blockfile.object_digest(refs[3]), 0, payload)  # evicts k1, the coldest
    assert cache.used_bytes == 3 * chunk_file
    present = {r.key for r in refs if "c0" in files_of(cache, r)}
    assert present == {"k0", "k2", "k3"}


def test_sync_counts_files_of_others_and_sweeps_dead_temps(tmp_path: Path) -> None:
    chunk_file = blockfile.HEADER_SIZE + disk.CHUNK_BYTES
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
    on_disk = sorted(p.parent.name for p in first.root.rglob("c0"))
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
    reader = make_cache(tmp_path, capacity=8 * disk.CHUNK_BYTES + 8 * blockfile.HEADER_SIZE)
    reader.sync()
    for i in range(6):
        ref = make_ref(disk.CHUNK_BYTES, key=f"shared{i}")
        found = reader.read_run(blockfile.object_digest(ref), ref.size, range(0, CHUNK_BLOCKS))
        if found:  # present: whole, and all of one writer's bytes, never a mix
            data = b"".join(found[j] for j in range(CHUNK_BLOCKS))
            assert data in (bytes([1]) * ref.size, bytes([2]) * ref.size)
    assert not list(tmp_path.rglob(".tmp.*"))
    assert reader.used_bytes <= 8 * (disk.CHUNK_BYTES + blockfile.HEADER_SIZE)


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
