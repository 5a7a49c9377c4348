"""The ``s3datafs`` command: argv in, exit status out.

Conventions (those of mount tools): usage errors print one line and exit 2; every other failure
prints one line ``s3datafs: <problem>: <what to do>`` and exits 1; no traceback unless ``--debug``.
``mount`` returns only when the mount is usable (exit 0) or has failed with nothing left mounted.
Secrets are never taken from argv: keys come from the environment, a profile or a 0600
``--credentials-file``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__, config, daemon, logsetup, runtime, s3source
from .errors import ConfigError, S3DataFSError, UsageError
from .fuse_ops import FsSettings
from .model import normalize_etag
from .mount import MountPlan, mount_dataset
from .resolve import Pins
from .s3source import S3Settings
from .uri import dataset_name, parse_s3_uri, validate_name

UNMOUNT_WAIT_SECONDS = 30.0


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (and exit 2), as the CLI promises."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="s3datafs", description="Mount pinned S3 datasets read-only.")
    parser.add_argument("--version", action="version", version=f"s3datafs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_mount(commands.add_parser("mount", help="mount an S3 object or prefix, pinned"))
    unmount = commands.add_parser("unmount", aliases=["umount"], help="unmount and wait")
    unmount.add_argument("mountpoint", type=Path)
    unmount.add_argument("--lazy", action="store_true", help="detach now even if busy")
    status = commands.add_parser("status", help="list active s3datafs mounts")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _add_mount(mount: argparse.ArgumentParser) -> None:
    mount.add_argument("uri", help="s3://bucket, s3://bucket/prefix/ or s3://bucket/key")
    mount.add_argument("mountpoint", nargs="?", type=Path, help="default: DATA_ROOT/NAME")
    what = mount.add_argument_group("what to mount")
    what.add_argument("--name", help="dataset name (default: from the URI, e.g. mnist.zip→mnist)")
    what.add_argument("--data-root", type=Path, help="root of default mount points (/data)")
    what.add_argument("--version-id", help="pin this version of a single object")
    what.add_argument("--etag", help="require this ETag of a single object (quotes optional)")
    s3 = mount.add_argument_group("S3 access")
    s3.add_argument("--region")
    s3.add_argument("--endpoint-url", help="S3-compatible endpoint (also AWS_ENDPOINT_URL)")
    s3.add_argument("--profile", help="AWS profile from the shared config files")
    s3.add_argument("--no-sign-request", action="store_true", help="anonymous (public bucket)")
    s3.add_argument("--credentials-file", type=Path, help="AWS-style credentials file, mode 0600")
    fs = mount.add_argument_group("filesystem")
    fs.add_argument("--uid", default=str(os.getuid()), help="owner of every entry")
    fs.add_argument("--gid", default=str(os.getgid()), help="group of every entry")
    fs.add_argument("--file-mode", default="0444", help="permission bits of files")
    fs.add_argument("--dir-mode", default="0555", help="permission bits of directories")
    fs.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    fs.add_argument("--cache-dir", type=Path, help="where catalogs and cache blocks live")
    run = mount.add_argument_group("process")
    run.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    run.add_argument("--log-file", type=Path, help="daemon log (default: LOG_DIR/NAME.log)")
    run.add_argument("-v", "--verbose", action="store_true", help="log progress")
    run.add_argument("--debug", action="store_true", help="log everything, show tracebacks")


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        handler = {"mount": cmd_mount, "unmount": cmd_unmount, "umount": cmd_unmount}
        return handler.get(args.command, cmd_status)(args)
    except S3DataFSError as exc:
        print(f"s3datafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"s3datafs: internal error: {exc!r} (run with --debug for details)", file=sys.stderr)
        return 1


# -- mount ---------------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace) -> MountPlan:
    """Validate everything that needs no network; the mount point is checked last."""
    uri = parse_s3_uri(args.uri)
    name = validate_name(args.name if args.name is not None else dataset_name(uri))
    if args.mountpoint is not None:
        mountpoint = args.mountpoint
    else:
        mountpoint = (args.data_root or config.default_data_root()) / name
    fs = FsSettings(
        uid=config.parse_id(args.uid, "--uid"),
        gid=config.parse_id(args.gid, "--gid"),
        file_mode=config.parse_mode(args.file_mode, "--file-mode"),
        dir_mode=config.parse_mode(args.dir_mode, "--dir-mode"),
    )
    pins = Pins(args.version_id, normalize_etag(args.etag) if args.etag is not None else None)
    default_log = None if args.foreground else config.default_log_dir() / f"{name}.log"
    log_file = args.log_file or default_log
    return MountPlan(
        uri=uri,
        name=name,
        mountpoint=Path(os.path.abspath(mountpoint)),
        pins=pins,
        s3=_s3_settings(args),
        fs=fs,
        cache_dir=args.cache_dir or config.default_cache_dir(),
        block_size=config.DEFAULT_BLOCK_SIZE,
        memory_cache_bytes=config.DEFAULT_MEMORY_CACHE,
        allow_other=args.allow_other,
        log_file=log_file,
    )


def _s3_settings(args: argparse.Namespace) -> S3Settings:
    if args.no_sign_request and args.credentials_file:
        raise UsageError("--no-sign-request and --credentials-file contradict each other")
    keys = {}
    if args.credentials_file is not None:
        credentials = config.read_credentials_file(args.credentials_file, args.profile)
        keys = {
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key,
            "session_token": credentials.session_token,
        }
    endpoint = (
        args.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    profile = None if args.credentials_file is not None else args.profile
    return S3Settings(
        region=args.region,
        endpoint_url=endpoint or None,
        profile=profile,
        no_sign_request=args.no_sign_request,
        **keys,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    logsetup.setup(
        debug=args.debug, verbose=args.verbose, log_file=plan.log_file, secrets=plan.s3.secrets()
    )
    s3source.check_settings(plan.s3)
    config.prepare_cache_dir(plan.cache_dir)
    created = config.prepare_mountpoint(plan.mountpoint)
    try:
        if args.foreground:
            mount_dataset(plan, lambda summary: _announce(plan, summary.as_dict()))
            return 0
        hint = f"see {plan.log_file}" if plan.log_file else "run with --foreground to see why"
        verdict = daemon.spawn(
            lambda report: mount_dataset(plan, lambda summary: report(summary.as_dict())),
            log_hint=hint,
        )
    except BaseException:
        config.remove_created(plan.mountpoint, created)
        raise
    if not verdict["ok"]:
        config.remove_created(plan.mountpoint, created)
        print(f"s3datafs: {verdict['error']}", file=sys.stderr)
        return int(verdict.get("exit", 1))
    _announce(plan, verdict)
    return 0


def _announce(plan: MountPlan, summary: dict) -> None:
    skipped = summary.get("skipped_count", 0)
    note = f", {skipped} unsafe keys skipped" if skipped else ""
    print(
        f"s3datafs: mounted {plan.uri} at {plan.mountpoint} "
        f"({summary['object_count']} objects, {_human(summary['total_bytes'])}{note})",
        flush=True,
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- unmount -------------------------------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
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


# -- status --------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    states = {state.get("mountpoint"): state for state in runtime.all_states()}
    rows = []
    for entry in runtime.our_mounts():
        state = states.get(entry.mountpoint, {})
        pid = state.get("pid")
        alive = runtime.pid_alive(pid)
        rows.append(
            {
                "mountpoint": entry.mountpoint,
                "uri": state.get("uri", entry.source),
                "object_count": state.get("object_count"),
                "total_bytes": state.get("total_bytes"),
                "pid": pid,
                "state": "mounted" if alive else "dead: run s3datafs unmount",
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no s3datafs mounts")
        return 0
    table = [("MOUNTPOINT", "URI", "OBJECTS", "SIZE", "PID", "STATE")]
    for row in rows:
        size = _human(row["total_bytes"]) if row["total_bytes"] is not None else "?"
        count = row["object_count"] if row["object_count"] is not None else "?"
        table.append(
            (row["mountpoint"], row["uri"], str(count), size, str(row["pid"] or "?"), row["state"])
        )
    widths = [max(len(line[column]) for line in table) for column in range(5)]
    for line in table:
        left = [cell.ljust(width) for cell, width in zip(line[:2], widths[:2], strict=True)]
        right = [cell.rjust(width) for cell, width in zip(line[2:5], widths[2:], strict=True)]
        print("  ".join([*left, *right, line[5]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
