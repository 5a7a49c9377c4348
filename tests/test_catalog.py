"""The catalog: building the namespace from a pinned listing, and reading it back."""

from __future__ import annotations

import logging
import os
import resource
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3datafs import catalog as catalog_module
from s3datafs.archive.zipformat import Member
from s3datafs.catalog import (
    ROOT_INODE,
    Catalog,
    CatalogBuilder,
    CatalogDamaged,
    CatalogError,
    CatalogSummary,
    Entry,
    build_catalog,
)
from s3datafs.model import MemberRef, ObjectRef

BUCKET = "bkt"


def ref(key: str, size: int = 1, mtime: float = 1000.0, version_id: str | None = None) -> ObjectRef:
    return ObjectRef(BUCKET, key, version_id, f'"etag-{key}"', size, mtime)


def build(
    path: Path, refs: Iterable[ObjectRef | str], prefix: str = "", versioned: bool = False
) -> tuple[CatalogSummary, Catalog]:
    items = [r if isinstance(r, ObjectRef) else ref(r) for r in refs]
    summary = build_catalog(
        path, items, uri=f"s3://{BUCKET}/{prefix}", bucket=BUCKET, prefix=prefix,
        versioned=versioned,
    )
    return summary, Catalog.open(path)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "catalog.sqlite"


def resolve(cat: Catalog, path: str) -> Entry | None:
    entry = cat.get(ROOT_INODE)
    for name in filter(None, path.split("/")):
        assert entry is not None
        entry = cat.lookup(entry.inode, name)
        if entry is None:
            return None
    return entry


def tree(cat: Catalog, inode: int = ROOT_INODE, base: str = "") -> dict[str, Entry]:
    """Every entry below ``inode`` by path; directories end with '/'."""
    out: dict[str, Entry] = {}
    for entry in cat.children(inode):
        path = base + entry.name
        if entry.is_dir:
            out[path + "/"] = entry
            out.update(tree(cat, entry.inode, path + "/"))
        else:
            out[path] = entry
    return out


def skipped_keys(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.args[0] for r in caplog.records if r.levelno == logging.WARNING
            and r.getMessage().startswith("skipping key")]


def test_nested_tree_and_refs(db: Path) -> None:
    refs = [ref("p/a/b/c.bin", 10, 5.0, "v1"), ref("p/a/d", 20, 7.0, "null"), ref("p/top", 3, 2.0)]
    summary, cat = build(db, refs, prefix="p/", versioned=True)
    assert summary == CatalogSummary(object_count=3, total_bytes=33, dir_count=2, skipped_count=0)
    assert set(tree(cat)) == {"a/", "a/b/", "a/b/c.bin", "a/d", "top"}
    entry = resolve(cat, "a/b/c.bin")
    assert entry is not None
    assert entry.ref == refs[0]
    assert (entry.size, entry.mtime, entry.is_dir) == (10, 5.0, False)
    d = resolve(cat, "a/d")
    assert d is not None
    assert d.ref is not None
    assert d.ref.version_id == "null"  # the literal string, not None
    a = resolve(cat, "a")
    assert a is not None
    assert a.is_dir
    assert a.ref is None
    assert a.size == 0
    assert cat.meta.versioned is True
    assert (cat.meta.bucket, cat.meta.prefix, cat.meta.uri) == (BUCKET, "p/", "s3://bkt/p/")
    assert (cat.meta.object_count, cat.meta.total_bytes, cat.meta.dir_count) == (3, 33, 2)
    assert cat.meta.skipped_count == 0
    assert time.time() - 60 < cat.meta.created <= time.time()


def test_root_entry(db: Path) -> None:
    _, cat = build(db, ["x"])
    root = cat.get(ROOT_INODE)
    assert root == Entry(ROOT_INODE, ROOT_INODE, "", True, 0, 1000.0, None, links=2)
    assert cat.lookup(ROOT_INODE, "") is None
    assert [e.name for e in cat.children(ROOT_INODE)] == ["x"]  # the root is not its own child


def test_missing_things_are_none(db: Path) -> None:
    _, cat = build(db, ["d/f"])
    f = resolve(cat, "d/f")
    assert f is not None
    assert cat.get(10**9) is None
    assert cat.get(0) is None
    assert cat.lookup(ROOT_INODE, "nope") is None
    assert cat.lookup(f.inode, "child-of-a-file") is None
    assert cat.lookup(10**9, "f") is None
    assert cat.lookup(ROOT_INODE, "bad\udcffname") is None  # undecodable kernel name
    assert list(cat.children(f.inode)) == []
    assert list(cat.children(10**9)) == []


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("a//b", "empty path segment"),
        ("/lead", "empty path segment"),
        ("a/./b", "'.' path segment"),
        ("a/../../etc", "'..' path segment"),
        ("..", "'..' path segment"),
        ("n" * 256, "256 bytes"),
        ("nul\0", "NUL"),
        ("x//", "empty path segment"),
    ],
)
def test_unsafe_keys_are_skipped_with_a_warning(
    db: Path, caplog: pytest.LogCaptureFixture, key: str, reason: str
) -> None:
    summary, cat = build(db, ["ok", key])
    assert summary.skipped_count == 1
    assert summary.object_count == 1
    assert set(tree(cat)) == {"ok"}
    assert skipped_keys(caplog) == [key]
    assert reason in caplog.records[-1].getMessage()


@pytest.mark.parametrize("archive", [False, True])
def test_names_under_a_directory_already_made_are_checked_the_same(
    db: Path, caplog: pytest.LogCaptureFixture, archive: bool
) -> None:
    """A key under a directory that exists is checked by its last segment alone (the build's
    fast path): the same keys are skipped, for the same reasons, as split_key would."""
    names = ["d/e/ok", "d/e/..", "d/e/.", "d/e/" + "n" * 256, "d/e/nul\0", "d/e/" + "é" * 128,
             "d/e/" + "é" * 127, "d/e//x", "d/e/\ud800", "d/e/back\\slash", "d", "d/e", "x",
             "/x", "x/y", "d/e/ok"]
    with CatalogBuilder(db, uri="s3://bkt/", bucket=BUCKET, prefix="", versioned=False,
                        archive=ref("a.zip") if archive else None,
                        fingerprint="f" * 64 if archive else None) as builder:
        for i, name in enumerate(names):
            if archive:
                builder.add_member(Member(name, False, i, i + 1, 0, 0, 1, 1, 0, 9.0))
            else:
                builder.add(ref(name))
        builder.finish()
    skipped = [(r.args[0], r.args[-1]) for r in caplog.records if r.levelno == logging.WARNING]
    expected = [("d/e/..", "'..' path segment"), ("d/e/.", "'.' path segment"),
                ("d/e/" + "n" * 256, "path segment of 256 bytes (limit 255)"),
                ("d/e/nul\0", "NUL character in path segment"),
                ("d/e/" + "é" * 128, "path segment of 256 bytes (limit 255)"),
                ("d/e//x", "empty path segment"),
                ("d/e/\ud800", "path segment is not valid UTF-8"),
                *([("d/e/back\\slash", "its name holds a backslash (a Windows path separator)")]
                  if archive else []),
                ("d", "a directory has the same name"), ("d/e", "a directory has the same name"),
                ("/x", "its name is an absolute path" if archive else "empty path segment"),
                ("x", "a directory has the same name"),
                ("d/e/ok", "a later member has the same name" if archive else "key listed twice")]
    assert skipped == expected
    with Catalog.open(db) as cat:
        shown = {"d/", "d/e/", "d/e/ok", "d/e/" + "é" * 127, "x/", "x/y"}
        assert set(tree(cat)) == shown | (set() if archive else {"d/e/back\\slash"})


def test_a_members_unix_mode_is_kept(db: Path) -> None:
    """What its writer recorded (an executable, a symbolic link), 0 where it recorded none."""
    modes = {"run.sh": 0o100755, "link": 0o120777, "dos.txt": 0}
    with CatalogBuilder(db, uri="s3://bkt/a.zip", bucket=BUCKET, prefix="", versioned=False,
                        archive=ref("a.zip"), fingerprint="f" * 64) as builder:
        for i, (name, mode) in enumerate(modes.items()):
            builder.add_member(Member(name, False, 10 * i, 10 * i + 5, 0, 0, 1, 1, 0, 9.0, mode))
        builder.add_member(Member("dir/", True, 40, 45, 0, 0, 0, 0, 0, 9.0, 0o40755))
        builder.finish()
    with Catalog.open(db) as cat:
        assert {name: cat.lookup(ROOT_INODE, name).mode for name in [*modes, "dir"]} == {
            **modes, "dir": 0}
        assert [entry.mode for entry in cat.children(ROOT_INODE)] == [*modes.values(), 0]


def test_keys_outside_prefix_are_skipped(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    summary, cat = build(db, ["data/in", "database", "other/x"], prefix="data/")
    assert summary.skipped_count == 2
    assert set(tree(cat)) == {"in"}
    assert skipped_keys(caplog) == ["database", "other/x"]


def test_prefix_must_end_with_slash(db: Path) -> None:
    with pytest.raises(ValueError, match="end with '/'"):
        build(db, ["data/x"], prefix="data")
    assert not db.exists()


def test_prefix_marker_is_ignored_silently(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    summary, cat = build(db, [ref("p/", 0, 50.0), ref("p/f", 1, 60.0)], prefix="p/")
    assert summary == CatalogSummary(1, 1, 0, 0)
    assert set(tree(cat)) == {"f"}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_markers_make_directories(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    refs = [ref("empty/", 0, 42.0), ref("deep/er/", 0, 43.0), ref("full/", 0, 1.0),
            ref("full/f", 5, 99.0)]
    summary, cat = build(db, refs)
    assert summary == CatalogSummary(object_count=1, total_bytes=5, dir_count=4, skipped_count=0)
    assert set(tree(cat)) == {"empty/", "deep/", "deep/er/", "full/", "full/f"}
    empty = resolve(cat, "empty")
    assert empty is not None
    assert empty.mtime == 42.0
    assert list(cat.children(empty.inode)) == []
    full = resolve(cat, "full")
    assert full is not None
    assert full.mtime == 99.0  # children win over the marker's own date
    assert not caplog.records


def test_marker_with_bytes_is_a_directory_and_warned(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    summary, cat = build(db, [ref("m/", 100, 7.0)])
    assert summary == CatalogSummary(object_count=0, total_bytes=0, dir_count=1, skipped_count=0)
    m = resolve(cat, "m")
    assert m is not None
    assert m.is_dir
    assert m.size == 0
    assert "'m/' has 100 bytes" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "keys",
    [
        ["a", "a!x", "a/b"],  # S3's own order: 'a' < 'a!x' < 'a/b'
        ["a/b", "a!x", "a"],
        ["a", "a/"],
        ["a/", "a"],
        ["a", "a/b/c/d"],
        ["a/b/c/d", "a"],
    ],
)
def test_directory_wins_over_file_in_either_order(
    db: Path, caplog: pytest.LogCaptureFixture, keys: list[str]
) -> None:
    sizes = {k: 10 ** i for i, k in enumerate(keys)}
    summary, cat = build(db, [ref(k, sizes[k]) for k in keys])
    assert skipped_keys(caplog) == ["a"]
    assert "a directory has the same name" in caplog.text
    winners = [k for k in keys if k != "a" and not k.endswith("/")]
    assert summary.object_count == len(winners)
    assert summary.total_bytes == sum(sizes[k] for k in winners)
    assert summary.skipped_count == 1
    a = resolve(cat, "a")
    assert a is not None
    assert a.is_dir
    for key in winners:
        entry = resolve(cat, key)
        assert entry is not None
        assert entry.ref == ref(key, sizes[key])


@pytest.mark.parametrize("batch", [1, 2, 3, 10_000])
def test_conflicts_and_duplicates_across_batches(
    db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    monkeypatch.setattr(catalog_module, "_BATCH", batch)
    refs = [ref("a", 1), ref("b", 2), ref("c", 4), ref("b", 8), ref("a/x", 16), ref("b/", 32),
            ref("c", 64), ref("d/e", 128), ref("d/e/f", 256)]
    summary, cat = build(db, refs)
    assert sorted(skipped_keys(caplog)) == ["a", "b", "b", "c", "d/e"]
    assert summary == CatalogSummary(object_count=3, total_bytes=4 + 16 + 256, dir_count=4,
                                     skipped_count=5)
    assert set(tree(cat)) == {"a/", "a/x", "b/", "c", "d/", "d/e/", "d/e/f"}
    c = resolve(cat, "c")
    assert c is not None
    assert c.size == 4  # the first listing of a repeated key is kept


@pytest.mark.parametrize("batch", [1, 2, 3, 10_000])
def test_archive_names_repeated_across_batches(
    db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """A name met again in a later batch is resolved when the build finishes: the last member
    of a name wins, and a directory wins over every member of its name, whatever the batches."""
    monkeypatch.setattr(catalog_module, "_BATCH", batch)
    names = ["a", "b", "a", "c/x", "b", "a", "a/y", "b", "d", "d", "d/"]
    archive = ref("z.zip")
    with CatalogBuilder(db, uri=archive.uri, bucket=BUCKET, prefix="", versioned=False,
                        single_object=True, archive=archive, fingerprint="f" * 64) as builder:
        for i, name in enumerate(names):
            builder.add_member(Member(name, name.endswith("/"), 10 * i, 10 * i + 5, 0, 0, i, i,
                                      i, 100.0 + i))
        summary = builder.finish()
    warned = [r.args for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(name for name, _, _ in warned) == ["a", "a", "a", "b", "b", "d", "d"]
    again, directory = "a later member has the same name", "a directory has the same name"
    assert {reason for _, _, reason in warned} == {again, directory}  # which: as batches fall
    assert {reason for name, _, reason in warned if name == "b"} == {again}
    assert summary == CatalogSummary(object_count=3, total_bytes=3 + 6 + 7, dir_count=3,
                                     skipped_count=7)
    with Catalog.open(db) as cat:
        shown = tree(cat)
        assert set(shown) == {"a/", "a/y", "b", "c/", "c/x", "d/"}
        member = shown["b"].ref
        assert isinstance(member, MemberRef)
        assert (member.header_offset, member.size) == (70, 7)  # the last "b"
        assert [e.name for e in cat.children(ROOT_INODE)] == ["c", "a", "b", "d"]  # by inode
    with sqlite3.connect(db) as raw:  # the index by name is unique, as in every catalog
        (index,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'entries_by_name'")
        assert index[0].startswith("CREATE UNIQUE INDEX")
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_directory_mtimes_are_newest_child_bottom_up(db: Path) -> None:
    refs = [ref("x/old", 1, 10.0), ref("x/y/new", 1, 30.0), ref("x/y/mid", 1, 20.0),
            ref("z/", 0, 5.0), ref("top", 1, 15.0)]
    _, cat = build(db, refs)
    mtimes = {path: e.mtime for path, e in tree(cat).items()}
    assert mtimes == {"x/": 30.0, "x/old": 10.0, "x/y/": 30.0, "x/y/new": 30.0,
                      "x/y/mid": 20.0, "z/": 5.0, "top": 15.0}
    root = cat.get(ROOT_INODE)
    assert root is not None
    assert root.mtime == 30.0


def test_a_directory_has_two_links_and_one_more_for_each_directory_in_it(db: Path) -> None:
    """As on a local disk (its name, its ".", each subdirectory's ".."): tools that count
    subdirectories by links (fts's leaf optimisation) must not take a parent for a leaf. A
    marker's directory, one a file lost to, and one only a deeper key makes all count."""
    refs = [ref("a/1"), ref("a/b/c/2"), ref("a/d/"), ref("a/e"), ref("a/e/3"), ref("f/4"),
            ref("top")]
    _, cat = build(db, refs)
    links = {path: e.links for path, e in tree(cat).items()}
    assert links == {"a/": 5, "a/1": 1, "a/b/": 3, "a/b/c/": 2, "a/b/c/2": 1, "a/d/": 2,
                     "a/e/": 2, "a/e/3": 1, "f/": 2, "f/4": 1, "top": 1}
    root = cat.get(ROOT_INODE)
    assert root is not None
    assert (root.links, root.size) == (4, 0)
    assert {e.size for e in tree(cat).values() if e.is_dir} == {0}


def test_empty_root_mtime(tmp_path: Path) -> None:
    _, cat = build(tmp_path / "a.db", [ref("p/", 0, 77.0)], prefix="p/")
    root = cat.get(ROOT_INODE)
    assert root is not None
    assert root.mtime == 77.0
    _, cat = build(tmp_path / "b.db", [])
    root = cat.get(ROOT_INODE)
    assert root is not None
    assert root.mtime == cat.meta.created
    assert cat.meta.object_count == 0


def test_strange_names_are_kept_as_names(db: Path) -> None:
    names = ["sp ace", "new\nline", "100%", "%2F", "back\\slash", "日本語", "😀", "e\u0301",
             "\u00e9", "Case", "case", "CASE", "...", ".hidden", "t\tab"]
    summary, cat = build(db, [f"dir/{n}" for n in names])
    assert summary.object_count == len(names)
    d = resolve(cat, "dir")
    assert d is not None
    assert [e.name for e in cat.children(d.inode)] == names
    for n in names:
        entry = cat.lookup(d.inode, n)
        assert entry is not None
        assert entry.ref is not None
        assert entry.ref.key == f"dir/{n}"


def test_hundred_level_deep_key(db: Path) -> None:
    key = "/".join(f"d{i}" for i in range(100)) + "/leaf"
    summary, cat = build(db, [key])
    assert summary.dir_count == 100
    entry = resolve(cat, key)
    assert entry is not None
    assert entry.ref == ref(key)
    depth = 0
    while entry.inode != ROOT_INODE:
        entry = cat.get(entry.parent)
        assert entry is not None
        depth += 1
    assert depth == 101


@pytest.mark.parametrize(("key", "prefix"), [("dir/sub/file.bin", "dir/sub/"), ("file", "")])
def test_single_object_catalog(db: Path, key: str, prefix: str) -> None:
    obj = ref(key, 123, 9.0, "ver")
    summary, cat = build(db, [obj], prefix=prefix, versioned=True)
    assert summary == CatalogSummary(object_count=1, total_bytes=123, dir_count=0, skipped_count=0)
    (entry,) = cat.children(ROOT_INODE)
    assert entry.name == key.rsplit("/", 1)[-1]
    assert entry.ref == obj
    assert cat.lookup(ROOT_INODE, entry.name) == entry


def test_children_pages_a_large_directory(db: Path) -> None:
    n = 10_000
    _, cat = build(db, (f"big/{i:05d}" for i in range(n)))
    big = resolve(cat, "big")
    assert big is not None
    listed = list(cat.children(big.inode))
    assert [e.name for e in listed] == [f"{i:05d}" for i in range(n)]
    inodes = [e.inode for e in listed]
    assert inodes == sorted(set(inodes))
    # Resume like readdir does: take a few, stop, continue after the last inode returned.
    resumed: list[int] = []
    after = 0
    while True:
        chunk = []
        for entry in cat.children(big.inode, after_inode=after):
            chunk.append(entry.inode)
            if len(chunk) == 333:
                break
        if not chunk:
            break
        resumed.extend(chunk)
        after = chunk[-1]
    assert resumed == inodes


def test_catalog_is_shared_between_threads(db: Path) -> None:
    _, cat = build(db, (f"d{i % 7}/f{i}" for i in range(700)))
    errors: list[Exception] = []

    def worker() -> None:
        try:
            for _ in range(20):
                assert len(tree(cat)) == 707
        except Exception as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_failed_build_leaves_old_catalog_and_no_temp(db: Path) -> None:
    build(db, ["old"])

    def refs() -> Iterator[ObjectRef]:
        yield ref("new")
        raise OSError("listing broke")

    with pytest.raises(OSError, match="listing broke"):
        build_catalog(db, refs(), uri="s3://bkt/", bucket=BUCKET, prefix="", versioned=False)
    assert sorted(p.name for p in db.parent.iterdir()) == [db.name]
    assert set(tree(Catalog.open(db))) == {"old"}


def test_builder_api_and_rebuild_while_open(db: Path) -> None:
    _, old = build(db, ["one"])
    with CatalogBuilder(db, uri="s3://bkt/", bucket=BUCKET, prefix="", versioned=False) as b:
        b.add(ref("two"))
        assert b.finish() == CatalogSummary(1, 1, 0, 0)
        with pytest.raises(RuntimeError):
            b.add(ref("three/x"))
    assert set(tree(old)) == {"one"}  # an open catalog keeps reading its own snapshot
    with Catalog.open(db) as new:
        assert set(tree(new)) == {"two"}


def test_ref_from_another_bucket_is_a_caller_error(db: Path) -> None:
    other = ObjectRef("other", "k", None, '"e"', 1, 1.0)
    with pytest.raises(ValueError, match="not in bucket"):
        build(db, [other])
    assert list(db.parent.iterdir()) == []


def test_open_errors(tmp_path: Path, db: Path) -> None:
    with pytest.raises(CatalogError):
        Catalog.open(tmp_path / "missing.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CatalogError):
        Catalog.open(garbage)
    build(db, ["x"])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = 999 WHERE name = 'format_version'")
    with pytest.raises(CatalogError, match="format 999"):
        Catalog.open(db)


# --- property: whatever the keys, the tree is safe and every showable file is reachable ---

_SEGMENTS = st.sampled_from(
    ["a", "b", "A", "a b", "é", "%", "\\", "\n", "", ".", "..", "\0", "x" * 256, ".h", "日"]
)
_REL_KEYS = st.builds(
    lambda segs, slash: "/".join(segs) + slash,
    st.lists(_SEGMENTS, min_size=1, max_size=4),
    st.sampled_from(["", "", "/"]),
)
_KEYS = st.builds(lambda pre, rel: pre + rel, st.sampled_from(["p/", "p/", "q/"]), _REL_KEYS)


def _safe(segment: str) -> bool:
    return segment not in ("", ".", "..") and "\0" not in segment and len(segment.encode()) <= 255


def _expected(keys: list[str]) -> tuple[set[tuple[str, ...]], dict[tuple[str, ...], str], int]:
    """An independent model: (directories, files -> key, skipped count) for prefix 'p/'."""
    dirs: set[tuple[str, ...]] = set()
    files: dict[tuple[str, ...], str] = {}
    skipped = 0
    for key in keys:
        rel = key[2:] if key.startswith("p/") else None
        if rel == "":
            continue
        body = rel[:-1] if rel is not None and rel.endswith("/") else rel
        segs = tuple(body.split("/")) if body is not None else ()
        if body is None or not all(map(_safe, segs)):
            skipped += 1
            continue
        stop = len(segs) + 1 if rel is not None and rel.endswith("/") else len(segs)
        dirs.update(segs[:i] for i in range(1, stop))
        if stop == len(segs):
            files[segs] = key
    lost = [segs for segs in files if segs in dirs]
    for segs in lost:
        del files[segs]
    return dirs, files, skipped + len(lost)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_KEYS, unique=True, max_size=25), st.booleans())
def test_property_tree_is_safe_and_complete(keys: list[str], s3_order: bool) -> None:
    if s3_order:
        keys = sorted(keys, key=lambda k: k.encode())
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "c.db"
            summary, cat = build(path, [ref(k, len(k), float(i)) for i, k in enumerate(keys)],
                                 prefix="p/")
            with cat, sqlite3.connect(path) as raw:
                inodes = [row[0] for row in raw.execute("SELECT inode FROM entries")]
                _check_catalog(cat, inodes, keys, summary)
    finally:
        logging.disable(logging.NOTSET)


def _check_catalog(cat: Catalog, inodes: list[int], keys: list[str], summary: CatalogSummary
                   ) -> None:
    dirs, files, skipped = _expected(keys)
    paths: set[tuple[str, ...]] = set()
    for inode in inodes:  # every row, reachable or not, must walk up to the root safely
        entry, names = cat.get(inode), []
        while entry is not None and entry.inode != ROOT_INODE and len(names) <= 10:
            names.append(entry.name)
            entry = cat.get(entry.parent)
        assert entry is not None
        assert entry.inode == ROOT_INODE
        assert all(map(_safe, names))
        if names:
            paths.add(tuple(reversed(names)))
    assert paths == dirs | set(files)
    for segs, key in files.items():
        entry = resolve(cat, "/".join(segs))
        assert entry is not None
        assert entry.ref == ref(key, len(key), float(keys.index(key)))
    assert summary == CatalogSummary(len(files), sum(len(k) for k in files.values()), len(dirs),
                                     skipped)


# --- scale smoke test ---


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def test_scale_smoke_200k_keys(db: Path) -> None:
    n = 200_000

    def refs() -> Iterator[ObjectRef]:
        for i in range(n):
            yield ObjectRef(BUCKET, f"train/shard-{i // 1000:04d}/sample-{i:07d}.tar", "v" * 32,
                            '"0123456789abcdef0123456789abcdef"', 1000, 1.7e9 + i)

    before = _rss_kib("VmRSS")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak_rss()
    start = time.perf_counter()
    summary = build_catalog(db, refs(), uri="s3://bkt/", bucket=BUCKET, prefix="", versioned=True)
    elapsed = time.perf_counter() - start
    if exact:
        growth_kib = _rss_kib("VmHWM") - before
    else:  # ru_maxrss only shows growth beyond the process's earlier peak
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert summary == CatalogSummary(n, 1000 * n, 201, 0)
    assert elapsed < 15, elapsed  # ~1 s on a 2-core machine; lenient for loaded CI
    assert growth_kib < 50 * 1024, growth_kib
    with Catalog.open(db) as cat:
        entry = resolve(cat, "train/shard-0123/sample-0123456.tar")
        assert entry is not None
        assert entry.mtime == 1.7e9 + 123456


def test_scale_smoke_archive_of_200k_members(db: Path) -> None:
    """A member's place in the zip goes into the database with its row, as the build goes: the
    builder keeps nothing per member (it held them all until the end: +76 MiB here)."""
    n = 200_000
    archive = ObjectRef(BUCKET, "train.zip", None, '"e"', 10**9, 1.7e9)

    def members() -> Iterator[Member]:
        for i in range(n):
            name = f"train/n{i // 1000:08d}/n{i // 1000:08d}_{i:07d}.JPEG"
            yield Member(name, False, 100 * i, 100 * i + 90, 0, 0, 10, 10, i, 1.7e9 + i)

    before = _rss_kib("VmRSS")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = _reset_peak_rss()
    with CatalogBuilder(db, uri=archive.uri, bucket=BUCKET, prefix="", versioned=False,
                        single_object=True, archive=archive, fingerprint="f" * 64) as builder:
        for member in members():
            builder.add_member(member)
        summary = builder.finish()
    if exact:
        growth_kib = _rss_kib("VmHWM") - before
    else:  # ru_maxrss only shows growth beyond the process's earlier peak
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert summary == CatalogSummary(n, 10 * n, 201, 0)
    assert growth_kib < 40 * 1024, growth_kib  # ~22 MiB: the page cache, one batch
    with Catalog.open(db) as cat:
        entry = resolve(cat, "train/n00000123/n00000123_0123456.JPEG")
        assert entry is not None
        assert entry.ref == MemberRef(archive, "train/n00000123/n00000123_0123456.JPEG",
                                      12345600, 12345690, 0, 0, 10, 10, 123456, 1.7e9 + 123456)


# --- damage past the meta table: met by a query, not by the open ---


def garble_all_but_the_meta(path: Path) -> None:
    """Overwrite every page but the schema's (page 1) and the meta table's root: ``open`` still
    reads the file, every other query meets damage."""
    with sqlite3.connect(path) as conn:
        (meta_page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = path.stat().st_size // page_size
    with open(path, "r+b") as file:
        for page in range(2, pages + 1):
            if page != meta_page:
                file.seek((page - 1) * page_size)
                file.write(b"\xa5" * page_size)


def test_damage_past_the_meta_fails_each_query_and_tells_once(db: Path) -> None:
    build(db, [f"d{i % 20}/f{i}" for i in range(3000)])[1].close()
    garble_all_but_the_meta(db)
    told: list[int] = []
    with Catalog.open(db) as cat:
        cat.on_damage = lambda: told.append(1) or []
        assert cat.meta.object_count == 3000
        for query in (lambda: cat.lookup(ROOT_INODE, "d1"), lambda: list(cat.children(1)),
                      lambda: cat.get(5), lambda: list(cat.objects()), cat.first_file,
                      lambda: list(cat.files())):
            with pytest.raises(CatalogDamaged, match=r"is damaged \(database disk image is "
                               r"malformed\): unmount and mount again to build it anew"):
                query()
    assert told == [1]


def test_remove_copies_removes_the_catalogs_own_links_only(tmp_path: Path, db: Path) -> None:
    build(db, ["a"])[1].close()
    link, other = tmp_path / "link.db", tmp_path / "other.db"
    os.link(db, link)
    build(other, ["a"])[1].close()  # the same content in another file
    with Catalog.open(link) as cat:
        assert cat.remove_copies([db, other, tmp_path / "missing.db"]) == [db]
        assert cat.get(ROOT_INODE) is not None  # its own open file reads on
    assert [p.exists() for p in (link, other, db)] == [True, True, False]


def test_errors_that_are_not_damage_keep_their_meaning(db: Path) -> None:
    cat = build(db, ["a"])[1]
    cat._db.close()  # as after close(): a caller's mistake, not the file's
    with pytest.raises(sqlite3.ProgrammingError):
        cat.get(ROOT_INODE)
