"""Pin a dataset into a catalog file: from S3 (resolve + list) or from a snapshot file.

The one place that decides where a catalog's objects come from; ``mount`` (in the daemon),
``snapshot`` and ``diff`` all call ``pin()``, so they apply the same rules and build the same
catalog (hence the same fingerprint) for the same data.

- From S3: ``resolve`` (with ``--version-id``/``--etag`` pins or ``--as-of``), the listing
  streamed into the catalog builder with a progress line on a terminal.
- From a snapshot: the file is verified while its catalog is built (``snapshot.load_snapshot``),
  with no listing at all. Then exactly one HEAD, of the first file the snapshot pins, checks that
  the pinned data is still there and that we may read it, so a dataset whose versions were
  deleted (or a wrong endpoint or credentials) fails before mounting rather than on first read.
  Only that one object is checked: any other pin that is gone shows up as ``ESTALE`` on read.
  A mount (and ``prefetch``) of a file whose catalog was built before uses that catalog, kept
  under the cache directory (``keptcatalogs``): no parse, and the same one HEAD.
- ``check_fingerprint`` refuses data whose fingerprint is not the expected one, naming both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from . import progress
from .catalog import CatalogMeta, CatalogSummary, build_catalog
from .errors import NotFoundError, PinMismatchError, UsageError
from .fingerprint import is_fingerprint
from .keptcatalogs import KeptCatalogs, snapshot_identity
from .model import ObjectRef, ObjectSource
from .resolve import Pins, head_version_or_current, resolve
from .snapshot import load_snapshot
from .units import counted
from .uri import S3Uri

log = logging.getLogger(__name__)


def pin(
    source: ObjectSource,
    catalog_path: Path,
    *,
    uri: S3Uri,
    pins: Pins | None = None,
    as_of: float | None = None,
    snapshot: Path | None = None,
    kept: KeptCatalogs | None = None,
) -> CatalogSummary:
    """Build the catalog at ``catalog_path`` from ``snapshot`` if given, else from S3.

    With ``kept``, a snapshot's catalog is the one kept from an earlier build of the same file
    when there is one (no parse), and one built is kept for the next (``keptcatalogs``).
    """
    started = time.monotonic()
    if snapshot is not None:
        summary, first_file = _from_snapshot(snapshot, catalog_path, str(uri), kept)
        if first_file is not None:
            check_still_there(source, first_file, snapshot)
    else:
        resolution = resolve(source, uri, pins or Pins(), as_of)
        summary = build_catalog(
            catalog_path,
            progress.counted(resolution.refs, "listing"),
            uri=str(uri),
            bucket=uri.bucket,
            prefix=resolution.prefix,
            versioned=resolution.versioned,
            single_object=resolution.single_object,
            as_of=resolution.as_of,
        )
    log.info("pinned %s in %.2fs", counted(summary.object_count, "object"),
             time.monotonic() - started)
    return summary


def _from_snapshot(
    snapshot: Path, catalog_path: Path, uri: str, kept: KeptCatalogs | None
) -> tuple[CatalogSummary, ObjectRef | None]:
    if kept is None or not kept.enabled or (identity := snapshot_identity(snapshot)) is None:
        loaded = load_snapshot(snapshot, catalog_path)
        return loaded.summary, loaded.first_file
    if (reused := kept.reuse(identity, catalog_path, uri)) is not None:
        return reused.summary, reused.first_file
    loaded = load_snapshot(snapshot, catalog_path)
    if snapshot_identity(snapshot) == identity:  # the file did not change while it was read
        kept.keep(identity, catalog_path)
    return loaded.summary, loaded.first_file


@contextlib.contextmanager
def scratch_catalog(cache_dir: Path) -> Iterator[Path]:
    """A catalog path in a private temporary directory under ``cache_dir/catalogs``, removed after.

    For commands that pin without mounting (``snapshot``, ``diff``): a million keys make a catalog
    of ~150 MB, which belongs in the cache directory, not in RAM or /tmp.
    """
    catalogs = cache_dir / "catalogs"
    catalogs.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=f"scratch-{os.getpid()}-", dir=catalogs) as scratch:
        yield Path(scratch) / "catalog.db"


def check_still_there(source: ObjectSource, ref: ObjectRef, snapshot: Path) -> None:
    """The one HEAD of a snapshot mount: the first pinned file must still be readable as pinned."""
    what = f"version {ref.version_id} of {ref.uri}" if ref.version_id else ref.uri
    try:
        found = _head_pinned(source, ref)
    except NotFoundError:
        raise NotFoundError(
            f"snapshot {snapshot} pins {what}, which is gone from S3: the data it recorded "
            f"can no longer be served"
        ) from None
    if found.etag != ref.etag or found.size != ref.size:
        raise PinMismatchError(
            f"snapshot {snapshot} pins {what} with ETag {ref.etag} and {ref.size} bytes, but S3 "
            f"has ETag {found.etag} and {found.size} bytes: the object changed since"
        )


def _head_pinned(source: ObjectSource, ref: ObjectRef) -> ObjectRef:
    """The HEAD of ``ref``'s version; of the current object where versions may not be read,
    which is the pinned one if its ETag and size are (the caller checks)."""
    found = head_version_or_current(source, ref.bucket, ref.key, ref.version_id)
    if found.denied is not None:
        log.warning("may not read object versions in bucket %r (s3:GetObjectVersion is not "
                    "granted): checking the current object against the snapshot's ETag and "
                    "size", ref.bucket)
    return found.ref


def parse_expected(text: str | None) -> str | None:
    """``--expect-fingerprint``: 64 hex digits (any case), or a usage error."""
    if text is None:
        return None
    value = text.strip().lower()
    if not is_fingerprint(value):
        raise UsageError(f"--expect-fingerprint {text!r} is not a fingerprint (64 hex digits)")
    return value


def check_fingerprint(meta: CatalogMeta, expected: str | None) -> None:
    """Refuse the data unless its fingerprint is ``expected`` (when one is given)."""
    if expected is not None and meta.fingerprint != expected:
        raise PinMismatchError(
            f"fingerprint mismatch for {meta.uri}: expected {expected}, the data has "
            f"{meta.fingerprint}: the dataset changed, or --expect-fingerprint is wrong"
        )
