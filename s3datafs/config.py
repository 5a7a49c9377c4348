"""Defaults, paths and the parsing of option values: pure rules plus small, local file checks.

Paths follow the usual conventions: as root the system locations (``/data``, ``/var/cache``,
``/run``, ``/var/log``), otherwise the XDG ones. Each can be overridden (options, or the
``S3DATAFS_*`` environment variables, which tests use to isolate themselves).
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import errno
import os
import re
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, SettingError, UsageError
from .quietthread import start_quiet_thread

DEFAULT_BLOCK_SIZE = 64 * 1024  # cache granularity: why 64K, see README "Caching and reads"
DEFAULT_MEMORY_CACHE = 32 * 1024 * 1024  # a staging area: the page cache keeps what was read
DEFAULT_DISK_CACHE = 20 * 1024**3
DEFAULT_PREFETCH_FILES = 32  # files fetched ahead of a directory read in order
DEFAULT_CACHE_MIN_FREE = 0.05  # never fill the cache filesystem beyond 95 %
DEFAULT_MAX_PREFETCH = 64 * 1024 * 1024  # readahead bytes in flight, all handles together
DEFAULT_MAX_REQUEST = 8 * 1024 * 1024  # bytes per GET at most (a readahead step is one GET)
DEFAULT_WRITE_BEHIND = 64 * 1024 * 1024  # fetched bytes being written to the disk cache, at most
DEFAULT_KERNEL_READAHEAD = 1024 * 1024  # the kernel's readahead on a mount (FUSE's is 128K)
MAX_KERNEL_READAHEAD = 16 * 1024 * 1024


def _is_root() -> bool:
    return os.geteuid() == 0


def default_data_root() -> Path:
    return Path(os.environ.get("S3DATAFS_DATA_ROOT") or "/data")


def _directory_from_env(name: str) -> Path | None:
    """A directory named by an environment variable, made absolute: the daemon runs in ``/``."""
    value = os.environ.get(name)
    return Path(os.path.abspath(value)) if value else None


def default_cache_dir() -> Path:
    if env := _directory_from_env("S3DATAFS_CACHE_DIR"):
        return env
    if _is_root():
        return Path("/var/cache/s3datafs")
    base = _directory_from_env("XDG_CACHE_HOME") or Path(os.path.expanduser("~/.cache"))
    return base / "s3datafs"


def runtime_dir() -> Path:
    """Where live mounts leave their state files (small; tmpfs is fine)."""
    if env := _directory_from_env("S3DATAFS_RUNTIME_DIR"):
        return env
    if _is_root():
        return Path("/run/s3datafs")
    if xdg := _directory_from_env("XDG_RUNTIME_DIR"):
        return xdg / "s3datafs"
    return Path(f"/tmp/s3datafs-{os.getuid()}")


def default_log_dir() -> Path:
    if env := _directory_from_env("S3DATAFS_LOG_DIR"):
        return env
    if _is_root():
        return Path("/var/log/s3datafs")
    base = _directory_from_env("XDG_STATE_HOME") or Path(os.path.expanduser("~/.local/state"))
    return base / "s3datafs"


def parse_mode(text: str, option: str) -> int:
    """An octal permission value such as ``0444`` or ``444``."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an octal mode such as 0444") from None
    if not 0 <= mode <= 0o7777:
        raise UsageError(f"{option} {text!r} is out of range (0000-7777)")
    return mode


def parse_id(text: str, option: str) -> int:
    """A numeric user or group id."""
    if not _is_number(text) or int(text) >= 2**32 - 1:
        raise UsageError(f"{option} {text!r} is not a numeric id (0 to 4294967294)")
    return int(text)


def _is_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also says yes to ``²``, which ``int`` refuses."""
    return text.isascii() and text.isdigit()


MAX_PREFETCH_FILES = 1024


def parse_prefetch_files(text: str | None, option: str) -> int:
    """``--prefetch-files``: how many files ahead a directory read in order gets (0: none)."""
    if text is None:
        return DEFAULT_PREFETCH_FILES
    if not _is_number(text) or int(text) > MAX_PREFETCH_FILES:
        raise UsageError(f"{option} {text!r} is not a number of files from 0 to "
                         f"{MAX_PREFETCH_FILES} (0 turns prefetching across files off)")
    return int(text)


_RELATIVE_TIME = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AS_OF_FORMS = ("ISO 8601 (2024-05-01, 2024-05-01T12:00:00Z, naive means UTC) or a time ago in "
               "s, m, h, d or w (30m, 12h, 7d)")


def parse_as_of(text: str, now: float) -> float:
    """``--as-of``: an ISO 8601 time (naive = UTC) or a time ago (``90s``, ``30m``, ``12h``,
    ``7d``, ``2w``).

    Returns seconds since the epoch. A time after ``now`` is refused: the view it names could
    still change, so it would not be a point in time.
    """
    relative = _RELATIVE_TIME.match(text.strip())
    if relative:
        when = now - int(relative[1]) * _SECONDS[relative[2]]
    else:
        try:
            when = parse_time(text.strip())
        except ValueError:
            raise SettingError("--as-of", text, f"is not a time: use {AS_OF_FORMS}") from None
    if when > now:
        raise SettingError(
            "--as-of", text, f"is in the future ({format_time(when)}, now {format_time(now)}): "
            "a view of the future could still change"
        )
    return parse_time(format_time(when))  # whole milliseconds, exactly as recorded in files


def parse_time(text: str) -> float:
    """The inverse of ``format_time`` (any ISO 8601 time; naive means UTC)."""
    parsed = datetime.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def format_time(seconds: float) -> str:
    """An epoch time as ISO 8601 in UTC with a ``Z``, to the millisecond if it has any."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def credential_value(value: str, what: str) -> str:
    """``value`` without surrounding whitespace; refused if it holds any other invisible byte.

    AWS keys and session tokens are printable ASCII without spaces. A line break inside one (a
    YAML ``|`` block, a continuation line in a credentials file) would reach an HTTP header,
    whose refusal quotes the header's value: a secret in an error message. So it is refused
    here, naming ``what`` and never the value.
    """
    value = value.strip()
    if not value or any(not "!" <= char <= "~" for char in value):
        raise ConfigError(
            f"{what} is empty or holds a line break, a space or another character no AWS "
            "credential has: write it on one line"
        )
    return value


# Written by the group, or read or written by everyone: the group may read (see below).
_OPEN_TO_OTHERS = stat.S_IWGRP | stat.S_IRWXO


def read_credentials_file(path: Path, profile: str | None) -> Credentials:
    """Keys from an AWS-style credentials file that no other user may read or change.

    Its group may read it: a Kubernetes Secret volume of a pod with an ``fsGroup`` is mode 0440,
    group ``fsGroup``, whatever ``defaultMode`` says, and cannot be changed. Nobody but the
    owner may write it, and other users may not read it (mode 0600, 0400, 0640 or 0440)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"credentials file {path} is not a regular file")
    if mode & _OPEN_TO_OTHERS:
        raise ConfigError(
            f"credentials file {path} is open to other users (mode {stat.S_IMODE(mode):04o}): "
            f"run chmod 600 {path} (for a Kubernetes Secret volume, set defaultMode: 0400)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot parse credentials file {path}: not UTF-8 text") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"cannot parse credentials file {path}: {type(exc).__name__}") from None
    section = profile or "default"
    if not parser.has_section(section):
        raise ConfigError(f"credentials file {path} has no [{section}] section")
    values = parser[section]
    try:
        access, secret = values["aws_access_key_id"], values["aws_secret_access_key"]
    except KeyError as exc:
        raise ConfigError(f"credentials file {path} [{section}] lacks {exc.args[0]}") from None
    where = f"credentials file {path} [{section}]"
    token = values.get("aws_session_token")
    return Credentials(
        credential_value(access, f"{where} aws_access_key_id"),
        credential_value(secret, f"{where} aws_secret_access_key"),
        None if token is None else credential_value(token, f"{where} aws_session_token"),
    )


def prepare_mountpoint(path: Path) -> Path | None:
    """Check ``path`` can be mounted on, creating it if missing.

    Returns the highest directory this call created (``path`` itself or one of its parents), so a
    failed mount can remove exactly what it made; None if ``path`` existed.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        return _make_directories(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _dead_mount(path) from None
        raise ConfigError(
            f"cannot use mount point {path}: {exc.strerror}: choose another mount point"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        if is_dead_mount(path):  # stat above may have come from the cache
            raise _dead_mount(path)
        raise ConfigError(f"{path} is already a mount point: unmount it or choose another")
    if any(os.scandir(path)):
        raise ConfigError(f"mount point {path} is not empty: choose an empty directory")
    _check_fusermount_allows(path, info)
    return None


def _check_fusermount_allows(path: Path, info: os.stat_result) -> None:
    """Refuse, before S3 is asked anything, a mount point that fusermount3 (which mounts for
    every user but root) would refuse once the dataset is pinned: one the user may not write,
    or a sticky one of another user's (its ``check_perm``, on the real uid). Its own words,
    "user has no write access to mountpoint", read as a FUSE install problem."""
    if _is_root():
        return
    remedy = "choose a directory of your own with --data-root or a MOUNTPOINT argument"
    if info.st_mode & stat.S_ISVTX and info.st_uid != os.getuid():
        raise ConfigError(f"cannot mount on {path}: it is sticky and belongs to uid "
                          f"{info.st_uid}, and fusermount3 mounts a user's FUSE file system "
                          f"only on a sticky directory of their own: {remedy}")
    if not os.access(path, os.W_OK):
        raise ConfigError(f"cannot mount on {path}: this user may not write it, and fusermount3 "
                          f"mounts a user's FUSE file system only where they may: {remedy}")


MOUNT_ANSWER_SECONDS = 2.0  # how long a mount may take to answer statfs before it "hangs"


def statfs_errno(
    path: str | Path, timeout: float = MOUNT_ANSWER_SECONDS, as_owner: tuple[int, int] | None = None
) -> int | None:
    """0 if statfs of ``path`` succeeds, its errno if it fails, None without an answer in time.

    How to ask a FUSE mount whether its daemon lives: stat may be answered from the kernel's
    attribute cache long after the daemon died, statfs always reaches the daemon (ENOTCONN once
    it is gone). Asked in a thread of its own, so a daemon that no longer answers costs
    ``timeout``, not a hang (the thread ends with the process).

    ``as_owner`` (uid, gid): ask as that user, from a child process (root only). The kernel
    passes statfs on to the daemon only for the user who mounted (or anyone, with
    ``allow_other``), and answers anyone else, root too, itself, with success: root could not
    tell another user's dead mount from a live one (``MountEntry.owner_to_ask_as``).
    """
    if as_owner is not None:
        return _statfs_errno_as(path, *as_owner, timeout=timeout)
    answer: list[int] = []

    def ask() -> None:
        try:
            os.statvfs(path)
            answer.append(0)
        except OSError as exc:
            answer.append(exc.errno or errno.EIO)

    probe = start_quiet_thread(ask, name="statfs-probe")
    probe.join(timeout)
    return answer[0] if answer else None


_ASKED_TOO_LATE = 255  # a child's exit status that no errno has


def _statfs_errno_as(path: str | Path, uid: int, gid: int, timeout: float) -> int | None:
    """``statfs_errno`` of ``path`` asked by a child process that became ``uid``:``gid``. A
    child that gets no answer in ``timeout`` is killed (a FUSE request waits killably), so a
    stopped daemon leaves no process of ours behind. The child runs only system calls between
    fork and exit, so the parent's threads cannot leave it a lock it would wait on."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child; its exit status is the answer
        code = _ASKED_TOO_LATE
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.statvfs(path)
            code = 0
        except OSError as exc:
            code = min(exc.errno or errno.EIO, _ASKED_TOO_LATE - 1)
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return code if 0 <= code < _ASKED_TOO_LATE else None
        if time.monotonic() >= deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return None
        time.sleep(0.005)


def is_dead_mount(path: str | Path, as_owner: tuple[int, int] | None = None) -> bool:
    """Whether ``path`` is a FUSE mount whose daemon is gone (ENOTCONN; ``statfs_errno``)."""
    return statfs_errno(path, as_owner=as_owner) == errno.ENOTCONN


def _dead_mount(path: Path) -> ConfigError:
    return ConfigError(f"{path} is a dead mount (transport endpoint is not connected): "
                       f"run 's3datafs unmount {path}' first")


def _make_directories(path: Path) -> Path:
    highest_missing = path
    while not highest_missing.parent.exists() and highest_missing.parent != highest_missing:
        highest_missing = highest_missing.parent
    try:
        path.mkdir(parents=True, mode=0o755)
    except OSError as exc:
        raise ConfigError(
            f"cannot create mount point {path}: {exc.strerror}: "
            f"choose another with --data-root or a MOUNTPOINT argument"
        ) from None
    return highest_missing


def remove_created(path: Path, highest_created: Path | None) -> None:
    """Undo ``prepare_mountpoint``: remove ``path`` and its parents up to ``highest_created``."""
    if highest_created is None:
        return
    current = path
    while True:
        try:
            current.rmdir()
        except OSError:
            return
        if current == highest_created:
            return
        current = current.parent


def prepare_cache_dir(path: Path) -> None:
    """Create the cache directory (private: 0700) or explain why it cannot be used."""
    private_dir(path, "cache directory", "choose another with --cache-dir")


def private_dir(path: Path, what: str, remedy: str) -> None:
    """Make ``path`` (0700, and so are the parents it makes) or check it: a directory only this
    user can change.

    s3datafs trusts what it finds in its cache and runtime directories: cached blocks and
    catalogs are served, stray files deleted, state files believed. A directory that another
    user owns or may write to, or may swap for a symlink, would let that user make a mount
    (root's) serve bytes of their choosing, delete trees or write files elsewhere. So, as
    OpenSSH checks the path of its keys, the directory must belong to this user and be writable
    by nobody else; every directory above it, and every directory holding a symlink met on the
    way, must belong to root or this user and be writable by nobody else unless sticky
    (``/tmp``); and no such symlink may belong to another user. "Nobody else" leaves out the
    members of this process's own groups (see ``_writable_by_others``). Refused in one line
    naming the problem and ``remedy``. What is missing is made only below a path that passed.
    """
    _checked_dir(path, what, remedy, shared=False)


def shared_dir(path: Path, what: str, remedy: str) -> None:
    """``private_dir``, except that the directory itself may be shared if it is sticky (a log
    file in ``/tmp``): for directories whose files are opened one by one, with ``O_NOFOLLOW``
    and an owner check, and never trusted for what is in them."""
    _checked_dir(path, what, remedy, shared=True)


def _checked_dir(path: Path, what: str, remedy: str, *, shared: bool) -> None:
    try:
        resolved, problem = _resolved(Path(os.path.abspath(path)))
        if problem is None and not resolved.is_dir():  # made below what was checked, and checked
            make_private_dirs(resolved)
            resolved, problem = _resolved(resolved)
        if problem is None and not resolved.is_dir():  # a file there: not "Permission denied"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if problem is None:
            _tighten_if_empty(resolved)
        if problem is None:
            problem = _unsafe_dir(resolved, final=not shared)
        if problem is None and not os.access(resolved, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"cannot use {what} {path}: {exc.strerror or exc}: {remedy}") from None
    if problem is not None:
        raise ConfigError(
            f"{what} {path} is not private: {problem}, and s3datafs trusts what it finds "
            f"there: {remedy}{_or_chmod(resolved, problem)}"
        )


def _or_chmod(directory: Path, problem: str) -> str:
    """The other way out when the problem is that others may write the directory itself, ours
    (one an earlier release used as it was): the user knows whether anyone else has written
    there; s3datafs does not."""
    if problem.startswith(f"{directory} may be written by others"):
        return f", or, if no one else has written there, chmod 700 {directory}"
    return ""


def _tighten_if_empty(directory: Path) -> None:
    """Make an empty directory of ours that others may write 0700: a fresh volume (a Kubernetes
    emptyDir is 0777) holds nothing to distrust. Made private first and looked into after, so
    nothing put there meanwhile goes unseen; one that is not empty is then refused as it is.
    A sticky one is a place shared on purpose (an empty ``/tmp`` of root's): left as it is."""
    info = os.stat(directory)
    if (info.st_uid != os.geteuid() or info.st_mode & stat.S_ISVTX
            or not _writable_by_others(info)):
        return
    os.chmod(directory, 0o700)
    if any(os.scandir(directory)):
        os.chmod(directory, stat.S_IMODE(info.st_mode))  # not ours to change: refused below


def _resolved(path: Path) -> tuple[Path, str | None]:
    """``path`` with its symlinks followed one by one (what is missing is kept as written), or
    why one of them or a directory holding one is not to be trusted."""
    done, todo, hops = Path("/"), list(path.parts[1:]), 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            done = done.parent
            continue
        candidate = done / part
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return candidate.joinpath(*todo), None  # to be made, below what was checked
        if not stat.S_ISLNK(info.st_mode):
            done = candidate
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        if info.st_uid not in (0, os.geteuid()):
            return candidate, f"symbolic link {candidate} belongs to uid {info.st_uid}"
        if (problem := _unsafe_dir(done, final=False)) is not None:
            return candidate, f"symbolic link {candidate} is in a directory where {problem}"
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            done, target = Path("/"), target.relative_to("/")
        todo = [*target.parts, *todo]
    return done, None


def _unsafe_dir(directory: Path, *, final: bool) -> str | None:
    """Why ``directory`` (resolved) is not to be trusted, or None: it and every directory above
    it (see ``private_dir``); ``final``: it must be this user's own and writable by nobody else."""
    me = os.geteuid()
    info = os.stat(directory)
    if final and info.st_uid != me:
        return f"{directory} belongs to uid {info.st_uid}, not to uid {me}"
    if final and _writable_by_others(info):
        return f"{directory} may be written by others (mode {stat.S_IMODE(info.st_mode):04o})"
    for place in (directory, *directory.parents) if not final else directory.parents:
        info = os.stat(place)
        if info.st_uid not in (0, me):
            return f"{place} belongs to uid {info.st_uid}"
        if _writable_by_others(info) and not info.st_mode & stat.S_ISVTX:
            return f"{place} may be written by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _writable_by_others(info: os.stat_result) -> bool:
    """Whether users other than this one may write the directory: everyone may, or a group
    this process is not in. The members of its own groups are trusted as it is: a Kubernetes
    volume of a pod with an ``fsGroup`` is made group-writable (2770) at every start, and the
    group is the pod's; a user private group (``umask 002``) has one member."""
    if info.st_mode & stat.S_IWOTH:
        return True
    return bool(info.st_mode & stat.S_IWGRP) and info.st_gid not in _own_groups()


def _own_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def make_private_dirs(directory: Path) -> None:
    """``mkdir -p`` where every directory made is 0700 (``parents=True`` would make the parents
    0777 less the umask: 0775 under a umask of 002)."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
