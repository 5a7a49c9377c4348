"""The catalog: the pinned listing as a namespace, stored in SQLite so it costs disk, not RAM.

Schema (one file per snapshot)::

    entries(inode INTEGER PRIMARY KEY,   -- rowid = inode number, fixed for the snapshot's life
            parent INTEGER NOT NULL,     -- inode of the containing directory
            name TEXT NOT NULL,          -- one safe path segment (see keypath); "" for the root
            is_dir INTEGER NOT NULL,     -- 1 directory, 0 regular file
            size INTEGER NOT NULL,       -- a file's bytes; a directory's subdirectories
            mtime REAL,                  -- seconds since the epoch (LastModified / newest child)
            key TEXT, version_id TEXT, etag TEXT,   -- the pinned object; NULL for directories
            header_offset, data_limit, method,      -- archive catalogs only: where a file's
            flags, compressed_size, crc32,          -- bytes are in the zip, and the Unix mode
            mode)                                   -- its writer recorded (0: none); NULL for
                                                    -- directories
    UNIQUE INDEX entries_by_name(parent, name)      -- lookup()
    INDEX entries_by_parent(parent)                 -- children(): (parent, rowid) order, paged
    markers(inode INTEGER PRIMARY KEY,   -- the directory a "dir/" marker object made
            key, version_id, etag, size, mtime)     -- the marker object itself, as pinned
    meta(name TEXT PRIMARY KEY, value)              -- format_version, uri, bucket, prefix, ...
                                                    -- fingerprint, single_object, as_of, ...
                                                    -- archive (JSON of the pinned zip, or NULL)

The root directory is inode 1 (``ROOT_INODE``, equal to ``pyfuse3.ROOT_INODE``), its own parent,
named ``""``. Inodes are handed out in arrival order (S3 lists keys in UTF-8 byte order, so a
directory's children come back from ``children()`` in that order too); gaps are possible where a
file lost to a directory of the same name.

Building (``CatalogBuilder`` / ``build_catalog``) streams: rows are inserted in batches with
``executemany`` in a transaction; the only per-key state kept in memory is a dict
``directory path -> inode`` (directories are few) and the current batch. The unique index by
name is created at finish, one sort; a name that comes again in a later batch than its first is
resolved then, by the same rules, so its warning comes at finish rather than as it was met. A
strict builder must refuse a name as it meets it, and needs no index to: its keys come in strictly
increasing order, so the one name it can meet twice is a file's that a later key makes a directory
(``keypath`` maps other keys to other paths), and that file is among the few every key since has
begun with (``_open_files``). Rules:
- unsafe keys (``keypath.split_key``) and keys outside the prefix are skipped, one WARNING each;
- a key ending in ``"/"`` is a directory marker (any size; a non-zero size is warned about and
  its bytes are not shown); parent directories are created implicitly;
- a file whose name is also a directory loses, whichever arrives first: one WARNING, skipped,
  and left out of object_count/total_bytes; a repeated key keeps its first ref, the same way
  (a repeated archive member keeps its *last*, as extracting the archive does);
- at finish a directory's mtime becomes the newest mtime among its direct children, computed
  bottom-up (so it is the newest in its subtree); an empty directory keeps its marker's
  LastModified; an empty root takes the ``prefix/`` marker's, else the build time. Its row's
  ``size`` becomes the number of directories in it, counted from the in-memory dict (directories
  are never dropped): ``Entry.links`` is 2 more, the link count a local disk gives a directory.
An *archive catalog* (``archive=`` the pinned zip object) holds the members of one zip instead
of objects: ``add_member`` takes central directory entries (``archive.zipformat.Member``), with
the same path rules plus the archive-only ones (drive letters, backslashes); a member's row keeps
its name in ``key`` and its place in the archive (and the Unix mode its writer recorded) in the
member columns, and ``Entry.ref`` is then a ``MemberRef`` (``Entry.mode`` that mode). Its
identity is the archive's: ``objects()`` yields the archive object alone and the fingerprint is
the archive's (given to the builder), so snapshots and ``--expect-fingerprint`` pin the archive.
Archive catalogs are persistent (``archive.index``): a remount needs no index read.

The catalog stores the dataset ``fingerprint`` (see ``fingerprint``) of what it stores: every
file row and every marker, in key order (SQLite's BINARY collation compares UTF-8 bytes, the order
the fingerprint is defined in); ``objects()`` streams the same rows in the same order, which is
what a snapshot file is written from. So the fingerprint, a snapshot and the mount always describe
the same objects: exactly those that are shown. While keys arrive in strictly increasing order (a
listing's and a snapshot's do; a strict builder refuses any other) and no file added is dropped
afterwards (by a directory of its name, or as a repeat from an earlier batch), the builder feeds
each object stored to the fingerprint as it comes, which is then that same digest; otherwise
``finish()`` computes it from the stored rows sorted by key (a million keys: ~1 s more).
The database is written to a temporary file next to ``path`` and moved into place with
``os.replace`` only when complete: a reader never sees a half-built catalog, and a failed build
leaves nothing behind. A builder belongs to the thread that created it.

Reading (``Catalog``): the file is opened read-only and ``immutable`` (it never changes once in
place; a rebuild replaces the file, and an open catalog keeps reading the old one). Every method is
one short query run under a lock, so a ``Catalog`` may be shared by the trio thread and worker
threads. Opening reads the ``meta`` table only; damage deeper in the file (SQLite keeps no page
checksums: a disk that lost or garbled writes) shows when a query meets it, as
``CatalogDamaged``, which a mount answers with EIO (and logs once). The first time,
``on_damage`` (set by the mount) removes the copy kept in the cache, so that the next mount
builds the catalog again instead of meeting the same damage. ``children()`` fetches pages
(growing from ``_FIRST_PAGE`` to ``_MAX_PAGE`` rows) and holds no cursor between them, so a
readdir that stops early costs at most one page and a huge directory is never materialised at
once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .archive.zipformat import NO_TIME, Member, member_path_problem
from .errors import ConfigError
from .fingerprint import Fingerprinter, OrderError
from .keypath import Unsafe, segment_problem, split_key, strip_prefix
from .model import MemberRef, ObjectRef, PinnedRef

log = logging.getLogger(__name__)

# 2: markers, fingerprint, single_object, as_of; 3: members, archive; 4: a name twice in an
# archive shows the later member (stored member catalogs of 3 showed the first: rebuilt); 5: a
# member with no time of its own has the archive's; 6: a member's place in the zip in its entries
# row (was a members table); 7: member names as unzip reads them: a Unix writer's UTF-8 without
# the flag (6 showed it as CP437), a Windows writer's backslashes as separators (6 skipped them);
# 8: a member's time from its NTFS extra field (7 showed the DOS time, the writer's local time);
# 9: a member's Unix mode (the mode column); 10: a directory row's size counts its subdirectories
# (was 0)
FORMAT_VERSION = 10
ROOT_INODE = 1  # == pyfuse3.ROOT_INODE; not imported: pyfuse3 stays in the FUSE ring
_BATCH = 10_000  # rows per executemany: amortises the call, keeps the batch a few MiB at most
_FIRST_PAGE = 128  # children(): a readdir buffer holds roughly this many names
_MAX_PAGE = 4096
_BUILD_CACHE_KIB = 8 * 1024  # SQLite page cache while building: bounds RSS; speed barely moves
_COLUMNS = "inode, parent, name, is_dir, size, mtime, key, version_id, etag"
# A zip may hold one name twice (appending to an archive adds, never replaces): extracting it
# leaves the later member on disk (unzip, zipfile, bsdtar), so the mount shows that one.
_SUPERSEDED = "a later member has the same name"
_MEMBER_COLUMNS = "header_offset, data_limit, method, flags, compressed_size, crc32, mode"
# An archive catalog's entries rows carry their member's place in the zip, inserted with the row:
# a members table filled at finish from a dict of every member took 2-4 s more for a million, and
# +160 MiB of RSS; and reads need no join.
_MEMBER_SCHEMA = (", header_offset INTEGER, data_limit INTEGER, method INTEGER, flags INTEGER, "
                  "compressed_size INTEGER, crc32 INTEGER, mode INTEGER")
_SCHEMA = """
CREATE TABLE entries (
    inode INTEGER PRIMARY KEY, parent INTEGER NOT NULL, name TEXT NOT NULL,
    is_dir INTEGER NOT NULL, size INTEGER NOT NULL, mtime REAL,
    key TEXT, version_id TEXT, etag TEXT{member_columns});
CREATE TABLE markers (
    inode INTEGER PRIMARY KEY, key TEXT NOT NULL, version_id TEXT, etag TEXT NOT NULL,
    size INTEGER NOT NULL, mtime REAL);
CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT INTO entries (inode, parent, name, is_dir, size) VALUES (1, 1, '', 1, 0);  -- ROOT_INODE
"""

_NAME_INDEX = "CREATE UNIQUE INDEX entries_by_name ON entries(parent, name)"
# An entries row as inserted: _COLUMNS, then an archive catalog's _MEMBER_COLUMNS.
_Row = tuple[int | float | str | None, ...]
_NO_MEMBER = (None,) * 7  # the member columns of an archive catalog's directory row
# Every object shown (files and directory markers) in key order: fingerprint and snapshots.
_OBJECTS_BY_KEY = """
SELECT key, version_id, etag, size, mtime FROM entries WHERE is_dir = 0
UNION ALL SELECT key, version_id, etag, size, mtime FROM markers
ORDER BY key"""
_OBJECTS_FETCH = 4096


class CatalogError(ConfigError):
    """The catalog file is missing, unreadable, or from another format version: rebuild it."""


class CatalogDamaged(CatalogError):
    """SQLite found the catalog's file damaged past what ``Catalog.open`` reads (bit rot, a
    disk that lost writes): the names it holds cannot be served."""


# SQLite's answers for a damaged file (a page that is not what it must be, a file cut short):
# every other error (a closed connection, I/O) keeps its own meaning.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class UnshowableKey(ValueError):
    """A strict builder was given a key it would have skipped, or one out of key order (the
    message says why)."""


@dataclass(frozen=True, slots=True)
class CatalogSummary:
    """What a build produced. ``dir_count`` excludes the root; skips include lost files."""

    object_count: int
    total_bytes: int
    dir_count: int
    skipped_count: int


@dataclass(frozen=True, slots=True)
class CatalogMeta:
    """The snapshot's identity and totals, as stored in the ``meta`` table."""

    uri: str
    bucket: str
    prefix: str
    versioned: bool
    object_count: int
    total_bytes: int
    dir_count: int
    skipped_count: int
    created: float
    fingerprint: str = ""
    single_object: bool = False
    as_of: float | None = None  # the point in time the listing was taken at (--as-of)
    marker_count: int = 0  # directory markers shown (not in object_count / total_bytes)
    archive: ObjectRef | None = None  # an archive catalog: the zip whose members it holds


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in the mounted tree; ``ref`` is the pinned object (``None`` for directories).

    ``size`` is a file's bytes, 0 for a directory; ``links`` its link count: 1 for a file, 2 and
    one for each directory in it for a directory (its name, its ``.``, each child's ``..``).
    """

    inode: int
    parent: int
    name: str
    is_dir: bool
    size: int
    mtime: float
    ref: PinnedRef | None
    mode: int = 0  # a member's Unix mode as its writer recorded it (type, permissions); 0: none
    links: int = 1


class CatalogBuilder:
    """Builds one catalog file: ``add()`` each ref, then ``finish()`` (or ``abort()``).

    ``prefix`` ("" or ending in "/") is stripped from every key; a single-object mount passes the
    key's parent and ``single_object=True``; ``as_of`` records a point-in-time listing. A
    ``strict`` builder raises ``UnshowableKey`` instead of skipping a key with a warning, and for
    a key that does not sort after the one before (a snapshot file lists only keys that can be
    shown, in key order, so either means an edited file); ``fingerprint_so_far()`` is then the
    fingerprint ``finish()`` will store. An archive catalog passes ``archive`` (the pinned zip)
    and its ``fingerprint``, and is filled with ``add_member`` instead of ``add``. Use it as a
    context manager (it aborts on exit unless ``finish()`` succeeded), or call ``abort()``
    yourself if ``add()`` or ``finish()`` raises.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, uri: str, bucket: str, prefix: str, versioned: bool,
        single_object: bool = False, as_of: float | None = None, strict: bool = False,
        archive: ObjectRef | None = None, fingerprint: str | None = None,
    ) -> None:
        strip_prefix("", prefix)  # validates prefix before any file is created
        if (archive is None) != (fingerprint is None):
            raise ValueError("an archive catalog needs both archive and fingerprint")
        self._strict = strict
        self._archive = archive
        self._fingerprint = fingerprint
        columns = _row_columns(archive is not None)
        values = ", ".join("?" * len(columns.split(",")))
        self._insert = f"INSERT INTO entries ({columns}) VALUES ({values})"
        self._dir_tail = () if archive is None else _NO_MEMBER
        self._path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=".tmp",
                                   dir=self._path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._done = False
        self._meta = {"format_version": FORMAT_VERSION, "uri": uri, "bucket": bucket,
                      "prefix": prefix, "versioned": int(versioned), "created": time.time(),
                      "single_object": int(single_object), "as_of": as_of,
                      "archive": None if archive is None else _ref_to_json(archive)}
        self._prefix = prefix
        self._dirs: dict[str, int] = {"": ROOT_INODE}
        self._markers: dict[int, ObjectRef] = {}  # directory inode -> its marker object
        self._pending: list[_Row | None] = []
        self._pending_files: dict[tuple[int, str], int] = {}  # (parent, name) -> batch index
        self._next_inode = ROOT_INODE + 1
        self._objects = self._bytes = self._skipped = 0
        # The fingerprint of the objects stored so far, while it can be had in arrival order (see
        # the module docstring); None once it cannot, and finish() sorts the stored rows instead.
        self._digest: Fingerprinter | None = Fingerprinter() if archive is None else None
        # A strict builder's files that a later key could still make a directory of, as (path,
        # key): each is a prefix of every key added since, so they are a chain of prefixes of the
        # last key (once a key does not begin with a file's path, no later key does: it sorts
        # after all that do). It finds a stored file a directory beats here, not by its name.
        self._open_files: list[tuple[str, str]] = []
        self._db: sqlite3.Connection | None = None
        schema = _SCHEMA.format(member_columns="" if archive is None else _MEMBER_SCHEMA)
        try:
            self._db = sqlite3.connect(self._tmp, isolation_level=None)
            self._db.executescript(
                f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA locking_mode=EXCLUSIVE;"
                f"PRAGMA cache_size=-{_BUILD_CACHE_KIB}; {schema} BEGIN;")
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> CatalogBuilder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()

    def add(self, ref: ObjectRef) -> None:
        """Add one listed object; skips (with a WARNING) what cannot be shown."""
        if ref.bucket != self._meta["bucket"]:
            raise ValueError(f"{ref.uri} is not in bucket {self._meta['bucket']!r}")
        if not ref.key.startswith(self._prefix):
            self._skip(ref.key, "outside the mounted prefix")
            return
        path = ref.key[len(self._prefix) :]
        if self._strict:
            open_files = self._open_files
            while open_files and not path.startswith(open_files[-1][0]):
                open_files.pop()
        file = self._place(path, ref.key, lambda: ref)
        if file is None:
            return
        if file in self._pending_files:
            self._skip(ref.key, "key listed twice")
            return
        self._pending_files[file] = len(self._pending)
        self._append((self._next_inode, *file, 0, ref.size, ref.last_modified, ref.key,
                      ref.version_id, ref.etag))
        self._objects += 1
        self._bytes += ref.size
        self._stored(ref)
        if self._strict:
            self._open_files.append((path, ref.key))

    def add_member(self, member: Member) -> None:
        """Add one central directory entry of the archive; skips (WARNING) what cannot be shown."""
        if self._archive is None:
            raise RuntimeError("add_member() is for archive catalogs")
        # A member whose zip records no valid time has the archive's (not 1970).
        mtime = member.mtime if member.mtime != NO_TIME else self._archive.last_modified
        if (problem := member_path_problem(member.name)) is not None:
            self._skip(member.name, problem)
            return
        name = member.name
        archive = self._archive
        file = self._place(name, name, lambda: ObjectRef(archive.bucket, name, None, "", 0, mtime))
        if file is None:
            return
        if (earlier := self._pending_files.get(file)) is not None:
            self._drop(self._pending[earlier], _SUPERSEDED)
            self._pending[earlier] = None
        self._pending_files[file] = len(self._pending)
        self._append((self._next_inode, *file, 0, member.size, mtime, name, None, None,
                      member.header_offset, member.data_limit, member.method, member.flags,
                      member.compressed_size, member.crc32, member.mode))
        self._objects += 1
        self._bytes += member.size

    def finish(self) -> CatalogSummary:
        """Complete the catalog, move it into place, and return its totals."""
        db = self._connection()
        self._flush()
        self._index_names(db)
        db.execute("CREATE INDEX entries_by_parent ON entries(parent)")
        db.executemany("INSERT INTO markers VALUES (?, ?, ?, ?, ?, ?)",
                       ((inode, r.key, r.version_id, r.etag, r.size, r.last_modified)
                        for inode, r in self._markers.items()))
        self._set_dir_columns(db)
        summary = CatalogSummary(self._objects, self._bytes, len(self._dirs) - 1, self._skipped)
        meta = {**self._meta, "object_count": summary.object_count, "dir_count": summary.dir_count,
                "total_bytes": summary.total_bytes, "skipped_count": summary.skipped_count,
                "marker_count": len(self._markers),
                "fingerprint": self._fingerprint or self._digest_of(db)}
        db.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())
        db.execute("COMMIT")
        db.close()
        self._db = None
        with open(self._tmp, "rb") as built:  # synchronous=OFF: make it durable before it counts
            os.fsync(built.fileno())
        os.replace(self._tmp, self._path)
        self._done = True
        return summary

    def abort(self) -> None:
        """Drop the unfinished build (no-op after ``finish()``); ``path`` is left untouched."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if not self._done:
            self._done = True
            self._tmp.unlink(missing_ok=True)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._done:
            raise RuntimeError("catalog builder already finished or aborted")
        return self._db

    def skip(self, key: str, reason: str) -> None:
        """Count ``key`` as skipped, with its warning (for entries found unshowable elsewhere)."""
        self._skip(key, reason)

    def _skip(self, key: str, reason: str) -> None:
        if self._archive is not None:
            log.warning("skipping member %r of %s: %s", key, self._archive.uri, reason)
        elif self._strict:
            raise UnshowableKey(f"key {key!r} cannot be shown: {reason}")
        else:
            log.warning("skipping key %r: %s", key, reason)
        self._skipped += 1

    def _place(
        self, path: str, key: str, marker: Callable[[], ObjectRef]
    ) -> tuple[int, str] | None:
        """``(parent inode, name)`` of the file ``path`` (``key`` in warnings), its parent
        directories made; None if it is no file to store: unsafe, or the name of a directory
        (skipped), or a directory marker (``marker()`` added)."""
        if (file := self._in_known_directory(path)) is not None and path not in self._dirs:
            return file
        split = split_key(path)
        if isinstance(split, Unsafe):
            self._skip(key, split.reason)
            return None
        if split.is_dir:
            self._add_marker(marker(), split.path)
            return None
        if path in self._dirs:  # a file's split.path is its path
            self._skip(key, "a directory has the same name")
            return None
        parent_path, _, name = path.rpartition("/")
        return self._ensure_dir(parent_path), name

    def _in_known_directory(self, path: str) -> tuple[int, str] | None:
        """``(parent inode, name)`` of the file ``path`` if its directory exists and ``name`` is a
        safe segment, else ``None`` (``split_key`` must decide).

        The fast path of a build: a directory's segments were checked when it was made, so then
        ``split_key(path)`` is that file, and only the last segment needs checking.
        """
        parent_path, slash, name = path.rpartition("/")
        if slash and not parent_path:  # "/name": an empty first segment
            return None
        parent = self._dirs.get(parent_path)
        if parent is None or segment_problem(name) is not None:
            return None
        return parent, name

    def _add_marker(self, ref: ObjectRef, path: str) -> None:
        if ref.size > 0:
            log.warning("directory marker %r has %d bytes; they are not shown", ref.key, ref.size)
        inode = ROOT_INODE if not path else self._ensure_dir(path)
        if inode in self._markers:  # cannot happen with S3 (keys are unique); keep the first
            self._skip(ref.key, "key listed twice")
            return
        self._markers[inode] = ref
        self._stored(ref)

    def _append(self, row: _Row) -> None:
        self._pending.append(row)
        self._next_inode += 1
        if len(self._pending) >= _BATCH:
            self._flush()

    def _ensure_dir(self, path: str) -> int:
        """Return the inode of directory ``path`` (safe, relative), creating it and its parents."""
        inode = self._dirs.get(path)
        if inode is not None:
            return inode
        missing = [path]
        parent_path = path.rpartition("/")[0]
        while parent_path not in self._dirs:
            missing.append(parent_path)
            parent_path = parent_path.rpartition("/")[0]
        parent = self._dirs[parent_path]
        for dir_path in reversed(missing):
            name = dir_path.rpartition("/")[2]
            self._evict_file(parent, name, dir_path)
            inode = self._next_inode
            self._append((inode, parent, name, 1, 0, None, None, None, None, *self._dir_tail))
            self._dirs[dir_path] = parent = inode
        return parent

    def _evict_file(self, parent: int, name: str, path: str) -> None:
        """Remove the file ``name`` in ``parent`` (at ``path``) if one is pending: a directory
        wins. One already stored is left to ``_index_names``; a strict builder refuses it now."""
        self._connection()  # refuses a builder that finished or aborted
        index = self._pending_files.pop((parent, name), None)
        pending = None if index is None else self._pending[index]
        if pending is not None:
            self._pending[index] = None
            self._drop(pending)
        elif self._strict:
            for file_path, key in self._open_files:
                if file_path == path:
                    self._skip(key, "a directory has the same name")

    def _stored(self, ref: ObjectRef) -> None:
        """Feed an object just stored to the running fingerprint; out of key order, give it up
        (a strict builder refuses the key instead)."""
        if self._digest is not None:
            try:
                self._digest.add(ref.key, ref.version_id, ref.etag, ref.size)
            except OrderError as exc:
                if self._strict:
                    raise UnshowableKey(f"keys out of order: {exc}") from None
                self._digest = None

    def fingerprint_so_far(self) -> str:
        """A strict builder's fingerprint of the objects added so far: what ``finish()`` stores
        if no more are added (its keys come in order and it drops none: the running one holds).
        """
        if not self._strict or self._digest is None:
            raise RuntimeError("fingerprint_so_far() is for strict builders that refused nothing")
        return self._digest.hexdigest()

    def _digest_of(self, db: sqlite3.Connection) -> str:
        """The fingerprint of what the catalog stores: the running one if it held, else sorted."""
        return _fingerprint(db) if self._digest is None else self._digest.hexdigest()

    def _drop(self, row: _Row, reason: str = "a directory has the same name") -> None:
        """Take a file row that will not be stored out of the totals, with its warning."""
        self._digest = None  # it was fed to the running fingerprint
        self._objects -= 1
        self._bytes -= row[4]
        self._skip(row[6] or "", reason)

    def _flush(self) -> None:
        rows = [row for row in self._pending if row is not None]
        self._pending.clear()
        self._pending_files.clear()
        if not rows:
            return
        self._connection().executemany(self._insert, rows)

    def _index_names(self, db: sqlite3.Connection) -> None:
        """Create the unique index by name over the rows stored, resolving any name stored twice.

        One sort at the end costs less than keeping the index while inserting (a million rows:
        0.3-0.5 s less, and a packed index 3-4 MiB smaller). A batch never holds a name twice, but
        a name may come again in a later batch: a file listed or archived again, or a file and
        then a directory of that name. Each such name is resolved here as a batch resolves it:
        of its files, a listing keeps the first (S3 keys are unique: a repeat is the listing's
        fault) and an archive the last (the member extracting it leaves on disk), and a directory
        beats the one kept (``_evict_file``; a directory comes after them all: a file after it is
        never stored). A strict builder has refused every such name as it met it.
        """
        # Without a journal a statement that fails cannot be undone (the schema is left broken):
        # this one has a journal in memory, which holds next to nothing (the index's pages are
        # new). Committing midway shows nothing to anyone: the file is not in place yet.
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=MEMORY")
        db.execute("BEGIN")
        try:
            db.execute(_NAME_INDEX)
            unique = True
        except sqlite3.IntegrityError:
            unique = False
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("BEGIN")
        if unique:
            return
        if self._strict:
            raise RuntimeError("catalog invariant broken: a strict build stored a name twice")
        # Found with a plain index and streamed through a temporary table: any number of them
        # costs disk, not RAM (a zip may hold a million names twice).
        db.execute("CREATE INDEX entries_by_name ON entries(parent, name)")
        keep = "min" if self._archive is None else "max"
        db.execute(
            "CREATE TEMP TABLE repeated AS SELECT parent, name, max(is_dir) AS directory, "
            f"{keep}(CASE is_dir WHEN 0 THEN inode END) AS kept FROM entries "
            "GROUP BY parent, name HAVING count(*) > 1")
        losers = ("FROM repeated JOIN entries USING (parent, name) "
                  "WHERE is_dir = 0 AND (inode != kept OR directory)")
        again = "key listed twice" if self._archive is None else _SUPERSEDED
        for row in db.execute(f"SELECT {_COLUMNS}, kept {losers} ORDER BY parent, name, inode"):
            self._drop(row, again if row[0] != row[-1] else "a directory has the same name")
        db.execute(f"DELETE FROM entries WHERE inode IN (SELECT inode {losers})")
        db.execute("DROP TABLE repeated")
        db.execute("DROP INDEX entries_by_name")
        db.execute(_NAME_INDEX)

    def _set_dir_columns(self, db: sqlite3.Connection) -> None:
        """Give every directory the newest mtime of its direct children, deepest first, and
        the number of directories in it as its size (in the same statement: no extra pass)."""
        db.executemany("UPDATE entries SET mtime = ? WHERE inode = ?",
                       ((ref.last_modified, inode) for inode, ref in self._markers.items()))
        subdirs = collections.Counter(path.rpartition("/")[0] for path in self._dirs if path)
        by_depth = sorted(self._dirs.items(), key=lambda item: -item[0].count("/") - bool(item[0]))
        db.executemany(
            "UPDATE entries SET mtime = coalesce((SELECT max(mtime) FROM entries INDEXED BY "
            "entries_by_parent WHERE parent = ?1 AND inode != ?2), mtime, ?3), size = ?4 "
            "WHERE inode = ?1",
            ((inode, ROOT_INODE, self._meta["created"], subdirs[path]) for path, inode in by_depth),
        )


def _row_columns(archive: bool) -> str:
    """The columns of an entries row: an archive catalog's also say where the member lies."""
    return f"{_COLUMNS}, {_MEMBER_COLUMNS}" if archive else _COLUMNS


def _ref_to_json(ref: ObjectRef) -> str:
    return json.dumps([ref.bucket, ref.key, ref.version_id, ref.etag, ref.size, ref.last_modified])


def _ref_from_json(text: str) -> ObjectRef:
    bucket, key, version_id, etag, size, last_modified = json.loads(text)
    return ObjectRef(bucket, key, version_id, etag, size, last_modified)


def _fingerprint(db: sqlite3.Connection) -> str:
    """The fingerprint of every object the catalog shows (see module ``fingerprint``)."""
    digest = Fingerprinter()
    for key, version_id, etag, size, _mtime in db.execute(_OBJECTS_BY_KEY):
        digest.add(key, version_id, etag, size)
    return digest.hexdigest()


def build_catalog(
    path: str | os.PathLike[str], refs: Iterable[ObjectRef], *,
    uri: str, bucket: str, prefix: str, versioned: bool,
    single_object: bool = False, as_of: float | None = None,
) -> CatalogSummary:
    """Build the catalog for ``refs`` at ``path`` (replacing any file there) and return totals."""
    with CatalogBuilder(path, uri=uri, bucket=bucket, prefix=prefix, versioned=versioned,
                        single_object=single_object, as_of=as_of) as b:
        for ref in refs:
            b.add(ref)
        return b.finish()


class Catalog:
    """Read-only view of a built catalog; see the module docstring for threading."""

    def __init__(
        self, db: sqlite3.Connection, meta: CatalogMeta, path: Path | None = None,
        file_id: tuple[int, int] | None = None,
    ) -> None:
        self._db = db
        self._lock = threading.Lock()
        self.meta = meta
        self.path = path
        self.file_id = file_id  # (st_dev, st_ino) of the file opened: its hard links share it
        # Told once, when a query first meets damage: removes the kept copies (``_damaged``).
        self.on_damage: Callable[[], list[Path]] = list
        self._damage_note: str | None = None  # what the damage errors say to do, once met
        self._bucket = meta.bucket
        self._archive = meta.archive
        self._columns = _row_columns(meta.archive is not None)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Catalog:
        """Open the catalog at ``path``; ``CatalogError`` if it is missing or not one of ours."""
        uri = Path(path).absolute().as_uri() + "?mode=ro&immutable=1"
        db: sqlite3.Connection | None = None
        try:
            info = os.stat(path)  # before the open: a file replaced meanwhile is not removed
            db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            if meta.get("format_version") != FORMAT_VERSION:
                raise CatalogError(f"catalog {path} has format {meta.get('format_version')!r}, "
                                   f"expected {FORMAT_VERSION}: rebuild it")
            fields = {k: meta[k] for k in CatalogMeta.__dataclass_fields__}
        except (OSError, sqlite3.Error, KeyError, CatalogError) as exc:
            if db is not None:
                db.close()
            if isinstance(exc, CatalogError):
                raise
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise CatalogError(f"cannot read catalog {path}: {reason}") from exc
        fields["versioned"] = bool(fields["versioned"])
        fields["single_object"] = bool(fields["single_object"])
        if fields["archive"] is not None:
            fields["archive"] = _ref_from_json(fields["archive"])
        return cls(db, CatalogMeta(**fields), Path(path), (info.st_dev, info.st_ino))

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, inode: int) -> Entry | None:
        """The entry with inode number ``inode``, or ``None``."""
        with self._reading() as db:
            row = db.execute(
                f"SELECT {self._columns} FROM entries WHERE inode = ?", (inode,)
            ).fetchone()
        return None if row is None else self._entry(row)

    def lookup(self, parent: int, name: str) -> Entry | None:
        """The entry called ``name`` in directory ``parent``, or ``None`` (also for ``""``)."""
        if not name:
            return None  # the root is named "" and is its own parent: never a child of itself
        try:
            with self._reading() as db:
                row = db.execute(
                    f"SELECT {self._columns} FROM entries "
                    "WHERE parent = ? AND name = ?", (parent, name)).fetchone()
        except UnicodeEncodeError:  # a name that is not valid UTF-8 cannot be in the catalog
            return None
        return None if row is None else self._entry(row)

    def children(self, parent: int, after_inode: int = 0) -> Iterator[Entry]:
        """The entries of directory ``parent`` with inode > ``after_inode``, by inode."""
        page = _FIRST_PAGE
        while True:
            with self._reading() as db:
                rows = db.execute(
                    f"SELECT {self._columns} FROM entries INDEXED BY entries_by_parent "
                    "WHERE parent = ? AND inode > ? AND inode != ? "
                    "ORDER BY inode LIMIT ?",
                    (parent, after_inode, ROOT_INODE, page)).fetchall()
            for row in rows:
                yield self._entry(row)
            if len(rows) < page:
                return
            after_inode = rows[-1][0]
            page = min(page * 2, _MAX_PAGE)

    def first_file(self) -> ObjectRef | None:
        """The file added first (the lowest inode): of a snapshot, whose keys come in order, the
        first file in key order. None without files, and for an archive catalog."""
        if self._archive is not None:
            return None
        with self._reading() as db:
            row = db.execute(
                "SELECT key, version_id, etag, size, mtime FROM entries WHERE is_dir = 0 "
                "ORDER BY inode LIMIT 1").fetchone()
        if row is None:
            return None
        key, version_id, etag, size, mtime = row
        return ObjectRef(self._bucket, key, version_id, etag, size, mtime or 0.0)

    def objects(self) -> Iterator[ObjectRef]:
        """Every object shown (files and directory markers), in key order (UTF-8 bytes).

        One query, fetched in pages under the lock; meant for writing snapshots and diffs, not
        for the FUSE path (it sorts the whole catalog once, in SQLite's temporary storage).
        An archive catalog's one object is the archive.
        """
        if self._archive is not None:
            yield self._archive
            return
        with self._reading() as db:
            cursor = db.execute(_OBJECTS_BY_KEY)
        try:
            while True:
                with self._reading():
                    rows = cursor.fetchmany(_OBJECTS_FETCH)
                if not rows:
                    return
                for key, version_id, etag, size, mtime in rows:
                    yield ObjectRef(self._bucket, key, version_id, etag, size, mtime or 0.0)
        finally:
            with self._reading():
                cursor.close()

    def files(self) -> Iterator[PinnedRef]:
        """The ref of every file shown, in inode order (an archive catalog's are its members).

        Fetched in pages under the lock, holding no cursor between them; for ``prefetch``.
        """
        after = 0
        while True:
            with self._reading() as db:
                rows = db.execute(
                    f"SELECT {self._columns} FROM entries "
                    "WHERE inode > ? AND is_dir = 0 ORDER BY inode LIMIT ?",
                    (after, _MAX_PAGE)).fetchall()
            for row in rows:
                ref = self._entry(row).ref
                if ref is not None:
                    yield ref
            if len(rows) < _MAX_PAGE:
                return
            after = rows[-1][0]

    def close(self) -> None:
        """Close the database; the catalog must not be used afterwards."""
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; a query that meets damage raises ``CatalogDamaged``."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", None) not in _DAMAGE_CODES:
                    raise
                raise self._damaged(exc) from None

    def _damaged(self, exc: sqlite3.DatabaseError) -> CatalogDamaged:
        """The error for damage SQLite met; the first time, ``on_damage`` is told."""
        if self._damage_note is None:
            removed = self.on_damage()
            self._damage_note = ("its copy kept in the cache was removed: " if removed else ""
                                 ) + "unmount and mount again to build it anew"
        what = f"the catalog {self.path}" if self.path is not None else "the catalog"
        return CatalogDamaged(f"{what} is damaged ({exc}): {self._damage_note}")

    def remove_copies(self, paths: Iterable[Path]) -> list[Path]:
        """Unlink those of ``paths`` that are this catalog's own file (a hard link of it, or the
        file itself); which were. A file replaced since the open is another file: left."""
        removed = []
        for path in paths:
            try:
                info = path.stat()
                if (info.st_dev, info.st_ino) == self.file_id:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
        return removed

    def _entry(self, row: tuple) -> Entry:
        inode, parent, name, is_dir, size, mtime, key, version_id, etag = row[:9]
        if is_dir:  # its size column counts the directories in it
            return Entry(inode, parent, name, True, 0, mtime or 0.0, None, links=2 + size)
        ref: PinnedRef
        mode = 0
        if self._archive is None:
            ref = ObjectRef(self._bucket, key, version_id, etag, size, mtime)
        else:
            header_offset, data_limit, method, flags, compressed_size, crc32, mode = row[9:]
            ref = MemberRef(self._archive, key, header_offset, data_limit, method, flags,
                            compressed_size, size, crc32, mtime or 0.0)
        return Entry(inode, parent, name, False, size, mtime or 0.0, ref, mode)
