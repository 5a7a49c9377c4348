"""Mount command start to first 4 KiB read, repeated: s3datafs against the peers (issue 4).

The "first read" session of ``bench.bench_reads`` on its own, repeated so that a median means
something on a shared machine::

    python -m bench.first_read [--profiles 0ms,20ms] [--contenders s3datafs,s3fs,rclone-off]
                               [--repeats 5] [--big-mib 256] [--ours-arg=--block-size=4M]
                               [--baseline DIR]

``--baseline DIR`` adds the contender ``s3datafs-base``: the same command with ``PYTHONPATH=DIR``,
where DIR holds another ``s3datafs`` package (e.g. ``git worktree add DIR HEAD``), for an A/B
comparison in the same run.

Each repetition runs every contender once, back to back (A/B/C, A/B/C, ...), each on a fresh
mount with a fresh cache directory after dropping the page cache, exactly as
``ProfileRun.first_read`` does: the figure is the mount command's (or the peer's mount-table
wait's) wall time plus opening the big file and reading its first 4 KiB. Prints one line per run
and a median/min/max table; run as root.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bench_reads, peers
from .bench_reads import ALL_CONTENDERS, PROFILES, ProfileRun, Settings, log
from .env import Backend, Dataset, child_env


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        dataset=Dataset(big_size=args.big_mib << 20, small_count=1, small_dirs=1),
        profiles=tuple(p for p in args.profiles.split(",") if p),
        contenders=tuple(c for c in args.contenders.split(",") if c),
        seq_cap=10.0,
        files_cap=10.0,
        random_cap=3.0,
        random_ops=10,
        scattered_fraction=0.01,
        ours_args=tuple(args.ours_arg),
        zero_via_proxy=False,
    )


@dataclass
class Baseline(peers.Ours):
    """``s3datafs`` imported from another directory (``PYTHONPATH``)."""

    path: Path = Path()
    name: str = "s3datafs-base"

    def package(self) -> Path:
        return self.path / "s3datafs"

    def _cli(self, endpoint: str, *args: str, timeout: float = peers.MOUNT_TIMEOUT) -> Any:
        cmd = [sys.executable, "-P", "-m", "s3datafs", *args]  # -P: no cwd before PYTHONPATH
        env = {**child_env(endpoint, self.root), "PYTHONPATH": str(self.path)}
        return peers._run(cmd, timeout=timeout, env=env)


def run(
    settings: Settings, repeats: int, work: Path, baseline: Path | None
) -> dict[tuple[str, str], list[float]]:
    times: dict[tuple[str, str], list[float]] = {}
    with Backend() as backend:
        backend.upload(settings.dataset, log=log)
        for profile in settings.profiles:
            with bench_reads.profile_endpoint(backend, profile, False) as endpoint:
                prun = ProfileRun(settings, backend, endpoint, profile, work / profile)
                every = bench_reads.contenders(settings, work / profile)
                if baseline is not None:
                    every.insert(0, Baseline(work / profile / "base", path=baseline))
                for _ in range(repeats):
                    for contender in every:
                        prun.first_read(contender)
                        fig = prun.rows["first_read"].figures[contender.name]
                        if fig.value is not None:
                            times.setdefault((profile, contender.name), []).append(fig.value)
    return times


def table(times: dict[tuple[str, str], list[float]]) -> str:
    lines = ["| profile | contender | median s | min s | max s | runs |", "|" + "---|" * 6]
    for (profile, name), values in times.items():
        lines.append(
            f"| {profile} | {name} | {statistics.median(values):.3f} | {min(values):.3f} "
            f"| {max(values):.3f} | {len(values)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", default="0ms,20ms", help=f"from {','.join(PROFILES)}")
    parser.add_argument("--contenders", default="s3datafs,s3fs,rclone-off",
                        help=f"from {','.join(ALL_CONTENDERS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--ours-arg", action="append", default=[], help="extra mount argument")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--baseline", type=Path, help="also run s3datafs from this directory")
    args = parser.parse_args(argv)
    settings = _settings(args)
    for name in settings.profiles:
        if name not in PROFILES:
            parser.error(f"unknown profile {name}")
    for name in settings.contenders:
        if name not in ALL_CONTENDERS:
            parser.error(f"unknown contender {name}")
    if os.geteuid() != 0:
        raise SystemExit("first_read: run as root (it mounts and drops the page cache)")
    signal.signal(signal.SIGTERM, bench_reads._terminate)
    work = Path(tempfile.mkdtemp(prefix="s3datafs-first-", dir=args.workdir))
    try:
        times = run(settings, args.repeats, work, args.baseline)
    finally:
        bench_reads.remove_workdir(work)
    print(table(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())

