"""resolve() against FakeSource: what a URI and its pins name, and every refusal.

Each test builds its own small bucket; the fake's call counters show which S3 calls were made
(pins on a prefix must be refused before any).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from fakes import FakeSource

from s3datafs.errors import MissingPermissionError, NotFoundError, PinMismatchError, UsageError
from s3datafs.model import ObjectRef
from s3datafs.resolve import Pins, Resolution, resolve
from s3datafs.uri import parse_s3_uri

BUCKET = "bkt"


def make_source(*, versioned: bool = False) -> FakeSource:
    source = FakeSource()
    source.create_bucket(BUCKET, versioned=versioned)
    return source


def run(
    source: FakeSource, uri: str, pins: Pins | None = None
) -> tuple[Resolution, list[ObjectRef]]:
    resolution = resolve(source, parse_s3_uri(uri), pins or Pins())
    return resolution, list(resolution.refs)


# -- single objects -------------------------------------------------------------------------------


def test_an_object_is_a_single_object_dataset_rooted_at_its_parent() -> None:
    source = make_source()
    pinned = source.put(BUCKET, "dir/sub/file.bin", b"hello")
    source.put(BUCKET, "dir/sub/sibling.bin", b"not part of it")
    resolution, refs = run(source, "s3://bkt/dir/sub/file.bin")
    assert resolution.single_object
    assert resolution.prefix == "dir/sub/"
    assert not resolution.versioned
    assert resolution.uri == parse_s3_uri("s3://bkt/dir/sub/file.bin")
    assert refs == [pinned]
    assert source.calls["list_latest"] == 0


def test_an_object_at_the_bucket_root_has_an_empty_prefix() -> None:
    source = make_source()
    source.put(BUCKET, "file.bin", b"x")
    resolution, _ = run(source, "s3://bkt/file.bin")
    assert resolution.single_object
    assert resolution.prefix == ""


def test_a_key_with_a_leading_slash_is_shown_under_its_name() -> None:
    source = make_source()
    pinned = source.put(BUCKET, "/x.bin", b"x")
    resolution, refs = run(source, "s3://bkt//x.bin")
    assert (resolution.prefix, refs) == ("/", [pinned])


def test_the_version_asked_for_is_the_pin_even_when_head_does_not_echo_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = make_source(versioned=True)
    older = source.put(BUCKET, "a.bin", b"one")
    source.put(BUCKET, "a.bin", b"two")
    real_head = source.head

    def head_without_version(bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        ref = real_head(bucket, key, version_id)  # some S3-compatible stores send no header
        return ObjectRef(ref.bucket, ref.key, None, ref.etag, ref.size, ref.last_modified)

    monkeypatch.setattr(source, "head", head_without_version)
    _, refs = run(source, "s3://bkt/a.bin", Pins(version_id=older.version_id))
    assert refs == [older]


def test_an_object_that_is_also_a_prefix_is_the_object() -> None:
    source = make_source()
    pinned = source.put(BUCKET, "data", b"x")
    source.put(BUCKET, "data/part-0", b"y")
    resolution, refs = run(source, "s3://bkt/data")
    assert resolution.single_object
    assert refs == [pinned]


def test_version_id_selects_an_older_version() -> None:
    source = make_source(versioned=True)
    old = source.put(BUCKET, "model.pt", b"v1")
    source.put(BUCKET, "model.pt", b"v2 is longer")
    resolution, refs = run(source, "s3://bkt/model.pt", Pins(version_id=old.version_id))
    assert resolution.versioned
    assert refs == [old]
    assert source.get_range(refs[0], 0, refs[0].size) == b"v1"


def test_version_id_of_a_deleted_key_still_resolves() -> None:
    source = make_source(versioned=True)
    old = source.put(BUCKET, "gone.txt", b"still here")
    source.delete(BUCKET, "gone.txt")
    _, refs = run(source, "s3://bkt/gone.txt", Pins(version_id=old.version_id))
    assert refs == [old]


@pytest.mark.parametrize("key", ["model.pt", "no-such-key"])
def test_a_nonexistent_version_is_not_found_and_named(key: str) -> None:
    source = make_source(versioned=True)
    source.put(BUCKET, "model.pt", b"v1")
    with pytest.raises(NotFoundError) as caught:
        run(source, f"s3://bkt/{key}", Pins(version_id="3sL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY"))
    message = str(caught.value)
    assert "3sL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY" in message
    assert f"s3://bkt/{key}" in message
    assert "--version-id" in message


@pytest.mark.parametrize("quoted", [True, False])
def test_etag_matches_with_or_without_quotes(quoted: bool) -> None:
    source = make_source()
    pinned = source.put(BUCKET, "a.bin", b"abc")
    etag = pinned.etag if quoted else pinned.etag.strip('"')
    _, refs = run(source, "s3://bkt/a.bin", Pins(etag=etag))
    assert refs == [pinned]
    assert refs[0].etag == pinned.etag  # kept quoted, as If-Match needs it


def test_etag_and_version_id_together_pin_an_older_version() -> None:
    source = make_source(versioned=True)
    old = source.put(BUCKET, "a.bin", b"old")
    source.put(BUCKET, "a.bin", b"new")
    _, refs = run(source, "s3://bkt/a.bin", Pins(version_id=old.version_id, etag=old.etag))
    assert refs == [old]


def test_multipart_style_etag_matches() -> None:
    source = make_source()
    pinned = source.put(BUCKET, "big.bin", b"x" * 10, etag='"0123456789abcdef0123456789abcdef-3"')
    _, refs = run(source, "s3://bkt/big.bin", Pins(etag="0123456789abcdef0123456789abcdef-3"))
    assert refs == [pinned]


def test_etag_mismatch_names_both_etags() -> None:
    source = make_source(versioned=True)
    old = source.put(BUCKET, "a.bin", b"old")
    new = source.put(BUCKET, "a.bin", b"new")
    with pytest.raises(PinMismatchError) as caught:
        run(source, "s3://bkt/a.bin", Pins(etag=old.etag.strip('"')))
    message = str(caught.value)
    assert old.etag in message
    assert new.etag in message
    assert "s3://bkt/a.bin" in message


# -- pins on prefixes -----------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3://bkt/p/", "s3://bkt", "s3://bkt/"])
@pytest.mark.parametrize("pins", [Pins(version_id="abc"), Pins(etag='"abc"'), Pins("abc", "abc")])
def test_pins_on_an_explicit_prefix_are_refused_before_any_s3_call(uri: str, pins: Pins) -> None:
    source = make_source()
    source.put(BUCKET, "p/a.bin", b"x")
    source.calls.clear()
    with pytest.raises(UsageError, match="--version-id and --etag"):
        resolve(source, parse_s3_uri(uri), pins)
    assert sum(source.calls.values()) == 0


def test_an_etag_pin_on_a_prefix_that_is_not_an_object_is_refused() -> None:
    source = make_source()
    source.put(BUCKET, "p/a.bin", b"x")
    with pytest.raises(UsageError, match="is a prefix"):
        run(source, "s3://bkt/p", Pins(etag='"abc"'))


def test_an_etag_pin_on_nothing_at_all_says_nothing_is_there() -> None:
    source = make_source()
    with pytest.raises(NotFoundError, match="no such object or prefix: s3://bkt/missing.bin"):
        run(source, "s3://bkt/missing.bin", Pins(etag='"abc"'))


# -- prefixes -------------------------------------------------------------------------------------


def test_a_key_that_is_not_an_object_is_a_prefix() -> None:
    source = make_source()
    inside = [source.put(BUCKET, key, b"x") for key in ("p/a", "p/b/c")]
    for key in ("pa", "pa/x", "q/p/a", "p.txt"):
        source.put(BUCKET, key, b"outside")
    resolution, refs = run(source, "s3://bkt/p")
    assert not resolution.single_object
    assert resolution.prefix == "p/"
    assert refs == inside


@pytest.mark.parametrize(("uri", "prefix"), [("s3://bkt/p/", "p/"), ("s3://bkt", "")])
def test_an_explicit_prefix_is_listed_without_a_head(uri: str, prefix: str) -> None:
    source = make_source()
    refs_in_s3 = [source.put(BUCKET, key, b"x") for key in ("p/a", "p/b/c")]
    resolution, refs = run(source, uri)
    assert not resolution.single_object
    assert resolution.prefix == prefix
    assert refs == refs_in_s3
    assert source.calls["head"] == 0


@pytest.mark.parametrize("uri", ["s3://bkt/nothing", "s3://bkt/nothing/", "s3://bkt"])
def test_an_empty_prefix_is_not_found(uri: str) -> None:
    source = make_source()
    source.put(BUCKET, "nothingness", b"a sibling, not a child")
    if uri == "s3://bkt":
        source.delete(BUCKET, "nothingness")
    with pytest.raises(NotFoundError, match="no such object or prefix") as caught:
        resolve(source, parse_s3_uri(uri))
    assert uri in str(caught.value) or uri + "/" in str(caught.value)


def test_listing_is_streamed_not_collected() -> None:
    source = make_source()
    for index in range(5):
        source.put(BUCKET, f"p/{index}", b"x")
    resolution = resolve(source, parse_s3_uri("s3://bkt/p/"))
    assert next(resolution.refs).key == "p/0"
    assert [ref.key for ref in resolution.refs] == ["p/1", "p/2", "p/3", "p/4"]
    assert source.calls["list_latest"] == 1


# -- versioning -----------------------------------------------------------------------------------


def test_versioned_bucket_refs_carry_version_ids_and_null_for_old_objects() -> None:
    source = make_source()
    source.put(BUCKET, "p/old.txt", b"before versioning")
    source.enable_versioning(BUCKET)
    new = source.put(BUCKET, "p/new.txt", b"after")
    resolution, refs = run(source, "s3://bkt/p/")
    assert resolution.versioned
    assert {ref.key: ref.version_id for ref in refs} == {"p/new.txt": new.version_id,
                                                         "p/old.txt": "null"}
    assert new.version_id not in (None, "null")
    for ref in refs:  # every pin reads back
        assert source.get_range(ref, 0, ref.size)


class HeadNamesNoVersion(FakeSource):
    """A versioned store whose HEAD of the current object names no version (some
    S3-compatible stores); asked for a version, it answers for that version."""

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        ref = super().head(bucket, key, version_id)
        if version_id is None:
            ref = dataclasses.replace(ref, version_id=None)
        return ref


def test_a_null_version_of_other_bytes_is_not_taken_for_the_current_object() -> None:
    """HEAD names no version and a "null" version exists (written before versioning), but it
    is an older object than the current one: pinning "null" would pin other bytes (every read
    then ESTALE); the ETag tells them apart, so the current object is pinned by its ETag."""
    source = HeadNamesNoVersion()
    source.create_bucket(BUCKET)
    source.put(BUCKET, "a.bin", b"old")  # the "null" version
    source.enable_versioning(BUCKET)
    current = source.put(BUCKET, "a.bin", b"new")
    _, (ref,) = run(source, "s3://bkt/a.bin")
    assert (ref.version_id, ref.etag) == (None, current.etag)
    assert source.get_range(ref, 0, 3) == b"new"


def test_single_pre_versioning_object_is_pinned_to_the_null_version() -> None:
    source = make_source()
    source.put(BUCKET, "old.txt", b"before versioning")
    source.enable_versioning(BUCKET)
    _, (ref,) = run(source, "s3://bkt/old.txt")
    assert ref.version_id == "null"
    source.put(BUCKET, "old.txt", b"overwritten after versioning")
    assert source.get_range(ref, 0, ref.size) == b"before versioning"


def test_unversioned_bucket_refs_carry_no_version_id() -> None:
    source = make_source()
    for key in ("p/a", "p/b"):
        source.put(BUCKET, key, b"x")
    resolution, refs = run(source, "s3://bkt/p/")
    assert not resolution.versioned
    assert [ref.version_id for ref in refs] == [None, None]
    _, (single,) = run(source, "s3://bkt/p/a")
    assert single.version_id is None


def test_a_key_whose_latest_version_is_a_delete_marker_is_absent() -> None:
    source = make_source(versioned=True)
    kept = source.put(BUCKET, "p/kept", b"x")
    source.put(BUCKET, "p/deleted", b"x")
    source.delete(BUCKET, "p/deleted")
    _, refs = run(source, "s3://bkt/p/")
    assert refs == [kept]
    with pytest.raises(NotFoundError, match="no such object or prefix"):
        run(source, "s3://bkt/p/deleted")


def test_a_key_deleted_then_recreated_is_its_new_version() -> None:
    source = make_source(versioned=True)
    source.put(BUCKET, "p/a", b"one")
    source.delete(BUCKET, "p/a")
    again = source.put(BUCKET, "p/a", b"two")
    _, refs = run(source, "s3://bkt/p/")
    assert refs == [again]


def test_denied_versioning_state_falls_back_to_etag_pinning_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = make_source(versioned=True)
    source.put(BUCKET, "p/a", b"x")
    source.deny_versioning = True
    with caplog.at_level(logging.WARNING, logger="s3datafs.resolve"):
        resolution, refs = run(source, "s3://bkt/p/")
    assert not resolution.versioned
    assert [ref.version_id for ref in refs] == [None]
    assert source.get_range(refs[0], 0, 1) == b"x"  # pinned by ETag alone
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ETag only" in warnings[0].getMessage()
    assert "'bkt'" in warnings[0].getMessage()


@pytest.mark.parametrize("versioned", [False, True])
def test_denied_versioning_state_on_a_single_object(
    versioned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # HEAD still reports a VersionId when the bucket has one: then the pin is complete and
    # nothing needs saying; without one the object is pinned by its ETag alone, and we say so.
    source = make_source(versioned=versioned)
    pinned = source.put(BUCKET, "a.bin", b"x")
    source.deny_versioning = True
    with caplog.at_level(logging.WARNING, logger="s3datafs.resolve"):
        resolution, refs = run(source, "s3://bkt/a.bin")
    # A version id shows the bucket keeps versions (a snapshot of the pin must say so).
    assert resolution.versioned == versioned
    assert refs == [pinned]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if versioned:
        assert refs[0].version_id is not None
        assert warnings == []
    else:
        assert refs[0].version_id is None
        assert len(warnings) == 1
        assert "ETag only" in warnings[0]


def versions_denied(permission: str = "s3:ListBucketVersions") -> MissingPermissionError:
    return MissingPermissionError(f"access denied: listing needs {permission}", permission)


def test_versions_we_may_not_list_fall_back_to_etag_pinning_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only policy without s3:ListBucketVersions: pinned by ETag, as when the bucket's
    versioning state is denied, rather than no mount at all."""
    source = make_source(versioned=True)
    source.put(BUCKET, "p/a", b"x")
    source.fail_next(1, versions_denied(), "list_latest")
    with caplog.at_level(logging.WARNING, logger="s3datafs.resolve"):
        resolution, refs = run(source, "s3://bkt/p/")
    assert not resolution.versioned
    assert [ref.version_id for ref in refs] == [None]
    assert source.get_range(refs[0], 0, 1) == b"x"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["may not list the versions of bucket 'bkt' (s3:ListBucketVersions is not "
                        "granted): pinning s3://bkt/p/ by ETag only"]


@pytest.mark.parametrize("case", ["neither-listing", "other-permission", "unversioned"])
def test_a_denied_listing_with_no_fallback_raises_the_first_error(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source(versioned=case != "unversioned")
    source.put(BUCKET, "p/a", b"x")
    first = versions_denied("s3:ListBucket" if case == "other-permission" else
                            "s3:ListBucketVersions")
    source.fail_next(1, first, "list_latest")
    if case == "neither-listing":
        source.fail_next(1, versions_denied("s3:ListBucket"), "list_latest")
    with pytest.raises(MissingPermissionError) as raised:
        run(source, "s3://bkt/p/")
    assert raised.value is first
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_version_whose_head_is_refused_is_pinned_if_it_is_the_current_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No s3:GetObjectVersion: S3 refuses a HEAD naming the version, so the current object's
    HEAD decides. Its reads then go by ETag alone (``s3source``), so the version stays the pin
    (a snapshot of the mount records it) and the bytes are the pinned ones."""
    source = make_source(versioned=True)
    source.put(BUCKET, "model.pt", b"v1")
    current = source.put(BUCKET, "model.pt", b"v2 is longer")
    source.fail_next(1, versions_denied("s3:GetObjectVersion"), "head")
    with caplog.at_level(logging.WARNING, logger="s3datafs.resolve"):
        resolution, refs = run(source, "s3://bkt/model.pt", Pins(version_id=current.version_id))
    assert resolution.versioned
    assert refs == [current]
    assert [r.getMessage() for r in caplog.records] == [
        "may not read object versions in bucket 'bkt' (s3:GetObjectVersion is not granted): "
        f"version {current.version_id!r} of s3://bkt/model.pt is the current one, so it is read "
        "by its ETag"]


def test_an_older_version_whose_head_is_refused_is_refused_with_what_to_do() -> None:
    source = make_source(versioned=True)
    old = source.put(BUCKET, "model.pt", b"v1")
    current = source.put(BUCKET, "model.pt", b"v2 is longer")
    source.fail_next(1, versions_denied("s3:GetObjectVersion"), "head")
    with pytest.raises(MissingPermissionError) as raised:
        run(source, "s3://bkt/model.pt", Pins(version_id=old.version_id))
    assert str(raised.value) == (
        f"access denied to version {old.version_id!r} of s3://bkt/model.pt: it is not the "
        f"current one (version {current.version_id!r}), and reading another version needs "
        "s3:GetObjectVersion, which the credentials' policy does not grant: grant it, or drop "
        "--version-id to mount the current one")
    assert raised.value.permission == "s3:GetObjectVersion"


@pytest.mark.parametrize("then", ["gone", "denied", "other-permission"])
def test_a_refused_version_head_keeps_its_error_when_the_current_one_cannot_tell(
    then: str,
) -> None:
    """The key is deleted now, or its HEAD is refused as well, or the first refusal was for
    another permission (no second HEAD): the first error stands."""
    source = make_source(versioned=True)
    pinned = source.put(BUCKET, "model.pt", b"v1")
    if then == "gone":
        source.delete(BUCKET, "model.pt")
    first = versions_denied("s3:ListBucket" if then == "other-permission" else
                            "s3:GetObjectVersion")
    source.fail_next(1, first, "head")
    if then == "denied":
        source.fail_next(1, versions_denied("s3:GetObject"), "head")
    with pytest.raises(MissingPermissionError) as raised:
        run(source, "s3://bkt/model.pt", Pins(version_id=pinned.version_id))
    assert raised.value is first


def test_a_missing_bucket_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="nobucket"):
        resolve(FakeSource(), parse_s3_uri("s3://nobucket/a"))
