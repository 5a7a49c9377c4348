"""The block reader under chaos: concurrent random reads, failing GETs, cancelled readers, timeouts.

Each case draws (from its seed) objects with short last blocks, a memory LRU from nothing to
roomy, tight or roomy prefetch and write budgets, small region files (runs cross regions), one to
four S3 connections, a slow link (waited runs split in two flights) and sometimes a read timeout
shorter than a GET. Readers with and without readahead read at random offsets while 10 % of the
GETs fail and some readers are cancelled mid-read. Every byte a read returns must be the
reference's; once the storm is over, no flight, budget or counter may be left behind, and every
object must read back whole and exact.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import trio
from fakes import FakeSource

from s3datafs.cache import disk as disk_module
from s3datafs.cache.disk import DiskCache
from s3datafs.errors import TransientS3Error
from s3datafs.linkrate import MIN_SAMPLES, LinkRate
from s3datafs.model import ObjectRef
from s3datafs.prefetch import Readahead
from s3datafs.reader import BlockReader, ByteBudget

BUCKET = "b"


class FlakySource(FakeSource):
    """GETs that take 0-2 ms and fail (transiently) with probability ``failing``."""

    def __init__(self, rng: random.Random, failing: float) -> None:
        super().__init__()
        self.failing = failing
        self._rng = rng
        self._rng_lock = threading.Lock()  # GETs run in worker threads

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        with self._rng_lock:
            fails, delay = self._rng.random() < self.failing, self._rng.random() * 0.002
        time.sleep(delay)
        if fails:
            raise TransientS3Error("injected")
        return super().get_range(ref, start, end)


def slow_link() -> LinkRate:
    link = LinkRate()
    for _ in range(MIN_SAMPLES):
        link.end(link.begin(), 1 << 20, (1 << 20) / 100e6)  # 100 MB/s: slow
    return link




async def read_checked(reader: BlockReader, ref: ObjectRef, data: bytes, offset: int,
                       length: int, readahead: Readahead | None, wrong: list[str]) -> None:
    """One read of ``ref`` (whose bytes are ``data``): a failure is an answer, wrong bytes
    never are (noted in ``wrong``)."""
    try:
        got = await reader.read(ref, offset, length, readahead)
    except TransientS3Error:
        return
    if got != data[offset : offset + length]:
        wrong.append(f"{ref.key} [{offset}, +{length}) of {len(data)}")

def assert_settled(reader: BlockReader, prefetch_budget: ByteBudget) -> None:
    """Once everything has landed: no flight, nobody waiting, the write budget whole, and the
    prefetch budget holding exactly the readahead staged and not read yet."""
    assert reader._inflight == {}
    assert reader._abandoned == 0  # every GET given up on has ended, and counted its end
    assert reader._writes._waited_flights == 0
    assert reader._writes._write_waiting == 0
    assert reader._writes._write_budget.used == 0
    assert prefetch_budget.used == sum(len(block) for block, _ in reader._staged.values())

@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("with_disk", [False, True], ids=["memory", "disk"])
def test_random_reads_under_faults_and_cancellation_are_exact_and_leave_nothing_behind(
    tmp_path, monkeypatch: pytest.MonkeyPatch, seed: int, with_disk: bool
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(disk_module, "REGION_BYTES", rng.choice([3, 5, 7, 2048]) * 4096)
    block = 4096 if with_disk else 16  # the disk cache's slots are whole pages
    source = FlakySource(rng, failing=0.1)
    source.create_bucket(BUCKET)
    objects: dict[ObjectRef, bytes] = {}
    for number in range(3):
        size = max(1, rng.randint(1, 40) * block - rng.choice([0, 0, 1, block // 2, block - 1]))
        data = rng.randbytes(size)
        objects[source.put(BUCKET, f"o{number}", data)] = data
    prefetch_budget = ByteBudget(rng.choice([4, 8, 64]) * block)
    write_budget = ByteBudget(rng.choice([1, 4, 64]) * block)
    reader = BlockReader(
        source, block_size=block, memory_cache_bytes=rng.choice([0, 3, 64]) * block,
        s3_limiter=trio.CapacityLimiter(rng.choice([1, 2, 4])),
        disk=DiskCache(tmp_path, block_size=block, capacity=1 << 30) if with_disk else None,
        max_request_bytes=rng.choice([2, 3, 5, 8]) * block, prefetch_budget=prefetch_budget,
        write_budget=write_budget, link=slow_link(), split_bytes=rng.choice([2, 3, 4]) * block,
        read_timeout=rng.choice([None, None, 0.0015, 0.004]),
    )
    wrong: list[str] = []

    async def one_reader() -> None:
        ref = rng.choice(list(objects))
        data = objects[ref]
        readahead = Readahead(initial=2 * block, maximum=8 * block) if rng.random() < 0.5 else None
        offset = rng.randint(0, len(data))
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                offset = rng.randint(0, len(data) + 5)
            length = rng.randint(1, 12 * block)
            with trio.move_on_after(rng.choice([1e9, 1e9, 0.001, 0.003])):  # some are cancelled
                await read_checked(reader, ref, data, offset, length, readahead, wrong)
            offset += length

    async def storm() -> None:
        async with trio.open_nursery() as writes, trio.open_nursery() as tasks:
            reader.attach(tasks, writes)
            async with trio.open_nursery() as readers:
                for _ in range(rng.randint(2, 10)):
                    readers.start_soon(one_reader)
            with trio.fail_after(20):  # what readers started in the background lands
                while reader._inflight:
                    await next(iter(reader._inflight.values())).done.wait()
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
                # GETs given up on (read_timeout) end in their own time, and their threads give
                # their S3 connection slots back through this trio run: a slot still held when
                # it ends is held for good, and with one connection read_back below waited for
                # it for good (a GET that outlived the 0.05 s above, as a loaded machine makes).
                while reader._s3_limiter.borrowed_tokens:  # noqa: ASYNC110 - threads end it
                    await trio.sleep(0.01)
            tasks.cancel_scope.cancel()

    trio.run(storm)
    assert wrong == []
    assert_settled(reader, prefetch_budget)

    source.failing = 0.0
    reader._read_timeout = None
    reader._failed.clear()

    async def read_back() -> None:
        # trio's bound, as the per-test alarm leaves trio runs alone: a hang here ended the
        # whole run after four minutes, by the watchdog (conftest.time_limit)
        with trio.fail_after(20):
            async with trio.open_nursery() as tasks:
                reader.attach(tasks)
                for ref, data in objects.items():
                    assert await reader.read(ref, 0, ref.size) == data
                tasks.cancel_scope.cancel()

    trio.run(read_back)
