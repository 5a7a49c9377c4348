"""S3-compatible stores that behave otherwise than S3 (a review of session 20): the pinned bytes,
or a clear error, never another version's bytes nor part of the data with no word said.

The quirks are made by the fault proxy's ``rewrite`` action in front of the moto server: a
request forwarded without some headers or query parameters (a store that ignores them), or a
response whose headers or body are changed. ``S3Source`` level first, then real mounts.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import time
import uuid
from pathlib import Path

import pytest
from conftest import Cli
from faultproxy import FaultProxy, Headers

from devtools.s3server import S3Server
from s3datafs import s3source
from s3datafs.errors import S3RequestError, StaleObjectError, TransientS3Error
from s3datafs.model import ObjectRef
from s3datafs.s3source import S3Settings, S3Source
from s3datafs.signedget import Fetched

KiB = 1024
OLD = bytes((i * 7) % 251 for i in range(200 * KiB))
NEW = bytes((i * 13 + 5) % 251 for i in range(200 * KiB))  # the same size, other bytes


def source_for(proxy: FaultProxy, *, botocore_only: bool = False, **settings) -> S3Source:
    values = {"read_deadline": 8.0, "request_timeout": 4.0, "connect_timeout": 2.0, **settings}
    source = S3Source(S3Settings(region="us-east-1", endpoint_url=proxy.endpoint,
                                 access_key_id="testing", secret_access_key="testing", **values))
    if botocore_only:  # every GET through botocore, not from signed templates
        source._signed = None
    return source


def new_bucket(s3, *, versioned: bool = False) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def stored(s3, key: str, *, versioned: bool = False) -> str:
    """A new bucket holding ``OLD`` at ``key``."""
    bucket = new_bucket(s3, versioned=versioned)
    s3.put_object(Bucket=bucket, Key=key, Body=OLD)
    return bucket


def pinned(s3, bucket: str, key: str) -> ObjectRef:
    head = s3.head_object(Bucket=bucket, Key=key)
    return ObjectRef(bucket, key, head.get("VersionId"), head["ETag"], head["ContentLength"], 0.0)


def without(*names: bytes):
    """An ``edit`` that drops response headers."""
    def edit(headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        return [(n, v) for n, v in headers if n.lower() not in names], body
    return edit


def unquoted_etag(headers: Headers, body: bytes) -> tuple[Headers, bytes]:
    return [(n, v.strip(b'"') if n.lower() == b"etag" else v) for n, v in headers], body


def body_sub(pattern: bytes, replace) -> object:
    """An ``edit`` of the response body by a regular expression."""
    def edit(headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        return headers, re.sub(pattern, replace, body)
    return edit


# -- a store that ignores If-Match or versionId ----------------------------------------------------


@pytest.mark.parametrize("botocore_only", [False, True])
def test_a_store_that_ignores_if_match_never_gets_another_objects_bytes_served(
    s3, proxy: FaultProxy, botocore_only: bool
) -> None:
    bucket = stored(s3, "d.bin")
    ref = pinned(s3, bucket, "d.bin")
    s3.put_object(Bucket=bucket, Key="d.bin", Body=NEW)  # overwritten after the "mount"
    proxy.inject("rewrite", drop=("if-match",), times=None)
    source = source_for(proxy, botocore_only=botocore_only)
    with pytest.raises(StaleObjectError, match=r"S3 sent ETag .* \(this store ignores If-Match\)"):
        source.get_range(ref, 0, 4096)
    with pytest.raises(StaleObjectError):  # the whole object, where the MD5 check looks too
        source.get_range(ref, 0, ref.size)


def test_a_versioned_store_that_ignores_version_id_never_serves_another_version(
    s3, proxy: FaultProxy
) -> None:
    bucket = stored(s3, "d.bin", versioned=True)
    ref = pinned(s3, bucket, "d.bin")
    s3.put_object(Bucket=bucket, Key="d.bin", Body=OLD)  # the same bytes, a newer version
    proxy.inject("rewrite", drop=("versionId", "if-match"), times=None)
    ignored = r"S3 sent version .* \(this store ignores versionId\)"
    with pytest.raises(StaleObjectError, match=ignored):
        source_for(proxy).get_range(ref, 8192, 12288)


def test_an_unquoted_or_missing_etag_on_a_get_is_not_another_object(
    s3, proxy: FaultProxy
) -> None:
    bucket = stored(s3, "d.bin")
    ref = pinned(s3, bucket, "d.bin")
    source = source_for(proxy)
    proxy.inject("rewrite", edit=unquoted_etag)
    assert source.get_range(ref, 0, 4096) == OLD[:4096]
    proxy.inject("rewrite", edit=without(b"etag"))
    assert source.get_range(ref, 4096, 8192) == OLD[4096:8192]


# -- sizes and listings ----------------------------------------------------------------------------


@pytest.mark.parametrize("listed_delta", [-1000, +1000])
def test_an_object_that_is_not_its_pinned_size_fails_at_once_and_for_good(
    s3, proxy: FaultProxy, listed_delta: int
) -> None:
    bucket = stored(s3, "p/d.bin")
    proxy.inject("rewrite", op="ListObjectsV2", times=None, edit=body_sub(
        rb"<Size>(\d+)</Size>", lambda m: b"<Size>%d</Size>" % (int(m[1]) + listed_delta)))
    source = source_for(proxy)
    (ref,) = source.list_latest(bucket, "p/", versioned=False)  # a listing that misstates it
    started = time.monotonic()
    with pytest.raises(StaleObjectError, match=f"is {len(OLD)} bytes in S3, not the {ref.size}"):
        source.get_range(ref, ref.size - 4096, ref.size)
    assert time.monotonic() - started < 2  # no retries: no retry makes it the pinned size


@pytest.mark.parametrize("versioned", [False, True])
def test_a_page_that_says_more_follow_without_a_token_refuses_the_listing(
    s3, proxy: FaultProxy, versioned: bool
) -> None:
    bucket = new_bucket(s3, versioned=versioned)
    for i in range(10):
        s3.put_object(Bucket=bucket, Key=f"p/k{i:02d}", Body=b"x")
    op, token = (("ListObjectVersions", rb"<Next(KeyMarker|VersionIdMarker)>[^<]*</Next\w+>")
                 if versioned else ("ListObjectsV2", rb"<NextContinuationToken>[^<]*</Next\w+>"))
    proxy.inject("rewrite", op=op, times=None, edit=body_sub(token, b""))
    source = source_for(proxy, list_page_size=3)
    with pytest.raises(S3RequestError, match="said more keys follow but sent no continuation"):
        list(source.list_latest(bucket, "p/", versioned=versioned))


def test_continuation_tokens_that_come_back_refuse_the_listing(
    s3, proxy: FaultProxy
) -> None:
    bucket = new_bucket(s3)
    for i in range(10):
        s3.put_object(Bucket=bucket, Key=f"p/k{i:02d}", Body=b"x")
    tokens: list[bytes] = []

    def cycle(headers: Headers, body: bytes) -> tuple[Headers, bytes]:
        """The third page's token sends the client back to the second page."""
        match = re.search(rb"<NextContinuationToken>([^<]*)</NextContinuationToken>", body)
        if match:
            if match[1] not in tokens:
                tokens.append(match[1])
            if len(tokens) >= 3 and match[1] == tokens[2]:
                body = body.replace(match[1], tokens[0])
        return headers, body

    proxy.inject("rewrite", op="ListObjectsV2", times=None, edit=cycle)
    source = source_for(proxy, list_page_size=3)
    listing = itertools.islice(source.list_latest(bucket, "p/", versioned=False), 100)
    with pytest.raises(S3RequestError, match="goes back|sent before"):
        list(listing)  # without the check: 100 refs of 10 keys, and on for ever
    assert proxy.requests["ListObjectsV2"] < 10


def test_a_head_without_etag_is_a_clear_error(s3, proxy: FaultProxy) -> None:
    bucket = stored(s3, "d.bin")
    proxy.inject("rewrite", op="HeadObject", edit=without(b"etag"))
    with pytest.raises(S3RequestError, match="S3 sent no ETag for it"):
        source_for(proxy).head(bucket, "d.bin")


# -- through real mounts ---------------------------------------------------------------------------


def uncached(path: Path, offset: int = 0, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_a_mount_on_a_store_that_ignores_if_match_fails_reads_of_an_overwritten_object(
    cli: Cli, s3, proxy: FaultProxy
) -> None:
    bucket = stored(s3, "p/d.bin")
    s3.put_object(Bucket=bucket, Key="p/e.bin", Body=OLD)
    proxy.inject("rewrite", drop=("if-match",), times=None)
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--endpoint-url", proxy.endpoint, "--no-cache")
    assert uncached(mountpoint / "e.bin") == OLD[:4096]
    s3.put_object(Bucket=bucket, Key="p/d.bin", Body=NEW)  # overwritten while mounted
    cli.expect_log("changed since it was pinned: S3 sent ETag")
    with pytest.raises(OSError, match="Stale file handle") as caught:
        uncached(mountpoint / "d.bin", 65536)
    assert caught.value.errno == errno.ESTALE


@pytest.mark.fuse
def test_a_listing_cut_short_by_the_store_mounts_nothing(
    cli: Cli, s3server: S3Server, make_bucket, proxy: FaultProxy
) -> None:
    bucket = make_bucket()
    s3server.populate(bucket, [(f"p/k{i:05d}", 10) for i in range(1500)])
    proxy.inject("rewrite", op="ListObjectsV2", times=None,
                 edit=body_sub(rb"<NextContinuationToken>[^<]*</NextContinuationToken>", b""))
    result = cli.run("mount", f"s3://{bucket}/p/", "--endpoint-url", proxy.endpoint)
    assert result.returncode != 0
    assert "sent no continuation token" in result.stderr
    assert "Traceback" not in result.stderr
    assert cli.mounts_below_root() == []


@pytest.mark.fuse
def test_a_store_without_get_bucket_versioning_mounts_pinned_by_etag(
    cli: Cli, s3, proxy: FaultProxy
) -> None:
    bucket = stored(s3, "p/d.bin")
    proxy.inject("error", op="GetBucketVersioning", status=501, code="NotImplemented", times=None)
    cli.expect_log("cannot read the versioning state")
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--endpoint-url", proxy.endpoint)
    assert (mountpoint / "d.bin").read_bytes() == OLD


@pytest.mark.fuse
def test_a_versioned_store_whose_head_names_no_version_is_pinned_by_etag(
    cli: Cli, s3, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = stored(s3, "d.bin", versioned=True)
    proxy.inject("rewrite", op="HeadObject", times=None, edit=without(b"x-amz-version-id"))
    cli.expect_log("names no version of .* pinned by its ETag alone")
    snapshot = tmp_path / "d.snap.gz"
    mountpoint = cli.mount(f"s3://{bucket}/d.bin", "--endpoint-url", proxy.endpoint,
                           "--save-snapshot", str(snapshot))
    assert (mountpoint / "d.bin").read_bytes() == OLD
    with pytest.raises(OSError, match="No data available"):  # no version pinned
        os.getxattr(mountpoint / "d.bin", "user.s3datafs.version_id")
    cli.unmount(mountpoint)
    # The snapshot it saved mounts again (it said "no version id, but the bucket is versioned").
    mountpoint = cli.mount("--snapshot", str(snapshot), "--endpoint-url", proxy.endpoint)
    assert (mountpoint / "d.bin").read_bytes() == OLD


@pytest.mark.fuse
def test_a_store_that_sends_unquoted_etags_is_pinned_and_read(
    cli: Cli, s3, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = stored(s3, "p/d.bin")
    etag = s3.head_object(Bucket=bucket, Key="p/d.bin")["ETag"].strip('"')
    snapshot = tmp_path / "p.snap.gz"
    assert cli.run("snapshot", f"s3://{bucket}/p/", "-o", str(snapshot)).returncode == 0
    proxy.inject("rewrite", op="*", times=None, edit=unquoted_etag)
    mountpoint = cli.mount(f"s3://{bucket}/p/d.bin", "--endpoint-url", proxy.endpoint,
                           "--etag", etag)
    assert (mountpoint / "d.bin").read_bytes() == OLD
    cli.unmount(mountpoint)
    mountpoint = cli.mount("--snapshot", str(snapshot), "--endpoint-url", proxy.endpoint)
    assert (mountpoint / "d.bin").read_bytes() == OLD


@pytest.mark.fuse
def test_a_head_without_etag_refuses_the_mount_in_one_line(
    cli: Cli, s3, proxy: FaultProxy
) -> None:
    bucket = stored(s3, "d.bin")
    proxy.inject("rewrite", op="HeadObject", times=None, edit=without(b"etag"))
    result = cli.run("mount", f"s3://{bucket}/d.bin", "--endpoint-url", proxy.endpoint)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"s3datafs: s3://{bucket}/d.bin: S3 sent no ETag for it, and s3datafs pins every object "
        "by its ETag: this store cannot be mounted"
    ]
    assert cli.mounts_below_root() == []


# -- what a body alone tells ----------------------------------------------------------------------


def offline_source() -> S3Source:
    """A source that is never asked anything: its clients are made, no request is sent."""
    return S3Source(S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:1",
                               access_key_id="testing", secret_access_key="testing"))


def refuse_unsigned_ranges(proxy: FaultProxy, times: int | None = None) -> None:
    """A store (or a proxy before it) that wants ``Range`` signed, as botocore signs it: GETs
    from templates, which add it unsigned, are refused as S3 refuses a bad signature."""
    proxy.inject("error", status=403, code="SignatureDoesNotMatch", unsigned="range",
                 times=times)


def test_a_store_that_refuses_every_template_gets_plain_botocore_gets_after_three(
    s3, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refusal costs a GET before botocore's own: after three in a row, each cured by
    botocore, reads stop trying templates (one warning) instead of paying twice for good."""
    ref = pinned(s3, stored(s3, "d.bin"), "d.bin")
    refuse_unsigned_ranges(proxy)
    source = source_for(proxy)
    for number in range(8):
        assert source.get_range(ref, number * KiB, (number + 1) * KiB) == OLD[
            number * KiB: (number + 1) * KiB]
    assert proxy.injected_count("error") == 3
    assert proxy.requests["GetObject"] == 8 + 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "(SignatureDoesNotMatch)" in warnings[0]
    assert "this store wants headers signed that s3datafs adds unsigned" in warnings[0]
    assert "plain botocore calls from now on" in warnings[0]


def test_templates_given_up_for_another_reason_say_only_what_s3_said(
    s3, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A clock skew or a token botocore cures and our templates do not is not a store that
    wants more signed: the warning names the error, and guesses nothing."""
    ref = pinned(s3, stored(s3, "d.bin"), "d.bin")
    proxy.inject("error", status=403, code="RequestTimeTooSkewed", unsigned="range", times=None)
    source = source_for(proxy)
    for number in range(4):
        assert source.get_range(ref, number, number + 1) == OLD[number:number + 1]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "(RequestTimeTooSkewed) that botocore's own GETs then got; plain botocore" in warning


def test_refusals_a_new_signature_cures_now_and_then_keep_the_templates(
    s3, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """As when credentials are replaced, or a redirect names the bucket's region: a refused
    template between ones that work is no reason to give them up."""
    ref = pinned(s3, stored(s3, "d.bin"), "d.bin")
    source = source_for(proxy)
    for number in range(8):
        if number % 2 == 0:
            refuse_unsigned_ranges(proxy, times=1)
        assert source.get_range(ref, number * KiB, (number + 1) * KiB) == OLD[
            number * KiB: (number + 1) * KiB]
    assert proxy.injected_count("error") == 4
    assert proxy.requests["GetObject"] == 8 + 4
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    refuse_unsigned_ranges(proxy, times=1)
    assert source.get_range(ref, 0, 4) == OLD[:4]
    assert proxy.injected_count("error") == 5  # templates still tried


def test_a_server_that_ignores_range_fails_at_once_not_after_retries() -> None:
    """The whole object for a part of it, again on every retry: an error, not a transient one
    (retrying would only wait out the deadline on every read)."""
    ref = ObjectRef("b-1", "k", None, '"e"', 100, 0.0)
    with pytest.raises(S3RequestError, match="server ignored the Range header"):
        s3source._check_body(ref, 10, 20, bytes(100), None)


@pytest.mark.parametrize(
    ("encryption", "customer_algorithm"), [("aws:kms", None), ("AES256", "AES256")],
    ids=["sse-kms", "sse-c"],
)
def test_the_etag_of_an_encrypted_object_is_no_md5_to_check(
    encryption: str, customer_algorithm: str | None
) -> None:
    """SSE-KMS and SSE-C objects have ETags that are not their MD5: whole bodies are served as
    they are, and the check stays on for the mount's other objects."""
    source = offline_source()
    ref = ObjectRef("b-1", "k", None, '"' + "0" * 32 + '"', 5, 0.0)
    body = Fetched(b"bytes", None, encryption, customer_algorithm)
    source._check_md5(ref, body.data, body)  # no TransientS3Error: nothing to check
    assert source._verify_md5


def test_a_stalled_server_is_not_retried_by_botocore_past_the_deadline(
    proxy: FaultProxy, s3
) -> None:
    """GETs botocore sends itself make one attempt each: its own retries (three timeouts of
    the deadline each) would outlast the deadline that bounds the whole read."""
    ref = pinned(s3, stored(s3, "stalled.bin"), "stalled.bin")
    source = source_for(proxy, botocore_only=True, read_deadline=1.5, request_timeout=30.0)
    proxy.inject("stall", times=None)
    started = time.monotonic()
    with pytest.raises(TransientS3Error):
        source.get_range(ref, 0, 4 * KiB)
    assert time.monotonic() - started < 1.5 + 1.0
