"""The FUSE adapter: the only ``pyfuse3.Operations``. Thin by design: it translates, never decides.

Invariants:
- The namespace is the immutable catalog, so inode numbers are catalog rowids, ``forget`` has
  nothing to do, and the kernel may cache entries, attributes and pages for a long time
  (``keep_cache`` on open, timeouts of a day), missing names included (a negative entry). Not
  the pages of a zip member found bad: an open of it drops them (``BlockReader.found_bad``).
- Errors cross the FUSE boundary here only: typed ``S3DataFSError``s become their ``errno``;
  anything unexpected is logged once with its traceback and becomes ``EIO``. Only
  ``pyfuse3.FUSEError`` leaves a handler.
- No ``flush`` handler: pyfuse3 answers ENOSYS, after which the kernel stops sending FLUSH
  (nothing is ever dirty), so a close() costs no request. For 20,000 small zip members read
  once each, that is 20,000 requests fewer.
- Every write-like operation answers ``EROFS`` (the mount is also ``ro``, so the kernel usually
  refuses first; these handlers make the answer the same if it ever asks).
- A zip member recorded as a symbolic link is a link; ``readlink`` answers its target only if
  following it stays in the mount (``archive.links`` decides).
- All handlers run on the trio thread; the open-file table needs no lock.
- No request outlives the connection: a read (the one handler that waits on S3) runs in a cancel
  scope that ``abandon_requests`` cancels (the kernel ended the connection, or the daemon is
  stopping), so a read waiting on an unreachable S3 cannot hold the daemon up after an unmount.
  The others answer from the catalog without waiting, so they need no scope (3.5 us each).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from .archive.links import LinkTargets, is_link
from .catalog import Catalog, CatalogDamaged, Entry
from .errors import ArchiveError, S3DataFSError, StaleObjectError
from .failurelog import FailureLog
from .model import MemberRef, PinnedRef
from .plan import FsSettings
from .prefetch import FilePrefetch, Readahead
from .reader import BlockReader

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT  # O_APPEND alone writes nothing
_XATTR_PREFIX = b"user.s3datafs."
_NAME_MAX = 255
_DOT_ENTRIES = 2  # "." and ".." open every directory listing
_FORGETTING_SECONDS = 60.0  # how long a start read twice says the kernel forgets pages
T = TypeVar("T")


def _translate_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Map every exception a handler raises to a ``FUSEError`` (see module invariants)."""

    @functools.wraps(handler)
    async def wrapper(self: Operations, *args: Any) -> T:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except S3DataFSError as exc:
            self._report(exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            self._unexpected(handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _read_only(*_args: Any) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


_COUNT_WIDTH = len(str(2**64 - 1))


def _steady_json(counts: dict[str, int]) -> str:
    """``counts`` as JSON whose length does not change as they grow: followed by as many spaces
    (white space JSON allows) as its counts lack digits to the largest 64-bit count's width. C
    programs (getfattr) ask for an attribute's size, then for its value in a buffer of that
    size; a count that gained a digit in between would fail the second call with ERANGE."""
    text = json.dumps(counts, sort_keys=True)
    lacking = sum(_COUNT_WIDTH - len(str(count)) for count in counts.values())
    return text + " " * lacking


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, catalog: Catalog, reader: BlockReader, settings: FsSettings) -> None:
        super().__init__()
        self._catalog = catalog
        self._reader = reader
        self._settings = settings
        self._links = LinkTargets(catalog, lambda ref: reader.read(ref, 0, ref.size))
        self._open_files: dict[int, tuple[PinnedRef, Readahead, int]] = {}  # ref, ..., inode
        self._file_prefetch = FilePrefetch(maximum=settings.prefetch_files)
        self._started = bytearray()  # bit per inode: its first bytes were read in this mount
        self._kernel_forgot_at = -_FORGETTING_SECONDS  # a file's start was last read twice
        self._next_fh = 1
        self.failures = FailureLog()  # what the log is told of failed requests
        self.failed_reads = 0  # reads answered with an error, of which:
        self.stale_reads = 0  # ESTALE: the object changed or was deleted after mount
        self._traced: set[str] = set()  # kinds of unexpected error logged with a traceback
        self._in_progress: set[trio.CancelScope] = set()  # one per request being answered
        self._abandoned = False
        self.on_init: Callable[[], None] = lambda: None  # told when the kernel's INIT arrives

    def init(self) -> None:
        self.on_init()

    def abandon_requests(self) -> int:
        """End every request in progress, and any that arrives from now on, with ``EIO``;
        return how many were in progress.

        For when no answer matters any more: the kernel has ended the connection (an unmount),
        or the daemon is stopping. Their flights go on in the mount's nursery, which is
        cancelled once pyfuse3's loop has returned.
        """
        self._abandoned = True
        for scope in self._in_progress:
            scope.cancel()
        return len(self._in_progress)

    async def _unless_abandoned(self, request: Awaitable[T]) -> T:
        """Await ``request``; ``EIO`` if ``abandon_requests`` comes first (or came before)."""
        scope = trio.CancelScope()
        if self._abandoned:
            scope.cancel()
        self._in_progress.add(scope)
        try:
            with scope:
                return await request
        finally:
            self._in_progress.discard(scope)
        raise pyfuse3.FUSEError(errno.EIO)  # abandoned: nobody is waiting for the answer

    # -- namespace ------------------------------------------------------------------------------

    @_translate_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if len(name) > _NAME_MAX:  # the kernel passes up to 1,024 bytes; statfs says 255
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        entry = self._catalog.lookup(parent_inode, os.fsdecode(name))
        if entry is None:
            return self._no_such_entry()
        return self._attributes(entry)

    @_translate_errors
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attributes(self._entry(inode))

    @_translate_errors
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        entry = self._entry(inode)
        if not is_link(entry):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return await self._unless_abandoned(self._links.target(entry))

    @_translate_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if not self._entry(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_translate_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """``.`` and ``..`` first, as every local filesystem lists them (``ls -a``, tools that
        count them), then the children in inode order.

        Offsets (``next_id``): ``.`` is 1, ``..`` is 2, a child is its inode + ``_DOT_ENTRIES``.
        Children are listed in inode order, so resuming after the last reported offset neither
        repeats nor skips an entry. The kernel links no dentry for ``.`` or ``..`` from a
        readdirplus reply, so their attributes are only for the listing.
        """
        directory = self._entry(fh)
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attributes(directory), 1):
            return
        if start_id < _DOT_ENTRIES and not pyfuse3.readdir_reply(
            token, b"..", self._attributes(self._entry(directory.parent)), _DOT_ENTRIES
        ):
            return
        after = max(start_id - _DOT_ENTRIES, 0)
        for entry in self._catalog.children(fh, after_inode=after):
            if not pyfuse3.readdir_reply(
                token, os.fsencode(entry.name), self._attributes(entry), entry.inode + _DOT_ENTRIES
            ):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    @_translate_errors
    async def statfs(self, ctx: Any = None) -> Any:
        meta = self._catalog.meta
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = -(-meta.total_bytes // data.f_frsize)
        data.f_bfree = data.f_bavail = 0
        data.f_files = meta.object_count + meta.dir_count
        data.f_ffree = data.f_favail = 0
        data.f_namemax = _NAME_MAX
        return data

    # -- file data ------------------------------------------------------------------------------

    @_translate_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> Any:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        entry = self._entry(inode)
        if entry.ref is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        readahead = Readahead(self._settings.readahead_initial, self._settings.readahead_max)
        self._open_files[fh] = (entry.ref, readahead, inode)
        self._reader.opened(entry.ref)
        if not isinstance(entry.ref, MemberRef):  # members: the archive's spans are read ahead
            self._prefetch_after(entry, reader=getattr(ctx, "pid", 0))
        # A member found bad: the kernel drops the pages it kept of it (pieces served before
        # its CRC failed), so a read of it whole reaches the member source whole and is checked.
        return pyfuse3.FileInfo(fh=fh, keep_cache=not self._reader.found_bad(entry.ref))

    def _mark_started(self, inode: int) -> None:
        """The start of ``inode`` was served: the kernel has its first page now (and has
        forgotten it, if it was served before: memory pressure, ``drop_caches``, a reader with
        ``O_DIRECT``, whose reads all reach us)."""
        byte = inode >> 3
        if byte >= len(self._started):
            self._started.extend(bytes(byte + 1 - len(self._started) + 1024))
        elif self._started[byte] & (1 << (inode & 7)):
            self._kernel_forgot_at = time.monotonic()
        self._started[byte] |= 1 << (inode & 7)

    def _kernel_has(self, inode: int) -> bool:
        """Whether the kernel may still keep the first page of ``inode`` (``keep_cache``): its
        start was served, and no start was served twice in the last ``_FORGETTING_SECONDS`` (a
        second epoch of a dataset larger than memory keeps saying so; one ``drop_caches`` is
        forgotten after a minute)."""
        byte = inode >> 3
        forgets = time.monotonic() - self._kernel_forgot_at < _FORGETTING_SECONDS
        return not forgets and byte < len(self._started) and bool(
            self._started[byte] & (1 << (inode & 7)))

    def _prefetch_after(self, entry: Entry, reader: int = 0) -> None:
        """Fetch the next files of ``entry``'s directory if it, or ``reader``'s share of it,
        is being read in order (``FilePrefetch``: ``reader`` is the opening thread's id).

        Of each file, what its own readahead would fetch first on a read from its start: the
        whole file up to ``readahead_initial`` (1 MiB), else that much of its head; the rest is
        the file's own readahead once it is read. What the prefetch budget has no room for is
        skipped and asked for again at a later open.

        Skipped: files whose start this mount served before (a second pass over a directory):
        the kernel keeps their pages (``keep_cache``), so what was fetched for them would wait
        unread in the prefetch budget. Unless the kernel is seen to forget: once the start of a
        file is asked for a second time, the data outgrows the page cache (a dataset larger than
        memory, from its second epoch on) and files read before are fetched ahead like the rest
        (a review measured a second in-order pass 9.8x slower than the first at 20 ms, where
        every file again cost a round trip). And zip members: ``MemberSource`` fetches the
        archive in spans that hold many members, and fetching members one by one on top of that
        was measured slower (all 20,000 members of the bench archive by 8 threads: 5.3 -> 9.1
        s, 98 -> 151 GETs, 0 ms).
        """
        head = self._settings.readahead_initial
        for after, until in self._file_prefetch.on_open(entry.parent, entry.inode, reader):
            for sibling in self._catalog.children(entry.parent, after_inode=after):
                if sibling.inode > until:
                    break
                ref = sibling.ref
                if ref is None or ref.size == 0 or self._kernel_has(sibling.inode):
                    continue
                wanted = min(ref.size, head)
                if self._reader.prefetch(ref, 0, wanted) < wanted:
                    self._file_prefetch.fell_short(entry.parent, sibling.inode - 1, reader)
                    return

    @_translate_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._open_files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        ref, readahead, inode = handle
        try:
            data = await self._unless_abandoned(self._reader.read(ref, off, size, readahead))
        except S3DataFSError as exc:  # reported per object: a failed read is retried at once
            self.failed_reads += 1
            self.stale_reads += exc.errno == errno.ESTALE
            self._report(exc, subject=ref.uri)
            raise pyfuse3.FUSEError(exc.errno) from None
        if off == 0:  # served: the kernel has the page now (a failed read is retried at once)
            self._mark_started(inode)
        return data

    def counters(self) -> dict[str, int]:
        """The mount's counters: the reader's, and the reads that failed."""
        return {**self._reader.counters(), "failed_reads": self.failed_reads,
                "stale_reads": self.stale_reads}

    async def release(self, fh: int) -> None:
        handle = self._open_files.pop(fh, None)
        if handle is not None:
            self._reader.closed(handle[0])

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # nothing is ever dirty

    # -- extended attributes --------------------------------------------------------------------

    @_translate_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        value = self._xattrs(self._entry(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_translate_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        return list(self._xattrs(self._entry(inode)))

    def _xattrs(self, entry: Entry) -> dict[bytes, bytes]:
        values: dict[str, str] = {}
        if entry.inode == pyfuse3.ROOT_INODE:
            meta = self._catalog.meta
            values = {
                "uri": meta.uri,
                "object_count": str(meta.object_count),
                "fingerprint": meta.fingerprint,
                "stats": _steady_json(self.counters()),
            }
        elif entry.ref is not None:
            values = {"uri": entry.ref.uri, "etag": entry.ref.etag.strip('"')}
            if entry.ref.version_id is not None:
                values["version_id"] = entry.ref.version_id
            if isinstance(entry.ref, MemberRef):  # the pin is the archive's; say which member
                values["member"] = entry.ref.path
                values["member_crc32"] = f"{entry.ref.crc32:08x}"
        return {_XATTR_PREFIX + k.encode(): v.encode() for k, v in values.items()}

    # -- read-only: every change is refused ----------------------------------------------------

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only

    # -- helpers --------------------------------------------------------------------------------

    def _entry(self, inode: int) -> Entry:
        entry = self._catalog.get(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _no_such_entry(self) -> Any:
        """ENOENT that the kernel may remember: inode 0 with the entry timeout.

        The namespace never changes, so a name that is missing now is missing for the whole
        mount. Loaders probe for optional files (``x.json``, then ``x.json.gz``, ...) over and
        over; the kernel then answers those probes itself instead of asking the daemon each time.
        """
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = 0
        attrs.entry_timeout = self._settings.cache_timeout
        return attrs

    def _attributes(self, entry: Entry) -> Any:
        settings = self._settings
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = entry.inode
        if entry.is_dir:
            attrs.st_mode = stat.S_IFDIR | settings.dir_mode
        elif is_link(entry):  # its size is its target's length, as a link's is
            attrs.st_mode = stat.S_IFLNK | 0o777
        else:
            mode = settings.file_mode
            # A member its writer made executable: x wherever r is. Writers may leave the type
            # out (zipfile's writestr); a link's bits are all set, and it is no executable.
            if entry.mode & 0o111 and stat.S_IFMT(entry.mode) in (0, stat.S_IFREG):
                mode |= (mode & 0o444) >> 2
            attrs.st_mode = stat.S_IFREG | mode
        attrs.st_nlink = entry.links
        attrs.st_size = entry.size
        attrs.st_blksize = 128 * 1024
        attrs.st_blocks = -(-entry.size // 512)
        attrs.st_uid, attrs.st_gid = settings.uid, settings.gid
        mtime_ns = round(entry.mtime * 1e6) * 1000  # S3 has milliseconds; floats blur nanoseconds
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime_ns
        attrs.attr_timeout = attrs.entry_timeout = settings.cache_timeout
        return attrs

    def _unexpected(self, handler: str, exc: Exception) -> None:
        """A bug, or a resource run out (no thread to be had): logged like a failed read (it
        may repeat on every request), with a traceback the first time each kind is logged."""
        kind = f"{handler}: {type(exc).__name__}"
        first = kind not in self._traced
        if self.failures.report(f"unexpected error in {kind}: {exc}", errno.EIO, subject=kind,
                                permanent=False, exc_info=exc if first else None) and first:
            self._traced.add(kind)

    def _report(self, exc: S3DataFSError, subject: str | None = None) -> None:
        """Tell the log of a failure, as much as ``failurelog`` allows."""
        message = str(exc)
        permanent = isinstance(exc, StaleObjectError | ArchiveError | CatalogDamaged)
        self.failures.report(message, exc.errno, subject=subject or message, permanent=permanent)
