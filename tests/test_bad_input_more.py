"""Bad input for every other command, sizes and unusable files: the same promise and checks as
``test_bad_input.py`` (whose machinery this reuses: ``run_case`` checks the exit status, one
``s3datafs: `` line on stderr with the expected fragment, no traceback, nothing on stdout, no
mount, path, state file, catalog or daemon left, and no S3 request unless the case needs one).

Covered here: ``status``, ``unmount``, ``cache``, ``prefetch``, ``snapshot``, ``diff``,
``mount-all`` and ``run`` (whose command must not run when mounting fails); sizes with bad units,
negative or non-finite numbers (``--cache-size 10X``, ``--cache-size=-5G``, ``1e400``,
``--read-timeout nan``); files that are binary garbage, empty, truncated, directories or
dangling symlinks where a credentials file, a snapshot or a datasets spec is expected; and a FIFO
(or a link to one) where a snapshot file is to be written.
(As root every file is readable, so "unreadable" is a directory or a dangling symlink here.)
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pyfuse3
import pytest
from conftest import Cli
from test_bad_input import (  # noqa: F401 - ``world`` is a fixture used by name
    CREDENTIALS,
    FAILURE,
    USAGE,
    Case,
    World,
    case,
    make_dir,
    make_file,
    run_case,
    world,
)

from devtools.s3server import S3Server
from s3datafs import cli as s3datafs_cli
from s3datafs import config, mount, mounting
from s3datafs.commands import mount as mount_command
from s3datafs.errors import ConfigError, UsageError
from s3datafs.units import counted, human_size, parse_size

pytestmark = pytest.mark.fuse

DIFF_TROUBLE = 2  # diff: 1 means "they differ", so every failure is 2
GARBAGE = b"\x00\xff\xfe\x89PNG\r\n\x1a\n\x00 binary garbage \xc3\x28\x00"


def make_bytes(relative: str, data: bytes, mode: int = 0o600):
    def setup(cli: Cli, state: World) -> None:
        path = cli.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)

    return setup


def make_link(relative: str, target: str = "/nonexistent/target"):
    def setup(cli: Cli, state: World) -> None:
        (cli.root / relative).symlink_to(target)

    return setup


def make_fifo(relative: str, *, linked_as: str | None = None):
    """A FIFO at ``relative`` (a stand-in for /dev/null or /dev/stdout, which a test must not
    touch), and a symbolic link to it at ``linked_as``, as /dev/stdout is one."""

    def setup(cli: Cli, state: World) -> None:
        os.mkfifo(cli.root / relative)
        if linked_as is not None:
            (cli.root / linked_as).symlink_to(cli.root / relative)

    return setup


def make_spec(relative: str, bucket_field: str = "b"):
    """A valid datasets spec naming ``p/`` of the world's bucket ``bucket_field``."""

    def setup(cli: Cli, state: World) -> None:
        bucket = getattr(state, bucket_field)
        path = cli.root / relative
        path.write_text(json.dumps([{"uri": f"s3://{bucket}/p/"}]))
        path.chmod(0o600)

    return setup


TRUNCATED_GZIP = gzip.compress(b'{"format":"s3datafs-snapshot/1"}\n' * 100)[:40]
GZIP_OF_GARBAGE = gzip.compress(b"\x00 not json at all\n")

STATUS_UNMOUNT_CACHE_PREFETCH = [
    case("status-extra-argument", ["status", "extra"], USAGE, "unrecognized arguments: extra"),
    case(
        "unmount-all-and-path",
        ["unmount", "--all", "{root}/adir"],
        USAGE,
        "give either MOUNTPOINT or --all",
        setup=make_dir("adir"),
    ),
    case(
        "unmount-a-file",
        ["unmount", "{root}/afile"],
        FAILURE,
        "{root}/afile is not mounted",
        setup=make_file("afile"),
    ),
    case("cache-without-action", ["cache"], USAGE, "required: action"),
    case("cache-unknown-action", ["cache", "frob"], USAGE, "invalid choice: 'frob'"),
    case(
        "cache-stats-dir-is-a-file",
        ["cache", "stats", "--cache-dir", "{root}/afile"],
        FAILURE,
        "cache directory {root}/afile is not a directory",
        setup=make_file("afile"),
    ),
    case(
        "cache-clear-dir-is-a-file",
        ["cache", "clear", "--cache-dir", "{root}/afile"],
        FAILURE,
        "cache directory {root}/afile is not a directory",
        setup=make_file("afile"),
    ),
    case("cache-clear-not-a-uri", ["cache", "clear", "http://x/y"], USAGE, "not an S3 URI"),
    case("prefetch-without-uri", ["prefetch"], USAGE, "required: uri"),
    case(
        "prefetch-size-unit",
        ["prefetch", "s3://{b}/p/", "--cache-size", "10X"],
        USAGE,
        "--cache-size '10X' is not a size",
    ),
    case(
        "prefetch-fingerprint-mismatch",
        ["prefetch", "s3://{b}/p/", "--expect-fingerprint", "f" * 64],
        FAILURE,
        "the data has",
        s3=True,
    ),
    case("prefetch-no-cache", ["prefetch", "s3://{b}/p/", "--no-cache"], USAGE, "defeat it"),
    case(
        "prefetch-bucket-missing",
        ["prefetch", "s3://{missing}/p/"],
        FAILURE,
        "bucket '{missing}' does not exist",
        s3=True,
    ),
]

SNAPSHOT = [
    case("snapshot-without-output", ["snapshot", "s3://{b}/p/"], USAGE, "required: -o/--output"),
    case("snapshot-output-dash", ["snapshot", "s3://{b}/p/", "-o", "-"], USAGE,
         "--output -: snapshot files are written to files only: name one"),
    case(
        "snapshot-output-is-a-directory",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/adir"],
        FAILURE,
        "--output {root}/adir is a directory",
        setup=make_dir("adir"),
    ),
    case(  # the file a link names is what is written: in a directory that must exist
        "snapshot-output-links-to-a-missing-directory",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/link"],
        FAILURE,
        "--output /nonexistent/target: directory /nonexistent does not exist",
        setup=make_link("link"),
    ),
    case(  # as root, replacing /dev/null with a regular file would break the machine
        "snapshot-output-is-a-device-or-fifo",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/fifo"],
        FAILURE,
        "--output {root}/fifo is not a regular file",
        setup=make_fifo("fifo"),
    ),
    case(
        "snapshot-as-of-not-a-time",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/x.snap", "--as-of", "yesterday"],
        USAGE,
        "--as-of 'yesterday' is not a time",
    ),
    case(
        "snapshot-bad-name",  # the file would carry it to every mount --snapshot
        ["snapshot", "s3://{b}/p/", "-o", "{root}/x.snap", "--name", ".."],
        USAGE,
        "invalid dataset name '..'",
    ),
    case(
        "snapshot-bad-fingerprint",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/x.snap", "--expect-fingerprint", "zz"],
        USAGE,
        "is not a fingerprint",
    ),
    case(
        "snapshot-bucket-missing",
        ["snapshot", "s3://{missing}/p/", "-o", "{root}/x.snap"],
        FAILURE,
        "bucket '{missing}' does not exist",
        s3=True,
    ),
]

DIFF_MOUNT_ALL_RUN = [
    case("diff-one-operand", ["diff", "{root}/a.snap"], USAGE, "required: B"),
    case(
        "diff-binary-garbage",
        ["diff", "{root}/garbage", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "{root}/garbage is not an s3datafs snapshot (not gzip)",
        setup=make_bytes("garbage", GARBAGE),
    ),
    case(
        "diff-empty-file",
        ["diff", "{root}/empty", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "it is empty",
        setup=make_bytes("empty", b""),
    ),
    case(
        "diff-truncated-gzip",
        ["diff", "{root}/t.snap.gz", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "truncated or corrupted",
        setup=make_bytes("t.snap.gz", TRUNCATED_GZIP),
    ),
    case(
        "diff-gzip-of-garbage",
        ["diff", "{root}/g.snap.gz", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "is not an s3datafs snapshot",
        setup=make_bytes("g.snap.gz", GZIP_OF_GARBAGE),
    ),
    case(
        "diff-dangling-symlink",
        ["diff", "{root}/link", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "does not exist",
        setup=make_link("link"),
    ),
    case(
        "diff-directory",
        ["diff", "{root}/adir", "s3://{b}/p/"],
        DIFF_TROUBLE,
        "is a directory",
        setup=make_dir("adir"),
    ),
    case(
        "mount-all-binary-garbage",
        ["mount-all", "{root}/garbage"],
        FAILURE,
        "is not UTF-8 text",
        setup=make_bytes("garbage", GARBAGE),
    ),
    case(
        "mount-all-bad-yaml",
        ["mount-all", "{root}/bad.yaml"],
        USAGE,
        "line 2, column 1: invalid YAML",
        setup=make_file("bad.yaml", "datasets: [\n"),
    ),
    case(
        "mount-all-unknown-field",
        ["mount-all", "{root}/typo.json"],
        USAGE,
        "did you mean 'versionId'",
        setup=make_file("typo.json", '[{"uri": "s3://bucket/p/", "versionid": "x"}]'),
    ),
    case(
        "mount-all-dangling-symlink",
        ["mount-all", "{root}/link"],
        FAILURE,
        "cannot read datasets spec {root}/link",
        setup=make_link("link"),
    ),
    case(
        "mount-all-per-dataset-option",
        ["mount-all", "{root}/ok.json", "--name", "x"],
        USAGE,
        "--name describes a single dataset",
        setup=make_spec("ok.json"),
    ),
    case(
        "mount-all-size-unit",
        ["mount-all", "{root}/ok.json", "--cache-size", "10X"],
        USAGE,
        "--cache-size '10X' is not a size",
        setup=make_spec("ok.json"),
    ),
    case(
        "mount-all-bucket-missing",
        ["mount-all", "{root}/missing.json"],
        FAILURE,
        "does not exist",
        setup=make_spec("missing.json", "missing"),
        s3=True,
    ),
    case(
        "run-binary-garbage",
        ["run", "--datasets", "{root}/garbage", "--", "touch", "{root}/ran"],
        FAILURE,
        "is not UTF-8 text",
        setup=make_bytes("garbage", GARBAGE),
    ),
    case(
        "run-without-command",
        ["run", "--datasets", "{root}/ok.json"],
        USAGE,
        "no command to run",
        setup=make_spec("ok.json"),
    ),
    case(
        "run-bucket-missing-never-runs-the-command",
        ["run", "--datasets", "{root}/missing.json", "--", "touch", "{root}/ran"],
        FAILURE,
        "does not exist",
        setup=make_spec("missing.json", "missing"),
        s3=True,
    ),
]

SIZES_AND_NUMBERS = [
    case("cache-size-unit", ["mount", "s3://{b}/p/", "--cache-size", "10X"], USAGE, "'10X'"),
    case("cache-size-negative", ["mount", "s3://{b}/p/", "--cache-size=-5G"], USAGE, "'-5G'"),
    case("cache-size-below-a-block", ["mount", "s3://{b}/p/", "--cache-size", "1K"], USAGE,
         "--cache-size 1K holds not one block of --block-size (64.0 KiB): give at least that, "
         "or 0 (--no-cache) for no disk cache"),
    case(
        "prefetch-memory-infinite",
        ["mount", "s3://{b}/p/", "--max-prefetch-memory", "1e400"],
        USAGE,
        "'1e400' is not a size",
    ),
    case(
        "prefetch-files-negative",
        ["mount", "s3://{b}/p/", "--prefetch-files=-1"],
        USAGE,
        "--prefetch-files '-1' is not a number of files",
    ),
    case(
        "prefetch-files-huge",
        ["mount", "s3://{b}/p/", "--prefetch-files", "100000"],
        USAGE,
        "from 0 to 1024",
    ),
    case(
        "kernel-readahead-not-pages",
        ["mount", "s3://{b}/p/", "--kernel-readahead", "3K"],
        USAGE,
        "--kernel-readahead '3K' must be a multiple of 4K from 0 to 16M",
    ),
    case("kernel-readahead-huge", ["mount", "s3://{b}/p/", "--kernel-readahead", "1G"], USAGE,
         "from 0 to 16M, such as 1M (the default) or 128K"),
    case("kernel-readahead-word", ["mount", "s3://{b}/p/", "--kernel-readahead", "lots"], USAGE,
         "'lots' is not a size"),
    case("kernel-readahead-half-byte", ["mount", "s3://{b}/p/", "--kernel-readahead", "0.5"],
         USAGE, "--kernel-readahead '0.5' is not a whole number of bytes: give a unit"),
    case("uid-negative", ["mount", "s3://{b}/p/", "--uid=-5"], USAGE, "--uid '-5'"),
    case(
        "cache-min-free-over-100",
        ["mount", "s3://{b}/p/", "--cache-min-free", "150%"],
        USAGE,
        "'150%' is not a percentage",
    ),
    case("read-timeout-negative", ["mount", "s3://{b}/p/", "--read-timeout=-3"], USAGE, "'-3'"),
    case("read-timeout-nan", ["mount", "s3://{b}/p/", "--read-timeout", "nan"], USAGE, "'nan'"),
    case("read-timeout-words", ["mount", "s3://{b}/p/", "--read-timeout", "5 min"], USAGE,
         "--read-timeout '5 min' is not a number of seconds"),
    case("read-timeout-minutes", ["mount", "s3://{b}/p/", "--read-timeout", "5m"], USAGE,
         "--read-timeout '5m' is not a number of seconds"),
]

FILES = [
    case(
        "credentials-binary-garbage",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "cannot parse credentials file {root}/creds",
        setup=make_bytes("creds", GARBAGE),
    ),
    case(
        "credentials-empty",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "has no [default] section",
        setup=make_bytes("creds", b""),
    ),
    case(
        "credentials-dangling-symlink",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "cannot read credentials file {root}/creds",
        setup=make_link("creds"),
    ),
    case(
        "credentials-on-snapshot",
        ["snapshot", "s3://{b}/p/", "-o", "{root}/x.snap", "--credentials-file", "{root}/c"],
        FAILURE,
        "(mode 0644): run chmod 600",
        setup=make_file("c", CREDENTIALS, 0o644),
    ),
    case(
        "snapshot-file-binary-garbage",
        ["mount", "--snapshot", "{root}/garbage"],
        FAILURE,
        "is not an s3datafs snapshot (not gzip)",
        setup=make_bytes("garbage", GARBAGE),
    ),
    case(
        "snapshot-file-truncated",
        ["mount", "--snapshot", "{root}/t.snap.gz"],
        FAILURE,
        "truncated or corrupted",
        setup=make_bytes("t.snap.gz", TRUNCATED_GZIP),
    ),
    case(
        "snapshot-file-is-a-directory",
        ["mount", "--snapshot", "{root}/adir"],
        FAILURE,
        "is a directory",
        setup=make_dir("adir"),
    ),
    case(
        "cache-dir-is-a-file",
        ["mount", "s3://{b}/p/", "--cache-dir", "{root}/afile"],
        FAILURE,
        "cannot use cache directory {root}/afile: Not a directory: choose another",
        setup=make_file("afile"),
    ),
    case(
        "log-file-is-a-directory",
        ["mount", "s3://{b}/p/", "--log-file", "{root}/adir"],
        FAILURE,
        "cannot write log file {root}/adir",
        setup=make_dir("adir"),
    ),
    case(
        "save-snapshot-is-a-directory",
        ["mount", "s3://{b}/p/", "--save-snapshot", "{root}/adir"],
        FAILURE,
        "--save-snapshot {root}/adir is a directory",
        setup=make_dir("adir"),
    ),
    case(  # /dev/stdout is a symbolic link: the file it names is what counts
        "save-snapshot-links-to-a-fifo",
        ["mount", "s3://{b}/p/", "--save-snapshot", "{root}/stdout"],
        FAILURE,
        "--save-snapshot {root}/stdout is not a regular file",
        setup=make_fifo("fifo", linked_as="stdout"),
    ),
]

CASES = STATUS_UNMOUNT_CACHE_PREFETCH + SNAPSHOT + DIFF_MOUNT_ALL_RUN + SIZES_AND_NUMBERS + FILES


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_of_every_command_fails_cleanly(
    cli: Cli,
    s3server: S3Server,
    world: World,  # noqa: F811 - the fixture imported above
    bad: Case,
) -> None:
    run_case(cli, bad, values=world.values(cli), world=world, s3server=s3server)
    assert not Path(cli.root, "ran").exists()  # ``run`` never started its command


def test_libfuses_reason_is_caught_without_a_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container with a read-only root has no usable /tmp: the mount failed with "internal
    error: FileNotFoundError" before libfuse could say anything (review, session 20)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    with pytest.raises(ConfigError, match=r"cannot mount .* \(fuse: unknown option.*no_such_opt"
                                          r".*\): FUSE must be"):
        mount._init(pyfuse3.Operations(), tmp_path, ["ro", "no_such_opt"])


def test_a_mount_point_removed_while_mounting_is_named_as_such(tmp_path: Path) -> None:
    """Another process took it away (not a FUSE that needs installing)."""
    with pytest.raises(ConfigError, match=r"cannot mount .*missing: it was removed while "
                                          r"mounting \(by another process\?\): try again$"):
        mount._init(pyfuse3.Operations(), tmp_path / "missing", ["ro"])


def test_a_mount_refused_without_a_word_from_libfuse_still_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise RuntimeError("fuse_session_mount failed")

    monkeypatch.setattr(mount.pyfuse3, "init", refuse)
    with pytest.raises(ConfigError, match=r"cannot mount .* \(fuse_session_mount failed\): FUSE"):
        mount._init(pyfuse3.Operations(), tmp_path, ["ro"])


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize(
    ("device", "said"),
    [("a file", "cannot open /dev/fuse (not a device): "),
     ("a device nobody drives", "cannot open /dev/fuse (No such device or address): "),
     ("/dev/null", "cannot mount {mountpoint} (fuse: ")],  # libfuse's own reason
)
def test_a_machine_without_a_usable_fuse_device_gets_one_line(
    cli: Cli, s3, make_bucket, foreground: bool, device: str, said: str
) -> None:
    """A container run without --device /dev/fuse (here: something else bound over it)."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"a")
    if device == "a file":
        device = str(cli.root / "not-fuse")
        Path(device).write_bytes(b"")
    elif device == "a device nobody drives":  # opening it fails, as a container's cgroup does
        device = str(cli.root / "no-driver")
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(240, 0))  # 240: local use, unassigned
    mountpoint = cli.root / "m"
    command = [sys.executable, "-m", "s3datafs", "mount", f"s3://{bucket}/p/", str(mountpoint),
               *(["--foreground"] if foreground else [])]
    script = f"mount --bind {device} /dev/fuse && exec {shlex.join(command)}"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=cli.env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("s3datafs: " + said.format(mountpoint=mountpoint))
    assert result.stderr.rstrip("\n").endswith("--device /dev/fuse --cap-add SYS_ADMIN")
    assert result.stderr.count("\n") == 1
    assert not mountpoint.exists()  # made for the mount, removed again
    cli.expect_log("cannot open /dev/fuse|cannot mount")


def test_a_fuse_device_this_user_may_not_open_names_that_remedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not "install fuse3": it is installed, the device is there, this user may not open it (a
    user outside the group a distribution gives /dev/fuse to; root here, so refused by a fake)."""
    opened = os.open

    def refused(path: str, *args: int) -> int:
        if path == "/dev/fuse":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return opened(path, *args)

    monkeypatch.setattr(mounting.os, "open", refused)
    with pytest.raises(ConfigError) as refusal:
        mounting._check_fuse_device()
    assert str(refusal.value) == (
        "cannot open /dev/fuse (Permission denied): this user may not open /dev/fuse: mount as "
        "root, or give the user access to the device")


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_a_machine_whose_fuse_library_cannot_load_gets_one_line(
    cli: Cli, s3, make_bucket, foreground: bool
) -> None:
    """pyfuse3 installed, libfuse3 not (or another one): its import fails where the daemon loads
    it, while S3 answers the pins (``mounting``). The user gets what to install, not "internal
    error: ImportError"; nothing is mounted and the mount point made for it goes."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"a")
    broken = cli.root / "broken" / "pyfuse3"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise ImportError('libfuse3.so.3: cannot open shared object file: No such file or "
        "directory', name='pyfuse3._pyfuse3')\n")
    env = {**cli.env, "PYTHONPATH": os.pathsep.join([str(broken.parent), cli.env["PYTHONPATH"]])}
    mountpoint = cli.root / "m"
    result = cli.run("mount", f"s3://{bucket}/p/", str(mountpoint),
                     *(["--foreground"] if foreground else []), env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "s3datafs: cannot load pyfuse3 (libfuse3.so.3: cannot open shared object file")
    assert result.stderr.rstrip("\n").endswith("--device /dev/fuse --cap-add SYS_ADMIN")
    assert result.stderr.count("\n") == 1
    assert not mountpoint.exists()
    cli.expect_log("cannot load pyfuse3")


# -- sizes as people write them ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("512K", 512 * 1024), ("512KiB", 512 * 1024),
     ("512kb", 512 * 1024), ("1.5G", 3 * 1024**3 // 2), ("0.5M", 512 * 1024),
     ("20g", 20 * 1024**3)],
)  # fmt: skip
def test_sizes_parse_to_bytes(text: str, size: int) -> None:
    """``0`` is a size (``--cache-size 0`` is ``--no-cache``), ``KiB`` and ``KB`` mean ``K``,
    and fractions are of the unit, not of a byte."""
    assert parse_size(text, "--cache-size") == size


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1000, "1000 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
     (3 * 1024**2, "3.0 MiB"), (2 * 1024**5, "2048.0 TiB")],
)  # fmt: skip
def test_sizes_print_in_binary_units(size: int, text: str) -> None:
    assert human_size(size) == text


def test_counts_read_as_english() -> None:
    assert [counted(n, "object") for n in (0, 1, 2)] == ["0 objects", "1 object", "2 objects"]


def test_numbers_at_their_documented_bounds_are_accepted() -> None:
    assert config.parse_prefetch_files("1024", "--prefetch-files") == 1024  # "0 to 1024"
    assert config.parse_prefetch_files("0", "--prefetch-files") == 0
    assert config.parse_id("4294967294", "--uid") == 2**32 - 2  # (uid_t)-1 is "no change"
    assert config.parse_mode("7777", "--file-mode") == 0o7777


def planned(*options: str) -> mount.MountPlan:
    """The plan ``s3datafs mount s3://my-bucket/p/ /mnt/p OPTIONS`` makes (nothing is contacted)."""
    parser = s3datafs_cli.build_parser(["mount"])
    argv = ["mount", "s3://my-bucket/p/", "/mnt/p", *options]
    return mount_command.build_plan(parser.parse_args(argv))


def test_mount_options_reach_the_plan_at_their_documented_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    smallest = planned("--block-size", "4K", "--memory-cache-size", "8K")  # two blocks exactly
    assert (smallest.block_size, smallest.memory_cache_bytes) == (4096, 8192)
    largest = planned("--block-size", "64M", "--memory-cache-size", "128M",
                      "--max-prefetch-memory", "1M")
    assert largest.block_size == 64 * 1024**2
    assert largest.max_prefetch_bytes == 64 * 1024**2  # readahead takes a block at least
    for bad, message in ((("--block-size", "6K"), "multiple of 4K"),
                         (("--read-timeout", "0"), "above 0"),
                         (("--as-of", "1h", "--version-id", "v1"), "give only one"),
                         (("--snapshot", "x.snap", "--etag", "e"), "drop --etag")):
        with pytest.raises(UsageError, match=message):
            planned(*bad)
    assert planned("--read-timeout", "30s").s3.read_deadline == 30.0
    assert planned("--read-timeout", "86400").s3.read_deadline == 86400.0  # "at most a day"
    assert planned("--kernel-readahead", "16M").fs.kernel_readahead == 16 * 1024**2  # "at most"
    assert planned("--kernel-readahead", "0").fs.kernel_readahead == 0
    assert planned("--cache-size", "64K").disk_cache_bytes == 64 * 1024  # one block holds
    assert planned("--no-cache", "--cache-size", "1K").disk_cache_bytes == 0  # no cache at all
    options = planned("--cache-min-free", "10%", "--no-cache", "--allow-other", "--noexec")
    assert (options.cache_min_free, options.disk_cache_bytes) == (0.10, 0)
    assert (options.allow_other, options.noexec) == (True, True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://everything.example")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.example")  # the S3 one wins
    assert planned().s3.endpoint_url == "http://s3.example"


def test_files_a_mount_reads_or_writes_later_are_named_absolutely_and_checked_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon runs in /: a relative --credentials-file (read again while mounted) is made
    absolute; it replaces --profile, which names its section; --save-snapshot needs a
    directory that exists."""
    keys = tmp_path / "keys"
    keys.write_text(CREDENTIALS)
    keys.chmod(0o600)
    monkeypatch.chdir(tmp_path)
    plan = planned("--credentials-file", "keys", "--profile", "default")
    assert plan.s3.credentials_file == str(keys)
    assert (plan.s3.profile, plan.s3.access_key_id) == (None, "AKIDTEST")
    with pytest.raises(ConfigError, match="directory .*/missing does not exist"):
        planned("--save-snapshot", "missing/x.snap")
