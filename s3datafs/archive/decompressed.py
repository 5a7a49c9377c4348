"""Large compressed members kept decompressed in the disk cache: decompressed once, then read.

Why: bzip2 and LZMA decompressors cannot be copied, so ``MemberSource`` could only continue
where the last read ended: every read before that point decompressed the member from its start
again (a 40 MB bzip2 member: ~1 s per random read, a shuffled reader quadratic). A deflate
member read at random resumes from a saved copy of its decompressor (zlib's ``copy``), one
every 1/32 of it: still half of that inflated per read on average (8 MiB, ~45 ms of CPU, in a
512 MiB member). And nothing of the decompressed bytes, nor the saved copies, outlived the
memory cache or the mount.

``KeptMembers`` is asked by ``MemberSource`` for such members (``keeps``): a read first looks
here (``read``: disk only); a read the live decompressor cannot serve (it would start over;
for deflate, also far from every saved copy: ``members._to_kept``), or ``s3datafs prefetch``
for a bzip2 or LZMA member (``MemberSource.keep``: a read of its last byte), has the member
decompressed once, whole, here (``fill``), in a thread of its own that writes its bytes as
blocks of the disk cache as decompression produces them. Every later read of the member, by
any mount of the same pinned archive, after remounts too, is a disk read: no decompression,
no S3 byte.

Readers do not wait for the whole member: one whose range the output has not passed yet is
given it from the output as it passes (memory only; the first reader always is), so it waits
no longer than a decompression from the start would have made it (a 1 GiB member takes
minutes to decompress, past ``--read-timeout``); one behind the output waits for the end and
reads the disk. Such bytes are served before the CRC is known, as the live position serves a
large member's pieces; a range that reaches the member's end is served only once checked.

Names (``model.UnzippedRef``): the archive's pin (its cache identity) plus the member's header
offset, sizes, CRC-32 and method, so the blocks name bytes that never change. Their bookkeeping
identity is the archive's, so ``cache stats`` counts them with the archive's dataset and
``cache clear`` of the archive (or a prefix above it) deletes them.

The CRC is known only at the end, and the disk copy of a member whose CRC fails must never be
served. So each decompression is an *attempt* with a random name, and its blocks go under that name
(a region, 8 MiB of output, at a time). Nothing reads an attempt's blocks until the member's
*marker* - one small block under the member's own name, holding the attempt's name - is
written, and it is written only after the CRC and the declared size were checked (the pieces
``MemberSource._run`` yields end with that check). A failed attempt deletes its files; one a
crash cut short is named by no marker and ages out of the LRU. An attempt's name is never
reused, so the blocks under a marker's attempt are the ones that attempt wrote, all verified.
Two processes decompressing one member at once write two attempts; the last marker wins and the
other attempt ages out. The marker is the one block of the cache whose writers write different
bytes (``cache.blockfile`` counts on the same bytes): a slot torn between two of them fails its
entry's CRC (a miss), and every name a marker can hold is a verified attempt's. Tested by killing
a process at each step of a decompression, damaging each file, and a model
(``tests/test_zip_kept_faults.py``).

Invariants:
- Bytes are served from the disk only through a marker; every block is also checked against
  its table entry by ``DiskCache`` (a damaged block is a miss).
- Single flight: one decompression per member per process; other readers of the member wait for
  it (served from its output, or from the disk after it; a failure is theirs too: the same
  error). A member found bad is reported (``found_bad``) even if no reader waits any more.
- Its thread is a daemon thread: ``close`` (unmount) makes it stop at its next piece and keep
  nothing; nothing waits for it (a GET stalled on S3 would hold up the unmount).
- Memory: a region of output and the ranges readers wait for, never the member; at most
  ``_FLIGHTS`` decompressions at once.
- Bound: only members of at most ``1/_KEEP_SHARE`` of the cache's bound are kept (a larger one
  would evict its own first regions before its end, and most of everything else). Eviction of
  any block or of the marker is a miss: the next read decompresses again, a new attempt. But an
  attempt whose first regions ``--cache-min-free`` evicted before its end (it left less room
  than the member) starts no other for ``_REFUSED_SECONDS`` (``_no_room``): what is left of it
  is read, the rest the old way. Before, every read in those regions decompressed the whole
  member again, and its writes evicted them again (40 random 64 KiB reads of a 4 MiB bzip2
  member, room for 2: 12-21 decompressions, 47-85 MiB written, 1.3-2.6 s of CPU; now 7-9,
  4.5 MiB and 0.5-1.2 s).
- A disk that refuses the writes: decompression goes on (the CRC is checked), the reader gets
  its bytes, the attempt is deleted, and the member is read the old way (``keeps`` says no) for
  ``_REFUSED_SECONDS``; its waiters find nothing on disk and go the old way at once.
- Threads: called from worker threads; one lock guards the tables, never held during I/O;
  each flight's condition guards its output position and the ranges waiting on it.
"""

from __future__ import annotations

import copy
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
from ..quietthread import start_quiet_thread
from ..units import human_size

log = logging.getLogger(__name__)

_KEEP_SHARE = 4  # a member kept takes at most a quarter of the cache's bound
_MAGIC = b"S3DZ"
_ATTEMPT_CHARS = 32  # secrets.token_hex(16)
MARKER_SIZE = len(_MAGIC) + _ATTEMPT_CHARS  # the marker block's length
_REFUSED_SECONDS = 60.0  # after a refused write, the member is read the old way this long
_REMEMBERED = 4096  # verified attempts known without reading their marker
# Decompressions under way at once, each a thread holding a region of output and a chunk of
# input (~16 MiB) and a core: each runs on after its reader was served, so a random reader over
# many large members started one per member it reached, without bound. Beyond: the old way.
_FLIGHTS = 4


class _Want:
    """A reader's range, filled from the decompression's output as it passes (memory only)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.parts: list[bytes] = []
        self.filled = False


class _Flight:
    """One member's decompression, in a thread of its own; readers wait on ``changed``.

    A range that reaches the member's end is filled only once the decompression has ended
    well: its last bytes come before the checks (CRC, nothing more to inflate), and a member
    read to its end is always checked first, as the live position does.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.changed = threading.Condition()  # guards everything below
        self.produced = 0  # output bytes so far
        self.wants: list[_Want] = []  # ranges not passed yet
        self.done = False
        self.error: BaseException | None = None  # what ended it, if not its end

    def want(self, start: int, end: int) -> _Want | None:
        """Register ``[start, end)`` to be filled as output passes it; None if passed already."""
        with self.changed:
            if self.done or start < self.produced:
                return None
            want = _Want(start, end)
            self.wants.append(want)
            return want

    def passed(self, at: int, piece: bytes) -> None:
        """``piece`` is the output from ``at``: fill the wants it covers."""
        end = at + len(piece)
        with self.changed:
            for want in self.wants:
                low, high = max(want.start, at), min(want.end, end)
                if low < high:
                    want.parts.append(piece[low - at: high - at])
                want.filled = want.end <= end < self.size
            if any(want.filled for want in self.wants):
                self.wants = [want for want in self.wants if not want.filled]
                self.changed.notify_all()
            self.produced = end

    def wait(self, want: _Want | None) -> bool:
        """Until ``want`` is filled (True) or the decompression ended (False; always, for no
        ``want``)."""
        with self.changed:
            while not (want is not None and want.filled) and not self.done:
                self.changed.wait()
            return want is not None and want.filled

    def end(self, error: BaseException | None) -> None:
        with self.changed:
            for want in self.wants if error is None else ():
                want.filled = want.end <= self.produced
            self.error, self.done = error, True
            self.changed.notify_all()


class KeptMembers:
    """Decompressed members in the disk cache (see the module docstring)."""

    def __init__(
        self, disk: DiskCache, count: Callable[..., None],
        found_bad: Callable[[MemberRef, ArchiveError], None],
    ) -> None:
        self._disk = disk
        self._count = count  # ReadStats increments (``ArchiveBlocks.count``: one lock for all)
        self._found_bad = found_bad  # ``MemberSource``: fail its reads a while, drop its bytes
        self._closed = False
        self._trouble = TroubleLog()
        self._lock = threading.Lock()  # guards the tables below, never held during I/O
        self._flights: dict[MemberRef, _Flight] = {}
        # The attempt a member's marker named (read once, not on every read); dropped when its
        # blocks turn out missing (evicted), so the marker is read again.
        self._attempts: cachetools.LRUCache[MemberRef, str] = cachetools.LRUCache(_REMEMBERED)
        self._refused: cachetools.TTLCache[MemberRef, bool] = cachetools.TTLCache(
            maxsize=1024, ttl=_REFUSED_SECONDS, timer=time.monotonic)
        # Members whose copy lost its first regions before its end: read, not made again.
        self._no_room: cachetools.TTLCache[MemberRef, bool] = cachetools.TTLCache(
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
        """``[start, end)`` of ``ref``; the member is decompressed whole into the disk cache,
        once (a thread of its own), unless that is under way already (then it is waited for).

        A reader whose range the output has not passed yet gets it from the output, as the
        live position would (the CRC is not known yet: a large member's pieces are served
        before it is, as ever; the disk copy waits for it); the others read the copy once it
        is verified. ``decompress`` yields the member's bytes from its start, checked at its
        end (CRC, declared size) by raising ``ArchiveError``. None: the disk did not keep it
        (refused, evicted at once, no room for it: ``_no_room``), or ``_FLIGHTS``
        decompressions are under way: the caller reads the old way.
        """
        with self._lock:
            flight = self._flights.get(ref)
        # None under way: one may have ended since the caller looked at the disk (its marker
        # is written before it ends), and would be started again for nothing.
        if flight is None and (data := self.read(ref, start, end)) is not None:
            return data
        with self._lock:
            flight = self._flights.get(ref)
            mine = flight is None
            if flight is None:
                if len(self._flights) >= _FLIGHTS or ref in self._no_room:
                    return None  # enough under way, or no room: this read goes the old way
                flight = self._flights[ref] = _Flight(ref.size)
        want = flight.want(start, end)  # before its thread starts: the first reader's is met
        if mine:
            self._start(ref, flight, decompress)
        if flight.wait(want):  # filled from the output (``want`` is not None)
            return b"".join(want.parts)
        if flight.error is not None:
            raise _again(flight.error)
        return self.read(ref, start, end)

    def keep(self, ref: MemberRef, decompress: Callable[[], Iterable[bytes]]) -> bool:
        """Have ``ref`` decompressed whole into the disk cache now (``s3datafs prefetch``) unless
        a verified copy is there whole; whether one is afterwards. A copy that lost regions to
        eviction is made again: its last byte would pass for all of it."""
        if self.holds(ref):
            return True
        if self._verified(ref) is not None:
            self.forget(ref)
        self.fill(ref, ref.size - 1, ref.size, decompress)
        return self.holds(ref)

    def holds(self, ref: MemberRef) -> bool:
        """Whether a verified copy of ``ref`` is on disk whole: its marker names an attempt, and
        none of that attempt's region files was evicted (each read still checks its blocks)."""
        attempt = self._verified(ref)
        return attempt is not None and self._disk.holds_files(
            object_digest(UnzippedRef.of(ref, attempt)), ref.size)

    def produced(self, ref: MemberRef) -> int | None:
        """How far the decompression of ``ref`` under way has come; None if there is none."""
        with self._lock:
            flight = self._flights.get(ref)
        return None if flight is None else flight.produced

    def close(self) -> None:
        """Decompressions under way stop at their next piece, keeping nothing (unmount)."""
        self._closed = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no decompression is under way (at most ``timeout`` s); whether none is."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                flights = list(self._flights.values())
            if not flights:
                return True
            for flight in flights:
                with flight.changed:
                    while not flight.done:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return False
                        flight.changed.wait(left)

    def forget(self, ref: MemberRef) -> None:
        """No copy of ``ref`` is served from here any more: it was found bad, or lost regions."""
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

    def _start(
        self, ref: MemberRef, flight: _Flight, decompress: Callable[[], Iterable[bytes]]
    ) -> None:
        try:
            start_quiet_thread(self._fly, args=(ref, flight, decompress), name="s3datafs-unzip")
        except RuntimeError as exc:  # no thread could be started (a pids limit): fail the read
            self._landed(ref, flight, exc)

    def _fly(
        self, ref: MemberRef, flight: _Flight, decompress: Callable[[], Iterable[bytes]]
    ) -> None:
        """The decompression's thread: ``_decompress``, then its readers told how it ended."""
        error: BaseException | None = None
        try:
            self._decompress(ref, flight, decompress)
        except ArchiveError as exc:
            error = exc
            self._found_bad(ref, exc)  # readers served before the end are told no more
        except Exception as exc:  # S3 trouble (stale, timeout): the waiting readers' error
            error = exc
        self._landed(ref, flight, error)

    def _landed(self, ref: MemberRef, flight: _Flight, error: BaseException | None) -> None:
        with self._lock:
            del self._flights[ref]
        flight.end(error)

    def _decompress(
        self, ref: MemberRef, flight: _Flight, decompress: Callable[[], Iterable[bytes]]
    ) -> None:
        """Decompress ``ref`` whole into a new attempt, a region at a time, feeding ``flight``'s
        readers on the way; mark the attempt once verified."""
        began = time.monotonic()
        attempt = secrets.token_hex(_ATTEMPT_CHARS // 2)
        target = UnzippedRef.of(ref, attempt)
        digest = object_digest(target)
        region = self._disk.layout.blocks * self._disk.block_size  # one write per region file
        pending = bytearray()
        at = written = 0  # output bytes seen, and written to disk
        writing = True
        try:
            for piece in decompress():
                if self._closed:
                    raise _Closed(f"{ref.uri}: the mount is ending")
                flight.passed(at, piece)
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
            if writing and self._disk.made_room_since(began) and \
                    not self._disk.holds_files(digest, ref.size):
                self._no_room_for(ref)
            if writing:
                marker = UnzippedRef.of(ref)
                writing = self._write(marker, object_digest(marker), 0,
                                      _MAGIC + attempt.encode("ascii"))
        except BaseException:
            self._drop(digest, ref.size)
            raise
        if not writing:
            self._drop(digest, ref.size)
            with self._lock:
                self._refused[ref] = True
            return
        with self._lock:
            self._attempts[ref] = attempt
        log.info("member %r of %s: kept decompressed in the block cache (%s in %.1fs)",
                 ref.path, ref.archive.uri, human_size(ref.size), time.monotonic() - began)

    def _no_room_for(self, ref: MemberRef) -> None:
        """``ref``'s copy lost its first regions to make room for its last (--cache-min-free):
        made again, it would lose them again, for each read in them (``_no_room``)."""
        with self._lock:
            self._no_room[ref] = True
        self._trouble.warn(
            f"member {ref.path!r} of {ref.archive.uri}: the block cache evicted the first part of "
            f"its decompressed copy ({human_size(ref.size)}) to write the rest (too little free "
            "space: see --cache-min-free); that part is decompressed as it is read", kind="room")

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


class _Closed(Exception):
    """The mount ends: a decompression under way stops, keeping nothing."""


def _again(error: BaseException) -> BaseException:
    """``error`` for one more reader: a copy, as one exception raised in many threads would
    grow one traceback. An ``ArchiveError`` is made anew (its message is all it carries)."""
    if isinstance(error, ArchiveError):
        return ArchiveError(str(error))
    return copy.copy(error)
