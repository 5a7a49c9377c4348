"""CRC-32 of pieces read in any order: ``crc32_combine`` and a per-member ``Coverage``.

A large member is fetched in several ranged GETs, possibly out of order and from several threads,
yet its CRC-32 must be checked when the whole member has been read. zlib can combine the CRCs of
two adjacent pieces (``crc32_combine``: crc(A + B) from crc(A), crc(B) and len(B)), but Python's
``zlib`` module does not expose it, so it is written here: multiplying by x^(8·len) in GF(2)
modulo the CRC polynomial, as a 32x32 bit matrix raised to a power by repeated squaring.
Cost: about 30 matrix squarings per combine (a few milliseconds in Python), once per GET.

``Coverage`` keeps the disjoint pieces of one member read so far, merging neighbours, and says
when they cover the member. A piece overlapping pieces already seen (the block reader fetches
whole blocks around what another path served, or a range again after its blocks were evicted)
adds the bytes it has that were not seen yet: its bytes are at hand, so every byte of the member
is counted once, and a member read whole in pieces of any shape is always checked.
"""

from __future__ import annotations

import bisect
import functools
import zlib

_POLYNOMIAL = 0xEDB88320  # CRC-32 (IEEE), reflected


def _times(matrix: tuple[int, ...], vector: int) -> int:
    result = 0
    row = 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


def _square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(matrix, matrix[row]) for row in range(32))


@functools.lru_cache(maxsize=64)
def _shift_operator(length: int) -> tuple[int, ...]:
    """The matrix that appends ``length`` zero bytes to a CRC register (cached: runs repeat)."""
    one_bit = (_POLYNOMIAL,) + tuple(1 << row for row in range(31))  # append one zero bit
    power = _square(_square(_square(one_bit)))  # one zero byte
    result: tuple[int, ...] | None = None
    while length:
        if length & 1:
            result = power if result is None else tuple(_times(power, r) for r in result)
        length >>= 1
        if length:
            power = _square(power)
    return result if result is not None else tuple(1 << row for row in range(32))


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """crc32(A + B) from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if length_b <= 0:
        return crc_a
    return _times(_shift_operator(length_b), crc_a) ^ crc_b


class Coverage:
    """The pieces of one member read so far, as disjoint ``[start, end)`` ranges with CRCs."""

    __slots__ = ("size", "_starts", "_pieces")

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []
        self._pieces: list[tuple[int, int, int]] = []  # (start, end, crc), sorted by start

    def add(self, start: int, data: bytes | memoryview) -> int | None:
        """Record ``data`` read at ``start``; the member's CRC once every byte has been seen."""
        view = memoryview(data)
        if not self._pieces and start == 0 and len(view) == self.size:
            return self._add_unseen(0, view)  # the whole member at once (an empty one too)
        crc = None
        for gap_start, gap_end in self._unseen(start, start + len(view)):
            crc = self._add_unseen(gap_start, view[gap_start - start : gap_end - start])
        return crc

    def _unseen(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that no piece covers yet."""
        at = bisect.bisect_right(self._starts, start)
        if at > 0:
            start = max(start, self._pieces[at - 1][1])
        gaps = []
        for piece_start, piece_end, _ in self._pieces[at:]:
            if piece_start >= end:
                break
            if piece_start > start:
                gaps.append((start, piece_start))
            start = max(start, piece_end)
        if start < end:
            gaps.append((start, end))
        return gaps

    def _add_unseen(self, start: int, data: memoryview) -> int | None:
        """Insert a piece that overlaps none, merged with its neighbours; the CRC once whole."""
        end = start + len(data)
        at = bisect.bisect_right(self._starts, start)
        crc = zlib.crc32(data)
        if at > 0 and self._pieces[at - 1][1] == start:  # merge with the piece before
            at -= 1
            start, _, before = self._pieces.pop(at)
            self._starts.pop(at)
            crc = crc32_combine(before, crc, len(data))
        if at < len(self._pieces) and self._pieces[at][0] == end:  # and with the one after
            _, after_end, after = self._pieces.pop(at)
            self._starts.pop(at)
            crc = crc32_combine(crc, after, after_end - end)
            end = after_end
        self._pieces.insert(at, (start, end, crc))
        self._starts.insert(at, start)
        if start == 0 and end == self.size:
            return crc
        return None

    def __len__(self) -> int:
        return len(self._pieces)
