"""Very large objects through real mounts: sizes around 2**32, S3's largest (5 TiB), and a ZIP64
archive of 4.6 GiB with 70,003 members, served by the synthetic endpoint ``synths3``.

Every byte read is compared with ``synthdata``, whose bytes name their own offsets, at the places
where offset arithmetic goes wrong: 2**31 and 2**32, block and disk-cache region boundaries (for
several ``--block-size``s), an object's last bytes and past its end, zip members beyond a 4 GiB
archive offset and beyond member number 65,535. Every mount then comes back warm: the same
reads, the same bytes, and no GET at all by the server's own count.

Determinism: nothing may be fetched but what the reads touch, or a GET count would depend on
timing (a readahead still in flight at unmount is cancelled, uncached, and fetched again by the
warm mount). So each read is one ``pread`` on a handle of its own, opened with ``O_DIRECT``: the
daemon sees the read's exact offset and length (no kernel readahead, no page rounding), and its
per-handle readahead, which starts at a file's first byte or on a second sequential read, never
starts (no read is at offset 0). Mounts use ``--prefetch-files 0``: files opened in listing order
would get their next siblings fetched ahead. And a zip member of several MiB read through makes
the archive read ahead in spans (``archive.spans``), as far as the prefetch budget allows at the
time: such reads are in the archive's cold pass only, which waits for the server to go quiet
before it unmounts.

Layers: the reference data itself (no mount), then plain objects, then the archive.
"""

from __future__ import annotations

import errno
import io
import os
import random
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import synthdata
from conftest import Cli, errno_of, isolated_cli, mount_stats
from synthdata import CHUNK, GiB, KiB, MiB, TiB, pattern, pattern_crc32
from synths3 import ARCHIVE_KEY, BUCKET, OBJECTS, SynthS3

from s3datafs.cache.disk import REGION_BYTES

pytestmark = pytest.mark.fuse

KEEP_TIMING_OUT = ("--prefetch-files", "0")  # see the module docstring
Expected = Callable[[int, int], bytes]  # the right bytes [start, end) of a file, clipped to it


@pytest.fixture(scope="module")
def synth() -> Iterator[SynthS3]:
    with SynthS3() as server:
        yield server


@pytest.fixture
def synth_cli(synth: SynthS3, tmp_path: Path) -> Iterator[Cli]:
    with isolated_cli(tmp_path, synth.endpoint) as runner:
        yield runner


def read_alone(path: Path, offset: int, length: int) -> bytes:
    """One ``pread`` on a handle of its own, through ``O_DIRECT`` (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def wrong_reads(
    path: Path, reads: list[tuple[int, int]], expected: Expected
) -> list[tuple[int, int, int]]:
    """The ``(offset, length, bytes got)`` of every read whose bytes are not ``expected``'s."""
    wrong = []
    for offset, length in reads:
        data = read_alone(path, offset, length)
        if data != expected(offset, offset + length):
            wrong.append((offset, length, len(data)))
    return wrong


def reads_around(edges: set[int], size: int) -> list[tuple[int, int]]:
    """Reads straddling, ending at and starting at each edge, the object's last bytes and past
    its end; in offset order, so a block once fetched is not needed again after eviction."""
    reads = {(size - 1, 1), (size - 70_000, 70_000), (size - 5, 100), (size, 10), (size + MiB, 10)}
    for edge in edges:
        reads |= {(edge - 1, 2), (edge - 100_003, 200_011), (edge - 7, 7), (edge, 1)}
    return sorted((offset, length) for offset, length in reads if offset > 0)


def edges_near(anchors: list[int], unit: int) -> set[int]:
    """The multiples of ``unit`` either side of each anchor."""
    return {(anchor // unit + step) * unit for anchor in anchors for step in (0, 1)}


def wait_until_no_get_for(synth: SynthS3, quiet: float = 0.5, deadline: float = 20.0) -> None:
    """Return once the server has seen no new GET for ``quiet`` seconds: readahead is over."""
    count, since, give_up = -1, time.monotonic(), time.monotonic() + deadline
    while time.monotonic() - since < quiet:
        assert time.monotonic() < give_up, "GETs never stopped"
        now = len(synth.stats()["gets"])
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.05)


def region_span(block: int) -> int:
    """Bytes of an object in one disk-cache region file (``cache.disk``: whole blocks)."""
    return block * max(1, REGION_BYTES // block)


# ---------------------------------------------------------------- the reference itself


def offset_words(seed: int, start: int, end: int) -> bytes:
    """The words ``offset ^ seed`` of offsets ``start`` (a multiple of 8) to ``end``, one by one."""
    words = (((offset ^ seed) % 2**64).to_bytes(8, "little") for offset in range(start, end, 8))
    return b"".join(words)


def naive_pattern(seed: int, start: int, end: int) -> bytes:
    """``synthdata.pattern`` as its docstring defines it, the slow way, from offset 0."""
    chunks_end = -(-end // CHUNK) * CHUNK
    data = bytearray(offset_words(seed, 0, chunks_end))
    for chunk_end in range(CHUNK, chunks_end + 1, CHUNK):
        data[chunk_end - 4 : chunk_end] = zlib.crc32(data[: chunk_end - 4]).to_bytes(4, "little")
    return bytes(data[start:end])


def test_pattern_is_each_offset_xor_seed_with_a_crc_tail_per_chunk() -> None:
    seed = 0xA5A5_5A5A_0000_FFFF
    size = 3 * CHUNK + 100
    assert pattern(seed, 0, size) == naive_pattern(seed, 0, size)
    assert pattern(seed, CHUNK - 3, 2 * CHUNK + 5) == naive_pattern(seed, CHUNK - 3, 2 * CHUNK + 5)
    # Far out, the words still name their offsets, and each chunk's tail is its own CRC from the
    # residue (the naive prefix CRC is out of reach there; the residue is checked next).
    for at in (2**32, 5 * TiB - CHUNK):
        data = pattern(seed, at, at + CHUNK)
        assert data[:-4] == offset_words(seed, at, at + CHUNK)[:-4]
        assert data[-4:] == zlib.crc32(data[:-4], synthdata.CRC_RESIDUE).to_bytes(4, "little")


def test_the_crc_residue_and_pattern_crc32() -> None:
    message = b"any bytes at all"
    tail = zlib.crc32(message).to_bytes(4, "little")
    assert zlib.crc32(message + tail) == synthdata.CRC_RESIDUE
    for size in (0, 1, CHUNK - 5, CHUNK - 4, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 100):
        assert pattern_crc32(7, size) == zlib.crc32(pattern(7, 0, size)), size


class SegmentsFile(io.RawIOBase):
    """The synthetic archive as a read-only file, for ``zipfile``."""

    def __init__(self, segments: synthdata.Segments) -> None:
        self._segments, self._at = segments, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self._segments.size}[whence]
        self._at = base + offset
        return self._at

    def tell(self) -> int:
        return self._at

    def readinto(self, buffer) -> int:  # a writable buffer; typeshed names no public type
        data = self._segments.read(self._at, self._at + len(buffer))
        buffer[: len(data)] = data
        self._at += len(data)
        return len(data)


def test_the_synthetic_archive_is_a_zip64_that_zipfile_reads() -> None:
    """zipfile, not s3datafs, vouches for the archive: counts, ZIP64 offsets, CRCs."""
    archive = synthdata.synthetic_zip()
    with zipfile.ZipFile(SegmentsFile(archive.archive)) as opened:
        infos = opened.infolist()
        assert len(infos) == synthdata.MEMBER_COUNT + 3 > 65_535
        huge = opened.getinfo(synthdata.HUGE)
        assert huge.file_size == synthdata.HUGE_SIZE > 4 * GiB
        first_beyond = opened.getinfo(synthdata.small_member_name(synthdata.SMALL_BEFORE_HUGE))
        assert first_beyond.header_offset > 4 * GiB
        for info in infos:
            assert info.header_offset == archive.members[info.filename].header_offset
        for name in (synthdata.small_member_name(0), synthdata.small_member_name(65_535),
                     synthdata.small_member_name(synthdata.MEMBER_COUNT - 1),
                     synthdata.DEFLATED, synthdata.AFTER):
            member = archive.members[name]
            assert opened.read(name) == member.expected(0, member.size), name  # CRC checked too
        with opened.open(synthdata.HUGE) as huge_member:
            assert huge_member.read(100_000) == pattern(synthdata.HUGE_SEED, 0, 100_000)


# ---------------------------------------------------------------- plain objects


def plain_object_reads(size: int, block: int) -> list[tuple[int, int]]:
    anchors = [2**31, 2**32, size]  # an object's start is read by every other e2e test
    edges = {2**31, 2**32} | edges_near(anchors, block) | edges_near(anchors, region_span(block))
    return reads_around({edge for edge in edges if edge <= size}, size)


def object_bytes(key: str) -> Expected:
    size, seed = OBJECTS[key]
    return lambda start, end: pattern(seed, start, min(end, size))


def assert_gets_are_whole_blocks_each_fetched_once(
    gets: list[list], block: int, refetched_blocks: int = 0
) -> None:
    """A GET covers a run of whole blocks (the last may be short), and no byte twice, but for
    up to ``refetched_blocks`` blocks that the refill fetched again."""
    fetched_until: dict[str, int] = {}
    twice = 0
    for key, start, end in sorted(gets):
        size = OBJECTS[key][0]
        assert start % block == 0, (key, start, end)
        assert end % block == 0 or end == size, (key, start, end)
        twice += max(0, min(end, fetched_until.get(key, 0)) - start)
        fetched_until[key] = max(end, fetched_until.get(key, 0))
    assert twice <= refetched_blocks * block, f"{twice} bytes fetched twice"


def assert_size_everywhere(path: Path, size: int) -> None:
    """stat, SEEK_END, SEEK_DATA and SEEK_HOLE agree on a size beyond 32 bits."""
    assert path.stat().st_size == size
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == size
        assert os.lseek(fd, size - 1, os.SEEK_DATA) == size - 1
        assert os.lseek(fd, 0, os.SEEK_HOLE) == size
        assert errno_of(lambda: os.lseek(fd, size, os.SEEK_DATA)) == errno.ENXIO
    finally:
        os.close(fd)


def read_objects_cold(
    cli: Cli, mountpoint: Path, synth: SynthS3, block: int, keys: list[str]
) -> None:
    """Every boundary read of ``keys`` right, sizes right, and each block fetched once.

    On a loaded machine the disk may fall behind the synthetic store, which answers at memory
    speed: blocks a read waited for are then left uncached, with a warning, and the refill
    fetches them again later (``writebehind``). Then this waits for the refill, so that the
    warm mount still needs no GET, and those blocks may have been fetched twice."""
    synth.reset_stats()
    for key in keys:
        size = OBJECTS[key][0]
        path = mountpoint / Path(key).name
        assert wrong_reads(path, plain_object_reads(size, block), object_bytes(key)) == [], key
        assert_size_everywhere(path, size)
    skipped = refilled(mountpoint)
    if skipped:
        cli.expect_log("the block cache's disk falls behind S3")
    assert_gets_are_whole_blocks_each_fetched_once(synth.stats()["gets"], block, skipped)


def refilled(mountpoint: Path, timeout: float = 60.0) -> int:
    """Wait until the refill has cached every block left uncached; how many there were."""
    deadline = time.monotonic() + timeout
    while True:
        stats = mount_stats(mountpoint)
        if stats["cache_refills"] >= stats["cache_writes_skipped"]:
            return stats["cache_writes_skipped"]
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("block", "options"),
    [
        pytest.param(64 * KiB, (), id="64K-default"),
        pytest.param(4 * KiB, ("--block-size", "4K"), id="4K"),
        # Not a power of two: 2**31, 2**32 and the regions (699 blocks) fall inside blocks.
        pytest.param(12 * KiB, ("--block-size", "12K"), id="12K"),
        # More than a region and than a readahead GET (8 MiB): one block per region file.
        pytest.param(8196 * KiB, ("--block-size", "8196K"), id="8196K"),
    ],
)
def test_big_objects_read_right_at_every_boundary_cold_then_warm(
    synth_cli: Cli, synth: SynthS3, block: int, options: tuple[str, ...]
) -> None:
    uri, keys = f"s3://{BUCKET}/o/", list(OBJECTS)
    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT, *options)
    read_objects_cold(synth_cli, mountpoint, synth, block, keys)
    assert synth_cli.unmount(mountpoint).returncode == 0  # write-behind drained

    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT, *options)
    synth.reset_stats()
    for key in keys:
        reads = plain_object_reads(OBJECTS[key][0], block)
        assert wrong_reads(mountpoint / Path(key).name, reads, object_bytes(key)) == [], key
    assert synth.stats()["gets"] == []


def test_64m_blocks_read_right_and_a_block_read_in_pieces_is_fetched_once_then_warm(
    synth_cli: Cli, synth: SynthS3
) -> None:
    """The largest --block-size, with the memory cache of two blocks it needs (the default 32M
    is refused: test_bad_input). Each block is fetched once however many reads touch it, and
    cached: the write-behind has room for two such blocks (with room for one, a block fetched
    while the one before was being written was left uncached, and fetched again after a
    remount). One object: every block touched is 64 MiB to make and move.
    """
    uri, key, options = f"s3://{BUCKET}/o/", "o/4g-plus1.bin", ("--block-size", "64M",
                                                                 "--memory-cache-size", "128M")
    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT, *options)
    read_objects_cold(synth_cli, mountpoint, synth, 64 * MiB, [key])
    assert synth_cli.unmount(mountpoint).returncode == 0  # write-behind drained

    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT, *options)
    synth.reset_stats()
    reads = plain_object_reads(OBJECTS[key][0], 64 * MiB)
    assert wrong_reads(mountpoint / Path(key).name, reads, object_bytes(key)) == []
    assert synth.stats()["gets"] == []


# ---------------------------------------------------------------- the ZIP64 archive

# Small members by number: the last below 4 GiB and the first beyond, the central directory's
# entries 65,534 to 65,537 (the huge member is entry 35,000), the last, and a fixed sample.
SAMPLED_MEMBERS = sorted(
    {0, synthdata.SMALL_BEFORE_HUGE - 1, synthdata.SMALL_BEFORE_HUGE, *range(65_533, 65_537),
     synthdata.MEMBER_COUNT - 1}
    | set(random.Random(5).sample(range(synthdata.MEMBER_COUNT), 100))
)


def huge_member_reads() -> list[tuple[int, int]]:
    """Reads at the member's own 2**31, 2**32 and end, and at its archive's 2**32 and blocks."""
    member = synthdata.synthetic_zip().members[synthdata.HUGE]
    archive_edges = edges_near([2**31, 2**32], 64 * KiB) | edges_near([2**32], REGION_BYTES)
    edges = {2**31, 2**32} | {edge - member.data_offset for edge in archive_edges}
    return reads_around(edges, member.size)


TAIL_MEMBERS = (synthdata.DEFLATED, synthdata.AFTER)  # at the very end of 4.6 GiB


def wrong_whole_tail_members(mountpoint: Path) -> list[str]:
    """Read the tail members through (the daemon checks their CRC-32); the wrong ones."""
    members = synthdata.synthetic_zip().members
    return [
        name for name in TAIL_MEMBERS
        if (mountpoint / name).read_bytes() != members[name].expected(0, members[name].size)
    ]


def wrong_archive_reads(mountpoint: Path) -> list[str]:
    """Boundary reads of the huge member, sampled small members read whole, pieces of the tail
    members (each piece alone: nothing to read ahead); what came back wrong."""
    members = synthdata.synthetic_zip().members
    huge = members[synthdata.HUGE]
    wrong_in_huge = wrong_reads(mountpoint / synthdata.HUGE, huge_member_reads(), huge.expected)
    wrong = [f"{synthdata.HUGE} {read}" for read in wrong_in_huge]
    for number in SAMPLED_MEMBERS:
        name = synthdata.small_member_name(number)
        if (mountpoint / name).read_bytes() != synthdata.small_member_bytes(number):
            wrong.append(name)
    for name in TAIL_MEMBERS:
        member = members[name]
        pieces = [(5, 10), (MiB - 3, 70_000), (member.size - 4100, 8192)]
        wrong_pieces = wrong_reads(mountpoint / name, pieces, member.expected)
        wrong += [f"{name} {read}" for read in wrong_pieces]
    return wrong


def test_a_zip64_archive_beyond_4_gib_and_65535_members_reads_right_cold_then_warm(
    synth_cli: Cli, synth: SynthS3
) -> None:
    uri = f"s3://{BUCKET}/{ARCHIVE_KEY}"
    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT)
    names = sorted(os.listdir(mountpoint / "many"))
    assert names == [f"f{number:05d}.txt" for number in range(synthdata.MEMBER_COUNT)]
    assert (mountpoint / synthdata.HUGE).stat().st_size == synthdata.HUGE_SIZE
    assert wrong_whole_tail_members(mountpoint) == []
    assert wrong_archive_reads(mountpoint) == []
    wait_until_no_get_for(synth)  # spans read ahead: landed and cached, not cancelled

    assert synth_cli.unmount(mountpoint).returncode == 0
    synth.reset_stats()
    mountpoint = synth_cli.mount(uri, *KEEP_TIMING_OUT)
    assert len(os.listdir(mountpoint / "many")) == synthdata.MEMBER_COUNT
    assert wrong_archive_reads(mountpoint) == []
    assert synth.stats()["gets"] == []  # the index and every byte from the disk cache
