"""How fast the cache disk takes writes, and so how many fetched bytes may wait for it.

Why: fetched blocks wait in memory for their cache write (write-behind) up to a budget, so
that reads never wait for the disk. Where the disk keeps up with S3 the budget is rarely full.
Where it is slower (a network volume out of burst credits, a throttled container disk), the
budget stays full the whole time and its bytes add to everything else the daemon holds:
8 sequential readers with the cache disk at 10 MB/s peaked at 263-268 MiB with a fixed 64 MiB
budget (the target is 256 MiB). Bytes that will wait seconds for such a disk buy nothing: the
reads they came from are served already, and a budget kept full makes later blocks go
uncached or wait anyway. So the budget is what the disk writes in ``BACKLOG_SECONDS``, at least
``floor`` (one GET's run must fit) and at most ``ceiling`` (the configured write-behind).
Until a write has shown the disk's pace, the budget is ``floor``: the backlog piles up within
the first fraction of a second (S3 delivers 64 MiB in ~0.1 s), long before a slow disk has
finished one write, and it then takes seconds to drain. A disk that keeps up finishes its first
write within milliseconds, and the budget opens up to ``ceiling`` at once (at 64 MB/s or more).

How: the rate is the bytes written over the time during which at least one write was in
progress (busy time). Writes that run in parallel share one disk, so each one's own rate would
make the disk look slower than it is. Both sums halve once the busy time passes
``WINDOW_SECONDS``, so the rate follows a disk that slows down (or recovers) within seconds.
A write that fails adds busy time, not bytes: a failing disk gets the floor.

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


class WritePace:
    """The cache disk's measured write rate, and the write-behind budget it allows."""

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self._lock = threading.Lock()
        self._writing = 0  # writes in progress
        self._since = 0.0  # when busy time was last added up
        self._busy = 0.0  # seconds with at least one write in progress (decayed)
        self._bytes = 0.0  # bytes written in that time (decayed)

    @contextlib.contextmanager
    def writing(self, nbytes: int) -> Iterator[None]:
        """Time one write of ``nbytes`` (counted only if it succeeds)."""
        self._change(+1, 0)
        written = 0
        try:
            yield
            written = nbytes
        finally:
            self._change(-1, written)

    def _change(self, writes: int, written: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._writing:
                self._busy += now - self._since
            self._since = now
            self._writing += writes
            self._bytes += written
            if self._busy > WINDOW_SECONDS:
                self._busy /= 2
                self._bytes /= 2

    @property
    def bytes_per_second(self) -> float | None:
        """The measured rate, or None until a write has succeeded."""
        with self._lock:
            if not self._bytes:
                return None
            return self._bytes / max(self._busy, 1e-6)

    @property
    def allowance(self) -> int:
        """Bytes that may wait for the disk now."""
        rate = self.bytes_per_second
        if rate is None:
            return self.floor
        return max(self.floor, min(self.ceiling, int(rate * BACKLOG_SECONDS)))
