"""A real PyTorch ``DataLoader`` reading one directory of small files on a mount.

Needs PyTorch, which s3datafs does not depend on: install it into a venv of its own, never the
project's ``.venv``, e.g. (a CPU build is enough)::

    .venv/bin/python -m venv /var/tmp/tvenv
    /var/tmp/tvenv/bin/pip install \
        /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    #   (or: pip install torch --index-url https://download.pytorch.org/whl/cpu)
    /var/tmp/tvenv/bin/pip install -e '.[test,bench]'
    /var/tmp/tvenv/bin/python -m bench.torch_loader [--profiles 0ms,20ms] [--files 2000]

``bench/loader_workers.py`` is the model of the same job without PyTorch (the ``DataLoader``'s
order of reads, by hand); this runs the real one, so the two can be compared on one machine:
``torch.utils.data.DataLoader`` over a map-style ``Dataset`` whose ``__getitem__`` opens and reads
one file of the mount and returns it as a ``uint8`` tensor (collated into batches, passed from
the workers through shared memory), with its sha256 computed in the worker. Every file's bytes are
checked against the digests of what was uploaded, in every configuration. Each configuration
reads the whole directory once on a fresh mount (fresh cache directory, page cache dropped);
printed per line: files per second, the S3 GETs and GetObject bytes the server counted against
the bytes read, and how many files were verified.

Run as root (it drops the page cache and mounts), against the local S3 server it starts itself,
through the benchmark's latency proxy (``bench/netproxy.py``) for ``20ms``. ``--port P`` puts the
server on P and the proxy on P+1 (default: any free ports).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import torch
    from torch.utils.data import DataLoader, Dataset
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("bench.torch_loader needs PyTorch (how to install it: the top of the file)")

from . import peers
from .env import BUCKET, Backend, S3Counter, drop_caches, s3_client
from .netproxy import NetProxy

warnings.filterwarnings("ignore", message="This DataLoader will create")  # 2 cores, 8 workers

PROFILES = {"0ms": 0.0, "20ms": 20.0}
PREFIX = "small/"
PLANS = (  # (num_workers, batch_size, shuffle)
    (0, 32, False), (1, 32, False), (4, 32, False), (8, 32, False), (4, 1, False),
    (0, 32, True), (1, 32, True), (4, 32, True), (8, 32, True), (4, 1, True),
)


class Files(Dataset):
    """One file of the mount per index: (index, its bytes as a uint8 tensor, its sha256)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, bytes]:
        with open(self.paths[index], "rb") as handle:
            data = handle.read()
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), \
            hashlib.sha256(data).digest()


def upload(endpoint: str, count: int, size: int) -> tuple[list[str], list[bytes]]:
    """``count`` objects of ``size`` random bytes under ``PREFIX``; their names and digests."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    names = [f"f{i:05d}.bin" for i in range(count)]
    digests = []
    for name in names:
        data = os.urandom(size)
        digests.append(hashlib.sha256(data).digest())
        client.put_object(Bucket=BUCKET, Key=PREFIX + name, Body=data)
    return names, digests


def epoch(paths: list[Path], digests: list[bytes], workers: int, batch: int, shuffle: bool,
          context: str, size: int) -> tuple[float, float, int]:
    """Seconds for one epoch of a fresh DataLoader, seconds until its first batch (workers
    starting: ``spawn`` imports torch in each); files verified. Raises on a wrong byte."""
    loader = DataLoader(
        Files(paths), batch_size=batch, shuffle=shuffle, num_workers=workers,
        multiprocessing_context=context if workers else None,
        generator=torch.Generator().manual_seed(7),
    )
    seen, first = 0, 0.0
    started = time.perf_counter()
    for indices, tensors, hashes in loader:
        first = first or time.perf_counter() - started
        for index, tensor, digest in zip(indices.tolist(), tensors, hashes, strict=True):
            if digest != digests[index] or tensor.numel() != size:
                raise RuntimeError(f"wrong bytes in {paths[index]}")
            seen += 1
    seconds = time.perf_counter() - started
    if seen != len(paths):
        raise RuntimeError(f"{seen} files of {len(paths)} came back")
    return seconds, first, seen


def one(backend: Backend, endpoint: str, names: list[str], digests: list[bytes], root: Path,
        plan: tuple[int, int, bool], context: str, size: int) -> str:
    workers, batch, shuffle = plan
    ours, cache, mountpoint = peers.Ours(root), root / "cache", root / "mnt"
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    counter = S3Counter(backend)
    with ours.mount(endpoint, PREFIX, mountpoint, cache) as mounted:
        paths = [mounted.path / name for name in names]
        counter.reset()
        seconds, first, verified = epoch(paths, digests, workers, batch, shuffle, context, size)
        delta = counter.read()
        stats = json.loads(os.getxattr(mounted.path, "user.s3datafs.stats"))
    read = len(names) * size
    sampler = "shuffled" if shuffle else "in order"
    return (f"{workers} workers, batches of {batch:>2}, {sampler:>8}: "
            f"{len(names) / seconds:6.0f} files/s (first batch after {first:4.2f} s), "
            f"{delta.ops.get('GetObject', 0):5d} GETs, "
            f"fetched {delta.get_bytes / read:.2f}x the bytes read, {verified} verified; "
            f"daemon: {stats.get('prefetched_blocks', 0)} blocks prefetched, "
            f"{stats.get('misses', 0)} missed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="0ms,20ms")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64 << 10)
    parser.add_argument("--plans", default="", help="e.g. 4x32,4x1s (workers x batch, s: shuffled)")
    parser.add_argument("--context", default="fork", choices=("fork", "spawn", "forkserver"))
    parser.add_argument("--port", type=int, default=0, help="server port (proxy: port + 1)")
    parser.add_argument("--scratch", default="/var/tmp")
    args = parser.parse_args()
    plans = PLANS
    if args.plans:
        plans = tuple((int(w), int(b.rstrip("s")), b.endswith("s"))
                      for w, b in (p.split("x") for p in args.plans.split(",")))
    print(f"torch {torch.__version__}, start method {args.context}", flush=True)
    with Backend(port=args.port) as backend, \
            tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        names, digests = upload(backend.endpoint, args.files, args.size)
        for profile in args.profiles.split(","):
            proxy_port = args.port + 1 if args.port else 0
            with NetProxy(backend.endpoint, delay_ms=PROFILES[profile], port=proxy_port) as proxy:
                for plan in plans:
                    line = one(backend, proxy.endpoint, names, digests, Path(scratch), plan,
                               args.context, args.size)
                    print(f"{profile}: {line}", flush=True)


if __name__ == "__main__":
    main()
