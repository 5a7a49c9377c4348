"""Writes of block cache files: blocks written in place, past the page cache where possible.

- ``pwrite_all``: buffered, ``parts`` side by side without joining them first.
- ``pwrite_direct`` (``O_DIRECT``), the default for block payloads: the bytes are copied once into
  a reused page-aligned buffer and written past the page cache. The kernel already keeps the
  bytes just read in the FUSE file's pages; writing the cache file through the page cache would
  hold them a second time and cost a copy into freshly allocated pages (profiled on a cold 1 GiB
  sequential read: ~60 % of the daemon's CPU time was that copy; ``O_DIRECT`` cut the cost of
  writing 1 GiB in 1 MiB files from 1.5-2.4 to 0.2-0.4 CPU-s on the development machine).
  Filesystems that refuse ``O_DIRECT`` (``EINVAL``: tmpfs before Linux 6.6, some FUSE and network
  filesystems) make the caller switch to ``pwrite_all`` (buffered) for good.

Every function may run in any thread; ``AlignedBuffers`` has its own lock.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Sequence

O_DIRECT = getattr(os, "O_DIRECT", 0)
_ALIGN = mmap.PAGESIZE  # O_DIRECT wants aligned memory, offsets and lengths: a page suits all
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # parts per pwritev
DIRECT_BUFFER = 1024 * 1024  # bytes per O_DIRECT write (and per pooled buffer)


def direct_io_supported() -> bool:
    """Whether this platform has ``O_DIRECT`` at all (each filesystem may still refuse it)."""
    return bool(O_DIRECT)


def pwrite_all(fd: int, parts: Sequence[bytes], offset: int) -> None:
    """Buffered: ``parts`` side by side at ``offset`` (``os.pwritev``, no joined copy)."""
    pending = [memoryview(part) for part in parts if len(part)]
    while pending:
        written = os.pwritev(fd, pending[:_IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += written
        while pending and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:
            pending[0] = pending[0][written:]


def pwrite_direct(fd: int, parts: Sequence[bytes], offset: int, buffers: AlignedBuffers) -> None:
    """``O_DIRECT`` (``fd`` must have it): ``parts`` at page-aligned ``offset``, padded to a page.

    The page cache is bypassed: the kernel keeps the bytes just read in the FUSE file's pages,
    so caching them a second time in the cache file's pages would double the memory they take and
    cost a copy into freshly allocated pages (profiled: most of the daemon's CPU time in a cold
    sequential read went to that copy). The bytes are copied once, into a reused buffer, and
    written a buffer at a time; the padding is zeros. Raises OSError(EINVAL) if the filesystem
    refuses ``O_DIRECT``.
    """
    buffer = buffers.take()
    try:
        with memoryview(buffer) as view:
            filled = 0
            for part in parts:
                piece = memoryview(part)
                while piece:
                    n = min(len(piece), len(view) - filled)
                    view[filled : filled + n] = piece[:n]
                    filled, piece = filled + n, piece[n:]
                    if filled == len(view):
                        _write_exact(fd, view, offset)
                        offset, filled = offset + filled, 0
            if filled:
                end = -(-filled // _ALIGN) * _ALIGN
                view[filled:end] = bytes(end - filled)  # no stale bytes of an earlier write
                _write_exact(fd, view[:end], offset)
    finally:
        buffers.give(buffer)


def _write_exact(fd: int, data: memoryview, offset: int) -> None:
    if os.pwrite(fd, data, offset) != len(data):
        raise OSError(errno.ENOSPC, "short write to the block cache")


class AlignedBuffers:
    """Page-aligned scratch buffers for ``O_DIRECT`` writes, kept for reuse (``keep`` at most).

    Reused because fresh memory is expensive to touch, and only a few writes run at once (the
    reader's disk limiter); a file larger than a buffer is written a buffer at a time.
    """

    def __init__(self, size: int = DIRECT_BUFFER, keep: int = 4) -> None:
        self.size = -(-size // _ALIGN) * _ALIGN
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, self.size)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buffer)
                return
        buffer.close()
