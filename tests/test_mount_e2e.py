"""End to end: the real command, a real FUSE mount, a real S3 server process on 127.0.0.1.

Files are read for the first time only *after* S3 was changed where a test is about pinning, so
the kernel page cache cannot hide a daemon that serves the wrong version.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from conftest import Cli, errno_of, files_below, kernel_readahead_kb, sha256

from s3datafs import config, mount, mounting
from s3datafs.errors import ConfigError
from s3datafs.runtime import MountEntry, mount_table, pid_alive

pytestmark = pytest.mark.fuse

NESTED = {
    "train/a/1.txt": b"first file\n",
    "train/a/2.txt": b"second file\n",
    "train/b/deep/er/3.bin": bytes(range(256)) * 100,
    "train/big.bin": os.urandom(3 * 1024 * 1024 + 12345),  # spans several blocks
    "train/empty.txt": b"",
    "train/with space & ü.txt": b"unicode name\n",
    "train/dirmarker/": b"",
}


def put_all(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file below ``root`` (directories as 'dir')."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "dir"
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = sha256(Path(path).read_bytes())
    return found


def expected_tree(objects: dict[str, bytes], prefix: str) -> dict[str, str]:
    expected = {}
    for key, body in objects.items():
        relative = key[len(prefix) :]
        parts = relative.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            expected["/".join(parts[:depth])] = "dir"
        expected[relative.rstrip("/")] = "dir" if key.endswith("/") else sha256(body)
    return expected


def mount_one_file(cli: Cli, s3, make_bucket) -> Path:
    """A mount of a prefix holding one file, ``x.bin`` = ``b"x"``."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    return cli.mount(f"s3://{bucket}/p/")


def test_prefix_reads_back_byte_identical(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, NESTED)
    put_all(s3, bucket, {"trainer.txt": b"not under train/\n"})
    mountpoint = cli.mount(f"s3://{bucket}/train/")
    assert mountpoint == cli.data_root / "train"
    assert tree(mountpoint) == expected_tree(NESTED, "train/")
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="train/")["Contents"]
    for item in listing:
        if item["Key"].endswith("/"):
            continue
        info = os.stat(mountpoint / item["Key"][len("train/") :])
        assert info.st_size == item["Size"]
        assert info.st_mtime == pytest.approx(item["LastModified"].timestamp(), abs=1)
        assert oct(info.st_mode & 0o777) == oct(0o444)
    assert oct(os.stat(mountpoint / "a").st_mode & 0o777) == oct(0o555)
    find = subprocess.run(["find", str(mountpoint)], capture_output=True, text=True, check=True)
    assert len(find.stdout.splitlines()) == len(expected_tree(NESTED, "train/")) + 1
    for directory in (mountpoint, mountpoint / "a"):  # listed as on a local disk: . and .. too
        listing = subprocess.run(["ls", "-a1f", str(directory)], capture_output=True, text=True)
        assert listing.stdout.splitlines()[:2] == [".", ".."]
        assert sorted(listing.stdout.splitlines()[2:]) == sorted(os.listdir(directory))


def test_prefix_without_slash_and_whole_bucket(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, NESTED)
    by_prefix = cli.mount(f"s3://{bucket}/train", str(cli.root / "by-prefix"))
    assert tree(by_prefix) == expected_tree(NESTED, "train/")
    whole = cli.mount(f"s3://{bucket}")
    assert whole == cli.data_root / bucket
    assert tree(whole) == expected_tree(NESTED, "")


def test_single_object_mount(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = os.urandom(2 * 1024 * 1024 + 3)
    s3.put_object(Bucket=bucket, Key="models/weights.tar.gz", Body=body)
    mountpoint = cli.mount(f"s3://{bucket}/models/weights.tar.gz")
    assert mountpoint == cli.data_root / "weights"
    assert os.listdir(mountpoint) == ["weights.tar.gz"]
    assert sha256((mountpoint / "weights.tar.gz").read_bytes()) == sha256(body)


def test_versioned_bucket_serves_pinned_bytes_after_overwrite_and_delete(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    mountpoint = cli.mount(f"s3://{bucket}/train/")
    s3.put_object(Bucket=bucket, Key="train/big.bin", Body=b"new version")
    s3.delete_object(Bucket=bucket, Key="train/a/1.txt")
    s3.put_object(Bucket=bucket, Key="train/added-later.txt", Body=b"late")
    assert tree(mountpoint) == expected_tree(NESTED, "train/")
    assert os.getxattr(mountpoint / "big.bin", "user.s3datafs.version_id")


def test_single_object_version_and_etag_pins(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    first = s3.put_object(Bucket=bucket, Key="d.csv", Body=b"v1\n")
    s3.put_object(Bucket=bucket, Key="d.csv", Body=b"v2\n")
    mountpoint = cli.mount(
        f"s3://{bucket}/d.csv", "--version-id", first["VersionId"], "--etag", first["ETag"]
    )
    assert (mountpoint / "d.csv").read_bytes() == b"v1\n"
    assert (
        os.getxattr(mountpoint / "d.csv", "user.s3datafs.version_id").decode() == first["VersionId"]
    )


def test_null_version_of_object_written_before_versioning(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/old.txt", Body=b"before versioning\n")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3.put_object(Bucket=bucket, Key="p/old.txt", Body=b"after\n")
    assert os.getxattr(mountpoint / "old.txt", "user.s3datafs.version_id") == b"null"
    assert (mountpoint / "old.txt").read_bytes() == b"before versioning\n"


def test_unversioned_overwrite_fails_reads_and_never_returns_new_bytes(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/f.bin", Body=b"A" * 5000)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    cli.expect_log(r"changed or was deleted since it was pinned")
    s3.put_object(Bucket=bucket, Key="p/f.bin", Body=b"B" * 5000)
    assert errno_of((mountpoint / "f.bin").read_bytes) in (errno.EIO, errno.ESTALE)
    assert not any(n.endswith("version_id") for n in os.listxattr(mountpoint / "f.bin"))
    log = (cli.log_dir / "p.log").read_text()
    assert f"s3://{bucket}/p/f.bin" in log


def test_after_mount_no_list_or_head_and_every_get_is_pinned(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    mountpoint = cli.mount(f"s3://{bucket}/train/")
    s3server.reset_stats()
    for directory, dirs, files in os.walk(mountpoint):
        for name in dirs + files:
            os.stat(os.path.join(directory, name))
            os.listxattr(os.path.join(directory, name))
    subprocess.run(["ls", "-laR", str(mountpoint)], capture_output=True, check=True)
    assert s3server.ops() == {}
    tree(mountpoint)
    ops = s3server.ops()
    assert set(ops) == {"GetObject"}
    for request in s3server.stats()["requests"]:
        assert request["range"].startswith("bytes=")
        assert request["if_match"]
        assert request["version_id"]


def test_writes_of_every_kind_fail_with_erofs(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/f.txt": b"data", "p/d/g.txt": b"more"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    target = mountpoint / "f.txt"
    attempts = {
        "open for write": lambda: open(target, "r+b"),  # noqa: SIM115
        "append": lambda: open(target, "ab"),  # noqa: SIM115
        "create": lambda: open(mountpoint / "new.txt", "wb"),  # noqa: SIM115
        "mkdir": lambda: os.mkdir(mountpoint / "newdir"),
        "unlink": lambda: os.unlink(target),
        "rmdir": lambda: os.rmdir(mountpoint / "d"),
        "rename": lambda: os.rename(target, mountpoint / "moved.txt"),
        "chmod": lambda: os.chmod(target, 0o777),
        "chown": lambda: os.chown(target, 1, 1),
        "truncate": lambda: os.truncate(target, 0),
        "utime": lambda: os.utime(target, (0, 0)),
        "symlink": lambda: os.symlink("f.txt", mountpoint / "link"),
        "link": lambda: os.link(target, mountpoint / "hard"),
        "setxattr": lambda: os.setxattr(target, "user.x", b"1"),
        "removexattr": lambda: os.removexattr(target, "user.s3datafs.etag"),
    }
    for what, attempt in attempts.items():
        assert errno_of(attempt) == errno.EROFS, what
    assert target.read_bytes() == b"data"


def test_xattrs_statfs_and_status(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x" * 1000, "p/y.bin": b"y" * 3000})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    etag = s3.head_object(Bucket=bucket, Key="p/x.bin")["ETag"].strip('"')
    assert (
        os.getxattr(mountpoint / "x.bin", "user.s3datafs.uri") == f"s3://{bucket}/p/x.bin".encode()
    )
    assert os.getxattr(mountpoint / "x.bin", "user.s3datafs.etag").decode() == etag
    assert os.getxattr(mountpoint, "user.s3datafs.uri") == f"s3://{bucket}/p/".encode()
    assert os.getxattr(mountpoint, "user.s3datafs.object_count") == b"2"
    fs = os.statvfs(mountpoint)
    assert fs.f_blocks * fs.f_frsize >= 4000
    status = cli.run("status")
    assert status.returncode == 0
    assert str(mountpoint) in status.stdout
    assert f"s3://{bucket}/p/" in status.stdout
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        line = next(row for row in table if f" {mountpoint} " in row)
    assert "fuse.s3datafs" in line
    assert " ro," in line or " ro " in line


def test_the_kernel_remembers_names_found_and_missing_without_asking_the_daemon(
    cli: Cli, s3, make_bucket
) -> None:
    """Entries, attributes and missing names are cached for the mount's life: a stopped
    daemon cannot answer, so whatever is answered while it is stopped came from the kernel."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x" * 10})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    present, missing = mountpoint / "x.bin", mountpoint / "x.bin.gz"
    assert present.stat().st_size == 10
    assert errno_of(missing.stat) == errno.ENOENT
    time.sleep(1.5)  # not a second's worth: a day's
    answers: list[object] = []

    def ask_again() -> None:
        answers.append(present.stat().st_size)
        answers.append(errno_of(missing.stat))

    daemon = cli.daemon_pid(mountpoint)
    asker = threading.Thread(target=ask_again, daemon=True)
    os.kill(daemon, signal.SIGSTOP)
    try:
        asker.start()
        asker.join(timeout=5)
        answered_while_stopped = list(answers)
    finally:
        os.kill(daemon, signal.SIGCONT)
    asker.join(timeout=30)
    assert answered_while_stopped == [10, errno.ENOENT]


def test_a_mount_point_below_a_symlink_is_one_mount_for_status_and_unmount(
    cli: Cli, s3, make_bucket
) -> None:
    """/data is often a symlink to a larger disk; the kernel's table names the real path."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/a.txt": b"a\n"})
    real = cli.root / "real"
    real.mkdir()
    (cli.root / "link").symlink_to(real)
    given = cli.root / "link" / "p"
    result = cli.run("mount", f"s3://{bucket}/p/", str(given))
    assert result.returncode == 0, result.stderr
    assert (given / "a.txt").read_bytes() == b"a\n"
    status = cli.run("status")  # every s3datafs mount of the machine: look at this one's line
    (line,) = [line for line in status.stdout.splitlines() if line.startswith(f"{real / 'p'} ")]
    assert "dead" not in line
    rows = json.loads(cli.run("status", "--json").stdout)
    (row,) = [row for row in rows if row["mountpoint"] == str(real / "p")]
    assert row["state"] == "mounted"  # its state file names the real path too
    unmounted = cli.unmount(given)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not os.path.ismount(real / "p")
    assert cli.run("mount", f"s3://{bucket}/p/", str(given)).returncode == 0
    (cli.root / "to-the-mount").symlink_to(given)  # a link to the mount point itself
    unmounted = cli.unmount(cli.root / "to-the-mount")
    assert unmounted.returncode == 0, unmounted.stderr
    assert not os.path.ismount(real / "p")


@pytest.fixture
def fusectl() -> Iterator[Path]:
    """fusectl at /sys/fs/fuse/connections (systemd mounts it; mounted here if it is not)."""
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = False
    if not os.path.ismount(connections):
        done = subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)],
                              capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount fusectl: {done.stderr.decode().strip()}")
        mounted_here = True
    try:
        yield connections
    finally:
        if mounted_here:
            subprocess.run(["umount", str(connections)], check=False)


def test_the_kernel_may_send_more_readahead_requests_at_once(
    cli: Cli, s3, make_bucket, fusectl: Path
) -> None:
    """FUSE's default of 12 held back the reads of a 13th reader on a stalled S3."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    device = next(e.device for e in mount_table() if e.mountpoint == str(mountpoint))
    knobs = fusectl / device.partition(":")[2]

    def seen() -> list[str]:
        return [(knobs / name).read_text().strip()
                for name in ("max_background", "congestion_threshold")]

    deadline = time.monotonic() + 10  # set by a task of the daemon (in a thread), after INIT
    while seen() != ["64", "48"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen() == ["64", "48"]


def test_without_fusectl_mounted_root_still_lets_the_kernel_send_more_requests(
    cli: Cli, s3, make_bucket
) -> None:
    """Where nobody mounted fusectl (no systemd, a container run as root), the daemon mounts it
    for a moment in a private mount namespace: the knobs are set, the host's table stays as
    it was."""
    if os.path.ismount(mount.FUSECTL):
        pytest.skip("fusectl is mounted here: the daemon writes its knobs directly")
    mountpoint = mount_one_file(cli, s3, make_bucket)
    device = next(e.device for e in mount_table() if e.mountpoint == str(mountpoint))
    knobs = f"{mount.FUSECTL}/{device.partition(':')[2]}"
    script = (f"mount -t fusectl fusectl {mount.FUSECTL} && cat {knobs}/max_background "
              f"{knobs}/congestion_threshold")
    deadline = time.monotonic() + 10  # set by a task of the daemon, once INIT is answered
    while True:
        seen = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, check=True).stdout
        if seen.split() == ["64", "48"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert seen.split() == ["64", "48"]
    assert not [e for e in mount_table() if e.fstype == "fusectl"]


def test_the_kernel_reads_ahead_1_mib_or_what_kernel_readahead_says(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """Set through the mount's backing device once INIT is answered (FUSE's default: 128 KiB).
    1 MiB makes each page fault of a file mapped and read at random fetch 1 MiB around it (a
    review: LMDB's 500 random gets read a whole 110 MB file): such a job asks for less."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert kernel_readahead_kb(mountpoint) == str(config.DEFAULT_KERNEL_READAHEAD // 1024)
    for size, kb in (("128K", "128"), ("0", "0")):
        other = cli.mount(f"s3://{bucket}/p/", str(tmp_path / f"mnt-{kb}"),
                          "--kernel-readahead", size)
        assert kernel_readahead_kb(other) == kb
        assert (other / "x.bin").read_bytes() == b"x"


def test_catalogs_of_dead_daemons_are_swept_and_a_daemon_removes_its_own(
    cli: Cli, s3, make_bucket
) -> None:
    """A catalog's name ends with its daemon's pid: a mount removes those of dead daemons, keeps
    those of live ones, and removes its own when it ends."""
    catalogs = cli.root / "cache" / "catalogs"
    catalogs.mkdir(parents=True, mode=0o700)
    dead = catalogs / "gone-mount-99999999.db"  # above any pid_max: never a live process
    live = catalogs / f"other-mount-{os.getpid()}.db"
    unrelated = catalogs / "notes-abc.db"  # no pid at the end: not a daemon's catalog
    for path in (dead, live, unrelated):
        path.write_bytes(b"")
    mountpoint = mount_one_file(cli, s3, make_bucket)
    pid = cli.daemon_pid(mountpoint)
    (own,) = catalogs.glob(f"*-{pid}.db")
    assert not dead.exists()
    assert live.exists()
    assert unrelated.exists()
    assert cli.unmount(mountpoint).returncode == 0
    assert not own.exists()
    assert sorted(catalogs.iterdir()) == sorted([live, unrelated])


def test_status_calls_a_mount_it_has_no_state_for_mounted_not_dead(
    cli: Cli, s3, make_bucket
) -> None:
    """Another user's mount (or another runtime directory's) is alive: not "dead"."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    elsewhere = {**cli.env, "S3DATAFS_RUNTIME_DIR": str(cli.root / "other-run")}
    rows = json.loads(cli.run("status", "--json", env=elsewhere).stdout)
    (row,) = [row for row in rows if row["mountpoint"] == str(mountpoint)]
    assert row["state"] == "mounted (not by this user or runtime directory)"
    assert row["pid"] is None



def test_status_calls_a_mount_without_state_here_dead_or_not_answering_as_it_is(
    cli: Cli, s3, make_bucket
) -> None:
    """Without a state file, status asks the mount itself: statfs, which the kernel never
    answers from its cache (stat of the root still succeeds after the daemon died), and not
    for long (a stopped daemon never answers)."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    elsewhere = {**cli.env, "S3DATAFS_RUNTIME_DIR": str(cli.root / "other-run")}

    def state() -> str:
        rows = json.loads(cli.run("status", "--json", env=elsewhere).stdout)
        (row,) = [row for row in rows if row["mountpoint"] == str(mountpoint)]
        return row["state"]

    pid = cli.daemon_pid(mountpoint)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert state() == "not answering (for 2 s)"
    finally:
        os.kill(pid, signal.SIGCONT)
    os.stat(mountpoint)  # the root's attributes, cached by the kernel
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.01)
    os.stat(mountpoint)  # still answered from the cache
    assert state() == "dead: run s3datafs unmount"


def test_a_stopped_daemon_is_told_by_status_and_unmounted_without_a_hang(
    cli: Cli, s3, make_bucket
) -> None:
    """Neither command may look at the mount point itself: the kernel asks the daemon for its
    root's attributes until something has looked at the mount (here: nothing has), and a
    stopped daemon never answers, nor can the one who asked be interrupted."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.data_root / "p"
    assert cli.run("mount", f"s3://{bucket}/p/").returncode == 0
    pid = cli.daemon_pid(mountpoint)
    os.kill(pid, signal.SIGSTOP)
    try:
        rows = json.loads(cli.run("status", "--json", timeout=20).stdout)  # other tests' too
        assert [row["state"] for row in rows if row["mountpoint"] == str(mountpoint)] == [
            "not answering (for 2 s)"]
        unmounted = cli.run("unmount", "--lazy", str(mountpoint), timeout=20)
        assert unmounted.returncode == 0, unmounted.stderr
        assert not os.path.ismount(mountpoint)
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:  # it finds itself unmounted
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_a_daemon_slow_to_answer_is_waited_for_by_status(cli: Cli, s3, make_bucket) -> None:
    """Up to ``MOUNT_ANSWER_SECONDS``: a daemon busy (here: stopped) for a second is mounted,
    not "not answering"."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    pid = cli.daemon_pid(mountpoint)
    os.kill(pid, signal.SIGSTOP)
    try:
        status = subprocess.Popen([sys.executable, "-m", "s3datafs", "status", "--json"],
                                  env=cli.env, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # status asks the stopped daemon meanwhile
    finally:
        os.kill(pid, signal.SIGCONT)
    rows = json.loads(status.communicate(timeout=20)[0])
    assert [row["state"] for row in rows if row["mountpoint"] == str(mountpoint)] == ["mounted"]


def test_status_shows_what_the_state_file_says_and_no_mount_is_no_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each column comes from the mount's state file (the mount table's source is only the URI
    of a mount without one); with no mount at all, one line and exit 0."""
    from s3datafs.commands import status
    from s3datafs.runtime import MountEntry

    entry = MountEntry("/data/mnist", "fuse.s3datafs", "s3datafs")
    state = {"mountpoint": "/data/mnist", "uri": "s3://b/mnist/", "object_count": 2,
             "total_bytes": 3 * 1024**2, "fingerprint": "f" * 64, "pid": os.getpid(),
             "stats": {"s3_requests": 3, "memory_hits": 5, "disk_hits": 7, "failed_reads": 4,
                       "stale_reads": 3}}
    monkeypatch.setattr(status.runtime, "our_mounts", lambda: [entry])
    monkeypatch.setattr(status.runtime, "all_states", lambda: [state])
    monkeypatch.setattr(status, "statfs_errno", lambda path, as_owner: 0)  # the mount answers
    assert status.run(argparse.Namespace(json=False)) == 0
    _header, row, counters = capsys.readouterr().out.splitlines()
    assert row.split() == ["/data/mnist", "s3://b/mnist/", "2", "3.0", "MiB", str(os.getpid()),
                           "f" * 64, "mounted"]
    assert counters.startswith("/data/mnist: 3 S3 requests, ")
    assert "block hits: 5 memory, 7 disk, 0 misses" in counters
    assert counters.endswith("; 4 reads failed (3 of objects changed or deleted after mount)")
    monkeypatch.setattr(status.runtime, "our_mounts", lambda: [])
    assert status.run(argparse.Namespace(json=False)) == 0
    assert capsys.readouterr().out == "no s3datafs mounts\n"


def test_noexec_mounts_files_that_cannot_be_executed(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/run.sh": b"#!/bin/sh\necho ran\n"})
    executable = cli.mount(f"s3://{bucket}/p/", str(cli.root / "exec"), "--file-mode", "0555")
    assert subprocess.run([executable / "run.sh"], capture_output=True, check=False).stdout == \
        b"ran\n"
    refused = cli.mount(f"s3://{bucket}/p/", str(cli.root / "noexec"), "--file-mode", "0555",
                        "--noexec")
    assert errno_of(lambda: subprocess.run([refused / "run.sh"], check=False)) == errno.EACCES


def test_unmount_waits_for_the_daemon_and_cleans_a_dead_mount(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    pid = cli.daemon_pid(mountpoint)
    assert cli.unmount(mountpoint).returncode == 0
    assert not os.path.ismount(mountpoint)
    assert not pid_alive(pid), "unmount returned before the daemon exited"

    mountpoint = cli.mount(f"s3://{bucket}/p/")
    pid = cli.daemon_pid(mountpoint)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert "dead" in cli.run("status").stdout
    assert errno_of(lambda: os.listdir(mountpoint)) == errno.ENOTCONN
    again = cli.run("mount", f"s3://{bucket}/p/")  # at the same, default, place: one line
    assert again.returncode == 1
    assert again.stderr == (f"s3datafs: {mountpoint} is a dead mount (transport endpoint is not "
                            f"connected): run 's3datafs unmount {mountpoint}' first\n")
    result = cli.unmount(mountpoint)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mountpoint)
    assert not list((cli.root / "run").glob("*.json")), "the killed daemon's state was left"
    # What the mount made for its mount point goes too, as when its daemon ends on its own.
    assert not cli.data_root.exists(), "the directories made for the killed mount were left"


def test_a_mount_point_the_mount_made_goes_when_it_is_unmounted_one_that_was_there_stays(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    made = cli.mount(f"s3://{bucket}/p/")  # /data/p under a data root that was not there
    assert cli.unmount(made).returncode == 0
    assert not cli.data_root.exists(), "the directories made for the mount were left"
    there = cli.root / "there"
    there.mkdir()
    mountpoint = cli.mount(f"s3://{bucket}/p/", str(there))
    assert cli.unmount(mountpoint).returncode == 0
    assert there.is_dir()
    made = cli.mount(f"s3://{bucket}/p/")  # unmounted by hand: the daemon removes it itself
    daemon = cli.daemon_pid(made)
    subprocess.run(["fusermount3", "-u", str(made)], check=True)
    deadline = time.monotonic() + 10
    while pid_alive(daemon):
        assert time.monotonic() < deadline, "the daemon did not end"
        time.sleep(0.05)
    assert not cli.data_root.exists(), "the directories made for the mount were left"


def test_status_removes_the_state_of_a_killed_daemon_unmounted_by_hand(
    cli: Cli, s3, make_bucket
) -> None:
    """A daemon killed outright, its dead mount taken off with ``umount -l`` (not ours): one
    state file per such mount point piled up, forever."""
    live = mount_one_file(cli, s3, make_bucket)
    bucket = make_bucket()
    put_all(s3, bucket, {"k.bin": b"k"})
    killed = cli.mount(f"s3://{bucket}/", str(cli.root / "killed"))
    os.kill(cli.daemon_pid(killed), signal.SIGKILL)
    time.sleep(0.2)
    subprocess.run(["umount", "-l", str(killed)], check=True)
    assert len(list((cli.root / "run").glob("*.json"))) == 2
    assert cli.run("status").returncode == 0
    assert [json.loads(p.read_text())["mountpoint"] for p in (cli.root / "run").glob("*.json")] \
        == [str(live)]
    assert not killed.exists(), "the mount point the killed mount made was left"


def test_unmount_refuses_while_another_file_system_is_mounted_over_ours(
    cli: Cli, s3, make_bucket
) -> None:
    """An unmount at a path removes its topmost mount: not ours while a tmpfs covers it."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
    try:
        refused = cli.unmount(mountpoint)
        assert refused.returncode == 1
        assert refused.stderr == (f"s3datafs: a tmpfs file system is mounted over the s3datafs "
                                  f"mount at {mountpoint}: unmount it first\n")
        assert [e.fstype for e in mount_table() if e.mountpoint == str(mountpoint)] == [
            "fuse.s3datafs", "tmpfs"]
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
    assert cli.unmount(mountpoint).returncode == 0
    assert not os.path.ismount(mountpoint)


def test_sigterm_while_another_file_system_covers_the_mount_leaves_that_one_alone(
    cli: Cli, s3, make_bucket
) -> None:
    """A stop signal asks the daemon to unmount, but libfuse unmounts by path: with a tmpfs on
    top, that would take the tmpfs off instead. The daemon leaves it (a warning), exits, and its
    dead mount below is cleared by ``unmount`` once the tmpfs is gone."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    daemon = cli.daemon_pid(mountpoint)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
    try:
        (mountpoint / "kept.txt").write_text("on the tmpfs")
        os.kill(daemon, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pid_alive(daemon):
            assert time.monotonic() < deadline, "the daemon did not exit"
            time.sleep(0.05)
        assert [e.fstype for e in mount_table() if e.mountpoint == str(mountpoint)] == [
            "fuse.s3datafs", "tmpfs"]
        assert (mountpoint / "kept.txt").read_text() == "on the tmpfs"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
    assert errno_of(lambda: os.listdir(mountpoint)) == errno.ENOTCONN  # dead below, now bare
    assert cli.unmount(mountpoint).returncode == 0
    assert not os.path.ismount(mountpoint)
    cli.expect_log(f"a tmpfs file system is mounted over {mountpoint}: it is left as it is")


@pytest.mark.parametrize("tools", ["fusermount3", "umount2"])
def test_unmount_of_a_mount_with_a_file_open_says_busy_and_lazy_detaches_it(
    cli: Cli, s3, make_bucket, tools: str
) -> None:
    """With fuse3's tools, and without them (root's own umount2: a container without fuse3),
    a mount in use is refused in the same one line, and ``--lazy`` then detaches it."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    daemon = cli.daemon_pid(mountpoint)
    env = cli.env if tools == "fusermount3" else {**cli.env, "PATH": "/nonexistent"}
    with open(mountpoint / "x.bin", "rb") as held:
        refused = cli.run("unmount", str(mountpoint), env=env)
        assert (refused.returncode, refused.stderr) == (
            1, f"s3datafs: {mountpoint} is busy: close the files using it, or use --lazy\n")
        assert os.path.ismount(mountpoint)
        assert cli.run("unmount", "--lazy", str(mountpoint), env=env).returncode == 0
        assert not os.path.ismount(mountpoint)
        assert held.read() == b"x"  # a file open before the detach is served to its end
    deadline = time.monotonic() + 30
    while pid_alive(daemon):  # closed: the detached mount ends, and its daemon with it
        assert time.monotonic() < deadline, "the detached daemon did not exit"
        time.sleep(0.05)


def test_unmount_names_a_mount_inside_ours_as_what_keeps_it_busy(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/sub/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    inside = mountpoint / "sub"
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inside)], check=True)
    try:
        refused = cli.unmount(mountpoint)
        assert refused.returncode == 1
        assert refused.stderr == (f"s3datafs: {mountpoint} is busy: {inside} is mounted inside "
                                  "it: unmount that first, or use --lazy\n")
    finally:
        subprocess.run(["umount", str(inside)], check=False)
    assert cli.unmount(mountpoint).returncode == 0


@pytest.mark.parametrize("given_as", ["its own number", "3"])
def test_the_daemon_keeps_no_descriptor_its_command_was_given(
    cli: Cli, s3, make_bucket, given_as: str
) -> None:
    """``flock job.lock s3datafs mount ...``: the lock is the caller's, not the mount's. As 3:
    a shell's ``exec 3>job.lock; flock 3``, the first number past stdin, stdout and stderr."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    lock = cli.root / "job.lock"
    command = [sys.executable, "-m", "s3datafs", "mount", f"s3://{bucket}/p/"]
    if given_as == "3":
        mounted = subprocess.run(
            ["sh", "-c", 'exec 3>"$0" && flock 3 && exec "$@"', str(lock), *command],
            env=cli.env, capture_output=True, text=True, timeout=60, check=False)
    else:
        with open(lock, "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            mounted = subprocess.run(
                command, env=cli.env, pass_fds=(held.fileno(),), capture_output=True, text=True,
                timeout=60, check=False)
    assert mounted.returncode == 0, mounted.stderr
    with open(lock) as again:  # the caller let go: nobody may hold it now
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
    daemon = cli.daemon_pid(cli.data_root / "p")
    assert str(lock) not in {os.readlink(fd) for fd in Path(f"/proc/{daemon}/fd").iterdir()}


def test_a_mount_detached_lazily_leaves_the_state_file_to_the_next_mount_there(
    cli: Cli, s3, make_bucket
) -> None:
    """Both daemons serve the same mount point's path: the older one's open files, the newer
    one's mount. Only the newer one refreshes (and at its end removes) the state file, so
    status and unmount see its pid, not the old one's."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    old = cli.daemon_pid(mountpoint)
    with open(mountpoint / "x.bin", "rb") as held:
        assert cli.run("unmount", "--lazy", str(mountpoint)).returncode == 0
        bucket = make_bucket()
        put_all(s3, bucket, {"p/y.bin": b"y"})
        assert cli.run("mount", f"s3://{bucket}/p/", str(mountpoint)).returncode == 0
        new = cli.daemon_pid(mountpoint)
        # Over two refreshes of each daemon's counters (every 2 s), read often: the newer
        # daemon's refresh may follow the older one's within a moment.
        deadline = time.monotonic() + 2 * mount.STATS_INTERVAL + 0.5
        while time.monotonic() < deadline:
            assert _state_pids(cli, mountpoint) == [new]
            time.sleep(0.02)
        assert held.read() == b"x"  # the old daemon still serves what was open
    deadline = time.monotonic() + 10
    while pid_alive(old):  # its last file closed: it ends, and leaves the new state alone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert cli.daemon_pid(mountpoint) == new
    started = time.monotonic()
    assert cli.unmount(mountpoint).returncode == 0
    assert time.monotonic() - started < 10  # it waited for the new daemon, which exits


def _state_pids(cli: Cli, mountpoint: Path) -> list[int]:
    """The pids the runtime directory's state files name for ``mountpoint`` (read directly: a
    ``status`` command takes a few hundred milliseconds)."""
    pids = []
    for path in (cli.root / "run").glob("*.json"):
        state = json.loads(path.read_text())
        if state["mountpoint"] == str(mountpoint):
            pids.append(state["pid"])
    return pids


def test_a_lazy_unmount_serves_open_files_until_they_close_then_the_daemon_exits(
    cli: Cli, s3, make_bucket
) -> None:
    """``unmount --lazy`` detaches at once; the kernel keeps the connection for the open file.

    Only when it is closed does the kernel end the connection, and only then may the daemon
    drop requests and exit (it watches for exactly that, see ``connection``).
    """
    bucket = make_bucket()
    body = os.urandom(8 * 1024 * 1024)
    put_all(s3, bucket, {"p/big.bin": body})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    pid = cli.daemon_pid(mountpoint)
    with open(mountpoint / "big.bin", "rb", buffering=0) as still_open:
        assert still_open.read(4096) == body[:4096]
        result = cli.run("unmount", "--lazy", str(mountpoint))
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(mountpoint)
        time.sleep(0.5)  # time enough to exit, if the daemon wrongly thought it was unmounted
        assert pid_alive(pid)
        still_open.seek(6 * 1024 * 1024)  # past any readahead yet: GETs after the detach
        assert still_open.read() == body[6 * 1024 * 1024 :]
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the daemon did not exit after the last close"
        time.sleep(0.05)


def test_sigterm_unmounts_cleanly(cli: Cli, s3, make_bucket) -> None:
    mountpoint = mount_one_file(cli, s3, make_bucket)
    pid = cli.daemon_pid(mountpoint)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mountpoint)
    assert str(mountpoint) not in cli.run("status").stdout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    assert not list((cli.root / "run").glob("*.json")), "the daemon left its state file"


def test_the_daemon_is_detached_from_the_command_that_started_it(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """Its own session (a Ctrl-C or hang-up of the terminal does not reach it), its working
    directory ``/`` (it keeps no directory busy), its standard streams on /dev/null."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "s3datafs", "mount", f"s3://{bucket}/p/"], cwd=workdir,
        env=cli.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    mountpoint = Path(done.stdout.rsplit(" at ", 1)[1].split(" (", 1)[0])
    pid = cli.daemon_pid(mountpoint)
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {os.devnull}


def test_foreground_mount_stays_attached(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"hello"})
    mountpoint = cli.root / "fg"
    process = subprocess.Popen(
        [sys.executable, "-m", "s3datafs", "mount", "-f", f"s3://{bucket}/p/", str(mountpoint)],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "mounted" in process.stdout.readline()
        assert (mountpoint / "x.bin").read_bytes() == b"hello"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert not os.path.ismount(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not list(cli.log_dir.glob("*.log"))  # its log is the terminal, unless --log-file
    assert not mountpoint.exists()  # made for the mount: gone with it


def test_credentials_file_is_used_and_must_be_private(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    secret = "s3cr3t-value-never-logged"
    credentials = cli.root / "creds"
    credentials.write_text(
        f"[default]\naws_access_key_id = AKIDTEST\naws_secret_access_key = {secret}\n"
    )
    credentials.chmod(0o644)
    loose = cli.run("mount", f"s3://{bucket}/p/", "--credentials-file", str(credentials))
    assert loose.returncode != 0
    assert "chmod 600" in loose.stderr
    credentials.chmod(0o600)
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--credentials-file", str(credentials))
    assert (mountpoint / "x.bin").read_bytes() == b"x"
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        assert secret not in table.read()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert secret.encode() not in cmdline.read_bytes()
        except OSError:
            continue
    for path, content in files_below(cli.root, besides=[credentials, mountpoint]):
        assert secret.encode() not in content, path


def test_unsafe_keys_are_skipped_with_a_warning_each_and_safe_ones_kept(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    unsafe = ["p/a//b", "p/../x", "p/./y", "p/" + "z" * 256, "p/f"]  # p/f loses to directory p/f/
    safe = {"p/f/g": b"g", "p/%41": b"pct", "p/back\\slash": b"bs", "p/Case": b"C", "p/case": b"c"}
    put_all(s3, bucket, dict.fromkeys(unsafe, b"unsafe") | safe)
    for reason in ("empty path segment", r"'\.\.'", r"'\.'", "limit 255", "directory"):
        cli.expect_log(reason)
    result = cli.run("mount", f"s3://{bucket}/p/")
    assert result.returncode == 0, result.stderr
    assert "5 unsafe keys skipped" in result.stdout
    mountpoint = cli.data_root / "p"
    assert tree(mountpoint) == expected_tree(safe, "p/")
    assert len([line for line in result.stderr.splitlines() if "WARNING" in line]) == 5


def test_concurrent_random_reads_match_the_reference(cli: Cli, s3, make_bucket) -> None:
    import random
    from concurrent.futures import ThreadPoolExecutor

    bucket = make_bucket(versioned=True)
    body = os.urandom(6 * 1024 * 1024 + 999)
    s3.put_object(Bucket=bucket, Key="p/big.bin", Body=body)
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    s3.put_object(Bucket=bucket, Key="p/big.bin", Body=os.urandom(len(body)))  # pinning holds
    rng = random.Random(1234)
    reads = [(rng.randrange(len(body)), rng.choice([1, 4096, 65536, 1 << 20])) for _ in range(200)]

    def read(offset_size: tuple[int, int]) -> bool:
        offset, size = offset_size
        with open(mountpoint / "big.bin", "rb", buffering=0) as handle:
            handle.seek(offset)
            return handle.read(size) == body[offset : offset + size]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(read, reads))
    assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(body)


def test_sigusr1_writes_the_daemons_thread_stacks_to_its_log_and_it_serves_on(
    cli: Cli, s3, make_bucket
) -> None:
    """How to see where a hung daemon waits, with nothing installed but s3datafs."""
    mountpoint = mount_one_file(cli, s3, make_bucket)
    log_file = cli.root / "log" / "p.log"
    told = log_file.stat().st_size
    os.kill(cli.daemon_pid(mountpoint), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "most recent call first" not in log_file.read_text()[told:]:
        assert time.monotonic() < deadline, "no stack dump in the log"
        time.sleep(0.05)
    assert "File " in log_file.read_text()[told:]
    assert (mountpoint / "x.bin").read_bytes() == b"x"


def test_a_log_file_rotated_away_is_made_again_and_stack_dumps_follow_it(
    cli: Cli, s3, make_bucket
) -> None:
    """logrotate without copytruncate: the daemon cannot be told (SIGHUP unmounts)."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    log_file = cli.root / "log" / "p.log"
    rotated = log_file.with_suffix(".log.1")
    log_file.rename(rotated)
    s3.delete_object(Bucket=bucket, Key="p/x.bin")  # a read now fails, and logs why
    cli.expect_log("changed or was deleted since it was pinned")
    assert errno_of(lambda: (mountpoint / "x.bin").read_bytes()) == errno.ESTALE
    assert "changed or was deleted since it was pinned" in log_file.read_text()
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    os.kill(cli.daemon_pid(mountpoint), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "most recent call first" not in log_file.read_text():
        assert time.monotonic() < deadline, "no stack dump in the new log file"
        time.sleep(0.05)
    assert "most recent call first" not in rotated.read_text()


def test_the_log_says_which_mount_it_is_and_why_a_mount_failed(
    cli: Cli, s3, make_bucket
) -> None:
    """Read at 3 a.m., by someone who did not see the command's stderr (cron, a unit)."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    log_file = cli.log_dir / "p.log"
    assert f"INFO s3datafs.mount[{cli.daemon_pid(mountpoint)}]: mounted s3://{bucket}/p/ at " \
           f"{mountpoint}: 1 object, 1 B, fingerprint " in log_file.read_text()
    assert cli.unmount(mountpoint).returncode == 0
    failed = cli.run("mount", f"s3://{bucket}/p/", "--endpoint-url", "http://127.0.0.1:9")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1  # the terminal gets it once
    (logged,) = [line for line in log_file.read_text().splitlines() if " ERROR " in line]
    assert logged.endswith(f"cannot mount s3://{bucket}/p/ at {mountpoint}: "
                           f"{failed.stderr.removeprefix('s3datafs: ').rstrip()}")


def test_a_stack_dump_follows_a_rotated_log_file_with_nothing_logged_since(
    cli: Cli, s3, make_bucket
) -> None:
    mountpoint = mount_one_file(cli, s3, make_bucket)
    log_file = cli.root / "log" / "p.log"
    rotated = log_file.with_suffix(".log.1")
    log_file.rename(rotated)
    time.sleep(mount.STATS_INTERVAL + 1)  # the daemon looks at its log file that often
    os.kill(cli.daemon_pid(mountpoint), signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not log_file.exists() or "most recent call first" not in log_file.read_text():
        assert time.monotonic() < deadline, "no stack dump in the new log file"
        time.sleep(0.05)
    assert "most recent call first" not in rotated.read_text()


def test_a_log_file_that_cannot_be_made_again_does_not_end_the_mount(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x", "p/y.bin": b"y"})
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    log_file = cli.root / "log" / "p.log"
    log_file.rename(log_file.with_suffix(".log.1"))
    log_file.symlink_to("/dev/null")  # not followed: the daemon's log lines are lost instead
    s3.delete_object(Bucket=bucket, Key="p/x.bin")  # a read fails, and its log line with it
    assert errno_of(lambda: (mountpoint / "x.bin").read_bytes()) == errno.ESTALE
    assert (mountpoint / "y.bin").read_bytes() == b"y"  # the mount serves on


def test_a_state_file_that_cannot_be_refreshed_does_not_end_the_mount(
    cli: Cli, s3, make_bucket
) -> None:
    mountpoint = mount_one_file(cli, s3, make_bucket)
    runtime = cli.root / "run"
    cli.expect_log("cannot refresh the counters in the state file: runtime directory")
    runtime.chmod(0o777)  # no longer private: the daemon's refresh every 2 s is refused
    try:
        time.sleep(2 * mount.STATS_INTERVAL + 0.5)
        assert (mountpoint / "x.bin").read_bytes() == b"x"
        assert "cannot refresh the counters" in (cli.root / "log" / "p.log").read_text()
    finally:
        runtime.chmod(0o700)


class EndOfTest(Exception):
    pass


def test_each_refresh_ends_the_failure_windows_and_a_refused_one_is_told_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic task is what logs "N more failed reads" once a window is over; a state
    file it cannot write is one warning for the mount's life."""
    refreshes = 3
    flushed: list[None] = []
    written: list[dict] = []

    def write_state(_mountpoint: str, state: dict) -> None:
        written.append(state)
        if len(written) == refreshes:
            raise EndOfTest  # the task runs until cancelled: end it after its third round
        raise ConfigError("runtime directory refused")

    monkeypatch.setattr(mount, "STATS_INTERVAL", 0)
    monkeypatch.setattr(mount.runtime, "write_state", write_state)
    operations = SimpleNamespace(failures=SimpleNamespace(flush=lambda: flushed.append(None)),
                                 counters=lambda: {"reads": 7})
    ready_state = {"mountpoint": "/m", "mounted_at": 1.5}
    with pytest.raises(EndOfTest):
        trio.run(mount._publish_stats, Path("/m"), ready_state, operations)
    assert len(flushed) == refreshes
    # The counters are refreshed; what the mount wrote when ready (when it was mounted) is not.
    assert written == [{**ready_state, "stats": {"reads": 7}}] * refreshes
    warnings = [r for r in caplog.records if "cannot refresh the counters" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("libfuse_said", "remedy"),
    [
        ("fusermount3: option allow_other only allowed if 'user_allow_other' is set in "
         "/etc/fuse.conf", "add user_allow_other to /etc/fuse.conf"),
        ("fuse: failed to open /dev/fuse: Permission denied", "mount as root, or give the user"),
        ("fusermount3: mount failed: Operation not permitted", "must be setuid root"),
        ("fuse: device not found, try 'modprobe fuse' first", "install fuse3"),
    ],
)
def test_a_failed_fuse_mount_names_the_remedy_for_what_libfuse_said(
    libfuse_said: str, remedy: str
) -> None:
    """A user's mount fails in ways installing fuse3 or a container's flags do not mend."""
    assert remedy in mounting.fuse_remedy(libfuse_said)


def _process_name_of(dataset: str) -> bytes:
    """What ``mounting._name_process`` names a thread (one of its own: not pytest's)."""
    named: list[bytes] = []

    def name_and_read() -> None:
        mounting._name_process(dataset)
        with open("/proc/thread-self/comm", "rb") as comm:
            named.append(comm.read().rstrip(b"\n"))

    thread = threading.Thread(target=name_and_read)
    thread.start()
    thread.join()
    return named[0]


@pytest.mark.parametrize(
    ("dataset", "named"),
    [("imagenet-train", b"s3datafs/imagen"),
     ("a\u00f1\u00f1\u00f1", b"s3datafs/a\xc3\xb1\xc3\xb1"),  # the third cut in two: left out
     ("caf\udce9", b"s3datafs/caf\xe9")],  # not UTF-8 (Latin-1): its bytes as given
)
def test_a_daemon_is_named_by_its_datasets_bytes_cut_between_characters(
    dataset: str, named: bytes
) -> None:
    assert _process_name_of(dataset) == named


def test_a_dataset_name_that_is_not_utf8_mounts(cli: Cli, s3, make_bucket) -> None:
    """--name is bytes on a command line, as a mount point is: one that is not UTF-8 (a shell
    in a Latin-1 locale) failed the mount with "internal error: UnicodeEncodeError"."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/", str(cli.root / "m"), "--name", "caf\udce9")
    try:
        assert (mountpoint / "x.bin").read_bytes() == b"x"
        comm = Path(f"/proc/{cli.daemon_pid(mountpoint)}/comm").read_bytes()
        assert comm == b"s3datafs/caf\xe9\n"
        assert "mounted s3://" in (cli.log_dir / "caf\udce9.log").read_text(errors="replace")
    finally:
        assert cli.unmount(mountpoint).returncode == 0


def test_a_failure_writing_the_catalogs_is_the_users_only_when_the_disk_refuses(
    tmp_path: Path,
) -> None:
    """Full, over quota, read-only or refused: one line saying what to do. Any other error is
    not the disk's to blame: it goes on as it is (an internal error, with its traceback)."""
    said = r"\(No space left on device\): free space there"
    with pytest.raises(ConfigError, match=said), mounting._writing_catalogs(tmp_path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(FileNotFoundError), mounting._writing_catalogs(tmp_path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


@pytest.mark.parametrize(("asked", "level"), [(128 * 1024, "WARNING"), (None, "DEBUG")])
def test_a_kernel_readahead_not_applied_is_a_warning_only_if_asked_for(
    caplog: pytest.LogCaptureFixture, asked: int | None, level: str
) -> None:
    """Only root may set it: for the default, FUSE's 128K is fine; a value asked for is said."""

    async def tune() -> None:
        initialized = trio.Event()
        initialized.set()
        readahead = config.DEFAULT_KERNEL_READAHEAD if asked is None else asked
        await mount.tune_kernel_readahead(Path("/not/a/mount"), initialized, readahead)

    with caplog.at_level(logging.DEBUG, "s3datafs.mount"):
        trio.run(tune)
    said = [r for r in caplog.records if "--kernel-readahead not applied" in r.getMessage()]
    assert [r.levelname for r in said] == [level]


def test_cache_writes_under_way_when_the_serving_loop_ends_are_finished_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background tasks are cancelled once the kernel ends the session; the cache writes
    behind reads are not: a remount right after finds everything that was read."""
    finished: list[str] = []

    async def session_ends() -> None:  # pyfuse3.main: the kernel ended the session at once
        await trio.lowlevel.checkpoint()

    async def cache_write() -> None:
        await trio.sleep(0.05)
        finished.append("written")

    def start(tasks: trio.Nursery, writes: trio.Nursery) -> None:
        tasks.start_soon(trio.sleep_forever)
        writes.start_soon(cache_write)

    monkeypatch.setattr(mount.pyfuse3, "main", session_ends)
    operations = SimpleNamespace(abandon_requests=lambda: 0)
    trio.run(mount._main_loop, operations, set(), Path("/m"), None, start)
    assert finished == ["written"]


def test_a_mount_bound_again_on_top_of_itself_is_not_covered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Covered means another file system on top of ours: our own mount bound again onto the
    mount point (``mount --bind /data/x /data/x``) is ours on top, which a stop unmounts."""
    ours = MountEntry("/data/x", "fuse.s3datafs", "s3://b/x/", device="0:50")
    table = [ours, ours]
    monkeypatch.setattr(mount.runtime, "mount_table", lambda: table)
    assert mount._covered_by(Path("/data/x"), "0:50") is None
    table.insert(1, MountEntry("/data/x", "tmpfs", "tmpfs", device="0:60"))
    assert mount._covered_by(Path("/data/x"), "0:50") is None
    table.pop()
    assert mount._covered_by(Path("/data/x"), "0:50") == "tmpfs"


class _DeadMountPoint(type(Path())):
    """A mount point whose daemon is gone, the kernel's attributes of it expired (they are kept
    a day): a stat reaches the daemon and fails."""

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))


def test_a_dead_mount_point_whose_stat_fails_is_named_a_dead_mount() -> None:
    with pytest.raises(ConfigError) as refused:
        config.prepare_mountpoint(_DeadMountPoint("/data/x"))
    assert str(refused.value) == ("/data/x is a dead mount (transport endpoint is not "
                                  "connected): run 's3datafs unmount /data/x' first")


def test_a_mount_point_with_a_space_is_found_in_the_mount_table(
    cli: Cli, s3, make_bucket
) -> None:
    """The kernel's table writes a space as ``\\040``: status and unmount read it back."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/x.bin": b"x"})
    mountpoint = cli.mount(f"s3://{bucket}/p/", str(cli.root / "with space"))
    try:
        assert cli.daemon_pid(mountpoint) > 0
    finally:
        assert cli.unmount(mountpoint).returncode == 0
    assert not os.path.ismount(mountpoint)


def test_a_daemon_whose_name_holds_a_parenthesis_is_alive() -> None:
    """/proc/PID/stat puts the process name, which a dataset's name makes, in parentheses:
    ``--name 'x) Z y'`` must not read as a zombie (the state is after the last one)."""
    named = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "open('/proc/self/comm', 'w').write('s3datafs/x) Z y')\n"
         "print('named', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert named.stdout.readline() == "named\n"
        assert pid_alive(named.pid)
    finally:
        named.kill()
        named.wait()
    assert not pid_alive(named.pid)


def test_unmount_of_what_is_not_mounted_removes_its_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file left for a mount point where nothing is mounted (its mount gone by hand)
    goes with the unmount that finds nothing there."""
    from s3datafs import runtime
    from s3datafs.commands import unmount

    monkeypatch.setenv("S3DATAFS_RUNTIME_DIR", str(tmp_path / "run"))
    gone = tmp_path / "gone"
    gone.mkdir()
    runtime.write_state(str(gone), {"mountpoint": str(gone), "pid": 99999999})
    with pytest.raises(unmount.NotMountedError, match="is not mounted"):
        unmount.unmount_path(gone, lazy=False)
    assert runtime.read_state(str(gone)) is None
