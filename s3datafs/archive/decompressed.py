"""Large bzip2 and LZMA members kept decompressed in the disk cache: decompressed once, then read.

Why: a deflate member read at random resumes from a saved copy of its decompressor (zlib's
``copy``), but bzip2 and LZMA decompressors cannot be copied, so ``MemberSource`` could only
continue where the last read ended: every read before that point decompressed the member from
its start again (a 40 MB bzip2 member: ~1 s per random read, a shuffled reader quadratic), and
nothing of the decompressed bytes outlived the memory cache or the mount.

``KeptMembers`` is asked by ``MemberSource`` for such members (``keeps``): a read first looks
here (``read``: disk only); a read the live decompressor cannot serve (it would start over)
decompresses the member once, whole, here (``fill``), writing its bytes as blocks of the disk
cache as decompression produces them. Every later read of the member, by any mount of the same
pinned archive, after remounts too, is a disk read: no decompression, no S3 byte.

Names (``model.UnzippedRef``): the archive's pin (its cache identity) plus the member's header
offset, sizes, CRC-32 and method, so the blocks name bytes that never change. Their bookkeeping
identity is the archive's, so ``cache stats`` counts them with the archive's dataset and
``cache clear`` of the archive (or a prefix above it) deletes them.

The CRC is known only at the end, and bytes of a member whose CRC fails must never be served.
So each decompression is an *attempt* with a random name, and its blocks go under that name
(a region, 8 MiB of output, at a time). Nothing reads an attempt's blocks until the member's
*marker* - one small block under the member's own name, holding the attempt's name - is
written, and it is written only after the CRC and the declared size were checked (the pieces
``MemberSource._run`` yields end with that check). A failed attempt deletes its files; one a
crash cut short is named by no marker and ages out of the LRU. An attempt's name is never
reused, so the blocks under a marker's attempt are the ones that attempt wrote, all verified.
Two processes decompressing one member at once write two attempts; the last marker wins and the
other attempt ages out.

Invariants:
- Bytes are served only through a marker; every block is also checked against its table entry
  by ``DiskCache`` (a damaged block is a miss).
- Single flight: one decompression per member per process; other readers of the member wait for
  it and then read the disk (a failure is theirs too: the same error, nothing served).
- Memory: a region of output and the range the first reader asked for, never the member.
- Bound: only members of at most ``1/_KEEP_SHARE`` of the cache's bound are kept (a larger one
  would evict its own first regions before its end, and most of everything else). Eviction of
  any block or of the marker is a miss: the next read decompresses again, a new attempt.
- A disk that refuses the writes: decompression goes on (the CRC is checked), the reader gets
  its bytes, the attempt is deleted, and the member is read the old way (``keeps`` says no) for
  ``_REFUSED_SECONDS``; its waiters find nothing on disk and go the old way at once.
- Threads: called from worker threads; one lock guards the tables, never held during I/O.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable

import cachetools

from ..cache.blockfile import object_digest
from ..cache.disk import DiskCache, TroubleLog
from ..errors import ArchiveError
from ..model import MemberRef, UnzippedRef
from ..units import human_size

log = logging.getLogger(__name__)

_KEEP_SHARE = 4  # a member kept takes at most a quarter of the cache's bound
_MAGIC = b"S3DZ"
_ATTEMPT_CHARS = 32  # secrets.token_hex(16)
MARKER_SIZE = len(_MAGIC) + _ATTEMPT_CHARS  # the marker block's length
_REFUSED_SECONDS = 60.0  # after a refused write, the member is read the old way this long
_REMEMBERED = 4096  # verified attempts known without reading their marker


class _Flight:
    """One member's decompression in progress; ``error`` is set if it found the member bad."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None


class KeptMembers:
    """Decompressed members in the disk cache (see the module docstring)."""

    def __init__(self, disk: DiskCache, count: Callable[..., None]) -> None:
        self._disk = disk
        self._count = count  # ReadStats increments (``ArchiveBlocks.count``: one lock for all)
        self._trouble = TroubleLog()
        self._lock = threading.Lock()  # guards the tables below, never held during I/O
        self._flights: dict[MemberRef, _Flight] = {}
        # The attempt a member's marker named (read once, not on every read); dropped when its
        # blocks turn out missing (evicted), so the marker is read again.
        self._attempts: cachetools.LRUCache[MemberRef, str] = cachetools.LRUCache(_REMEMBERED)
        self._refused: cachetools.TTLCache[MemberRef, bool] = cachetools.TTLCache(
            maxsize=1024, ttl=_REFUSED_SECONDS, timer=time.monotonic)

    def keeps(self, ref: MemberRef) -> bool:
        """Whether ``ref`` is kept here: small enough for the bound, and the disk took it."""
        if ref.size > self._disk.capacity // _KEEP_SHARE:
            return False
        with self._lock:
            return ref not in self._refused

    def read(self, ref: MemberRef, start: int, end: int) -> bytes | None:
        """``[start, end)`` of ``ref`` from a verified attempt on disk; None if any of it is not
        there (never kept, evicted, cleared)."""
        attempt = self._verified(ref)
        if attempt is None:
            return None
        size = self._disk.block_size
        blocks = range(start // size, (end - 1) // size + 1)
        digest = object_digest(UnzippedRef.of(ref, attempt))
        try:
            found = self._disk.read_run(digest, ref.size, blocks, ends=False)
        except OSError as exc:
            self._trouble.warn(f"cannot read the block cache ({exc}); decompressing", kind="read")
            return None
        if len(found) < len(blocks):  # evicted: next time the marker may name a newer attempt
            with self._lock:
                self._attempts.pop(ref, None)
            return None
        self._count(disk_hits=len(found), disk_bytes=sum(map(len, found.values())))
        at = start - blocks.start * size
        return b"".join(found[index] for index in blocks)[at: at + end - start]

    def fill(
        self, ref: MemberRef, start: int, end: int, decompress: Callable[[], Iterable[bytes]]
    ) -> bytes | None:
        """``[start, end)`` of ``ref``, decompressing it whole into the disk cache first unless
        another thread is at it (then waiting for that) or it is there already.

        ``decompress`` yields the member's bytes from its start, checked at its end (CRC,
        declared size) by raising ``ArchiveError``. None: the disk did not keep it (refused),
        so the caller reads the old way.
        """
        with self._lock:
            flight = self._flights.get(ref)
            mine = flight is None
            if flight is None:
                flight = self._flights[ref] = _Flight()
        if not mine:
            flight.done.wait()
            if flight.error is not None:  # a new error: a shared one's traceback would grow
                raise ArchiveError(flight.error)
            return self.read(ref, start, end)
        try:
            data = self.read(ref, start, end)  # kept meanwhile (a flight that just ended)
            return data if data is not None else self._decompress(ref, start, end, decompress)
        except ArchiveError as exc:
            flight.error = str(exc)
            raise
        finally:
            with self._lock:
                del self._flights[ref]
            flight.done.set()

    def forget(self, ref: MemberRef) -> None:
        """``ref`` was found bad: no copy of it is served from here any more."""
        with self._lock:
            self._attempts.pop(ref, None)
        try:
            self._disk.forget_blocks(object_digest(UnzippedRef.of(ref)), range(1))
        except OSError as exc:
            self._trouble.write_failed(exc)

    # -- with no lock held ----------------------------------------------------------------------

    def _verified(self, ref: MemberRef) -> str | None:
        """The attempt the member's marker names (remembered), or None if there is none."""
        with self._lock:
            attempt = self._attempts.get(ref)
        if attempt is not None:
            return attempt
        try:
            found = self._disk.read_run(object_digest(UnzippedRef.of(ref)), MARKER_SIZE,
                                        range(1), ends=False)
        except OSError as exc:
            self._trouble.warn(f"cannot read the block cache ({exc}); decompressing", kind="read")
            return None
        marker = found.get(0)
        if marker is None or bytes(marker[: len(_MAGIC)]) != _MAGIC:
            return None
        attempt = bytes(marker[len(_MAGIC):]).decode("ascii", "replace")
        with self._lock:
            self._attempts[ref] = attempt
        return attempt

    def _decompress(
        self, ref: MemberRef, start: int, end: int, decompress: Callable[[], Iterable[bytes]]
    ) -> bytes | None:
        """Decompress ``ref`` whole into a new attempt; mark it once verified; ``[start, end)``."""
        began = time.monotonic()
        attempt = secrets.token_hex(_ATTEMPT_CHARS // 2)
        target = UnzippedRef.of(ref, attempt)
        digest = object_digest(target)
        region = self._disk.layout.blocks * self._disk.block_size  # one write per region file
        wanted: list[bytes] = []
        pending = bytearray()
        at = written = 0  # output bytes seen, and written to disk
        writing = True
        try:
            for piece in decompress():
                low, high = max(start, at), min(end, at + len(piece))
                if low < high:
                    wanted.append(piece[low - at: high - at])
                at += len(piece)
                if not writing:
                    continue
                pending += piece
                while writing and len(pending) >= region:
                    writing = self._write(target, digest, written, bytes(pending[:region]))
                    del pending[:region]
                    written += region
            # Exhausted without an error: the size and the CRC were checked.
            if writing and pending:
                writing = self._write(target, digest, written, bytes(pending))
            if writing:
                marker = _MAGIC + attempt.encode("ascii")
                writing = self._write(UnzippedRef.of(ref), object_digest(UnzippedRef.of(ref)), 0,
                                      marker)
        except BaseException:
            self._drop(digest, ref.size)
            raise
        if not writing:
            self._drop(digest, ref.size)
            with self._lock:
                self._refused[ref] = True
            return b"".join(wanted)
        with self._lock:
            self._attempts[ref] = attempt
        log.info("member %r of %s: kept decompressed in the block cache (%s in %.1fs)",
                 ref.path, ref.archive.uri, human_size(ref.size), time.monotonic() - began)
        return b"".join(wanted)

    def _write(self, ref: UnzippedRef, digest: str, offset: int, data: bytes) -> bool:
        """``data`` (output from ``offset``, block aligned) as blocks; False if the disk refused."""
        size = self._disk.block_size
        view = memoryview(data)
        blocks = [view[at: at + size] for at in range(0, len(data), size)]
        try:
            self._disk.write(ref, digest, offset // size, blocks)
        except Exception as exc:  # the bytes are good: a cache fault (or bug) must not fail them
            self._count(cache_write_errors=1)
            self._trouble.write_failed(exc)
            return False
        return True

    def _drop(self, digest: str, size: int) -> None:
        try:
            self._disk.drop(digest, size)
        except OSError as exc:
            self._trouble.write_failed(exc)
