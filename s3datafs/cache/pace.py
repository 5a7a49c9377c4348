"""How fast the cache disk takes writes, and so how many fetched bytes may wait for it.

Why: fetched blocks wait in memory for their cache write (write-behind) up to a budget, so
that reads never wait for the disk. Where the disk keeps up with S3 the budget is rarely full.
Where it is slower (a network volume out of burst credits, a throttled container disk), the
budget stays full the whole time and its bytes add to everything else the daemon holds:
8 sequential readers with the cache disk at 10 MB/s peaked at 257-299 MiB with a fixed 64 MiB
budget (the target is 256 MiB). Bytes that will wait seconds for such a disk buy nothing: the
reads they came from are served already. So the budget is what the disk writes in
``BACKLOG_SECONDS``, at least ``floor`` (one GET's run must fit) and at most ``ceiling`` (the
configured write-behind, which is also the budget until the pace is known: a smaller one at
the start made a fast disk leave a reader's first blocks uncached).

How: the rate is the bytes written over the time during which at least one write was in
progress (busy time). Writes that run in parallel share one disk, so each one's own rate would
make the disk look slower than it is. Writes still in progress count as done, so the rate is
never below the disk's (a fast disk is never taken for a slow one), and a disk that has not
finished a write for a while is known to be slow without waiting for it: the pace is known
once a write has succeeded or ``MIN_BUSY_SECONDS`` of busy time have passed. Both sums halve
once the busy time passes ``WINDOW_SECONDS``, so the rate follows a disk that slows down (or
recovers) within seconds. A write that fails adds busy time, not bytes: a failing disk gets
the floor.

Thread-safe: writes run in worker threads; budgets are sized from the trio thread or under
their own lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

BACKLOG_SECONDS = 1.0  # what may wait for the disk, in seconds of its measured write rate
WINDOW_SECONDS = 4.0  # busy time after which the sums halve: the rate's memory
MIN_BUSY_SECONDS = 0.25  # busy time after which the pace is known, even with no write done


class WritePace:
    """The cache disk's measured write rate, and the write-behind budget it allows."""

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self._lock = threading.Lock()
        self._writing = 0  # writes in progress
        self._pending = 0  # their bytes
        self._since = 0.0  # when busy time was last added up
        self._busy = 0.0  # seconds with at least one write in progress (decayed)
        self._bytes = 0.0  # bytes written in that time (decayed)

    @contextlib.contextmanager
    def writing(self, nbytes: int) -> Iterator[None]:
        """Time one write of ``nbytes`` (its bytes counted only if it succeeds)."""
        self._change(+1, nbytes, 0)
        written = 0
        try:
            yield
            written = nbytes
        finally:
            self._change(-1, -nbytes, written)

    def _change(self, writes: int, pending: int, written: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._writing:
                self._busy += now - self._since
            self._since = now
            self._writing += writes
            self._pending += pending
            self._bytes += written
            if self._busy > WINDOW_SECONDS:
                self._busy /= 2
                self._bytes /= 2

    @property
    def bytes_per_second(self) -> float | None:
        """The measured rate (writes in progress counted as done), or None until known."""
        with self._lock:
            busy = self._busy + (time.monotonic() - self._since if self._writing else 0.0)
            if not self._bytes and busy < MIN_BUSY_SECONDS:
                return None
            return (self._bytes + self._pending) / max(busy, 1e-6)

    @property
    def allowance(self) -> int:
        """Bytes that may wait for the disk now."""
        rate = self.bytes_per_second
        if rate is None:
            return self.ceiling
        return max(self.floor, min(self.ceiling, int(rate * BACKLOG_SECONDS)))
