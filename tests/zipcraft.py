"""Zip archives for tests, made with ``zipfile``, and surgery to make them bad in known ways.

The surgery edits fields of central directory entries (and the matching local headers) found by
walking the structures with ``struct`` here, independently of the code under test. ``raw_zip``
writes an archive field by field, as tools other than ``zipfile`` write theirs.
"""

from __future__ import annotations

import io
import lzma
import random
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
# Field offsets inside a central directory entry / a local header.
_C_FLAGS, _C_METHOD, _C_CRC, _C_CSIZE, _C_SIZE, _C_OFFSET = 8, 10, 16, 20, 24, 42
_L_FLAGS, _L_METHOD, _L_CRC, _L_CSIZE, _L_SIZE = 6, 8, 14, 18, 22


def make_zip(
    members: dict[str, bytes], *, methods: Iterable[int] = (zipfile.ZIP_STORED,),
    force_zip64: bool = False, directories: Iterable[str] = (), fast_lzma: bool = False,
) -> bytes:
    """An archive of ``members`` (name -> bytes), methods cycling through ``methods``.

    ``fast_lzma``: LZMA members compressed at preset 0 (``lzma_payload``), not ``zipfile``'s
    default 6, which takes 4 s for 10 MiB of ``sample_bytes``; not with ``force_zip64``."""
    if fast_lzma and force_zip64:
        raise ValueError("fast_lzma relabels 32-bit header fields: not with force_zip64")
    cycle = list(methods)
    buffer = io.BytesIO()
    relabelled: dict[str, bytes] = {}
    with zipfile.ZipFile(buffer, "w", allowZip64=True) as archive:
        for name in directories:
            archive.writestr(zipfile.ZipInfo(name, (2020, 1, 2, 3, 4, 6)), b"")
        for number, (name, data) in enumerate(members.items()):
            info = zipfile.ZipInfo(name, (2021, 5, 6, 7, 8, 10))
            info.compress_type = cycle[number % len(cycle)]
            if fast_lzma and info.compress_type == zipfile.ZIP_LZMA:
                info.compress_type = zipfile.ZIP_STORED  # the payload stored, relabelled below
                relabelled[name] = data
                data = lzma_payload(data, preset=0)
            with archive.open(info, "w", force_zip64=force_zip64) as out:
                out.write(data)
    archived = buffer.getvalue()
    for name, data in relabelled.items():
        archived = patch(archived, name, method=zipfile.ZIP_LZMA, flags=_LZMA_END_MARKER,
                         size=len(data), crc=zlib.crc32(data))
    return archived


_LZMA_END_MARKER = 0x02  # general purpose flag bit 1: the LZMA stream ends with a marker
_LZMA_FAST_DICTIONARY = 1 << 18  # preset 0's


def lzma_payload(data: bytes, *, preset: int) -> bytes:
    """A zip LZMA member's compressed bytes as ``zipfile`` writes them (LZMA SDK version 9.4,
    the 5-byte properties, raw LZMA1 with an end marker), but at ``preset`` with preset 0's
    dictionary: the properties say the dictionary, so any LZMA decoder reads it like zipfile's."""
    lc, lp, pb = _LZMA_PROPERTIES
    options = {"id": lzma.FILTER_LZMA1, "preset": preset, "dict_size": _LZMA_FAST_DICTIONARY,
               "lc": lc, "lp": lp, "pb": pb}
    properties = (bytes([(pb * 5 + lp) * 9 + lc])
                  + _LZMA_FAST_DICTIONARY.to_bytes(4, "little"))
    compressor = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[options])
    header = b"\x09\x04" + len(properties).to_bytes(2, "little") + properties
    return header + compressor.compress(data) + compressor.flush()


def sample_bytes(seed: int, size: int) -> bytes:
    """Half compressible text, half random: deflate has real work, stored stays honest."""
    rng = random.Random(seed)
    text = b"".join(b"line %d of sample %d\n" % (i, seed) for i in range(size // 40 + 1))
    return (text[: size // 2] + rng.randbytes(size))[:size]


def central_entries(data: bytes) -> dict[str, int]:
    """Member name -> offset of its central directory entry."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        at = archive.start_dir
        count = len(archive.infolist())
    found = {}
    for _ in range(count):
        fields = _CENTRAL.unpack_from(data, at)
        name_length, extra_length, comment_length = fields[12], fields[13], fields[14]
        name = data[at + 46: at + 46 + name_length].decode("utf-8", "surrogateescape")
        found[name] = at
        at += 46 + name_length + extra_length + comment_length
    return found


def patch(data: bytes, name: str, **fields: int) -> bytes:
    """Change fields (flags, method, crc, csize, size, offset) of member ``name``, both headers."""
    out = bytearray(data)
    central = central_entries(data)[name]
    local = struct.unpack_from("<L", data, central + _C_OFFSET)[0]
    places = {"flags": (_C_FLAGS, _L_FLAGS, "<H"), "method": (_C_METHOD, _L_METHOD, "<H"),
              "crc": (_C_CRC, _L_CRC, "<L"), "csize": (_C_CSIZE, _L_CSIZE, "<L"),
              "size": (_C_SIZE, _L_SIZE, "<L"), "offset": (_C_OFFSET, None, "<L")}
    for field, value in fields.items():
        in_central, in_local, fmt = places[field]
        struct.pack_into(fmt, out, central + in_central, value)
        if in_local is not None:
            struct.pack_into(fmt, out, local + in_local, value)
    return bytes(out)


def header_offset(data: bytes, name: str) -> int:
    return struct.unpack_from("<L", data, central_entries(data)[name] + _C_OFFSET)[0]


# -- more surgery (names, local extra fields, end records) ---------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_LOCATOR = struct.Struct("<4sLQL")


def replace_name(data: bytes, name: str, raw: bytes, *, flags: int | None = None) -> bytes:
    """Give member ``name`` the name bytes ``raw`` (same length), in both headers; maybe flags."""
    encoded = name.encode("utf-8")
    if len(raw) != len(encoded):
        raise ValueError("replace_name keeps the length: offsets would move")
    out = bytearray(patch(data, name, flags=flags) if flags is not None else data)
    central = central_entries(data)[name]
    local = struct.unpack_from("<L", data, central + _C_OFFSET)[0]
    assert out[central + 46: central + 46 + len(raw)] == encoded
    assert out[local + 30: local + 30 + len(raw)] == encoded
    out[central + 46: central + 46 + len(raw)] = raw
    out[local + 30: local + 30 + len(raw)] = raw
    return bytes(out)


def set_local_extra_length(data: bytes, name: str, length: int) -> bytes:
    """Change the extra field length of member ``name``'s local header only."""
    out = bytearray(data)
    struct.pack_into("<H", out, header_offset(data, name) + 28, length)
    return bytes(out)


def append_member(data: bytes, name: str, payload: bytes) -> bytes:
    """Append a member to an archive, even one whose name is already there (a duplicate)."""
    buffer = io.BytesIO(data)
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "a") as archive:
        warnings.simplefilter("ignore")  # "Duplicate name"
        archive.writestr(zipfile.ZipInfo(name, (2022, 3, 4, 5, 6, 8)), payload)
    return buffer.getvalue()


def patch_end(data: bytes, **fields: int) -> bytes:
    """Change fields (disk, cd_disk, disk_entries, entries, cd_size, cd_offset) of the end record.

    The archive must have no comment (its end record is its last 22 bytes).
    """
    at = len(data) - _EOCD.size
    values = list(_EOCD.unpack_from(data, at))
    if values[0] != b"PK\x05\x06" or values[7] != 0:
        raise ValueError("no end record in the last 22 bytes (an archive comment?)")
    names = ["sig", "disk", "cd_disk", "disk_entries", "entries", "cd_size", "cd_offset",
             "comment_length"]
    for field, value in fields.items():
        values[names.index(field)] = value
    return data[:at] + _EOCD.pack(*values)


def to_zip64(data: bytes) -> bytes:
    """The same archive with a ZIP64 end record and locator, its end record all placeholders.

    The archive must have no comment. Offsets of the members do not move.
    """
    at = len(data) - _EOCD.size
    _sig, disk, cd_disk, disk_entries, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(
        data, at)
    if comment:
        raise ValueError("to_zip64 needs an archive without a comment")
    record = _EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, disk, cd_disk, disk_entries,
                          entries, cd_size, cd_offset)
    locator = _LOCATOR.pack(b"PK\x06\x07", 0, at, 1)
    end = _EOCD.pack(b"PK\x05\x06", disk, cd_disk, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:at] + record + locator + end


# -- LZMA without an end marker ------------------------------------------------------------------

_LZMA_PROPERTIES = (3, 0, 2)  # lc, lp, pb: what LZMA encoders use unless told otherwise


def lzma_literals(data: bytes) -> bytes:
    """``data`` as raw LZMA1 (``_LZMA_PROPERTIES``), every byte coded as a literal, with no end
    marker: the stream stops after its last symbol, as 7-Zip writes zip members unless asked
    for the marker (Python's ``lzma`` always writes one). A plain range coder (LZMA SDK's
    ``RangeEnc``); no matches, so it compresses little, but any LZMA decoder reads it."""
    lc, lp, pb = _LZMA_PROPERTIES
    out = bytearray()
    low, span, cache, pending = 0, 0xFFFFFFFF, 0, 1  # pending: bytes held back for a carry

    def shift_low() -> None:
        nonlocal low, cache, pending
        if low < 0xFF000000 or low >= 1 << 32:
            carry, held = low >> 32, cache
            for _ in range(pending):
                out.append((held + carry) & 0xFF)
                held = 0xFF
            pending, cache = 0, (low >> 24) & 0xFF
        pending += 1
        low = (low & 0x00FFFFFF) << 8

    def encode(probabilities: list[int], at: int, bit: int) -> None:
        nonlocal low, span
        probability = probabilities[at]
        bound = (span >> 11) * probability
        if bit:
            low, span = low + bound, span - bound
            probabilities[at] = probability - (probability >> 5)
        else:
            span = bound
            probabilities[at] = probability + ((2048 - probability) >> 5)
        while span < 1 << 24:
            span <<= 8
            shift_low()

    is_match = [1024] * (12 << 4)  # by state and position; literals only: state 0 throughout
    literal = [1024] * (0x300 << (lc + lp))
    previous = 0
    for position, byte in enumerate(data):
        encode(is_match, position & ((1 << pb) - 1), 0)
        base = 0x300 * (((position & ((1 << lp) - 1)) << lc) + (previous >> (8 - lc)))
        symbol = 1
        for shift in range(7, -1, -1):
            bit = (byte >> shift) & 1
            encode(literal, base + symbol, bit)
            symbol = (symbol << 1) | bit
        previous = byte
    for _ in range(5):  # the range coder's flush
        shift_low()
    return bytes(out)


def lzma_zip_without_end_marker(name: str, data: bytes, *, declared: int | None = None) -> bytes:
    """An archive of one LZMA member ``name`` whose stream has no end marker (general purpose
    flag bit 1 unset), so only its header's size (``declared``, else ``len(data)``) says where
    it ends. Made as a stored member of the zip LZMA payload, then relabelled."""
    lc, lp, pb = _LZMA_PROPERTIES
    properties = bytes([(pb * 5 + lp) * 9 + lc]) + (1 << 16).to_bytes(4, "little")
    payload = b"\x09\x14" + len(properties).to_bytes(2, "little") + properties
    archive = make_zip({name: payload + lzma_literals(data)})
    size = len(data) if declared is None else declared
    return patch(archive, name, method=zipfile.ZIP_LZMA, flags=0, size=size,
                 crc=zlib.crc32(data[:size]))


# -- archives byte by byte, as other tools write them -------------------------------------------

# "version made by", high byte (APPNOTE 4.4.2); NTFS as Info-ZIP and 7-Zip write it (APPNOTE: 10)
HOST_FAT, HOST_UNIX, HOST_NTFS = 0, 3, 11
_LOCAL = struct.Struct("<4s5H3L2H")
_DESCRIPTOR = struct.Struct("<4s3L")  # with its optional signature, as most writers add it
_DESCRIPTOR64 = struct.Struct("<4sL2Q")


def dos_time(year: int, month: int, day: int, hour: int, minute: int, second: int
             ) -> tuple[int, int]:
    """(time, date) as a zip header stores them: 2-second steps, no zone."""
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


@dataclass
class RawMember:
    """One member as ``raw_zip`` writes it: every header field as given, nothing decided for it.

    ``descriptor``: sizes and CRC follow the data (flag bit 3 set, zeros in the local header), as
    streaming writers (``zip - dir``, ``jar``, Finder) do; ``zip64_local``: the local header's
    sizes are 0xFFFFFFFF with a ZIP64 extra field, and the descriptor has 8-byte sizes, as
    Info-ZIP writes a member of unknown size (``zip - -``). ``local_*`` make the local header
    disagree with the central directory.
    """

    name: bytes
    data: bytes = b""
    method: int = zipfile.ZIP_STORED  # or ZIP_DEFLATED: compressed here
    flags: int = 0
    host: int = HOST_UNIX
    version: int = 30  # of the writer, low byte of "version made by"
    external: int = 0o100644 << 16  # Unix mode in the high 16 bits; MS-DOS attributes low
    time: tuple[int, int] = dos_time(2023, 7, 8, 9, 10, 12)
    extra: bytes = b""  # in both headers
    central_extra: bytes | None = None  # the central directory's, when it differs
    descriptor: bool = False
    zip64_local: bool = False
    local_name: bytes | None = None
    local_method: int | None = None
    local_sizes: tuple[int, int] | None = None  # (compressed, uncompressed)


def extra_field(field_id: int, payload: bytes) -> bytes:
    return struct.pack("<2H", field_id, len(payload)) + payload


def raw_zip(members: Iterable[RawMember], *, before: bytes = b"", comment: bytes = b"",
            adjusted: bool = False) -> bytes:
    """An archive written field by field (``RawMember``), after ``before`` (a self-extractor's
    stub). ``adjusted``: offsets count from the start of the file, stub included (``zip -A``);
    else from the start of the archive, as ``cat stub archive.zip`` leaves them."""
    out = bytearray(before)
    base = 0 if adjusted else len(before)
    central = bytearray()
    count = 0
    for member in members:
        count += 1
        crc = zlib.crc32(member.data)
        if member.method == zipfile.ZIP_DEFLATED:
            packer = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = packer.compress(member.data) + packer.flush()
        else:
            payload = member.data
        flags = member.flags | (0x08 if member.descriptor else 0)
        local_extra = member.extra
        if member.zip64_local:
            local_extra = extra_field(0x0001, struct.pack("<2Q", 0, 0)) + local_extra
            local_sizes = (0xFFFFFFFF, 0xFFFFFFFF)
        elif member.descriptor:
            local_sizes = (0, 0)
        else:
            local_sizes = (len(payload), len(member.data))
        local_sizes = member.local_sizes or local_sizes
        local_name = member.name if member.local_name is None else member.local_name
        offset = len(out) - base
        method = member.method if member.local_method is None else member.local_method
        out += _LOCAL.pack(b"PK\x03\x04", 45 if member.zip64_local else 20, flags, method,
                           *member.time, 0 if member.descriptor else crc, *local_sizes,
                           len(local_name), len(local_extra))
        out += local_name + local_extra + payload
        if member.zip64_local:
            out += _DESCRIPTOR64.pack(b"PK\x07\x08", crc, len(payload), len(member.data))
        elif member.descriptor:
            out += _DESCRIPTOR.pack(b"PK\x07\x08", crc, len(payload), len(member.data))
        extra = member.extra if member.central_extra is None else member.central_extra
        central += _CENTRAL.pack(
            b"PK\x01\x02", member.version, member.host, 20, 0, flags, member.method,
            *member.time, crc, len(payload), len(member.data), len(member.name), len(extra), 0,
            0, 0, member.external, offset)
        central += member.name + extra
    start = len(out) - base
    out += central
    out += _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, len(central), start, len(comment))
    return bytes(out + comment)
