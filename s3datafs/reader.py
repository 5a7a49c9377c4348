"""Block reads of pinned objects: memory → disk cache → S3, single-flight, coalesced, prefetched.

Design:
- An object is cached in blocks of ``block_size`` bytes (the last may be short). The block size
  is the cache's granularity only; a GET covers a whole run of missing blocks, up to
  ``max_request_bytes``. So a random 4 KiB read fetches one block, while a sequential reader's
  readahead fetches many blocks per GET, several GETs in parallel.
- Blocks are keyed by the pinned ``ObjectRef`` (bucket, key, VersionId, ETag): their bytes can
  never change, so they may be cached in memory and on disk forever.
- At hand: a source that can serve some ranges without I/O (``get_range_now``: zip members
  whose archive bytes have landed) is asked first, and its answer is returned on the trio
  thread; no block, flight or worker thread is involved. Every other read goes the block way.
- Single-flight: every missing block belongs to at most one ``_Flight`` at a time. A flight
  looks in the disk cache, then GETs what is still missing (``_fill``: one worker-thread call
  for both when the run is short, or when a reader waits for it).
  Readers of a block that is in flight wait on that flight; they never send their own GET.
- Slow links: a run a reader waits for of ``SPLIT_BYTES`` or more is two flights, two GETs sent
  at once, once the link has shown itself slow (``linkrate``; see ``_runs_for``).
- Fetched blocks go to memory at once and to the disk cache behind the reader's back
  (``writebehind``: bounded by ``write_budget`` and the disk's pace, after the reads a reader
  waits for; runs it leaves uncached are cached later). While fetched runs wait for room there,
  readahead pauses; longer readahead flights look on disk under the disk limiter the writes
  share, so they queue behind the writes before their GET, unless a reader joins them
  (``_join``). A short run is written by the worker thread that fetched it,
  before it returns: the write costs less than the thread hop it saves (see ``_fill``). A cache
  failure is logged (rate-limited) and never fails a read.
- Prefetch flights run in the mount's nursery under ``prefetch_budget``: bytes of readahead in
  flight *or landed and not read yet*, total across handles. Landed readahead is *staged* (kept
  apart from the LRU) until a read takes it, so the budget bounds its memory and nothing can
  evict it before its reader comes (in an LRU, blocks just read are more recent than readahead
  waiting to be read, so readahead went first and was fetched again). Readahead unread for
  ``_STAGED_TTL`` moves to the LRU when another stream needs the budget. When the budget is
  spent, prefetch is skipped, never waited for (the ``Readahead`` asks again on the next read),
  so foreground reads never queue behind readahead. Readahead of a file that was opened and is
  closed again by everyone (``opened``/``closed``) gives its budget back at once, landed or
  landing: nobody will read it (a review: header probes at offset 0, each pulling 1 MiB ahead,
  held the budget for ``_STAGED_TTL`` and slowed a sequential reader beside them 1.7-2x),
  unless it is asked for again (prefetch across files of a second pass). While several streams
  read ahead at once, each asks for at most an even share of the budget (``_share``, in whole
  GETs).
- Memory: the budgets count blocks - ``prefetch_budget`` of staged readahead, the LRU's size,
  ``write_budget`` of blocks waiting for the disk - but blocks are views of their GET bodies,
  and a body stays whole while any of its blocks is held. So a readahead body half read (its
  read blocks gone from the LRU, the rest staged) still takes all of its 8 MiB: measured with
  16 streams and a 64 MiB budget, 123-168 MiB of readahead bodies lived at once against 65-96
  MiB counted (session 19's review). Bounded (at most a body per stream beyond the count), and
  the defaults keep a daemon with 8 sequential readers under 256 MiB (215 MiB measured). A
  block read again is copied out of its body (``_pins_more``), so the LRU pins no bodies.

- Bounded waits: with ``read_timeout`` no GET is waited for longer than that, slot wait included
  (``--read-timeout``); past it the flight fails with ``TransientS3Error`` (EIO) and the next read
  of those blocks starts a new flight - except within ``_FAILED_TTL`` of a *slow* failure, which
  fails again at once, so the kernel's immediate retry of a failed read does not double the wait.
  The abandoned GET keeps its limiter slot until its thread ends, so a stalled S3 cannot make the
  daemon start unbounded threads; and while every slot is held by one, new loads fail at once
  (S3 has stopped answering) until a thread ends. A load that would wait for the source's own
  work (a zip member being decompressed into the disk cache: ``decompressing``) takes a slot of
  a limiter of its own instead, and is never counted as an S3 call given up.
- A zip member found bad (its source raises ``ArchiveError``: a CRC-32 that failed) leaves
  memory, and its flights still in flight fail, so no piece of it served before is served again
  without its source (``_drop_bad``); the kernel drops its pages of it at each open
  (``found_bad``).

Threading: everything here runs on the trio thread except ``_load_blocking`` (disk lookup, GET
and, for short runs, the cache write, under the S3 limiter) and ``_read_cached`` (under the disk
limiter, which write-behind's writes share), which run in worker threads. Shared state (LRU,
flight table, counters) is touched by the trio thread only, so it needs no lock; ``TroubleLog``
is thread-safe, and the count of abandoned loads has its own lock (their threads end it). The
``WriteBehind`` the reader owns keeps the same rule for its own state.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cachetools
import trio

from .cache.blockfile import object_digest
from .cache.disk import DiskCache, TroubleLog
from .config import DEFAULT_MAX_REQUEST
from .errors import ArchiveError, S3DataFSError, TransientS3Error
from .linkrate import LinkRate
from .model import MemberRef, ObjectRef, ObjectSource, PinnedRef
from .prefetch import Readahead
from .writebehind import ByteBudget, WriteBehind, consecutive_runs

log = logging.getLogger(__name__)

BlockKey = tuple[ObjectRef, int]
# Runs this short look on disk, GET and go to the disk cache in one worker-thread call (``_fill``).
ONE_HOP_BYTES = 256 * 1024
_FAILED_TTL = 1.0  # seconds a slow failure is repeated at once (covers the kernel's own retry)
_STAGED_TTL = 5.0  # seconds readahead may wait unread before others may take its budget
_CLOSED_REMEMBERED = 1024  # objects closed by all whose readahead is known to be nobody's
_BAD_REMEMBERED = 4096  # zip members found bad, whose pages the kernel drops at each open
_STREAM_IDLE = 1.0  # seconds after its last readahead a stream stops counting for the shares
JOINED_QUEUE_SECONDS = 0.25  # readahead a reader waits for waits no longer behind the writes
SPLIT_BYTES = 1024 * 1024  # a waited run this long is two GETs on a slow link (``_runs_for``)
MAX_PIECES = 4  # GETs of one readahead run around what the disk cache holds (``_pieces``)


@dataclass
class ReadStats:
    """Counters for one mount (shown by ``status`` and the ``user.s3datafs.stats`` xattr)."""

    s3_requests: int = 0
    s3_bytes: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    disk_bytes: int = 0
    misses: int = 0
    prefetched_blocks: int = 0
    prefetch_skipped: int = 0
    cache_write_errors: int = 0
    bytes_served: int = 0
    split_reads: int = 0  # waited runs fetched as two GETs (a slow link: ``linkrate``)
    cache_writes_skipped: int = 0  # blocks left uncached: the disk fell behind (``writebehind``)
    cache_refills: int = 0  # of those, cached later, once the disk had room (``writebehind``)
    decompressions: int = 0  # zip members decompressed from their start (``archive.members``)

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class _Call:
    """One worker-thread load: whether it started and ended, and whether its reader gave up
    on it (``BlockReader._abandoned``). Guarded by ``BlockReader._abandoned_lock``."""

    def __init__(self) -> None:
        self.started = self.ended = self.abandoned = False


class _Flight:
    """One load of a run of blocks; waiters read its result, not the (evictable) cache."""

    def __init__(self, ref: ObjectRef, run: range, budget: int = 0, waited: bool = False) -> None:
        self.ref = ref
        self.run = run
        self.budget = budget  # prefetch budget held (readahead); what is not staged goes back
        self.waited = waited  # a reader waits for it (not readahead, not ``warm``)
        self.joined = False  # readahead a reader caught up with: no queue for its lookup
        self.queued: trio.CancelScope | None = None  # its lookup queued for the disk limiter
        self.done = trio.Event()
        self.blocks: dict[int, bytes] = {}
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.bad: ArchiveError | None = None  # its member was found bad meanwhile (``_drop_bad``)


class BlockReader:
    def __init__(
        self,
        source: ObjectSource,
        *,
        block_size: int,
        memory_cache_bytes: int,
        s3_limiter: trio.CapacityLimiter,
        disk: DiskCache | None = None,
        disk_limiter: trio.CapacityLimiter | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST,
        prefetch_budget: ByteBudget | None = None,
        write_budget: ByteBudget | None = None,
        stats: ReadStats | None = None,
        read_timeout: float | None = None,
        link: LinkRate | None = None,
        split_bytes: int = SPLIT_BYTES,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.stats = stats or ReadStats()
        self._source = source
        # Optional: a source that can tell bytes at hand without I/O (``MemberSource``) serves
        # them on this thread, skipping flights and the worker-thread hop (see ``read``).
        self._source_now: Callable[[ObjectRef, int, int], bytes | None] | None = getattr(
            source, "get_range_now", None)
        # Optional: a source that can tell a load would wait on its own work, not on S3
        # (``MemberSource``: a member being decompressed into the disk cache); see ``_get``.
        self._source_busy: Callable[[PinnedRef], bool] = getattr(
            source, "decompressing", lambda _ref: False)
        self._busy_limiter = trio.CapacityLimiter(s3_limiter.total_tokens)
        self._memory: cachetools.LRUCache[BlockKey, bytes] = cachetools.LRUCache(
            maxsize=max(memory_cache_bytes, 1), getsizeof=len
        )
        self._s3_limiter = s3_limiter
        self._disk = disk
        self._disk_limiter = disk_limiter or trio.CapacityLimiter(4)
        self._request_blocks = max(1, max_request_bytes // block_size)
        self._link = link
        self._split_blocks = max(2, split_bytes // block_size)
        self._prefetch_budget = prefetch_budget or ByteBudget(64 * 1024 * 1024)
        # Readahead GETs no larger than the budget: an empty budget lets any one amount through
        # (so a large read is never refused), which would let one GET pass a small bound.
        self._ahead_blocks = max(1, min(self._request_blocks,
                                        self._prefetch_budget.capacity // block_size))
        self._trouble = TroubleLog()  # cache trouble: a warning a minute per kind at most
        # Fetched blocks go to the disk cache behind the reads, and the runs left uncached are
        # cached later: from memory (read, not written to), or loaded again by flights nobody
        # waits for, whose own write-behind writes them.
        self._writes = WriteBehind(
            disk, disk_limiter=self._disk_limiter, block_size=block_size,
            request_blocks=self._request_blocks, write_budget=write_budget, stats=self.stats,
            trouble=self._trouble, memory=self._memory,
            load=functools.partial(self._load, waited=False),
        )
        self._inflight: dict[BlockKey, _Flight] = {}
        # Readahead that has landed and not been read yet, in landing order, with landing times.
        # It holds its prefetch budget until read (or given up, see ``_reclaim_stale``), so the
        # budget bounds readahead in flight *and* waiting, and the memory LRU cannot evict it
        # before its reader comes: evicting it there is what made readahead refetch itself.
        self._staged: OrderedDict[BlockKey, tuple[bytes, float]] = OrderedDict()
        self._open_refs: dict[ObjectRef, int] = {}  # open handles per object
        # Objects opened and then closed by all, most recent last (bounded): their readahead is
        # nobody's (``_keep``, ``_reclaim_closed``). ``_closed_staged``: some of it is staged.
        self._closed: OrderedDict[ObjectRef, None] = OrderedDict()
        self._closed_staged = False
        self._bad: OrderedDict[ObjectRef, None] = OrderedDict()  # members found bad (``found_bad``)
        self._streams: dict[int, float] = {}  # id(Readahead) -> when it last read ahead
        self._streams_pruned = 0.0
        self._nursery: trio.Nursery | None = None
        self._read_timeout = read_timeout
        # Loads given up on (--read-timeout) whose threads still wait on S3, holding a slot.
        self._abandoned = 0
        self._abandoned_lock = threading.Lock()
        # Blocks whose load just failed slowly, with the error: see ``_remember_slow_failure``.
        self._failed: cachetools.TTLCache[BlockKey, BaseException] = cachetools.TTLCache(
            maxsize=4096, ttl=_FAILED_TTL, timer=time.monotonic
        )

    def counters(self) -> dict[str, int]:
        """``stats``, plus what the source counted itself (a ``MemberSource``: archive GETs)."""
        counts = self.stats.as_dict()
        source_stats = getattr(self._source, "stats", None)
        if isinstance(source_stats, ReadStats):
            for name, value in source_stats.as_dict().items():
                counts[name] += value
        if self._link is not None:
            counts["link_bytes_per_second"] = self._link.bytes_per_second
        return counts

    def opened(self, ref: ObjectRef) -> None:
        """A handle of ``ref`` was opened (FUSE ``open``)."""
        self._open_refs[ref] = self._open_refs.get(ref, 0) + 1
        self._closed.pop(ref, None)

    def closed(self, ref: ObjectRef) -> None:
        """A handle of ``ref`` was released: once none is left, its readahead is nobody's."""
        left = self._open_refs.get(ref, 1) - 1
        if left > 0:
            self._open_refs[ref] = left
            return
        self._open_refs.pop(ref, None)
        self._closed[ref] = None
        if len(self._closed) > _CLOSED_REMEMBERED:
            self._closed.popitem(last=False)
        self._closed_staged = bool(self._staged)

    def found_bad(self, ref: PinnedRef) -> bool:
        """Whether ``ref`` failed a check in this mount (a zip member's CRC-32): the kernel's
        pages of it may hold pieces served before, which a read must not take for the member's
        again (``fuse_ops`` has them dropped at each open: see ``_drop_bad``)."""
        return ref in self._bad

    def attach(self, tasks: trio.Nursery, writes: trio.Nursery | None = None) -> None:
        """Give the reader the mount's nurseries: flights, prefetch and refills; cache writes."""
        self._nursery = tasks
        self._writes.attach(tasks, writes)

    # -- public reads ---------------------------------------------------------------------------

    async def read(
        self, ref: ObjectRef, offset: int, length: int, readahead: Readahead | None = None
    ) -> bytes:
        """The pinned bytes ``[offset, offset + length)`` of ``ref``, clamped to its size."""
        end = min(offset + length, ref.size)
        if offset < 0 or offset >= end:
            return b""
        if self._source_now is not None:
            try:
                data = self._source_now(ref, offset, end)
            except ArchiveError as exc:
                self._drop_bad(ref, exc)
                raise
            if data:
                self.stats.memory_hits += 1
                self.stats.bytes_served += len(data)
                return data
        first, last = offset // self.block_size, (end - 1) // self.block_size
        taken = self._take_staged(ref, first, last)  # read now: their budget goes to readahead
        if readahead is not None:
            step = self._ahead_blocks * self.block_size  # readahead in whole GETs
            limit = self._share(readahead, step)
            ahead = readahead.on_read(offset, end - offset, ref.size, step, limit)
            if ahead:
                self._streams[id(readahead)] = time.monotonic()
                start_ahead, end_ahead = ahead
                if last in taken:  # taken out of staging above: it is no longer to be fetched
                    start_ahead = max(start_ahead, (last + 1) * self.block_size)
                if (reached := self.prefetch(ref, start_ahead, end_ahead)) < end_ahead:
                    readahead.fell_short(reached)  # budget spent: ask again on the next read
        blocks = await self._load(ref, range(first, last + 1), taken)
        self._consumed(ref, blocks)
        start = offset - first * self.block_size
        if first == last:
            result = bytes(blocks[first][start : start + (end - offset)])
        else:
            joined = b"".join(blocks[i] for i in range(first, last + 1))
            result = joined[start : start + (end - offset)]
        self.stats.bytes_served += len(result)
        return result

    def _share(self, readahead: Readahead, step: int) -> int:
        """A stream's share of the prefetch budget while several read ahead (0: no limit).

        Shared evenly, in whole GETs: otherwise the streams that got ahead hold the budget with
        readahead they have not read yet, and the others fetch 1 MiB at a time in the foreground
        (measured with 8 readers: twice the GETs, and slower in total).
        """
        now, streams = time.monotonic(), self._streams
        if now - self._streams_pruned > _STREAM_IDLE:
            for key in [k for k, seen in streams.items() if now - seen > _STREAM_IDLE]:
                del streams[key]
            self._streams_pruned = now
        count = len(streams) + (id(readahead) not in streams)
        if count <= 1:
            return 0
        share = self._prefetch_budget.capacity // count
        return max(step, share - share % step)

    def prefetch(self, ref: PinnedRef, start: int, end: int) -> int:
        """Start loading ``[start, end)`` in the background, as far as the budget allows.

        Returns how far that is: ``end``, or the start of the first run the budget had no room
        for (that run and the rest are skipped, never queued).
        """
        if self._nursery is None or self._writes.falls_behind:
            return start  # no readahead while the disk cache falls behind: memory stays bounded
        self._closed.pop(ref, None)  # wanted again (a second pass fetches files ahead)
        index, last = start // self.block_size, (end - 1) // self.block_size
        while index <= last:  # runs are found lazily: a spent budget costs one run's scan
            if not self._absent(ref, index):
                index += 1
                continue
            stop = index + 1
            while stop <= last and stop - index < self._ahead_blocks and self._absent(ref, stop):
                stop += 1
            run, cost = range(index, stop), (stop - index) * self.block_size
            if not self._prefetch_budget.try_take(cost) and not (
                self._reclaim_stale() and self._prefetch_budget.try_take(cost)
            ) and not (self._reclaim_closed() and self._prefetch_budget.try_take(cost)):
                self.stats.prefetch_skipped += len(run)
                return max(start, index * self.block_size)
            flight = self._register(ref, run, cost)
            self.stats.prefetched_blocks += len(run)
            self._nursery.start_soon(self._fly, flight)
            index = stop
        return end

    async def warm(
        self, ref: ObjectRef, parallel: int = 2, loaded: Callable[[int], None] = lambda _n: None
    ) -> None:
        """Make sure every block of ``ref`` is cached (for ``s3datafs prefetch``).

        ``parallel`` request-sized runs are loaded at a time, which bounds the memory it takes;
        ``loaded(bytes)`` is told as each run is in (a progress line).
        """
        blocks = -(-ref.size // self.block_size)
        starts = iter(range(0, blocks, self._request_blocks))

        async def worker() -> None:
            for first in starts:  # shared: each run is taken by one worker
                run = range(first, min(first + self._request_blocks, blocks))
                await self._load(ref, run, waited=False)  # filling the cache: nobody waits
                loaded(min(run.stop * self.block_size, ref.size) - run.start * self.block_size)

        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)

    def _drop_bad(self, ref: ObjectRef, error: ArchiveError) -> None:
        """``ref`` failed a check (a zip member's CRC-32, by ``error``): what memory holds of it
        goes, and its flights still in flight fail with the same error.

        Why: a stored member's CRC is checked once the pieces its source served cover it
        (``archive.crc``), and the source starts counting again when it finds the member bad.
        Pieces served before, read again from here (or from the kernel's pages: ``found_bad``),
        never reached it again, so once the member's minute of failing was over
        (``members._RETRY_BAD``) a read of it whole completed with no error (through a mount,
        a stored member of 4 or 20 MB: every time; ``test_zip_e2e``). Flights in flight hold
        pieces the source served before it found the member bad: kept, they would be served
        again the same way; failing is what the source does to every read of it now.
        """
        self._bad[ref] = None
        self._bad.move_to_end(ref)
        if len(self._bad) > _BAD_REMEMBERED:
            self._bad.popitem(last=False)
        for key in [key for key in self._memory if key[0] == ref]:
            del self._memory[key]
        for key in [key for key in self._staged if key[0] == ref]:
            self._prefetch_budget.give(len(self._staged.pop(key)[0]))
        for (flight_ref, _index), flight in self._inflight.items():
            if flight_ref == ref and flight.bad is None:
                flight.bad = error

    # -- loading --------------------------------------------------------------------------------

    def _absent(self, ref: ObjectRef, index: int) -> bool:
        key = (ref, index)  # a block that just failed slowly is not prefetched again at once
        return not (
            key in self._memory
            or key in self._staged
            or key in self._inflight
            or key in self._failed
        )

    def _take_staged(self, ref: ObjectRef, first: int, last: int) -> dict[int, bytes]:
        """Staged readahead of blocks ``first`` .. ``last``, taken out: it is being read. Its
        budget is back, and it joins the LRU at once, not when the read ends: the read may wait
        for a later block's flight, and another read of a block taken here must find it
        meanwhile (out of staging and not in the LRU yet, it was fetched again: a review saw
        ``torch.load(mmap=True)``'s page faults do it, single-flight's one gap)."""
        taken: dict[int, bytes] = {}
        if self._staged:
            for index in range(first, last + 1):
                key = (ref, index)
                if (entry := self._staged.pop(key, None)) is not None:
                    block = taken[index] = entry[0]
                    self._prefetch_budget.give(len(block))
                    if len(block) <= self._memory.maxsize:
                        self._memory[key] = block
            self.stats.memory_hits += len(taken)
        return taken

    def _consumed(self, ref: ObjectRef, blocks: dict[int, bytes]) -> None:
        """Readahead that landed while a read waited for it is read now: its budget is back, it
        joins the LRU (what the read took before it waited is there already)."""
        for index, block in blocks.items():
            key = (ref, index)
            staged = self._staged.pop(key, None)
            if staged is not None:
                self._prefetch_budget.give(len(staged[0]))
                if len(block) <= self._memory.maxsize:
                    self._memory[key] = block

    def _reclaim_stale(self) -> bool:
        """Readahead unread for ``_STAGED_TTL`` gives its budget back (moves to the LRU).

        Its reader went away or stalled; without this, abandoned readahead could hold the budget
        and starve every other stream's. Returns whether anything was reclaimed.
        """
        limit, reclaimed = time.monotonic() - _STAGED_TTL, False
        while self._staged:
            key, (block, landed) = next(iter(self._staged.items()))
            if landed > limit:
                break
            del self._staged[key]
            self._prefetch_budget.give(len(block))
            if len(block) <= self._memory.maxsize:
                self._memory[key] = block
            reclaimed = True
        return reclaimed

    def _reclaim_closed(self) -> bool:
        """Staged readahead of files closed by all gives its budget back (moves to the LRU).
        A scan of the staged blocks, made only when files were closed since the last one."""
        if not self._closed_staged:
            return False
        self._closed_staged = False
        gone = [key for key in self._staged if key[0] in self._closed]
        for key in gone:
            block, _landed = self._staged.pop(key)
            self._prefetch_budget.give(len(block))
            if len(block) <= self._memory.maxsize:
                self._memory[key] = block
        return bool(gone)

    async def _load(
        self,
        ref: ObjectRef,
        indices: range,
        found: dict[int, bytes] | None = None,
        *,
        waited: bool = True,
    ) -> dict[int, bytes]:
        found = dict(found) if found else {}
        wanted = [index for index in indices if index not in found]
        while wanted:  # more than once only if a flight we waited on was cancelled midway
            waiting = await self._start_or_join(ref, wanted, found, waited)
            wanted = []
            for index, flight in waiting.items():
                await flight.done.wait()
                if index in flight.blocks:  # landed, though another piece may have failed
                    found[index] = flight.blocks[index]
                elif flight.error is not None:
                    raise flight.error
                else:
                    wanted.append(index)
        return found

    async def _start_or_join(
        self, ref: ObjectRef, indices: list[int], found: dict[int, bytes], waited: bool
    ) -> dict[int, _Flight]:
        """Take what memory has; join flights in progress; start flights for the rest."""
        waiting: dict[int, _Flight] = {}
        missing: list[int] = []
        for index in indices:
            key = (ref, index)
            if (block := self._memory.get(key)) is not None:
                if _pins_more(block):  # read again: it may outlive its body's other blocks
                    block = self._memory[key] = bytes(block)
                found[index] = block
                self.stats.memory_hits += 1
            elif (staged := self._staged.get(key)) is not None:
                found[index] = staged[0]
                self.stats.memory_hits += 1
            elif (flight := self._inflight.get(key)) is not None:
                waiting[index] = flight
                if waited:
                    _join(flight)
            else:
                missing.append(index)
        for index in missing:
            if (error := self._failed.get((ref, index))) is not None:
                raise error
        if missing:
            # Flights run in the mount's nursery when there is one, so a reader waits for its
            # bytes only, never for the write-behind that follows them.
            async with trio.open_nursery() as local:
                nursery = self._nursery or local
                for run in self._runs_for(ref, missing, waited):
                    flight = self._register(ref, run, waited=waited)
                    waiting.update(dict.fromkeys(run, flight))
                    nursery.start_soon(self._fly, flight)
        return waiting

    def _runs_for(self, ref: ObjectRef, missing: list[int], waited: bool) -> list[range]:
        """The flights (one GET each) for ``missing``: runs of at most one GET's length.

        A run a reader waits for of at least ``SPLIT_BYTES`` is split in two flights, sent at
        once, when the link has shown itself slow (``linkrate``: on S3, where one connection
        carries ~100 MB/s, the halves arrive sooner than the whole). Readahead is not split:
        its GETs are already several in flight. Nor are zip members: their source fetches and
        decompresses a member's data in one piece. Nor is a run the disk cache may hold (its
        region file is known): two flights would then be two disk lookups, not two GETs.
        """
        runs = consecutive_runs(missing, self._request_blocks)
        if not waited or self._link is None or not self._link.slow or _source_keeps(ref):
            return runs
        disk = self._disk
        digest = object_digest(ref) if disk is not None else ""
        split: list[range] = []
        for run in runs:
            if len(run) < self._split_blocks or (disk is not None and disk.may_hold(digest, run)):
                split.append(run)
                continue
            middle = run.start + len(run) // 2
            split += [range(run.start, middle), range(middle, run.stop)]
            self.stats.split_reads += 1
        return split

    def _register(
        self, ref: ObjectRef, run: range, budget: int = 0, waited: bool = False
    ) -> _Flight:
        flight = _Flight(ref, run, budget, waited)
        for index in run:
            self._inflight[(ref, index)] = flight
        return flight

    async def _fly(self, flight: _Flight) -> None:
        """Fill ``flight`` from disk and S3, then cache what S3 sent - a failed flight too: the
        pieces of readahead that landed beside one that failed (``_fill``).

        Never raises: waiters get ``flight.error`` - or their blocks, where a piece that landed
        holds them (``_load``). ``done`` is set before any write-behind (a short run was written
        already, by the worker thread of its GET: see ``_fill``).
        """
        fetched: list[tuple[int, list[bytes]]] = []
        waited = flight.waited
        if waited:
            self._writes.reader_waits()
        try:
            await self._fill(flight, fetched)
            if flight.bad is not None:  # what the source served it before: see ``_drop_bad``
                raise ArchiveError(str(flight.bad))
            self._keep(flight)
        except Exception as exc:  # handed to every waiter; they decide what it means
            flight.error = _root_cause(exc)  # and what S3 sent before it is cached all the same
            self._remember_slow_failure(flight)
            if isinstance(flight.error, ArchiveError) and flight.bad is None:
                self._drop_bad(flight.ref, flight.error)
        finally:
            for index in flight.run:
                if self._inflight.get((flight.ref, index)) is flight:
                    del self._inflight[(flight.ref, index)]
            if flight.budget:  # what was not staged (a failure, a short last block) goes back
                self._prefetch_budget.give(flight.budget)
                flight.budget = 0
            flight.done.set()
            if waited:
                self._writes.reader_served()
        if self._on_disk(flight.ref):
            for first, blocks in fetched:
                await self._writes.write_behind(flight.ref, first, blocks, waited=waited)

    def _on_disk(self, ref: PinnedRef) -> bool:
        """Whether ``ref``'s blocks go to the disk cache (see ``_source_keeps``)."""
        return self._disk is not None and not _source_keeps(ref)

    def _keep(self, flight: _Flight) -> None:
        """Put a landed flight's blocks where reads find them: readahead staged, the rest LRU."""
        now = time.monotonic()
        nobodys = flight.ref in self._closed  # its file was closed while it flew
        for index, block in flight.blocks.items():
            key = (flight.ref, index)
            if flight.budget >= len(block) and index in flight.run and not nobodys:
                self._staged[key] = (block, now)
                flight.budget -= len(block)
            elif len(block) <= self._memory.maxsize:
                self._memory[key] = block

    async def _fill(self, flight: _Flight, fetched: list[tuple[int, list[bytes]]]) -> None:
        """The flight's blocks: what the disk cache has, then one GET for the rest of the run.

        A short run (a random read, a small file: at most ``ONE_HOP_BYTES``) does both, and
        writes what S3 sent to the disk cache, in *one* worker-thread call: each hop between the
        trio thread and a worker costs two wake-ups and GIL hand-offs, ~0.25 ms of CPU, a large
        share of a small read (measured: random reads 6-15 % faster at 0 ms with the lookup in
        the GET's call; 5-30 % more with the write there too, instead of a write-behind hop).
        The write makes the run's readers wait ~60 us longer per 64 KiB block, less than the hop
        it saves; it needs no write budget, as the S3 limiter already bounds these calls.

        A longer run is written behind. Readahead (and ``warm``) looks on disk first, under the
        disk limiter that the cache writes share: that wait is what holds back new GETs while
        the disk falls behind. With one hop for every run, 8 sequential readers were 20-40 %
        slower and the daemon's RSS passed 500 MiB; a gate on the write backlog instead bounded
        memory only in part and cost as much speed. A reader's own long run (a 1 MiB read
        nothing read ahead for) never waits there: it looks on disk in its GET's call, so it
        never queues behind the writes of the runs before it (measured: 8 readers of scattered
        1 MiB chunks at 20 ms waited 5-6 ms there per chunk). Its memory stays bounded: such runs
        are as many as the reads the kernel has in flight. A flight's run is at most one GET
        long; the disk cache answers with the blocks it has, and one GET fetches from the first
        missing block to the last (``_uncached``): cached blocks at either end are not fetched
        again (a review saw a run whose first block was missing GET all of it, blocks the disk
        held included), and those between are too when a reader waits for the run, as splitting
        its GET would cost it a round trip per hole. Readahead (and ``warm``), which looks on
        disk before its GET, GETs around the cached stretches instead, up to ``MAX_PIECES`` GETs
        sent at once (``_pieces``): nobody waits for them, so more GETs cost requests, not time.
        A piece that fails leaves the others be (cancelled, as they were before, their GETs went
        on in their threads all the same - a GET is abandoned, not stopped - and what S3 sent
        was thrown away, neither kept nor cached: the refill chaos test saw 1-6 blocks S3 sent
        never cached, in 1 run of 300 on two busy cores). The flight fails once all have landed,
        and what they fetched is cached.
        """
        ref, run = flight.ref, flight.run
        disk = self._disk if self._on_disk(ref) else None
        long_run = disk is not None and len(run) * self.block_size > ONE_HOP_BYTES
        write = None if long_run else disk  # a long run is written behind
        pieces = [run]
        failures: list[Exception] = []  # of readahead's pieces, each sent whatever the others do
        if long_run and not flight.waited:
            with trio.CancelScope() as queued:
                flight.queued = queued  # a reader that joins bounds the wait (``_join``)
                if flight.joined:
                    queued.deadline = trio.current_time() + JOINED_QUEUE_SECONDS
                hits = await trio.to_thread.run_sync(
                    self._read_cached, ref, run, disk, True, limiter=self._disk_limiter
                )
            flight.queued = None
            if not queued.cancelled_caught:  # else the GET's call looks on disk
                pieces, hits = _pieces(run, hits)
                self._took_from_disk(flight, hits)
                disk = None
                if not pieces:
                    return
        if len(pieces) == 1:
            got = [await self._get(ref, pieces[0], disk, write)]
        else:
            got = [({}, None, None)] * len(pieces)

            async def get(number: int) -> None:
                try:
                    got[number] = await self._get(ref, pieces[number], None, None)
                except Exception as exc:  # the other pieces still land: see below
                    failures.append(exc)

            async with trio.open_nursery() as gets:
                for number in range(len(pieces)):
                    gets.start_soon(get, number)
        for piece, (hits, blocks, write_error) in zip(pieces, got, strict=True):
            rest, hits = _uncached(piece, hits)
            self._took_from_disk(flight, hits)
            if write_error is not None:
                self._writes.write_failed(write_error)
            if blocks is None:
                continue
            self.stats.misses += len(rest)
            if not _source_keeps(ref):
                self.stats.s3_requests += 1
                self.stats.s3_bytes += sum(map(len, blocks))
            flight.blocks.update(zip(rest, blocks, strict=True))
            if write is None:
                fetched.append((rest.start, blocks))
            else:  # the worker thread wrote the run, not the sync that fell due
                await self._writes.sync_if_due(write)
        if failures:  # the flight fails, and what the other pieces fetched is cached (``_fly``)
            raise ExceptionGroup(f"readahead GETs of {ref.uri} failed", failures)

    async def _get(
        self, ref: ObjectRef, run: range, disk: DiskCache | None, write: DiskCache | None
    ) -> tuple[dict[int, bytes], list[memoryview] | None, Exception | None]:
        """``_load_blocking`` in a worker thread, within --read-timeout."""
        # The hard bound of --read-timeout: it counts the wait for a connection slot, and a GET
        # that outlives it is abandoned (its thread ends on its own socket timeout and deadline,
        # and only then gives its slot back), so no reader ever waits on S3 longer than this.
        # Once every slot is held by such a GET, S3 has stopped answering: a new load fails at
        # once instead of waiting its whole bound for a slot (hundreds of readers of a stalled
        # S3 got their EIO after 16x --read-timeout: the kernel sends their reads in waves).
        # A load that would wait for a decompression under way waits for this process, not for
        # S3: it holds no S3 connection slot while it waits (32 readers of a bzip2 member that
        # takes minutes to decompress held them all, and every other file's reads then failed
        # as if S3 had stopped answering), and is not counted as an S3 call given up.
        busy = self._source_busy(ref)
        slots = int(self._s3_limiter.total_tokens)
        if self._abandoned >= slots and not busy:
            raise TransientS3Error(
                f"no answer from S3 for {ref.uri}: all {slots} connections wait on S3 for reads "
                f"given up after {self._read_timeout:g}s (--read-timeout); failing at once until "
                "one answers"
            )
        call = _Call()
        with trio.move_on_after(self._read_timeout or math.inf) as bound:
            hits, blocks, write_error = await trio.to_thread.run_sync(
                self._load_watched, call, ref, run, disk, write,
                limiter=self._busy_limiter if busy else self._s3_limiter, abandon_on_cancel=True,
            )
        if bound.cancelled_caught:
            start, end = run.start * self.block_size, min(run.stop * self.block_size, ref.size)
            if busy:
                raise TransientS3Error(
                    f"{ref.uri}: its decompression did not reach bytes {start}-{end - 1} within "
                    f"{self._read_timeout:g}s (--read-timeout)"
                )
            with self._abandoned_lock:
                if call.started and not call.ended:
                    call.abandoned = True
                    self._abandoned += 1
            raise TransientS3Error(
                f"no answer from S3 for {ref.uri} bytes {start}-{end - 1} within "
                f"{self._read_timeout:g}s (--read-timeout)"
            )
        return hits, blocks, write_error

    def _took_from_disk(self, flight: _Flight, hits: dict[int, bytes]) -> None:
        flight.blocks.update(hits)
        self.stats.disk_hits += len(hits)
        self.stats.disk_bytes += sum(map(len, hits.values()))

    def _load_watched(
        self, call: _Call, ref: ObjectRef, run: range, disk: DiskCache | None,
        write: DiskCache | None,
    ) -> tuple[dict[int, bytes], list[memoryview] | None, Exception | None]:
        """``_load_blocking``, telling ``call`` when it started and ended (in a worker thread);
        an abandoned call's end gives its slot back to the count of answering connections."""
        call.started = True
        try:
            return self._load_blocking(ref, run, disk, write)
        finally:
            with self._abandoned_lock:
                call.ended = True
                if call.abandoned:
                    self._abandoned -= 1

    def _load_blocking(
        self, ref: ObjectRef, run: range, disk: DiskCache | None, write: DiskCache | None
    ) -> tuple[dict[int, bytes], list[memoryview] | None, Exception | None]:
        """In a worker thread: the run's blocks cached in ``disk``, the rest (``_uncached``) as
        blocks of one GET (None: no rest), and, with ``write``, that rest written to it (the
        error if it refused).

        The blocks are zero-copy views of the response body: the body lives as long as one of
        its blocks is cached or in flight, and no 8 MiB copy is made per GET.
        """
        hits = self._read_cached(ref, run, disk) if disk is not None else {}
        rest, _ = _uncached(run, hits)
        if not rest:
            return hits, None, None
        first = rest.start
        end = min(rest.stop * self.block_size, ref.size)
        body = memoryview(self._source.get_range(ref, first * self.block_size, end))
        size = self.block_size
        blocks = [body[o : o + size] for o in range(0, len(body), size)]
        if write is None:
            return hits, blocks, None
        try:  # a sync that falls due is left to ``sync_if_due``: the run's readers wait here
            write.write(ref, object_digest(ref), first, blocks, sync=False)
        except Exception as exc:  # the bytes are good: a cache fault (or bug) must not fail them
            return hits, blocks, exc
        return hits, blocks, None

    def _read_cached(
        self, ref: ObjectRef, run: range, disk: DiskCache, every: bool = False
    ) -> dict[int, bytes]:
        """In a worker thread: the cached blocks of ``run`` (at its ends, or ``every`` one); a
        disk that fails is passed over."""
        try:
            return disk.read_run(object_digest(ref), ref.size, run, every=every)
        except OSError as exc:
            self._trouble.warn(f"cannot read the block cache ({exc}); reading from S3",
                               kind="read")
            return {}

    def _remember_slow_failure(self, flight: _Flight) -> None:
        """Fail the same blocks at once for ``_FAILED_TTL`` after a load failed *slowly*.

        When a read fails, the kernel retries it at once (the readahead request fails, then it
        reads the page synchronously), so without this a read against a stalled S3 would return
        EIO only after twice ``--read-timeout``. Only transient failures that took at least half
        the bound are remembered: fast failures cost nothing to retry, and are retried.
        """
        slow = self._read_timeout is not None and (
            time.monotonic() - flight.started >= self._read_timeout / 2
        )
        if slow and isinstance(flight.error, TransientS3Error):
            for index in flight.run:
                if index not in flight.blocks:
                    self._failed[(flight.ref, index)] = flight.error


def _join(flight: _Flight) -> None:
    """A reader waits for ``flight``: if it is readahead, it waits behind the cache writes for
    at most ``JOINED_QUEUE_SECONDS`` more.

    Readahead looks on disk under the disk limiter that the cache writes share; that queue is
    its backpressure when the disk falls behind S3. A reader that caught up with readahead still
    in that queue waited for the writes before it: 4-5 s per 1 MiB read with the cache disk at
    10 MB/s (session 19's review). Such a flight leaves the queue after a bound and looks on
    disk in its GET's call. Nothing else changes: its cache write waits for room as any
    readahead's does (``WriteBehind.write_behind``; left uncached, its blocks made a remount read
    them from S3 again), and cache writes do not yield to it (``WriteBehind._write``). Not at
    once: on a disk that keeps up the queue is short, and it is what paces readahead to the
    writes; leaving it at once, 8 readers fell back to three times the GETs, a quarter slower.
    """
    flight.joined = True
    if flight.queued is not None:
        flight.queued.deadline = min(
            flight.queued.deadline, trio.current_time() + JOINED_QUEUE_SECONDS)


def _pins_more(block: bytes | memoryview) -> bool:
    """Whether ``block`` is a view that keeps a larger GET body alive than itself.

    The LRU counts a block's own length. Blocks of one body enter it together and leave it
    together, oldest first, unless one of them is read again and moves ahead alone: such a block
    becomes a copy, so the body can go with its other blocks (otherwise one 64 KiB block kept
    hot could hold an 8 MiB body, 128x what the LRU counts).
    """
    return isinstance(block, memoryview) and block.nbytes < memoryview(block.obj).nbytes


def _source_keeps(ref: PinnedRef) -> bool:
    """Whether the source stores and counts ``ref``'s bytes itself: a zip member's bytes are its
    archive's, which ``MemberSource`` keeps on disk as archive blocks (one file per 1 MiB, not
    three files per member) and counts as archive GETs. The reader keeps members in memory only,
    and counts them as reads, not S3 requests."""
    return isinstance(ref, MemberRef)


def _root_cause(exc: BaseException) -> BaseException:
    """The first real error inside (possibly nested) exception groups from parallel GETs.

    Typed errors (stale object, access denied) win over others, so the reader sees what the
    kernel should be told.
    """
    leaves = list(_leaves(exc))
    typed = [leaf for leaf in leaves if isinstance(leaf, S3DataFSError)]
    return (typed or leaves or [exc])[0]


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _pieces(
    run: range, hits: dict[int, bytes], most: int = MAX_PIECES
) -> tuple[list[range], dict[int, bytes]]:
    """The GETs of readahead over ``run`` given *every* cached block of it (``hits``): its
    uncached stretches, at most ``most`` of them - those across the shortest cached stretches
    between are one GET - and the hits outside them.

    At most ``MAX_PIECES`` so a run cached here and there by random reads costs a few requests,
    not one per hole; the longest cached stretches are the ones left out.
    """
    pieces = consecutive_runs([index for index in run if index not in hits], len(run))
    while len(pieces) > most:
        number = min(range(len(pieces) - 1), key=lambda n: pieces[n + 1].start - pieces[n].stop)
        pieces[number : number + 2] = [range(pieces[number].start, pieces[number + 1].stop)]
    if not pieces:
        return [], hits
    return pieces, {index: block for index, block in hits.items()
                    if not any(index in piece for piece in pieces)}


def _uncached(run: range, hits: dict[int, bytes]) -> tuple[range, dict[int, bytes]]:
    """What of ``run`` one GET fetches given the cached ``hits`` - from its first missing block
    to its last (``_pieces`` with one piece) - and the hits outside that range (those inside
    come again with the GET)."""
    pieces, outside = _pieces(run, hits, most=1)
    return (pieces[0] if pieces else range(run.stop, run.stop)), outside
