"""``s3datafs prefetch URI|--snapshot FILE``: warm the block cache for a dataset before a job.

It pins the dataset exactly as ``mount`` would (``pinning.pin``: same options, same catalog; from
S3 or from a snapshot file), then reads every object through the same ``BlockReader`` a mount
uses, so the blocks it stores are the ones the mount will look for. A zip dataset is warmed as
the archive object itself: a mount keeps members on disk as the archive's own blocks
(``archive.spans.ArchiveBlocks``), so those are what it stores, with no member inflated or held in
memory (warming member by member peaked at 343 MiB for a 346 MiB zip); its member index is stored
as a mount would store it. Then its bzip2 and LZMA members over 1 MiB are decompressed into the
cache (``MemberSource.keep``, ``KEEPING`` at a time), as a mount does at a random read: a job's
first reads of them are disk reads too, not a wait for a whole decompression, which is paid
here instead (``bench/zip_random.py --prefetch``, a 128 MiB member, 200 random 64 KiB reads
after prefetch: bzip2 6.2-16.4 s before, 0.24-0.38 s now, for a prefetch of 10-18 s, not 0.7 s;
LZMA 3.2-3.3 s, 0.18-0.21 s, 3.6-4.1 s and 0.6 s; a sequential reader gains too: bzip2 decodes
~19 MB/s). Only as many as fit beside the archive in the cache's bound (more would evict the
archive's own blocks); deflate members are not (only a random reader gains: a mount keeps them
at its first such read). A line of its own shows that step's progress, member by member. Up
to ``PARALLEL_OBJECTS`` objects are warmed at once, each with an even share of
``PARALLEL_RUNS`` request-sized GETs in flight, at least 2 (``_warm_all``), so the bytes in
flight are bounded by the reader's request size times 16. On a terminal a progress line
shows bytes, rate and ETA; otherwise only the final summary is printed.

Failures: an object S3 will not serve for reasons of its own (``OBJECTS_OWN``: archived, gone,
denied) is a warning, and the others are warmed; the summary then counts it and the command
fails (``_Failures``). Anything else stops the run with its own one-line error, out of the
nurseries' exception groups (``errors.first_ours``): never an "internal error".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

from .. import config, logsetup, pinning, s3source
from ..archive.index import archive_catalog
from ..archive.members import MemberSource
from ..cache.disk import DiskCache
from ..catalog import Catalog
from ..errors import (
    AccessDeniedError,
    ArchiveError,
    ConfigError,
    NotFoundError,
    S3DataFSError,
    S3RequestError,
    StaleObjectError,
    UsageError,
    first_ours,
)
from ..keptcatalogs import KeptCatalogs
from ..model import MemberRef, PinnedRef
from ..reader import BlockReader
from ..units import counted, human_size
from . import mount as mount_command

PARALLEL_OBJECTS = 8
PARALLEL_RUNS = 8  # request-sized GETs in flight in all: a mount's readahead budget (64M) of them
KEEPING = 2  # members decompressed into the cache at once: a core each (a mount allows 4)
# Errors of one object (archived, deleted since it was pinned, denied, refused by the store):
# the others are warmed all the same. Anything else (S3 not answering, the cache's disk) would
# be every object's: it stops the run.
OBJECTS_OWN = (StaleObjectError, NotFoundError, AccessDeniedError, S3RequestError)

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prefetch", help="warm the block cache for a dataset")
    parser.add_argument("uri", nargs="?", help="s3://bucket/prefix/, s3://bucket/key or s3://bucket")
    mount_command.add_source_options(parser)
    parser.add_argument("--snapshot", type=Path, metavar="FILE", help="warm what this file pins")
    parser.add_argument("--archive", metavar="MODE",
                        help="a single zip object: auto, zip or file, as for mount; its bytes "
                        "are warmed either way, and shown as members, their index too")
    mount_command.add_cache_options(parser)
    mount_command.hide_options(parser, "name", "data_root", "prefetch_files")  # nothing is mounted
    parser.set_defaults(
        handler=run,
        mountpoint=None,
        uid="0",
        gid="0",
        file_mode="0444",
        dir_mode="0555",
        allow_other=False,
        foreground=True,
        log_file=None,
    )


def run(args: argparse.Namespace) -> int:
    plan = mount_command.build_plan(args, mounting=False)
    logsetup.setup(debug=False, verbose=False, log_file=None, secrets=plan.s3.secrets())
    if plan.disk_cache_bytes <= 0:
        raise UsageError("prefetch fills the disk cache: --no-cache and --cache-size 0 defeat it")
    s3source.check_settings(plan.s3)
    config.prepare_cache_dir(plan.cache_dir)
    source = s3source.S3Source(plan.s3)
    started = time.monotonic()
    with pinning.scratch_catalog(plan.cache_dir) as catalog_path:
        pinning.pin(
            source,
            catalog_path,
            uri=plan.uri,
            pins=plan.pins,
            as_of=plan.as_of,
            snapshot=plan.snapshot,
            kept=KeptCatalogs(plan.cache_dir, plan.disk_cache_bytes),  # the job's mount uses it
        )
        disk = DiskCache(
            plan.cache_dir,
            block_size=plan.block_size,
            capacity=plan.disk_cache_bytes,
            min_free_ratio=plan.cache_min_free,
            dataset=str(plan.uri),
        )
        disk.sync()  # what other mounts cached: it counts towards the bound, and may make room
        reader = BlockReader(
            source,
            block_size=plan.block_size,
            memory_cache_bytes=plan.memory_cache_bytes,
            s3_limiter=trio.CapacityLimiter(plan.s3.max_connections),
            disk=disk,
        )
        with contextlib.ExitStack() as closing:
            catalog = closing.enter_context(contextlib.closing(Catalog.open(catalog_path)))
            pinning.check_fingerprint(catalog.meta, plan.expect_fingerprint)
            members = archive_catalog(source, catalog, plan.archive, plan.cache_dir)
            if members is None:
                count, total = catalog.meta.object_count, catalog.meta.total_bytes
                refs, warmed, stored = catalog.objects(), count, total
            else:
                closing.callback(members.close)
                archive = members.meta.archive
                count, total = members.meta.object_count, members.meta.total_bytes
                refs, warmed, stored = iter([archive]), 1, archive.size
            if stored > plan.disk_cache_bytes:
                raise ConfigError(
                    f"{plan.uri} takes {human_size(stored)}, more than the cache holds "
                    f"(--cache-size {human_size(plan.disk_cache_bytes)}): raise --cache-size")
            progress, failures = _Progress(stored), _Failures()
            try:
                trio.run(_warm_all, reader, refs, warmed, progress, failures)
            except BaseExceptionGroup as group:  # what stopped it, from inside the nurseries
                progress.finish()
                if group.subgroup(KeyboardInterrupt) is not None:  # Ctrl-C
                    raise KeyboardInterrupt from None
                raise first_ours(group) or group from None
            progress.finish()
            if members is not None and failures.first is not None:
                raise failures.first  # the archive itself: nothing of it was warmed
            kept = (0, 0) if members is None else _keep_decompressed(
                source, disk, members.files(), room=disk.capacity - stored)
    failed = reader.counters()["cache_write_errors"]
    if failed:
        raise ConfigError(f"{failed} runs of {plan.uri} could not be written to the cache (see "
                          "above): it is not warm")
    elapsed = time.monotonic() - started
    what = counted(count, "object" if members is None else "member")
    if failures.count and members is None:
        what, total = f"{count - failures.count} of {what}", failures.warmed_bytes
    archived = "" if members is None else f" (an archive of {human_size(stored)})"
    decompressed = "" if not kept[0] else (
        f"; {counted(kept[0], 'member')} kept decompressed ({human_size(kept[1])})")
    print(
        f"s3datafs: prefetched {what} of {plan.uri}, "
        f"{human_size(total)}{archived} in {elapsed:.1f}s "
        f"({human_size(reader.counters()['s3_bytes'])} from S3){decompressed}"
    )
    if failures.count:
        raise S3RequestError(f"{failures.count} of {counted(warmed, 'object')} of {plan.uri} "
                             "could not be prefetched (see above); the rest are in the cache")
    return 0


class _Failures:
    """Objects that could not be warmed for reasons of their own (``OBJECTS_OWN``): each is
    one warning (the first ``SHOWN``), and the run goes on with the others - unless it looks
    like every object's trouble, when the run stops rather than ask S3 for each of the rest:
    - the first ``SHOWN`` all failed, with none warmed (a policy without s3:GetObject);
    - ``SHOWN`` in a row were refused (``AccessDeniedError``) after others were warmed: the keys
      expired or were revoked midway, or their policy changed. Objects archived or deleted since
      the pin come in runs of their own (a lifecycle rule, a removed folder): one of them, like
      a warmed object, ends a run of refusals.
    """

    SHOWN = 20

    def __init__(self) -> None:
        self.count = self.warmed = self.warmed_bytes = 0
        self.refused_in_a_row = 0
        self.first: S3DataFSError | None = None

    def done(self, size: int) -> None:
        self.warmed += 1
        self.warmed_bytes += size
        self.refused_in_a_row = 0

    def add(self, error: S3DataFSError) -> None:
        self.count += 1
        self.first = self.first or error
        if self.count <= self.SHOWN:
            log.warning("not prefetched: %s", error)
        elif self.count == self.SHOWN + 1:
            log.warning("not prefetched: more objects; only the first %d are named", self.SHOWN)
        if self.count >= self.SHOWN and not self.warmed:
            raise S3RequestError(f"the first {self.count} objects could not be prefetched, and "
                                 "none could: giving up (see above)")
        refused = isinstance(error, AccessDeniedError)
        self.refused_in_a_row = self.refused_in_a_row + 1 if refused else 0
        if self.refused_in_a_row >= self.SHOWN:
            raise AccessDeniedError(
                f"S3 refused the last {self.refused_in_a_row} objects in a row, after "
                f"{counted(self.warmed, 'object')} had been prefetched: the credentials may have "
                f"expired or been revoked, or their policy changed; giving up: "
                f"prefetch again with valid credentials (what is warm stays in the cache)")


def _keep_decompressed(
    source: s3source.S3Source, disk: DiskCache, members: Iterator[PinnedRef], room: int
) -> tuple[int, int]:
    """Decompress the archive's bzip2 and LZMA members into the cache (``MemberSource.keep``),
    ``KEEPING`` at a time, as many as ``room`` holds in archive order; (count, bytes) kept.

    The archive's blocks are on disk by now: no GET. A bad member is one warning (its reads in
    a mount fail as they would have), and the rest go on.
    """
    unzip = MemberSource(source, disk=disk)
    wanted: list[MemberRef] = []
    for ref in members:
        if isinstance(ref, MemberRef) and unzip.keeps_ahead(ref):
            if ref.size > room:
                break
            wanted.append(ref)
            room -= ref.size
    pool = ThreadPoolExecutor(KEEPING, thread_name_prefix="s3datafs-keep")
    # Its own line: seconds to minutes of CPU (bzip2 decodes ~19 MB/s) after the download's line
    # has ended, a member's size counted once it is done.
    progress = _Progress(sum(ref.size for ref in wanted), "decompressing") if wanted else None
    done: list[bool] = []
    try:
        for ref, ok in zip(wanted, pool.map(functools.partial(_keep_one, unzip), wanted),
                           strict=True):
            done.append(ok)
            if progress is not None:
                progress.advance(ref.size)
    finally:
        unzip.close()  # first: on Ctrl-C, decompressions under way stop at their next piece
        pool.shutdown(cancel_futures=True)
        if progress is not None:
            progress.finish()
    kept = [ref for ref, ok in zip(wanted, done, strict=True) if ok]
    return len(kept), sum(ref.size for ref in kept)


def _keep_one(unzip: MemberSource, ref: MemberRef) -> bool:
    try:
        return unzip.keep(ref)
    except ArchiveError as exc:
        log.warning("%s; not kept decompressed", exc)
        return False


async def _warm_all(
    reader: BlockReader, refs: Iterator[PinnedRef], count: int, progress: _Progress,
    failures: _Failures,
) -> None:
    """Warm the ``count`` objects of ``refs``, ``PARALLEL_OBJECTS`` at a time, each with an even
    share of ``PARALLEL_RUNS`` GETs in flight, at least 2: one large object (a zip's archive)
    gets them all, as a mount's readahead would (with 2 it warmed at 140 MB/s over links of
    100 MB/s per connection). Returns once the writes are on disk."""
    at_once = max(1, min(count, PARALLEL_OBJECTS))
    slots = trio.Semaphore(at_once)
    runs_each = max(2, PARALLEL_RUNS // at_once)
    async with trio.open_nursery() as background:
        reader.attach(background)
        async with trio.open_nursery() as workers:
            for ref in refs:
                await slots.acquire()
                workers.start_soon(_warm_one, reader, ref, runs_each, slots, progress, failures)


async def _warm_one(
    reader: BlockReader, ref: PinnedRef, runs: int, slots: trio.Semaphore, progress: _Progress,
    failures: _Failures,
) -> None:
    try:
        await reader.warm(ref, parallel=runs, loaded=progress.advance)
        failures.done(ref.size)
    except BaseExceptionGroup as group:  # from the object's own runs
        own, other = group.split(OBJECTS_OWN)
        if other is not None or own is None:
            raise
        failures.add(first_ours(own))
    finally:
        slots.release()


class _Progress:
    """A progress line on a terminal (bytes, rate, ETA), silent otherwise; ``what`` leads it."""

    def __init__(self, total: int, what: str = "prefetch") -> None:
        self._total, self._done, self._what = total, 0, what
        self._started = self._shown = time.monotonic()
        self._tty = sys.stderr.isatty()

    def advance(self, size: int) -> None:
        self._done += size
        now = time.monotonic()
        if self._tty and now - self._shown >= 0.2:
            self._shown = now
            rate = self._done / max(now - self._started, 1e-6)
            eta = (self._total - self._done) / rate if rate else 0
            percent = 100 * self._done / self._total if self._total else 100
            sys.stderr.write(
                f"\r{self._what}: {human_size(self._done)} / {human_size(self._total)} "
                f"({percent:.0f}%) {human_size(int(rate))}/s ETA {eta:.0f}s   "
            )
            sys.stderr.flush()

    def finish(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
