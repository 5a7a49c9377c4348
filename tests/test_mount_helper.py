"""``mount.s3datafs``: the ``-o`` translation table, and the real mount(8) calling the helper.

mount(8) only looks for helpers in ``/sbin`` (``/sbin/fs.d``, ``/sbin/fs``), so the end-to-end
tests link ``/sbin/mount.s3datafs`` to this checkout's helper for their duration, under a lock
(concurrent test runs take turns), and put back whatever was there before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli, sha256

from s3datafs import mount_helper, runtime
from s3datafs.config import statfs_errno
from s3datafs.errors import UsageError
from s3datafs.mount_helper import main, option_table, parse_call, translate_options
from s3datafs.runtime import MountEntry, pid_alive

SBIN_HELPERS = (Path("/sbin/mount.s3datafs"), Path("/sbin/mount.fuse.s3datafs"))
LOCK = Path(tempfile.gettempdir()) / "s3datafs-sbin-helper.lock"


# -- the translation table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("ro", []),
        ("endpoint_url=http://h:1", ["--endpoint-url=http://h:1"]),
        ("endpoint-url=http://h:1", ["--endpoint-url=http://h:1"]),
        ("version_id=3HL4k.x,etag=ee1d", ["--version-id=3HL4k.x", "--etag=ee1d"]),
        ("allow_other,no-sign-request", ["--allow-other", "--no-sign-request"]),
        ("uid=1000,gid=1000,file_mode=0440", ["--uid=1000", "--gid=1000", "--file-mode=0440"]),
        ("credentials_file=/etc/s3datafs/c", ["--credentials-file=/etc/s3datafs/c"]),
        ("name=-odd,profile=p,region=r", ["--name=-odd", "--profile=p", "--region=r"]),
        ("cache_dir=/c,log_file=/tmp/l", ["--cache-dir=/c", "--log-file=/tmp/l"]),
        ("_netdev,nofail,auto,noauto,user,nouser,users,defaults", []),
        ("rw,nodev,nosuid,users,exec", []),  # what mount(8) passes for "defaults,user"
        ("nodev,nosuid,exec,noatime,x-systemd.automount,x-foo=1,comment=systemd.x", []),
        ("relatime,nodiratime,strictatime,lazytime,sync,async,silent,loud", []),
        ("X-mount.mkdir,X-mount.mode=0755", []),
        ("ro,,allow_other,", ["--allow-other"]),
        ("", []),
    ],
)  # fmt: skip
def test_options_translate_to_long_options(options: str, expected: list[str]) -> None:
    assert translate_options(options).args == expected


def test_every_mount_option_but_the_helpers_own_is_an_o_option() -> None:
    table = option_table()
    assert {"endpoint_url", "version_id", "etag", "allow_other", "credentials_file"} <= set(table)
    assert not {"foreground", "data_root", "help"} & set(table)
    assert table["allow_other"].takes_value is False
    assert table["region"].takes_value is True


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("colour=red", "unknown option 'colour'"),
        ("allow_othr", "unknown option 'allow_othr': did you mean 'allow_other'?"),
        ("foreground", "option 'foreground' is not for -o: the helper mounts in the background"),
        ("data_root=/d", "option 'data_root' is not for -o"),
        ("version_id", "option 'version_id' needs a value: version_id=VALUE"),
        ("version_id=", "option 'version_id' needs a value"),
        ("allow_other=1", "option 'allow_other' takes no value"),
        ("aws_secret_access_key=s3cr3t", "option 'aws_secret_access_key' refused: credentials"),
        ("aws-access-key-id=AKID", "option 'aws-access-key-id' refused: credentials"),
        ("secret_access_key=s3cr3t", "refused: credentials are never mount options"),
        ("aws_session_token=t", "refused: credentials"),
        ("AWS_SECRET_ACCESS_KEY=s3cr3t", "option 'AWS_SECRET_ACCESS_KEY' refused: credentials"),
        ("Secret_Access_Key=s3cr3t", "refused: credentials"),
        ("noatime=5", "option 'noatime' takes no value"),  # ignored as a flag only
        ("user=bob", "option 'user' takes no value: write just user"),
        # They would lift the nosuid and nodev every mount has ("did you mean 'uid'?" before).
        ("suid", "option 'suid' refused: every s3datafs mount is nosuid; remove suid"),
        ("dev", "option 'dev' refused: every s3datafs mount is nodev; remove dev"),
        ("_netdve", "unknown option '_netdve': did you mean '_netdev'?"),
    ],
)
def test_bad_options_are_refused_in_one_line(options: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        translate_options(options)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_noexec_is_honoured_and_exec_is_the_default() -> None:
    assert translate_options("noexec,nosuid,nodev,exec").args == ["--noexec"]


def test_sloppy_ignores_unknown_options_but_never_keys() -> None:
    translation = translate_options("colour=red,allow_other,api_key=s3cr3t", sloppy=True)
    assert translation.args == ["--allow-other"]
    assert translation.warnings == [  # names only: a value may be a secret
        "ignoring unknown option 'colour' (sloppy mode)",
        "ignoring unknown option 'api_key' (sloppy mode)",
    ]
    for refused in ("aws_secret_access_key=x", "AWS_SESSION_TOKEN=x"):
        with pytest.raises(UsageError):
            translate_options(refused, sloppy=True)


def test_the_mount8_calling_convention() -> None:
    argv = ["s3://b-1/p/", "/data/p", "-s", "-f", "-n", "-v", "-o", "ro,uid=1", "-t", "s3datafs"]
    call = parse_call(argv)
    assert (call.source, call.directory, call.options) == ("s3://b-1/p/", "/data/p", "ro,uid=1")
    assert (call.sloppy, call.fake, call.verbose) == (True, True, True)
    assert parse_call(["s3://b-1", "/d", "-o", "ro", "-o", "uid=1"]).options == "ro,uid=1"


def test_helper_errors_are_one_line_with_mount8_exit_codes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["s3://b-1/x", str(tmp_path), "-o", "ro,bogus"]) == 1
    assert capsys.readouterr().err == "mount.s3datafs: unknown option 'bogus'\n"
    assert main(["s3://b-1/x"]) == 1
    assert capsys.readouterr().err.startswith("mount.s3datafs: the following arguments")
    assert main(["s3://b-1/x", str(tmp_path), "-f", "-v", "-o", "ro,uid=7"]) == 0
    assert "would mount s3://b-1/x" in capsys.readouterr().out


def test_an_option_that_only_mentions_remount_mounts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Only the option ``remount`` asks for a remount: an fstab comment naming it does not."""
    options = "ro,comment=no-remount,x-remount-never"
    assert main(["s3://b-1/x", str(tmp_path), "-f", "-v", "-o", options]) == 0
    assert "would mount s3://b-1/x" in capsys.readouterr().out


def test_rw_mounts_read_only_and_verbose_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """mount(8) passes ``rw`` for every line that does not say ``ro``: accepted, and ``-v``
    tells that the mount is read-only whatever it says (quiet without ``-v``)."""
    assert main(["s3://b-1/x", str(tmp_path), "-f", "-v", "-o", "rw"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == "mount.s3datafs: rw ignored: s3datafs mounts are read-only"
    assert main(["s3://b-1/x", str(tmp_path), "-f", "-o", "rw"]) == 0
    assert capsys.readouterr().out == ""


# -- remount, against a mount table made up for the test ---------------------------------------


def _mount_table(
    monkeypatch: pytest.MonkeyPatch, target: Path, *entries: tuple[str, str],
    super_options: str = "",
) -> None:
    """``runtime.mount_table`` lists ``entries`` (fstype, options), all mounted at ``target``,
    the last one on top; ``super_options``: the filesystem's own, as the kernel lists them."""
    table = [MountEntry(str(target), fstype, "src", options=frozenset(options.split(",")),
                        super_options=frozenset(super_options.split(",")))
             for fstype, options in entries]
    monkeypatch.setattr(runtime, "mount_table", lambda: table)


def test_remount_of_another_filesystem_type_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A mount point that is something else's says so, not "remounted"."""
    _mount_table(monkeypatch, tmp_path, ("fuse.sshfs", "rw,nosuid"))
    assert main(["s3://b-1/x", str(tmp_path), "-o", "remount"]) == 32
    assert capsys.readouterr().err == (
        f"mount.s3datafs: {tmp_path} is not an s3datafs mount: nothing to remount\n"
    )


def test_remount_judges_noexec_by_the_mount_on_top(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two mounts stacked at DIR: the one on top (the last in the table) is the one remounted."""
    _mount_table(monkeypatch, tmp_path, ("fuse.s3datafs", "ro,noexec"), ("fuse.s3datafs", "ro"))
    assert main(["s3://b-1/x", str(tmp_path), "-o", "remount,noexec"]) == 32
    assert f"cannot remount {tmp_path} noexec" in capsys.readouterr().err


def test_remount_finds_the_mount_through_a_symbolic_link(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The mount table names mount points without links (/data may be a link to a larger
    disk): DIR given through one is the same mount."""
    target = tmp_path / "disk"
    target.mkdir()
    (tmp_path / "data").symlink_to(target)
    _mount_table(monkeypatch, target, ("fuse.s3datafs", "ro"))
    link = tmp_path / "data"
    assert main(["s3://b-1/x", str(link), "-v", "-o", "remount"]) == 0
    assert capsys.readouterr().out == f"mount.s3datafs: {link} remounted: nothing to change\n"


def test_remount_of_a_mount_that_recorded_no_options_warns_of_every_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A daemon of an earlier release kept no options in its state file: whether a value
    differs cannot be told, so none is taken for applied."""
    _mount_table(monkeypatch, tmp_path, ("fuse.s3datafs", "ro"))
    monkeypatch.setattr(runtime, "read_state", lambda _mountpoint: {"pid": 1})
    assert main(["s3://b-1/x", str(tmp_path), "-o", "remount,cache_size=1G"]) == 0
    assert "changes nothing (--cache-size not applied)" in capsys.readouterr().err


def test_remount_ignores_what_the_kernel_reports_for_a_fuse_mount(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """mount(8) passes the mount's options back on remount, the kernel's for FUSE among them:
    none is an option to refuse or warn of, even for a mount that recorded no options."""
    kernels = ("rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,"
               "max_read=131072,blksize=4096")
    _mount_table(monkeypatch, tmp_path, ("fuse.s3datafs", "ro,relatime,nosymfollow"),
                 super_options=kernels)
    monkeypatch.setattr(runtime, "read_state", lambda _mountpoint: {"pid": 1})
    assert main(["s3://b-1/x", str(tmp_path), "-o", f"remount,{kernels},relatime,nosymfollow"]) == 0
    assert capsys.readouterr().err == ""


def test_remount_asking_allow_other_of_a_mount_without_it_says_it_is_not_applied(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """allow_other is the kernel's to list only where the mount has it: asked of a mount without
    it, it is an option of ours whose value differs, as the README says (it was ignored
    silently, as if the mount had it)."""
    _mount_table(monkeypatch, tmp_path, ("fuse.s3datafs", "ro"),
                 super_options="rootmode=40000,user_id=0,group_id=0,default_permissions")
    monkeypatch.setattr(runtime, "read_state",
                        lambda _mountpoint: {"pid": 1, "options": {"allow_other": False}})
    assert main(["s3://b-1/x", str(tmp_path), "-o", "remount,allow_other"]) == 0
    assert "changes nothing (--allow-other not applied)" in capsys.readouterr().err


# -- the real mount(8) ---------------------------------------------------------------------------


def _helper_program(tmp_path: Path) -> Path:
    """The installed console script, or a stand-in when the package was installed without it."""
    script = Path(sys.executable).parent / "mount.s3datafs"
    if script.exists():
        return script
    wrapper = tmp_path / "mount.s3datafs"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m s3datafs.mount_helper "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture
def installed_helper(tmp_path: Path) -> Iterator[Path]:
    """``/sbin/mount.s3datafs`` and ``mount.fuse.s3datafs`` -> this checkout's helper, as
    ``make install-helper`` links them; whatever was there is put back afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and util-linux mount to install a mount helper")
    program = _helper_program(tmp_path)
    with open(LOCK, "w") as lock, contextlib.ExitStack() as restore:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for link in SBIN_HELPERS:
            restore.enter_context(_linked(link, program, tmp_path / f"saved-{link.name}"))
        yield SBIN_HELPERS[0]


@contextlib.contextmanager
def _linked(link: Path, program: Path, saved: Path) -> Iterator[None]:
    had_one = os.path.lexists(link)
    if had_one:
        os.rename(link, saved)
    try:
        link.symlink_to(program)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        if had_one:
            os.rename(saved, link)


def _mount8(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mount", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _without_endpoint(cli: Cli) -> dict:
    """The endpoint must come from ``-o`` in these tests, to prove the translation."""
    return {k: v for k, v in cli.env.items() if not k.startswith("AWS_ENDPOINT_URL")}


def test_the_helpers_daemon_keeps_no_descriptor_its_caller_gave(
    cli: Cli, s3, make_bucket
) -> None:
    """``flock job.lock mount /data/x``: the lock is the caller's, not the mount's."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"a")
    target, lock = cli.root / "mnt", cli.root / "job.lock"
    target.mkdir()
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        mounted = subprocess.run(
            [sys.executable, "-m", "s3datafs.mount_helper", f"s3://{bucket}/p/", str(target)],
            env=cli.env, pass_fds=(held.fileno(),), capture_output=True, text=True, timeout=60,
            check=False)
    try:
        assert mounted.returncode == 0, mounted.stderr
        with open(lock) as again:  # the caller let go: nobody may hold it now
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
        daemon = cli.daemon_pid(target)
        assert str(lock) not in {os.readlink(fd) for fd in Path(f"/proc/{daemon}/fd").iterdir()}
    finally:
        assert cli.unmount(target).returncode == 0


def test_mount_t_s3datafs_mounts_reads_and_umount_stops_the_daemon(
    cli: Cli, s3, make_bucket, installed_helper: Path, s3server
) -> None:
    bucket = make_bucket()
    body = os.urandom(150_000)
    s3.put_object(Bucket=bucket, Key="p/a.bin", Body=body)
    s3.put_object(Bucket=bucket, Key="p/sub/b.txt", Body=b"b\n")
    target = cli.root / "mnt" / "p"
    target.mkdir(parents=True)
    options = f"ro,_netdev,nofail,x-test=1,endpoint-url={s3server.endpoint},uid=4321,allow_other"
    source = f"s3://{bucket}/p/"
    done = _mount8("-t", "s3datafs", source, str(target), "-o", options, env=_without_endpoint(cli))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # mount helpers are quiet
    assert sha256((target / "a.bin").read_bytes()) == sha256(body)
    assert (target / "sub" / "b.txt").read_bytes() == b"b\n"
    assert os.stat(target / "a.bin").st_uid == 4321
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    entry = next(line for line in table if f" {target} " in line)
    assert f" - fuse.s3datafs s3://{bucket}/p/ " in entry
    assert "allow_other" in entry
    (state,) = (cli.root / "run").glob("*.json")
    pid = int(state.read_text().split('"pid": ')[1].split(",")[0].rstrip("}"))
    assert subprocess.run(["umount", str(target)], check=False).returncode == 0
    for _ in range(200):
        if not pid_alive(pid):
            break
        subprocess.run(["sleep", "0.05"], check=False)
    assert not pid_alive(pid), "the daemon outlived umount(8)"


def test_an_fstab_line_mounts_with_mount_T(
    cli: Cli, s3, make_bucket, installed_helper: Path, s3server
) -> None:
    bucket = make_bucket(versioned=True)
    first = s3.put_object(Bucket=bucket, Key="d.csv", Body=b"v1\n")
    s3.put_object(Bucket=bucket, Key="d.csv", Body=b"v2\n")
    target = cli.root / "fstab-mnt"
    target.mkdir()
    fstab = cli.root / "fstab"
    options = (
        f"_netdev,ro,endpoint_url={s3server.endpoint},version_id={first['VersionId']},"
        f"etag={first['ETag'].strip(chr(34))},nofail,x-systemd.automount,cache-dir={cli.root}/c2"
    )
    fstab.write_text(f"# test fstab\ns3://{bucket}/d.csv  {target}  s3datafs  {options}  0 0\n")
    done = _mount8("-T", str(fstab), str(target), env=_without_endpoint(cli))
    assert done.returncode == 0, done.stderr
    assert (target / "d.csv").read_bytes() == b"v1\n"


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("ro,aws_secret_access_key=s3cr3t", "option 'aws_secret_access_key' refused"),
        ("ro,bogus=1", "mount.s3datafs: unknown option 'bogus'"),
    ],
)
def test_mount8_refuses_bad_options_and_mounts_nothing(
    cli: Cli, installed_helper: Path, options: str, fragment: str
) -> None:
    target = cli.root / "refused"
    target.mkdir()
    done = _mount8("-t", "s3datafs", "s3://b-1/x", str(target), "-o", options, env=cli.env)
    assert done.returncode != 0
    assert fragment in done.stderr
    assert "s3cr3t" not in done.stderr
    assert not os.path.ismount(target)


@pytest.mark.parametrize(
    ("failure", "options", "status"),
    [(RuntimeError("bug"), "ro", 32), (KeyboardInterrupt(), "ro", 130),  # mount(8)'s statuses
     (RuntimeError("bug"), "ro,debug", None)],
    ids=["internal-error", "ctrl-c", "debug-shows-the-traceback"],
)
def test_unexpected_failures_are_one_line_unless_debug_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    failure: BaseException, options: str, status: int | None,
) -> None:
    def fail(_call: object) -> None:
        raise failure

    monkeypatch.setattr(mount_helper, "mount", fail)
    argv = ["s3://debug-bucket/p/", "/data/p", "-o", options]  # "debug" in a name is no option
    if status is None:
        with pytest.raises(RuntimeError):
            mount_helper.main(argv)
        return
    assert mount_helper.main(argv) == status
    assert capsys.readouterr().err.count("\n") == 1



def csv_dataset(s3, make_bucket) -> str:
    """The URI of a one-line CSV object (``d.csv``: ``a``)."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="d.csv", Body=b"a\n")
    return f"s3://{bucket}/d.csv"


def mounted_by_mount8(cli: Cli, uri: str, target: Path, *options: str) -> None:
    """``mount -t s3datafs URI TARGET OPTIONS...`` (TARGET made first), which must succeed."""
    target.mkdir()
    done = _mount8("-t", "s3datafs", uri, str(target), *options, env=cli.env)
    assert done.returncode == 0, done.stderr
    assert (target / "d.csv").read_bytes() == b"a\n"


@pytest.mark.parametrize("options", [[], ["-o", "defaults"], ["-o", "defaults,noexec"]], ids=str)
def test_mount8_without_ro_mounts_read_only(
    cli: Cli, s3, make_bucket, installed_helper: Path, options: list[str]
) -> None:
    # mount(8) passes "rw" first for each of these (libmount adds it unless "ro" is given)
    target = cli.root / "plain"
    mounted_by_mount8(cli, csv_dataset(s3, make_bucket), target, *options)
    mount_options = _mount_options(target)
    assert "ro" in mount_options
    assert ("noexec" in mount_options) == ("defaults,noexec" in options)


def _mount_options(target: Path) -> list[str]:
    table = Path("/proc/self/mountinfo").read_text().splitlines()
    return next(line for line in table if f" {target} " in line).split()[5].split(",")


def test_an_fstab_line_of_type_fuse_s3datafs_mounts(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    uri = csv_dataset(s3, make_bucket)
    target = cli.root / "fuse-type"
    target.mkdir()
    fstab = cli.root / "fstab"
    fstab.write_text(f"{uri}  {target}  fuse.s3datafs  defaults,_netdev  0 0\n")
    done = _mount8("-T", str(fstab), str(target), env=cli.env)
    assert done.returncode == 0, done.stderr
    assert (target / "d.csv").read_bytes() == b"a\n"


def test_remount_changes_nothing_and_the_mount_keeps_serving(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    target = cli.root / "remounted"
    mounted_by_mount8(cli, csv_dataset(s3, make_bucket), target, "-o", "ro")
    device = os.stat(target).st_dev
    again = _mount8("-o", "remount", str(target), env=cli.env)  # what systemctl reload runs
    assert (again.returncode, again.stderr) == (0, "")
    changed = _mount8("-o", "remount,read_timeout=5", str(target), env=cli.env)
    assert changed.returncode == 0
    assert "changes nothing (--read-timeout not applied)" in changed.stderr
    writable = _mount8("-o", "remount,rw", str(target), env=cli.env)  # as fstab's defaults
    assert (writable.returncode, writable.stderr) == (0, "")  # and it stays read-only:
    assert os.stat(target).st_dev == device  # the same mount throughout
    assert (target / "d.csv").read_bytes() == b"a\n"
    assert "ro" in _mount_options(target)


def mounted_from_fstab(cli: Cli, uri: str, name: str, options: str) -> tuple[Path, Path]:
    """``mount -T FSTAB DIR`` of a line mounting ``uri`` at a new ``DIR`` with ``options``;
    (DIR, FSTAB)."""
    target = cli.root / name
    target.mkdir()
    fstab = cli.root / "fstab"
    fstab.write_text(f"{uri}  {target}  s3datafs  {options}  0 0\n")
    assert _mount8("-T", str(fstab), str(target), env=cli.env).returncode == 0
    return target, fstab


def test_a_remount_with_the_options_the_mount_has_warns_of_nothing(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    """``systemctl reload`` of a unit passes the fstab line's options again: the same values
    are no change (they were warned of as not applied at every reload); another value is."""
    target, fstab = mounted_from_fstab(cli, csv_dataset(s3, make_bucket), "reloaded",
                                       "ro,read_timeout=5,cache_size=64M")
    again = _mount8("-T", str(fstab), "-o", "remount", str(target), env=cli.env)
    assert (again.returncode, again.stderr) == (0, "")
    other = _mount8("-T", str(fstab), "-o", "remount,cache_size=128M", str(target), env=cli.env)
    assert other.returncode == 0
    assert "changes nothing (--cache-size not applied)" in other.stderr


def test_remount_asking_allow_other_that_the_mount_lacks_warns_and_changes_nothing(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    """Where the mount has allow_other mount(8) passes it back: no change, nothing said; where
    it has not, asking for it is an option not applied (it used to pass without a word, and a
    container's user then met EACCES with nothing to say why)."""
    uri = csv_dataset(s3, make_bucket)
    plain, shared = cli.root / "plain", cli.root / "shared"
    mounted_by_mount8(cli, uri, plain, "-o", "ro")
    mounted_by_mount8(cli, uri, shared, "-o", "ro,allow_other")
    asked = _mount8("-o", "remount,allow_other", str(plain), env=cli.env)
    assert asked.returncode == 0
    assert "changes nothing (--allow-other not applied)" in asked.stderr
    (entry,) = (entry for entry in runtime.mount_table() if entry.mountpoint == str(plain))
    assert "allow_other" not in entry.super_options
    again = _mount8("-o", "remount", str(shared), env=cli.env)
    assert (again.returncode, again.stderr) == (0, "")


def test_remount_of_an_fstab_line_without_ro_succeeds(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    """mount(8) passes ``rw`` for a line that does not say ``ro`` (``defaults``) on remount too,
    as on mount: ``systemctl reload`` of such a mount must not fail for it."""
    target, fstab = mounted_from_fstab(cli, csv_dataset(s3, make_bucket), "from-fstab",
                                       "defaults,_netdev")
    again = _mount8("-T", str(fstab), "-o", "remount", str(target), env=cli.env)
    assert (again.returncode, again.stderr) == (0, "")
    assert "ro" in _mount_options(target)
    assert (target / "d.csv").read_bytes() == b"a\n"


def test_remount_of_a_dead_mount_fails_saying_so(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    target = cli.root / "dead"
    mounted_by_mount8(cli, csv_dataset(s3, make_bucket), target, "-o", "ro")
    os.kill(cli.daemon_pid(target), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while statfs_errno(target) != errno.ENOTCONN:  # the kernel ends the connection
        assert time.monotonic() < deadline, "the mount never died"
        time.sleep(0.05)
    again = _mount8("-o", "remount", str(target), env=cli.env)
    assert again.returncode == 32
    assert f"{target} is a dead mount (its daemon is gone): unmount it and mount again" in (
        again.stderr)


def test_remount_of_what_is_not_an_s3datafs_mount_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["s3://b-1/x", str(tmp_path), "-o", "remount,ro"]) == 32
    assert capsys.readouterr().err == (
        f"mount.s3datafs: {tmp_path} is not an s3datafs mount: nothing to remount\n"
    )


def test_remount_refuses_to_change_noexec_and_keeps_the_mount_as_it_is(
    cli: Cli, s3, make_bucket, installed_helper: Path
) -> None:
    uri = csv_dataset(s3, make_bucket)
    plain, noexec = cli.root / "plain", cli.root / "noexec"
    mounted_by_mount8(cli, uri, plain, "-o", "ro")
    mounted_by_mount8(cli, uri, noexec, "-o", "ro,noexec")
    for target, asked in ((plain, "noexec"), (noexec, "exec")):  # asked for, impossible: refused
        changed = _mount8("-o", f"remount,{asked}", str(target), env=cli.env)
        assert changed.returncode != 0
        assert f"cannot remount {target} {asked}: a remount changes nothing" in changed.stderr
    again = _mount8("-o", "remount", str(noexec), env=cli.env)  # mount(8) passes noexec back
    assert (again.returncode, again.stderr) == (0, "")
    assert "noexec" not in _mount_options(plain)
    assert "noexec" in _mount_options(noexec)
