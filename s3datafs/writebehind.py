"""Write-behind: fetched blocks go to the disk cache behind the reader's back, and runs left
uncached are cached later (the refill).

Design:
- The block reader (``reader``) puts fetched blocks in memory at once and hands long runs here
  (``write_behind``); a short run is written by the worker thread that fetched it, and only its
  due cache sync comes here (``sync_if_due``). Writes run in the mount's write nursery, bounded
  by ``write_budget`` bytes pending, or by what the disk writes in a second where it is slower
  (``cache.pace``: the budget's capacity follows the pace after every write).
- Backpressure: readahead and ``warm`` (the prefetch command) wait for room in the budget, so
  they go at the disk's pace; while they wait, ``falls_behind`` is true and the reader starts no
  readahead (``BlockReader.prefetch``). Their longer flights also look on disk under the disk
  limiter that the writes share, before their GET (``BlockReader._fill``). A run a reader
  waited for never waits for room: it takes the budget, else the reserve of one run, else it
  is left uncached (``cache_writes_skipped``) and remembered for the refill (see
  ``write_behind`` for why).
- Write-behind lets the reads a reader waits for go first (``reader_waits``/``reader_served``
  count them), for at most ``WRITE_YIELD`` seconds and never while fetched runs wait for the
  budget (see ``_write``). A cache failure is logged (rate-limited, by the ``TroubleLog`` the
  reader shares) and never fails a read.
- Refill: runs left uncached, up to ``_SKIPPED_REMEMBERED`` of them and half the disk cache's
  bound (the oldest go), are cached by one task in the mount's nursery whenever the disk has
  room, from the reader's memory or loaded again by flights nobody waits for (the ``load`` the
  reader gives, whose flights write what they fetch through ``write_behind`` again, which knows
  them by ``_refilling_run``); ``cache_refills`` counts the blocks written (see ``_refill``).
  The refill never waits for the budget itself and never raises into the mount; S3 trouble
  puts a run behind the others, and after three failures it is left uncached; a refused write
  ends the refills.

Invariants: every byte taken from the write budget or the reserve is given back when its write
ends, written or failed (``_write``); ``_write_waiting`` is the bytes of fetched runs waiting for
room, and ``_waited_flights`` the flights a reader waits for, in progress; at most one refill
task runs (``_refilling``).

``ByteBudget`` (the reader's prefetch budget too) and ``consecutive_runs`` live here because
both modules need them and the reader imports this one, not the other way round (``ReadStats``
comes back for type hints only).

Threading: everything here runs on the trio thread except ``_paced_write`` and the cache's
``sync``, which run in worker threads under the disk limiter (shared with the reader's disk
lookups). Shared state (budgets, counters, the skipped runs, the flags) is touched by the trio
thread only, so it needs no lock; ``WritePace`` and ``TroubleLog`` are thread-safe.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import trio

from .cache.blockfile import object_digest
from .cache.disk import DiskCache, TroubleLog
from .cache.pace import WritePace
from .config import DEFAULT_WRITE_BEHIND
from .errors import TransientS3Error
from .model import ObjectRef

if TYPE_CHECKING:
    from .reader import ReadStats

log = logging.getLogger("s3datafs.reader")  # the records keep the name they always had

_SKIPPED_REMEMBERED = 1024  # runs left uncached, to be cached later (``_refill``)
_REFILL_POLL = 0.2  # seconds between looks for a moment the disk has room for a refill
_REFILL_BACKOFF = 5.0  # seconds before a refill that met S3 trouble is tried again
_REFILL_TRIES = 3  # S3 failures after which a run is left uncached for good
_REFILL_SHARE = 2  # runs left uncached are remembered up to 1/this of the disk cache's bound
WRITE_YIELD = 0.1  # seconds a cache write-behind may wait for reads waiting on S3 (see ``_write``)

# Loads the blocks of a run nobody waits for, given those at hand (``BlockReader._load``).
LoadRun = Callable[[ObjectRef, range, dict[int, bytes]], Awaitable[object]]


class ByteBudget:
    """An async semaphore counted in bytes (for bytes in flight or pending writes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = trio.Event()

    def try_take(self, amount: int) -> bool:
        if self.used + amount > self.capacity and self.used > 0:
            return False
        self.used += amount
        return True

    async def take(self, amount: int) -> None:
        while not self.try_take(amount):
            await self._changed.wait()

    def give(self, amount: int) -> None:
        self.used -= amount
        self._changed.set()
        self._changed = trio.Event()


class WriteBehind:
    """The disk cache writes of one ``BlockReader``, and the refill of what they left out."""

    def __init__(
        self,
        disk: DiskCache | None,
        *,
        disk_limiter: trio.CapacityLimiter,
        block_size: int,
        request_blocks: int,
        write_budget: ByteBudget | None,
        stats: ReadStats,
        trouble: TroubleLog,
        memory: Mapping[tuple[ObjectRef, int], bytes],
        load: LoadRun,
    ) -> None:
        self._disk = disk
        self._disk_limiter = disk_limiter
        self._block_size = block_size
        self._request_blocks = request_blocks
        self._stats = stats
        self._trouble = trouble  # the reader's: one warning a minute per kind of cache trouble
        self._memory = memory  # the reader's LRU, read by refills (``_refill_run``)
        self._load = load
        # Room for two runs at least: with one (--block-size 64M, runs of one block) a run a
        # reader waited for found the one before still being written, and was left uncached.
        self._write_budget = write_budget or ByteBudget(
            max(DEFAULT_WRITE_BEHIND, 2 * request_blocks * block_size))
        # The write budget shrinks to what the disk writes in a second where it is slow (``pace``).
        self._pace = WritePace(request_blocks * block_size, self._write_budget.capacity)
        self._write_budget.capacity = self._pace.allowance
        # One run a reader waited for may wait for the disk beyond the budget (``write_behind``).
        self._write_reserve = ByteBudget(request_blocks * block_size)
        self._write_waiting = 0  # bytes fetched and waiting for room in the write budget
        self._waited_flights = 0  # flights a reader waits for (``reader_waits``), in progress
        self._writes_may_go = trio.Event()  # set (and renewed) when write-behind may stop yielding
        # Runs a reader waited for that were left uncached (the disk fell behind), oldest first:
        # (object, first block) -> blocks. ``_refill`` caches them once the disk has room.
        self._skipped: OrderedDict[tuple[ObjectRef, int], int] = OrderedDict()
        # S3 failures per queued run (or the run being refilled): keys are in ``_skipped``
        self._refill_failures: dict[tuple[ObjectRef, int], int] = {}
        self._refilling = False
        self._refilling_run: tuple[ObjectRef, range] | None = None  # the run being refilled
        self._refusals = 0  # refill writes the disk refused (each ends the refills queued)
        self._nursery: trio.Nursery | None = None
        self._write_nursery: trio.Nursery | None = None
        self._syncing = False  # a disk cache sync due after a short run's write is under way

    def attach(self, tasks: trio.Nursery, writes: trio.Nursery | None = None) -> None:
        """The mount's nurseries: refills run in ``tasks``, cache writes in ``writes``."""
        self._nursery = tasks
        self._write_nursery = writes or tasks

    @property
    def falls_behind(self) -> bool:
        """Whether fetched runs wait for room in the write budget (readahead pauses meanwhile)."""
        return bool(self._write_waiting)

    def reader_waits(self) -> None:
        """A flight a reader waits for started: cache writes wait for it (``_write``)."""
        self._waited_flights += 1

    def reader_served(self) -> None:
        """A flight a reader waited for ended: once none is left, the writes go."""
        self._waited_flights -= 1
        if not self._waited_flights:
            self._let_writes_go()

    async def write_behind(
        self, ref: ObjectRef, first: int, blocks: list[bytes], *, waited: bool = False
    ) -> None:
        """Hand fetched blocks to a cache write once the write budget has room for them.

        Backpressure when the disk falls behind: readahead and ``warm`` wait here for room (and
        readahead pauses meanwhile: ``BlockReader.prefetch``), so they go at the disk's pace; so
        does readahead a reader caught up with (``reader._join``), which is as bounded as any
        readahead. A run a reader waited for from the start never does (nor does it queue
        behind the writes for its disk lookup, see ``BlockReader._fill``): if there is no room,
        it takes the reserve of one run, and if that is taken too its blocks are not cached
        (counted, and logged at most once a minute). Waiting, it would hold its blocks while its
        reader, served already, sent the next read: as many runs as reads, without bound (a try
        measured 590-650 MiB with 8 readers). A cache disk slower than S3 (a network volume out
        of burst credits) then costs the reads their readahead, not their speed. Measured by a
        review, before: 8 readers at 1/32 of their speed with the cache disk at 10 MB/s, 1 MiB
        reads 6.5 s. The reserve is for a disk that falls behind for a moment: a cold read of
        1 GiB on a busy VM left one run of 16 blocks uncached without it, and the remount read
        them from S3.
        """
        cost = sum(map(len, blocks))
        budget = self._write_budget
        if budget.try_take(cost):
            pass
        elif waited and self._write_reserve.try_take(cost):
            budget = self._write_reserve
        elif waited:
            self._stats.cache_writes_skipped += len(blocks)
            self._trouble.warn(
                "the block cache's disk falls behind S3: blocks a reader waited for are left "
                "uncached for now rather than make it wait (cache_writes_skipped in the stats)",
                kind="behind")
            self._remember_skipped(ref, first, len(blocks))
            return
        else:
            self._write_waiting += cost  # while it waits here, readahead pauses (``prefetch``)
            try:
                self._let_writes_go()  # and writes stop yielding to reads: the bound comes first
                await self._write_budget.take(cost)
            finally:
                self._write_waiting -= cost
        refilling = self._refilling_run
        refilled = refilling is not None and refilling[0] == ref and first in refilling[1]
        await self._start_write(ref, first, blocks, cost, budget, refilled=refilled)

    async def sync_if_due(self, disk: DiskCache) -> None:
        """After a short run's write by its GET's thread: the sync that fell due, behind."""
        if disk.sync_due and not self._syncing:
            await self._sync_behind(disk)

    def write_failed(self, exc: Exception) -> None:
        """A cache write failed (here, or a short run's in its GET's thread): counted, logged."""
        self._stats.cache_write_errors += 1
        self._trouble.write_failed(exc)

    # -- writing --------------------------------------------------------------------------------

    async def _start_write(
        self, ref: ObjectRef, first: int, blocks: list[bytes], cost: int, budget: ByteBudget,
        *, refilled: bool = False,
    ) -> None:
        """``_write`` in the write nursery (here, without one); ``cost`` is taken from
        ``budget`` already, and given back when the write is done."""
        if self._write_nursery is None:
            await self._write(ref, first, blocks, cost, budget, refilled)
        else:
            self._write_nursery.start_soon(self._write, ref, first, blocks, cost, budget, refilled)

    async def _write(
        self, ref: ObjectRef, first: int, blocks: list[bytes], cost: int, budget: ByteBudget,
        refilled: bool = False,
    ) -> None:
        """Write fetched blocks to the disk cache, after the reads waiting on S3 (at most
        ``WRITE_YIELD`` seconds, and only while no fetched run waits for the write budget).

        Why wait: a write (checksums, the aligned copy, often a new file) takes the CPU that the
        reads in flight need to take their GET bodies in and answer the kernel. Measured: 8
        readers of scattered 1 MiB chunks at 20 ms took 66-76 ms with the writes right after
        each GET, 61-68 ms with them after the reads, and 63-65 ms with no disk cache at all.
        Readahead and ``warm`` (the prefetch command) are nobody's wait and make no write
        wait, so the writes of a sequential reader and of ``s3datafs prefetch`` keep pace as
        before. Memory stays bounded: a waiting write holds its share of the write budget, and
        once a fetched run has to wait for that budget, the writes go.
        """
        try:
            digest = object_digest(ref)
            with trio.move_on_after(WRITE_YIELD):
                while self._waited_flights and not self._write_waiting:
                    await self._writes_may_go.wait()
            await trio.to_thread.run_sync(
                self._paced_write, ref, digest, first, blocks, cost, limiter=self._disk_limiter
            )
        except Exception as exc:  # a cache fault (or bug) must not end the mount
            self.write_failed(exc)
            if refilled:  # the disk refuses: fetching the other runs again would be for nothing
                self._skipped.clear()
                self._refill_failures.clear()
                self._refusals += 1  # and the run a refill has taken already is dropped too
        else:
            self._stats.cache_refills += len(blocks) if refilled else 0
        finally:
            self._write_budget.capacity = self._pace.allowance
            budget.give(cost)  # the write budget's share, or the reserve

    def _paced_write(
        self, ref: ObjectRef, digest: str, first: int, blocks: list[bytes], cost: int
    ) -> None:
        """In a worker thread: a write-behind, timed for the disk's pace (``cache.pace``)."""
        with self._pace.writing(cost):
            self._disk.write(ref, digest, first, blocks)

    def _let_writes_go(self) -> None:
        self._writes_may_go.set()
        self._writes_may_go = trio.Event()

    async def _sync_behind(self, disk: DiskCache) -> None:
        """Run the disk cache's due sync (a scan of the whole cache) in the write nursery."""
        self._syncing = True
        if self._write_nursery is None:
            await self._sync(disk)
        else:
            self._write_nursery.start_soon(self._sync, disk)

    async def _sync(self, disk: DiskCache) -> None:
        try:
            await trio.to_thread.run_sync(disk.try_sync, limiter=self._disk_limiter)
        finally:
            self._syncing = False

    # -- refill ---------------------------------------------------------------------------------

    def _remember_skipped(self, ref: ObjectRef, first: int, count: int) -> None:
        """A run left uncached: to be cached once the disk has room. Bounded, the oldest go:
        ``_SKIPPED_REMEMBERED`` runs, and blocks worth 1/``_REFILL_SHARE`` of the disk cache
        (more would be fetched again only to evict each other: a review measured 222 MB fetched
        again for a cache of 16 MB). A run left again from the same block keeps the longer
        count (the shorter one overwrote it, and the blocks past it were never cached)."""
        self._queue(ref, first, count)
        room = self._disk.capacity // _REFILL_SHARE // self._block_size if self._disk else 0
        while self._skipped and (len(self._skipped) > _SKIPPED_REMEMBERED
                                 or sum(self._skipped.values()) > room):
            self._refill_failures.pop(self._skipped.popitem(last=False)[0], None)
        if not self._refilling and self._nursery is not None:
            self._refilling = True
            self._nursery.start_soon(self._refill)

    async def _refill(self) -> None:
        """Cache the runs left uncached, one at a time, whenever the disk has room.

        Why: several readers on a busy machine leave runs uncached (the disk falls behind for a
        moment, and a reader's run never waits for it), and a remount then fetched them from S3
        again (118-180 MB after 8 readers of 1 GiB at 0 ms). "Room": no reader waits on S3, no
        write waits for the write budget, and the run's bytes fit in it now, so a refill never
        waits for the budget itself (which would pause every stream's readahead: ``prefetch``).
        Runs left one after another are cached together, one GET's worth at a time
        (``_next_skipped``). A run's blocks still in memory are written from there; the rest are
        fetched again, as readahead is (pinned, looked for on disk first). S3 trouble puts the
        run back behind the others, tried again ``_REFILL_BACKOFF`` later, and left uncached
        after ``_REFILL_TRIES`` failures (an object S3 keeps refusing held up every other run
        and was asked for every 5 s for as long as the mount lived); an object changed or gone
        drops it, and so does a disk that refuses the writes (``_write``). ``cache_refills``
        counts the blocks written (a short run written by its GET's own thread is not counted).
        Ends when none is left; a mount that ends first leaves the rest uncached, as before.
        Never raises into the mount's nursery: a bug here must not end the mount.
        """
        try:
            while self._skipped:
                ref, first, count = self._next_skipped()
                run, refusals = range(first, first + count), self._refusals
                # A look every _REFILL_POLL: room is conditions that change in many places,
                # and a refill may well wait a moment longer than it must.
                while not self._room_for(len(run) * self._block_size):  # noqa: ASYNC110
                    await trio.sleep(_REFILL_POLL)
                if self._refusals != refusals:  # the disk refused a refill's write meanwhile
                    continue
                self._refilling_run = (ref, run)
                try:
                    await self._refill_run(ref, run)  # no await since the room was seen
                except TransientS3Error as exc:
                    log.debug("cannot cache %s blocks %d-%d yet: %s", ref.uri, first,
                              run[-1], exc)
                    self._failed_again(ref, first, count)
                    await trio.sleep(_REFILL_BACKOFF)
                except Exception as exc:  # changed or gone: never cacheable; or a bug
                    log.debug("cannot cache %s blocks %d-%d later: %s", ref.uri, first,
                              run[-1], exc)
                    self._refill_failures.pop((ref, first), None)
                else:
                    self._refill_failures.pop((ref, first), None)
                finally:
                    self._refilling_run = None
        finally:
            self._refilling = False

    def _failed_again(self, ref: ObjectRef, first: int, count: int) -> None:
        """S3 refused a run's refill: behind the others, until it has failed too often."""
        key = (ref, first)
        failures = self._refill_failures[key] = self._refill_failures.get(key, 0) + 1
        if failures >= _REFILL_TRIES:
            del self._refill_failures[key]
            log.debug("%s blocks %d-%d are left uncached: S3 refused them %d times", ref.uri,
                      first, first + count - 1, failures)
            return
        self._queue(ref, first, count)

    def _queue(self, ref: ObjectRef, first: int, count: int) -> tuple[ObjectRef, int]:
        """Queue a run to refill (last in line if new); a run queued from the same block
        keeps the longer count. Its key."""
        key = (ref, first)
        self._skipped[key] = max(count, self._skipped.get(key, 0))
        return key

    def _room_for(self, cost: int) -> bool:
        budget = self._write_budget
        return (not self._waited_flights and not self._write_waiting
                and budget.capacity - budget.used >= cost)

    def _next_skipped(self) -> tuple[ObjectRef, int, int]:
        """The oldest run left uncached, with the runs that follow it in its object, up to one
        GET (a sequential reader's runs are left one after another: one GET each, not 16)."""
        (ref, first), count = self._skipped.popitem(last=False)
        while count < self._request_blocks and (ref, first + count) in self._skipped:
            more = self._skipped[(ref, first + count)]
            if count + more > self._request_blocks:
                break
            del self._skipped[(ref, first + count)]
            # A run merged in brings its failures along: they stay bounded, and nothing
            # remembers a run no longer queued (a review found such counts kept for good).
            if failed := self._refill_failures.pop((ref, first + count), 0):
                self._refill_failures[(ref, first)] = max(
                    failed, self._refill_failures.get((ref, first), 0))
            count += more
        return ref, first, count

    async def _refill_run(self, ref: ObjectRef, run: range) -> None:
        """Write what memory holds of ``run`` and load the rest with flights, which write what
        they fetch. Called right after ``_room_for`` saw room for the whole run, with no await
        between: what memory holds of it costs no more, so the write budget takes it."""
        held = {index: block for index in run
                if (block := self._memory.get((ref, index))) is not None}
        stretches = [(stretch.start, [held[index] for index in stretch])
                     for stretch in consecutive_runs(sorted(held), len(run))]
        cost = sum(len(block) for _, blocks in stretches for block in blocks)
        taken = self._write_budget.try_take(cost)
        assert taken, "a refill found no room that _room_for had just seen"
        for first, blocks in stretches:
            await self._start_write(ref, first, blocks, sum(map(len, blocks)), self._write_budget,
                                    refilled=True)
        if len(held) < len(run):
            await self._load(ref, run, held)


def consecutive_runs(indices: list[int], longest: int) -> list[range]:
    """Split sorted block indices into runs of consecutive numbers, each at most ``longest``."""
    runs: list[range] = []
    if not indices:
        return runs
    run_start = previous = indices[0]
    for index in indices[1:]:
        if index != previous + 1 or index - run_start >= longest:
            runs.append(range(run_start, previous + 1))
            run_start = index
        previous = index
    runs.append(range(run_start, previous + 1))
    return runs
