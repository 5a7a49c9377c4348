"""Parallel readers on a cold mount, then a remount: does the second mount read from S3 again?

Eight threads each read an eighth of the big file on a fresh mount (fresh cache directory, page
cache dropped). A busy machine's cache disk falls behind, and runs the readers waited for are
then left uncached (``cache_writes_skipped``) and cached later, once the disk has room
(``cache_refills``). After ``--pause`` seconds the mount goes, the page cache is dropped, a
second mount with the same cache directory reads the whole file, and the S3 server counts the
bytes that read fetched: zero if everything was cached in time::

    python -m bench.remount_after_parallel [--runs 3] [--pause 3] [--big-mib 1024]

Prints one line per run. Run as root (it drops the page cache and mounts), against the local
S3 server it starts itself; 0 ms latency, where the daemon competes hardest for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from . import peers
from .env import Backend, Dataset, S3Counter, drop_caches

MiB = 1 << 20


def read_eighths(path: Path, size: int) -> float:
    """Eight threads, each reading its eighth in 1 MiB reads; the aggregate MB/s."""

    def reader(part: int) -> None:
        with open(path, "rb", buffering=0) as handle:
            handle.seek(part * size // 8)
            for _ in range(size // 8 // MiB):
                handle.read(MiB)

    threads = [threading.Thread(target=reader, args=(part,)) for part in range(8)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return size / (time.perf_counter() - started) / 1e6


def stats(mountpoint: Path) -> dict[str, int]:
    return json.loads(os.getxattr(mountpoint, "user.s3datafs.stats"))


def one_run(backend: Backend, dataset: Dataset, root: Path, pause: float) -> str:
    ours, cache = peers.Ours(root), root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    mountpoint = root / "mnt"
    drop_caches()
    with ours.mount(backend.endpoint, dataset.big_prefix, mountpoint, cache) as mounted:
        speed = read_eighths(mounted.path / dataset.big_name, dataset.big_size)
        at_end = stats(mounted.path)
        time.sleep(pause)
        later = stats(mounted.path)
    drop_caches()
    counter = S3Counter(backend)
    with ours.mount(backend.endpoint, dataset.big_prefix, mountpoint, cache) as mounted:
        counter.reset()
        with open(mounted.path / dataset.big_name, "rb", buffering=0) as handle:
            while handle.read(MiB):
                pass
        fetched = counter.read().get_bytes
    return (f"8 readers {speed:.0f} MB/s; blocks left uncached {at_end['cache_writes_skipped']}, "
            f"cached later {at_end.get('cache_refills', 0)} by the readers' end, "
            f"{later.get('cache_refills', 0)} {pause:g} s after; the remount fetched "
            f"{fetched / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds before the unmount")
    parser.add_argument("--big-mib", type=int, default=1024)
    args = parser.parse_args()
    dataset = Dataset(big_size=args.big_mib * MiB, small_count=1, small_dirs=1)
    with Backend() as backend, tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        backend.upload(dataset)
        for run in range(1, args.runs + 1):
            print(f"run {run}: {one_run(backend, dataset, Path(scratch), args.pause)}", flush=True)


if __name__ == "__main__":
    main()
