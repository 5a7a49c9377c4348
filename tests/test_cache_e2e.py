"""The block cache through real mounts: warm remounts, small random fetches, memory-only mounts.

Byte counts are the S3 server's own (``s3server.stats()``), not the daemon's.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Cli, mount_stats, sha256

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as knob:
        knob.write("3")


def put_big(s3, bucket: str, size: int = 6 * MiB + 12345) -> bytes:
    body = os.urandom(size)
    s3.put_object(Bucket=bucket, Key="p/big.bin", Body=body)
    return body


def test_a_remount_starts_warm_with_zero_s3_bytes(cli: Cli, s3, s3server, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    body = put_big(s3, bucket)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert cli.unmount(mountpoint).returncode == 0
    drop_page_cache()
    other = cli.mount(f"s3://{bucket}/p/", str(cli.root / "elsewhere"))  # another mount point
    s3server.reset_stats()
    assert sha256((other / "big.bin").read_bytes()) == sha256(body)
    assert s3server.ops().get("GetObject", 0) == 0
    assert s3server.stats()["get_bytes"] == 0
    stats = mount_stats(other)
    assert stats["disk_bytes"] >= len(body)
    assert stats["s3_bytes"] == 0


def test_random_4k_reads_fetch_at_most_16x_and_stay_correct(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket()
    body = put_big(s3, bucket, 32 * MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3server.reset_stats()
    rng = random.Random(7)
    reads = 100
    with open(mountpoint / "big.bin", "rb", buffering=0) as handle:
        for _ in range(reads):
            offset = rng.randrange(len(body) // 4096) * 4096
            handle.seek(offset)
            assert handle.read(4096) == body[offset : offset + 4096]
    assert s3server.stats()["get_bytes"] <= 16 * 4096 * reads


def test_sequential_reads_use_few_large_gets(cli: Cli, s3, s3server, make_bucket) -> None:
    bucket = make_bucket()
    body = put_big(s3, bucket, 48 * MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3server.reset_stats()
    with open(mountpoint / "big.bin", "rb") as handle:
        data = b"".join(iter(lambda: handle.read(MiB), b""))
    assert data == body
    ops = s3server.ops()
    assert s3server.stats()["get_bytes"] == len(body)  # every byte fetched exactly once
    assert ops["GetObject"] <= 24  # 48 MiB in requests averaging at least 2 MiB


def test_no_cache_mounts_in_memory_only(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = put_big(s3, bucket)
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--no-cache")
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert not list((cli.root / "cache").glob("blocks/*/*/*/*"))


@pytest.mark.parametrize("given_by", ["--cache-dir", "S3DATAFS_CACHE_DIR"])
def test_a_relative_cache_dir_is_where_the_command_ran(
    cli: Cli, s3, make_bucket, given_by: str
) -> None:
    """Not below ``/``, where the daemon runs: there it was neither the user's nor private."""
    bucket = make_bucket()
    body = put_big(s3, bucket, MiB)
    workdir = cli.root / "work"
    workdir.mkdir()
    options, env = ["--cache-dir", "relative-cache"], cli.env
    if given_by == "S3DATAFS_CACHE_DIR":
        options, env = [], {**cli.env, "S3DATAFS_CACHE_DIR": "relative-cache"}
    mounted = cli.run("mount", f"s3://{bucket}/p/", *options, env=env, cwd=workdir)
    assert mounted.returncode == 0, mounted.stderr
    mountpoint = cli.data_root / "p"
    try:
        assert (mountpoint / "big.bin").read_bytes() == body
    finally:
        assert cli.unmount(mountpoint).returncode == 0
    stats = cli.run("cache", "stats", "--json", "--cache-dir", str(workdir / "relative-cache"))
    assert json.loads(stats.stdout)["bytes"] >= MiB
    assert not Path("/relative-cache").exists()


def test_cache_size_bounds_the_disk_cache(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = put_big(s3, bucket, 24 * MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--cache-size", "4M")
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert cli.unmount(mountpoint).returncode == 0
    assert cache_bytes_on_disk(cli) <= 4 * MiB + 16 * MiB  # the bound, plus one sync interval


def test_a_mount_evicts_a_cache_over_its_bound_at_start_before_any_read(
    cli: Cli, s3, make_bucket
) -> None:
    """A smaller ``--cache-size`` than the cache holds (another mount filled it, or the bound
    shrank) is met at start, by the scan that also learns what others cached."""
    bucket = make_bucket()
    body = put_big(s3, bucket, 24 * MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert cli.unmount(mountpoint).returncode == 0
    assert cache_bytes_on_disk(cli) >= 24 * MiB
    cli.expect_log(r"the cache at .* holds 2\d\.\d MiB, more than this mount's bound \(4\.0 MiB\):"
                   " evicting down to it, other datasets' blocks too")
    cli.mount(f"s3://{bucket}/p/", "--cache-size", "4M")
    deadline = time.monotonic() + 30
    while cache_bytes_on_disk(cli) > 4 * MiB:
        assert time.monotonic() < deadline, "the cache was not evicted down to its bound"
        time.sleep(0.05)


def test_a_mount_whose_cache_scans_fail_keeps_serving_and_scans_again_later(
    cli: Cli, s3, make_bucket
) -> None:
    """The scan at start failed with the cache's ``.lock`` a directory (a failure root meets
    too): the daemon ended a moment after it mounted. Now it serves, says so in one line, and
    the scans due later (every 16 MiB written, for this bound) run once they can."""
    bucket = make_bucket()
    one, two = os.urandom(20 * MiB), os.urandom(20 * MiB)
    s3.put_object(Bucket=bucket, Key="p/one.bin", Body=one)
    s3.put_object(Bucket=bucket, Key="p/two.bin", Body=two)
    lock = cli.root / "cache" / "blocks" / str(64 * 1024) / ".lock"
    lock.mkdir(parents=True)
    cli.expect_log(r"WARNING .*cannot scan the block cache \(\[Errno 21\] Is a directory: '"
                   + re.escape(str(lock)))
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--cache-size", "100M")
    log_file = cli.log_dir / "p.log"
    deadline = time.monotonic() + 10
    while "cannot scan" not in log_file.read_text():  # the scan at start has run, and failed
        assert time.monotonic() < deadline, "the scan at start was never tried"
        time.sleep(0.05)
    assert sha256((mountpoint / "one.bin").read_bytes()) == sha256(one)  # a scan falls due
    lock.rmdir()
    assert sha256((mountpoint / "two.bin").read_bytes()) == sha256(two)  # and one more
    while not lock.is_file():  # a later scan took the lock: it ran
        assert time.monotonic() < deadline + 20, "no scan ran once it could"
        time.sleep(0.05)
    assert os.path.ismount(mountpoint)
    assert log_file.read_text().count("cannot scan") == 1
    stats = mount_stats(mountpoint)
    assert stats["cache_write_errors"] == 0


def cache_bytes_on_disk(cli: Cli) -> int:
    return sum(p.stat().st_blocks * 512 for p in (cli.root / "cache").rglob("*.r*")
               if p.is_file())


def test_status_shows_the_mounts_counters(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = put_big(s3, bucket, MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert (mountpoint / "big.bin").read_bytes() == body
    stats = mount_stats(mountpoint)
    assert stats["s3_bytes"] == len(body)
    assert stats["bytes_served"] >= len(body)


def test_prefetch_warms_the_cache_so_a_mount_reads_nothing_from_s3(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    body = put_big(s3, bucket, 5 * MiB)
    s3.put_object(Bucket=bucket, Key="p/small.txt", Body=b"small")
    result = cli.run("prefetch", f"s3://{bucket}/p/")
    assert result.returncode == 0, result.stderr
    assert "prefetched 2 objects" in result.stdout
    assert result.stderr == ""  # no progress line, nor its end, where stderr is no terminal
    stats = cli.run("cache", "stats", "--json")
    assert json.loads(stats.stdout)["by_dataset"] == {
        f"s3://{bucket}/p/": pytest.approx(len(body) + 5, rel=0.01)
    }
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3server.reset_stats()
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert (mountpoint / "small.txt").read_bytes() == b"small"
    assert s3server.stats()["get_bytes"] == 0


def test_prefetch_says_what_it_skipped_as_the_mount_command_does(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/a//b", Body=b"unsafe")
    s3.put_object(Bucket=bucket, Key="p/ok.txt", Body=b"ok")
    result = cli.run("prefetch", f"s3://{bucket}/p/")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("s3datafs: WARNING: skipping key"), result.stderr
    assert "prefetched 1 object of" in result.stdout


def test_prefetch_warms_what_it_can_and_names_what_it_could_not(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """An object S3 will not serve (archived, or deleted since the listing) is that object's
    failure: the others are warmed, and the command says which failed, in lines, and exits 1."""
    bucket = make_bucket()
    for number in range(6):
        s3.put_object(Bucket=bucket, Key=f"p/{number}.bin", Body=bytes([number]) * 100_000,
                      StorageClass="GLACIER" if number in (1, 4) else "STANDARD")
    result = cli.run("prefetch", f"s3://{bucket}/p/")
    assert result.returncode == 1
    assert "prefetched 4 of 6 objects of s3://" in result.stdout
    assert ", 390.6 KiB in " in result.stdout  # what was warmed, not all 585.9 KiB
    lines = result.stderr.splitlines()
    assert lines[0].startswith("s3datafs: WARNING: 2 of the objects listed under")
    assert sorted(lines[1:3]) == [
        f"s3datafs: WARNING: not prefetched: s3://{bucket}/p/{number}.bin is archived and not "
        "restored, so S3 will not read it (InvalidObjectState): restore it (aws s3api "
        "restore-object), then read it again" for number in (1, 4)]
    assert lines[3:] == [f"s3datafs: 2 of 6 objects of s3://{bucket}/p/ could not be "
                         "prefetched (see above); the rest are in the cache"]
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    cli.expect_log("are archived")
    s3server.reset_stats()
    for number in (0, 2, 3, 5):
        assert (mountpoint / f"{number}.bin").read_bytes() == bytes([number]) * 100_000
    assert s3server.stats()["get_bytes"] == 0


def test_prefetch_gives_up_when_no_object_at_all_can_be_read(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Twenty failures and not one object warmed: every object would fail (a policy without
    s3:GetObject, say); the run stops rather than ask S3 for each of them."""
    bucket = make_bucket()
    for number in range(40):
        s3.put_object(Bucket=bucket, Key=f"p/{number:02}.bin", Body=b"x", StorageClass="GLACIER")
    s3server.reset_stats()
    result = cli.run("prefetch", f"s3://{bucket}/p/")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len([line for line in lines if "WARNING: not prefetched: s3://" in line]) == 20
    assert lines[-1] == ("s3datafs: the first 20 objects could not be prefetched, and none "
                         "could: giving up (see above)")
    assert s3server.ops().get("GetObject", 0) < 40


def test_prefetch_gives_up_when_the_keys_stop_working_midway(
    cli: Cli, s3, proxy, make_bucket
) -> None:
    """Twenty objects refused in a row after others were warmed: the keys expired (or were
    revoked) midway, and every object left would be refused too; the run stops."""
    bucket = make_bucket()
    for number in range(80):
        s3.put_object(Bucket=bucket, Key=f"p/{number:02}.bin", Body=b"x" * 1000)
    for number in range(10, 80):
        proxy.inject("error", key=f"p/{number:02}.bin", status=403, code="ExpiredToken",
                     times=None)
    env = {**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    result = cli.run("prefetch", f"s3://{bucket}/p/", env=env)
    assert result.returncode == 1
    # after the first 10, give or take one still in flight when the 20th refusal came
    assert re.fullmatch(
        r"s3datafs: S3 refused the last 20 objects in a row, after (9|10) objects had been "
        r"prefetched: the credentials may have expired or been revoked, or their policy "
        r"changed; giving up: prefetch again with valid credentials \(what is warm stays in "
        r"the cache\)", result.stderr.splitlines()[-1]), result.stderr
    assert proxy.requests["GetObject"] < 2 * 50  # a template's refusal and botocore's, each


def test_prefetch_stops_at_a_failure_that_is_not_the_objects_own(
    cli: Cli, s3, proxy, make_bucket
) -> None:
    """S3 not answering is every object's trouble: one line, not an object's wait each."""
    bucket = make_bucket()
    for number in range(3):
        s3.put_object(Bucket=bucket, Key=f"p/{number}.bin", Body=b"x" * 1000)
    proxy.inject("error", status=503, code="SlowDown", times=None)
    env = {**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    result = cli.run("prefetch", f"s3://{bucket}/p/", "--read-timeout", "1", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("s3datafs: giving up on s3://"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "internal error" not in result.stderr


def test_prefetch_of_more_than_the_cache_holds_is_refused_before_any_get(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket()
    put_big(s3, bucket, 5 * MiB)
    s3server.reset_stats()
    result = cli.run("prefetch", f"s3://{bucket}/p/", "--cache-size", "3M")
    assert result.returncode == 1
    assert result.stderr == (f"s3datafs: s3://{bucket}/p/ takes 5.0 MiB, more than the cache "
                             "holds (--cache-size 3.0 MiB): raise --cache-size\n")
    assert s3server.stats()["get_bytes"] == 0


def test_prefetch_interrupted_says_so_in_one_line(cli: Cli, s3, proxy, make_bucket) -> None:
    bucket = make_bucket()
    put_big(s3, bucket, 5 * MiB)
    proxy.inject("delay", op="GetObject", seconds=5.0, times=None)
    command = subprocess.Popen(
        [sys.executable, "-m", "s3datafs", "prefetch", f"s3://{bucket}/p/"],
        env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        proxy.wait_injected(1, timeout=30)  # listed, and a GET waits
        command.send_signal(signal.SIGINT)
        _out, err = command.communicate(timeout=30)
        assert command.returncode == 130
        assert "Traceback" not in err
        assert "ExceptionGroup" not in err
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()


def test_cache_clear_empties_the_cache(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_big(s3, bucket, MiB)
    assert cli.run("prefetch", f"s3://{bucket}/p/").returncode == 0
    assert json.loads(cli.run("cache", "stats", "--json").stdout)["bytes"] > MiB
    cleared = cli.run("cache", "clear", f"s3://{bucket}/p/")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cli.run("cache", "stats", "--json").stdout)["bytes"] == 0


def test_cache_stats_of_a_directory_that_is_not_there_says_so(cli: Cli) -> None:
    """A mistyped --cache-dir is not an empty cache."""
    missing = cli.root / "no-such-cache"
    result = cli.run("cache", "stats", "--cache-dir", str(missing))
    assert result.returncode == 0
    assert result.stdout == (f"cache: 0 B in 0 blocks (there is no {missing} yet: "
                             "check --cache-dir)\n")
    assert not missing.exists()


def test_status_lists_the_counters_published_by_the_daemon(cli: Cli, s3, make_bucket) -> None:
    import time

    bucket = make_bucket()
    body = put_big(s3, bucket, MiB)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert (mountpoint / "big.bin").read_bytes() == body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = json.loads(cli.run("status", "--json").stdout)
        stats = next(r for r in rows if r["mountpoint"] == str(mountpoint))["stats"]
        if stats.get("s3_bytes") == len(body):
            break
        time.sleep(0.2)
    assert stats["s3_bytes"] == len(body)
    assert f"{mountpoint}: " in cli.run("status").stdout


def test_prefetch_from_a_snapshot_file(cli: Cli, s3, s3server, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    body = put_big(s3, bucket, 3 * MiB)
    snapshot_file = cli.root / "dataset.snap"
    made = cli.run("snapshot", f"s3://{bucket}/p/", "-o", str(snapshot_file))
    assert made.returncode == 0, made.stderr
    s3.put_object(Bucket=bucket, Key="p/big.bin", Body=b"overwritten after the snapshot")
    warmed = cli.run("prefetch", "--snapshot", str(snapshot_file))
    assert warmed.returncode == 0, warmed.stderr
    mountpoint = cli.mount("--snapshot", str(snapshot_file))
    s3server.reset_stats()
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)
    assert s3server.stats()["get_bytes"] == 0


def test_two_mounts_sharing_a_cache_write_the_same_regions_without_harm(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Two daemons fill the same region files at once (one sequentially, one scattered): every
    read is exact, and a third mount then reads it all from the shared cache, zero S3 bytes."""
    bucket = make_bucket(versioned=True)
    body = put_big(s3, bucket, 20 * MiB + 4321)  # three region files
    first = cli.mount(f"s3://{bucket}/p/", str(cli.root / "first"))
    second = cli.mount(f"s3://{bucket}/p/", str(cli.root / "second"))
    rng = random.Random(3)
    spots = [(rng.randrange(len(body)), rng.choice((4096, 65536, 300_000))) for _ in range(200)]
    problems: list[str] = []

    def scattered() -> None:
        with open(second / "big.bin", "rb", buffering=0) as handle:
            for offset, size in spots:
                if os.pread(handle.fileno(), size, offset) != body[offset : offset + size]:
                    problems.append(f"wrong bytes at {offset}+{size}")

    reader = threading.Thread(target=scattered)
    reader.start()
    try:
        assert sha256((first / "big.bin").read_bytes()) == sha256(body)
    finally:
        reader.join(60)
    assert not problems, problems[:5]
    assert cli.unmount(first).returncode == 0  # write-behind drained
    assert cli.unmount(second).returncode == 0
    drop_page_cache()
    third = cli.mount(f"s3://{bucket}/p/", str(cli.root / "third"))
    s3server.reset_stats()
    assert sha256((third / "big.bin").read_bytes()) == sha256(body)
    assert s3server.stats()["get_bytes"] == 0
