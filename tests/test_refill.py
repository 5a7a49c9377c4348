"""The refill of runs a busy cache disk left uncached (``writebehind``), as a chaos review of it
found it wanting (session 26): each of these failed before its fix; then the refills under
chaos, every byte checked and every block S3 sent cached in the end."""

from __future__ import annotations

import errno

import trio
from fakes import FakeSource, trio_test
from test_reader import (
    BUCKET,
    LONG_RUN,
    PAGE_BLOCK,
    RUN_DATA,
    StuckDisk,
    make_disk_reader,
    make_reader,
    make_source,
    objects_past_the_reserve,
    read_each,
    stuck_disk_reader,
)

from s3datafs import writebehind
from s3datafs.cache.blockfile import object_digest
from s3datafs.errors import TransientS3Error

BLOCKS = LONG_RUN // PAGE_BLOCK  # 300
SHORTER = 260  # more than the reserve has left after the runs before (248 blocks)


@trio_test
async def test_a_run_left_uncached_twice_from_the_same_block_is_refilled_whole(tmp_path) -> None:
    """A run left uncached (blocks 0-299) and, after memory forgot it, a shorter one from the
    same block (0-259) left uncached again: the refill queue keeps (object, first block) ->
    count, and the second overwrote 300 with 260, so blocks 260-299 were never cached (a
    remount fetched them from S3 again)."""
    source, disk, reader = stuck_disk_reader(tmp_path)
    data = RUN_DATA
    first, *kept, other, target = objects_past_the_reserve(reader, source, left=2)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for ref in (first, *kept):  # the write budget, then the reserve, are taken
            assert await reader.read(ref, 0, len(data)) == data
        assert await reader.read(other, 0, len(data)) == data  # left uncached: the refill
        await trio.sleep(0.1)  # took it, and waits for room
        assert await reader.read(target, 0, len(data)) == data  # left uncached: 0-299, queued
        reader._memory.clear()  # memory forgets it
        assert await reader.read(target, 0, SHORTER * PAGE_BLOCK) == data[: SHORTER * PAGE_BLOCK]
        assert reader.stats.cache_writes_skipped == 2 * BLOCKS + SHORTER  # 0-259 left again
        disk.unstuck.set()  # the disk has room again: the refills run, then the nursery ends
    digest = object_digest(target)
    uncached = [i for i in range(BLOCKS) if not disk.read_run(digest, target.size, range(i, i + 1))]
    assert uncached == [], f"{len(uncached)} blocks never cached, {uncached[0]}-{uncached[-1]}"


@trio_test
async def test_refills_fetch_no_more_from_s3_than_the_cache_can_hold(tmp_path) -> None:
    """Runs left uncached were fetched from S3 again to be cached however many there were
    against the cache's bound: 12 runs of 1.2 MB (14.7 MB) fetched again for a cache of 2.7 MB,
    which keeps two of them (the refills evict each other). A mount with --cache-size 16M after
    8 readers of 300 MB over a slow disk fetched 222 MB again. Now the runs remembered are
    bounded by half the cache."""
    capacity = 2 * LONG_RUN + 64 * PAGE_BLOCK
    source, disk, reader = stuck_disk_reader(tmp_path, capacity=capacity)
    refs = objects_past_the_reserve(reader, source, left=12)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await read_each(reader, refs)
        assert reader.stats.cache_writes_skipped == 12 * BLOCKS
        reader._memory.clear()  # memory no longer holds them (its 4 MiB hold 3 runs anyway)
        fetched_before = sum(end - start for _ref, start, end in source.ranges)
        disk.unstuck.set()
    fetched_again = sum(end - start for _ref, start, end in source.ranges) - fetched_before
    assert fetched_again <= capacity, (
        f"refills fetched {fetched_again / 1e6:.1f} MB again "
        f"for a cache of {capacity / 1e6:.1f} MB")


class ThrottledSource(FakeSource):
    """S3 that answers SlowDown (503) for every GET of one key: a throttled prefix."""

    throttled: str | None = None

    def get_range(self, ref, start, end):
        if ref.key == self.throttled:
            with self._lock:
                self.calls["throttled"] += 1
            raise TransientS3Error(f"S3 error on {ref.uri}: SlowDown")
        return super().get_range(ref, start, end)


@trio_test
async def test_a_run_whose_object_keeps_failing_does_not_stop_the_other_refills(
    tmp_path, monkeypatch
) -> None:
    """A refill that met S3 trouble was put back *first in line* and tried again after the
    back-off: an object S3 keeps refusing (a throttled prefix, a key that times out) was
    retried every 5 s for as long as the mount lived, and no run queued behind it, of any
    other object, was ever cached. Now it goes behind the others, three times at most."""
    monkeypatch.setattr(writebehind, "_REFILL_BACKOFF", 0.05)
    source, disk, reader = stuck_disk_reader(tmp_path, source=ThrottledSource())
    *taken, throttled, fine = objects_past_the_reserve(reader, source, left=2)
    # The refills end by themselves, and the nursery with them. A fixed 2 s here was 4-5x what
    # they took (0.36-0.97 s, most of it the refill's polls), too little on a loaded machine;
    # a refill retried for good is still caught, by this bound.
    with trio.move_on_after(20):
        async with trio.open_nursery() as mount_tasks:
            reader.attach(mount_tasks)
            await read_each(reader, [*taken, throttled, fine])
            assert reader.stats.cache_writes_skipped == 2 * BLOCKS  # throttled.bin, fine.bin
            reader._memory.clear()
            source.throttled = throttled.key  # from now on S3 throttles it
            disk.unstuck.set()
    retried = source.calls["throttled"]
    cached = len(disk.read_run(object_digest(fine), fine.size, range(BLOCKS)))
    assert cached == BLOCKS, (
        f"fine.bin: {cached} of {BLOCKS} blocks cached; throttled.bin was tried {retried} times")
    assert retried == writebehind._REFILL_TRIES  # and then it was left uncached
    assert not reader._writes._refill_failures  # nothing remembered of it


@trio_test
async def test_a_run_whose_object_changed_after_mount_is_dropped_and_the_others_refilled(
    tmp_path,
) -> None:
    """The object changed in S3 (ESTALE) by the time its run is fetched again for the cache:
    those pinned bytes can never be cached, so the run is dropped at once, not tried again as
    S3 trouble is, and the runs queued behind it are cached."""
    source, disk, reader = stuck_disk_reader(tmp_path)
    *taken, changed, fine = objects_past_the_reserve(reader, source, left=2)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await read_each(reader, [*taken, changed, fine])
        assert reader.stats.cache_writes_skipped == 2 * BLOCKS  # changed.bin, then fine.bin
        reader._memory.clear()
        source.put(BUCKET, changed.key, b"changed after mount")
        before = len(source.ranges)
        disk.unstuck.set()  # the refills run, then the nursery ends
    again = [ref.key for ref, _start, _end in source.ranges[before:]]
    assert again.count(changed.key) == 1  # one GET, refused: not retried
    assert len(disk.read_run(object_digest(fine), fine.size, range(BLOCKS))) == BLOCKS
    assert disk.read_run(object_digest(changed), changed.size, range(BLOCKS)) == {}
    assert not reader._writes._refill_failures  # nothing remembered of it


class ReadOnlyAfterStuck(StuckDisk):
    """Stuck, then read-only (the cache filesystem remounted ro, or full: every write fails)."""

    def write(self, *args, **kwargs) -> None:
        self.entered.set()
        assert self.unstuck.wait(10), "the test never let the disk go on"
        raise OSError(errno.EROFS, "Read-only file system")


@trio_test
async def test_refills_that_could_not_be_written_are_not_counted_as_cached(tmp_path) -> None:
    """cache_refills counted a run as cached once its writes were started: on a disk that
    refuses them (read-only, full) every refill failed and was still counted (a real mount
    whose cache tmpfs went read-only: cache_refills 675, nothing cached), and each was fetched
    from S3 again first. Now only written blocks count, and a refused write ends the refills."""
    source, disk, reader = stuck_disk_reader(tmp_path, ReadOnlyAfterStuck)
    refs = objects_past_the_reserve(reader, source, left=2)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await read_each(reader, refs)
        assert reader.stats.cache_writes_skipped == 2 * BLOCKS
        reader._memory.clear()  # the refills must fetch them again
        disk.unstuck.set()
    assert reader.stats.cache_refills == 0  # every write failed, the first refill's too ...
    assert reader.stats.cache_write_errors == len(refs) - 1  # ... and the second was not tried:
    assert source.calls["get_range"] == len(refs) + 1  # nor fetched again
    assert not reader._writes._skipped


def test_failure_counts_go_with_the_runs_they_count() -> None:
    """A run S3 refused, merged into the run before it (one GET for both), brings its count
    along; a count whose run is no longer queued was kept for the mount's life (a review)."""
    source, ref = make_source()
    writes = make_reader(source, max_request_bytes=64 * 1024 * 1024)._writes
    writes._skipped[(ref, 0)] = 16  # left uncached first
    writes._failed_again(ref, 16, 16)  # the next run met SlowDown: behind, counted once
    assert writes._next_skipped() == (ref, 0, 32)  # merged: one GET for both
    assert writes._refill_failures == {(ref, 0): 1}


def test_a_cache_disk_that_refuses_writes_is_told_even_after_a_falls_behind_warning(
    caplog,
) -> None:
    """One TroubleLog per reader, one minute for all its messages: the "falls behind" warning
    (a slow disk) silenced the warning that the disk refuses writes for a minute. A real mount
    whose cache went read-only 2 s after a "falls behind" warning failed 79 writes and ended
    without a word of it in its log. Now each kind of trouble has its own minute."""
    source = FakeSource()
    source.create_bucket(BUCKET)
    reader = make_disk_reader(source, None)
    reader._trouble.warn("the block cache's disk falls behind S3: ...", kind="behind")
    reader._writes.write_failed(OSError(errno.EROFS, "Read-only file system"))
    assert "cannot write to the block cache" in caplog.text
