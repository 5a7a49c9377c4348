"""What N datasets of one ``mount-all`` cost in memory: the daemons' RSS, PSS and USS.

One ``s3datafs mount-all`` mounts N small prefixes (a few 4 KiB files each) from the local S3
server it starts itself; each mount then serves one read (a file read whole), and the daemons'
``/proc/PID/smaps_rollup`` is summed once the command has exited:

- RSS counts every page a daemon maps, shared or not: N daemons' RSS overstates what they cost.
- PSS divides each shared page among the processes that map it: the sum is what the daemons
  really take from the machine (the command has exited, so only the daemons share).
- USS (``Private_Clean`` + ``Private_Dirty``) is what one daemon alone holds: what stopping it
  would free. USS per daemon is the price of one more dataset.

The daemons are forks of the command: what it loaded before forking is shared copy-on-write
until a daemon writes to it (a reference count, a collection of the garbage collector). Also
printed: the command's wall time and CPU (its own, from ``wait4``), and the daemons' CPU up to
the measurement (``/proc/PID/stat``)::

    python -m bench.mount_all_memory [--counts 1,5,20] [--repeats 3] [--baseline DIR]

``--baseline DIR`` adds the contender ``base``: the same command with ``PYTHONPATH=DIR`` (e.g. a
``git worktree add DIR <commit>``), run alternately with this tree's, for a before/after in one
run. Prints one line per run and a table of medians. Run as root (it mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import peers
from .env import BUCKET, ROOT, Backend, child_env, cpu_seconds, machine, s3_client

FILES_PER_DATASET = 3
FILE_SIZE = 4096
SETTLE_SECONDS = 0.5  # after the reads: the daemons' cache writes and bookkeeping end
KiB = 1024
MiB = 1 << 20


@dataclass(frozen=True)
class Contender:
    """``python -m s3datafs`` from this tree, or (``path`` set) from another directory."""

    name: str
    path: Path | None = None

    def command(self) -> list[str]:
        # -P: with PYTHONPATH, no current directory before it (which may hold another s3datafs)
        return [sys.executable, *(["-P"] if self.path else []), "-m", "s3datafs"]

    def env(self, endpoint: str, root: Path) -> dict[str, str]:
        env = child_env(endpoint, root)
        if self.path is not None:
            env["PYTHONPATH"] = str(self.path)
        return env


@dataclass(frozen=True)
class Run:
    contender: str
    count: int
    wall: float  # the mount-all command, start to exit
    command_cpu: float  # its own CPU seconds (user + system)
    daemons_cpu: float  # the daemons' CPU seconds up to the measurement
    rss: int  # bytes, summed over the daemons
    pss: int
    uss: int

    def line(self) -> str:
        return (f"{self.contender:>9} N={self.count:<3} wall {self.wall:.2f} s, command CPU "
                f"{self.command_cpu:.2f} s, daemons CPU {self.daemons_cpu:.2f} s; RSS "
                f"{self.rss / MiB:.0f} MiB, PSS {self.pss / MiB:.0f} MiB, USS "
                f"{self.uss / MiB:.0f} MiB ({self.uss / self.count / MiB:.1f} per daemon)")


def upload(endpoint: str, count: int) -> None:
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    for dataset in range(count):
        for number in range(FILES_PER_DATASET):
            client.put_object(Bucket=BUCKET, Key=f"{_name(dataset)}/f{number}.bin",
                              Body=os.urandom(FILE_SIZE))


def _name(dataset: int) -> str:
    return f"ds{dataset:03d}"


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of ``/proc/PID/smaps_rollup``, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value, *_unit = line.split()
        fields[key.rstrip(":")] = int(value) * KiB
    return fields


def one_run(contender: Contender, endpoint: str, count: int, root: Path) -> Run:
    """Mount ``count`` datasets with one mount-all, read a file of each, measure, unmount."""
    env = contender.env(endpoint, root)
    data = root / "data"
    spec = root / "datasets.json"
    spec.write_text(json.dumps([{"uri": f"s3://{BUCKET}/{_name(n)}/"} for n in range(count)]))
    mountpoints = [data / _name(n) for n in range(count)]
    pids: list[int] = []
    try:
        with open(root / "mount-all.out", "wb") as output:
            started = time.perf_counter()
            command = subprocess.Popen([*contender.command(), "mount-all", str(spec)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=output)
            _pid, status, usage = os.wait4(command.pid, 0)
            wall = time.perf_counter() - started
            command.returncode = os.waitstatus_to_exitcode(status)
        if command.returncode != 0:
            raise RuntimeError(f"mount-all failed: {(root / 'mount-all.out').read_text()}")
        rows = json.loads(peers._run([*contender.command(), "status", "--json"], env=env).stdout)
        pid_of = {row["mountpoint"]: row["pid"] for row in rows}  # other mounts are listed too
        pids = [int(pid_of[str(mountpoint)]) for mountpoint in mountpoints]
        for mountpoint in mountpoints:
            (mountpoint / "f0.bin").read_bytes()
        time.sleep(SETTLE_SECONDS)
        rollups = [smaps_rollup(pid) for pid in pids]
        return Run(
            contender=contender.name,
            count=count,
            wall=wall,
            command_cpu=usage.ru_utime + usage.ru_stime,
            daemons_cpu=sum(cpu_seconds(pid) for pid in pids),
            rss=sum(rollup["Rss"] for rollup in rollups),
            pss=sum(rollup["Pss"] for rollup in rollups),
            uss=sum(rollup["Private_Clean"] + rollup["Private_Dirty"] for rollup in rollups),
        )
    finally:
        for mountpoint in mountpoints:
            if peers.is_mounted(mountpoint):
                peers._run([*contender.command(), "unmount", str(mountpoint)], env=env)
        for mountpoint, pid in zip(mountpoints, pids or [0] * count, strict=True):
            peers.force_unmount(mountpoint, pid=pid)
        _wait_gone(pids)


def _wait_gone(pids: list[int], timeout: float = peers.UNMOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def table(runs: list[Run]) -> str:
    """Medians per contender and dataset count."""
    lines = ["| contender | N | wall s | command CPU s | daemons CPU s | RSS MiB | PSS MiB "
             "| USS MiB | USS/daemon MiB | PSS/daemon MiB | runs |", "|" + "---|" * 11]
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.contender, run.count), []).append(run)
    for (name, count), group in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):

        def median(field: str, group: list[Run] = group) -> float:
            return statistics.median(getattr(run, field) for run in group)

        lines.append(
            f"| {name} | {count} | {median('wall'):.2f} | {median('command_cpu'):.2f} "
            f"| {median('daemons_cpu'):.2f} | {median('rss') / MiB:.0f} "
            f"| {median('pss') / MiB:.0f} | {median('uss') / MiB:.0f} "
            f"| {median('uss') / count / MiB:.1f} | {median('pss') / count / MiB:.1f} "
            f"| {len(group)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,5,20", help="datasets per mount-all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="also run s3datafs from this directory")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    counts = [int(count) for count in args.counts.split(",") if count]
    if os.geteuid() != 0:
        raise SystemExit("mount_all_memory: run as root (it mounts)")
    contenders = [Contender("worktree")]
    if args.baseline is not None:
        contenders.insert(0, Contender("base", args.baseline.resolve()))
    for contender in contenders:
        peers.compile_package((contender.path or ROOT) / "s3datafs")
    print(json.dumps(machine()), flush=True)
    runs = []
    with Backend() as backend, tempfile.TemporaryDirectory(prefix="s3datafs-mem-",
                                                           dir=args.workdir) as scratch:
        upload(backend.endpoint, max(counts))
        for repeat in range(args.repeats):
            for count in counts:
                for contender in contenders:
                    root = Path(scratch) / f"{contender.name}-{count}-{repeat}"
                    root.mkdir()
                    runs.append(one_run(contender, backend.endpoint, count, root))
                    print(runs[-1].line(), flush=True)
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
