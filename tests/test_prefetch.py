"""The readahead policy: grows on sequential reads, resets on seeks, stays bounded, asks once."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3datafs.prefetch import AHEAD_FACTOR, FilePrefetch, Readahead

MiB = 1024 * 1024
SIZE = 1024 * MiB


def sequential(readahead: Readahead, reads: int, size: int = 128 * 1024, start: int = 0) -> list:
    return [readahead.on_read(start + i * size, size, SIZE) for i in range(reads)]


def test_window_grows_with_what_the_streak_has_read_up_to_the_cap() -> None:
    readahead = Readahead(initial=MiB, maximum=8 * MiB)
    windows = []
    for i in range(8):
        readahead.on_read(i * MiB, MiB, SIZE)
        windows.append(readahead.window // MiB)
    assert windows == [1, 4, 6, 8, 8, 8, 8, 8]  # the start's, then twice what was read


@pytest.mark.parametrize("read_mib", [2, 5, 10, 30])
def test_a_reader_that_stops_had_at_most_about_as_much_again_fetched_ahead(read_mib: int) -> None:
    """A tensor or a few MiB of a large file: the window doubled at each read, and a review
    measured 5 MiB read fetch 20 MiB, 10 MiB fetch 55 MiB (8 MiB GETs, 64 MiB window)."""
    step, readahead = 8 * MiB, Readahead(initial=MiB, maximum=64 * MiB)
    asked = [readahead.on_read(i * MiB, MiB, SIZE, step) for i in range(read_mib)]
    fetched_until = max(stop for _, stop in filter(None, asked))
    assert fetched_until <= (1 + AHEAD_FACTOR) * read_mib * MiB


def test_page_faults_in_a_row_after_a_seek_pull_a_window_their_size() -> None:
    """A mapping read at random with MADV_RANDOM faults one 4 KiB page at a time, a few in a row
    per slice: each slice pulled 1 MiB ahead (a review: 83 MB fetched for 3.3 MB of slices)."""
    readahead = Readahead(initial=MiB, maximum=64 * MiB)
    page, fetched = 4096, 0
    for slice_start in (300 * MiB, 17 * MiB, 900 * MiB, 5 * MiB):  # 16 KiB slices
        for at in range(slice_start, slice_start + 4 * page, page):
            if (ahead := readahead.on_read(at, page, SIZE)) is not None:
                fetched += ahead[1] - ahead[0]
    assert fetched <= 4 * AHEAD_FACTOR * 4 * page


def test_requests_never_overlap_and_stay_ahead_of_the_reader() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    asked = [r for r in sequential(readahead, 400) if r is not None]
    for (_, previous_end), (start, _) in zip(asked, asked[1:], strict=False):
        assert start >= previous_end
    assert all(stop - start >= MiB // 2 for start, stop in asked[1:])  # no slivers
    assert asked[-1][1] > 400 * 128 * 1024  # ahead of the last read


def test_a_seek_resets_the_window_and_random_reads_fetch_nothing_ahead() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    sequential(readahead, 20, size=MiB)
    assert readahead.window == 16 * MiB
    assert readahead.on_read(500 * MiB, 4096, SIZE) is None
    assert readahead.window == 0  # nothing ahead until a streak has read something
    offsets = [700 * MiB, 3 * MiB, 900 * MiB, 100 * MiB, 901 * MiB, 50 * MiB]
    assert [readahead.on_read(o, 4096, SIZE) for o in offsets] == [None] * len(offsets)


def test_a_random_read_landing_near_the_last_one_does_not_start_readahead() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    readahead.on_read(300 * MiB, 4096, SIZE)
    assert readahead.on_read(300 * MiB + 200 * 1024, 4096, SIZE) is None  # near by chance
    assert readahead.on_read(300 * MiB + 204 * 1024 + 4096, 4096, SIZE) is not None  # a streak


def test_the_start_of_a_file_reads_ahead_at_once_and_clamps_to_the_size() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    assert readahead.on_read(0, 128 * 1024, SIZE) == (128 * 1024, 128 * 1024 + MiB)
    small = Readahead(initial=MiB, maximum=16 * MiB)
    assert small.on_read(0, 65536, 65536) is None  # a small file read whole: nothing ahead


def test_kernel_reordering_within_the_window_stays_sequential() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    sequential(readahead, 6, size=MiB)
    window = readahead.window
    readahead.on_read(7 * MiB, MiB, SIZE)  # 6 MiB arrives after 7 MiB
    readahead.on_read(6 * MiB, MiB, SIZE)
    assert readahead.window >= window


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        Readahead(initial=0, maximum=MiB)
    with pytest.raises(ValueError, match="initial"):
        Readahead(initial=2 * MiB, maximum=MiB)


def test_with_a_step_readahead_keeps_whole_aligned_gets_ahead_steadily() -> None:
    step = 8 * MiB
    readahead = Readahead(initial=MiB, maximum=64 * MiB)
    asked = [readahead.on_read(i * MiB, MiB, SIZE, step) for i in range(300)]
    ranges = [r for r in asked if r is not None]
    for start, stop in ranges[5:]:  # once the window is whole: aligned, whole GETs
        assert stop % step == 0
        assert stop - start >= step
    for i, r in enumerate(asked[40:], start=40):  # asked again as soon as one more GET fits
        ahead = max(stop for _, stop in (x for x in asked[: i + 1] if x)) - (i + 1) * MiB
        assert ahead > 64 * MiB - 2 * step, (i, r)


def test_what_the_reader_could_not_fetch_is_asked_again() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    sequential(readahead, 10, size=MiB)
    readahead.fell_short(11 * MiB)  # the budget had no room beyond 11 MiB
    start, _ = readahead.on_read(10 * MiB, MiB, SIZE)
    assert start == 11 * MiB


def test_a_read_counts_as_fetching_its_own_range() -> None:
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    assert readahead.on_read(0, 200 * 1024, 200 * 1024) is None  # the whole file in one read
    assert readahead.on_read(0, 4096, 200 * 1024) is None  # the kernel's retry asks nothing ahead


def test_a_share_of_the_budget_bounds_what_is_asked_in_whole_gets() -> None:
    step = 8 * MiB
    alone, shared = Readahead(initial=MiB, maximum=64 * MiB), Readahead(MiB, 64 * MiB)
    for i in range(40):
        alone.on_read(i * MiB, MiB, SIZE, step)
        ahead = shared.on_read(i * MiB, MiB, SIZE, step, limit=16 * MiB)
        if ahead is not None and i > 8:
            assert ahead[1] <= (i + 1) * MiB + 16 * MiB  # within its share of the read
            assert ahead[1] - ahead[0] >= step  # whole GETs ...
            assert ahead[1] % step == 0  # ... aligned
    assert alone.window == shared.window == 64 * MiB  # the window itself keeps growing


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("next"), st.integers(1, 40)),  # where the last read ended
        st.tuples(st.just("near"), st.integers(-16, 16), st.integers(1, 40)),  # reordered
        st.tuples(st.just("seek"), st.integers(0, 4000), st.integers(1, 40)),
        st.tuples(st.just("short"), st.floats(0, 1)),  # the budget fetched part of the last ask
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops, step=st.sampled_from([0, 8, 32]), limit=st.sampled_from([0, 24, 64]),
       size=st.integers(1, 4000))
def test_any_reads_get_bounded_requests_ahead_of_them_never_asked_twice(
    ops: list[tuple], step: int, limit: int, size: int
) -> None:
    """Whatever the reads (runs, the kernel's reordering within the start's window, seeks, a
    budget that fetched only part of an ask): each request starts at or after its read's end,
    ends within the file, the maximum and the budget's share, on a step boundary unless it holds
    none, overlaps nothing asked since the last seek (but what ``fell_short`` gave back), and
    reaches at most AHEAD_FACTOR times what the streak read (the start's window at a file's
    start) past its farthest read."""
    initial, maximum = 16, 128
    readahead = Readahead(initial=initial, maximum=maximum)
    expected = 0  # where the next sequential read goes
    asked: list[tuple[int, int]] = []  # since the last seek
    farthest = streak_bytes = 0
    from_start = True  # no seek yet: the start's window
    for op in ops:
        if op[0] == "short":
            if asked:
                start, stop = asked[-1]
                until = start + int(op[1] * (stop - start))
                readahead.fell_short(until)
                asked = [(a, min(b, until)) for a, b in asked if a < until]
            continue
        if op[0] == "seek":
            offset, length = op[1], op[2]
            if abs(offset - expected) <= maximum + initial:
                continue  # not surely a seek
        elif op[0] == "near":
            offset, length = max(0, expected + op[1]), op[2]
        else:
            offset, length = expected, op[1]
        end = min(offset + length, size)
        ahead = readahead.on_read(offset, length, size, step, limit)
        if op[0] == "seek":
            expected, asked, farthest, streak_bytes, from_start = end, [], end, 0, False
            assert ahead is None  # a seek fetches only what it reads
            continue
        expected, farthest = max(expected, end), max(farthest, end)
        streak_bytes += max(0, end - offset)
        if ahead is None:
            continue
        start, stop = ahead
        assert end <= start < stop <= size
        assert stop - end <= (limit or maximum)
        if step and stop % step and stop != size:
            assert stop - start < step  # unaligned only when it holds no step boundary
        assert all(stop <= a or b <= start for a, b in asked), (ahead, asked)
        window = max(initial if from_start else 0, AHEAD_FACTOR * streak_bytes)
        assert stop <= farthest + min(maximum, window)
        asked.append(ahead)


# -- across files: a directory read in order ---------------------------------------------------


def opens(policy: FilePrefetch, inodes: list[int], parent: int = 1) -> list[tuple[int, int]]:
    return [ahead for inode in inodes for ahead in policy.on_open(parent, inode)]


def fetched(asked: list[tuple[int, int]]) -> set[int]:
    return {inode for after, until in asked for inode in range(after + 1, until + 1)}


def test_files_opened_in_order_are_fetched_ahead_in_a_growing_window() -> None:
    policy = FilePrefetch(initial=4, maximum=32)
    asked = opens(policy, list(range(100, 300)))
    assert asked[0] == (102, 107)  # at the third open in order: 4 ahead of the next one
    spans = [until - after for after, until in asked]
    assert max(spans) <= 32
    assert spans[:4] == sorted(spans[:4])  # the window doubles
    for (_, previous_until), (after, _) in zip(asked, asked[1:], strict=False):
        assert after == previous_until  # nothing asked twice, no gaps
    assert fetched(asked) == set(range(103, asked[-1][1] + 1))
    assert 299 < asked[-1][1] <= 299 + 32  # ahead of the reader, by the window at most


def test_eight_threads_taking_files_from_one_queue_still_count_as_in_order() -> None:
    inodes = list(range(10, 410))
    rng = random.Random(7)
    jittered = []
    for start in range(0, len(inodes), 8):  # each batch of 8 opens in any order
        batch = inodes[start : start + 8]
        rng.shuffle(batch)
        jittered += batch
    asked = opens(FilePrefetch(), jittered)
    spans = [until - after for after, until in asked]
    assert sum(spans) == len(fetched(asked))  # nothing asked twice
    # A file is skipped only when a thread opened a later one first: it is being opened now.
    assert len(fetched(asked) & set(range(20, 410))) >= 0.9 * 390


def test_a_shuffled_reader_starts_almost_nothing() -> None:
    inodes = list(range(2, 20002))
    random.Random(3).shuffle(inodes)
    asked = fetched(opens(FilePrefetch(), inodes[:2000]))
    assert len(asked) <= 2000 * 0.02  # what a rare in-order triple starts: a window of 4


def loader_opens(
    order: list[int], workers: int, batch: int, seed: int = 1
) -> list[tuple[int, int]]:
    """(reader, inode) opens as PyTorch's ``DataLoader`` makes them: batches of ``batch``
    consecutive items of ``order`` dealt to ``workers`` in turn while at most two per worker
    are outstanding, results taken in order (a late batch holds the next ones back); each
    worker reads its batches' files one after the other, each taking a random time (one in
    ten four times as long: a miss)."""
    rng = random.Random(seed)
    batches = [order[start : start + batch] for start in range(0, len(order), batch)]
    queues: list[list[int]] = [[] for _ in range(workers)]
    busy = [False] * workers
    finishing: list[tuple[float, int, int]] = []
    opens: list[tuple[float, int, int]] = []
    done: set[int] = set()
    dealt = taken = 0

    def deal_and_start(now: float) -> None:
        nonlocal dealt
        while dealt < len(batches) and dealt - taken < 2 * workers:
            queues[dealt % workers].append(dealt)
            dealt += 1
        for worker in range(workers):
            if not busy[worker] and queues[worker]:
                busy[worker], number, at = True, queues[worker].pop(0), now
                for inode in batches[number]:
                    opens.append((at, 1000 + worker, inode))
                    at += rng.expovariate(1.0) * (4 if rng.random() < 0.1 else 1)
                heapq.heappush(finishing, (at, worker, number))

    deal_and_start(0.0)
    while finishing:
        now, worker, number = heapq.heappop(finishing)
        busy[worker] = False
        done.add(number)
        while taken in done:
            taken += 1
        deal_and_start(now)
    return [(reader, inode) for _, reader, inode in sorted(opens)]


def fetched_first(policy: FilePrefetch, opened: list[tuple[int, int]]) -> int:
    """How many of the ``opened`` files were asked for before their open."""
    asked: set[int] = set()
    hits = 0
    for reader, inode in opened:
        hits += inode in asked
        asked |= fetched(policy.on_open(1, inode, reader))
    return hits


def test_workers_each_reading_their_own_slices_in_order_are_fetched_ahead() -> None:
    """A data loader's workers with a sequential sampler and batches of 32: together they jump
    between slices (no order in the directory's stream), each alone reads in order (its own
    stream). The directory's stream alone: 646 of 2,000 with 4 workers, 260 with 8."""
    inodes = list(range(10, 2010))
    for workers in (4, 8):
        opened = loader_opens(inodes, workers, batch=32)
        assert fetched_first(FilePrefetch(), opened) >= 0.85 * len(inodes)


def test_workers_taking_one_file_each_in_turn_are_fetched_ahead() -> None:
    """A data loader's default batch of one: its workers open the directory's files in order
    together, a late worker's file behind the others' (that reset the directory's stream:
    482 of 2,000 with 8 workers)."""
    inodes = list(range(10, 2010))
    for workers in (4, 8):
        opened = [(0, inode) for _, inode in loader_opens(inodes, workers, batch=1)]
        assert fetched_first(FilePrefetch(), opened) >= 0.95 * len(inodes)


def test_one_reader_asks_once_though_two_streams_follow_it() -> None:
    """A lone reader in order is followed by its directory's stream and its own: the same
    ranges as one stream, nothing asked twice."""
    inodes = list(range(100, 300))
    alone = opens(FilePrefetch(), inodes)
    policy = FilePrefetch()
    assert [ahead for inode in inodes for ahead in policy.on_open(1, inode, 77)] == alone


def test_shuffled_workers_start_almost_nothing() -> None:
    inodes = list(range(2, 20002))
    random.Random(3).shuffle(inodes)
    policy = FilePrefetch()
    asked = [ahead for reader, inode in loader_opens(inodes[:2000], workers=8, batch=32)
             for ahead in policy.on_open(1, inode, reader)]
    assert len(fetched(asked)) <= 2000 * 0.02  # as for one shuffled reader


def test_readers_are_bounded_in_number() -> None:
    policy = FilePrefetch(readers=2)
    for reader in (1, 2, 3):  # each opens two files of its own slice in turn
        for inode in (100 * reader, 100 * reader + 1):
            policy.on_open(1, inode, reader)
    assert policy.on_open(1, 102, 1) == []  # reader 1 was forgotten: its stream starts over
    assert policy.on_open(1, 302, 3) == [(302, 307)]  # reader 3's goes on


def test_directories_are_followed_apart_and_bounded_in_number() -> None:
    policy = FilePrefetch(directories=4)
    interleaved = [(parent, 100 * parent + i) for i in range(6) for parent in range(1, 9)]
    asked = [policy.on_open(parent, inode) for parent, inode in interleaved]
    assert not any(asked)  # 8 directories, room for 4: each forgotten
    policy = FilePrefetch(directories=4)
    asked = [policy.on_open(parent, inode) for parent, inode in interleaved if parent <= 4]
    assert sum(bool(ahead) for ahead in asked) >= 4  # each of the four in order


def test_files_the_budget_had_no_room_for_are_asked_for_again() -> None:
    policy = FilePrefetch(initial=4, maximum=4)
    assert opens(policy, [1, 2, 3]) == [(3, 8)]
    policy.fell_short(1, 5)  # files 6-8 were skipped
    assert opens(policy, [4, 5]) == [(5, 9)]  # at the next open


def test_prefetch_across_files_can_be_turned_off() -> None:
    assert opens(FilePrefetch(maximum=0), list(range(100))) == []



def test_a_seek_ends_the_streak_so_a_read_near_it_by_chance_fetches_nothing() -> None:
    """After a seek a random reader is one again: a read landing near the seek's by chance must
    not pull a window, as at the start of a stream (the streak counts from the seek)."""
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    sequential(readahead, 5, size=MiB)  # a streak
    assert readahead.on_read(500 * MiB, 4096, SIZE) is None  # a seek
    assert readahead.on_read(500 * MiB + 200 * 1024, 4096, SIZE) is None  # near by chance


def test_a_read_one_whole_window_off_is_still_sequential() -> None:
    """"Near" is within one window of where the reader was expected, the bound included (the
    kernel's reordering may put a read that far)."""
    readahead = Readahead(initial=MiB, maximum=16 * MiB)
    readahead.on_read(0, MiB, SIZE)
    assert readahead.on_read(2 * MiB, 4096, SIZE) is not None  # expected at 1 MiB, window 1 MiB
    assert readahead.window >= 2 * MiB  # grown, not reset


def test_opens_spread_out_within_the_tolerance_start_nothing() -> None:
    """Opens each within ``tolerance`` of the last but spread out (random opens near each
    other) are not dense: only files read in order, covering every inode, start a prefetch."""
    policy = FilePrefetch(initial=4, maximum=32, tolerance=8)
    assert opens(policy, list(range(100, 400, 7))) == []


def test_a_second_pass_over_a_directory_is_in_order_again() -> None:
    """An open far *before* the walk (a reader starting the directory over: the next epoch)
    starts a new walk, which prefetches again once it is in order."""
    policy = FilePrefetch(initial=4, maximum=32)
    assert opens(policy, list(range(100, 200)))
    again = opens(policy, list(range(100, 110)))
    assert again[:1] == [(102, 107)]


def test_a_second_pass_over_a_small_directory_is_a_new_pass_not_a_late_worker() -> None:
    """In a directory of 20 files every file is within a late worker's reach of the end: the
    start opened again is the next pass (its files were opened), and it prefetches again."""
    policy = FilePrefetch(initial=4, maximum=32)
    assert opens(policy, list(range(100, 120)))
    assert opens(policy, list(range(100, 105)))[:1] == [(102, 107)]


def test_the_directory_opened_last_is_the_last_forgotten() -> None:
    """Directories are forgotten least recently *opened* first: one being read in order keeps
    its walk while directories opened once come and go."""
    policy = FilePrefetch(initial=4, maximum=32, directories=2)
    assert opens(policy, [100, 101], parent=1) == []
    policy.on_open(2, 200)
    assert policy.on_open(1, 102) == [(102, 107)]  # directory 1 again: the most recent
    policy.on_open(3, 300)  # one too many: directory 2 goes
    # Directory 1's walk goes on: topped up past what it asked for, with a doubled window
    # (forgotten, it would start over and ask for 106 and 107 again).
    assert opens(policy, [103, 104, 105], parent=1) == [(107, 114)]


def test_no_more_directories_than_the_bound_are_followed() -> None:
    policy = FilePrefetch(initial=4, maximum=32, directories=4)
    assert opens(policy, [100, 101], parent=1) == []
    for parent in range(2, 6):  # four more directories: the first is forgotten
        policy.on_open(parent, 100 * parent)
    assert policy.on_open(1, 102) == []  # its walk starts over
