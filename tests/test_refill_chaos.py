"""Chaos for the refill (``writebehind``; a review, session 26): a slow cache disk leaves runs
uncached, refills cache them later, files are opened and closed around their readers, S3 fails
10 % of GETs.

Every byte must be the reference's; once quiet, budgets are whole, the refill queue is empty and
every block S3 sent is on disk (the cache is large enough for all of it).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import trio
from test_reader_chaos import FlakySource, assert_settled, read_checked

from s3datafs import writebehind
from s3datafs.cache import disk as disk_module
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache
from s3datafs.model import ObjectRef
from s3datafs.prefetch import Readahead
from s3datafs.reader import BlockReader, ByteBudget

BUCKET = "b"
BLOCK = 4096


class JitteryDisk(DiskCache):
    """Writes take 0-``slowest`` seconds (a disk that falls behind now and then)."""

    slowest = 0.004

    def __init__(self, *args, rng: random.Random, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng, self._lock = rng, threading.Lock()

    def write(self, *args, **kwargs) -> None:
        with self._lock:
            delay = self._rng.random() * self.slowest
        time.sleep(delay)
        super().write(*args, **kwargs)


class RecordingSource(FlakySource):
    def __init__(self, rng: random.Random, failing: float) -> None:
        super().__init__(rng, failing)
        self.served: set[tuple[ObjectRef, int]] = set()
        self.served_bytes = 0

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        data = super().get_range(ref, start, end)
        with self._rng_lock:
            self.served.update((ref, i) for i in range(start // BLOCK, -(-end // BLOCK)))
            self.served_bytes += len(data)
        return data


@pytest.mark.parametrize("seed", range(8))
def test_refills_and_closed_readahead_under_chaos(tmp_path, monkeypatch, seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(disk_module, "REGION_BYTES", rng.choice([3, 5, 16, 2048]) * BLOCK)
    monkeypatch.setattr(writebehind, "_REFILL_BACKOFF", 0.05)
    # A refill looks for room every _REFILL_POLL (0.2 s): with 40-170 runs to refill, those
    # looks were 90 % of the test's time. Looked for oftener, the same refills happen.
    monkeypatch.setattr(writebehind, "_REFILL_POLL", 0.01)
    # S3 fails here at random, not one run it keeps refusing (that giving up: test_refill)
    monkeypatch.setattr(writebehind, "_REFILL_TRIES", 1000)
    monkeypatch.setattr("s3datafs.reader.ONE_HOP_BYTES", rng.choice([BLOCK, 3 * BLOCK]))
    source = RecordingSource(rng, failing=0.1)
    source.create_bucket(BUCKET)
    objects: dict[ObjectRef, bytes] = {}
    for number in range(4):
        size = max(1, rng.randint(1, 120) * BLOCK - rng.choice([0, 1, BLOCK // 2, BLOCK - 1]))
        data = rng.randbytes(size)
        objects[source.put(BUCKET, f"o{number}", data)] = data
    disk = JitteryDisk(tmp_path, block_size=BLOCK, capacity=1 << 30, rng=rng)
    prefetch_budget = ByteBudget(rng.choice([8, 16, 64]) * BLOCK)
    request = rng.choice([2, 4, 8, 16]) * BLOCK
    reader = BlockReader(
        source, block_size=BLOCK, memory_cache_bytes=rng.choice([0, 8, 64]) * BLOCK,
        s3_limiter=trio.CapacityLimiter(rng.choice([1, 2, 4])), disk=disk,
        disk_limiter=trio.CapacityLimiter(rng.choice([1, 2])),
        max_request_bytes=request, prefetch_budget=prefetch_budget,
        write_budget=ByteBudget(request),
    )
    behind = reader._writes
    write_budget = behind._write_budget
    wrong: list[str] = []

    async def one_reader() -> None:
        ref = rng.choice(list(objects))
        data = objects[ref]
        reader.opened(ref)
        try:
            readahead = Readahead(initial=2 * BLOCK, maximum=16 * BLOCK)
            offset = 0 if rng.random() < 0.5 else rng.randint(0, len(data))
            for _ in range(rng.randint(1, 10)):
                if rng.random() < 0.3:
                    offset = rng.randint(0, len(data))
                length = rng.randint(1, 20 * BLOCK)
                with trio.move_on_after(rng.choice([1e9, 1e9, 1e9, 0.002])):
                    await read_checked(reader, ref, data, offset, length, readahead, wrong)
                offset += length
        finally:
            reader.closed(ref)

    async def storm() -> None:
        async with trio.open_nursery() as writes, trio.open_nursery() as tasks:
            reader.attach(tasks, writes)
            async with trio.open_nursery() as readers:
                for _ in range(rng.randint(4, 16)):
                    readers.start_soon(one_reader)
                    await trio.sleep(rng.random() * 0.003)
            source.failing = 0.0
            with trio.fail_after(60):  # readahead lands, writes end, refills end
                while (reader._inflight or behind._skipped or behind._refilling  # noqa: ASYNC110
                       or behind._write_waiting or write_budget.used
                       or behind._write_reserve.used):
                    await trio.sleep(0.02)
                await trio.sleep(0.05)
            tasks.cancel_scope.cancel()

    trio.run(storm)
    assert wrong == []
    assert_settled(reader, prefetch_budget)
    # every block S3 sent ends on disk: written behind, or refilled later
    missing = []
    for ref in objects:
        blocks = -(-ref.size // BLOCK)
        held = disk.read_run(object_digest(ref), ref.size, range(blocks))
        # read_run gives the ends only: check block by block
        for index in range(blocks):
            if ((ref, index) in source.served and index not in held
                    and not disk.read_run(object_digest(ref), ref.size, range(index, index + 1))):
                missing.append((ref.key, index))
    assert missing == [], f"{len(missing)} blocks S3 sent are not cached: {missing[:10]}"
