"""Zip archives as real tools make them, mounted for real and compared with what ``unzip`` makes.

Every other zip test makes its archives with Python's ``zipfile``; datasets in the wild come
from Info-ZIP ``zip``, ``jar``, macOS Finder, Windows tools and 7-Zip. Each archive here is made
by the installed tool where there is one, else field by field (``zipcraft.raw_zip``) as the
tool is known to write it; each test says how. Each is mounted once, and every member's name,
type, size, bytes, mtime and executable bit is compared with what ``unzip`` extracts from it
(``TZ=UTC``: the mount reads DOS times as UTC), or with what ``zipfile`` reads where the test
says why that is the reference. Archives are small and made once per module; each test has one
mount, unmounted in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import unicodedata
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli, errno_of, isolated_cli
from zipcraft import HOST_FAT, HOST_NTFS, RawMember, dos_time, extra_field, raw_zip

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not all(map(shutil.which, ("zip", "unzip", "jar"))),
                       reason="needs Info-ZIP zip and unzip, and jar"),
]

UTC = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8"}
A_TIME = 1646370367  # 2022-03-04 05:06:07 UTC: a.txt's mtime (odd: the UT field keeps seconds)
TREE_TIME = 1688807412  # 2023-07-08 09:10:12 UTC: every other file's


# -- the trees archived -------------------------------------------------------------------------

def make_tree(root: Path, *, links: bool) -> Path:
    """A small tree: text, a deflatable file, random bytes, an empty file and directory, a
    0755 script, a non-ASCII name; with ``links``, symbolic links safe and not."""
    rng = random.Random(35)
    files = {
        "a.txt": b"hello\n",
        "run.sh": b"#!/bin/sh\necho hi\n",
        "empty.txt": b"",
        "caf\u00e9.txt": b"non-ASCII name\n",
        "sub/rand.bin": rng.randbytes(20_000),
        "sub/deep/seq.txt": b"".join(b"%d\n" % i for i in range(5000)),
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o644)
    (root / "run.sh").chmod(0o755)
    (root / "emptydir").mkdir()
    if links:
        for name, target in LINKS.items():
            os.symlink(target, root / name)
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (TREE_TIME, TREE_TIME), follow_symlinks=False)
    os.utime(root / "a.txt", (A_TIME, A_TIME))
    return root


# Targets inside the tree are shown as they are; the others would lead a reader out of the mount.
LINKS = {
    "link-a": "a.txt",
    "dirlink": "sub",
    "sub/up-link": "../a.txt",
    "sub/via-dirlink": "../dirlink/deep/seq.txt",
    "dot": ".",
    "sub/dangling": "no-such-file",
}
ESCAPING_LINKS = {
    "abs-link": "/etc/passwd",
    "sub/escape": "../../outside",
    # Inside by its spelling (sub/.. is the root, dot/.. too), outside as followed: dot is the
    # root, whose parent is the mount point's directory.
    "sub/via-dot": "../dot/..",
}


# -- what the mount shows, what unzip extracts ---------------------------------------------------

def listing(root: Path, *, unreadable_links: bool = False) -> dict[str, tuple]:
    """Path -> what it is below ``root``, links not followed: ("dir",), ("link", target) or
    ("file", size, sha256, mtime, executable). Names unzip left in ISO-8859-1 (as it writes
    CP437 names) are decoded so."""
    found: dict[str, tuple] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                raw = os.fsencode(entry.name)
                try:
                    name = raw.decode("utf-8")
                except UnicodeDecodeError:
                    name = raw.decode("latin-1")
                path = f"{prefix}{name}"
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    found[path] = ("dir",)
                    walk(Path(entry.path), f"{path}/")
                elif stat.S_ISLNK(info.st_mode):
                    found[path] = ("link", _readlink(entry.path, unreadable_links))
                else:
                    data = Path(entry.path).read_bytes()
                    assert len(data) == info.st_size, path
                    found[path] = ("file", info.st_size, hashlib.sha256(data).hexdigest(),
                                   info.st_mtime, bool(info.st_mode & stat.S_IXUSR))

    walk(root, "")
    return found


def _readlink(path: str, unreadable: bool) -> str | int:
    try:
        return os.readlink(path)
    except OSError as exc:
        if not unreadable:
            raise
        return exc.errno


def unzipped(archive: Path, into: Path, *, password: str | None = None) -> dict[str, tuple]:
    """What ``unzip`` extracts from ``archive`` (exit 1 is its warnings: a backslash)."""
    into.mkdir()
    command = ["unzip", "-q", "-o", *(["-P", password] if password else []), str(archive)]
    done = subprocess.run(command, cwd=into, env=UTC, capture_output=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    return listing(into)


def zipfile_says(archive: bytes) -> dict[str, tuple]:
    """What ``zipfile`` reads: files (DOS time as UTC, like the mount) and their directories."""
    import calendar
    import io

    found: dict[str, tuple] = {}
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        for info in opened.infolist():
            parts = info.filename.rstrip("/").split("/")
            for depth in range(1, len(parts)):
                found["/".join(parts[:depth])] = ("dir",)
            if info.is_dir():
                found[info.filename.rstrip("/")] = ("dir",)
                continue
            data = opened.read(info)
            found[info.filename] = ("file", len(data), hashlib.sha256(data).hexdigest(),
                                    float(calendar.timegm((*info.date_time, 0, 0, 0))),
                                    bool((info.external_attr >> 16) & stat.S_IXUSR))
    return found


# -- fixtures: the archives, made once; one CLI and bucket for the module ------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tools")


@pytest.fixture(scope="module")
def trees(workdir: Path) -> dict[str, Path]:
    plain = make_tree(workdir / "plain" / "root", links=False)
    linked = make_tree(workdir / "linked" / "root", links=True)
    for name, target in ESCAPING_LINKS.items():
        os.symlink(target, linked / name)
        os.utime(linked / name, (TREE_TIME, TREE_TIME), follow_symlinks=False)
    return {"plain": plain, "linked": linked}


def tool(*command: str, cwd: Path, stdin: bytes = b"") -> bytes:
    return subprocess.run(command, cwd=cwd, env=UTC, input=stdin, capture_output=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def tools_cli(s3server, workdir: Path) -> Iterator[Cli]:
    with isolated_cli(workdir / "cli", s3server.endpoint) as runner:
        yield runner


@pytest.fixture(scope="module")
def bucket(s3server) -> tuple[object, str]:
    client = s3server.client()
    name = f"t-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    return client, name


@contextlib.contextmanager
def mounted(cli: Cli, bucket: tuple[object, str], key: str, archive: bytes) -> Iterator[Path]:
    """``archive`` uploaded as ``key`` and mounted; unmounted on the way out, whatever happened."""
    client, name = bucket
    client.put_object(Bucket=name, Key=key, Body=archive)
    result = cli.run("mount", f"s3://{name}/{key}", "--name", key.replace(".", "-"))
    mountpoint = cli.data_root / key.replace(".", "-")
    try:
        assert result.returncode == 0, result.stderr
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            assert cli.unmount(mountpoint).returncode == 0


def compare(cli: Cli, bucket, key: str, archive: Path, workdir: Path, **differences) -> None:
    """Mount ``archive`` and compare it with what unzip extracts, but for ``differences``
    (path -> what the mount shows instead)."""
    expected = {**unzipped(archive, workdir / f"unzipped-{key}"), **differences}
    compare_with(cli, bucket, key, archive.read_bytes(), expected)


def compare_with(cli: Cli, bucket, key: str, archive: bytes, expected: dict[str, tuple]) -> None:
    with mounted(cli, bucket, key, archive) as mountpoint:
        assert_same(listing(mountpoint, unreadable_links=True), expected)


def assert_same(shown: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Every path the mount and the reference disagree on: (shown, expected)."""
    assert {path: (shown.get(path), expected.get(path)) for path in {*shown, *expected}
            if shown.get(path) != expected.get(path)} == {}


# -- Info-ZIP zip -------------------------------------------------------------------------------

def test_info_zip_with_symbolic_links_and_modes(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``zip -r -y``: UT and ux extra fields, Unix modes (a 0755 script), symbolic links stored
    as links (S_IFLNK, the target as the member's data). A link whose target stays in the
    mount is shown as unzip makes it; one leading out of the mount (absolute, or climbing past
    the root, also through another link) is shown, and reading it fails with EIO."""
    archive = workdir / "info-zip.zip"
    tool("zip", "-q", "-r", "-y", str(archive), ".", cwd=trees["linked"])
    expected = {**unzipped(archive, workdir / "unzipped-info-zip"),
                **{name: ("link", errno.EIO) for name in ESCAPING_LINKS}}
    tools_cli.expect_log(r"is a symbolic link to .*, which leads out of the archive")
    with mounted(tools_cli, bucket, "info-zip.zip", archive.read_bytes()) as mountpoint:
        assert_same(listing(mountpoint, unreadable_links=True), expected)
        # Followed by the kernel: the archive's own bytes, or nothing at all.
        seq = (trees["linked"] / "sub/deep/seq.txt").read_bytes()
        assert (mountpoint / "link-a").read_bytes() == b"hello\n"
        assert (mountpoint / "sub/via-dirlink").read_bytes() == seq
        assert (mountpoint / "dot/dirlink/up-link").read_bytes() == b"hello\n"
        assert errno_of((mountpoint / "sub/dangling").stat) == errno.ENOENT
        for name in ESCAPING_LINKS:
            assert errno_of((mountpoint / name).stat) == errno.EIO, name
        refused = [line for line in (tools_cli.log_dir / "info-zip-zip.log").read_text()
                   .splitlines() if "leads out of the archive" in line]
        assert sorted(line.split(": ", 1)[1] for line in refused) == sorted(
            f"member {name!r} of s3://{bucket[1]}/info-zip.zip is a symbolic link to "
            f"{target!r}, which leads out of the archive ({why}); not followed"
            for name, target, why in [
                ("abs-link", "/etc/passwd", "an absolute path"),
                ("sub/escape", "../../outside", "it climbs above the archive's top"),
                ("sub/via-dot", "../dot/..", "it climbs above the archive's top")])


def test_info_zip_bzip2(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``zip -Z bzip2``: every file bzip2 (method 12), however small."""
    archive = workdir / "bzip2.zip"
    tool("zip", "-q", "-r", "-Z", "bzip2", str(archive), ".", cwd=trees["plain"])
    compare(tools_cli, bucket, "bzip2.zip", archive, workdir)


@pytest.mark.parametrize("level", ["-6", "-0"], ids=["deflated", "stored"])
def test_info_zip_streamed_to_a_pipe(tools_cli: Cli, bucket, trees, workdir, level: str) -> None:
    """``zip -r - . | cat``: the output cannot be sought back into, so every file's sizes and
    CRC follow its data in a data descriptor (flag bit 3), its local header holds zeros; with
    ``-0`` too, so a stored member's local header does not say where its data ends."""
    key = f"streamed{level}.zip"
    archive = workdir / key
    archive.write_bytes(tool("zip", "-q", level, "-r", "-", ".", cwd=trees["plain"]))
    compare(tools_cli, bucket, key, archive, workdir)


def test_info_zip_of_standard_input(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``... | zip - -``: one member named ``-`` of unknown size when its local header was
    written, so ZIP64 local sizes (0xFFFFFFFF, extra field 0x0001) and an 8-byte descriptor."""
    archive = workdir / "stdin.zip"
    archive.write_bytes(tool("zip", "-q", "-", "-", cwd=workdir, stdin=b"from a pipe\n" * 1000))
    compare(tools_cli, bucket, "stdin.zip", archive, workdir)


def test_info_zip_forced_zip64(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``zip -fz``: ZIP64 end record and locator, ZIP64 extra fields on every entry."""
    archive = workdir / "zip64.zip"
    tool("zip", "-q", "-r", "-fz", str(archive), ".", cwd=trees["plain"])
    compare(tools_cli, bucket, "zip64.zip", archive, workdir)


def test_info_zip_forced_zip64_to_a_pipe_is_refused_in_one_line(
    tools_cli: Cli, bucket, trees, workdir
) -> None:
    """``zip -fz - . | cat`` writes an end record whose directory offset is 0xFFFFFFFF and no
    ZIP64 end record to say the real one (Info-ZIP 3.0): unzip and zipfile cannot read it
    either. The mount is refused in one line naming the damage and the way out."""
    archive = tool("zip", "-q", "-r", "-fz", "-", ".", cwd=trees["plain"])
    done = subprocess.run(["unzip", "-t", "-"], input=archive, capture_output=True, check=False)
    assert done.returncode != 0
    client, name = bucket
    client.put_object(Bucket=name, Key="broken64.zip", Body=archive)
    result = tools_cli.run("mount", f"s3://{name}/broken64.zip")
    assert result.returncode != 0
    assert result.stderr == (
        f"s3datafs: s3://{name}/broken64.zip is corrupt: "
        "ZIP64 values without a ZIP64 end record; mount it with --archive=file to see the "
        "object as one file\n")
    assert not tools_cli.mounts_below_root()


def test_info_zip_encrypted_members_fail_reads_in_one_line(
    tools_cli: Cli, bucket, trees, workdir
) -> None:
    """``zip -e``: names, sizes and times are listed; a read fails with EIO, and the log says
    why in one line naming the member."""
    archive = workdir / "encrypted.zip"
    tool("zip", "-q", "-r", "-P", "secret", str(archive), ".", cwd=trees["plain"])
    expected = unzipped(archive, workdir / "unzipped-encrypted", password="secret")
    tools_cli.expect_log(r"member 'sub/rand\.bin' of .*encrypted\.zip is encrypted")
    with mounted(tools_cli, bucket, "encrypted.zip", archive.read_bytes()) as mountpoint:
        for path, what in expected.items():
            info = os.lstat(mountpoint / path)
            if what[0] == "dir":
                assert stat.S_ISDIR(info.st_mode)
                continue
            assert (info.st_size, info.st_mtime) == (what[1], what[3]), path
        assert errno_of((mountpoint / "sub/rand.bin").read_bytes) == errno.EIO
        lines = [line for line in (tools_cli.log_dir / "encrypted-zip.log").read_text()
                 .splitlines() if "rand.bin" in line]
        assert len(lines) == 1, lines
        assert lines[0].endswith("is encrypted; s3datafs cannot decrypt zip members"), lines[0]


def test_info_zip_self_extractor_adjusted(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``cat stub archive.zip > sfx; zip -A sfx``: offsets count from the stub's start."""
    archive = workdir / "sfx-adjusted.zip"
    tool("zip", "-q", "-r", str(workdir / "inner.zip"), ".", cwd=trees["plain"])
    archive.write_bytes(b"#!/bin/sh\nexec unzip \"$0\"\n" + (workdir / "inner.zip").read_bytes())
    tool("zip", "-q", "-A", str(archive), cwd=workdir)
    compare(tools_cli, bucket, "sfx-adjusted.zip", archive, workdir)


def test_info_zip_with_bytes_prepended(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``cat stub archive.zip``, not adjusted: every recorded offset is short by the stub."""
    archive = workdir / "prepended.zip"
    tool("zip", "-q", "-r", str(workdir / "inner2.zip"), ".", cwd=trees["plain"])
    archive.write_bytes(os.urandom(3000) + (workdir / "inner2.zip").read_bytes())
    compare(tools_cli, bucket, "prepended.zip", archive, workdir)


def test_info_zip_with_a_comment(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``zip -z``: an archive comment after the end record, here with an end record's
    signature in it, which must not be taken for the real one (unzip and zipfile both take it:
    the reference is unzip's reading of the archive before the comment)."""
    archive = workdir / "comment.zip"
    tool("zip", "-q", "-r", str(workdir / "no-comment.zip"), ".", cwd=trees["plain"])
    shutil.copy(workdir / "no-comment.zip", archive)
    tool("zip", "-q", "-z", str(archive), cwd=workdir,
         stdin=b"made for a test\nPK\x05\x06 is the end record's signature\n.\n")
    assert archive.read_bytes().endswith(b"signature")
    expected = unzipped(workdir / "no-comment.zip", workdir / "unzipped-comment")
    compare_with(tools_cli, bucket, "comment.zip", archive.read_bytes(), expected)


def test_info_zip_emptied(tools_cli: Cli, bucket, workdir) -> None:
    """``zip -d`` of its last member leaves an empty archive (its end record alone): an empty
    directory, as unzip extracts nothing."""
    archive = workdir / "emptied.zip"
    (workdir / "only.txt").write_bytes(b"x")
    tool("zip", "-q", str(archive), "only.txt", cwd=workdir)
    subprocess.run(["zip", "-q", "-d", str(archive), "only.txt"], env=UTC, capture_output=True,
                   check=False)  # "zip file empty" is a warning, exit 0 or 12 by version
    assert archive.stat().st_size == 22
    compare(tools_cli, bucket, "emptied.zip", archive, workdir)


# -- jar ----------------------------------------------------------------------------------------

def test_jar(tools_cli: Cli, bucket, trees, workdir) -> None:
    """``jar cf``: META-INF/MANIFEST.MF, data descriptors, FAT host, DOS times in local time
    (UTC here), the UTF-8 flag, no modes. unzip 6.0 ignores that flag on a FAT host's names
    (it writes "caf+\u00ae.txt"): the reference is zipfile. Uploaded as a ``.zip``: a ``.jar``
    key stays one file."""
    archive = workdir / "made.jar"
    tool("jar", "cf", str(archive), ".", cwd=trees["plain"])
    compare_with(tools_cli, bucket, "jar.zip", archive.read_bytes(),
                 zipfile_says(archive.read_bytes()))


# -- made field by field, as tools without a copy here write them ---------------------------------

def nfd(text: str) -> bytes:
    return unicodedata.normalize("NFD", text).encode("utf-8")


def test_macos_finder(tools_cli: Cli, bucket, workdir) -> None:
    """macOS Finder's "Compress" (Archive Utility): Unix host (version 2.1), data descriptors,
    names in decomposed UTF-8 *without* the UTF-8 flag, a ``__MACOSX/`` tree of AppleDouble
    ``._`` files. unzip extracts those names as UTF-8 (zipfile reads them as CP437, mojibake)."""
    when = dos_time(2024, 1, 2, 3, 4, 6)
    dirs = {"mode": 0o40755 << 16, "version": 21, "time": when}
    files = {"version": 21, "time": when, "descriptor": True, "method": zipfile.ZIP_DEFLATED,
             "external": 0o100644 << 16}
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)
    members = [
        RawMember(nfd("Photos/"), external=dirs["mode"], version=21, time=when),
        RawMember(nfd("Photos/Caf\u00e9 cr\u00e8me.txt"), b"latte\n" * 50, **files),
        RawMember(nfd("Photos/r\u00e9sum\u00e9.csv"), b"a,b\n1,2\n", **files),
        RawMember(b"__MACOSX/", external=dirs["mode"], version=21, time=when),
        RawMember(b"__MACOSX/Photos/", external=dirs["mode"], version=21, time=when),
        RawMember(b"__MACOSX/Photos/._" + nfd("Caf\u00e9 cr\u00e8me.txt"), apple_double,
                  **files),
    ]
    archive = workdir / "finder.zip"
    archive.write_bytes(raw_zip(members))
    compare(tools_cli, bucket, "finder.zip", archive, workdir)


def test_windows_compressed_folder(tools_cli: Cli, bucket, workdir) -> None:
    """Windows tools of old (Compress-Archive of .NET Framework 4.5, Explorer before 2023):
    FAT host, backslashes as path separators, names in code page 437 without the UTF-8 flag,
    MS-DOS attributes only. unzip takes the backslashes for separators (with a warning)."""
    fat = {"host": HOST_FAT, "version": 20, "external": 0x20, "method": zipfile.ZIP_DEFLATED}
    members = [
        RawMember(b"images\\cat.txt", b"meow\n" * 100, **fat),
        RawMember(b"images\\2023\\caf\x82.txt", b"cp437\n", **fat),  # 0x82: e acute
        RawMember(b"readme.txt", b"hello from windows\r\n", **fat),
    ]
    archive = workdir / "windows.zip"
    archive.write_bytes(raw_zip(members))
    compare(tools_cli, bucket, "windows.zip", archive, workdir)


def test_seven_zip_ntfs_times(tools_cli: Cli, bucket, workdir) -> None:
    """7-Zip on Windows: NTFS host (11, as 7-Zip and Info-ZIP number it), the UTF-8 flag, DOS
    times in the writer's zone (here UTC+2) and the exact times in the NTFS extra field
    (0x000a, 100 ns since 1601, UTC). unzip ignores that field (it shows 09:10:12, the DOS
    time read as UTC); the mount shows the NTFS time, 07:10:13.5 UTC."""
    exact = TREE_TIME - 2 * 3600 + 1.5
    ticks = round((exact + 11_644_473_600) * 10_000_000)
    ntfs = extra_field(0x000A, bytes(4) + extra_field(1, ticks.to_bytes(8, "little") * 3))
    members = [RawMember("d\u00e9j\u00e0 vu.txt".encode(), b"seven\n", host=HOST_NTFS,
                         version=63, flags=0x800, external=0x20, extra=ntfs)]
    archive = workdir / "seven.zip"
    archive.write_bytes(raw_zip(members))
    sha = hashlib.sha256(b"seven\n").hexdigest()
    compare(tools_cli, bucket, "seven.zip", archive, workdir,
            **{"d\u00e9j\u00e0 vu.txt": ("file", 6, sha, exact, False)})


def test_unicode_path_extra_field(tools_cli: Cli, bucket, workdir) -> None:
    """Info-ZIP on a system whose code page is not UTF-8: the name in that code page (here
    ISO-8859-1, no UTF-8 flag) and the UTF-8 name in extra field 0x7075 (with the CRC-32 of the
    name it stands for). unzip writes the UTF-8 name."""
    import zlib

    raw = "na\u00efve.txt".encode("latin-1")
    unicode_path = extra_field(0x7075, b"\x01" + zlib.crc32(raw).to_bytes(4, "little")
                               + "na\u00efve.txt".encode())
    archive = workdir / "unicode-path.zip"
    archive.write_bytes(raw_zip([RawMember(raw, b"naive\n", extra=unicode_path)]))
    compare(tools_cli, bucket, "unicode-path.zip", archive, workdir)


def test_local_headers_that_disagree_with_the_central_directory(
    tools_cli: Cli, bucket, workdir
) -> None:
    """Local headers with another name, another method, wrong sizes (no data descriptor): the
    central directory is the archive's index, and the CRC checks the bytes. unzip reads the
    first (warning "mismatching local filename") but takes the local method and sizes, and
    fails the others' CRC; zipfile reads the last two and refuses the first. The mount reads
    all three, as the central directory says."""
    data = b"mismatch data " * 100
    members = [
        RawMember(b"central-name.txt", data, local_name=b"another-local-name.txt"),
        RawMember(b"method.txt", data, method=zipfile.ZIP_DEFLATED,
                  local_method=zipfile.ZIP_STORED),
        RawMember(b"sizes.txt", data, method=zipfile.ZIP_DEFLATED, local_sizes=(5, 7)),
    ]
    archive = raw_zip(members)
    sha = hashlib.sha256(data).hexdigest()
    mtime = float(TREE_TIME)
    with mounted(tools_cli, bucket, "mismatch.zip", archive) as mountpoint:
        assert listing(mountpoint) == {
            name: ("file", len(data), sha, mtime, False)
            for name in ("central-name.txt", "method.txt", "sizes.txt")}


def test_special_modes_are_plain_files_on_a_nosuid_nodev_mount(tools_cli: Cli, bucket) -> None:
    """A hostile Unix writer's modes: setuid, setgid and sticky bits, and the types of a device,
    a FIFO and a socket. Each member is a plain file with its archived bytes (a FIFO would hang
    its reader, a device node open the host's device): the mount keeps a member's x bits only,
    and the mount is nosuid and nodev (``mount.fuse_options``)."""
    modes = {"setuid": 0o104755, "setgid": 0o102755, "sticky": 0o101755,
             "char-device": 0o020666, "block-device": 0o060666, "fifo": 0o010666,
             "socket": 0o140777, "setuid-no-type": 0o004755}
    archive = raw_zip(RawMember(name.encode(), name.encode(), external=mode << 16)
                      for name, mode in modes.items())
    with mounted(tools_cli, bucket, "modes.zip", archive) as mountpoint:
        (options,) = [line.split()[3] for line in Path("/proc/self/mounts").read_text()
                      .splitlines() if line.split()[1] == str(mountpoint)]
        assert {"nosuid", "nodev", "ro"} <= set(options.split(","))
        for name, mode in modes.items():
            info = os.lstat(mountpoint / name)
            executable = 0o555 if mode & 0o111 and stat.S_IFMT(mode) in (0, stat.S_IFREG) else 0
            assert stat.S_IFMT(info.st_mode) == stat.S_IFREG, name
            assert stat.S_IMODE(info.st_mode) == 0o444 | executable, name
            assert (mountpoint / name).read_bytes() == name.encode()
