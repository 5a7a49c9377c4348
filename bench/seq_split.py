"""Who spends the CPU of a cold sequential read: S3 server, daemon (user/system), reader.

``python -m bench.seq_split [--big-mib 1024] [--profile 0ms|20ms|s3like] [--trials 3]
[--variant "no-cache=--no-cache"] ...`` uploads one big file, reads it once with the boto3
parallel-download ceiling, then with ``s3datafs`` cold (fresh cache directory, page cache
dropped, 1 MiB reads) under each variant: a name and the extra mount arguments, ``default``
(no extra arguments) always first. Variants take turns (A, B, A, B, ...) so drift on a shared
machine hits them alike. For each read it prints MB/s, wall seconds, CPU seconds of the S3
server process, of the daemon (user and system apart), of the reader (this process: the page
copies out of FUSE), the machine's busy CPU seconds (``/proc/stat``: the network proxy of a
latency profile counts there), and the daemon's own counters (GETs, bytes from S3).

It answers what ``profile_seq``'s flame graph cannot: whether the machine is saturated (busy
CPU near ``cores x wall``), or one process is the bottleneck (its CPU near ``wall``), or
nothing is (a pipeline stall: too few GETs in flight, readahead waiting for the disk cache).
A variant with ``--no-cache`` shows what writing the disk cache costs. Needs root (it drops
the page cache and mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from . import peers, workloads
from .bench_reads import PROFILES, log, profile_endpoint
from .env import CLK_TCK, Backend, Dataset, cpu_seconds, cpu_times, drop_caches, filesystem_of

STATS_XATTR = "user.s3datafs.stats"


class Clocks(NamedTuple):
    """CPU seconds so far: of the S3 server, the machine (busy), this reader, the daemon."""

    server: float
    machine: float
    reader: float
    daemon_user: float = 0.0
    daemon_system: float = 0.0

    @classmethod
    def now(cls, server_pid: int, daemon_pid: int = 0) -> Clocks:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user, system = cpu_times(daemon_pid) if daemon_pid else (0.0, 0.0)
        return cls(cpu_seconds(server_pid), machine_busy(), usage.ru_utime + usage.ru_stime,
                   user, system)

    def since(self, earlier: Clocks) -> Clocks:
        return Clocks(*(now - then for now, then in zip(self, earlier, strict=True)))


@dataclass(frozen=True)
class Split:
    """One cold read: its rate and wall time, the CPU it cost, the daemon's counters (if any)."""

    mbps: float
    wall: float
    cpu: Clocks
    counters: dict[str, int] | None = None  # None: the boto3 ceiling, no daemon

    def line(self, label: str) -> str:
        cpu, daemon, fetched = self.cpu, "", ""
        if self.counters is not None:
            daemon = f"daemon {cpu.daemon_user:4.2f}u+{cpu.daemon_system:4.2f}s  "
            gets, fetched_mb = self.counters["s3_requests"], self.counters["s3_bytes"] / 1e6
            fetched = f"  {gets} GETs, {fetched_mb:,.0f} MB"
        return (f"{label:<24} {self.mbps:6.0f} MB/s  wall {self.wall:5.2f}s  "
                f"server {cpu.server:4.2f}  {daemon}reader {cpu.reader:4.2f}  "
                f"machine busy {cpu.machine:4.2f}{fetched}")


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores; idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / CLK_TCK


def ceiling(backend: Backend, endpoint: str, key: str, size: int) -> Split:
    drop_caches()
    before = Clocks.now(backend.server.pid)
    wall = peers.parallel_download(endpoint, key)
    return Split(size / wall / 1e6, wall, Clocks.now(backend.server.pid).since(before))


def ours(backend: Backend, endpoint: str, dataset: Dataset, args: tuple[str, ...]) -> Split:
    with tempfile.TemporaryDirectory(prefix="s3datafs-seq-split-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        contender = peers.Ours(work / "root", args)
        with contender.mount(endpoint, dataset.big_prefix, work / "mnt", work / "cache") as mount:
            drop_caches()
            before = Clocks.now(backend.server.pid, mount.pid)
            done = workloads.sequential(mount.path / dataset.big_name, time.monotonic() + 120)
            cpu = Clocks.now(backend.server.pid, mount.pid).since(before)
            counters = json.loads(os.getxattr(mount.path, STATS_XATTR))
            return Split(done.mbps(), done.seconds, cpu, counters)


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    name, _, args = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=ARGS, not {text!r}")
    return name, tuple(shlex.split(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="0ms")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        metavar="NAME=ARGS", help='extra mount arguments, e.g. "nc=--no-cache"')
    args = parser.parse_args(argv)
    variants = [("default", ()), *args.variant]
    dataset = Dataset(big_size=args.big_mib << 20, small_count=1, small_dirs=1)
    print(f"cache filesystem: {filesystem_of(Path('/var/tmp'))}; profile {args.profile}; "
          f"{os.cpu_count()} cores")
    results: dict[str, list[Split]] = {name: [] for name, _ in [("boto3", ()), *variants]}
    with Backend() as backend:
        backend.upload(dataset, log=log)
        with profile_endpoint(backend, args.profile, False) as endpoint:
            for trial in range(args.trials):
                results["boto3"].append(ceiling(backend, endpoint, dataset.big_key,
                                                dataset.big_size))
                print(results["boto3"][-1].line(f"boto3 #{trial + 1}"), flush=True)
                for name, extra in variants:
                    results[name].append(ours(backend, endpoint, dataset, extra))
                    print(results[name][-1].line(f"{name} #{trial + 1}"), flush=True)
    print("median MB/s: " + ", ".join(
        f"{name} {statistics.median(s.mbps for s in splits):.0f}"
        for name, splits in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
