"""``s3datafs unmount``: unmount, then wait for the daemon to exit; dead mounts are cleaned up."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from .. import runtime
from ..errors import ConfigError

UNMOUNT_WAIT_SECONDS = 30.0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("unmount", aliases=["umount"], help="unmount and wait")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--lazy", action="store_true", help="detach now even if busy")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    state = runtime.read_state(mountpoint)
    table = {entry.mountpoint: entry for entry in runtime.mount_table()}
    entry = table.get(mountpoint)
    if entry is None:
        runtime.remove_state(mountpoint)
        raise ConfigError(f"{mountpoint} is not mounted")
    if entry.fstype != runtime.FSTYPE:
        raise ConfigError(f"{mountpoint} is not an s3datafs mount (it is {entry.fstype})")
    command = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        if "busy" in reason.lower():
            raise ConfigError(f"{mountpoint} is busy: close the files using it, or use --lazy")
        raise ConfigError(f"cannot unmount {mountpoint}: {reason}")
    if state is not None and not args.lazy:
        _wait_for_exit(int(state.get("pid") or 0))
    runtime.remove_state(mountpoint)
    return 0


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + UNMOUNT_WAIT_SECONDS
    while runtime.pid_alive(pid):
        if time.monotonic() > deadline:
            raise ConfigError(f"unmounted, but the daemon (pid {pid}) has not exited yet")
        time.sleep(0.05)


