"""The dataset fingerprint: its canonical encoding, order independence and sensitivity."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3datafs import catalog as catalog_module
from s3datafs.catalog import Catalog, build_catalog
from s3datafs.fingerprint import Fingerprinter, OrderError, canonical_line, is_fingerprint
from s3datafs.model import ObjectRef

BUCKET = "bkt"


def ref(key: str, version: str | None = "v1", etag: str = '"e1"', size: int = 10) -> ObjectRef:
    return ObjectRef(BUCKET, key, version, etag, size, 1_700_000_000.5)


DATA = [
    ref("p/a.txt"),
    ref("p/b/c.bin", "v2", '"abc-2"', 0),
    ref("p/b/"),  # a directory marker: part of what is shown
    ref("p/é/ü.txt", "null", '"ff"', 3),
    ref("p/z"),
]


def fingerprint_of(tmp_path: Path, refs: list[ObjectRef], name: str = "c.db") -> str:
    build_catalog(
        tmp_path / name, refs, uri=f"s3://{BUCKET}/p/", bucket=BUCKET, prefix="p/", versioned=True
    )
    with Catalog.open(tmp_path / name) as catalog:
        return catalog.meta.fingerprint


def test_canonical_line_is_the_documented_json() -> None:
    line = canonical_line("p/é x", None, '"d41d8cd98f00b204e9800998ecf8427e"', 0)
    assert line == '["p/é x",null,"d41d8cd98f00b204e9800998ecf8427e",0]\n'.encode()


@settings(max_examples=500, deadline=None)
@given(key=st.text(min_size=1), version_id=st.none() | st.text(), etag=st.text(),
       size=st.integers(0, 2**63 - 1))
def test_canonical_line_is_json_dumps_for_any_text(
    key: str, version_id: str | None, etag: str, size: int
) -> None:
    record = [key, version_id, etag.strip('"'), size]
    expected = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
    assert canonical_line(key, version_id, etag, size) == expected.encode()


def test_fingerprint_is_sha256_of_the_sorted_lines(tmp_path: Path) -> None:
    expected = hashlib.sha256(
        b"".join(
            canonical_line(r.key, r.version_id, r.etag, r.size)
            for r in sorted(DATA, key=lambda r: r.key.encode())
        )
    ).hexdigest()
    assert fingerprint_of(tmp_path, DATA) == expected
    assert is_fingerprint(expected)


def test_fingerprint_does_not_depend_on_listing_order(tmp_path: Path) -> None:
    reference = fingerprint_of(tmp_path, DATA)
    for attempt in range(5):
        shuffled = DATA[:]
        random.Random(attempt).shuffle(shuffled)
        assert fingerprint_of(tmp_path, shuffled, f"s{attempt}.db") == reference


@pytest.mark.parametrize(
    "change",
    [
        {"key": "p/a2.txt"},
        {"version_id": "v9"},
        {"version_id": None},
        {"etag": '"e2"'},
        {"size": 11},
    ],
    ids=["key", "version", "version-to-none", "etag", "size"],
)
def test_any_change_of_key_version_etag_or_size_changes_it(tmp_path: Path, change: dict) -> None:
    changed = [ObjectRef(**{**vars_of(DATA[0]), **change}), *DATA[1:]]
    assert fingerprint_of(tmp_path, changed, "b.db") != fingerprint_of(tmp_path, DATA)


def test_last_modified_is_not_covered_and_quotes_do_not_matter(tmp_path: Path) -> None:
    moved = [ObjectRef(r.bucket, r.key, r.version_id, r.etag.strip('"'), r.size, 5.0) for r in DATA]
    assert fingerprint_of(tmp_path, moved, "m.db") == fingerprint_of(tmp_path, DATA)


def test_adding_or_removing_an_object_or_marker_changes_it(tmp_path: Path) -> None:
    base = fingerprint_of(tmp_path, DATA)
    assert fingerprint_of(tmp_path, [*DATA, ref("p/new")], "add.db") != base
    assert fingerprint_of(tmp_path, [r for r in DATA if r.key != "p/b/"], "nomark.db") != base


def test_skipped_keys_are_not_covered(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    unsafe = [ref("p/a//b"), ref("p/../x")]
    assert fingerprint_of(tmp_path, [*DATA, *unsafe], "u.db") == fingerprint_of(tmp_path, DATA)


@pytest.mark.parametrize("batch", [1, 10_000])
@pytest.mark.parametrize(
    ("keys", "shown"),
    [
        (["p/", "p/a", "p/b/", "p/b/c", "p/é"], 5),  # in key order, all shown: fed as they come
        (["p/a", "p/a-x", "p/a/b", "p/c"], 3),  # in order, but p/a, fed, loses to directory a
        (["p/a", "p/a!", "p/a/"], 2),  # ... or to the marker of a
        (["p/a", "p/b", "p/b", "p/c"], 3),  # a repeat, not stored twice
        (["p/b", "p/a", "p/c/"], 3),  # out of order
    ],
)
def test_the_fingerprint_covers_what_is_stored_however_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, keys: list[str], shown: int
) -> None:
    """The builder feeds the fingerprint as objects come while it can (in key order, nothing
    dropped afterwards), else sorts what it stored: the same digest either way."""
    monkeypatch.setattr(catalog_module, "_BATCH", batch)
    fingerprint = fingerprint_of(tmp_path, [ref(key, size=i) for i, key in enumerate(keys)])
    stored = Fingerprinter()
    with Catalog.open(tmp_path / "c.db") as catalog:
        for obj in catalog.objects():
            stored.add(obj.key, obj.version_id, obj.etag, obj.size)
    assert stored.count == shown
    assert fingerprint == stored.hexdigest()


def test_fingerprinter_refuses_keys_out_of_order() -> None:
    digest = Fingerprinter()
    digest.add("b", None, "e", 1)
    with pytest.raises(OrderError):
        digest.add("a", None, "e", 1)
    with pytest.raises(OrderError):
        digest.add("b", None, "e", 1)


def vars_of(item: ObjectRef) -> dict:
    return {name: getattr(item, name) for name in ObjectRef.__slots__}


def test_only_64_hex_digits_are_a_fingerprint() -> None:
    assert is_fingerprint("0123456789abcdef" * 4)
    for text in ("0" * 63, "0" * 65, "A" * 64, "g" * 64, "0" * 64 + "\n"):
        assert not is_fingerprint(text)


def test_the_fingerprinter_holds_a_bounded_buffer_whatever_the_object_count() -> None:
    """Lines are hashed in chunks as they come: a million objects must not be kept in memory
    (~100 bytes each) until the digest is asked for."""
    digest = Fingerprinter()
    tracemalloc.start()
    try:
        for n in range(20_000):
            digest.add(f"p/{n:08d}.bin", None, '"d41d8cd98f00b204e9800998ecf8427e"', n)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 256 * 1024  # not the ~1.3 MB of lines
    assert len(digest.hexdigest()) == 64
