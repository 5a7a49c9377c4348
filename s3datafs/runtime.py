"""What is mounted right now: the kernel's mount table joined with our state files.

- The mount table (``/proc/self/mountinfo``) is the truth about what is mounted; our mounts have
  filesystem type ``fuse.s3datafs``.
- Each daemon writes a small JSON state file (mount point, URI, counts, pid, log file) into the
  runtime directory when it is ready and removes it when it exits. A state file whose daemon
  is dead is stale: ``unmount`` removes it with the dead mount, ``status`` once the mount is
  gone too (``remove_stale_states``).
- State files are written atomically (temp file + ``os.replace``) and never hold secrets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import private_dir, remove_created, runtime_dir
from .errors import ConfigError

FSTYPE = "fuse.s3datafs"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor", as the kernel names the mount's backing device
    options: frozenset[str] = frozenset()  # per-mount options: ro, nosuid, noexec, ...
    # the filesystem's own options, as the kernel lists them: a FUSE mount's user_id=,
    # default_permissions, allow_other, ...
    super_options: frozenset[str] = frozenset()

    @property
    def mounted_by(self) -> int | None:
        """A FUSE mount's ``user_id=N`` (the kernel shows it for every one): who mounted it."""
        return self._super_number("user_id")

    @property
    def mounted_by_group(self) -> int | None:
        """A FUSE mount's ``group_id=N``: the group of who mounted it."""
        return self._super_number("group_id")

    def _super_number(self, wanted: str) -> int | None:
        for option in self.super_options:
            name, _, value = option.partition("=")
            if name == wanted and value.isascii() and value.isdigit():
                return int(value)
        return None

    def owner_to_ask_as(self) -> tuple[int, int] | None:
        """(uid, gid) to ask this mount's daemon as (``config.statfs_errno``), where the kernel
        would answer us itself: we are root and another user mounted it without
        ``allow_other``. None where asking as ourselves reaches the daemon, or cannot be
        helped (a user who is not root may not become another)."""
        uid, gid = self.mounted_by, self.mounted_by_group
        if os.geteuid() != 0 or uid in (None, 0) or gid is None:
            return None
        return None if "allow_other" in self.super_options else (uid, gid)

    def is_another_users(self) -> bool:
        """Whether another user than this one mounted it: without ``allow_other`` only that
        user may look into it (root neither), and only they or root may unmount it."""
        return self.mounted_by not in (None, os.getuid())


def mount_table() -> list[MountEntry]:
    """Every mount in this mount namespace (fields decoded from the kernel's octal escapes)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            super_options = fields[separator + 3].split(",") if len(fields) > separator + 3 else []
            entries.append(
                MountEntry(
                    mountpoint=_unescape(fields[4]),
                    fstype=fields[separator + 1],
                    source=_unescape(fields[separator + 2]),
                    device=fields[2],
                    options=frozenset(fields[5].split(",")),
                    super_options=frozenset(super_options),
                )
            )
    return entries


def our_mounts() -> list[MountEntry]:
    return [entry for entry in mount_table() if entry.fstype == FSTYPE]


def _unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)


def state_path(mountpoint: str) -> Path:
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode("utf-8", "surrogateescape"))
    return runtime_dir() / f"{digest.hexdigest()[:20]}.json"


@contextlib.contextmanager
def mounting(mountpoint: str) -> Iterator[None]:
    """Be the one command mounting at ``mountpoint`` meanwhile, or fail at once saying so.

    Two commands mounting at one place could both find it free and stack two mounts. The lock is
    a POSIX record lock on a file beside the state files: a forked daemon does not inherit it,
    and it goes with the process that holds it, however that process ends. The holder removes
    the file when done (one per mount point ever mounted would pile up), so a lock is only
    good if its file is still the one at the path; else it is taken again on the new file.
    """
    _private_runtime_dir()
    path = state_path(mountpoint).with_suffix(".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"{mountpoint}: another s3datafs mount there is under way: wait "
                              "for it, or choose another mount point") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it meanwhile
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still locked: whoever opened it meanwhile will see it is gone
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)


def _private_runtime_dir() -> Path:
    """The runtime directory, made or checked private (``config.private_dir``): the state files
    in it are believed (``status``, ``unmount``), so nobody else may write there."""
    directory = runtime_dir()
    variables = "S3DATAFS_RUNTIME_DIR" if os.geteuid() == 0 else (
        "S3DATAFS_RUNTIME_DIR (or XDG_RUNTIME_DIR)")  # root's default ignores XDG_RUNTIME_DIR
    private_dir(directory, "runtime directory",
                f"set {variables} to a directory only you can write")
    return directory


def _runtime_dir_to_read() -> Path:
    """The runtime directory, checked private if it exists (reading makes nothing)."""
    directory = runtime_dir()
    if directory.exists():
        _private_runtime_dir()
    return directory


def write_state(mountpoint: str, state: dict) -> None:
    """Write the mount's state file; ``ConfigError`` (one line) if its directory refuses."""
    directory = _private_runtime_dir()
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=".state-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(state, out)
            os.replace(temp, state_path(mountpoint))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:  # a full or read-only runtime directory
        raise ConfigError(
            f"cannot write the mount's state file in {directory} ({exc.strerror or exc}): free "
            "space there, or point S3DATAFS_RUNTIME_DIR at a writable directory"
        ) from None


def read_state(mountpoint: str) -> dict | None:
    _runtime_dir_to_read()
    try:
        return json.loads(state_path(mountpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_state(mountpoint: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(mountpoint).unlink()


def owns_state(mountpoint: str, pid: int) -> bool:
    """Whether daemon ``pid`` may refresh or remove the mount point's state file: it names no
    other live daemon. A mount detached lazily (its daemon serving the files still open) and
    the next mount at the same place share the path; the file is the newer one's."""
    state = read_state(mountpoint)
    named = None if state is None else state.get("pid")
    return named in (None, pid) or not isinstance(named, int) or not pid_alive(named)


def all_states() -> list[dict]:
    states = []
    for path in sorted(_runtime_dir_to_read().glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            states.append(json.loads(path.read_text(encoding="utf-8")))
    return states


def remove_stale_states(states: list[dict], mounted: set[str]) -> None:
    """Remove the state files of daemons that are dead and whose mount is gone: killed, then
    unmounted by hand (``umount -l``), they would pile up, one per mount point (and the mount
    point directories their mounts made go too: ``remove_made_for``). A dead daemon's
    mount still in the table keeps its file (``unmount`` clears both); a live daemon's is its
    own (a lazily detached one serves its open files). Each is checked again under the mount
    point's lock: a command mounting there meanwhile writes a new one."""
    for state in states:
        mountpoint, pid = state.get("mountpoint"), state.get("pid")
        if not isinstance(mountpoint, str) or mountpoint in mounted or pid_alive(pid):
            continue
        with contextlib.suppress(ConfigError, OSError), mounting(mountpoint):
            again = read_state(mountpoint)
            if again is not None and again.get("pid") == pid:
                remove_state(mountpoint)
                remove_made_for(mountpoint, again)


def remove_made_for(mountpoint: str, state: dict) -> None:
    """Remove the directories made for ``mountpoint`` by the mount ``state`` describes (its
    ``created``), as its daemon does when it ends, which a killed one could not: empty ones
    only, up to the recorded one. Call it holding the mount point's lock (``mounting``): a
    command mounting there meanwhile may be keeping the directory."""
    created = state.get("created")
    if isinstance(created, str) and Path(mountpoint).is_relative_to(created):
        remove_created(Path(mountpoint), Path(created))


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs; a zombie (dead, not yet reaped by its new parent) counts as dead."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            state = stat_file.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
