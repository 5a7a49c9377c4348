"""Resolve what a URI names into pinned ``ObjectRef``s: the mount-time half of pinning.

Rules (issue: core mount):
- ``s3://b/key`` that names an object (HEAD succeeds) is a single-object dataset; ``--version-id``
  picks a version (an older one too) and ``--etag`` must equal the chosen version's ETag.
- ``s3://b/prefix/``, ``s3://b`` and ``s3://b/prefix`` that is not an object are prefix datasets:
  every current key under ``prefix/``. Pins make no sense there and are refused.
- A versioned bucket (versioning Enabled or Suspended) is listed with ListObjectVersions so every
  ref carries its VersionId (``"null"`` for objects written before versioning); an unversioned
  bucket is listed with ListObjectsV2 and pinned by ETag alone. When we may not ask for the
  bucket's versioning state, or may not list its versions, we fall back to ETag pinning and say
  so.
- ``as_of`` (epoch seconds) resolves the URI as it was then: the object (or every key under the
  prefix) in the version current at that time, deleted keys absent, later keys absent. It needs
  a versioned bucket and is refused, before any listing, on one that is not (or whose
  versioning state we may not read): the past of an unversioned bucket is gone. It excludes
  ``--version-id`` (both name a version). Whether ``s3://b/name`` is an object or a prefix is
  decided at that time too.
- The listing is streamed, never held whole: the caller feeds it to the catalog builder.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from .config import format_time
from .errors import (
    AccessDeniedError,
    MissingPermissionError,
    NotFoundError,
    PinMismatchError,
    UnsupportedError,
    UsageError,
)
from .model import ObjectRef, ObjectSource, normalize_etag
from .uri import S3Uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pins:
    """What the user pinned explicitly; both apply to single-object datasets only."""

    version_id: str | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Resolution:
    uri: S3Uri
    versioned: bool
    prefix: str  # stripped from every key to place it in the tree
    single_object: bool
    refs: Iterator[ObjectRef]
    as_of: float | None = None


def resolve(
    source: ObjectSource, uri: S3Uri, pins: Pins = Pins(), as_of: float | None = None
) -> Resolution:
    """Resolve ``uri`` against S3, or raise a user-facing error; see the module rules."""
    if uri.is_explicit_prefix:
        _refuse_pins_on_prefix(uri, pins)
    if as_of is not None and pins.version_id is not None:
        raise UsageError("--as-of and --version-id both choose a version: give only one")
    versioning = source.bucket_versioning(uri.bucket)
    if as_of is not None:
        return _resolve_as_of(source, uri, pins, as_of, versioning)
    versioned = bool(versioning)
    if not uri.is_explicit_prefix:
        ref = _head_or_none(source, uri, pins)
        if ref is not None:
            _check_etag(ref, pins)
            if pins.version_id is not None and ref.version_id != pins.version_id:
                ref = _with_version(ref, pins.version_id)  # asked for: some stores echo none
            elif versioned and ref.version_id is None:
                ref = _null_version_or_etag_only(source, ref)
                versioned = ref.version_id is not None  # by ETag alone: as if unversioned
            _warn_if_versioning_unknown(versioning, uri, ref.version_id)
            # A version id says the bucket keeps versions, even when we may not ask it.
            versioned = versioned or ref.version_id is not None
            return Resolution(uri, versioned, uri.parent_prefix(), True, iter([ref]))
    prefix = uri.as_prefix()
    try:
        first, refs, listed_versioned = _first_listed(source, uri, prefix, versioned)
    except AccessDeniedError as exc:
        if uri.is_explicit_prefix:
            raise
        # Its HEAD found no object: say so, or the error names only a prefix nobody asked for.
        raise AccessDeniedError(f"{uri} is no object (check the key), and listing it as a "
                                f"prefix was refused: {exc}") from None
    if first is None:
        raise NotFoundError(f"no such object or prefix: {uri}: check the key (a prefix must hold "
                            "objects; keys are case-sensitive)")
    _refuse_pins_on_prefix(uri, pins)  # only now do we know it is a prefix, not nothing
    _warn_if_versioning_unknown(versioning, uri, None)
    if versioned and not listed_versioned:  # said once the mount goes ahead, as above
        log.warning("may not list the versions of bucket %r (s3:ListBucketVersions is not "
                    "granted): pinning %s by ETag only", uri.bucket, uri)
    return Resolution(uri, listed_versioned, prefix, False, itertools.chain([first], refs))


def _first_listed(
    source: ObjectSource, uri: S3Uri, prefix: str, versioned: bool
) -> tuple[ObjectRef | None, Iterator[ObjectRef], bool]:
    """The listing's first ref, the listing, and whether its refs carry versions.

    A versioned bucket whose versions we may not list (no s3:ListBucketVersions: a read-only
    policy written by hand) is listed as an unversioned one and pinned by ETag alone, with a
    warning, as when its versioning state is denied: If-Match still makes every read the pinned
    bytes or an error; only an object overwritten after the mount reads ``ESTALE``, not its old
    version. Its GETs then name no version, so s3:GetObject will do. The caller warns.
    """
    try:
        refs = source.list_latest(uri.bucket, prefix, versioned=versioned)
        return next(refs, None), refs, versioned
    except MissingPermissionError as exc:
        if not versioned or exc.permission != "s3:ListBucketVersions":
            raise
        try:
            refs = source.list_latest(uri.bucket, prefix, versioned=False)
            first = next(refs, None)
        except AccessDeniedError:
            raise exc from None  # neither listing: the versioned one is what this bucket needs
    return first, refs, False


def _resolve_as_of(
    source: ObjectSource, uri: S3Uri, pins: Pins, as_of: float, versioning: bool | None
) -> Resolution:
    when = format_time(as_of)
    if versioning is None:
        raise UnsupportedError(
            f"--as-of needs the versioning state of bucket {uri.bucket!r}, and "
            f"GetBucketVersioning was denied (or this store has no such call): allow it, or "
            f"drop --as-of"
        )
    if not versioning:
        raise UnsupportedError(
            f"bucket {uri.bucket!r} is not versioned, so its past is gone: --as-of cannot be "
            f"honoured; drop it"
        )
    if not uri.is_explicit_prefix:
        ref = _head_as_of_or_none(source, uri, as_of)
        if ref is not None:
            _check_etag(ref, pins)
            return Resolution(uri, True, uri.parent_prefix(), True, iter([ref]), as_of)
    prefix = uri.as_prefix()
    refs = source.list_as_of(uri.bucket, prefix, as_of)
    first = next(refs, None)
    if first is None:
        raise NotFoundError(f"no such object or prefix as of {when}: {uri}: check the key, or "
                            "choose a later --as-of")
    _refuse_pins_on_prefix(uri, pins)
    return Resolution(uri, True, prefix, False, itertools.chain([first], refs), as_of)


def _head_as_of_or_none(source: ObjectSource, uri: S3Uri, as_of: float) -> ObjectRef | None:
    try:
        return source.head_as_of(uri.bucket, uri.key, as_of)
    except NotFoundError:
        return None


def _warn_if_versioning_unknown(versioning: bool | None, uri: S3Uri, version: str | None) -> None:
    """Say so when we could not learn the bucket's versioning state and pin by ETag alone.

    Called only once resolution has succeeded, so a failing mount prints its error alone.
    """
    if versioning is None and version is None:
        log.warning(
            "cannot read the versioning state of bucket %r (GetBucketVersioning denied or "
            "not supported): "
            "pinning %s by ETag only",
            uri.bucket,
            uri,
        )


def _refuse_pins_on_prefix(uri: S3Uri, pins: Pins) -> None:
    if pins.version_id is not None or pins.etag is not None:
        raise UsageError(
            f"--version-id and --etag pin a single object, but {uri} is a prefix: "
            f"drop them, or name one object"
        )


def _head_or_none(source: ObjectSource, uri: S3Uri, pins: Pins) -> ObjectRef | None:
    try:
        found = head_version_or_current(source, uri.bucket, uri.key, pins.version_id)
    except NotFoundError:
        if pins.version_id is not None:
            raise NotFoundError(
                f"version {pins.version_id!r} of {uri} does not exist: check --version-id"
            ) from None
        return None
    if found.denied is None:
        return found.ref
    if found.ref.version_id != pins.version_id:  # only the current version is read by ETag
        now = f"version {found.ref.version_id!r}" if found.ref.version_id else "one unnamed"
        raise MissingPermissionError(
            f"access denied to version {pins.version_id!r} of {uri}: it is not the current "
            f"one ({now}), and reading another version needs s3:GetObjectVersion, which the "
            f"credentials' policy does not grant: grant it, or drop --version-id to mount the "
            f"current one", found.denied.permission,
        )
    log.warning("may not read object versions in bucket %r (s3:GetObjectVersion is not "
                "granted): version %r of %s is the current one, so it is read by its ETag",
                uri.bucket, pins.version_id, uri)
    return found.ref


@dataclass(frozen=True)
class Headed:
    """A HEAD's answer: of the version asked for, or of the current object when that version's
    HEAD was ``denied`` for want of s3:GetObjectVersion (the caller decides whether the current
    object is the one it pinned)."""

    ref: ObjectRef
    denied: MissingPermissionError | None = None


def head_version_or_current(
    source: ObjectSource, bucket: str, key: str, version_id: str | None
) -> Headed:
    """The HEAD of ``version_id`` of ``key``; of the current object where versions may not be
    read: a read-only policy written by hand grants s3:GetObject but not s3:GetObjectVersion,
    and reads of the current version then go by ETag alone (``s3source``). Any other refusal,
    or a current object that is gone too, raises the first error."""
    try:
        return Headed(source.head(bucket, key, version_id))
    except MissingPermissionError as exc:
        if version_id is None or exc.permission != "s3:GetObjectVersion":
            raise
        denied = exc
    try:
        return Headed(source.head(bucket, key), denied)
    except (AccessDeniedError, NotFoundError):
        raise denied from None


def _check_etag(ref: ObjectRef, pins: Pins) -> None:
    if pins.etag is not None and normalize_etag(pins.etag) != ref.etag:
        raise PinMismatchError(
            f"ETag mismatch for {ref.uri}: expected {normalize_etag(pins.etag)}, "
            f"S3 has {ref.etag}: the object changed, or --etag/--version-id is wrong"
        )


def _null_version_or_etag_only(source: ObjectSource, ref: ObjectRef) -> ObjectRef:
    """The pin of an object whose HEAD names no version on a versioned bucket.

    S3 names none for the "null" version (an object written before versioning was enabled);
    some S3-compatible stores name none for any version, and pinning those to "null" failed
    every read with ESTALE. Only a HEAD of version "null" with the same ETag tells the first
    case; otherwise the object is pinned by its ETag alone (If-Match still guards every read).
    """
    try:
        null = source.head(ref.bucket, ref.key, "null")
    except NotFoundError:
        null = None
    if null is not None and null.etag == ref.etag:
        return _with_version(ref, "null")
    log.warning(
        "S3 names no version of %s on a versioned bucket: pinned by its ETag alone (a read "
        "fails with ESTALE once the object is overwritten)",
        ref.uri,
    )
    return ref


def _with_version(ref: ObjectRef, version_id: str) -> ObjectRef:
    return ObjectRef(ref.bucket, ref.key, version_id, ref.etag, ref.size, ref.last_modified)
