"""Catalogs built from snapshot files, kept for the next mount of the same file.

A snapshot of a million keys takes ~15 s to check and build into a catalog (parsing, the
fingerprint twice, SQLite), and its catalog is ~160 MB. A job platform mounts one snapshot again
and again on a host (retries, sweeps, the next job of a series): the catalog built the first time
is kept under ``CACHE_DIR/catalogs/snapshots`` and the next mount of the same file uses it, in
milliseconds, with no parse. The one HEAD a snapshot mount sends (``pinning``) is still sent.

Invariants:
- **Identity.** A kept catalog is named by the sha256 of the snapshot file's bytes, the catalog
  format and the release (``__version__``): the same bytes give the same tree only under the same
  rules (key paths, markers, times), so another release builds and keeps its own. The file is
  hashed before and after its build; if it changed meanwhile nothing is kept.
- **Immutable, shared by hard links.** A catalog is never written after its build, and is opened
  read-only and immutable (``Catalog.open``), so a mount's own catalog path is made a hard link
  of the kept file: its removal at unmount leaves the kept one, and a kept file replaced or
  evicted while mounts use it stays readable by them (the inode lives on). Keeping is a link to a
  temporary name and a rename: no reader sees half a file.
- **Checked when used.** A kept catalog that cannot be opened, is of another format, or is not of
  this snapshot's dataset (URI, fingerprint, counts) is removed and the file built again. Damage
  deeper in the file, which a mount meets only when a name leads it there, is answered with EIO
  and the kept copy is removed then (``catalog``: ``on_damage``): the next mount builds it.
- **Bounded.** The kept catalogs of one cache directory take at most an eighth of
  ``--cache-size`` together, least recently used first out (a use touches the file); none is kept
  without a disk cache (``--no-cache``), nor one larger than the whole share. They are not
  counted in the block cache's bound: ``cache stats`` shows them on a line of their own and
  ``cache clear`` removes them (``cache clear URI`` those of datasets under that URI).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .catalog import FORMAT_VERSION, Catalog, CatalogError, CatalogSummary
from .errors import UsageError
from .model import ObjectRef
from .uri import S3Uri, parse_s3_uri

log = logging.getLogger(__name__)

SHARE_OF_CACHE = 8  # kept catalogs take at most 1/8 of --cache-size together
_SUFFIX = ".db"


@dataclass(frozen=True)
class Reused:
    """A kept catalog linked in place of a build: the totals and first file a build would give."""

    summary: CatalogSummary
    first_file: ObjectRef | None


def directory(cache_dir: Path) -> Path:
    return cache_dir / "catalogs" / "snapshots"


def snapshot_identity(snapshot: Path) -> str | None:
    """The name a catalog of ``snapshot`` is kept under; None if the file cannot be read (the
    build then says why, in its own words)."""
    digest = hashlib.sha256(f"{__version__}\0{FORMAT_VERSION}\0".encode())
    try:
        with open(snapshot, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class KeptCatalogs:
    """The kept catalogs of one cache directory (see the module docstring)."""

    def __init__(self, cache_dir: Path, cache_bytes: int) -> None:
        self._directory = directory(cache_dir)
        self._budget = cache_bytes // SHARE_OF_CACHE

    @property
    def enabled(self) -> bool:
        """Whether catalogs are kept at all (not with ``--no-cache``): else nothing is hashed."""
        return self._budget > 0

    def reuse(self, identity: str, catalog_path: Path, uri: str) -> Reused | None:
        """Link the catalog kept as ``identity`` at ``catalog_path``; None if none is usable."""
        kept = self._directory / f"{identity}{_SUFFIX}"
        try:
            with contextlib.suppress(FileNotFoundError):
                catalog_path.unlink()
            os.link(kept, catalog_path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # another filesystem, no links: built as before
            log.info("cannot use the kept catalog %s: %s", kept, exc.strerror or exc)
            return None
        try:
            with Catalog.open(catalog_path) as catalog:
                meta = catalog.meta
                if meta.uri != uri or meta.archive is not None:
                    raise CatalogError(f"kept catalog {kept} is of {meta.uri}, not {uri}")
                reused = Reused(
                    CatalogSummary(meta.object_count, meta.total_bytes, meta.dir_count,
                                   meta.skipped_count),
                    catalog.first_file(),
                )
        except (CatalogError, sqlite3.Error) as exc:  # damage past the meta table: the query's
            log.info("the kept catalog %s is not usable (%s): building it again", kept, exc)
            for path in (catalog_path, kept):
                with contextlib.suppress(OSError):
                    path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(kept)  # recently used: the last to be evicted
        log.info("catalog of the snapshot from %s: no parse", kept)
        return reused

    def keep(self, identity: str, catalog_path: Path) -> None:
        """Keep the catalog just built at ``catalog_path`` as ``identity``; evict down to the
        bound. Never fails the mount: a catalog that cannot be kept is built next time."""
        try:
            if catalog_path.stat().st_size > self._budget:
                log.info("the catalog %s is larger than the share of --cache-size kept for "
                         "catalogs (%d bytes): not kept", catalog_path, self._budget)
                return
            self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self._directory / f".keep-{os.getpid()}-{identity[:16]}.tmp"
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()  # this process's own, left by a keep that failed
            os.link(catalog_path, temporary)
            os.replace(temporary, self._directory / f"{identity}{_SUFFIX}")
            self._evict()
        except OSError as exc:
            log.info("cannot keep the catalog %s for the next mount: %s", catalog_path,
                     exc.strerror or exc)

    def _evict(self) -> None:
        """Remove the least recently used kept catalogs until the rest fit the bound."""
        kept = []
        for path in self._directory.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                kept.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept):
            if total <= self._budget:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
        self._sweep_temporaries()

    def _sweep_temporaries(self) -> None:
        """Temporary links of keeps that died between link and rename (an hour old)."""
        cutoff = time.time() - 3600
        for path in self._directory.glob(".keep-*.tmp"):
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    path.unlink()


@dataclass(frozen=True)
class KeptUsage:
    catalogs: int
    bytes: int


def kept_files(cache_dir: Path) -> list[Path]:
    """The kept catalogs' files (a catalog that meets damage removes its copy among them)."""
    return sorted(directory(cache_dir).glob(f"*{_SUFFIX}"))


def usage(cache_dir: Path) -> KeptUsage:
    """How many catalogs are kept, and their bytes (``cache stats``)."""
    count = size = 0
    for path in directory(cache_dir).glob(f"*{_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            size += path.stat().st_size
            count += 1
    return KeptUsage(count, size)


def clear(cache_dir: Path, under: S3Uri | None) -> int:
    """Remove the kept catalogs (of datasets under ``under`` only, when given); how many."""
    removed = 0
    for path in directory(cache_dir).glob(f"*{_SUFFIX}"):
        if under is not None and not _is_under(path, under):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def _is_under(path: Path, under: S3Uri) -> bool:
    """Whether the kept catalog's dataset and ``under`` share objects (or it cannot be told)."""
    try:
        with Catalog.open(path) as catalog:
            dataset = parse_s3_uri(catalog.meta.uri)
    except (CatalogError, UsageError):
        return True  # of no dataset we can tell: cleared with any
    return under.covers(dataset.bucket, dataset.key) or dataset.covers(under.bucket, under.key)
