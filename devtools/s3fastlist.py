"""Big buckets for the moto server: listings that do not scan the bucket, and bulk population.

Stock moto answers every ListObjectsV2 page by copying, filtering and sorting the whole bucket,
and every ListObjectVersions page by deep-copying every version in the bucket (measured here:
~0.04 s and ~7.5 s per page at 100,000 keys, growing linearly). That is fine for tests and
hopeless for a million keys. Two remedies, both used only inside the server process:

**Fast listings** (``install()``; ``s3server.py --fast-listing``, on by default). moto's
``S3Backend.list_objects_v2`` and ``S3Backend.list_object_versions`` are replaced by
``fast_list_objects_v2`` / ``fast_list_object_versions``, which walk a sorted index of the
bucket's key names from the first key that can matter, jump over a whole common prefix at once,
and stop after ``max_keys`` + 1 items; a returned version is a read-through view carrying its
own ``is_latest`` (``Listed``) instead of moto's deep copy.
Invariant: for the same bucket state and arguments they return exactly what moto's own methods
return (items, order, truncation, next markers, and the continuation token moto records),
quirks included (moto lists a common prefix whose keys are all deleted; with a KeyMarker but no
VersionIdMarker it drops the first version at or after the marker). Anything outside what they
reproduce (table buckets, an unknown continuation token, a key with no versions, a version
whose name is not its key) is handed to the original. ``tests/test_s3fastlist.py`` checks the
equivalence against the originals on random buckets and arguments. ListObjects (v1) is not
replaced: point clients at v2 (``rclone --s3-list-version 2``, ``s3fs -o listobjectsv2``).

The index is a sorted list of key names kept on the bucket's key store, rebuilt (one sort) when
the set of keys changed since: the store's mutating methods are wrapped to stamp it with a new
generation number. Rebuilds and reads of the index happen under one lock; werkzeug serves
requests in threads.

**Bulk population** (``populate()``; ``POST /__s3server__/populate``): creates objects directly
in moto's in-process backend through ``S3Backend.put_object``, exactly as a PutObject would
(versioning, ETags, LastModified), at ~40,000 objects/s instead of ~400 over HTTP. The body is
JSON ``{"bucket": B, "objects": [[key, size], ...]}``; each object's bytes are
``content(key, size)``, so a client can check what it reads without keeping the data.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.Lock()
_GENERATIONS = itertools.count(1)
_GEN = "_s3fastlist_generation"
_INDEX = "_s3fastlist_index"
_ORIGINALS: dict[str, Callable[..., Any]] = {}


class _Fallback(Exception):
    """A case the fast path does not reproduce: let moto's own method answer."""


def content(key: str, size: int) -> bytes:
    """The bytes ``populate`` stores for ``key``: its sha256 hex digest, repeated to ``size``."""
    unit = hashlib.sha256(key.encode("utf-8")).hexdigest().encode("ascii")
    return (unit * (size // len(unit) + 1))[:size]


# ---------------------------------------------------------------- the sorted index


def _stamp(method: Callable[..., Any]) -> Callable[..., Any]:
    def stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            self.__dict__[_GEN] = next(_GENERATIONS)

    stamped.__name__ = method.__name__
    return stamped


def _track_key_stores() -> None:
    from moto.s3.utils import _VersionedKeyStore

    for name in ("__setitem__", "__delitem__", "setlist", "pop", "clear", "update"):
        method = getattr(_VersionedKeyStore, name)
        if getattr(method, "__name__", "") == name and not hasattr(method, "_s3fastlist"):
            wrapped = _stamp(method)
            wrapped._s3fastlist = True  # type: ignore[attr-defined]
            setattr(_VersionedKeyStore, name, wrapped)


def key_index(store: dict[str, Any]) -> list[str]:
    """The store's key names, sorted (Python str order, as moto sorts), rebuilt when stale."""
    with _LOCK:
        generation = store.__dict__.get(_GEN, 0)
        cached = store.__dict__.get(_INDEX)
        if cached is None or cached[0] != generation:
            cached = (generation, sorted(dict.keys(store)))
            store.__dict__[_INDEX] = cached
        return cached[1]


def _versions(store: dict[str, Any], name: str) -> list[Any]:
    versions = dict.__getitem__(store, name)
    if not versions:
        raise _Fallback  # moto's own iteration raises IndexError here
    return versions


def _end_of(names: list[str], start: int, prefix: str) -> int:
    """The index after the last name at or after ``start`` that starts with ``prefix``."""
    return bisect.bisect_right(names, prefix, lo=start, key=lambda name: name[: len(prefix)])


# ---------------------------------------------------------------- ListObjectsV2


def fast_list_objects_v2(
    backend: Any,
    bucket: Any,
    prefix: str | None,
    delimiter: str | None,
    continuation_token: str | None,
    start_after: str | None,
    max_keys: int,
) -> tuple[list[Any], bool, str | None]:
    """``S3Backend.list_objects_v2``, same results (see the module docstring)."""
    from moto.s3.models import FakeDeleteMarker, FakeTableStorageBucket

    if isinstance(bucket, FakeTableStorageBucket) or max_keys < 0:
        raise _Fallback
    limit = None
    if continuation_token:
        limit = backend._pagination_tokens.get(continuation_token)
        if limit is None:
            raise _Fallback  # moto fails on an unknown token; let it
    elif start_after:
        limit = start_after
    prefix = prefix or ""
    names, store = key_index(bucket.keys), bucket.keys
    i = bisect.bisect_left(names, prefix)
    if limit is not None:
        i = max(i, bisect.bisect_right(names, limit))
    items: list[Any] = []
    while i < len(names) and len(items) <= max_keys and names[i].startswith(prefix):
        name = names[i]
        rest = name[len(prefix) :]
        if delimiter and delimiter in rest:
            folder = prefix + rest.split(delimiter)[0] + delimiter
            if limit is None or folder > limit:
                items.append(folder)
            i = _end_of(names, i, folder)
            continue
        latest = _versions(store, name)[-1]
        if not isinstance(latest, FakeDeleteMarker):
            items.append(latest)
        i += 1
    return backend._truncate_result(items, max_keys)


# ---------------------------------------------------------------- ListObjectVersions


class _VersionWalk:
    """moto's list_object_versions loop, run over the index from the first key that matters."""

    def __init__(
        self,
        names: list[str],
        store: Any,
        *,
        delimiter: str | None,
        key_marker: str | None,
        max_keys: int | None,
        prefix: str,
        version_id_marker: str | None,
    ) -> None:
        self.names, self.store = names, store
        self.delimiter, self.key_marker, self.max_keys = delimiter, key_marker, max_keys
        self.prefix, self.version_id_marker = prefix, version_id_marker
        self.common_prefixes: set[str] = set()
        self.versions: list[Any] = []
        self.delete_markers: list[Any] = []
        self.next_key_marker: str | None = None
        self.next_version_id_marker: str | None = None
        self.last_item_added: Any = None
        self.skipping = key_marker is not None

    def run(self) -> tuple[list[Any], list[str], list[Any], str | None, str | None]:
        names, prefix = self.names, self.prefix
        start = self.key_marker if self.key_marker is not None else prefix
        i = bisect.bisect_left(names, start)
        while i < len(names):
            name = names[i]
            if not self.skipping and not name.startswith(prefix):
                if name > prefix:
                    break  # past the prefix: every later version is filtered out
                i = max(i + 1, bisect.bisect_left(names, prefix))
                continue
            step = self._key(name, i)
            if step is None:
                break
            i = step
        return (
            self.versions,
            sorted(self.common_prefixes),
            self.delete_markers,
            self.next_key_marker,
            self.next_version_id_marker,
        )

    def _key(self, name: str, index: int) -> int | None:
        """Process every version of ``name``; the next index, or None when truncated."""
        from moto.core.utils import unix_time_millis

        ordered = sorted(
            _versions(self.store, name), key=lambda r: -unix_time_millis(r.last_modified)
        )
        for position, version in enumerate(ordered):
            if version.name != name:
                raise _Fallback
            if self.skipping:
                self._skip(version)
                continue
            if not name.startswith(self.prefix):
                continue
            rest = name[len(self.prefix) :]
            if self.delimiter and self.delimiter in rest:
                return self._folder(name, index)
            if self._full(self.last_item_added.name if self.last_item_added else name, False):
                return None
            self._add(version, position == 0)
        return index + 1

    def _skip(self, version: Any) -> None:
        """moto's marker handling: skip up to (and including) the marker's version."""
        if not self.version_id_marker:
            self.skipping = version.name < self.key_marker
        elif version.name == self.key_marker and version.version_id == self.version_id_marker:
            self.skipping = False

    def _folder(self, name: str, index: int) -> int | None:
        rest = name[len(self.prefix) :]
        end = len(self.prefix) + rest.index(self.delimiter) + len(self.delimiter)
        folder = name[:end]
        after = _end_of(self.names, index, folder)
        if folder == self.key_marker:
            return after
        self.common_prefixes.add(folder)
        return None if self._full(folder, True) else after

    def _full(self, name: str, is_common_prefix: bool) -> bool:
        count = len(self.versions) + len(self.delete_markers) + len(self.common_prefixes)
        if self.max_keys is None or count < self.max_keys:
            return False
        self.next_key_marker = name
        if is_common_prefix or self.last_item_added is None:
            self.next_version_id_marker = None
        else:
            self.next_version_id_marker = self.last_item_added.version_id
        return True

    def _add(self, version: Any, is_latest: bool) -> None:
        from moto.s3.models import FakeKey

        item = Listed(version, is_latest)
        self.last_item_added = item
        (self.versions if isinstance(version, FakeKey) else self.delete_markers).append(item)


class Listed:
    """A listed version: reads through to the stored one, with its own ``is_latest``.

    moto deep-copies every version to set ``is_latest`` on the copy (a quarter of a page's time);
    the response only reads attributes, so a read-through view with the flag is equivalent.
    """

    __slots__ = ("_version", "is_latest")

    def __init__(self, version: Any, is_latest: bool) -> None:
        self._version = version
        self.is_latest = is_latest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._version, name)


def fast_list_object_versions(
    backend: Any,
    bucket_name: str,
    delimiter: str | None = None,
    key_marker: str | None = None,
    max_keys: int | None = 1000,
    prefix: str = "",
    version_id_marker: str | None = None,
) -> tuple[list[Any], list[str], list[Any], str | None, str | None]:
    """``S3Backend.list_object_versions``, same results (see the module docstring)."""
    bucket = backend.get_bucket(bucket_name)
    if prefix is None:
        raise _Fallback
    walk = _VersionWalk(
        key_index(bucket.keys),
        bucket.keys,
        delimiter=delimiter,
        key_marker=key_marker,
        max_keys=max_keys,
        prefix=prefix,
        version_id_marker=version_id_marker,
    )
    return walk.run()


# ---------------------------------------------------------------- installing, populating


def install() -> None:
    """Replace moto's two listing methods in this process (idempotent)."""
    from moto.s3.models import S3Backend

    _track_key_stores()
    for name, fast in (
        ("list_objects_v2", fast_list_objects_v2),
        ("list_object_versions", fast_list_object_versions),
    ):
        if name in _ORIGINALS:
            continue
        original = _ORIGINALS[name] = getattr(S3Backend, name)
        setattr(S3Backend, name, _with_fallback(fast, original))


def _with_fallback(fast: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fast(self, *args, **kwargs)
        except _Fallback:
            return original(self, *args, **kwargs)

    method.__name__ = original.__name__
    method.__doc__ = original.__doc__
    return method


def populate(request: dict[str, Any]) -> dict[str, Any]:
    """Create ``request["objects"]`` ([key, size] pairs) in ``request["bucket"]``, in process."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    bucket = request["bucket"]
    backend.get_bucket(bucket)  # NoSuchBucket (a 404 for the caller) before anything is made
    count = 0
    for key, size in request["objects"]:
        backend.put_object(bucket, key, content(key, int(size)), disable_notification=True)
        count += 1
    return {"bucket": bucket, "created": count}
