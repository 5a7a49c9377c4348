"""Lifecycle of one mount: pyfuse3 init, the trio main loop, signals, and an always-complete close.

Order (and why):
1. ``pyfuse3.init`` mounts; from here on the kernel may queue requests.
2. ``on_ready`` runs (the daemon tells its parent, or systemd, that the mount is usable). Requests
   that arrived in between simply wait for the loop.
3. ``trio.run`` serves requests until the mount is unmounted from outside (``fusermount3 -u``)
   or a SIGTERM/SIGINT/SIGHUP arrives, which asks pyfuse3 to terminate.
4. ``pyfuse3.close(unmount=True)`` always runs, so a failure anywhere after step 1 leaves nothing
   mounted.
Background tasks belong to the nursery opened here; nothing else starts tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import runtime
from .catalog import Catalog, build_catalog
from .fuse_ops import FsSettings, Operations
from .reader import BlockReader
from .resolve import Pins, resolve
from .s3source import S3Settings, S3Source
from .uri import S3Uri

log = logging.getLogger(__name__)

_FSNAME_UNSAFE = frozenset(",\\ \t")  # option separators and escapes in the mount table


@dataclass(frozen=True)
class MountPlan:
    """Everything one mount needs, validated by the CLI before any network or fork."""

    uri: S3Uri
    name: str
    mountpoint: Path
    pins: Pins
    s3: S3Settings
    fs: FsSettings
    cache_dir: Path
    block_size: int
    memory_cache_bytes: int
    allow_other: bool
    log_file: Path | None


@dataclass(frozen=True)
class MountSummary:
    object_count: int
    total_bytes: int
    skipped_count: int
    pid: int

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def mount_dataset(plan: MountPlan, on_ready: Callable[[MountSummary], None]) -> None:
    """Resolve, pin, catalog and serve ``plan`` until unmounted; ``on_ready`` once it is usable."""
    source = S3Source(plan.s3)
    catalogs = plan.cache_dir / "catalogs"
    catalogs.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep_dead_catalogs(catalogs)
    catalog_path = catalogs / f"{runtime.state_path(str(plan.mountpoint)).stem}-{os.getpid()}.db"
    try:
        started = time.monotonic()
        resolution = resolve(source, plan.uri, plan.pins)
        built = build_catalog(
            catalog_path,
            resolution.refs,
            uri=str(plan.uri),
            bucket=plan.uri.bucket,
            prefix=resolution.prefix,
            versioned=resolution.versioned,
        )
        log.info("pinned %d objects in %.2fs", built.object_count, time.monotonic() - started)
        summary = MountSummary(
            built.object_count, built.total_bytes, built.skipped_count, os.getpid()
        )
        with contextlib.closing(Catalog.open(catalog_path)) as catalog:
            reader = BlockReader(
                source,
                block_size=plan.block_size,
                memory_cache_bytes=plan.memory_cache_bytes,
                limiter=trio.CapacityLimiter(plan.s3.max_connections),
            )
            operations = Operations(catalog, reader, plan.fs)
            options = fuse_options(fsname=_fsname(plan.uri), allow_other=plan.allow_other)

            def ready() -> None:
                runtime.write_state(str(plan.mountpoint), _state(plan, summary))
                on_ready(summary)

            try:
                serve(operations, plan.mountpoint, options, ready)
            finally:
                runtime.remove_state(str(plan.mountpoint))
    finally:
        with contextlib.suppress(FileNotFoundError):
            catalog_path.unlink()


def _state(plan: MountPlan, summary: MountSummary) -> dict:
    return {
        "mountpoint": str(plan.mountpoint),
        "uri": str(plan.uri),
        "name": plan.name,
        "log_file": str(plan.log_file) if plan.log_file else None,
        "mounted_at": time.time(),
        **summary.as_dict(),
    }


def _fsname(uri: S3Uri) -> str:
    """The mount table's source column: the URI, with characters that would break it escaped."""
    return "".join(
        f"%{ord(c):02X}" if c in _FSNAME_UNSAFE or not c.isprintable() else c for c in str(uri)
    )


def _sweep_dead_catalogs(directory: Path) -> None:
    """Remove catalogs left by daemons that died without cleaning up (the pid ends the name)."""
    for path in directory.glob("*-*.db"):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not runtime.pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fuse_options(*, fsname: str, allow_other: bool) -> set[str]:
    """Mount options: read-only, kernel permission checks, our type name, optional allow_other."""
    options = {"ro", "default_permissions", "subtype=s3datafs", f"fsname={fsname}", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


def serve(
    operations: pyfuse3.Operations,
    mountpoint: Path,
    options: Iterable[str],
    on_ready: Callable[[], None],
) -> None:
    """Mount, report ready, serve until unmounted or signalled, then always unmount."""
    pyfuse3.init(operations, str(mountpoint), set(options))
    try:
        on_ready()
        trio.run(_main_loop)
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)


async def _main_loop() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return
