"""zipformat: central directories parsed exactly as ``zipfile`` reads them, and damage refused.

Archives are made with ``zipfile`` (and edited with ``zipcraft``), except the >4 GiB one: only its
tail (central directory, ZIP64 end record, locator, end record) is built, with ``struct``, and
parsed as the end of a 10 GiB archive that never exists.
"""

from __future__ import annotations

import calendar
import io
import random
import struct
import unicodedata
import zipfile
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zipcraft import (
    HOST_FAT,
    HOST_NTFS,
    RawMember,
    central_entries,
    header_offset,
    make_zip,
    patch,
    patch_end,
    raw_zip,
    replace_name,
    sample_bytes,
    to_zip64,
)

from s3datafs.archive import zipformat
from s3datafs.archive.zipformat import (
    Directory,
    Member,
    Skipped,
    Zip64Needed,
    locate,
    locate_zip64,
    looks_like_zip,
    member_path_problem,
    parse_central_directory,
)
from s3datafs.errors import ArchiveError

WHAT = "s3://bkt/test.zip"
GIB = 1 << 30
MEMBERS = {
    "top.txt": b"top\n",
    "a/one.bin": sample_bytes(1, 70_000),
    "a/b/c/deep.txt": b"deep " * 1000,
    "empty.txt": b"",
    "caf\u00e9/\u00fcnicode.txt": b"unicode names are UTF-8\n",
}
DIRECTORIES = ("a/", "empty-dir/", "x/y/z/")


def index(data: bytes, archive_size: int | None = None) -> tuple[Directory, list[Member],
                                                                 list[Skipped]]:
    """Locate and parse with the whole of ``data`` as the tail (``data`` ends the archive)."""
    size = len(data) if archive_size is None else archive_size
    found = locate(data, size, WHAT)
    assert isinstance(found, Directory)
    tail_start = size - len(data)
    directory = data[found.start - tail_start: found.start - tail_start + found.size]
    members, skipped = parse_central_directory(directory, found, size, WHAT)
    return found, members, skipped


def dos_utc(date_time: tuple[int, ...]) -> float:
    return float(calendar.timegm((*date_time, 0, 0, 0)))


def assert_matches_zipfile(data: bytes, members: list[Member]) -> None:
    """Every member equals zipfile's reading; data limits follow archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        directory_start = archive.start_dir
    assert [m.name for m in members] == [i.filename for i in infos]  # directory order
    for member, info in zip(members, infos, strict=True):
        assert member.is_dir == info.is_dir()
        assert member.header_offset == info.header_offset
        assert member.size == info.file_size
        assert member.compressed_size == info.compress_size
        assert member.crc32 == info.CRC
        assert member.method == info.compress_type
        assert member.flags == info.flag_bits
        assert member.mtime == dos_utc(info.date_time)
    offsets = sorted(i.header_offset for i in infos) + [directory_start]
    limits = dict(zip(offsets, offsets[1:], strict=False))
    for member in members:
        assert member.data_limit == limits[member.header_offset], member.name


# -- archives zipfile makes ------------------------------------------------------------------------


@pytest.mark.parametrize("methods", [(zipfile.ZIP_STORED,), (zipfile.ZIP_DEFLATED,),
                                     (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                      zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)],
                         ids=["stored", "deflated", "mixed"])
def test_members_equal_zipfiles_infolist(methods: tuple[int, ...]) -> None:
    data = make_zip(MEMBERS, methods=methods, directories=DIRECTORIES)
    directory, members, skipped = index(data)
    assert skipped == []
    assert (directory.entries, directory.shift, directory.zip64) == (8, 0, False)
    assert_matches_zipfile(data, members)
    by_name = {m.name: m for m in members}
    assert by_name["x/y/z/"].is_dir
    assert by_name["x/y/z/"].mtime == dos_utc((2020, 1, 2, 3, 4, 6))
    assert by_name["top.txt"].mtime == 1620284890.0  # 2021-05-06 07:08:10, read as UTC
    assert by_name["caf\u00e9/\u00fcnicode.txt"].flags & zipformat.FLAG_UTF8
    last = max(members, key=lambda m: m.header_offset)
    assert last.data_limit == directory.start


_SEGMENT = st.text(alphabet="ab\u00e9z09_-.", min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(
    files=st.dictionaries(st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join),
                          st.binary(max_size=3000), max_size=8),
    dirs=st.sets(st.lists(_SEGMENT, min_size=1, max_size=3).map(lambda p: "/".join(p) + "/"),
                 max_size=3),
    methods=st.lists(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]), min_size=1,
                     max_size=3),
    stub=st.binary(max_size=300).filter(lambda b: b"PK" not in b),  # no fake signatures
)
def test_any_archive_parses_like_zipfile(
    files: dict[str, bytes], dirs: set[str], methods: list[int], stub: bytes
) -> None:
    data = stub + make_zip(files, methods=methods, directories=sorted(dirs))
    directory, members, skipped = index(data)
    assert skipped == []
    assert directory.shift == len(stub)
    assert_matches_zipfile(data, members)


def test_prepended_stub_shifts_every_offset() -> None:
    plain = make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED,), directories=DIRECTORIES)
    stub = b"#!/bin/sh\necho self-extracting\nexit 0\n" + random.Random(5).randbytes(4000)
    data = stub + plain
    directory, members, skipped = index(data)
    _, plain_members, _ = index(plain)
    assert skipped == []
    assert directory.shift == len(stub)
    assert directory.start == len(stub) + index(plain)[0].start
    assert_matches_zipfile(data, members)  # zipfile shifts the same way
    for member, original in zip(members, plain_members, strict=True):
        assert member.header_offset == original.header_offset + len(stub)
        assert member.data_limit == original.data_limit + len(stub)
        # The shifted offset really is the local header.
        assert data[member.header_offset: member.header_offset + 4] == b"PK\x03\x04"


def test_force_zip64_local_headers() -> None:
    data = make_zip(MEMBERS, methods=(zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
                    force_zip64=True)
    _, members, skipped = index(data)
    assert skipped == []
    assert_matches_zipfile(data, members)


def test_zip64_end_record_of_a_small_archive() -> None:
    plain = make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED,), directories=DIRECTORIES)
    data = to_zip64(plain)
    directory, members, skipped = index(data)
    assert directory.zip64
    assert skipped == []
    assert members == index(plain)[1]
    assert_matches_zipfile(data, members)


def test_zip64_end_record_with_extensible_data_is_found_where_its_locator_says() -> None:
    plain = make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED,), directories=DIRECTORIES)
    data = to_zip64(plain)
    record_at = len(data) - 22 - 20 - 56
    record = bytearray(data[record_at: record_at + 56])
    extensible = b"\x01\x00\x04\x00data" * 3  # APPNOTE 4.3.14.2: after the fixed fields
    struct.pack_into("<Q", record, 4, 44 + len(extensible))  # the record's size after 12 bytes
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
    data = data[:record_at] + bytes(record) + extensible + locator + data[-22:]
    directory, members, skipped = index(data)
    assert directory.zip64
    assert skipped == []
    assert members == index(plain)[1]


@pytest.fixture(scope="module")
def many() -> bytes:
    """More than 65,535 entries: zipfile writes a ZIP64 end record."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(65_540):
            archive.writestr(zipfile.ZipInfo(f"d{i % 7}/f{i}", (2021, 5, 6, 7, 8, 10)), b"%d" % i)
    return buffer.getvalue()


def test_more_than_65535_entries(many: bytes) -> None:
    directory, members, skipped = index(many)
    assert directory.zip64
    assert directory.entries == 65_540
    assert skipped == []
    assert len(members) == 65_540
    assert members[65_539].name == "d5/f65539"
    assert_matches_zipfile(many, members)


def test_more_than_65535_entries_behind_a_stub(many: bytes) -> None:
    stub = b"MZ" + bytes(10_000)
    directory, members, _ = index(stub + many)
    assert (directory.zip64, directory.shift) == (True, len(stub))
    assert members[-1].header_offset == index(many)[1][-1].header_offset + len(stub)


def test_zip64_record_before_the_tail_is_asked_for(many: bytes) -> None:
    tail = many[-42:]  # the end record and the locator, not the ZIP64 record
    found = locate(tail, len(many), WHAT)
    assert found == Zip64Needed(len(many) - 42 - 56, 56)
    directory = locate_zip64(many[found.offset: found.offset + found.length], found.offset, WHAT)
    assert directory == index(many)[0]


def test_entry_count_wrapped_to_16_bits_is_accepted(many: bytes) -> None:
    """Writers without ZIP64 let the count wrap: 65,540 entries recorded as 4."""
    directory = index(many)[0]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 4, 4, directory.size, directory.start, 0)
    data = many[: directory.start + directory.size] + end
    found, members, skipped = index(data)
    assert (found.zip64, found.entries, len(members), skipped) == (False, 4, 65_540, [])


# -- a synthetic archive larger than 4 GiB ---------------------------------------------------------

_U32 = 0xFFFFFFFF


def central(
    name: bytes, *, size: int, csize: int, offset: int, method: int = 8, crc: int = 0,
    flags: int = 0, extra: bytes = b"", dos: tuple[int, int] = (0x5284, 0x60A5),
    zip64_cut: int = 0,
) -> bytes:
    """One central directory entry; values that need it go to a ZIP64 extra field."""
    zip64 = b""
    placed = []
    for value in (size, csize, offset):
        if value >= _U32:
            zip64 += struct.pack("<Q", value)
            placed.append(_U32)
        else:
            placed.append(value)
    if zip64:
        zip64 = zip64[: len(zip64) - zip64_cut]
        extra = struct.pack("<2H", 1, len(zip64)) + zip64 + extra
    dos_date, dos_time = dos
    return struct.pack(
        "<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, flags, method, dos_time, dos_date, crc,
        placed[1], placed[0], len(name), len(extra), 0, 0, 0, 0, placed[2],
    ) + name + extra


def big_tail(entries: list[bytes], archive_size: int) -> bytes:
    """Central directory, ZIP64 end record, locator and end record ending at ``archive_size``."""
    directory = b"".join(entries)
    end_size = 56 + 20 + 22
    cd_offset = archive_size - end_size - len(directory)
    record_offset = cd_offset + len(directory)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(entries),
                         len(entries), len(directory), cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, record_offset, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, _U32, _U32, 0)
    return directory + record + locator + end


BIG = 10 * GIB
B_OFFSET = 5 * GIB + 100
C_OFFSET = 9 * GIB + 12345


def big_entries() -> list[bytes]:
    return [
        central(b"huge.bin", size=5 * GIB, csize=5 * GIB, offset=0, method=0, crc=0x1234),
        central(b"b/big.gz", size=7 * GIB, csize=4 * GIB + 7, offset=B_OFFSET, crc=0x5678),
        central(b"c.txt", size=100, csize=60, offset=C_OFFSET, crc=0x9ABC),  # offset only
        central(b"small-first.txt", size=3, csize=3, offset=5 * GIB + 30 + 8, method=0),
    ]


def test_synthetic_archive_above_4_gib() -> None:
    tail = big_tail(big_entries(), BIG)
    directory, members, skipped = index(tail, BIG)
    assert directory.zip64
    assert directory.shift == 0
    assert directory.start == BIG - len(tail)
    assert skipped == []
    by_name = {m.name: m for m in members}
    huge, big, small, c = (by_name[n] for n in ("huge.bin", "b/big.gz", "small-first.txt",
                                               "c.txt"))
    assert (huge.header_offset, huge.size, huge.compressed_size, huge.method, huge.crc32) == \
        (0, 5 * GIB, 5 * GIB, 0, 0x1234)
    assert (big.header_offset, big.size, big.compressed_size, big.crc32) == \
        (B_OFFSET, 7 * GIB, 4 * GIB + 7, 0x5678)
    assert (c.header_offset, c.size, c.compressed_size) == (C_OFFSET, 100, 60)
    assert small.header_offset == 5 * GIB + 38
    # Archive order: huge, small-first, big, c, then the directory.
    assert huge.data_limit == small.header_offset
    assert small.data_limit == B_OFFSET
    assert big.data_limit == C_OFFSET
    assert c.data_limit == directory.start
    assert huge.mtime == dos_utc((2021, 4, 4, 12, 5, 10))


def test_synthetic_archive_with_the_zip64_record_out_of_reach() -> None:
    tail = big_tail(big_entries(), BIG)
    found = locate(tail[-42:], BIG, WHAT)
    assert found == Zip64Needed(BIG - 98)
    record = tail[-98:-42]
    directory = locate_zip64(record, found.offset, WHAT)
    assert directory == index(tail, BIG)[0]
    with pytest.raises(ArchiveError, match="no ZIP64 end record where its locator points"):
        locate_zip64(b"PK\x05\x06" + record[4:], found.offset, WHAT)


def test_synthetic_short_zip64_extra_and_data_past_the_member_area() -> None:
    entries = [
        central(b"short.bin", size=6 * GIB, csize=6 * GIB, offset=0, method=0, zip64_cut=4),
        central(b"past.bin", size=5 * GIB, csize=5 * GIB, offset=6 * GIB, method=0),
        central(b"fine.txt", size=1, csize=1, offset=11 * GIB // 2, method=0),
    ]
    tail = big_tail(entries, BIG)
    _, members, skipped = index(tail, BIG)
    assert [m.name for m in members] == ["fine.txt"]
    assert skipped == [
        Skipped("short.bin", "its ZIP64 extra field is too short"),
        Skipped("past.bin", "its data runs past the archive's member area (a corrupt or "
                            "truncated archive)"),
    ]


# -- archive-level damage: the whole index fails ---------------------------------------------------

PLAIN = make_zip({"a.txt": b"a" * 500, "b.txt": b"b" * 500, "c.txt": b"c" * 500})


def _central_field(data: bytes, name: str, offset: int, value: int) -> bytes:
    """``data`` with the 16-bit field at ``offset`` of ``name``'s central directory entry set."""
    out = bytearray(data)
    struct.pack_into("<H", out, central_entries(data)[name] + offset, value)
    return bytes(out)


_C_NAME_LENGTH, _C_DISK = 28, 34  # APPNOTE 4.3.12: file name length, disk number start


def _bad_entry_signature(data: bytes) -> bytes:
    out = bytearray(data)
    at = central_entries(data)["b.txt"]
    out[at: at + 4] = b"PK\x09\x09"
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not a zip at all\n" * 400, r"is not a zip archive: no end of central "
                                               r"directory record in its last 10000 bytes"),
        (PLAIN[:-30], "is not a zip archive"),  # truncated: the end record is cut
        (PLAIN[:200] + PLAIN[-22:], "is corrupt: its central directory .* does not fit"),
        (patch_end(PLAIN, entries=4, disk_entries=4),
         "its central directory holds 3 entries, its end record says 4"),
        (patch_end(PLAIN, entries=2, disk_entries=2),
         "its central directory holds 3 entries, its end record says 2"),
        (patch_end(PLAIN, disk=1), "multi-part"),
        (patch_end(PLAIN, cd_disk=2), "multi-part"),
        (patch_end(PLAIN, cd_offset=_U32), "ZIP64 values without a ZIP64 end record"),
        (_bad_entry_signature(PLAIN), "bad central directory entry at offset"),
        (_central_field(PLAIN, "c.txt", _C_NAME_LENGTH, 0xFFFF),
         "is corrupt: a central directory entry runs past its end"),
        (b"", "is not a zip archive"),
    ],
    ids=["not-a-zip", "truncated-end", "directory-cut", "count-high", "count-low", "disk",
         "cd-disk", "zip64-placeholder", "bad-entry", "entry-past-the-end", "empty"],
)
def test_archive_damage_fails_the_index(data: bytes, message: str) -> None:
    with pytest.raises(ArchiveError, match=message) as raised:
        index(data)
    assert WHAT in str(raised.value)
    assert "\n" not in str(raised.value)


def test_multi_disk_zip64_record() -> None:
    data = bytearray(to_zip64(PLAIN))
    record_at = len(data) - 22 - 20 - 56
    struct.pack_into("<L", data, record_at + 16, 3)  # number of this disk
    with pytest.raises(ArchiveError, match="multi-part"):
        index(bytes(data))


def test_zip64_record_before_the_archive_start() -> None:
    tail = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 1) + PLAIN[-22:]
    with pytest.raises(ArchiveError, match="ZIP64 end record would start before it"):
        locate(tail, len(tail), WHAT)


# -- entry-level damage: that entry is skipped -----------------------------------------------------


def test_a_member_on_another_disk_of_a_multi_part_archive_is_skipped() -> None:
    _, members, skipped = index(_central_field(PLAIN, "b.txt", _C_DISK, 1))
    assert [m.name for m in members] == ["a.txt", "c.txt"]
    assert skipped == [Skipped("b.txt", "it starts on another disk of a multi-part archive")]


def test_overlapping_member_is_skipped_keeping_the_first_in_archive_order() -> None:
    members = {"a.bin": b"A" * 100, "b.bin": b"B" * 100, "c.bin": sample_bytes(3, 20_000)}
    data = make_zip(members)
    # "a.bin" (first in the directory) now claims bytes inside "b.bin" (first in the archive).
    data = patch(data, "a.bin", offset=header_offset(data, "b.bin") + 10)
    _, kept, skipped = index(data)
    assert [m.name for m in kept] == ["b.bin", "c.bin"]
    assert skipped == [Skipped("a.bin", "its data overlaps member 'b.bin' (a zip bomb or a "
                                        "corrupt archive)")]
    b, c = kept
    assert b.data_limit == c.header_offset


def test_many_entries_sharing_one_members_data_keep_one() -> None:
    """The "overlapping files" zip bomb: every entry points at the same bytes."""
    data = make_zip({f"m{i}": b"x" * 50 for i in range(5)})
    first = header_offset(data, "m0")
    for i in range(1, 5):
        data = patch(data, f"m{i}", offset=first)
    _, kept, skipped = index(data)
    assert [m.name for m in kept] == ["m0"]
    assert [s.name for s in skipped] == ["m1", "m2", "m3", "m4"]
    assert all("overlaps member 'm0'" in s.reason for s in skipped)


def test_member_whose_data_runs_past_the_member_area_is_skipped() -> None:
    data = patch(PLAIN, "b.txt", csize=100_000, size=100_000)
    _, kept, skipped = index(data)
    assert [m.name for m in kept] == ["a.txt", "c.txt"]
    assert skipped == [Skipped("b.txt", "its data runs past the archive's member area (a "
                                        "corrupt or truncated archive)")]


def test_the_layout_bounds_are_exact_to_the_byte() -> None:
    """A member whose data overlaps the previous one's by a single byte is skipped, and so is
    one whose data runs a single byte into the central directory; ending exactly there is fine
    (every member of ``PLAIN`` does)."""
    _, kept, _ = index(PLAIN)
    assert [m.name for m in kept] == ["a.txt", "b.txt", "c.txt"]
    a_end = header_offset(PLAIN, "a.txt") + 30 + len("a.txt") + 500
    assert a_end == header_offset(PLAIN, "b.txt")
    _, kept, skipped = index(patch(PLAIN, "b.txt", offset=a_end - 1))
    assert [m.name for m in kept] == ["a.txt", "c.txt"]
    assert [s.name for s in skipped] == ["b.txt"]
    assert "overlaps member 'a.txt'" in skipped[0].reason
    _, kept, skipped = index(patch(PLAIN, "c.txt", csize=501))
    assert [m.name for m in kept] == ["a.txt", "b.txt"]
    assert [s.name for s in skipped] == ["c.txt"]
    assert "runs past" in skipped[0].reason


def test_zip64_extra_field_values_come_in_the_specs_order() -> None:
    """APPNOTE 4.5.3: the ZIP64 extra field holds, in this order, the uncompressed size, the
    compressed size, the header offset and the disk, each only if its field is a placeholder.
    Swapped, a large compressed member would be read with the wrong length."""
    field = struct.pack("<QQQ", 5 * GIB, 3 * GIB, 7 * GIB)
    u32, u16 = 0xFFFFFFFF, 0xFFFF
    assert zipformat._apply_zip64(field, u32, u32, u32, 0) == (5 * GIB, 3 * GIB, 7 * GIB, 0)
    assert zipformat._apply_zip64(field, 10, u32, u32, 0) == (10, 5 * GIB, 3 * GIB, 0)
    assert zipformat._apply_zip64(field + struct.pack("<I", 2), u32, u32, u32, u16) == (
        5 * GIB, 3 * GIB, 7 * GIB, 2)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_compressed_size_no_data_of_its_size_could_take_is_skipped_not_its_neighbours(
    method: int,
) -> None:
    """A 1-byte member claiming the compressed bytes of the members after it would hide them
    (they would overlap it), and be fetched whole to be read."""
    data = make_zip({"a.txt": b"a", "b.txt": b"b" * 5000, "c.txt": b"c" * 5000},
                    methods=(method,))
    data = patch(data, "a.txt", csize=2000)
    _, kept, skipped = index(data)
    assert [m.name for m in kept] == ["b.txt", "c.txt"]
    assert skipped == [Skipped("a.txt", "its compressed size (2000 bytes) is far beyond what its "
                                        "1 bytes can take (a zip bomb or a corrupt archive)")]


def test_incompressible_members_are_within_the_compressed_size_bound() -> None:
    for size in (0, 1, 1000, 65_535, 65_536, 3 * 1024 * 1024):
        data = random.Random(size).randbytes(size)
        deflated = zlib.compress(data, 9)
        assert len(deflated) <= zipformat.max_compressed_size(size)
        fixed_huffman = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_FIXED)
        worst = fixed_huffman.compress(data) + fixed_huffman.flush()
        assert len(worst) <= zipformat.max_compressed_size(size)


def test_non_utf8_name_with_the_utf8_flag_is_skipped() -> None:
    data = make_zip({"bad-\u00e9.txt": b"bad", "ok.txt": b"ok"})
    data = replace_name(data, "bad-\u00e9.txt", b"bad-\xff\xfe.txt")
    _, kept, skipped = index(data)
    assert [m.name for m in kept] == ["ok.txt"]
    assert skipped == [Skipped("bad-\\xff\\xfe.txt", "its name is not valid UTF-8")]


def test_name_without_the_utf8_flag_is_code_page_437() -> None:
    data = make_zip({"bad-\u00e9.txt": b"x"})
    data = replace_name(data, "bad-\u00e9.txt", b"bad-\x82\x81.txt", flags=0)
    _, kept, _ = index(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert [m.name for m in kept] == archive.namelist() == ["bad-\u00e9\u00fc.txt"]


def test_a_unix_writers_utf8_name_without_the_flag_is_utf8() -> None:
    """Info-ZIP ``zip`` (Linux, macOS) and macOS Finder write the file system's UTF-8 bytes
    without the flag: read so, as unzip extracts them (zipfile's CP437 made "caf\u251c\u2310").
    Bytes that are not UTF-8 stay CP437; a Windows writer's UTF-8-looking bytes too (its code
    page is never UTF-8 without the flag)."""
    data = raw_zip([
        RawMember("caf\u00e9.txt".encode()),
        RawMember(unicodedata.normalize("NFD", "cr\u00e8me").encode(), host=19),  # OS X
        RawMember(b"latin-\xe9.txt"),
        RawMember("fat-\u00e9.txt".encode(), host=HOST_FAT),
    ])
    _, kept, skipped = index(data)
    assert skipped == []
    assert [m.name for m in kept] == [
        "caf\u00e9.txt", unicodedata.normalize("NFD", "cr\u00e8me"), "latin-\u0398.txt",
        "fat-\u251c\u2310.txt"]


@pytest.mark.parametrize("host", [HOST_FAT, 6, 10, HOST_NTFS, 14])
def test_a_windows_writers_backslashes_are_path_separators(host: int) -> None:
    """Old Windows tools wrote ``dir\\file``; unzip extracts it into ``dir/``. On a Unix
    writer's name a backslash is no separator: ``member_path_problem`` skips it."""
    data = raw_zip([
        RawMember(b"images\\", host=host, external=0x10),
        RawMember(b"images\\2023\\caf\x82.txt", b"x", host=host),
        RawMember(b"..\\escape.txt", b"x", host=host),
        RawMember(b"unix\\name.txt", b"x"),
    ])
    _, kept, _ = index(data)
    assert [(m.name, m.is_dir) for m in kept] == [
        ("images/", True), ("images/2023/caf\u00e9.txt", False), ("../escape.txt", False),
        ("unix\\name.txt", False)]  # the last two then fail the path rules


def test_a_unix_writers_mode_is_kept_and_no_other_writers_attributes() -> None:
    """Info-ZIP, Finder and zipfile (on Unix) write st_mode in the external attributes' high 16
    bits; a FAT or NTFS writer's hold MS-DOS attributes (0x20: archive), whatever lies above."""
    data = raw_zip([
        RawMember(b"run.sh", external=0o100755 << 16),
        RawMember(b"link", b"run.sh", external=0o120777 << 16),
        RawMember(b"osx.txt", host=19, external=(0o100600 << 16) | 0x20),
        RawMember(b"fat.txt", host=HOST_FAT, external=(0o100755 << 16) | 0x20),
        RawMember(b"ntfs.txt", host=HOST_NTFS, external=0x20),
    ])
    assert [m.mode for m in index(data)[1]] == [0o100755, 0o120777, 0o100600, 0, 0]


def _unicode_path(raw: bytes, name: str, crc: int | None = None) -> bytes:
    encoded = name.encode("utf-8")
    crc = zlib.crc32(raw) if crc is None else crc
    return struct.pack("<2HBL", 0x7075, 5 + len(encoded), 1, crc) + encoded


def _zip_of_infos(*infos: tuple[zipfile.ZipInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, data in infos:
            archive.writestr(info, data)
    return buffer.getvalue()


def test_info_zip_unicode_path_extra_field() -> None:
    good = zipfile.ZipInfo("caf_.txt", (2021, 5, 6, 7, 8, 10))
    good.extra = _unicode_path(b"caf_.txt", "caf\u00e9.txt")
    stale = zipfile.ZipInfo("old_.txt", (2021, 5, 6, 7, 8, 10))
    stale.extra = _unicode_path(b"old_.txt", "renamed.txt", crc=zlib.crc32(b"other"))
    _, kept, skipped = index(_zip_of_infos((good, b"1"), (stale, b"2")))
    assert skipped == []
    # The field is used only when its CRC matches the name it stands for.
    assert [m.name for m in kept] == ["caf\u00e9.txt", "old_.txt"]


def test_extended_timestamp_wins_over_dos_time() -> None:
    stamped = zipfile.ZipInfo("stamped.txt", (2021, 5, 6, 7, 8, 10))
    stamped.extra = struct.pack("<2HBl", 0x5455, 5, 1, 1_234_567_891)  # odd: DOS cannot say it
    no_mtime = zipfile.ZipInfo("atime-only.txt", (2021, 5, 6, 7, 8, 10))
    no_mtime.extra = struct.pack("<2HBl", 0x5455, 5, 2, 1_234_567_891)  # flag: atime, not mtime
    old = zipfile.ZipInfo("before-1970.txt", (2021, 5, 6, 7, 8, 10))
    old.extra = struct.pack("<2HBl", 0x5455, 5, 1, -86_400)
    # DOS times are decoded once per archive and shared: never an extended timestamp's.
    plain, later = (zipfile.ZipInfo(name, (2021, 5, 6, 7, 8, 10)) for name in ("p", "q"))
    _, kept, _ = index(_zip_of_infos((plain, b"p"), (stamped, b"s"), (no_mtime, b"n"),
                                     (old, b"o"), (later, b"q")))
    assert [m.mtime for m in kept] == [1620284890.0, 1_234_567_891.0, 1620284890.0, -86_400.0,
                                       1620284890.0]


def test_ntfs_times_win_over_dos_time() -> None:
    """7-Zip and WinRAR write the exact UTC time in the NTFS extra field (0x000A), the DOS time
    in the writer's zone. The extended timestamp, where both are, still wins; a field without
    times (only another tag), or with a zero time, leaves the DOS time."""
    def ntfs(*attributes: tuple[int, bytes]) -> bytes:
        body = bytes(4) + b"".join(struct.pack("<2H", tag, len(value)) + value
                                   for tag, value in attributes)
        return struct.pack("<2H", 0x000A, len(body)) + body

    exact = 1_688_800_213.5  # 2023-07-08 07:10:13.5 UTC
    ticks = struct.pack("<Q", round((exact + 11_644_473_600) * 10_000_000)) * 3
    stamped = struct.pack("<2HBl", 0x5455, 5, 1, 1_234_567_891)
    data = raw_zip([
        RawMember(b"ntfs.txt", host=HOST_NTFS, extra=ntfs((1, ticks))),
        RawMember(b"after-another-tag.txt", host=HOST_NTFS, extra=ntfs((2, b"xy"), (1, ticks))),
        RawMember(b"both.txt", extra=ntfs((1, ticks)) + stamped),
        RawMember(b"other-tag.txt", host=HOST_NTFS, extra=ntfs((2, bytes(24)))),
        RawMember(b"zero.txt", host=HOST_NTFS, extra=ntfs((1, bytes(24)))),
        RawMember(b"short.txt", host=HOST_NTFS, extra=ntfs((1, bytes(8)))),
    ])
    dos = dos_utc((2023, 7, 8, 9, 10, 12))
    assert [m.mtime for m in index(data)[1]] == [exact, exact, 1_234_567_891.0, dos, dos, dos]


def test_invalid_dos_time_is_the_epoch() -> None:
    entry = central(b"x.txt", size=1, csize=1, offset=0, method=0, dos=(0, 0))  # month 0
    tail = big_tail([entry], 1000)
    assert index(tail, 1000)[1][0].mtime == 0.0


# -- looks_like_zip and the end record search ------------------------------------------------------


def test_looks_like_zip() -> None:
    assert looks_like_zip(PLAIN, len(PLAIN))
    assert looks_like_zip(PLAIN[-100:], len(PLAIN))  # a tail is enough
    assert not looks_like_zip(random.Random(1).randbytes(100_000), 100_000)
    assert not looks_like_zip(b"", 0)
    assert not looks_like_zip(b"PK\x05\x06", 4)
    # An end record whose comment length does not end the file is not one.
    fake = random.Random(2).randbytes(5000) + b"PK\x05\x06" + bytes(18) + b"trailing"
    assert not looks_like_zip(fake, len(fake))
    assert not looks_like_zip(PLAIN + b"appended", len(PLAIN) + 8)


def test_end_record_with_a_comment_holding_a_fake_end_record() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", b"a" * 100)
        archive.comment = b"note PK\x05\x06" + bytes(16) + b"\x07\x00 more comment"
    data = buffer.getvalue()
    assert looks_like_zip(data, len(data))
    directory, members, _ = index(data)
    # (zipfile itself takes the fake for the end record and sees no member at all.)
    assert [(m.name, m.header_offset, m.size, m.data_limit) for m in members] == \
        [("a.txt", 0, 100, directory.start)]
    assert directory.start == 30 + 5 + 100


def test_longest_comment() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", b"a")
        archive.comment = b"c" * 0xFFFF
    data = buffer.getvalue()
    tail = data[-zipformat.END_SEARCH:]
    assert looks_like_zip(tail, len(data))
    assert locate(tail, len(data), WHAT) == index(data)[0]


# -- member_path_problem ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("/etc/passwd", "its name is an absolute path"),
        ("C:/windows/system32", "its name starts with a drive letter"),
        ("c:relative.txt", "its name starts with a drive letter"),
        ("z:", "its name starts with a drive letter"),
        ("back\\slash.txt", "its name holds a backslash (a Windows path separator)"),
        ("dir\\", "its name holds a backslash (a Windows path separator)"),
        ("a/b/c.txt", None),
        ("1:/not-a-drive", None),
        ("dir/c:/later", None),
        ("", None),
    ],
)
def test_member_path_problem(name: str, problem: str | None) -> None:
    assert member_path_problem(name) == problem
