"""--as-of without a server: parsing the time, and resolving against the in-memory fake.

The fake's clock ticks one second per write, so every version has a known LastModified.
"""

from __future__ import annotations

import pytest
from fakes import FakeSource

from s3datafs.config import format_time, parse_as_of, parse_time
from s3datafs.errors import NotFoundError, PinMismatchError, UnsupportedError, UsageError
from s3datafs.resolve import Pins, resolve
from s3datafs.uri import parse_s3_uri

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00Z", NOW - 7200),
        ("2024-05-01T10:00:00", NOW - 7200),  # naive means UTC
        ("2024-05-01 12:00:00+02:00", NOW - 7200),
        ("2024-05-01", NOW - 12 * 3600),
        ("2024-05-01T11:59:59.250Z", NOW - 0.75),
        ("30m", NOW - 1800),
        ("12h", NOW - 43200),
        ("7d", NOW - 7 * 86400),
        ("2w", NOW - 14 * 86400),
    ],
)
def test_times_parse(text: str, expected: float) -> None:
    assert parse_as_of(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "", "7x", "-3d", "2024-13-01", "12:00"])
def test_unparseable_times_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="is not a time"):
        parse_as_of(text, NOW)


def test_the_future_is_refused() -> None:
    with pytest.raises(UsageError, match="in the future"):
        parse_as_of("2024-05-01T12:00:01Z", NOW)


def test_times_are_kept_to_the_millisecond_and_round_trip() -> None:
    parsed = parse_as_of("2024-05-01T11:00:00.123456Z", NOW)
    assert format_time(parsed) == "2024-05-01T11:00:00.123Z"
    assert parse_time(format_time(parsed)) == parsed
    assert format_time(parse_as_of("2024-05-01T11:00:00Z", NOW)) == "2024-05-01T11:00:00Z"


@pytest.fixture
def history() -> tuple[FakeSource, dict[str, float]]:
    """t1: a=1, b=1; t2: a=2; t3: b deleted, c created; t4: a deleted; t5: a=3 (clock +1s)."""
    source = FakeSource(start_time=NOW - 100)
    source.create_bucket("bkt", versioned=True)
    times = {}
    source.put("bkt", "p/a", b"a1")
    source.put("bkt", "p/b", b"b1")
    times["t1"] = source.put("bkt", "p/one", b"x").last_modified
    times["t2"] = source.put("bkt", "p/a", b"a2").last_modified
    source.delete("bkt", "p/b")
    times["t3"] = source.put("bkt", "p/c", b"c1").last_modified
    source.delete("bkt", "p/a")
    times["t4"] = source.put("bkt", "p/one", b"y").last_modified
    return source, times


def etags_by_key(source: FakeSource, uri: str, as_of: float) -> dict[str, str]:
    resolution = resolve(source, parse_s3_uri(uri), Pins(), as_of)
    return {ref.key: ref.etag for ref in resolution.refs}


def test_prefix_as_of_each_time(history) -> None:
    source, times = history
    assert set(etags_by_key(source, "s3://bkt/p/", times["t1"])) == {"p/a", "p/b", "p/one"}
    assert set(etags_by_key(source, "s3://bkt/p/", times["t3"])) == {"p/a", "p/c", "p/one"}
    assert set(etags_by_key(source, "s3://bkt/p/", times["t4"])) == {"p/c", "p/one"}
    assert source.calls["list_latest"] == 0


def test_single_object_as_of_and_absent_then(history) -> None:
    source, times = history
    resolution = resolve(source, parse_s3_uri("s3://bkt/p/a"), Pins(), times["t1"])
    assert resolution.single_object
    assert resolution.as_of == times["t1"]
    (ref,) = resolution.refs
    assert ref.size == 2
    with pytest.raises(NotFoundError, match="as of"):
        resolve(source, parse_s3_uri("s3://bkt/p/a"), Pins(), times["t4"])
    with pytest.raises(NotFoundError, match="as of"):
        resolve(source, parse_s3_uri("s3://bkt/p/"), Pins(), NOW - 1000)


def test_as_of_is_refused_on_an_unversioned_bucket_before_any_listing() -> None:
    source = FakeSource()
    source.create_bucket("plain")
    source.put("plain", "p/x", b"x")
    with pytest.raises(UnsupportedError, match="not versioned"):
        resolve(source, parse_s3_uri("s3://plain/p/"), Pins(), NOW)
    source.deny_versioning = True
    with pytest.raises(UnsupportedError, match="GetBucketVersioning was denied"):
        resolve(source, parse_s3_uri("s3://plain/p/"), Pins(), NOW)
    assert source.calls["list_as_of"] == source.calls["list_latest"] == 0


def test_as_of_with_version_id_is_a_usage_error(history) -> None:
    source, times = history
    with pytest.raises(UsageError, match="--as-of and --version-id"):
        resolve(source, parse_s3_uri("s3://bkt/p/a"), Pins(version_id="x"), times["t1"])


def test_single_object_as_of_honours_an_etag_pin(history) -> None:
    """``--as-of`` picks the version, ``--etag`` says what it must be: a version of other bytes
    is refused, never mounted in place of the one asked for."""
    source, times = history
    then = etags_by_key(source, "s3://bkt/p/", times["t1"])["p/a"]  # a1
    later = etags_by_key(source, "s3://bkt/p/", times["t2"])["p/a"]  # a2
    assert then != later
    uri = parse_s3_uri("s3://bkt/p/a")
    with pytest.raises(PinMismatchError, match="ETag mismatch"):
        resolve(source, uri, Pins(etag=later), times["t1"])
    (ref,) = resolve(source, uri, Pins(etag=then), times["t1"]).refs
    assert ref.etag == then
