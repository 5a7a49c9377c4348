"""Snapshot bench: record and re-mount 10k / 100k / 1M-key prefixes; `find` beside rclone and s3fs.

    python bench/bench_snapshot.py [--sizes 10000,100000,1000000] [--no-peers] [--peer-timeout S]

Not a test: it prints numbers (and a Markdown table to paste into bench/RESULTS.md). Run as root
(it mounts). For each size it starts its own local S3 (``devtools/s3server.py``, moto on
127.0.0.1 with fast listings), creates a *versioned* bucket and fills it in process
(``S3Server.populate``, ~40,000 objects/s; objects of 64-263 bytes):

    ds/big/f000000.bin ...         min(N/10, 100,000) files in one directory
    ds/d0000/f0000.bin ...         the rest, 1,000 files per directory

then measures, one after the other:

- ``snapshot``: ``s3datafs snapshot s3://bench/ds/ -o FILE`` (ListObjectVersions, pinned, written);
  wall time, file size;
- ``mount``: ``s3datafs mount --snapshot FILE`` on a fresh cache directory, until it returns
  (ready); the S3 requests it made (one HEAD); after the ``find`` below, the same mount again
  (same file, same cache dir: the catalog kept by the first, ``keptcatalogs``), and ``find``;
- ``find``: ``find MOUNTPOINT | wc -l`` and ``ls MOUNTPOINT/big | wc -l`` (cold kernel caches: a
  fresh mount), and the S3 requests the server saw meanwhile (zero: the catalog answers);
- the daemon's peak RSS (``VmHWM`` of /proc/PID/status, read before unmounting);
- the same ``find`` through ``rclone mount`` (``--read-only --s3-list-version 2``) and s3fs-fuse
  (``-o ro,listobjectsv2``) mounted on the same bucket prefix, each with a time limit, with the
  requests they sent. Every mount is unmounted in a ``finally``.

The server's CPU is shared with the clients on a small machine: absolute times mostly measure
moto (~0.2 s of server CPU per 1,000-entry listing page; ~2.5 ms per HEAD), the same for all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.s3server import S3Server, clean_aws_env, stop_process  # noqa: E402

BUCKET, PREFIX = "bench", "ds/"
MOUNT_WAIT = 60.0


@dataclass
class Row:
    keys: int
    populate_s: float = 0.0
    snapshot_s: float = 0.0
    snapshot_cpu_s: float = 0.0  # the s3datafs process (user + system)
    snapshot_server_cpu_s: float = 0.0  # the moto server meanwhile
    file_bytes: int = 0
    mount_s: float = 0.0
    mount_ops: dict = field(default_factory=dict)
    find_s: float = 0.0
    find_entries: int = 0
    find_ops: dict = field(default_factory=dict)
    ls_big_s: float = 0.0
    ls_big_entries: int = 0
    rss_mib: float = 0.0
    remount_s: float = 0.0  # the same file again, same cache dir: the kept catalog
    remount_ops: dict = field(default_factory=dict)
    peers: dict = field(default_factory=dict)  # name -> (seconds or None, entries, requests)


def layout(n: int) -> Iterator[tuple[str, int]]:
    big = min(n // 10, 100_000)
    for i in range(big):
        yield f"{PREFIX}big/f{i:06d}.bin", 64 + i % 200
    for i in range(n - big):
        yield f"{PREFIX}d{i // 1000:04d}/f{i % 1000:04d}.bin", 64 + i % 200


def expected_entries(n: int) -> int:
    big = min(n // 10, 100_000)
    return n + 1 + (1 if big else 0) + -(-(n - big) // 1000)  # files, root, big/, dNNNN/


class Bench:
    def __init__(self, server: S3Server, work: Path) -> None:
        self.server, self.work = server, work
        self.env = clean_aws_env()
        self.env.update(
            AWS_ENDPOINT_URL=server.endpoint,
            S3DATAFS_DATA_ROOT=str(work / "data"),
            S3DATAFS_CACHE_DIR=str(work / "cache"),
            S3DATAFS_RUNTIME_DIR=str(work / "run"),
            S3DATAFS_LOG_DIR=str(work / "log"),
        )

    def s3datafs(self, *args: str, timeout: float = 3600) -> tuple[float, str]:
        self.cpu_before = children_cpu()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "s3datafs", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"s3datafs {args[0]} failed: {result.stderr.strip()}")
        return elapsed, result.stdout

    def run_size(self, n: int, *, peers: bool, peer_timeout: float) -> Row:
        row = Row(n)
        s3 = self.server.client()
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        started = time.monotonic()
        self.server.populate(BUCKET, layout(n))
        row.populate_s = time.monotonic() - started
        print(f"[{n:,}] populated in {row.populate_s:.1f}s", flush=True)
        snap = self.work / f"ds-{n}.snap.gz"
        server_before = process_cpu(self.server.pid)
        row.snapshot_s, _ = self.s3datafs("snapshot", f"s3://{BUCKET}/{PREFIX}", "-o", str(snap))
        row.snapshot_cpu_s = children_cpu() - self.cpu_before
        row.snapshot_server_cpu_s = process_cpu(self.server.pid) - server_before
        row.file_bytes = snap.stat().st_size
        print(
            f"[{n:,}] snapshot {row.snapshot_s:.1f}s (cpu: ours {row.snapshot_cpu_s:.1f}s, "
            f"server {row.snapshot_server_cpu_s:.1f}s), {row.file_bytes / 1e6:.1f} MB",
            flush=True,
        )
        self.ours(n, row, snap)
        if peers:
            for name, mounter in (("rclone", self.rclone), ("s3fs", self.s3fs)):
                row.peers[name] = self.peer(name, mounter, peer_timeout)
                print(f"[{n:,}] {name}: {row.peers[name]}", flush=True)
        return row

    def ours(self, n: int, row: Row, snap: Path) -> None:
        mountpoint = self.work / "mnt-s3datafs"
        mount = ("mount", "--snapshot", str(snap), str(mountpoint),
                 "--cache-dir", str(self.work / f"fresh-cache-{n}"))
        self.server.reset_stats()
        try:
            row.mount_s, _ = self.s3datafs(*mount)
            row.mount_ops = self.server.ops()
            self.server.reset_stats()
            row.find_s, row.find_entries = count_entries(["find", str(mountpoint)])
            row.ls_big_s, row.ls_big_entries = count_entries(["ls", "-f", str(mountpoint / "big")])
            row.find_ops = self.server.ops()
            row.rss_mib = peak_rss_mib(self.daemon_pid(mountpoint))
            assert row.find_entries == expected_entries(n), (row.find_entries, n)
        finally:
            self.unmount(mountpoint)
        self.server.reset_stats()
        try:  # the same file again: its catalog was kept by the first mount
            row.remount_s, _ = self.s3datafs(*mount)
            row.remount_ops = self.server.ops()
            _, entries = count_entries(["find", str(mountpoint)])
            assert entries == expected_entries(n), (entries, n)
        finally:
            self.unmount(mountpoint)
        print(
            f"[{n:,}] mount {row.mount_s:.1f}s {row.mount_ops}, find {row.find_s:.1f}s "
            f"({row.find_entries:,}) {row.find_ops}, rss {row.rss_mib:.0f} MiB; "
            f"remount {row.remount_s:.2f}s {row.remount_ops}",
            flush=True,
        )

    def unmount(self, mountpoint: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "s3datafs", "unmount", str(mountpoint)],
            env=self.env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        force_unmount(mountpoint)

    def daemon_pid(self, mountpoint: Path) -> int:
        _, out = self.s3datafs("status", "--json")  # other mounts of the machine are listed too
        (row,) = [row for row in json.loads(out) if row["mountpoint"] == str(mountpoint)]
        return int(row["pid"])

    def peer(self, name: str, mounter, timeout: float) -> tuple[float | None, int, int]:
        mountpoint = self.work / f"mnt-{name}"
        mountpoint.mkdir(exist_ok=True)
        process = None
        try:
            process = mounter(mountpoint)
            wait_mounted(mountpoint, process)
            self.server.reset_stats()
            try:
                seconds, entries = count_entries(["find", str(mountpoint)], timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                seconds, entries = None, exc.output.count(b"\n") if exc.output else 0
            return seconds, entries, sum(self.server.ops().values())
        finally:
            force_unmount(mountpoint)
            if process is not None:
                stop_process(process, signal.SIGTERM, 10.0)

    def rclone(self, mountpoint: Path) -> subprocess.Popen:
        config = self.work / "rclone.conf"
        config.write_text(
            "[bench]\ntype = s3\nprovider = Other\naccess_key_id = testing\n"
            f"secret_access_key = testing\nendpoint = {self.server.endpoint}\n"
            "force_path_style = true\nlist_version = 2\nregion = us-east-1\n"
        )
        return subprocess.Popen(
            [
                "rclone",
                "mount",
                f"bench:{BUCKET}/{PREFIX.rstrip('/')}",
                str(mountpoint),
                "--config",
                str(config),
                "--read-only",
                "--s3-list-version",
                "2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "rclone.log", "wb"),  # noqa: SIM115
            env=self.env,
        )

    def s3fs(self, mountpoint: Path) -> subprocess.Popen:
        secrets = self.work / "s3fs.passwd"
        secrets.write_text("testing:testing\n")
        secrets.chmod(0o600)
        options = (
            f"ro,url={self.server.endpoint},use_path_request_style,listobjectsv2,"
            f"passwd_file={secrets},endpoint=us-east-1"
        )
        return subprocess.Popen(
            ["s3fs", f"{BUCKET}:/{PREFIX.rstrip('/')}", str(mountpoint), "-f", "-o", options],
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "s3fs.log", "wb"),  # noqa: SIM115
            env=self.env,
        )


def count_entries(argv: list[str], timeout: float = 3600) -> tuple[float, int]:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, timeout=timeout, check=True)
    return time.monotonic() - started, result.stdout.count(b"\n")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def wait_mounted(mountpoint: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while not os.path.ismount(mountpoint):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} was not mounted (exit {process.poll()})")
        time.sleep(0.1)


def force_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
    if os.path.ismount(mountpoint):
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False
        )


def table(rows: list[Row]) -> str:
    def seconds(value: float | None, limit: float) -> str:
        return f"> {limit:.0f} s (timed out)" if value is None else f"{value:.1f} s"

    lines = [
        "| keys | snapshot (CPU: ours / server) | file size | mount from file "
        "| S3 requests at mount | mount from the same file again | `find` (entries) "
        "| S3 requests during find + ls "
        "| `ls` 100k-dir | daemon peak RSS | rclone `find` (requests) | s3fs `find` (requests) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peers = []
        for name in ("rclone", "s3fs"):
            if name not in r.peers:
                peers.append("-")
                continue
            value, entries, requests = r.peers[name]
            done = "" if value is not None else f", {entries:,} entries"
            peers.append(f"{seconds(value, ARGS.peer_timeout)} ({requests:,}{done})")
        lines.append(
            f"| {r.keys:,} | {r.snapshot_s:.1f} s ({r.snapshot_cpu_s:.0f} s / "
            f"{r.snapshot_server_cpu_s:.0f} s) | {r.file_bytes / 1e6:.1f} MB | "
            f"{r.mount_s:.1f} s | {fmt_ops(r.mount_ops)} | {r.remount_s:.2f} s | {r.find_s:.1f} s "
            f"({r.find_entries:,}) | {sum(r.find_ops.values())} | {r.ls_big_s:.2f} s "
            f"({r.ls_big_entries:,}) | {r.rss_mib:.0f} MiB | {peers[0]} | {peers[1]} |"
        )
    return "\n".join(lines)


def fmt_ops(ops: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) or "none"


def main() -> int:
    if os.geteuid() != 0:
        print("bench_snapshot: run as root (it mounts)", file=sys.stderr)
        return 2
    rows = []
    for n in ARGS.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-snapshot-{n}-", dir="/var/tmp"))
        try:
            with S3Server() as server:
                rows.append(
                    Bench(server, work).run_size(
                        n, peers=ARGS.peers, peer_timeout=ARGS.peer_timeout
                    )
                )
        finally:
            for mountpoint in work.glob("mnt-*"):
                force_unmount(mountpoint)
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
    print(
        f"\nmachine: {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.platform()}, load average at the end: {os.getloadavg()[0]:.1f}\n"
    )
    print(table(rows))
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="10000,100000,1000000",
        type=lambda text: [int(x) for x in text.split(",")],
    )
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=900.0,
        help="seconds each peer's find may take (default 900)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(main())
