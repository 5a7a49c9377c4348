"""The benchmark's environment: the S3 server, its dataset, clients, counters, process metrics.

- :class:`Backend` runs ``devtools/s3server.py`` (moto with the fast ranged-GET path and
  keep-alive) with every object kept in memory (``MOTO_S3_DEFAULT_KEY_BUFFER_SIZE``; otherwise
  moto spools objects over 5 MiB to temp files, which ``drop_caches`` would then push to disk and
  slow the *server* down for whoever reads after a drop).
- :class:`Dataset` describes what is uploaded once per run: one big file under ``big/`` and a tree
  of small files under ``small/`` in one bucket, random bytes.
- :class:`S3Counter` reads the server-side counters around a workload: requests by operation and
  GetObject body bytes, once they have stopped moving. The server is the only honest witness: it
  counts what really left it, including readahead a contender started but never used.
- Process metrics come from ``/proc``: CPU seconds (utime + stime, the process and its threads)
  and peak RSS (``VmHWM``).
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.s3server import S3Server, clean_aws_env  # noqa: E402

BUCKET = "s3datafs-bench"
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE = 0.1  # seconds the server's counters must stand still to count as final
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Dataset:
    """One big object and ``small_count`` small ones spread over ``small_dirs`` directories."""

    big_size: int = 1 << 30
    small_count: int = 2000
    small_size: int = 64 << 10
    small_dirs: int = 20

    big_prefix: str = "big/"
    big_name: str = "data.bin"
    small_prefix: str = "small/"

    @property
    def big_key(self) -> str:
        return self.big_prefix + self.big_name

    def small_names(self) -> list[str]:
        """Relative paths (below ``small_prefix``) of the small files, in a fixed order."""
        per_dir = -(-self.small_count // self.small_dirs)
        return [f"d{i // per_dir:03d}/f{i:05d}.bin" for i in range(self.small_count)]


def s3_client(endpoint: str, *, pool: int = 32) -> Any:
    """A boto3 client for ``endpoint`` with dummy keys, path style and a pool of ``pool``."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(
            max_pool_connections=pool,
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


class Backend:
    """The S3 server process for a whole run; a context manager."""

    def __init__(self, port: int = 0) -> None:
        env = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(8 << 30)}
        self.server = S3Server(env=env, port=port)

    def __enter__(self) -> Backend:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def upload(self, dataset: Dataset, log: Any = print) -> None:
        """Create the bucket and upload the dataset (random bytes), multipart for the big one."""
        from boto3.s3.transfer import TransferConfig

        client = s3_client(self.endpoint)
        client.create_bucket(Bucket=BUCKET)
        started = time.monotonic()
        body = _RandomReader(dataset.big_size)
        config = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
        client.upload_fileobj(body, BUCKET, dataset.big_key, Config=config)
        small = os.urandom(dataset.small_size * 16)

        def put(item: tuple[int, str]) -> None:
            index, name = item
            start = (index * 4099) % (len(small) - dataset.small_size)
            data = small[start : start + dataset.small_size]
            client.put_object(Bucket=BUCKET, Key=dataset.small_prefix + name, Body=data)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, enumerate(dataset.small_names())))
        log(f"uploaded dataset in {time.monotonic() - started:.1f}s")


class _RandomReader(io.RawIOBase):
    """``size`` random bytes, generated as they are read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = os.urandom(n)
        self.left -= n
        return n


@dataclass
class S3Delta:
    """What the server saw during one workload."""

    requests: int = 0
    get_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class S3Counter:
    """Reset the server's counters, run something, read what it counted."""

    def __init__(self, backend: Backend) -> None:
        self.server = backend.server

    def reset(self) -> None:
        self.server.reset_stats()

    def read(self, settle: float = SETTLE, limit: float = 3.0) -> S3Delta:
        """The counts once they stop moving (for ``settle`` s; at most ``limit`` s of waiting).

        Transfers a workload started (readahead, a stream a peer abandoned) may still be running
        when it returns; they are part of what the workload cost.
        """
        stats, deadline = self.server.stats(), time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(settle)
            again = self.server.stats()
            if (again["ops"], again["get_bytes"]) == (stats["ops"], stats["get_bytes"]):
                break
            stats = again
        ops = {op: n for op, n in stats["ops"].items() if n}
        return S3Delta(requests=sum(ops.values()), get_bytes=stats["get_bytes"], ops=ops)


# ---------------------------------------------------------------- host and processes


def drop_caches() -> None:
    """Write back and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` (all its threads), zeros if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), 0.0 if it is gone."""
    return sum(cpu_times(pid))


def status_kib(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/PID/status (e.g. VmHWM), 0 if absent."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_env(endpoint: str, root: Path) -> dict[str, str]:
    """The environment for ``s3datafs``: clean AWS variables and every path under ``root``."""
    env = clean_aws_env()
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        S3DATAFS_DATA_ROOT=str(root / "data"),
        S3DATAFS_CACHE_DIR=str(root / "cache"),
        S3DATAFS_RUNTIME_DIR=str(root / "run"),
        S3DATAFS_LOG_DIR=str(root / "log"),
    )
    return env


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "scratch_filesystem": filesystem_of(Path("/var/tmp")),
        "versions": {
            "s3fs": _version(["s3fs", "--version"]),
            "rclone": _version(["rclone", "version"]),
        },
    }


def filesystem_of(path: Path) -> str:
    """Type, device and mount options of the filesystem holding ``path`` (from /proc/mounts),
    and, for ext4, whether it has a journal.

    Recorded because cache-file costs depend on them. On ext4 *without a journal* (this VM's
    disk: ``/sys/fs/ext4/<dev>/journal_task`` reads ``<none>``) allocating an inode skips the
    inodes deleted in the last minute or so, one by one (``recently_deleted`` in
    fs/ext4/ialloc.c, checked only when there is no journal): creating a file then costs
    150-900 us of kernel CPU instead of 15-20 us for a while after heavy writes and deletions
    (bench/RESULTS.md, 2026-11-25, session 15). Earlier sessions blamed ``discard`` for it.
    """
    target, best = str(path.resolve()), ("", "", "", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mountpoint, fstype, options = line.split()[:4]
        inside = target == mountpoint or target.startswith(mountpoint.rstrip("/") + "/")
        if inside and len(mountpoint) >= len(best[0]):
            best = (mountpoint, device, fstype, options)
    mountpoint, device, fstype, options = best
    if not mountpoint:
        return "?"
    text = f"{fstype} on {device} at {mountpoint} ({options})"
    if fstype == "ext4":
        journal = Path("/sys/fs/ext4") / Path(device).name / "journal_task"
        with suppress(OSError):
            text += "; no journal" if journal.read_text().strip() == "<none>" else "; journal"
    return text


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError:
        return "missing"
    return out.splitlines()[0].strip() if out else "?"


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    result: list[float] = []
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.append(time.perf_counter() - started)
