"""Snapshot files without FUSE: the round trip, and every way a file is refused.

Every refusal is a ``SnapshotError`` whose message is one line naming the file; no catalog is
left behind (the builder writes a temporary file and removes it).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from fakes import FakeSource

from s3datafs import pinning
from s3datafs import snapshot as snapshot_module
from s3datafs.catalog import Catalog, build_catalog
from s3datafs.errors import MissingPermissionError, PinMismatchError
from s3datafs.model import ObjectRef
from s3datafs.resolve import Pins
from s3datafs.snapshot import FORMAT, SnapshotError, load_snapshot, read_header, write_snapshot
from s3datafs.uri import parse_s3_uri

BUCKET = "bkt"


def refs(versioned: bool = True) -> list[ObjectRef]:
    def r(key: str, size: int, n: int) -> ObjectRef:
        return ObjectRef(
            BUCKET,
            key,
            f"v{n}" if versioned else None,
            f'"{n:032x}"',
            size,
            1_700_000_000.0 + n / 1000,
        )

    return [
        r("data/", 0, 0),  # the prefix's own marker
        r("data/a.bin", 1000, 1),
        r("data/dir/", 0, 2),
        r("data/dir/b.bin", 0, 3),
        r("data/empty/", 0, 4),
        r("data/multi.bin", 99, 5),
        r("data/ü ñ/c\nd.txt", 7, 6),
    ]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    path = tmp_path / "source.db"
    build_catalog(
        path,
        refs(),
        uri=f"s3://{BUCKET}/data/",
        bucket=BUCKET,
        prefix="data/",
        versioned=True,
        as_of=1_700_000_100.25,
    )
    with Catalog.open(path) as opened:
        yield opened


@pytest.fixture
def snapshot_file(tmp_path: Path, catalog: Catalog) -> Path:
    path = tmp_path / "snap.jsonl.gz"
    write_snapshot(catalog, path, name="train")
    return path


def test_round_trip_keeps_every_ref_and_the_fingerprint(
    tmp_path: Path, catalog: Catalog, snapshot_file: Path
) -> None:
    loaded = load_snapshot(snapshot_file, tmp_path / "copy.db")
    with Catalog.open(tmp_path / "copy.db") as copy:
        assert list(copy.objects()) == list(catalog.objects())
        assert copy.meta.fingerprint == catalog.meta.fingerprint == loaded.header.fingerprint
        assert copy.meta.as_of == catalog.meta.as_of == 1_700_000_100.25
        assert (copy.meta.object_count, copy.meta.total_bytes) == (4, 1106)
    assert loaded.first_file is not None
    assert loaded.first_file.key == "data/a.bin"
    assert loaded.header.name == "train"
    assert loaded.header.marker_count == 3


def test_the_file_is_the_documented_format(snapshot_file: Path) -> None:
    lines = gzip.decompress(snapshot_file.read_bytes()).decode().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == FORMAT == "s3datafs-snapshot/1"
    assert header["fields"] == ["key", "version_id", "etag", "size", "last_modified"]
    assert header["as_of"] == "2023-11-14T22:15:00.250Z"
    assert (header["uri"], header["prefix"], header["versioned"]) == ("s3://bkt/data/", "data/", 1)
    assert json.loads(lines[2]) == ["data/a.bin", "v1", f"{1:032x}", 1000, 1_700_000_000.001]
    assert len(lines) == 1 + 7
    assert read_header(snapshot_file).fingerprint == header["fingerprint"]


def test_unversioned_round_trip(tmp_path: Path) -> None:
    build_catalog(
        tmp_path / "u.db",
        refs(False),
        uri="s3://bkt/data/",
        bucket=BUCKET,
        prefix="data/",
        versioned=False,
    )
    with Catalog.open(tmp_path / "u.db") as catalog:
        write_snapshot(catalog, tmp_path / "u.gz", name="u")
    loaded = load_snapshot(tmp_path / "u.gz", tmp_path / "u2.db")
    assert loaded.first_file is not None
    assert loaded.first_file.version_id is None


def test_etags_with_white_space_inside_their_quotes_round_trip(tmp_path: Path) -> None:
    """A store may send an ETag with white space inside its quotes: the listing pins it so (only
    what is outside the quotes goes), and a snapshot of that mount must load as the same objects
    under the same fingerprint (the loader stripped the white space too: refused as edited)."""
    listed = [ObjectRef(BUCKET, key, "v1", etag, 5, 1_700_000_000.0)
              for key, etag in [("data/a", '" abc"'), ("data/b", '"abc\t"'), ("data/c", '" "')]]
    build_catalog(tmp_path / "c.db", listed, uri="s3://bkt/data/", bucket=BUCKET,
                  prefix="data/", versioned=True)
    with Catalog.open(tmp_path / "c.db") as catalog:
        write_snapshot(catalog, tmp_path / "s.gz", name="s")
        loaded = load_snapshot(tmp_path / "s.gz", tmp_path / "copy.db")
        with Catalog.open(tmp_path / "copy.db") as copy:
            assert list(copy.objects()) == list(catalog.objects()) == listed
            assert copy.meta.fingerprint == catalog.meta.fingerprint == loaded.header.fingerprint


@pytest.mark.parametrize(
    ("key", "versioning_denied", "older"),
    [("d/a.bin", False, False), ("d/a.bin", True, False), ("d/a.bin", True, True),
     ("/a.bin", False, False)],
    ids=["plain", "versioning-denied", "versioning-denied-older-version", "leading-slash"],
)
def test_a_single_object_snapshot_mounts_again(
    tmp_path: Path, key: str, versioning_denied: bool, older: bool
) -> None:
    """Made the way ``mount --save-snapshot`` makes it (pinned, then written), then loaded."""
    source = FakeSource()
    source.create_bucket(BUCKET, versioned=True)
    first = source.put(BUCKET, key, b"one")
    source.put(BUCKET, key, b"two")
    source.deny_versioning = versioning_denied
    pins = Pins(version_id=first.version_id) if older else Pins()
    uri = parse_s3_uri(f"s3://{BUCKET}/{key}")
    pinning.pin(source, tmp_path / "pinned.db", uri=uri, pins=pins)
    with Catalog.open(tmp_path / "pinned.db") as pinned:
        assert pinned.meta.object_count == 1
        write_snapshot(pinned, tmp_path / "s.gz", name="a")
        fingerprint = pinned.meta.fingerprint
    loaded = load_snapshot(tmp_path / "s.gz", tmp_path / "again.db")
    assert loaded.first_file is not None
    assert loaded.first_file.version_id == (first.version_id if older else
                                            source.head(BUCKET, key).version_id)
    with Catalog.open(tmp_path / "again.db") as again:
        assert again.meta.fingerprint == fingerprint
        assert again.lookup(1, "a.bin") is not None


def rewrite(path: Path, edit) -> None:  # edit(list of lines) -> list of lines
    lines = gzip.decompress(path.read_bytes()).decode().split("\n")
    path.write_bytes(gzip.compress("\n".join(edit(lines)).encode()))


def edit_header(**changes):
    def edit(lines: list[str]) -> list[str]:
        return [json.dumps({**json.loads(lines[0]), **changes}), *lines[1:]]

    return edit


def edit_line(number: int, index: int, value):
    def edit(lines: list[str]) -> list[str]:
        record = json.loads(lines[number])
        record[index] = value
        return [*lines[:number], json.dumps(record), *lines[number + 1 :]]

    return edit


BAD_EDITS = {
    "changed-etag": (edit_line(2, 2, "f" * 32), "fingerprint"),
    "changed-size": (edit_line(2, 3, 1001), "it lists 1107 bytes, its header says 1106"),
    "changed-count": (edit_header(object_count=5), "it lists 4 objects, its header says 5"),
    "changed-fingerprint": (edit_header(fingerprint="0" * 64), "its header says 000"),
    "unknown-format": (edit_header(format="s3datafs-snapshot/2"), "has format"),
    "not-a-snapshot": (lambda lines: ["{}", *lines[1:]], "not an s3datafs snapshot"),
    "dropped-line": (lambda lines: [*lines[:2], *lines[3:]], "it lists 3 objects"),
    "swapped-lines": (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], "out of order"),
    "key-outside-prefix": (edit_line(2, 0, "other/a.bin"), "not under the prefix"),
    "unsafe-key": (edit_line(2, 0, "data/../a.bin"), "cannot be shown"),
    "missing-version": (edit_line(2, 1, None), "has no version id"),
    "string-size": (edit_line(2, 3, "1000"), "invalid size"),
    "huge-size": (edit_line(2, 3, 2**63), "invalid size"),
    "nan-time": (lambda lines: [*lines[:2], lines[2].replace("1700000000.001", "NaN"),
                                *lines[3:]], "invalid last_modified"),
    "prefix-moved": (edit_header(prefix=""), "prefix '' is not the uri's ('data/')"),
    "single-object-claimed": (edit_header(single_object=True), "uri names a prefix"),
    "bucket-not-the-uris": (edit_header(bucket="bkt/evil", uri="s3://bkt/evil/data/"),
                            "uri does not name the bucket"),
    "garbage-line": (lambda lines: [*lines[:2], "not json", *lines[3:]], "not an object record"),
    "empty": (lambda lines: [], "it is empty"),
    "changed-marker-count": (edit_header(marker_count=2),
                             "it lists 3 directory markers, its header says 2"),
    "version-on-unversioned": (edit_header(versioned=False, as_of=None),
                               "has a version id, but the bucket is not versioned"),
    "boolean-size": (edit_line(2, 3, True), "invalid size"),  # JSON true is no size
    # "\ud800" in JSON is a lone surrogate, no text UTF-8 can carry (a hand edit, a bad tool).
    "surrogate-version": (edit_line(2, 1, "\ud800"), "has a version id that is not valid UTF-8"),
    "surrogate-etag": (edit_line(2, 2, "\ud800"), "has an ETag that is not valid UTF-8"),
    "fields-reordered": (edit_header(fields=["key", "etag", "version_id", "size",
                                             "last_modified"]), "lists fields"),
    "single-object-of-another-key": (
        edit_header(single_object=True, uri="s3://bkt/data/a.bin"),
        "is not the single object its uri names",
    ),
    # Header fields of the wrong kind or out of range (a hand edit, another tool's file).
    "versioned-not-a-bool": (edit_header(versioned="yes"), "header is invalid: versioned is not"),
    "negative-total": (edit_header(total_bytes=-1), "header is invalid: total_bytes is not a"),
    "short-fingerprint": (edit_header(fingerprint="abc"), "fingerprint is not 64 hex digits"),
    "uri-not-s3": (edit_header(uri="http://bkt/data/"), "header is invalid: uri: "),
    "created-not-a-time": (edit_header(created="yesterday"), "a time is not ISO 8601"),
    "header-line-too-long": (lambda lines: ["x" * ((1 << 20) + 1), *lines[1:]], "no header line"),
    "empty-key": (edit_line(2, 0, ""), "line 3: the key is not a non-empty string"),
    "surrogate-key": (edit_line(2, 0, "data/\ud800"), "the key is not valid UTF-8"),
    "empty-etag": (edit_line(2, 2, ""), "'data/a.bin' has no ETag"),
    "header-missing-field": (
        lambda lines: [
            json.dumps({k: v for k, v in json.loads(lines[0]).items() if k != "bucket"}),
            *lines[1:],
        ],
        "lacks 'bucket'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_edited_files_are_refused(tmp_path: Path, snapshot_file: Path, case: str) -> None:
    edit, fragment = BAD_EDITS[case]
    rewrite(snapshot_file, edit)
    assert_refused(tmp_path, snapshot_file, fragment)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path, snapshot_file: Path) -> None:
    lines = gzip.decompress(snapshot_file.read_bytes()).split(b"\n")
    lines[2] = b'["data/\xff.bin", "v1"]'  # raw bytes no UTF-8 text holds
    snapshot_file.write_bytes(gzip.compress(b"\n".join(lines)))
    assert_refused(tmp_path, snapshot_file, "it is corrupted (not UTF-8)")


def test_a_snapshot_written_in_many_pieces_round_trips(
    tmp_path: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are joined and written ``_WRITE_CHUNK`` lines at a time (2,048: more objects
    than any other test lists): the file is the same whatever the pieces."""
    whole = tmp_path / "whole.jsonl.gz"
    write_snapshot(catalog, whole, name="train")
    monkeypatch.setattr(snapshot_module, "_WRITE_CHUNK", 2)
    pieces = tmp_path / "pieces.jsonl.gz"
    write_snapshot(catalog, pieces, name="train")
    assert _records(pieces) == _records(whole)
    loaded = load_snapshot(pieces, tmp_path / "copy.db")
    with Catalog.open(tmp_path / "copy.db") as copy:
        assert list(copy.objects()) == list(catalog.objects())
    assert loaded.header.fingerprint == catalog.meta.fingerprint


def _records(path: Path) -> list[str]:
    """The object lines of a snapshot (the header names the time it was written)."""
    return gzip.decompress(path.read_bytes()).decode().split("\n")[1:]


def test_a_truncated_file_is_refused(tmp_path: Path, snapshot_file: Path) -> None:
    data = snapshot_file.read_bytes()
    snapshot_file.write_bytes(data[: len(data) * 2 // 3])
    assert_refused(tmp_path, snapshot_file, "truncated")


def test_flipped_bytes_inside_the_gzip_are_refused(tmp_path: Path, snapshot_file: Path) -> None:
    data = bytearray(snapshot_file.read_bytes())
    for offset in (len(data) // 2, len(data) // 2 + 7):
        data[offset] ^= 0xFF
    snapshot_file.write_bytes(bytes(data))
    assert_refused(tmp_path, snapshot_file, "snapshot")


def test_a_file_that_is_not_gzip_or_missing_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text('{"format": "s3datafs-snapshot/1"}\n')
    assert_refused(tmp_path, plain, "not gzip")
    assert_refused(tmp_path, tmp_path / "missing.gz", "does not exist")


def assert_refused(tmp_path: Path, path: Path, fragment: str) -> None:
    target = tmp_path / "refused.db"
    with pytest.raises(SnapshotError) as refused:
        load_snapshot(path, target)
    message = str(refused.value)
    assert fragment in message
    assert "\n" not in message
    assert str(path) in message
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused.db")]


def test_the_snapshot_mounts_head_refuses_an_object_of_another_size_under_the_same_etag(
    tmp_path: Path,
) -> None:
    """The one HEAD of a snapshot mount checks the size as well as the ETag: a store whose ETags
    are not content hashes (a gateway's) can replace an object and keep its ETag, and the pinned
    size is then all that tells the old bytes from the new."""
    source = FakeSource()
    source.create_bucket("bkt")
    pinned = source.put("bkt", "a.bin", b"hello", etag='"gateway-etag"')
    pinning.check_still_there(source, pinned, tmp_path / "snap")  # unchanged: no error
    source.put("bkt", "a.bin", b"hello, world", etag='"gateway-etag"')
    with pytest.raises(PinMismatchError, match="5 bytes, but S3 has ETag .* and 12 bytes"):
        pinning.check_still_there(source, pinned, tmp_path / "snap")


def test_where_versions_may_not_be_read_the_snapshot_mounts_head_checks_the_current_object(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No s3:GetObjectVersion (S3 refuses a HEAD naming a version): the current object is
    checked against the pinned ETag and size instead, as reads then go by ETag alone."""
    source = FakeSource()
    source.create_bucket("bkt", versioned=True)
    pinned = source.put("bkt", "a.bin", b"hello")
    denied = MissingPermissionError("reading a pinned version needs it", "s3:GetObjectVersion")
    source.fail_next(1, denied, "head")
    with caplog.at_level(logging.WARNING):
        pinning.check_still_there(source, pinned, tmp_path / "snap")
    assert "checking the current object against the snapshot's ETag" in caplog.text
    source.put("bkt", "a.bin", b"hello, world")  # the current object is another one now
    source.fail_next(1, denied, "head")
    with pytest.raises(PinMismatchError, match="the object changed since"):
        pinning.check_still_there(source, pinned, tmp_path / "snap")
    other = MissingPermissionError("listing needs it", "s3:ListBucket")
    source.fail_next(1, other, "head")
    with pytest.raises(MissingPermissionError) as raised:
        pinning.check_still_there(source, pinned, tmp_path / "snap")
    assert raised.value is other
