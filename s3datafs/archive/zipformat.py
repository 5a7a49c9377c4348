"""The zip format, as far as mounting needs it: find and parse the central directory. Pure, no I/O.

Reading an archive's index costs ranged GETs of its end only (``locate`` finds the end of central
directory record in a tail, ``parse_central_directory`` decodes the directory), so the member
data is never touched at mount time. Layouts follow PKWARE's APPNOTE (4.3.x); ZIP64 is read from
its end-of-central-directory record and from each entry's extra field 0x0001.

Invariants and rules:
- Nothing here trusts the archive. Every offset and length is checked against the archive's size
  and the structure it must lie in; a violation is an ``ArchiveError`` naming what is wrong.
  Archive-level damage (no end record, a directory out of bounds, a wrong entry count) fails the
  whole index; damage confined to one entry makes that entry a ``Skipped`` with a reason.
- Offsets are archive offsets: when data precedes the archive (a self-extracting stub, or bytes
  prepended), the directory is found where it really is and every offset is shifted the same
  way, as zipfile and Info-ZIP do.
- ``Member.data_limit`` is where the next member's local header (or the central directory)
  starts, so a member whose data would run into another one is refused. Overlapping members
  (the "overlapping files" zip bomb) are skipped here, keeping the first in archive order, and
  so is an entry whose compressed size no data of its size could take
  (``max_compressed_size``).
- Names: UTF-8 when flag bit 11 says so (or the Info-ZIP Unicode path extra field 0x7075 with a
  matching CRC gives one); else code page 437, as zipfile decodes them, except a name written on
  Unix (``_UNIX_HOSTS``) that is valid UTF-8: Info-ZIP ``zip`` and macOS Finder write the file
  system's UTF-8 names without the flag, and ``unzip`` extracts them as they are (zipfile's CP437
  turns ``café`` into ``caf├⌐``). In a name written on a Windows file system
  (``_WINDOWS_HOSTS``) a backslash can only be a path separator (old Windows tools, PowerShell's
  Compress-Archive among them, wrote them so): it is read as ``/``, as unzip does. Path safety
  is the catalog's job (``keypath``); ``member_path_problem`` adds the archive-only rules (drive
  letters, a backslash in a name from anywhere else).
- Modes: a Unix writer's external attributes hold the file's st_mode (``Member.mode``): its
  permission bits (a script's 0755), and its type (Info-ZIP ``zip -y`` stores a symbolic link
  as a member of type S_IFLNK whose data is the link's target). Other writers' (MS-DOS
  attributes) say neither: 0.
- Times: the extended timestamp extra field (0x5455, UTC seconds, as Info-ZIP writes it) when
  present, else the NTFS extra field's (0x000A, UTC in 100 ns steps, as 7-Zip and WinRAR write
  it; unzip ignores it and shows the DOS time, which is the writer's local time), else the DOS
  date and time read as UTC (it carries no zone; UTC makes every machine show the same mtime);
  ``NO_TIME`` when none is valid (the catalog then shows the archive's LastModified).
"""

from __future__ import annotations

import calendar
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ArchiveError

# Compression methods (APPNOTE 4.4.5).
STORED, DEFLATED, BZIP2, LZMA, ZSTD = 0, 8, 12, 14, 93
NO_TIME = 0.0  # ``Member.mtime`` of an entry whose DOS date and time are not valid
METHOD_NAMES = {STORED: "stored", DEFLATED: "deflate", 9: "deflate64", BZIP2: "bzip2",
                LZMA: "lzma", ZSTD: "zstd", 95: "xz", 98: "ppmd", 99: "AES-encrypted"}
FLAG_ENCRYPTED = 0x1
FLAG_LZMA_END_MARKER = 0x2  # an LZMA member's stream ends with a marker (APPNOTE 4.4.4)
FLAG_UTF8 = 0x800
# Hosts ("version made by", high byte: APPNOTE 4.4.2) whose names are the file system's bytes
# (UTF-8 today), and whose external attributes hold a Unix mode (st_mode) in their high 16 bits:
# Unix and OS X.
_UNIX_HOSTS = frozenset({3, 19})
# Hosts whose file systems separate paths with a backslash: MS-DOS FAT, OS/2 HPFS, NTFS (10 in
# APPNOTE, 11 as Info-ZIP and 7-Zip number it), VFAT.
_WINDOWS_HOSTS = frozenset({0, 6, 10, 11, 14})

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator, 20 bytes
_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, 56 bytes
_EOCD64_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header, 46 bytes
_EXTRA_HEADER = struct.Struct("<2H")  # an extra field's id and length
_NO_EXTRAS: dict[int, bytes] = {}  # never written to: the extras of an entry that has none
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s2B4HL2L2H")  # local file header, 30 bytes
_LOCAL_SIG = b"PK\x03\x04"
LOCAL_HEADER_SIZE = _LOCAL.size
MAX_COMMENT = 0xFFFF
# The longest tail that can hold the end records: comment, end record, zip64 locator.
END_SEARCH = MAX_COMMENT + _EOCD.size + _LOCATOR.size
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_NTFS_EPOCH = 116_444_736_000_000_000  # 1970-01-01 in NTFS time: 100 ns steps since 1601
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True, slots=True)
class Directory:
    """Where the central directory is, in archive offsets, and how many entries it declares."""

    start: int
    size: int
    entries: int
    shift: int  # add to every offset the archive records (bytes prepended to the archive)
    zip64: bool


class Member(NamedTuple):
    """One central directory entry, checked; ``name`` as decoded (``/``-separated).

    A named tuple, not a frozen dataclass: an archive of a million members makes a million of
    them at mount, and a frozen dataclass takes four times as long to make (3.2 against 0.8 us).
    """

    name: str
    is_dir: bool
    header_offset: int
    data_limit: int
    method: int
    flags: int
    compressed_size: int
    size: int
    crc32: int
    mtime: float
    mode: int = 0  # the Unix mode (type and permissions) a Unix writer records; 0: none


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry that cannot be shown, and why (completes "skipping member NAME: ...")."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Zip64Needed:
    """``locate`` found a ZIP64 locator: the ZIP64 record at ``offset`` must be read too."""

    offset: int
    length: int = _EOCD64.size


def looks_like_zip(tail: bytes, archive_size: int) -> bool:
    """True if ``tail`` (the archive's last bytes) ends with a plausible end record."""
    try:
        return _find_eocd(tail, archive_size) is not None
    except ArchiveError:
        return False


def locate(tail: bytes, archive_size: int, what: str) -> Directory | Zip64Needed:
    """Find the central directory from the archive's last ``len(tail)`` bytes.

    Returns a ``Zip64Needed`` when the ZIP64 record lies before ``tail``: read it and call
    ``locate_zip64``. ``what`` names the archive in errors.
    """
    found = _find_eocd(tail, archive_size)
    if found is None:
        raise ArchiveError(
            f"{what} is not a zip archive: no end of central directory record in its last "
            f"{min(len(tail), END_SEARCH)} bytes (a truncated archive, or not a zip at all)"
        )
    position, fields = found
    _sig, disk, cd_disk, _here, entries, cd_size, cd_offset, _comment = fields
    if disk or cd_disk:
        raise ArchiveError(f"{what} is a multi-part (spanned) zip archive, which is not supported")
    tail_start = archive_size - len(tail)
    locator_at = position - _LOCATOR.size
    if locator_at >= tail_start and tail[locator_at - tail_start:].startswith(_LOCATOR_SIG):
        # The ZIP64 record sits right before its locator (as zipfile and Info-ZIP expect): the
        # offset the locator records would be wrong by the shift when data precedes the archive.
        record_at = locator_at - _EOCD64.size
        if record_at < 0:
            raise ArchiveError(f"{what} is corrupt: its ZIP64 end record would start before it")
        if record_at >= tail_start:
            record = tail[record_at - tail_start: locator_at - tail_start]
            if not record.startswith(_EOCD64_SIG):
                # A record with extensible data (APPNOTE 4.3.14.2) is longer: then the offset
                # the locator records is where it starts (right when nothing precedes the zip).
                recorded = _LOCATOR.unpack_from(tail, locator_at - tail_start)[2]
                if tail_start <= recorded < record_at:
                    record_at = recorded
                    record = tail[record_at - tail_start: locator_at - tail_start]
            return locate_zip64(record, record_at, what)
        return Zip64Needed(record_at)
    if _U32 in (cd_size, cd_offset):
        raise ArchiveError(f"{what} is corrupt: ZIP64 values without a ZIP64 end record")
    return _directory(position, cd_size, cd_offset, entries, False, what)


def locate_zip64(record: bytes, record_offset: int, what: str) -> Directory:
    """The central directory from the ZIP64 end record found at ``record_offset``."""
    if len(record) < _EOCD64.size or not record.startswith(_EOCD64_SIG):
        raise ArchiveError(f"{what} is corrupt: no ZIP64 end record where its locator points")
    fields = _EOCD64.unpack_from(record)
    _sig, _size, _made, _needed, disk, cd_disk, _here, entries, cd_size, cd_offset = fields
    if disk or cd_disk:
        raise ArchiveError(f"{what} is a multi-part (spanned) zip archive, which is not supported")
    # The directory ends where the ZIP64 record starts.
    return _directory(record_offset, cd_size, cd_offset, entries, True, what)


def _directory(
    end: int, cd_size: int, cd_offset: int, entries: int, zip64: bool, what: str
) -> Directory:
    start = end - cd_size
    if start < 0 or start < cd_offset:
        raise ArchiveError(
            f"{what} is corrupt: its central directory ({cd_size} bytes at offset {cd_offset}) "
            f"does not fit before its end record (a truncated archive?)"
        )
    return Directory(start, cd_size, entries, start - cd_offset, zip64)


def _find_eocd(tail: bytes, archive_size: int) -> tuple[int, tuple] | None:
    """The last end record in ``tail`` whose comment ends exactly at the end of the archive."""
    tail_start = archive_size - len(tail)
    search_from = max(0, len(tail) - END_SEARCH)
    at = len(tail) - _EOCD.size
    while at >= search_from:
        at = tail.rfind(_EOCD_SIG, search_from, at + len(_EOCD_SIG))
        if at < 0:
            return None
        fields = _EOCD.unpack_from(tail, at)
        if at + _EOCD.size + fields[7] == len(tail):
            return tail_start + at, fields
        at -= 1
    return None


def parse_central_directory(
    data: bytes, directory: Directory, archive_size: int, what: str
) -> tuple[list[Member], list[Skipped]]:
    """Decode ``data`` (exactly the central directory) into checked members and skipped entries.

    Members come back in directory order; ``data_limit`` is filled from archive order.
    """
    entries = list(_entries(data, directory, what, {}))
    if len(entries) != directory.entries and (
        directory.zip64 or len(entries) % 0x10000 != directory.entries
    ):  # without ZIP64 the count is 16 bits: some writers let it wrap
        raise ArchiveError(
            f"{what} is corrupt: its central directory holds {len(entries)} entries, its end "
            f"record says {directory.entries}"
        )
    return _check_layout(entries, directory, archive_size)


@dataclass(slots=True)
class _Entry:
    name: str
    raw_name_length: int
    is_dir: bool
    header_offset: int
    method: int
    flags: int
    compressed_size: int
    size: int
    crc32: int
    mtime: float
    mode: int
    problem: str | None
    data_limit: int = 0  # set by ``_check_layout``
    kept: bool = False  # by ``_check_layout``: placed and overlapping no member before it


def _entries(
    data: bytes, directory: Directory, what: str, times: dict[tuple[int, int], float]
) -> Iterator[_Entry]:
    """The directory's entries in order; ``times`` memoizes DOS times (an archive written at
    once holds few distinct ones, and ``calendar.timegm`` is the slowest step of an entry)."""
    at = 0
    while at < len(data):
        if len(data) - at < _CENTRAL.size or not data.startswith(_CENTRAL_SIG, at):
            raise ArchiveError(
                f"{what} is corrupt: bad central directory entry at offset {directory.start + at}"
            )
        (_sig, _made, host, _needed, _needed_system, flags, method, dos_time, dos_date, crc,
         compressed_size, size, name_length, extra_length, comment_length, disk, _internal,
         external, header_offset) = _CENTRAL.unpack_from(data, at)
        name_at = at + _CENTRAL.size
        extra_at = name_at + name_length
        end = extra_at + extra_length + comment_length
        if end > len(data):
            raise ArchiveError(f"{what} is corrupt: a central directory entry runs past its end")
        raw_name = data[name_at:extra_at]
        extras = (dict(_extra_fields(data[extra_at: extra_at + extra_length]))
                  if extra_length else _NO_EXTRAS)
        problem = None
        zip64 = extras.get(0x0001, b"")
        try:
            size, compressed_size, header_offset, disk = _apply_zip64(
                zip64, size, compressed_size, header_offset, disk)
        except ValueError:
            problem = "its ZIP64 extra field is too short"
        name, name_problem = _decode_name(raw_name, flags, host, extras.get(0x7075))
        problem = problem or name_problem
        if disk not in (0, _U16) and problem is None:
            problem = "it starts on another disk of a multi-part archive"
        if compressed_size > max_compressed_size(size) and problem is None:
            problem = (f"its compressed size ({compressed_size} bytes) is far beyond what its "
                       f"{size} bytes can take (a zip bomb or a corrupt archive)")
        timestamp_field, ntfs_field = extras.get(0x5455), extras.get(0x000A)
        if timestamp_field is None and ntfs_field is None:
            mtime = times.get((dos_date, dos_time))
            if mtime is None:
                mtime = times[dos_date, dos_time] = _mtime(dos_date, dos_time, None, None)
        else:
            mtime = _mtime(dos_date, dos_time, timestamp_field, ntfs_field)
        yield _Entry(
            name, len(raw_name), name.endswith("/"), header_offset + directory.shift, method,
            flags, compressed_size, size, crc, mtime,
            external >> 16 if host in _UNIX_HOSTS else 0, problem,
        )
        at = end


def max_compressed_size(size: int) -> int:
    """The most compressed bytes ``size`` bytes can take in any method we read, generously.

    Incompressible data grows a little: deflate's stored blocks by 5 bytes per 64 KiB, bzip2 by
    1 % and 600 bytes at most, LZMA by less; stream and encryption headers take a few dozen
    bytes; 1/8 covers even fixed Huffman codes. Without this bound, an entry claiming a huge
    compressed size for a small member would have the members after it skipped as overlapping
    it, and be fetched whole to be read.
    """
    return size + size // 8 + 1024


def _check_layout(
    entries: list[_Entry], directory: Directory, archive_size: int
) -> tuple[list[Member], list[Skipped]]:
    skipped: list[Skipped] = []
    placed: list[_Entry] = []
    for entry in entries:
        if entry.problem is not None:
            skipped.append(Skipped(entry.name, entry.problem))
        elif entry.header_offset + LOCAL_HEADER_SIZE + entry.raw_name_length \
                + entry.compressed_size > directory.start:
            skipped.append(Skipped(entry.name, "its data runs past the archive's member area "
                                               "(a corrupt or truncated archive)"))
        else:
            placed.append(entry)
    by_offset = sorted(placed, key=lambda e: e.header_offset)
    previous: _Entry | None = None
    for entry in by_offset:
        if previous is not None:
            previous_end = (previous.header_offset + LOCAL_HEADER_SIZE
                            + previous.raw_name_length + previous.compressed_size)
            if entry.header_offset < previous_end:
                skipped.append(Skipped(entry.name, f"its data overlaps member {previous.name!r} "
                                                   "(a zip bomb or a corrupt archive)"))
                continue
            previous.data_limit = entry.header_offset
        entry.kept, entry.data_limit = True, directory.start
        previous = entry
    members = [
        Member(e.name, e.is_dir, e.header_offset, e.data_limit, e.method, e.flags,
               e.compressed_size, e.size, e.crc32, e.mtime, e.mode)
        for e in placed if e.kept
    ]
    return members, skipped


def _extra_fields(extra: bytes) -> Iterator[tuple[int, bytes]]:
    at = 0
    while at + 4 <= len(extra):
        field_id, length = _EXTRA_HEADER.unpack_from(extra, at)
        yield field_id, extra[at + 4: at + 4 + length]
        at += 4 + length


def _apply_zip64(
    field: bytes, size: int, compressed_size: int, header_offset: int, disk: int
) -> tuple[int, int, int, int]:
    """Replace the 0xFFFFFFFF placeholders with the ZIP64 extra field's values, in its order."""
    if size != _U32 and compressed_size != _U32 and header_offset != _U32 and disk != _U16:
        return size, compressed_size, header_offset, disk  # the common case, and the quickest
    values = [size == _U32, compressed_size == _U32, header_offset == _U32, disk == _U16]
    at = 0
    result = [size, compressed_size, header_offset, disk]
    for slot, wanted in enumerate(values):
        if not wanted:
            continue
        width = 4 if slot == 3 else 8
        if at + width > len(field):
            raise ValueError("short ZIP64 extra field")
        result[slot] = int.from_bytes(field[at: at + width], "little")
        at += width
    return result[0], result[1], result[2], result[3]


def _decode_name(
    raw: bytes, flags: int, host: int, unicode_field: bytes | None
) -> tuple[str, str | None]:
    if unicode_field and len(unicode_field) > 5 and unicode_field[0] == 1 \
            and int.from_bytes(unicode_field[1:5], "little") == zlib.crc32(raw):
        raw, flags = unicode_field[5:], flags | FLAG_UTF8
    if flags & FLAG_UTF8:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "backslashreplace"), "its name is not valid UTF-8"
    elif raw.isascii():  # the same in code page 437, and decoded 7x faster
        name = raw.decode("ascii")
    elif host in _UNIX_HOSTS:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:  # another code page of the writer's: CP437 shows every byte
            name = raw.decode("cp437")
    else:
        name = raw.decode("cp437")
    if "\\" in name and host in _WINDOWS_HOSTS:
        name = name.replace("\\", "/")
    return name, None


def _mtime(
    dos_date: int, dos_time: int, timestamp_field: bytes | None, ntfs_field: bytes | None
) -> float:
    if timestamp_field and len(timestamp_field) >= 5 and timestamp_field[0] & 1:
        return float(int.from_bytes(timestamp_field[1:5], "little", signed=True))
    if ntfs_field is not None and (ntfs := _ntfs_mtime(ntfs_field)) is not None:
        return ntfs
    year, month, day = 1980 + (dos_date >> 9), (dos_date >> 5) & 0xF, dos_date & 0x1F
    hour, minute, second = dos_time >> 11, (dos_time >> 5) & 0x3F, (dos_time & 0x1F) * 2
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 62):
        return NO_TIME  # no valid time recorded: the catalog gives the member the archive's
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))


def _ntfs_mtime(field: bytes) -> float | None:
    """The mtime of an NTFS extra field (0x000A: 4 reserved bytes, then tagged attributes; tag
    1 holds mtime, atime and ctime in 100 ns steps since 1601, UTC), if it holds one."""
    at = 4
    while at + 4 <= len(field):
        tag, length = _EXTRA_HEADER.unpack_from(field, at)
        if tag == 1 and length >= 24 and at + 12 <= len(field):
            ticks = int.from_bytes(field[at + 4: at + 12], "little")
            return (ticks - _NTFS_EPOCH) / 10_000_000 if ticks else None
        at += 4 + length
    return None


def member_path_problem(name: str) -> str | None:
    """Archive-only reasons a member name cannot be shown (``keypath`` checks the rest)."""
    if name.startswith("/"):
        return "its name is an absolute path"
    if _DRIVE.match(name):
        return "its name starts with a drive letter"
    if "\\" in name:
        return "its name holds a backslash (a Windows path separator)"
    return None


@dataclass(frozen=True, slots=True)
class LocalHeader:
    data_offset: int  # archive offset of the member's first data byte


def parse_local_header(data: bytes, header_offset: int, what: str) -> LocalHeader:
    """Decode the local header at the start of ``data`` (which begins at ``header_offset``)."""
    if len(data) < LOCAL_HEADER_SIZE or not data.startswith(_LOCAL_SIG):
        raise ArchiveError(f"{what}: no local file header at archive offset {header_offset} "
                           "(a corrupt archive)")
    fields = _LOCAL.unpack_from(data)
    name_length, extra_length = fields[10], fields[11]
    return LocalHeader(header_offset + LOCAL_HEADER_SIZE + name_length + extra_length)
