"""Readahead policy for one open file: detect sequential reading, grow a window, say what to fetch.

Pure logic, no I/O: ``Readahead.on_read`` is told each read and returns the byte range to fetch
ahead (or None). The reader turns that range into background fetches under the prefetch budget.

Rules (after Mountpoint's and the kernel's readahead):
- A read that starts near where the previous one ended is sequential. "Near" tolerates the
  kernel's own reordering: its async readahead may deliver neighbouring requests slightly out of
  order, so anything within one window of the expected offset counts.
- On a sequential read the window doubles, from ``initial`` up to ``maximum``. When less than
  half a window is left between the read's end and what was already requested, the range
  ``[max(read end, already requested), read end + window)`` is asked for: requests stay large
  (at least half a window) instead of trailing the reader in read-sized slivers, and nothing is
  asked twice.
- Readahead starts at the beginning of a file, or after two sequential reads in a row: a random
  reader whose next offset lands near the last one by chance must not pull a window.
- Any other read (a seek) resets the window: random readers fetch only what they read.
- The window is per handle, so its memory is bounded per handle by ``maximum``; the reader bounds
  the total across handles with its prefetch budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Readahead:
    initial: int
    maximum: int
    window: int = field(init=False)
    _expected: int = field(default=0, init=False)  # where a sequential reader reads next
    _requested_until: int = field(default=0, init=False)
    _streak: int = field(default=0, init=False)  # sequential reads in a row

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("readahead needs 0 < initial <= maximum")
        self.window = self.initial

    def on_read(self, offset: int, length: int, size: int) -> tuple[int, int] | None:
        """Record a read of ``[offset, offset + length)``; return the range to fetch ahead."""
        end = min(offset + length, size)
        sequential = abs(offset - self._expected) <= self.window
        self._expected = max(end, self._expected) if sequential else end
        if not sequential:
            self.window = self.initial
            self._requested_until = end
            self._streak = 0
            return None
        self._streak += 1
        if offset > 0:
            if self._streak < 2:
                return None
            self.window = min(self.window * 2, self.maximum)
        if self._requested_until - end > self.window // 2:
            return None  # far enough ahead already
        start = max(end, self._requested_until)
        stop = min(end + self.window, size)
        if stop <= start:
            return None
        self._requested_until = stop
        return start, stop
