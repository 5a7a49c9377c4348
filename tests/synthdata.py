"""Very large synthetic objects whose bytes are a cheap function of the offset, and a ZIP64
archive made of them: what ``synths3`` serves, and what the huge-object tests compare with.

Object bytes (``pattern``): the object with seed ``s`` is a run of 64 KiB chunks in which the
8-byte little-endian word at offset ``o`` is ``o ^ s`` (mod 2**64), except each chunk's last 4
bytes, which hold the CRC-32 of every byte of the object before them. An object of size ``n`` is
the first ``n`` bytes of that run, so the bytes at an offset never depend on the size.

- Every word names its own offset, so a byte served from the wrong place (off by one, by a block,
  by 2**32) never matches, and distinct seeds make distinct objects.
- Any range costs time in proportion to its length, wherever it is: a 5 TiB object is read at
  its end as cheaply as at its start. A chunk is a fixed template of low bits ORed with the
  chunk's own high bits, and its CRC tail needs that chunk only, thanks to the CRC-32 residue:
  ``crc32(m + crc32(m).to_bytes(4, "little")) == CRC_RESIDUE`` for every ``m``. So the CRC of
  an object up to the end of any whole chunk is ``CRC_RESIDUE``, a chunk's tail is the CRC of
  its own body continued from there (from 0 for the first chunk), and the CRC-32 of a whole
  object - the field a stored zip member needs - costs one chunk (``pattern_crc32``), not a read
  of 4.5 GiB.

Archive (``synthetic_zip``): a ZIP64 archive of ``MEMBER_COUNT`` (more than 65,535) small stored
members around one stored member of more than 4 GiB (``HUGE``), so every member after it starts
beyond 4 GiB and has a ZIP64 offset, then a deflated and a stored member at the very end.
``Segments`` holds the archive as a list of segments, each read on demand, so it is never built
in memory. The layout is deterministic: the server and the tests build the same archive.
"""

from __future__ import annotations

import bisect
import functools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
CHUNK = 64 * KiB
CRC_RESIDUE = 0x2144DF1C
_WORDS_PER_CHUNK = CHUNK // 8
_LOW_BITS = 0xFFFF  # the bits of an offset that vary inside a chunk (CHUNK is 2**16)
_HIGH_BITS = 0xFFFF_FFFF_FFFF_0000


@functools.lru_cache(maxsize=16)
def _low_words(seed_low: int) -> int:
    """The low 16 bits of every word of a chunk, as one little-endian integer of CHUNK bytes."""
    words = b"".join(((8 * j) ^ seed_low).to_bytes(8, "little") for j in range(_WORDS_PER_CHUNK))
    return int.from_bytes(words, "little")


def chunk(seed: int, index: int) -> bytes:
    """Chunk ``index`` (bytes ``index * CHUNK`` onwards) of the object with ``seed``."""
    high = ((index * CHUNK) ^ seed) & _HIGH_BITS  # bit fields apart from the low ones: OR is XOR
    high_words = int.from_bytes(high.to_bytes(8, "little") * _WORDS_PER_CHUNK, "little")
    body = (_low_words(seed & _LOW_BITS) | high_words).to_bytes(CHUNK, "little")[:-4]
    crc_before_tail = zlib.crc32(body, CRC_RESIDUE if index else 0)
    return body + crc_before_tail.to_bytes(4, "little")


def pattern(seed: int, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of the object with ``seed`` (see the module docstring)."""
    pieces = []
    for index in range(start // CHUNK, -(-end // CHUNK)):
        at = index * CHUNK
        pieces.append(chunk(seed, index)[max(start - at, 0) : end - at])
    return b"".join(pieces)


def pattern_crc32(seed: int, size: int) -> int:
    """zlib.crc32 of the whole object of ``size`` bytes with ``seed``, at the cost of one chunk."""
    whole_chunks, rest = divmod(size, CHUNK)
    crc = CRC_RESIDUE if whole_chunks else 0
    return zlib.crc32(chunk(seed, whole_chunks)[:rest], crc) if rest else crc


# ---------------------------------------------------------------- the archive's members


def small_member_bytes(number: int) -> bytes:
    """Member ``many/f<number>.txt``: 0 to 1200 bytes that name it, so no two are alike."""
    size = number * 7919 % 1201
    unit = b"%d," % number
    return (unit * (size // len(unit) + 1))[:size]


def small_member_name(number: int) -> str:
    return f"many/f{number:05d}.txt"


@functools.lru_cache(maxsize=1)
def deflated_member_bytes() -> bytes:
    """Member ``tail/deflated.txt`` uncompressed: text, several blocks and readahead GETs long."""
    lines = b"".join(b"deflated member line %d\n" % n for n in range(140_000))
    return lines[: 3 * MiB + 17]


@dataclass(frozen=True)
class Member:
    name: str
    header_offset: int  # of its local header in the archive
    data_offset: int  # of its (compressed) data in the archive
    size: int  # uncompressed
    expected: Callable[[int, int], bytes]  # its uncompressed bytes [start, end), clipped to size


class Segments:
    """An object made of consecutive segments, each read on demand by its own function."""

    def __init__(self) -> None:
        self.size = 0
        self._starts: list[int] = []
        self._readers: list[tuple[int, Callable[[int, int], bytes]]] = []

    def append(self, length: int, read: Callable[[int, int], bytes]) -> int:
        """Add a segment read by ``read(start, end)`` (segment offsets); return its offset."""
        at = self.size
        if length:
            self._starts.append(at)
            self._readers.append((length, read))
            self.size += length
        return at

    def append_bytes(self, data: bytes) -> int:
        return self.append(len(data), lambda start, end: data[start:end])

    def read(self, start: int, end: int) -> bytes:
        pieces = []
        index = bisect.bisect_right(self._starts, start) - 1
        while start < min(end, self.size):
            at, (length, read) = self._starts[index], self._readers[index]
            piece_end = min(end, at + length)
            pieces.append(read(start - at, piece_end - at))
            start, index = piece_end, index + 1
        return b"".join(pieces)


# ---------------------------------------------------------------- the archive

MEMBER_COUNT = 70_000  # small members: more than 65,535, the most a plain zip can count
SMALL_BEFORE_HUGE = 35_000  # small members 0..34,999 come before HUGE, the rest beyond 4 GiB
HUGE = "big/huge.bin"
HUGE_SIZE = 4 * GiB + 512 * MiB + 777  # stored: ZIP64 sizes, and archive offset 2**32 inside
HUGE_SEED = 0x5A5A_1234_0F0F_7788
DEFLATED = "tail/deflated.txt"
AFTER = "tail/after.bin"  # stored, the archive's last member
AFTER_SIZE = 3 * MiB + 5
AFTER_SEED = 0x0123_4567_89AB_CDEF
_DOS_TIME = (7 << 11) | (8 << 5) | (10 // 2)  # 07:08:10
_DOS_DATE = ((2021 - 1980) << 9) | (5 << 5) | 6  # 2021-05-06
_ZIP64_TAG, _STORED, _DEFLATED = 0x0001, 0, 8
_32_BITS = 0xFFFF_FFFF


@dataclass
class SyntheticZip:
    archive: Segments
    members: dict[str, Member]


class _ZipWriter:
    """Appends members to ``Segments`` and ends them with a ZIP64 central directory."""

    def __init__(self) -> None:
        self.archive = Segments()
        self.members: dict[str, Member] = {}
        self._central: list[bytes] = []

    def add(
        self, name: str, size: int, crc: int, method: int, packed_size: int,
        read_packed: Callable[[int, int], bytes], expected: Callable[[int, int], bytes],
    ) -> None:
        raw_name = name.encode()
        header_offset = self.archive.size
        big_sizes = max(size, packed_size) >= _32_BITS
        sizes_extra = struct.pack("<HHQQ", _ZIP64_TAG, 16, size, packed_size) if big_sizes else b""
        size32, packed32 = (_32_BITS, _32_BITS) if big_sizes else (size, packed_size)
        needs = 45 if big_sizes else 20
        local = struct.pack("<4s5H3L2H", b"PK\x03\x04", needs, 0, method, _DOS_TIME, _DOS_DATE,
                            crc, packed32, size32, len(raw_name), len(sizes_extra))
        self.archive.append_bytes(local + raw_name + sizes_extra)
        data_offset = self.archive.append(packed_size, read_packed)
        # The central entry's ZIP64 field: the sizes that overflow, then the offset (APPNOTE 4.5.3).
        wide = [size, packed_size] if big_sizes else []
        offset32 = header_offset
        if header_offset >= _32_BITS:
            wide.append(header_offset)
            offset32 = _32_BITS
        extra = struct.pack(f"<HH{len(wide)}Q", _ZIP64_TAG, 8 * len(wide), *wide) if wide else b""
        needs = 45 if wide else 20
        self._central.append(
            struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, needs, 0, method, _DOS_TIME, _DOS_DATE,
                        crc, packed32, size32, len(raw_name), len(extra), 0, 0, 0, 0, offset32)
            + raw_name + extra
        )
        self.members[name] = Member(name, header_offset, data_offset, size, expected)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), zlib.crc32(data), _STORED, len(data),
                 lambda start, end: data[start:end], lambda start, end: data[start:end])

    def add_pattern(self, name: str, seed: int, size: int) -> None:
        def read(start: int, end: int) -> bytes:
            return pattern(seed, start, min(end, size))

        self.add(name, size, pattern_crc32(seed, size), _STORED, size, read, read)

    def add_deflated(self, name: str, data: bytes) -> None:
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        packed = packer.compress(data) + packer.flush()
        self.add(name, len(data), zlib.crc32(data), _DEFLATED, len(packed),
                 lambda start, end: packed[start:end], lambda start, end: data[start:end])

    def finish(self) -> SyntheticZip:
        directory = b"".join(self._central)
        directory_offset = self.archive.append_bytes(directory)
        count = len(self._central)
        end64_offset = self.archive.append_bytes(
            struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                        len(directory), directory_offset)
        )
        self.archive.append_bytes(struct.pack("<4sLQL", b"PK\x06\x07", 0, end64_offset, 1))
        # The plain end record says "see ZIP64" in every field that overflows or might.
        self.archive.append_bytes(
            struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF,
                        min(len(directory), _32_BITS), _32_BITS, 0)
        )
        return SyntheticZip(self.archive, self.members)


@functools.lru_cache(maxsize=1)
def synthetic_zip() -> SyntheticZip:
    """The archive (about 4.6 GiB, 70,003 members; see the module docstring), built in ~1 s."""
    writer = _ZipWriter()
    for number in range(SMALL_BEFORE_HUGE):
        writer.add_bytes(small_member_name(number), small_member_bytes(number))
    writer.add_pattern(HUGE, HUGE_SEED, HUGE_SIZE)
    for number in range(SMALL_BEFORE_HUGE, MEMBER_COUNT):
        writer.add_bytes(small_member_name(number), small_member_bytes(number))
    writer.add_deflated(DEFLATED, deflated_member_bytes())
    writer.add_pattern(AFTER, AFTER_SEED, AFTER_SIZE)
    return writer.finish()
