"""The contenders: our ``s3datafs mount``, s3fs-fuse, ``rclone mount``, and boto3 ceilings.

Every mount is a context manager yielding a :class:`Mounted` (mount point, serving pid, how long
the mount took) and *always* unmounts on exit, whatever happened: the contender's own unmount
(``s3datafs unmount``, or ``fusermount3 -u``), then ``fusermount3 -u -z``, then SIGKILL of the
process it started. Peers run in the foreground as our child processes (``s3fs -f``, ``rclone
mount`` without ``--daemon``), so their pid is known for CPU and RSS and nothing outlives the run.

Peers are configured as their documentation suggests for a read-only S3-compatible endpoint and
otherwise left at their defaults:

- s3fs-fuse: ``-o ro,url=...,use_path_request_style,endpoint=us-east-1`` with a 0600 passwd file,
  with and without ``kernel_cache`` (without it, s3fs drops the page cache on every open).
- rclone: an S3 remote (provider ``Other``, path style) given by ``RCLONE_CONFIG_S3_*`` variables
  and an empty config file; ``--read-only`` and ``--vfs-cache-mode off`` or ``full`` with a
  per-run ``--cache-dir``.

Ceilings (what a program could do with the same backend and no filesystem) are plain boto3 calls:
parallel download of one object (16 threads, 8 MiB parts) into memory and discarded, download to
local disk then read, one ranged GET per read, one GET per small file.
"""

from __future__ import annotations

import compileall
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .env import BUCKET, ROOT, MiB, child_env, clean_aws_env, s3_client
from .workloads import Done

MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0
POLL = 0.002


@dataclass
class Mounted:
    """A live mount: where, served by which pid, and how long mounting took."""

    path: Path
    pid: int
    mount_seconds: float


class Contender(Protocol):
    name: str

    def mount(self, endpoint: str, prefix: str, mountpoint: Path, cache_dir: Path) -> Any:
        """A context manager yielding a :class:`Mounted` of ``s3://BUCKET/prefix``."""


# ---------------------------------------------------------------- mount table and cleanup


def is_mounted(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as table:
        return any(line.split()[4] == target for line in table)


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll the mount table until ``path`` is mounted; raise if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before mounting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout}s")
        time.sleep(POLL)


def force_unmount(path: Path, proc: subprocess.Popen[bytes] | None = None, pid: int = 0) -> None:
    """Unmount ``path`` gracefully, else lazily; end the serving process in any case."""
    if is_mounted(path):
        _run(["fusermount3", "-u", str(path)])
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(UNMOUNT_TIMEOUT)
    if is_mounted(path):
        _run(["fusermount3", "-u", "-z", str(path)])
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    elif pid and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run(
    cmd: list[str], *, timeout: float = UNMOUNT_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- ours


@dataclass
class Ours:
    """``s3datafs mount`` in an isolated environment (paths under ``root``, clean AWS env)."""

    root: Path
    extra_args: tuple[str, ...] = ()
    name: str = "s3datafs"

    def _cli(self, endpoint: str, *args: str, timeout: float = MOUNT_TIMEOUT) -> Any:
        cmd = [sys.executable, "-m", "s3datafs", *args]
        return _run(cmd, timeout=timeout, env=child_env(endpoint, self.root))

    def package(self) -> Path:
        """The ``s3datafs`` package the command runs (``python -m`` from the repository)."""
        return ROOT / "s3datafs"

    def daemon_pid(self, endpoint: str, mountpoint: Path) -> int:
        """Our daemon's pid, from ``s3datafs status --json``."""
        result = self._cli(endpoint, "status", "--json")
        for row in json.loads(result.stdout or "[]"):
            if row.get("mountpoint") == str(mountpoint):
                return int(row.get("pid") or 0)
        return 0

    @contextlib.contextmanager
    def mount(
        self, endpoint: str, prefix: str, mountpoint: Path, cache_dir: Path
    ) -> Iterator[Mounted]:
        mountpoint.parent.mkdir(parents=True, exist_ok=True)
        args = ["mount", f"s3://{BUCKET}/{prefix}", str(mountpoint), "--cache-dir", str(cache_dir)]
        compile_package(self.package())
        started = time.perf_counter()
        pid = 0
        try:
            result = self._cli(endpoint, *args, *self.extra_args)
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise RuntimeError(f"s3datafs mount failed: {result.stderr.strip()}")
            pid = self.daemon_pid(endpoint, mountpoint)
            yield Mounted(mountpoint, pid, elapsed)
        finally:
            if is_mounted(mountpoint):
                self._cli(endpoint, "unmount", str(mountpoint), timeout=UNMOUNT_TIMEOUT)
            force_unmount(mountpoint, pid=pid)


def compile_package(package: Path) -> None:
    """Byte-compile ``package`` (if not done yet), as installing it (pip, a distribution) does.

    The source tree is run in place, and with ``PYTHONDONTWRITEBYTECODE`` in the environment (as
    it may be here) every command would compile its ~35 modules from source again, ~40 ms that
    no installed copy spends. Up-to-date files are left alone (checked by modification time).
    """
    compileall.compile_dir(package, quiet=1)


# ---------------------------------------------------------------- s3fs-fuse


@dataclass
class S3fs:
    """s3fs-fuse in the foreground, read-only, path-style, optionally with ``kernel_cache``."""

    root: Path
    kernel_cache: bool
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or ("s3fs-kc" if self.kernel_cache else "s3fs")

    def _passwd(self) -> Path:
        path = self.root / "s3fs.passwd"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write("testing:testing\n")
        return path

    @contextlib.contextmanager
    def mount(
        self, endpoint: str, prefix: str, mountpoint: Path, cache_dir: Path
    ) -> Iterator[Mounted]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        options = [
            "ro",
            f"url={endpoint}",
            "use_path_request_style",
            "endpoint=us-east-1",
            f"passwd_file={self._passwd()}",
            *(["kernel_cache"] if self.kernel_cache else []),
        ]
        source = f"{BUCKET}:/{prefix.rstrip('/')}"
        cmd = ["s3fs", source, str(mountpoint), "-f", "-o", ",".join(options)]
        with _peer_process(cmd, mountpoint, self.root / f"{self.name}.log") as mounted:
            yield mounted


# ---------------------------------------------------------------- rclone


@dataclass
class Rclone:
    """``rclone mount`` of an S3 remote (provider Other, path style), read-only."""

    root: Path
    cache_mode: str  # "off" or "full"
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"rclone-{self.cache_mode}"

    def _env(self, endpoint: str) -> dict[str, str]:
        env = child_env(endpoint, self.root)
        env.update(
            RCLONE_CONFIG_S3_TYPE="s3",
            RCLONE_CONFIG_S3_PROVIDER="Other",
            RCLONE_CONFIG_S3_ENDPOINT=endpoint,
            RCLONE_CONFIG_S3_ACCESS_KEY_ID="testing",
            RCLONE_CONFIG_S3_SECRET_ACCESS_KEY="testing",
            RCLONE_CONFIG_S3_REGION="us-east-1",
            RCLONE_CONFIG_S3_FORCE_PATH_STYLE="true",
        )
        return env

    @contextlib.contextmanager
    def mount(
        self, endpoint: str, prefix: str, mountpoint: Path, cache_dir: Path
    ) -> Iterator[Mounted]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        config = self.root / "rclone.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.touch()
        cmd = ["rclone", "mount", f"s3:{BUCKET}/{prefix.rstrip('/')}", str(mountpoint)]
        cmd += ["--read-only", "--vfs-cache-mode", self.cache_mode, "--cache-dir", str(cache_dir)]
        cmd += ["--config", str(config), "--log-level", "NOTICE"]
        log = self.root / f"{self.name}.log"
        with _peer_process(cmd, mountpoint, log, env=self._env(endpoint)) as mounted:
            yield mounted


@contextlib.contextmanager
def _peer_process(
    cmd: list[str], mountpoint: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[Mounted]:
    """Start a foreground FUSE server, wait for its mount, always unmount and reap it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env or clean_aws_env()
        )
        try:
            wait_mounted(mountpoint, proc, MOUNT_TIMEOUT)
            yield Mounted(mountpoint, proc.pid, time.perf_counter() - started)
        finally:
            force_unmount(mountpoint, proc)


# ---------------------------------------------------------------- boto3 ceilings


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=16
    )


def parallel_download(endpoint: str, key: str) -> float:
    """Seconds to download ``key`` with 16 threads in 8 MiB parts into memory (discarded)."""
    client = s3_client(endpoint)
    started = time.perf_counter()
    client.download_fileobj(BUCKET, key, _Discard(), Config=transfer_config())
    return time.perf_counter() - started


def download_to_disk(endpoint: str, key: str, path: Path) -> float:
    """Seconds to download ``key`` to the local file ``path`` (16 threads, 8 MiB parts)."""
    client = s3_client(endpoint)
    started = time.perf_counter()
    client.download_file(BUCKET, key, str(path), Config=transfer_config())
    return time.perf_counter() - started


def ranged_gets(endpoint: str, key: str, plan: list[list[int]], size: int, deadline: float) -> Done:
    """One ranged GET per read (``size`` bytes at each offset), one thread per list in ``plan``."""
    client = s3_client(endpoint, pool=max(len(plan), 1))

    def worker(offsets: list[int]) -> int:
        for done, offset in enumerate(offsets):
            if time.monotonic() > deadline:
                return done
            rng = f"bytes={offset}-{offset + size - 1}"
            client.get_object(Bucket=BUCKET, Key=key, Range=rng)["Body"].read()
        return len(offsets)

    started = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        done = sum(pool.map(worker, plan))
    capped = done < sum(len(offsets) for offsets in plan)
    return Done(done, done * size, time.perf_counter() - started, capped)


def get_many(endpoint: str, keys: list[str], threads: int, deadline: float) -> Done:
    """GET every key whole with ``threads`` threads."""
    client = s3_client(endpoint, pool=threads)

    def get(key: str) -> int:
        if time.monotonic() > deadline:
            return -1
        return len(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = [n for n in pool.map(get, keys) if n >= 0]
    return Done(len(sizes), sum(sizes), time.perf_counter() - started, len(sizes) < len(keys))


def first_ranged_get(endpoint: str, key: str) -> float:
    """Seconds for a fresh boto3 client to return the first 4 KiB of ``key``."""
    started = time.perf_counter()
    client = s3_client(endpoint, pool=1)
    client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-4095")["Body"].read()
    return time.perf_counter() - started


def list_all(endpoint: str, prefix: str) -> Done:
    """A paginated ListObjectsV2 of ``prefix`` (ops = keys listed)."""
    client = s3_client(endpoint, pool=1)
    started = time.perf_counter()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        count += len(page.get("Contents", []))
    return Done(count, 0, time.perf_counter() - started)
