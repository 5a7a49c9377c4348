"""Listing a prefix: S3 listing pages in, pinned ``ObjectRef``s out, in key order, concurrently.

Pure logic over pages in botocore's parsed shape (``Contents`` / ``Versions`` /
``DeleteMarkers`` / ``CommonPrefixes``); no boto3 here. ``s3source`` supplies a ``Fetch``
callable ``fetch(prefix, delimiter) -> pages`` and maps errors; tests drive it with plain dicts.

Which object of a key is pinned (``Selection``):
- unversioned bucket: the listed object, pinned by ETag (``version_id`` None);
- versioned bucket: the version marked ``IsLatest``; a key whose latest entry is a delete
  marker has no such version and is absent, as in a plain listing;
- versioned bucket ``as_of`` T: the newest entry (version or delete marker) with
  ``LastModified <= T``; a delete marker there hides the key, and a key with no entry that old
  did not exist yet. Entries with equal LastModified (a key written twice within the clock's
  resolution) are ranked: ``IsLatest`` first, then a version before a delete marker, then the
  one S3 lists first. botocore splits a page into separate Versions and DeleteMarkers lists and
  loses their interleaving, so the choice is made by time, never by position.
  A key's entries may span pages: a key is decided only when a greater key (or a common
  prefix, or the end) arrives.

Concurrency (``list_ordered``): the prefix is first listed with ``Delimiter="/"``; its own keys
come from that listing, and each common prefix (``sub/``) becomes a *unit* listed in full
(no delimiter) by a worker thread. Units are consumed strictly in key order, so the output is
exactly the single-threaded listing's, while up to ``workers`` units are fetched ahead. Memory is
bounded: each unit hands over batches through a queue of ``_UNIT_QUEUE`` batches and blocks
when it is full; at most ``2 * workers`` units (and ``_MAX_PENDING_REFS`` top-level refs) wait
in the window. Units are started in order on a FIFO pool, so the unit being consumed is always
running or done: no deadlock. A consumer that stops early (an error, ``close()``) sets the stop
flag; workers notice within ``_POLL`` seconds and the pool is shut down before returning.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import S3RequestError, UnsupportedError
from .model import ObjectRef, normalize_etag

Page = dict[str, Any]
_ITEM_LISTS = ("Contents", "Versions", "DeleteMarkers")
Fetch = Callable[[str, "str | None"], Iterable[Page]]
DELIMITER = "/"
_BATCH = 500  # refs per hand-over from a unit worker to the consumer
_UNIT_QUEUE = 4  # batches a unit may have waiting before its worker blocks
_MAX_PENDING_REFS = 5000  # top-level refs held behind an unfinished unit before we wait on it
_POLL = 0.2  # seconds between a blocked worker's checks of the stop flag


@dataclass(frozen=True)
class Selection:
    """Which object of each key to pin (see the module docstring)."""

    versioned: bool
    as_of: float | None = None  # seconds since the epoch; only on a versioned bucket

    def __post_init__(self) -> None:
        if self.as_of is not None and not self.versioned:
            raise ValueError("as_of needs a versioned listing")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One listed object or delete marker, in the page's key order."""

    key: str
    item: Page
    is_marker: bool


def _page_events(page: Page, selection: Selection) -> list[_Entry | str]:
    """The page's entries and common prefixes (as ``str``), merged in key order."""
    events: list[tuple[str, _Entry | str]] = []
    if selection.versioned:
        events += [(i["Key"], _Entry(i["Key"], i, False)) for i in page.get("Versions", ())]
        events += [(i["Key"], _Entry(i["Key"], i, True)) for i in page.get("DeleteMarkers", ())]
    else:
        events += [(i["Key"], _Entry(i["Key"], i, False)) for i in page.get("Contents", ())]
    events += [(p["Prefix"], p["Prefix"]) for p in page.get("CommonPrefixes", ())]
    events.sort(key=lambda pair: pair[0])  # stable: a key's entries keep S3's order
    return [event for _, event in events]


def _rank(entry: _Entry) -> tuple[float, bool, bool]:
    item = entry.item
    return (item["LastModified"].timestamp(), bool(item.get("IsLatest")), not entry.is_marker)


class _Chooser:
    """Folds the entries of consecutive keys into one pinned ref per key (see Selection)."""

    def __init__(self, bucket: str, selection: Selection) -> None:
        self._bucket = bucket
        self._selection = selection
        self._key: str | None = None
        self._best: _Entry | None = None
        self._best_rank: tuple[float, bool, bool] | None = None

    def feed(self, entry: _Entry) -> ObjectRef | None:
        """Take one entry; return the ref of the previous key if this one starts a new key."""
        done = self.flush() if entry.key != self._key else None
        self._key = entry.key
        if self._eligible(entry):
            rank = _rank(entry)
            if self._best_rank is None or rank > self._best_rank:
                self._best, self._best_rank = entry, rank
        return done

    def flush(self) -> ObjectRef | None:
        """Decide the pending key: its pinned ref, or None if it is absent."""
        best, self._key, self._best, self._best_rank = self._best, None, None, None
        if best is None or best.is_marker:
            return None
        return to_ref(self._bucket, best.item, versioned=self._selection.versioned)

    def _eligible(self, entry: _Entry) -> bool:
        selection = self._selection
        if selection.as_of is not None:
            return entry.item["LastModified"].timestamp() <= selection.as_of
        if selection.versioned:  # the current version only; a latest delete marker hides
            return bool(entry.item.get("IsLatest"))
        return True


def to_ref(bucket: str, item: Page, *, versioned: bool) -> ObjectRef:
    """The ``ObjectRef`` of one listed object (``Contents`` or ``Versions`` item)."""
    uri = f"s3://{bucket}/{item['Key']}"
    return ObjectRef(
        bucket=bucket,
        key=item["Key"],
        version_id=required(item, "VersionId", uri) if versioned else None,
        etag=pinnable_etag(item.get("ETag"), uri),
        size=int(required(item, "Size", uri)),
        last_modified=required(item, "LastModified", uri).timestamp(),
    )


def pinnable_etag(etag: str | None, uri: str) -> str:
    """``etag`` in S3's quoted form (some stores send it bare: ``If-Match`` and every comparison
    need one form); a store that sends none cannot pin anything."""
    if not etag or not etag.strip().strip('"'):
        raise S3RequestError(
            f"{uri}: S3 sent no ETag for it, and s3datafs pins every object by its ETag: "
            "this store cannot be mounted"
        )
    return normalize_etag(etag)


def required(fields: Page, name: str, uri: str) -> Any:
    """A field every S3 answer about an object has; a store that leaves it out is refused."""
    value = fields.get(name)
    if value is None:
        raise S3RequestError(f"{uri}: S3 sent no {name} for it: this store cannot be mounted")
    return value


def checked_pages(pages: Iterable[Page], uri: str, *, versioned: bool) -> Iterator[Page]:
    """``pages`` as the paginator hands them out, refused where a store breaks the listing's
    rules: botocore's paginator stops quietly at a page that says more follow but carries no
    token (a mount of part of the data, with no word said), and only refuses a token sent twice
    in a row (one that comes back later lists forever). Keys must not go back either: each page
    starts at or after where the one before ended (a key's versions may span two pages).
    """
    tokens: set[object] = set()
    last = ""
    for page in pages:
        keys = [item["Key"] for name in _ITEM_LISTS for item in page.get(name, ())]
        keys += [common["Prefix"] for common in page.get("CommonPrefixes", ())]
        if keys and min(keys) < last:
            if _is_directory_bucket(uri):
                raise UnsupportedError(
                    f"listing {uri}: an S3 Express One Zone directory bucket lists its keys in "
                    "no particular order, and s3datafs cannot mount one of its prefixes yet: "
                    "copy the dataset to a general purpose bucket, or mount single objects"
                )
            raise S3RequestError(
                f"listing {uri}: S3 sent a page of keys that goes back before the page it "
                "followed: this store's listing cannot be trusted, so nothing is mounted"
            )
        last = max(keys, default=last)
        if page.get("IsTruncated"):
            token = page.get("NextKeyMarker") if versioned else page.get("NextContinuationToken")
            if not token:
                raise S3RequestError(
                    f"listing {uri}: S3 said more keys follow but sent no continuation token: "
                    "the listing would be cut short, so nothing is mounted"
                )
            token = (token, page.get("NextVersionIdMarker"))
            if token in tokens:
                raise S3RequestError(
                    f"listing {uri}: S3 sent a continuation token it had sent before: the "
                    "listing would never end, so nothing is mounted"
                )
            tokens.add(token)
        yield page


def _is_directory_bucket(uri: str) -> bool:
    """Whether ``uri`` (``s3://bucket/...``) is in a directory bucket (``name--zone--x-s3``)."""
    return uri.removeprefix("s3://").partition("/")[0].endswith("--x-s3")


def pin_pages(
    bucket: str, pages: Iterable[Page], selection: Selection
) -> Iterator[ObjectRef | str]:
    """Pinned refs, and the common prefixes (``str``) between them, in key order."""
    chooser = _Chooser(bucket, selection)
    for page in pages:
        for event in _page_events(page, selection):
            if isinstance(event, str):
                ref = chooser.flush()
                if ref is not None:
                    yield ref
                yield event
                continue
            ref = chooser.feed(event)
            if ref is not None:
                yield ref
    ref = chooser.flush()
    if ref is not None:
        yield ref


def select_key(
    bucket: str, key: str, pages: Iterable[Page], selection: Selection
) -> ObjectRef | None:
    """The pinned ref of exactly ``key`` from a listing with ``Prefix=key``, or None.

    ``key`` sorts before every other key it prefixes, so its entries come first and reading
    stops at the first greater key: usually one page, however many keys share the prefix.
    """
    chooser = _Chooser(bucket, selection)
    for page in pages:
        for event in _page_events(page, selection):
            if isinstance(event, str) or event.key != key:
                if isinstance(event, str) or event.key > key:
                    return chooser.flush()
                continue
            chooser.feed(event)
    return chooser.flush()


def list_ordered(
    fetch: Fetch, bucket: str, prefix: str, selection: Selection, *, workers: int
) -> Iterator[ObjectRef]:
    """Every pinned ref under ``prefix`` in key order, sub-prefixes listed concurrently."""
    if workers <= 1:
        for event in pin_pages(bucket, fetch(prefix, None), selection):
            assert isinstance(event, ObjectRef), "a listing without delimiter has no prefixes"
            yield event
        return
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3datafs-list")
    try:
        window = _Window(max_units=2 * workers)
        for event in pin_pages(bucket, fetch(prefix, DELIMITER), selection):
            if isinstance(event, str):
                window.append(_Unit.start(pool, stop, fetch, bucket, event, selection))
            else:
                window.append(event)
            yield from window.ready()
        yield from window.rest()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class _Window:
    """Refs and units in key order; hands out what is ready, waits only when too full."""

    def __init__(self, *, max_units: int) -> None:
        self._items: collections.deque[ObjectRef | _Unit] = collections.deque()
        self._units = 0
        self._max_units = max_units

    def append(self, item: ObjectRef | _Unit) -> None:
        self._items.append(item)
        self._units += isinstance(item, _Unit)

    def ready(self) -> Iterator[ObjectRef]:
        """Refs at the head; a head unit is waited on only while the window is too full."""
        while self._items:
            too_full = self._units > self._max_units or len(self._items) > _MAX_PENDING_REFS
            if isinstance(self._items[0], _Unit) and not too_full:
                return
            yield from self._pop()

    def rest(self) -> Iterator[ObjectRef]:
        while self._items:
            yield from self._pop()

    def _pop(self) -> Iterator[ObjectRef]:
        head = self._items.popleft()
        if isinstance(head, _Unit):
            self._units -= 1
            yield from head.results()
        else:
            yield head


class _Unit:
    """One common prefix listed in full by a worker; results handed over in order."""

    _DONE = object()

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_UNIT_QUEUE)

    @classmethod
    def start(
        cls,
        pool: ThreadPoolExecutor,
        stop: threading.Event,
        fetch: Fetch,
        bucket: str,
        prefix: str,
        selection: Selection,
    ) -> _Unit:
        unit = cls(stop)
        pool.submit(unit._run, fetch, bucket, prefix, selection)
        return unit

    def results(self) -> Iterator[ObjectRef]:
        """The unit's refs in order; re-raises the worker's exception in the consumer."""
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def _run(self, fetch: Fetch, bucket: str, prefix: str, selection: Selection) -> None:
        batch: list[ObjectRef] = []
        try:
            for ref in pin_pages(bucket, fetch(prefix, None), selection):
                assert isinstance(ref, ObjectRef), "a listing without delimiter has no prefixes"
                batch.append(ref)
                if len(batch) >= _BATCH:
                    self._put(batch)
                    batch = []
            self._put(batch)
            self._put(self._DONE)
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, which raises it in order
            try:
                self._put(exc)
            except _Stopped:
                return

    def _put(self, item: Any) -> None:
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                self._queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue


class _Stopped(Exception):
    """The consumer went away: the worker stops listing."""
