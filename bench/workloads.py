"""File-level workloads: what a job does to a mounted dataset, timed, with bounded loops.

Every function takes paths only (so it measures any filesystem the same way, local disk
included) and a ``deadline`` (``time.monotonic()`` value) after which loops stop early; callers
compute rates from what was actually done. Reads use ``os.pread`` into a reusable buffer on a file
descriptor opened once per thread; threads release the GIL in the read system call, so Python is
not the bottleneck at the rates measured here.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
PAGE = 4096


@dataclass(frozen=True)
class Done:
    """What a workload did: operations, bytes, elapsed seconds, whether it hit its deadline."""

    ops: int
    nbytes: int
    seconds: float
    capped: bool = False

    def mbps(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


def _read_span(path: Path, start: int, end: int, block: int, deadline: float) -> tuple[int, bool]:
    """Read [start, end) of ``path`` in ``block``-sized reads; (bytes, stopped by deadline)."""
    buf = bytearray(block)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    done, pos = 0, start
    try:
        while pos < end:
            if time.monotonic() > deadline:
                return done, True
            n = os.preadv(fd, [view[: min(block, end - pos)]], pos)
            if n <= 0:
                break
            done += n
            pos += n
    finally:
        os.close(fd)
    return done, False


def sequential(path: Path, deadline: float, block: int = MiB) -> Done:
    """One reader, whole file, front to back."""
    size = path.stat().st_size
    started = time.perf_counter()
    nbytes, capped = _read_span(path, 0, size, block, deadline)
    return Done(-(-nbytes // block), nbytes, time.perf_counter() - started, capped)


def parallel_sequential(path: Path, readers: int, deadline: float, block: int = MiB) -> Done:
    """``readers`` threads, each reading its own contiguous 1/readers of the file in order."""
    size = path.stat().st_size
    step = -(-size // readers)
    spans = [(i * step, min(size, (i + 1) * step)) for i in range(readers)]
    started = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        results = list(pool.map(lambda s: _read_span(path, s[0], s[1], block, deadline), spans))
    nbytes = sum(n for n, _ in results)
    capped = any(c for _, c in results)
    return Done(-(-nbytes // block), nbytes, time.perf_counter() - started, capped)


def random_plan(
    seed: int, lo: int, hi: int, size: int, threads: int, per_thread: int
) -> list[list[int]]:
    """Page-aligned random offsets in [lo, hi - size): one list per thread, fixed by ``seed``."""
    rng = random.Random(seed)
    top = (hi - size - lo) // PAGE
    return [[lo + rng.randrange(top) * PAGE for _ in range(per_thread)] for _ in range(threads)]


def random_reads(path: Path, plan: list[list[int]], size: int, deadline: float) -> Done:
    """One thread per list in ``plan``, each doing a ``size``-byte pread at each of its offsets."""

    def worker(offsets: list[int]) -> tuple[int, bool]:
        buf = bytearray(size)
        fd = os.open(path, os.O_RDONLY)
        try:
            for done, offset in enumerate(offsets):
                if time.monotonic() > deadline:
                    return done, True
                os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)
        return len(offsets), False

    started = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(worker, plan))
    ops = sum(n for n, _ in results)
    return Done(ops, ops * size, time.perf_counter() - started, any(c for _, c in results))


def read_files(paths: list[Path], threads: int, deadline: float) -> Done:
    """Read each file whole (open, read to EOF, close) with ``threads`` threads."""

    def read_one(path: Path) -> int:
        if time.monotonic() > deadline:
            return -1
        with open(path, "rb", buffering=0) as src:
            return len(src.read())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(read_one, paths))
    done = [n for n in sizes if n >= 0]
    return Done(len(done), sum(done), time.perf_counter() - started, len(done) < len(paths))


def find_stat(root: Path, timeout: float) -> Done:
    """``find ROOT -printf '%s'``: walks the tree and stats every entry (sizes need a stat)."""
    started = time.perf_counter()
    out = subprocess.run(
        ["find", str(root), "-printf", "%y %s\n"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
    files = [line for line in out.splitlines() if line.startswith("f ")]
    nbytes = sum(int(line.split()[1]) for line in files)
    return Done(len(files), nbytes, time.perf_counter() - started)


def scattered(path: Path, offsets: list[int], deadline: float, block: int = MiB) -> Done:
    """One reader, ``block``-sized chunks at ``offsets`` in that order."""
    started = time.perf_counter()
    nbytes, ops, capped = 0, 0, False
    for offset in offsets:
        n, capped = _read_span(path, offset, offset + block, block, deadline)
        if capped:
            break
        nbytes, ops = nbytes + n, ops + 1
    return Done(ops, nbytes, time.perf_counter() - started, capped)


def scattered_parallel(
    path: Path, offsets: list[int], threads: int, deadline: float, block: int = MiB
) -> Done:
    """``threads`` readers share ``offsets`` round-robin, each reading its chunks in order."""
    shares = [offsets[i::threads] for i in range(threads)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda share: scattered(path, share, deadline, block), shares))
    return Done(
        sum(r.ops for r in results),
        sum(r.nbytes for r in results),
        time.perf_counter() - started,
        any(r.capped for r in results),
    )


def scattered_plan(seed: int, size: int, fraction: float, block: int = MiB) -> list[int]:
    """Distinct block-aligned offsets covering ``fraction`` of a ``size``-byte file, shuffled."""
    blocks = size // block
    count = max(1, round(blocks * fraction))
    return [b * block for b in random.Random(seed).sample(range(blocks), count)]


def first_read(path: Path, size: int = PAGE) -> int:
    """Open ``path`` and read its first ``size`` bytes (a mount's first useful answer)."""
    with open(path, "rb", buffering=0) as src:
        return len(src.read(size))
