"""The catalog against a plain model of what it must show, for any sequence of keys or members.

The model reads the README's rules ("Unsafe keys", "Snapshot files and fingerprints") as plainly
as possible: split each key on "/", refuse unsafe segments, let a directory beat a file of its
name, keep a listing's first ref of a repeated key and an archive's last member of a repeated
name, and fingerprint the objects shown by hashing their sorted canonical lines (``json.dumps``
here, not ``fingerprint.canonical_line``). The builder is then checked through every query a
mount or a snapshot uses: lookup, children, get, objects, files, first_file and the stored meta.
Batches are made tiny so that repeats and clashes cross them, and keys arrive in S3's order or
shuffled, so both the running fingerprint and the sorted fallback are exercised. Snapshot files
are written from the model and loaded: a strict build must refuse, at the model's line, exactly
what a lenient one would skip.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3datafs import catalog as catalog_module
from s3datafs import fingerprint as fingerprint_module
from s3datafs.archive.zipformat import NO_TIME, Member
from s3datafs.catalog import ROOT_INODE, Catalog, CatalogBuilder, CatalogSummary, UnshowableKey
from s3datafs.model import MemberRef, ObjectRef, normalize_etag
from s3datafs.snapshot import FORMAT, SnapshotError, load_snapshot

BUCKET = "bkt"
PREFIX = "p/"
ARCHIVE = ObjectRef(BUCKET, "p/z.zip", None, '"zip-etag"', 10**9, 1_600_000_000.0)
ARCHIVE_FINGERPRINT = "ab" * 32

# Segments chosen to collide and to sit on every rule's edge: "a" and "a!b" and "a.b" sort
# between the file "a" and the directory "a/" ("!" and "." come before "/"); 255 bytes is the
# limit (127 two-byte characters and one more byte); astral characters are four UTF-8 bytes and
# sort after every BMP character, as their UTF-8 bytes do; NUL, "." and ".." are refused.
_SAFE = ["a", "b", "a!b", "a.b", "a b", "ab", "é", "日", "\U0001d11e", "\U0010ffff", "\uffff",
         "\x7f", "\n", "%2F", "\\", "é" * 127 + "x"]
_UNSAFE = ["", ".", "..", "a\0b", "é" * 128, "x" * 256, "\ud800"]


def _relative_keys(segments: list[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda parts, slash: "/".join(parts) + slash,
                     st.lists(st.sampled_from(segments), min_size=1, max_size=4),
                     st.sampled_from(["", "", "/"]))


_RELATIVE = _relative_keys(["a"] * 4 + _SAFE * 2 + _UNSAFE)
_SHOWABLE = _relative_keys(["a"] * 4 + _SAFE)  # for strict builds, which stop at the first skip
_KEYS = st.one_of(
    st.builds(lambda rel: PREFIX + rel, _RELATIVE),
    st.sampled_from([PREFIX, "q/a", "p", "p//a", "/p/a"]),  # the root marker; outside the prefix
)
_TEXT = st.text(st.characters(codec="utf-8"), max_size=4)  # versions and ETags: NUL, astral...
_EDGE = st.sampled_from(["", "", " ", "\t"])
_BATCHES = st.sampled_from([1, 2, 3, 5, 10_000])


def _safe(segment: str) -> bool:
    try:
        size = len(segment.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return segment not in ("", ".", "..") and "\0" not in segment and size <= 255


def _split(relative: str) -> tuple[tuple[str, ...], bool] | None:
    """(segments, is a marker) of a relative key; None if unsafe. "" is the root's marker."""
    if relative == "":
        return (), True
    marker = relative.endswith("/")
    segments = tuple((relative[:-1] if marker else relative).split("/"))
    return (segments, marker) if all(map(_safe, segments)) else None


@dataclass
class Model:
    """What the mount must show: files and markers by path, with when they arrived."""

    dirs: set[tuple[str, ...]] = field(default_factory=set)
    files: dict[tuple[str, ...], tuple[int, ObjectRef]] = field(default_factory=dict)
    markers: dict[tuple[str, ...], ObjectRef] = field(default_factory=dict)
    skipped: int = 0

    def shown(self) -> list[ObjectRef]:
        """Every object shown, in key order (UTF-8 bytes)."""
        refs = [ref for _, ref in self.files.values()] + list(self.markers.values())
        return sorted(refs, key=lambda ref: ref.key.encode("utf-8"))

    def fingerprint(self) -> str:
        lines = (json.dumps([r.key, r.version_id, r.etag.strip('"'), r.size], ensure_ascii=False,
                            separators=(",", ":")) + "\n" for r in self.shown())
        return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()

    def summary(self) -> CatalogSummary:
        return CatalogSummary(len(self.files), sum(r.size for _, r in self.files.values()),
                              len(self.dirs), self.skipped)


def model_of(paths: list[tuple[str | None, ObjectRef]], *, keep_last: bool) -> Model:
    """The model for ``(relative path or None if outside, ref)`` in arrival order."""
    model = Model()
    for arrival, (relative, ref) in enumerate(paths):
        split = None if relative is None else _split(relative)
        if split is None:
            model.skipped += 1
            continue
        segments, marker = split
        made = segments if marker else segments[:-1]
        model.dirs.update(made[:i] for i in range(1, len(made) + 1))
        if marker:
            if segments in model.markers:
                model.skipped += 1
            else:
                model.markers[segments] = ref
        elif segments in model.files:
            model.skipped += 1
            if keep_last:
                model.files[segments] = (arrival, ref)
        else:
            model.files[segments] = (arrival, ref)
    for lost in [segments for segments in model.files if segments in model.dirs]:
        del model.files[lost]
        model.skipped += 1
    return model


def walk(cat: Catalog) -> dict[tuple[str, ...], catalog_module.Entry]:
    """Every entry below the root by path, through children() and checked against lookup()."""
    out: dict[tuple[str, ...], catalog_module.Entry] = {}
    pending = [((), ROOT_INODE)]
    while pending:
        path, inode = pending.pop()
        inodes = []
        for entry in cat.children(inode):
            assert entry.parent == inode
            assert cat.lookup(inode, entry.name) == entry == cat.get(entry.inode)
            inodes.append(entry.inode)
            out[(*path, entry.name)] = entry
            if entry.is_dir:
                pending.append(((*path, entry.name), entry.inode))
        assert inodes == sorted(inodes)
    return out


def mtimes(model: Model) -> dict[tuple[str, ...], float]:
    """A file's mtime is its ref's; a directory's its newest direct child's (bottom up), else
    its marker's."""
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for path in [*model.dirs, *model.files]:
        children.setdefault(path[:-1], []).append(path)
    out = {path: ref.last_modified for path, (_, ref) in model.files.items()}
    for path in sorted(model.dirs, key=len, reverse=True):
        if path in children:
            out[path] = max(out[child] for child in children[path])
        else:
            out[path] = model.markers[path].last_modified
    return out


def links(model: Model) -> dict[tuple[str, ...], int]:
    """A file has one link; a directory two, and one more for each directory in it. The root
    is ``()``."""
    out = dict.fromkeys(model.files, 1) | dict.fromkeys([(), *model.dirs], 2)
    for path in model.dirs:
        out[path[:-1]] += 1
    return out


def row_count(path: Path) -> int:
    """The rows of the entries table: a row no walk reaches would still answer get()."""
    with contextlib.closing(sqlite3.connect(path)) as raw:
        return raw.execute("SELECT count(*) FROM entries").fetchone()[0]


def check_tree(
    cat: Catalog, path: Path, model: Model, summary: CatalogSummary
) -> dict[tuple[str, ...], catalog_module.Entry]:
    """What every catalog must show of its model: totals, rows, names, mtimes, links; the
    entries."""
    assert summary == model.summary()
    assert row_count(path) == 1 + len(model.dirs) + len(model.files)
    shown = walk(cat)
    assert set(shown) == model.dirs | set(model.files)
    assert all(shown[segments].is_dir for segments in model.dirs)
    assert {segments: entry.mtime for segments, entry in shown.items()} == mtimes(model)
    root = cat.get(ROOT_INODE)
    assert root is not None
    assert {(): root.links} | {s: entry.links for s, entry in shown.items()} == links(model)
    return shown


def check_listing(path: Path, model: Model, summary: CatalogSummary) -> None:
    with Catalog.open(path) as cat:
        shown = check_tree(cat, path, model, summary)
        for segments, (_, ref) in model.files.items():
            assert shown[segments].ref == ref
        assert list(cat.objects()) == model.shown()
        files = list(cat.files())
        by_key = sorted((r for _, r in model.files.values()), key=lambda r: r.key)
        assert sorted(files, key=lambda r: r.key) == by_key
        first = min(model.files.values(), key=lambda item: item[0], default=(0, None))[1]
        assert cat.first_file() == first
        assert files[:1] == ([] if first is None else [first])  # both: the lowest inode
        meta = cat.meta
        assert meta.fingerprint == model.fingerprint()
        assert (meta.object_count, meta.total_bytes, meta.dir_count, meta.skipped_count) == (
            summary.object_count, summary.total_bytes, summary.dir_count, summary.skipped_count)
        assert meta.marker_count == len(model.markers)


@st.composite
def listings(draw: st.DrawFn, showable: bool = False) -> list[ObjectRef]:
    """Keys (repeats allowed) with refs of their own (up to S3's 5 TiB), in S3's order or
    shuffled; ``showable``: keys a strict build takes, but for one now and then."""
    if showable:
        keys = draw(st.lists(st.builds(lambda rel: PREFIX + rel, _SHOWABLE), max_size=30))
        if draw(st.integers(0, 3)) == 0:
            keys.append(draw(_KEYS))
    else:
        keys = draw(st.lists(_KEYS, max_size=30))
    refs = [ObjectRef(BUCKET, key, draw(st.none() | _TEXT), draw(_TEXT) or '"e"',
                      draw(st.integers(0, 5 * 2**40) | st.integers(0, 9)), float(i))
            for i, key in enumerate(keys)]
    order = draw(st.sampled_from(["s3", "s3", "shuffled", "s3-one-moved"]))
    if order == "s3":
        refs.sort(key=lambda r: r.key.encode("utf-8", "surrogatepass"))
    elif order == "shuffled":
        refs = draw(st.permutations(refs))
    elif refs:
        refs.sort(key=lambda r: r.key.encode("utf-8", "surrogatepass"))
        refs.append(refs.pop(draw(st.integers(0, len(refs) - 1))))  # the running one fails late
    return refs


@pytest.fixture(autouse=True)
def _quiet_warnings() -> Iterator[None]:
    """Every skip logs a warning: hundreds of examples would fill the captured log."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _relative(key: str) -> str | None:
    return key[len(PREFIX):] if key.startswith(PREFIX) else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listings(), _BATCHES)
def test_a_listing_shows_what_the_model_shows(refs: list[ObjectRef], batch: int) -> None:
    model = model_of([(_relative(r.key), r) for r in refs], keep_last=False)
    with tempfile.TemporaryDirectory() as tmp, _batch_of(batch):
        path = Path(tmp) / "c.db"
        with CatalogBuilder(path, uri=f"s3://{BUCKET}/{PREFIX}", bucket=BUCKET, prefix=PREFIX,
                            versioned=False) as builder:
            for ref in refs:
                builder.add(ref)
            summary = builder.finish()
        check_listing(path, model, summary)


class _batch_of:  # noqa: N801 - used as a context manager, like contextlib's
    """Set the builder's batch size for one example (hypothesis shares no fixture per example)."""

    def __init__(self, batch: int) -> None:
        self._batch = batch

    def __enter__(self) -> None:
        self._saved = catalog_module._BATCH
        catalog_module._BATCH = self._batch

    def __exit__(self, *exc_info: object) -> None:
        catalog_module._BATCH = self._saved


# --- archives ---------------------------------------------------------------------------------

_MEMBER_NAMES = st.one_of(
    st.builds(lambda rel: rel, _RELATIVE),
    st.sampled_from(["/a", "C:/a", "c:x", "a\\b", "", "a/"]),  # archive-only refusals; the root
)


@st.composite
def members(draw: st.DrawFn) -> list[Member]:
    names = draw(st.lists(_MEMBER_NAMES, max_size=30))
    return [Member(name, name.endswith("/"), 100 * i, 100 * i + 50, 8, 0, 40 + i, i,
                   i * 7, draw(st.sampled_from([NO_TIME, 1_700_000_000.0 + i])))
            for i, name in enumerate(names)]


def _archive_problem(name: str) -> bool:
    return (name.startswith("/") or "\\" in name
            or (len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members(), _BATCHES)
def test_an_archive_shows_what_the_model_shows(entries: list[Member], batch: int) -> None:
    """Members keep the archive's order; the last of a name wins, a directory beats them all."""
    def as_ref(member: Member) -> ObjectRef:  # the model's view of a member: its time, its name
        mtime = ARCHIVE.last_modified if member.mtime == NO_TIME else member.mtime
        return ObjectRef(BUCKET, member.name, None, "", member.size, mtime)

    model = model_of([(None if _archive_problem(m.name) else m.name, as_ref(m)) for m in entries],
                     keep_last=True)
    by_offset = {m.header_offset: m for m in entries}
    with tempfile.TemporaryDirectory() as tmp, _batch_of(batch):
        path = Path(tmp) / "c.db"
        with CatalogBuilder(path, uri=ARCHIVE.uri, bucket=BUCKET, prefix="", versioned=False,
                            single_object=True, archive=ARCHIVE,
                            fingerprint=ARCHIVE_FINGERPRINT) as builder:
            for member in entries:
                builder.add_member(member)
            summary = builder.finish()
        with Catalog.open(path) as cat:
            shown = check_tree(cat, path, model, summary)
            for segments, (arrival, ref) in model.files.items():
                member = entries[arrival]
                got = shown[segments].ref
                assert isinstance(got, MemberRef)
                assert got == MemberRef(ARCHIVE, member.name, member.header_offset,
                                        member.data_limit, member.method, member.flags,
                                        member.compressed_size, member.size, member.crc32,
                                        ref.last_modified)
                assert by_offset[got.header_offset] is member
            assert list(cat.objects()) == [ARCHIVE]
            assert cat.first_file() is None
            assert sorted(r.header_offset for r in cat.files()) == sorted(
                entries[arrival].header_offset for arrival, _ in model.files.values())
            assert cat.meta.fingerprint == ARCHIVE_FINGERPRINT
            assert cat.meta.skipped_count == model.skipped


# --- snapshot files: strict builds ----------------------------------------------------------------


def _snapshot_lines(refs: list[ObjectRef], model: Model, *, fingerprint: str) -> list[str]:
    header = {"format": FORMAT, "uri": f"s3://{BUCKET}/{PREFIX}", "bucket": BUCKET,
              "prefix": PREFIX, "single_object": False, "name": "t",
              "created": "2024-05-01T12:00:00.000Z", "as_of": None, "versioned": True,
              "object_count": len(model.files), "marker_count": len(model.markers),
              "total_bytes": sum(r.size for _, r in model.files.values()), "skipped_count": 0,
              "fingerprint": fingerprint,
              "fields": ["key", "version_id", "etag", "size", "last_modified"]}
    records = [[r.key, r.version_id, r.etag.strip('"'), r.size, r.last_modified] for r in refs]
    return [json.dumps(header), *(json.dumps(record, ensure_ascii=False) for record in records)]


def _refusal(refs: list[ObjectRef]) -> tuple[int, str] | None:
    """(line, what the message says) of the first line a snapshot load must refuse, else None.

    Line 1 is the header. A key must sort after the one before it; then it must be one a
    lenient build would show, and must not make a directory of a file shown before it.
    """
    model = Model()
    for number, ref in enumerate(refs, start=2):
        if number > 2 and ref.key <= refs[number - 3].key:
            return number, f"line {number}: keys out of order: key {ref.key!r} does not sort after"
        relative = _relative(ref.key)
        split = None if relative is None else _split(relative)
        if relative is None:
            return number, f"line {number}: key {ref.key!r} is not under the prefix"
        if split is None:
            return number, f"line {number}: key {ref.key!r} cannot be shown: "
        segments, marker = split
        made = segments if marker else segments[:-1]
        for i in range(1, len(made) + 1):
            if made[:i] in model.files:
                key = PREFIX + "/".join(made[:i])
                return number, (f"line {number}: key {key!r} cannot be shown: "
                                "a directory has the same name")
            model.dirs.add(made[:i])
        if not marker and segments in model.dirs:  # (cannot come after its directory in order)
            return number, f"line {number}: key {ref.key!r} cannot be shown: "
        if not marker:
            model.files[segments] = (number, ref)
    return None


_SNAPSHOT_KEYS = st.builds(lambda rel: PREFIX + rel, _SHOWABLE)
# Now and then one that cannot be shown (the checker refuses NUL and invalid UTF-8 itself).
_UNSHOWABLE_KEYS = st.builds(lambda rel: PREFIX + rel, _RELATIVE).filter(
    lambda key: "\ud800" not in key and "\0" not in key)


@st.composite
def snapshot_refs(draw: st.DrawFn) -> list[ObjectRef]:
    keys = draw(st.lists(_SNAPSHOT_KEYS, max_size=25, unique=True))
    if draw(st.integers(0, 3)) == 0:
        keys = list({*keys, draw(_UNSHOWABLE_KEYS)})
    if draw(st.booleans()):
        keys = list({*keys, PREFIX})  # the root's marker
    keys.sort(key=lambda key: key.encode("utf-8"))
    if keys and draw(st.integers(0, 4)) == 0:  # now and then, one line out of its place
        keys.insert(draw(st.integers(0, len(keys))), keys.pop(draw(st.integers(0, len(keys) - 1))))
    # ETags as a listing pins what a store sends (listing.pinnable_etag): white space inside
    # the quotes is kept.
    return [ObjectRef(BUCKET, key, draw(_TEXT.filter(bool)),
                      normalize_etag(f'"{draw(_EDGE)}{draw(_TEXT)}e{draw(_EDGE)}"'),
                      draw(st.integers(0, 9)), float(i)) for i, key in enumerate(keys)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshot_refs(), _BATCHES)
def test_a_snapshot_loads_as_the_model_or_is_refused_at_the_models_line(
    refs: list[ObjectRef], batch: int
) -> None:
    """A strict build refuses, at its line, whatever a lenient build of the same keys would skip
    or reorder; what it accepts is exactly the lenient build, fingerprint and all."""
    model = model_of([(_relative(r.key), r) for r in refs], keep_last=False)
    refusal = _refusal(refs)
    lines = _snapshot_lines(refs, model, fingerprint=model.fingerprint())
    with tempfile.TemporaryDirectory() as tmp, _batch_of(batch):
        file, path = Path(tmp) / "s.gz", Path(tmp) / "c.db"
        file.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
        if refusal is not None:
            number, fragment = refusal
            with pytest.raises(SnapshotError) as refused:
                load_snapshot(file, path)
            assert fragment in str(refused.value)
            assert "\n" not in str(refused.value)  # one line: keys are named by repr
            assert not path.exists()
            assert list(Path(tmp).iterdir()) == [file]
            return
        assert model.skipped == 0
        loaded = load_snapshot(file, path)
        check_listing(path, model, loaded.summary)
        assert loaded.first_file == (min(model.files.values(), key=lambda item: item[0])[1]
                                     if model.files else None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(listings(showable=True), _BATCHES)
def test_a_strict_build_refuses_what_a_lenient_one_skips(
    refs: list[ObjectRef], batch: int
) -> None:
    """The builder on its own (no snapshot checker in front): keys that a lenient build shows
    all of, in strictly increasing order, build the same catalog; any other sequence is
    refused with UnshowableKey before the catalog is in place (out of order too: its running
    fingerprint is then the catalog's, which a snapshot's is checked against)."""
    model = model_of([(_relative(r.key), r) for r in refs], keep_last=False)
    in_order = all(a.key < b.key for a, b in zip(refs, refs[1:], strict=False))
    showable = model.skipped == 0
    with tempfile.TemporaryDirectory() as tmp, _batch_of(batch):
        path = Path(tmp) / "c.db"
        with CatalogBuilder(path, uri=f"s3://{BUCKET}/{PREFIX}", bucket=BUCKET, prefix=PREFIX,
                            versioned=False, strict=True) as builder:
            try:
                for ref in refs:
                    builder.add(ref)
                summary = builder.finish()
            except UnshowableKey:
                assert not (showable and in_order)
                assert not path.exists()
                return
        assert showable
        assert in_order
        check_listing(path, model, summary)


def _write_snapshot(path: Path, refs: list[ObjectRef]) -> None:
    """A snapshot file of ``refs`` in the order given, its header true to the objects shown."""
    model = model_of([(_relative(r.key), r) for r in refs], keep_last=False)
    lines = _snapshot_lines(refs, model, fingerprint=model.fingerprint())
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))


def _ref(key: str, n: int = 0) -> ObjectRef:
    return ObjectRef(BUCKET, key, f"v{n}", f'"{n:032x}"', n, 1_700_000_000.0 + n)


@pytest.mark.parametrize("batch", [2, 10_000])
def test_a_snapshot_file_whose_directory_comes_batches_after_its_file_is_refused_at_its_line(
    tmp_path: Path, batch: int
) -> None:
    """"p/a", then names that sort between it and "p/a/" (more than a batch of them), then
    "p/a/x": the directory is met with the file long stored, and refused at its own line."""
    refs = [_ref("p/a"), *(_ref(f"p/a!{i}", i) for i in range(5)), _ref("p/a/x", 9)]
    _write_snapshot(tmp_path / "s.gz", refs)
    with _batch_of(batch), pytest.raises(SnapshotError) as refused:
        load_snapshot(tmp_path / "s.gz", tmp_path / "c.db")
    assert "line 8: key 'p/a' cannot be shown: a directory has the same name; " in str(
        refused.value)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "s.gz"]


def test_out_of_order_lines_are_refused_at_the_first_even_when_sorted_they_are_the_header(
    tmp_path: Path,
) -> None:
    """The header's fingerprint and counts are those of the objects sorted: a loader that sorted
    (or fingerprinted the catalog's rows) would take the file; the order is part of the format."""
    refs = [_ref("p/a", 1), _ref("p/c", 2), _ref("p/b", 3), _ref("p/d", 4)]
    _write_snapshot(tmp_path / "s.gz", refs)
    with pytest.raises(SnapshotError) as refused:
        load_snapshot(tmp_path / "s.gz", tmp_path / "c.db")
    assert "line 4: keys out of order: key 'p/b' does not sort after 'p/c'; " in str(refused.value)
    _write_snapshot(tmp_path / "s.gz", sorted(refs, key=lambda r: r.key))
    assert load_snapshot(tmp_path / "s.gz", tmp_path / "c.db").summary.object_count == 4


def test_a_snapshot_is_hashed_once_and_its_fingerprint_is_the_catalogs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each object line is encoded for the fingerprint once, by the builder as it stores it (the
    checker hashed every line again: ~0.9 s a million); a header naming another fingerprint is
    refused naming the catalog's, which is the model's."""
    refs = [_ref("p/", 0), *(_ref(f"p/d{i % 3}/f{i}", i) for i in range(10))]
    refs.sort(key=lambda r: r.key)
    _write_snapshot(tmp_path / "s.gz", refs)
    encoded: list[str] = []
    real = fingerprint_module.canonical_line

    def counted(key: str, version_id: str | None, etag: str, size: int) -> bytes:
        encoded.append(key)
        return real(key, version_id, etag, size)

    monkeypatch.setattr(fingerprint_module, "canonical_line", counted)
    loaded = load_snapshot(tmp_path / "s.gz", tmp_path / "c.db")
    assert encoded == [r.key for r in refs]
    model = model_of([(_relative(r.key), r) for r in refs], keep_last=False)
    with Catalog.open(tmp_path / "c.db") as cat:
        assert cat.meta.fingerprint == loaded.header.fingerprint == model.fingerprint()
    lines = _snapshot_lines(refs, model, fingerprint="0" * 64)
    (tmp_path / "s.gz").write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    with pytest.raises(SnapshotError) as refused:
        load_snapshot(tmp_path / "s.gz", tmp_path / "other.db")
    assert (f"its objects have fingerprint {model.fingerprint()}, its header says {'0' * 64}; "
            in str(refused.value))
    assert not (tmp_path / "other.db").exists()
