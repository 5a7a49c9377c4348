"""In-memory test doubles: ``FakeSource`` (an ``ObjectSource``) and ``trio_test``.

``FakeSource`` behaves like S3 where the core depends on it, and no further:

- Buckets are versioned or not. On an unversioned bucket a key has one version, ``"null"``,
  replaced by every put and removed by a delete. On a versioned bucket every put adds a version
  with a fresh VersionId and a delete adds a delete marker; objects put before
  ``enable_versioning`` keep the literal version ``"null"``.
- ETags look real (``'"<md5 hex>"'``); LastModified comes from a clock that ticks one second per
  write, so every run is deterministic.
- ``head`` reports ``VersionId`` like S3 does: ``None`` on an unversioned bucket and for an object
  written before versioning was enabled (S3 sends no ``x-amz-version-id`` for it), the id otherwise.
  ``list_latest(versioned=True)`` reports every id, ``"null"`` included, like ListObjectVersions.
- ``list_as_of``/``head_as_of`` pick, per key, the newest version with LastModified <= the time
  (a delete marker there hides the key), like the point-in-time listing of ``s3source``.
- ``get_range`` honours the pin like a GET with ``VersionId`` and ``IfMatch``: the selected version
  (``ref.version_id``, else the current one) must exist, must not be a delete marker, and its ETag
  must equal ``ref.etag``; otherwise ``StaleObjectError``. It returns exactly ``[start, end)`` and
  refuses (``ValueError``) a range outside the object, so a reader asking for one is caught.

For tests it counts calls per method (``calls``), records every ``get_range`` as
``(ref, start, end)`` (``ranges``), injects failures (``fail_next``), can deny GetBucketVersioning
(``deny_versioning``) and can hold every ``get_range`` on a ``threading.Event`` (``gate``) so a test
can line up concurrent readers before any GET answers.

Thread safety: one lock guards all state; ``get_range`` waits on the gate outside it.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from s3datafs.errors import NotFoundError, StaleObjectError
from s3datafs.model import ObjectRef

GATE_TIMEOUT = 10.0  # seconds a gated get_range waits before failing the test instead of hanging
TRIO_TEST_SECONDS = 170  # under conftest's TEST_SECONDS, whose alarm leaves trio runs alone


def trio_test(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Run an ``async def`` test under ``trio.run`` (pytest-trio is not installed), failing it
    with ``trio.TooSlowError`` after ``TRIO_TEST_SECONDS``: trio's own deadline cancels the
    test's tasks and ends the run cleanly (an exception raised into trio from a signal handler
    would leave the thread marked as inside a run, and fail every trio test after it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        async def bounded() -> Any:
            with trio.fail_after(TRIO_TEST_SECONDS):
                return await fn(*args, **kwargs)

        return trio.run(bounded)

    return wrapper


@dataclass(frozen=True)
class Version:
    version_id: str
    data: bytes | None  # None marks a delete marker
    etag: str
    last_modified: float


@dataclass
class Bucket:
    versioned: bool
    keys: dict[str, list[Version]]  # oldest version first


class FakeSource:
    """An in-memory, call-counting, failure-injecting ``model.ObjectSource``."""

    def __init__(self, *, start_time: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}
        self._clock = start_time
        self._next_version = 1
        self._failures: dict[str, collections.deque[BaseException]] = collections.defaultdict(
            collections.deque
        )
        self.calls: collections.Counter[str] = collections.Counter()
        self.ranges: list[tuple[ObjectRef, int, int]] = []
        self.deny_versioning = False
        self.gate: threading.Event | None = None
        self.in_get_range = 0  # threads currently inside get_range (waiting on the gate, say)

    # -- arranging the world --------------------------------------------------------------------

    def create_bucket(self, name: str, *, versioned: bool = False) -> None:
        with self._lock:
            self._buckets[name] = Bucket(versioned, {})

    def enable_versioning(self, bucket: str) -> None:
        with self._lock:
            self._buckets[bucket].versioned = True

    def put(self, bucket: str, key: str, data: bytes, *, etag: str | None = None) -> ObjectRef:
        """Write a new version (or replace the object); return the ref that pins it."""
        with self._lock:
            store = self._buckets[bucket]
            version = Version(
                self._new_version_id(store),
                data,
                etag or f'"{hashlib.md5(data).hexdigest()}"',
                self._tick(),
            )
            if store.versioned:
                store.keys.setdefault(key, []).append(version)
            else:
                store.keys[key] = [version]
            return self._ref(bucket, key, version, listed=True)

    def delete(self, bucket: str, key: str) -> None:
        """Delete like S3: a delete marker on a versioned bucket, gone otherwise."""
        with self._lock:
            store = self._buckets[bucket]
            if store.versioned:
                marker = Version(self._new_version_id(store), None, "", self._tick())
                store.keys.setdefault(key, []).append(marker)
            else:
                store.keys.pop(key, None)

    def delete_version(self, bucket: str, key: str, version_id: str) -> None:
        """Remove one version for good (what ``DeleteObject(VersionId=...)`` does)."""
        with self._lock:
            versions = self._buckets[bucket].keys.get(key, [])
            versions[:] = [v for v in versions if v.version_id != version_id]

    def fail_next(self, count: int, exc: BaseException, method: str = "get_range") -> None:
        """Make the next ``count`` calls of ``method`` raise ``exc`` (after the gate, if any)."""
        with self._lock:
            self._failures[method].extend([exc] * count)

    # -- model.ObjectSource ---------------------------------------------------------------------

    def bucket_versioning(self, bucket: str) -> bool | None:
        self._enter("bucket_versioning")
        with self._lock:
            if self.deny_versioning:
                return None
            return self._bucket(bucket).versioned

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        self._enter("head")
        with self._lock:
            version = self._select(bucket, key, version_id)
            if version is None:
                what = f"version {version_id} of " if version_id else ""
                raise NotFoundError(f"no such object: {what}s3://{bucket}/{key}")
            return self._ref(bucket, key, version, listed=False)

    def list_latest(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[ObjectRef]:
        self._enter("list_latest")
        with self._lock:
            store = self._bucket(bucket)
            refs = []
            for key in sorted(store.keys, key=lambda k: k.encode()):  # S3: UTF-8 byte order
                latest = store.keys[key][-1] if store.keys[key] else None
                if key.startswith(prefix) and latest is not None and latest.data is not None:
                    ref = self._ref(bucket, key, latest, listed=True)
                    refs.append(ref if versioned else _without_version(ref))
        return iter(refs)

    def list_as_of(self, bucket: str, prefix: str, as_of: float) -> Iterator[ObjectRef]:
        self._enter("list_as_of")
        with self._lock:
            store = self._bucket(bucket)
            refs = []
            for key in sorted(store.keys, key=lambda k: k.encode()):
                version = self._as_of(store, key, as_of)
                if key.startswith(prefix) and version is not None:
                    refs.append(self._ref(bucket, key, version, listed=True))
        return iter(refs)

    def head_as_of(self, bucket: str, key: str, as_of: float) -> ObjectRef:
        self._enter("head_as_of")
        with self._lock:
            version = self._as_of(self._bucket(bucket), key, as_of)
            if version is None:
                raise NotFoundError(f"no such object at that time: s3://{bucket}/{key}")
            return self._ref(bucket, key, version, listed=True)

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        with self._lock:
            self.calls["get_range"] += 1
            self.ranges.append((ref, start, end))
            self.in_get_range += 1
        try:
            if self.gate is not None and not self.gate.wait(GATE_TIMEOUT):
                raise TimeoutError("FakeSource.gate was never opened")
            self._maybe_fail("get_range")
            with self._lock:
                version = self._select(ref.bucket, ref.key, ref.version_id)
                if version is None or version.etag != ref.etag:
                    raise StaleObjectError(
                        f"{ref.uri} changed or was deleted since it was pinned "
                        f"(pinned ETag {ref.etag})"
                    )
                assert version.data is not None
                if not 0 <= start < end <= len(version.data):
                    raise ValueError(f"range [{start}, {end}) outside {ref.uri}")
                return version.data[start:end]
        finally:
            with self._lock:
                self.in_get_range -= 1

    # -- inside ---------------------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1
        self._maybe_fail(method)

    def _maybe_fail(self, method: str) -> None:
        with self._lock:
            pending = self._failures[method]
            exc = pending.popleft() if pending else None
        if exc is not None:
            raise exc

    def _bucket(self, name: str) -> Bucket:
        if name not in self._buckets:
            raise NotFoundError(f"bucket {name!r} does not exist (s3://{name})")
        return self._buckets[name]

    def _select(self, bucket: str, key: str, version_id: str | None) -> Version | None:
        """The chosen (or current) version, if it exists and is not a delete marker."""
        versions = self._bucket(bucket).keys.get(key, [])
        if version_id is None:
            chosen = versions[-1] if versions else None
        else:
            chosen = next((v for v in versions if v.version_id == version_id), None)
        return chosen if chosen is not None and chosen.data is not None else None

    @staticmethod
    def _as_of(store: Bucket, key: str, as_of: float) -> Version | None:
        """The version of ``key`` current at ``as_of``; None if absent or a delete marker."""
        older = [v for v in store.keys.get(key, []) if v.last_modified <= as_of]
        return older[-1] if older and older[-1].data is not None else None

    def _new_version_id(self, store: Bucket) -> str:
        if not store.versioned:
            return "null"
        number, self._next_version = self._next_version, self._next_version + 1
        return hashlib.sha1(str(number).encode()).hexdigest()[:32]

    def _tick(self) -> float:
        self._clock += 1.0
        return self._clock

    def _ref(self, bucket: str, key: str, version: Version, *, listed: bool) -> ObjectRef:
        """The ref S3 reports: HEAD omits the "null" id, a version listing does not."""
        store = self._buckets[bucket]
        if not store.versioned or (version.version_id == "null" and not listed):
            version_id = None
        else:
            version_id = version.version_id
        assert version.data is not None
        return ObjectRef(bucket, key, version_id, version.etag, len(version.data),
                         version.last_modified)


def _without_version(ref: ObjectRef) -> ObjectRef:
    return ObjectRef(ref.bucket, ref.key, None, ref.etag, ref.size, ref.last_modified)
