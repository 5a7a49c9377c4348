"""``s3datafs unmount``: unmount, then wait for the daemon to exit; dead mounts are cleaned up.

``unmount_path`` is the one way every command unmounts (``mount-all`` rolling back, ``run``
cleaning up); ``--all`` applies it to every ``fuse.s3datafs`` entry of the mount table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .. import runtime
from ..config import is_dead_mount
from ..errors import ConfigError, UsageError

UNMOUNT_WAIT_SECONDS = 30.0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("unmount", aliases=["umount"], help="unmount and wait")
    parser.add_argument("mountpoint", type=Path, nargs="?", help="the mount point (or --all)")
    parser.add_argument("--lazy", action="store_true", help="detach now even if busy")
    parser.add_argument("--all", action="store_true",
                        help="unmount every s3datafs mount (a user's own, unless root)")
    parser.add_argument("--if-dead", action="store_true",
                        help="only a dead mount (its daemon gone), else leave it: what a "
                        "service's stop runs, so a failed start never takes another's mount")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.all and args.mountpoint is not None:
        raise UsageError("give either MOUNTPOINT or --all, not both")
    if not args.all and args.mountpoint is None:
        raise UsageError(
            "the following arguments are required: mountpoint (or --all) "
            "(see 's3datafs unmount --help')"
        )
    if args.all:
        return unmount_all(lazy=args.lazy, only_dead=args.if_dead)
    try:
        unmount_path(args.mountpoint, lazy=args.lazy, only_dead=args.if_dead)
    except NotMountedError:
        if not args.if_dead:
            raise
        print(f"s3datafs: nothing is mounted at {args.mountpoint}")
    return 0


def unmount_all(*, lazy: bool, only_dead: bool = False) -> int:
    """Unmount every s3datafs mount of this mount namespace (for a user other than root, every
    one of theirs: they may unmount no other); 1 if any could not be unmounted."""
    status = 0
    for entry in reversed(runtime.our_mounts()):  # the newest first, so nested mounts go first
        if _not_ours_to_unmount(entry):
            continue
        try:
            unmount_path(entry.mountpoint, lazy=lazy, only_dead=only_dead)
        except ConfigError as exc:
            print(f"s3datafs: {exc}", file=sys.stderr)
            status = 1
    return status


def _not_ours_to_unmount(entry: runtime.MountEntry) -> bool:
    """Whether another user mounted it and this one is not root, who alone may unmount it."""
    return entry.is_another_users() and os.geteuid() != 0


class NotMountedError(ConfigError):
    """There is nothing mounted there (any more)."""


def unmount_path(path: str | os.PathLike[str], *, lazy: bool, only_dead: bool = False) -> None:
    """Unmount one s3datafs mount and wait for its daemon to exit (unless ``lazy``);
    ``only_dead``: only if its daemon is gone (statfs says ENOTCONN), else say so and leave it."""
    mountpoint = _as_the_mount_table_names(path)
    state = runtime.read_state(mountpoint)
    entry = _mounted(mountpoint)
    if entry is None:
        runtime.remove_state(mountpoint)
        raise NotMountedError(f"{mountpoint} is not mounted")
    if entry.fstype != runtime.FSTYPE:
        if any(e.fstype == runtime.FSTYPE for e in _mounts_at(mountpoint)):
            raise ConfigError(f"a {entry.fstype} file system is mounted over the s3datafs mount "
                              f"at {mountpoint}: unmount it first")
        raise ConfigError(f"{mountpoint} is not an s3datafs mount (it is {entry.fstype})")
    if _not_ours_to_unmount(entry):  # fusermount3 would say "not found in /etc/mtab"
        raise ConfigError(f"{mountpoint} was mounted by uid {entry.mounted_by}: only that user "
                          "or root may unmount it")
    if only_dead and not is_dead_mount(mountpoint, entry.owner_to_ask_as()):
        print(f"s3datafs: {mountpoint} is served by a live daemon: left as it is")
        return
    reason = _unmount(mountpoint, lazy)
    if reason is not None and _mounted(mountpoint) is not None:  # else: it went meanwhile
        if "busy" in reason.lower():
            below = [e.mountpoint for e in runtime.mount_table()
                     if e.mountpoint.startswith(mountpoint.rstrip("/") + "/")]
            if below:
                raise ConfigError(f"{mountpoint} is busy: {below[0]} is mounted inside it: "
                                  "unmount that first, or use --lazy")
            raise ConfigError(f"{mountpoint} is busy: close the files using it, or use --lazy")
        raise ConfigError(f"cannot unmount {mountpoint}: {reason}")
    pid = int(state.get("pid") or 0) if state is not None else 0
    if state is not None and not lazy:
        _wait_for_exit(pid)
    if state is not None and not runtime.pid_alive(pid):
        # Its daemon removes what was made for the mount when it ends; a killed one could not.
        with contextlib.suppress(ConfigError), runtime.mounting(mountpoint):
            runtime.remove_made_for(mountpoint, state)
    runtime.remove_state(mountpoint)


def _as_the_mount_table_names(path: str | os.PathLike[str]) -> str:
    """``path`` without symbolic links, as mount named it and the mount table does, and found
    without a look at the mount point itself when it is one: the kernel may ask a FUSE daemon
    for its root's attributes, and one that is stopped or stuck never answers."""
    parent, name = os.path.split(os.path.abspath(path))
    candidate = os.path.join(os.path.realpath(parent), name)
    if any(entry.mountpoint == candidate for entry in runtime.mount_table()):
        return candidate
    return os.path.realpath(path)


def _mounted(mountpoint: str) -> runtime.MountEntry | None:
    """The topmost mount at ``mountpoint``: the one an unmount there removes."""
    entries = _mounts_at(mountpoint)
    return entries[-1] if entries else None


def _mounts_at(mountpoint: str) -> list[runtime.MountEntry]:
    """The mounts at ``mountpoint``, lowest first (the table lists them in the order made)."""
    return [e for e in runtime.mount_table() if e.mountpoint == mountpoint]


_MNT_DETACH = 2


def _unmount(mountpoint: str, lazy: bool) -> str | None:
    """Unmount with ``fusermount3 -u``, or as root ``umount2`` (a root mount needs no helper,
    so fuse3's tools may be missing); the reason it failed, or None."""
    if shutil.which("fusermount3"):
        command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return None
        return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
    if os.geteuid() != 0:
        return "fusermount3 is missing (install fuse3)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH if lazy else 0) == 0:
        return None
    code = ctypes.get_errno()
    return "Device or resource busy" if code == errno.EBUSY else os.strerror(code)


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
    while runtime.pid_alive(pid):
        if time.monotonic() > deadline:
            raise ConfigError(f"unmounted, but the daemon (pid {pid}) has not exited yet")
        time.sleep(0.05)


