"""BlockReader against FakeSource: exact bytes, pinned block-aligned GETs, caching, single-flight.

Objects are small and blocks are 16 bytes, so every boundary case is a few bytes away. Each test
runs its own ``trio.run`` (``trio_test``); concurrency is made deterministic with the fake's gate:
every GET is held until the test has lined up all its readers.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time

import pytest
import trio
import trio.testing
from fakes import FakeSource, trio_test
from hypothesis import given, settings
from hypothesis import strategies as st

from s3datafs import reader as reader_module
from s3datafs import writebehind as writebehind_module
from s3datafs.cache import pace as pace_module
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache, TroubleLog
from s3datafs.errors import ArchiveError, StaleObjectError, TransientS3Error
from s3datafs.linkrate import MIN_SAMPLES, LinkRate
from s3datafs.model import MemberRef, ObjectRef
from s3datafs.prefetch import Readahead
from s3datafs.reader import ONE_HOP_BYTES, BlockReader, ByteBudget

BUCKET = "data"
BLOCK = 16
DATA = bytes((i * 7 + i // 13) % 256 for i in range(100))  # 6 full blocks and 4 bytes
BOUNDARY_OFFSETS = [0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 79, 80, 95, 96, 99, 100, 101, 164]
LENGTHS = [0, 1, 2, 15, 16, 17, 31, 32, 33, 48, 99, 100, 101, 1000]


def make_source(data: bytes = DATA, *, versioned: bool = False) -> tuple[FakeSource, ObjectRef]:
    source = FakeSource()
    source.create_bucket(BUCKET, versioned=versioned)
    return source, source.put(BUCKET, "obj.bin", data)


def make_reader(
    source: FakeSource,
    *,
    memory_cache_bytes: int = 1 << 20,
    connections: int = 8,
    max_request_bytes: int = 1 << 20,
    link: LinkRate | None = None,
    split_bytes: int = 4 * BLOCK,  # a read of 4 blocks or more is split on a slow link
) -> BlockReader:
    return BlockReader(
        source,
        block_size=BLOCK,
        memory_cache_bytes=memory_cache_bytes,
        s3_limiter=trio.CapacityLimiter(connections),
        max_request_bytes=max_request_bytes,
        link=link,
        split_bytes=split_bytes,
    )


def expected(offset: int, length: int, data: bytes = DATA) -> bytes:
    """The reference answer: the object's bytes, clamped at EOF, empty for a negative offset."""
    return b"" if offset < 0 or length <= 0 else data[offset : offset + length]


def blocks_spanned(offset: int, length: int, size: int = len(DATA)) -> int:
    end = min(offset + length, size)
    return 0 if offset < 0 or offset >= end else (end - 1) // BLOCK - offset // BLOCK + 1


# -- bytes ----------------------------------------------------------------------------------------


@trio_test
async def test_reads_equal_reference_bytes_across_block_boundaries() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    for offset, length in itertools.product(BOUNDARY_OFFSETS, LENGTHS):
        assert await reader.read(ref, offset, length) == expected(offset, length), (offset, length)


@trio_test
async def test_reads_equal_reference_bytes_with_a_cold_cache_every_time() -> None:
    source, ref = make_source()
    for offset, length in itertools.product(BOUNDARY_OFFSETS, LENGTHS):
        reader = make_reader(source)
        assert await reader.read(ref, offset, length) == expected(offset, length), (offset, length)


@trio_test
async def test_empty_past_eof_and_negative_reads_return_nothing_without_a_get() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    assert await reader.read(ref, 0, 0) == b""
    assert await reader.read(ref, 50, 0) == b""
    assert await reader.read(ref, len(DATA), 10) == b""
    assert await reader.read(ref, len(DATA) + 1000, 10) == b""
    assert await reader.read(ref, -1, 10) == b""
    assert await reader.read(ref, 10, -5) == b""
    assert source.calls["get_range"] == 0


@trio_test
async def test_empty_object_reads_as_empty_without_a_get() -> None:
    source, ref = make_source(b"")
    reader = make_reader(source)
    assert await reader.read(ref, 0, 4096) == b""
    assert source.calls["get_range"] == 0


@trio_test
async def test_object_of_exactly_one_block_and_of_one_byte() -> None:
    for data in (DATA[:BLOCK], DATA[:1], DATA[: 2 * BLOCK]):
        source, ref = make_source(data)
        reader = make_reader(source)
        assert await reader.read(ref, 0, 1000) == data
        assert source.ranges == [(ref, 0, len(data))]


# -- requests -------------------------------------------------------------------------------------


@trio_test
async def test_gets_are_block_aligned_and_clamped_to_the_object() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    await reader.read(ref, 20, 30)  # bytes 20..49 span blocks 1..3
    assert source.ranges == [(ref, 16, 64)]
    await reader.read(ref, 90, 50)  # blocks 5..6; the last one is short
    assert source.ranges[1:] == [(ref, 80, 100)]


@trio_test
async def test_gets_carry_the_pinned_version_and_etag() -> None:
    source, ref = make_source(versioned=True)
    reader = make_reader(source)
    assert ref.version_id is not None
    await reader.read(ref, 0, 10)
    ((sent, _, _),) = source.ranges
    assert (sent.version_id, sent.etag) == (ref.version_id, ref.etag)
    assert sent.etag.startswith('"')
    assert sent.etag.endswith('"')


@trio_test
async def test_missing_blocks_are_coalesced_into_one_get_per_run() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    await reader.read(ref, 2 * BLOCK, 1)  # block 2 cached
    await reader.read(ref, 5 * BLOCK, 1)  # block 5 cached
    source.ranges.clear()
    assert await reader.read(ref, 0, len(DATA)) == DATA
    runs = sorted((start, end) for _, start, end in source.ranges)
    assert runs == [(0, 32), (48, 80), (96, 100)]  # blocks 0-1, 3-4, 6


@trio_test
async def test_second_read_of_the_same_bytes_makes_zero_gets() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    first = await reader.read(ref, 7, 60)
    gets = source.calls["get_range"]
    assert await reader.read(ref, 7, 60) == first
    assert await reader.read(ref, 20, 10) == DATA[20:30]  # any subrange of cached blocks, too
    assert source.calls["get_range"] == gets == 1


@trio_test
async def test_blocks_are_keyed_by_pin_not_by_key() -> None:
    source, old = make_source(versioned=True)
    new = source.put(BUCKET, old.key, DATA[::-1])
    reader = make_reader(source)
    assert await reader.read(old, 0, 100) == DATA
    assert await reader.read(new, 0, 100) == DATA[::-1]
    assert source.calls["get_range"] == 2


# -- single-flight --------------------------------------------------------------------------------


@trio_test
async def test_concurrent_reads_of_one_block_make_exactly_one_get() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    source.gate = gate = threading.Event()
    results: dict[int, bytes] = {}

    async def read_at(offset: int) -> None:
        results[offset] = await reader.read(ref, offset, 3)

    async with trio.open_nursery() as nursery:
        for offset in range(0, BLOCK - 2):
            nursery.start_soon(read_at, offset)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == {offset: DATA[offset : offset + 3] for offset in range(BLOCK - 2)}
    assert source.calls["get_range"] == 1


@trio_test
async def test_overlapping_concurrent_reads_share_blocks_and_fetch_only_the_rest() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    source.gate = gate = threading.Event()
    results = {}

    async def read(name: str, offset: int, length: int) -> None:
        results[name] = await reader.read(ref, offset, length)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "a", 0, 4 * BLOCK)  # blocks 0-3
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read, "b", 2 * BLOCK, 4 * BLOCK)  # blocks 2-5: 2-3 are in flight
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == {"a": DATA[: 4 * BLOCK], "b": DATA[2 * BLOCK : 6 * BLOCK]}
    assert sorted((s, e) for _, s, e in source.ranges) == [(0, 64), (64, 96)]


@trio_test
async def test_an_error_reaches_every_waiter_and_a_later_read_retries() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    source.gate = gate = threading.Event()
    source.fail_next(1, TransientS3Error("SlowDown"))
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await reader.read(ref, 3, 5)
        except TransientS3Error as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert len(errors) == 5
    assert all(str(exc) == "SlowDown" for exc in errors)
    assert source.calls["get_range"] == 1
    # The failed flight is gone: the next read sends a new GET and succeeds.
    assert await reader.read(ref, 3, 5) == DATA[3:8]
    assert source.calls["get_range"] == 2


@trio_test
async def test_a_failed_run_does_not_poison_other_runs_of_the_same_read() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    await reader.read(ref, 2 * BLOCK, 1)  # splits a full read into two runs
    source.fail_next(1, TransientS3Error("boom"))
    with pytest.raises(TransientS3Error):
        await reader.read(ref, 0, len(DATA))
    assert await reader.read(ref, 0, len(DATA)) == DATA


@trio_test
async def test_a_waiter_survives_the_cancellation_of_the_reader_that_started_the_flight() -> None:
    # The first reader's GET waits for a connection (the limiter's only token is taken by a GET
    # of another object) and is then cancelled, as a prefetch or an interrupted request may be.
    # The second reader, already waiting on the same block, must still get the bytes (or a typed
    # error), never an internal KeyError.
    source, ref = make_source()
    other = source.put(BUCKET, "other.bin", DATA)
    reader = make_reader(source, connections=1)
    source.gate = gate = threading.Event()
    first_reader = trio.CancelScope()
    outcome: dict[str, object] = {}

    async def first() -> None:
        with first_reader:
            await reader.read(ref, 0, 4)  # starts the flight, waits for the connection

    async def second() -> None:
        try:
            outcome["second"] = await reader.read(ref, 0, 4)  # joins the flight
        except Exception as exc:  # recorded, so the assertion below shows it
            outcome["second"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.read, other, 0, 4)  # holds the only connection
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        first_reader.cancel()
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert first_reader.cancelled_caught
    assert outcome["second"] == DATA[:4]
    assert source.calls["get_range"] == 2  # other.bin, then ref once, by the waiter


@trio_test
async def test_an_attached_flight_survives_the_cancellation_of_the_reader_that_started_it() -> None:
    # As mounted: flights run in the mount's nursery, so a cancelled reader leaves its flight
    # running for everyone else waiting on it.
    source, ref = make_source()
    reader = make_reader(source)
    source.gate = gate = threading.Event()
    first_reader = trio.CancelScope()
    outcome: dict[str, bytes] = {}

    async def first() -> None:
        with first_reader:
            await reader.read(ref, 0, 4)

    async def second() -> None:
        outcome["second"] = await reader.read(ref, 0, 4)

    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        async with trio.open_nursery() as readers:
            readers.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            readers.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            first_reader.cancel()
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
    assert first_reader.cancelled_caught
    assert outcome == {"second": DATA[:4]}
    assert source.calls["get_range"] == 1


@trio_test
async def test_warm_tells_each_run_as_it_is_in() -> None:
    """What the prefetch command's progress line moves by: one object is many runs."""
    source, ref = make_source()  # 100 bytes: runs of 2 blocks are 32, 32, 32 and 4 bytes
    reader = make_reader(source, max_request_bytes=2 * BLOCK)
    told: list[int] = []
    await reader.warm(ref, loaded=told.append)
    assert sorted(told) == [4, 32, 32, 32]
    assert await reader.read(ref, 0, len(DATA)) == DATA


@trio_test
async def test_long_runs_are_split_at_max_request_bytes() -> None:
    source, ref = make_source()
    reader = make_reader(source, max_request_bytes=2 * BLOCK)
    assert await reader.read(ref, 0, len(DATA)) == DATA
    assert sorted((s, e) for _, s, e in source.ranges) == [(0, 32), (32, 64), (64, 96), (96, 100)]


# -- a waited read on a slow link: two GETs at once (``linkrate``) --------------------------------


def inside_get_range(source: FakeSource, count: int, timeout: float = 5.0) -> bool:
    """Wait (in a thread) until ``count`` GETs are inside the source at once."""
    deadline = time.monotonic() + timeout
    while source.in_get_range < count and time.monotonic() < deadline:
        time.sleep(0.001)
    return source.in_get_range >= count


def measured_link(bytes_per_second: float | None) -> LinkRate:
    """A link with enough 1 MiB samples at ``bytes_per_second`` (None: no sample yet)."""
    link = LinkRate()
    for _ in range(MIN_SAMPLES if bytes_per_second else 0):
        link.end(link.begin(), 1 << 20, (1 << 20) / bytes_per_second)
    return link


@pytest.mark.parametrize(
    ("link", "gets"),
    [
        pytest.param(lambda: measured_link(100e6), [(0, 48), (48, 100)], id="slow"),
        pytest.param(lambda: measured_link(5e9), [(0, 100)], id="fast"),
        pytest.param(lambda: measured_link(None), [(0, 100)], id="not-measured-yet"),
        pytest.param(lambda: None, [(0, 100)], id="no-link"),
    ],
)
@trio_test
async def test_a_long_read_is_two_gets_at_once_on_a_slow_link(link, gets) -> None:
    source, ref = make_source()
    reader = make_reader(source, link=link())
    source.gate = gate = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.read, ref, 0, len(DATA))
        # Every GET of the read is sent before any answers.
        assert await trio.to_thread.run_sync(inside_get_range, source, len(gets))
        gate.set()
    assert sorted((s, e) for _, s, e in source.ranges) == gets
    assert reader.stats.split_reads == (len(gets) - 1)
    assert await reader.read(ref, 0, len(DATA)) == DATA  # from memory: the halves joined


@trio_test
async def test_short_reads_readahead_and_zip_members_are_never_split() -> None:
    data = DATA * 10
    source, ref = make_source(data)
    reader = make_reader(source, link=measured_link(100e6))
    assert await reader.read(ref, 0, 3 * BLOCK) == data[: 3 * BLOCK]  # below SPLIT_BYTES
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        reader.prefetch(ref, 3 * BLOCK, 11 * BLOCK)  # readahead: nobody waits for it
    assert sorted((s, e) for _, s, e in source.ranges) == [(0, 3 * BLOCK), (3 * BLOCK, 11 * BLOCK)]
    member = MemberRef(ref, "m.bin", 0, 1000, 0, 0, 1000, 1000, 0, 0.0)
    assert reader._runs_for(member, list(range(10)), True) == [range(10)]
    assert reader.stats.split_reads == 0


class BadMemberSource(FakeSource):
    """Serves one zip member's ``data``, as ``MemberSource`` would: the range from ``held_at``
    says so (``entered``) and waits for ``release``; the range from ``bad_at`` raises the
    ``ArchiveError`` of a CRC found bad."""

    def __init__(self, data: bytes, held_at: int, bad_at: int) -> None:
        super().__init__()
        self.data, self.held_at, self.bad_at = data, held_at, bad_at
        self.entered, self.release = threading.Event(), threading.Event()

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        self.ranges.append((ref, start, end))
        if start == self.held_at:
            self.entered.set()
            assert self.release.wait(10), "the test never released the held range"
        if start == self.bad_at:
            raise ArchiveError("member 'm.bin': CRC-32 mismatch")
        return self.data[start:end]


@trio_test
async def test_a_member_found_bad_leaves_nothing_of_it_in_memory_to_be_read_again() -> None:
    """A stored member's CRC is checked by its source once the pieces served cover it, counted
    again from nothing once it is found bad. Pieces kept here (read before, or landing from a
    flight under way) were served again without the source seeing them: after its minute of
    failing, a whole read of it completed with no error. So the reader drops what it holds of
    the member, and fails its flights in flight (what they hold was served before the failure)."""
    data = DATA * 10
    archive = ObjectRef(BUCKET, "a.zip", "v1", '"etag"', 2000, 0.0)
    member = MemberRef(archive, "m.bin", 0, 1000, 0, 0, 1000, 1000, 0, 0.0)
    source = BadMemberSource(data, held_at=4 * BLOCK, bad_at=8 * BLOCK)
    reader = make_reader(source)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert await reader.read(member, 0, 2 * BLOCK) == data[:2 * BLOCK]  # kept in memory
        reader.prefetch(member, 4 * BLOCK, 6 * BLOCK)  # readahead whose range is held
        assert await trio.to_thread.run_sync(source.entered.wait, 5)
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            await reader.read(member, 8 * BLOCK, BLOCK)
        source.release.set()  # the readahead lands after its member was found bad
        with trio.fail_after(5):
            while reader._inflight:  # noqa: ASYNC110 - its source call ends in a thread
                await trio.sleep(0.01)
        assert reader.found_bad(member)
        assert not reader.found_bad(archive)
        assert reader._prefetch_budget.used == 0
        source.ranges.clear()
        assert await reader.read(member, 0, 2 * BLOCK) == data[:2 * BLOCK]
        assert await reader.read(member, 4 * BLOCK, 2 * BLOCK) == data[4 * BLOCK:6 * BLOCK]
    assert [(start, end) for _ref, start, end in source.ranges] == [
        (0, 2 * BLOCK), (4 * BLOCK, 6 * BLOCK)]  # both from the source again


@trio_test
async def test_sequential_reads_prefetch_ahead_and_foreground_reads_join_prefetch() -> None:
    data = DATA * 10  # 1000 bytes
    source, ref = make_source(data)
    reader = make_reader(source)
    readahead = Readahead(initial=4 * BLOCK, maximum=8 * BLOCK)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert await reader.read(ref, 0, BLOCK, readahead) == data[:BLOCK]
        ahead = reader.stats.prefetched_blocks * BLOCK
        assert ahead > 0
        # Whether the prefetch has landed or is still in flight, this read sends no GET.
        assert await reader.read(ref, BLOCK, ahead) == data[BLOCK : BLOCK + ahead]
        mount_tasks.cancel_scope.cancel()
    assert sorted((s, e) for _, s, e in source.ranges) == [(0, BLOCK), (BLOCK, BLOCK + ahead)]


# -- pinning --------------------------------------------------------------------------------------


@trio_test
async def test_overwritten_unversioned_object_fails_stale_and_never_returns_new_bytes() -> None:
    source, ref = make_source()
    reader = make_reader(source)
    assert await reader.read(ref, 0, BLOCK) == DATA[:BLOCK]  # block 0 cached before the change
    source.put(BUCKET, ref.key, b"X" * len(DATA))
    for offset, length in [(BLOCK, 1), (0, len(DATA)), (50, 10), (95, 100)]:
        with pytest.raises(StaleObjectError):
            await reader.read(ref, offset, length)
    # Blocks fetched before the change are the pinned bytes and may still be served.
    assert await reader.read(ref, 0, BLOCK) == DATA[:BLOCK]


@trio_test
async def test_overwritten_object_with_the_same_bytes_is_still_served() -> None:
    source, ref = make_source()
    source.put(BUCKET, ref.key, DATA)  # same ETag: IfMatch still holds
    assert await make_reader(source).read(ref, 0, 200) == DATA


@trio_test
async def test_deleted_object_fails_stale() -> None:
    for versioned in (False, True):
        source, ref = make_source(versioned=versioned)
        source.delete(BUCKET, ref.key)
        reader = make_reader(source)
        if versioned:  # the pinned version survives a delete marker
            assert await reader.read(ref, 0, 200) == DATA
        else:
            with pytest.raises(StaleObjectError):
                await reader.read(ref, 0, 200)


@trio_test
async def test_pinned_version_is_served_after_an_overwrite_and_stale_once_removed() -> None:
    source, ref = make_source(versioned=True)
    source.put(BUCKET, ref.key, b"new bytes")
    reader = make_reader(source)
    assert await reader.read(ref, 0, 32) == DATA[:32]
    source.delete_version(BUCKET, ref.key, ref.version_id or "")
    with pytest.raises(StaleObjectError):
        await reader.read(ref, 32, 32)
    assert all(sent == ref for sent, _, _ in source.ranges)


@trio_test
async def test_etag_only_pin_on_a_versioned_bucket_fails_stale_after_an_overwrite() -> None:
    source, versioned_ref = make_source(versioned=True)
    ref = ObjectRef(BUCKET, versioned_ref.key, None, versioned_ref.etag, len(DATA), 0.0)
    source.put(BUCKET, ref.key, b"Y" * 200)
    with pytest.raises(StaleObjectError):
        await make_reader(source).read(ref, 0, 10)


# -- memory bound ---------------------------------------------------------------------------------


@trio_test
async def test_lru_evicts_the_least_recently_used_block_and_refetches_it() -> None:
    source, ref = make_source()
    reader = make_reader(source, memory_cache_bytes=2 * BLOCK)

    async def read_block(index: int) -> int:
        """Read block ``index``; return how many GETs that took."""
        before = source.calls["get_range"]
        assert await reader.read(ref, index * BLOCK, BLOCK) == DATA[index * BLOCK :][:BLOCK]
        return source.calls["get_range"] - before

    assert [await read_block(i) for i in (0, 1)] == [1, 1]
    assert await read_block(0) == 0  # hit: block 0 becomes most recently used
    assert await read_block(2) == 1  # evicts block 1, not block 0
    assert await read_block(0) == 0
    assert await read_block(1) == 1  # refetched


@trio_test
async def test_a_read_larger_than_the_cache_is_still_served_whole() -> None:
    source, ref = make_source()
    reader = make_reader(source, memory_cache_bytes=BLOCK)
    assert await reader.read(ref, 0, len(DATA)) == DATA
    assert await reader.read(ref, 0, len(DATA)) == DATA


@trio_test
async def test_a_cache_smaller_than_one_block_caches_nothing_but_reads_work() -> None:
    source, ref = make_source()
    reader = make_reader(source, memory_cache_bytes=BLOCK // 2)
    for _ in range(3):
        assert await reader.read(ref, 10, 20) == DATA[10:30]
    assert source.calls["get_range"] == 3


# -- statistics -----------------------------------------------------------------------------------


@trio_test
async def test_read_stats_add_up() -> None:
    source, ref = make_source()
    reader = make_reader(source, memory_cache_bytes=3 * BLOCK)
    requests = [(0, 10), (5, 40), (90, 50), (0, 100), (200, 5), (33, 0), (64, 16), (0, 100)]
    served = 0
    for offset, length in requests:
        served += len(await reader.read(ref, offset, length))
    stats = reader.stats
    assert stats.s3_requests == source.calls["get_range"] == len(source.ranges)
    assert stats.s3_bytes == sum(end - start for _, start, end in source.ranges)
    assert stats.bytes_served == served
    assert stats.memory_hits + stats.misses == sum(blocks_spanned(*r) for r in requests)
    assert stats.misses == sum(-(-(end - start) // BLOCK) for _, start, end in source.ranges)
    assert stats.memory_hits > 0
    assert (stats.disk_hits, stats.disk_bytes, stats.cache_write_errors) == (0, 0, 0)
    assert stats.as_dict() == vars(stats)


# -- property -------------------------------------------------------------------------------------

_reads = st.lists(
    st.tuples(st.integers(-3, len(DATA) + 20), st.integers(0, 4 * BLOCK + 3)), max_size=25
)


@settings(max_examples=60, deadline=None)
@given(
    reads=_reads, cache_blocks=st.integers(0, 8), concurrent=st.booleans(),
    slow_link=st.booleans(),
)
def test_any_sequence_of_reads_equals_the_reference(
    reads: list[tuple[int, int]], cache_blocks: int, concurrent: bool, slow_link: bool
) -> None:
    source, ref = make_source()
    reader = make_reader(
        source, memory_cache_bytes=cache_blocks * BLOCK, connections=3,
        link=measured_link(100e6 if slow_link else None),  # slow: runs of 2+ blocks split
        split_bytes=2 * BLOCK,
    )
    results: dict[int, bytes] = {}

    async def read(index: int, offset: int, length: int) -> None:
        results[index] = await reader.read(ref, offset, length)

    async def main() -> None:
        if concurrent:
            async with trio.open_nursery() as nursery:
                for index, (offset, length) in enumerate(reads):
                    nursery.start_soon(read, index, offset, length)
        else:
            for index, (offset, length) in enumerate(reads):
                await read(index, offset, length)

    trio.run(main)
    assert results == {i: expected(offset, length) for i, (offset, length) in enumerate(reads)}
    for _, start, end in source.ranges:
        assert start % BLOCK == 0
        assert end % BLOCK == 0 or end == len(DATA)


@trio_test
async def test_prefetch_in_flight_stays_within_the_budget_across_many_open_files() -> None:
    source = FakeSource()
    source.create_bucket(BUCKET)
    refs = [source.put(BUCKET, f"f{i}", DATA) for i in range(100)]  # 100 files read at once
    budget = ByteBudget(3 * 7 * BLOCK)  # room for three whole-file readaheads (7 blocks each)
    reader = BlockReader(
        source,
        block_size=BLOCK,
        memory_cache_bytes=1 << 20,
        s3_limiter=trio.CapacityLimiter(8),
        prefetch_budget=budget,
    )
    source.gate = threading.Event()  # hold every GET: nothing in flight can finish
    async with trio.open_nursery() as nursery:
        reader.attach(nursery)
        for ref in refs:
            reader.prefetch(ref, 0, ref.size)
            assert budget.used <= budget.capacity
        assert reader.stats.prefetch_skipped == 97 * 7  # skipped, not queued
        source.gate.set()
    # Landed readahead keeps its bytes of the budget until it is read: the budget bounds
    # readahead in flight and waiting, so the memory LRU never has to evict it unread.
    assert budget.used == 3 * len(DATA)
    assert source.calls["get_range"] == 3
    for ref in refs[:3]:
        assert await reader.read(ref, 0, len(DATA)) == DATA
    assert source.calls["get_range"] == 3  # served from what readahead fetched
    assert budget.used == 0  # read: every byte of the budget is back


@trio_test
async def test_a_budget_smaller_than_a_get_bounds_readahead_in_gets_of_its_size() -> None:
    """--max-prefetch-memory below the GET size: readahead runs shrink to the budget, so the
    bytes in flight never pass it (a whole 1 MiB GET went out under a budget of 3 blocks,
    because an empty budget lets any one amount through)."""
    source, ref = make_source()
    budget = ByteBudget(3 * BLOCK)
    reader = BlockReader(source, block_size=BLOCK, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(8), max_request_bytes=1 << 20,
                         prefetch_budget=budget)
    source.gate = threading.Event()  # hold every GET: nothing in flight can finish
    async with trio.open_nursery() as nursery:
        reader.attach(nursery)
        reader.prefetch(ref, 0, ref.size)
        assert 0 < budget.used <= budget.capacity
        assert [end - start for _ref, start, end in source.ranges] in ([], [3 * BLOCK])
        source.gate.set()
        assert await reader.read(ref, 0, len(DATA)) == DATA
        nursery.cancel_scope.cancel()


# -- readahead memory ----------------------------------------------------------------------------


async def settle(reader: BlockReader) -> None:
    """Wait until every flight has landed (their GETs run in threads, out of trio's sight)."""
    while reader._inflight:
        await next(iter(reader._inflight.values())).done.wait()
        await trio.testing.wait_all_tasks_blocked()  # the flight's task finishes its part


def make_streaming_reader(source: FakeSource, budget: ByteBudget, memory: int) -> BlockReader:
    return BlockReader(
        source,
        block_size=BLOCK,
        memory_cache_bytes=memory,
        s3_limiter=trio.CapacityLimiter(8),
        max_request_bytes=2 * BLOCK,
        prefetch_budget=budget,
    )


@trio_test
async def test_unread_readahead_is_never_evicted_by_what_a_stream_has_read() -> None:
    data = DATA * 10  # 1000 bytes, 63 blocks
    source, ref = make_source(data)
    budget = ByteBudget(8 * BLOCK)
    reader = make_streaming_reader(source, budget, memory=2 * BLOCK)  # far less than the window
    readahead = Readahead(initial=4 * BLOCK, maximum=8 * BLOCK)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for offset in range(0, len(data), BLOCK):
            assert await reader.read(ref, offset, BLOCK, readahead) == data[offset:][:BLOCK]
            await settle(reader)  # let readahead land before reading on
            assert budget.used <= budget.capacity
        mount_tasks.cancel_scope.cancel()
    fetched = sorted((start, end) for _, start, end in source.ranges)
    assert sum(end - start for start, end in fetched) == len(data)  # every byte fetched once
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(fetched))
    assert budget.used == 0  # everything staged was read
    assert reader._memory.currsize <= 2 * BLOCK  # what was read went through the small LRU


@trio_test
async def test_a_read_that_takes_readahead_and_ends_inside_a_block_fetches_none_twice() -> None:
    data = DATA * 10
    source, ref = make_source(data)
    reader = make_streaming_reader(source, ByteBudget(1 << 20), memory=1 << 20)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, 4 * BLOCK) == 4 * BLOCK  # a file's head, fetched at open
        await settle(reader)
        readahead = Readahead(initial=4 * BLOCK, maximum=8 * BLOCK)
        assert await reader.read(ref, 0, BLOCK + 5, readahead) == data[: BLOCK + 5]
        await settle(reader)
        mount_tasks.cancel_scope.cancel()
    fetched = [index for _, start, end in source.ranges for index in range(start // BLOCK,
                                                                         -(-end // BLOCK))]
    assert len(fetched) == len(set(fetched)), source.ranges


@trio_test
async def test_readahead_taken_by_a_read_that_waits_for_more_is_not_fetched_again() -> None:
    """A read takes the readahead it covers out of staging, then waits for its next block's
    flight; meanwhile another read of a block it took must find that block, not GET it again
    (a review: ``torch.load(mmap=True)``'s page faults, two threads in one tensor, fetched a
    block twice this way: a 1 MiB read took it and waited for the next GET, and a 4 KiB fault
    in it came while that read waited)."""
    data = DATA * 10
    source, ref = make_source(data)
    reader = make_streaming_reader(source, ByteBudget(1 << 20), memory=1 << 20)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, 2 * BLOCK) == 2 * BLOCK  # blocks 0-1, staged
        await settle(reader)
        source.gate = gate = threading.Event()
        results = {}

        async def read(name: str, offset: int, length: int) -> None:
            results[name] = await reader.read(ref, offset, length)

        async with trio.open_nursery() as readers:
            readers.start_soon(read, "long", BLOCK, 2 * BLOCK)  # takes block 1, GETs block 2
            assert await trio.to_thread.run_sync(inside_get_range, source, 1)
            readers.start_soon(read, "fault", BLOCK, 4)  # block 1, while "long" waits
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        mount_tasks.cancel_scope.cancel()
    assert results == {"long": data[BLOCK : 3 * BLOCK], "fault": data[BLOCK : BLOCK + 4]}
    assert [(start, end) for _, start, end in source.ranges] == [(0, 2 * BLOCK),
                                                                (2 * BLOCK, 3 * BLOCK)]


@trio_test
async def test_a_block_read_again_does_not_keep_its_whole_get_body_alive() -> None:
    """The LRU counts a block's own bytes; a block that is a view of an 8-block GET body and is
    read again while the rest of that body is evicted must not hold the whole body."""
    source = FakeSource()
    source.create_bucket(BUCKET)
    refs = [source.put(BUCKET, f"f{i}", bytes([i]) * 8 * BLOCK) for i in range(16)]
    lru = 16 * BLOCK
    reader = make_reader(source, memory_cache_bytes=lru, max_request_bytes=8 * BLOCK)
    for number, ref in enumerate(refs):
        assert await reader.read(ref, 0, ref.size) == bytes([number]) * ref.size  # one GET
        for hot in range(max(0, number - 6), number + 1):  # a few bytes of recent files again
            assert await reader.read(refs[hot], 0, 4) == bytes([hot]) * 4
    bodies = {}
    for block in reader._memory.values():
        body = block.obj if isinstance(block, memoryview) else block
        bodies[id(body)] = len(body)
    assert reader._memory.currsize <= lru
    assert sum(bodies.values()) <= lru + 8 * BLOCK  # at most one body on its way out


@trio_test
async def test_readahead_the_budget_had_no_room_for_is_asked_again_not_left_as_a_hole() -> None:
    data = DATA * 10
    source, ref = make_source(data)
    budget = ByteBudget(2 * BLOCK)  # one GET of readahead at a time
    reader = make_streaming_reader(source, budget, memory=1 << 20)
    readahead = Readahead(initial=8 * BLOCK, maximum=8 * BLOCK)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for offset in range(0, len(data), BLOCK):
            assert await reader.read(ref, offset, BLOCK, readahead) == data[offset:][:BLOCK]
            await settle(reader)
        mount_tasks.cancel_scope.cancel()
    assert reader.stats.prefetch_skipped > 0  # the budget was short ...
    foreground = [(s, e) for _, s, e in source.ranges if e - s == BLOCK and s > 0]
    assert foreground == []  # ... yet the reader never had to fetch a block itself


@trio_test
async def test_stale_readahead_gives_its_budget_to_other_streams(monkeypatch) -> None:
    source = FakeSource()
    source.create_bucket(BUCKET)
    first, second = (source.put(BUCKET, f"f{i}", DATA) for i in range(2))
    budget = ByteBudget(7 * BLOCK)  # one whole file of readahead
    reader = make_streaming_reader(source, budget, memory=1 << 20)
    clock = [1000.0]
    monkeypatch.setattr("s3datafs.reader.time.monotonic", lambda: clock[0])
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(first, 0, first.size) == first.size  # its reader never comes
        await settle(reader)
        assert budget.used == len(DATA)
        assert reader.prefetch(second, 0, second.size) == 0  # no room yet
        clock[0] += 60.0
        assert reader.prefetch(second, 0, second.size) == second.size  # the stale gave way
        await settle(reader)
        mount_tasks.cancel_scope.cancel()
    calls = source.calls["get_range"]
    assert await reader.read(first, 0, len(DATA)) == DATA  # still cached, in the LRU now
    assert source.calls["get_range"] == calls


def files_read_ahead(count: int, budget_blocks: int) -> tuple[
        FakeSource, list[ObjectRef], ByteBudget, BlockReader]:
    """``count`` files of ``DATA`` (7 blocks each) and a streaming reader whose prefetch
    budget is ``budget_blocks``."""
    source = FakeSource()
    source.create_bucket(BUCKET)
    files = [source.put(BUCKET, f"f{i}", DATA) for i in range(count)]
    budget = ByteBudget(budget_blocks * BLOCK)
    return source, files, budget, make_streaming_reader(source, budget, memory=1 << 20)


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "landing"])
@trio_test
async def test_readahead_of_a_file_closed_by_all_gives_its_budget_back_at_once(
    landed: bool,
) -> None:
    """A header probe (open, read the start, close) pulled a window ahead that held the budget
    for _STAGED_TTL: a sequential reader beside such probes ran 1.7-2x slower (a review)."""
    source, (probed, streamed), budget, reader = files_read_ahead(2, 7)  # a file's readahead
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        reader.opened(probed)
        reader.opened(probed)  # two handles: the first close leaves the readahead wanted
        assert reader.prefetch(probed, 0, probed.size) == probed.size
        if landed:
            await settle(reader)
        reader.closed(probed)
        assert reader.prefetch(streamed, 0, streamed.size) == 0  # still wanted: no room
        reader.closed(probed)
        await settle(reader)
        assert reader.prefetch(streamed, 0, streamed.size) == streamed.size  # it gave way
        await settle(reader)
        mount_tasks.cancel_scope.cancel()
    calls = source.calls["get_range"]
    assert await reader.read(probed, 0, len(DATA)) == DATA  # still cached, in the LRU now
    assert source.calls["get_range"] == calls


@trio_test
async def test_readahead_of_a_file_opened_again_after_all_closed_it_is_wanted_again() -> None:
    _source, (reopened, streamed), _budget, reader = files_read_ahead(2, 7)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        reader.opened(reopened)
        assert reader.prefetch(reopened, 0, reopened.size) == reopened.size
        await settle(reader)
        reader.closed(reopened)
        reader.opened(reopened)  # its readahead is someone's again: it keeps its budget
        assert reader.prefetch(streamed, 0, streamed.size) == 0
        mount_tasks.cancel_scope.cancel()


@trio_test
async def test_readahead_asked_for_a_file_all_closed_is_wanted_again() -> None:
    """Readahead of a file closed by all, asked for again (the prefetch of a second pass over
    files), keeps its budget while staged: it is someone's again."""
    _source, (ahead,), budget, reader = files_read_ahead(1, 7)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        reader.opened(ahead)
        reader.closed(ahead)
        assert reader.prefetch(ahead, 0, ahead.size) == ahead.size
        await settle(reader)
        assert budget.used == ahead.size
        mount_tasks.cancel_scope.cancel()


@trio_test
async def test_only_the_readahead_of_files_closed_by_all_gives_way() -> None:
    _source, (still_open, closed, third, fourth), _budget, reader = files_read_ahead(4, 14)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for ref in (still_open, closed):
            reader.opened(ref)
            assert reader.prefetch(ref, 0, ref.size) == ref.size
        await settle(reader)
        reader.closed(closed)
        assert reader.prefetch(third, 0, third.size) == third.size  # in the closed one's place
        assert reader.prefetch(fourth, 0, fourth.size) == 0  # the open one's stays
        mount_tasks.cancel_scope.cancel()


@trio_test
async def test_readahead_pauses_while_the_disk_cache_falls_behind() -> None:
    source, ref = make_source(DATA * 10)
    reader = make_streaming_reader(source, ByteBudget(1 << 20), memory=1 << 20)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        reader._writes._write_waiting = BLOCK  # a fetched run waits for room in the write budget
        assert reader.prefetch(ref, 0, 10 * BLOCK) == 0
        reader._writes._write_waiting = 0
        assert reader.prefetch(ref, 0, 10 * BLOCK) == 10 * BLOCK
        mount_tasks.cancel_scope.cancel()


def test_streams_reading_ahead_at_once_share_the_budget_evenly(monkeypatch) -> None:
    source, _ = make_source()
    reader = make_streaming_reader(source, ByteBudget(64 * BLOCK), memory=1 << 20)
    clock = [1000.0]
    monkeypatch.setattr("s3datafs.reader.time.monotonic", lambda: clock[0])
    step = 2 * BLOCK
    streams = [Readahead(initial=8 * BLOCK, maximum=64 * BLOCK) for _ in range(4)]
    assert reader._share(streams[0], step) == 0  # alone: the whole budget
    for readahead in streams:  # four streams read ahead
        reader._streams[id(readahead)] = clock[0]
    assert reader._share(streams[0], step) == 16 * BLOCK  # a quarter each
    assert reader._share(Readahead(8 * BLOCK, 64 * BLOCK), step) == 12 * BLOCK  # a fifth, in GETs
    clock[0] += 10.0  # they stopped reading: the next stream has it all again
    assert reader._share(streams[0], step) == 0


# -- sources with bytes at hand --------------------------------------------------------------------


class AtHandSource(FakeSource):
    """A source that has some bytes at hand (as ``MemberSource`` has members of landed spans)."""

    def __init__(self) -> None:
        super().__init__()
        self.at_hand: set[tuple[int, int]] = set()

    def get_range_now(self, ref: ObjectRef, start: int, end: int) -> bytes | None:
        if (start, end) not in self.at_hand:
            return None
        self.calls["get_range_now"] += 1
        return self.get_range(ref, start, end)[:]


@trio_test
async def test_bytes_the_source_has_at_hand_are_served_without_a_flight() -> None:
    source = AtHandSource()
    source.create_bucket(BUCKET)
    ref = source.put(BUCKET, "obj.bin", DATA)
    reader = make_reader(source)
    source.at_hand.add((20, 50))
    assert await reader.read(ref, 20, 30) == DATA[20:50]
    assert source.calls["get_range_now"] == 1
    assert reader.stats.misses == 0  # no flight: the source answered on the trio thread
    assert await reader.read(ref, 60, 100) == DATA[60:]  # not at hand: blocks, as always
    assert reader.stats.misses == blocks_spanned(60, 100)


# -- with the disk cache ---------------------------------------------------------------------------

PAGE_BLOCK = 4096  # the disk cache writes whole pages (O_DIRECT)


def make_disk_reader(
    source: FakeSource,
    disk: DiskCache,
    write_budget: ByteBudget | None = None,
    disk_limiter: trio.CapacityLimiter | None = None,
) -> BlockReader:
    return BlockReader(
        source,
        block_size=PAGE_BLOCK,
        memory_cache_bytes=4 << 20,
        s3_limiter=trio.CapacityLimiter(8),
        disk=disk,
        disk_limiter=disk_limiter,
        max_request_bytes=8 << 20,
        write_budget=write_budget,
    )


def object_and_disk(tmp_path, blocks: int) -> tuple[bytes, FakeSource, ObjectRef, DiskCache]:
    """An object of ``blocks`` disk blocks in a fake source, and an empty disk cache."""
    data = bytes(range(256)) * blocks * (PAGE_BLOCK // 256)
    source, ref = make_source(data)
    return data, source, ref, DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)


@trio_test
async def test_on_a_slow_link_a_run_the_disk_cache_may_hold_is_one_flight(tmp_path) -> None:
    data, source, ref, disk = object_and_disk(tmp_path, 64)

    def mounted() -> BlockReader:  # a new mount each time: nothing in memory, the same disk
        return BlockReader(
            source, block_size=PAGE_BLOCK, memory_cache_bytes=4 << 20,
            s3_limiter=trio.CapacityLimiter(8), disk=disk, link=measured_link(100e6),
            split_bytes=8 * PAGE_BLOCK,
        )

    cold, warm = mounted(), mounted()
    assert await cold.read(ref, 0, 16 * PAGE_BLOCK) == data[: 16 * PAGE_BLOCK]
    assert (cold.stats.split_reads, source.calls["get_range"]) == (1, 2)  # nothing on disk yet
    assert await warm.read(ref, 0, 16 * PAGE_BLOCK) == data[: 16 * PAGE_BLOCK]
    # Its region file is known now: one flight, served by the disk, and no GET.
    assert (warm.stats.split_reads, warm.stats.disk_hits, source.calls["get_range"]) == (0, 16, 2)


@pytest.mark.parametrize("blocks", [5, 300])  # a short run (one worker call), a long one (two)
@trio_test
async def test_a_flight_takes_the_cached_prefix_from_disk_and_gets_only_the_rest(
    tmp_path, blocks: int
) -> None:
    data = bytes(range(256)) * blocks * (PAGE_BLOCK // 256) + b"tail"  # and 4 bytes
    source, ref = make_source(data)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    cached = [data[i * PAGE_BLOCK : (i + 1) * PAGE_BLOCK] for i in range(2)]
    disk.write(ref, object_digest(ref), 0, cached)
    reader = make_disk_reader(source, disk)
    assert await reader.read(ref, 0, len(data)) == data
    assert source.ranges == [(ref, 2 * PAGE_BLOCK, len(data))]  # one GET for the rest
    assert reader.stats.disk_hits == 2
    assert reader.stats.misses == blocks - 1

    fresh = make_disk_reader(source, disk)  # a remount: no memory, the same disk
    assert await fresh.read(ref, 0, len(data)) == data  # what S3 sent was written behind
    assert len(source.ranges) == 1
    assert fresh.stats.disk_hits == blocks + 1


@trio_test
async def test_an_object_replaced_in_place_is_never_served_from_the_old_pins_cache(
    tmp_path,
) -> None:
    """On an unversioned bucket a replaced object keeps its key and has no VersionId: only the
    ETag tells the new pin from the old. The disk cache must name blocks by the ETag too, or a
    mount of the new pin reads the old bytes (same size here, so no length check saves it)."""
    old = bytes(range(256)) * 3 * (PAGE_BLOCK // 256)
    new = bytes(reversed(old))
    source, old_ref = make_source(old)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    assert await make_disk_reader(source, disk).read(old_ref, 0, len(old)) == old
    new_ref = source.put(BUCKET, "obj.bin", new)
    assert (new_ref.version_id, new_ref.size) == (old_ref.version_id, old_ref.size)
    assert new_ref.etag != old_ref.etag
    fresh = make_disk_reader(source, disk)  # a remount of the new pin: the same disk cache
    assert await fresh.read(new_ref, 0, len(new)) == new
    assert fresh.stats.disk_hits == 0


@trio_test
async def test_a_disk_cache_that_cannot_be_read_is_passed_over_for_s3(tmp_path, caplog) -> None:
    data = bytes(range(256)) * 3 * (PAGE_BLOCK // 256)
    source, ref = make_source(data)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)

    def unreadable(*_args: object, **_kwargs: object) -> dict[int, bytes]:
        raise OSError(5, "Input/output error")

    disk.read_run = unreadable  # type: ignore[method-assign]
    reader = make_disk_reader(source, disk)
    assert await reader.read(ref, 100, 2 * PAGE_BLOCK) == data[100 : 100 + 2 * PAGE_BLOCK]
    assert source.ranges == [(ref, 0, len(data))]
    assert "cannot read the block cache" in caplog.text


@pytest.fixture
def worker_calls(monkeypatch) -> list[str]:
    """The names of the functions handed to worker threads, in order."""
    calls: list[str] = []
    run_sync = trio.to_thread.run_sync

    async def counting_run_sync(function, *args, **kwargs):
        calls.append(function.__name__)
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting_run_sync)
    return calls


@pytest.mark.parametrize("blocks", [5, 300])
@trio_test
async def test_a_short_run_costs_one_worker_call_with_its_cache_write(
    tmp_path, worker_calls: list[str], blocks: int
) -> None:
    data, source, ref, disk = object_and_disk(tmp_path, blocks)
    reader = make_disk_reader(source, disk)
    assert await reader.read(ref, 0, len(data)) == data
    if blocks * PAGE_BLOCK <= ONE_HOP_BYTES:  # one hop: disk lookup, GET and cache write
        assert worker_calls == ["_load_watched"]
    else:  # a reader's own long run: lookup and GET, then write-behind
        assert worker_calls == ["_load_watched", "_paced_write"]
    found = disk.read_run(object_digest(ref), ref.size, range(blocks))
    assert b"".join(found.values()) == data


@pytest.mark.parametrize("blocks", [16, 300])  # a short run (one worker call), a long one
@trio_test
async def test_a_run_gets_only_from_its_first_uncached_block_to_its_last(
    tmp_path, blocks: int
) -> None:
    """Random reads cached blocks here and there; a later run over them GET everything from
    its first missing block on, the cached ones after it included (a review: blocks 100 and
    102 on disk, a read of 99-102 fetched all four). Blocks cached at either end are not
    fetched; those between are, in the same GET (a GET per hole would cost a round trip)."""
    data, source, ref, disk = object_and_disk(tmp_path, blocks)
    digest, last = object_digest(ref), blocks - 1
    for index in (0, 1, 5, last - 1, last):  # cached before: by random reads of another mount
        disk.write(ref, digest, index, [data[index * PAGE_BLOCK : (index + 1) * PAGE_BLOCK]])
    reader = make_disk_reader(source, disk)
    assert await reader.read(ref, 0, len(data)) == data
    assert [(start, end) for _, start, end in source.ranges] == [
        (2 * PAGE_BLOCK, (last - 1) * PAGE_BLOCK)]
    assert reader.stats.disk_hits == 4  # block 5 came again with the GET
    assert reader.stats.misses == blocks - 4


@trio_test
async def test_readahead_gets_leave_out_the_stretches_the_disk_cache_holds(tmp_path) -> None:
    """Readahead over blocks cached before, out of memory by now, GETs around them: nobody
    waits for its GETs, so more of them cost requests, not time. A review: ``torch.load(mmap=
    True)`` reads each tensor's zip header first (a few blocks, soon gone from the memory LRU,
    kept on disk), and readahead through the tensors later fetched those blocks again: 27 of
    6,398. At most 4 GETs a run: the shortest cached stretches beyond that come again."""
    data, source, ref, disk = object_and_disk(tmp_path, 100)  # a long run: 400 KiB
    digest = object_digest(ref)
    for first, count in ((10, 3), (30, 2), (40, 1), (50, 4)):  # cached by reads of before
        blocks = [data[i * PAGE_BLOCK : (i + 1) * PAGE_BLOCK] for i in range(first, first + count)]
        disk.write(ref, digest, first, blocks)
    reader = make_disk_reader(source, disk)  # a new mount: nothing in memory
    source.gate = gate = threading.Event()
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, ref.size) == ref.size  # one run, one flight
        # Its GETs are sent at once: none waits for another.
        assert await trio.to_thread.run_sync(inside_get_range, source, 4)
        gate.set()
        await settle(reader)
        assert await reader.read(ref, 0, ref.size) == data  # from what landed: no GET
        mount_tasks.cancel_scope.cancel()
    fetched = sorted((start // PAGE_BLOCK, end // PAGE_BLOCK) for _, start, end in source.ranges)
    assert fetched == [(0, 10), (13, 30), (32, 50), (54, 100)]  # block 40 came again
    assert (reader.stats.s3_requests, reader.stats.disk_hits) == (4, 9)
    assert reader.stats.misses == 100 - 9


@pytest.mark.parametrize("failing", ["every GET", "one GET"])
@trio_test
async def test_readahead_in_pieces_that_fail_gives_its_reader_the_typed_error(
    tmp_path, failing: str
) -> None:
    """Readahead around cached stretches is several GETs in one nursery, so their failure
    arrives as an exception group: the reader that waits for that readahead must still get the
    error S3 gave (ESTALE for an object changed after mount), not a group the FUSE layer would
    turn into EIO and an "unexpected error" traceback."""
    data, source, ref, disk = object_and_disk(tmp_path, 100)
    digest = object_digest(ref)
    for first, count in ((10, 3), (30, 2), (50, 4)):  # cached by reads of before: four pieces
        blocks = [data[i * PAGE_BLOCK : (i + 1) * PAGE_BLOCK] for i in range(first, first + count)]
        disk.write(ref, digest, first, blocks)
    reader = make_disk_reader(source, disk)
    source.gate = gate = threading.Event()
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, ref.size) == ref.size
        assert await trio.to_thread.run_sync(inside_get_range, source, 4)
        if failing == "every GET":
            source.put(BUCKET, ref.key, b"changed after mount")
        else:
            source.fail_next(
                1, StaleObjectError(f"{ref.uri} changed or was deleted since it was pinned"))

        async def land() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the read waits for the readahead
            gate.set()

        mount_tasks.start_soon(land)
        with pytest.raises(StaleObjectError, match="changed or was deleted since it was pinned"):
            await reader.read(ref, 0, ref.size)
        mount_tasks.cancel_scope.cancel()
    assert len(source.ranges) == 4  # the readahead's pieces: the reader sent no GET of its own


class OnePieceFailsFirst(FakeSource):
    """The GET from block ``failing`` on fails at once; every other waits until it has (a
    piece that S3 answers after its sibling failed)."""

    failing = 0

    def __init__(self) -> None:
        super().__init__()
        self.failed = threading.Event()

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        if start == self.failing * PAGE_BLOCK:
            self.failed.set()
            raise TransientS3Error(f"S3 error on {ref.uri}: SlowDown")
        assert self.failed.wait(10), "the failing piece was never sent"
        return super().get_range(ref, start, end)


@trio_test
async def test_readahead_in_pieces_caches_what_s3_sent_though_another_piece_failed(
    tmp_path,
) -> None:
    """A failed piece cancelled the others: their GETs went on in their threads, S3 sent the
    bytes, and they were thrown away - neither kept nor cached, nor remembered for a refill, so
    they were fetched again (the refill chaos test: 1-6 blocks S3 sent never cached, in 1 run
    of 300 on two busy cores). The flight still fails; what the other piece fetched is cached."""
    source = OnePieceFailsFirst()
    source.create_bucket(BUCKET)
    data = bytes(range(256)) * 100 * (PAGE_BLOCK // 256)  # a long run: 400 KiB
    ref = source.put(BUCKET, "obj.bin", data)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    digest = object_digest(ref)
    disk.write(ref, digest, 2, [data[2 * PAGE_BLOCK : 3 * PAGE_BLOCK]])  # cached by reads before
    source.failing = 3  # readahead of 0-99 GETs 0-1 and 3-99: 3-99 fails first
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, ref.size) == ref.size  # one run, two pieces
    assert [(start // PAGE_BLOCK, end // PAGE_BLOCK) for _, start, end in source.ranges] == [
        (0, 2)]  # the piece that failed raised before the fake counted it
    assert sorted(disk.read_run(digest, ref.size, range(100), every=True)) == [0, 1, 2]
    assert reader.stats.s3_requests == 1  # the GET that failed is no request S3 answered


@trio_test
async def test_a_reader_of_a_piece_that_landed_gets_it_though_another_piece_failed(
    tmp_path,
) -> None:
    """A read that joined readahead in pieces gets its blocks from the piece that landed: the
    failure of another piece (S3 trouble with other bytes) is not its failure. Blocks of the
    failed piece still fail; every GET's bytes were checked on their own, so what landed is
    the pinned bytes."""
    source = OnePieceFailsFirst()
    source.create_bucket(BUCKET)
    data = bytes(range(256)) * 100 * (PAGE_BLOCK // 256)
    ref = source.put(BUCKET, "obj.bin", data)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    disk.write(ref, object_digest(ref), 2, [data[2 * PAGE_BLOCK : 3 * PAGE_BLOCK]])
    source.failing = 3  # readahead of 0-99 GETs 0-1 and 3-99: 3-99 fails first
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, ref.size) == ref.size  # one run, two pieces
        landed, failed = await join_both(reader, ref)
    assert landed == data[:PAGE_BLOCK]
    assert isinstance(failed, TransientS3Error)


async def join_both(reader: BlockReader, ref: ObjectRef) -> tuple[bytes, BaseException]:
    """Read block 0 and block 50 while the readahead of both is in flight."""
    results: dict[str, object] = {}

    async def read(name: str, index: int) -> None:
        try:
            results[name] = await reader.read(ref, index * PAGE_BLOCK, PAGE_BLOCK)
        except TransientS3Error as exc:
            results[name] = exc

    async with trio.open_nursery() as readers:
        readers.start_soon(read, "landed", 0)
        readers.start_soon(read, "failed", 50)
    return results["landed"], results["failed"]  # type: ignore[return-value]


@pytest.mark.parametrize("who", ["reader, disk behind", "prefetch command"])
@trio_test
async def test_only_a_long_run_nobody_waits_for_looks_on_disk_behind_the_writes(
    tmp_path, worker_calls: list[str], who: str
) -> None:
    """``warm`` (the prefetch command; readahead too) queues behind the cache writes, which
    holds back its GETs while the disk falls behind; a run a reader waits for never does."""
    data, source, ref, disk = object_and_disk(tmp_path, 300)
    reader = make_disk_reader(source, disk)
    if who == "prefetch command":
        await reader.warm(ref)
        assert worker_calls == ["_read_cached", "_load_watched", "_paced_write"]
    else:
        # Fetched blocks wait for room: the disk is behind.
        reader._writes._write_waiting = PAGE_BLOCK
        assert await reader.read(ref, 0, len(data)) == data
        assert worker_calls == ["_load_watched", "_paced_write"]
    assert len(disk.read_run(object_digest(ref), ref.size, range(300))) == 300


@pytest.mark.parametrize("blocks", [5, 300])
@pytest.mark.parametrize(
    ("failure", "logged"),
    [
        (OSError(28, "No space left on device"),
         "cannot write to the block cache ([Errno 28] No space left on device)"),
        (AttributeError("a bug"), "unexpected error writing to the block cache"),
    ],
    ids=["disk full", "bug"],
)
@trio_test
async def test_a_disk_cache_that_fails_writes_is_counted_logged_once_and_reads_go_on(
    tmp_path, caplog, blocks: int, failure: Exception, logged: str
) -> None:
    data, source, ref, disk = object_and_disk(tmp_path, blocks)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise failure

    disk.write = fail  # type: ignore[method-assign]
    reader = make_disk_reader(source, disk)
    for pinned in (ref, source.put(BUCKET, "other.bin", data)):
        assert await reader.read(pinned, 0, len(data)) == data
        assert await reader.read(pinned, 0, len(data)) == data  # from memory
    assert reader.stats.cache_write_errors == 2
    assert caplog.text.count(logged) == 1
    assert ("Traceback" in caplog.text) == (not isinstance(failure, OSError))  # a bug's, once


class HeldSyncDisk(DiskCache):
    """A disk cache whose syncs (scans of the whole cache) wait until ``release`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.syncs = 0

    def sync(self) -> None:
        assert self.release.wait(10), "the test never released the sync"
        self.syncs += 1
        super().sync()


@trio_test
async def test_a_sync_due_after_a_short_run_runs_behind_its_readers(tmp_path) -> None:
    data = bytes(range(256)) * 5 * (PAGE_BLOCK // 256)
    source, ref = make_source(data)
    disk = HeldSyncDisk(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    disk.sync_every = 1  # every write makes one due
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        with trio.fail_after(5):  # the reads return while the sync is held
            assert await reader.read(ref, 0, PAGE_BLOCK) == data[:PAGE_BLOCK]
            assert await reader.read(ref, 2 * PAGE_BLOCK, 10) == data[2 * PAGE_BLOCK:][:10]
        disk.release.set()  # the mount's nursery then ends once the sync is done
    assert disk.syncs == 1  # one at a time: the second read found one under way
    digest = object_digest(ref)
    assert [len(disk.read_run(digest, ref.size, range(i, i + 1))) for i in range(3)] == [1, 0, 1]


@trio_test
async def test_a_sync_that_falls_due_after_the_last_one_ended_runs_too(tmp_path) -> None:
    """Once a sync behind the readers has ended, the next one that falls due runs as well (the
    cache's bound is kept by them: a sync left as under way for good ran no other)."""
    data = bytes(range(256)) * 5 * (PAGE_BLOCK // 256)
    source, ref = make_source(data)
    disk = HeldSyncDisk(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    disk.sync_every = 1  # every write makes one due
    disk.release.set()
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for index in (0, 2, 4):
            assert await reader.read(ref, index * PAGE_BLOCK, 10) == data[index * PAGE_BLOCK:][:10]
            with trio.fail_after(5):
                while reader._writes._syncing:  # noqa: ASYNC110 - the sync runs in a thread
                    await trio.sleep(0.01)
    assert disk.syncs == 3


@trio_test
async def test_a_bug_in_a_scan_is_said_once_and_ends_neither_reads_nor_the_mount(
    tmp_path, monkeypatch, caplog
) -> None:
    """The mount's scans run in its nurseries (at start, and behind the writes when one falls
    due), and ``try_sync`` caught only OSError: anything else out of ``sync`` (a bug) ended the
    nursery, and the mount with it, where a write's bug is logged and the reads go on. Now it is
    logged once, with its traceback, and every due scan is tried again."""
    data = bytes(range(256)) * 5 * (PAGE_BLOCK // 256)
    source, ref = make_source(data)
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    disk.sync_every = 1  # every write makes one due
    scans = []

    def broken_sync() -> None:
        scans.append(ValueError("a bug in the scan"))
        raise scans[-1]

    monkeypatch.setattr(disk, "sync", broken_sync)
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await trio.to_thread.run_sync(disk.try_sync)  # as a mount starts
        # Each read's write makes a scan due; waiting for that scan to have been tried (not only
        # for no sync to be running: one that has not started yet would be run together with
        # the next one, on a loaded machine) makes the count exact.
        for tried, index in enumerate((0, 2, 4), start=2):
            assert await reader.read(ref, index * PAGE_BLOCK, 10) == data[index * PAGE_BLOCK:][:10]
            with trio.fail_after(5):
                while len(scans) < tried or reader._writes._syncing:  # noqa: ASYNC110 - a thread
                    await trio.sleep(0.01)
    assert len(scans) == 4
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage().split(";")[0] for record in errors] == [
        "unexpected error scanning the block cache"]
    assert errors[0].exc_info[1] in scans
    assert reader.stats.cache_write_errors == 0  # the writes were not the scans' failure


# -- cache writes yield to reads waiting on S3 ---------------------------------------------------


class HeldSource(FakeSource):
    """GETs of the keys in ``held`` wait until ``release`` is set (a read waiting on S3)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[str] = set()
        self.holding = threading.Event()  # a held GET has started
        self.release = threading.Event()

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        if ref.key in self.held:
            self.holding.set()
            assert self.release.wait(10), "the test never released the held GET"
        return super().get_range(ref, start, end)


@trio_test
async def test_once_every_connection_waits_on_a_stalled_s3_new_reads_fail_at_once() -> None:
    source = HeldSource()
    source.create_bucket(BUCKET)
    refs = [source.put(BUCKET, f"{i}.bin", b"x" * PAGE_BLOCK) for i in range(4)]
    source.held.update(ref.key for ref in refs)
    reader = BlockReader(source, block_size=PAGE_BLOCK, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(2), read_timeout=0.2)
    for ref in refs[:2]:  # each waits its bound; its GET, given up, keeps its connection
        with pytest.raises(TransientS3Error, match=r"within 0.2s \(--read-timeout\)"):
            await reader.read(ref, 0, 10)
    started = time.monotonic()
    with pytest.raises(TransientS3Error, match="all 2 connections wait on S3"):
        await reader.read(refs[2], 0, 10)
    assert time.monotonic() - started < 0.1  # not another whole bound
    source.release.set()  # S3 answers again: the given-up GETs end, their connections are back
    with trio.fail_after(5):
        while reader._abandoned:  # noqa: ASYNC110 - worker threads count it down
            await trio.sleep(0.01)
    assert await reader.read(refs[3], 0, 10) == b"x" * 10


class DecompressingSource(FakeSource):
    """A source whose every object is being made by its own work (a zip member decompressed
    into the disk cache): a read of it waits for this process, not for S3."""

    def decompressing(self, ref: ObjectRef) -> bool:
        return True


@trio_test
async def test_once_every_connection_waits_on_a_stalled_s3_a_read_of_the_sources_own_work_goes_on(
) -> None:
    """Reads given up on a stalled S3 hold every connection: a new S3 read fails at once, but
    one that waits for the source's own work (a decompression) holds no S3 slot and goes on."""
    source = DecompressingSource()
    source.create_bucket(BUCKET)
    ref = source.put(BUCKET, "member.bin", DATA)
    reader = make_reader(source, connections=2)
    reader._abandoned = 2  # both connections wait on S3 for reads given up
    assert await reader.read(ref, 0, len(DATA)) == DATA


class WatchedDisk(DiskCache):
    """A disk cache that counts the blocks written to it, and can wait for a count."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks_written = 0
        self._written = threading.Condition()

    def write(self, ref, digest, first, blocks, **kwargs) -> None:
        super().write(ref, digest, first, blocks, **kwargs)
        with self._written:
            self.blocks_written += len(blocks)
            self._written.notify_all()

    def wait_for(self, blocks: int) -> bool:
        with self._written:
            return self._written.wait_for(lambda: self.blocks_written >= blocks, timeout=5)


LONG_RUN = 300 * PAGE_BLOCK  # written behind, not by the GET's thread (see ONE_HOP_BYTES)


async def yielding_setup(
    tmp_path,
    monkeypatch,
    nursery: trio.Nursery,
    names: tuple[str, ...],
    *,
    write_yield: float,
    write_budget: int = 64 << 20,
) -> tuple[HeldSource, WatchedDisk, BlockReader, bytes, list[ObjectRef]]:
    """A mounted reader with a read waiting on S3, and objects ``names`` of ``LONG_RUN`` bytes;
    its cache writes may wait ``write_yield`` seconds for reads (``writebehind.WRITE_YIELD``)."""
    monkeypatch.setattr(writebehind_module, "WRITE_YIELD", write_yield)
    source = HeldSource()
    source.create_bucket(BUCKET)
    data = bytes(range(256)) * (LONG_RUN // 256)
    refs = [source.put(BUCKET, name, data) for name in names]
    disk = WatchedDisk(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    reader = make_disk_reader(source, disk, write_budget=ByteBudget(write_budget))
    reader.attach(nursery)
    waiting = source.put(BUCKET, "waiting.bin", b"w" * PAGE_BLOCK)
    source.held.add(waiting.key)
    nursery.start_soon(reader.read, waiting, 0, 10)
    assert await trio.to_thread.run_sync(source.holding.wait, 5)
    return source, disk, reader, data, refs


@trio_test
async def test_a_cache_write_waits_for_the_reads_waiting_on_s3(tmp_path, monkeypatch) -> None:
    async with trio.open_nursery() as mount_tasks:
        source, disk, reader, data, [ref] = await yielding_setup(
            tmp_path, monkeypatch, mount_tasks, ("long.bin",), write_yield=60.0
        )
        assert await reader.read(ref, 0, len(data)) == data
        await trio.sleep(0.05)
        assert disk.blocks_written == 0  # its write waits while the other read does
        source.release.set()
    assert disk.blocks_written == 300 + 1  # it went once that read had its bytes (and its block)
    assert len(disk.read_run(object_digest(ref), ref.size, range(300))) == 300


@trio_test
async def test_a_cache_write_waits_for_reads_no_longer_than_write_yield(
    tmp_path, monkeypatch
) -> None:
    async with trio.open_nursery() as mount_tasks:
        source, disk, reader, data, [ref] = await yielding_setup(
            tmp_path, monkeypatch, mount_tasks, ("long.bin",), write_yield=0.05
        )
        assert await reader.read(ref, 0, len(data)) == data  # then waits 0.05 s, no longer
        assert await trio.to_thread.run_sync(disk.wait_for, 300)
        assert not source.release.is_set()  # written while the other read still waits
        source.release.set()


@trio_test
async def test_cache_writes_stop_waiting_for_reads_once_the_write_budget_is_spent(
    tmp_path, monkeypatch
) -> None:
    async with trio.open_nursery() as mount_tasks:
        source, disk, reader, data, [first, second] = await yielding_setup(
            tmp_path, monkeypatch, mount_tasks, ("first.bin", "second.bin"),
            write_yield=60.0, write_budget=LONG_RUN,
        )
        assert await reader.read(first, 0, len(data)) == data  # its write holds the budget
        mount_tasks.start_soon(reader.warm, second)  # and the prefetch command's run needs it
        # Memory first: the first is written though a read still waits on S3; the second then
        # holds the budget and waits in turn.
        assert await trio.to_thread.run_sync(disk.wait_for, 300)
        assert len(disk.read_run(object_digest(first), first.size, range(300))) == 300
        # Its thread counted the blocks before it returned: its write ends (and gives the
        # budget back) once that thread's disk limiter slot is back, not when the disk has them.
        with trio.fail_after(5):
            while reader._disk_limiter.borrowed_tokens:  # noqa: ASYNC110 - a thread ends it
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()  # the second took the budget back
        assert reader._writes._write_budget.used == LONG_RUN
        # ... and waits for room no more: readahead, paused while a run waited, may go on.
        assert reader._writes._write_waiting == 0
        assert reader.prefetch(first, 0, BLOCK) == BLOCK
        source.release.set()
    assert disk.blocks_written == 600 + 1


class StuckDisk(WatchedDisk):
    """A cache disk whose writes wait for ``unstuck`` (a disk far slower than S3)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unstuck = threading.Event()
        self.entered = threading.Event()  # a write is stuck

    def write(self, *args, **kwargs) -> None:
        self.entered.set()
        assert self.unstuck.wait(10), "the test never let the disk go on"
        super().write(*args, **kwargs)


def stuck_disk_reader(
    tmp_path, disk_type: type[StuckDisk] = StuckDisk, capacity: int = 1 << 30,
    source: FakeSource | None = None,
) -> tuple[FakeSource, StuckDisk, BlockReader]:
    """A reader with a write budget of one ``LONG_RUN`` over a stuck disk cache."""
    source = source or FakeSource()
    source.create_bucket(BUCKET)
    disk = disk_type(tmp_path, block_size=PAGE_BLOCK, capacity=capacity)
    return source, disk, make_disk_reader(source, disk, write_budget=ByteBudget(LONG_RUN))


RUN_DATA = bytes(range(256)) * (LONG_RUN // 256)


def objects_past_the_reserve(reader: BlockReader, source: FakeSource, left: int) -> list:
    """Objects of one ``LONG_RUN`` of ``RUN_DATA`` each, read in turn over a stuck disk: the
    first takes the write budget, the next ones the reserve, and the ``left`` last are left
    uncached."""
    reserved = reader._writes._write_reserve.capacity // LONG_RUN
    return [source.put(BUCKET, f"{i}.bin", RUN_DATA) for i in range(1 + reserved + left)]


async def read_each(reader: BlockReader, refs: list) -> None:
    """Read each of ``refs`` whole, in turn, checking its bytes (``RUN_DATA``)."""
    for ref in refs:
        assert await reader.read(ref, 0, LONG_RUN) == RUN_DATA


@trio_test
async def test_reads_do_not_wait_for_a_cache_disk_that_falls_behind(tmp_path) -> None:
    source, disk, reader = stuck_disk_reader(tmp_path)
    data = bytes(range(256)) * (LONG_RUN // 256)
    reserved = reader._writes._write_reserve.capacity // LONG_RUN  # runs the reserve of 8 MiB holds
    first, *kept, left, left_too = (
        source.put(BUCKET, f"{i}.bin", data) for i in range(reserved + 3))
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert await reader.read(first, 0, len(data)) == data  # its write holds the budget
        with trio.fail_after(2):  # the disk is stuck: these do not wait for it
            for ref in (*kept, left, left_too):  # the reserve first, then uncached
                assert await reader.read(ref, 0, len(data)) == data
        assert reader.stats.cache_writes_skipped == 600  # the last two: left uncached, for now
        await trio.sleep(3 * writebehind_module._REFILL_POLL)  # a refill waiting for room ...
        assert reader._writes._write_waiting == 0  # ... waits apart: readahead goes on
        other = source.put(BUCKET, "other.bin", data)
        assert reader.prefetch(other, 0, BLOCK) == BLOCK
        assert disk.read_run(object_digest(left), left.size, range(300)) == {}
        disk.unstuck.set()
    # Once the disk went on: the reserve's, and the two left uncached, from memory (no GET).
    assert disk.blocks_written >= 300 * (3 + reserved)  # and other.bin's readahead
    assert reader.stats.cache_refills == 600
    assert source.calls["get_range"] == reserved + 4  # one a file, other.bin's readahead too
    assert all(len(disk.read_run(object_digest(ref), ref.size, range(300))) == 300
               for ref in (first, *kept, left, left_too))


class HeldDisk:
    """What ``WriteBehind`` asks of a disk cache, with writes held until ``go`` is set; with
    ``refuse``, each write then fails as a read-only filesystem's does."""

    capacity = 1 << 40

    def __init__(self, refuse: bool = False) -> None:
        self.go = threading.Event()
        self.refuse = refuse
        self.written: list[int] = []  # first block of each write, as it ends

    def write(self, ref: ObjectRef, digest: str, first: int, blocks: list[bytes]) -> None:
        assert self.go.wait(10), "the test never let the disk go on"
        if self.refuse:
            raise OSError(errno.EROFS, "Read-only file system")
        self.written.append(first)


def held_disk_writes(disk: HeldDisk, size: int, request_blocks: int = 1) -> tuple[
        writebehind_module.WriteBehind, reader_module.ReadStats, list[tuple[ObjectRef, range]]]:
    """A ``WriteBehind`` over ``disk`` with blocks of ``size``, its default write budget and no
    memory; its stats, and the runs its refills loaded (fetched again)."""
    stats, loaded = reader_module.ReadStats(), []

    async def load(ref: ObjectRef, run: range, _held: dict[int, bytes]) -> None:
        loaded.append((ref, run))

    return writebehind_module.WriteBehind(
        disk, disk_limiter=trio.CapacityLimiter(4), block_size=size,
        request_blocks=request_blocks, write_budget=None, stats=stats, trouble=TroubleLog(),
        memory={}, load=load), stats, loaded


@trio_test
async def test_the_default_write_budget_holds_two_runs_of_a_large_block_beside_the_reserve(
) -> None:
    """Runs of one 40 MiB block (--block-size 40M): the default write budget (64 MiB) would
    hold one of them, and a reader's run met the one before still being written. It holds two,
    so three runs readers waited for are all cached while the disk is busy with the first (two
    in the budget, the third in the reserve)."""
    size = 40 << 20
    block = bytes(size)  # one buffer for every run
    disk = HeldDisk()
    writes, stats, _loaded = held_disk_writes(disk, size)
    _source, ref = make_source()
    async with trio.open_nursery() as mount_tasks:
        writes.attach(mount_tasks)
        for index in range(3):
            await writes.write_behind(ref, index, [block], waited=True)
        assert stats.cache_writes_skipped == 0
        disk.go.set()
    assert sorted(disk.written) == [0, 1, 2]


@trio_test
async def test_a_write_of_another_part_of_an_object_being_refilled_is_no_refill() -> None:
    """While blocks 0-3 of an object are refilled, readahead's write of its blocks 8-11 is not
    counted in ``cache_refills`` (nor would the disk's refusal of it end the refills)."""
    disk = HeldDisk()
    disk.go.set()
    writes, stats, _loaded = held_disk_writes(disk, BLOCK, request_blocks=4)
    _source, ref = make_source()
    writes._refilling_run = (ref, range(0, 4))
    await writes.write_behind(ref, 8, [DATA[:BLOCK]] * 4)
    await writes.write_behind(ref, 2, [DATA[:BLOCK]] * 2)
    assert disk.written == [8, 2]
    assert stats.cache_refills == 2


async def refused_refill_write(writes: writebehind_module.WriteBehind, ref: ObjectRef) -> None:
    """A refill's write of one block of ``ref``, which the disk refuses."""
    assert writes._write_budget.try_take(BLOCK)
    await writes._write(ref, 0, [DATA[:BLOCK]], BLOCK, writes._write_budget, refilled=True)


@trio_test
async def test_a_refill_write_the_disk_refuses_drops_the_runs_queued() -> None:
    """A refused refill write (a read-only or full cache filesystem) ends the refills: the runs
    queued are not fetched again from S3 only to be refused too."""
    disk = HeldDisk(refuse=True)
    disk.go.set()
    writes, stats, loaded = held_disk_writes(disk, BLOCK, request_blocks=4)
    source, ref = make_source()
    other = source.put(BUCKET, "other.bin", DATA)
    writes._queue(ref, 0, 4)
    writes._failed_again(other, 0, 4)  # S3 refused its refill once: queued again, counted
    await refused_refill_write(writes, ref)
    assert stats.cache_write_errors == 1
    assert not writes._skipped
    assert not writes._refill_failures  # nothing remembered of runs no longer queued
    assert loaded == []


@trio_test
async def test_a_refill_write_the_disk_refuses_drops_the_run_a_refill_has_taken_already(
) -> None:
    """The refill took the next run and waits for room when another refill's write is refused:
    that run is dropped too, not fetched again from S3 once there is room."""
    disk = HeldDisk(refuse=True)
    disk.go.set()
    writes, _stats, loaded = held_disk_writes(disk, BLOCK, request_blocks=4)
    _source, ref = make_source()
    writes.reader_waits()  # a reader waits on S3: no room for a refill
    async with trio.open_nursery() as mount_tasks:
        writes.attach(mount_tasks)
        writes._remember_skipped(ref, 0, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert not writes._skipped  # taken by the refill, which waits for room
        await refused_refill_write(writes, ref)
        writes.reader_served()  # room again
    assert loaded == []


def test_runs_left_uncached_past_the_bound_forget_the_oldest() -> None:
    """Runs left uncached are remembered up to half the cache: past it the oldest are
    forgotten, the newest kept (a reader's latest runs are the likeliest to be read again)."""
    disk = HeldDisk()
    disk.capacity = 2 * 8 * BLOCK * 2  # room for two runs of 8 blocks
    writes, _stats, _loaded = held_disk_writes(disk, BLOCK, request_blocks=8)
    source, ref = make_source()
    newer, newest = (source.put(BUCKET, f"{name}.bin", DATA) for name in ("newer", "newest"))
    for each in (ref, newer, newest):
        writes._remember_skipped(each, 0, 8)
    assert list(writes._skipped) == [(newer, 0), (newest, 0)]


def test_runs_left_uncached_that_make_up_one_get_exactly_are_cached_together() -> None:
    """Runs one after another whose blocks add up to one GET's length are one GET."""
    source, ref = make_source()
    reader = make_reader(source, max_request_bytes=32 * BLOCK)
    reader._writes._skipped.update({(ref, 0): 16, (ref, 16): 16})
    assert reader._writes._next_skipped() == (ref, 0, 32)


@pytest.mark.parametrize("busy", ["a reader waits on S3", "a fetched run waits for room"])
@trio_test
async def test_a_refill_waits_while_a_reader_waits_on_s3_or_a_run_waits_for_room(
    busy: str,
) -> None:
    """A refill goes only when the disk has room: no reader waits on S3 (the refill's GET and
    write would take from it) and no fetched run waits for the write budget."""
    disk = HeldDisk()
    disk.go.set()
    writes, _stats, loaded = held_disk_writes(disk, BLOCK, request_blocks=4)
    _source, ref = make_source()
    if busy == "a reader waits on S3":
        writes.reader_waits()
    else:
        writes._write_waiting += BLOCK
    async with trio.open_nursery() as mount_tasks:
        writes.attach(mount_tasks)
        writes._remember_skipped(ref, 0, 4)
        await trio.sleep(3 * writebehind_module._REFILL_POLL)
        assert loaded == []
        if busy == "a reader waits on S3":
            writes.reader_served()
        else:
            writes._write_waiting -= BLOCK
    assert loaded == [(ref, range(0, 4))]


def test_readahead_of_closed_files_given_back_leaves_the_runs_to_refill_alone() -> None:
    """A stray copy of the refill queue's initialisation in _reclaim_closed emptied it whenever
    closed files' readahead was reclaimed; a refill waiting for room then met an empty queue
    and its KeyError ended the mount (code review)."""
    source, ref = make_source()
    reader = make_reader(source)
    reader._writes._skipped[(ref, 0)] = 4
    reader._staged[(ref, 8)] = (b"x" * BLOCK, 0.0)
    reader._prefetch_budget.try_take(BLOCK)
    reader.closed(ref)
    assert reader._reclaim_closed()
    assert reader._writes._skipped == {(ref, 0): 4}


def test_runs_left_uncached_one_after_another_are_cached_together() -> None:
    """A sequential reader's runs are left one after another: refilled one GET each, 16 of
    them took seconds (one wait for room each); together, up to one GET's length."""
    source, ref = make_source()
    other = source.put(BUCKET, "other.bin", DATA)
    reader = make_reader(source, max_request_bytes=40 * BLOCK)
    for key, count in (((ref, 0), 16), ((other, 0), 8), ((ref, 16), 16), ((ref, 48), 8),
                       ((ref, 32), 16)):
        reader._writes._skipped[key] = count
    assert [reader._writes._next_skipped() for _ in range(4)] == [
        (ref, 0, 32),  # 16 + 16 blocks; the next 16 would pass 40
        (other, 0, 8),
        (ref, 48, 8),
        (ref, 32, 16),
    ]
    assert not reader._writes._skipped


@trio_test
async def test_runs_left_uncached_and_no_longer_in_memory_are_fetched_again_later(
    tmp_path,
) -> None:
    """A remount fetched from S3 what a busy disk had left uncached (0-2,432 blocks of 16,384
    with 8 readers at 0 ms): once the disk has room, such runs are cached, fetched again
    (pinned) where memory no longer holds them."""
    source, disk, reader = stuck_disk_reader(tmp_path)
    refs = objects_past_the_reserve(reader, source, left=1)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await read_each(reader, refs)
        assert reader.stats.cache_writes_skipped == 300
        reader._memory.clear()  # gone from memory meanwhile
        disk.unstuck.set()
    assert reader.stats.cache_refills == 300
    assert source.calls["get_range"] == len(refs) + 1  # the one left uncached, once more
    assert all(len(disk.read_run(object_digest(ref), ref.size, range(300))) == 300
               for ref in refs)


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "before-it-queues"])
@trio_test
async def test_a_reader_that_catches_up_with_readahead_queued_behind_the_writes_does_not_wait(
    tmp_path, queued: bool,
) -> None:
    """Also when the reader joins the readahead before it has queued for the disk."""
    source = FakeSource()
    source.create_bucket(BUCKET)
    disk = StuckDisk(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    reader = make_disk_reader(source, disk, disk_limiter=trio.CapacityLimiter(1))
    data = bytes(range(256)) * (LONG_RUN // 256)
    written, read_ahead = (source.put(BUCKET, f"{i}.bin", data) for i in range(2))
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        mount_tasks.start_soon(reader.warm, written)  # its write holds the disk: stuck
        assert await trio.to_thread.run_sync(disk.entered.wait, 5)
        assert reader.prefetch(read_ahead, 0, LONG_RUN) == LONG_RUN
        if queued:
            await trio.testing.wait_all_tasks_blocked()  # queued for the disk, behind the write
        with trio.fail_after(reader_module.JOINED_QUEUE_SECONDS + 1):  # then its GET's call
            assert await reader.read(read_ahead, 0, len(data)) == data
        assert reader._writes._waited_flights == 0
        disk.unstuck.set()
    assert reader.stats.cache_writes_skipped == 0  # it waited for room, as readahead does
    assert disk.blocks_written == 600
    assert source.calls["get_range"] == 2


class PaceClock:
    """The clock ``cache.pace`` times writes by, which only a ``SlowDisk`` write moves on."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


class SlowDisk(DiskCache):
    """A cache disk whose every write takes ``seconds`` of ``clock`` (the pace's), however long
    it takes in fact: a busy machine that stalls a write is not a slow disk to the test."""

    def __init__(self, *args, seconds: float, clock: PaceClock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds, self.clock = seconds, clock

    def write(self, *args, **kwargs) -> None:
        super().write(*args, **kwargs)
        self.clock.now += self.seconds


@pytest.mark.parametrize(("seconds", "budget_mib"), [(0.0, 64), (0.5, 8)])
@trio_test
async def test_what_may_wait_for_the_disk_follows_its_pace(
    tmp_path, monkeypatch, seconds, budget_mib
) -> None:
    # A wall clock made this fast disk (64 MiB/s is 18 ms for its 1.2 MB write) look slow
    # whenever the write's thread was stalled that long: 4 runs of 50 on two loaded cores.
    clock = PaceClock()
    monkeypatch.setattr(pace_module, "time", clock)
    source = FakeSource()
    source.create_bucket(BUCKET)
    # 0.5 s for 1.2 MB: 2.5 MB/s, less than one GET's run a second
    disk = SlowDisk(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30, seconds=seconds,
                    clock=clock)
    reader = make_disk_reader(source, disk, ByteBudget(64 << 20))
    # All of it, until the disk shows its pace.
    assert reader._writes._write_budget.capacity == 64 << 20
    ref = source.put(BUCKET, "a.bin", b"x" * LONG_RUN)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        await reader.warm(ref)
    assert reader._writes._write_budget.capacity == budget_mib << 20


@trio_test
async def test_the_prefetch_command_fills_the_cache_at_the_disks_pace(tmp_path) -> None:
    source, disk, reader = stuck_disk_reader(tmp_path)
    refs = [source.put(BUCKET, f"{i}.bin", b"x" * LONG_RUN) for i in range(2)]
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        for ref in refs:
            mount_tasks.start_soon(reader.warm, ref)
        await trio.sleep(0.2)
        disk.unstuck.set()
    assert reader.stats.cache_writes_skipped == 0
    assert disk.blocks_written == 600


@trio_test
async def test_only_a_readers_loads_make_cache_writes_wait(tmp_path) -> None:
    source = HeldSource()
    source.create_bucket(BUCKET)
    warmed, read = (source.put(BUCKET, name, b"x" * LONG_RUN) for name in ("warm.bin", "read.bin"))
    source.held.update({warmed.key, read.key})
    disk = DiskCache(tmp_path, block_size=PAGE_BLOCK, capacity=1 << 30)
    reader = make_disk_reader(source, disk)
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        mount_tasks.start_soon(reader.warm, warmed)  # the prefetch command: nobody waits
        assert await trio.to_thread.run_sync(source.holding.wait, 5)
        assert reader._writes._waited_flights == 0
        mount_tasks.start_soon(reader.read, read, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert reader._writes._waited_flights == 1
        source.release.set()
    assert reader._writes._waited_flights == 0


@trio_test
async def test_an_amount_larger_than_the_whole_budget_is_taken_when_nothing_is_held() -> None:
    """A run larger than the budget on its own (a budget shrunk to the disk's pace) goes alone
    when nothing else is held; otherwise its ``take`` would wait for room that never comes."""
    budget = ByteBudget(10)
    with trio.fail_after(5):
        await budget.take(25)
    assert budget.used == 25
    assert not budget.try_take(1)  # while it is held, nothing more
    budget.give(25)
    assert budget.try_take(25)


@trio_test
async def test_readahead_that_lands_while_a_read_waits_for_it_gives_its_budget_back() -> None:
    """A read that waited for readahead in flight takes its blocks as they land: their budget
    goes back, or readahead would run out of budget for good after a few such reads."""
    source, ref = make_source(DATA * 10)
    budget = ByteBudget(1 << 20)
    reader = make_streaming_reader(source, budget, memory=1 << 20)
    source.gate = threading.Event()  # the readahead's GETs wait
    async with trio.open_nursery() as mount_tasks:
        reader.attach(mount_tasks)
        assert reader.prefetch(ref, 0, 4 * BLOCK) == 4 * BLOCK
        assert budget.used == 4 * BLOCK

        async def land() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the read waits for the readahead
            source.gate.set()

        mount_tasks.start_soon(land)
        assert await reader.read(ref, 0, 4 * BLOCK) == (DATA * 10)[:4 * BLOCK]
        assert budget.used == 0
        mount_tasks.cancel_scope.cancel()
