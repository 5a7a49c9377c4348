"""The persistent block cache: blocks of pinned objects on local disk, shared, bounded, crash-safe.

Layout under ``<cache-dir>/blocks/<block-size>/``::

    <d[:2]>/<d>.r<region>     blocks region*R .. region*R+R-1 of the object with digest ``d``,
                              each in its own slot, written in place (R = REGION_BYTES / block
                              size), after a header and the object's identity (bucket, key,
                              version, ETag, size, dataset; format in ``blockfile``)
    .lock                     flock taken while scanning/evicting and by ``cache clear``

One file per region and nothing else per object: a small object costs one file (one inode), and
the byte bound counts everything an object takes (format 3 added a directory and a ``meta.json``
per object, uncounted: as much disk as the blocks of a small object, and two more inodes).

Why regions: on this kind of machine creating a file costs far more than writing 64 KiB into it
(profiled: ~65% of the daemon's time went to creating 64 KiB block files during a cold read; a
new file cost 0.14-0.9 ms there, in the inode allocator of an ext4 without a journal, which
skips the inodes deleted in the last minute one by one - as eviction keeps deleting; 15-20 us on
a quiet filesystem, ~20 us to write 64 KiB into an existing file). Formats 1 and 2 renamed a new
file into place per block or per chunk, so every random read and every small object cost a file
creation. A region file is created once, by its first block; later blocks of the region - random
reads, the rest of a chunk, a re-fetched damaged block - are written into their slots of the
existing file. A readahead GET (8 MiB, aligned) fills a whole region with one write; a random
4 KiB read adds one 64 KiB slot. Each block has its own checksum in the region's table, so a
read of a few blocks reads and verifies just those.

``d`` is ``blockfile.object_digest(ref)``: a pinned (bucket, key, VersionId, ETag) names bytes that
never change, so a block stays valid forever, across remounts, processes and mount points.

Invariants:
- Crash safety without renames: a slot's payload is written before its table entry, and the
  entry holds the payload's crc32 and a check naming the object and the block, so a crash or a
  torn write leaves a miss, never bytes (``blockfile``). Every block is verified on every read;
  a damaged block's entry is zeroed (a miss, fetched and written again), a file whose header
  is not its own (damaged, another format version) is deleted. The object directories of the
  earlier formats are removed by a thread the next scan starts (the last point below).
- Sharing: processes write the same bytes for the same object (the digest names one pinned
  version), each block in its own slot and entry, so concurrent writers of one region never
  need a lock and never mix blocks. Every write opens its region file with ``O_CREAT`` and
  writes its header (the same bytes for every writer), so a file whose creator died before the
  header is mended by the next write.
- Runs of block payloads of at least ``DIRECT_MIN`` (readahead) are written with ``O_DIRECT``
  (``files.pwrite_direct``): the FUSE file's pages already hold what was just read, so the cache
  file does not take page cache a second time, and the write costs no copy into fresh pages.
  Shorter runs (random reads, small objects) are written buffered: fewer syscalls, little page
  cache. A filesystem that refuses ``O_DIRECT`` switches this cache to buffered writes for good.
  Header and identity (one write) and table entries are small buffered writes (two writers of
  one page never lose each other's entries); reads stay buffered.
- Privacy: every directory is created 0700 and every file 0600. A directory removed while
  mounted (``cache clear``, ``rm -rf``) is made again by the next write, just as private.
- Eviction never hurts a reader: readers read what they need of a file through the descriptor
  they opened; on Linux an unlinked file stays readable through an open descriptor. A write
  into a file evicted meanwhile is lost with it (a later miss, never wrong bytes).
- Bound: a byte-counted LRU (``cachetools.LRUCache``, ``popitem`` unlinks) of region files by
  allocated bytes (``st_blocks``: the files are sparse) holds this process's view. Several
  processes may share the directory, so every ``sync_every`` bytes written (and at start) a
  scan under the ``.lock`` flock rebuilds the view from the disk, ordered by mtime (disk hits
  refresh mtime at most once a minute), and evicts down to the capacity. Between scans the
  total can overshoot by at most ``sync_every`` per process (a little more while a scan that
  ``write(sync=False)`` left to its caller waits to run). What counts is what each write
  added to its file on disk (``st_blocks`` before and after), not what the index says the file
  held: the index's entry for a file another process evicted is stale. And it is at least the
  payload written: ZFS reports a file's blocks only once its transaction group commits
  (``st_blocks`` is 1 right after the write), and counted by ``st_blocks`` alone its writes
  never made a scan fall due (a block written again counts again: an early scan, no more).
  A mount's scan that fails (``try_sync``) is warned of (a bug in it: its traceback, once),
  ends nothing, and is tried again ``sync_every`` bytes later; until one succeeds only this
  process's own files are counted.
- Memory does not grow with the cache: the index holds at most ``INDEX_ENTRIES`` files (the
  most recently used; a 20 GiB cache of 4 KiB objects is 2.6 million files, 0.7 GiB indexed
  whole). Past that it is *partial*: files it forgot are still found by reads (``may_hold``
  then says yes to everything), counted by the next scan and evicted by it, oldest first. A
  scan keeps only the newest ``INDEX_ENTRIES`` and, when over the bound, the oldest files that
  make up the excess, as many as it deletes (measured over 300,000 files: peak 50 MiB instead
  of 231, index 36 MiB instead of 86).
- Threads: every public method may be called from worker threads; the index is guarded by one
  ``threading.Lock``; file I/O happens outside it (the files an eviction deletes too: once the
  lock is let go, ``_unlink_evicted``).
- What earlier formats left (a directory per object) is never read, and is removed by a thread
  of its own (``_remove_earlier_formats``), not by the scan that finds it: outside the ``.lock``
  (no file of this format is touched) and unwaited for by an unmount. Removed in the scan, a
  large cache of an upgraded host held the lock for minutes (100,000 objects: 47 s), and every
  mount sharing the cache waited with it, unmounts included (a review, session 25).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import logging
import math
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cachetools

from ..config import make_private_dirs
from ..model import CachedRef
from ..quietthread import start_quiet_thread
from ..units import human_size
from ..uri import S3Uri
from . import blockfile
from .files import (
    O_DIRECT,
    AlignedBuffers,
    direct_io_supported,
    pwrite_all,
    pwrite_direct,
)

log = logging.getLogger(__name__)

REGION_BYTES = 8 * 1024 * 1024  # the reader's readahead GET (config.DEFAULT_MAX_REQUEST)
DIRECT_MIN = 256 * 1024  # shorter runs are written buffered (``_write_payload``)
_FREE_CHECK_SECONDS = 1.0  # --cache-min-free: statvfs at most this often while there is room
_TOUCH_AFTER_SECONDS = 60.0
# Region files this process keeps an index entry for (~300 bytes each: ~40 MiB). A 20 GiB
# cache of 4 KiB objects is 2.6 million files: indexed whole, 0.7 GiB of daemon memory.
INDEX_ENTRIES = 131_072


class _UnlinkingLRU(cachetools.LRUCache):
    """Maps a region file's relative path to its size on disk; evicting an entry deletes the
    file, once its caller has let go of the index's lock: the entry goes to ``evicted``, which
    ``DiskCache._unlink_evicted`` empties. At most ``INDEX_ENTRIES`` entries: past that the least
    recently used are forgotten (not deleted) and the index is ``partial``: it no longer knows
    every file (see ``DiskCache``).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(maxsize=capacity, getsizeof=lambda size: size)
        self.partial = False
        self.evicted: list[str] = []  # files to delete (relative paths)

    def __setitem__(self, name: str, size: int) -> None:
        super().__setitem__(name, size)
        while len(self) > INDEX_ENTRIES:
            cachetools.LRUCache.popitem(self)  # forgotten: the file stays (the scan sees it)
            self.partial = True

    def popitem(self) -> tuple[str, int]:
        name, size = super().popitem()
        self.evicted.append(name)
        return name, size


@dataclass(frozen=True)
class CacheUsage:
    bytes: int
    blocks: int
    by_dataset: dict[str, int]


class TroubleLog:
    """Cache trouble is logged at most once per ``interval`` for each ``kind`` of it: it must
    never flood the log, and one kind must not hide another (a disk that falls behind, warned
    of, then turns read-only: its refusals went unsaid for a minute, and a short mount never
    said them at all).

    Thread-safe: the block reader warns from the trio thread, ``MemberSource`` from workers.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}  # by kind
        self._lock = threading.Lock()
        self._bugs_told: set[str] = set()  # kinds

    def warn(self, message: str, *, kind: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                return
            self._last[kind] = now
        log.warning("%s", message)

    def write_failed(self, exc: Exception) -> None:
        """A cache write failed; the bytes were good, so reads go on from S3. The disk's refusal
        is warned of as above; anything else is a bug: its traceback, once."""
        if isinstance(exc, OSError):
            self.warn(f"cannot write to the block cache ({exc}); reads continue from S3",
                      kind="write")
            return
        self.bug("unexpected error writing to the block cache; reads continue from S3", exc,
                 kind="write")

    def bug(self, message: str, exc: BaseException, *, kind: str) -> None:
        """Cache trouble that is no disk's refusal (a bug): ``message`` with its traceback, once
        for each ``kind`` (the same bug would say the same at every write or scan)."""
        with self._lock:
            told = kind in self._bugs_told
            self._bugs_told.add(kind)
        if not told:
            log.error("%s", message, exc_info=exc)


class DiskCache:
    def __init__(
        self,
        cache_dir: Path,
        *,
        block_size: int,
        capacity: int,
        min_free_ratio: float = 0.0,
        dataset: str = "",
        direct_io: bool = True,
    ) -> None:
        if capacity <= 0:
            raise ValueError("a disk cache needs a positive capacity (use no DiskCache instead)")
        self.root = block_root(cache_dir, block_size)
        self.block_size = block_size
        self.layout = blockfile.Layout(block_size, max(1, REGION_BYTES // block_size))
        self._capacity = capacity
        self._min_free_ratio = min_free_ratio
        self._dataset = dataset
        self._lock = threading.Lock()
        self._index = _UnlinkingLRU(capacity)
        self._free_checked_at = -_FREE_CHECK_SECONDS  # --cache-min-free: see ``_make_room``
        self._made_room_at = -math.inf  # when ``_make_room`` last evicted files
        self._free_estimate = self._wanted_free = 0.0
        self._reserved = 0  # bytes of writes under way that passed ``_make_room``
        self._written_since_sync = 0
        self._synced = False  # the first sync is the start-up scan
        self._trouble = TroubleLog()  # scans that fail (``try_sync``)
        self.sync_every = max(capacity // 10, 16 * 1024 * 1024)
        self._direct = AlignedBuffers() if direct_io and direct_io_supported() else None
        make_private_dirs(self.root)

    @property
    def capacity(self) -> int:
        """The bound, in bytes (``--cache-size``)."""
        return self._capacity

    # -- reads ----------------------------------------------------------------------------------

    def read_run(
        self, digest: str, object_size: int, indices: range, *, ends: bool = True,
        every: bool = False,
    ) -> dict[int, bytes]:
        """The cached blocks at the ends of ``indices``: from its start up to the first block
        that is not cached, and (``ends``) from its end back to the last one; with ``every``,
        all of its cached blocks.

        The blocks between are not read: one GET fetches from the first missing block to the
        last (``reader._uncached``), those between included, so reading them would be wasted
        (random reads cache blocks here and there; before, a run stopped at its first miss and
        fetched all the rest, cached blocks at its end included). Only the blocks asked for are
        read (and verified), one region file at a time, in one read per stretch. ``every`` is
        for readahead, whose GETs leave out the cached stretches between (``reader._pieces``):
        the region's table, read anyway, tells where they are.
        """
        found: dict[int, bytes] = {}
        stop = min(indices.stop, -(-object_size // self.block_size))
        regions = list(self.layout.runs(indices.start, stop))
        if every:
            for run in regions:
                found.update(self._read_region(digest, object_size, run, every=True))
            return found
        short = 0  # the first region not whole
        while short < len(regions):
            got = self._read_region(digest, object_size, regions[short])
            found.update(got)
            if len(got) < len(regions[short]):
                break
            short += 1
        else:
            return found  # all of it
        if ends:
            for run in reversed(regions[short:]):
                got = self._read_region(digest, object_size, run, from_end=True)
                found.update(got)
                if len(got) < len(run):
                    break
        return found

    def may_hold(self, digest: str, run: range) -> bool:
        """Whether a region file of ``run`` is known here: its blocks may be cached.

        No I/O, for callers on the trio thread: only this process's index is asked, which the
        last scan and this process's own writes filled. A region another mount wrote since the
        last scan is not known yet (a cache hit still finds it, a moment later). An empty run
        is held: every block of it is at hand (there is none).
        """
        if not run:
            return True
        relatives = [_region_name(digest, self.layout.region_of(i)) for i in (run[0], run[-1])]
        with self._lock:
            return self._index.partial or any(relative in self._index for relative in relatives)

    def _read_region(
        self, digest: str, object_size: int, run: range, *, from_end: bool = False,
        every: bool = False,
    ) -> dict[int, bytes]:
        """The blocks of ``run`` (within one region) from its start up to the first that its
        file does not hold (``from_end``: from its end back; ``every``: all it holds), checked."""
        layout, size = self.layout, self.block_size
        region = layout.region_of(run.start)
        relative = _region_name(digest, region)
        path = self.root / relative
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        found: dict[int, bytes] = {}
        damaged: list[int] = []
        try:
            head = os.pread(fd, layout.entry_offset(run.stop - 1) + blockfile.ENTRY_SIZE, 0)
            state = blockfile.check_header(head, digest, region, layout)
            if state is not blockfile.HeaderState.VALID:
                if state is not blockfile.HeaderState.ABSENT:
                    self._discard(relative, state)
                return found
            present: list[tuple[int, int, int]] = []  # (index, length, crc) in a row
            for index in reversed(run) if from_end else run:
                at = layout.entry_offset(index)
                entry = blockfile.parse_entry(head[at : at + blockfile.ENTRY_SIZE], digest, index)
                if entry is None:
                    if every:
                        continue
                    break
                if entry is False or entry[0] != min(size, object_size - index * size):
                    damaged.append(index)
                    if every:
                        continue
                    break
                present.append((index, *entry))
            present.sort()
            for stretch in _stretches(present):  # one read each (one, unless ``every``)
                low = layout.slot_offset(stretch[0][0])
                data = memoryview(os.pread(fd, (len(stretch) - 1) * size + stretch[-1][1], low))
                for number, (index, length, crc) in enumerate(stretch):
                    block = data[number * size : number * size + length]
                    if len(block) != length or zlib.crc32(block) != crc:
                        damaged.append(index)
                    else:
                        found[index] = block  # a view of the read: no copy
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if damaged:
            self._drop_blocks(relative, sorted(damaged))
            # What lies beyond a damaged block (seen from where the read began) is not a hit;
            # with ``every``, each block stands alone.
            if from_end:
                found = {index: block for index, block in found.items() if index > max(damaged)}
            elif not every:
                found = {index: block for index, block in found.items() if index < min(damaged)}
        if found:
            self._used(relative, info)
        return found

    def _used(self, relative: str, info: os.stat_result) -> None:
        """A file was read: most recently used here, and (once a minute) for other processes."""
        allocated = info.st_blocks * 512
        with self._lock:
            if relative in self._index:
                self._index[relative]  # noqa: B018 - a lookup refreshes the LRU position
            elif 0 < allocated <= self._capacity:
                self._index[relative] = allocated
        self._unlink_evicted()
        if time.time() - info.st_mtime > _TOUCH_AFTER_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(self.root / relative)

    def _discard(self, relative: str, state: blockfile.HeaderState) -> None:
        """A region file that is not what its name says: deleted (a miss, fetched again)."""
        path = self.root / relative
        if state is blockfile.HeaderState.OTHER_VERSION:
            log.info("discarding cache file %s of another format version", path)
        else:
            log.warning("discarding corrupt cache file %s", path)
        self._forget(relative, unlink=True)

    def _drop_blocks(self, relative: str, indices: list[int]) -> None:
        """Damaged blocks: their entries are zeroed, so they are misses until written again.
        One line for them all (a truncated file damages every block past its end)."""
        path = self.root / relative
        if len(indices) == 1:
            log.warning("discarding corrupt cache block %d of %s", indices[0], path)
        else:
            log.warning("discarding %d corrupt cache blocks, between %d and %d, of %s",
                        len(indices), min(indices), max(indices), path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            for index in indices:
                os.pwrite(fd, bytes(blockfile.ENTRY_SIZE), self.layout.entry_offset(index))
        finally:
            os.close(fd)

    def forget_blocks(self, digest: str, indices: range) -> None:
        """Blocks that decoded to damage upstream (a zip member's CRC): misses from now on, so
        the next read fetches them from S3 again instead of the same bytes from here.

        Only the entries written are zeroed: zeros written over a hole (a file whose creator
        died before its header, a page of the table no write reached) would allocate a page that
        no write counts towards the bound, until the next scan.
        """
        size = blockfile.ENTRY_SIZE
        for run in self.layout.runs(indices.start, indices.stop):
            path = self.root / _region_name(digest, self.layout.region_of(run.start))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            try:
                offset = self.layout.entry_offset(run.start)
                table = os.pread(fd, size * len(run), offset)
                written = [n for n in range(len(table) // size)
                           if any(table[n * size : (n + 1) * size])]
                for stretch in consecutive(written):
                    os.pwrite(fd, bytes(size * len(stretch)), offset + stretch.start * size)
            finally:
                os.close(fd)

    def drop(self, digest: str, object_size: int) -> None:
        """Delete every region file of the object ``digest`` (``object_size`` bytes): blocks
        written for bytes found bad before anything could read them (``archive.decompressed``)
        give their room back at once instead of ageing out of the LRU."""
        for name in self._region_names(digest, object_size):
            self._forget(name, unlink=True)

    def holds_files(self, digest: str, object_size: int) -> bool:
        """Whether every region file of the object ``digest`` (``object_size`` bytes) is on disk:
        none was evicted (reads still check their blocks)."""
        return all((self.root / name).exists()
                   for name in self._region_names(digest, object_size))

    def _region_names(self, digest: str, object_size: int) -> list[str]:
        last = max(0, -(-object_size // self.block_size) - 1)
        return [_region_name(digest, region) for region in range(self.layout.region_of(last) + 1)]

    # -- writes ---------------------------------------------------------------------------------

    def write(
        self,
        ref: CachedRef,
        digest: str,
        first_index: int,
        payloads: Sequence[bytes],
        *,
        sync: bool = True,
    ) -> None:
        """Store consecutive blocks of ``ref``; raises OSError if the disk refuses.

        Each region's part of the run is written in place into that region's file: payloads
        first, then their table entries (see ``blockfile``). A ``sync`` that falls due runs
        here (``try_sync``: its failure is not this write's), unless ``sync=False``: then the
        caller runs it when ``sync_due`` says so, off the path of a reader waiting for this write
        (a scan of a full cache takes seconds: 0.1-0.3 s for 20,000 region files).
        """
        identity = blockfile.identity(ref, self._dataset)
        reserved = self._make_room(sum(len(p) for p in payloads))
        try:
            self._write_runs(digest, identity, first_index, payloads)
        finally:
            with self._lock:
                self._reserved -= reserved
        if sync and self.sync_due:
            self.try_sync()

    def _write_runs(
        self, digest: str, identity: bytes, first_index: int, payloads: Sequence[bytes]
    ) -> None:
        """``write``'s blocks, region by region, and the index told."""
        for run in self.layout.runs(first_index, first_index + len(payloads)):
            parts = payloads[run.start - first_index : run.stop - first_index]
            region = self.layout.region_of(run.start)
            relative = _region_name(digest, region)
            path = self.root / relative
            try:
                grown, allocated = self._write_region(
                    path, digest, identity, region, run.start, parts)
            except FileNotFoundError:  # a new fan directory, or removed under us (rm -rf)
                make_private_dirs(path.parent)
                grown, allocated = self._write_region(
                    path, digest, identity, region, run.start, parts)
            with self._lock:
                self._index.pop(relative, None)  # popped, not evicted: no unlink
                if allocated <= self._capacity:
                    self._index[relative] = allocated
                    # At least the payload: ``st_blocks`` may lag behind the write (ZFS
                    # counts a file's blocks once its transaction group commits, seconds later).
                    self._written_since_sync += max(grown, sum(map(len, parts)))
            self._unlink_evicted()
            if allocated > self._capacity:  # larger than the whole cache (a tiny --cache-size)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    @property
    def sync_due(self) -> bool:
        """Whether enough was written since the last ``sync`` to run the next one."""
        return self._written_since_sync >= self.sync_every

    def _write_region(
        self,
        path: Path,
        digest: str,
        identity: bytes,
        region: int,
        first: int,
        parts: Sequence[bytes],
    ) -> tuple[int, int]:
        """Write blocks ``first`` ... into region file ``path``; the bytes the file grew by on
        disk, and its allocated bytes after.

        The growth is the file's own, not the index's idea of it: an entry may be stale (the
        file evicted by another process's scan, or cleared, then written again here), and
        counted against such an entry a mount wrote back what others' scans had evicted without
        a scan ever falling due (two mounts held twice the bound; the model test found it).
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            before = os.fstat(fd).st_blocks * 512
            # Header and identity go with every write, not only the first: the header is the
            # same 64 bytes for every writer, and a file its creator left without one (a crash,
            # ENOSPC) would otherwise stay a miss for good.
            os.pwrite(fd, blockfile.header(digest, region, self.layout) + identity, 0)
            self._write_payload(fd, parts, self.layout.slot_offset(first))
            os.pwrite(fd, blockfile.entries(digest, first, parts), self.layout.entry_offset(first))
            after = os.fstat(fd).st_blocks * 512
            return max(0, after - before), after
        finally:
            os.close(fd)

    def _write_payload(self, fd: int, parts: Sequence[bytes], offset: int) -> None:
        """Payloads at ``offset``: ``O_DIRECT`` while the filesystem takes it, else buffered.

        Runs shorter than ``DIRECT_MIN`` are written buffered: ``O_DIRECT`` copies them into an
        aligned buffer just the same and costs two more syscalls (``fcntl`` on and off), each a
        GIL hand-off while readers wait; the page cache they take is small.
        """
        buffers = self._direct  # read once: another thread may switch it off meanwhile
        if buffers is not None and sum(map(len, parts)) >= DIRECT_MIN:
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, O_DIRECT)
                try:
                    pwrite_direct(fd, parts, offset, buffers)
                finally:
                    fcntl.fcntl(fd, fcntl.F_SETFL, 0)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._direct = None  # tmpfs (older kernels), some FUSE and network filesystems
                log.info("the cache filesystem refuses O_DIRECT (%s): buffered writes", exc)
        pwrite_all(fd, parts, offset)

    def _make_room(self, incoming: int) -> int:
        """Honour --cache-min-free: evict our oldest blocks while the filesystem is too full.

        Returns the bytes reserved for the write, which it gives back once they have landed:
        writes run in several threads, and those that passed this check but have not landed
        are not in the filesystem's free space yet (without the reservation, 8 readers filled
        a 200 MiB cache filesystem to 100 % with the default 5 % to keep free).
        """
        if self._min_free_ratio <= 0:
            return 0
        now = time.monotonic()
        with self._lock:
            # Between checks, free space is counted down by what this process writes: other
            # writers may take some too, which the next check (a second later) sees.
            self._free_estimate -= incoming
            self._reserved += incoming
            fresh = now - self._free_checked_at < _FREE_CHECK_SECONDS
            if fresh and self._free_estimate >= self._wanted_free:
                return incoming
        try:
            fs = self._statvfs()
            wanted_free = self._min_free_ratio * fs.f_blocks * fs.f_frsize
            with self._lock:
                self._free_checked_at, self._wanted_free = now, wanted_free
                self._free_estimate = fs.f_bavail * fs.f_frsize - self._reserved
                shortfall = wanted_free - self._free_estimate
                if shortfall > 0 and self._index:
                    self._made_room_at = now
                while shortfall > 0 and self._index:
                    shortfall -= self._index.popitem()[1]
            self._unlink_evicted()
            if shortfall > 0:
                raise OSError(
                    28, f"less than {self._min_free_ratio:.0%} free on the cache filesystem")
        except BaseException:
            with self._lock:
                self._reserved -= incoming
            raise
        return incoming

    def made_room_since(self, moment: float) -> bool:
        """Whether --cache-min-free evicted files since ``moment`` (``time.monotonic()``)."""
        with self._lock:
            return self._made_room_at >= moment

    def _statvfs(self) -> os.statvfs_result:
        try:
            return os.statvfs(self.root)
        except FileNotFoundError:  # removed under us (rm -rf): made again, as a write does
            make_private_dirs(self.root)
            return os.statvfs(self.root)

    # -- whole-cache maintenance ----------------------------------------------------------------

    def sync(self) -> None:
        """Rebuild the view from disk under the shared lock and evict down to the capacity.

        The bound is the cache directory's: region files of other block sizes (mounts with
        another ``--block-size``) count too, and the oldest go first whichever size they are.
        One scan sums the files and keeps the newest ``INDEX_ENTRIES`` of this block size for
        the index; when over the bound, a second scan picks the oldest files that make up the
        excess (``_oldest_worth``). So memory is bounded by the index and by the files to
        delete: usually a tenth of the cache; nearly all of it after ``--cache-size`` shrank.
        """
        with _locked(self.root):
            newest: list[tuple[float, int, str]] = []  # a heap: (mtime, bytes, name)
            total = ours = 0
            for mtime, size, path, name in self._region_files():
                if size > self._capacity:  # larger than all of it (written with a larger bound)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    continue
                total += size
                if name is not None:
                    ours += 1
                    push = heapq.heappush if len(newest) < INDEX_ENTRIES else heapq.heappushpop
                    push(newest, (mtime, size, name))
            evicted: set[str] = set()
            found = total - self._written_since_sync  # before this mount's first writes
            if found > self._capacity and not self._synced:
                log.warning("the cache at %s holds %s, more than this mount's bound (%s): "
                            "evicting down to it, other datasets' blocks too (mounts sharing a "
                            "cache directory are held to the smallest bound)", self.root,
                            human_size(found), human_size(self._capacity))
            self._synced = True
            if total > self._capacity:
                for path in self._oldest_worth(total - self._capacity):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    evicted.add(path)
            fresh = _UnlinkingLRU(self._capacity)
            for _mtime, size, name in sorted(newest):  # the newest end up most recently used
                if str(self.root / name) not in evicted:
                    fresh[name] = size
            fresh.partial = ours > INDEX_ENTRIES
            with self._lock:
                fresh.evicted += self._index.evicted  # evicted by writes, not deleted yet
                self._index = fresh
                self._written_since_sync = 0
            self._unlink_evicted()

    def try_sync(self) -> None:
        """``sync`` for a mount, which a scan that fails must not end (the cache directory
        unreadable, its lock refused, an I/O error): warned of at most once a minute, and tried
        again once ``sync_every`` more bytes are written, not at every write (a scan failing half
        way would walk the cache again each time). Until one succeeds, what other processes
        cached is not counted, so the directory may hold more than the bound; this process's own
        files still are (its index evicts them). Any other exception is a bug, said once with
        its traceback, and ends nothing either: its callers run it in the mount's nurseries
        (the scan at start, a due scan behind the writes), which it would end.
        """
        try:
            self.sync()
        except Exception as exc:
            with self._lock:
                self._written_since_sync = 0
            if not isinstance(exc, OSError):
                self._trouble.bug("unexpected error scanning the block cache; reads go on, and "
                                  "it may overshoot its bound until a later scan succeeds", exc,
                                  kind="scan")
                return
            self._trouble.warn(f"cannot scan the block cache ({exc}); reads go on, and it may "
                               "overshoot its bound until a later scan succeeds", kind="scan")

    def _region_files(self) -> Iterator[tuple[float, int, str, str | None]]:
        """(mtime, allocated bytes, path, name in our index or None for another block size's
        file) of every region file under the cache directory, every block size's root.

        What the earlier formats left, which this version never reads (a directory per object:
        format 3's ``meta.json`` and region files; formats 1 and 2's file per block or per chunk,
        and their temps), is not counted: once the walk has met some, ``_remove_earlier_formats``
        removes it all (in every root: other block sizes' leftovers were never removed nor
        counted, a review found 200 MiB beyond the bound)."""
        leftovers = False
        for block_root in _subdirs(self.root.parent):
            ours = block_root.path == str(self.root)
            for fan, entry in _fan_entries(Path(block_root.path)):
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir(follow_symlinks=False):
                        leftovers = True
                    elif is_region_file(entry.name):
                        info = entry.stat(follow_symlinks=False)
                        name = f"{fan}/{entry.name}" if ours else None
                        yield info.st_mtime, info.st_blocks * 512, entry.path, name
        if leftovers:
            _remove_earlier_formats(self.root.parent)

    def _oldest_worth(self, excess: int) -> list[str]:
        """Paths of the oldest region files whose bytes add up to at least ``excess``: a heap of
        candidates that drops its newest while the rest still make up the excess."""
        chosen: list[tuple[float, int, str]] = []  # a heap: (-mtime, bytes, path)
        chosen_bytes = 0
        for mtime, size, path, _name in self._region_files():
            if size > self._capacity:
                continue
            heapq.heappush(chosen, (-mtime, size, path))
            chosen_bytes += size
            while chosen and chosen_bytes - chosen[0][1] >= excess:
                chosen_bytes -= heapq.heappop(chosen)[1]
        return [path for _mtime, _size, path in chosen]

    def _forget(self, name: str, *, unlink: bool) -> None:
        with self._lock:
            self._index.pop(name, None)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)

    def _unlink_evicted(self) -> None:
        """Delete the files the index evicted (by any thread), outside its lock. Every thread
        that evicts calls this once it has let go of the lock, so a look without the lock that
        finds nothing misses only names whose own thread deletes them."""
        if not self._index.evicted:
            return
        with self._lock:
            names, self._index.evicted = self._index.evicted, []
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)

    @property
    def used_bytes(self) -> int:
        """Bytes of the files the index knows (all of them unless it is partial)."""
        with self._lock:
            return int(self._index.currsize)


def _stretches(present: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """``present`` (sorted ``(index, length, crc)``) cut where the indices are not consecutive."""
    start = 0
    for number in range(1, len(present) + 1):
        if number == len(present) or present[number][0] != present[number - 1][0] + 1:
            yield present[start:number]
            start = number


def consecutive(indices: list[int]) -> list[range]:
    """Sorted ``indices`` as ranges of consecutive ones."""
    runs: list[range] = []
    for index in indices:
        if runs and runs[-1].stop == index:
            runs[-1] = range(runs[-1].start, index + 1)
        else:
            runs.append(range(index, index + 1))
    return runs


def _region_name(digest: str, region: int) -> str:
    """A region file's path relative to the block root (the LRU's key)."""
    return f"{digest[:2]}/{digest}.r{region}"


def block_root(cache_dir: Path, block_size: int) -> Path:
    return cache_dir / "blocks" / str(block_size)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:  # the cache directory was removed under us: made again
        make_private_dirs(root)
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_earlier_removers: dict[Path, threading.Thread] = {}  # at most one per cache per process
_earlier_removers_lock = threading.Lock()


def _remove_earlier_formats(blocks: Path) -> None:
    """Start removing, in a thread of its own, what earlier formats left under every block
    size's root of ``blocks`` (unless this process is at it already). A daemon thread: an
    unmount does not wait for it, and what it had not removed yet is found by the next scan,
    as is all of it when no thread can be started. Until it is gone it is not counted against
    the bound (it was not before either)."""
    with _earlier_removers_lock:
        running = _earlier_removers.get(blocks)
        if running is not None and running.is_alive():
            return
        try:
            _earlier_removers[blocks] = start_quiet_thread(
                _remove_earlier_format_dirs, args=(blocks,), name="cache-format-sweep")
        except RuntimeError as exc:  # no thread to be had (a pids limit): not the scan's failure
            log.info("cannot start removing an earlier cache format from %s (%s): the next "
                     "scan tries again", blocks, exc)


def _remove_earlier_format_dirs(blocks: Path) -> None:
    started, removed = time.monotonic(), 0
    log.info("removing the cached objects of an earlier cache format from %s", blocks)
    for root in _subdirs(blocks):
        for _fan, entry in _fan_entries(Path(root.path)):
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
    log.info("removed %d cached objects of an earlier cache format from %s in %.1fs", removed,
             blocks, time.monotonic() - started)


def _fan_entries(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(fan directory's name, entry) of everything in the fan directories of a block root."""
    for fan in _subdirs(root):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile (cache clear)
            for entry in os.scandir(fan):
                yield fan.name, entry


def is_region_file(name: str) -> bool:
    """``<64 hex digits>.r<region>``."""
    digest, dot_r, region = name.partition(".r")
    return len(digest) == 64 and bool(dot_r) and region.isascii() and region.isdigit()


def _subdirs(path: Path) -> Iterator[os.DirEntry]:
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                yield entry


# -- offline views for `s3datafs cache stats|clear` ---------------------------------------------

EARLIER_FORMAT = "(an earlier cache format: removed by the next mount)"


@dataclass(frozen=True)
class _Found:
    """A region file (or an object directory of an earlier format) seen by ``_found``."""

    path: Path
    allocated: int  # bytes on disk (all a directory holds)
    identity: dict | None = None  # None: unreadable, or an earlier format
    blocks: int = 0  # table entries written
    earlier_format: bool = False


def usage(cache_dir: Path) -> CacheUsage:
    """Bytes on disk and blocks in the cache, per dataset (all block sizes)."""
    total = count = 0
    by_dataset: dict[str, int] = {}
    for found in _found(cache_dir):
        dataset = EARLIER_FORMAT if found.earlier_format else _dataset_of(found.identity)
        by_dataset[dataset] = by_dataset.get(dataset, 0) + found.allocated
        total += found.allocated
        count += found.blocks
    return CacheUsage(total, count, by_dataset)


def _dataset_of(identity: dict | None) -> str:
    if identity is None:
        return "?"
    return identity.get("dataset") or f"s3://{identity.get('bucket')}/{identity.get('key')}"


def clear(cache_dir: Path, under: S3Uri | None = None) -> int:
    """Delete the cached blocks of every object (or of those ``under`` covers); returns how many
    objects had blocks deleted. What earlier formats left goes in any case."""
    removed: set[str] = set()
    for found in _found(cache_dir):
        if found.earlier_format:
            with _locked(found.path.parent.parent):
                shutil.rmtree(found.path, ignore_errors=True)
        elif under is None or _under(found.identity, under):
            with _locked(found.path.parent.parent), contextlib.suppress(FileNotFoundError):
                found.path.unlink()
            removed.add(found.path.name.partition(".")[0])
    return len(removed)


def _under(identity: dict | None, under: S3Uri) -> bool:
    """Whether ``under`` covers the object; a shortened identity matches as far as it goes
    (deleting a cache file too many costs a GET, keeping one would break the promise)."""
    if identity is None:
        return False
    bucket, key = str(identity.get("bucket")), str(identity.get("key"))
    return under.covers(bucket, key) or (
        bool(identity.get("truncated")) and str(under).startswith(f"s3://{bucket}/{key}")
    )


def _found(cache_dir: Path) -> Iterator[_Found]:
    """Every region file of every block size, read once (header, identity and table), and every
    object directory an earlier format left."""
    for size_dir in _subdirs(cache_dir / "blocks"):
        for _fan, entry in _fan_entries(Path(size_dir.path)):
            path = Path(entry.path)
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir(follow_symlinks=False):
                    yield _Found(path, _allocated_below(path), earlier_format=True)
                elif is_region_file(entry.name):
                    info = entry.stat(follow_symlinks=False)
                    with open(path, "rb") as handle:
                        head = handle.read(blockfile.TABLE_OFFSET)
                        # No more than the file holds: a read allocates what it asks for, and a
                        # header forged with a valid crc may give any block count (2**32 - 1:
                        # 64 GiB asked for, and ``cache stats`` failed with MemoryError).
                        table_size = blockfile.ENTRY_SIZE * blockfile.blocks_in_header(head)
                        table = handle.read(max(0, min(table_size, info.st_size - len(head))))
                    yield _Found(path, info.st_blocks * 512, blockfile.parse_identity(head),
                                 _written(table))


def _written(table: bytes) -> int:
    """Entries written in a region file's table (valid or not: this is a count, not a read)."""
    size = blockfile.ENTRY_SIZE
    return sum(1 for at in range(0, len(table), size) if any(table[at : at + size]))


def _allocated_below(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total
