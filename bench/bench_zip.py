"""Zip benchmark of issue 7: a zip on S3 mounted by s3datafs vs download-and-extract and peers.

Run as root (it mounts, and drops the page cache with ``/proc/sys/vm/drop_caches``)::

    python -m bench.bench_zip            # 20,000 members, 1 GiB of member bytes, 0ms and 20ms
    python -m bench.bench_zip --quick    # 2,000 members, 100 MiB

One run builds the archive (``bench/zipdata.py``: deterministic, half stored random bytes, half
deflated text-like bytes ~2.3x, nested directories), starts one S3 server (``devtools/s3server.py``
via :class:`bench.env.Backend`) and uploads it once as ``data.zip`` (multipart). For each network
profile (``0ms`` direct; ``20ms`` first-byte latency through ``bench/netproxy.py``) the contenders:

- ``s3datafs``: ``s3datafs mount s3://BUCKET/data.zip MNT --cache-dir DIR`` (``--archive=auto``,
  the default: the members as a tree). Optional ``s3datafs-file+zipfile``: ``--archive=file``
  (the zip as one file) and Python's zipfile over it.
- ``download+extract``: what a job platform does today: boto3 ``download_file`` (16 threads, 8 MiB
  parts) to local disk, ``zipfile.extractall``, then read the extracted files.
- ``rclone-off+zipfile``, ``rclone-full+zipfile``: ``rclone mount`` of the bucket
  (``--vfs-cache-mode off`` / ``full``) and Python's zipfile on ``MNT/data.zip``, one ``ZipFile``
  per reading thread (a shared one serialises every read under its lock).
- ``fuse-zip/rclone-full`` (Debian's fuse-zip over the rclone-full mount; optional
  ``fuse-zip/rclone-off``).

Sessions per mounting contender, each on a fresh mount with a fresh cache directory after dropping
the page cache: (1) cold: time to usable (mount command start -> it returns; for zipfile peers the
rclone mount plus ``ZipFile()``, which reads the index), then the first member read, then 1 % of
the members (seeded choice) read by 1 thread; s3datafs then unmounts, drops caches and remounts
with the same cache dir (S3 requests during that remount; re-read of the same 1 %); (2) the same
1 % by 8 threads; (3) every member by 8 threads, after listing the tree (``os.scandir`` walk +
stat, or the zip's own index for zipfile). Every byte read is checked against the sha256 of what
was written, and every listing against the member list: a mismatch aborts the run (exit 2).

Around every workload the server's counters are reset and read back (requests, GetObject bytes),
and the CPU seconds of the serving processes (``/proc``) and of this process (``getrusage``: the
zipfile peers inflate here, download+extract downloads and extracts here) are taken. Results:
markdown on stdout, ``bench/out/zip-*.json|md`` and ``bench/out/zip-latest.json|md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import peers, profile_seq
from .bench_reads import log, profile_endpoint, remove_workdir
from .env import (
    BUCKET,
    Backend,
    S3Counter,
    cpu_seconds,
    drop_caches,
    machine,
    s3_client,
    status_kib,
)
from .report import human_bytes
from .zipdata import MiB, Verifier, WrongData, ZipData, ZipSpec, build, sample

OUT = Path(__file__).resolve().parent / "out"
KEY = "data.zip"
PROFILES = ("0ms", "20ms")
OURS = "s3datafs"
BASELINE = "download+extract"
CONTENDERS = (
    OURS,
    BASELINE,
    "s3datafs-file+zipfile",
    "rclone-off+zipfile",
    "rclone-full+zipfile",
    "fuse-zip/rclone-full",
)
OPTIONAL = ("fuse-zip/rclone-off",)  # its mount reads the archive through rclone-off: minutes
MOUNT_TARGET_S = 2.0
PCT_TARGET_X = 20.0
ALL_TARGET_X = 1.5


@dataclass(frozen=True)
class Workload:
    key: str
    title: str


WORKLOADS = [
    Workload("ready", "time to usable: mount / index read (download+extract: both)"),
    Workload("first", "mount command start to first member read"),
    Workload("pct_1t", "read 1% of members, 1 thread"),
    Workload("pct_8t", "read 1% of members, 8 threads"),
    Workload("all_8t", "list + read all members, 8 threads"),
    Workload("remount", "remount with the same cache dir (caches dropped)"),
    Workload("reread", "re-read the 1% after that remount, 1 thread"),
]
BY_KEY = {w.key: w for w in WORKLOADS}


@dataclass
class Cell:
    """One contender's result for one workload (seconds; what S3 and the CPUs did meanwhile)."""

    seconds: float | None = None
    files: int = 0
    nbytes: int = 0  # member bytes delivered (and checked)
    s3_requests: int | None = None
    s3_bytes: int | None = None
    s3_ops: dict[str, int] = field(default_factory=dict)
    daemon_cpu_s: float | None = None  # FUSE process(es) serving the mount
    client_cpu_s: float | None = None  # this process (readers, zipfile, boto3, extract)
    rss_mib: float | None = None  # peak RSS (VmHWM) of the serving process(es)
    parts: dict[str, float] = field(default_factory=dict)  # seconds of the steps summed
    capped: bool = False  # stopped at the time cap: ``seconds`` extrapolated from what was done
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    spec: ZipSpec
    profiles: tuple[str, ...]
    contenders: tuple[str, ...]
    fraction: float
    pct_cap: float
    all_cap: float
    ours_args: tuple[str, ...]
    zip_cache: Path | None
    py_spy: bool = False  # profile the s3datafs daemon while it serves "all" (not for timing)


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- readers


class Reader(Protocol):
    def read(self, name: str) -> bytes:
        """The member's bytes (thread-safe)."""


class FilesReader:
    """Members as files below ``root`` (a mount, or the extracted tree)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, name: str) -> bytes:
        with open(self.root / name, "rb", buffering=0) as src:
            return src.readall()


class ZipReader:
    """Python's zipfile over a zip file; one ``ZipFile`` per thread (each parses the index)."""

    def __init__(self, path: Path, first: zipfile.ZipFile) -> None:
        self.path, self.local, self.lock = path, threading.local(), threading.Lock()
        self.local.archive = first
        self.opened = [first]

    def read(self, name: str) -> bytes:
        archive = getattr(self.local, "archive", None)
        if archive is None:
            archive = zipfile.ZipFile(self.path)
            self.local.archive = archive
            with self.lock:
                self.opened.append(archive)
        return archive.read(name)

    def close(self) -> None:
        for archive in self.opened:
            archive.close()


@dataclass(frozen=True)
class Read:
    files: int
    nbytes: int
    seconds: float
    capped: bool
    parts: dict[str, float] = field(default_factory=dict)
    expected_bytes: int = 0  # what the whole workload would have read (to extrapolate a cap)


def read_members(
    who: str,
    reader: Reader,
    names: list[str],
    threads: int,
    deadline: float,
    verifier: Verifier,
) -> Read:
    """Read ``names`` whole with ``threads`` threads (1: inline), checking every byte."""
    stop = threading.Event()

    def one(name: str) -> int:
        if stop.is_set() or time.monotonic() > deadline:
            return -1
        try:
            data = reader.read(name)
            verifier.check(who, name, data)
        except BaseException:
            stop.set()
            raise
        return len(data)

    started = time.perf_counter()
    if threads == 1:
        sizes = [one(name) for name in names]
    else:
        with ThreadPoolExecutor(threads) as pool:
            sizes = list(pool.map(one, names))
    done = [n for n in sizes if n >= 0]
    expected = sum(verifier.expected[n][0] for n in names)
    elapsed = time.perf_counter() - started
    return Read(len(done), sum(done), elapsed, len(done) < len(names), expected_bytes=expected)


def walk(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file below ``root`` (scandir + lstat)."""
    found: dict[str, int] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as entries:
            for entry in entries:
                path = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found[path] = entry.stat(follow_symlinks=False).st_size
    return found


# ---------------------------------------------------------------- mounting contenders


@dataclass
class Opened:
    reader: Reader
    root: Path | None  # the tree to list (None: the names come from the zip's index)
    pids: tuple[int, ...]
    ready_s: float


class Contender(Protocol):
    name: str
    remount: bool

    def open(self, run: ProfileRun, cache: Path) -> contextlib.AbstractContextManager[Opened]:
        """Mount (and open the index); always unmount on exit."""


@dataclass
class NativeZip:
    """``s3datafs mount s3://BUCKET/data.zip`` with the default ``--archive=auto``."""

    ours: peers.Ours
    name: str = OURS
    remount: bool = True

    @contextlib.contextmanager
    def open(self, run: ProfileRun, cache: Path) -> Iterator[Opened]:
        mountpoint = run.work / "mnt" / "s3datafs"
        with self.ours.mount(run.endpoint, KEY, mountpoint, cache) as mounted:
            try:
                yield Opened(
                    FilesReader(mountpoint), mountpoint, (mounted.pid,), mounted.mount_seconds
                )
            except FileNotFoundError as exc:
                seen = sorted(os.listdir(mountpoint))[:5]
                raise RuntimeError(f"{exc}; the mount shows {seen} (zip not expanded?)") from exc


@contextlib.contextmanager
def _rclone_zip(run: ProfileRun, mode: str, cache: Path) -> Iterator[tuple[Path, int, float]]:
    rclone = peers.Rclone(run.work / "rclone", mode)
    mountpoint = run.work / "mnt" / f"rclone-{mode}"
    with rclone.mount(run.endpoint, "", mountpoint, cache) as mounted:
        yield mountpoint / KEY, mounted.pid, mounted.mount_seconds


@contextlib.contextmanager
def _s3datafs_file(
    run: ProfileRun, ours: peers.Ours, cache: Path
) -> Iterator[tuple[Path, int, float]]:
    mountpoint = run.work / "mnt" / "s3datafs-file"
    with ours.mount(run.endpoint, KEY, mountpoint, cache) as mounted:
        entries = os.listdir(mountpoint)
        if len(entries) != 1:
            raise RuntimeError(f"--archive=file: expected one file, the mount shows {entries[:5]}")
        yield mountpoint / entries[0], mounted.pid, mounted.mount_seconds


@dataclass
class ZipOverMount:
    """Python's zipfile over ``data.zip`` as a file on some mount."""

    name: str
    base: Callable[[ProfileRun, Path], contextlib.AbstractContextManager[tuple[Path, int, float]]]
    remount: bool = False

    @contextlib.contextmanager
    def open(self, run: ProfileRun, cache: Path) -> Iterator[Opened]:
        with self.base(run, cache) as (path, pid, mount_s):
            started = time.perf_counter()
            archive = zipfile.ZipFile(path)
            index_s = time.perf_counter() - started
            reader = ZipReader(path, archive)
            try:
                listing = {i.filename: i.file_size for i in archive.infolist() if not i.is_dir()}
                run.verifier.check_listing(self.name, listing)
                yield Opened(reader, None, (pid,), mount_s + index_s)
            finally:
                reader.close()


@dataclass
class FuseZip:
    """Debian's ``fuse-zip -r`` on ``data.zip`` inside an rclone mount of the bucket."""

    mode: str
    name: str = ""
    remount: bool = False

    def __post_init__(self) -> None:
        self.name = self.name or f"fuse-zip/rclone-{self.mode}"

    @contextlib.contextmanager
    def open(self, run: ProfileRun, cache: Path) -> Iterator[Opened]:
        with _rclone_zip(run, self.mode, cache) as (path, rclone_pid, rclone_s):
            mountpoint = run.work / "mnt" / f"fuse-zip-{self.mode}"
            mountpoint.mkdir(parents=True, exist_ok=True)
            cmd = ["fuse-zip", "-r", "-f", str(path), str(mountpoint)]
            log_path = run.work / "fuse-zip" / f"{self.mode}.log"
            with peers._peer_process(cmd, mountpoint, log_path) as mounted:
                pids = (rclone_pid, mounted.pid)
                yield Opened(
                    FilesReader(mountpoint), mountpoint, pids, rclone_s + mounted.mount_seconds
                )


# ---------------------------------------------------------------- one profile


class ProfileRun:
    """Every contender's sessions against one endpoint (one network profile)."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        endpoint: str,
        profile: str,
        work: Path,
        data: ZipData,
    ) -> None:
        self.s, self.backend, self.endpoint, self.profile = settings, backend, endpoint, profile
        self.work, self.data, self.counter = work, data, S3Counter(backend)
        self.verifier = Verifier(data.members)
        self.names = [m.name for m in data.members]  # archive order
        self.chosen, self.first_name = sample(data, settings.fraction)
        self.cells: dict[str, dict[str, Cell]] = {w.key: {} for w in WORKLOADS}
        self.index_get_s: float | None = None
        self._serial = 0

    # ------------------------------------------------------------ plumbing

    def put(self, workload: str, name: str, cell: Cell) -> None:
        self.cells[workload][name] = cell
        log(f"  {self.profile:5} {name:22} {workload:8} {_brief(cell)}")

    def scratch(self, kind: str) -> Path:
        self._serial += 1
        path = self.work / f"{kind}-{self._serial}"
        path.mkdir(parents=True)
        return path

    def s3_now(self) -> tuple[int, int, dict[str, int]]:
        """The counters right now, without waiting for them to settle."""
        stats = self.backend.server.stats()
        ops = {op: n for op, n in stats["ops"].items() if n}
        return sum(ops.values()), stats["get_bytes"], ops

    def measure(self, pids: tuple[int, ...], run: Callable[[], Read]) -> Cell:
        """Run one workload between counter and CPU readings."""
        self.counter.reset()
        cpu0 = [cpu_seconds(pid) for pid in pids]
        client0 = _self_cpu()
        done = run()
        client = _self_cpu() - client0
        s3 = self.counter.read()
        seconds = done.seconds
        total = done.nbytes
        if done.capped and done.nbytes:
            seconds = done.seconds * done.expected_bytes / done.nbytes
        cell = Cell(
            seconds,
            files=done.files,
            nbytes=total,
            s3_requests=s3.requests,
            s3_bytes=s3.get_bytes,
            s3_ops=s3.ops,
            daemon_cpu_s=sum(cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True))
            if pids
            else None,
            client_cpu_s=client,
            parts=dict(done.parts),
            capped=done.capped,
        )
        return cell

    def deadline(self, cap: float) -> float:
        return time.monotonic() + cap

    def read(self, who: str, reader: Reader, names: list[str], threads: int, cap: float) -> Read:
        return read_members(who, reader, names, threads, self.deadline(cap), self.verifier)

    def list_and_read(self, who: str, opened: Opened, threads: int) -> Read:
        """List the tree (or take the zip's index) and check it, then read every member."""
        started = time.perf_counter()
        if opened.root is not None:
            self.verifier.check_listing(who, walk(opened.root))
        list_s = time.perf_counter() - started
        done = self.read(who, opened.reader, self.names, threads, self.s.all_cap - list_s)
        parts = {"list": list_s, "read": done.seconds}
        return replace(done, seconds=list_s + done.seconds, parts=parts)

    # ------------------------------------------------------------ sessions

    def run_contender(self, c: Contender) -> None:
        sessions: list[tuple[tuple[str, ...], Callable[[Contender], None]]] = [
            (("ready", "first", "pct_1t", "remount", "reread"), self.cold),
            (("pct_8t",), self.pct_8t),
            (("all_8t",), self.all_8t),
        ]
        for keys, session in sessions:
            try:
                session(c)
            except WrongData:
                raise
            except Exception as exc:
                log(f"  {self.profile} {c.name}: session {keys[0]} failed: {exc!r}")
                for key in keys:
                    if key in ("remount", "reread") and not c.remount:
                        continue
                    self.cells[key].setdefault(c.name, Cell(error=f"{type(exc).__name__}: {exc}"))

    def cold(self, c: Contender) -> None:
        cache = self.scratch("cache")
        try:
            drop_caches()
            self.counter.reset()
            client0 = _self_cpu()
            with c.open(self, cache) as opened:
                reqs, nbytes, ops = self.s3_now()
                cpu = sum(cpu_seconds(p) for p in opened.pids)
                ready = Cell(opened.ready_s, s3_requests=reqs, s3_bytes=nbytes, s3_ops=ops)
                ready.daemon_cpu_s, ready.client_cpu_s = cpu, _self_cpu() - client0
                started = time.perf_counter()
                data = opened.reader.read(self.first_name)
                first_s = time.perf_counter() - started
                self.verifier.check(c.name, self.first_name, data)
                s3 = self.counter.read()
                first = Cell(opened.ready_s + first_s, files=1, nbytes=len(data))
                first.s3_requests, first.s3_bytes, first.s3_ops = s3.requests, s3.get_bytes, s3.ops
                first.daemon_cpu_s = sum(cpu_seconds(p) for p in opened.pids)
                first.client_cpu_s = _self_cpu() - client0
                first.parts = {"ready": opened.ready_s, "read": first_s}
                self.put("ready", c.name, ready)
                self.put("first", c.name, first)
                pct = self.measure(
                    opened.pids,
                    lambda: self.read(c.name, opened.reader, self.chosen, 1, self.s.pct_cap),
                )
                self.put("pct_1t", c.name, pct)
            if c.remount:
                self.remount(c, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def remount(self, c: Contender, cache: Path) -> None:
        drop_caches()
        self.counter.reset()
        with c.open(self, cache) as opened:
            s3 = self.counter.read()
            cell = Cell(opened.ready_s, s3_requests=s3.requests, s3_bytes=s3.get_bytes)
            cell.s3_ops = s3.ops
            cell.daemon_cpu_s = sum(cpu_seconds(p) for p in opened.pids)
            self.put("remount", c.name, cell)
            again = self.measure(
                opened.pids,
                lambda: self.read(c.name, opened.reader, self.chosen, 1, self.s.pct_cap),
            )
            self.put("reread", c.name, again)

    def pct_8t(self, c: Contender) -> None:
        cache = self.scratch("cache")
        try:
            drop_caches()
            with c.open(self, cache) as opened:
                cell = self.measure(
                    opened.pids,
                    lambda: self.read(c.name, opened.reader, self.chosen, 8, self.s.pct_cap),
                )
                self.put("pct_8t", c.name, cell)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def all_8t(self, c: Contender) -> None:
        cache = self.scratch("cache")
        try:
            drop_caches()
            with c.open(self, cache) as opened:
                spying = self.s.py_spy and c.name == OURS
                spy = self._spy(opened.pids[0]) if spying else contextlib.nullcontext()
                with spy:
                    cell = self.measure(opened.pids, lambda: self.list_and_read(c.name, opened, 8))
                rss = [status_kib(p, "VmHWM") for p in opened.pids]
                cell.rss_mib = sum(rss) / 1024 if all(rss) else None
                self.put("all_8t", c.name, cell)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    @contextlib.contextmanager
    def _spy(self, pid: int) -> Iterator[None]:
        """py-spy (raw stacks, 200 Hz, non-blocking) on ``pid``; summary next to the results."""
        raw = OUT / f"zip-profile-{self.profile}.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        with profile_seq.spying(pid, raw):
            yield
        if raw.exists():
            summary = raw.with_name(f"zip-profile-{self.profile}.md")
            summary.write_text(profile_seq.summarise(raw) + "\n")
            log(f"  py-spy: {summary}")

    # ------------------------------------------------------------ download and extract

    def download_extract(self) -> None:
        """What a platform does: download the zip, extract it, then the job reads files."""
        name = BASELINE
        local = self.scratch("dlex")
        archive, tree = local / KEY, local / "tree"
        try:
            drop_caches()

            def download() -> Read:
                seconds = peers.download_to_disk(self.endpoint, KEY, archive)
                return Read(0, archive.stat().st_size, seconds, False)

            def extract() -> Read:
                started = time.perf_counter()
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tree)
                return Read(len(self.names), 0, time.perf_counter() - started, False)

            dl = self.measure((), download)
            ex = self.measure((), extract)
            base = _combine(dl, ex, {"download": dl.seconds or 0, "extract": ex.seconds or 0})
            self.put("ready", name, base)
            reader = FilesReader(tree)
            opened = Opened(reader, tree, (), base.seconds or 0)
            first = self.measure((), lambda: self.read(name, reader, [self.first_name], 1, 60))
            self.put("first", name, _then(base, first, "read"))
            for key, threads in (("pct_1t", 1), ("pct_8t", 8)):
                cell = self.measure(
                    (), lambda t=threads: self.read(name, reader, self.chosen, t, self.s.pct_cap)
                )
                self.put(key, name, _then(base, cell, "read"))
            cell = self.measure((), lambda: self.list_and_read(name, opened, 8))
            self.put("all_8t", name, _then(base, cell, ""))
        except WrongData:
            raise
        except Exception as exc:
            log(f"  {self.profile} {name} failed: {exc!r}")
            for key in ("ready", "first", "pct_1t", "pct_8t", "all_8t"):
                self.cells[key].setdefault(name, Cell(error=f"{type(exc).__name__}: {exc}"))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def index_transfer(self) -> None:
        """Seconds for one ranged GET of the zip's index (central directory) on a warm client."""
        client = s3_client(self.endpoint, pool=1)
        client.head_object(Bucket=BUCKET, Key=KEY)
        rng = f"bytes={self.data.cd_offset}-{self.data.size - 1}"
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            client.get_object(Bucket=BUCKET, Key=KEY, Range=rng)["Body"].read()
            best = min(best, time.perf_counter() - started)
        self.index_get_s = best
        log(f"  {self.profile} index GET ({self.data.index_bytes / 1e6:.2f} MB): {best:.3f}s")


def _combine(a: Cell, b: Cell, parts: dict[str, float]) -> Cell:
    """Two consecutive steps as one cell (seconds, requests, bytes and CPU added up)."""

    def add(x: float | None, y: float | None) -> float | None:
        return None if x is None and y is None else (x or 0) + (y or 0)

    ops = dict(a.s3_ops)
    for op, n in b.s3_ops.items():
        ops[op] = ops.get(op, 0) + n
    return Cell(
        seconds=add(a.seconds, b.seconds),
        files=a.files + b.files,
        nbytes=a.nbytes + b.nbytes,
        s3_requests=add(a.s3_requests, b.s3_requests),  # type: ignore[arg-type]
        s3_bytes=add(a.s3_bytes, b.s3_bytes),  # type: ignore[arg-type]
        s3_ops=ops,
        client_cpu_s=add(a.client_cpu_s, b.client_cpu_s),
        parts={**a.parts, **b.parts, **parts},
        capped=a.capped or b.capped,
    )


def _then(base: Cell, step: Cell, label: str) -> Cell:
    """``base`` (download+extract) followed by ``step``: seconds add up, bytes are the step's."""
    parts = {**base.parts, **({label: step.seconds or 0} if label else step.parts)}
    cell = _combine(base, step, parts)
    cell.files, cell.nbytes = step.files, step.nbytes
    return cell


def _brief(cell: Cell) -> str:
    if cell.error:
        return f"ERROR {cell.error}"
    secs = "-" if cell.seconds is None else f"{cell.seconds:.3f}s{'*' if cell.capped else ''}"
    cpu = "" if cell.daemon_cpu_s is None else f" daemon {cell.daemon_cpu_s:.1f} cpu-s"
    client = "" if cell.client_cpu_s is None else f" client {cell.client_cpu_s:.1f} cpu-s"
    return (
        f"{secs} files={cell.files} s3={cell.s3_requests} req/{human_bytes(cell.s3_bytes)}"
        f"{cpu}{client}"
    )


# ---------------------------------------------------------------- targets and tables


def _sec(cells: dict[str, Cell], name: str) -> float | None:
    cell = cells.get(name)
    return None if cell is None or cell.error or cell.seconds is None else cell.seconds


def judge(prun: ProfileRun) -> list[dict[str, Any]]:
    """The issue's three targets for s3datafs in this profile."""
    c = prun.cells
    out = []
    ready, index = _sec(c["ready"], OURS), prun.index_get_s
    limit = None if index is None else MOUNT_TARGET_S + index
    out.append(
        {
            "target": f"mount < {MOUNT_TARGET_S:g} s + index transfer",
            "ours": ready,
            "limit": limit,
            "met": None if ready is None or limit is None else ready < limit,
            "detail": f"index GET {index:.3f} s" if index is not None else "",
        }
    )
    for key, label in (("pct_1t", "1 thread"), ("pct_8t", "8 threads")):
        ours, base = _sec(c[key], OURS), _sec(c[key], BASELINE)
        factor = None if not ours or base is None else base / ours
        out.append(
            {
                "target": f"1% of members ({label}) >= {PCT_TARGET_X:g}x faster than "
                "download+extract",
                "workload": key,
                "ours": ours,
                "baseline": base,
                "factor": factor,
                "met": None if factor is None else factor >= PCT_TARGET_X,
                "primary": key == "pct_1t",
            }
        )
    ours, base = _sec(c["all_8t"], OURS), _sec(c["all_8t"], BASELINE)
    factor = None if ours is None or not base else ours / base
    out.append(
        {
            "target": f"all members (8 threads) <= {ALL_TARGET_X:g}x download+extract's time",
            "workload": "all_8t",
            "ours": ours,
            "baseline": base,
            "factor": factor,
            "met": None if factor is None else factor <= ALL_TARGET_X,
            "primary": True,
        }
    )
    return out


def _fmt_s(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.error:
        return "error"
    if cell.seconds is None:
        return "-"
    v = cell.seconds
    text = (
        f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"
    )
    return text + ("*" if cell.capped else "")


def _fmt_s3(cell: Cell | None) -> str:
    if cell is None or cell.error or cell.s3_requests is None:
        return "-"
    bits = [f"{cell.s3_requests} req, {human_bytes(cell.s3_bytes)}"]
    if cell.daemon_cpu_s is not None:
        bits.append(f"daemon {cell.daemon_cpu_s:.1f}")
    if cell.client_cpu_s is not None:
        bits.append(f"client {cell.client_cpu_s:.1f} cpu-s")
    return ", ".join(bits)


def _met(met: bool | None) -> str:
    return {True: "PASS", False: "**MISS**", None: "n/a"}[met]


def markdown(
    prun_cells: dict[str, dict[str, dict[str, Cell]]],
    verdicts: dict[str, list[dict[str, Any]]],
    contenders: list[str],
    data: ZipData,
    fraction_count: int,
) -> str:
    out: list[str] = [describe(data)]
    n, gib = len(data.members), data.member_bytes / (1 << 30)
    for profile, cells in prun_cells.items():
        out.append(f"\n#### Profile `{profile}`: seconds (lower is better)\n")
        out.append("| workload | " + " | ".join(contenders) + " |")
        out.append("|---|" + "---:|" * len(contenders))
        for w in WORKLOADS:
            row = cells[w.key]
            if not row:
                continue
            title = w.title.replace("1%", f"1% ({fraction_count})").replace(
                "all members", f"all {n:,} members ({gib:.2f} GiB)"
            )
            out.append(f"| {title} | " + " | ".join(_fmt_s(row.get(c)) for c in contenders) + " |")
            if w.key in ("pct_1t", "pct_8t", "all_8t"):
                out.append(_ratio_row(w.key, row, cells["ready"], contenders))
            if w.key == "all_8t":
                out.append(
                    "| ... read throughput, MB/s of members | "
                    + " | ".join(_mbps(row.get(c)) for c in contenders)
                    + " |"
                )
                out.append(
                    "| ... peak RSS of the serving process(es), MiB | "
                    + " | ".join(_rss(row.get(c)) for c in contenders)
                    + " |"
                )
        out.append(f"\n#### Profile `{profile}`: targets (s3datafs)\n")
        out.append("| target | s3datafs | reference | result |")
        out.append("|---|---:|---|---|")
        for v in verdicts[profile]:
            ours = "-" if v["ours"] is None else f"{v['ours']:.3f} s"
            if "limit" in v:
                ref = "-" if v["limit"] is None else f"limit {v['limit']:.3f} s ({v['detail']})"
            else:
                base = "-" if v["baseline"] is None else f"{v['baseline']:.2f} s"
                factor = "-" if v["factor"] is None else f"{v['factor']:.2f}x"
                ref = f"download+extract {base}; factor {factor}"
            label = v["target"] + ("" if v.get("primary", True) else " (extra)")
            out.append(f"| {label} | {ours} | {ref} | {_met(v['met'])} |")
        out.append(
            f"\n#### Profile `{profile}`: S3 requests, GetObject bytes, CPU seconds "
            "(daemon = FUSE process(es); client = the bench process: readers, zipfile, boto3)\n"
        )
        out.append("| workload | " + " | ".join(contenders) + " |")
        out.append("|---|" + "---|" * len(contenders))
        for w in WORKLOADS:
            row = cells[w.key]
            if row:
                out.append(
                    f"| {w.key} | " + " | ".join(_fmt_s3(row.get(c)) for c in contenders) + " |"
                )
    out.append(
        "\n`*` = stopped at the time cap; seconds extrapolated from the bytes read by then. "
        "download+extract: every figure includes the download and the extraction "
        "(parts in the JSON)."
    )
    return "\n".join(out)


def describe(data: ZipData) -> str:
    """One paragraph on the archive."""
    d = data.summary()
    return (
        f"Archive: {d['members']:,} members ({d['dir_entries']} directory entries besides) "
        f"in one {d['zip_bytes'] / MiB:,.0f} MiB zip object; {d['member_bytes'] / MiB:,.0f} MiB "
        f"of member bytes: {d['stored']['count']:,} stored "
        f"({d['stored']['bytes'] / MiB:,.0f} MiB, random bytes), {d['deflated']['count']:,} "
        f"deflated ({d['deflated']['bytes'] / MiB:,.0f} MiB -> "
        f"{d['deflated_compressed_bytes'] / MiB:,.0f} MiB, "
        f"{d['deflated']['bytes'] / max(1, d['deflated_compressed_bytes']):.1f}x); member size "
        f"median {d['size_median'] / 1024:,.0f} KiB, mean {d['size_mean'] / 1024:,.0f} KiB, "
        f"max {d['size_max'] / MiB:.1f} MiB, {d['empty']} empty; index (central directory) "
        f"{d['index_bytes'] / 1e6:.2f} MB."
    )


def _ratio_row(
    key: str, row: dict[str, Cell], ready: dict[str, Cell], contenders: list[str]
) -> str:
    base = _sec(row, BASELINE)
    cells = []
    for c in contenders:
        ours, mount = _sec(row, c), _sec(ready, c)
        if c == BASELINE or ours is None or base is None or not ours:
            cells.append("-")
            continue
        with_mount = ours + (mount or 0)
        if key == "all_8t":
            cells.append(f"{ours / base:.2f}x ({with_mount / base:.2f}x)")
        else:
            cells.append(f"{base / ours:.1f}x ({base / with_mount:.1f}x)")
    label = (
        "... time / download+extract's (incl. mount)"
        if key == "all_8t"
        else "... x faster than download+extract (incl. mount)"
    )
    return f"| {label} | " + " | ".join(cells) + " |"


def _mbps(cell: Cell | None) -> str:
    if cell is None or cell.error or not cell.seconds:
        return "-"
    return f"{cell.nbytes / 1e6 / cell.seconds:,.0f}" if not cell.capped else "-"


def _rss(cell: Cell | None) -> str:
    return "-" if cell is None or cell.rss_mib is None else f"{cell.rss_mib:,.0f}"


# ---------------------------------------------------------------- the run


def has_archive_option() -> bool:
    """Whether this s3datafs build knows ``mount --archive`` (zip support landed)."""
    result = subprocess.run(
        [sys.executable, "-m", "s3datafs", "mount", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "--archive" in result.stdout


def make_contenders(settings: Settings, root: Path, archive_ok: bool) -> list[Contender]:
    ours = peers.Ours(root / "ours", settings.ours_args)
    file_args = ("--archive=file",) if archive_ok else ()
    ours_file = peers.Ours(root / "ours-file", (*file_args, *settings.ours_args))
    every: dict[str, Contender] = {
        OURS: NativeZip(ours),
        "rclone-off+zipfile": ZipOverMount(
            "rclone-off+zipfile", lambda run, cache: _rclone_zip(run, "off", cache)
        ),
        "rclone-full+zipfile": ZipOverMount(
            "rclone-full+zipfile", lambda run, cache: _rclone_zip(run, "full", cache)
        ),
        "s3datafs-file+zipfile": ZipOverMount(
            "s3datafs-file+zipfile", lambda run, cache: _s3datafs_file(run, ours_file, cache)
        ),
        "fuse-zip/rclone-full": FuseZip("full"),
        "fuse-zip/rclone-off": FuseZip("off"),
    }
    return [every[name] for name in settings.contenders if name in every]


def missing_tools(name: str, archive_ok: bool) -> str | None:
    if name == OURS and not archive_ok:
        return "this s3datafs has no `mount --archive` (zip support not landed)"
    if "rclone" in name and shutil.which("rclone") is None:
        return "rclone not installed"
    if name.startswith("fuse-zip") and shutil.which("fuse-zip") is None:
        return "fuse-zip not installed"
    return None


def upload(backend: Backend, data: ZipData) -> float:
    from boto3.s3.transfer import TransferConfig

    client = s3_client(backend.endpoint)
    client.create_bucket(Bucket=BUCKET)
    started = time.perf_counter()
    config = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
    client.upload_file(str(data.path), BUCKET, KEY, Config=config)
    seconds = time.perf_counter() - started
    size = client.head_object(Bucket=BUCKET, Key=KEY)["ContentLength"]
    if size != data.size:
        raise RuntimeError(f"uploaded {size} bytes, expected {data.size}")
    log(f"uploaded {KEY} ({data.size / MiB:.0f} MiB) in {seconds:.1f}s")
    return seconds


def code_state() -> dict[str, Any]:
    """Which s3datafs the run measured: HEAD, uncommitted files, a digest of the package's code."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "s3datafs").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()

    snapshot = root / ".snapshot-of"  # a copy of the tree made to keep a run on one version
    return {
        "root": str(root),
        "head": git("rev-parse", "--short", "HEAD")
        or (snapshot.read_text().strip() if snapshot.exists() else "?"),
        "uncommitted": git("status", "--porcelain", "--", "s3datafs").splitlines(),
        "s3datafs_py_sha256": digest.hexdigest()[:16],
    }


def run(settings: Settings, work: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {"machine": machine(), "settings": _jsonable(asdict(settings))}
    meta["code_at_start"] = code_state()
    meta["machine"]["versions"]["fuse-zip"] = _fuse_zip_version()
    started = time.monotonic()
    data = build(settings.spec, work / "zip", settings.zip_cache, log=log)
    meta["data"] = data.summary()
    meta["_data"], meta["_chosen"] = data, max(1, math.ceil(len(data.members) * settings.fraction))
    archive_ok = has_archive_option()
    meta["s3datafs_archive_support"] = archive_ok
    if not archive_ok:
        log("s3datafs: no `mount --archive` in this build: the s3datafs contender is skipped")
    cells: dict[str, dict[str, dict[str, Cell]]] = {}
    verdicts: dict[str, list[dict[str, Any]]] = {}
    index_get: dict[str, float | None] = {}
    meta["cells"], meta["targets"], meta["index_get_s"] = cells, verdicts, index_get
    try:
        with Backend() as backend:
            meta["upload_s"] = upload(backend, data)
            for profile in settings.profiles:
                with profile_endpoint(backend, profile, False) as endpoint:
                    log(f"profile {profile}: endpoint {endpoint}")
                    prun = ProfileRun(settings, backend, endpoint, profile, work / profile, data)
                    cells[profile] = prun.cells
                    prun.index_transfer()
                    index_get[profile] = prun.index_get_s
                    for name in settings.contenders:
                        reason = missing_tools(name, archive_ok)
                        if reason:
                            for key in ("ready", "first", "pct_1t", "pct_8t", "all_8t"):
                                prun.cells[key][name] = Cell(error=f"skipped: {reason}")
                    for contender in make_contenders(settings, work / profile, archive_ok):
                        if missing_tools(contender.name, archive_ok):
                            continue
                        prun.run_contender(contender)
                    if BASELINE in settings.contenders:
                        prun.download_extract()
                    verdicts[profile] = judge(prun)
    except WrongData as exc:
        meta["fatal"] = f"WRONG DATA: {exc}"
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_at_end"] = os.getloadavg()
    meta["code_at_end"] = code_state()
    if meta["code_at_end"]["s3datafs_py_sha256"] != meta["code_at_start"]["s3datafs_py_sha256"]:
        log("warning: s3datafs's code changed during the run: figures may mix two versions")
    return meta


def _fuse_zip_version() -> str:
    if shutil.which("fuse-zip") is None:
        return "missing"
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "fuse-zip"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out or "?"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 members, 100 MiB, short caps")
    parser.add_argument("--members", type=int, help="number of members (default 20000)")
    parser.add_argument("--total-mib", type=int, help="MiB of member bytes (default 1024)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the archive")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, of {', '.join(CONTENDERS + OPTIONAL)}",
    )
    parser.add_argument("--pct-cap", type=float, help="time cap of a 1%% read (s)")
    parser.add_argument("--all-cap", type=float, help="time cap of the read-all workload (s)")
    parser.add_argument("--ours-arg", action="append", default=[], help="extra mount argument")
    parser.add_argument(
        "--zip-cache", type=Path, help="keep the built zip here and reuse it when the spec matches"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp"), help="where the scratch dir is made"
    )
    parser.add_argument("--out", type=Path, help="JSON output (default bench/out/zip-*.json)")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="profile the s3datafs daemon during 'all' (bench/out/zip-profile-*; skews timings)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    spec = ZipSpec(
        members=args.members or (2000 if quick else 20_000),
        total_mib=args.total_mib or (100 if quick else 1024),
        seed=args.seed,
    )
    settings = Settings(
        spec=spec,
        profiles=_choose(args.profiles, PROFILES, parser),
        contenders=_choose(args.contenders, CONTENDERS + OPTIONAL, parser),
        fraction=0.01,
        pct_cap=args.pct_cap or (60.0 if quick else 120.0),
        all_cap=args.all_cap or (120.0 if quick else 300.0),
        ours_args=tuple(args.ours_arg),
        zip_cache=args.zip_cache,
        py_spy=args.py_spy,
    )
    return settings, args


def _choose(
    text: str, allowed: tuple[str, ...], parser: argparse.ArgumentParser
) -> tuple[str, ...]:
    chosen = tuple(x for x in text.split(",") if x)
    unknown = [x for x in chosen if x not in allowed]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every mount's finally


def fuse_mounts(under: Path) -> list[str]:
    """FUSE mount points below ``under`` (other people's mounts elsewhere are none of ours)."""
    prefix = str(under.resolve()) + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4] for line in table if " - fuse" in line]
    return [p for p in points if p.startswith(prefix)]


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_zip: run as root (it mounts and drops the page cache)")
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: figures will be noisy")
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="s3datafs-benchzip-", dir=args.workdir))
    try:
        meta = run(settings, work)
    finally:
        left = fuse_mounts(work)  # every mount is unmounted in a finally: expected empty
        if left:
            log(f"warning: FUSE mounts left behind: {left}")
        remove_workdir(work)
    meta["fuse_mounts_left"] = left
    meta["command"] = " ".join(["python -m bench.bench_zip", *(argv or sys.argv[1:])])
    meta["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cells, data, chosen = meta.pop("cells"), meta.pop("_data"), meta.pop("_chosen")
    text = markdown(cells, meta["targets"], list(settings.contenders), data, chosen)
    meta["cells"] = {
        p: {w: {c: asdict(cell) for c, cell in row.items()} for w, row in rows.items()}
        for p, rows in cells.items()
    }
    out = args.out or OUT / f"zip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    targets = [out] if args.out else [out, OUT / "zip-latest.json"]
    header = f"Command: `{meta['command']}` ({meta['date_utc']}, {meta['elapsed_s']} s)\n"
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_jsonable(meta), indent=1, default=str))
        path.with_suffix(".md").write_text(header + text + "\n")
    print(text)
    log(f"wrote {out}")
    if meta.get("fatal"):
        log(f"FATAL: {meta['fatal']}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
