"""Members kept decompressed in the disk cache (``archive.decompressed``), through real mounts.

A daemon killed (SIGKILL) in the middle of a decompression into the cache, two mounts sharing a
cache directory decompressing one member at once, ``cache clear`` under a decompression, and a
prefetch into a cache too small for every member's copy. Every byte read is compared with the
member's own; the in-process attacks are in ``test_zip_kept_faults``.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cli, mount_stats, sha256
from test_zip_e2e import put
from zipcraft import make_zip, sample_bytes

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024
READ = 64 * 1024


@functools.cache
def big() -> bytes:
    return sample_bytes(71, 24 * MiB + 17)  # bzip2 decodes it in ~0.7 s


@functools.cache
def big_zip() -> bytes:
    return make_zip({"big.bin": big(), "small.txt": b"small\n"}, methods=(zipfile.ZIP_BZIP2,))


def read_at_random(mountpoints: list[Path], seed: int, count: int = 24) -> None:
    """``count`` reads of 64 KiB past the member's first 8 MiB (a first read before that goes
    the live way) by 4 threads, spread over ``mountpoints``; each compared with the member."""
    rng = random.Random(seed)
    jobs = [(mountpoints[n % len(mountpoints)], rng.randrange(8 * MiB, len(big())))
            for n in range(count)]

    def read(job: tuple[Path, int]) -> None:
        mountpoint, offset = job
        with open(mountpoint / "big.bin", "rb", buffering=0) as member:
            assert os.pread(member.fileno(), READ, offset) == big()[offset: offset + READ], offset

    with ThreadPoolExecutor(4) as readers:
        list(readers.map(read, jobs))


def test_a_daemon_killed_in_a_decompression_leaves_nothing_served_unverified(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """SIGKILL while the member is decompressed into the cache (a read ahead of it has been
    served): the next mount reads exact bytes and decompresses it again (the copy cut short
    has no marker); the mount after that reads it from the disk (no decompression, no GET)."""
    bucket = make_bucket()
    put(s3, bucket, "d.zip", big_zip())
    uri = f"s3://{bucket}/d.zip"
    mountpoint = cli.mount(uri)
    pid = cli.daemon_pid(mountpoint)
    offset = 9 * MiB
    with open(mountpoint / "big.bin", "rb", buffering=0) as member:
        assert os.pread(member.fileno(), READ, offset) == big()[offset: offset + READ]
    os.kill(pid, signal.SIGKILL)  # ~15 MiB still to decompress: ~0.4 s of work left
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "the daemon outlived SIGKILL"
        time.sleep(0.01)
    assert cli.unmount(mountpoint).returncode == 0
    mountpoint = cli.mount(uri)
    read_at_random([mountpoint], seed=1)
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(big())
    assert mount_stats(mountpoint)["decompressions"] >= 1
    assert cli.unmount(mountpoint).returncode == 0
    s3server.reset_stats()
    mountpoint = cli.mount(uri)
    read_at_random([mountpoint], seed=2)
    counts = mount_stats(mountpoint)
    assert (counts["decompressions"], counts["s3_requests"]) == (0, 0)
    assert "GetObject" not in s3server.ops()
    assert cli.unmount(mountpoint).returncode == 0


def test_two_mounts_sharing_a_cache_decompress_one_member_at_once(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Two daemons on one cache directory, random readers on both at once: each decompresses
    the member into the cache (two copies, one marker), every byte is exact, and a third mount
    reads it from the disk."""
    bucket = make_bucket()
    put(s3, bucket, "d.zip", big_zip())
    uri = f"s3://{bucket}/d.zip"
    first = cli.mount(uri)
    second = cli.mount(uri, str(cli.root / "second"))
    read_at_random([first, second], seed=3, count=40)
    for mountpoint in (first, second):
        assert 1 <= mount_stats(mountpoint)["decompressions"] <= 2
        assert cli.unmount(mountpoint).returncode == 0
    s3server.reset_stats()
    third = cli.mount(uri)
    read_at_random([third], seed=4)
    counts = mount_stats(third)
    assert (counts["decompressions"], counts["s3_requests"]) == (0, 0)
    assert cli.unmount(third).returncode == 0


def test_cache_clear_under_a_decompression(cli: Cli, s3, make_bucket) -> None:
    """``cache clear`` runs while a mount decompresses the member into the cache: reads stay
    exact, and the member is decompressed again once (not at every read)."""
    bucket = make_bucket()
    put(s3, bucket, "d.zip", big_zip())
    uri = f"s3://{bucket}/d.zip"
    mountpoint = cli.mount(uri)
    offset = 9 * MiB
    with open(mountpoint / "big.bin", "rb", buffering=0) as member:
        assert os.pread(member.fileno(), READ, offset) == big()[offset: offset + READ]
    cleared = cli.run("cache", "clear")
    assert cleared.returncode == 0, cleared.stderr
    read_at_random([mountpoint], seed=5, count=40)
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(big())
    assert mount_stats(mountpoint)["decompressions"] <= 3  # the first, after the clear, and whole
    assert cli.unmount(mountpoint).returncode == 0


def test_prefetch_into_a_cache_too_small_for_every_copy(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Three bzip2 members of 2.4 MiB with --cache-size 10M: the archive (3.7 MiB) and two
    copies fit, not the third. Prefetch keeps two; a mount with the same bound reads every
    member exactly, the kept ones from the disk."""
    bucket = make_bucket()
    members = {f"m{n}.bin": sample_bytes(80 + n, 2400 * 1024 + n) for n in range(3)}
    put(s3, bucket, "d.zip", make_zip(members, methods=(zipfile.ZIP_BZIP2,)))
    uri = f"s3://{bucket}/d.zip"
    result = cli.run("prefetch", uri, "--cache-size", "10M")
    assert result.returncode == 0, result.stderr
    assert "; 2 members kept decompressed (4.7 MiB)" in result.stdout, result.stdout
    s3server.reset_stats()
    mountpoint = cli.mount(uri, "--cache-size", "10M")
    rng = random.Random(6)
    for name in ("m0.bin", "m1.bin"):
        with open(mountpoint / name, "rb", buffering=0) as member:
            for offset in [rng.randrange(len(members[name])) for _ in range(10)]:
                got = os.pread(member.fileno(), READ, offset)
                assert got == members[name][offset: offset + READ], (name, offset)
    counts = mount_stats(mountpoint)
    assert (counts["decompressions"], counts["s3_requests"]) == (0, 0)
    for name, body in members.items():
        assert (mountpoint / name).read_bytes() == body, name
    assert cli.unmount(mountpoint).returncode == 0
