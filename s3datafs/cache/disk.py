"""The persistent block cache: blocks of pinned objects on local disk, shared, bounded, crash-safe.

Layout under ``<cache-dir>/blocks/<block-size>/``::

    <d[:2]>/<d>/meta.json     identity of the object (bucket, key, version, etag, size, dataset)
    <d[:2]>/<d>/C<chunk>      blocks chunk*M .. chunk*M+M-1 in one file (M = BIG_CHUNK_BYTES/block)
    <d[:2]>/<d>/c<chunk>      blocks chunk*N .. chunk*N+N-1 in one file (N = CHUNK_BYTES/block)
    <d[:2]>/<d>/<index>       one block, when it was fetched without the rest of its chunk
    .lock                     flock taken while scanning/evicting and by ``cache clear``

Why chunks: on this kind of machine creating a file costs far more than writing 64 KiB into it
(profiled: ~65% of the daemon's time went to creating 64 KiB block files during a cold read; with
1 MiB chunk files still ~15%, in ext4's inode allocator, which gets slower the more files were
recently deleted - as eviction keeps doing). A write stores a run in the largest whole files it
covers: a readahead GET (8 MiB, aligned) is one big chunk file, a 1 MiB read a chunk file, a random
read's block its own file. A block is looked up in that order (a miss costs three failed opens).
Every file carries the ``blockfile`` header and a checksum per block, so a read of a few blocks
of a big file reads and verifies just those: a random 4 KiB read still costs one block.

``d`` is ``blockfile.object_digest(ref)``: a pinned (bucket, key, VersionId, ETag) names bytes that
never change, so a block stays valid forever, across remounts, processes and mount points.

Invariants:
- Crash safety: a block is written to a temp file in its directory and ``os.replace``d into place,
  so a reader sees a whole block or none; a temp is unlinked on any error; temps of dead
  processes are swept by the next scan. A block is verified on every read; a bad one is deleted and
  reported as a miss.
- Block files are written with ``O_DIRECT`` (``files.write_direct``): the FUSE file's pages
  already hold what was just read, so the cache file does not take page cache a second time, and
  the write costs no copy into fresh pages. A filesystem that refuses ``O_DIRECT`` switches this
  cache to buffered writes (``files.write_atomically``) for good. Reads stay buffered.
- Privacy: every directory is created 0700 and every file 0600. A directory removed while
  mounted (``cache clear``, ``rm -rf``) is made again by the next write, just as private.
- Eviction never hurts a reader: readers read what they need of a file through the descriptor
  they opened; on Linux an unlinked file stays readable through an open descriptor.
- Bound: a byte-counted LRU (``cachetools.LRUCache``, ``popitem`` unlinks) holds this process's
  view. Several processes may share the directory, so every ``sync_every`` bytes written (and at
  start) a scan under the ``.lock`` flock rebuilds the view from the disk, ordered by mtime (disk
  hits refresh mtime at most once a minute), and evicts down to the capacity. Between scans the
  total can overshoot by at most ``sync_every`` per process.
- Threads: every public method may be called from worker threads; the index is guarded by one
  ``threading.Lock``; file I/O happens outside it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cachetools

from ..model import ObjectRef
from . import blockfile
from .files import TEMP_PREFIX as _TEMP_PREFIX
from .files import AlignedBuffers, direct_io_supported, write_atomically, write_direct

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
BIG_CHUNK_BYTES = 8 * 1024 * 1024  # the reader's readahead GET (config.DEFAULT_MAX_REQUEST)
_STALE_TEMP_SECONDS = 3600.0
_TOUCH_AFTER_SECONDS = 60.0


class _UnlinkingLRU(cachetools.LRUCache):
    """Maps a block's relative path to its size on disk; evicting an entry deletes the file."""

    def __init__(self, capacity: int, root: Path) -> None:
        super().__init__(maxsize=capacity, getsizeof=lambda size: size)
        self._root = root

    def popitem(self) -> tuple[str, int]:
        name, size = super().popitem()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._root / name)
        return name, size


@dataclass(frozen=True)
class CacheUsage:
    bytes: int
    blocks: int
    by_dataset: dict[str, int]


class TroubleLog:
    """Cache trouble is logged at most once per ``interval``: it must never flood the log.

    Thread-safe: the block reader warns from the trio thread, ``MemberSource`` from workers.
    """

    def __init__(self, interval: float = 60.0) -> None:
        self._interval = interval
        self._last = -interval
        self._lock = threading.Lock()

    def warn(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                return
            self._last = now
        log.warning("%s", message)


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
        self.chunk_blocks = max(1, CHUNK_BYTES // block_size)
        self.big_chunk_blocks = max(1, BIG_CHUNK_BYTES // block_size)
        # (name prefix, blocks per file), largest first: where a block may be, in lookup order
        self._levels = [("C", self.big_chunk_blocks), ("c", self.chunk_blocks), ("", 1)]
        self._capacity = capacity
        self._min_free_ratio = min_free_ratio
        self._dataset = dataset
        self._lock = threading.Lock()
        self._index = _UnlinkingLRU(capacity, self.root)
        self._known_objects: set[str] = set()
        self._written_since_sync = 0
        self.sync_every = max(capacity // 10, 16 * 1024 * 1024)
        self._direct = AlignedBuffers() if direct_io and direct_io_supported() else None
        _make_private_dirs(self.root)

    # -- reads ----------------------------------------------------------------------------------

    def read_run(self, digest: str, object_size: int, indices: range) -> dict[int, bytes]:
        """Cached blocks of ``indices``, in order, up to the first one that is not cached.

        Only the blocks asked for are read (and verified), even from a larger file.
        """
        found: dict[int, bytes] = {}
        index, stop = indices.start, min(indices.stop, -(-object_size // self.block_size))
        while index < stop:
            got = self._read_any(digest, object_size, index, stop)
            if not got:
                break
            found.update(got)
            index += len(got)
        return found

    def _read_any(self, digest: str, object_size: int, index: int, stop: int) -> dict[int, bytes]:
        """Blocks ``index`` .. (at most) ``stop - 1`` from the first file that holds ``index``."""
        for prefix, per in self._levels:
            first = index - index % per
            name = f"{prefix}{index // per}" if prefix else str(index)
            payload = self._read_file(digest, name, first, object_size, index, stop)
            if payload is not None:
                return dict(self._split(index, payload))
        return {}

    def _read_file(
        self, digest: str, name: str, first: int, object_size: int, index: int, stop: int
    ) -> bytes | None:
        """Blocks ``index`` .. ``stop - 1`` (or to its end) of file ``name``, verified; or None."""
        expected = self._span_length(name, first, object_size)
        head = blockfile.head_size(expected, self.block_size)
        low = (index - first) * self.block_size
        high = min((stop - first) * self.block_size, expected)
        relative = f"{digest[:2]}/{digest}/{name}"
        path = self.root / relative
        try:
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                if low == 0 and high == expected:  # all of it: one read
                    data = handle.read(head + expected + 1)
                    payload = blockfile.decode(data, digest, first, expected)
                else:  # a part: the head, then only the blocks asked for
                    data = os.pread(handle.fileno(), head, 0)
                    payload = None
                    if info.st_size == head + expected:  # not truncated, not grown
                        payload = self._read_part(handle.fileno(), data, digest, first, low, high)
        except FileNotFoundError:
            return None
        if payload is None:
            if blockfile.other_version(data):
                log.info("discarding cache file %s of another format version", path)
            else:
                log.warning("discarding corrupt cache file %s", path)
            self._forget(relative, unlink=True)
            return None
        with self._lock:
            if relative in self._index:
                self._index[relative]  # noqa: B018 - a lookup refreshes the LRU position
            elif info.st_size <= self._capacity:
                self._index[relative] = info.st_size
        if time.time() - info.st_mtime > _TOUCH_AFTER_SECONDS:
            with contextlib.suppress(OSError):
                os.utime(path)
        return payload

    def _read_part(
        self, fd: int, head: bytes, digest: str, first: int, low: int, high: int
    ) -> bytes | None:
        """Payload bytes ``[low, high)`` (block-aligned) of a file whose ``head`` was read."""
        expected = os.fstat(fd).st_size - len(head)
        parsed = blockfile.parse_head(head, digest, first, expected)
        if parsed is None or parsed[0] != self.block_size:
            return None
        granule, crcs = parsed
        data = os.pread(fd, high - low, len(head) + low)
        wanted = crcs[low // granule : -(-high // granule)]
        return data if blockfile.verify(data, granule, wanted) else None

    def _span_length(self, name: str, first: int, object_size: int) -> int:
        blocks = {"C": self.big_chunk_blocks, "c": self.chunk_blocks}.get(name[:1], 1)
        return max(0, min(blocks * self.block_size, object_size - first * self.block_size))

    def _split(self, first: int, payload: bytes) -> Iterator[tuple[int, bytes]]:
        view, size = memoryview(payload), self.block_size
        for offset in range(0, len(payload), size):
            yield first + offset // size, view[offset : offset + size]  # views: no copy

    # -- writes ---------------------------------------------------------------------------------

    def write(
        self, ref: ObjectRef, digest: str, first_index: int, payloads: Sequence[bytes]
    ) -> None:
        """Store consecutive blocks of ``ref``; raises OSError if the disk refuses.

        Whole aligned chunks go into one chunk file each; the blocks around them into block files.
        """
        directory = self.root / digest[:2] / digest
        if digest not in self._known_objects:
            self._make_object_dir(directory, ref)
            self._known_objects.add(digest)
        self._make_room(sum(len(p) for p in payloads))
        for name, first, parts in self._files(first_index, payloads, ref.size):
            head = blockfile.header(digest, first, parts)
            size = len(head) + sum(map(len, parts))
            try:
                self._store(directory / name, head, parts, size)
            except FileNotFoundError:  # removed under us (cache clear, rm -rf): make it again
                self._make_object_dir(directory, ref)
                self._store(directory / name, head, parts, size)
            with self._lock:
                if size <= self._capacity:
                    self._index[f"{digest[:2]}/{digest}/{name}"] = size
                self._written_since_sync += size
        if self._written_since_sync >= self.sync_every:
            self.sync()

    def _store(self, path: Path, head: bytes, parts: Sequence[bytes], size: int) -> None:
        """Write one block file: with ``O_DIRECT`` while the filesystem takes it, else buffered."""
        if self._direct is not None:
            try:
                write_direct(path, head, parts, size, self._direct)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self._direct = None  # tmpfs (older kernels), some FUSE and network filesystems
                log.info("the cache filesystem refuses O_DIRECT (%s): buffered writes", exc)
        write_atomically(path, [head, *parts])

    def _make_object_dir(self, directory: Path, ref: ObjectRef) -> None:
        _make_private_dirs(directory)
        _write_meta(directory / "meta.json", ref, self._dataset)

    def _files(
        self, first: int, payloads: Sequence[bytes], object_size: int
    ) -> Iterator[tuple[str, int, Sequence[bytes]]]:
        """(file name, first block, payload parts) for a run: the largest whole files that fit.

        A readahead GET (8 MiB, aligned) makes one big chunk file, a 1 MiB read a chunk file,
        a random read's block its own file. A file's payload is its blocks side by side; they
        are not joined here (the writer copies them into place once).
        """
        blocks, end = -(-object_size // self.block_size), first + len(payloads)
        position = 0
        while position < len(payloads):
            index = first + position
            for prefix, per in self._levels:
                stop = min(index + per, blocks)
                if per == 1 or (index % per == 0 and end >= stop):
                    name = f"{prefix}{index // per}" if prefix else str(index)
                    yield name, index, payloads[position : position + stop - index]
                    position += stop - index
                    break

    def _make_room(self, incoming: int) -> None:
        """Honour --cache-min-free: evict our oldest blocks while the filesystem is too full."""
        if self._min_free_ratio <= 0:
            return
        fs = os.statvfs(self.root)
        wanted_free = self._min_free_ratio * fs.f_blocks * fs.f_frsize
        shortfall = wanted_free - fs.f_bavail * fs.f_frsize + incoming
        with self._lock:
            while shortfall > 0 and self._index:
                shortfall -= self._index.popitem()[1]
        if shortfall > 0:
            raise OSError(28, f"less than {self._min_free_ratio:.0%} free on the cache filesystem")

    # -- whole-cache maintenance ----------------------------------------------------------------

    def sync(self) -> None:
        """Rebuild the view from disk under the shared lock and evict down to the capacity."""
        with _locked(self.root):
            blocks = sorted(_scan_blocks(self.root), key=lambda entry: entry[2])
            fresh = _UnlinkingLRU(self._capacity, self.root)
            for name, size, _mtime in blocks:
                if size <= self._capacity:
                    fresh[name] = size  # oldest first: the newest end up most recently used
            with self._lock:
                self._index = fresh
                self._written_since_sync = 0

    def _forget(self, name: str, *, unlink: bool) -> None:
        with self._lock:
            self._index.pop(name, None)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / name)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return int(self._index.currsize)


def block_root(cache_dir: Path, block_size: int) -> Path:
    return cache_dir / "blocks" / str(block_size)


def _make_private_dirs(directory: Path) -> None:
    """``mkdir -p`` where every directory created is 0700 (``parents=True`` would use 0777-umask),
    so a cache directory deleted while mounted comes back as private as it was made."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


def _write_meta(path: Path, ref: ObjectRef, dataset: str) -> None:
    if path.exists():
        return
    meta = {
        "uri": ref.uri,
        "bucket": ref.bucket,
        "key": ref.key,
        "version_id": ref.version_id,
        "etag": ref.etag,
        "size": ref.size,
        "dataset": dataset,
    }
    write_atomically(path, [json.dumps(meta).encode()])


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _scan_blocks(root: Path) -> Iterator[tuple[str, int, float]]:
    """(relative name, size, mtime) of every block; sweeps temps left by dead writers."""
    now = time.time()
    for fan in _subdirs(root):
        for obj in _subdirs(fan):
            for entry in os.scandir(obj):
                with contextlib.suppress(FileNotFoundError):
                    info = entry.stat()
                    if entry.name.startswith(_TEMP_PREFIX):
                        if now - info.st_mtime > _STALE_TEMP_SECONDS or _writer_dead(entry.name):
                            os.unlink(entry.path)
                    elif _is_block_file(entry.name):
                        yield f"{fan.name}/{obj.name}/{entry.name}", info.st_size, info.st_mtime


def _is_block_file(name: str) -> bool:
    return name.isdigit() or (name[:1] in ("c", "C") and name[1:].isdigit())


def _writer_dead(temp_name: str) -> bool:
    pid = temp_name[len(_TEMP_PREFIX) :].split(".", 1)[0]
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


def _subdirs(path: Path) -> Iterator[os.DirEntry]:
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                yield entry


# -- offline views for `s3datafs cache stats|clear` ---------------------------------------------


def usage(cache_dir: Path) -> CacheUsage:
    """Bytes and blocks in the cache, per dataset (all block sizes)."""
    total = count = 0
    by_dataset: dict[str, int] = {}
    for obj, meta in _objects(cache_dir):
        size = blocks = 0
        for entry in os.scandir(obj):
            if _is_block_file(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    size += entry.stat().st_size
                    blocks += 1
        dataset = meta.get("dataset") or meta.get("uri", "?")
        by_dataset[dataset] = by_dataset.get(dataset, 0) + size
        total += size
        count += blocks
    return CacheUsage(total, count, by_dataset)


def clear(cache_dir: Path, uri_prefix: str | None = None) -> int:
    """Delete the cached blocks of every object (or those whose URI starts with the prefix)."""
    removed = 0
    for obj, meta in _objects(cache_dir):
        if uri_prefix is None or meta.get("uri", "").startswith(uri_prefix):
            with _locked(Path(obj.path).parent.parent):
                shutil.rmtree(obj.path, ignore_errors=True)
            removed += 1
    return removed


def _objects(cache_dir: Path) -> Iterator[tuple[os.DirEntry, dict]]:
    for size_dir in _subdirs(cache_dir / "blocks"):
        for fan in _subdirs(Path(size_dir.path)):
            for obj in _subdirs(Path(fan.path)):
                try:
                    meta = json.loads(Path(obj.path, "meta.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    meta = {}
                yield obj, meta
