"""Faults through real FUSE mounts: the real command, a real daemon, the fault proxy in front of S3.

The promise under test: a read returns the pinned bytes, or a clear error within a bounded time;
never wrong bytes, never a hung process, never a corrupt cache.

- S3 misbehaving (via ``FaultProxy``): transient faults are retried and reads are exact;
  permanent errors reach the reader as their errno at once; ``--read-timeout`` bounds a read
  against a stalled S3 while metadata keeps working, and reads succeed once S3 is back;
  responses of the wrong length or range are never served; random faults under random reads
  (hypothesis) never change a byte.
- The cache misbehaving: corrupted and truncated block files are discarded and refetched; the
  cache directory deleted, made read-only or full while mounted costs one warning, not a read.
- The daemon killed (``kill -9``) mid-read: the mount is dead, ``unmount`` cleans it up, a remount
  reuses the cache and serves exact bytes.

Reads that must reach the daemon drop the file's pages first (``posix_fadvise(DONTNEED)``): the
mount lets the kernel keep pages, which would otherwise hide the daemon.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cli, errno_of, mount_stats, sha256
from faultproxy import FaultProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.s3server import S3Server
from s3datafs import failurelog, linkrate, runtime
from s3datafs.cache import blockfile, disk

pytestmark = pytest.mark.fuse

KiB, MiB = 1024, 1024 * 1024
RETRIED = r"retrying s3://"  # DEBUG lines: none in the log a mount writes by default


def put(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def mount_via(cli: Cli, proxy: FaultProxy, uri: str, *options: str) -> Path:
    return cli.mount(uri, "--endpoint-url", proxy.endpoint, *options)


def mounted_slow(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, size: int, *, rate: int
) -> tuple[str, bytes, Path]:
    """A bucket with a random ``p/big.bin`` of ``size`` bytes, mounted through the proxy, which
    then sends every body at ``rate`` bytes/s per connection (a slow link)."""
    bucket = make_bucket(versioned=True)
    body = os.urandom(size)
    put(s3, bucket, {"p/big.bin": body})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/")
    proxy.inject("throttle", rate=rate, times=None)
    return bucket, body, mountpoint


def uncached_read(path: Path, offset: int = 0, size: int | None = None) -> bytes:
    """Read through the daemon: the file's kernel pages are dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if size is None:
            size = os.fstat(fd).st_size - offset
        chunks, position = [], offset
        while position < offset + size:
            chunk = os.pread(fd, min(MiB, offset + size - position), position)
            if not chunk:
                break
            chunks.append(chunk)
            position += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def files_behind(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, *, count: int, timeout: float
) -> tuple[Path, dict[str, bytes]]:
    """``count`` files of ~300 KiB in a new bucket (by key), mounted through the proxy."""
    bucket = make_bucket()
    files = {f"p/f{i}.bin": os.urandom(300 * KiB + i) for i in range(count)}
    put(s3, bucket, files)
    return mount_via(cli, proxy, f"s3://{bucket}/p/", "--read-timeout", f"{timeout:g}"), files


def read_all_at_once(mountpoint: Path, names: list[str]) -> list[tuple[int, float]]:
    """(errno, seconds) of reading each of ``names`` through the daemon, all at once."""
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: timed_errno(lambda: uncached_read(mountpoint / n)),
                             names))


def timed_errno(action: Callable[[], object]) -> tuple[int, float]:
    started = time.monotonic()
    code = errno_of(action)
    return code, time.monotonic() - started


def eventually(read: Callable[[], bytes], timeout: float = 10.0) -> bytes:
    """``read()`` once it stops failing: a slow failure is repeated for a moment (one second)
    so that the kernel's own immediate retry of a failed read does not double the wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except OSError:
            assert time.monotonic() < deadline, "reads did not recover after S3 came back"
            time.sleep(0.05)


def log_lines(cli: Cli, pattern: str) -> list[str]:
    return [
        line
        for log in cli.log_dir.glob("*.log")
        for line in log.read_text(errors="replace").splitlines()
        if pattern in line
    ]


# -- S3 misbehaving --------------------------------------------------------------------------------


def test_transient_faults_are_retried_and_reads_are_exact(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    bucket = make_bucket()
    big, small = os.urandom(3 * MiB + 5), b"small file\n" * 100
    put(s3, bucket, {"p/big.bin": big, "p/small.txt": small})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/")
    faults = [
        ("error", {"status": 503, "code": "SlowDown"}),
        ("error", {"status": 500, "code": "InternalError"}),
        ("reset", {}),
        ("truncate", {}),
        ("reset_body", {}),
        ("short", {}),
        ("long", {}),
        ("shift_range", {}),
    ]
    for action, options in faults:
        proxy.inject(action, key="p/big.bin", **options)
    proxy.inject("flip", key="p/small.txt", strip_checksums=True)  # caught by the MD5 ETag
    assert sha256(uncached_read(mountpoint / "big.bin")) == sha256(big)
    assert uncached_read(mountpoint / "small.txt") == small
    assert proxy.injected_count() == len(faults) + 1  # each retried quietly: nothing logged
    assert not log_lines(cli, RETRIED)


def test_a_503_storm_logs_each_failed_read_once_and_no_retry(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    mountpoint, _files = files_behind(cli, s3, make_bucket, proxy, count=8, timeout=3)
    cli.expect_log(r"giving up on s3://|within 3s")
    proxy.inject("error", status=503, code="SlowDown", times=None)
    names = sorted(os.listdir(mountpoint))
    outcomes = [got for got, _took in read_all_at_once(mountpoint, names)]
    assert outcomes == [errno.EIO] * len(names)
    assert proxy.requests["GetObject"] > 2 * len(names)  # retried, with backoff
    assert not log_lines(cli, RETRIED)
    errors = log_lines(cli, " ERROR ")
    assert 0 < len(errors) <= len(names), errors  # the kernel's retry is not a second line


def test_an_outage_writes_a_few_lines_to_the_log_not_one_per_file(
    cli: Cli, s3server: S3Server, make_bucket, proxy: FaultProxy
) -> None:
    # A data loader that skips what it cannot read goes through the whole dataset; days of that
    # (a revoked role) must not fill the disk with the log.
    bucket = make_bucket()
    files = 4 * failurelog.BURST
    s3server.populate(bucket, ((f"d/f{i:04d}.bin", 1024) for i in range(files)))
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/d/", "--prefetch-files", "0")
    cli.expect_log("access denied to")
    proxy.inject("error", status=403, code="AccessDenied", times=None)
    for path in sorted(mountpoint.iterdir()):
        assert timed_errno(functools.partial(uncached_read, path))[0] == errno.EACCES
    assert len(log_lines(cli, " ERROR ")) == failurelog.BURST


@pytest.mark.parametrize(
    ("status", "code", "expected", "log"),
    [
        pytest.param(403, "AccessDenied", errno.EACCES, "access denied to", id="403"),
        pytest.param(404, "NoSuchVersion", errno.ESTALE, "changed or was deleted", id="404"),
        pytest.param(412, "PreconditionFailed", errno.ESTALE, "changed or was deleted", id="412"),
    ],
)
def test_permanent_errors_reach_the_reader_at_once_and_are_not_retried(
    cli: Cli,
    s3,
    make_bucket,
    proxy: FaultProxy,
    status: int,
    code: str,
    expected: int,
    log: str,
) -> None:
    bucket = make_bucket()
    body = os.urandom(200 * KiB)
    put(s3, bucket, {"p/f.bin": body})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/")
    cli.expect_log(log)
    proxy.inject("error", status=status, code=code, times=None)
    got, took = timed_errno(lambda: uncached_read(mountpoint / "f.bin"))
    assert got == expected
    assert took < 2.0
    assert proxy.requests["GetObject"] <= 2  # the read and the kernel's one retry: no backoff
    assert not log_lines(cli, RETRIED)
    stats = mount_stats(mountpoint)
    assert 1 <= stats["failed_reads"] <= 2  # what an operator sees (and status shows)
    assert stats["stale_reads"] == (stats["failed_reads"] if expected == errno.ESTALE else 0)
    proxy.clear()
    assert uncached_read(mountpoint / "f.bin") == body  # nothing was remembered as broken


@pytest.mark.parametrize(
    ("what", "versioned", "fault", "said"),
    [
        ("p/", False, {"action": "reset", "op": "ListObjectsV2"},
         "cannot reach S3 for s3://{bucket}/p/: "),
        ("p/", True, {"action": "error", "op": "ListObjectVersions", "status": 503,
                      "code": "SlowDown"}, "S3 error on s3://{bucket}/p/: SlowDown: "),
        ("p/a.bin --as-of", True, {"action": "reset", "op": "ListObjectVersions"},
         "cannot reach S3 for s3://{bucket}/p/a.bin: "),
        ("p/a.bin --as-of", True, {"action": "error", "op": "ListObjectVersions", "status": 403,
                                   "code": "AccessDenied"},
         "access denied to s3://{bucket}/p/a.bin (AccessDenied) (S3 said: injected by the "
         "fault proxy): listing a versioned bucket needs s3:ListBucketVersions; "),
    ],
    ids=["list-reset", "versions-503", "as-of-key-reset", "as-of-key-denied"],
)
def test_a_listing_that_fails_at_mount_is_one_line_and_nothing_is_mounted(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, what: str, versioned: bool, fault: dict,
    said: str,
) -> None:
    """S3 fails every listing request (after botocore's own retries): the mount fails with one
    line that names the dataset, and leaves no mount and no mount point behind."""
    bucket = make_bucket(versioned=versioned)
    put(s3, bucket, {"p/a.bin": b"a", "p/b.bin": b"b"})
    key, *options = what.split()
    if options:
        options.append(datetime.datetime.now(datetime.UTC).isoformat())
    proxy.inject(**fault, times=None)
    target = cli.root / "m"
    result = cli.run("mount", f"s3://{bucket}/{key}", str(target), *options,
                     "--endpoint-url", proxy.endpoint)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr.startswith("s3datafs: " + said.format(bucket=bucket)), result.stderr
    assert result.stderr.count("\n") == 1
    assert proxy.injected  # the listing was refused, not the mount for another reason
    assert cli.mounts_below_root() == []
    assert not target.exists()


@pytest.mark.parametrize("readers", [4, 16])
def test_read_timeout_bounds_reads_against_a_stalled_s3_and_the_mount_recovers(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, readers: int
) -> None:
    """16 readers: more than FUSE's default of 12 background requests in flight."""
    bound = 2.0
    mountpoint, files = files_behind(cli, s3, make_bucket, proxy, count=readers, timeout=bound)
    cli.expect_log(r"no answer from S3 for .* within 2s \(--read-timeout\)")
    proxy.inject("stall", times=None)  # connections accepted, nothing ever answered
    names = sorted(os.listdir(mountpoint))
    for got, took in read_all_at_once(mountpoint, names):  # several stalled readers at once
        assert got == errno.EIO
        assert took < bound + 1.5, f"a read took {took:.1f}s against --read-timeout {bound}"
    # Metadata never waits on S3: the mount stays usable while S3 is stalled.
    started = time.monotonic()
    assert sorted(os.listdir(mountpoint)) == names
    assert os.stat(mountpoint / "f1.bin").st_size == len(files["p/f1.bin"])
    assert os.getxattr(mountpoint / "f1.bin", "user.s3datafs.etag")
    assert time.monotonic() - started < 1.0
    proxy.clear()  # S3 is back
    for name in names:  # each object's timed-out read is repeated for a moment
        assert eventually(lambda n=name: uncached_read(mountpoint / n)) == files[f"p/{name}"]


def start_stuck_reader(path: Path, proxy: FaultProxy) -> subprocess.Popen:
    """A ``cat`` of ``path`` whose GET the (stalling) proxy holds; returns once it is held."""
    reader = subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not proxy.injected_count("stall"):
        assert time.monotonic() < deadline, "the read never reached S3"
        time.sleep(0.01)
    return reader


def test_an_unmount_does_not_wait_for_reads_stuck_on_s3(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    """A request the kernel no longer waits for (its reader was killed) is dropped at unmount.

    Before, the daemon answered it first: with S3 unreachable that took the whole
    --read-timeout (60 s), and ``unmount`` gave up waiting for the daemon after 30 s. The
    kernel then refuses the late answer, which pyfuse3 logs as an error; the daemon drops that
    record (the fixture fails the test on unexpected errors in the log).
    """
    bucket = make_bucket()
    put(s3, bucket, {"p/f.bin": os.urandom(MiB)})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/")  # the default --read-timeout, 60 s
    pid = cli.daemon_pid(mountpoint)
    proxy.inject("stall", times=None)
    reader = start_stuck_reader(mountpoint / "f.bin", proxy)
    reader.kill()
    reader.wait(timeout=10)
    started = time.monotonic()
    result = cli.unmount(mountpoint)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert took < 10, f"unmount took {took:.1f}s"
    assert not os.path.ismount(mountpoint)
    assert not runtime.pid_alive(pid)


def test_sigterm_ends_reads_stuck_on_s3_and_the_daemon_exits(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    bucket = make_bucket()
    put(s3, bucket, {"p/f.bin": os.urandom(MiB)})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/")
    pid = cli.daemon_pid(mountpoint)
    proxy.inject("stall", times=None)
    reader = start_stuck_reader(mountpoint / "f.bin", proxy)
    try:
        os.kill(pid, signal.SIGTERM)
        assert reader.wait(timeout=10) != 0  # its read failed (EIO) instead of hanging
    finally:
        reader.kill()
    deadline = time.monotonic() + 10
    while runtime.pid_alive(pid):
        assert time.monotonic() < deadline, "the daemon did not exit"
        time.sleep(0.05)
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("action", ["short", "long", "shift_range", "drop_range"])
def test_a_response_of_the_wrong_length_or_range_is_never_served(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, action: str
) -> None:
    bucket = make_bucket()
    body = os.urandom(9 * MiB)  # over 8 MiB, the largest GET: no GET covers the whole object
    put(s3, bucket, {"p/f.bin": body})
    mountpoint = mount_via(cli, proxy, f"s3://{bucket}/p/", "--read-timeout", "1")
    cli.expect_log(r"giving up on s3://|within 1s")
    proxy.inject(action, times=None)
    assert errno_of(lambda: uncached_read(mountpoint / "f.bin", 4 * KiB, 64 * KiB)) == errno.EIO
    proxy.clear()
    got = eventually(lambda: uncached_read(mountpoint / "f.bin", 4 * KiB, 64 * KiB))
    assert got == body[4 * KiB : 68 * KiB]


# Faults S3 recovers from: every one is retried; flips are left out (a ranged body cannot be
# checked, see s3source), so are stalls (they only cost time).
RANDOM_FAULTS = [
    ("error", {"status": 503, "code": "SlowDown", "probability": 0.08}),
    ("error", {"status": 500, "code": "InternalError", "probability": 0.04}),
    ("reset", {"probability": 0.04}),
    ("truncate", {"probability": 0.04}),
    ("short", {"probability": 0.03}),
    ("shift_range", {"probability": 0.03}),
]


@pytest.fixture
def random_fault_mount(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> tuple[Path, dict[str, bytes], FaultProxy]:
    bucket = make_bucket()
    rng = random.Random(42)
    files = {
        f"p/{name}": rng.randbytes(size)
        for name, size in (
            ("a.bin", 3 * MiB + 17),
            ("b.bin", 700 * KiB),
            ("c.bin", 65 * KiB),
            ("d.bin", 1),
        )
    }
    put(s3, bucket, files)
    # No disk cache and a small memory cache: most reads go to S3, through the faults.
    mountpoint = mount_via(
        cli, proxy, f"s3://{bucket}/p/", "--no-cache", "--memory-cache-size", "512K"
    )
    for action, options in RANDOM_FAULTS:
        proxy.inject(action, times=None, **options)
    return mountpoint, {key[2:]: body for key, body in files.items()}, proxy


READS = st.lists(
    st.tuples(
        st.sampled_from(["a.bin", "b.bin", "c.bin", "d.bin"]),
        st.integers(0, 3 * MiB + 100),  # offsets past EOF too
        st.integers(1, 1536 * KiB),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(reads=READS, concurrency=st.integers(1, 8))
def test_random_reads_under_random_faults_equal_the_reference(
    random_fault_mount: tuple[Path, dict[str, bytes], FaultProxy],
    reads: list[tuple[str, int, int]],
    concurrency: int,
) -> None:
    mountpoint, files, _ = random_fault_mount

    def check(read: tuple[str, int, int]) -> None:
        name, offset, size = read
        got = uncached_read(mountpoint / name, offset, size)
        assert got == files[name][offset : offset + size], read

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(check, reads))


def test_the_random_faults_really_fire(
    random_fault_mount: tuple[Path, dict[str, bytes], FaultProxy],
) -> None:
    """Guards the property test: with these probabilities a few dozen GETs meet faults."""
    mountpoint, files, proxy = random_fault_mount
    for _ in range(3):
        for name, body in files.items():
            assert uncached_read(mountpoint / name) == body
    assert proxy.injected_count() >= 3, proxy.injected


# -- a slow link ----------------------------------------------------------------------------------


def test_on_a_slow_link_large_reads_become_two_gets_of_the_same_bytes(
    cli: Cli, s3, s3server: S3Server, make_bucket, proxy: FaultProxy
) -> None:
    rate = 16 * MiB  # ~17 MB/s per connection
    _, body, mountpoint = mounted_slow(cli, s3, make_bucket, proxy, 64 * MiB, rate=rate)
    s3server.reset_stats()
    # Scattered (no readahead), each in its own 8 MiB region of the disk cache: a run whose
    # region file is known is not split, as the disk may hold it.
    for offset in (9 * MiB, 41 * MiB, 17 * MiB, 33 * MiB, 1 * MiB):
        assert uncached_read(mountpoint / "big.bin", offset, MiB) == body[offset : offset + MiB]
    stats = mount_stats(mountpoint)
    assert 0 < stats["link_bytes_per_second"] < linkrate.SLOW_BYTES_PER_SECOND
    assert stats["split_reads"] >= 1  # once the first GETs showed the link slow
    assert s3server.stats()["get_bytes"] == 5 * MiB  # halves, never a byte twice
    # A half that fails once is retried on its own; the read still gets exactly its bytes.
    proxy.clear()  # rules fire in order: the error first, then the slow link again
    proxy.inject("error", status=503, code="SlowDown", times=1)
    proxy.inject("throttle", rate=rate, times=None)
    assert uncached_read(mountpoint / "big.bin", 57 * MiB, MiB) == body[57 * MiB : 58 * MiB]
    assert proxy.injected_count("error") == 1
    stats_after = mount_stats(mountpoint)
    assert stats_after["split_reads"] == stats["split_reads"] + 1


# -- the cache misbehaving -------------------------------------------------------------------------


def block_files(cache_dir: Path) -> list[Path]:
    """The region files of a cache (each holds up to 8 MiB of one object's blocks)."""
    return sorted(
        p
        for p in (cache_dir / "blocks").rglob("*")
        if p.is_file() and disk.is_region_file(p.name)
    )


def cached_blocks(cache_dir: Path) -> int:
    return disk.usage(cache_dir).blocks


def test_corrupted_and_truncated_cache_blocks_are_discarded_and_refetched(
    cli: Cli, s3, s3server: S3Server, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    body = os.urandom(6 * MiB)
    put(s3, bucket, {"p/big.bin": body})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert sha256(uncached_read(mountpoint / "big.bin")) == sha256(body)
    assert cli.unmount(mountpoint).returncode == 0  # write-behind is drained on unmount
    [region] = block_files(cli.root / "cache")  # 96 blocks of 64 KiB, one region file
    layout = blockfile.Layout(64 * KiB, 128)

    def flip(offset: int) -> None:
        with open(region, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 1]))

    flip(layout.slot_offset(3) + 100)  # chunk 0: one flipped payload bit
    flip(layout.entry_offset(20) + 9)  # chunk 1: a damaged table entry
    with open(region, "r+b") as handle:  # chunk 2: a valid entry of another block
        handle.seek(layout.entry_offset(50))
        entry = handle.read(blockfile.ENTRY_SIZE)
        handle.seek(layout.entry_offset(40))
        handle.write(entry)
    os.truncate(region, layout.slot_offset(88) + 10)  # chunk 5: its second half cut off
    cli.expect_log("discarding (corrupt cache block|8 corrupt cache blocks)")
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3server.reset_stats()
    chunk4 = uncached_read(mountpoint / "big.bin", 4 * MiB, MiB)  # the intact chunk
    assert chunk4 == body[4 * MiB : 5 * MiB]
    assert s3server.stats()["get_bytes"] == 0
    for chunk in (5, 2, 1, 0):  # backwards, one chunk per open: no readahead across chunks
        got = uncached_read(mountpoint / "big.bin", chunk * MiB, MiB)
        assert got == body[chunk * MiB : (chunk + 1) * MiB], chunk
    assert 0 < s3server.stats()["get_bytes"] <= 4 * MiB  # at most the four damaged chunks
    assert len(log_lines(cli, "discarding corrupt cache block ")) == 3  # chunks 0, 1 and 2
    assert len(log_lines(cli, "discarding 8 corrupt cache blocks, between 88 and 95")) == 1
    assert sha256(uncached_read(mountpoint / "big.bin")) == sha256(body)
    assert cli.unmount(mountpoint).returncode == 0
    cache = disk.DiskCache(cli.root / "cache", block_size=64 * KiB, capacity=1 << 30)
    digest = region.name.split(".")[0]
    found = cache.read_run(digest, len(body), range(96))  # stored again, whole
    assert b"".join(found[i] for i in range(96)) == body


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "none", str(path)],
        check=False,
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


CACHE_WARNING = "cannot write to the block cache"


@pytest.mark.parametrize("trouble", ["read-only", "full", "deleted"])
def test_cache_dir_trouble_while_mounted_never_fails_a_read(
    cli: Cli, s3, make_bucket, trouble: str
) -> None:
    """Read-only or full: every read still works (from S3) and the failed cache writes cost one
    warning (rate-limited), not one per write. Deleted: reads work and the cache makes itself
    again, as private (0700/0600) as before, with no warning at all."""
    bucket = make_bucket()
    files = {f"p/f{i}.bin": os.urandom(MiB + i) for i in range(8)}
    put(s3, bucket, files)
    size = "3m" if trouble == "full" else "64m"
    with tmpfs(cli.root / "cachefs", size) as cache_dir:
        mountpoint = cli.mount(
            f"s3://{bucket}/p/",
            *("--cache-dir", str(cache_dir), "--cache-min-free", "0"),
            *("--memory-cache-size", "1M"),  # re-reads go to the disk cache, or S3
        )
        try:
            cli.expect_log(CACHE_WARNING)
            assert uncached_read(mountpoint / "f0.bin") == files["p/f0.bin"]
            if trouble == "deleted":
                subprocess.run(["rm", "-rf", *map(str, cache_dir.iterdir())], check=True)
            elif trouble == "read-only":
                remount_read_only(cache_dir)
            for _ in range(2):  # each read stores ~1 MiB: a 3 MiB cache overflows
                for name in sorted(files):
                    assert uncached_read(mountpoint / name[2:]) == files[name]
            if trouble == "deleted":
                assert mount_stats(mountpoint)["cache_write_errors"] == 0
                assert not log_lines(cli, CACHE_WARNING)
                assert len({p.name.split(".")[0] for p in block_files(cache_dir)}) == len(files)
                assert_private(cache_dir)
                return
            deadline = time.monotonic() + 10  # write-behind: the errors come after the reads
            while mount_stats(mountpoint)["cache_write_errors"] < 2:
                assert time.monotonic() < deadline, mount_stats(mountpoint)
                time.sleep(0.05)
            assert len(log_lines(cli, CACHE_WARNING)) == 1  # rate-limited: not one per write
        finally:
            assert cli.unmount(mountpoint).returncode == 0


def test_cache_min_free_reaches_the_mounts_disk_cache(cli: Cli, s3, make_bucket) -> None:
    """With 99 % of a cache filesystem to keep free, and 6 % of it taken by another file,
    nothing is cached; every read is still served."""
    bucket = make_bucket()
    body = os.urandom(2 * MiB)
    put(s3, bucket, {"p/f.bin": body})
    with tmpfs(cli.root / "cachefs", "16m") as filesystem:
        (filesystem / "other").write_bytes(bytes(MiB))  # not the cache's: never evicted
        cache_dir = filesystem / "cache"
        mountpoint = cli.mount(f"s3://{bucket}/p/", "--cache-dir", str(cache_dir),
                               "--cache-min-free", "99%")
        try:
            cli.expect_log(CACHE_WARNING)
            assert uncached_read(mountpoint / "f.bin") == body
            deadline = time.monotonic() + 10  # write-behind: the errors come after the reads
            while mount_stats(mountpoint)["cache_write_errors"] == 0:
                assert time.monotonic() < deadline, mount_stats(mountpoint)
                time.sleep(0.05)
        finally:
            assert cli.unmount(mountpoint).returncode == 0
        assert block_files(cache_dir) == []


def test_prefetch_into_a_full_cache_disk_says_it_is_not_warm(cli: Cli, s3, make_bucket) -> None:
    """A mount reads on when the cache cannot be written; prefetch exists only to fill it, so
    it fails, in one line, rather than report a warm cache that is not."""
    bucket = make_bucket()
    files = {f"p/f{i}.bin": os.urandom(MiB + i) for i in range(6)}
    put(s3, bucket, files)
    with tmpfs(cli.root / "cachefs", "3m") as cache_dir:
        result = cli.run("prefetch", f"s3://{bucket}/p/", "--cache-dir", str(cache_dir),
                         "--cache-min-free", "0")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(rf"s3datafs: \d+ runs of s3://{bucket}/p/ could not be written to the "
                        r"cache \(see above\): it is not warm", last), result.stderr
    assert CACHE_WARNING in result.stderr


def fill(directory: Path) -> None:
    """Take every free byte of ``directory``'s filesystem."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"f" * MiB, b"f" * 4096, b"f"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("full", ["cache", "runtime"])
def test_a_full_disk_at_mount_is_one_line_and_nothing_is_left_mounted(
    cli: Cli, s3, make_bucket, full: str
) -> None:
    """The catalog is built under the cache dir, the state file written in the runtime dir:
    either disk full gave "internal error: OperationalError" / "OSError" (review, session 20)."""
    bucket = make_bucket()
    put(s3, bucket, {f"p/f{i}.bin": b"x" * 1000 for i in range(50)})
    with tmpfs(cli.root / "full", "256k") as directory:
        (directory / "catalogs").mkdir(mode=0o700)
        fill(directory)
        if full == "cache":
            result = cli.run("mount", f"s3://{bucket}/p/", "--cache-dir", str(directory))
            said = (f"cannot write the dataset's catalog under {directory} "
                    "(database or disk is full)")
        else:
            result = cli.run("mount", f"s3://{bucket}/p/",
                             env={**cli.env, "S3DATAFS_RUNTIME_DIR": str(directory)})
            said = f"cannot write the mount's state file in {directory} (No space left on device)"
        assert result.returncode == 1
        assert result.stderr.startswith(f"s3datafs: {said}: free space there"), result.stderr
        assert result.stderr.count("\n") == 1
        assert cli.mounts_below_root() == [str(directory)]  # the full tmpfs, no FUSE mount
        assert not list(directory.glob(".state-*"))  # the half-written state file is removed
    cli.expect_log("cannot write")


def test_a_cache_dir_out_of_inodes_at_mount_is_one_line_and_nothing_is_left_mounted(
    cli: Cli, s3, make_bucket
) -> None:
    """Making the catalogs' directory is refused (ENOSPC): an OSError, not sqlite's error."""
    bucket = make_bucket()
    put(s3, bucket, {"p/f.bin": b"x"})
    with tmpfs(cli.root / "no-inodes", "256k,nr_inodes=1") as directory:  # the root's only
        result = cli.run("mount", f"s3://{bucket}/p/", "--cache-dir", str(directory))
        assert result.returncode == 1
        assert result.stderr == (
            f"s3datafs: cannot write the dataset's catalog under {directory} (No space left on "
            "device): free space there, or choose another --cache-dir\n"
        )
        assert cli.mounts_below_root() == [str(directory)]  # the tmpfs, no FUSE mount
    cli.expect_log("cannot write")


def remount_read_only(path: Path) -> None:
    """``mount -o remount,ro``, retried while it is busy: the kernel refuses while a file is
    open for writing, as a region file is for the moment a cache write (behind the read) takes.
    """
    deadline = time.monotonic() + 10
    command = ["mount", "-o", "remount,ro", str(path)]
    while subprocess.run(command, capture_output=True, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{path} stayed busy: cannot make it read-only"
        time.sleep(0.05)


def assert_private(cache_dir: Path) -> None:
    """Every directory of the cache is 0700 and every block file 0600."""
    for directory, _dirs, names in os.walk(cache_dir / "blocks"):
        assert os.stat(directory).st_mode & 0o777 == 0o700, directory
        for name in names:
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600, name


# -- the daemon killed -----------------------------------------------------------------------------


def test_kill_9_mid_read_then_unmount_cleans_up_and_a_remount_reuses_the_cache(
    cli: Cli, s3, s3server: S3Server, make_bucket, proxy: FaultProxy
) -> None:
    # A slow link: the kill lands mid-read.
    bucket, body, mountpoint = mounted_slow(cli, s3, make_bucket, proxy, 32 * MiB, rate=2 * MiB)
    outcome: list[BaseException | bytes] = []

    def reader() -> None:
        try:
            outcome.append(uncached_read(mountpoint / "big.bin"))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while cached_blocks(cli.root / "cache") < 3:  # some blocks are cached, the read goes on
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no block was cached"
        time.sleep(0.02)
    os.kill(cli.daemon_pid(mountpoint), signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive(), "a reader hung on a dead mount"
    assert isinstance(outcome[0], OSError)
    assert outcome[0].errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
    assert errno_of(lambda: os.listdir(mountpoint)) == errno.ENOTCONN  # a dead mount
    assert "dead" in cli.run("status").stdout
    result = cli.unmount(mountpoint)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)

    proxy.clear()
    cached_before = cached_blocks(cli.root / "cache")
    mountpoint = cli.mount(f"s3://{bucket}/p/")  # straight to S3: count what is fetched again
    s3server.reset_stats()
    assert hashlib.sha256(uncached_read(mountpoint / "big.bin")).hexdigest() == sha256(body)
    assert 0 < s3server.stats()["get_bytes"] < len(body)  # the cache was reused
    assert cached_before >= 3
    cache = cli.root / "cache"
    deadline = time.monotonic() + 10  # the start-up scan sweeps the dead daemon's temp files
    while list(cache.rglob(".tmp.*")):
        assert time.monotonic() < deadline, list(cache.rglob(".tmp.*"))
        time.sleep(0.05)
