"""devtools/s3fastlist.py: the fast listings return exactly what moto's own methods return.

Random buckets (versioned or not; overwrites, delete markers, deleted versions, keys with and
without delimiters, non-ASCII) and random arguments; every page of a full pagination is compared
item by item with moto's original method on the same in-process backend. Plus the index's
invalidation and bulk population.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devtools import s3fastlist  # noqa: E402

moto_models = pytest.importorskip("moto.s3.models")
ACCOUNT = "123456789012"

KEYS = st.text(alphabet="ab/-é", min_size=1, max_size=4)  # small: keys collide, versions pile up
ACTIONS = st.lists(
    st.tuples(st.sampled_from(["put", "put", "put", "delete", "drop-version"]), KEYS),
    min_size=0,
    max_size=60,
)
PREFIXES = st.sampled_from(["", "a", "a/", "b/", "é", "zz"])
DELIMITERS = st.sampled_from([None, "/", "-"])
MAX_KEYS = st.integers(min_value=0, max_value=6)


def make_bucket(actions: list[tuple[str, str]], *, versioned: bool) -> tuple[Any, str]:
    backend = moto_models.S3Backend("us-east-1", ACCOUNT)
    name = f"b-{uuid.uuid4().hex[:12]}"
    backend.create_bucket(name, "us-east-1")
    if versioned:
        backend.put_bucket_versioning(name, "Enabled")
    for action, key in actions:
        if action == "put":
            backend.put_object(name, key, key.encode() * 2, disable_notification=True)
        elif action == "delete":
            backend.delete_object(name, key)
        else:
            versions = backend.get_bucket(name).keys.getlist(key, [])
            if versions:
                backend.delete_object(name, key, version_id=versions[0].version_id)
    return backend, name


def _v2_page(result: tuple[list[Any], bool, str | None]) -> tuple[Any, ...]:
    items, truncated, token = result
    return tuple(i if isinstance(i, str) else ("key", id(i)) for i in items), truncated, token


def _versions_page(result: tuple[Any, ...]) -> tuple[Any, ...]:
    versions, prefixes, markers, next_key, next_version = result

    def shape(items: list[Any]) -> tuple[Any, ...]:
        return tuple((i.name, i.version_id, i.is_latest) for i in items)

    return shape(versions), tuple(prefixes), shape(markers), next_key, next_version


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.booleans(), PREFIXES, DELIMITERS, MAX_KEYS, st.sampled_from([None, "a", "b/"]))
def test_list_objects_v2_pages_equal_moto(
    actions: list[tuple[str, str]],
    versioned: bool,
    prefix: str,
    delimiter: str | None,
    max_keys: int,
    start_after: str | None,
) -> None:
    backend, name = make_bucket(actions, versioned=versioned)
    bucket = backend.get_bucket(name)
    token = None
    for _ in range(50):
        args = (bucket, prefix, delimiter, token, start_after, max_keys)
        original = backend.list_objects_v2(*args)
        fast = s3fastlist.fast_list_objects_v2(backend, *args)
        assert _v2_page(fast) == _v2_page(original)
        token = original[2]
        if not original[1] or max_keys == 0:
            break


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, st.booleans(), PREFIXES, DELIMITERS, st.integers(min_value=1, max_value=6))
def test_list_object_versions_pages_equal_moto(
    actions: list[tuple[str, str]],
    versioned: bool,
    prefix: str,
    delimiter: str | None,
    max_keys: int,
) -> None:
    backend, name = make_bucket(actions, versioned=versioned)
    key_marker = version_marker = None
    for _ in range(60):
        kwargs = {
            "delimiter": delimiter,
            "key_marker": key_marker,
            "max_keys": max_keys,
            "prefix": prefix,
            "version_id_marker": version_marker,
        }
        original = backend.list_object_versions(name, **kwargs)
        fast = s3fastlist.fast_list_object_versions(backend, name, **kwargs)
        assert _versions_page(fast) == _versions_page(original)
        key_marker, version_marker = original[3], original[4]
        if key_marker is None:
            break


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS, KEYS | st.just(""), DELIMITERS, st.data())
def test_arbitrary_markers_equal_moto(
    actions: list[tuple[str, str]], key_marker: str, delimiter: str | None, data: st.DataObject
) -> None:
    backend, name = make_bucket(actions, versioned=True)
    existing = [v.version_id for v in backend.get_bucket(name).keys.getlist(key_marker, [])]
    version_marker = data.draw(st.sampled_from([None, "", "no-such-version", *existing]))
    kwargs = {
        "delimiter": delimiter,
        "key_marker": key_marker,
        "max_keys": 3,
        "prefix": "",
        "version_id_marker": version_marker,
    }
    original = backend.list_object_versions(name, **kwargs)
    fast = s3fastlist.fast_list_object_versions(backend, name, **kwargs)
    assert _versions_page(fast) == _versions_page(original)


def test_the_index_follows_every_change_of_the_key_set() -> None:
    s3fastlist._track_key_stores()
    backend, name = make_bucket([("put", "a"), ("put", "c")], versioned=False)
    store = backend.get_bucket(name).keys
    assert s3fastlist.key_index(store) == ["a", "c"]
    backend.delete_object(name, "a")
    backend.put_object(name, "b", b"x", disable_notification=True)  # same size, other keys
    assert s3fastlist.key_index(store) == ["b", "c"]


def test_populate_creates_checkable_objects_in_process() -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    name = f"p-{uuid.uuid4().hex[:12]}"
    backend.create_bucket(name, "us-east-1")
    try:
        result = s3fastlist.populate({"bucket": name, "objects": [["d/x", 100], ["d/y", 0]]})
        assert result == {"bucket": name, "created": 2}
        stored = backend.get_object(name, "d/x")
        assert stored.value == s3fastlist.content("d/x", 100)
        assert len(stored.value) == 100
        assert backend.get_object(name, "d/y").value == b""
        with pytest.raises(Exception, match="NoSuchBucket|does not exist"):
            s3fastlist.populate({"bucket": name + "-missing", "objects": [["k", 1]]})
    finally:
        backend.delete_object(name, "d/x")
        backend.delete_object(name, "d/y")
        backend.delete_bucket(name)
