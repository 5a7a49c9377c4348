"""Per-member costs of a zip mount: where bench_zip's seconds come from (issue 7).

Mounts the bench archive (``bench.zipdata``, the same one ``bench_zip`` builds) and prints, per
member, the wall time and the daemon's CPU of:

- a bare boto3 ranged GET of 128 KiB on the same server (the floor of any scattered read);
- the 1 % sample read whole by one thread, cold (``--ours-arg=--no-cache`` shows the disk
  cache's share);
- every member read whole by 8 threads in archive order: cold, then again after
  ``drop_caches`` (the daemon's disk cache and memory warm: no S3, only the per-member path).

It runs the server direct (0 ms); ``--quick`` uses the 2,000-member archive. Only s3datafs is
mounted: the comparison with peers is ``bench_zip``'s job.

    python -m bench.zip_costs [--quick] [--zip-cache DIR] [--ours-arg=--no-cache]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import bench_zip, peers
from bench.env import BUCKET, Backend, cpu_seconds, drop_caches, s3_client
from bench.zipdata import build, sample

RANGE = 128 * 1024
RAW_GETS = 200


def per_member(label: str, count: int, run: Callable[[], object], pid: int = 0) -> None:
    cpu = cpu_seconds(pid) if pid else time.process_time()
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    cpu = (cpu_seconds(pid) if pid else time.process_time()) - cpu
    who = "daemon" if pid else "client"
    print(f"{label:<42} {count:>6} x {1000 * wall / count:6.2f} ms wall, "
          f"{1000 * cpu / count:5.2f} ms {who} CPU")


def read_whole(root: Path, names: list[str], threads: int) -> None:
    def one(name: str) -> int:
        with open(root / name, "rb", buffering=0) as src:
            return len(src.readall())

    if threads == 1:
        for name in names:
            one(name)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 members, 100 MiB")
    parser.add_argument("--zip-cache", type=Path, help="keep the built archive here (reused)")
    parser.add_argument("--ours-arg", action="append", default=[], help="extra mount argument")
    args = parser.parse_args(argv)
    settings, _ = bench_zip.parse_args(["--quick"] if args.quick else [])
    with tempfile.TemporaryDirectory(prefix="s3datafs-zip-costs-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        data = build(settings.spec, work / "zip", args.zip_cache, log=print)
        chosen, _ = sample(data, settings.fraction)
        in_order = [member.name for member in data.members]
        with Backend() as backend:
            bench_zip.upload(backend, data)
            client = s3_client(backend.endpoint)
            rng = random.Random(1)
            starts = [rng.randrange(0, data.size - RANGE) for _ in range(RAW_GETS)]

            def raw() -> None:
                for start in starts:
                    client.get_object(Bucket=BUCKET, Key=bench_zip.KEY,
                                      Range=f"bytes={start}-{start + RANGE - 1}")["Body"].read()

            per_member("bare boto3 ranged GET, 128 KiB", RAW_GETS, raw)
            ours = peers.Ours(work / "ours", tuple(args.ours_arg))
            mountpoint, cache = work / "mnt", work / "cache"
            with ours.mount(backend.endpoint, bench_zip.KEY, mountpoint, cache) as mounted:
                drop_caches()
                per_member("1% scattered, 1 thread, cold", len(chosen),
                           lambda: read_whole(mountpoint, chosen, 1), mounted.pid)
            shutil.rmtree(cache, ignore_errors=True)
            with ours.mount(backend.endpoint, bench_zip.KEY, mountpoint, cache) as mounted:
                bench_zip.walk(mountpoint)
                per_member("all, 8 threads, cold", len(in_order),
                           lambda: read_whole(mountpoint, in_order, 8), mounted.pid)
                for again in (1, 2):
                    drop_caches()
                    per_member(f"all, 8 threads, daemon caches warm ({again})", len(in_order),
                               lambda: read_whole(mountpoint, in_order, 8), mounted.pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
