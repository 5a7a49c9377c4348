"""``s3datafs mount``: validate everything locally, then fork a daemon that resolves and serves.

The options are shared with the commands that mount several datasets at once: they call
``add_mount_options`` and ``build_plan`` too, so every mount is described the same way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from .. import config, daemon, logsetup, s3source
from ..errors import MountFailed, UsageError
from ..fuse_ops import FsSettings
from ..model import normalize_etag
from ..mount import MountPlan, mount_dataset
from ..resolve import Pins
from ..s3source import S3Settings
from ..units import human_size
from ..uri import dataset_name, parse_s3_uri, validate_name


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("mount", help="mount an S3 object or prefix, pinned")
    parser.add_argument("uri", help="s3://bucket, s3://bucket/prefix/ or s3://bucket/key")
    parser.add_argument("mountpoint", nargs="?", type=Path, help="default: DATA_ROOT/NAME")
    add_mount_options(parser)
    parser.set_defaults(handler=run)


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """Every option of a mount except the URI and mount point."""
    add_source_options(parser)
    add_filesystem_options(parser)
    add_process_options(parser)


def add_source_options(mount: argparse.ArgumentParser) -> None:
    """What to mount and how to reach S3: also what resolving a dataset without mounting needs."""
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


def add_filesystem_options(mount: argparse.ArgumentParser) -> None:
    fs = mount.add_argument_group("filesystem")
    fs.add_argument("--uid", default=str(os.getuid()), help="owner of every entry")
    fs.add_argument("--gid", default=str(os.getgid()), help="group of every entry")
    fs.add_argument("--file-mode", default="0444", help="permission bits of files")
    fs.add_argument("--dir-mode", default="0555", help="permission bits of directories")
    fs.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    fs.add_argument("--cache-dir", type=Path, help="where catalogs and cache blocks live")


def add_process_options(mount: argparse.ArgumentParser) -> None:
    process = mount.add_argument_group("process")
    process.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    process.add_argument("--log-file", type=Path, help="daemon log (default: LOG_DIR/NAME.log)")
    process.add_argument("-v", "--verbose", action="store_true", help="log progress")
    process.add_argument("--debug", action="store_true", help="log everything, show tracebacks")


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


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    logsetup.setup(
        debug=args.debug, verbose=args.verbose, log_file=plan.log_file, secrets=plan.s3.secrets()
    )
    if args.foreground:
        start_mount(plan, foreground=True, on_ready=lambda summary: _announce(plan, summary))
    else:
        _announce(plan, start_mount(plan, foreground=False))
    return 0


def start_mount(
    plan: MountPlan, *, foreground: bool, on_ready: Callable[[dict], None] | None = None
) -> dict:
    """Mount ``plan``; return the daemon's summary once the mount is usable.

    In the background (the default) the mount runs in a forked daemon and this returns as soon as
    it is ready; in the foreground it serves in this process and returns only after unmount
    (``on_ready`` is called when it is usable). On failure it raises, having removed any mount
    point directory it created; nothing is left mounted.
    """
    s3source.check_settings(plan.s3)
    config.prepare_cache_dir(plan.cache_dir)
    created = config.prepare_mountpoint(plan.mountpoint)
    try:
        if foreground:
            ready = on_ready or (lambda _summary: None)
            mount_dataset(plan, lambda summary: ready(summary.as_dict()))
            return {}
        hint = f"see {plan.log_file}" if plan.log_file else "run with --foreground to see why"
        verdict = daemon.spawn(
            lambda report: mount_dataset(plan, lambda summary: report(summary.as_dict())),
            log_hint=hint,
        )
        if not verdict["ok"]:
            raise MountFailed(verdict["error"], int(verdict.get("exit", 1)))
    except BaseException:
        config.remove_created(plan.mountpoint, created)
        raise
    return verdict


def _announce(plan: MountPlan, summary: dict) -> None:
    skipped = summary.get("skipped_count", 0)
    note = f", {skipped} unsafe keys skipped" if skipped else ""
    print(
        f"s3datafs: mounted {plan.uri} at {plan.mountpoint} "
        f"({summary['object_count']} objects, {human_size(summary['total_bytes'])}{note})",
        flush=True,
    )
