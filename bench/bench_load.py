"""Load: many concurrent readers through one mount, every byte checked, the daemon watched.

The workload of issue 6: ``readers`` threads each read whole small files picked at random from
``files`` of them, while ``big_readers`` threads read random ranges (4 KiB to 4 MiB) of one big
file; for ``duration`` seconds. Every read is compared with the reference bytes. Before each read
the file's kernel pages are dropped (``posix_fadvise(DONTNEED)``), so every read reaches the
daemon (its memory cache, its disk cache, or S3) instead of the page cache.

What is reported (``LoadReport``): reads, bytes, errors and wrong reads (both must be zero),
throughput, and the daemon's RSS, open file descriptors and threads, sampled every second:
*before* (mounted, idle), *warm* (end of a warm-up phase, connection pools and worker threads
at their working size), *after* the measured phase, and *settled* (after the workers idled out).
No leak means: after ~ warm (nothing grows with the number of requests), and settled ~ before.

The objects' bytes are pseudo-random per key (``random.Random(key)``), so a block served at the
wrong offset or for the wrong file cannot go unnoticed, and are uploaded with PutObject.

``tests/test_load.py`` runs a CI-sized version through the test fixtures; run the full one as::

    python -m bench.bench_load --files 10000 --duration 300 [--append-results bench/RESULTS.md]

(it starts its own S3 server and mount under a temp dir, and always unmounts).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.env import child_env, machine, status_kib  # noqa: E402
from devtools.s3server import S3Server  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
PREFIX = "load/"
BIG = "big.bin"


# -- the dataset -----------------------------------------------------------------------------------


def small_names(count: int) -> list[str]:
    """Relative paths of the small files: 100 per directory."""
    return [f"d{i // 100:03d}/f{i:05d}.bin" for i in range(count)]


def small_size(name: str) -> int:
    """1 KiB to 256 KiB, skewed small (as image datasets are), fixed per name."""
    return int(1024 * 256 ** random.Random(f"size:{name}").random())


def reference(name: str, size: int) -> bytes:
    """The bytes of ``name``: pseudo-random, different for every name (16 MiB per generator)."""
    piece = 16 * MiB
    return b"".join(
        random.Random(f"bytes:{name}:{start // piece}").randbytes(min(piece, size - start))
        for start in range(0, size, piece)
    )


def upload(client: Any, bucket: str, count: int, big_size: int, workers: int = 16) -> bytes:
    """Create the bucket and its objects; returns the big file's bytes (the readers need them)."""
    client.create_bucket(Bucket=bucket)

    def put(name: str) -> None:
        body = reference(name, small_size(name))
        client.put_object(Bucket=bucket, Key=PREFIX + name, Body=body)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, small_names(count)))
    big = reference(BIG, big_size)
    client.put_object(Bucket=bucket, Key=PREFIX + BIG, Body=big)
    return big


# -- the daemon ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What the daemon holds at one moment."""

    rss_mib: float
    fds: int
    threads: int

    @staticmethod
    def of(pid: int) -> Usage:
        return Usage(
            rss_mib=round(status_kib(pid, "VmRSS") / 1024, 1),
            fds=len(os.listdir(f"/proc/{pid}/fd")),
            threads=len(os.listdir(f"/proc/{pid}/task")),
        )


class Sampler:
    """Samples ``Usage`` of ``pid`` every ``interval`` seconds in a thread; keeps the maxima."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[Usage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.samples.append(Usage.of(self.pid))

    @property
    def peak(self) -> Usage:
        return Usage(
            rss_mib=max((s.rss_mib for s in self.samples), default=0.0),
            fds=max((s.fds for s in self.samples), default=0),
            threads=max((s.threads for s in self.samples), default=0),
        )


def settle(pid: int, target: Usage, timeout: float) -> Usage:
    """The daemon's usage once idle: trio's worker threads exit after 10 s without work."""
    deadline = time.monotonic() + timeout
    usage = Usage.of(pid)
    while usage.threads > target.threads and time.monotonic() < deadline:
        time.sleep(0.5)
        usage = Usage.of(pid)
    return usage


# -- the workload ----------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one phase, shared by the reader threads (under ``lock``)."""

    reads: int = 0
    bytes: int = 0
    small_reads: int = 0
    big_reads: int = 0
    errors: int = 0
    wrong: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, size: int, problem: str | None = None, wrong: bool = False) -> None:
        with self.lock:
            if problem is not None:
                self.errors += not wrong
                self.wrong += wrong
                if len(self.problems) < 20:
                    self.problems.append(problem)
                return
            self.reads += 1
            self.bytes += size
            if kind == "small":
                self.small_reads += 1
            else:
                self.big_reads += 1


def read_through(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset``, from the daemon (the file's pages are dropped first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        parts, position, end = [], offset, offset + size
        while position < end:
            chunk = os.pread(fd, min(4 * MiB, end - position), position)
            if not chunk:
                break
            parts.append(chunk)
            position += len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def run_phase(
    mountpoint: Path,
    names: list[str],
    big: bytes,
    *,
    duration: float,
    readers: int,
    big_readers: int,
    seed: int,
) -> Tally:
    """Run the readers for ``duration`` seconds; every read is checked."""
    tally = Tally()
    stop = time.monotonic() + duration

    def small_reader(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < stop:
            name = rng.choice(names)
            expected = reference(name, small_size(name))
            read = functools.partial(read_through, mountpoint / name, 0, 1 << 30)
            check(tally, "small", name, read, expected)

    def big_reader(index: int) -> None:
        rng = random.Random(seed * 1000 + 500 + index)
        while time.monotonic() < stop:
            size = int(4 * KiB * 1024 ** rng.random())  # 4 KiB .. 4 MiB, log-uniform
            offset = rng.randrange(0, max(1, len(big) - size))
            read = functools.partial(read_through, mountpoint / BIG, offset, size)
            check(tally, "big", f"{BIG}@{offset}+{size}", read, big[offset : offset + size])

    threads = [threading.Thread(target=small_reader, args=(i,)) for i in range(readers)]
    threads += [threading.Thread(target=big_reader, args=(i,)) for i in range(big_readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def check(tally: Tally, kind: str, what: str, read: Callable[[], bytes], expected: bytes) -> None:
    try:
        got = read()
    except OSError as exc:
        tally.add(kind, 0, f"{what}: {exc}")
        return
    if got != expected:
        tally.add(
            kind, 0, f"{what}: wrong bytes ({len(got)} read, {len(expected)} expected)", wrong=True
        )
        return
    tally.add(kind, len(got))


@dataclass
class LoadReport:
    files: int
    big_mib: int
    readers: int
    big_readers: int
    warmup_s: float
    duration_s: float
    reads: int
    small_reads: int
    big_reads: int
    mib: float
    mib_per_s: float
    reads_per_s: float
    errors: int
    wrong: int
    problems: list[str]
    before: Usage
    warm: Usage
    after: Usage
    peak: Usage
    settled: Usage | None
    midway: Usage | None = None  # the 1 s sample halfway through the measured phase

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_load(
    mountpoint: Path,
    pid: int,
    names: list[str],
    big: bytes,
    *,
    warmup: float,
    duration: float,
    readers: int,
    big_readers: int,
    settle_timeout: float = 0.0,
) -> LoadReport:
    """Warm up, measure, and (optionally) wait for the daemon to idle; see the module docstring."""
    before = Usage.of(pid)
    with Sampler(pid) as sampler:
        warm_tally = run_phase(
            mountpoint,
            names,
            big,
            duration=warmup,
            readers=readers,
            big_readers=big_readers,
            seed=1,
        )
        warm, first_measured = Usage.of(pid), len(sampler.samples)
        started = time.monotonic()
        tally = run_phase(
            mountpoint,
            names,
            big,
            duration=duration,
            readers=readers,
            big_readers=big_readers,
            seed=2,
        )
        elapsed = time.monotonic() - started
        after, measured = Usage.of(pid), sampler.samples[first_measured:]
    midway = measured[len(measured) // 2] if measured else None
    settled = settle(pid, before, settle_timeout) if settle_timeout > 0 else None
    return LoadReport(
        files=len(names),
        big_mib=len(big) // MiB,
        readers=readers,
        big_readers=big_readers,
        warmup_s=warmup,
        duration_s=round(elapsed, 1),
        reads=tally.reads,
        small_reads=tally.small_reads,
        big_reads=tally.big_reads,
        mib=round(tally.bytes / MiB, 1),
        mib_per_s=round(tally.bytes / MiB / elapsed, 1),
        reads_per_s=round(tally.reads / elapsed, 1),
        errors=tally.errors + warm_tally.errors,
        wrong=tally.wrong + warm_tally.wrong,
        problems=warm_tally.problems + tally.problems,
        before=before,
        warm=warm,
        after=after,
        peak=sampler.peak,
        settled=settled,
        midway=midway,
    )


# -- the full benchmark ----------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(
    endpoint: str, root: Path, bucket: str, options: list[str]
) -> Iterator[tuple[Path, int]]:
    """``s3datafs mount`` of the load prefix under ``root``; always unmounted."""
    env = child_env(endpoint, root)
    mountpoint = root / "mnt"
    command = [sys.executable, "-m", "s3datafs"]
    result = subprocess.run(
        [*command, "mount", f"s3://{bucket}/{PREFIX}", str(mountpoint), *options],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"mount failed: {result.stderr.strip()}")
    try:
        rows = json.loads(
            subprocess.run(
                [*command, "status", "--json"], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
        pid = next(row["pid"] for row in rows if row["mountpoint"] == str(mountpoint))
        yield mountpoint, pid
    finally:
        done = subprocess.run([*command, "unmount", str(mountpoint)], env=env, check=False)
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


MOUNT_OPTIONS = ["--memory-cache-size", "32M"]  # small: the disk cache and S3 get their share


def markdown(report: LoadReport, command: str, setup_s: float) -> str:
    info = machine()
    r = report
    rows = [
        ("before (mounted, idle)", r.before),
        ("warm (end of warm-up)", r.warm),
        *([("halfway through the measured phase", r.midway)] if r.midway else []),
        ("after the measured phase", r.after),
        ("peak (1 s samples)", r.peak),
    ]
    if r.settled is not None:
        rows.append(("settled (workers idle)", r.settled))
    lines = [
        "## Load: concurrent readers, every byte checked (issue 6)",
        "",
        f"`{command}`  ",
        f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Python {info['python']}; S3 = local moto server (devtools/s3server.py) on 127.0.0.1, "
        "no injected latency. Mount options: " + " ".join(MOUNT_OPTIONS) + ".",
        "",
        f"- Dataset: {r.files} files of 1-256 KiB (pseudo-random bytes, PutObject; setup "
        f"{setup_s:.0f} s) + one {r.big_mib} MiB file.",
        f"- Readers: {r.readers} threads reading whole random small files + {r.big_readers} "
        f"threads reading random 4 KiB-4 MiB ranges of the big file; page cache dropped per "
        f"read (every read reaches the daemon); {r.warmup_s:.0f} s warm-up, then "
        f"{r.duration_s:.0f} s measured.",
        f"- Result: **{r.errors} errors, {r.wrong} wrong reads** out of {r.reads} reads "
        f"({r.small_reads} small, {r.big_reads} big), {r.mib:.0f} MiB: "
        f"{r.reads_per_s:.0f} reads/s, {r.mib_per_s:.1f} MiB/s.",
        "",
        "| daemon | RSS MiB | open fds | threads |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {u.rss_mib:.0f} | {u.fds} | {u.threads} |" for label, u in rows]
    lines += ["", "Reading: " + reading(r.warm, r.midway, r.after, r.settled), ""]
    return "\n".join(lines)


RSS_SLACK_MIB = 32  # RSS moving less than this between two samples reads as flat


def reading(warm: Usage, midway: Usage | None, after: Usage, settled: Usage | None) -> str:
    """What the daemon's figures say, computed from them: does anything grow with requests?

    A leak grows with the number of requests, so it grows in the second half of the measured
    phase too (``midway`` -> ``after``); a pool or a bounded buffer reaches its size and stays
    there, even if that takes longer than the warm-up.
    """
    half = midway or warm
    rss_late = after.rss_mib - half.rss_mib
    text = (
        "from the end of the warm-up to the end of the measured phase, open fds "
        f"{warm.fds} -> {after.fds}, threads {warm.threads} -> {after.threads}, RSS "
        f"{warm.rss_mib:g} -> {after.rss_mib:g} MiB ({after.rss_mib - warm.rss_mib:+.0f}"
        + (f", {rss_late:+.0f} of it in the second half)" if midway else ")")
    )
    grew = [
        name
        for name, grown in (
            ("open fds", after.fds > half.fds),
            ("RSS", rss_late >= RSS_SLACK_MIB),
        )
        if grown
    ]
    when = "the second half of the measured phase" if midway else "the measured phase"
    if grew:
        text += f"; {' and '.join(grew)} grew in {when}: look there for a leak"
    else:
        text += f"; nothing grew in {when}, so nothing grows with the number of requests"
    if settled is not None:
        text += (
            f". Once the workers idled out: {settled.threads} threads, {settled.fds} open fds, "
            f"{settled.rss_mib:g} MiB RSS"
        )
    return text + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--readers", type=int, default=64)
    parser.add_argument("--big-readers", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for idle")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--append-results", type=Path, help="append a section to this markdown")
    args = parser.parse_args(argv)
    command = "python -m bench.bench_load " + " ".join(argv if argv is not None else sys.argv[1:])
    with (
        tempfile.TemporaryDirectory(prefix="s3datafs-load-") as scratch,
        S3Server(env={"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}) as server,
    ):
        started = time.monotonic()
        big = upload(server.client(), "load-bench", args.files, args.big_mib * MiB)
        setup_s = time.monotonic() - started
        print(f"uploaded {args.files} files + {args.big_mib} MiB in {setup_s:.0f} s", flush=True)
        with mounted(server.endpoint, Path(scratch), "load-bench", MOUNT_OPTIONS) as (mnt, pid):
            report = run_load(
                mnt,
                pid,
                small_names(args.files),
                big,
                warmup=args.warmup,
                duration=args.duration,
                readers=args.readers,
                big_readers=args.big_readers,
                settle_timeout=args.settle,
            )
    print(json.dumps(report.as_dict(), indent=2))
    text = markdown(report, command, setup_s)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if args.append_results:
        with open(args.append_results, "a", encoding="utf-8") as results:
            results.write("\n" + text)
    return 0 if report.errors == 0 and report.wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
