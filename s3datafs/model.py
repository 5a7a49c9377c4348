"""Plain values shared by every ring: what a pinned S3 object is.

Invariants:
- An ``ObjectRef`` is immutable and complete: once resolved at mount time it names exactly one
  sequence of bytes (bucket, key, VersionId when the bucket is versioned, ETag always).
- ``etag`` is in S3's quoted form (``"<hex>"`` or ``"<hex>-<parts>"``), because that is what
  ``If-Match`` must carry back. ``normalize_etag`` makes it from the user's spelling (quotes
  optional) and from stores that send it bare (``listing.pinnable_etag``).
- ``version_id`` is ``None`` on an unversioned bucket and the literal string ``"null"`` for an
  object written to a versioned bucket before versioning was enabled: S3 distinguishes the two,
  and so do we.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One pinned S3 object version."""

    bucket: str
    key: str
    version_id: str | None
    etag: str
    size: int
    last_modified: float  # seconds since the epoch, UTC

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def cache_identity(self) -> str:
        """What names these bytes in the block cache (hashed there): the pin, nothing else."""
        return "\0".join((self.bucket, self.key, self.version_id or "", self.etag))


class _InArchive:
    """What a ref of bytes inside a pinned archive tells the block cache's bookkeeping: the
    archive's bucket, version and ETag (its ``key`` is its own)."""

    __slots__ = ()
    archive: ObjectRef

    @property
    def bucket(self) -> str:
        return self.archive.bucket

    @property
    def version_id(self) -> str | None:
        return self.archive.version_id

    @property
    def etag(self) -> str:
        return self.archive.etag


@dataclass(frozen=True, slots=True)
class MemberRef(_InArchive):
    """One member of a pinned zip archive: bytes that never change, like an ``ObjectRef``'s.

    ``size`` is the member's uncompressed size (what a reader sees); ``compressed_size`` bytes
    follow its local header, which starts at ``header_offset`` in the archive. ``data_limit`` is
    where the next member (or the central directory) starts: the member's data must end there.
    ``bucket``/``key``/``version_id``/``etag`` describe it for the block cache's bookkeeping;
    ``key`` and ``uri`` use the ``archive!/member`` spelling of jar URLs.
    """

    archive: ObjectRef
    path: str
    header_offset: int
    data_limit: int
    method: int
    flags: int
    compressed_size: int
    size: int
    crc32: int
    last_modified: float

    @property
    def key(self) -> str:
        return f"{self.archive.key}!/{self.path}"

    @property
    def uri(self) -> str:
        return f"{self.archive.uri}!/{self.path}"

    @property
    def cache_identity(self) -> str:
        # The offset makes it unique within the archive; "zip" keeps it apart from any S3 key.
        return "\0".join((self.archive.cache_identity, "zip", str(self.header_offset), self.path))


@dataclass(frozen=True, slots=True)
class UnzippedRef(_InArchive):
    """A zip member's bytes decompressed, as the block cache names them (``archive.decompressed``).

    Derived from the archive's pin and what fixes the member's bytes in it (header offset,
    sizes, CRC-32, method), so it names bytes that never change. ``attempt`` names one
    decompression's blocks; ``""`` names the member's marker, which points to a verified attempt.
    ``bucket``/``key``/``version_id``/``etag`` are the archive's: ``cache stats`` counts these
    blocks with the archive's dataset and ``cache clear s3://bucket/archive.zip`` deletes them.
    """

    archive: ObjectRef
    header_offset: int
    compressed_size: int
    size: int
    crc32: int
    method: int
    attempt: str = ""

    @classmethod
    def of(cls, member: MemberRef, attempt: str = "") -> UnzippedRef:
        return cls(member.archive, member.header_offset, member.compressed_size, member.size,
                   member.crc32, member.method, attempt)

    @property
    def key(self) -> str:
        return self.archive.key

    @property
    def cache_identity(self) -> str:
        # "unzipped" keeps it apart from the member's own identity ("zip") and from any S3 key.
        return "\0".join((self.archive.cache_identity, "unzipped", str(self.header_offset),
                          str(self.compressed_size), str(self.size), f"{self.crc32:08x}",
                          str(self.method), self.attempt))


PinnedRef = ObjectRef | MemberRef  # what the block reader and cache serve bytes of
CachedRef = PinnedRef | UnzippedRef  # what the disk cache keeps blocks of


def normalize_etag(etag: str) -> str:
    """Return ``etag`` in S3's quoted form, whether or not the user quoted it."""
    bare = etag.strip().strip('"')
    return f'"{bare}"'


def http_range(start: int, end: int) -> str:
    """Convert the half-open ``[start, end)`` used everywhere inside to an HTTP ``Range`` value."""
    if not 0 <= start < end:
        raise ValueError(f"empty or negative range [{start}, {end})")
    return f"bytes={start}-{end - 1}"


class ObjectSource(Protocol):
    """What the core needs from S3; ``s3source.S3Source`` is the real one, tests use fakes.

    All methods are blocking and thread-safe: async callers run them in worker threads.
    """

    def bucket_versioning(self, bucket: str) -> bool | None:
        """True if versioning is (or was) enabled, False if never, None if we may not ask."""
        ...

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        """Resolve one object (latest, or ``version_id``); raise ``NotFoundError`` if absent."""
        ...

    def list_latest(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[ObjectRef]:
        """Every current object under ``prefix``, in S3's key order, pinned."""
        ...

    def list_as_of(self, bucket: str, prefix: str, as_of: float) -> Iterator[ObjectRef]:
        """Every key under ``prefix`` as it was at ``as_of`` (epoch seconds), in key order.

        Per key the newest version with LastModified <= ``as_of``; a delete marker there hides
        the key; keys first written later are absent. Versioned buckets only.
        """
        ...

    def head_as_of(self, bucket: str, key: str, as_of: float) -> ObjectRef:
        """The version of one object current at ``as_of``; ``NotFoundError`` if there was none."""
        ...

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Exactly the bytes ``[start, end)`` of the pinned ``ref``, or an error; never others."""
        ...
