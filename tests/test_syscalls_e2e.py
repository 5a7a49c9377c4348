"""End to end: what jobs and Unix tools do to a mount besides read() and mmap, against a local disk.

Each test does the same to the mount and to ``local``: the same tree on a tmpfs remounted
read-only, with the mount's modes and times. A tmpfs, so that a copy out of either crosses file
systems (``copy_file_range`` and ``FICLONE`` say ``EXDEV`` from both) and so that it is a real
read-only file system, not a read-only bind of a writable one. Where the two may rightly differ
(a directory's size, blocks, O_DIRECT alignment, extended attributes) the mount's answer is
checked against the pinned bytes or what the README says instead.

Two mounts serve the whole module: the prefix, and the zip in it mounted as its members (whose
bytes come from another path: spans of the archive, inflated). A daemon's WARNING or ERROR fails
the module (``isolated_cli``'s teardown).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import math
import mmap
import os
import re
import shutil
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import isolated_cli
from zipcraft import make_zip

from devtools.s3server import S3Server

pytestmark = pytest.mark.fuse

_TEXT = b"".join(b"line %6d of a text that deflates well\n" % n for n in range(40_000))
MEMBERS = {"m/text.txt": _TEXT, "m/raw.bin": os.urandom(300_000), "m/sub/small.txt": b"tiny\n"}


def _sqlite_database() -> bytes:
    """A small SQLite database (rollback journal: a read-only open needs no -shm file)."""
    with tempfile.TemporaryDirectory() as made:
        path = Path(made, "t.sqlite")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE t (x)")
            db.executemany("INSERT INTO t VALUES (?)", [(n,) for n in range(100)])
        return path.read_bytes()


_TAR = io.BytesIO()
with tarfile.open(fileobj=_TAR, mode="w") as _archive:
    _info = tarfile.TarInfo("t/x.txt")
    _info.size = 7
    _archive.addfile(_info, io.BytesIO(b"in tar\n"))
FILES = {
    "a/1.txt": b"first file\n",
    "a/2.txt": b"second file\n",
    "b/c/d/3.bin": bytes(range(256)) * 100,
    "big.bin": os.urandom(3 * 1024 * 1024 + 12345),  # 49 blocks of 64 KiB, the last one short
    "empty.txt": b"",
    "one.bin": b"x",
    "page.bin": os.urandom(4096),
    "data.zip": make_zip(MEMBERS, methods=(zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED)),
    "data.tar": _TAR.getvalue(),
    "table.sqlite": _sqlite_database(),
}
LATER = "b/later.txt"  # put a second after the rest: something is newer (find -newer)
LIBC = ctypes.CDLL(None, use_errno=True)
IN_NONBLOCK = os.O_NONBLOCK
IN_ALL_EVENTS = 0xFFF
F_OFD_SETLK = 37
FICLONE = 0x40049409


@dataclass
class World:
    mount: Path  # s3://bucket/p/: FILES and LATER
    local: Path  # the same on a read-only tmpfs
    members: Path  # s3://bucket/p/data.zip: MEMBERS
    scratch: Path  # writable, on another file system than both
    bodies: dict[str, bytes]  # every file below mount by relative path


def _put_later(s3, bucket: str, before: float) -> None:
    """Put LATER once S3's clock (whole seconds) has moved past ``before``."""
    while True:
        time.sleep(max(0.0, 1.05 - time.time() % 1))
        made = s3.put_object(Bucket=bucket, Key=f"p/{LATER}", Body=b"later\n")
        modified = s3.head_object(Bucket=bucket, Key=f"p/{LATER}", VersionId=made["VersionId"])
        if modified["LastModified"].timestamp() > before:
            return


def _make_local_copy(mount: Path, bodies: dict[str, bytes], local: Path) -> None:
    """``bodies`` on a tmpfs at ``local``, with the mount's modes and times, then read-only."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(local)], check=True)
    for relative, body in bodies.items():
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        (local / relative).write_bytes(body)
    for directory, _, files in os.walk(local, topdown=False):  # a directory after its files
        for name in [*files, ""]:  # "": the directory itself
            path = Path(directory, name)
            shown = (mount / path.relative_to(local)).stat()
            path.chmod(stat.S_IMODE(shown.st_mode))
            os.utime(path, ns=(shown.st_atime_ns, shown.st_mtime_ns))
    subprocess.run(["mount", "-o", "remount,ro", str(local)], check=True)


@pytest.fixture(scope="module")
def world(s3server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("syscalls")
    s3 = s3server.client()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for relative, body in FILES.items():
        s3.put_object(Bucket=bucket, Key=f"p/{relative}", Body=body)
    newest = max(item["LastModified"].timestamp()
                 for item in s3.list_objects_v2(Bucket=bucket, Prefix="p/")["Contents"])
    _put_later(s3, bucket, newest)
    bodies = {**FILES, LATER: b"later\n"}
    local, scratch = root / "local", root / "scratch"
    local.mkdir()
    scratch.mkdir()
    with isolated_cli(root / "cli", s3server.endpoint) as cli:  # unmounts what is below it
        try:
            mount = cli.mount(f"s3://{bucket}/p/", str(cli.root / "mount"))
            members = cli.mount(f"s3://{bucket}/p/data.zip", str(cli.root / "members"))
            _make_local_copy(mount, bodies, local)
            yield World(mount, local, members, scratch, bodies)
        finally:
            subprocess.run(["umount", str(local)], check=False)


def outcome(action: Callable[[], object]) -> object:
    """What ``action`` returns, or the name of the errno it fails with."""
    try:
        return action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)


def both(world: World, check: Callable[[Path], object]) -> object:
    """``check``'s answer for the mount, asserted equal to its answer for the local copy."""
    on_mount, on_local = check(world.mount), check(world.local)
    assert on_mount == on_local
    return on_mount


def run(*command: str | Path, cwd: Path | None = None) -> str:
    """A command's output (in the C locale: sorted alike everywhere); fails on its failure."""
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=60, env={**os.environ, "LC_ALL": "C"})
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


def tree_of(root: Path, *, times: bool = True) -> dict[str, tuple[str, int, float, str]]:
    """Every entry below ``root``: kind, mode, mtime (0 unless ``times``), a file's sha256."""
    found = {}
    for path in root.rglob("*"):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = ("dir" if path.is_dir() else "file",
                                              stat.S_IMODE(info.st_mode),
                                              info.st_mtime if times else 0.0, digest)
    return found


# -- coreutils and friends ------------------------------------------------------------------------


def test_cp_tar_and_sha256sum_take_out_what_they_take_from_a_local_disk(world: World) -> None:
    """cp tries FICLONE, then copy_file_range (both EXDEV), then reads; cp -a keeps modes and
    times; tar and sha256sum read every file."""
    copies = {}
    for name, source in (("mount", world.mount), ("local", world.local)):
        out = world.scratch / f"tools-{name}"
        out.mkdir()
        run("cp", source / "big.bin", out / "big.bin")
        run("cp", "-a", source, out / "archived")
        run("cp", "-r", source, out / "recursive")
        run("tar", "cf", out / "all.tar", "--sort=name", "-C", source, ".")
        (out / "untarred").mkdir()
        run("tar", "xf", out / "all.tar", "-C", out / "untarred")
        sums = run("sh", "-c", "find . -type f -print0 | sort -z | xargs -0 sha256sum",
                   cwd=source)
        copies[name] = out, sums
    (mount_out, mount_sums), (local_out, local_sums) = copies["mount"], copies["local"]
    assert mount_sums == local_sums
    assert len(mount_sums.splitlines()) == len(world.bodies)
    assert (mount_out / "big.bin").read_bytes() == world.bodies["big.bin"]
    for copy in ("archived", "untarred"):
        assert tree_of(mount_out / copy) == tree_of(local_out / copy), copy
    recursive = [tree_of(out / "recursive", times=False) for out in (mount_out, local_out)]
    assert recursive[0] == recursive[1]  # made now: times of their own
    assert tree_of(mount_out / "archived") == tree_of(world.mount)  # modes and times kept
    listing = run("tar", "tvf", mount_out / "all.tar")
    assert listing == run("tar", "tvf", local_out / "all.tar")


def test_du_df_ls_find_stat_test_and_realpath_see_the_pinned_tree(world: World) -> None:
    """As on the local copy but for a directory's size and a file's blocks (a file system's
    own): link counts, modes, owners, times, what find selects by them; then du, df and stat
    against the pinned sizes."""
    def listing(root: Path) -> str:
        """ls -lnR, without what a directory's size and a file's blocks make differ."""
        text = run("ls", "-lnR", "--time-style=+%s", root).replace(str(root), "ROOT")
        text = re.sub(r"(?m)^total \d+$", "total", re.sub(r" +", " ", text))
        return re.sub(r"(?m)^(d\S+ \d+ \d+ \d+) \d+", r"\1 DIRSIZE", text)

    def walked(root: Path) -> list[list[str]]:
        return [sorted(run("find", ".", *args, cwd=root).split()) for args in (
            ["-type", "d"], ["-type", "f", "-size", "+1k"], ["-newer", "a/1.txt"],
            ["-links", "+2"], ["-perm", "-u+x"])]

    def fields(root: Path) -> dict[str, list[str]]:
        lines = run("find", ".", "-exec", "stat", "-c", "%n|%F|%a|%h|%u|%g|%Y|%X", "{}", "+",
                    cwd=root).splitlines()
        return {line.split("|")[0]: line.split("|")[1:] for line in lines}

    def tests(root: Path) -> list[int]:
        asked = [(flag, path) for flag in ("-x", "-r", "-w") for path in ("a", "a/1.txt")]
        return [subprocess.run(["test", flag, root / path], check=False).returncode
                for flag, path in [*asked, ("-s", "a/1.txt"), ("-s", "empty.txt")]]

    assert both(world, listing).count("\n-r--r--r-- 1 ") == len(world.bodies)
    _, _, newer, linked, _ = both(world, walked)
    assert newer == [".", "./b", f"./{LATER}"]
    assert linked == [".", "./b", "./b/c"]  # a directory's links: 2, and one per subdirectory
    links = {path: found[2] for path, found in both(world, fields).items()}
    assert (links["."], links["./a"], links["./b"], links["./a/1.txt"]) == ("4", "2", "3", "1")
    assert both(world, tests) == [0, 1, 0, 0, 1, 1, 0, 1]
    assert both(world, lambda root: run("realpath", root / "a/../b/c/d/3.bin").replace(
        str(root), "ROOT")) == "ROOT/b/c/d/3.bin\n"

    sizes = [len(body) for body in world.bodies.values()]
    assert run("du", "-sb", world.mount).split()[0] == str(sum(sizes))
    assert run("du", "-s", "-B512", world.mount).split()[0] == str(
        sum(math.ceil(size / 512) for size in sizes))
    info = (world.mount / "big.bin").stat()
    assert (info.st_blocks, info.st_blksize) == (math.ceil(info.st_size / 512), 128 * 1024)
    assert info.st_atime_ns == info.st_ctime_ns == info.st_mtime_ns
    df = run("df", "-B1", "--output=size,used,avail", world.mount).split()[3:]
    assert df == [str(4096 * math.ceil(sum(sizes) / 4096))] * 2 + ["0"]
    assert os.statvfs(world.mount).f_flag & os.ST_RDONLY


# -- zero-copy paths ------------------------------------------------------------------------------


def test_sendfile_and_splice_serve_the_pinned_bytes(world: World) -> None:
    for path, body in ((world.mount / "big.bin", world.bodies["big.bin"]),
                       (world.members / "m/text.txt", MEMBERS["m/text.txt"])):
        with open(path, "rb") as source:
            reader, writer = os.pipe()
            try:
                assert os.sendfile(writer, source.fileno(), 4095, 50_000) == 50_000
                assert os.read(reader, 60_000) == body[4095:54_095]
                moved = os.splice(source.fileno(), writer, 65_536, offset_src=len(body) - 100)
                assert (moved, os.read(reader, 65_536)) == (100, body[-100:])
                assert os.splice(source.fileno(), writer, 10, offset_src=len(body)) == 0
            finally:
                os.close(reader)
                os.close(writer)
            assert _sent_through_a_socket(source.fileno(), len(body)) == body


def _sent_through_a_socket(fd: int, size: int) -> bytes:
    """Everything ``os.sendfile`` sends of ``fd`` to a socket, drained by another thread."""
    ours, theirs = socket.socketpair()
    received: list[bytes] = []

    def drain() -> None:
        while chunk := theirs.recv(1 << 20):
            received.append(chunk)

    drainer = threading.Thread(target=drain)
    drainer.start()
    try:
        offset = 0
        while sent := os.sendfile(ours.fileno(), fd, offset, size + 1000):
            offset += sent
        ours.shutdown(socket.SHUT_WR)
        drainer.join(timeout=30)
    finally:
        ours.close()
        theirs.close()
    return b"".join(received)


def test_copy_file_range_and_ficlone_to_another_file_system_say_exdev_as_local_ones(
    world: World,
) -> None:
    """So coreutils and Python fall back to reading, as they do for any other file system."""

    def attempts(root: Path) -> list[object]:
        with open(root / "big.bin", "rb") as source, open(
                world.scratch / f"cfr-{root.name}", "wb") as target:
            return [outcome(lambda: os.copy_file_range(source.fileno(), target.fileno(), 1 << 20)),
                    outcome(lambda: fcntl.ioctl(target.fileno(), FICLONE, source.fileno()))]

    assert both(world, attempts) == ["EXDEV", "EXDEV"]
    shutil.copyfile(world.mount / "big.bin", world.scratch / "copyfile.bin")  # sendfile
    assert (world.scratch / "copyfile.bin").read_bytes() == world.bodies["big.bin"]


# -- offsets, sizes, flags ------------------------------------------------------------------------


def test_seeks_reads_past_the_end_and_empty_reads_answer_as_on_a_local_disk(world: World) -> None:
    def answers_of(path: Path) -> list[object]:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        try:
            seeks = ((0, os.SEEK_DATA), (0, os.SEEK_HOLE), (size // 2, os.SEEK_DATA),
                     (size, os.SEEK_DATA), (size + 5, os.SEEK_HOLE), (0, os.SEEK_END),
                     (-1, os.SEEK_END))
            return [*(outcome(lambda o=offset, w=whence: os.lseek(fd, o, w))
                      for offset, whence in seeks),
                    os.pread(fd, 10, size + 100), os.pread(fd, 10, max(size - 3, 0)),
                    os.pread(fd, 0, 0), os.pread(fd, 0, size + 1), os.read(fd, 0),
                    len(os.pread(fd, size + 4096, 0)), outcome(lambda: os.pread(fd, 10, -1))]
        finally:
            os.close(fd)

    def answers(root: Path) -> list[object]:
        return [answer for name in ("big.bin", "empty.txt", "one.bin", "page.bin")
                for answer in answers_of(root / name)]

    answered = both(world, answers)
    assert answered[:7] == [0, len(world.bodies["big.bin"]), len(world.bodies["big.bin"]) // 2,
                            "ENXIO", "ENXIO", len(world.bodies["big.bin"]),
                            len(world.bodies["big.bin"]) - 1]


def _direct_read(fd: int, offset: int, length: int, unaligned: bool) -> bytes:
    """One O_DIRECT read into a page-aligned buffer, or one a byte past a page boundary."""
    buffer = mmap.mmap(-1, length + 2 * mmap.PAGESIZE)
    start = 1 if unaligned else 0
    view = memoryview(buffer)[start : start + length]
    try:
        got = os.preadv(fd, [view], offset)
        return bytes(view[:got])
    finally:
        view.release()
        buffer.close()


@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
def test_o_direct_reads_are_the_pinned_bytes_with_any_buffer(
    world: World, unaligned: bool
) -> None:
    """A local disk refuses an unaligned O_DIRECT read (EINVAL); FUSE passes it on, and it is
    served like any other: every read reaches the daemon, the page cache is not asked."""
    for path, body in ((world.mount / "big.bin", world.bodies["big.bin"]),
                       (world.mount / "one.bin", b"x"),
                       (world.members / "m/text.txt", MEMBERS["m/text.txt"]),
                       (world.members / "m/raw.bin", MEMBERS["m/raw.bin"])):
        tail = len(body) - len(body) % 4096
        reads = [(0, 4096), (4096, 65_536), (65_536 - 4096, 3 << 20), (tail, 8192),
                 (len(body) + 4096, 4096), (1, 4096), (123_457, 100)]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for offset, length in reads:
                assert _direct_read(fd, offset, length, unaligned) == \
                    body[offset : offset + length], (path.name, offset, length)
        finally:
            os.close(fd)


def test_o_noatime_opens_read(world: World) -> None:
    """Allowed to the owner (the mounting user): rsync --open-noatime, backup tools."""
    fd = os.open(world.mount / "a/1.txt", os.O_RDONLY | os.O_NOATIME)
    try:
        assert os.read(fd, 100) == world.bodies["a/1.txt"]
    finally:
        os.close(fd)


def test_opening_or_changing_what_is_there_fails_as_on_a_local_read_only_mount(
    world: World,
) -> None:
    """EROFS where a local read-only file system says it, never EACCES or EIO; and what is
    allowed there (O_CREAT of a file that exists, fsync of a file opened to read) is allowed."""
    opens = {
        "O_RDONLY|O_TRUNC": ("one.bin", os.O_RDONLY | os.O_TRUNC, "EROFS"),
        "O_WRONLY|O_TRUNC": ("one.bin", os.O_WRONLY | os.O_TRUNC, "EROFS"),
        "O_RDWR|O_CREAT": ("one.bin", os.O_RDWR | os.O_CREAT, "EROFS"),
        "O_RDONLY|O_CREAT, there": ("one.bin", os.O_RDONLY | os.O_CREAT, "opened"),
        "O_RDONLY|O_CREAT, new": ("new.txt", os.O_RDONLY | os.O_CREAT, "EROFS"),
        "O_CREAT|O_EXCL, there": ("one.bin", os.O_RDONLY | os.O_CREAT | os.O_EXCL, "EEXIST"),
        "O_TMPFILE": ("a", os.O_TMPFILE | os.O_WRONLY, "EROFS"),
        "O_WRONLY of a directory": ("a", os.O_WRONLY, "EISDIR"),
    }

    def opened(path: Path, flags: int) -> str:
        os.close(os.open(path, flags, 0o644))
        return "opened"

    def changes(root: Path, fd: int) -> dict[str, object]:
        one = root / "one.bin"
        return {
            "fallocate": outcome(lambda: os.posix_fallocate(fd, 0, 10)),
            "ftruncate": outcome(lambda: os.ftruncate(fd, 0)),
            "fsync": outcome(lambda: os.fsync(fd)),
            "fdatasync": outcome(lambda: os.fdatasync(fd)),
            "chmod to its mode": outcome(lambda: os.chmod(one, 0o444)),
            "utime now of a directory": outcome(lambda: os.utime(root / "a")),
            "setxattr trusted.": outcome(lambda: os.setxattr(one, "trusted.x", b"1")),
            "removexattr, none": outcome(lambda: os.removexattr(one, "user.not-there")),
            "mkdir, there": outcome(lambda: os.mkdir(root / "a")),
            "mkfifo": outcome(lambda: os.mkfifo(root / "fifo")),
        }

    def attempts(root: Path) -> dict[str, object]:
        found = {what: outcome(lambda p=root / name, f=flags: opened(p, f))
                 for what, (name, flags, _) in opens.items()}
        fd = os.open(root / "one.bin", os.O_RDONLY)
        try:
            return found | changes(root, fd)
        finally:
            os.close(fd)

    answered = both(world, attempts)
    assert {what: answered[what] for what in opens} == {
        what: expected for what, (_, _, expected) in opens.items()}
    assert answered["fallocate"] == "EBADF"
    assert answered["fsync"] is None


# -- what libraries ask of a file opened to read --------------------------------------------------


def _whole_file_lock(kind: int) -> bytes:
    return struct.pack("hhqqi", kind, os.SEEK_SET, 0, 0, 0)


def test_hdf5_and_sqlite_locks_on_files_opened_read_only(world: World) -> None:
    """HDF5 1.10+ takes flock(LOCK_SH) (or fcntl F_RDLCK) on every file it opens, SQLite
    F_RDLCK on byte ranges: the kernel keeps these locks for the mount (no daemon lock
    handlers), so they hold between processes as on a local disk."""
    def locks(root: Path) -> list[object]:
        found: list[object] = []
        with open(root / "big.bin", "rb") as held:
            fd = held.fileno()
            for action in (
                lambda: fcntl.fcntl(fd, fcntl.F_SETLK, _whole_file_lock(fcntl.F_RDLCK)),
                lambda: fcntl.fcntl(fd, F_OFD_SETLK, _whole_file_lock(fcntl.F_RDLCK)),
                lambda: fcntl.fcntl(fd, fcntl.F_SETLK, _whole_file_lock(fcntl.F_WRLCK)),
                lambda: fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB),
                lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB),
            ):
                answer = outcome(action)
                found.append(answer if isinstance(answer, str) else "ok")
            found.append(_flock_from_another_process(root / "big.bin"))
            fcntl.flock(fd, fcntl.LOCK_UN)
            found.append(_flock_from_another_process(root / "big.bin"))
        return found

    assert both(world, locks) == ["ok", "ok", "EBADF", "ok", "ok", "EWOULDBLOCK", "taken"]

    def query(root: Path) -> object:
        """A plain open: SQLite asks for read-write, is refused (EROFS), opens read-only."""
        with contextlib.closing(sqlite3.connect(root / "table.sqlite")) as db:
            return db.execute("SELECT count(*), sum(x) FROM t").fetchone()

    assert both(world, query) == (100, 4950)


def _flock_from_another_process(path: Path) -> str:
    """Whether another process may take an exclusive flock of ``path`` now."""
    script = ("import fcntl, sys\nwith open(sys.argv[1], 'rb') as f:\n"
              "    try:\n        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
              "    except BlockingIOError:\n        print('EWOULDBLOCK')\n"
              "    else:\n        print('taken')\n")
    return run(sys.executable, "-c", script, path).strip()


def test_mmap_shared_and_private_with_advice_serve_the_pinned_bytes(world: World) -> None:
    for path, body in ((world.mount / "big.bin", world.bodies["big.bin"]),
                       (world.members / "m/text.txt", MEMBERS["m/text.txt"])):
        with open(path, "rb") as file:
            for advice in (os.POSIX_FADV_SEQUENTIAL, os.POSIX_FADV_WILLNEED,
                           os.POSIX_FADV_RANDOM, os.POSIX_FADV_NOREUSE, os.POSIX_FADV_NORMAL):
                os.posix_fadvise(file.fileno(), 0, 0, advice)
            with mmap.mmap(file.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ) as shared:
                shared.madvise(mmap.MADV_WILLNEED)
                shared.madvise(mmap.MADV_SEQUENTIAL)
                assert shared[:] == body
            private = mmap.mmap(file.fileno(), 0, mmap.MAP_PRIVATE,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            with private:
                private.madvise(mmap.MADV_RANDOM)
                private[:5] = b"mine!"  # the process's own copy of the page
                assert private[5:] == body[5:]
            assert _mmap_errno(file.fileno()) == errno.EACCES  # as on a local disk
        assert path.read_bytes()[:5] == body[:5]


def _mmap_errno(fd: int) -> int:
    """The errno of a writable shared mapping of ``fd``, opened to read."""
    try:
        mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
    except OSError as exc:
        return exc.errno
    return 0


def test_inotify_watches_and_extended_attributes(world: World) -> None:
    """A file watcher (a data loader's, an IDE's) must not fail on the mount; tools ask for
    attributes no file has (ls: the ACL, cp -a: security labels), which are ENODATA."""

    def watched(root: Path) -> list[object]:
        watcher = LIBC.inotify_init1(IN_NONBLOCK)
        assert watcher >= 0
        try:
            added = [LIBC.inotify_add_watch(watcher, os.fsencode(root / name), IN_ALL_EVENTS)
                     for name in ("a", "a/1.txt", "")]
            (root / "a/1.txt").read_bytes()
            events = outcome(lambda: os.read(watcher, 4096))  # IN_OPEN, IN_ACCESS, ...
            return [wd > 0 for wd in added] + [isinstance(events, bytes) and len(events) > 0]
        finally:
            os.close(watcher)

    assert both(world, watched) == [True] * 4

    def absent(root: Path) -> list[object]:
        return [outcome(lambda p=path, n=name: os.getxattr(p, n))
                for path in (root, root / "a", root / "one.bin")
                for name in ("system.posix_acl_access", "security.selinux", "user.other")]

    assert set(both(world, absent)) == {"ENODATA"}
    assert sorted(os.listxattr(world.mount)) == [
        f"user.s3datafs.{name}" for name in ("fingerprint", "object_count", "stats", "uri")]
    assert sorted(os.listxattr(world.mount / "one.bin")) == [
        f"user.s3datafs.{name}" for name in ("etag", "uri", "version_id")]
    assert os.listxattr(world.mount / "a") == []


def test_python_copies_and_archive_modules_on_the_mount(world: World) -> None:
    """shutil.copytree (copy2: sendfile, then copystat: times, mode, and the extended
    attributes, which the copies keep), zipfile and tarfile on files in the mount."""
    copied = {}
    for name, source in (("mount", world.mount), ("local", world.local)):
        copied[name] = shutil.copytree(source, world.scratch / f"copytree-{name}")
    assert tree_of(copied["mount"]) == tree_of(copied["local"]) == tree_of(world.mount)
    assert os.getxattr(copied["mount"] / "one.bin", "user.s3datafs.uri") == os.getxattr(
        world.mount / "one.bin", "user.s3datafs.uri")
    with zipfile.ZipFile(world.mount / "data.zip") as archive:
        assert archive.testzip() is None
        assert {name: archive.read(name) for name in archive.namelist()} == MEMBERS
    with tarfile.open(world.mount / "data.tar") as archive:
        member = archive.extractfile("t/x.txt")
        assert member is not None
        assert member.read() == b"in tar\n"
