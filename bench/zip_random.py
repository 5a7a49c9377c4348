"""Random reads inside one large compressed zip member (bzip2, LZMA, deflate), through a mount.

A zip of one member (``--size-mib``, records of text: ~3x compressible) per method is put on the
S3 server (direct, 0 ms; a fixed ``--port``), then for each method and each contender (this
tree, and ``--baseline DIR``: another ``s3datafs`` package, e.g. a ``git worktree`` of an
earlier commit) on a fresh cache directory:

- ``random``: a fresh mount, ``--reads`` reads of ``--read-kib`` (64) KiB at random offsets
  (one seed for all);
- ``remount``: unmounted and mounted again on the same cache, the same reads (not for the
  baseline with ``--baseline-remount`` off: its mounts keep nothing decompressed, so it repeats
  ``random``, minutes of it);
- ``sequential``: a fresh mount and cache, the member read whole in 1 MiB reads
  (``--sequential-repeats`` times: on a shared machine one time says little).

With ``--prefetch``, ``s3datafs prefetch`` warms the cache of ``random`` first (its own line:
wall and CPU seconds, and what it printed), so ``random`` is a job's first epoch after it.

Each line gives the wall time, the daemon's CPU seconds over the job (``/proc``: what runs on
after it, a decompression into the cache finishing, is not counted), the decompressions from a
member's start the daemon made (``decompressions`` of ``user.s3datafs.stats``; a tree older than
that counter is counted by a ``sitecustomize`` put on the daemon's ``PYTHONPATH`` that wraps
``bz2.BZ2Decompressor`` and ``lzma.LZMADecompressor``: bzip2 and LZMA only), and the mount's S3
GETs and bytes (``user.s3datafs.stats``)::

    python -m bench.zip_random [--size-mib 40] [--reads 200] [--read-kib 64]
                               [--methods bzip2,lzma,deflate] [--baseline DIR]
                               [--no-baseline-remount] [--sequential-repeats 3]
                               [--phases random,remount,sequential] [--prefetch]
                               [--work DIR] [--port 18610]

Every mount is unmounted in a ``finally`` (lazily if it must be).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .env import ROOT, S3Server, child_env, cpu_seconds, s3_client

BUCKET = "zip-random"
MiB = 1 << 20
METHODS = {"bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA, "deflate": zipfile.ZIP_DEFLATED}
COUNTER = '''"""Counts decompressors that decompress into $ZIP_RANDOM_COUNT (bench.zip_random).

Counted at their first decompress() call: a version that makes one only to check a method is
supported is not charged for it."""
import bz2, lzma, os, threading
_lock, _made = threading.Lock(), [0]
class _Counted:
    def __init__(self, inner):
        self._inner, self._counted = inner, False
    def decompress(self, *args, **kwargs):
        if not self._counted:
            self._counted = True
            with _lock:
                _made[0] += 1
                with open(os.environ["ZIP_RANDOM_COUNT"], "w") as out:
                    out.write(str(_made[0]))
        return self._inner.decompress(*args, **kwargs)
    def __getattr__(self, name):
        return getattr(self._inner, name)
def _counting(real):
    return lambda *args, **kwargs: _Counted(real(*args, **kwargs))
if os.environ.get("ZIP_RANDOM_COUNT"):
    bz2.BZ2Decompressor = _counting(bz2.BZ2Decompressor)
    lzma.LZMADecompressor = _counting(lzma.LZMADecompressor)
'''


def records(size: int, seed: int) -> bytes:
    """Lines of a CSV-like file: ids, labels, floats (about 3x compressible, like real data)."""
    rng = random.Random(seed)
    labels = [b"cat", b"dog", b"bird", b"fish", b"horse", b"zebra"]
    lines, total, number = [], 0, 0
    while total < size:
        line = b"%09d,%s,%.6f,%d\n" % (number, rng.choice(labels), rng.random(),
                                        rng.randrange(10**6))
        lines.append(line)
        total += len(line)
        number += 1
    return b"".join(lines)[:size]


def archive(work: Path, method: str, size: int) -> tuple[Path, bytes]:
    """The zip of one member (made once, kept in ``work``) and the member's bytes."""
    data = records(size, seed=7)
    path = work / f"member-{method}-{size}.zip"
    if not path.exists():
        with zipfile.ZipFile(path.with_suffix(".tmp"), "w") as out:
            out.writestr(zipfile.ZipInfo("member.bin", (2024, 1, 1, 0, 0, 0)), data,
                         compress_type=METHODS[method])
        path.with_suffix(".tmp").rename(path)
    return path, data


class Mounts:
    """One contender's mounts: ``s3datafs`` from ``package_dir``, everything under ``root``."""

    def __init__(self, name: str, package_dir: Path, root: Path, endpoint: str) -> None:
        self.name, self.root = name, root
        self.counter_dir = root / "counter"
        self.counter_dir.mkdir(parents=True, exist_ok=True)
        (self.counter_dir / "sitecustomize.py").write_text(COUNTER)
        self.count_file = root / "decompressors"
        self.env = {**child_env(endpoint, root), "PYTHONPATH": f"{package_dir}:{self.counter_dir}",
                    "ZIP_RANDOM_COUNT": str(self.count_file)}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-P", "-m", "s3datafs", *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300,
                              check=False)

    def made(self) -> int:
        try:
            return int(self.count_file.read_text() or 0)
        except FileNotFoundError:
            return 0

    def run(self, key: str, cache: str, what: str, job) -> dict:
        """Mount ``key`` on cache dir ``cache``, run ``job(member_path)``, unmount (finally)."""
        mountpoint = self.root / "mnt"
        mountpoint.mkdir(exist_ok=True)
        self.count_file.write_text("0")
        env_cache = str(self.root / cache)
        self.env["S3DATAFS_CACHE_DIR"] = env_cache
        mounted = self.cli("mount", f"s3://{BUCKET}/{key}", str(mountpoint))
        if mounted.returncode != 0:
            raise RuntimeError(f"{self.name}: mount failed: {mounted.stderr}")
        try:
            pid = self.daemon_pid(mountpoint)
            member = mountpoint / "member.bin"
            cpu = cpu_seconds(pid)
            started = time.perf_counter()
            job(member)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(pid) - cpu
            stats = json.loads(os.getxattr(mountpoint, "user.s3datafs.stats"))
        finally:
            if self.cli("unmount", str(mountpoint)).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        return {"contender": self.name, "what": what, "seconds": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "decompressions": stats.get("decompressions", self.made()),
                "gets": stats.get("s3_requests", 0),
                "get_mib": round(stats.get("s3_bytes", 0) / MiB, 1)}

    def prefetch(self, key: str, cache: str) -> dict:
        """``s3datafs prefetch`` of ``key`` into cache dir ``cache``: its wall and CPU time."""
        self.env["S3DATAFS_CACHE_DIR"] = str(self.root / cache)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = self.cli("prefetch", f"s3://{BUCKET}/{key}")
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: prefetch failed: {done.stderr}")
        return {"contender": self.name, "what": "prefetch", "seconds": round(wall, 2),
                "cpu_s": round(after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, 2),
                "printed": done.stdout.strip().split(" in ")[-1]}

    def daemon_pid(self, mountpoint: Path) -> int:
        """The mount's daemon, from ``s3datafs status --json`` (0: not found)."""
        rows = json.loads(self.cli("status", "--json").stdout or "[]")
        return next((int(row.get("pid") or 0) for row in rows
                     if row.get("mountpoint") == str(mountpoint)), 0)


def random_reads(data: bytes, offsets: list[int], length: int):
    def job(member: Path) -> None:
        with open(member, "rb", buffering=0) as handle:
            for offset in offsets:
                if os.pread(handle.fileno(), length, offset) != data[offset: offset + length]:
                    raise AssertionError(f"wrong bytes at {offset}")
    return job


def sequential(data: bytes):
    def job(member: Path) -> None:
        with open(member, "rb", buffering=0) as handle:
            got = b"".join(iter(lambda: handle.read(MiB), b""))
        if got != data:
            raise AssertionError("wrong bytes reading whole")
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=40)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--read-kib", type=int, default=64, help="bytes per random read, KiB")
    parser.add_argument("--methods", default="bzip2,lzma")
    parser.add_argument("--baseline", type=Path, help="another s3datafs tree to compare with")
    parser.add_argument("--sequential-repeats", type=int, default=3)
    parser.add_argument("--phases", default="random,remount,sequential")
    parser.add_argument("--prefetch", action="store_true",
                        help="s3datafs prefetch the random phase's cache first")
    parser.add_argument("--baseline-remount", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/zip-random"))
    parser.add_argument("--port", type=int, default=18610)
    args = parser.parse_args()
    size = int(args.size_mib * MiB)
    args.work.mkdir(parents=True, exist_ok=True)
    contenders = [("after", ROOT)] + ([("before", args.baseline)] if args.baseline else [])
    rng = random.Random(11)
    length = args.read_kib * 1024
    offsets = [rng.randrange(64 * 1024, size - 64 * 1024) for _ in range(args.reads)]
    results = []
    with S3Server(port=args.port, env={"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(1 << 30)}) as server:
        client = s3_client(server.endpoint)
        client.create_bucket(Bucket=BUCKET)
        for method in args.methods.split(","):
            path, data = archive(args.work, method, size)
            key = path.name
            client.upload_file(str(path), BUCKET, key)
            print(f"{method}: member of {size / MiB:.0f} MiB, {path.stat().st_size / MiB:.1f} MiB "
                  "zipped", flush=True)
            for name, package in contenders:
                root = args.work / f"{name}-{method}"
                shutil.rmtree(root, ignore_errors=True)  # cold: no cache of an earlier run
                mounts = Mounts(name, package, root, server.endpoint)
                runs = [("random", "cache-1", random_reads(data, offsets, length)),
                        ("remount", "cache-1", random_reads(data, offsets, length))]
                runs += [("sequential", f"cache-{2 + n}", sequential(data))
                         for n in range(args.sequential_repeats)]
                if name == "before" and not args.baseline_remount:
                    runs.pop(1)
                runs = [run for run in runs if run[0] in args.phases.split(",")]
                if args.prefetch and "random" in args.phases.split(","):
                    result = {"method": method, **mounts.prefetch(key, "cache-1")}
                    results.append(result)
                    print(json.dumps(result), flush=True)
                for what, cache, job in runs:
                    result = {"method": method, **mounts.run(key, cache, what, job)}
                    results.append(result)
                    print(json.dumps(result), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
