"""Region files of the block cache: a header, the object's identity, a table of entries, then
block slots. Pure, no I/O.

A region file holds up to ``blocks`` consecutive blocks of one object (block ``region * blocks``
onward), each in its own fixed slot, so blocks are written *in place*, one at a time or a run at
once, in any order, by any process, without creating a file per block. Layout (little endian)::

    offset 0          header (HEADER_SIZE bytes)
                        magic "S3DR", version H, reserved H, region Q, block_size I, blocks I,
                        digest 32s (``object_digest``), crc32 of the bytes before it I
    offset 64         identity (up to IDENTITY_SIZE bytes): length I, crc32 I, then JSON naming
                        the object (bucket, key, version, ETag, size) and the dataset that
                        cached it, for ``cache stats`` and ``cache clear URI``; written with the
                        header, so header and identity are one write
    TABLE_OFFSET      table: ``blocks`` entries of ENTRY_SIZE bytes, entry i for slot i
                        mark I (ENTRY_MARK), length I, crc32 of the payload I,
                        check I = crc32 of (digest, block index, mark, length, crc)
    table_size(...)   slots: slot i at ``table_size + i * block_size`` (page aligned, so the
                      payload can be written with ``O_DIRECT``), ``length`` bytes used

A file is sparse: a slot never written is a hole, and its entry is zeros. So:
- an all-zero entry is a plain miss (never written), not damage;
- a slot's payload is written before its entry, so a present entry means a complete payload
  (a crash between the two leaves a miss; a torn entry fails its check);
- every served payload matches its entry's crc32, and every entry its check, which names the
  object and the block: a torn write, a truncated file, a flipped bit or a slot of another
  block is a miss, never bytes. crc32 is for accidental corruption (disk, crash); identity is
  carried by the digest, which is part of the file's path as well as of its header and entries.
- writers of the same object write the same bytes (a digest names one pinned version), so two
  processes writing one slot at once cannot produce a mix that passes the checks.
- the identity is bookkeeping, never used to serve bytes (the digest is): one that is torn,
  damaged or written by a mount with another dataset name only changes what ``cache stats``
  says. Every file carries it, so a file is attributed, counted and cleared on its own, and the
  cache needs no other file per object (format 3 had a directory and a ``meta.json`` per
  object, which the byte bound did not count: for small objects they took as much disk as the
  blocks, and three inodes instead of one).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import mmap
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..model import CachedRef

MAGIC = b"S3DR"
FORMAT_VERSION = 4  # 1, 2: a file per block or chunk; 3: a directory and meta.json per object
ENTRY_MARK = 0x31525353  # any non-zero value: an entry of zeros is "never written"
PAGE = mmap.PAGESIZE  # slots start on pages: O_DIRECT wants aligned offsets and lengths
_HEADER = struct.Struct("<4sHHQII32s")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = 64  # _HEADER, its crc, padding
TABLE_OFFSET = 2048  # header and identity; with 64 KiB blocks the table ends at 4 KiB
IDENTITY_SIZE = TABLE_OFFSET - HEADER_SIZE
_IDENTITY_HEAD = struct.Struct("<II")  # length, crc32 of the JSON
_ENTRY = struct.Struct("<IIII")
ENTRY_SIZE = _ENTRY.size
_CHECKED = struct.Struct("<32sQIII")


@functools.lru_cache(maxsize=4096)  # per block entry read or written: parse each digest once
def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest)


@functools.lru_cache(maxsize=4096)  # asked for on every cache read and write of an object
def object_digest(ref: CachedRef) -> str:
    """Hex digest naming one pinned object version (or archive member): stable across mounts."""
    return hashlib.sha256(ref.cache_identity.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Layout:
    """Where things are in the region files of a cache with blocks of ``block_size`` bytes."""

    block_size: int
    blocks: int  # per region

    @property
    def table_size(self) -> int:
        """Bytes before the first slot: header, identity and table, rounded up to a page."""
        return padded(TABLE_OFFSET + ENTRY_SIZE * self.blocks)

    def region_of(self, index: int) -> int:
        return index // self.blocks

    def slot_offset(self, index: int) -> int:
        """Where block ``index``'s payload starts in its region file."""
        return self.table_size + (index % self.blocks) * self.block_size

    def entry_offset(self, index: int) -> int:
        return TABLE_OFFSET + (index % self.blocks) * ENTRY_SIZE

    def runs(self, first: int, stop: int) -> Iterator[range]:
        """``range(first, stop)`` cut at region boundaries."""
        while first < stop:
            end = min(stop, (self.region_of(first) + 1) * self.blocks)
            yield range(first, end)
            first = end


@functools.lru_cache(maxsize=4096)  # built for every cache read and write
def header(digest: str, region: int, layout: Layout) -> bytes:
    packed = _HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, region, layout.block_size, layout.blocks, _raw(digest)
    )
    return (packed + _HEADER_CRC.pack(zlib.crc32(packed))).ljust(HEADER_SIZE, b"\0")


class HeaderState(enum.Enum):
    VALID = "valid"
    ABSENT = "absent"  # nothing written yet: a plain miss
    OTHER_VERSION = "of another format version"
    DAMAGED = "corrupt"


def check_header(data: bytes, digest: str, region: int, layout: Layout) -> HeaderState:
    """What ``data`` (a file's first bytes) is, against the region file expected."""
    head = data[:HEADER_SIZE]
    if head == header(digest, region, layout):
        return HeaderState.VALID
    if not any(head):
        return HeaderState.ABSENT  # created, nothing written yet (or its creator died)
    if head[:4] in (MAGIC, b"S3DB") and head[4:6] != struct.pack("<H", FORMAT_VERSION):
        return HeaderState.OTHER_VERSION
    return HeaderState.DAMAGED


@functools.lru_cache(maxsize=4096)  # written with every header: encode each object's once
def identity(ref: CachedRef, dataset: str) -> bytes:
    """The identity record of ``ref`` as cached by ``dataset`` (at most IDENTITY_SIZE bytes).

    Fields too long to fit (S3 keys reach 1,024 bytes, zip member names more) are shortened,
    longest first, and the record says ``"truncated": true``.
    """
    fields: dict[str, Any] = {
        "bucket": ref.bucket,
        "key": ref.key,
        "version_id": ref.version_id,
        "etag": ref.etag,
        "size": ref.size,
        "dataset": dataset,
    }
    while True:
        body = json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogateescape")
        over = _IDENTITY_HEAD.size + len(body) - IDENTITY_SIZE
        if over <= 0:
            return _IDENTITY_HEAD.pack(len(body), zlib.crc32(body)) + body
        fields["truncated"] = True
        longest = max(
            ("bucket", "key", "version_id", "etag", "dataset"),
            key=lambda name: len(fields[name] or ""),
        )
        text = str(fields[longest] or "")
        # A character takes 1 to 6 bytes here (JSON escapes control characters as \u00XX):
        # cutting over / 6 of them never cuts more than needed.
        fields[longest] = text[: max(0, len(text) - -(-over // 6))]


def parse_identity(data: bytes) -> dict | None:
    """The identity record in a region file's first bytes; ``None`` if absent or damaged."""
    record = data[HEADER_SIZE:TABLE_OFFSET]
    if len(record) < _IDENTITY_HEAD.size:
        return None
    length, crc = _IDENTITY_HEAD.unpack_from(record)
    body = record[_IDENTITY_HEAD.size : _IDENTITY_HEAD.size + length]
    if not length or len(body) != length or zlib.crc32(body) != crc:
        return None
    try:
        fields = json.loads(body.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
        return None
    return fields if isinstance(fields, dict) else None


def blocks_in_header(data: bytes) -> int:
    """The ``blocks`` field of a region header (0 if it is not an intact one): for counting.

    Checked against the header's CRC: a damaged field would have the counting read a table of
    any size (a flipped high bit: gigabytes, and ``cache stats`` failing with MemoryError).
    """
    if len(data) < _HEADER.size + _HEADER_CRC.size or data[:4] != MAGIC:
        return 0
    (crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    if crc != zlib.crc32(data[: _HEADER.size]):
        return 0
    return _HEADER.unpack_from(data)[5]


def entries(digest: str, first: int, payloads: Sequence[bytes]) -> bytes:
    """The table entries of blocks ``first``, ``first + 1``, ... holding ``payloads``."""
    raw = _raw(digest)
    out = []
    for index, payload in enumerate(payloads, first):
        length, crc = len(payload), zlib.crc32(payload)
        check = zlib.crc32(_CHECKED.pack(raw, index, ENTRY_MARK, length, crc))
        out.append(_ENTRY.pack(ENTRY_MARK, length, crc, check))
    return b"".join(out)


def parse_entry(data: bytes, digest: str, index: int) -> tuple[int, int] | None | bool:
    """(length, crc) of a valid entry; ``None`` if never written; ``False`` if damaged."""
    if len(data) < ENTRY_SIZE or not any(data[:ENTRY_SIZE]):
        return None
    mark, length, crc, check = _ENTRY.unpack_from(data)
    expected = zlib.crc32(_CHECKED.pack(_raw(digest), index, mark, length, crc))
    if mark != ENTRY_MARK or check != expected:
        return False
    return length, crc


def padded(length: int) -> int:
    """``length`` rounded up to a page (what an ``O_DIRECT`` write of it covers)."""
    return -(-length // PAGE) * PAGE
