"""A data loader's workers reading one directory of small files, as PyTorch's ``DataLoader`` does.

A map-style dataset of files, a sampler, batches of ``--batch`` indices handed out to ``N``
worker processes in turn: worker ``k`` reads batches ``k, k+N, k+2N, ...``, each batch's files
one after the other. With the sequential sampler (an evaluation pass, a dataset shuffled into
its files beforehand, a preprocessing pass) every worker reads its own slices of the directory
in order; with the shuffling one, files at random. Each configuration reads the whole directory
once on a fresh mount (fresh cache directory, page cache dropped); printed per line: files per
second, and the S3 bytes fetched against the bytes read (what was fetched unasked)::

    python -m bench.loader_workers [--profiles 0ms,20ms] [--files 2000] [--batch 32]

Run as root (it drops the page cache and mounts), against the local S3 server it starts itself,
through the benchmark's latency proxy for ``20ms``. No PyTorch needed: the loop below is the
``DataLoader``'s order of reads (``multiprocessing`` with ``fork``, as its default on Linux).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import tempfile
import time
from pathlib import Path

from . import peers
from .env import Backend, Dataset, S3Counter, drop_caches
from .netproxy import NetProxy

PROFILES = {"0ms": 0.0, "20ms": 20.0}


def batches(count: int, batch: int, shuffled: bool) -> list[list[int]]:
    """The sampler's indices cut into batches (the last may be short)."""
    order = list(range(count))
    if shuffled:
        random.Random(7).shuffle(order)
    return [order[start : start + batch] for start in range(0, count, batch)]


def worker(paths: list[Path], mine: list[list[int]]) -> None:
    for batch in mine:
        for index in batch:
            with open(paths[index], "rb") as handle:
                handle.read()


def read_all(paths: list[Path], workers: int, batch: int, shuffled: bool) -> float:
    """Seconds for ``workers`` processes to read every file, batches dealt out in turn."""
    dealt = batches(len(paths), batch, shuffled)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=worker, args=(paths, dealt[k::workers]))
             for k in range(workers)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a worker failed with exit status {proc.exitcode}")
    return time.perf_counter() - started


def one(backend: Backend, endpoint: str, dataset: Dataset, root: Path, workers: int,
        batch: int, shuffled: bool) -> str:
    ours, cache, mountpoint = peers.Ours(root), root / "cache", root / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    counter = S3Counter(backend)
    with ours.mount(endpoint, dataset.small_prefix, mountpoint, cache) as mounted:
        paths = [mounted.path / name for name in dataset.small_names()]
        counter.reset()
        seconds = read_all(paths, workers, batch, shuffled)
        fetched = counter.read().get_bytes
    read = dataset.small_count * dataset.small_size
    sampler = "shuffled" if shuffled else "in order"
    return (f"{workers} workers, batches of {batch:>2}, {sampler:>8}: "
            f"{dataset.small_count / seconds:6.0f} files/s, fetched {fetched / read:.2f}x "
            f"the bytes read")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="0ms,20ms")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--port", type=int, default=0, help="server port (proxy: port + 1)")
    parser.add_argument("--scratch", default="/var/tmp", help="where mounts and caches go")
    args = parser.parse_args()
    dataset = Dataset(big_size=1 << 20, small_count=args.files, small_dirs=1)
    plans = [(1, args.batch, False), (4, args.batch, False), (8, args.batch, False),
             (8, 1, False), (8, args.batch, True)]
    with Backend(port=args.port) as backend, \
            tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        backend.upload(dataset)
        for profile in args.profiles.split(","):
            proxy_port = args.port + 1 if args.port else 0
            with NetProxy(backend.endpoint, delay_ms=PROFILES[profile], port=proxy_port) as proxy:
                for workers, batch, shuffled in plans:
                    line = one(backend, proxy.endpoint, dataset, Path(scratch), workers, batch,
                               shuffled)
                    print(f"{profile}: {line}", flush=True)


if __name__ == "__main__":
    main()
