"""Region files damaged any way at all, read through every reader of them: exact bytes or a miss.

The README promises that a bad or unreadable cached block is a miss (deleted, fetched again),
never a failed read; the block reader, ``ArchiveBlocks`` and ``KeptMembers`` pass over only
``OSError`` from ``DiskCache.read_run``, so anything else out of it would fail a read. Hypothesis
damages one object's region file (bytes flipped or overwritten in the header, the identity, the
table or the slots; truncated or made longer; replaced by other bytes; table entries and headers
forged with valid checks but fields out of range: lengths up to 2**32 - 1, any block count,
region or block size) and reads it in each of ``read_run``'s shapes, then writes the object
again. Every read must return the written bytes for the blocks it returns and raise nothing (not
even ``OSError``: damage is not a disk that fails), and after the write every block is served.
``cache stats`` and ``cache clear`` read the same files their own way (header, identity, table),
and must get past any of them too.
"""

from __future__ import annotations

import os
import random
import tempfile
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3datafs.cache import blockfile, disk
from s3datafs.cache.disk import DiskCache
from s3datafs.model import ObjectRef

BLOCK = 4096
BLOCKS = 6  # the object's; the last one short
SIZE = BLOCKS * BLOCK - 100
REF = ObjectRef("bkt", "k", "v1", '"etag"', SIZE, 0.0)
DIGEST = blockfile.object_digest(REF)
DATA = random.Random(3).randbytes(SIZE)
PAYLOADS = [DATA[at : at + BLOCK] for at in range(0, SIZE, BLOCK)]
LAYOUT = blockfile.Layout(BLOCK, disk.REGION_BYTES // BLOCK)
FILE_END = LAYOUT.slot_offset(BLOCKS - 1) + len(PAYLOADS[-1])  # a region file holding them all

# Where damage lands: the parts of a region file, by (start, end).
ZONES = [
    (0, blockfile.HEADER_SIZE),
    (blockfile.HEADER_SIZE, blockfile.TABLE_OFFSET),
    (blockfile.TABLE_OFFSET, LAYOUT.entry_offset(BLOCKS)),
    (LAYOUT.slot_offset(0), FILE_END),
]


def _forged_entry(index: int, length: int, crc: int) -> bytes:
    """An entry for block ``index`` whose check is valid whatever its length and crc say."""
    check = zlib.crc32(blockfile._CHECKED.pack(bytes.fromhex(DIGEST), index,
                                               blockfile.ENTRY_MARK, length, crc))
    return blockfile._ENTRY.pack(blockfile.ENTRY_MARK, length, crc, check)


def _forged_header(region: int, block_size: int, blocks: int, version: int) -> bytes:
    """A header with a valid crc over any field values."""
    packed = blockfile._HEADER.pack(blockfile.MAGIC, version, 0, region, block_size, blocks,
                                    bytes.fromhex(DIGEST))
    return packed + blockfile._HEADER_CRC.pack(zlib.crc32(packed))


UINT32 = st.integers(0, 2**32 - 1)
_at = st.sampled_from(ZONES).flatmap(lambda zone: st.integers(*zone))
DAMAGE = st.one_of(
    st.tuples(st.just("flip"), _at, st.integers(1, 255)),
    st.tuples(st.just("write"), _at, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, FILE_END)),
    st.tuples(st.just("extend"), st.integers(FILE_END, 4 * FILE_END)),
    st.tuples(st.just("replace"), st.binary(max_size=8192)),
    st.tuples(st.just("entry"), st.integers(0, BLOCKS - 1), UINT32, UINT32),
    st.tuples(st.just("header"), st.integers(0, 2**64 - 1), UINT32, UINT32,
              st.integers(0, 2**16 - 1)),
)
READ = st.tuples(st.integers(0, BLOCKS - 1), st.integers(1, BLOCKS),
                 st.sampled_from(["ends", "start", "every"]))


def _damage(path: Path, harm: tuple) -> None:
    kind, *args = harm
    if kind in ("truncate", "extend"):
        os.truncate(path, args[0])
        return
    if kind == "replace":
        path.write_bytes(args[0])
        return
    with open(path, "r+b") as handle:
        if kind == "flip":
            at, mask = args
            handle.seek(at)
            old = handle.read(1) or b"\0"
            handle.seek(at)
            handle.write(bytes([old[0] ^ mask]))
        elif kind == "write":
            handle.seek(args[0])
            handle.write(args[1])
        elif kind == "entry":
            index, length, crc = args
            if length == len(PAYLOADS[index]):  # its true length: a forged crc is all it is
                length += 1
            handle.seek(LAYOUT.entry_offset(index))
            handle.write(_forged_entry(index, length, crc))
        else:
            handle.write(_forged_header(*args))


def _read(cache: DiskCache, first: int, count: int, shape: str) -> dict[int, bytes]:
    run = range(first, min(BLOCKS, first + count))
    return cache.read_run(DIGEST, SIZE, run, ends=shape == "ends", every=shape == "every")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(harms=st.lists(DAMAGE, min_size=1, max_size=4), reads=st.lists(READ, min_size=1,
                                                                       max_size=4))
def test_a_region_file_damaged_any_way_reads_as_its_bytes_or_a_miss(
    harms: list[tuple], reads: list[tuple[int, int, str]]
) -> None:
    with tempfile.TemporaryDirectory() as top:
        cache = DiskCache(Path(top), block_size=BLOCK, capacity=64 * 1024 * 1024)
        cache.write(REF, DIGEST, 0, PAYLOADS)
        path = cache.root / DIGEST[:2] / f"{DIGEST}.r0"
        for harm in harms:
            _damage(path, harm)
        disk.usage(Path(top))  # cache stats: whatever it says, it says it
        for first, count, shape in reads:
            for index, block in _read(cache, first, count, shape).items():
                assert bytes(block) == PAYLOADS[index], index
        cache.write(REF, DIGEST, 0, PAYLOADS)  # what was a miss is fetched and written again
        found = cache.read_run(DIGEST, SIZE, range(BLOCKS))
        assert {index: bytes(block) for index, block in found.items()} == dict(enumerate(PAYLOADS))
        _damage(path, harms[0])
        assert disk.clear(Path(top)) == 1
