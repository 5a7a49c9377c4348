"""Directories and files another local user could have prepared: refused, never followed.

s3datafs trusts what it finds in its cache, runtime and log directories (it serves cached
blocks, deletes stray files, believes state files). Were one of them another user's, or
writable by others, that user could make a root mount serve bytes of their choosing, delete
trees through a planted symlink, or write root-owned files elsewhere. Here the other user is a
bare uid (``OTHER``): root can give it files without an account existing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli

from s3datafs import config
from s3datafs.errors import ConfigError

pytestmark = pytest.mark.fuse

OTHER = 4242  # another local user


def shared_dir(path: Path) -> Path:
    """A world-writable sticky directory, as /tmp or a shared scratch disk."""
    path.mkdir(parents=True)
    path.chmod(0o1777)
    return path


def planted(link: Path, target: Path) -> Path:
    """A symlink ``link`` -> ``target`` (a directory, made if missing) that the other user made,
    and may repoint at will."""
    target.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    os.lchown(link, OTHER, OTHER)
    return link


def one_file(s3, make_bucket) -> str:
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/f.bin", Body=b"f")
    return f"s3://{bucket}/p/"


def refused(cli: Cli, *args: str) -> str:
    result = cli.run(*args)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert not cli.mounts_below_root()
    return result.stderr


def test_a_private_directory_in_a_shared_one_is_accepted(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "scratch")
    config.private_dir(shared / "cache", "cache directory", "choose another")
    assert stat.S_IMODE((shared / "cache").stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (lambda d: (d.mkdir(), os.chown(d, OTHER, OTHER)), f"belongs to uid {OTHER}, not to uid 0"),
        (lambda d: (d.mkdir(), d.chmod(0o777)), "may be written by others (mode 0777)"),
        (lambda d: (d.mkdir(), os.chown(d, 0, OTHER), d.chmod(0o770)),
         "may be written by others (mode 0770)"),
    ],
    ids=["owned-by-another-user", "world-writable", "writable-by-a-group-not-ours"],
)
def test_a_cache_directory_others_may_change_is_refused(
    cli: Cli, s3, make_bucket, tmp_path: Path, prepare, problem: str
) -> None:
    uri = one_file(s3, make_bucket)
    cache = shared_dir(tmp_path / "scratch") / "cache"
    prepare(cache)
    (cache / "blocks").mkdir()  # what another user may have put there meanwhile
    message = refused(cli, "mount", uri, "--cache-dir", str(cache))
    assert f"cache directory {cache} is not private: {cache} {problem}" in message
    assert "choose another with --cache-dir" in message
    ours_but_open = "belongs to" not in problem  # ours, and others may write it
    assert message.endswith(f", or, if no one else has written there, chmod 700 {cache}\n") == (
        ours_but_open)
    assert [p.name for p in cache.iterdir()] == ["blocks"]
    assert "is not private" in refused(cli, "cache", "clear", "--cache-dir", str(cache))


def test_an_empty_directory_of_another_user_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """Only a directory of ours is made private when empty: another user's stays theirs, as it
    was (root could chmod it, and must not)."""
    theirs = shared_dir(tmp_path / "scratch") / "cache"
    theirs.mkdir()
    os.chown(theirs, OTHER, OTHER)
    theirs.chmod(0o777)
    with pytest.raises(ConfigError, match=f"belongs to uid {OTHER}"):
        config.prepare_cache_dir(theirs)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o777


def test_an_empty_cache_directory_others_may_write_is_made_private(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    cache = tmp_path / "volume"  # as a Kubernetes emptyDir comes: 0777, empty
    cache.mkdir()
    cache.chmod(0o777)
    mountpoint = cli.mount(uri, "--cache-dir", str(cache))
    assert (mountpoint / "f.bin").read_bytes() == b"f"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_a_log_directory_inside_a_fresh_cache_volume_works_at_the_first_start(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """One volume for the cache and the logs (S3DATAFS_LOG_DIR=<volume>/logs). The log came
    first: its directory was made in a volume others may still write, and refused; and the
    volume, no longer empty, was then refused as a cache for good."""
    uri = one_file(s3, make_bucket)
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    cli.log_dir = volume / "logs"
    env = {**cli.env, "S3DATAFS_CACHE_DIR": str(volume), "S3DATAFS_LOG_DIR": str(cli.log_dir)}
    for command in (["mount", uri, str(tmp_path / "mnt")], ["mount-all", "-"]):
        spec = f"- uri: {uri}\n  name: again\n" if command[0] == "mount-all" else None
        result = subprocess.run(
            [sys.executable, "-m", "s3datafs", *command], env=env, input=spec, text=True,
            capture_output=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700
    assert sorted(p.name for p in cli.log_dir.iterdir()) == ["again.log", "p.log"]
    for mountpoint in (tmp_path / "mnt", cli.data_root / "again"):
        try:
            assert (mountpoint / "f.bin").read_bytes() == b"f"
        finally:
            cli.unmount(mountpoint)


def test_a_cache_volume_of_a_pod_with_an_fs_group_is_used_at_every_start(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """kubelet makes a volume of a pod with an fsGroup 2770, group fsGroup, at every start of
    the pod, and the pod's processes are in that group: its members are the pod itself. The
    second job found the cache of the first refused ("may be written by others")."""
    uri = one_file(s3, make_bucket)
    volume = tmp_path / "volume"
    (volume / "cache").mkdir(parents=True)
    fs_group = os.getgroups()[0] if os.getgroups() else os.getegid()
    for job in range(2):
        for directory in (volume, volume / "cache"):  # kubelet, recursively
            os.chown(directory, 0, fs_group)
            directory.chmod(0o2770)
        for cache in (volume, volume / "cache"):
            mountpoint = cli.mount(uri, str(tmp_path / f"mnt-{job}"), "--cache-dir", str(cache))
            try:
                assert (mountpoint / "f.bin").read_bytes() == b"f"
            finally:
                cli.unmount(mountpoint)
        assert any(volume.iterdir())


def test_an_empty_sticky_directory_is_refused_and_never_made_private(tmp_path: Path) -> None:
    """/tmp of a fresh container is empty, root's and sticky: as a cache directory it is refused,
    and must keep its mode (a private /tmp breaks every other program)."""
    scratch = shared_dir(tmp_path / "tmp")
    with pytest.raises(ConfigError, match=r"may be written by others \(mode 1777\)"):
        config.prepare_cache_dir(scratch)
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o1777


def test_an_empty_log_directory_others_may_write_is_made_private_a_sticky_one_stays_shared(
    tmp_path: Path,
) -> None:
    """A log directory on a fresh volume (emptyDir: 0777) was refused where a cache directory
    was made private; a sticky one (a --log-file in /tmp) is shared on purpose."""
    volume = tmp_path / "logs"
    volume.mkdir()
    volume.chmod(0o777)
    config.shared_dir(volume, "log directory", "choose another")
    assert stat.S_IMODE(volume.stat().st_mode) == 0o700
    scratch = shared_dir(tmp_path / "tmp")
    config.shared_dir(scratch, "log directory", "choose another")
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o1777


def test_a_symlink_another_user_planted_is_not_followed_to_delete_or_write(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    victim = tmp_path / "victim"
    (victim / "projects" / "thesis").mkdir(parents=True)
    (victim / "projects" / "thesis" / "thesis.tex").write_text("years of work")
    link = planted(shared_dir(tmp_path / "scratch") / "cache", victim)
    message = refused(cli, "mount", uri, "--cache-dir", str(link))
    assert f"symbolic link {link} belongs to uid {OTHER}" in message
    assert (victim / "projects" / "thesis" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in victim.iterdir()) == ["projects"]


def test_a_runtime_directory_of_another_user_is_refused_not_believed(
    cli: Cli, tmp_path: Path
) -> None:
    runtime = shared_dir(tmp_path / "tmp") / "s3datafs-0"
    runtime.mkdir(mode=0o777)
    os.chown(runtime, OTHER, OTHER)
    (runtime / "forged.json").write_text('{"mountpoint": "/data/x", "uri": "s3://forged/"}')
    cli.env["S3DATAFS_RUNTIME_DIR"] = str(runtime)
    message = refused(cli, "status")
    assert f"runtime directory {runtime} is not private" in message
    assert "S3DATAFS_RUNTIME_DIR" in message


def test_a_log_file_planted_as_a_symlink_is_not_followed(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    precious = tmp_path / "precious"
    precious.write_text("keep\n")
    precious.chmod(0o644)
    logs = shared_dir(tmp_path / "logs")
    (logs / "p.log").symlink_to(precious)
    cli.env["S3DATAFS_LOG_DIR"] = str(logs)
    message = refused(cli, "mount", uri)
    assert f"cannot write log file {logs / 'p.log'}" in message
    assert precious.read_text() == "keep\n"
    assert stat.S_IMODE(precious.stat().st_mode) == 0o644


def test_a_log_file_of_another_user_is_not_written(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    logs = shared_dir(tmp_path / "logs")
    (logs / "p.log").write_text("")
    os.chown(logs / "p.log", OTHER, OTHER)
    cli.env["S3DATAFS_LOG_DIR"] = str(logs)
    assert "is not a file of uid 0" in refused(cli, "mount", uri)
    assert (logs / "p.log").read_text() == ""


def test_a_default_mount_point_planted_as_a_symlink_is_refused(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    hidden = tmp_path / "hidden"
    data = shared_dir(cli.data_root)
    planted(data / "p", hidden)
    message = refused(cli, "mount", uri)
    assert f"{data / 'p'} is a symbolic link: give the mount point itself" in message
    assert not os.path.ismount(hidden)


def test_private_dir_explains_in_one_line(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError) as caught:
        config.private_dir(target, "cache directory", "choose another with --cache-dir")
    assert str(caught.value).startswith(f"cannot use cache directory {target}: ")
    assert "\n" not in str(caught.value)


def test_parents_private_dir_makes_are_private_under_any_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    old = os.umask(0o002)  # user-private groups: new directories would be 0775
    try:
        config.private_dir(home / ".cache" / "s3datafs", "cache directory", "choose another")
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / ".cache").stat().st_mode) == 0o700


def test_a_link_reached_through_a_link_of_ours_is_checked_too(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    theirs = planted(shared_dir(tmp_path / "shared") / "link", target)
    ours = tmp_path / "cache"
    ours.symlink_to(theirs)
    with pytest.raises(ConfigError, match=f"symbolic link {theirs} belongs to uid {OTHER}"):
        config.private_dir(ours, "cache directory", "choose another")


def test_a_link_of_ours_in_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone may replace our link there
    (open_dir / "cache").symlink_to(target)
    with pytest.raises(ConfigError, match="is in a directory where .* may be written by others"):
        config.private_dir(open_dir / "cache", "cache directory", "choose another")


def test_a_log_directory_planted_as_a_symlink_is_not_followed(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    elsewhere = tmp_path / "etc"
    link = planted(shared_dir(tmp_path / "tmp") / "s3datafs-logs", elsewhere)
    cli.env["S3DATAFS_LOG_DIR"] = str(link)
    assert "log directory" in refused(cli, "mount", uri)
    assert list(elsewhere.iterdir()) == []


def test_a_log_file_in_a_sticky_shared_directory_is_fine(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    uri = one_file(s3, make_bucket)
    logs = shared_dir(tmp_path / "tmp")
    mountpoint = cli.mount(uri, "--log-file", str(logs / "mine.log"))
    assert (mountpoint / "f.bin").read_bytes() == b"f"
    assert stat.S_IMODE((logs / "mine.log").stat().st_mode) == 0o600


@pytest.mark.parametrize(("variable", "directory"), [
    ("S3DATAFS_CACHE_DIR", config.default_cache_dir),
    ("S3DATAFS_RUNTIME_DIR", config.runtime_dir),
    ("S3DATAFS_LOG_DIR", config.default_log_dir),
])
def test_a_relative_directory_in_the_environment_is_where_the_command_runs(
    variable: str, directory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not below ``/``, where the daemon runs (and where it would not be private)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "relative")
    assert directory() == tmp_path / "relative"
