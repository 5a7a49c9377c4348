"""archive.index: which single objects mount as zip members, their persistent member catalogs.

A pinned single-object catalog is built as pinning does (``build_catalog(single_object=True)``);
``archive_catalog`` is then given it, a FakeSource and a cache directory.
"""

from __future__ import annotations

import calendar
import io
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
from fakes import FakeSource
from test_catalog import tree
from zipcraft import append_member, header_offset, make_zip, patch, sample_bytes, to_zip64

from s3datafs import catalog as catalog_module
from s3datafs.archive import index, zipformat
from s3datafs.archive.index import archive_catalog, clear_indexes, parse_archive_mode, read_index
from s3datafs.archive.members import MemberSource
from s3datafs.cache.blockfile import object_digest
from s3datafs.catalog import Catalog, build_catalog
from s3datafs.errors import ArchiveError, UsageError
from s3datafs.model import MemberRef, ObjectRef
from s3datafs.uri import parse_s3_uri

BUCKET = "bkt"
MEMBERS = {
    "train/a/1.txt": b"first member\n",
    "train/a/2.bin": sample_bytes(2, 70_000),
    "train/b/deep/3.bin": sample_bytes(3, 150_000),
    "train/empty.txt": b"",
    "labels.csv": b"".join(b"%d,%d\n" % (i, i % 10) for i in range(3000)),
    "with space & \u00fc.txt": b"unicode name\n",
}
DIRECTORIES = ("empty-dir/", "d/sub/", "train/")
FILE_TIME = float(calendar.timegm((2021, 5, 6, 7, 8, 10)))  # make_zip's member time, as UTC
DIR_TIME = float(calendar.timegm((2020, 1, 2, 3, 4, 6)))  # make_zip's directory time
AS_FILE = "; mount it with --archive=file to see the object as one file"


class World:
    """A FakeSource with one bucket, pinned catalogs in ``tmp``, a cache directory."""

    def __init__(self, tmp: Path, *, versioned: bool = False) -> None:
        self.source = FakeSource()
        self.source.create_bucket(BUCKET, versioned=versioned)
        self.tmp = tmp
        self.cache_dir = tmp / "cache"
        self._pins = 0

    def put(self, key: str, data: bytes) -> ObjectRef:
        return self.source.put(BUCKET, key, data)

    def pinned(self, ref: ObjectRef) -> Catalog:
        """The single-object catalog a mount of ``ref`` pins (fresh objects on every call)."""
        self._pins += 1
        parent = ref.key.rpartition("/")[0]
        path = self.tmp / f"pinned-{self._pins}.db"
        build_catalog(path, [ref], uri=ref.uri, bucket=BUCKET,
                      prefix=parent + "/" if parent else "",
                      versioned=ref.version_id is not None, single_object=True)
        return Catalog.open(path)

    def members(self, ref: ObjectRef, mode: str = "auto") -> Catalog | None:
        return archive_catalog(self.source, self.pinned(ref), mode, self.cache_dir)

    def index_path(self, ref: ObjectRef) -> Path:
        return self.cache_dir / "archives" / f"{object_digest(ref)}.db"

    def reset(self) -> None:
        self.source.calls.clear()
        self.source.ranges.clear()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def expected_paths(members: dict[str, bytes], directories: tuple[str, ...] = ()) -> set[str]:
    paths = set()
    for name in [*members, *directories]:
        parts = name.rstrip("/").split("/")
        paths.update("/".join(parts[:depth]) + "/" for depth in range(1, len(parts)))
        paths.add(name)
    return paths


def skip_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("skipping member")]


# -- a .zip key ------------------------------------------------------------------------------------


def test_zip_key_mounts_as_its_member_tree(world: World) -> None:
    body = make_zip(MEMBERS, methods=(zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED),
                    directories=DIRECTORIES)
    ref = world.put("data/mnist.zip", body)
    pinned = world.pinned(ref)
    members = archive_catalog(world.source, pinned, "auto", world.cache_dir)
    assert members is not None
    found = tree(members)
    assert set(found) == expected_paths(MEMBERS, DIRECTORIES)
    reader = MemberSource(world.source)
    by_name = {m.name: m for m in read_index(world.source, ref)[0]}
    for name, data in MEMBERS.items():
        entry = found[name]
        assert isinstance(entry.ref, MemberRef)
        assert (entry.size, entry.mtime, entry.is_dir) == (len(data), FILE_TIME, False)
        m = by_name[name]
        assert entry.ref == MemberRef(ref, name, m.header_offset, m.data_limit, m.method,
                                      m.flags, m.compressed_size, m.size, m.crc32, m.mtime)
        if data:
            assert reader.get_range(entry.ref, 0, len(data)) == data
    meta = members.meta
    assert (meta.archive, meta.single_object, meta.bucket, meta.prefix) == (ref, True, BUCKET, "")
    assert (meta.object_count, meta.total_bytes) == (len(MEMBERS), sum(map(len,
                                                                           MEMBERS.values())))
    assert meta.fingerprint == pinned.meta.fingerprint
    assert list(members.objects()) == [ref]
    assert world.index_path(ref).exists()


def test_index_costs_one_get_of_the_tail(world: World) -> None:
    ref = world.put("d.zip", make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED,)))
    world.reset()
    assert world.members(ref) is not None
    assert world.source.ranges == [(ref, 0, ref.size)]  # smaller than TAIL_BYTES: all of it


def test_directory_entries_are_directories_with_their_zip_time(world: World) -> None:
    ref = world.put("d.zip", make_zip({"a/f.txt": b"f", "top.txt": b"t"},
                                      directories=("empty-dir/", "d/sub/", "a/")))
    members = world.members(ref)
    assert members is not None
    found = tree(members)
    assert set(found) == {"empty-dir/", "d/", "d/sub/", "a/", "a/f.txt", "top.txt"}
    assert found["empty-dir/"].is_dir
    assert found["empty-dir/"].mtime == DIR_TIME
    assert found["d/sub/"].mtime == DIR_TIME
    assert found["d/"].mtime == DIR_TIME  # newest below it
    assert found["a/"].mtime == FILE_TIME  # a directory's mtime is its newest child's
    assert found["empty-dir/"].ref is None
    assert (members.meta.object_count, members.meta.dir_count) == (2, 4)
    assert list(members.objects()) == [ref]


def test_entries_with_no_valid_time_have_the_archives(world: World) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("timeless/", (1980, 0, 0, 0, 0, 0)), b"")  # month 0
        archive.writestr(zipfile.ZipInfo("timeless.txt", (1980, 13, 1, 0, 0, 0)), b"t")
        archive.writestr(zipfile.ZipInfo("dated.txt", (2021, 5, 6, 7, 8, 10)), b"d")
    ref = world.put("d.zip", buffer.getvalue())
    assert ref.last_modified > FILE_TIME
    members = world.members(ref)
    assert members is not None
    found = tree(members)
    assert found["timeless.txt"].mtime == ref.last_modified  # not 1970
    assert found["timeless/"].mtime == ref.last_modified
    assert found["dated.txt"].mtime == FILE_TIME


# -- persistence -----------------------------------------------------------------------------------


def test_second_call_reads_nothing(world: World) -> None:
    ref = world.put("d.zip", make_zip(MEMBERS, directories=DIRECTORIES))
    first = world.members(ref)
    assert first is not None
    first_tree = {path: (e.size, e.mtime, e.ref) for path, e in tree(first).items()}
    first.close()
    world.reset()
    again = world.members(ref)  # a fresh pinned catalog, as a remount has
    assert again is not None
    assert world.source.calls == {}
    assert {path: (e.size, e.mtime, e.ref) for path, e in tree(again).items()} == first_tree
    assert again.meta.fingerprint == first.meta.fingerprint


def test_corrupt_index_file_is_rebuilt(world: World, caplog: pytest.LogCaptureFixture) -> None:
    ref = world.put("d.zip", make_zip(MEMBERS))
    path = world.index_path(ref)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"SQLite format 3\0" + b"\xff" * 5000)
    caplog.set_level(logging.INFO)
    members = world.members(ref)
    assert members is not None
    assert set(tree(members)) == expected_paths(MEMBERS)
    assert world.source.calls["get_range"] >= 1
    assert "rebuilding the member index" in caplog.text
    world.reset()
    assert world.members(ref) is not None
    assert world.source.calls == {}  # the rebuilt file is trusted from now on


def test_truncated_index_file_is_rebuilt(world: World) -> None:
    ref = world.put("d.zip", make_zip(MEMBERS))
    world.members(ref)
    path = world.index_path(ref)
    path.write_bytes(path.read_bytes()[:1000])
    members = world.members(ref)
    assert members is not None
    assert set(tree(members)) == expected_paths(MEMBERS)


def test_index_of_another_pin_at_the_same_path_is_not_trusted(tmp_path: Path) -> None:
    world = World(tmp_path, versioned=True)
    old = world.put("d.zip", make_zip({"old.txt": b"old"}))
    new = world.put("d.zip", make_zip({"new.txt": b"new"}))
    assert old.version_id != new.version_id
    assert world.members(old) is not None
    # The file describing the old version lands where the new version's would be.
    world.index_path(new).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(world.index_path(old), world.index_path(new))
    world.reset()
    members = world.members(new)
    assert members is not None
    assert set(tree(members)) == {"new.txt"}
    assert members.meta.archive == new
    assert world.source.calls["get_range"] >= 1
    # And the old pin still has its own.
    old_members = world.members(old)
    assert old_members is not None
    assert set(tree(old_members)) == {"old.txt"}


def test_index_of_the_same_key_with_another_etag_is_not_trusted(world: World) -> None:
    first = world.put("d.zip", make_zip({"first.txt": b"1"}))
    assert world.members(first) is not None
    second = world.put("d.zip", make_zip({"second.txt": b"2"}))  # unversioned: replaced
    world.index_path(second).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(world.index_path(first), world.index_path(second))
    members = world.members(second)
    assert members is not None
    assert set(tree(members)) == {"second.txt"}


# -- which objects are archives --------------------------------------------------------------------


def test_archive_file_keeps_the_object(world: World) -> None:
    ref = world.put("d.zip", make_zip(MEMBERS))
    world.reset()
    assert world.members(ref, "file") is None
    assert world.source.calls == {}
    assert not (world.cache_dir / "archives").exists()


@pytest.mark.parametrize("key", ["dataset", "shards/part-0001.bin", "mnist.zip.1"])
def test_zip_under_another_name_is_detected(world: World, key: str) -> None:
    ref = world.put(key, make_zip({"a.npy": b"x" * 100, "b.npy": b"y" * 10}))
    world.reset()
    members = world.members(ref)
    assert members is not None
    assert set(tree(members)) == {"a.npy", "b.npy"}
    # One GET: the tail read to recognise it is the whole (small) archive, used again.
    assert world.source.ranges == [(ref, 0, ref.size)]


@pytest.mark.parametrize("key", ["weights.npz", "models/resnet.PT", "ckpt/model.pth",
                                 "pkg/lib-1.0-py3-none-any.whl", "report.docx",
                                 "epoch=9-step=100.ckpt"])
def test_files_of_zip_based_formats_stay_files_unless_archive_zip(world: World, key: str) -> None:
    """A model or array file is opened whole by its reader (torch.load, np.load): unpacking it
    would leave the job a directory where it expects its file."""
    ref = world.put(key, make_zip({"a.npy": b"x" * 100, "b.npy": b"y" * 10}))
    world.reset()
    assert world.members(ref) is None
    assert world.source.calls == {}  # not even a look at its bytes
    members = world.members(ref, "zip")
    assert members is not None
    assert set(tree(members)) == {"a.npy", "b.npy"}


# What torch.save (2.x) and torch.jit.save write, and an older torch.save (top = file stem).
TORCH_SAVE = ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
              "archive/byteorder", "archive/data/0", "archive/version",
              "archive/.data/serialization_id"]
TORCH_JIT = ["archive/data/0", "archive/data.pkl", "archive/code/__torch__/m.py",
             "archive/constants.pkl", "archive/.data/version", "archive/byteorder"]
TORCH_OLD = ["epoch9/data.pkl", "epoch9/data/94351", "epoch9/version"]


@pytest.mark.parametrize("key", ["pytorch_model.bin", "checkpoint.pth.tar", "state.pkl",
                                 "model"])
@pytest.mark.parametrize("names", [TORCH_SAVE, TORCH_JIT, TORCH_OLD],
                         ids=["torch-save", "torch-jit", "torch-old"])
def test_a_pytorch_file_under_any_name_stays_a_file(
    world: World, key: str, names: list[str]
) -> None:
    """torch.save writes a zip: a checkpoint named as Hugging Face or torchvision name theirs
    (or Lightning, ``.ckpt``: known by its name) was unpacked, and torch.load met a directory
    (review, session 25)."""
    ref = world.put(key, make_zip({name: b"p" for name in names}))
    world.reset()
    assert world.members(ref) is None
    assert world.source.ranges == [(ref, 0, ref.size)]  # the look at its end, no more
    world.reset()
    assert world.members(ref) is None  # remembered for that pin: no GET
    assert world.source.calls["get_range"] == 0
    members = world.members(ref, "zip")
    assert members is not None
    assert set(names) <= set(tree(members))
    members.close()
    (world.cache_dir / "archives" / f"{object_digest(ref)}.plain").unlink()
    world.reset()
    # Its member index stored (by --archive=zip, or by a release that unpacked such files):
    # auto still mounts the file, from the stored names, with no GET.
    assert world.members(ref) is None
    assert world.source.calls.get("get_range", 0) == 0


@pytest.mark.parametrize("marker", ["[Content_Types].xml", "mimetype", "META-INF/MANIFEST.MF",
                                    "AndroidManifest.xml"])
def test_packages_and_documents_under_another_name_stay_files(world: World, marker: str) -> None:
    ref = world.put("download-17", make_zip({marker: b"m", "word/document.xml": b"<w/>"}))
    assert world.members(ref) is None


@pytest.mark.parametrize("names", [
    ["archive/data.pkl", "archive/labels.csv"],  # no version: a dataset with a pickle
    ["a/data.pkl", "a/version", "b/images/0.png"],  # two tops: a dataset of several things
    ["data.pkl", "version"],  # at the top: not torch's layout
    ["train/mimetype", "train/0.png"],  # a marker below the top says nothing
])
def test_zips_of_data_that_only_resemble_a_format_are_unpacked(
    world: World, names: list[str]
) -> None:
    ref = world.put("dataset.bin", make_zip({name: b"d" for name in names}))
    members = world.members(ref)
    assert members is not None
    assert set(names) <= set(tree(members))
    members.close()
    again = world.members(ref)  # from the stored index, asked the same question
    assert again is not None
    assert set(names) <= set(tree(again))


def test_archive_zip_on_an_object_that_is_no_zip_fails_even_when_auto_knew(world: World) -> None:
    ref = world.put("data/blob.bin", b"plain bytes, no zip" * 100)
    assert world.members(ref) is None  # auto: a file, and remembered as no zip
    with pytest.raises(ArchiveError, match="is not a zip archive") as raised:
        world.members(ref, "zip")
    assert str(raised.value).endswith(AS_FILE)


def test_large_zip_under_another_name(world: World) -> None:
    body = make_zip({"big.bin": sample_bytes(4, 300_000), "small.txt": b"s"})
    ref = world.put("archive.bin", body)
    world.reset()
    members = world.members(ref)
    assert members is not None
    assert set(tree(members)) == {"big.bin", "small.txt"}
    first = world.source.ranges[0]
    assert first == (ref, ref.size - zipformat.END_SEARCH, ref.size)


@pytest.mark.parametrize("size", [0, 1, 21, 100, 65_557, 300_000])
def test_other_objects_stay_files_after_one_small_get(world: World, size: int) -> None:
    ref = world.put("data/blob.bin", (b"not a zip archive " * (size // 18 + 1))[:size])
    world.reset()
    assert world.members(ref) is None
    length = min(size, zipformat.END_SEARCH)
    assert world.source.ranges == ([(ref, size - length, size)] if size else [])
    assert not list((world.cache_dir / "archives").glob("*.db"))


def test_the_answer_not_a_zip_is_remembered_for_that_pin_only(world: World) -> None:
    ref = world.put("data/blob.bin", b"plain bytes, no zip" * 100)
    assert world.members(ref) is None
    world.reset()
    assert world.members(ref) is None  # the same pin again: no detection GET
    assert world.source.calls["get_range"] == 0
    changed = world.put("data/blob.bin", make_zip(MEMBERS))  # a new pin of the same key
    catalog = world.members(changed)
    assert catalog is not None
    catalog.close()
    assert world.source.calls["get_range"] >= 1


def test_cache_clear_forgets_not_a_zip_answers_by_uri(world: World) -> None:
    kept = world.put("keep/blob.bin", b"x" * 1000)
    gone = world.put("drop/blob.bin", b"y" * 1000)
    assert world.members(kept) is None
    assert world.members(gone) is None
    clear_indexes(world.cache_dir, parse_s3_uri(f"s3://{BUCKET}/drop/"))
    world.reset()
    assert world.members(kept) is None
    assert world.source.calls["get_range"] == 0
    assert world.members(gone) is None
    assert world.source.calls["get_range"] == 1  # forgotten: asked again
    clear_indexes(world.cache_dir)
    assert not list((world.cache_dir / "archives").glob("*.plain"))


def test_prefix_datasets_are_never_archives(world: World, tmp_path: Path) -> None:
    refs = [world.put("p/a.zip", make_zip({"x": b"x"})), world.put("p/b.txt", b"b")]
    path = tmp_path / "prefix.db"
    build_catalog(path, refs, uri="s3://bkt/p/", bucket=BUCKET, prefix="p/", versioned=False)
    world.reset()
    assert archive_catalog(world.source, Catalog.open(path), "auto", world.cache_dir) is None
    assert world.source.calls == {}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"this is not a zip at all\n" * 100, "is not a zip archive: no end of central directory"),
        (b"", "is not a zip archive: it is empty"),
        (make_zip(MEMBERS)[:-30], "is not a zip archive"),
        (make_zip(MEMBERS)[:5000] + make_zip(MEMBERS)[-22:], "is corrupt"),
    ],
    ids=["not-a-zip", "empty", "truncated-end", "directory-cut"],
)
def test_zip_key_that_is_not_a_readable_zip_fails(world: World, body: bytes, message: str) -> None:
    ref = world.put("data/bad.zip", body)
    with pytest.raises(ArchiveError) as raised:
        world.members(ref)
    text = str(raised.value)
    assert text.startswith("s3://bkt/data/bad.zip ")
    assert message in text
    assert text.endswith(AS_FILE)
    assert "\n" not in text
    assert not world.index_path(ref).exists()
    assert world.members(ref, "file") is None  # the way out works


def test_upper_case_zip_suffix(world: World) -> None:
    ref = world.put("DATA.ZIP", b"not a zip" * 10)
    with pytest.raises(ArchiveError, match="--archive=file"):
        world.members(ref)


# -- names -----------------------------------------------------------------------------------------

UNSAFE = ["/etc/passwd", "../escape.txt", "a/../../b.txt", "C:/windows.txt", "c:relative.txt",
          "back\\slash.txt", "n" * 256, "long/" + "\u00e9" * 128, "x//y.txt", "./dot.txt",
          "dir\\sub\\"]


def test_unsafe_member_names_are_skipped_with_one_warning_each(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    members = {name: b"unsafe" for name in UNSAFE}
    members["ok/fine.txt"] = b"fine"
    members["ok/" + "\u00e9" * 127] = b"254 bytes of name"
    members["dup.txt"] = b"first"
    body = append_member(make_zip(members), "dup.txt", b"second copy")
    ref = world.put("u.zip", body)
    caplog.set_level(logging.WARNING)
    catalog = world.members(ref)
    assert catalog is not None
    found = tree(catalog)
    assert set(found) == {"ok/", "ok/fine.txt", "ok/" + "\u00e9" * 127, "dup.txt"}
    warned = [r.args[0] for r in skip_warnings(caplog)]  # type: ignore[index]
    assert sorted(warned) == sorted([*UNSAFE, "dup.txt"])
    dup = found["dup.txt"].ref
    assert isinstance(dup, MemberRef)
    assert MemberSource(world.source).get_range(dup, 0, dup.size) == b"second copy"  # as unzip
    assert catalog.meta.object_count == 3
    assert catalog.meta.skipped_count == len(UNSAFE) + 1


@pytest.mark.parametrize("batch", [1, 2, 10_000])
def test_a_name_in_the_archive_twice_shows_the_later_member_as_extracting_does(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Appending to a zip adds a member, never replaces one: unzip, zipfile and bsdtar all leave
    the later copy on disk, so the mount shows that one, whether the earlier copy is still
    pending in the builder or already written (small ``_BATCH``)."""
    monkeypatch.setattr(catalog_module, "_BATCH", batch)
    body = make_zip({"a.txt": b"a1", "b.txt": b"b1", "c.txt": b"c"})
    for name, payload in [("a.txt", b"a2"), ("b.txt", b"b2"), ("a.txt", b"a3, the last")]:
        body = append_member(body, name, payload)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        extracted = {info.filename: archive.read(info) for info in archive.infolist()}
    ref = world.put("dups.zip", body)
    caplog.set_level(logging.WARNING)
    catalog = world.members(ref)
    assert catalog is not None
    source = MemberSource(world.source)
    shown = {path: source.get_range(entry.ref, 0, entry.size)
             for path, entry in tree(catalog).items()}
    assert shown == extracted == {"a.txt": b"a3, the last", "b.txt": b"b2", "c.txt": b"c"}
    assert sorted(r.args[0] for r in skip_warnings(caplog)) == ["a.txt", "a.txt", "b.txt"]
    assert "a later member has the same name" in caplog.text
    assert (catalog.meta.object_count, catalog.meta.total_bytes) == (3, 12 + 2 + 1)
    assert catalog.meta.skipped_count == 3


def test_damaged_entries_are_skipped_with_one_warning_each(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    members = {"a.bin": sample_bytes(1, 5000), "b.bin": sample_bytes(2, 5000),
               "c.bin": sample_bytes(3, 5000)}
    body = make_zip(members)
    body = patch(body, "b.bin", offset=header_offset(body, "a.bin") + 10)  # overlaps a.bin
    body = patch(body, "c.bin", csize=10**6, size=10**6)  # runs past the member area
    ref = world.put("bad-entries.zip", body)
    caplog.set_level(logging.WARNING)
    catalog = world.members(ref)
    assert catalog is not None
    assert set(tree(catalog)) == {"a.bin"}
    records = skip_warnings(caplog)
    assert sorted(r.args[0] for r in records) == ["b.bin", "c.bin"]  # type: ignore[index]
    assert "overlaps member 'a.bin'" in caplog.text
    assert "runs past the archive's member area" in caplog.text
    assert catalog.meta.skipped_count == 2


def test_file_and_directory_of_the_same_name(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    ref = world.put("d.zip", make_zip({"x": b"file", "x/y.txt": b"in dir"}))
    caplog.set_level(logging.WARNING)
    catalog = world.members(ref)
    assert catalog is not None
    assert set(tree(catalog)) == {"x/", "x/y.txt"}  # the directory wins
    assert [r.args[0] for r in skip_warnings(caplog)] == ["x"]  # type: ignore[index]


# -- read_index GETs -------------------------------------------------------------------------------


def test_central_directory_larger_than_the_tail(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index, "TAIL_BYTES", 4096)
    many = {f"d{i % 5}/member-{i:05d}.txt": b"%d" % i for i in range(500)}
    ref = world.put("many.zip", make_zip(many))
    world.reset()
    found, skipped = read_index(world.source, ref)
    assert skipped == []
    assert [m.name for m in found] == list(many)
    assert world.source.calls["get_range"] == 2  # the tail, then the rest of the directory
    (_, tail_start, tail_end), (_, head_start, head_end) = world.source.ranges
    assert (tail_end, head_end) == (ref.size, tail_start)
    assert head_start == found[-1].data_limit  # exactly the directory's missing start


def test_zip64_record_out_of_the_tail_costs_one_more_get(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index, "TAIL_BYTES", 64)
    plain = make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED,))
    ref = world.put("z64.zip", to_zip64(plain))
    world.reset()
    found, skipped = read_index(world.source, ref)
    assert skipped == []
    plain_ref = world.put("plain.zip", plain)
    assert found == read_index(world.source, plain_ref)[0]
    assert [(s, e) for _, s, e in world.source.ranges[:3]] == [
        (ref.size - 64, ref.size),  # the tail: end record and locator
        (ref.size - 98, ref.size - 42),  # the ZIP64 end record
        (found[-1].data_limit, ref.size - 98),  # the central directory
    ]


@pytest.mark.parametrize("tail_bytes", [64, 98, 99, 120, 1 << 20])
def test_empty_zip64_archive(
    world: World, monkeypatch: pytest.MonkeyPatch, tail_bytes: int
) -> None:
    monkeypatch.setattr(index, "TAIL_BYTES", tail_bytes)
    ref = world.put("empty.zip", to_zip64(make_zip({})))
    assert read_index(world.source, ref) == ([], [])
    members = world.members(ref)
    assert members is not None
    assert tree(members) == {}


def test_parse_archive_mode() -> None:
    assert parse_archive_mode(None) == "auto"
    assert parse_archive_mode("") == "auto"
    assert parse_archive_mode(" File ") == "file"
    assert parse_archive_mode("auto") == "auto"
    assert parse_archive_mode("ZIP") == "zip"
    with pytest.raises(UsageError, match="--archive 'tar' is not one of auto, zip, file"):
        parse_archive_mode("tar")


def test_an_index_replaced_between_its_build_and_its_open_is_built_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two releases side by side share a cache dir, and their member catalogs differ in format:
    the other's build landing between ours and our open refused the mount (a review, with the
    rename held by strace)."""
    ref = world.put("d.zip", make_zip(MEMBERS))
    real_build, builds = index.build_index, []

    def build_then_replaced(*args, **kwargs) -> None:
        real_build(*args, **kwargs)
        builds.append(args[2])
        if len(builds) == 1:
            args[2].write_bytes(b"a member catalog of another format")

    monkeypatch.setattr(index, "build_index", build_then_replaced)
    members = world.members(ref)
    assert members is not None
    assert set(tree(members)) >= set(MEMBERS)
    assert len(builds) == 2
