"""Cache files on disk: a fixed header, a checksum table, then the payload. Pure, no I/O.

Layout (little endian), 64 bytes of header, ``4 * ceil(length / granule)`` bytes of table, then
``length`` bytes of payload::

    magic      4s   b"S3DB"
    version    H    FORMAT_VERSION
    reserved   H    0
    index      Q    index of the first block within the object
    length     I    payload length
    crc32      I    zlib.crc32 of the checksum table
    digest     32s  the object identity digest (see ``object_digest``)
    granule    I    bytes per checksum (the cache's block size; one block: its length)
    reserved   4x
    table      I*n  zlib.crc32 of each granule of the payload (the last may be short)

A payload is served only if every field matches what the reader expects (same object digest,
same first index, the expected length, a matching table) and so does the checksum of every granule
it serves. Anything else — a torn write, a truncated file, a flipped bit, a block of another
object renamed into place, a file of another format version — is a miss, never bytes. Checksums
per granule let a reader verify a few blocks of a large file without reading all of it
(``parse_head`` then ``verify``), so files can be large (fewer of them to create) and random
reads still cost one block. crc32 is for accidental corruption (disk, crash); identity is carried
by the digest, which is part of the file's path as well as of its header.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Sequence

from ..model import PinnedRef

MAGIC = b"S3DB"
FORMAT_VERSION = 2  # 1: one checksum for the whole payload
_HEADER = struct.Struct("<4sHHQII32sI4x")
HEADER_SIZE = _HEADER.size


@functools.lru_cache(maxsize=4096)  # asked for on every cache read and write of an object
def object_digest(ref: PinnedRef) -> str:
    """Hex digest naming one pinned object version (or archive member): stable across mounts."""
    return hashlib.sha256(ref.cache_identity.encode("utf-8", "surrogateescape")).hexdigest()


def head_size(length: int, granule: int) -> int:
    """Bytes before the payload: the header and the checksum table."""
    return HEADER_SIZE + 4 * -(-length // max(granule, 1))


def header(digest: str, index: int, parts: Sequence[bytes]) -> bytes:
    """Header and checksum table of the file whose payload is the concatenation of ``parts``.

    Each part is one granule: all of them as long as the first, but the last, which may be
    shorter. The file is this head followed by the parts: writers put them side by side
    (``os.writev``, or into one aligned buffer for ``O_DIRECT``) instead of joining them first.
    """
    crcs = [zlib.crc32(part) for part in parts]
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    length, granule = sum(map(len, parts)), max(len(parts[0]) if parts else 0, 1)
    return (
        _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            index,
            length,
            zlib.crc32(table),
            bytes.fromhex(digest),
            granule,
        )
        + table
    )


def encode(digest: str, index: int, payload: bytes) -> bytes:
    return header(digest, index, [payload]) + payload


def parse_head(
    head: bytes, digest: str, index: int, expected_length: int
) -> tuple[int, tuple[int, ...]] | None:
    """(granule, checksums) from the start of a file, if it is the file expected, else None."""
    if len(head) < HEADER_SIZE:
        return None
    magic, version, _, got_index, length, crc, got_digest, granule = _HEADER.unpack_from(head)
    if (
        magic != MAGIC
        or version != FORMAT_VERSION
        or got_index != index
        or length != expected_length
        or got_digest != bytes.fromhex(digest)
        or granule <= 0
    ):
        return None
    end = head_size(length, granule)
    table = head[HEADER_SIZE:end]
    if len(table) != end - HEADER_SIZE or zlib.crc32(table) != crc:
        return None
    return granule, struct.unpack(f"<{len(table) // 4}I", table)


def verify(payload: bytes, granule: int, crcs: Sequence[int]) -> bool:
    """Whether ``payload``, granules in a row, has the checksums ``crcs`` (one per granule)."""
    view = memoryview(payload)
    if -(-len(view) // granule) != len(crcs):
        return False
    return all(
        zlib.crc32(view[i * granule : (i + 1) * granule]) == crc for i, crc in enumerate(crcs)
    )


def decode(data: bytes, digest: str, index: int, expected_length: int) -> bytes | None:
    """The payload (a view of ``data``) if ``data`` is exactly the file expected, else None."""
    parsed = parse_head(data, digest, index, expected_length)
    if parsed is None:
        return None
    granule, crcs = parsed
    start = head_size(expected_length, granule)
    if len(data) != start + expected_length:
        return None
    payload = memoryview(data)[start:]
    return payload if verify(payload, granule, crcs) else None  # type: ignore[return-value]


def other_version(head: bytes) -> bool:
    """Whether ``head`` starts a cache file of another format version (not a damaged one)."""
    return len(head) >= 6 and head[:4] == MAGIC and head[4:6] != struct.pack("<H", FORMAT_VERSION)
