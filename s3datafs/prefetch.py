"""Readahead policies: within a file (``Readahead``) and across the files of a directory
(``FilePrefetch``, rules in its docstring). Pure logic, no I/O.

``Readahead.on_read`` is told each read and returns the byte range to fetch
ahead (or None). The reader turns that range into background fetches under the prefetch budget.

Readahead rules (after Mountpoint's and the kernel's readahead):
- A read that starts near where the previous one ended is sequential. "Near" tolerates the
  kernel's own reordering: its async readahead may deliver neighbouring requests slightly out of
  order, so anything within one window of the expected offset counts (one ``initial`` window
  while the window is smaller: after a seek it starts from nothing).
- On a sequential read the window grows with what the streak has read: to ``AHEAD_FACTOR``
  times its bytes, up to ``maximum`` (from ``initial`` at the start of a file, from nothing
  after a seek). So a reader that stops (a tensor, a header, a few MiB of a large file) has
  had at most twice what it read fetched ahead, give or take a GET; the window doubled at each
  read before, and a review measured 5 MiB read in 1 MiB reads fetch 20 MiB, 10 MiB fetch 55
  MiB, and a tensor of 5.2 MB mapped by ``torch.load(mmap=True)`` fetch 34 MB. The price: the
  window reaches 64 MiB after 32 MiB read, not after 6 reads, and a cold read of 1 GiB at
  S3-like latency was ~5 % slower (A/B in ``bench/RESULTS.md``, session 25). As soon as a
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
  reader whose next offset lands near the last one by chance must not pull a window. After a
  seek it starts small: page faults of 4 KiB through a mapping with ``MADV_RANDOM``, a few in a
  row per slice read, pulled 1 MiB each (a review: 83 MB fetched for 3.3 MB of random slices).
- Any other read (a seek) resets the window: random readers fetch only what they read.
- The window is per handle, so its memory is bounded per handle by ``maximum``; the reader bounds
  the total across handles with its prefetch budget, and shares it: with several streams reading
  at once, each asks for at most its share (``limit``), so none is left to fetch in the
  foreground while another holds the whole budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

AHEAD_FACTOR = 2  # the window grows to this many times what the streak has read
LAG_FACTOR = 4  # how far behind the stream (in tolerances) a late worker's open may go on with it


@dataclass
class Readahead:
    initial: int
    maximum: int
    window: int = field(init=False)
    _expected: int = field(default=0, init=False)  # where a sequential reader reads next
    _requested_until: int = field(default=0, init=False)
    _streak: int = field(default=0, init=False)  # sequential reads in a row
    _streak_bytes: int = field(default=0, init=False)  # what they read

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
        sequential = abs(offset - self._expected) <= max(self.window, self.initial)
        self._expected = max(end, self._expected) if sequential else end
        if not sequential:
            self.window = 0
            self._requested_until = end
            self._streak = self._streak_bytes = 0
            return None
        self._streak += 1
        self._streak_bytes += max(0, end - offset)
        self._requested_until = max(self._requested_until, end)  # the read fetches its own range
        if offset > 0:
            if self._streak < 2:
                return None
            self.window = min(max(self.window, AHEAD_FACTOR * self._streak_bytes), self.maximum)
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


@dataclass
class _Walk:
    """One directory's stream of opens, in inode (= listing) order."""

    expected: int  # the inode after the highest one opened in order
    low: int  # the lowest inode opened in order
    streak: int = 1  # opens in order, in a row
    window: int = 0  # inodes ahead to have asked for
    requested_until: int = 0  # inodes up to this one (inclusive) were asked for
    recent: set[int] = field(default_factory=set)  # opened, within the lag's reach

    def goes_on(self, inode: int, tolerance: int) -> bool:
        """Whether an open of ``inode`` goes on with this stream: within ``tolerance`` of the
        next one expected, or farther back but within what the stream covers, up to
        ``LAG_FACTOR`` times that, and not opened yet (a worker late with its file). A file
        opened again there is a new pass over the directory (the next epoch of a small one)."""
        if abs(inode - self.expected) <= tolerance:
            return True
        reach = max(self.low, self.expected - LAG_FACTOR * tolerance)
        return reach <= inode < self.expected and inode not in self.recent

    def opened(self, inode: int, tolerance: int) -> None:
        self.recent.add(inode)
        if len(self.recent) > 2 * LAG_FACTOR * tolerance:  # bounded: only the reach matters
            reach = self.expected - LAG_FACTOR * tolerance
            self.recent = {opened for opened in self.recent if opened >= reach}


@dataclass
class FilePrefetch:
    """Prefetch policy across files: a directory whose files are opened in listing order gets
    its next small files fetched ahead, before anyone opens them.

    Why: a job that reads a tree of small files in order (a first unshuffled epoch, a
    preprocessing pass, ``tar``, ``cp -r``, checksums) waits one S3 round trip per file per
    reading thread; with 20 ms first-byte latency and 8 threads that caps it near 350 files/s,
    whatever the bandwidth. Readahead within a file cannot help: the files are smaller than one
    GET. Rules, as ``Readahead``'s but counted in catalog inodes (siblings are listed by inode):
    - An open is in order if its inode is within ``tolerance`` of the one after the highest
      opened in order in its directory; several threads taking files from one ordered queue
      open them slightly out of order, and subdirectories leave gaps in a directory's inodes.
      Also in order: an open farther behind, of a file not opened yet, within what the stream
      has covered and at most ``LAG_FACTOR`` tolerances back (a worker late with its file: a
      data loader's workers taking one file each in turn, one of them slow, reset the stream at
      each late open, and 8 workers had 482 of 2,000 files fetched ahead, in a simulation of
      its dealing; now 1,997). Farther back, or a file opened again, is a new pass over the
      directory (the next epoch of a small directory, whose files are all within reach).
    - Prefetch starts at the third open in order in a row, with ``initial`` inodes ahead, and
      the window doubles up to ``maximum`` each time it is topped up, while the opens stay
      *dense*: the inodes they cover span at most their number plus half the tolerance (files
      read in order cover every inode once; random opens that happen to fall near each other
      spread out). Any open farther off resets the directory. So a shuffled reader (the usual
      training loop) starts nothing but the rare window of ``initial`` files when a few random
      opens land next to each other (simulated, half an epoch in random order: 0.2 files
      fetched unasked per 1,000 read in a directory of 2,000, 0.3 per 100 in one of 200, 4 per
      20 in one of 40).
    - Returned are inode ranges; the caller fetches the *files* in them (each up to the first
      window its own readahead would fetch, 1 MiB) under the reader's prefetch budget (skipped,
      never queued, when it is spent: ``fell_short``).
    - Two kinds of stream per directory, each with the rules above: one of all its opens, and
      one per reader (the thread that opens, as FUSE tells it), and each may start a prefetch.
      The directory's stream follows several threads taking files from one ordered queue; a
      reader's own follows a data loader's worker processes, each reading its own slices of
      the directory in order (PyTorch's ``DataLoader`` deals batches of consecutive indices to
      its workers in turn): together they jump between slices, which resets the directory's
      stream (4 workers read an in-order directory half as fast as one at 20 ms, 147-150
      against 271-332 files/s; ``bench.loader_workers``). Streams told apart by *where* they
      are were tried instead: with 8 streams of +-8 inodes, random opens in a directory of 200
      files joined one so often that a shuffled half-epoch fetched 45 files it had not asked
      for (one stream: 0.3); a reader's stream sees only its own opens, so a shuffled worker is
      as random as before (a review simulated shuffled half-epochs: 0.54 -> 1.12 files fetched
      unasked per 100 read in a directory of 200 with 8 workers, 1.9 -> 3.1 per 20 in one of
      40).
    - At most ``directories`` directories and ``readers`` (directory, reader) pairs are tracked
      (least recently opened forgotten first), so memory stays bounded whatever the tree and
      however many threads open files.
    """

    initial: int = 4
    maximum: int = 32
    tolerance: int = 8
    directories: int = 64
    readers: int = 256
    _walks: OrderedDict[int, _Walk] = field(default_factory=OrderedDict, init=False)
    _readers: OrderedDict[tuple[int, int], _Walk] = field(default_factory=OrderedDict, init=False)

    def on_open(self, parent: int, inode: int, reader: int = 0) -> list[tuple[int, int]]:
        """Record an open of ``inode`` in directory ``parent`` by ``reader`` (a thread id; 0:
        unknown); return the inode ranges ``(after, until]`` whose files to fetch ahead."""
        if self.maximum <= 0:
            return []
        ahead = [self._step(self._walks, parent, inode, self.directories)]
        if reader:
            ahead.append(self._step(self._readers, (parent, reader), inode, self.readers))
        return _merged([span for span in ahead if span is not None])

    def _step(
        self, walks: OrderedDict, key: object, inode: int, bound: int
    ) -> tuple[int, int] | None:
        """Advance the stream ``walks[key]`` by an open of ``inode``; its range to fetch."""
        walk = walks.pop(key, None)
        if walk is None or not walk.goes_on(inode, self.tolerance):
            walk = _Walk(expected=inode + 1, low=inode, requested_until=inode)
        else:
            walk.streak += 1
            walk.expected = max(walk.expected, inode + 1)
            walk.low = min(walk.low, inode)
        walk.opened(inode, self.tolerance)
        walks[key] = walk  # most recently opened last
        while len(walks) > bound:
            walks.popitem(last=False)
        dense = walk.expected - walk.low <= walk.streak + self.tolerance // 2
        if walk.streak < 3 or not dense or walk.requested_until - walk.expected >= walk.window // 2:
            return None  # not in order (yet), or still far enough ahead
        walk.window = min(max(self.initial, walk.window * 2), self.maximum)
        after = max(walk.requested_until, inode)
        walk.requested_until = walk.expected + walk.window
        return (after, walk.requested_until) if walk.requested_until > after else None

    def fell_short(self, parent: int, until: int, reader: int = 0) -> None:
        """Only inodes up to ``until`` were fetched (the budget is spent): ask again later."""
        for walk in (self._walks.get(parent), self._readers.get((parent, reader))):
            if walk is not None:
                walk.requested_until = min(walk.requested_until, until)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` with those that overlap or touch made one (a lone reader's two streams ask
    for the same files), in order."""
    merged: list[tuple[int, int]] = []
    for after, until in sorted(spans):
        if merged and after <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], until))
        else:
            merged.append((after, until))
    return merged
