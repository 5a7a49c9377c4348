"""Operations called directly, without a kernel (s3ql's t3_fs_api style).

A real catalog is built in ``tmp_path`` from what ``resolve`` reports for a FakeSource bucket, a
real BlockReader reads through the fake, and each handler coroutine is awaited under
``trio.run``. ``pyfuse3.readdir_reply`` needs a kernel buffer, so it is replaced by a collector
that can refuse entries the way a full buffer does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
import trio.testing
from fakes import FakeSource, trio_test

from s3datafs.catalog import Catalog, CatalogDamaged, Entry, build_catalog
from s3datafs.errors import AccessDeniedError, ArchiveError, TransientS3Error
from s3datafs.failurelog import REPEAT_QUIET, FailureLog
from s3datafs.fuse_ops import Operations
from s3datafs.model import MemberRef, ObjectRef
from s3datafs.plan import FsSettings
from s3datafs.reader import BlockReader, ByteBudget
from s3datafs.resolve import resolve
from s3datafs.uri import parse_s3_uri

ROOT = pyfuse3.ROOT_INODE
UID, GID = 1234, 5678
MANY = 300  # files in many/: more than one catalog page (_FIRST_PAGE = 128)


@dataclass
class Mounted:
    ops: Operations
    source: FakeSource
    catalog: Catalog
    refs: dict[str, ObjectRef]  # by path inside the mount

    async def inode(self, path: str) -> int:
        inode = ROOT
        for name in path.split("/"):
            inode = (await self.ops.lookup(inode, name.encode())).st_ino
        return inode

    async def open(self, path: str) -> int:
        return (await self.ops.open(await self.inode(path), os.O_RDONLY)).fh


def mount(tmp_path: Path, source: FakeSource, uri: str) -> Mounted:
    resolution = resolve(source, parse_s3_uri(uri))
    refs = list(resolution.refs)
    path = tmp_path / f"{resolution.uri.bucket}.catalog"
    build_catalog(path, refs, uri=str(resolution.uri), bucket=resolution.uri.bucket,
                  prefix=resolution.prefix, versioned=resolution.versioned)
    catalog = Catalog.open(path)
    reader = BlockReader(source, block_size=64, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(4))
    ops = Operations(catalog, reader, FsSettings(uid=UID, gid=GID))
    by_path = {ref.key[len(resolution.prefix) :]: ref for ref in refs}
    return Mounted(ops, source, catalog, by_path)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Mounted]:
    """s3://bkt/data/ on a versioned bucket; old.txt predates versioning (VersionId "null")."""
    source = FakeSource()
    source.create_bucket("bkt")
    source.put("bkt", "data/old.txt", b"written before versioning\n")
    source.enable_versioning("bkt")
    source.put("bkt", "data/a.txt", bytes(range(256)) * 3)
    source.put("bkt", "data/sub/b.bin", b"b" * 100)
    source.put("bkt", "data/sub/deeper/c.bin", b"")
    for index in range(MANY):
        source.put("bkt", f"data/many/f{index:03d}", b"%d" % index)
    source.put("bkt", "outside.txt", b"not mounted")
    mounted = mount(tmp_path, source, "s3://bkt/data/")
    yield mounted
    mounted.catalog.close()


@pytest.fixture
def plain_fs(tmp_path: Path) -> Iterator[Mounted]:
    """A single object on an unversioned bucket."""
    source = FakeSource()
    source.create_bucket("plain")
    source.put("plain", "dir/file.csv", b"x,y\n1,2\n")
    mounted = mount(tmp_path, source, "s3://plain/dir/file.csv")
    yield mounted
    mounted.catalog.close()


def assert_errno(caught: pytest.ExceptionInfo[pyfuse3.FUSEError], expected: int) -> None:
    assert caught.value.errno == expected, errno.errorcode.get(caught.value.errno)


# -- namespace ------------------------------------------------------------------------------------


@trio_test
async def test_lookup_of_a_file_reports_its_pinned_attributes(fs: Mounted) -> None:
    ref = fs.refs["a.txt"]
    attrs = await fs.ops.lookup(ROOT, b"a.txt")
    assert attrs.st_mode == stat.S_IFREG | 0o444
    assert attrs.st_size == ref.size == 768
    assert attrs.st_nlink == 1
    assert (attrs.st_uid, attrs.st_gid) == (UID, GID)
    assert attrs.st_mtime_ns == int(ref.last_modified) * 10**9
    assert attrs.st_ctime_ns == attrs.st_atime_ns == attrs.st_mtime_ns
    assert attrs.st_blocks == 2
    assert attrs.entry_timeout == attrs.attr_timeout == FsSettings(0, 0).cache_timeout
    assert (await fs.ops.getattr(attrs.st_ino)).st_size == ref.size


@trio_test
async def test_directories_are_0555_with_the_newest_child_mtime_and_a_link_per_subdirectory(
    fs: Mounted,
) -> None:
    sub = await fs.ops.lookup(ROOT, b"sub")
    assert sub.st_mode == stat.S_IFDIR | 0o555
    assert (sub.st_uid, sub.st_gid) == (UID, GID)
    assert sub.st_size == 0
    newest = max(fs.refs["sub/b.bin"].last_modified, fs.refs["sub/deeper/c.bin"].last_modified)
    assert sub.st_mtime_ns == int(newest) * 10**9
    root = await fs.ops.getattr(ROOT)
    assert root.st_mode == stat.S_IFDIR | 0o555
    assert root.st_ino == ROOT
    assert (root.st_nlink, sub.st_nlink) == (4, 3)  # root: sub/ and many/; sub/: deeper/


@trio_test
async def test_nested_lookup_and_empty_file(fs: Mounted) -> None:
    inode = await fs.inode("sub/deeper/c.bin")
    attrs = await fs.ops.getattr(inode)
    assert attrs.st_size == 0
    assert stat.S_ISREG(attrs.st_mode)


@pytest.mark.parametrize("name", [b"missing", b"outside.txt", b"", b"\xff\xfe", b"A.TXT"])
@trio_test
async def test_lookup_of_an_unknown_name_is_a_negative_entry_the_kernel_keeps(
    fs: Mounted, name: bytes
) -> None:
    # inode 0 is pyfuse3's "no such entry" (ENOENT to the caller), cached for entry_timeout:
    # the namespace never changes, so the kernel need not ask again.
    attrs = await fs.ops.lookup(ROOT, name)
    assert attrs.st_ino == 0
    assert attrs.entry_timeout == FsSettings(uid=0, gid=0).cache_timeout


@trio_test
async def test_getattr_of_an_unknown_inode_is_enoent(fs: Mounted) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.getattr(10**9)
    assert_errno(caught, errno.ENOENT)


@trio_test
async def test_millisecond_last_modified_is_exact_in_nanoseconds(tmp_path: Path) -> None:
    ref = ObjectRef("bkt", "f", None, '"e"', 1, 1_700_000_001.123)
    build_catalog(tmp_path / "c", [ref], uri="s3://bkt/", bucket="bkt", prefix="",
                  versioned=False)
    with Catalog.open(tmp_path / "c") as catalog:
        reader = BlockReader(FakeSource(), block_size=64, memory_cache_bytes=64,
                             s3_limiter=trio.CapacityLimiter(1))
        ops = Operations(catalog, reader, FsSettings(uid=0, gid=0))
        attrs = await ops.lookup(ROOT, b"f")
    assert attrs.st_mtime_ns == 1_700_000_001_123_000_000


# -- readdir --------------------------------------------------------------------------------------


class ReaddirBuffer:
    """Stands in for the kernel's buffer: holds ``capacity`` entries per readdir call."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.calls: list[list[tuple[str, int]]] = []

    def reply(self, token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
        assert token is self
        assert attrs.st_ino > 0
        if len(self.calls[-1]) == self.capacity:
            return False
        self.calls[-1].append((os.fsdecode(name), next_id))
        return True

    async def list(self, ops: Operations, fh: int) -> list[str]:
        """Call readdir until it returns nothing new, resuming like the kernel does."""
        start_id, names = 0, []
        while True:
            if len(names) > 10 * MANY:
                pytest.fail(f"readdir does not end: {names[-5:]} after {len(names)} entries")
            self.calls.append([])
            await ops.readdir(fh, start_id, self)
            if not self.calls[-1]:
                return names
            names += [name for name, _ in self.calls[-1]]
            start_id = self.calls[-1][-1][1]


@pytest.mark.parametrize("capacity", [1, 7, 128, 129, 1000])
@trio_test
async def test_readdir_resumes_without_duplicates_or_omissions(
    fs: Mounted, monkeypatch: pytest.MonkeyPatch, capacity: int
) -> None:
    buffer = ReaddirBuffer(capacity)
    monkeypatch.setattr(pyfuse3, "readdir_reply", buffer.reply)
    fh = await fs.ops.opendir(await fs.inode("many"))
    names = await buffer.list(fs.ops, fh)
    assert names == [".", ".."] + [f"f{index:03d}" for index in range(MANY)]
    assert all(len(call) <= capacity for call in buffer.calls)
    await fs.ops.releasedir(fh)


@trio_test
async def test_readdir_of_the_root_lists_each_child_once(
    fs: Mounted, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = ReaddirBuffer(2)
    monkeypatch.setattr(pyfuse3, "readdir_reply", buffer.reply)
    names = await buffer.list(fs.ops, await fs.ops.opendir(ROOT))
    assert sorted(names) == [".", "..", "a.txt", "many", "old.txt", "sub"]


@trio_test
async def test_readdir_lists_dot_as_the_directory_and_dotdot_as_its_parent(
    fs: Mounted, monkeypatch: pytest.MonkeyPatch
) -> None:
    inodes: dict[str, int] = {}

    def reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
        inodes[os.fsdecode(name)] = attrs.st_ino
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    sub = await fs.inode("sub")
    await fs.ops.readdir(await fs.ops.opendir(sub), 0, None)
    assert (inodes["."], inodes[".."]) == (sub, ROOT)
    await fs.ops.readdir(await fs.ops.opendir(ROOT), 0, None)
    assert (inodes["."], inodes[".."]) == (ROOT, ROOT)  # the mount's root is its own parent here


@trio_test
async def test_opendir_of_a_file_is_enotdir(fs: Mounted) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.opendir(await fs.inode("a.txt"))
    assert_errno(caught, errno.ENOTDIR)


# -- open and read --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_CREAT,
     os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_WRONLY | os.O_APPEND],
)
@trio_test
async def test_open_for_writing_is_erofs(fs: Mounted, flags: int) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.open(await fs.inode("a.txt"), flags)
    assert_errno(caught, errno.EROFS)


@trio_test
async def test_open_read_only_with_append_is_a_read_only_open(fs: Mounted) -> None:
    """O_APPEND only says where writes would go: read-only mounts of any filesystem allow it."""
    info = await fs.ops.open(await fs.inode("a.txt"), os.O_RDONLY | os.O_APPEND)
    assert await fs.ops.read(info.fh, 0, 5) == bytes(range(5))


@trio_test
async def test_a_name_longer_than_255_bytes_is_enametoolong(fs: Mounted) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.lookup(ROOT, b"x" * 256)
    assert_errno(caught, errno.ENAMETOOLONG)
    assert (await fs.ops.lookup(ROOT, b"x" * 255)).st_ino == 0  # 255 is a name: merely missing


@trio_test
async def test_open_of_a_directory_is_eisdir(fs: Mounted) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.open(await fs.inode("sub"), os.O_RDONLY)
    assert_errno(caught, errno.EISDIR)


@trio_test
async def test_open_keeps_the_page_cache_and_hands_out_distinct_handles(fs: Mounted) -> None:
    inode = await fs.inode("a.txt")
    first = await fs.ops.open(inode, os.O_RDONLY)
    second = await fs.ops.open(inode, os.O_RDONLY | os.O_NOATIME)
    assert first.keep_cache
    assert first.fh != second.fh


@trio_test
async def test_read_returns_the_pinned_bytes(fs: Mounted) -> None:
    data = bytes(range(256)) * 3
    fh = await fs.open("a.txt")
    assert await fs.ops.read(fh, 0, 4096) == data
    assert await fs.ops.read(fh, 60, 10) == data[60:70]
    assert await fs.ops.read(fh, 700, 4096) == data[700:]
    assert await fs.ops.read(fh, 768, 10) == b""
    assert await fs.ops.read(await fs.open("old.txt"), 0, 100) == b"written before versioning\n"
    assert await fs.ops.read(await fs.open("sub/deeper/c.bin"), 0, 100) == b""
    await fs.ops.fsync(fh, True)
    await fs.ops.release(fh)


@trio_test
async def test_flush_is_not_implemented_so_the_kernel_stops_asking(fs: Mounted) -> None:
    """ENOSYS once, and the kernel never sends FLUSH again: one request less per close()."""
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await fs.ops.flush(await fs.open("a.txt"))
    assert raised.value.errno == errno.ENOSYS


@trio_test
async def test_reads_pin_version_and_etag(fs: Mounted) -> None:
    await fs.ops.read(await fs.open("old.txt"), 0, 10)
    await fs.ops.read(await fs.open("a.txt"), 0, 10)
    sent = {ref.key: (ref.version_id, ref.etag) for ref, _, _ in fs.source.ranges}
    assert sent["data/old.txt"] == ("null", fs.refs["old.txt"].etag)
    assert sent["data/a.txt"] == (fs.refs["a.txt"].version_id, fs.refs["a.txt"].etag)


@trio_test
async def test_read_after_release_is_ebadf(fs: Mounted) -> None:
    fh = await fs.open("a.txt")
    await fs.ops.release(fh)
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.read(fh, 0, 10)
    assert_errno(caught, errno.EBADF)


@trio_test
async def test_read_of_an_overwritten_object_is_estale_and_logged_once(
    plain_fs: Mounted, caplog: pytest.LogCaptureFixture
) -> None:
    fh = await plain_fs.open("file.csv")
    plain_fs.source.put("plain", "dir/file.csv", b"different bytes")
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"):
        for _ in range(3):
            with pytest.raises(pyfuse3.FUSEError) as caught:
                await plain_fs.ops.read(fh, 0, 100)
            assert_errno(caught, errno.ESTALE)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "s3://plain/dir/file.csv" in errors[0].getMessage()
    # Counted where ``status`` and the root's xattr show them.
    stats = json.loads((await xattrs(plain_fs, ROOT))["user.s3datafs.stats"])
    assert (stats["failed_reads"], stats["stale_reads"]) == (3, 3)


@trio_test
async def test_read_of_a_removed_version_is_estale(fs: Mounted) -> None:
    ref = fs.refs["sub/b.bin"]
    fs.source.put("bkt", ref.key, b"newer")
    fh = await fs.open("sub/b.bin")
    assert await fs.ops.read(fh, 0, 3) == b"bbb"  # the pinned version, not the newer one
    fs.source.delete_version("bkt", ref.key, ref.version_id or "")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.read(fh, 64, 10)
    assert_errno(caught, errno.ESTALE)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [(AccessDeniedError("denied"), errno.EACCES), (TransientS3Error("SlowDown"), errno.EIO)],
)
@trio_test
async def test_typed_source_errors_become_their_errno(
    fs: Mounted, exc: Exception, expected: int, caplog: pytest.LogCaptureFixture
) -> None:
    fh = await fs.open("a.txt")
    fs.source.fail_next(1, exc)
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"), pytest.raises(
        pyfuse3.FUSEError
    ) as caught:
        await fs.ops.read(fh, 0, 10)
    assert_errno(caught, expected)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [str(exc)]
    assert await fs.ops.read(fh, 0, 3) == b"\x00\x01\x02"  # and the next read retries


@trio_test
async def test_failures_of_one_object_are_logged_once_whatever_each_says(
    fs: Mounted, caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet per object read (``failurelog``): retried reads of one object fail with messages
    that differ (the bytes, the attempts), and must not each get a line."""
    fh = await fs.open("a.txt")
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"):
        for first in (0, 64, 128):
            fs.source.fail_next(1, TransientS3Error(f"giving up on bytes {first}-{first + 63}"))
            with pytest.raises(pyfuse3.FUSEError):
                await fs.ops.read(fh, first, 10)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["giving up on bytes 0-63"]


@trio_test
@pytest.mark.parametrize("error", [ArchiveError, CatalogDamaged])
async def test_a_bad_archive_member_is_logged_once_for_the_mounts_life(
    fs: Mounted, caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    """An ``ArchiveError`` is the same answer every time, like a stale object: one line ever,
    not one per ``REPEAT_QUIET``. So is a catalog damaged on disk (a member index)."""
    clock = [1000.0]
    fs.ops.failures = FailureLog(lambda: clock[0])
    fh = await fs.open("a.txt")
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"):
        for _ in range(3):
            fs.source.fail_next(1, error("data.zip!/m: bad CRC"))
            with pytest.raises(pyfuse3.FUSEError):
                await fs.ops.read(fh, 0, 10)
            clock[0] += REPEAT_QUIET
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "data.zip!/m: bad CRC"
    ]


@trio_test
async def test_abandoning_requests_ends_a_read_waiting_on_s3_and_every_later_one(
    fs: Mounted,
) -> None:
    """What an unmount does to a read whose GET hangs: EIO at once, not after --read-timeout."""
    fh = await fs.open("a.txt")
    fs.source.gate = threading.Event()  # every GET waits until the test opens the gate
    outcomes: list[int] = []

    async def read_and_record() -> None:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await fs.ops.read(fh, 0, 10)
        outcomes.append(caught.value.errno)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_and_record)
            await trio.testing.wait_all_tasks_blocked()  # the read waits on its GET's thread
            assert fs.ops.abandon_requests() == 1  # how many: what the unmount's log line says
        assert outcomes == [errno.EIO]
        with trio.fail_after(5):  # a request that arrives later does not wait either
            await read_and_record()
        assert outcomes == [errno.EIO, errno.EIO]
    finally:
        fs.source.gate.set()
    assert (await fs.ops.getattr(ROOT)).st_ino == ROOT  # requests that never wait still answer


# -- unexpected errors ----------------------------------------------------------------------------


@trio_test
async def test_an_unexpected_exception_becomes_eio_and_is_logged_with_its_traceback(
    fs: Mounted, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(inode: int) -> None:
        raise RuntimeError("catalog exploded")

    monkeypatch.setattr(fs.catalog, "get", broken)
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"), pytest.raises(
        pyfuse3.FUSEError
    ) as caught:
        await fs.ops.getattr(ROOT)
    assert_errno(caught, errno.EIO)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "getattr" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


@trio_test
async def test_an_unexpected_error_on_every_request_is_logged_like_a_failed_read(
    fs: Mounted, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No thread to be had (a pids limit) failed every read with a traceback in the log: 29
    # records of a few KB each for 8 reads in a review, without bound while it lasted.
    def no_thread(inode: int) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(fs.catalog, "get", no_thread)
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"):
        for _ in range(50):
            with pytest.raises(pyfuse3.FUSEError):
                await fs.ops.getattr(ROOT)
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(records) == 1  # the same subject again within REPEAT_QUIET: held back
    assert records[0].exc_info is not None  # the first time, with its traceback
    assert "unexpected error in getattr: RuntimeError: can't start new thread" in caplog.text


@trio_test
async def test_an_unexpected_error_from_the_source_becomes_eio(
    fs: Mounted, caplog: pytest.LogCaptureFixture
) -> None:
    fh = await fs.open("a.txt")
    fs.source.fail_next(1, KeyError("surprise"))
    with caplog.at_level(logging.ERROR, logger="s3datafs.fuse_ops"), pytest.raises(
        pyfuse3.FUSEError
    ) as caught:
        await fs.ops.read(fh, 0, 10)
    assert_errno(caught, errno.EIO)
    assert any(r.exc_info and "read" in r.getMessage() for r in caplog.records)


# -- read-only ------------------------------------------------------------------------------------


def write_like_calls(file_inode: int) -> dict[str, tuple[Any, ...]]:
    """Each write-like handler with arguments of the shape pyfuse3 passes."""
    ctx = None
    return {
        "setattr": (file_inode, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, ctx),
        "mknod": (ROOT, b"node", stat.S_IFREG | 0o644, 0, ctx),
        "mkdir": (ROOT, b"newdir", 0o755, ctx),
        "unlink": (ROOT, b"a.txt", ctx),
        "rmdir": (ROOT, b"sub", ctx),
        "symlink": (ROOT, b"link", b"a.txt", ctx),
        "rename": (ROOT, b"a.txt", ROOT, b"b.txt", 0, ctx),
        "link": (file_inode, ROOT, b"hard", ctx),
        "create": (ROOT, b"new.txt", 0o644, os.O_WRONLY | os.O_CREAT, ctx),
        "write": (1, 0, b"data"),
        "setxattr": (file_inode, b"user.x", b"1", ctx),
        "removexattr": (file_inode, b"user.s3datafs.uri", ctx),
    }


@pytest.mark.parametrize("handler", list(write_like_calls(0)))
@trio_test
async def test_every_write_like_handler_is_erofs(fs: Mounted, handler: str) -> None:
    args = write_like_calls(await fs.inode("a.txt"))[handler]
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await getattr(fs.ops, handler)(*args)
    assert_errno(caught, errno.EROFS)
    assert (await fs.ops.lookup(ROOT, b"a.txt")).st_size == 768  # nothing changed


# -- extended attributes --------------------------------------------------------------------------


async def xattrs(mounted: Mounted, inode: int) -> dict[str, str]:
    names = await mounted.ops.listxattr(inode)
    return {name.decode(): (await mounted.ops.getxattr(inode, name)).decode() for name in names}


@trio_test
async def test_file_xattrs_name_the_pinned_object(fs: Mounted) -> None:
    ref = fs.refs["a.txt"]
    assert await xattrs(fs, await fs.inode("a.txt")) == {
        "user.s3datafs.uri": "s3://bkt/data/a.txt",
        "user.s3datafs.etag": ref.etag.strip('"'),
        "user.s3datafs.version_id": ref.version_id,
    }
    assert '"' not in ref.etag.strip('"')


@trio_test
async def test_pre_versioning_file_has_the_null_version_xattr(fs: Mounted) -> None:
    values = await xattrs(fs, await fs.inode("old.txt"))
    assert values["user.s3datafs.version_id"] == "null"


@trio_test
async def test_unversioned_file_has_no_version_xattr(plain_fs: Mounted) -> None:
    inode = await plain_fs.inode("file.csv")
    values = await xattrs(plain_fs, inode)
    assert set(values) == {"user.s3datafs.uri", "user.s3datafs.etag"}
    assert values["user.s3datafs.uri"] == "s3://plain/dir/file.csv"
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await plain_fs.ops.getxattr(inode, b"user.s3datafs.version_id")
    assert_errno(caught, pyfuse3.ENOATTR)


@trio_test
async def test_root_xattrs_describe_the_snapshot(fs: Mounted) -> None:
    values = await xattrs(fs, ROOT)
    assert values["user.s3datafs.uri"] == "s3://bkt/data/"
    assert values["user.s3datafs.object_count"] == str(MANY + 4)
    stats = json.loads(values["user.s3datafs.stats"])
    assert set(stats) >= {"s3_requests", "bytes_served"}


@trio_test
async def test_the_stats_attribute_keeps_its_length_as_the_counts_grow(fs: Mounted) -> None:
    """C programs (getfattr) ask for an attribute's size, then for the value in a buffer of
    that size: a count that gained a digit in between made the second call fail (ERANGE)."""
    before = await fs.ops.getxattr(ROOT, b"user.s3datafs.stats")
    fs.ops._reader.stats.s3_bytes = 2**64 - 1
    fs.ops.failed_reads = 12_345
    after = await fs.ops.getxattr(ROOT, b"user.s3datafs.stats")
    assert len(after) == len(before)
    assert json.loads(after)["s3_bytes"] == 2**64 - 1


class _NestedMemberCatalog:
    """One zip member, ``dir/b.csv`` of ``data.zip``, whose CRC-32 has leading zero digits."""

    def __init__(self) -> None:
        archive = ObjectRef("bkt", "data.zip", None, '"e"', 10_000, 0.0)
        member = MemberRef(archive, "dir/b.csv", 0, 100, 0, 0, 10, 10, 0x00C0FFEE, 0.0)
        self.entry = Entry(5, 4, "b.csv", False, 10, 0.0, member)

    def get(self, inode: int) -> Entry | None:
        return self.entry if inode == self.entry.inode else None


@trio_test
async def test_member_xattrs_name_its_path_in_the_archive_and_its_crc_in_eight_digits() -> None:
    reader = BlockReader(FakeSource(), block_size=64, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(4))
    catalog = _NestedMemberCatalog()
    ops = Operations(catalog, reader, FsSettings(uid=UID, gid=GID))  # type: ignore[arg-type]
    mounted = Mounted(ops, FakeSource(), catalog, {})  # type: ignore[arg-type]
    values = await xattrs(mounted, catalog.entry.inode)
    assert values["user.s3datafs.member"] == "dir/b.csv"  # the path, not the entry's name
    assert values["user.s3datafs.member_crc32"] == "00c0ffee"  # as zip listings print it
    assert values["user.s3datafs.uri"] == catalog.entry.ref.uri


class _ModesCatalog:
    """Members whose writer recorded a Unix mode: 0755, 0644, 0700, none (a FAT writer), 0755
    without a type (zipfile's writestr writes none), and a symbolic link's."""

    def __init__(self) -> None:
        archive = ObjectRef("bkt", "data.zip", None, '"e"', 10_000, 0.0)
        self.entries = {
            inode: Entry(inode, ROOT, f"m{inode}", False, 5, 0.0,
                         MemberRef(archive, f"m{inode}", 0, 100, 0, 0, 5, 5, 0, 0.0), mode)
            for inode, mode in ((2, 0o100755), (3, 0o100644), (4, 0o100700), (5, 0),
                                (6, 0o755), (7, 0o120777))}

    def get(self, inode: int) -> Entry | None:
        return self.entries.get(inode)


@pytest.mark.parametrize(("file_mode", "shown"), [(0o444, [0o555, 0o444, 0o555, 0o444, 0o555]),
                                                  (0o440, [0o550, 0o440, 0o550, 0o440, 0o550])],
                         ids=["0444", "0440"])
@trio_test
async def test_a_member_its_writer_made_executable_is_executable(
    file_mode: int, shown: list[int]
) -> None:
    """Executable wherever it is readable (--file-mode); an archive's other bits change
    nothing: the mount's modes say who may read."""
    reader = BlockReader(FakeSource(), block_size=64, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(4))
    settings = FsSettings(uid=UID, gid=GID, file_mode=file_mode)
    ops = Operations(_ModesCatalog(), reader, settings)  # type: ignore[arg-type]
    modes = [(await ops.getattr(inode)).st_mode for inode in (2, 3, 4, 5, 6)]
    assert modes == [stat.S_IFREG | mode for mode in shown]


@trio_test
async def test_a_member_recorded_as_a_symbolic_link_is_one() -> None:
    """Whatever --file-mode says (a link's own mode means nothing on Linux); its size is its
    target's length. ``readlink`` of anything else is EINVAL, as the kernel's own answer."""
    reader = BlockReader(FakeSource(), block_size=64, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(4))
    ops = Operations(_ModesCatalog(), reader,  # type: ignore[arg-type]
                     FsSettings(uid=UID, gid=GID, file_mode=0o440))
    attrs = await ops.getattr(7)
    assert (attrs.st_mode, attrs.st_size, attrs.st_nlink) == (stat.S_IFLNK | 0o777, 5, 1)
    for inode in (2, 5):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await ops.readlink(inode)
        assert_errno(caught, errno.EINVAL)


@trio_test
async def test_plain_directories_have_no_xattrs(fs: Mounted) -> None:
    assert await fs.ops.listxattr(await fs.inode("sub")) == []


@pytest.mark.parametrize(
    "name", [b"user.s3datafs.nope", b"user.other", b"security.selinux", b"user.s3datafs."]
)
@trio_test
async def test_unknown_xattr_is_enoattr(fs: Mounted, name: bytes) -> None:
    for inode in (ROOT, await fs.inode("a.txt")):
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await fs.ops.getxattr(inode, name)
        assert_errno(caught, pyfuse3.ENOATTR)


@trio_test
async def test_xattrs_of_an_unknown_inode_are_enoent(fs: Mounted) -> None:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.ops.listxattr(10**9)
    assert_errno(caught, errno.ENOENT)


# -- statfs ---------------------------------------------------------------------------------------


@trio_test
async def test_statfs_reports_total_bytes_and_counts(fs: Mounted) -> None:
    total = sum(ref.size for ref in fs.refs.values())
    meta = fs.catalog.meta
    assert meta.total_bytes == total
    data = await fs.ops.statfs()
    assert data.f_frsize == 4096
    assert data.f_blocks * data.f_frsize >= total > (data.f_blocks - 1) * data.f_frsize
    assert data.f_files == len(fs.refs) + 3  # files and sub, sub/deeper, many (root not counted)
    assert (data.f_bfree, data.f_bavail, data.f_ffree) == (0, 0, 0)
    assert data.f_namemax == 255


async def _open_read_close(ops: Operations, index: int, *, kernel_has_pages: bool = False) -> None:
    """Read file ``f<index>`` (100 bytes of ``index``) whole, as ``cat`` would; with
    ``kernel_has_pages`` the kernel answers the read from its page cache (``keep_cache``): only
    the open and the release reach the daemon."""
    entry = await ops.lookup(ROOT, f"f{index:02d}".encode())
    fh = (await ops.open(entry.st_ino, os.O_RDONLY)).fh
    if not kernel_has_pages:
        assert await ops.read(fh, 0, 4096) == bytes([index]) * 100
    await ops.release(fh)


async def _gets_settled(source: FakeSource) -> None:
    """Until the background GETs (worker threads) have stopped coming."""
    seen, quiet = -1, 0
    while quiet < 10:
        await trio.sleep(0.01)
        quiet = quiet + 1 if len(source.ranges) == seen else 0
        seen = len(source.ranges)


@trio_test
async def test_files_opened_in_order_get_their_siblings_fetched_ahead(
    tmp_path: Path,
) -> None:
    source = FakeSource()
    source.create_bucket("walk")
    for index in range(20):
        size = 1000 if index == 8 else 100  # f08: only its head is fetched ahead
        source.put("walk", f"d/f{index:02d}", bytes([index]) * size)
    resolution = resolve(source, parse_s3_uri("s3://walk/d/"))
    path = tmp_path / "walk.catalog"
    build_catalog(path, list(resolution.refs), uri=str(resolution.uri), bucket="walk",
                  prefix=resolution.prefix, versioned=False)
    with Catalog.open(path) as catalog:
        reader = BlockReader(source, block_size=64, memory_cache_bytes=1 << 20,
                             s3_limiter=trio.CapacityLimiter(4), max_request_bytes=256)
        settings = FsSettings(uid=UID, gid=GID, prefetch_files=8, readahead_initial=256)
        ops = Operations(catalog, reader, settings)
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            for index in range(3):
                await _open_read_close(ops, index)
            await _gets_settled(source)
            ahead = {ref.key for ref, _start, _end in source.ranges} - {"d/f00", "d/f01", "d/f02"}
            assert ahead == {f"d/f{index:02d}" for index in range(3, 8)}  # the next, 4 beyond
            gets = len(source.ranges)
            for index in range(3, 6):
                await _open_read_close(ops, index)
            await _gets_settled(source)
            keys = [ref.key for ref, _start, _end in source.ranges]
            assert set(keys[gets:]) == {f"d/f{index:02d}" for index in range(8, 15)}
            assert len(keys) == len(set(keys))  # each file fetched once, f03-f05 ahead of time
            assert [(s, e) for ref, s, e in source.ranges if ref.key == "d/f08"] == [(0, 256)]
            nursery.cancel_scope.cancel()


def _directory_of_files(tmp_path: Path, count: int) -> tuple[FakeSource, Path]:
    """A source holding ``count`` files ``d/f00``... of 100 bytes (each of its index), as
    ``_open_read_close`` reads them, and the catalog of ``s3://walk/d/`` (its path)."""
    source = FakeSource()
    source.create_bucket("walk")
    for index in range(count):
        source.put("walk", f"d/f{index:02d}", bytes([index]) * 100)
    resolution = resolve(source, parse_s3_uri("s3://walk/d/"))
    path = tmp_path / "walk.catalog"
    build_catalog(path, list(resolution.refs), uri=str(resolution.uri), bucket="walk",
                  prefix=resolution.prefix, versioned=False)
    return source, path


@trio_test
@pytest.mark.parametrize("read", [True, False], ids=["read", "opened-only"])
async def test_files_the_prefetch_budget_had_no_room_for_are_fetched_ahead_at_later_opens(
    tmp_path: Path, read: bool
) -> None:
    """A budget of three files: the rest of the window is skipped, and asked for again as the
    files fetched ahead give their share back, so none is opened before it came. They give it
    back once read, or once closed unread (the kernel had their pages, or the reader wanted
    none of it): what was fetched for them is nobody's then."""
    source, path = _directory_of_files(tmp_path, 16)
    with Catalog.open(path) as catalog:
        reader = BlockReader(source, block_size=64, memory_cache_bytes=1 << 20,
                             s3_limiter=trio.CapacityLimiter(4),
                             prefetch_budget=ByteBudget(3 * 128))  # a file: two blocks
        ops = Operations(catalog, reader, FsSettings(uid=UID, gid=GID, prefetch_files=8))
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            late = []
            for index in range(16):
                await _gets_settled(source)
                if index >= 3 and f"d/f{index:02d}" not in {ref.key for ref, *_ in source.ranges}:
                    late.append(index)
                await _open_read_close(ops, index, kernel_has_pages=not read)
            assert reader.stats.prefetch_skipped > 0  # the budget did fall short
            assert late == []
            nursery.cancel_scope.cancel()


@trio_test
async def test_every_range_the_file_prefetch_asks_for_is_fetched(tmp_path: Path) -> None:
    """``FilePrefetch`` answers an open with up to two ranges (the directory's stream and the
    opening reader's, apart when readers share a directory): the files of both are fetched."""
    source, path = _directory_of_files(tmp_path, 12)
    with Catalog.open(path) as catalog:
        reader = BlockReader(source, block_size=64, memory_cache_bytes=1 << 20,
                             s3_limiter=trio.CapacityLimiter(4))
        ops = Operations(catalog, reader, FsSettings(uid=UID, gid=GID))
        first = (await ops.lookup(ROOT, b"f00")).st_ino  # inodes in name order from here
        ops._file_prefetch.on_open = lambda *_args: [(first + 1, first + 3),
                                                     (first + 7, first + 9)]
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            await ops.release((await ops.open(first, os.O_RDONLY)).fh)
            await _gets_settled(source)
            fetched = sorted({ref.key for ref, _start, _end in source.ranges})
            assert fetched == ["d/f02", "d/f03", "d/f08", "d/f09"]
            nursery.cancel_scope.cancel()


class _MembersCatalog:
    """Zip members 2..21 of one directory; listing it again is a failure (see the test)."""

    def __init__(self) -> None:
        archive = ObjectRef("bkt", "data.zip", None, '"e"', 10_000, 0.0)
        self.entries = {
            inode: Entry(inode, ROOT, f"m{inode:02d}", False, 10, 0.0,
                         MemberRef(archive, f"m{inode:02d}", inode * 100, inode * 100 + 90,
                                   0, 0, 10, 10, 0, 0.0))
            for inode in range(2, 22)
        }

    def get(self, inode: int) -> Entry | None:
        return self.entries.get(inode)

    def children(self, parent: int, after_inode: int = 0) -> Iterator[Entry]:
        raise AssertionError("zip members are not fetched ahead file by file")


@trio_test
async def test_zip_members_opened_in_order_are_left_to_the_archive_spans() -> None:
    reader = BlockReader(FakeSource(), block_size=64, memory_cache_bytes=1 << 20,
                         s3_limiter=trio.CapacityLimiter(4))
    ops = Operations(_MembersCatalog(), reader, FsSettings(uid=UID, gid=GID))  # type: ignore[arg-type]
    for inode in range(2, 22):
        await ops.release((await ops.open(inode, os.O_RDONLY)).fh)


# A pass over the directory: "read" (every read reaches the daemon), "cached" (the kernel has
# the pages: only opens do), "flaky" (as "read", the first file's first read failing once);
# then whether files were fetched ahead. "later": a minute passes first.
PASSES = {
    "pages-kept": [("read", True), ("cached", False)],
    "pages-forgotten": [("read", True), ("read", True)],
    "forgotten-once-a-minute-ago": [("read", True), ("read", True), ("later", False)],
    "a-failed-read-retried": [("flaky", True), ("cached", False)],
}


@trio_test
@pytest.mark.parametrize("passes", PASSES.values(), ids=PASSES.keys())
async def test_a_second_pass_over_a_directory_fetches_ahead_only_what_the_kernel_forgot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: list[tuple[str, bool]]
) -> None:
    """The kernel keeps the pages of files read before (keep_cache): fetching them again ahead
    would only fill the prefetch budget with bytes nobody reads. Unless it forgets them (a
    dataset larger than memory): then the second pass waited a round trip per file. A start
    served twice says so for a minute; a failed read, retried, does not."""
    clock = [1000.0]
    monkeypatch.setattr("s3datafs.fuse_ops.time", type("Clock", (), {
        "monotonic": staticmethod(lambda: clock[0])}))
    source, path = _directory_of_files(tmp_path, 20)
    with Catalog.open(path) as catalog:
        reader = BlockReader(source, block_size=64, memory_cache_bytes=1,
                             s3_limiter=trio.CapacityLimiter(4))
        ops = Operations(catalog, reader, FsSettings(uid=UID, gid=GID))
        async with trio.open_nursery() as nursery:
            reader.attach(nursery)
            for mode, fetched_ahead in passes:
                before = reader.stats.prefetched_blocks
                if mode == "later":
                    clock[0] += 61.0
                if mode == "flaky":
                    source.fail_next(1, TransientS3Error("a moment's trouble"))
                    with pytest.raises(pyfuse3.FUSEError):
                        await _open_read_close(ops, 0)
                for index in range(20):
                    await _open_read_close(ops, index, kernel_has_pages=mode in ("cached", "later"))
                await _gets_settled(source)
                ahead = reader.stats.prefetched_blocks - before
                assert ahead > 0 if fetched_ahead else ahead == 0, mode
            nursery.cancel_scope.cancel()
