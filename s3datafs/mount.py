"""Lifecycle of one mount: pyfuse3 init, the trio main loop, signals, and an always-complete close.

What is served is a catalog pinned and checked before (``mounting``, which imports this module
in a thread of its own while it waits on S3: ``serve_pinned`` is where it hands over).

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
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import IO

import pyfuse3
import trio

from . import config, connection, logsetup, runtime
from .archive.members import MemberSource
from .cache.disk import DiskCache
from .catalog import Catalog
from .daemon import PARENT_GONE
from .errors import ConfigError
from .fuse_ops import Operations
from .linkrate import LinkRate
from .model import ObjectSource
from .mounting import fuse_remedy
from .pid1 import STOP_SIGNALS
from .plan import MountPlan, MountSummary
from .reader import BlockReader, ByteBudget
from .s3source import S3Source
from .units import counted, human_size
from .uri import mount_table_source

log = logging.getLogger(__name__)

STATS_INTERVAL = 2.0  # seconds between refreshes of the counters in the state file
KERNEL_BACKGROUND = 64  # readahead requests the kernel may send at once (above the S3 pool's 32)
FUSECTL = "/sys/fs/fuse/connections"


def serve_pinned(
    plan: MountPlan, source: S3Source, catalog: Catalog, summary: MountSummary,
    on_ready: Callable[[MountSummary], None], created: Path | None,
    closing: contextlib.ExitStack,
) -> None:
    """Serve ``catalog`` (pinned and checked by ``mounting``) at the plan's mount point until it
    is unmounted; ``on_ready`` once it is usable. What must be closed goes on ``closing``.

    ``created``: the highest directory made for the mount point, recorded in the state file so
    that ``unmount`` of a mount whose daemon was killed removes it as the daemon would have."""
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


_SERVING_SIGNALS = (*STOP_SIGNALS, PARENT_GONE)


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


def fuse_options(*, fsname: str, allow_other: bool, noexec: bool = False) -> set[str]:
    """Mount options: read-only, kernel permission checks, our type name, noatime, nosuid and
    nodev, and optional allow_other and noexec. nosuid and nodev are libfuse's defaults too,
    asked for here all the same: a dataset is untrusted, and a zip member's mode may say setuid
    or device (shown as plain files, but the mount says so as well)."""
    options = {"ro", "default_permissions", "subtype=s3datafs", f"fsname={fsname}", "noatime",
               "nosuid", "nodev"}
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
                f"cannot mount {mountpoint} ({reason}): {fuse_remedy(reason)}") from None


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
