"""Block-aligned reads of pinned objects: memory cache, single-flight, coalesced ranged GETs.

Design:
- An object is read in fixed blocks of ``block_size`` bytes (the last one may be short). A read of
  ``[offset, offset + length)`` is served from the blocks it spans.
- Blocks live in a byte-counted LRU (``cachetools.LRUCache`` with ``getsizeof=len``). It is safe to
  cache forever because a block is keyed by the pinned ``ObjectRef`` (bucket, key, VersionId, ETag):
  the bytes behind that key can never change.
- Single-flight: a block being fetched is registered in ``_inflight``; a second reader of the same
  block waits on the same ``trio.Event`` instead of sending its own GET.
- Runs of adjacent missing blocks are coalesced into one block-aligned ranged GET; separate runs are
  fetched concurrently. GETs run in worker threads under one ``CapacityLimiter`` sized to the S3
  connection pool, so no request waits for a connection while holding a thread.

Threading: every method runs on the trio thread; only ``ObjectSource.get_range`` runs in workers.
State (cache, in-flight table, counters) is therefore touched by one thread only and needs no lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cachetools
import trio

from .model import ObjectRef, ObjectSource

log = logging.getLogger(__name__)

BlockKey = tuple[ObjectRef, int]


@dataclass
class ReadStats:
    """Counters for one mount (shown by ``status`` and the ``user.s3datafs.stats`` xattr)."""

    s3_requests: int = 0
    s3_bytes: int = 0
    block_hits: int = 0
    block_misses: int = 0
    bytes_served: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class _InFlight:
    """One GET covering some blocks; waiters read its result, not the (evictable) cache."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.blocks: dict[int, bytes] = {}
        self.error: BaseException | None = None


class BlockReader:
    def __init__(
        self,
        source: ObjectSource,
        *,
        block_size: int,
        memory_cache_bytes: int,
        limiter: trio.CapacityLimiter,
        stats: ReadStats | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self._source = source
        self._block_size = block_size
        self._cache: cachetools.LRUCache[BlockKey, bytes] = cachetools.LRUCache(
            maxsize=max(memory_cache_bytes, 1), getsizeof=len
        )
        self._limiter = limiter
        self._inflight: dict[BlockKey, _InFlight] = {}
        self.stats = stats or ReadStats()

    async def read(self, ref: ObjectRef, offset: int, length: int) -> bytes:
        """Return the pinned bytes ``[offset, offset + length)`` of ``ref``, clamped to its size."""
        end = min(offset + length, ref.size)
        if offset < 0 or offset >= end:
            return b""
        first, last = offset // self._block_size, (end - 1) // self._block_size
        blocks = await self._blocks(ref, range(first, last + 1))
        data = b"".join(blocks[i] for i in range(first, last + 1))
        start = offset - first * self._block_size
        result = data[start : start + (end - offset)]
        self.stats.bytes_served += len(result)
        return result

    async def _blocks(self, ref: ObjectRef, indices: range) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        waiting: dict[int, _InFlight] = {}
        missing: list[int] = []
        for index in indices:
            key = (ref, index)
            if (block := self._cache.get(key)) is not None:
                found[index] = block
                self.stats.block_hits += 1
            elif (flight := self._inflight.get(key)) is not None:
                waiting[index] = flight
            else:
                missing.append(index)
        if missing:
            self.stats.block_misses += len(missing)
            async with trio.open_nursery() as nursery:
                for run in _contiguous_runs(missing):
                    flight = self._start_flight(ref, run)
                    waiting.update(dict.fromkeys(run, flight))
                    nursery.start_soon(self._fetch, ref, run, flight)
        for index, flight in waiting.items():
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            found[index] = flight.blocks[index]
        return found

    def _start_flight(self, ref: ObjectRef, run: range) -> _InFlight:
        flight = _InFlight()
        for index in run:
            self._inflight[(ref, index)] = flight
        return flight

    async def _fetch(self, ref: ObjectRef, run: range, flight: _InFlight) -> None:
        start = run.start * self._block_size
        end = min(run.stop * self._block_size, ref.size)
        try:
            data = await trio.to_thread.run_sync(
                self._source.get_range, ref, start, end, limiter=self._limiter
            )
            self.stats.s3_requests += 1
            self.stats.s3_bytes += len(data)
            for index in run:
                offset = (index - run.start) * self._block_size
                block = data[offset : offset + self._block_size]
                flight.blocks[index] = block
                if len(block) <= self._cache.maxsize:  # LRUCache refuses larger values
                    self._cache[(ref, index)] = block
        except Exception as exc:  # handed to every waiter; the waiters decide what it means
            flight.error = exc
        finally:
            for index in run:
                self._inflight.pop((ref, index), None)
            flight.done.set()


def _contiguous_runs(indices: list[int]) -> list[range]:
    """Split sorted block indices into maximal runs of consecutive numbers."""
    runs: list[range] = []
    run_start = previous = indices[0]
    for index in indices[1:]:
        if index != previous + 1:
            runs.append(range(run_start, previous + 1))
            run_start = index
        previous = index
    runs.append(range(run_start, previous + 1))
    return runs
