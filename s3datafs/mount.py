"""Lifecycle of one mount: pyfuse3 init, the trio main loop, signals, and an always-complete close.

Before anything is mounted the dataset is pinned into a catalog (``pinning.pin``: from S3, or
from a ``--snapshot`` file), checked against ``--expect-fingerprint`` and, with
``--save-snapshot``, written down; a zip single object is then swapped for the catalog of its
members (``archive.index``). A failure in any of these leaves nothing mounted.

Order (and why):
1. ``pyfuse3.init`` mounts; from here on the kernel may queue requests.
2. ``on_ready`` runs (the daemon tells its parent, or systemd, that the mount is usable). Requests
   that arrived in between simply wait for the loop.
3. ``trio.run`` serves requests until the mount is unmounted from outside (``fusermount3 -u``)
   or a SIGTERM/SIGINT/SIGHUP arrives, which asks pyfuse3 to terminate. Either way the requests
   still in progress are abandoned (``Operations.abandon_requests``; an unmount is seen as the
   kernel ending the connection, see ``connection``): pyfuse3 returns only once every handler
   has, and a read waiting on an unreachable S3 would hold the daemon for ``--read-timeout``.
4. ``pyfuse3.close(unmount=True)`` always runs, so a failure anywhere after step 1 leaves nothing
   mounted.
Background tasks belong to the nursery opened here; nothing else starts tasks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import pyfuse3
import trio

from . import config, connection, logsetup, pinning, runtime
from .archive.index import archive_catalog
from .archive.members import MemberSource
from .cache.disk import DiskCache
from .catalog import Catalog
from .daemon import PARENT_GONE
from .errors import ConfigError
from .fuse_ops import FsSettings, Operations
from .keptcatalogs import KeptCatalogs, kept_files
from .linkrate import LinkRate
from .model import ObjectSource
from .pid1 import STOP_SIGNALS
from .reader import BlockReader, ByteBudget
from .resolve import Pins
from .s3source import S3Settings, S3Source
from .snapshot import write_snapshot
from .units import counted, human_size
from .uri import S3Uri, mount_table_source

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's mallopt parameter number
_COMM_BYTES = 15  # TASK_COMM_LEN less its NUL
STATS_INTERVAL = 2.0  # seconds between refreshes of the counters in the state file
KERNEL_BACKGROUND = 64  # readahead requests the kernel may send at once (above the S3 pool's 32)
FUSECTL = "/sys/fs/fuse/connections"
# A disk that refuses the catalogs' writes: full, over quota, read-only.
_DISK_TROUBLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


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
    disk_cache_bytes: int = config.DEFAULT_DISK_CACHE
    cache_min_free: float = config.DEFAULT_CACHE_MIN_FREE
    max_prefetch_bytes: int = config.DEFAULT_MAX_PREFETCH
    as_of: float | None = None  # --as-of: the dataset as it was then (epoch seconds)
    snapshot: Path | None = None  # --snapshot: mount what this file lists (absolute; no LIST)
    save_snapshot: Path | None = None  # --save-snapshot: write what was pinned (absolute)
    expect_fingerprint: str | None = None  # refuse to mount other data
    archive: str = "auto"  # --archive: a zip single object as its members (auto) or as a file
    noexec: bool = False  # --noexec (fstab noexec; mount(8) adds it for user mounts)
    # The command line's options as given (argparse dest -> value; no secret is ever an
    # option): kept in the state file, so that a remount can tell which options it changes.
    options: dict[str, str | int | float | bool | None] = field(default_factory=dict)


@dataclass(frozen=True)
class MountSummary:
    object_count: int
    total_bytes: int
    skipped_count: int
    pid: int
    fingerprint: str = ""

    def as_dict(self) -> dict[str, int | str]:
        return dict(vars(self))


def mount_dataset(
    plan: MountPlan, on_ready: Callable[[MountSummary], None], created: Path | None = None
) -> None:
    """Resolve, pin, catalog and serve ``plan`` until unmounted; ``on_ready`` once it is usable.

    ``created``: the highest directory made for the mount point, recorded in the state file so
    that ``unmount`` of a mount whose daemon was killed removes it as the daemon would have."""
    _check_fuse_device()  # before S3 is asked anything: a container without FUSE fails at once
    _limit_malloc_arenas()
    _name_process(plan.name)
    source = S3Source(plan.s3)
    catalogs = plan.cache_dir / "catalogs"
    catalog_path = catalogs / f"{runtime.state_path(str(plan.mountpoint)).stem}-{os.getpid()}.db"
    try:
        with _writing_catalogs(plan.cache_dir):
            catalogs.mkdir(parents=True, exist_ok=True, mode=0o700)
            _sweep_dead_catalogs(catalogs)
            built = pinning.pin(
                source, catalog_path, uri=plan.uri, pins=plan.pins, as_of=plan.as_of,
                snapshot=plan.snapshot, kept=KeptCatalogs(plan.cache_dir, plan.disk_cache_bytes),
            )
        with contextlib.ExitStack() as closing:
            pinned = closing.enter_context(contextlib.closing(Catalog.open(catalog_path)))
            # Damage met while serving: the copy kept for the next mount goes (``Catalog``).
            pinned.on_damage = lambda: pinned.remove_copies(kept_files(plan.cache_dir))
            pinning.check_fingerprint(pinned.meta, plan.expect_fingerprint)
            if plan.save_snapshot is not None:
                write_snapshot(pinned, plan.save_snapshot, name=plan.name)
            # A zip single object is mounted as its members, from its persistent member catalog.
            with _writing_catalogs(plan.cache_dir):
                members = archive_catalog(source, pinned, plan.archive, plan.cache_dir)
            catalog = pinned if members is None else closing.enter_context(
                contextlib.closing(members))
            if members is not None:
                members.on_damage = lambda: members.remove_copies([members.path])
            summary = MountSummary(
                catalog.meta.object_count, catalog.meta.total_bytes,
                built.skipped_count + (members.meta.skipped_count if members else 0),
                os.getpid(), catalog.meta.fingerprint,
            )
            disk = _disk_cache(plan)
            # A zip's spans are its readahead: --max-prefetch-memory bounds them too.
            members_source = closing.enter_context(contextlib.closing(
                MemberSource(source, disk=disk, span_memory=plan.max_prefetch_bytes)))
            reader = _reader(plan, members_source, disk, source.link)
            operations = Operations(catalog, reader, plan.fs)
            options = fuse_options(fsname=mount_table_source(plan.uri),
                                   allow_other=plan.allow_other, noexec=plan.noexec)

            state = _state(plan, summary, created)

            def ready() -> None:
                runtime.write_state(str(plan.mountpoint), state)
                # The log's first word on this mount: which data, where, pinned how.
                log.info("mounted %s at %s: %s, %s, fingerprint %s%s",
                         plan.uri, plan.mountpoint, counted(summary.object_count, "object"),
                         human_size(summary.total_bytes), summary.fingerprint or "-",
                         f", endpoint {plan.s3.endpoint_url}" if plan.s3.endpoint_url else "")
                on_ready(summary)

            def start(tasks: trio.Nursery, writes: trio.Nursery) -> None:
                reader.attach(tasks, writes)
                initialized = trio.Event()
                operations.on_init = initialized.set
                tasks.start_soon(tune_kernel_readahead, plan.mountpoint, initialized,
                                 plan.fs.kernel_readahead)
                if disk is not None:  # learn what others cached; evict down to the bound
                    tasks.start_soon(  # a scan that fails is said, and tried again later
                        partial(trio.to_thread.run_sync, disk.try_sync, abandon_on_cancel=True)
                    )
                tasks.start_soon(_publish_stats, plan.mountpoint, state, operations)

            try:
                serve(operations, plan.mountpoint, options, ready, start)
            finally:
                if runtime.owns_state(str(plan.mountpoint), os.getpid()):
                    runtime.remove_state(str(plan.mountpoint))
    finally:
        try:
            catalog_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a cache dir gone read-only: the next mount sweeps the file
            log.info("cannot remove the catalog %s: %s", catalog_path, exc.strerror)


def _limit_malloc_arenas() -> None:
    """Keep glibc to two malloc arenas in the daemon (must run before worker threads start).

    glibc gives threads their own arenas (up to eight per core) and keeps what is freed in them;
    the GET worker threads each pass megabytes through, so the daemon's RSS settled far above what
    it used. Measured on the CI-sized load test: 228 MiB settled RSS with the default, 195 MiB
    with two arenas (same as ``MALLOC_ARENA_MAX=2``, which cannot be set after the process starts).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)


def _name_process(dataset: str) -> None:
    """Name the serving process ``s3datafs/<dataset>``, before worker threads (which inherit it).

    The daemons of one ``mount-all`` or ``run`` share a command line; their names tell them apart
    in ``top``, ``ps -o comm`` and ``pgrep s3datafs``. The kernel keeps 15 bytes of a name.
    """
    name = f"s3datafs/{dataset}".encode()[:_COMM_BYTES].decode(errors="ignore")
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "w") as comm:
        comm.write(name)


def _disk_cache(plan: MountPlan) -> DiskCache | None:
    if plan.disk_cache_bytes <= 0:
        return None
    return DiskCache(
        plan.cache_dir,
        block_size=plan.block_size,
        capacity=plan.disk_cache_bytes,
        min_free_ratio=plan.cache_min_free,
        dataset=str(plan.uri),
    )


def _reader(
    plan: MountPlan, source: ObjectSource, disk: DiskCache | None, link: LinkRate
) -> BlockReader:
    return BlockReader(
        source,
        block_size=plan.block_size,
        memory_cache_bytes=plan.memory_cache_bytes,
        s3_limiter=trio.CapacityLimiter(plan.s3.max_connections),
        disk=disk,
        prefetch_budget=ByteBudget(plan.max_prefetch_bytes),
        read_timeout=plan.s3.read_deadline,  # --read-timeout: the hard bound of every read
        link=link,  # on a slow link, reads a reader waits for are split in two GETs
    )


async def _publish_stats(mountpoint: Path, state: dict, operations: Operations) -> None:
    """Refresh the counters in the state file (``state``, as the mount wrote it when it became
    ready) so ``s3datafs status`` can show them; log how many
    failures were held back (``failurelog``); reopen a log file rotated away, so that a stack
    dump (SIGUSR1) goes to the new one even when nothing was logged since."""
    told = False
    while True:
        await trio.sleep(STATS_INTERVAL)
        operations.failures.flush()
        logsetup.follow_rotation()
        refreshed = {**state, "stats": operations.counters()}
        try:
            await trio.to_thread.run_sync(_refresh_state, str(mountpoint), refreshed)
        except (OSError, ConfigError) as exc:  # the counters are not worth the mount
            if not told:
                log.warning("cannot refresh the counters in the state file: %s", exc)
                told = True


def _refresh_state(mountpoint: str, state: dict) -> None:
    """Write the state file, unless it is another mount's now (``runtime.owns_state``)."""
    if runtime.owns_state(mountpoint, os.getpid()):
        runtime.write_state(mountpoint, state)


async def tune_kernel_readahead(
    mountpoint: Path, initialized: trio.Event, readahead: int = config.DEFAULT_KERNEL_READAHEAD
) -> None:
    """Let the kernel read ahead ``readahead`` bytes (``--kernel-readahead``, 1 MiB by
    default; FUSE's own is 128 KiB).

    Larger kernel readahead means fewer, larger FUSE reads (1 MiB instead of 128 KiB) for
    sequential readers. It is set through the mount's backing device in sysfs, and only after the
    kernel's INIT has been answered: that answer clamps it back to 128 KiB. The device comes from
    the mount table (a stat() of the mount point could wait on this very daemon). Only root may
    change it: a failure is logged at debug level for the default, as a warning for a value
    asked for, and otherwise ignored (the mount works with FUSE's 128 KiB).

    No sleep and no thread (a sysfs write is instant): this task wakes only after the INIT handler
    has returned, and libfuse writes INIT's reply in that same step (the kernel applies it within
    the write), so the value is set before the loop handles another request. A file opened right
    after the mount is reported ready (readahead is fixed at open) then reads ahead 1 MiB too.
    """
    await initialized.wait()
    device = _device_at(mountpoint)
    knob = f"/sys/class/bdi/{device}/read_ahead_kb" if device else None
    try:
        if knob is None:
            raise OSError(f"{mountpoint} is not in the mount table")
        Path(knob).write_text(str(readahead // 1024), encoding="ascii")  # noqa: ASYNC240
    except OSError as exc:  # said if asked for (--kernel-readahead): else FUSE's 128K is fine
        level = logging.DEBUG if readahead == config.DEFAULT_KERNEL_READAHEAD else logging.WARNING
        log.log(level, "kernel readahead left as it is (--kernel-readahead not applied): %s", exc)
    if device:  # in a thread: where fusectl is not mounted, this runs a command
        await trio.to_thread.run_sync(_tune_background, device.partition(":")[2])


def _tune_background(connection: str) -> None:
    """Let the kernel send ``KERNEL_BACKGROUND`` read requests at once (FUSE's default: 12).

    Past its limit the kernel holds further requests back: 8 threads of random 64 KiB reads
    went 17 % faster with 64 (bench/RESULTS.md, session 22), and with more readers than that
    on a stalled S3, a read could wait for another's whole ``--read-timeout`` before its own
    began. Set through fusectl (``/sys/fs/fuse/connections``), as root. systemd mounts fusectl;
    where nobody did (a container, a host without systemd), it is mounted for the moment in a
    private mount namespace of its own (``unshare``), so no mount table shows it: the knobs
    belong to the connection, not to a namespace. Where neither works, the default stays
    (logged at debug level).
    """
    values = {"max_background": KERNEL_BACKGROUND,
              "congestion_threshold": KERNEL_BACKGROUND * 3 // 4}
    knobs = Path(FUSECTL) / connection
    try:
        if knobs.is_dir():  # fusectl is mounted (writing takes root)
            for name, value in values.items():
                (knobs / name).write_text(str(value), encoding="ascii")
            return
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise OSError("fusectl is not mounted, and mounting it takes root and unshare")
        script = ('mount -t fusectl fusectl "$0" && cd "$0/$1" && echo "$2" > max_background'
                  ' && echo "$3" > congestion_threshold')
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, FUSECTL,
             connection, *map(str, values.values())],
            capture_output=True, text=True, timeout=10, check=False,
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip() or f"unshare exited {done.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("FUSE background requests left as they are: %s", exc)


def _state(plan: MountPlan, summary: MountSummary, created: Path | None) -> dict:
    return {
        "mountpoint": str(plan.mountpoint),
        "created": str(created) if created else None,
        "uri": str(plan.uri),
        "name": plan.name,
        "log_file": str(plan.log_file) if plan.log_file else None,
        "mounted_at": time.time(),
        "options": plan.options,
        **summary.as_dict(),
    }


def _sweep_dead_catalogs(directory: Path) -> None:
    """Remove catalogs left by daemons that died without cleaning up (the pid ends the name)."""
    for path in directory.glob("*-*.db"):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not runtime.pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


_SERVING_SIGNALS = (*STOP_SIGNALS, PARENT_GONE)


_FUSE_DEVICE = "/dev/fuse"
_FUSE_HELP = ("FUSE must be usable here: install fuse3 (Debian: apt-get install fuse3), and run a "
              "container with --device /dev/fuse --cap-add SYS_ADMIN")
# libfuse's reasons that no install or container flag mends: what does, instead.
_FUSE_REMEDIES = (
    ("user_allow_other", "add user_allow_other to /etc/fuse.conf, or mount without --allow-other"),
    ("failed to open /dev/fuse: Permission denied",
     "this user may not open /dev/fuse: mount as root, or give the user access to the device"),
    ("fusermount3: mount failed: Operation not permitted",
     "fusermount3 must be setuid root for a mount by another user than root (as Debian's fuse3 "
     "installs it), or mount as root"),
)


def _fuse_remedy(reason: str) -> str:
    return next((remedy for said, remedy in _FUSE_REMEDIES if said in reason), _FUSE_HELP)


@contextlib.contextmanager
def _stderr_to(file: IO[bytes]) -> Iterator[None]:
    """Point file descriptor 2 at ``file`` meanwhile (what C code prints goes there too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_fuse_device() -> None:
    try:
        fd = os.open(_FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        remedy = _fuse_remedy(f"failed to open {_FUSE_DEVICE}: {exc.strerror}")
        raise ConfigError(f"cannot open {_FUSE_DEVICE} ({exc.strerror}): {remedy}") from None
    try:
        is_device = stat.S_ISCHR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not is_device:
        raise ConfigError(f"cannot open {_FUSE_DEVICE} (not a device): {_FUSE_HELP}")


def fuse_options(*, fsname: str, allow_other: bool, noexec: bool = False) -> set[str]:
    """Mount options: read-only, kernel permission checks, our type name, noatime, and optional
    allow_other and noexec."""
    options = {"ro", "default_permissions", "subtype=s3datafs", f"fsname={fsname}", "noatime"}
    if allow_other:
        options.add("allow_other")
    if noexec:
        options.add("noexec")
    return options


def serve(
    operations: Operations,
    mountpoint: Path,
    options: Iterable[str],
    on_ready: Callable[[], None],
    start: Callable[[trio.Nursery, trio.Nursery], None] = lambda tasks, writes: None,
) -> None:
    """Mount, report ready, serve until unmounted or signalled, then always unmount.

    ``start(tasks, writes)`` receives the two nurseries background work belongs to: ``tasks`` is
    cancelled when the mount ends; ``writes`` (cache write-behind) is drained first, so a remount
    right after finds everything that was read.
    """
    others = connection.fuse_descriptors()
    # From the kernel mount until the loop's signal receiver is in place, and again from the
    # loop's end until the unmount, a stop signal would kill the process and leave a dead mount:
    # it waits, blocked, for the receiver, or for the unmount to be done.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SERVING_SIGNALS)
    try:
        _init(operations, mountpoint, options)
        try:
            ours = connection.fuse_descriptors() - others
            device = _device_at(mountpoint)
            on_ready()
            trio.run(_main_loop, operations, ours, mountpoint, device, start)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _SERVING_SIGNALS)
            _stop_signals_moot()
            # libfuse unmounts by path: that takes off whatever is mounted on top of ours.
            covered = _covered_by(mountpoint, device)
            if covered:
                log.warning("a %s file system is mounted over %s: it is left as it is, and this "
                            "mount dead below it", covered, mountpoint)
            pyfuse3.close(unmount=not covered)
            log.info("unmounted %s", mountpoint)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SERVING_SIGNALS)


def _stop_signals_moot() -> None:
    """From the serving loop's end on, a stop signal changes nothing: the mount is ending.

    The main thread blocks them again, but trio's worker threads, started once the loop's
    signal receiver was in place, do not; one of them taking a stop signal ran its default
    action (the receiver's end put it back), which ended the process before the unmount and
    left a dead mount (a review). A handler of ours makes it a no-op in any thread.
    """
    for signum in _SERVING_SIGNALS:
        signal.signal(signum, _ending_anyway)


def _ending_anyway(signum: int, _frame: object) -> None:
    log.debug("%s while the mount ends: nothing more to do", signal.Signals(signum).name)


def _device_at(mountpoint: Path) -> str | None:
    """The device ("major:minor") of the topmost mount at ``mountpoint``, from the mount table
    (a stat() of the mount point could wait on this very daemon)."""
    devices = [e.device for e in runtime.mount_table() if e.mountpoint == str(mountpoint)]
    return devices[-1] if devices else None


def _covered_by(mountpoint: Path, device: str | None) -> str | None:
    """The type of the file system mounted over this mount (``device``), if any."""
    entries = [e for e in runtime.mount_table() if e.mountpoint == str(mountpoint)]
    ours = [index for index, entry in enumerate(entries) if entry.device == device]
    if not ours or ours[-1] == len(entries) - 1:
        return None
    return entries[-1].fstype


@contextlib.contextmanager
def _writing_catalogs(cache_dir: Path) -> Iterator[None]:
    """The dataset's catalogs are written under the cache directory: a full or read-only disk
    there is the user's to fix, said in one line (was "internal error: OperationalError")."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _DISK_TROUBLE:
            raise
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(
            f"cannot write the dataset's catalog under {cache_dir} ({reason}): free space "
            "there, or choose another --cache-dir"
        ) from None


def _init(operations: Operations, mountpoint: Path, options: Iterable[str]) -> None:
    """``pyfuse3.init``; its failure as one line with libfuse's own reason.

    The reason is caught in a memory file: a temporary file needs a writable /tmp, which a
    container with a read-only root has not.
    """
    with open(os.memfd_create("s3datafs-libfuse-said", os.MFD_CLOEXEC), "w+b") as said:
        try:
            with _stderr_to(said):  # libfuse writes its reason there itself
                pyfuse3.init(operations, str(mountpoint), set(options))
        except RuntimeError as exc:  # pyfuse3 says no more than "fuse_session_mount failed"
            said.seek(0)
            reason = " ".join(said.read().decode(errors="replace").split()) or str(exc)
            if not os.path.lexists(mountpoint):  # not FUSE's fault: removed meanwhile
                raise ConfigError(f"cannot mount {mountpoint}: it was removed while mounting "
                                  "(by another process?): try again") from None
            raise ConfigError(
                f"cannot mount {mountpoint} ({reason}): {_fuse_remedy(reason)}") from None


async def _main_loop(
    operations: Operations,
    session_fds: set[int],
    mountpoint: Path,
    device: str | None,
    start: Callable[[trio.Nursery, trio.Nursery], None],
) -> None:
    async with trio.open_nursery() as writes, trio.open_nursery() as tasks:
        start(tasks, writes)
        tasks.start_soon(_terminate_on_signal, operations, mountpoint, device)
        if len(session_fds) == 1:
            tasks.start_soon(_abandon_requests_when_disconnected, operations, *session_fds)
        else:  # not expected; an unmount then waits for requests in progress, as before
            log.warning("cannot tell which /dev/fuse descriptor is this mount's: %s", session_fds)
        await pyfuse3.main()
        tasks.cancel_scope.cancel()


async def _abandon_requests_when_disconnected(operations: Operations, session_fd: int) -> None:
    """Once the kernel ends the connection (unmounted), drop the requests still in progress."""
    await connection.wait_disconnected(session_fd)
    # Every unmount ends the connection: worth a line only when requests were waiting.
    if abandoned := operations.abandon_requests():
        log.info("the kernel ended the connection: %s in progress abandoned",
                 counted(abandoned, "request"))


async def _terminate_on_signal(operations: Operations, mountpoint: Path,
                               device: str | None) -> None:
    """Unmount on a stop signal, or on ``PARENT_GONE`` (see ``daemon``) unless the mount was
    detached already (``run`` does that when a leftover process keeps a file open: those files
    are served to the end) or is covered by another (what to do is the user's to say)."""
    with trio.open_signal_receiver(*_SERVING_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SERVING_SIGNALS)  # blocked since the mount
        async for signum in signals:
            if signum != PARENT_GONE:
                log.info("received %s: unmounting", signal.Signals(signum).name)
            elif not any(entry.device == device for entry in runtime.mount_table()):
                log.info("the command that mounted this is gone; the mount was detached "
                         "already: serving the files still open")
                continue
            elif covered := _covered_by(mountpoint, device):
                log.warning("the command that mounted this is gone, but a %s file system is "
                            "mounted over %s: left mounted", covered, mountpoint)
                continue
            else:
                log.warning("the command that mounted this (s3datafs run, or mount-all "
                            "before all its datasets were mounted) is gone: unmounting")
            operations.abandon_requests()
            pyfuse3.terminate()
            return
