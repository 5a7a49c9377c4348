"""``s3datafs mount``: validate everything locally, then fork a daemon that resolves and serves.

The options are shared with the commands that mount several datasets at once: they call
``add_mount_options`` and ``build_plan`` too, so every mount is described the same way;
``add_source_options`` (what to pin and how to reach S3) is also what ``snapshot`` takes.

``mount --snapshot FILE [MOUNTPOINT]``: the URI positional is optional, and a lone positional
that is not an ``s3://`` URI is the mount point. The file's header is read (and checked) here,
before the fork, for the URI and the default name; the daemon verifies the whole file. Paths
(``--snapshot``, ``--save-snapshot``, ``--cache-dir``, ``--log-file``, and the directories the
environment names) are made absolute here: the daemon runs in ``/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import (
    config,
    daemon,
    logsetup,
    pid1,
    pinning,
    runtime,
    s3source,
    sdnotify,
    snapshot,
    startup,
)
from ..archive.index import parse_archive_mode
from ..errors import ConfigError, MountFailed, S3DataFSError, SettingError, UsageError
from ..model import normalize_etag
from ..mounting import mount_dataset
from ..plan import FsSettings, MountPlan, MountSummary
from ..resolve import Pins
from ..s3source import S3Settings
from ..units import counted, human_size, parse_percent, parse_size
from ..uri import dataset_name, parse_s3_uri, validate_name

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("mount", help="mount an S3 object or prefix, pinned")
    parser.add_argument(
        "uri", nargs="?", help="s3://bucket, s3://bucket/prefix/ or s3://bucket/key "
        "(none with --snapshot: the file names it)"
    )
    parser.add_argument("mountpoint", nargs="?", type=Path, help="default: DATA_ROOT/NAME")
    add_mount_options(parser)
    parser.set_defaults(handler=run, fast_start=True)  # startup.settle() once mounted


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """Every option of a mount except the URI and mount point."""
    add_source_options(parser)
    add_snapshot_file_options(parser)
    add_filesystem_options(parser)
    add_process_options(parser)


def hide_options(parser: argparse.ArgumentParser, *attributes: str) -> None:
    """Leave options (by attribute) that a command shares with ``mount`` but has no use for out
    of its ``--help``; they are still accepted, so one set of options serves every command."""
    for action in parser._actions:  # argparse's one way to reach options once added
        if action.dest in attributes:
            action.help = argparse.SUPPRESS


def add_source_options(mount: argparse.ArgumentParser) -> None:
    """What to mount and how to reach S3: also what resolving a dataset without mounting needs."""
    what = mount.add_argument_group("what to mount")
    what.add_argument("--name", help="dataset name (default: from the URI, e.g. mnist.zip→mnist)")
    what.add_argument("--data-root", type=Path,
                      help="root of default mount points (/data; env S3DATAFS_DATA_ROOT)")
    what.add_argument("--version-id", help="pin this version of a single object")
    what.add_argument("--etag", help="require this ETag of a single object (quotes optional)")
    what.add_argument("--as-of", metavar="TIME", help="as it was at TIME (versioned buckets): "
                      "ISO 8601, naive = UTC, or a time ago: 90s, 30m, 12h, 7d, 2w")
    what.add_argument("--expect-fingerprint", metavar="F",
                      help="refuse unless the data has this fingerprint")
    add_s3_access_options(mount)


def add_s3_access_options(mount: argparse.ArgumentParser) -> None:
    """How to reach S3 (credentials, endpoint, region)."""
    s3 = mount.add_argument_group("S3 access")
    s3.add_argument("--region", help="the bucket's region (default: AWS_REGION or the profile's)")
    s3.add_argument("--endpoint-url",
                    help="S3-compatible endpoint (also AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)")
    s3.add_argument("--profile", help="AWS profile from the shared config files")
    s3.add_argument("--no-sign-request", action="store_true", help="anonymous (public bucket)")
    s3.add_argument("--requester-pays", action="store_true",
                    help="a Requester Pays bucket: requests are billed to the credentials used")
    s3.add_argument("--credentials-file", type=Path,
                    help="AWS-style credentials file only its owner may change, and only its "
                    "owner and group read (0600, 0400, 0640 or 0440)")
    s3.add_argument(
        "--read-timeout",
        metavar="SECONDS",
        help=f"most time one read of object data may take, retries included; then EIO "
        f"(default {S3Settings.read_deadline:g})",
    )


def add_snapshot_file_options(mount: argparse.ArgumentParser) -> None:
    files = mount.add_argument_group("snapshot files")
    files.add_argument("--snapshot", type=Path, metavar="FILE",
                       help="mount exactly what FILE lists (no listing; URI and name from FILE)")
    files.add_argument("--save-snapshot", type=Path, metavar="FILE",
                       help="write what this mount pinned to FILE")


def add_filesystem_options(mount: argparse.ArgumentParser) -> None:
    fs = mount.add_argument_group("filesystem")
    fs.add_argument("--uid", default=str(os.getuid()), help="owner of every entry (default: yours)")
    fs.add_argument("--gid", default=str(os.getgid()), help="group of every entry (default: yours)")
    fs.add_argument("--file-mode", default="0444", help="permission bits of files (default 0444)")
    fs.add_argument("--dir-mode", default="0555",
                    help="permission bits of directories (default 0555)")
    fs.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    fs.add_argument("--noexec", action="store_true", help="no file of the mount may be executed")
    fs.add_argument("--kernel-readahead", metavar="SIZE",
                    help="how far the kernel reads ahead of a reader, and around each page "
                    "fault of a mapped file (default 1M; 128K for random reads through mmap: "
                    "LMDB, numpy.memmap, fancy indexing; 0 sends every read in 4K pieces; at "
                    "most 16M)")
    fs.add_argument("--archive", metavar="MODE", help="a single zip object: auto = show the "
                    "members of a .zip, or of one whose bytes are a zip unless its name is a "
                    "zip-based format (.pt, .npz, .jar, ...) (default); zip = always show the "
                    "members; file = show the object")
    add_cache_options(mount)


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    cache = parser.add_argument_group("cache")
    cache.add_argument("--cache-dir", type=Path, help="where catalogs and cache blocks live "
                       "(default /var/cache/s3datafs as root, else ~/.cache/s3datafs; "
                       "env S3DATAFS_CACHE_DIR)")
    cache.add_argument("--cache-size", help="bound of the disk cache, e.g. 20G (default 20G)")
    cache.add_argument("--cache-min-free", help="keep this much of the cache filesystem free (5%%)")
    cache.add_argument("--no-cache", action="store_true",
                       help="no block cache on disk (= --cache-size 0)")
    cache.add_argument("--block-size", help="cache block size (default 64K; a multiple "
                       "of 4K up to 64M, at most half of --memory-cache-size)")
    cache.add_argument("--memory-cache-size", help="in-memory block cache (default 32M)")
    cache.add_argument("--max-prefetch-memory",
                       help="readahead bytes in flight or not yet read (default 64M); a zip "
                       "mount keeps as much again of its archive's recent spans")
    cache.add_argument("--prefetch-files", metavar="N",
                       help="files fetched ahead of a directory read in order (default "
                       "32; 0: off; at most 1024)")


def add_process_options(mount: argparse.ArgumentParser) -> None:
    process = mount.add_argument_group("process")
    process.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    process.add_argument("--log-file", type=Path,
                         help="daemon log (default: LOG_DIR/NAME.log; - for standard error)")
    process.add_argument("-v", "--verbose", action="store_true", help="log progress")
    process.add_argument("--debug", action="store_true", help="log everything, show tracebacks")


def build_plan(args: argparse.Namespace, *, mounting: bool = True) -> MountPlan:
    """Validate everything that needs no network; the mount point is checked last.

    ``mounting=False`` (``prefetch``): nothing will be mounted, so neither the dataset's name
    nor a mount point is checked (a key too long to name a directory, or a symbolic link at
    the default mount point, must not stop a prefetch); the plan's mount point is then ``/``,
    which nothing reads."""
    snapshot_file = _absolute(getattr(args, "snapshot", None))
    if snapshot_file is not None:
        header, mountpoint_arg = _from_snapshot(args, snapshot_file)
        uri, default_name = parse_s3_uri(header.uri), header.name
    else:
        if args.uri is None:
            raise UsageError("the following arguments are required: uri (see 's3datafs mount "
                             "--help')")
        uri, mountpoint_arg = parse_s3_uri(args.uri), args.mountpoint
        default_name = dataset_name(uri)
    if mounting:
        name, mountpoint = _name_and_mountpoint(args, default_name, mountpoint_arg)
    else:
        name, mountpoint = args.name or default_name, Path("/")
    fs = FsSettings(
        uid=config.parse_id(args.uid, "--uid"),
        gid=config.parse_id(args.gid, "--gid"),
        file_mode=config.parse_mode(args.file_mode, "--file-mode"),
        dir_mode=config.parse_mode(args.dir_mode, "--dir-mode"),
        prefetch_files=config.parse_prefetch_files(args.prefetch_files, "--prefetch-files"),
        kernel_readahead=_kernel_readahead(getattr(args, "kernel_readahead", None)),
    )
    pins, as_of = source_pins(args)
    default_log = None if args.foreground else config.default_log_dir() / f"{name}.log"
    log_file = (logsetup.STDERR if args.log_file == logsetup.STDERR
                else _absolute(args.log_file) or default_log)
    return MountPlan(
        uri=uri,
        name=name,
        # As the kernel's mount table will name it: /data may be a symlink to a larger disk.
        mountpoint=Path(os.path.realpath(mountpoint)),
        pins=pins,
        s3=_s3_settings(args),
        fs=fs,
        cache_dir=_absolute(args.cache_dir) or config.default_cache_dir(),
        **cache_settings(args),
        allow_other=args.allow_other,
        noexec=getattr(args, "noexec", False),
        log_file=log_file,
        as_of=as_of,
        snapshot=snapshot_file,
        save_snapshot=writable_file(getattr(args, "save_snapshot", None), "--save-snapshot"),
        expect_fingerprint=pinning.parse_expected(getattr(args, "expect_fingerprint", None)),
        archive=parse_archive_mode(getattr(args, "archive", None)),
        options={dest: value for dest, value in vars(args).items()
                 if isinstance(value, str | int | float | bool | None)},
    )


def _name_and_mountpoint(
    args: argparse.Namespace, default_name: str, mountpoint_arg: Path | None
) -> tuple[str, Path]:
    name = validate_name(args.name if args.name is not None else default_name)
    if mountpoint_arg is not None:
        return name, mountpoint_arg
    mountpoint = (args.data_root or config.default_data_root()) / name
    # os.path.islink: Path.is_symlink raises on a dead mount, whose own line comes later.
    if os.path.islink(mountpoint):  # whoever may write the data root chose where it points
        raise ConfigError(
            f"{mountpoint} is a symbolic link: give the mount point itself as MOUNTPOINT, "
            "or remove the link"
        )
    return name, mountpoint


def source_pins(args: argparse.Namespace) -> tuple[Pins, float | None]:
    """``--version-id``/``--etag`` pins and the ``--as-of`` time, checked against each other."""
    pins = Pins(args.version_id, normalize_etag(args.etag) if args.etag is not None else None)
    text = getattr(args, "as_of", None)
    if text is None:
        return pins, None
    if pins.version_id is not None:
        raise UsageError("--as-of and --version-id both choose a version: give only one")
    return pins, config.parse_as_of(text, time.time())


def _from_snapshot(args: argparse.Namespace, path: Path) -> tuple[snapshot.Header, Path | None]:
    """The snapshot's header, and the mount point given (``mount --snapshot FILE [MOUNTPOINT]``)."""
    for attribute, option in (("version_id", "--version-id"), ("etag", "--etag"),
                              ("as_of", "--as-of")):
        if getattr(args, attribute, None) is not None:
            raise UsageError(f"--snapshot already pins every object: drop {option}")
    header = snapshot.read_header(path)
    positional, mountpoint = args.uri, args.mountpoint
    if positional is not None and positional.startswith("s3://"):
        if parse_s3_uri(positional) != parse_s3_uri(header.uri):
            raise UsageError(f"snapshot {path} records {header.uri}, not {positional}")
    elif positional is not None:
        if mountpoint is not None:
            raise UsageError("with --snapshot, give only the MOUNTPOINT (the file names the URI)")
        mountpoint = Path(positional)
    return header, mountpoint


def writable_file(path: Path | None, option: str) -> Path | None:
    """``path`` made absolute (the daemon runs in /), if a file can be created there; a
    symbolic link is followed to the file it names, which the snapshot replaces."""
    if path is not None and str(path) == "-":  # a file named "-" is never what was meant
        raise UsageError(f"{option} -: snapshot files are written to files only: name one")
    target = _absolute(path)
    if target is None:
        return None
    if target.is_dir():
        raise ConfigError(f"{option} {target} is a directory: name a file")
    # The file is replaced whole (a temporary file renamed over it): over /dev/null, or the
    # /dev/stdout link, that would leave a regular file there, for every process as root.
    if target.exists() and not target.is_file():
        raise ConfigError(f"{option} {target} is not a regular file (a device, a FIFO or a "
                          "socket): the snapshot replaces FILE whole, so name a file")
    # A link's file is what is replaced, not the link: replacing the link /dev/stdout (stdout
    # redirected to a file) made it a regular file, and the redirected file stayed empty.
    target = Path(os.path.realpath(target))
    if not target.parent.is_dir():
        raise ConfigError(f"{option} {target}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {target}: directory {target.parent} is not writable")
    return target


def _kernel_readahead(text: str | None) -> int:
    """``--kernel-readahead``: 0 to 16M, in whole 4K pages (the kernel counts KiB and pages)."""
    if text is None:
        return FsSettings.kernel_readahead
    size = parse_size(text, "--kernel-readahead")
    if not 0 <= size <= config.MAX_KERNEL_READAHEAD or size % 4096:
        raise SettingError("--kernel-readahead", text, "must be a multiple of 4K from 0 to 16M, "
                           "such as 1M (the default) or 128K")
    return size


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(path))


def cache_settings(args: argparse.Namespace) -> dict:
    """The cache fields of a ``MountPlan`` from the cache options, with their defaults."""

    def size(value: str | None, option: str, default: int) -> int:
        return default if value is None else parse_size(value, option)

    block_size = size(args.block_size, "--block-size", config.DEFAULT_BLOCK_SIZE)
    if not 4096 <= block_size <= 64 * 1024 * 1024 or block_size % 4096:
        raise UsageError("--block-size must be a multiple of 4K between 4K and 64M")
    memory = size(args.memory_cache_size, "--memory-cache-size", config.DEFAULT_MEMORY_CACHE)
    if memory < 2 * block_size:  # a block read in pieces is served from memory, piece by piece
        raise UsageError(
            f"--memory-cache-size must hold two blocks of --block-size ({human_size(block_size)})"
            f", at least {human_size(2 * block_size)} (reads smaller than a block would each "
            "fetch it whole): raise --memory-cache-size, or choose a smaller --block-size"
        )
    disk = size(args.cache_size, "--cache-size", config.DEFAULT_DISK_CACHE)
    if 0 < disk < block_size and not args.no_cache:  # would hold nothing, yet evict the rest
        raise UsageError(
            f"--cache-size {args.cache_size} holds not one block of --block-size "
            f"({human_size(block_size)}): give at least that, or 0 (--no-cache) for no disk cache"
        )
    min_free = config.DEFAULT_CACHE_MIN_FREE
    if args.cache_min_free is not None:
        min_free = parse_percent(args.cache_min_free, "--cache-min-free")
    return {
        "block_size": block_size,
        "memory_cache_bytes": memory,
        "disk_cache_bytes": 0 if args.no_cache else disk,
        "cache_min_free": min_free,
        "max_prefetch_bytes": max(
            block_size,
            size(args.max_prefetch_memory, "--max-prefetch-memory", config.DEFAULT_MAX_PREFETCH),
        ),
    }


def s3_settings(args: argparse.Namespace) -> S3Settings:
    """How to reach S3, from the S3 access options (shared with snapshot and diff)."""
    return _s3_settings(args)


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
            # read again while mounted: it may hold temporary keys that an agent renews
            "credentials_file": os.path.abspath(args.credentials_file),
            "credentials_section": args.profile,
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
        requester_pays=args.requester_pays,
        read_deadline=_read_timeout(getattr(args, "read_timeout", None)),
        **keys,
    )


MAX_READ_TIMEOUT = 24 * 3600.0


def _read_timeout(text: str | None) -> float:
    """``--read-timeout``: seconds (``30``, ``2.5``, ``30s``), above 0 and at most a day."""
    if text is None:
        return S3Settings.read_deadline
    try:
        seconds = float(text.strip().removesuffix("s"))
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_READ_TIMEOUT:  # also refuses nan
        raise UsageError(
            f"--read-timeout {text!r} is not a number of seconds above 0 (at most "
            f"{MAX_READ_TIMEOUT:g}), such as 30"
        )
    return seconds


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    logsetup.setup(
        debug=args.debug,
        verbose=args.verbose,
        log_file=plan.log_file,
        secrets=plan.s3.secrets(),
        cache_dir=plan.cache_dir,
    )
    if args.foreground:
        start_mount(plan, foreground=True, on_ready=lambda summary: _announce(plan, summary))
    else:
        _announce(plan, start_mount(plan, foreground=False))
        startup.exit_soon()  # the daemon serves; this process only exits now
    return 0


def start_mount(
    plan: MountPlan,
    *,
    foreground: bool,
    on_ready: Callable[[dict], None] | None = None,
    outlive_command: bool = True,
    held: bool = False,
) -> dict:
    """Mount ``plan``; return the daemon's summary once the mount is usable.

    In the background (the default) the mount runs in a forked daemon and this returns as soon as
    it is ready; in the foreground it serves in this process and returns only after unmount
    (``on_ready`` is called when it is usable). On failure it raises, having removed any mount
    point directory it created; nothing is left mounted. ``outlive_command=False``: the daemon
    unmounts when this process dies, however it dies (see ``daemon``); ``held=True``: likewise
    until ``daemon.release`` lets it outlive this process.
    """
    plan = _without_root_knobs(plan)
    try:
        return _start_mount(plan, foreground, on_ready, outlive_command, held)
    except S3DataFSError as exc:  # the command says it on stderr; the log keeps it
        log.error("cannot mount %s at %s: %s", plan.uri, plan.mountpoint, exc,
                  extra=logsetup.FILE_ONLY)
        raise


def _without_root_knobs(plan: MountPlan) -> MountPlan:
    """``plan`` without a ``--kernel-readahead`` that only root may set (sysfs), said here, on
    the terminal: the daemon would find it out after the mount, in its log alone."""
    if os.geteuid() == 0 or plan.fs.kernel_readahead == FsSettings.kernel_readahead:
        return plan
    log.warning("--kernel-readahead is set through sysfs, which only root may write: the "
                "kernel reads ahead as it would without it")
    return dataclasses.replace(
        plan, fs=dataclasses.replace(plan.fs, kernel_readahead=FsSettings.kernel_readahead))


def _start_mount(
    plan: MountPlan,
    foreground: bool,
    on_ready: Callable[[dict], None] | None,
    outlive_command: bool,
    held: bool,
) -> dict:
    s3source.check_settings(plan.s3)
    config.prepare_cache_dir(plan.cache_dir)
    with runtime.mounting(str(plan.mountpoint)):
        created = config.prepare_mountpoint(plan.mountpoint)
        try:
            if foreground:
                _serve_in_foreground(plan, on_ready or (lambda _summary: None))
                config.remove_created(plan.mountpoint, created)  # unmounted: made for it, gone
                return {}
            hint = ("see its log above" if plan.log_file == logsetup.STDERR
                    else f"see {plan.log_file}" if plan.log_file
                    else "run with --foreground to see why")

            def serve_in_daemon(report: daemon.Report) -> None:
                try:
                    mount_dataset(plan, lambda summary: report(summary.as_dict()), created)
                finally:  # unmounted (or abandoned): what was made for the mount goes with it
                    # Under the lock, taken again: the command that took it is gone or done,
                    # and the next one may be preparing the very directory (it keeps it, if
                    # so). While this command still waits (a failed start) it holds the lock,
                    # and removes the directory itself.
                    with contextlib.suppress(ConfigError), runtime.mounting(str(plan.mountpoint)):
                        config.remove_created(plan.mountpoint, created)

            verdict = daemon.spawn(serve_in_daemon, log_hint=hint,
                                   outlive_command=outlive_command, held=held)
            if not verdict["ok"]:
                raise MountFailed(verdict["error"], int(verdict.get("exit", 1)))
        except BaseException:
            config.remove_created(plan.mountpoint, created)
            raise
    return verdict


def _serve_in_foreground(plan: MountPlan, on_ready: Callable[[dict], None]) -> None:
    """Serve in this process; tell the service manager (``NOTIFY_SOCKET``) when ready and done."""

    def ready(summary: MountSummary) -> None:
        startup.settle()
        on_ready(summary.as_dict())
        sdnotify.notify("READY=1", f"STATUS=serving {plan.uri} at {plan.mountpoint}")

    try:
        with _stop_signals_raise():
            mount_dataset(plan, ready)
    finally:
        sdnotify.notify("STOPPING=1")


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM or SIGHUP before serving (while pinning, say) ends the command like Ctrl-C does,
    through the cleanup that removes a mount point it created, instead of killing it outright;
    so does one ``pid1`` recorded before. (While serving, the loop's own receiver takes them
    and unmounts.)"""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if early := pid1.take():  # as a container's PID 1, asked to stop while it started
            stop(early[0], None)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _announce(plan: MountPlan, summary: dict) -> None:
    skipped = summary.get("skipped_count", 0)
    note = f", {counted(skipped, 'unsafe key')} skipped" if skipped else ""
    if plan.as_of is not None:
        note += f", as of {config.format_time(plan.as_of)}"
    if summary.get("fingerprint"):
        note += f", fingerprint {summary['fingerprint']}"
    objects = counted(summary["object_count"], "object")
    print(
        f"s3datafs: mounted {plan.uri} at {plan.mountpoint} "
        f"({objects}, {human_size(summary['total_bytes'])}{note})",
        flush=True,
    )
