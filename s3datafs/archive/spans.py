"""Archive bytes for ``MemberSource``: shared, read-ahead spans over disk-cached archive blocks.

Two layers, both thread-safe (``MemberSource`` calls them from worker threads, and ``peek``
from the trio thread):

- ``ArchiveBlocks``: ranges of an archive through the disk cache, kept as the archive's own
  blocks (not per member), written behind the reads.
- ``Spans``: members read in archive order share growing spans of the archive, read ahead in the
  background; scattered reads fetch exactly their bytes.

Every byte comes from a ranged GET of the pinned archive through the wrapped ``ObjectSource``
(VersionId and If-Match travel with it). The invariants are in each class's docstring.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..cache.blockfile import object_digest
from ..cache.disk import DiskCache, TroubleLog, consecutive
from ..cache.pace import WritePace
from ..config import DEFAULT_WRITE_BEHIND
from ..model import ObjectRef, ObjectSource
from ..quietthread import QuietThreadPool, start_quiet_thread
from ..reader import ONE_HOP_BYTES, ReadStats

_MIN_SPAN = 512 * 1024  # archive-order reads: first span, doubling up to
_MAX_SPAN = 8 * 1024 * 1024
_NEAR_BEFORE = 64 * 1024  # a fetch "continues" one that ended this close before its start
_NEAR_AFTER = 64 * 1024  # ... or after it (a skipped small member, a local header)
_SPANS_AHEAD = 2  # spans fetched ahead of the one being read (S3's latency hidden)
_AHEAD_THREADS = 2
_AHEAD_FROM_SPAN = 2 * 1024 * 1024  # read ahead once a streak's spans have grown this far
_RECENT_ENDS = 32  # per archive: about the readers' count times a few
_RECENT_ARCHIVES = 64
_SHARED_SLACK = 8  # a span shares its blocks when they hold at most 1/8 more than it


class ArchiveBlocks:
    """Ranges of archives through the disk cache, as the archive's own blocks.

    Members are kept on disk as the blocks of their archive (raw, compressed as stored), not
    as blocks of each member: 20,000 small members would otherwise cost 20,000 cache
    directories, metadata and block files, which is where a read of every member spent its
    time. A range is served from the disk cache when every block it touches is there; otherwise
    the whole blocks it touches are fetched with one GET and stored (so a scattered small member
    costs at most two blocks, as a scattered read of any object does). The block reader keeps
    members in memory only (see ``reader``).

    Longer fetches (spans) are written behind, by one writer thread, so a reader (and everyone
    waiting for its span) never waits for the disk: up to ``write_behind`` bytes may be pending
    (less where the disk is slow: what it writes in a second, ``cache.pace``), after which a
    fetch waits for room (memory stays bounded when the disk falls behind).
    Pending blocks are served from memory, so they are never fetched twice, and a span holds
    them as views (``get_shared``), so its bytes are in memory once, not twice. A short fetch (a
    scattered member, at most ``reader.ONE_HOP_BYTES``) is written by the thread that fetched it,
    before it returns: handing it to the writer costs a thread wake-up and GIL hand-offs, more
    than the write (as for the block reader's short runs, see ``reader.BlockReader._fill``).
    ``close`` drains what is pending (a remount right after finds everything read). Cache
    trouble is logged at most once a minute for each kind and never fails a read.

    ``forget`` and writes under way: a write, behind or by its fetching thread, may land after
    ``forget`` zeroed the entries of its blocks, making bytes that decoded to damage valid on
    disk again (the member then failed once more from the disk before S3 was asked). So every
    write is noted (``_Write``) from its fetch until it lands, ``forget`` marks the blocks it
    forgot in the writes under way, and each write forgets those once more when it lands.
    """

    def __init__(
        self, inner: ObjectSource, disk: DiskCache | None, stats: ReadStats | None = None, *,
        write_behind: int = DEFAULT_WRITE_BEHIND, write_inline: int = ONE_HOP_BYTES,
    ) -> None:
        self._inner = inner
        self._disk = disk
        self.stats = stats or ReadStats()
        self._trouble = TroubleLog()
        self._room = threading.Condition()  # guards the three below, and ``stats``
        self._pending: dict[tuple[str, int], bytes] = {}  # (digest, index) -> block to write
        self._pending_bytes = 0
        self._writing: set[_Write] = set()  # fetched blocks not landed on disk yet
        self._pace = WritePace(_MAX_SPAN, write_behind)  # the pending bound: the disk's pace
        self._write_inline = write_inline
        self._writer: ThreadPoolExecutor | None = None  # started by the first write behind
        self._closed = False  # no writer is started any more (``close``)
        self._sync_queued = False  # a disk cache sync due after a short fetch's write

    def get_range(self, archive: ObjectRef, start: int, end: int) -> bytes:
        data, at = self._blocks_of(archive, start, end)
        return data[at: at + end - start]  # the same object when that is all of it

    def get_shared(self, archive: ObjectRef, start: int, end: int) -> bytes | memoryview:
        """``get_range``'s bytes, as a view of the blocks they came in when those are not much
        larger: a span's blocks are then held once, by the span and the write-behind together,
        instead of once each (a copy of every span, and twice its bytes while it is pending)."""
        data, at = self._blocks_of(archive, start, end)
        if len(data) - (end - start) > (end - start) // _SHARED_SLACK:
            return data[at: at + end - start]  # a short range of large blocks: keep only it
        return memoryview(data)[at: at + end - start]

    def _blocks_of(self, archive: ObjectRef, start: int, end: int) -> tuple[bytes, int]:
        """Whole blocks holding ``[start, end)`` (or just it, with no disk cache), and where in
        them ``start`` is."""
        disk = self._disk
        if disk is None:
            return self._fetch(archive, start, end), 0
        size = disk.block_size
        blocks = range(start // size, (end - 1) // size + 1)
        digest = object_digest(archive)
        with self._room:
            found = {i: b for i in blocks if (b := self._pending.get((digest, i))) is not None}
        if len(found) < len(blocks):
            try:
                on_disk = disk.read_run(digest, archive.size, blocks, ends=False)
            except OSError as exc:
                self._trouble.warn(f"cannot read the block cache ({exc}); reading from S3",
                                   kind="read")
                on_disk = {}
            found.update(on_disk)
            if len(found) == len(blocks):  # else all are fetched: none of them is a hit
                with self._room:
                    self.stats.disk_hits += len(on_disk)
                    self.stats.disk_bytes += sum(map(len, on_disk.values()))
        low = blocks.start * size
        if all(index in found for index in blocks):
            return b"".join(found[index] for index in blocks), start - low
        # One GET for all the blocks, those at hand included: the span is then one object
        # (joined with blocks at hand it would be a copy, held beside the write-behind's views
        # of the GET: 1.5x the bytes measured while the disk lagged).
        high = min(blocks.stop * size, archive.size)
        data = self._fetch(archive, low, high)
        view = memoryview(data)
        parts = [view[at: at + size] for at in range(0, len(data), size)]
        if len(data) <= self._write_inline:
            # A sync that falls due (a scan of the whole cache) goes to the writer thread.
            self._write_here(archive, digest, blocks.start, parts)
            if disk.sync_due:
                self._sync_behind(disk)
        else:
            self._store(archive, digest, blocks.start, parts)
        return data, start - low

    def count(self, **increments: int) -> None:
        """Add to ``stats`` counters: ``stats`` is shared with ``MemberSource`` and its kept
        members (``archive.decompressed``), and this lock guards it for all of them."""
        with self._room:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def forget(self, archive: ObjectRef, start: int, end: int) -> None:
        """``[start, end)`` of ``archive`` decoded to damage: its blocks are fetched anew."""
        disk = self._disk
        if disk is None:
            return
        size, digest = disk.block_size, object_digest(archive)
        blocks = range(start // size, (end - 1) // size + 1)
        with self._room:
            for index in blocks:
                self._pending.pop((digest, index), None)  # no longer served from memory
            for write in self._writing:  # forgotten again when they land
                if write.digest == digest:
                    write.forgotten.update(_overlap(write.blocks, blocks))
        try:
            disk.forget_blocks(digest, blocks)
        except OSError as exc:
            self._write_failed(exc)

    def _fetch(self, archive: ObjectRef, start: int, end: int) -> bytes:
        data = self._inner.get_range(archive, start, end)
        with self._room:
            self.stats.s3_requests += 1
            self.stats.s3_bytes += len(data)
        return data

    def close(self) -> None:
        """Write what is pending, then stop the writer. Fetches that land later (a span read
        ahead as the mount ends, a read given up on) are served and not written behind, and no
        writer is started for them: before, one started after a ``close`` that had none to stop
        was never stopped (a thread left at unmount, writing after the drain)."""
        with self._room:
            self._closed = True
            writer = self._writer
        if writer is not None:
            writer.shutdown(wait=True)

    def _store(self, archive: ObjectRef, digest: str, first: int, blocks: list[memoryview]) -> None:
        cost = sum(map(len, blocks))
        write = _Write(digest, range(first, first + len(blocks)))
        with self._room:
            while self._pending_bytes and self._pending_bytes + cost > self._pace.allowance:
                self._room.wait()
            self._pending_bytes += cost
            for index, block in enumerate(blocks, first):
                self._pending[(digest, index)] = block
            self._writing.add(write)
        try:
            self._writer_pool().submit(self._write, archive, write, blocks, cost)
        except RuntimeError:  # closed (a span read ahead landed as the mount ends): not written
            self._written(write, blocks, cost)

    def _write_here(
        self, archive: ObjectRef, digest: str, first: int, blocks: list[memoryview]
    ) -> None:
        """A short fetch's write, by the thread that fetched it (its due sync left to the
        caller); what ``forget`` took meanwhile is forgotten again once it lands."""
        write = _Write(digest, range(first, first + len(blocks)))
        with self._room:
            self._writing.add(write)
        try:
            self._write_now(archive, digest, first, blocks, sync=False)
        finally:
            self._landed(write)

    def _writer_pool(self) -> ThreadPoolExecutor:
        """The writer thread's pool; RuntimeError once closed, as a pool shut down raises."""
        with self._room:
            if self._closed:
                raise RuntimeError("the archive blocks' writer is closed")
            if self._writer is None:
                self._writer = QuietThreadPool(1, thread_name_prefix="s3datafs-zip-cache")
            return self._writer

    def _sync_behind(self, disk: DiskCache) -> None:
        with self._room:
            if self._sync_queued:
                return
            self._sync_queued = True
        try:
            self._writer_pool().submit(self._sync, disk)
        except RuntimeError:  # closed: the scan is left to the next mount (a read must not fail)
            with self._room:
                self._sync_queued = False

    def _sync(self, disk: DiskCache) -> None:
        try:
            disk.try_sync()
        finally:
            with self._room:
                self._sync_queued = False

    def _write(self, archive: ObjectRef, write: _Write, blocks: list[memoryview],
               cost: int) -> None:
        try:
            self._write_now(archive, write.digest, write.blocks.start, blocks)
        finally:
            self._written(write, blocks, cost)

    def _written(self, write: _Write, blocks: list[memoryview], cost: int) -> None:
        """Blocks stored with ``_store`` are no longer pending: their room is free again."""
        with self._room:
            for index, block in enumerate(blocks, write.blocks.start):
                if self._pending.get((write.digest, index)) is block:  # not a later fetch's
                    del self._pending[(write.digest, index)]
            self._pending_bytes -= cost
            self._room.notify_all()
        self._landed(write)

    def _landed(self, write: _Write) -> None:
        """``write`` is on disk (or failed): the blocks ``forget`` took meanwhile are forgotten
        there again, their entries having been made valid after ``forget`` zeroed them."""
        with self._room:
            self._writing.discard(write)
            forgotten = sorted(write.forgotten)
        try:
            for run in consecutive(forgotten):
                self._disk.forget_blocks(write.digest, run)
        except OSError as exc:
            self._write_failed(exc)

    def _write_now(self, archive: ObjectRef, digest: str, first: int,
                   blocks: list[memoryview], *, sync: bool = True) -> None:
        """Write ``blocks`` now, timed for the disk's pace (``cache.pace``); never raises."""
        try:
            with self._pace.writing(sum(map(len, blocks))):
                self._disk.write(archive, digest, first, blocks, sync=sync)
        except Exception as exc:  # the bytes are good: a cache fault (or bug) must not fail them
            self._write_failed(exc)

    def _write_failed(self, exc: Exception) -> None:
        """Counted (``status``, and ``s3datafs prefetch`` says the archive is not warm) and
        warned of at most once a minute."""
        with self._room:
            self.stats.cache_write_errors += 1
        self._trouble.write_failed(exc)


@dataclass(eq=False)  # one per write, told apart by identity
class _Write:
    """Blocks ``blocks`` of the object ``digest`` on their way to the disk cache, and those of
    them ``forget`` forgot meanwhile (see ``ArchiveBlocks``)."""

    digest: str
    blocks: range
    forgotten: set[int] = field(default_factory=set)


def _overlap(one: range, other: range) -> range:
    """The indices in both of two ranges (of step 1)."""
    return range(max(one.start, other.start), min(one.stop, other.stop))


class _Ahead:
    """``_AHEAD_THREADS`` daemon threads fetching spans ahead, started on the first one.

    Daemon threads, because nothing should wait for them: a GET stalled on S3 would hold up the
    end of the process until its deadline (a foreground mount took ~60 s to exit after SIGTERM
    while S3 stalled). Spans queued when closed fail, and so do spans no thread could be
    started for, so no reader waits on one that will never be fetched.
    """

    def __init__(
        self, fetch: Callable[[_Span], None], fail: Callable[[_Span, BaseException], None]
    ) -> None:
        self._fetch, self._fail = fetch, fail
        self._queue: queue.SimpleQueue[_Span | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._closed = False

    def submit(self, span: _Span) -> None:
        """Queue ``span`` for a thread; fail it if there is none to fetch it (closed, or no
        thread could be started: a pids limit), so no reader waits for it."""
        failure: BaseException | None = None
        with self._lock:
            if self._closed:
                failure = RuntimeError("closed")
            elif self._threads < _AHEAD_THREADS:
                try:
                    start_quiet_thread(self._work, name=f"s3datafs-zip_{self._threads + 1}")
                except RuntimeError as exc:  # "can't start new thread": try again next time
                    if not self._threads:
                        failure = exc
                else:
                    self._threads += 1
            if failure is None:  # under the lock: never behind the stop signals of ``close``
                self._queue.put(span)
        if failure is not None:
            self._fail(span, failure)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._queue.put(None)

    def _work(self) -> None:
        while (span := self._queue.get()) is not None:
            if self._closed:
                self._fail(span, RuntimeError("closed"))
            else:
                self._fetch(span)


def _joined(parts: list[bytes | memoryview]) -> bytes:
    """``parts`` as one ``bytes`` of their own: what a reader keeps must not hold a span's
    blocks alive (its memory cache counts the bytes it asked for, not the span's)."""
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


class _Span:
    """One GET of an archive stretch: in flight until ``done``; then ``data`` or ``error``."""

    def __init__(self, archive: ObjectRef, start: int, end: int) -> None:
        self.archive, self.start, self.end = archive, start, end
        self.done = threading.Event()
        self.data: bytes | memoryview = b""  # a view of the blocks fetched (``get_shared``)
        self.error: BaseException | None = None

    def holds(self, archive: ObjectRef, at: int) -> bool:
        return self.archive == archive and self.start <= at < self.end and self.error is None


class Spans:
    """Archive bytes for members read in archive order: fetched in growing spans, shared.

    Reading every member of an archive one GET per member pays S3's latency 20,000 times; a
    download pays it once. So when a member's bytes start where a recent fetch of the same
    archive ended (members read in archive order, by one reader or several), the fetch becomes
    a *span* running past the member, doubling from ``_MIN_SPAN`` up to ``_MAX_SPAN`` while the
    streak lasts; the next members are then served from it (or wait for it while it is in
    flight: single-flight). A range that crosses from one span into the next is put together
    from both, and a new span ends where a planned one begins, so no byte is fetched twice.
    Any other read fetches exactly what it needs, so a job reading 1% of the members at random
    pays nothing for this.

    Readahead: once a span of ``_AHEAD_FROM_SPAN`` or more (a streak, not two reads that
    happen to be neighbours) is read from, the ``_SPANS_AHEAD`` spans after it are fetched in
    the background (by ``_AHEAD_THREADS`` threads), so readers in a streak find their bytes
    landed instead of waiting for S3's latency once per span. Spans are kept in memory up to
    ``max_bytes`` (in flight included), the least recently used leaving first; every byte
    still comes from a pinned ranged GET.
    """

    def __init__(self, inner: ArchiveBlocks, *, max_bytes: int) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._spans: list[_Span] = []  # newest last; in flight or done
        self._bytes = 0
        self._max_bytes = max_bytes
        # Room for the span being read, the ones ahead and one more: a span larger than that
        # would evict what readers are still reading.
        self._largest = max(_MIN_SPAN, min(_MAX_SPAN, max_bytes // (_SPANS_AHEAD + 2)))
        self._ends: dict[ObjectRef, list[int]] = {}  # archive -> ends of its recent fetches
        self._span_size: dict[ObjectRef, int] = {}
        # Threads start on the first readahead: scattered reads never start one.
        self._ahead = _Ahead(self._fetch_quietly, self._failed)

    def read(self, archive: ObjectRef, start: int, end: int) -> bytes:
        parts: list[bytes | memoryview] = []
        at = start
        while at < end:
            with self._lock:
                span = self._holding(archive, at)
                mine = False
                if span is None:
                    span = self._plan(archive, at, end)
                    mine = span is not None
                ahead = self._plan_ahead(span) if span is not None else []
            self._start(ahead)
            if span is None:  # not in a streak: exactly what is needed
                parts.append(self._inner.get_range(archive, at, end))
                self._note_end(archive, end)
                break
            if mine:
                self._fetch(span)
            else:
                span.done.wait()
            if span.error is not None:
                if mine:
                    raise span.error
                continue  # another reader's span failed: the next pass plans our own
            part = span.data[at - span.start: min(end, span.end) - span.start]
            if not part:  # past the archive's end: let S3 say what is wrong
                parts.append(self._inner.get_range(archive, at, end))
                break
            parts.append(part)
            at += len(part)
        return _joined(parts)

    def peek(self, archive: ObjectRef, start: int, end: int) -> bytes | None:
        """``[start, end)`` if landed spans hold it, else None; never fetches or waits.

        What it plans ahead is started however it ends: a span planned is in the table, and a
        reader that finds one waits for it to land.
        """
        parts: list[bytes | memoryview] = []
        ahead: list[_Span] = []
        at = start
        try:
            with self._lock:
                while at < end:
                    span = self._holding(archive, at)
                    if span is None or not span.done.is_set() or span.error is not None:
                        return None
                    ahead += self._plan_ahead(span)
                    part = span.data[at - span.start: min(end, span.end) - span.start]
                    if not part:
                        return None
                    parts.append(part)
                    at += len(part)
        finally:
            self._start(ahead)
        return _joined(parts)

    def close(self) -> None:
        """Stop fetching ahead (queued readahead is dropped; a GET in progress ends)."""
        self._ahead.close()

    def forget(self, archive: ObjectRef, start: int, end: int) -> None:
        """Drop the spans holding any of ``[start, end)`` of ``archive`` (see
        ``ArchiveBlocks.forget``), and those blocks on disk.

        Spans in flight too: one may have taken the same bytes from the disk or the pending
        writes before they were forgotten there, and landing after this it served them again
        once the member's reads were let through (a test held one). Readers waiting for it
        still get its bytes; later ones fetch their own.
        """
        with self._lock:
            for span in [s for s in self._spans if s.archive == archive
                         and s.start < end and start < s.end]:
                self._spans.remove(span)
                self._bytes -= span.end - span.start
        self._inner.forget(archive, start, end)

    # -- with the lock held ---------------------------------------------------------------------

    def _holding(self, archive: ObjectRef, at: int) -> _Span | None:
        """The span holding byte ``at``, marked used (LRU: most recently used last)."""
        span = next((s for s in reversed(self._spans) if s.holds(archive, at)), None)
        if span is not None and span is not self._spans[-1]:
            self._spans.remove(span)
            self._spans.append(span)
        return span

    def _plan(self, archive: ObjectRef, start: int, end: int) -> _Span | None:
        """A new span starting at ``start`` if it continues a recent fetch."""
        ends = self._ends.get(archive, [])
        if not any(e - _NEAR_BEFORE <= start <= e + _NEAR_AFTER for e in ends):
            self._span_size[archive] = _MIN_SPAN
            return None
        return self._add(archive, start, end)

    def _add(self, archive: ObjectRef, start: int, end: int = 0) -> _Span:
        """A new span from ``start``; it stops where a span already planned begins (the reader
        goes on into that one), so no byte is fetched twice."""
        size = self._span_size.get(archive, _MIN_SPAN)
        self._span_size[archive] = min(size * 2, self._largest)
        stop = min((s.start for s in self._spans if s.archive == archive and s.start > start),
                   default=archive.size)
        span = _Span(archive, start, min(max(end, start + size), stop, archive.size))
        self._spans.append(span)
        self._remember_end(archive, span.end)
        self._bytes += span.end - span.start
        while self._bytes > self._max_bytes and len(self._spans) > 1:
            used_least = self._spans.pop(0)  # readers holding it keep their reference
            self._bytes -= used_least.end - used_least.start
        return span

    def _plan_ahead(self, span: _Span) -> list[_Span]:
        """The spans after ``span`` not planned yet, up to ``_SPANS_AHEAD``, to be fetched."""
        planned: list[_Span] = []
        if span.end - span.start < _AHEAD_FROM_SPAN:
            return planned  # a short streak yet (two scattered reads may look like one)
        at = span.end
        for _ in range(_SPANS_AHEAD):
            if at >= span.archive.size:
                break
            if (after := self._holding(span.archive, at)) is None:
                after = self._add(span.archive, at)  # may evict the least recently used
                planned.append(after)
            at = after.end
        return planned

    def _remember_end(self, archive: ObjectRef, end: int) -> None:
        ends = self._ends.setdefault(archive, [])
        ends.append(end)
        del ends[:-_RECENT_ENDS]
        if len(self._ends) > _RECENT_ARCHIVES:
            del self._ends[next(iter(self._ends))]

    # -- without it -----------------------------------------------------------------------------

    def _start(self, spans: list[_Span]) -> None:
        for span in spans:
            self._ahead.submit(span)

    def _fetch_quietly(self, span: _Span) -> None:
        with contextlib.suppress(Exception):  # readers that need it retry on their own
            self._fetch(span)

    def _fetch(self, span: _Span) -> None:
        try:
            span.data = self._inner.get_shared(span.archive, span.start, span.end)
        except BaseException as exc:
            self._failed(span, exc)
            raise
        finally:
            span.done.set()

    def _failed(self, span: _Span, error: BaseException) -> None:
        span.error = error
        with self._lock:
            if span in self._spans:
                self._spans.remove(span)
                self._bytes -= span.end - span.start
        span.done.set()

    def _note_end(self, archive: ObjectRef, end: int) -> None:
        with self._lock:
            self._remember_end(archive, end)
