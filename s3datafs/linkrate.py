"""How fast one connection delivers a GET body: whether a read a reader waits for is split.

Why: S3 serves each connection at ~100 MB/s; more throughput comes from more connections
(AWS's guidance for one object: parallel byte-range GETs). A reader waiting for a 1 MiB run
there waits S3's first-byte latency plus ~10 ms of transfer; two GETs of half each, sent at
once, arrive ~5 ms sooner (measured on the benchmark's S3-like link, 20 ms + 100 MB/s per
connection, splitting every such read: 10 scattered 1 MiB reads by one reader 0.31 -> 0.26 s).
Where the link is fast, or shared by many GETs at once, the second GET only costs CPU: the
same reads at 0 ms and, by 8 readers, at 20 ms through the benchmark's proxy got slower.

How: a GET is a sample when its body is at least ``MIN_SAMPLE_BYTES`` and no more than
``ALONE`` GETs were in progress at any moment of it. Its rate is its length over the time spent
reading it once the response headers were in, which leaves out the first-byte latency that
splitting does not shorten. Only GETs nearly alone count because many GETs at once share
whatever the bottleneck is (a proxy, the CPU, one server): each then gets a share that looks
like a slow connection, though another GET would not add throughput. The link is *slow* once
``MIN_SAMPLES`` samples are in and the median of the last ``WINDOW`` is below
``SLOW_BYTES_PER_SECOND``; until then nothing is split (a fresh mount reads as before).

Thread-safe: GETs begin and end in worker threads, the reader asks from the trio thread.
"""

from __future__ import annotations

import threading
from collections import deque

MIN_SAMPLE_BYTES = 512 * 1024  # smaller bodies arrive in a few packets: their time says little
ALONE = 2  # GETs in progress at once, at most, for a sample (a split read is two)
WINDOW = 8  # the last samples the median is taken over
MIN_SAMPLES = 3
SLOW_BYTES_PER_SECOND = 300e6  # 3x S3's per-connection rate; local stores deliver GB/s


class Get:
    """One GET in progress: the most GETs that were in progress at once during it."""

    __slots__ = ("crowd",)

    def __init__(self, crowd: int) -> None:
        self.crowd = crowd


class LinkRate:
    """Body rates of recent GETs made nearly alone, and whether they show a slow link."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rates: deque[float] = deque(maxlen=WINDOW)
        self._in_progress: list[Get] = []
        self._slow = False  # kept, not derived on each ask: the reader asks per waited read

    def begin(self) -> Get:
        """A GET starts: every GET in progress now has one more beside it."""
        with self._lock:
            get = Get(0)
            self._in_progress.append(get)
            crowd = len(self._in_progress)
            for other in self._in_progress:
                other.crowd = max(other.crowd, crowd)
            return get

    def end(self, get: Get, nbytes: int = 0, body_seconds: float = 0.0) -> None:
        """The GET is over; ``nbytes`` of body took ``body_seconds`` after its headers."""
        with self._lock:
            self._in_progress.remove(get)
            if nbytes < MIN_SAMPLE_BYTES or get.crowd > ALONE:
                return
            self._rates.append(nbytes / max(body_seconds, 1e-6))  # a buffered body: ~0 s
            self._slow = (
                len(self._rates) >= MIN_SAMPLES
                and _median(self._rates) < SLOW_BYTES_PER_SECOND
            )

    @property
    def slow(self) -> bool:
        """Whether GETs made alone show a link where a read is faster as two GETs."""
        return self._slow

    @property
    def bytes_per_second(self) -> int:
        """The median of the recent samples (0: none yet), for the mount's counters."""
        with self._lock:
            return int(_median(self._rates)) if self._rates else 0


def _median(values: deque[float]) -> float:
    """The median (``statistics`` would cost the mount command ~1 ms of imports, cold more)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
