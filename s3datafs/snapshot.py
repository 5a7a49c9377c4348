"""Snapshot files: a pinned dataset written down, to be mounted again byte for byte anywhere.

Format ``s3datafs-snapshot/1`` (documented in the README): a gzip stream of UTF-8 JSON lines.
Line 1 is the header, a JSON object::

    {"format": "s3datafs-snapshot/1", "uri": "s3://b/train/", "bucket": "b", "prefix": "train/",
     "single_object": false, "name": "train", "created": "2024-05-01T12:00:00.123Z",
     "as_of": null, "versioned": true, "object_count": 2, "marker_count": 0,
     "total_bytes": 1234, "skipped_count": 0, "fingerprint": "<64 hex>",
     "fields": ["key", "version_id", "etag", "size", "last_modified"]}

then one line per object the mount shows (files, and ``dir/`` markers), a JSON array in the
order of ``fields``, in strictly increasing key order (UTF-8 bytes)::

    ["train/a.bin", "3HL4kqtJ...", "9b2cf535f27731c974343645a3985328", 1024, 1714564800.123]

``version_id`` is null on an unversioned bucket; ``etag`` has no quotes; ``last_modified`` is
seconds since the epoch. ``prefix`` is what keys are relative to in the tree (for a single
object, its parent). ``object_count`` and ``total_bytes`` count files (as ``mount`` and
``status`` do), ``marker_count`` the directory markers; ``fingerprint`` is the one defined in
``s3datafs.fingerprint`` over all object lines. No credential, endpoint or local path is written.

Invariants:
- Writing streams from the catalog in key order (no list of objects in memory), into a temporary
  file beside the target that is fsynced and renamed into place (and the directory fsynced): a
  reader never sees half a file, and a crash after the command returned loses nothing.
  The writer recomputes count and fingerprint as it goes and refuses to finish if they differ
  from the catalog's.
- Reading streams too, feeding a strict ``CatalogBuilder`` line by line, and checks everything
  against the header before the catalog counts: key order, the type of every field, that each
  key is under the prefix and can be shown, and at the end count, markers, bytes and the
  fingerprint (the built catalog's own, which the builder computes as it stores the objects: each
  is hashed once). A truncated, corrupted, hand-edited or unknown-format file is refused with one
  ``SnapshotError`` line naming the file and the first problem; nothing is built.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from .catalog import Catalog, CatalogBuilder, CatalogSummary, UnshowableKey
from .config import format_time, parse_time
from .errors import ConfigError, UsageError
from .fingerprint import Fingerprinter, is_fingerprint, out_of_order
from .model import ObjectRef
from .uri import parse_s3_uri

FORMAT = "s3datafs-snapshot/1"
_MAX_COUNT = 2**63 - 1  # sizes and counts: what SQLite's INTEGER holds
_MAX_TIME = 2.0**34  # last_modified: before the year 2514
FIELDS = ["key", "version_id", "etag", "size", "last_modified"]
_GZIP_LEVEL = 6  # zlib's default: ~3x smaller than the text at a fraction of level 9's time
_WRITE_CHUNK = 2048  # lines joined per write
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; refuse to read more than this
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_TAIL = "make it again with 's3datafs snapshot' or 'mount --save-snapshot'"


class SnapshotError(ConfigError):
    """The snapshot file cannot be used (unreadable, corrupt, edited, or another format)."""


@dataclass(frozen=True)
class Header:
    """The snapshot's first line: what was pinned, and totals to check the rest against."""

    uri: str
    bucket: str
    prefix: str
    single_object: bool
    name: str
    created: str
    as_of: str | None
    versioned: bool
    object_count: int
    marker_count: int
    total_bytes: int
    skipped_count: int
    fingerprint: str

    def to_json(self) -> str:
        return _ENCODER.encode({"format": FORMAT, **asdict(self), "fields": FIELDS})

    @property
    def as_of_time(self) -> float | None:
        return None if self.as_of is None else parse_time(self.as_of)


@dataclass(frozen=True)
class Loaded:
    """A snapshot read into a catalog: its header, the build's totals, its first file."""

    header: Header
    summary: CatalogSummary
    first_file: ObjectRef | None


# -- writing ---------------------------------------------------------------------------------------


def header_of(catalog: Catalog, name: str) -> Header:
    meta = catalog.meta
    return Header(
        uri=meta.uri,
        bucket=meta.bucket,
        prefix=meta.prefix,
        single_object=meta.single_object,
        name=name,
        created=format_time(meta.created),
        as_of=None if meta.as_of is None else format_time(meta.as_of),
        versioned=meta.versioned,
        object_count=meta.object_count,
        marker_count=meta.marker_count,
        total_bytes=meta.total_bytes,
        skipped_count=meta.skipped_count,
        fingerprint=meta.fingerprint,
    )


def write_snapshot(catalog: Catalog, path: Path, *, name: str) -> Header:
    """Write ``catalog`` as a snapshot file at ``path`` (atomically); return its header."""
    header = header_of(catalog, name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL, mtime=0
            ) as zipped:
                _write_lines(zipped, header, catalog.objects())
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a snapshot is meant to be shared
        os.replace(tmp, path)
        _sync_directory(path.parent)  # the rename too survives a crash once we return
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise SnapshotError(f"cannot write snapshot {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return header


def _write_lines(out: IO[bytes], header: Header, refs: Iterator[ObjectRef]) -> None:
    digest = Fingerprinter()
    lines = [header.to_json()]
    for ref in refs:
        digest.add(ref.key, ref.version_id, ref.etag, ref.size)
        record = [ref.key, ref.version_id, ref.etag.strip('"'), ref.size, ref.last_modified]
        lines.append(_ENCODER.encode(record))
        if len(lines) >= _WRITE_CHUNK:
            out.write(("\n".join(lines) + "\n").encode("utf-8"))
            lines.clear()
    out.write(("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
    expected = header.object_count + header.marker_count
    if digest.count != expected or digest.hexdigest() != header.fingerprint:
        raise RuntimeError("catalog invariant broken: its objects do not match its fingerprint")


# -- reading ---------------------------------------------------------------------------------------


def read_header(path: Path) -> Header:
    """Only the header of ``path``, checked (the CLI needs the URI and name before it forks)."""
    with contextlib.closing(_lines(path)) as lines:
        return _parse_header(path, _first_line(path, lines), lines)


def load_snapshot(path: Path, catalog_path: Path) -> Loaded:
    """Verify ``path`` against its header while building its catalog at ``catalog_path``."""
    with contextlib.closing(_lines(path)) as lines:
        header = _parse_header(path, _first_line(path, lines), lines)
        builder = CatalogBuilder(
            catalog_path,
            uri=header.uri,
            bucket=header.bucket,
            prefix=header.prefix,
            versioned=header.versioned,
            single_object=header.single_object,
            as_of=header.as_of_time,
            strict=True,
        )
        with builder:
            check = _Checker(path, header)
            try:
                for number, line in enumerate(lines, start=2):
                    ref = check.add(number, line)
                    try:
                        builder.add(ref)
                    except UnshowableKey as exc:
                        raise _bad(path, f"line {number}: {exc}") from None
            except SnapshotError:
                for _ in lines:  # report a corrupted stream as such (see _parse_header)
                    pass
                raise
            check.finish(builder.fingerprint_so_far())
            summary = builder.finish()
    if summary.object_count != header.object_count or summary.total_bytes != header.total_bytes:
        raise _bad(path, "its objects do not form the tree its header describes")
    return Loaded(header, summary, check.first_file)


class _Checker:
    """Parses object lines and checks them, their order and their totals against the header."""

    def __init__(self, path: Path, header: Header) -> None:
        self._path = path
        self._header = header
        self._last_key: str | None = None
        self._files = self._markers = self._bytes = 0
        self.first_file: ObjectRef | None = None
        # A single-object file lists its uri's key alone (the header was checked: it parses).
        self._single_key = parse_s3_uri(header.uri).key if header.single_object else None

    def add(self, number: int, line: str) -> ObjectRef:
        ref = self._parse(number, line)
        if self._last_key is not None and ref.key <= self._last_key:  # as Fingerprinter compares
            problem = out_of_order(ref.key, self._last_key)
            raise _bad(self._path, f"line {number}: keys out of order: {problem}")
        self._last_key = ref.key
        if ref.key.endswith("/"):
            self._markers += 1
        else:
            self._files += 1
            self._bytes += ref.size
            self.first_file = self.first_file or ref
        return ref

    def finish(self, fingerprint: str) -> None:
        """Check the totals, then ``fingerprint`` (the built catalog's), against the header."""
        header = self._header
        found = (self._files, self._markers, self._bytes)
        expected = (header.object_count, header.marker_count, header.total_bytes)
        for what, got, want in zip(
            ("objects", "directory markers", "bytes"), found, expected, strict=True
        ):
            if got != want:
                raise _bad(self._path, f"it lists {got} {what}, its header says {want}")
        if fingerprint != header.fingerprint:
            raise _bad(
                self._path,
                f"its objects have fingerprint {fingerprint}, its header says {header.fingerprint}",
            )

    def _parse(self, number: int, line: str) -> ObjectRef:
        header = self._header
        try:
            key, version_id, etag, size, mtime = json.loads(line)
        except (ValueError, TypeError):
            raise _bad(self._path, f"line {number} is not an object record") from None
        problem = _field_problem(key, version_id, etag, size, mtime, versioned=header.versioned)
        if problem is None and not key.startswith(header.prefix):
            problem = f"key {key!r} is not under the prefix {header.prefix!r}"
        if problem is None and self._single_key is not None and key != self._single_key:
            problem = f"key {key!r} is not the single object its uri names"
        if problem is not None:
            raise _bad(self._path, f"line {number}: {problem}")
        # The writer's inverse, not normalize_etag: that also strips white space, which a store
        # may send inside the quotes, and the ETag the mount pinned and fingerprinted keeps it.
        quoted = '"' + etag.strip('"') + '"'
        return ObjectRef(header.bucket, key, version_id, quoted, size, float(mtime))


def _field_problem(
    key: Any, version_id: Any, etag: Any, size: Any, mtime: Any, *, versioned: bool
) -> str | None:
    """Why one object record is malformed, or None."""
    if not isinstance(key, str) or not key:
        return "the key is not a non-empty string"
    if not _utf8(key):
        return "the key is not valid UTF-8"
    for what, text in (("a version id", version_id), ("an ETag", etag)):
        if isinstance(text, str) and not _utf8(text):  # a lone surrogate: "\ud800" in the JSON
            return f"{key!r} has {what} that is not valid UTF-8"
    if versioned and not (isinstance(version_id, str) and version_id):
        return f"{key!r} has no version id, but the bucket is versioned"
    if not versioned and version_id is not None:
        return f"{key!r} has a version id, but the bucket is not versioned"
    if not isinstance(etag, str) or not etag.strip('"'):
        return f"{key!r} has no ETag"
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_COUNT:
        return f"{key!r} has an invalid size {size!r}"
    if isinstance(mtime, bool) or not isinstance(mtime, int | float) or not 0 <= mtime < _MAX_TIME:
        return f"{key!r} has an invalid last_modified {mtime!r}"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_header(path: Path, line: str, rest: Iterator[str]) -> Header:
    """The checked header; on any problem, first read on to report a corrupted file as such.

    A corrupted gzip stream may decode to a plausible but wrong header and fail its CRC check only
    at the end: without reading on, corruption would be reported as an edited or foreign file.
    """
    try:
        return _header_from(path, line)
    except SnapshotError:
        for _ in rest:
            pass
        raise


def _header_from(path: Path, line: str) -> Header:
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict) or "format" not in data:
        raise SnapshotError(f"{path} is not an s3datafs snapshot (no header line)")
    if data["format"] != FORMAT:
        raise SnapshotError(
            f"snapshot {path} has format {data['format']!r}, but this s3datafs reads {FORMAT!r}: "
            f"use the s3datafs version that wrote it"
        )
    if data.get("fields") != FIELDS:
        raise _bad(path, f"its header lists fields {data.get('fields')!r}, expected {FIELDS!r}")
    try:
        header = Header(**{name: data[name] for name in Header.__dataclass_fields__})
    except KeyError as exc:
        raise _bad(path, f"its header lacks {exc.args[0]!r}") from None
    problem = _header_problem(header)
    if problem is not None:
        raise _bad(path, f"its header is invalid: {problem}")
    return header


def _header_problem(header: Header) -> str | None:
    types = {
        "uri": str,
        "bucket": str,
        "prefix": str,
        "name": str,
        "created": str,
        "single_object": bool,
        "versioned": bool,
        "fingerprint": str,
    }
    for name, kind in types.items():
        if not isinstance(getattr(header, name), kind):
            return f"{name} is not a {kind.__name__}"
    for name in ("object_count", "marker_count", "total_bytes", "skipped_count"):
        value = getattr(header, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_COUNT:
            return f"{name} is not a count"
    if not is_fingerprint(header.fingerprint):
        return "fingerprint is not 64 hex digits"
    try:
        uri = parse_s3_uri(header.uri)
    except UsageError as exc:
        return f"uri: {exc}"
    if uri.bucket != header.bucket:
        return "uri does not name the bucket"
    # Where the tree is rooted is the uri's, as a mount of it would root it (the fingerprint
    # covers the objects, not where they appear).
    if header.single_object:
        if uri.is_explicit_prefix:
            return "a single object's uri names a prefix"
        rooted_at = uri.parent_prefix()
    else:
        rooted_at = uri.as_prefix()
    if header.prefix != rooted_at:
        return f"prefix {header.prefix!r} is not the uri's ({rooted_at!r})"
    try:
        if header.as_of is not None:
            parse_time(header.as_of)
        parse_time(header.created)
    except (TypeError, ValueError):
        return "a time is not ISO 8601"
    return None


def _lines(path: Path) -> Iterator[str]:
    """The lines of ``path`` (gzip, UTF-8, split on newline only); read errors become one line.

    Only reading is guarded here: an error of the caller's (say, building the catalog) is its own.
    """
    try:
        with (
            gzip.open(path, "rb") as zipped,
            io.TextIOWrapper(zipped, encoding="utf-8", newline="\n") as text,
        ):
            for line in text:
                yield line.rstrip("\n")
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {path} does not exist: check the path") from None
    except gzip.BadGzipFile as exc:
        if "Not a gzipped file" in str(exc):
            raise SnapshotError(f"{path} is not an s3datafs snapshot (not gzip)") from None
        raise _bad(path, f"it is corrupted ({exc})") from None
    except (EOFError, zlib.error) as exc:
        raise _bad(path, f"it is truncated or corrupted ({exc})") from None
    except UnicodeDecodeError:
        raise _bad(path, "it is corrupted (not UTF-8)") from None
    except IsADirectoryError:
        raise SnapshotError(f"snapshot {path} is a directory") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc.strerror or exc}") from None


def _first_line(path: Path, lines: Iterator[str]) -> str:
    line = next(lines, None)
    if line is None:
        raise _bad(path, "it is empty")
    if len(line) > _MAX_HEADER:
        raise SnapshotError(f"{path} is not an s3datafs snapshot (no header line)")
    return line


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bad(path: Path, problem: str) -> SnapshotError:
    return SnapshotError(f"snapshot {path} is unusable: {problem}; {_TAIL}")
