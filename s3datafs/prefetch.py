"""Readahead policy for one open file: detect sequential reading, grow a window, say what to fetch.

Pure logic, no I/O: ``Readahead.on_read`` is told each read and returns the byte range to fetch
ahead (or None). The reader turns that range into background fetches under the prefetch budget.

Rules (after Mountpoint's and the kernel's readahead):
- A read that starts near where the previous one ended is sequential. "Near" tolerates the
  kernel's own reordering: its async readahead may deliver neighbouring requests slightly out of
  order, so anything within one window of the expected offset counts.
- On a sequential read the window doubles, from ``initial`` up to ``maximum``. As soon as a
  whole ``step`` (the reader's GET size) fits between what was already requested and the read's
  end plus the window, the range ``[max(read end, already requested), read end + window)`` is
  asked for, its end rounded down to a multiple of ``step``: the reader keeps about
  ``window / step`` GETs of ``step`` bytes in flight, steadily, instead of bursts of them
  (throughput per stream is GETs in flight x bandwidth per connection, and S3 caps the latter),
  requests never trail the reader in read-sized slivers, and nothing is asked twice. Without a
  step, half a window is the unit.
- The reader may fetch less than asked (its prefetch budget is spent); it says how far it got
  (``fell_short``), and the rest is asked for again on the next read rather than left as a hole
  for the reader to fetch in the foreground.
- Readahead starts at the beginning of a file, or after two sequential reads in a row: a random
  reader whose next offset lands near the last one by chance must not pull a window.
- Any other read (a seek) resets the window: random readers fetch only what they read.
- The window is per handle, so its memory is bounded per handle by ``maximum``; the reader bounds
  the total across handles with its prefetch budget, and shares it: with several streams reading
  at once, each asks for at most its share (``limit``), so none is left to fetch in the
  foreground while another holds the whole budget.
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

    def on_read(
        self, offset: int, length: int, size: int, step: int = 0, limit: int = 0
    ) -> tuple[int, int] | None:
        """Record a read of ``[offset, offset + length)``; return the range to fetch ahead.

        ``step``: the size of one GET of the reader (0: half a window). ``limit``: this file's
        share of the reader's readahead budget, if it is shared now (0: no limit): the range
        asked for stays within ``limit`` of the read, though the window keeps its size.
        """
        end = min(offset + length, size)
        sequential = abs(offset - self._expected) <= self.window
        self._expected = max(end, self._expected) if sequential else end
        if not sequential:
            self.window = self.initial
            self._requested_until = end
            self._streak = 0
            return None
        self._streak += 1
        self._requested_until = max(self._requested_until, end)  # the read fetches its own range
        if offset > 0:
            if self._streak < 2:
                return None
            self.window = min(self.window * 2, self.maximum)
        window, unit = self.window, min(step, self.window // 2) if step else self.window // 2
        if limit and limit < window:  # a share of the budget: whole GETs, at least one ahead
            window, unit = limit, min(step, limit) if step else limit // 2
        unit = max(unit, 1)
        if self._requested_until - end > window - unit:
            return None  # far enough ahead already
        start = max(end, self._requested_until)
        stop = end + window
        if step and stop - stop % step > start:
            stop -= stop % step  # GETs keep to step boundaries: whole runs, whole cache chunks
        stop = min(stop, size)
        if stop <= start:
            return None
        self._requested_until = stop
        return start, stop

    def fell_short(self, until: int) -> None:
        """The reader fetched only up to ``until`` of what was asked: ask for the rest again."""
        self._requested_until = min(self._requested_until, until)
