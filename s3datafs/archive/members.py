"""Bytes of zip members: ``MemberSource`` serves ``MemberRef`` ranges from the pinned archive.

``MemberSource`` wraps the real ``ObjectSource``; the block reader asks it for ranges of plain
objects (passed straight through) and of members, which the reader keeps in its memory cache
(keyed by the member's own identity, in uncompressed offsets). On disk a member is kept as the
blocks of its archive (``spans.ArchiveBlocks``), so a remount, or a second read after the memory
cache let it go, reads no S3 byte. Every byte comes from ranged GETs of the archive through the
wrapped source, so each carries the archive's VersionId and If-Match.

- Local headers: a member's data starts after its local header, whose length only the header
  itself tells. The first GET of a member fetches the header together with the data up to the
  end of the read (a guess of the header's length, corrected by a second GET if wrong), unless
  the read starts beyond ``_JOINED_MAX``: then the header alone, and the range on its own (a
  footer read first must not fetch the member up to it). The data offset is then remembered.
  The header must be a local header and the data must end before ``data_limit``.
- Stored members are the archive's bytes at the data offset: one ranged GET per range.
- Archive order: members read one after another in archive order (a job walking the tree, by
  one thread or several) are fetched in shared, growing spans of the archive (``spans.Spans``), read
  ahead in the background, so reading every member costs about as many GETs and bytes as
  downloading the archive; scattered reads fetch exactly their member.
- At hand: ``get_range_now`` answers without I/O when the bytes lie in a landed span (and a
  compressed member is small), so the block reader serves most members of an archive read in
  order on its own thread, with no worker-thread hop: per member, that hop cost more than the
  rest of the work.
- Compressed members (deflate; also bzip2 and lzma) are decompressed from their start. One of
  up to ``_WHOLE_MAX`` bytes is always decompressed whole (one GET, one decompression, checked
  at once); when read in pieces it is kept a while (``_whole``) for the next piece. A larger
  member read in pieces keeps *positions*: the decompressor paused where the last range ended
  (so a sequential reader continues where it stopped) and, for deflate, copies of it saved every
  max(``_MIN_INTERVAL``, size / ``_SAVED_PER_MEMBER``) output bytes, so a random read
  decompresses from the nearest saved position at or before it instead of from the start
  (with a disk cache, a random reader of a large member goes to the disk: below). Positions
  are bounded in total (``max_positions``, LRU over members); one lock per member serialises
  its decompression.
  The live position's latest output (up to ``_TRAIL`` before the read, ``_TRAILS_KEPT`` for
  all members) serves reads just behind it: a sequential reader's readahead runs arrive out
  of order, and one that came after the run beyond it started over from the member's start.
- Kept decompressed: bzip2 and LZMA decompressors cannot be copied, so a random read before the
  live position would start over from the member's start. Deflate's saved copies spare that,
  but a random read still inflates half an interval on average from the nearest (8 MiB, ~45
  ms of CPU, in a 512 MiB member: 200 random reads took 9-20 s), and the copies are memory
  only, gone at unmount. With a disk cache, such a large member is instead decompressed once,
  whole, into the disk cache (``decompressed.KeptMembers``: single-flight, in a thread of its
  own whose output serves the reads ahead of it; the copy is read only once its CRC is
  verified), and every later read is a disk read, across remounts too. Which reads go there
  (``_to_kept``): those that would start over, but not those the live position or its trail
  serve (a sequential reader, from a first read within ``_TRAIL`` of the member's start); for
  deflate, only those of a member larger than ``_TRAIL`` that would also inflate
  ``_NEAR_SAVED`` bytes or more from the nearest saved position or the member's start
  (``_far_from_saved``: a random reader's, or the first after a remount), so a second pass
  from the member's start still inflates from there. A deflate member read whole in one range
  is inflated, not kept (bzip2 and LZMA are: decompressing them again is slow). Without a disk
  cache, or for a member over a quarter of its bound, as before. Measured (``bench/zip_random``,
  200 random 64 KiB reads): a 512 MiB deflated member 9.8-12.7 s -> 3.4-3.7 s, and 7.7-11.2 s
  -> 0.16 s after a remount; a 16 MiB one 1.1-1.5 s -> 0.35 s; sequential reads unchanged.
- Verification: decompression never produces more than the declared size: a member that would
  inflate further (a zip bomb), ends early or fails to decompress is an ``ArchiveError`` (EIO),
  and so is a CRC-32 mismatch (an LZMA stream without an end marker ends at the declared size,
  which nothing else can show: ``_finish``). A compressed member's CRC is checked whenever
  decompression reaches its end (always from its start); a stored member's whenever its pieces,
  fetched in any order and overlapping at will, have covered it (``crc.Coverage``; the pieces of
  the 65,536 stored members last read in part are remembered). A member found bad fails every
  read at once for ``_RETRY_BAD`` seconds (``_failing``), and its archive bytes are dropped from
  the caches, so the read after that, or a remount, fetches them again: damage met in transit
  (plain HTTP) is not taken for the archive's for good. The pieces of it served before are
  dropped too (the block reader's, and the kernel's pages at the next open: see
  ``reader.BlockReader._drop_bad``), so a read of it whole is checked again, whole. Encrypted
  members and unsupported methods fail every read with an error naming the member. A range
  past a member's end is cut there, as a read of a file is (``_within``): it is no evidence of
  damage.
- Disk writes (``spans.ArchiveBlocks``): a short fetch is written by the thread that fetched it,
  spans behind the reads (bounded, drained by ``close``).
"""

from __future__ import annotations

import bisect
import bz2
import contextlib
import functools
import lzma
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import cachetools

from ..cache.disk import DiskCache
from ..errors import ArchiveError
from ..model import MemberRef, ObjectRef, ObjectSource, PinnedRef
from ..reader import ReadStats
from . import zipformat
from .crc import Coverage
from .decompressed import KeptMembers
from .spans import ArchiveBlocks, Spans

_HEADER_GUESS = 30 + 128  # local header + name and extra fields, as most writers make them
_RETRY_BAD = 60.0  # seconds a member found bad fails at once before it is fetched again
_JOINED_MAX = 1024 * 1024  # a first read from up to here also fetches the member's header
_INLINE_COMPRESSED = 256 * 1024  # at most ~1 ms of inflating on the caller's (trio) thread
_WHOLE_MAX = 1024 * 1024  # compressed members up to this size are always decompressed whole
_WHOLE_KEPT = 16 * 1024 * 1024  # bytes of such members kept for their next pieces
_MIN_CHUNK = 256 * 1024
_FEED = 64 * 1024  # compressed bytes per call to a decompressor whose position is kept
_NOTHING = memoryview(b"")
_MAX_CHUNK = 8 * 1024 * 1024
_MIN_INTERVAL = 4 * 1024 * 1024
_SAVED_PER_MEMBER = 32  # so the interval grows with the member: size / 32
_OUT_STEP = 1024 * 1024  # output bytes per decompressor call: a whole member is never one piece
# The live position's latest output kept for reads just behind it: a sequential reader's
# readahead runs (up to 8 MiB each) reach a member out of order, and one that came after the
# run beyond it would start over from the member's start. All members' trails together are
# bounded (LRU): a few members read in order at once.
_TRAIL = _MAX_CHUNK
_TRAILS_KEPT = 32 * 1024 * 1024
# A deflate read that would start over (``_restarts``) resumes from a saved position or the
# member's start within this before it (a second pass from the start; a readahead run later
# than the trail, right after a saved copy); one further away goes to the kept members
# (``_far_from_saved``), if the member is larger than ``_TRAIL``. Resuming costs ~8 ms per MiB
# inflated through a mount, a read of the kept copy under 1 ms: 200 random 64 KiB reads took
# 1.2-1.5 s the old way, 0.4-0.7 s kept in a 16 MiB member (a copy every 4 MiB, as up to 128
# MiB); in one of 4 MiB, which the caches mostly hold anyway, 0.18-0.26 s and 0.12-0.14 s: not
# worth a copy on disk per member (``bench/zip_random.py``).
_NEAR_SAVED = 1024 * 1024


class _Decompressor(Protocol):
    eof: bool

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _Inflate:
    """zlib's raw deflate, with the ``needs_input`` the bz2 and lzma decompressors have."""

    copyable = True

    def __init__(self, inner: zlib._Decompress | None = None, full: bool = False) -> None:
        self._inner = inner or zlib.decompressobj(-15)
        # The last call filled its max_length: zlib may hold output it has already taken the
        # input for (the rest of a match), with nothing left in unconsumed_tail.
        self._full = full

    @property
    def eof(self) -> bool:
        return self._inner.eof

    @property
    def needs_input(self) -> bool:
        return not self._inner.unconsumed_tail and not self._full

    def decompress(self, data: bytes, max_length: int) -> bytes:
        out = self._inner.decompress(self._inner.unconsumed_tail + data, max_length)
        self._full = max_length > 0 and len(out) == max_length
        return out

    def copy(self) -> _Inflate:
        return _Inflate(self._inner.copy(), self._full)


class _ZipLzma:
    """LZMA as zip stores it: 2 bytes version, 2 bytes properties length, properties, raw data."""

    copyable = False

    def __init__(self) -> None:
        self._header = b""
        self._inner: lzma.LZMADecompressor | None = None

    @property
    def eof(self) -> bool:
        return self._inner is not None and self._inner.eof

    @property
    def needs_input(self) -> bool:
        return self._inner is None or self._inner.needs_input

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._inner is None:
            self._header += data
            if len(self._header) < 4:
                return b""
            props_length = int.from_bytes(self._header[2:4], "little")
            if len(self._header) < 4 + props_length:
                return b""
            props = self._header[4: 4 + props_length]
            if len(props) < 5:
                raise lzma.LZMAError("LZMA properties too short")
            lc_lp_pb, dict_size = props[0], int.from_bytes(props[1:5], "little")
            filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc_lp_pb % 9,
                        "lp": lc_lp_pb // 9 % 5, "pb": lc_lp_pb // 45}]
            self._inner = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters)
            data, self._header = self._header[4 + props_length:], b""
        return self._inner.decompress(data, max_length)


# Methods whose decompressor can be copied (``_Inflate.copy``): saved positions serve reads.
_COPYABLE = frozenset({zipformat.DEFLATED})
# The methods read, each with its decompressor's maker (called late: tests may replace them).
_DECOMPRESSORS: dict[int, Callable[[], _Decompressor]] = {
    zipformat.DEFLATED: lambda: _Inflate(),
    zipformat.BZIP2: lambda: bz2.BZ2Decompressor(),
    zipformat.LZMA: lambda: _ZipLzma(),
}


def _decompressor(method: int) -> _Decompressor | None:
    make = _DECOMPRESSORS.get(method)
    return None if make is None else make()


@dataclass
class _Position:
    """A decompressor paused after ``out_pos`` output bytes, ``next_in`` compressed bytes fed."""

    out_pos: int
    next_in: int  # compressed bytes fed to ``decompressor``
    decompressor: _Decompressor
    crc: int
    pending: memoryview = _NOTHING  # fetched, not fed yet (the live position's only)


class _MemberState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: _Position | None = None
        self.saved: list[_Position] = []  # copies, by out_pos
        self.begun = False  # read here before: a read at 0 now is a re-read, not a first read

    @property
    def positions(self) -> int:
        return len(self.saved) + (self.live is not None)


class MemberSource:
    """An ``ObjectSource`` that also serves archive members (see the module docstring)."""

    def __init__(
        self, inner: ObjectSource, *, disk: DiskCache | None = None, max_positions: int = 256,
        span_memory: int = 64 * 1024 * 1024, whole_max: int = _WHOLE_MAX,
    ) -> None:
        self._inner = inner
        self._whole_max = whole_max
        self._lock = threading.Lock()  # guards the tables below, never held during I/O
        self._data_offsets: cachetools.LRUCache[MemberRef, int] = cachetools.LRUCache(65536)
        # Stored members being read in pieces (~0.3 KiB each): as many as data offsets, so a job
        # that reads the heads of many members before reading them whole still has each checked.
        self._coverage: cachetools.LRUCache[MemberRef, Coverage] = cachetools.LRUCache(65536)
        self._states: cachetools.LRUCache[MemberRef, _MemberState] = cachetools.LRUCache(
            maxsize=max_positions, getsizeof=lambda state: max(1, state.positions))
        self._whole: cachetools.LRUCache[MemberRef, bytes] = cachetools.LRUCache(
            maxsize=_WHOLE_KEPT, getsizeof=len)
        # (where it starts, bytes): the live positions' latest output (``_TRAIL``)
        self._trails: cachetools.LRUCache[MemberRef, tuple[int, bytes]] = cachetools.LRUCache(
            maxsize=_TRAILS_KEPT, getsizeof=lambda trail: max(1, len(trail[1])))
        # Members found bad: (why, when). Their bytes were dropped from the caches; after
        # ``_RETRY_BAD`` seconds the next read fetches them again (damage met in transit, over
        # plain HTTP, is not the archive's), until then every read fails at once.
        self._failed: cachetools.LRUCache[MemberRef, tuple[str, float]] = cachetools.LRUCache(4096)
        # Archive GETs and disk-cache hits, counted here (the block reader counts member reads).
        self.stats = ReadStats()
        self._blocks = ArchiveBlocks(inner, disk, self.stats)
        self._spans = Spans(self._blocks, max_bytes=span_memory)
        self._kept = None if disk is None else KeptMembers(
            disk, self._blocks.count, self._found_bad)

    def close(self) -> None:
        """Stop reading ahead and decompressing into the disk cache; finish the disk cache
        writes still pending."""
        if self._kept is not None:
            self._kept.close()
        self._spans.close()
        self._blocks.close()

    # -- the ObjectSource protocol: members here, everything else passed through ---------------

    def get_range(self, ref: PinnedRef, start: int, end: int) -> bytes:
        if not isinstance(ref, MemberRef):
            return self._inner.get_range(ref, start, end)
        start, end = _within(ref, start, end)
        if start == end:
            return b""
        with self._failing(ref):
            if ref.method == zipformat.STORED:
                return self._stored(ref, start, self._data(ref, start, end))
            if ref.size <= self._whole_max:
                return self._inflated(ref, start, end, self._data)
            kept = self._keeping(ref)
            if kept is not None and (data := kept.read(ref, start, end)) is not None:
                return data
            if start == 0 and end == ref.size:
                # Read whole: bzip2 and LZMA are kept for the next reads (decompressing them again
                # is slow); deflate, ~10x faster, as before (a copy would be bytes written for
                # nothing if nobody reads the member at random).
                if kept is not None and ref.method not in _COPYABLE and (data := kept.fill(
                        ref, start, end, functools.partial(self._whole_pieces, ref))) is not None:
                    return data
                return self._inflated(ref, start, end, self._data)
            return self._inflate_range(ref, start, end, kept)

    def decompressing(self, ref: PinnedRef) -> bool:
        """Whether ``ref`` is a member being decompressed into the disk cache now: a read of it
        waits for this process, not for S3 (the block reader holds no S3 slot for it)."""
        return (isinstance(ref, MemberRef) and self._kept is not None
                and self._kept.produced(ref) is not None)

    def keep(self, ref: MemberRef) -> bool:
        """Decompress ``ref`` into the disk cache now, as a mount does at its first read that
        would start over (``s3datafs prefetch``): a bzip2 or LZMA member over ``whole_max``
        within the kept members' bound. Whether it is kept afterwards (at once if it was).

        Deflate is not kept ahead: only a random reader gains from its copy (a sequential one
        inflates as fast as it reads). The read waited for is the member's last byte, so no
        more of it is held than a mount's decompression holds; it returns once the copy is
        verified. A bad member raises ``ArchiveError``, as its reads would.

        Kept means whole on disk: a copy that lost regions to eviction (an earlier prefetch's,
        or this one's, when the free space left by --cache-min-free cannot hold the member) is
        not reported kept; an earlier one is made again first.
        """
        if not self.keeps_ahead(ref):
            return False
        with self._failing(ref):
            kept = self._keeping(ref)
            if kept is None:
                return False
            return kept.keep(ref, functools.partial(self._whole_pieces, ref))

    def keeps_ahead(self, ref: MemberRef) -> bool:
        """Whether ``keep`` would decompress ``ref`` into the disk cache (see there)."""
        return (ref.method in _DECOMPRESSORS and ref.method not in _COPYABLE
                and ref.size > self._whole_max and self._keeping(ref) is not None)

    def get_range_now(self, ref: PinnedRef, start: int, end: int) -> bytes | None:
        """``get_range``'s answer if it is at hand, without I/O or waiting; else None.

        At hand: a member's bytes lie in a span that has landed (members read in archive order,
        see ``spans.Spans``) and it is stored, or deflated and small enough to inflate whole on the
        caller's thread (``_INLINE_COMPRESSED``), or decompressed a moment ago. The block
        reader asks this first, so most members of an archive read in order cost no thread hop.
        Checks (CRC, declared size, bad headers) and their errors are ``get_range``'s.
        """
        if not isinstance(ref, MemberRef):
            return None
        start, end = _within(ref, start, end)
        if start == end:
            return b""
        with self._failing(ref):
            if ref.method == zipformat.STORED:
                data = self._data_now(ref, start, end)
                return None if data is None else self._stored(ref, start, data)
            with self._lock:
                kept = self._whole.get(ref)
            if kept is not None:
                return kept[start:end]
            if (ref.method != zipformat.DEFLATED or ref.size > self._whole_max
                    or ref.compressed_size > _INLINE_COMPRESSED):
                return None  # bzip2 and lzma are ~10x slower than inflate: not on this thread
            return self._inflated(ref, start, end, self._data_now)

    @contextlib.contextmanager
    def _failing(self, ref: MemberRef) -> Iterator[None]:
        """Check ``ref`` may be read; remember it as bad once a read finds it so.

        A bad member fails every read at once for ``_RETRY_BAD`` seconds, even of pieces that
        alone looked fine (a stored member's CRC is only known once every piece was seen; the
        kernel retries the failed piece by itself), and its bytes leave the caches: after that,
        they are fetched from S3 again.
        """
        with self._lock:
            failed = self._failed.get(ref)
        if failed is not None and time.monotonic() - failed[1] < _RETRY_BAD:
            raise ArchiveError(failed[0])  # a new one: a shared exception's traceback would grow
        _check_readable(ref)
        try:
            yield
        except ArchiveError as exc:
            self._found_bad(ref, exc)
            raise

    def _found_bad(self, ref: MemberRef, exc: ArchiveError) -> None:
        """``ref`` failed a check: its reads fail a while, its bytes leave every cache."""
        with self._lock:
            self._failed[ref] = (str(exc), time.monotonic())
            self._whole.pop(ref, None)
            self._states.pop(ref, None)
            self._coverage.pop(ref, None)
            self._trails.pop(ref, None)
        self._spans.forget(ref.archive, ref.header_offset, ref.data_limit)
        if self._kept is not None:
            self._kept.forget(ref)

    def bucket_versioning(self, bucket: str) -> bool | None:
        return self._inner.bucket_versioning(bucket)

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        return self._inner.head(bucket, key, version_id)

    def list_latest(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[ObjectRef]:
        return self._inner.list_latest(bucket, prefix, versioned=versioned)

    def list_as_of(self, bucket: str, prefix: str, as_of: float) -> Iterator[ObjectRef]:
        return self._inner.list_as_of(bucket, prefix, as_of)

    def head_as_of(self, bucket: str, key: str, as_of: float) -> ObjectRef:
        return self._inner.head_as_of(bucket, key, as_of)

    # -- locating data --------------------------------------------------------------------------

    def _data(self, ref: MemberRef, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the member's stored (possibly compressed) data."""
        with self._lock:
            offset = self._data_offsets.get(ref)
        if offset is not None:
            return self._spans.read(ref.archive, offset + start, offset + end)
        fetched = self._spans.read(ref.archive, ref.header_offset, _first_end(ref, start, end))
        offset = self._located(ref, fetched)
        have = fetched[offset - ref.header_offset:]
        if len(have) >= end:
            return have[start:end]
        return self._spans.read(ref.archive, offset + start, offset + end)

    def _data_now(self, ref: MemberRef, start: int, end: int) -> bytes | None:
        """``_data`` from landed spans only; None if any byte of it is not at hand."""
        with self._lock:
            offset = self._data_offsets.get(ref)
        if offset is None:
            fetched = self._spans.peek(ref.archive, ref.header_offset, _first_end(ref, start, end))
            if fetched is None:
                return None
            offset = self._located(ref, fetched)
            have = fetched[offset - ref.header_offset:]
            if len(have) >= end:
                return have[start:end]
        return self._spans.peek(ref.archive, offset + start, offset + end)

    def _located(self, ref: MemberRef, fetched: bytes) -> int:
        """The data offset told by the local header at the start of ``fetched``; remembered."""
        header = zipformat.parse_local_header(fetched, ref.header_offset, _what(ref))
        offset = header.data_offset
        if offset + ref.compressed_size > ref.data_limit:
            raise ArchiveError(f"{_what(ref)}: its data runs into the next member (a corrupt "
                               "archive or a zip bomb); not served")
        with self._lock:
            self._data_offsets[ref] = offset
        return offset

    # -- stored members -------------------------------------------------------------------------

    def _stored(self, ref: MemberRef, start: int, data: bytes) -> bytes:
        """A stored member's ``data`` at ``start``, its CRC checked once it is all seen."""
        if start == 0 and len(data) == ref.size:
            _check_crc(ref, zlib.crc32(data))
            return data
        with self._lock:
            coverage = self._coverage.get(ref)
            if coverage is None:
                coverage = self._coverage[ref] = Coverage(ref.size)
            crc = coverage.add(start, data)
            if crc is not None:
                del self._coverage[ref]
        if crc is not None:
            _check_crc(ref, crc)
        return data

    # -- compressed members ---------------------------------------------------------------------

    def _inflated(
        self, ref: MemberRef, start: int, end: int,
        data: Callable[[MemberRef, int, int], bytes | None],
    ) -> bytes | None:
        """``[start, end)`` of a compressed member decompressed whole (None: ``data`` had none).

        A member read in pieces (the kernel asks for at most 128 KiB at a time) is decompressed
        once and kept (``_whole``) for its next pieces; one read whole is not kept.
        """
        whole = start == 0 and end == ref.size
        with self._lock:
            kept = None if whole else self._whole.get(ref)
        if kept is None:
            compressed = data(ref, 0, ref.compressed_size)
            if compressed is None:
                return None
            kept = self._inflate_whole(ref, compressed)
            if not whole:
                with self._lock:
                    self._whole[ref] = kept
        return kept if whole else kept[start:end]

    def _inflate_whole(self, ref: MemberRef, compressed: bytes) -> bytes:
        return b"".join(self._run(ref, self._fresh(ref), 0, ref.size, compressed))

    def _fresh(self, ref: MemberRef) -> _Position:
        """A position at the member's start: a decompression from the start (counted)."""
        self._blocks.count(decompressions=1)
        return _Position(0, 0, _new_decompressor(ref), 0)

    def _whole_pieces(self, ref: MemberRef) -> Iterator[bytes]:
        """The member decompressed from its start, in pieces; checked at its end."""
        return self._run(ref, self._fresh(ref), 0, ref.size, None)

    def _keeping(self, ref: MemberRef) -> KeptMembers | None:
        """The kept members, if ``ref`` (a large compressed member) may be one: it fits their
        bound (and the disk took such writes). Which reads go there: ``_to_kept``."""
        kept = self._kept
        if kept is None or not kept.keeps(ref):
            return None
        return kept

    def _inflate_range(
        self, ref: MemberRef, start: int, end: int, kept: KeptMembers | None = None
    ) -> bytes:
        with self._lock:
            state = self._states.get(ref)
            if state is None:
                state = _MemberState()
                self._states[ref] = state
        # Decided under the member's lock with the read that follows: another reader may move
        # the live position past ``start`` meanwhile (concurrent readahead), and this read
        # would then start over after all.
        with state.lock:
            if (behind := self._behind(ref, start, end)) is not None:
                return behind
            if kept is None or not _to_kept(kept, ref, state, start):
                return self._continue(ref, state, start, end)
        # A read the live position cannot serve: decompress the member once, into the disk
        # cache, rather than from its start for this read and again for the next ones.
        data = kept.fill(ref, start, end, functools.partial(self._whole_pieces, ref))
        if data is not None:
            return data
        with state.lock:  # the disk did not keep it: the old way
            return self._continue(ref, state, start, end)

    def _behind(self, ref: MemberRef, start: int, end: int) -> bytes | None:
        """``[start, end)`` from the live position's trail, if it holds all of it."""
        with self._lock:
            trail = self._trails.get(ref)
        if trail is None or not trail[0] <= start < end <= trail[0] + len(trail[1]):
            return None
        return trail[1][start - trail[0]: end - trail[0]]

    def _continue(self, ref: MemberRef, state: _MemberState, start: int, end: int) -> bytes:
        """``[start, end)`` from the best position (``_resume``); ``state.lock`` is held.

        The output from up to ``_TRAIL`` before ``start`` to ``end`` is kept as the trail (not
        a copy: the read's own bytes are the same object), so a read of a run it passed (a
        readahead run that came late) is served from it.
        """
        state.begun = True
        position = self._resume(ref, state, start)
        low = max(position.out_pos, start - _TRAIL)
        output = b"".join(self._run(ref, position, low, end, None, state))
        state.live = position if position.out_pos < ref.size else None
        with self._lock, contextlib.suppress(ValueError):  # larger than all trails: not kept
            self._trails[ref] = (low, output)
        with self._lock:
            try:
                self._states[ref] = state  # re-sized: the bound counts positions
            except ValueError:  # more positions than the whole bound: keep the live one
                state.saved.clear()
                self._states[ref] = state
        return output[start - low:]

    def _resume(self, ref: MemberRef, state: _MemberState, start: int) -> _Position:
        """The best position to decompress ``start`` from: the live one, a saved copy, or 0."""
        live, best = state.live, None
        if live is not None and live.out_pos <= start:
            state.live = None
            best = live
        at = bisect.bisect_right([p.out_pos for p in state.saved], start) - 1
        if at >= 0 and (best is None or state.saved[at].out_pos > best.out_pos):
            saved = state.saved[at]
            best = _Position(saved.out_pos, saved.next_in, saved.decompressor.copy(), saved.crc)
        return best if best is not None else self._fresh(ref)

    def _run(
        self, ref: MemberRef, position: _Position, start: int, end: int,
        compressed: bytes | None, state: _MemberState | None = None,
    ) -> Iterator[bytes]:
        """Decompress from ``position`` to ``end``, yielding the output from ``start`` on.

        ``compressed`` is the whole compressed data when already fetched; else chunks are
        fetched as needed. Moves ``position`` forward; with ``state``, saves copies on the way.
        """
        interval = max(_MIN_INTERVAL, ref.size // _SAVED_PER_MEMBER)
        decompressor = position.decompressor
        # A decompressor keeps the input it could not use yet, and saved copies of it keep theirs:
        # with ``state`` (positions that are kept) it is fed ``_FEED`` bytes at a time, so a
        # saved copy holds no more of a chunk of up to ``_MAX_CHUNK``. The rest of the chunk
        # stays with the live position only (``pending``; ``next_in`` counts what was fed).
        # zlib also copies the input it has not used yet at every call (``unconsumed_tail``:
        # most of a chunk per ``_OUT_STEP`` of output), so deflate is always fed ``_FEED`` bytes
        # at a time (a 64 MiB member of text inflated whole: 0.21 -> 0.19 s of CPU, min of 9).
        pending, position.pending = position.pending, _NOTHING
        feed = _FEED if state is not None or _copyable(decompressor) else None
        try:
            while position.out_pos < end:
                data: bytes | memoryview = b""
                if decompressor.eof or (decompressor.needs_input and not pending
                                        and position.next_in >= ref.compressed_size):
                    raise ArchiveError(f"{_what(ref)}: its data ends after {position.out_pos} "
                                       f"of its {ref.size} bytes (a corrupt archive)")
                if decompressor.needs_input:
                    if not pending:
                        pending = memoryview(self._next_chunk(ref, position, end, compressed))
                    taken = len(pending) if feed is None else min(feed, len(pending))
                    data, pending = pending[:taken], pending[taken:]
                    position.next_in += taken
                goal = min(end, position.out_pos + _OUT_STEP)
                if state is not None and _copyable(decompressor):
                    goal = min(end, (position.out_pos // interval + 1) * interval)
                out = decompressor.decompress(data, goal - position.out_pos)
                if out:
                    skip = max(0, start - position.out_pos)
                    position.crc = zlib.crc32(out, position.crc)
                    position.out_pos += len(out)
                    if skip < len(out):
                        yield out[skip:] if skip else out
                    if state is not None and position.out_pos % interval == 0 \
                            and _copyable(decompressor):
                        self._save(state, position)
            if position.out_pos == ref.size:
                self._finish(ref, position, compressed, pending)
            else:
                position.pending = pending
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise ArchiveError(f"{_what(ref)} cannot be decompressed: {exc}") from None

    def _next_chunk(
        self, ref: MemberRef, position: _Position, end: int, compressed: bytes | None
    ) -> bytes | memoryview:
        if compressed is not None:
            return memoryview(compressed)[position.next_in:]
        wanted = (end - position.out_pos) * ref.compressed_size // max(ref.size, 1) + 65536
        length = min(max(wanted, _MIN_CHUNK), _MAX_CHUNK, ref.compressed_size - position.next_in)
        return self._data(ref, position.next_in, position.next_in + length)

    def _save(self, state: _MemberState, position: _Position) -> None:
        if any(saved.out_pos == position.out_pos for saved in state.saved):
            return
        copy = _Position(position.out_pos, position.next_in, position.decompressor.copy(),
                         position.crc)
        bisect.insort(state.saved, copy, key=lambda p: p.out_pos)

    def _finish(
        self, ref: MemberRef, position: _Position, compressed: bytes | None, pending: memoryview
    ) -> None:
        """At the declared size: nothing may follow (a zip bomb), and the CRC must match.

        An LZMA stream without an end marker (flag bit 1 unset, as 7-Zip writes them) ends
        where the declared size says, and nothing shows that it does: fed its last bytes, a
        decoder makes up symbols from the range coder's flush (an LZMA member of 100,000 bytes
        decoded to 100,001). So nothing is asked of it past that size: the CRC checks it, as
        zipfile and 7-Zip read it.
        """
        if ref.method == zipformat.LZMA and not ref.flags & zipformat.FLAG_LZMA_END_MARKER:
            _check_crc(ref, position.crc)
            return
        decompressor = position.decompressor
        while not decompressor.eof:
            data: bytes | memoryview = b""
            if decompressor.needs_input:
                if not pending:
                    if position.next_in >= ref.compressed_size:
                        break  # all input used: the stream may lack an end marker (lzma); CRC
                    pending = memoryview(
                        self._next_chunk(ref, position, position.out_pos, compressed))
                data, pending = pending[:_FEED], pending[_FEED:]
                position.next_in += len(data)
            if decompressor.decompress(data, 1):
                raise ArchiveError(
                    f"{_what(ref)} inflates past its declared size of {ref.size} bytes (a zip "
                    "bomb or a corrupt archive); not served")
            if not data and decompressor.needs_input is False:
                break  # no progress possible without input
        _check_crc(ref, position.crc)


def _within(ref: MemberRef, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` cut at the member's end, as a read of a file is: a range past it is no
    evidence of a bad member (it made a compressed one fail, and a stored one answered the
    archive's bytes after it). FUSE clamps reads to the size before they get here."""
    end = min(end, ref.size)
    return min(start, end), end


def _first_end(ref: MemberRef, start: int, end: int) -> int:
    """Where the first read of a member, ``[start, end)`` of its data, ends in the archive.

    Header and data in one GET when the guess of the header's length holds, and when what lies
    between them is short: a first read far into a member (a footer, ``tail``) reads the header
    alone, then its range, rather than everything up to it.
    """
    return min(ref.header_offset + _HEADER_GUESS + (end if start <= _JOINED_MAX else 0),
               ref.data_limit)


def _to_kept(kept: KeptMembers, ref: MemberRef, state: _MemberState, start: int) -> bool:
    """Whether a read from ``start`` goes to the kept members: it would start over (see
    ``_restarts``; for deflate, only in a member larger than ``_TRAIL``, and if it would also
    inflate ``_NEAR_SAVED`` bytes or more before it: ``_far_from_saved``), or their
    decompression under way reaches it sooner than the live position (a sequential reader's
    first readahead run can reach a member before its first read: that run started the
    decompression, and the first read must join it, not start another)."""
    live, under_way = state.live, kept.produced(ref)
    if under_way is not None and under_way <= start and (
            live is None or not live.out_pos <= start or start - under_way < start - live.out_pos):
        return True
    return _restarts(state, start) and (
        ref.method not in _COPYABLE or (ref.size > _TRAIL and _far_from_saved(state, start)))


def _far_from_saved(state: _MemberState, start: int) -> bool:
    """Whether a deflate read from ``start`` would inflate ``_NEAR_SAVED`` bytes or more before
    it: no saved position, nor the member's start, lies within that before it."""
    at = bisect.bisect_right([saved.out_pos for saved in state.saved], start) - 1
    nearest = state.saved[at].out_pos if at >= 0 else 0
    return start - nearest >= _NEAR_SAVED


def _restarts(state: _MemberState, start: int) -> bool:
    """Whether a read from ``start`` would decompress the member from its start again: the
    live position is past it or gone, and it is not a first read within ``_TRAIL`` of the
    member's start. That one is a sequential reader's first read, or one of its first
    readahead runs arriving before it: the live position serves it, and its trail the runs
    before it (through the cache, the reader was ~25 % slower: the copy written as it goes,
    and 8 MiB of compressed data fetched before any output). A random reader pays for it with
    one decompression of under ``_TRAIL`` bytes before its next read goes to the cache."""
    live = state.live
    return not (live is not None and live.out_pos <= start) and (
        start >= _TRAIL or state.begun)


def _copyable(decompressor: _Decompressor) -> bool:
    return getattr(decompressor, "copyable", False)


def _new_decompressor(ref: MemberRef) -> _Decompressor:
    decompressor = _decompressor(ref.method)
    if decompressor is None:  # _check_readable ran first: cannot happen
        raise ArchiveError(f"{_what(ref)}: unsupported compression method {ref.method}")
    return decompressor


def _check_readable(ref: MemberRef) -> None:
    if ref.flags & zipformat.FLAG_ENCRYPTED:
        raise ArchiveError(f"{_what(ref)} is encrypted; s3datafs cannot decrypt zip members")
    if ref.method == zipformat.STORED and ref.size != ref.compressed_size:
        raise ArchiveError(f"{_what(ref)} is stored, yet its sizes disagree ({ref.size} and "
                           f"{ref.compressed_size} bytes): a corrupt archive; not served")
    # Checked on every read: by the table, not by making a decompressor (bzip2 allocates one).
    if ref.method != zipformat.STORED and ref.method not in _DECOMPRESSORS:
        name = zipformat.METHOD_NAMES.get(ref.method, f"method {ref.method}")
        raise ArchiveError(f"{_what(ref)} is compressed with {name}, which s3datafs does not "
                           "support (stored, deflate, bzip2 and lzma are)")


def _check_crc(ref: MemberRef, crc: int) -> None:
    if crc != ref.crc32:
        raise ArchiveError(f"{_what(ref)}: CRC-32 mismatch ({crc:08x}, the archive says "
                           f"{ref.crc32:08x}): a corrupt archive; not served")


def _what(ref: MemberRef) -> str:
    return f"member {ref.path!r} of {ref.archive.uri}"
