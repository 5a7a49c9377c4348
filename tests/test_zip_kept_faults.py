"""Members kept decompressed in the disk cache (``archive.decompressed``), attacked.

What every test here checks: a read of a member gives its exact bytes or an error, never other
bytes, and no reader waits forever. The attacks:

- a process killed (SIGKILL, in a forked child) at every step of a decompression into the cache,
  one run per step, the decompression fed a byte damaged between the cache and the
  decompressor (so the torn copy on disk holds a wrong byte only the CRC can tell) or good ones:
  the next mount reads the exact bytes, from the disk only when the marker was written whole;
- damage on disk after the marker: bytes flipped, files truncated, deleted or swapped with
  another member's or another region's, a marker naming another member's verified copy;
- the same member fields in another version of the archive: its copy is not this one's;
- readers joining a decompression at known places (behind its output, ahead of it, at the end)
  as it fails: S3, a corrupt stream, data that ends early, its CRC, a zip bomb, the unmount;
- two processes decompressing one member at once; ``cache clear`` under a decompression and
  its readers; another mount's scans evicting a copy as it is read; a reader given up on
  (--read-timeout) as it waits;
- --cache-min-free leaving less room than the member;
- all of these at once, between random reads of two members by two mounts, in a model
  (hypothesis: ``KeptMembersModel``).

Against FakeSource and real ``DiskCache`` directories in ``tmp_path``, with the small regions of
``test_zip_decompressed`` (1 MiB), so a member of 3 MiB spans four region files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import multiprocessing
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from unittest import mock

import pytest
import trio
from fakes import FakeSource, trio_test
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from test_zip_decompressed import (  # noqa: F401 - small_regions: an autouse fixture
    BLOCK,
    big_member,
    cache,
    content,
    random_ranges,
    settled,
    small_regions,
    zip_bytes,
    zipped,
)
from test_zip_members import BUCKET, KIB, MIB, Archive, archive, read_at_once
from zipcraft import make_zip, sample_bytes

from s3datafs import reader as reader_module
from s3datafs.archive import decompressed as decompressed_module
from s3datafs.archive import members as members_module
from s3datafs.archive.decompressed import KeptMembers
from s3datafs.archive.members import MemberSource
from s3datafs.cache import blockfile
from s3datafs.cache import disk as disk_module
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache
from s3datafs.errors import ArchiveError, TransientS3Error
from s3datafs.model import MemberRef, UnzippedRef
from s3datafs.reader import BlockReader

DEFLATED = zipfile.ZIP_DEFLATED


# -- a byte damaged before the decompressor ----------------------------------------------------


def damage_on_its_way(archived: Archive, ref: MemberRef) -> tuple[int, int]:
    """A deflated member's compressed byte to flip on its way to the decompressor (offset in
    its data), chosen in a stored block of its random half, so the stream still inflates to its
    full size with one output byte wrong: only the CRC, at its end, can tell. (Offset in the
    compressed data, offset of the wrong output byte.)"""
    start = data_offset(archived, ref)
    compressed = archived.source.get_range(archived.ref, start, start + ref.compressed_size)
    at = ref.compressed_size * 6 // 10
    damaged = bytearray(compressed)
    damaged[at] ^= 0x55
    out = zlib.decompressobj(-15).decompress(bytes(damaged))
    expected = zlib.decompressobj(-15).decompress(compressed)
    wrong = [i for i, (a, b) in enumerate(zip(out, expected, strict=True)) if a != b]
    assert len(out) == ref.size
    assert len(wrong) == 1, "the flip must change one output byte"
    return at, wrong[0]


def flipping_data(source: MemberSource, at: int) -> None:
    """``source`` fed its members' compressed byte ``at`` flipped, after the archive's blocks
    (which stay right on disk): bytes damaged between the cache and the decompressor."""
    data = source._data

    def flipped(ref: MemberRef, start: int, end: int) -> bytes:
        got = data(ref, start, end)
        if start <= at < end:
            damaged = bytearray(got)
            damaged[at - start] ^= 0x55
            return bytes(damaged)
        return got

    source._data = flipped


# -- a process killed at every step -------------------------------------------------------------


def events_of_a_decompression(
    archived: Archive, ref: MemberRef, directory: Path, kill_at: int | None,
    damaged_at: int | None, told: Connection,
) -> None:
    """In a forked child: a read that has ``ref`` decompressed into the cache in ``directory``
    (its compressed byte ``damaged_at`` flipped on its way to the decompressor), each step of
    the decompression's writes and checks told to ``told``; killed (SIGKILL) at ``kill_at``."""
    disk = cache(directory)
    source = MemberSource(archived.source, disk=disk)
    if damaged_at is not None:
        flipping_data(source, damaged_at)
    archive_digest = object_digest(archived.ref)
    marker_digest = object_digest(UnzippedRef.of(ref))
    steps, last = 0, ""

    def step(name: str) -> None:
        nonlocal steps, last
        if name == last:  # a region file's first write, again in a new fan directory
            return
        last = name
        told.send(name)  # synchronous: it is in the pipe before the kill
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1

    def what(digest: str, region: int) -> str:
        return f"marker region {region}" if digest == marker_digest else f"copy region {region}"

    write_region, entries, finish = disk._write_region, blockfile.entries, source._finish

    def stepped_write_region(path, digest, identity, region, first, parts):
        if digest == archive_digest:  # the archive's own blocks, written behind: not a step
            return write_region(path, digest, identity, region, first, parts)
        step(f"{what(digest, region)}: nothing written yet")
        written = write_region(path, digest, identity, region, first, parts)
        step(f"{what(digest, region)}: written whole")
        return written

    def stepped_entries(digest, first, payloads):
        if digest != archive_digest:
            step(f"{what(digest, first // disk.layout.blocks)}: payload written, entries not")
        return entries(digest, first, payloads)

    def stepped_finish(*args):
        step("output whole, CRC not checked yet")
        finish(*args)
        step("CRC checked")

    disk._write_region = stepped_write_region
    blockfile.entries = stepped_entries
    source._finish = stepped_finish
    far = 2 * MIB
    source.get_range(ref, far, far + BLOCK)
    settled(source)
    told.send(None)  # not killed: the decompression ended


def decompress_in_a_child(
    archived: Archive, ref: MemberRef, directory: Path, kill_at: int | None,
    damaged_at: int | None,
) -> list[str]:
    """``events_of_a_decompression`` in a forked child; the steps it went through."""
    context = multiprocessing.get_context("fork")
    listening, told = context.Pipe(duplex=False)
    child = context.Process(target=events_of_a_decompression,
                            args=(archived, ref, directory, kill_at, damaged_at, told))
    child.start()
    told.close()  # the child's end: the parent's copy would keep the pipe open after a kill
    steps: list[str] = []
    try:
        while True:
            assert listening.poll(30), f"the child went quiet after {steps}"
            name = listening.recv()
            if name is None:
                break
            steps.append(name)
            if len(steps) - 1 == kill_at:
                break
        child.join(timeout=30)
        assert child.exitcode == (0 if kill_at is None else -signal.SIGKILL), child.exitcode
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    return steps


def copies_holding(directory: Path, ref: MemberRef, at: int) -> list[bytes]:
    """The byte at ``at`` in every decompression of ``ref`` found on disk (marked or not): the
    block holding it read through the cache's checks, from each copy's region files."""
    disk = cache(directory)
    others = {object_digest(UnzippedRef.of(ref))}
    found = []
    for path in directory.rglob("*.r*"):
        digest = path.name.partition(".")[0]
        if digest in others:
            continue
        others.add(digest)
        index = at // BLOCK
        blocks = disk.read_run(digest, ref.size, range(index, index + 1), ends=False)
        if index in blocks:
            found.append(bytes(blocks[index][at % BLOCK: at % BLOCK + 1]))
    return found


@pytest.mark.parametrize("damaged", [True, False], ids=["damaged-on-its-way", "good"])
def test_a_process_killed_at_any_step_of_a_decompression_leaves_nothing_served_unverified(
    tmp_path: Path, damaged: bool
) -> None:
    """SIGKILL at each step of a decompression into the cache, in turn (before a region's
    header, between a region's payload and its table entries, after it, before and after the
    CRC check, the same for the marker): the next mount reads the member's exact bytes, from the
    disk (no decompression) only if the whole marker was written. Fed a byte damaged on its way,
    the copy killed after that byte's region holds it, checked: only the CRC could have told,
    and a mount that trusted an unmarked copy would serve it."""
    expected, archived, ref = big_member(DEFLATED)
    flip, wrong_at = damage_on_its_way(archived, ref)
    damaged_at = flip if damaged else None
    steps = decompress_in_a_child(archived, ref, tmp_path / "dry", None, damaged_at)
    assert len(steps) >= 10, steps
    assert damaged or steps[-1] == "marker region 0: written whole", steps
    wrong_on_disk = 0
    decompressed: dict[str, int] = {}  # by the step killed at: the next mount's decompressions
    for kill_at, name in enumerate(steps):
        directory = tmp_path / f"killed-{kill_at}"
        assert decompress_in_a_child(archived, ref, directory, kill_at, damaged_at)[-1] == name
        held = copies_holding(directory, ref, wrong_at)
        wrong_on_disk += any(byte != expected[wrong_at: wrong_at + 1] for byte in held)
        archived.reset()
        remounted = MemberSource(archived.source, disk=cache(directory))
        far = 2 * MIB + 12345
        reads = [(far, far + BLOCK), (wrong_at - 7, wrong_at + 9), (ref.size - BLOCK, ref.size),
                 (0, BLOCK), *random_ranges(ref.size, seed=kill_at, count=6), (0, ref.size)]
        for start, end in reads:
            assert remounted.get_range(ref, start, end) == expected[start:end], (name, start)
        settled(remounted)
        decompressed[name] = remounted.stats.decompressions
    # From the disk only after the whole marker; never after damage.
    assert [name for name, count in decompressed.items() if count == 0] == (
        [] if damaged else ["marker region 0: written whole"]), decompressed
    if damaged:  # the test did put wrong bytes on disk, in the copies killed late enough
        assert wrong_on_disk >= 2, wrong_on_disk


# -- damage on disk after the marker ------------------------------------------------------------


@functools.cache
def two_members_zip() -> bytes:
    return make_zip({"big.bin": content(), "other.bin": sample_bytes(42, MIB + 99)},
                    methods=(zipfile.ZIP_LZMA,))


def copy_files(disk: DiskCache, ref: MemberRef, attempt: str) -> list[Path]:
    """The region files of ``ref``'s copy ``attempt``, by region."""
    digest = object_digest(UnzippedRef.of(ref, attempt))
    regions = -(-ref.size // (disk.layout.blocks * disk.block_size))
    return [disk.root / digest[:2] / f"{digest}.r{region}" for region in range(regions)]


def marker_file(disk: DiskCache, ref: MemberRef) -> Path:
    digest = object_digest(UnzippedRef.of(ref))
    return disk.root / digest[:2] / f"{digest}.r0"


def flip_byte(path: Path, at: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0x20]))


@dataclasses.dataclass
class KeptTwo:
    """An archive of two LZMA members, both kept decompressed in ``disk``."""

    archived: Archive
    disk: DiskCache
    source: MemberSource
    big: MemberRef
    other: MemberRef
    attempts: dict[str, str]  # member name -> its verified copy's attempt

    def expected(self, ref: MemberRef) -> bytes:
        return content() if ref is self.big else sample_bytes(42, MIB + 99)


def kept_two(directory: Path) -> KeptTwo:
    archived = archive(two_members_zip())
    disk = cache(directory)
    source = MemberSource(archived.source, disk=disk)
    big, other = archived.members["big.bin"], archived.members["other.bin"]
    assert source.keep(big)
    assert source.keep(other)
    assert source._kept is not None
    attempts = {ref.path: source._kept._attempts[ref] for ref in (big, other)}
    return KeptTwo(archived, disk, source, big, other, attempts)


def harm_a_payload_byte(kept: KeptTwo) -> None:
    flip_byte(copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[1],
              kept.disk.layout.slot_offset(3) + 100)


def harm_a_table_entry(kept: KeptTwo) -> None:
    flip_byte(copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[2],
              kept.disk.layout.entry_offset(5) + 9)


def harm_a_truncation(kept: KeptTwo) -> None:
    os.truncate(copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[1],
                kept.disk.layout.slot_offset(4) + 10)


def harm_a_region_deleted(kept: KeptTwo) -> None:
    copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[2].unlink()


def harm_the_copy_deleted_not_its_marker(kept: KeptTwo) -> None:
    for path in copy_files(kept.disk, kept.big, kept.attempts["big.bin"]):
        path.unlink()


def harm_a_zeroed_header(kept: KeptTwo) -> None:
    with copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[0].open("r+b") as handle:
        handle.write(bytes(blockfile.HEADER_SIZE))


def harm_the_marker_deleted(kept: KeptTwo) -> None:
    marker_file(kept.disk, kept.big).unlink()


def harm_a_marker_byte(kept: KeptTwo) -> None:
    flip_byte(marker_file(kept.disk, kept.big), kept.disk.layout.slot_offset(0) + 7)


def harm_a_marker_naming_another_members_copy(kept: KeptTwo) -> None:
    """A well-formed marker (its checks pass) naming the other member's verified copy."""
    marker = UnzippedRef.of(kept.big)
    kept.disk.write(marker, object_digest(marker), 0,
                    [b"S3DZ" + kept.attempts["other.bin"].encode("ascii")])


def harm_another_members_marker_file(kept: KeptTwo) -> None:
    shutil.copyfile(marker_file(kept.disk, kept.other), marker_file(kept.disk, kept.big))


def harm_another_members_region_file(kept: KeptTwo) -> None:
    shutil.copyfile(copy_files(kept.disk, kept.other, kept.attempts["other.bin"])[1],
                    copy_files(kept.disk, kept.big, kept.attempts["big.bin"])[1])


def harm_another_region_of_the_copy(kept: KeptTwo) -> None:
    files = copy_files(kept.disk, kept.big, kept.attempts["big.bin"])
    shutil.copyfile(files[0], files[1])


HARMS = [harm_a_payload_byte, harm_a_table_entry, harm_a_truncation, harm_a_region_deleted,
         harm_the_copy_deleted_not_its_marker, harm_a_zeroed_header, harm_the_marker_deleted,
         harm_a_marker_byte, harm_a_marker_naming_another_members_copy,
         harm_another_members_marker_file, harm_another_members_region_file,
         harm_another_region_of_the_copy]


@pytest.mark.parametrize("harm", HARMS, ids=[h.__name__.removeprefix("harm_") for h in HARMS])
def test_damage_to_a_kept_copy_or_its_marker_is_never_served(
    tmp_path: Path, harm: Callable[[KeptTwo], None]
) -> None:
    """Whatever happened to the files of a verified copy or of its marker, a read gives the
    member's exact bytes: from what is left of the copy, or decompressed again; never another
    member's bytes, another region's, or a damaged block. In the mount that kept it (which
    remembers the copy's name) and in another (a copy of the harmed cache directory)."""
    kept = kept_two(tmp_path / "cache")
    harm(kept)
    shutil.copytree(tmp_path / "cache", tmp_path / "copied")
    remounted = MemberSource(kept.archived.source, disk=cache(tmp_path / "copied"))
    for source in (kept.source, remounted):
        decompressions = source.stats.decompressions
        for ref in (kept.big, kept.other):
            expected = kept.expected(ref)
            reads = [(0, BLOCK), *[(start, min(ref.size, start + 5000))
                                   for start in range(17, ref.size, MIB // 3)],
                     (ref.size - BLOCK, ref.size), *random_ranges(ref.size, seed=13, count=8),
                     (0, ref.size)]
            for start, end in reads:
                assert source.get_range(ref, start, end) == expected[start:end], (ref.path, start)
            settled(source)
        # The harmed member's copy made again, once; its first read, at its start, goes the
        # live way (a sequential reader's would): one more. The other member: none.
        assert source.stats.decompressions - decompressions <= 2


# -- another version of the archive -------------------------------------------------------------


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "etag-only"])
def test_a_copy_is_not_another_versions_with_the_same_member_fields(
    tmp_path: Path, versioned: bool
) -> None:
    """Version 2 of the archive differs from version 1 in one byte of a member's data only: the
    member's offset, sizes, CRC field and method are the same. Its bytes no longer match that
    CRC: its end fails (EIO), never served from version 1's verified copy (which would pass for
    it); and version 1's copy is still read from the disk after that."""
    expected, first, ref = big_member(DEFLATED)
    flip, _wrong_at = damage_on_its_way(first, ref)
    body = bytearray(zip_bytes(DEFLATED))
    body[data_offset(first, ref) + flip] ^= 0x55
    source = FakeSource()
    source.create_bucket(BUCKET, versioned=versioned)
    first_ref = source.put(BUCKET, "d.zip", zip_bytes(DEFLATED))
    kept = MemberSource(source, disk=cache(tmp_path))
    v1 = dataclasses.replace(ref, archive=first_ref)
    far = 2 * MIB
    assert kept.get_range(v1, far, far + BLOCK) == expected[far: far + BLOCK]
    settled(kept)
    second_ref = source.put(BUCKET, "d.zip", bytes(body))
    assert (second_ref.version_id != first_ref.version_id) is versioned
    v2 = dataclasses.replace(ref, archive=second_ref)
    assert UnzippedRef.of(v2) != UnzippedRef.of(v1)
    for mount in (kept, MemberSource(source, disk=cache(tmp_path))):
        with pytest.raises(ArchiveError, match="CRC-32 mismatch"):
            mount.get_range(v2, ref.size - BLOCK, ref.size)
        settled(mount)
    if versioned:  # version 1 is still there to read, from its copy
        remounted = MemberSource(source, disk=cache(tmp_path))
        assert remounted.get_range(v1, 0, ref.size) == expected
        assert remounted.stats.decompressions == 0


def data_offset(archived: Archive, ref: MemberRef) -> int:
    """Where the member's (compressed) data starts in the archive."""
    header = archived.source.get_range(archived.ref, ref.header_offset, ref.header_offset + 30)
    return ref.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
        int.from_bytes(header[28:30], "little")


# -- readers of a decompression that fails ------------------------------------------------------


class Stepped:
    """The pieces of ``source``'s decompressions into the cache let through as the test says
    (``let``), so readers join them at known places."""

    def __init__(self, source: MemberSource) -> None:
        self._allowed = 0
        self._changed = threading.Condition()
        pieces = source._whole_pieces

        def held(ref: MemberRef) -> Iterator[bytes]:
            for piece in pieces(ref):
                with self._changed:
                    assert self._changed.wait_for(lambda: self._allowed > 0, timeout=20)
                    self._allowed -= 1
                yield piece

        source._whole_pieces = held

    def let(self, pieces: int) -> None:
        with self._changed:
            self._allowed += pieces
            self._changed.notify_all()


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"waited 10 s for {what}"
        time.sleep(0.005)


FAILURES = ["S3 error", "corrupt stream", "truncated data", "CRC mismatch", "zip bomb", "unmount"]


def inflated_length(compressed: bytes, length: int) -> int:
    """How many bytes the first ``length`` bytes of a deflate stream inflate to."""
    return len(zlib.decompressobj(-15).decompress(compressed[:length]))


def stored_lengths(compressed: bytes) -> int:
    """Where the lengths of a stored block lie in a deflate stream, past 3/5 of it: one of
    their bytes flipped, the stream fails to inflate there ("invalid stored block lengths")."""
    for at in range(len(compressed) * 3 // 5, len(compressed) - 4):
        length, check = struct.unpack_from("<HH", compressed, at)
        if length ^ check == 0xFFFF and length > 1000:
            damaged = bytearray(compressed)
            damaged[at + 2] ^= 0xFF
            with contextlib.suppress(zlib.error):
                zlib.decompressobj(-15).decompress(bytes(damaged))
                continue  # random bytes that looked like lengths
            return at
    raise AssertionError("no stored block in the member's random half")


def failing_member(failure: str) -> tuple[Archive, MemberRef, int, int]:
    """The test member made to fail its decompression as named, its ref, and the bytes of its
    output that come before the failure for sure, and at most (unless the mount ends)."""
    _expected, archived, ref = big_member(DEFLATED)
    start = data_offset(archived, ref)
    compressed = archived.source.get_range(archived.ref, start, start + ref.compressed_size)
    fails_at = ref.compressed_size * 3 // 5  # in the compressed data
    # Found at the end: all is passed before it but the last piece of output (256 KiB here),
    # which the readers of its range wait for with those of the end.
    if failure == "CRC mismatch":
        archived = zipped(DEFLATED, crc=0x12345678)
        return archived, archived.members["big.bin"], ref.size - 320 * KIB, ref.size
    if failure == "zip bomb":
        archived = zipped(DEFLATED, size=3 * MIB)  # 4,321 bytes short
        return archived, archived.members["big.bin"], 3 * MIB - 320 * KIB, 3 * MIB
    if failure == "truncated data":  # its compressed size cut to 3/5: its data ends early
        archived = zipped(DEFLATED, csize=fails_at)
        # The last call of the decompressor (up to 64 KiB of input) may keep its output.
        return (archived, archived.members["big.bin"],
                inflated_length(compressed, fails_at - 64 * KIB), ref.size)
    if failure == "corrupt stream":
        lengths = stored_lengths(compressed)
        body = bytearray(zip_bytes(DEFLATED))
        body[start + lengths + 2] ^= 0xFF
        archived = archive(bytes(body))
        # An error loses the output of its call to the decompressor (64 KiB of input).
        return (archived, archived.members["big.bin"],
                inflated_length(compressed, lengths - 64 * KIB),
                inflated_length(compressed, lengths))
    # S3 fails the GET of the chunk that crosses 3/5 of the data (chunks of 256 KiB here).
    return (archived, ref, inflated_length(compressed, fails_at - 320 * KIB),
            inflated_length(compressed, fails_at))


@pytest.mark.parametrize("failure", FAILURES)
def test_every_reader_of_a_failing_decompression_gets_its_bytes_or_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """Readers join a decompression into the cache at known places (behind its output, ahead
    of it before and past the place it fails, at the member's end, the whole member) and it
    fails there: by S3, a corrupt stream, data that ends early, its CRC, a zip bomb's extra
    bytes, or the mount ending. Each reader gets its exact bytes (those passed before the
    failure) or the error, none waits on, nothing is kept, and the next read retries or fails
    at once, as fits."""
    monkeypatch.setattr(members_module, "_MAX_CHUNK", 256 * KIB)  # input fetched as it goes
    monkeypatch.setattr(members_module, "_OUT_STEP", 256 * KIB)  # pieces of output: 256 KiB
    archived, ref, good_until, bad_from = failing_member(failure)
    expected = content()
    source = MemberSource(archived.source, disk=cache(tmp_path))
    kept = source._kept
    assert kept is not None
    stepped = Stepped(source)
    data = source._data

    def failing_data(member: MemberRef, start: int, end: int) -> bytes:
        if failure == "S3 error" and end > member.compressed_size * 3 // 5:
            raise TransientS3Error("S3 said 503 Slow Down")
        return data(member, start, end)

    source._data = failing_data
    wanted: list[tuple[int, int]] = []
    want = decompressed_module._Flight.want

    def noting_want(flight: decompressed_module._Flight, start: int, end: int
                    ) -> decompressed_module._Want | None:
        wanted.append((start, end))
        return want(flight, start, end)

    monkeypatch.setattr(decompressed_module._Flight, "want", noting_want)
    catching = (ArchiveError, TransientS3Error, decompressed_module._Closed)
    with ThreadPoolExecutor(8) as pool:
        def read(start: int, end: int) -> Future:
            return pool.submit(lambda: catch(lambda: source.get_range(ref, start, end), catching))

        first = read(MIB + 5, MIB + 5 + BLOCK)  # starts the decompression, waits ahead of it
        until(lambda: ref in kept._flights, "the decompression")
        while (produced := kept.produced(ref) or 0) < 768 * KIB:  # a piece at a time
            stepped.let(1)
            until(lambda produced=produced: (kept.produced(ref) or 0) > produced, "a piece")
        joined_at = kept.produced(ref)  # readers of ranges before it wait for its end
        if failure == "unmount":
            good_until = bad_from = joined_at
        assert joined_at < 900 * KIB
        places = {"first": (MIB + 5, MIB + 5 + BLOCK),
                  "behind": (300 * KIB, 300 * KIB + BLOCK),
                  "ahead": (900 * KIB, 900 * KIB + 3 * BLOCK),
                  "before the failure": (good_until - BLOCK - 7, good_until - 7),
                  "past the failure": (bad_from + 11, min(ref.size, bad_from + 11 + BLOCK)),
                  "the end": (ref.size - 10, ref.size), "whole": (0, ref.size)}
        places = {name: place for name, place in places.items() if place[0] < place[1]}
        readers = {name: read(*place) for name, place in places.items() if name != "first"}
        # Every reader but the whole member's joins it (a deflated member read whole in one
        # range is inflated on its own, the old way: see ``MemberSource.get_range``).
        until(lambda: len(wanted) == len(places) - 1, "every reader to join")
        if failure == "unmount":
            source.close()
        stepped.let(1000)
        results = {name: reader.result(timeout=10) for name, reader in readers.items()}
        results["first"] = first.result(timeout=10)
    settled(source)
    for name, result in results.items():
        start, end = places[name]
        if isinstance(result, bytes):
            assert result == expected[start:end], name
        if name == "whole":  # inflated on its own: it meets the same failure, not the mount's end
            assert isinstance(result, bytes) is (failure == "unmount"), result
        elif start >= joined_at and end <= good_until:
            assert isinstance(result, bytes), (name, result)  # passed before the failure
        elif start < joined_at or start >= bad_from or end == ref.size:
            assert not isinstance(result, bytes), name  # waited for the end, or never passed
    assert [p for p in tmp_path.rglob("*.r*")
            if not p.name.startswith(object_digest(archived.ref))] == []  # nothing kept
    # The next read: a transient failure is retried (and kept this time), a bad member fails at
    # once (and again after its retry time: still bad); the one after an unmount is no read.
    if failure == "S3 error":
        source._data = data
        far = 2 * MIB
        assert source.get_range(ref, far, far + BLOCK) == expected[far: far + BLOCK]
        settled(source)
        assert source.get_range(ref, 0, ref.size) == expected
    elif failure != "unmount":
        decompressions = source.stats.decompressions
        with pytest.raises(ArchiveError):
            source.get_range(ref, 2 * MIB, 2 * MIB + BLOCK)
        assert source.stats.decompressions == decompressions
        monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)
        with pytest.raises(ArchiveError):
            source.get_range(ref, ref.size - BLOCK, ref.size)
        settled(source)


def catch(action: Callable[[], bytes], catching: tuple[type[BaseException], ...]
          ) -> bytes | BaseException:
    try:
        return action()
    except catching as exc:
        return exc


# -- bounds -------------------------------------------------------------------------------------


class NearlyFull:
    """``os.statvfs`` of a filesystem of ``total`` bytes where others use ``others`` and the cache
    what its files take: what ``--cache-min-free`` looks at."""

    def __init__(self, directory: Path, total: int, others: int) -> None:
        self.directory, self.total, self.others = directory, total, others
        self.f_frsize, self.f_blocks = 1, total

    @property
    def f_bavail(self) -> int:
        cached = sum(p.stat().st_blocks * 512 for p in self.directory.rglob("*.r*"))
        return self.total - self.others - cached


def test_a_copy_whole_after_min_free_evicted_other_files_is_no_copy_without_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--cache-min-free evicted an older object's file to make room during the decompression,
    and the copy is whole: no warning that it lost its first part, and the member is not
    marked as one the cache has no room for."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    disk = DiskCache(tmp_path, block_size=BLOCK, capacity=1 << 30, min_free_ratio=0.5,
                     dataset="s3://bkt/d.zip")
    # Half of 100 MiB kept free, 46 MiB used by others: 4 MiB for the cache, which holds
    # 1.5 MiB and is given a member of 3 MiB.
    filesystem = NearlyFull(tmp_path, total=100 * MIB, others=46 * MIB)
    monkeypatch.setattr(disk, "_statvfs", lambda: filesystem)
    older = archived.ref  # any object: its 1.5 MiB are what min-free evicts
    disk.write(older, object_digest(older), 0, [bytes(BLOCK)] * 24)
    source = MemberSource(archived.source, disk=disk)
    with caplog.at_level("WARNING"):
        assert source.get_range(ref, MIB, MIB + BLOCK) == expected[MIB: MIB + BLOCK]
        settled(source)
    assert disk.read_run(object_digest(older), older.size, range(1)) == {}  # evicted
    assert source._kept.holds(ref)
    assert ref not in source._kept._no_room
    assert "evicted the first part" not in caplog.text


def test_a_copy_the_free_space_cannot_hold_is_not_made_again_at_every_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cache-min-free leaves room for less than the member: its decompression into the cache
    evicts its own first regions to write its last. Every later read in those regions had the
    whole member decompressed into the cache again (which evicted them again: 6 decompressions
    into the cache for 10 random reads). Now none is started for ``_REFUSED_SECONDS``: what is
    left of the copy is read (no decompression), the rest the old way. The bytes stay exact."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    disk = DiskCache(tmp_path, block_size=BLOCK, capacity=1 << 30, min_free_ratio=0.5,
                     dataset="s3://bkt/d.zip")
    # Half of 100 MiB kept free, 48 MiB used by others: 2 MiB for the cache, the member is 3.
    filesystem = NearlyFull(tmp_path, total=100 * MIB, others=48 * MIB)
    monkeypatch.setattr(disk, "_statvfs", lambda: filesystem)
    source = MemberSource(archived.source, disk=disk)
    pieces, flights = source._whole_pieces, [0]

    def counted(member: MemberRef) -> Iterator[bytes]:
        flights[0] += 1
        return pieces(member)

    source._whole_pieces = counted
    for start, end in random_ranges(ref.size, seed=21, count=10):
        assert source.get_range(ref, start, end) == expected[start:end], start
        settled(source)
    assert flights[0] == 1, f"{flights[0]} whole decompressions into the cache for 10 reads"
    decompressions = source.stats.decompressions
    last = ref.size - BLOCK  # in the copy's last region, which is left
    assert source.get_range(ref, last, ref.size) == expected[last:]
    assert source.stats.decompressions == decompressions


def test_prefetch_reports_a_copy_the_free_space_cannot_hold_as_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``keep`` (``s3datafs prefetch``) said "kept" when the copy's last byte was on disk, though
    --cache-min-free had evicted its first regions to write its last: the prefetch counted a
    member as kept that a job would decompress again. Kept now means whole on disk."""
    expected, archived, ref = big_member(zipfile.ZIP_BZIP2)
    disk = DiskCache(tmp_path, block_size=BLOCK, capacity=1 << 30, min_free_ratio=0.5,
                     dataset="s3://bkt/d.zip")
    filesystem = NearlyFull(tmp_path, total=100 * MIB, others=48 * MIB)  # room for 2 MiB of 3
    monkeypatch.setattr(disk, "_statvfs", lambda: filesystem)
    source = MemberSource(archived.source, disk=disk)
    assert source.keeps_ahead(ref)
    assert source.keep(ref) is False
    assert source.get_range(ref, 0, ref.size) == expected


def test_prefetch_makes_a_copy_that_lost_regions_whole_again(tmp_path: Path) -> None:
    """A copy kept by an earlier prefetch, since evicted in part (its first region file), is
    decompressed again by the next prefetch, not reported kept as it is."""
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    assert source.keep(ref)
    assert source._kept is not None
    assert source._kept.holds(ref)
    attempt = source._kept._verified(ref)
    assert attempt is not None
    [first_region] = tmp_path.rglob(f"{object_digest(UnzippedRef.of(ref, attempt))}.r0")
    first_region.unlink()
    again = MemberSource(archived.source, disk=cache(tmp_path))
    assert again.keep(ref)
    assert again.stats.decompressions == 1
    assert again._kept is not None
    assert again._kept.holds(ref)
    archived.reset()
    third = MemberSource(archived.source, disk=cache(tmp_path))
    assert third.get_range(ref, 0, ref.size) == expected
    assert (third.stats.decompressions, archived.source.calls["get_range"]) == (0, 0)


# -- two processes, cache clear, eviction, a reader given up on ---------------------------------


def decompress_beside_another(
    archived: Archive, ref: MemberRef, directory: Path, both: threading.Barrier, seed: int
) -> None:
    """In a forked child: ``ref`` decompressed into the cache by a random read, the
    decompression held after its first piece until the other process's is there too, then
    random reads checked (an assertion fails the child)."""
    source = MemberSource(archived.source, disk=cache(directory))
    pieces = source._whole_pieces

    def met(member: MemberRef) -> Iterator[bytes]:
        for number, piece in enumerate(pieces(member)):
            if number == 1:
                both.wait(timeout=20)
            yield piece

    source._whole_pieces = met
    for start, end in [(2 * MIB, 2 * MIB + BLOCK), *random_ranges(ref.size, seed=seed)]:
        assert source.get_range(ref, start, end) == content()[start:end], start
    settled(source)
    assert source.stats.decompressions == 1


def test_two_processes_decompressing_one_member_at_once(tmp_path: Path) -> None:
    """Two mounts (processes) sharing a cache directory decompress one member into it at the
    same time: two attempts, each verified; the marker, written by both, names one of them;
    both read exact bytes, and a third mount reads from the disk (no decompression)."""
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    context = multiprocessing.get_context("fork")
    both = context.Barrier(2)
    children = [context.Process(target=decompress_beside_another,
                                args=(archived, ref, tmp_path, both, seed)) for seed in (31, 32)]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join()
    marker = UnzippedRef.of(ref)
    copies = {path.name.partition(".")[0] for path in tmp_path.rglob("*.r*")} - {
        object_digest(archived.ref), object_digest(marker)}
    assert len(copies) == 2  # an attempt each
    archived.reset()
    third = MemberSource(archived.source, disk=cache(tmp_path))
    for start, end in [(0, ref.size), *random_ranges(ref.size, seed=33)]:
        assert third.get_range(ref, start, end) == expected[start:end]
    assert (third.stats.decompressions, archived.source.calls["get_range"]) == (0, 0)
    assert third._kept is not None
    assert object_digest(UnzippedRef.of(ref, third._kept._attempts[ref])) in copies


def test_cache_clear_under_a_decompression_and_its_readers(tmp_path: Path) -> None:
    """``cache clear`` (all of it) as a decompression into the cache has written two of its four
    regions: its readers, ahead and behind, get their exact bytes, the copy is marked with
    regions missing, and reads in those decompress the member again, into a whole copy."""
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    kept = source._kept
    assert kept is not None
    stepped = Stepped(source)
    with ThreadPoolExecutor(4) as pool:
        ahead = pool.submit(source.get_range, ref, 2 * MIB + 3, 2 * MIB + 3 + BLOCK)
        until(lambda: ref in kept._flights, "the decompression")
        while (produced := kept.produced(ref) or 0) < 2 * MIB + 4 * BLOCK:
            stepped.let(1)
            until(lambda produced=produced: (kept.produced(ref) or 0) > produced, "a piece")
        behind = pool.submit(source.get_range, ref, MIB + 5, MIB + 5 + BLOCK)
        until(lambda: ahead.done(), "the reader ahead")
        assert disk_module.clear(tmp_path) >= 2  # the archive's blocks and the copy's
        stepped.let(1000)
        assert ahead.result(timeout=10) == expected[2 * MIB + 3: 2 * MIB + 3 + BLOCK]
        assert behind.result(timeout=10) == expected[MIB + 5: MIB + 5 + BLOCK]
    settled(source)
    decompressions = source.stats.decompressions
    for start, end in [(5, 5 + BLOCK), *random_ranges(ref.size, seed=34), (0, ref.size)]:
        assert source.get_range(ref, start, end) == expected[start:end], start
        settled(source)
    assert source.stats.decompressions <= decompressions + 1


def test_reads_of_a_copy_stay_exact_while_another_mount_evicts_it(tmp_path: Path) -> None:
    """A mount with a bound too small for the copy shares the directory and scans it again and
    again (evicting the copy's files and the marker, oldest first) while this mount reads the
    member at random from its copy, from 4 threads: every read is exact, and every one made
    the copy again at most once."""
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    assert source.keep(ref)
    small = DiskCache(tmp_path, block_size=BLOCK, capacity=2 * MIB)
    reading = threading.Event()
    scans = [0]

    def evicting() -> None:
        while not reading.is_set():
            small.sync()
            scans[0] += 1
            time.sleep(0.002)

    ranges = random_ranges(ref.size, seed=35, count=120)
    evictor = threading.Thread(target=evicting)
    evictor.start()
    try:
        results = read_at_once(source, ref, ranges, threads=4)
    finally:
        reading.set()
        evictor.join(timeout=10)
    for (start, end), got in zip(ranges, results, strict=True):
        assert got == expected[start:end], start
    settled(source)
    assert scans[0] >= 10
    assert source.stats.decompressions <= len(ranges) + 1


@trio_test
async def test_a_reader_given_up_on_while_it_waits_leaves_nothing_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of a member waits for its decompression into the cache longer than
    --read-timeout: the reader gives it up (EIO), the worker thread goes on waiting, abandoned.
    Once the decompression ends that thread is done, the connection slot it held counts as
    answering again, no range waits on the decompression, and the next read is exact (once
    the kernel's retry of the failed read has been failed at once: ``reader._FAILED_TTL``)."""
    monkeypatch.setattr(reader_module, "_FAILED_TTL", 0.05)
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    kept = source._kept
    assert kept is not None
    stepped = Stepped(source)
    reader = BlockReader(source, block_size=BLOCK, memory_cache_bytes=8 * MIB,
                         s3_limiter=trio.CapacityLimiter(4), read_timeout=0.3)
    far = 2 * MIB + 5
    async with trio.open_nursery() as tasks:
        reader.attach(tasks)
        with pytest.raises(TransientS3Error, match="--read-timeout"):
            await reader.read(ref, far, BLOCK)
        assert reader._abandoned == 1
        flight = kept._flights[ref]
        assert len(flight.wants) == 1
        stepped.let(1000)
        await trio.to_thread.run_sync(settled, source)
        assert flight.done
        assert flight.wants == []
        await trio.to_thread.run_sync(until, lambda: reader._abandoned == 0, "its thread")
        await trio.sleep(0.05)  # reader._FAILED_TTL
        assert await reader.read(ref, far, BLOCK) == expected[far: far + BLOCK]
        assert await reader.read(ref, 0, ref.size) == expected
        assert source.stats.decompressions == 1
        tasks.cancel_scope.cancel()


@trio_test
async def test_readers_waiting_on_a_decompression_hold_no_s3_slot(tmp_path: Path) -> None:
    """Readers that join a decompression into the cache wait for this process, not for S3: past
    --read-timeout they fail saying so, holding no S3 connection slot, and are not counted as
    S3 calls given up; another object is still read. (With as many of them as slots, every
    other read failed at once with "no answer from S3", though S3 answered.)"""
    expected, archived, ref = big_member(zipfile.ZIP_LZMA)
    other = archived.source.put(BUCKET, "other.bin", b"o" * 5000)
    source = MemberSource(archived.source, disk=cache(tmp_path))
    stepped = Stepped(source)
    slots = 3
    reader = BlockReader(source, block_size=BLOCK, memory_cache_bytes=8 * MIB,
                         s3_limiter=trio.CapacityLimiter(slots), read_timeout=0.3)
    far = 2 * MIB + 5
    async with trio.open_nursery() as tasks:
        reader.attach(tasks)
        with pytest.raises(TransientS3Error, match="--read-timeout"):
            await reader.read(ref, far, BLOCK)  # starts the decompression: an S3 slot, as ever
        for joined in range(1, slots + 1):  # blocks of their own: flights of their own
            with pytest.raises(TransientS3Error, match="--read-timeout") as failed:
                await reader.read(ref, far + joined * 4 * BLOCK, BLOCK)
        assert reader._abandoned == 1
        assert await reader.read(other, 0, other.size) == b"o" * 5000
        assert "its decompression did not reach bytes" in str(failed.value)  # not S3's doing
        stepped.let(10**6)
        await trio.to_thread.run_sync(settled, source)
        await trio.to_thread.run_sync(  # the waiting threads read the copy, and end
            until, lambda: reader._busy_limiter.borrowed_tokens == 0, "the waiting threads")
        assert await reader.read(ref, 3 * MIB, BLOCK) == expected[3 * MIB:]  # no read failed
        tasks.cancel_scope.cancel()


# -- a model: everything at once ----------------------------------------------------------------

MODEL_BLOCK = 16 * KIB  # regions of 4 blocks (``model_regions``): a member of ~300 KiB spans 5
MODEL_SIZES = {"a.bin": 300 * KIB + 123, "b.bin": 200 * KIB + 45}


@functools.cache
def model_zip() -> bytes:
    return make_zip({name: sample_bytes(60 + len(name) + size % 7, size)
                     for name, size in MODEL_SIZES.items()}, methods=(zipfile.ZIP_LZMA,))


class _Killed(BaseException):
    """The process dies here: nothing after runs, not even the clean-up of ``except`` blocks
    that catch ``Exception`` (a ``BaseException`` passes them)."""


class _Counted:
    """``secrets`` for ``archive.decompressed``: attempt names 1, 2, 3... in hex."""

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def token_hex(self, size: int) -> str:
        return next(self._count).to_bytes(size, "big").hex()


class KeptMembersModel(RuleBasedStateMachine):
    """Mounts (``MemberSource``) of one archive of two LZMA members, sharing a cache directory,
    read the members at random; between reads, processes die in the middle of decompressions
    into the cache (fed good bytes, or bytes whose CRC would fail), files of copies and markers
    are damaged, truncated, deleted or overwritten with other files, the cache is cleared or
    scanned down by a mount with a small bound, a member is found bad in transit, a mount
    remounts. The one invariant: every read gives the member's exact bytes (no error either:
    the archive in S3 is good)."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(dir=base))
        # Attempts named in turn, not at random: the same steps make the same files.
        self._attempt_names = mock.patch.object(decompressed_module, "secrets", _Counted())
        self._attempt_names.start()
        self.archived = archive(model_zip())
        self.refs = [self.archived.members[name] for name in MODEL_SIZES]
        self.expected = {ref.path: sample_bytes(60 + len(ref.path) + ref.size % 7, ref.size)
                         for ref in self.refs}
        self.mounts = [self._mount(), self._mount()]

    def teardown(self) -> None:
        for mount in self.mounts:
            assert mount._kept is not None
            mount._kept.wait_idle(30)
            mount.close()
        self._attempt_names.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _disk(self, capacity: int = 1 << 30) -> DiskCache:
        return DiskCache(self.tmp, block_size=MODEL_BLOCK, capacity=capacity)

    def _mount(self) -> MemberSource:
        return MemberSource(self.archived.source, disk=self._disk(), whole_max=8 * KIB)

    def _copy_files(self) -> list[Path]:
        """Region files of copies and markers (not the archive's own blocks)."""
        archive_digest = object_digest(self.archived.ref)
        return sorted(p for p in self.tmp.rglob("*.r*") if not p.name.startswith(archive_digest))

    @rule(mount=st.integers(0, 1), member=st.integers(0, 1), data=st.data())
    def read(self, mount: int, member: int, data: st.DataObject) -> None:
        ref = self.refs[member]
        start = data.draw(st.integers(0, ref.size - 1), label="start")
        end = data.draw(st.integers(start + 1, min(ref.size, start + 3 * MODEL_BLOCK)),
                        label="end")
        source = self.mounts[mount]
        assert source.get_range(ref, start, end) == self.expected[ref.path][start:end]
        settled(source)  # the decompression it started, if any, ends before the next step

    @rule(mount=st.integers(0, 1), member=st.integers(0, 1))
    def read_whole(self, mount: int, member: int) -> None:
        ref = self.refs[member]
        assert self.mounts[mount].get_range(ref, 0, ref.size) == self.expected[ref.path]
        settled(self.mounts[mount])

    @rule(mount=st.integers(0, 1))
    def remount(self, mount: int) -> None:
        self.mounts[mount].close()
        self.mounts[mount] = self._mount()

    @rule(member=st.integers(0, 1), writes=st.integers(0, 6), mid_write=st.booleans(),
          bad_bytes=st.booleans(), at=st.integers(0, 4095))
    def a_process_dies_decompressing(self, member: int, writes: int, mid_write: bool,
                                     bad_bytes: bool, at: int) -> None:
        """Another process decompresses a member into the cache and is killed before its write
        number ``writes`` (regions, then the marker; ``mid_write``: with the payload written,
        not its table entries), or not at all. Fed ``bad_bytes`` (bytes flipped from ``at`` on:
        the CRC would fail at the end), it writes them, and the end is that failure."""
        ref = self.refs[member]
        output = bytearray(self.expected[ref.path])
        if bad_bytes:  # a byte in every 4 KiB: any read served from them is caught
            for wrong in range(at % 4096, ref.size, 4096):
                output[wrong] ^= 0x01
        dead = KeptMembers(self._disk(), lambda **_: None, lambda *_: None)
        dead._drop = lambda *_: None  # type: ignore[method-assign] - a dead process cleans nothing
        written = [0]
        write = dead._write

        def dying_write(target: UnzippedRef, digest: str, offset: int, data: bytes) -> bool:
            if written[0] == writes:
                if not mid_write:
                    raise _Killed
                with mock.patch.object(blockfile, "entries", side_effect=_Killed):
                    write(target, digest, offset, data)
            written[0] += 1
            return write(target, digest, offset, data)

        dead._write = dying_write  # type: ignore[method-assign]

        def pieces() -> Iterator[bytes]:
            for offset in range(0, ref.size, 50 * KIB):
                yield bytes(output[offset: offset + 50 * KIB])
            if bad_bytes:
                raise ArchiveError("CRC-32 mismatch")

        with contextlib.suppress(_Killed, ArchiveError):
            dead._decompress(ref, decompressed_module._Flight(ref.size), pieces)

    @rule(data=st.data(), harm=st.sampled_from(
        ["flip", "truncate", "delete", "zero header", "overwrite with another"]))
    def damage_a_file(self, data: st.DataObject, harm: str) -> None:
        files = self._copy_files()
        if not files:
            return
        # Drawn by number, within fixed bounds: which files there are depends on the steps.
        path = files[data.draw(st.integers(0, 63), label="file") % len(files)]
        size = path.stat().st_size
        if harm == "flip" and size:
            flip_byte(path, data.draw(st.integers(0, size - 1), label="at"))
        elif harm == "truncate":
            os.truncate(path, data.draw(st.integers(0, size), label="length"))
        elif harm == "delete":
            path.unlink()
        elif harm == "zero header":
            with path.open("r+b") as handle:
                handle.write(bytes(blockfile.HEADER_SIZE))
        elif harm == "overwrite with another" and len(files) > 1:
            others = [f for f in files if f != path]
            shutil.copyfile(others[data.draw(st.integers(0, 63), label="other") % len(others)],
                            path)

    @rule()
    def cache_clear(self) -> None:
        disk_module.clear(self.tmp)

    @rule(bound=st.integers(64 * KIB, 1024 * KIB))
    def another_mount_scans_with_a_small_bound(self, bound: int) -> None:
        self._disk(capacity=bound).sync()

    @rule(mount=st.integers(0, 1), member=st.integers(0, 1))
    def found_bad_in_transit(self, mount: int, member: int) -> None:
        """A read met damage in transit: the member's bytes leave every cache (its copy's
        marker included); with ``_RETRY_BAD`` 0 here, the next read fetches them again."""
        self.mounts[mount]._found_bad(self.refs[member], ArchiveError("damaged in transit"))


def test_kept_members_against_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured over 400 examples of 30 steps: 2,900 reads, a third from a kept copy, and 1,500
    processes killed in a decompression (half of them leaving a marker, of an earlier copy)."""
    monkeypatch.setattr(disk_module, "REGION_BYTES", 4 * MODEL_BLOCK)
    monkeypatch.setattr(members_module, "_TRAIL", 32 * KIB)  # reads past it go to the copy
    monkeypatch.setattr(members_module, "_RETRY_BAD", 0.0)
    run_state_machine_as_test(
        lambda: KeptMembersModel(tmp_path),
        settings=settings(max_examples=50, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow],
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]),
    )
