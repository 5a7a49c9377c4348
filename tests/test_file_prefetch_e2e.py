"""Prefetch across files, through real FUSE against the S3 server: a directory read in order has
its next files fetched ahead, each file once; a shuffled reader and ``--prefetch-files 0``
fetch exactly what they read."""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import Cli, mount_stats

COUNT = 40


def put_tree(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    files = {f"d/f{i:03d}.bin": os.urandom(20_000 + i) for i in range(COUNT)}
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + name, Body=body)
    return files


def gets_once_settled(s3server) -> int:
    """GetObject requests so far, once no more have arrived for 0.3 s (prefetch is async)."""
    count, since = -1, time.monotonic()
    while time.monotonic() - since < 0.3:
        now = s3server.ops().get("GetObject", 0)
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.05)
    return count


def prefetched(mountpoint: Path) -> int:
    """Blocks the mount sent for ahead of their readers: counted as each is sent for, at the
    open that asks, so this is final once the opens have returned (unlike the server's count)."""
    return mount_stats(mountpoint)["prefetched_blocks"]


def read_in_turn(mountpoint: Path, files: dict[str, bytes], names: list[str]) -> None:
    for name in names:
        assert (mountpoint / name).read_bytes() == files[name], name


def test_a_directory_read_in_order_gets_its_next_files_ahead_each_fetched_once(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    files = put_tree(s3, bucket, "p/")
    names = sorted(files)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3server.reset_stats()
    read_in_turn(mountpoint, files, names[:10])
    ahead = gets_once_settled(s3server)
    assert ahead > 10  # files nobody has opened yet were fetched
    read_in_turn(mountpoint, files, names[10:])
    assert gets_once_settled(s3server) == COUNT  # every file once, none twice
    assert prefetched(mountpoint) >= ahead - 10
    assert mount_stats(mountpoint)["s3_requests"] == COUNT


def test_a_shuffled_reader_and_prefetch_files_0_fetch_only_what_they_read(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket()
    shuffled = put_tree(s3, bucket, "shuffled/")
    names = sorted(shuffled)
    random.Random(5).shuffle(names)
    mountpoint = cli.mount(f"s3://{bucket}/shuffled/")
    s3server.reset_stats()
    read_in_turn(mountpoint, shuffled, names[:20])
    assert prefetched(mountpoint) == 0  # nothing sent for ahead: no late GET can come
    assert gets_once_settled(s3server) == 20

    in_order = put_tree(s3, bucket, "off/")
    mountpoint = cli.mount(f"s3://{bucket}/off/", "--prefetch-files", "0")
    s3server.reset_stats()
    read_in_turn(mountpoint, in_order, sorted(in_order)[:20])
    assert prefetched(mountpoint) == 0
    assert gets_once_settled(s3server) == 20


def test_readers_each_reading_their_own_slice_in_order_get_their_next_files_ahead(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """A data loader's workers: each reads its own slice of the directory in order, the two
    taking turns, so the directory's opens jump between slices at every open. Each reader's
    own opens are in order (FUSE says which thread opens), and its next files come ahead."""
    bucket = make_bucket()
    files = put_tree(s3, bucket, "slices/")
    names = sorted(files)
    slices = [names[: COUNT // 2], names[COUNT // 2 :]]
    mountpoint = cli.mount(f"s3://{bucket}/slices/")
    s3server.reset_stats()
    turns = [threading.Semaphore(1), threading.Semaphore(0)]

    def worker(number: int, first: int, last: int) -> None:
        for name in slices[number][first:last]:
            turns[number].acquire()
            try:
                read_in_turn(mountpoint, files, [name])
            finally:
                turns[1 - number].release()

    def both(first: int, last: int) -> None:
        with ThreadPoolExecutor(2) as pool:
            for done in [pool.submit(worker, number, first, last) for number in (0, 1)]:
                done.result()

    both(0, 6)
    assert gets_once_settled(s3server) > 12  # files of either slice nobody has opened yet
    both(6, COUNT // 2)
    assert gets_once_settled(s3server) == COUNT  # every file once, none twice


def drop_pages(mountpoint: Path, names: list[str]) -> None:
    """Make the kernel forget the files' pages, as memory pressure does."""
    for name in names:
        fd = os.open(mountpoint / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)



def test_a_second_pass_gets_files_ahead_once_the_kernel_has_forgotten_them(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Files read before were never fetched ahead, as the kernel keeps their pages. A dataset
    larger than memory loses them, and its second epoch in order waited a round trip per file
    (a review: 9.8x slower than the first at 20 ms). Kept pages still cost no prefetch."""
    bucket = make_bucket()
    files = put_tree(s3, bucket, "p/")
    names = sorted(files)
    # Nothing kept by the daemon (no disk cache, memory for two blocks): S3 is asked again.
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--no-cache", "--memory-cache-size", "128K")
    read_in_turn(mountpoint, files, names)
    gets_once_settled(s3server)
    s3server.reset_stats()
    before = prefetched(mountpoint)
    read_in_turn(mountpoint, files, names)  # the kernel has every page: nothing asked, nothing
    assert gets_once_settled(s3server) == 0
    assert prefetched(mountpoint) == before

    drop_pages(mountpoint, names)
    read_in_turn(mountpoint, files, names)
    assert gets_once_settled(s3server) == COUNT  # every file once again, none twice
    assert prefetched(mountpoint) - before > COUNT // 2  # most of them ahead of their reader
