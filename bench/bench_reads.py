"""Read benchmark of issue 4: s3datafs against s3fs-fuse, rclone mount and boto3 ceilings.

Run as root (it mounts, and drops the page cache with ``/proc/sys/vm/drop_caches``)::

    python -m bench.bench_reads            # 1 GiB file + 2,000 x 64 KiB, all three profiles
    python -m bench.bench_reads --quick    # 256 MiB + 500 files, shorter caps

One run starts one S3 server (``devtools/s3server.py``: moto, objects in memory, ranged GETs that
stream only the asked slice, HTTP/1.1 keep-alive) and uploads the dataset once. For each network
profile (``0ms`` direct; ``20ms`` and ``s3like`` through ``bench/netproxy.py``) each contender
goes through *sessions*, each on a fresh mount with a fresh cache directory and a dropped page
cache, so every "cold" figure is cold for the kernel and the FUSE process alike:

- first read: mount command start -> first 4 KiB of the big file read;
- sequential: cold read; re-read on the same mount; unmount, drop caches, mount again with the
  same cache directory, re-read;
- random: 4 KiB and 64 KiB reads at page-aligned random offsets over the whole big file, with 1
  and 8 threads, each workload on its own fresh mount;
- scattered: 1% of the big file in 1 MiB chunks at random offsets, by one reader (each read waits
  for the one before, as a job looking up records does) and by 8 readers sharing the chunks;
- eight readers: 8 threads each reading 1/8 of the big file; peak RSS of the FUSE process;
- find: ``find -printf '%s'`` over the small tree right after mount;
- small files: every small file read whole by 8 threads.

Around every workload the server's counters are reset and read back (S3 requests and GetObject
bytes) and the FUSE process's CPU seconds are measured from ``/proc``. Loops stop at per-workload
time caps. Results: markdown tables on stdout, ``bench/out/results-*.json`` and
``bench/out/latest.json`` (``bench/chart.py`` draws them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from s3datafs import runtime

from . import peers, report, workloads
from .env import (
    Backend,
    Dataset,
    S3Counter,
    cpu_seconds,
    drop_caches,
    machine,
    status_kib,
)
from .netproxy import NetProxy
from .report import Figure, Row
from .workloads import Done

OUT = Path(__file__).resolve().parent / "out"
PROFILES = {"0ms": (0.0, 0.0), "20ms": (20.0, 0.0), "s3like": (20.0, 100.0)}
ALL_CONTENDERS = (report.OURS, *report.PEERS)
RANDOM = {  # workload -> (read size, threads, seed of its offsets)
    "rand_4k_1t": (4096, 1, 1),
    "rand_4k_8t": (4096, 8, 2),
    "rand_64k_1t": (65536, 1, 3),
    "rand_64k_8t": (65536, 8, 4),
}


@dataclass(frozen=True)
class Settings:
    dataset: Dataset
    profiles: tuple[str, ...]
    contenders: tuple[str, ...]
    seq_cap: float  # seconds per sequential-ish workload
    files_cap: float  # seconds for the small-files workload
    random_cap: float  # seconds per random workload
    random_ops: int  # reads per thread (1 thread: 4x this)
    scattered_fraction: float
    ours_args: tuple[str, ...]
    zero_via_proxy: bool
    workloads: tuple[str, ...] = ()  # only these (and their ceilings); empty: all


class ProfileRun:
    """All sessions of one network profile against one endpoint."""

    def __init__(
        self, settings: Settings, backend: Backend, endpoint: str, profile: str, work: Path
    ) -> None:
        self.s, self.backend, self.endpoint, self.profile = settings, backend, endpoint, profile
        self.work, self.counter = work, S3Counter(backend)
        self.rows: dict[str, Row] = {w.key: Row(profile, w.key) for w in report.WORKLOADS}
        self._serial = 0

    # ------------------------------------------------------------ plumbing

    def put(self, workload: str, name: str, fig: Figure) -> None:
        self.rows[workload].figures[name] = fig
        log(f"  {self.profile:7} {name:13} {workload:15} {_brief(fig, workload)}")

    def scratch(self, kind: str) -> Path:
        self._serial += 1
        path = self.work / f"{kind}-{self._serial}"
        path.mkdir(parents=True)
        return path

    def measure(
        self, pid: int, run: Callable[[], Done], value: Callable[[Done], float],
        root: Path | None = None,
    ) -> Figure:
        """Run one workload between server-counter, CPU and (our mount at ``root``) daemon
        counter readings."""
        counters0 = daemon_counters(root)
        self.counter.reset()
        cpu0 = cpu_seconds(pid) if pid else None
        try:
            done = run()
        except Exception as exc:  # a contender failing a read is a result, not a crash
            return Figure(None, error=f"{type(exc).__name__}: {exc}")
        s3 = self.counter.read()
        counters = daemon_counters(root)
        return Figure(
            value(done),
            seconds=done.seconds,
            ops=done.ops,
            nbytes=done.nbytes,
            s3_requests=s3.requests,
            s3_bytes=s3.get_bytes,
            s3_ops=s3.ops,
            cpu_s=None if cpu0 is None else cpu_seconds(pid) - cpu0,
            rss_kib=status_kib(pid, "VmHWM") if pid else None,
            capped=done.capped,
            daemon={name: count - counters0.get(name, 0) for name, count in counters.items()},
        )

    @contextlib.contextmanager
    def mounted(
        self, contender: peers.Contender, prefix: str, cache: Path | None = None
    ) -> Iterator[peers.Mounted]:
        """A fresh mount after dropping the page cache; the cache dir too unless given."""
        own_cache = cache is None
        cache = cache or self.scratch("cache")
        mountpoint = self.work / "mnt" / f"{contender.name}-{prefix.strip('/')}"
        drop_caches()
        try:
            with contender.mount(self.endpoint, prefix, mountpoint, cache) as mount:
                yield mount
        finally:
            if own_cache:
                shutil.rmtree(cache, ignore_errors=True)

    def wants(self, *keys: str) -> bool:
        return not self.s.workloads or any(key in self.s.workloads for key in keys)

    def deadline(self, cap: float) -> float:
        return time.monotonic() + cap

    @property
    def big(self) -> str:
        return self.s.dataset.big_name

    # ------------------------------------------------------------ sessions per contender

    def contender(self, contender: peers.Contender) -> None:
        sessions = [
            (("first_read",), self.first_read),
            (("cold_seq", "reread_same", "reread_remount"), self.sequential),
            (tuple(RANDOM), self.random),
            (("scattered",), self.scattered),
            (("scattered_8t",), self.scattered_8t),
            (("readers8", "rss8"), self.readers8),
            (("find",), self.find),
            (("small_files",), self.small_files),
        ]
        for keys, session in sessions:
            if not self.wants(*keys):
                continue
            try:
                session(contender)
            except Exception as exc:
                log(f"  {self.profile} {contender.name}: session {keys[0]} failed: {exc}")
                for key in keys:
                    self.rows[key].figures.setdefault(contender.name, Figure(None, error=str(exc)))

    def first_read(self, c: peers.Contender) -> None:
        self.counter.reset()
        with self.mounted(c, self.s.dataset.big_prefix) as m:
            started = time.perf_counter()
            workloads.first_read(m.path / self.big)
            total = m.mount_seconds + time.perf_counter() - started
            s3 = self.counter.read()
            cpu = cpu_seconds(m.pid) if m.pid else None
        fig = Figure(total, seconds=total, ops=1, nbytes=4096, s3_requests=s3.requests)
        fig.s3_bytes, fig.s3_ops, fig.cpu_s = s3.get_bytes, s3.ops, cpu
        self.put("first_read", c.name, fig)

    def sequential(self, c: peers.Contender) -> None:
        cache = self.scratch("cache")
        try:
            with self.mounted(c, self.s.dataset.big_prefix, cache) as m:
                path = m.path / self.big
                self.put("cold_seq", c.name, self._seq(m, path))
                self.put("reread_same", c.name, self._seq(m, path))
            with self.mounted(c, self.s.dataset.big_prefix, cache) as m:
                self.put("reread_remount", c.name, self._seq(m, m.path / self.big))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def _seq(self, m: peers.Mounted, path: Path) -> Figure:
        deadline = self.deadline(self.s.seq_cap)
        return self.measure(m.pid, lambda: workloads.sequential(path, deadline), Done.mbps,
                            root=m.path)

    def random_plan(self, key: str) -> tuple[list[list[int]], int]:
        """Offsets over the whole big file, the same for every contender and the ceiling."""
        size, threads, seed = RANDOM[key]
        per_thread = self.s.random_ops * (4 if threads == 1 else 1)
        big = self.s.dataset.big_size
        return workloads.random_plan(seed, 0, big, size, threads, per_thread), size

    def random(self, c: peers.Contender) -> None:
        for key in RANDOM:
            plan, size = self.random_plan(key)
            with self.mounted(c, self.s.dataset.big_prefix) as m:
                run = functools.partial(
                    workloads.random_reads,
                    m.path / self.big,
                    plan,
                    size,
                    self.deadline(self.s.random_cap),
                )
                self.put(key, c.name, self.measure(m.pid, run, Done.ops_per_s, root=m.path))

    def scattered_offsets(self) -> list[int]:
        return workloads.scattered_plan(7, self.s.dataset.big_size, self.s.scattered_fraction)

    def scattered(self, c: peers.Contender) -> None:
        offsets = self.scattered_offsets()
        with self.mounted(c, self.s.dataset.big_prefix) as m:
            path, deadline = m.path / self.big, self.deadline(self.s.seq_cap)
            run = functools.partial(workloads.scattered, path, offsets, deadline)
            self.put("scattered", c.name, self.measure(m.pid, run, _seconds, root=m.path))

    def scattered_8t(self, c: peers.Contender) -> None:
        offsets = self.scattered_offsets()
        with self.mounted(c, self.s.dataset.big_prefix) as m:
            path, deadline = m.path / self.big, self.deadline(self.s.seq_cap)
            run = functools.partial(workloads.scattered_parallel, path, offsets, 8, deadline)
            self.put("scattered_8t", c.name, self.measure(m.pid, run, _seconds, root=m.path))

    def readers8(self, c: peers.Contender) -> None:
        with self.mounted(c, self.s.dataset.big_prefix) as m:
            path, deadline = m.path / self.big, self.deadline(self.s.seq_cap)
            run = functools.partial(workloads.parallel_sequential, path, 8, deadline)
            fig = self.measure(m.pid, run, Done.mbps, root=m.path)
            # Whose peak this is: the row has shown a second, higher mode (see RESULTS.md).
            log(f"  {self.profile} {c.name}: readers8 peak RSS {fig.rss_kib} KiB of pid {m.pid} "
                f"(now {status_kib(m.pid, 'VmRSS')} KiB, {status_kib(m.pid, 'Threads')} threads)")
            self.put("readers8", c.name, fig)
            rss = Figure(fig.rss_kib / 1024 if fig.rss_kib else None, error=fig.error)
            self.put("rss8", c.name, rss)

    def find(self, c: peers.Contender) -> None:
        with self.mounted(c, self.s.dataset.small_prefix) as m:
            run = functools.partial(workloads.find_stat, m.path, self.s.seq_cap * 2)
            self.put("find", c.name, self.measure(m.pid, run, _seconds, root=m.path))

    def small_files(self, c: peers.Contender) -> None:
        names = self.s.dataset.small_names()
        with self.mounted(c, self.s.dataset.small_prefix) as m:
            paths, deadline = [m.path / n for n in names], self.deadline(self.s.files_cap)
            run = functools.partial(workloads.read_files, paths, 8, deadline)
            self.put("small_files", c.name, self.measure(m.pid, run, Done.ops_per_s, root=m.path))

    # ------------------------------------------------------------ ceilings

    def ceilings(self) -> None:
        """boto3 on the same endpoint, and a local copy of the big file.

        A filtered run (``--workloads``) measures the ceilings of the workloads it asks for only.
        """
        ds, ep, key = self.s.dataset, self.endpoint, self.s.dataset.big_key
        download = functools.partial(_timed, peers.parallel_download, ep, key, nbytes=ds.big_size)
        if self.wants("cold_seq"):
            self.put("cold_seq", "boto3", self.measure(0, download, Done.mbps))
        if self.wants("cold_seq", "reread_same", "reread_remount", "scattered", "scattered_8t"):
            local_dir = self.scratch("local")
            try:
                self._local_ceilings(local_dir / "copy.bin")
            finally:
                shutil.rmtree(local_dir, ignore_errors=True)
        for name in RANDOM:
            if self.wants(name):
                plan, size = self.random_plan(name)
                gets = functools.partial(
                    peers.ranged_gets, ep, key, plan, size, self.deadline(self.s.random_cap)
                )
                self.put(name, "boto3", self.measure(0, gets, Done.ops_per_s))
        if self.wants("small_files"):
            keys = [ds.small_prefix + n for n in ds.small_names()]
            get_all = functools.partial(
                peers.get_many, ep, keys, 8, self.deadline(self.s.files_cap)
            )
            self.put("small_files", "boto3", self.measure(0, get_all, Done.ops_per_s))
        if self.wants("find"):
            listing = functools.partial(peers.list_all, ep, ds.small_prefix)
            self.put("find", "boto3", self.measure(0, listing, _seconds))
        if self.wants("first_read"):
            first = functools.partial(_timed, peers.first_ranged_get, ep, key, nbytes=4096)
            self.put("first_read", "boto3", self.measure(0, first, _seconds))

    def _local_ceilings(self, local: Path) -> None:
        ep, key = self.endpoint, self.s.dataset.big_key
        far = self.deadline(self.s.seq_cap * 10)
        offsets = self.scattered_offsets()

        def download_then(read: Callable[[], Done]) -> Done:
            seconds = peers.download_to_disk(ep, key, local)
            done = read()
            return Done(done.ops, done.nbytes, seconds + done.seconds)

        read_all = functools.partial(workloads.sequential, local, far)
        drop_caches()
        self.put(
            "cold_seq", "download+read", self.measure(0, lambda: download_then(read_all), Done.mbps)
        )
        self.put("reread_same", "page cache", self.measure(0, read_all, Done.mbps))
        drop_caches()
        self.put("reread_remount", "local", self.measure(0, read_all, Done.mbps))
        local.unlink()
        drop_caches()
        chunks = functools.partial(workloads.scattered, local, offsets, far)
        fig = self.measure(0, lambda: download_then(chunks), _seconds)
        self.put("scattered", "download+read", fig)
        self.put("scattered_8t", "download+read", fig)


def _seconds(done: Done) -> float:
    return done.seconds


def _timed(fn: Callable[..., float], *args: Any, nbytes: int) -> Done:
    """A Done for a function that returns its own elapsed seconds."""
    return Done(1, nbytes, fn(*args))


def _brief(fig: Figure, workload: str) -> str:
    if fig.error:
        return f"ERROR {fig.error}"
    unit = report.BY_KEY[workload].unit
    value = "-" if fig.value is None else f"{fig.value:,.3f}"
    brief = f"{value} {unit}  s3={fig.s3_requests} req/{report.human_bytes(fig.s3_bytes)}"
    if skipped := fig.daemon.get("cache_writes_skipped"):
        brief += f"  ({skipped} blocks left uncached: the cache disk fell behind)"
    return brief


def daemon_counters(root: Path | None) -> dict[str, int]:
    """Our daemon's counters (the mount root's ``user.s3datafs.stats``); {} for a peer's mount,
    which is not asked (s3fs would ask S3 for an attribute, and the server counts that)."""
    if root is None or not any(entry.mountpoint == str(root) for entry in runtime.our_mounts()):
        return {}
    try:
        counters = json.loads(os.getxattr(root, "user.s3datafs.stats"))
    except (OSError, ValueError):  # a peer's mount has no such attribute
        return {}
    return {name: count for name, count in counters.items()
            if isinstance(count, int) and not name.endswith("_per_second")}  # counters, no rates


_T0 = time.monotonic()


def log(text: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the run


def proxy_overhead(backend: Backend, key: str, repeats: int = 3) -> dict[str, Any]:
    """boto3 parallel download MB/s direct vs through the proxy at 0 ms (alternating runs)."""
    size = backend.server.client().head_object(Bucket="s3datafs-bench", Key=key)["ContentLength"]
    direct, proxied = [], []
    with NetProxy(backend.endpoint) as proxy:
        for _ in range(repeats):
            direct.append(size / 1e6 / peers.parallel_download(backend.endpoint, key))
            proxied.append(size / 1e6 / peers.parallel_download(proxy.endpoint, key))
    best = {"direct_mbps": max(direct), "proxy_0ms_mbps": max(proxied)}
    log(f"proxy overhead check: {best} (runs: direct {direct}, proxy {proxied})")
    return {**best, "direct_runs": direct, "proxy_runs": proxied}


def contenders(settings: Settings, root: Path) -> list[peers.Contender]:
    every: dict[str, peers.Contender] = {
        report.OURS: peers.Ours(root / "ours", settings.ours_args),
        "s3fs-kc": peers.S3fs(root / "s3fs", kernel_cache=True),
        "s3fs": peers.S3fs(root / "s3fs", kernel_cache=False),
        "rclone-off": peers.Rclone(root / "rclone", "off"),
        "rclone-full": peers.Rclone(root / "rclone", "full"),
    }
    return [every[name] for name in settings.contenders]


@contextlib.contextmanager
def profile_endpoint(backend: Backend, profile: str, via_proxy: bool) -> Iterator[str]:
    delay, rate = PROFILES[profile]
    if not (delay or rate or via_proxy):
        yield backend.endpoint
        return
    with NetProxy(backend.endpoint, delay_ms=delay, rate_mbps=rate) as proxy:
        yield proxy.endpoint


def run(settings: Settings, work: Path) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    meta: dict[str, Any] = {"machine": machine(), "settings": _settings_json(settings)}
    started = time.monotonic()
    with Backend() as backend:
        backend.upload(settings.dataset, log=log)
        meta["proxy_overhead"] = proxy_overhead(backend, settings.dataset.big_key)
        for profile in settings.profiles:
            with profile_endpoint(backend, profile, settings.zero_via_proxy) as endpoint:
                log(f"profile {profile}: endpoint {endpoint}")
                prun = ProfileRun(settings, backend, endpoint, profile, work / profile)
                for contender in contenders(settings, work / profile):
                    prun.contender(contender)
                prun.ceilings()
            for row in prun.rows.values():
                report.judge(row)
                rows.append(row)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_at_end"] = os.getloadavg()
    return rows, meta


def _settings_json(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB + 500 files, short caps")
    parser.add_argument("--big-mib", type=int, help="size of the big file in MiB (default 1024)")
    parser.add_argument("--small-files", type=int, help="number of small files (default 2000)")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    parser.add_argument("--contenders", default=",".join(ALL_CONTENDERS), help="comma-separated")
    parser.add_argument(
        "--workloads", default="", help="comma-separated keys (e.g. cold_seq,rss8); default all"
    )
    parser.add_argument("--seq-cap", type=float, help="time cap per sequential workload (s)")
    parser.add_argument("--files-cap", type=float, help="time cap for the small files (s)")
    parser.add_argument("--random-cap", type=float, help="time cap per random workload (s)")
    parser.add_argument("--random-ops", type=int, help="random reads per thread (1 thread: x4)")
    parser.add_argument("--ours-arg", action="append", default=[], help="extra mount argument")
    parser.add_argument("--zero-via-proxy", action="store_true", help="0ms through the proxy")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp"), help="where the scratch dir is made"
    )
    parser.add_argument("--out", type=Path, help="JSON output (default bench/out/results-*.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    dataset = Dataset(
        big_size=(args.big_mib or (256 if quick else 1024)) << 20,
        small_count=args.small_files or (500 if quick else 2000),
    )
    settings = Settings(
        dataset=dataset,
        profiles=_choose(args.profiles, PROFILES, parser),
        contenders=_choose(args.contenders, ALL_CONTENDERS, parser),
        seq_cap=args.seq_cap or (20.0 if quick else 60.0),
        files_cap=args.files_cap or (10.0 if quick else 20.0),
        random_cap=args.random_cap or (3.0 if quick else 5.0),
        random_ops=args.random_ops or (50 if quick else 100),
        scattered_fraction=0.01,
        ours_args=tuple(args.ours_arg),
        zero_via_proxy=args.zero_via_proxy,
        workloads=_choose(args.workloads, report.BY_KEY, parser),
    )
    return settings, args


def _choose(text: str, allowed: Any, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    chosen = tuple(x for x in text.split(",") if x)
    unknown = [x for x in chosen if x not in allowed]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def remove_workdir(work: Path) -> None:
    """Unmount anything still mounted below ``work`` (never expected), then delete it."""
    prefix = os.fsencode(str(work.resolve())) + b"/"
    with open("/proc/self/mountinfo", "rb") as table:
        left = [line.split()[4] for line in table if line.split()[4].startswith(prefix)]
    for point in reversed(left):
        log(f"warning: {point.decode()} still mounted; unmounting")
        peers.force_unmount(Path(os.fsdecode(point)))
    shutil.rmtree(work, ignore_errors=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every mount's finally


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_reads: run as root (it mounts and drops the page cache)")
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: figures will be noisy")
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="s3datafs-bench-", dir=args.workdir))
    try:
        rows, meta = run(settings, work)
    finally:
        remove_workdir(work)
    meta["command"] = " ".join(["python -m bench.bench_reads", *(argv or sys.argv[1:])])
    out = args.out or OUT / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tables = report.markdown_tables(rows, list(settings.contenders))
    targets = [out] if args.out else [out, OUT / "latest.json"]  # --out runs leave latest alone
    for path in targets:
        report.write_json(path, meta, rows)
        path.with_suffix(".md").write_text(f"Command: `{meta['command']}`\n{tables}\n")
    print(tables)
    for line in report.errors(rows):
        log(f"error: {line}")
    log(f"wrote {out} ({meta['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
