"""keptcatalogs: a snapshot's catalog is built once and used again by the next mount of the file.

Through ``pinning.pin`` (as ``mount`` and ``prefetch`` call it) with a FakeSource; whether a
build happened is told by counting ``load_snapshot`` calls. The end-to-end remount is in
``test_snapshot_e2e``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest
from fakes import FakeSource
from test_catalog import tree
from test_snapshot import BUCKET, refs

from s3datafs import keptcatalogs, pinning
from s3datafs.catalog import Catalog, build_catalog
from s3datafs.keptcatalogs import KeptCatalogs
from s3datafs.model import ObjectRef
from s3datafs.snapshot import write_snapshot
from s3datafs.uri import parse_s3_uri

URI = f"s3://{BUCKET}/data/"
ENOUGH = 1 << 30  # a --cache-size whose eighth holds every catalog here


class World:
    """A FakeSource holding the objects of ``refs()``, snapshot files of them, a cache dir."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.cache_dir = tmp / "cache"
        (self.cache_dir / "catalogs").mkdir(parents=True, mode=0o700)
        self.source = FakeSource()
        self.source.create_bucket(BUCKET, versioned=True)
        self.builds = 0
        real_load = pinning.load_snapshot

        def counting_load(*args, **kwargs):
            self.builds += 1
            return real_load(*args, **kwargs)

        monkeypatch.setattr(pinning, "load_snapshot", counting_load)
        self._mounts = 0

    def snapshot(self, name: str = "snap.gz", uri: str = URI, extra: int = 0) -> Path:
        """A snapshot file of ``refs()`` (plus ``extra`` files), pinning what the source holds."""
        put = self.source.put
        pinned = [ref if ref.key.endswith("/") else put(BUCKET, ref.key, b"x" * ref.size)
                  for ref in refs() + _extra(extra)]
        built = self.tmp / f"{name}.db"
        bucket, _, key = uri[len("s3://"):].partition("/")
        build_catalog(built, sorted(pinned, key=lambda r: r.key.encode()), uri=uri,
                      bucket=bucket, prefix=key, versioned=True)
        path = self.tmp / name
        with Catalog.open(built) as catalog:
            write_snapshot(catalog, path, name="data")
        return path

    def mount(self, snapshot: Path, cache_bytes: int = ENOUGH, uri: str = URI) -> Path:
        """Pin ``snapshot`` as a mount does; the catalog path it would serve from."""
        self._mounts += 1
        path = self.cache_dir / "catalogs" / f"mount-{self._mounts}.db"
        pinning.pin(self.source, path, uri=parse_s3_uri(uri), snapshot=snapshot,
                    kept=KeptCatalogs(self.cache_dir, cache_bytes))
        return path

    def kept(self) -> list[Path]:
        return sorted(keptcatalogs.directory(self.cache_dir).glob("*.db"))


def _extra(count: int) -> list[ObjectRef]:
    return [ObjectRef(BUCKET, f"data/extra/{number:05d}", "v", '"e"', 10, 1.0)
            for number in range(count)]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    return World(tmp_path, monkeypatch)


def catalog_tree(path: Path) -> dict:
    with Catalog.open(path) as catalog:
        return tree(catalog)


def test_the_second_mount_of_a_file_builds_nothing_and_sees_the_same_tree(world: World) -> None:
    snapshot = world.snapshot()
    first = world.mount(snapshot)
    assert world.builds == 1
    assert len(world.kept()) == 1
    world.source.calls.clear()
    second = world.mount(snapshot)
    assert world.builds == 1  # no parse, no build
    assert catalog_tree(second) == catalog_tree(first)
    with Catalog.open(first) as a, Catalog.open(second) as b:
        assert a.meta == b.meta
        assert b.first_file() == a.first_file()
        assert a.first_file().key == "data/a.bin"
    assert world.source.calls == {"head": 1}  # the one HEAD of a snapshot mount is still sent


def test_a_mounts_catalog_removed_at_unmount_leaves_the_kept_one(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot).unlink()
    second = world.mount(snapshot)
    assert world.builds == 1
    second.unlink()
    assert len(world.kept()) == 1
    world.mount(snapshot)
    assert world.builds == 1


def test_a_cache_filesystem_without_hard_links_builds_every_mount_and_fails_none(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept catalogs are shared by hard links; on a cache filesystem that has none (some
    network and FUSE filesystems, exFAT: EPERM), or a catalog kept on another one (EXDEV),
    every mount builds its catalog as before, and gets the same tree."""
    snapshot = world.snapshot()
    first = world.mount(snapshot)  # kept, with links
    assert len(world.kept()) == 1

    def no_links(*_args: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(keptcatalogs.os, "link", no_links)
    second = world.mount(snapshot)  # the kept one cannot be linked in: built
    third = world.mount(world.snapshot("other.gz", extra=3))  # and cannot be kept
    assert world.builds == 3
    assert catalog_tree(second) == catalog_tree(first)
    assert catalog_tree(third) != catalog_tree(first)
    assert len(world.kept()) == 1  # only the first
    assert not list(keptcatalogs.directory(world.cache_dir).glob(".keep-*"))


def test_another_file_or_a_changed_one_is_built(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    other = world.snapshot("other.gz", extra=3)
    world.mount(other)
    assert world.builds == 2
    assert len(world.kept()) == 2
    other.write_bytes(snapshot.read_bytes())  # same bytes: the same catalog
    world.mount(other)
    assert world.builds == 2


def test_another_release_builds_its_own(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    monkeypatch.setattr(keptcatalogs, "__version__", "99.0")
    world.mount(snapshot)
    assert world.builds == 2
    assert len(world.kept()) == 2


def test_a_file_changed_while_it_is_built_is_not_kept(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = world.snapshot()
    other = world.snapshot("other.gz", extra=3)
    real_load = pinning.load_snapshot

    def load_then_replace(path: Path, catalog_path: Path):
        loaded = real_load(path, catalog_path)
        os.replace(other, path)
        return loaded

    monkeypatch.setattr(pinning, "load_snapshot", load_then_replace)
    world.mount(snapshot)
    assert world.kept() == []


def test_a_damaged_kept_catalog_is_built_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = world.snapshot()
    expected = catalog_tree(world.mount(snapshot))
    (kept,) = world.kept()
    with open(kept, "r+b") as file:
        file.truncate(100)
    with caplog.at_level(logging.INFO, "s3datafs.keptcatalogs"):
        again = world.mount(snapshot)
    assert world.builds == 2
    assert "is not usable" in caplog.text
    assert catalog_tree(again) == expected
    (kept,) = world.kept()
    assert catalog_tree(kept) == expected


def test_a_kept_catalog_damaged_past_its_meta_is_built_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Damage that ``Catalog.open`` does not read (it reads the meta table only) but the first
    file's query does: the root page of the entries table (page 2, the first table made)."""
    snapshot = world.snapshot(extra=300)
    expected = catalog_tree(world.mount(snapshot))
    (kept,) = world.kept()
    with open(kept, "r+b") as file:
        file.seek(4096)  # page 2: SQLite's default page size is 4 KiB
        file.write(b"\xff" * 4096)
    with caplog.at_level(logging.INFO, "s3datafs.keptcatalogs"):
        again = world.mount(snapshot)
    assert world.builds == 2
    assert "is not usable" in caplog.text
    assert catalog_tree(again) == expected


def kept_as(world: World, snapshot: Path) -> Path:
    identity = keptcatalogs.snapshot_identity(snapshot)
    return keptcatalogs.directory(world.cache_dir) / f"{identity}.db"


def test_a_kept_catalog_of_another_dataset_is_not_used(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    other = world.snapshot("other.gz", uri=f"s3://{BUCKET}/data/dir/")
    world.mount(other, uri=f"s3://{BUCKET}/data/dir/")
    os.replace(kept_as(world, other), kept_as(world, snapshot))
    world.mount(snapshot)
    assert world.builds == 3


def test_kept_catalogs_are_bounded_by_an_eighth_of_the_cache_least_recently_used_first(
    world: World,
) -> None:
    files = [world.snapshot(f"s{n}.gz", extra=n) for n in range(4)]
    for file in files[:3]:
        world.mount(file)
    sizes = [kept_as(world, file).stat().st_size for file in files[:3]]
    share = 2 * max(sizes) + min(sizes) // 2  # any two fit, three do not
    assert 3 * min(sizes) > share
    for age, file in enumerate(files[:3]):
        os.utime(kept_as(world, file), (age + 1, age + 1))
    world.mount(files[0], cache_bytes=8 * share)  # used: the most recent now
    world.mount(files[3], cache_bytes=8 * share)  # kept: the two least recently used go
    assert world.kept() == sorted([kept_as(world, files[0]), kept_as(world, files[3])])
    assert world.builds == 4


def test_nothing_is_kept_without_a_disk_cache_or_larger_than_the_share(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot, cache_bytes=0)
    world.mount(snapshot, cache_bytes=0)
    assert world.builds == 2
    assert world.kept() == []
    world.mount(snapshot, cache_bytes=8 * 1024)  # a share of 1 KiB: smaller than a catalog
    assert world.kept() == []


def test_a_kept_catalog_evicted_while_a_mount_uses_it_stays_readable(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    in_use = world.mount(snapshot)
    expected = catalog_tree(in_use)
    with Catalog.open(in_use) as catalog:
        keptcatalogs.clear(world.cache_dir, None)
        in_use.unlink()  # what unmount does
        assert tree(catalog) == expected


def test_cache_clear_and_usage(world: World) -> None:
    world.mount(world.snapshot())
    world.mount(world.snapshot("dir.gz", uri=f"s3://{BUCKET}/data/dir/"),
                uri=f"s3://{BUCKET}/data/dir/")
    usage = keptcatalogs.usage(world.cache_dir)
    assert usage.catalogs == 2
    assert usage.bytes == sum(path.stat().st_size for path in world.kept())
    assert keptcatalogs.clear(world.cache_dir, parse_s3_uri("s3://other-bucket/")) == 0
    # A URI inside a dataset's prefix clears that dataset's catalog, not the other's.
    assert keptcatalogs.clear(world.cache_dir, parse_s3_uri(f"s3://{BUCKET}/data/a.bin")) == 1
    assert keptcatalogs.clear(world.cache_dir, None) == 1
    assert keptcatalogs.usage(world.cache_dir) == keptcatalogs.KeptUsage(0, 0)


def test_another_catalog_format_builds_its_own(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    monkeypatch.setattr(keptcatalogs, "FORMAT_VERSION", keptcatalogs.FORMAT_VERSION + 1)
    world.mount(snapshot)
    assert world.builds == 2
    assert len(world.kept()) == 2


def test_a_mount_without_a_disk_cache_uses_no_kept_catalog(world: World) -> None:
    """--no-cache: nothing is kept, nothing is hashed, and a catalog kept by an earlier mount
    with a cache is not used either (the mount leaves the cache directory alone)."""
    snapshot = world.snapshot()
    world.mount(snapshot)
    world.mount(snapshot, cache_bytes=0)
    assert world.builds == 2


def test_a_catalog_larger_than_the_share_evicts_no_other(world: World) -> None:
    kept = world.snapshot()
    world.mount(kept)
    world.mount(world.snapshot("larger.gz", extra=50), cache_bytes=8 * 1024)  # share: 1 KiB
    assert world.kept() == [kept_as(world, kept)]


def test_a_catalog_as_large_as_the_share_is_kept(world: World) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    size = kept_as(world, snapshot).stat().st_size
    keptcatalogs.clear(world.cache_dir, None)
    world.mount(snapshot, cache_bytes=keptcatalogs.SHARE_OF_CACHE * size)  # the share: size
    assert world.kept() == [kept_as(world, snapshot)]


def test_leftovers_at_the_mounts_path_or_the_temporary_name_do_not_stop_the_catalog(
    world: World,
) -> None:
    """A file left at the mount's catalog path is replaced by the kept catalog's link; one
    left at this process's temporary name (a keep that failed) by the next keep's link."""
    snapshot = world.snapshot()
    identity = keptcatalogs.snapshot_identity(snapshot)
    assert identity is not None
    directory = keptcatalogs.directory(world.cache_dir)
    directory.mkdir(parents=True)
    (directory / f".keep-{os.getpid()}-{identity[:16]}.tmp").write_bytes(b"left by a keep")
    world.mount(snapshot)
    assert world.kept() == [kept_as(world, snapshot)]
    (world.cache_dir / "catalogs" / "mount-2.db").write_bytes(b"left by a mount")
    world.mount(snapshot)
    assert world.builds == 1


def test_temporaries_of_keeps_that_died_are_swept_after_an_hour(world: World) -> None:
    directory = keptcatalogs.directory(world.cache_dir)
    directory.mkdir(parents=True)
    dead, busy = directory / ".keep-1-dead.tmp", directory / ".keep-2-busy.tmp"
    for path in (dead, busy):
        path.write_bytes(b"")
    os.utime(dead, (time.time() - 3700, time.time() - 3700))
    world.mount(world.snapshot())
    assert not dead.exists()
    assert busy.exists()  # another process keeps a catalog now


def test_a_damaged_kept_catalog_is_removed_even_when_its_new_build_is_not_kept(
    world: World,
) -> None:
    snapshot = world.snapshot()
    world.mount(snapshot)
    (kept,) = world.kept()
    with open(kept, "r+b") as file:
        file.truncate(100)
    world.mount(snapshot, cache_bytes=8 * 1024)  # a share of 1 KiB: the new build is not kept
    assert world.builds == 2
    assert world.kept() == []


def test_cache_clear_of_a_uri_above_a_dataset_or_of_one_it_cannot_read(world: World) -> None:
    """A URI above a dataset's prefix clears its kept catalog; one that cannot be read (of no
    dataset we can tell) is cleared with any URI."""
    world.mount(world.snapshot())
    assert keptcatalogs.clear(world.cache_dir, parse_s3_uri(f"s3://{BUCKET}/")) == 1
    world.mount(world.snapshot("again.gz"))
    (kept,) = world.kept()
    kept.write_bytes(b"not a catalog")
    assert keptcatalogs.clear(world.cache_dir, parse_s3_uri("s3://other-bucket/x/")) == 1
