"""listing: which version of each key is pinned, and the ordered concurrent lister.

Pages are plain dicts in botocore's shape, served by ``PageServer`` (an in-memory S3 listing
with page size, prefix and delimiter, Versions and DeleteMarkers split as botocore splits them),
so page boundaries can be put anywhere, including inside one key's versions.
"""

from __future__ import annotations

import datetime
import io
import itertools
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from s3datafs.errors import S3RequestError, UnsupportedError
from s3datafs.listing import (
    Selection,
    checked_pages,
    list_ordered,
    pin_pages,
    pinnable_etag,
    select_key,
)

BUCKET = "bkt"
T0 = 1_700_000_000.0


def when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(T0 + seconds, tz=datetime.UTC)


class PageServer:
    """Versions (newest first per key, as S3 lists them) served as pages of ``page_size``."""

    def __init__(self, entries: list[dict[str, Any]], *, page_size: int = 1000) -> None:
        self.entries = sorted(entries, key=lambda e: (e["Key"], -e["LastModified"].timestamp()))
        self.page_size = page_size
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.fail_prefix: str | None = None
        self.delay = 0.0

    def fetch(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        with self.lock:
            self.requests.append((prefix, delimiter))
        if self.fail_prefix == prefix:
            raise RuntimeError(f"listing {prefix} failed")
        items: list[tuple[str, Any]] = []
        seen_prefixes: set[str] = set()
        for entry in self.entries:
            key = entry["Key"]
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter)[0] + delimiter
                if common not in seen_prefixes:
                    seen_prefixes.add(common)
                    items.append(("prefix", common))
                continue
            items.append(("entry", entry))
        for start in range(0, len(items), self.page_size):
            time.sleep(self.delay)
            page: dict[str, Any] = {"Versions": [], "DeleteMarkers": [], "CommonPrefixes": []}
            for kind, item in items[start : start + self.page_size]:
                if kind == "prefix":
                    page["CommonPrefixes"].append({"Prefix": item})
                elif item.get("marker"):
                    page["DeleteMarkers"].append(item)
                else:
                    page["Versions"].append(item)
            yield page


def version(key: str, at: float, vid: str, *, latest: bool = False, size: int = 1) -> dict:
    return {
        "Key": key,
        "VersionId": vid,
        "IsLatest": latest,
        "LastModified": when(at),
        "ETag": f'"{vid}"',
        "Size": size,
    }


def marker(key: str, at: float, vid: str, *, latest: bool = False) -> dict:
    return {
        "Key": key,
        "VersionId": vid,
        "IsLatest": latest,
        "LastModified": when(at),
        "marker": True,
    }


HISTORY = [
    version("p/a", 1, "a1"),
    version("p/a", 3, "a2"),
    version("p/a", 5, "a3", latest=True),
    version("p/b", 1, "b1"),
    marker("p/b", 4, "bm", latest=True),
    version("p/c", 2, "c1"),
    marker("p/c", 3, "cm"),
    version("p/c", 6, "c2", latest=True),
    version("p/d/e", 4, "e1", latest=True),
]


def pinned(entries: list[dict], selection: Selection, *, page_size: int) -> dict[str, str]:
    server = PageServer(entries, page_size=page_size)
    refs = pin_pages(BUCKET, server.fetch("p/", None), selection)
    return {r.key: r.version_id for r in refs}


@pytest.mark.parametrize("page_size", [1, 2, 3, 1000])
def test_latest_versions_skip_keys_whose_latest_is_a_delete_marker(page_size: int) -> None:
    assert pinned(HISTORY, Selection(True), page_size=page_size) == {
        "p/a": "a3",
        "p/c": "c2",
        "p/d/e": "e1",
    }


@pytest.mark.parametrize("page_size", [1, 2, 3, 1000])
@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (0.5, {}),
        (1, {"p/a": "a1", "p/b": "b1"}),
        (2.5, {"p/a": "a1", "p/b": "b1", "p/c": "c1"}),
        (3, {"p/a": "a2", "p/b": "b1"}),  # c deleted at 3
        (4.9, {"p/a": "a2", "p/d/e": "e1"}),  # b deleted at 4, e created at 4
        (100, {"p/a": "a3", "p/c": "c2", "p/d/e": "e1"}),
    ],
)
def test_as_of_picks_the_version_current_then(page_size: int, at: float, expected: dict) -> None:
    assert pinned(HISTORY, Selection(True, T0 + at), page_size=page_size) == expected


def test_equal_times_prefer_is_latest_then_a_version_over_a_delete_marker() -> None:
    tie = [version("k", 5, "old"), marker("k", 5, "m"), version("k", 5, "new", latest=True)]
    assert pinned([dict(e, Key="p/k") for e in tie], Selection(True, T0 + 9), page_size=1) == {
        "p/k": "new"
    }
    no_latest = [marker("p/k", 5, "m"), version("p/k", 5, "v"), version("p/k", 6, "x", latest=1)]
    assert pinned(no_latest, Selection(True, T0 + 5), page_size=2) == {"p/k": "v"}


def test_unversioned_pages_pin_by_etag_only() -> None:
    page = {"Contents": [{"Key": "p/x", "ETag": '"e"', "Size": 3, "LastModified": when(0)}]}
    (ref,) = pin_pages(BUCKET, [page], Selection(False))
    assert (ref.key, ref.version_id, ref.etag, ref.size) == ("p/x", None, '"e"', 3)


def test_as_of_needs_a_versioned_listing() -> None:
    with pytest.raises(ValueError, match="versioned"):
        Selection(False, T0)


def test_select_key_reads_only_the_key_itself() -> None:
    entries = [
        version("p/a", 1, "a1"),
        version("p/a", 2, "a2", latest=True),
        version("p/a/under", 1, "u1", latest=True),
        version("p/ab", 1, "x", latest=True),
    ]
    server = PageServer(entries, page_size=1)
    found = select_key(BUCKET, "p/a", server.fetch("p/a", None), Selection(True, T0 + 1.5))
    assert found is not None
    assert found.version_id == "a1"
    assert select_key(BUCKET, "p/a", server.fetch("p/a", None), Selection(True, T0)) is None


def big_tree() -> list[dict]:
    entries = [version(f"p/top{i}", 1, f"t{i}", latest=True) for i in range(5)]
    for d in range(12):
        for f in range(30):
            entries.append(version(f"p/d{d:02d}/f{f:02d}", 1, f"v{d}-{f}", latest=True))
        entries.append(version(f"p/d{d:02d}/", 1, f"m{d}", latest=True))
    entries.append(version("p/d05.txt", 1, "between", latest=True))  # sorts inside the dirs
    return entries


@pytest.mark.parametrize("workers", [1, 2, 8])
def test_ordered_lister_equals_a_sequential_listing(workers: int) -> None:
    server = PageServer(big_tree(), page_size=7)
    expected = [r.key for r in pin_pages(BUCKET, server.fetch("p/", None), Selection(True))]
    assert expected == sorted(expected)
    got = list_ordered(server.fetch, BUCKET, "p/", Selection(True), workers=workers)
    assert [r.key for r in got] == expected
    if workers > 1:
        assert ("p/", "/") in server.requests
        assert ("p/d03/", None) in server.requests


def test_a_failing_unit_raises_in_order_and_stops_the_workers() -> None:
    server = PageServer(big_tree(), page_size=5)
    server.fail_prefix = "p/d04/"
    seen: list[str] = []
    refs = list_ordered(server.fetch, BUCKET, "p/", Selection(True), workers=4)
    with pytest.raises(RuntimeError, match="listing p/d04/ failed"):
        seen.extend(ref.key for ref in refs)
    assert seen[-1] == "p/d03/f29"  # everything before the failing unit, nothing after
    assert not [t for t in threading.enumerate() if t.name.startswith("s3datafs-list")]


def test_a_consumer_that_stops_early_leaves_no_worker_behind() -> None:
    server = PageServer(big_tree(), page_size=3)
    server.delay = 0.001
    refs = list_ordered(server.fetch, BUCKET, "p/", Selection(True), workers=4)
    assert next(refs).key == "p/d00/"
    refs.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("s3datafs-list")]


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:00:00.000Z",
        "2024-05-01T12:00:00.123Z",
        "Wed, 01 May 2024 12:00:00 GMT",
        "Wed, 1 May 2024 12:00:00 GMT",
        "Wed, 01 May 2024 12:00:00 -0000",
        "Wed, 01 May 2024 14:00:00 +0200",
        "2024-05-01T14:00:00+02:00",
        "1714564800",
    ],
)
def test_fast_timestamps_equal_botocores(text: str) -> None:
    import botocore.utils

    from s3datafs.s3source import parse_timestamp

    assert parse_timestamp(text) == botocore.utils.parse_timestamp(text)
    assert parse_timestamp(text).tzinfo is not None


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_and_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3datafs import progress

    monkeypatch.setattr(progress, "_REDRAW", 0.0)
    terminal = FakeTerminal()
    assert list(progress.counted(range(2500), "listing", terminal)) == list(range(2500))
    assert "s3datafs: listing: 2,000 objects (" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\033[K")
    quiet = io.StringIO()
    assert list(progress.counted(range(2500), "listing", quiet)) == list(range(2500))
    assert quiet.getvalue() == ""



def test_progress_shows_the_rate_and_redraws_at_most_every_quarter_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clock (read once per 1000 items) says 0.1 s more at every read: a line is due at
    3,000 and 6,000 items, each with the rate since the start."""
    from s3datafs import progress

    clock = itertools.count()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(clock) / 10))
    terminal = FakeTerminal()
    assert list(progress.counted(range(6500), "listing", terminal)) == list(range(6500))
    lines = [line for line in terminal.getvalue().split("\r\033[K") if line]
    assert lines == ["s3datafs: listing: 3,000 objects (10,000/s)",
                     "s3datafs: listing: 6,000 objects (10,000/s)"]


def test_a_stream_that_cannot_say_whether_it_is_a_terminal_gets_nothing() -> None:
    from s3datafs import progress

    closed = io.StringIO()
    closed.close()  # isatty() raises ValueError now, as would any write
    assert list(progress.counted(range(3), "listing", closed)) == [0, 1, 2]


# -- a store's listing is checked, not trusted -----------------------------------------------------


def test_a_keys_versions_may_span_several_pages() -> None:
    """A key with more versions than a page holds comes back on the next pages, under the same
    NextKeyMarker with another NextVersionIdMarker: neither keys going back nor a token sent
    twice, so the listing is taken whole."""
    history = [version("p/a", t, f"a{t}", latest=t == 5) for t in range(5, 0, -1)]
    pages = [
        {"Versions": history[0:2], "IsTruncated": True,
         "NextKeyMarker": "p/a", "NextVersionIdMarker": "a4"},
        {"Versions": history[2:4], "IsTruncated": True,
         "NextKeyMarker": "p/a", "NextVersionIdMarker": "a2"},
        {"Versions": [history[4], version("p/b", 1, "b1", latest=True)], "IsTruncated": False},
    ]
    assert list(checked_pages(pages, "s3://bkt/p/", versioned=True)) == pages


def test_a_page_starting_before_the_greatest_key_of_the_one_before_is_refused() -> None:
    """Keys never go back, measured from the greatest key of the page before, common prefixes
    included (S3 lists them merged in key order; botocore hands them apart)."""
    first = {"Contents": [version("p/a", 1, "a"), version("p/c", 1, "c")],
             "CommonPrefixes": [{"Prefix": "p/b/"}], "IsTruncated": True,
             "NextContinuationToken": "t1"}
    back = {"Contents": [version("p/bz", 1, "bz")], "IsTruncated": False}
    with pytest.raises(S3RequestError, match="goes back"):
        list(checked_pages([first, back], "s3://bkt/p/", versioned=False))


def test_a_directory_buckets_listing_out_of_order_is_named_as_unsupported() -> None:
    """S3 Express One Zone lists in no particular order: not a store to distrust, but one we
    cannot list in key order yet, said so."""
    first = {"Contents": [version("p/c", 1, "c")], "IsTruncated": True,
             "NextContinuationToken": "t1"}
    back = {"Contents": [version("p/a", 1, "a")], "IsTruncated": False}
    with pytest.raises(UnsupportedError, match="S3 Express One Zone directory bucket"):
        list(checked_pages([first, back], "s3://data--use1-az4--x-s3/p/", versioned=False))


@pytest.mark.parametrize("etag", [None, "", '""', " "])
def test_a_listed_object_without_a_real_etag_cannot_be_pinned(etag: str | None) -> None:
    with pytest.raises(S3RequestError, match="no ETag"):
        pinnable_etag(etag, "s3://bkt/p/x")


def test_a_bare_etag_is_pinned_in_s3s_quoted_form() -> None:
    assert pinnable_etag("abc", "s3://bkt/p/x") == '"abc"'
    assert pinnable_etag('"abc"', "s3://bkt/p/x") == '"abc"'


def test_a_continuation_token_that_comes_back_is_refused_even_when_keys_do_not_go_back() -> None:
    """A store whose tokens lead round in a cycle through an empty page sends the same keys
    again, never going back: only the token seen before tells the listing would never end."""
    first = {"Contents": [version("p/a", 1, "a")], "IsTruncated": True,
             "NextContinuationToken": "t1"}
    second = {"Contents": [version("p/c", 1, "c")], "IsTruncated": True,
              "NextContinuationToken": "t2"}
    empty = {"IsTruncated": True, "NextContinuationToken": "t3"}  # t3 leads to second again
    pages = itertools.islice(itertools.chain([first], itertools.cycle([second, empty])), 100)
    with pytest.raises(S3RequestError, match="sent before"):
        list(checked_pages(pages, "s3://bkt/p/", versioned=False))
