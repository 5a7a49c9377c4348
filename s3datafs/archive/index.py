"""Which datasets are zip archives, and their member catalogs: read once, kept for every remount.

``archive_catalog`` is called by a mount once its dataset is pinned. A single-object dataset is
mounted as the tree of its members when ``--archive=auto`` (the default) and the key ends in
``.zip``, or the object's last bytes hold a zip end record and it is not a file of a format
built on zip: ``model.pt``, ``arrays.npz`` and ``app.jar`` are files their readers open whole,
not datasets to unpack. Such a file is known by its name (``ZIP_BASED_FORMATS``: no GET at
all) or, under any other name, by its members (``zip_based_format``: a PyTorch checkpoint is
``epoch=9.ckpt``, ``pytorch_model.bin`` or ``checkpoint.pth.tar`` as often as ``model.pt``).
``--archive=zip`` unpacks any single object, ``--archive=file`` keeps it a plain file. A
``.zip`` key (or any, with ``zip``) that is not a readable zip fails the mount, naming the way
out.

Reading the index costs ranged GETs of the archive's end, pinned like every read (VersionId and
If-Match travel with them, through ``ObjectSource.get_range``): one GET of the last ``TAIL_BYTES``
finds the end record and, for most archives, holds the whole central directory; a larger
directory costs one more GET of the rest, a ZIP64 record out of reach one more.

Persistence: the member tree is an archive catalog (see ``catalog``) stored as
``<cache-dir>/archives/<digest>.db``, where ``digest`` is the archive's pinned identity
(``blockfile.object_digest``), built to a temporary file and moved into place. The file never
changes once there (a pinned archive never changes), so any later mount of the same pin, by any
process, opens it and reads no index at all. A file that cannot be opened, or that describes
another object, is rebuilt; one that a mount finds damaged deeper in (``catalog``: names fail
with EIO) is removed by that mount, so the next one rebuilds it. Concurrent builders each
replace the file with identical content.
A single object found *not* to be a zip, or to be a zip-based file, leaves ``<digest>.plain``
(its URI inside, for ``cache clear URI``), so the next mount of that pin sends no detection GET
either.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ..cache.blockfile import object_digest
from ..catalog import ROOT_INODE, Catalog, CatalogBuilder, CatalogError
from ..errors import ArchiveError, SettingError, UsageError
from ..model import ObjectRef, ObjectSource
from ..uri import S3Uri, parse_s3_uri
from . import zipformat

log = logging.getLogger(__name__)

ARCHIVE_MODES = ("auto", "zip", "file")
TAIL_BYTES = 1024 * 1024  # one GET: the end record and, usually, the whole central directory
_ZIP_SUFFIX = ".zip"
# File formats that are zip archives inside, opened whole by their readers: with --archive=auto
# an object named so stays a file (PyTorch, NumPy, Keras and MLflow/TorchServe model files;
# Java, Android and Python packages; office documents; e-books; and the like).
ZIP_BASED_FORMATS = frozenset({
    ".pt", ".pth", ".npz", ".keras", ".mar", ".whl", ".egg", ".jar", ".war", ".ear", ".aar",
    ".apk", ".xapk", ".ipa", ".nupkg", ".vsix", ".xpi", ".docx", ".xlsx", ".pptx", ".odt",
    ".ods", ".odp", ".epub", ".kmz", ".3mf", ".usdz", ".ckpt", ".pt2", ".ptl",
})
# Members that say what a zip under another name is (``zip_based_format``); a file at the top.
_MARKER_MEMBERS = (
    ("[Content_Types].xml", "an Office Open XML package"),  # .docx .xlsx .3mf .nupkg .vsix
    ("mimetype", "an OpenDocument or EPUB file"),
    ("META-INF/MANIFEST.MF", "a Java archive"),  # .jar .war .ear .apk
    ("AndroidManifest.xml", "an Android package"),
)


def parse_archive_mode(text: str | None) -> str:
    """``--archive``: ``auto`` (default), ``zip`` or ``file``."""
    mode = (text or "auto").strip().lower()
    if mode not in ARCHIVE_MODES:
        raise SettingError("--archive", str(text), f"is not one of {', '.join(ARCHIVE_MODES)}")
    return mode


def archive_catalog(
    source: ObjectSource, pinned: Catalog, mode: str, cache_dir: Path
) -> Catalog | None:
    """The member catalog to mount instead of ``pinned``, or ``None`` to mount it as it is."""
    ref = single_object(pinned) if mode != "file" else None
    if ref is None:
        if mode == "zip":
            log.warning("--archive zip is for a single object; %s is a prefix: mounted as it is",
                        pinned.meta.uri)
        return None
    suffix = PurePosixPath(ref.key.lower()).suffix
    if mode == "auto" and suffix in ZIP_BASED_FORMATS:
        return None  # a file its reader opens whole (``--archive=zip`` unpacks it)
    digest = object_digest(ref)
    path = cache_dir / "archives" / f"{digest}.db"
    plain = cache_dir / "archives" / f"{digest}.plain"
    if plain.exists() and mode == "auto":
        return None  # this very pin was found not to be a zip before
    catalog = _open_existing(path, ref)
    # Stored by --archive=zip, or by a release that unpacked such files: asked again.
    kind = (_stored_zip_based_format(catalog)
            if catalog is not None and mode == "auto"
            and not ref.key.lower().endswith(_ZIP_SUFFIX) else None)
    if catalog is not None and kind is not None:
        catalog.close()
        _a_file(ref, kind, plain)
        return None
    if catalog is not None:
        log.info("member index of %s from %s: no index read", ref.uri, path)
        return catalog
    if mode == "zip" or ref.key.lower().endswith(_ZIP_SUFFIX):
        index = None
    else:  # any other single object: a zip only if its end says so (one small GET)
        tail = _tail(source, ref, min(ref.size, zipformat.END_SEARCH))
        if not zipformat.looks_like_zip(tail, ref.size):
            _remember_plain(plain, ref)
            return None
        index = read_index(source, ref, tail=tail)
        names = {member.name.rstrip("/") for member in index[0]}
        tops = {name.partition("/")[0] for name in names}
        if (kind := zip_based_format(names.__contains__, tops)) is not None:
            _a_file(ref, kind, plain)
            return None
    build_index(source, ref, path, pinned.meta.fingerprint, index=index)
    try:
        return Catalog.open(path)
    except CatalogError:
        # Replaced between our rename and this open by a process of another release, whose
        # member catalogs have another format (two versions side by side during an upgrade,
        # sharing the cache dir): build ours again, once; its build is no more ours to open.
        log.info("the member index %s was replaced meanwhile: building it again", path)
        build_index(source, ref, path, pinned.meta.fingerprint, index=index)
        return Catalog.open(path)


def _a_file(ref: ObjectRef, kind: str, plain: Path) -> None:
    log.info("%s is %s, a zip inside: mounted as one file (--archive=zip unpacks it)",
             ref.uri, kind)
    _remember_plain(plain, ref)


def zip_based_format(has: Callable[[str], bool], tops: set[str]) -> str | None:
    """What file format built on zip an archive is, or None for a zip of files to unpack;
    ``has(path)``: whether it holds that member, ``tops``: the names at its top (two at most
    are needed).

    A PyTorch file (``torch.save``, ``torch.jit.save``) holds one directory with ``data.pkl``
    and ``version`` (``.data/version`` in newer releases) in it; packages and documents have a
    member at the top that names their kind. A zip of datasets' files has neither.
    """
    if len(tops) == 1:
        (top,) = tops
        if has(f"{top}/data.pkl") and (has(f"{top}/version") or has(f"{top}/.data/version")):
            return "a PyTorch file"
    return next((kind for marker, kind in _MARKER_MEMBERS if has(marker)), None)


def _stored_zip_based_format(catalog: Catalog) -> str | None:
    """``zip_based_format`` of a stored member catalog: a few lookups, not a walk of all its
    members at every mount."""

    def has(path: str) -> bool:
        inode = ROOT_INODE
        for name in path.split("/"):
            entry = catalog.lookup(inode, name)
            if entry is None:
                return False
            inode = entry.inode
        return True

    tops = {entry.name for entry in itertools.islice(catalog.children(ROOT_INODE), 2)}
    return zip_based_format(has, tops)


def single_object(pinned: Catalog) -> ObjectRef | None:
    """The object of a single-object dataset (``None`` for a prefix, or without a file)."""
    if not pinned.meta.single_object or pinned.meta.object_count != 1:
        return None
    return next((ref for ref in pinned.objects() if not ref.key.endswith("/")), None)


def build_index(
    source: ObjectSource, ref: ObjectRef, path: Path, fingerprint: str, *,
    index: tuple[list[zipformat.Member], list[zipformat.Skipped]] | None = None,
) -> None:
    """Store the member catalog of ``ref`` at ``path``: its central directory (``index``, as
    ``read_index`` gives it, when already read)."""
    started = time.monotonic()
    members, skipped = index if index is not None else read_index(source, ref)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with CatalogBuilder(
        path, uri=ref.uri, bucket=ref.bucket, prefix="", versioned=ref.version_id is not None,
        single_object=True, archive=ref, fingerprint=fingerprint,
    ) as builder:
        for entry in skipped:  # warned and counted like the builder's own skips
            builder.skip(entry.name, entry.reason)
        for member in members:
            builder.add_member(member)
        summary = builder.finish()
    log.info("indexed %s: %d members (%d skipped) in %.2fs", ref.uri, summary.object_count,
             summary.skipped_count, time.monotonic() - started)


def read_index(
    source: ObjectSource, ref: ObjectRef, *, tail: bytes | None = None
) -> tuple[list[zipformat.Member], list[zipformat.Skipped]]:
    """The members of the zip ``ref`` (ranged GETs of its end; ``tail`` if already read)."""
    what = ref.uri
    if ref.size == 0:
        raise ArchiveError(f"{what} is not a zip archive: it is empty{_AS_FILE}")
    if tail is None or len(tail) < min(ref.size, TAIL_BYTES):
        tail = _tail(source, ref, min(ref.size, TAIL_BYTES))
    tail_start = ref.size - len(tail)
    try:
        found = zipformat.locate(tail, ref.size, what)
        if isinstance(found, zipformat.Zip64Needed):
            record = source.get_range(ref, found.offset, found.offset + found.length)
            found = zipformat.locate_zip64(record, found.offset, what)
        if found.start >= tail_start:
            data = tail[found.start - tail_start: found.start - tail_start + found.size]
        else:  # it starts before the tail (and ends before it when the ZIP64 record lay outside)
            end = found.start + found.size
            head = source.get_range(ref, found.start, min(end, tail_start)) if found.size else b""
            data = head + tail[: max(0, end - tail_start)]
        return zipformat.parse_central_directory(data, found, ref.size, what)
    except ArchiveError as exc:
        raise ArchiveError(f"{exc}{_AS_FILE}") from None


_AS_FILE = "; mount it with --archive=file to see the object as one file"


def _tail(source: ObjectSource, ref: ObjectRef, length: int) -> bytes:
    return source.get_range(ref, ref.size - length, ref.size) if length > 0 else b""


def _remember_plain(marker: Path, ref: ObjectRef) -> None:
    """Leave ``marker``: this pin is no zip. Best effort: without it the next mount asks again."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(dir=marker.parent, prefix=f".{marker.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(ref.uri + "\n")
            os.replace(temp, marker)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as exc:
        log.debug("cannot remember that %s is no zip: %s", ref.uri, exc)


def _open_existing(path: Path, ref: ObjectRef) -> Catalog | None:
    try:
        catalog = Catalog.open(path)
    except CatalogError:
        if path.exists():
            log.info("rebuilding the member index %s", path)
        return None
    stored = catalog.meta.archive
    if stored is None or (stored.cache_identity, stored.size) != (ref.cache_identity, ref.size):
        # Not this pin (LastModified may differ in precision between HEAD and LIST: ignored).
        catalog.close()
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return catalog


def clear_indexes(cache_dir: Path, under: S3Uri | None = None) -> int:
    """Delete the stored member indexes (of the archives ``under`` covers), and the remembered
    "not a zip" answers."""
    removed = 0
    archives = cache_dir / "archives"
    for path in sorted(archives.glob("*.db")):
        if under is not None:
            try:
                with contextlib.closing(Catalog.open(path)) as catalog:
                    archive = catalog.meta.archive
            except CatalogError:
                archive = None  # unreadable: the next mount would rebuild it anyway
            if archive is not None and not under.covers(archive.bucket, archive.key):
                continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    for marker in sorted(archives.glob("*.plain")):
        with contextlib.suppress(OSError, UsageError):
            if under is None or _marked(marker, under):
                marker.unlink()
    return removed


def _marked(marker: Path, under: S3Uri) -> bool:
    """Whether the "not a zip" ``marker`` (its object's URI inside) is of an object ``under``
    covers."""
    uri = parse_s3_uri(marker.read_text(encoding="utf-8").strip())
    return under.covers(uri.bucket, uri.key)
