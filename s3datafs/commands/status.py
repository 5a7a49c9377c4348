"""``s3datafs status``: our mounts from the kernel's mount table, joined with their state files."""

from __future__ import annotations

import argparse
import errno
import json
import os

from .. import runtime
from ..config import MOUNT_ANSWER_SECONDS, statfs_errno
from ..units import counted, human_size
from ..uri import uri_of_mount_table_source


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="list active s3datafs mounts")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def _state_of(entry: runtime.MountEntry, state: dict | None, pid: object) -> str:
    """"mounted", "dead: ...", "not answering": a state file's daemon that is gone is dead;
    otherwise the mount itself is asked, with statfs (``config.statfs_errno``: not stat, which
    the kernel may answer from its cache after the daemon died; bounded in time, so a daemon
    that is stopped or stuck cannot hang status). Without a state file here, the mount is
    another user's or another runtime directory's. One in a directory this user may not enter
    (another user's 0700 temporary directory) cannot be asked: whose it is is said, not
    "Permission denied" (the kernel answers statfs itself, with success, for anyone but the
    user of a FUSE mount without ``allow_other``; root asks as that user)."""
    if state is not None and not runtime.pid_alive(pid):
        return "dead: run s3datafs unmount"
    code = statfs_errno(entry.mountpoint, as_owner=entry.owner_to_ask_as())
    if code is None:
        return f"not answering (for {MOUNT_ANSWER_SECONDS:g} s)"
    if code == 0:
        return "mounted" if state is not None else "mounted (not by this user or runtime directory)"
    if code == errno.ENOTCONN:
        return "dead: run s3datafs unmount"
    if code == errno.EACCES and entry.is_another_users():
        return f"mounted by uid {entry.mounted_by}, where you may not look"
    return f"unknown: {os.strerror(code)}"


def run(args: argparse.Namespace) -> int:
    found = runtime.all_states()
    states = {state.get("mountpoint"): state for state in found}
    mounts = runtime.our_mounts()
    runtime.remove_stale_states(found, {entry.mountpoint for entry in mounts})
    rows = []
    for entry in mounts:
        state = states.get(entry.mountpoint)
        pid = None if state is None else state.get("pid")
        rows.append(
            {
                "mountpoint": entry.mountpoint,
                "uri": (state or {}).get("uri", uri_of_mount_table_source(entry.source)),
                "object_count": (state or {}).get("object_count"),
                "total_bytes": (state or {}).get("total_bytes"),
                "fingerprint": (state or {}).get("fingerprint"),
                "stats": (state or {}).get("stats", {}),
                "pid": pid,
                "state": _state_of(entry, state, pid),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no s3datafs mounts")
        return 0
    table = [("MOUNTPOINT", "URI", "OBJECTS", "SIZE", "PID", "FINGERPRINT", "STATE")]
    for row in rows:
        size = human_size(row["total_bytes"]) if row["total_bytes"] is not None else "?"
        count = row["object_count"] if row["object_count"] is not None else "?"
        table.append(
            (row["mountpoint"], row["uri"], str(count), size, str(row["pid"] or "?"),
             row["fingerprint"] or "?", row["state"])
        )
    widths = [max(len(line[column]) for line in table) for column in range(6)]
    for line in table:
        left = [cell.ljust(width) for cell, width in zip(line[:2], widths[:2], strict=True)]
        right = [cell.rjust(width) for cell, width in zip(line[2:5], widths[2:5], strict=True)]
        print("  ".join([*left, *right, line[5].ljust(widths[5]), line[6]]))
    for row in rows:
        if row["stats"]:
            print(f"{row['mountpoint']}: {_counters(row['stats'])}")
    return 0


def _counters(stats: dict[str, int]) -> str:
    """One line of a mount's read counters (refreshed by the daemon every few seconds)."""
    line = (
        f"{stats.get('s3_requests', 0)} S3 requests, {human_size(stats.get('s3_bytes', 0))} "
        f"from S3, {human_size(stats.get('disk_bytes', 0))} from the disk cache; block hits: "
        f"{stats.get('memory_hits', 0)} memory, {stats.get('disk_hits', 0)} disk, "
        f"{stats.get('misses', 0)} misses; {human_size(stats.get('bytes_served', 0))} served"
    )
    if rate := stats.get("link_bytes_per_second", 0):  # GET bodies of GETs made nearly alone
        line += f"; a connection brings {human_size(rate)}/s"
        if split := stats.get("split_reads", 0):
            line += f", {split} reads split in two"
    if failed := stats.get("failed_reads", 0):
        line += f"; {counted(failed, 'read')} failed"
        if stale := stats.get("stale_reads", 0):
            line += f" ({stale} of objects changed or deleted after mount)"
    return line


