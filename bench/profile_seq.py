"""Where our cold sequential read spends its time: py-spy on the s3datafs daemon.

``python -m bench.profile_seq [--big-mib 1024] [--profile 0ms|20ms|s3like]`` uploads one big file,
mounts it with ``s3datafs mount`` (fresh cache directory, page cache dropped), attaches
``py-spy record`` to the daemon (pid from ``s3datafs status --json``) and reads the file front to
back with 1 MiB reads, twice on fresh mounts: once recording a flame graph
(``bench/out/profile.svg``), once recording collapsed stacks (``bench/out/profile-raw.txt``) that
this script summarises: on-CPU samples per thread kind, the top functions by self time and by
inclusive time, and the daemon's CPU seconds against the wall time of the read (a ratio near 1.0
on this 2-core machine means the daemon is bound by one Python thread holding the GIL).

py-spy samples with ``--nonblocking`` (it does not pause the daemon, so the read is not slowed by
the profiler) and ``--threads`` (stacks are rooted at their thread). Needs root (ptrace).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from devtools.s3server import stop_process

from . import peers, workloads
from .bench_reads import PROFILES, log, profile_endpoint
from .env import Backend, Dataset, cpu_seconds, drop_caches

OUT = Path(__file__).resolve().parent / "out"
# Process shell and lifecycle frames (cli, daemon, commands, mount) wrap everything: not news.
SHELL = re.compile(r"s3datafs/(cli|__main__|daemon|mount)\.py|s3datafs/commands/")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy not found: pip install py-spy (or pip install -e '.[bench]')")
    return found


@contextlib.contextmanager
def spying(pid: int, output: Path, fmt: str = "raw") -> Iterator[None]:
    """py-spy (200 Hz, non-blocking, per thread) on ``pid`` while the block runs -> ``output``."""
    cmd = [py_spy(), "record", "--pid", str(pid), "--rate", "200", "--nonblocking"]
    cmd += ["--threads", "--format", fmt, "--output", str(output)]
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)  # let py-spy attach
        yield
    finally:
        stop_process(spy, signal.SIGINT, 60.0)  # SIGINT: py-spy writes its output, then ends


def profiled_read(
    endpoint: str, work: Path, dataset: Dataset, output: Path, fmt: str
) -> dict[str, float]:
    """Mount fresh, attach py-spy, read the big file cold; wall and CPU seconds of the read."""
    ours = peers.Ours(work / "ours")
    cache = work / f"cache-{fmt}"
    drop_caches()
    with (
        ours.mount(endpoint, dataset.big_prefix, work / "mnt", cache) as mount,
        spying(mount.pid, output, fmt),
    ):
        cpu0 = cpu_seconds(mount.pid)
        done = workloads.sequential(mount.path / dataset.big_name, time.monotonic() + 300)
        cpu = cpu_seconds(mount.pid) - cpu0
    shutil.rmtree(cache, ignore_errors=True)
    log(f"{fmt}: {done.mbps():.0f} MB/s, {done.seconds:.2f}s wall, daemon {cpu:.2f} cpu-s")
    return {"mbps": done.mbps(), "wall_s": done.seconds, "daemon_cpu_s": cpu}


def _split(frame: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame ``func (path/file.py:123)``."""
    match = FRAME.match(frame)
    return (match["func"], match["file"]) if match else (frame, "")


def _package(path: str) -> str:
    """``s3datafs/cache/disk.py`` -> ``s3datafs.cache``; ``socket.py`` -> ``socket``."""
    parts = Path(path).with_suffix("").parts
    if parts and parts[0] == "s3datafs":
        return ".".join(parts[:2]) if len(parts) > 2 else "s3datafs"
    return parts[0] if parts else "?"


def _table(title: str, counter: collections.Counter[str], total: int, top: int) -> list[str]:
    rows = [f"\n{title}\n", "| | share |", "|---|---:|"]
    return rows + [f"| `{k}` | {n / total:.1%} |" for k, n in counter.most_common(top)]


def summarise(raw: Path, top: int = 12) -> str:
    """Markdown summary of py-spy's collapsed stacks (see module docstring)."""
    threads: collections.Counter[str] = collections.Counter()
    leaf_package: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, (thread, *frames) = int(count), stack.split(";")
        total += n
        threads[re.sub(r"^thread \(\d+\): |\b\d+\b", "", thread).strip() or "?"] += n
        if not frames:
            continue
        func, path = _split(frames[-1])
        leaf_package[_package(path)] += n
        self_time[f"{func} ({Path(path).name})"] += n
        for func, path in {_split(f) for f in frames if "s3datafs/" in f and not SHELL.search(f)}:
            ours[f"{func} ({path})"] += n
    lines = [f"{total} on-CPU samples at 200 Hz (idle threads are not sampled)"]
    lines += _table("Samples by thread:", threads, total, 8)
    lines += _table("Where the CPU is (package of the innermost frame):", leaf_package, total, top)
    lines += _table(f"Top {top} functions by self time:", self_time, total, top)
    lines += _table(f"Top {top} s3datafs functions by inclusive time:", ours, total, top)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--profile", choices=list(PROFILES), default="0ms")
    parser.add_argument("--out-dir", type=Path, default=OUT)
    args = parser.parse_args(argv)
    dataset = Dataset(big_size=args.big_mib << 20, small_count=0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="s3datafs-profile-", dir="/var/tmp"))
    try:
        with Backend() as backend:
            backend.upload(dataset, log=log)
            with profile_endpoint(backend, args.profile, False) as endpoint:
                svg = profiled_read(
                    endpoint, work, dataset, args.out_dir / "profile.svg", "flamegraph"
                )
                raw_path = args.out_dir / "profile-raw.txt"
                stats = profiled_read(endpoint, work, dataset, raw_path, "raw")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (
        f"Cold sequential read of {args.big_mib} MiB, profile {args.profile}: "
        f"{stats['mbps']:.0f} MB/s, {stats['wall_s']:.2f} s wall, daemon "
        f"{stats['daemon_cpu_s']:.2f} CPU-s ({stats['daemon_cpu_s'] / stats['wall_s']:.2f} cores); "
        f"flame-graph run: {svg['mbps']:.0f} MB/s\n\n"
    )
    summary = header + summarise(raw_path)
    (args.out_dir / "profile-summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
