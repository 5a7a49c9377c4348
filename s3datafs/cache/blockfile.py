"""One cached block on disk: a fixed header, then the payload. Pure encode/decode, no I/O.

Layout (little endian), 64 bytes of header then ``length`` bytes of payload::

    magic      4s   b"S3DB"
    version    H    FORMAT_VERSION
    reserved   H    0
    index      Q    block index within the object
    length     I    payload length
    crc32      I    zlib.crc32 of the payload
    digest     32s  the object identity digest (see ``object_digest``)
    reserved   8x

A block is served only if every field matches what the reader expects (same object digest, same
index, the expected length for that index, a matching checksum). Anything else — a torn write, a
truncated file, a flipped bit, a block of another object renamed into place — is a miss, never
bytes. crc32 is for accidental corruption (disk, crash); identity is carried by the digest, which
is part of the file's path as well as of its header.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

from ..model import PinnedRef

MAGIC = b"S3DB"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHQII32s8x")
HEADER_SIZE = _HEADER.size


def object_digest(ref: PinnedRef) -> str:
    """Hex digest naming one pinned object version (or archive member): stable across mounts."""
    return hashlib.sha256(ref.cache_identity.encode("utf-8", "surrogateescape")).hexdigest()


def encode(digest: str, index: int, payload: bytes) -> bytes:
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, index, len(payload), zlib.crc32(payload), bytes.fromhex(digest)
    )
    return header + payload


def decode(data: bytes, digest: str, index: int, expected_length: int) -> bytes | None:
    """The payload if ``data`` is exactly the block expected, else None."""
    if len(data) != HEADER_SIZE + expected_length:
        return None
    magic, version, _, got_index, length, crc, got_digest = _HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    if (
        magic != MAGIC
        or version != FORMAT_VERSION
        or got_index != index
        or length != expected_length
        or got_digest != bytes.fromhex(digest)
        or zlib.crc32(payload) != crc
    ):
        return None
    return payload
