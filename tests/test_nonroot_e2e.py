"""A developer's own mounts, made by hand by an ordinary user: the paths under ``$HOME``,
fusermount3, ``/etc/fuse.conf``, and what another user is told.

Every other test mounts as root. Here the real command runs as uid 1000 (and as ``nobody``, a
second user) through ``runuser``, with a clean environment, keys in ``~/.aws/credentials`` and
a Python that user may run: the one running the tests, or, where that one lies below a
directory closed to others (pyenv under ``/root``), the system's of the same version, given
the tests' site-packages. A machine without udev leaves ``/dev/fuse`` 0600, which no user may
open (libfuse opens it before it turns to fusermount3); udev makes it 0666 on a dev box, and so
does this module while it runs, restoring the mode after. Every mount is taken off in a
``finally`` (as root, ``fusermount3 -u -z`` unmounts a user's mount).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from s3datafs import mounting
from s3datafs.runtime import mount_table, pid_alive

CHECKOUT = Path(__file__).resolve().parent.parent
DEVELOPER_UID = 1000
NOBODY_UID = 65534
FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                                reason="needs root and runuser to run commands as other users")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        pytest.skip(f"no user with uid {uid} on this machine")


@dataclass
class User:
    """Runs commands as one user, in a clean environment of this test's."""

    name: str
    uid: int
    python: str
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        variables = [f"{name}={value}" for name, value in self.env.items()]
        return subprocess.run(
            ["runuser", "-u", self.name, "--", "env", "-i", *variables, *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            check=False, cwd="/",
        )

    def s3datafs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "s3datafs", *args)

    def python_code(self, code: str, *args: str) -> str:
        result = self.run(self.python, "-c", code, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout


def _search_path() -> str:
    """This checkout first, then the packages of the Python running the tests."""
    paths = sysconfig.get_paths()
    return os.pathsep.join(dict.fromkeys([str(CHECKOUT), paths["purelib"], paths["platlib"]]))


_PYTHONS: dict[str, str | None] = {}


def _python_for(name: str) -> str | None:
    """A Python of this version that user ``name`` may run and that imports s3datafs, pyfuse3
    and boto3 from the test's packages; None if there is none."""
    if name in _PYTHONS:
        return _PYTHONS[name]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    check = f"import sys, s3datafs, pyfuse3, boto3; assert sys.version.startswith('{version}.')"
    _PYTHONS[name] = None
    for candidate in (sys.executable, f"/usr/bin/python{version}", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        tried = subprocess.run(
            ["runuser", "-u", name, "--", "env", "-i", f"PYTHONPATH={_search_path()}",
             candidate, "-c", check], capture_output=True, timeout=60, check=False, cwd="/")
        if tried.returncode == 0:
            _PYTHONS[name] = candidate
            break
    return _PYTHONS[name]


@pytest.fixture(scope="module")
def fuse_for_users() -> Iterator[None]:
    """``/dev/fuse`` open to every user, as udev makes it, for this module's tests."""
    mode = stat.S_IMODE(FUSE_DEVICE.stat().st_mode)
    try:
        if mode & 0o666 != 0o666:
            FUSE_DEVICE.chmod(mode | 0o666)
        yield
    finally:
        FUSE_DEVICE.chmod(mode)


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory in ``/tmp`` (pytest's own is closed to other users); on the way out nothing
    below it is left mounted, running or on disk."""
    base = Path(tempfile.mkdtemp(prefix="s3datafs-nonroot-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        below = str(base) + "/"
        for entry in reversed(mount_table()):
            if entry.mountpoint.startswith(below):
                subprocess.run(["fusermount3", "-u", "-z", entry.mountpoint], check=False)
        for state in base.glob("*/run/s3datafs/*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                os.kill(int(json.loads(state.read_text())["pid"]), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def _user(uid: int, place: Path, endpoint: str) -> User:
    """User ``uid`` with a home of its own below ``place`` (0700, as homes are made), keys in
    ``~/.aws/credentials`` (0600) and ``XDG_RUNTIME_DIR`` there too, as a login gives one."""
    name = _user_name(uid)
    python = _python_for(name)
    if python is None:
        pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that user "
                    f"{name} may run")
    home = place / name
    (home / ".aws").mkdir(parents=True)
    (home / "run").mkdir()
    credentials = home / ".aws" / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\n"
                           "aws_secret_access_key = testing\n")
    credentials.chmod(0o600)
    for path in (home, home / ".aws", home / "run"):
        path.chmod(0o700)
    for path in (home, *home.rglob("*")):
        os.chown(path, uid, uid if uid != NOBODY_UID else pwd.getpwuid(uid).pw_gid)
    env = {
        "HOME": str(home), "USER": name, "LOGNAME": name, "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": _search_path(), "XDG_RUNTIME_DIR": str(home / "run"),
        "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return User(name, uid, python, env)


@pytest.fixture
def developer(fuse_for_users: None, place: Path, s3server) -> User:
    return _user(DEVELOPER_UID, place, s3server.endpoint)


@pytest.fixture
def nobody(fuse_for_users: None, place: Path, s3server) -> User:
    return _user(NOBODY_UID, place, s3server.endpoint)


def _requests_to(s3server, bucket: str) -> list[dict]:
    """What was asked of ``bucket`` besides the test's own making of it."""
    return [r for r in s3server.stats()["requests"]
            if r["bucket"] == bucket and r["op"] not in ("CreateBucket", "PutObject")]


def _bucket_with(s3, make_bucket, objects: dict[str, bytes]) -> str:
    bucket = make_bucket()
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return bucket


READ_FILES = """
import hashlib, json, os, sys
root = sys.argv[1]
found = {}
for folder, _dirs, files in os.walk(root):
    for name in files:
        path = os.path.join(folder, name)
        info = os.stat(path)
        with open(path, "rb") as file:
            digest = hashlib.sha256(file.read()).hexdigest()
        found[os.path.relpath(path, root)] = [digest, info.st_uid, oct(info.st_mode & 0o7777)]
print(json.dumps(found))
"""


def test_a_user_mounts_reads_and_unmounts_leaving_nothing(s3, make_bucket, developer) -> None:
    """The README's by-hand flow as an ordinary user: the defaults land under ``$HOME`` and
    ``XDG_RUNTIME_DIR``, private; the files are the user's and hold the bytes; status knows the
    mount; unmount leaves no mount, daemon, mount point, state or lock behind."""
    objects = {"train/a.bin": os.urandom(200_000), "train/b.bin": b"b" * 70_000,
               "train/sub/c.txt": b"hello\n"}
    bucket = _bucket_with(s3, make_bucket, objects)
    home = Path(developer.env["HOME"])
    mounted = developer.s3datafs("mount", f"s3://{bucket}/train/", "--data-root",
                                 str(home / "data"))
    assert mounted.returncode == 0, mounted.stderr
    mountpoint = home / "data" / "train"
    entry = next(e for e in mount_table() if e.mountpoint == str(mountpoint))
    assert entry.mounted_by == DEVELOPER_UID

    seen = json.loads(developer.python_code(READ_FILES, str(mountpoint)))
    assert seen == {key.removeprefix("train/"): [hashlib.sha256(body).hexdigest(), DEVELOPER_UID,
                                                 "0o444"] for key, body in objects.items()}
    rows = json.loads(developer.s3datafs("status", "--json").stdout)
    (row,) = [row for row in rows if row["mountpoint"] == str(mountpoint)]
    assert (row["state"], row["object_count"]) == ("mounted", 3)

    unmounted = developer.s3datafs("unmount", str(mountpoint))
    assert unmounted.returncode == 0, unmounted.stderr
    assert all(e.mountpoint != str(mountpoint) for e in mount_table())
    assert not pid_alive(row["pid"])
    assert not mountpoint.exists()
    assert list((home / "run" / "s3datafs").iterdir()) == []
    cache, log = home / ".cache" / "s3datafs", home / ".local" / "state" / "s3datafs" / "train.log"
    for path, mode in ((cache, 0o700), (log, 0o600)):
        info = path.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (DEVELOPER_UID, mode), path
    logged = log.read_text()
    assert " WARNING " not in logged
    assert " ERROR " not in logged


def test_another_user_is_told_whose_mount_it_is(s3, make_bucket, developer, nobody) -> None:
    """A second user's ``status`` and ``unmount`` of the first one's mount: status said
    "unknown: Permission denied" of a mount in a directory closed to them, and unmount passed
    on fusermount3's "entry for ... not found in /etc/mtab"."""
    bucket = _bucket_with(s3, make_bucket, {"train/a.bin": b"a" * 1000})
    data_root = Path(developer.env["HOME"]) / "data"  # in a home of 0700
    assert developer.s3datafs("mount", f"s3://{bucket}/train/", "--data-root",
                              str(data_root)).returncode == 0
    mountpoint = str(data_root / "train")
    rows = json.loads(nobody.s3datafs("status", "--json").stdout)
    (row,) = [row for row in rows if row["mountpoint"] == mountpoint]
    assert row["state"] == f"mounted by uid {DEVELOPER_UID}, where you may not look"

    refused = nobody.s3datafs("unmount", mountpoint)
    assert (refused.returncode, refused.stderr) == (1, (
        f"s3datafs: {mountpoint} was mounted by uid {DEVELOPER_UID}: only that user or root "
        "may unmount it\n"))
    assert any(e.mountpoint == mountpoint for e in mount_table())
    assert developer.s3datafs("unmount", mountpoint).returncode == 0


def test_unmount_all_as_a_user_unmounts_their_own_and_no_other(
    s3, make_bucket, developer, nobody
) -> None:
    """``--all`` of a user who is not root: their mounts, and not a word of anyone else's
    (which they may not unmount): it said 'was mounted by uid ...' of each, and exited 1."""
    bucket = _bucket_with(s3, make_bucket, {"train/a.bin": b"a" * 1000})
    theirs, mine = (Path(user.env["HOME"]) / "data" for user in (developer, nobody))
    for user, root in ((developer, theirs), (nobody, mine)):
        mounted = user.s3datafs("mount", f"s3://{bucket}/train/", "--data-root", str(root))
        assert mounted.returncode == 0, mounted.stderr
    done = nobody.s3datafs("unmount", "--all")
    assert (done.returncode, done.stderr) == (0, "")
    mounted = {e.mountpoint for e in mount_table()}
    assert str(theirs / "train") in mounted
    assert str(mine / "train") not in mounted
    assert developer.s3datafs("unmount", str(theirs / "train")).returncode == 0

def test_a_mount_point_the_user_may_not_write_is_refused_before_s3_is_asked(
    s3, make_bucket, s3server, developer, place: Path
) -> None:
    """fusermount3 mounts a user's file system only on a directory the user may write; it said
    so after the whole dataset was pinned, and was answered "install fuse3"."""
    bucket = _bucket_with(s3, make_bucket, {"train/a.bin": b"a"})
    closed, sticky = place / "closed", place / "sticky"
    closed.mkdir(mode=0o755)  # root's, as /mnt or /data are
    sticky.mkdir()
    sticky.chmod(0o1777)  # root's and sticky, as /tmp is: writable, and yet refused
    for mountpoint in (closed, sticky):
        result = developer.s3datafs("mount", f"s3://{bucket}/train/", str(mountpoint))
        assert result.returncode == 1
        assert result.stderr.startswith(f"s3datafs: cannot mount on {mountpoint}: ")
        assert "choose a directory of your own" in result.stderr
    assert "may not write it" in developer.s3datafs(
        "mount", f"s3://{bucket}/train/", str(closed)).stderr
    assert _requests_to(s3server, bucket) == []
    assert all(not e.mountpoint.startswith(str(place) + "/") for e in mount_table())


@pytest.mark.parametrize(
    ("fusermount_said", "remedy"),
    [("fusermount3: user has no write access to mountpoint /mnt/x", "choose one of your own"),
     ("fusermount3: mountpoint /tmp/x not owned by user", "choose a directory of your own")],
)
def test_fusermounts_refusal_of_a_mount_point_names_the_remedy(
    fusermount_said: str, remedy: str
) -> None:
    """Should a mount point change between the check and the mount: not "install fuse3"."""
    assert remedy in mounting.fuse_remedy(fusermount_said)

def test_allow_other_needs_user_allow_other_said_before_s3_is_asked(
    s3, make_bucket, s3server, developer, nobody
) -> None:
    """Without ``user_allow_other`` in /etc/fuse.conf a user's ``--allow-other`` is refused at
    once (fusermount3 refused it only once the dataset was pinned: minutes for a big prefix);
    with it, another user reads the mount."""
    body = os.urandom(50_000)
    bucket = _bucket_with(s3, make_bucket, {"shared/x.bin": body})
    uri, data_root = f"s3://{bucket}/shared/", str(Path(developer.env["HOME"]) / "data")
    original = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None
    without = b"".join(line for line in (original or b"").splitlines(keepends=True)
                       if line.split(b"#")[0].strip() != b"user_allow_other")
    try:
        FUSE_CONF.write_bytes(without + b"# user_allow_other\nuser_allow_other")  # no newline
        refused = developer.s3datafs("mount", uri, "--data-root", data_root, "--allow-other")
        assert refused.returncode == 1
        assert refused.stderr == (
            "s3datafs: cannot mount with --allow-other: /etc/fuse.conf has no line "
            "user_allow_other, without which only root may: add user_allow_other to "
            "/etc/fuse.conf, or mount without --allow-other\n")
        assert _requests_to(s3server, bucket) == []

        FUSE_CONF.write_bytes(without + b"  user_allow_other  # for s3datafs\n")
        Path(developer.env["HOME"]).chmod(0o755)  # the other user must reach the mount point
        mounted = developer.s3datafs("mount", uri, "--data-root", data_root, "--allow-other")
        assert mounted.returncode == 0, mounted.stderr
        seen = json.loads(nobody.python_code(READ_FILES, f"{data_root}/shared"))
        assert seen == {"x.bin": [hashlib.sha256(body).hexdigest(), DEVELOPER_UID, "0o444"]}
        assert developer.s3datafs("unmount", f"{data_root}/shared").returncode == 0
    finally:
        if original is None:
            FUSE_CONF.unlink(missing_ok=True)
        else:
            FUSE_CONF.write_bytes(original)


def test_kernel_readahead_asked_of_a_users_mount_is_said_to_need_root(
    s3, make_bucket, developer
) -> None:
    """Only root may write sysfs: the mount goes ahead and says so on the terminal, not only in
    its log once mounted."""
    bucket = _bucket_with(s3, make_bucket, {"train/a.bin": b"a" * 1000})
    root = Path(developer.env["HOME"]) / "data"
    mounted = developer.s3datafs("mount", f"s3://{bucket}/train/", "--data-root", str(root),
                                 "--kernel-readahead", "128K")
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stderr == ("s3datafs: WARNING: --kernel-readahead is set through sysfs, which "
                              "only root may write: the kernel reads ahead as it would without "
                              "it\n")
    log = Path(developer.env["HOME"]) / ".local" / "state" / "s3datafs" / "train.log"
    assert developer.s3datafs("unmount", str(root / "train")).returncode == 0
    assert log.read_text().count("kernel-readahead") == 1  # not again from the daemon


def _pids_of(uid: int) -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc")
                  if name.isdigit() and _owner(f"/proc/{name}") == uid)


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except FileNotFoundError:
        return None


def test_root_sees_a_users_dead_mount_as_dead_and_may_clean_it_up(
    s3, make_bucket, developer, cli
) -> None:
    """Without ``allow_other`` the kernel answers root's statfs of a user's mount itself, with
    success, so a user's mount whose daemon was killed looked "mounted" to root's ``status``
    and ``unmount --if-dead`` left it. Root asks as the user who mounted it."""
    bucket = _bucket_with(s3, make_bucket, {"train/a.bin": b"a" * 1000})
    data_root = Path(developer.env["HOME"]) / "data"
    mountpoint = str(data_root / "train")
    assert developer.s3datafs("mount", f"s3://{bucket}/train/", "--data-root",
                              str(data_root)).returncode == 0
    (theirs,) = [row for row in json.loads(developer.s3datafs("status", "--json").stdout)
                 if row["mountpoint"] == mountpoint]
    rows = json.loads(cli.run("status", "--json").stdout)
    (alive,) = [row for row in rows if row["mountpoint"] == mountpoint]
    assert alive["state"] == "mounted (not by this user or runtime directory)"
    assert "served by a live daemon" in cli.run("unmount", "--if-dead", mountpoint).stdout

    os.kill(theirs["pid"], signal.SIGSTOP)  # a daemon that answers nothing, not even root's ask
    try:
        rows = json.loads(cli.run("status", "--json").stdout)
        (stopped,) = [row for row in rows if row["mountpoint"] == mountpoint]
        assert stopped["state"] == "not answering (for 2 s)"
        assert _pids_of(DEVELOPER_UID) == [theirs["pid"]]  # the asking child was killed
    finally:
        os.kill(theirs["pid"], signal.SIGKILL)
    while pid_alive(theirs["pid"]):
        time.sleep(0.01)
    rows = json.loads(cli.run("status", "--json").stdout)
    (dead,) = [row for row in rows if row["mountpoint"] == mountpoint]
    assert dead["state"] == "dead: run s3datafs unmount"
    cleaned = cli.run("unmount", "--if-dead", mountpoint)
    assert (cleaned.returncode, cleaned.stderr) == (0, "")
    assert all(e.mountpoint != mountpoint for e in mount_table())
