"""GETs from signed templates (``signedget``), through ``S3Source`` against moto behind the proxy.

What is proven here: ranges of one object share one template (one botocore call, no request of
its own) and each costs one GET; templates are signed again once old; errors a new signature
or botocore's own handling may cure are repeated through botocore; a whole-object checksum S3
sends is checked (with the MD5 check off, so nothing else could catch the flip); real botocore
calls on the same client are left alone; the templates of a bucket's other objects are
derived from its first and are what botocore would make, for every kind of key. Error mapping
and retries of every other fault are ``test_faults.py``'s, which runs through the same path.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import uuid
import zlib
from typing import Any

import botocore.credentials
import botocore.exceptions
import pytest
from faultproxy import FaultProxy

from devtools.s3server import S3Server
from s3datafs import linkrate, signedget
from s3datafs.errors import StaleObjectError
from s3datafs.model import ObjectRef
from s3datafs.s3source import S3Settings, S3Source

KiB = 1024
BIG = bytes((i * 13 + i // 509) % 256 for i in range(256 * KiB))
LARGE = bytes((i * 31 + i // 251) % 256 for i in range(1024 * KiB + 1))  # 1 MiB ranges of it
SMALL = b"read whole, with the checksum S3 sends for a whole object\n" * 30


@pytest.fixture(scope="module")
def objects(s3server: S3Server) -> dict[str, ObjectRef]:
    s3 = s3server.client()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    refs = {}
    for key, body in (("big.bin", BIG), ("small.txt", SMALL), ("large.bin", LARGE)):
        put = s3.put_object(Bucket=bucket, Key=key, Body=body)
        refs[key] = ObjectRef(bucket, key, put["VersionId"], put["ETag"], len(body), 0.0)
    return refs


@pytest.fixture
def source(proxy: FaultProxy) -> S3Source:
    return S3Source(S3Settings(
        region="us-east-1", endpoint_url=proxy.endpoint, access_key_id="testing",
        secret_access_key="testing", read_deadline=10.0, request_timeout=5.0,
    ))


def count_botocore_gets(source: S3Source, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record every ``get_object`` call on the GET client (template captures included)."""
    calls: list[dict] = []
    real = source._reads.get_object

    def counted(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(source._reads, "get_object", counted)
    return calls


def test_ranges_of_one_object_share_one_template_and_cost_one_request_each(
    source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_botocore_gets(source, monkeypatch)
    ref = objects["big.bin"]
    spans = [(0, 4 * KiB), (100 * KiB, 164 * KiB), (255 * KiB, 256 * KiB), (0, 256 * KiB)]
    for start, end in spans:
        assert source.get_range(ref, start, end) == BIG[start:end]
    assert len(calls) == 1  # the template's capture, which sends nothing
    assert "Range" not in calls[0]
    assert "IfMatch" not in calls[0]
    assert proxy.requests["GetObject"] == len(spans)


@pytest.mark.parametrize("path", ["template", "botocore"])
def test_get_bodies_tell_how_fast_the_link_is(
    path: str, source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if path == "botocore":
        monkeypatch.setattr(source, "_signed", None)
    ref = objects["large.bin"]
    stale = dataclasses.replace(ref, etag='"0123456789abcdef0123456789abcdef"')
    for _ in range(linkrate.ALONE + 1):  # failed GETs are over too: no crowd left behind them
        with pytest.raises(StaleObjectError):
            source.get_range(stale, 0, 1024 * KiB)
    proxy.inject("throttle", rate=8 * 1024 * KiB, times=None)  # a slow link: 1 MiB in 0.125 s
    for _ in range(linkrate.MIN_SAMPLES):
        assert source.get_range(ref, 0, 1024 * KiB) == LARGE[: 1024 * KiB]
    assert source.link.slow
    assert 2e6 < source.link.bytes_per_second < 16 * 1024 * KiB  # about the throttled rate
    assert source.get_range(ref, 0, 256 * KiB) == LARGE[: 256 * KiB]  # too short to tell
    assert len(source.link._rates) == linkrate.MIN_SAMPLES


def test_an_old_template_is_signed_again(
    source: S3Source, objects: dict[str, ObjectRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_botocore_gets(source, monkeypatch)
    monkeypatch.setattr(signedget, "TEMPLATE_SECONDS", 0.0)
    ref = objects["big.bin"]
    for start in (0, 64 * KiB, 128 * KiB):
        assert source.get_range(ref, start, start + KiB) == BIG[start : start + KiB]
    assert len(calls) == 3


@pytest.mark.parametrize("token", [None, "session-2"])
def test_a_template_is_never_sent_with_credentials_the_client_has_replaced(
    source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy, token: str | None
) -> None:
    # botocore replaces expiring credentials (STS, credential_process, roles) before a call; a
    # key deleted at the end of its lease is refused by S3 (403 InvalidAccessKeyId, for good).
    ref = objects["big.bin"]
    assert source.get_range(ref, 0, KiB) == BIG[:KiB]
    source._reads._request_signer._credentials = botocore.credentials.Credentials(
        "rotated", "secret-2", token
    )
    proxy.inject("error", status=403, code="InvalidAccessKeyId", times=None,
                 signed_with=lambda key: key == "testing")
    for start in (64 * KiB, 128 * KiB):
        assert source.get_range(ref, start, start + KiB) == BIG[start : start + KiB]
    assert proxy.injected == []
    gets = [key for op, _, key in proxy.signed if op == "GetObject"]
    assert gets == ["testing", "rotated", "rotated"]


@pytest.mark.parametrize(
    ("status", "code"),
    [(403, "SignatureDoesNotMatch"), (403, "RequestTimeTooSkewed"), (400, "ExpiredToken"),
     (301, "PermanentRedirect"), (400, "AuthorizationHeaderMalformed")],
)
def test_errors_a_new_signature_may_cure_are_repeated_through_botocore(
    source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch, status: int, code: str,
) -> None:
    calls = count_botocore_gets(source, monkeypatch)
    ref = objects["big.bin"]
    proxy.inject("error", status=status, code=code, times=1)
    assert source.get_range(ref, 4 * KiB, 8 * KiB) == BIG[4 * KiB : 8 * KiB]
    assert proxy.requests["GetObject"] == 2  # the template's GET, then botocore's
    assert [("Range" in call) for call in calls] == [False, True]
    assert source.get_range(ref, 0, KiB) == BIG[:KiB]  # a new template serves the next one
    assert len(calls) == 3
    assert proxy.requests["GetObject"] == 3


def test_a_whole_object_checksum_from_s3_is_checked(
    source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy
) -> None:
    source._verify_md5 = False  # the MD5 ETag check would catch the flip too: not this test's
    ref = objects["small.txt"]
    proxy.inject("flip", times=1)
    assert source.get_range(ref, 0, ref.size) == SMALL
    assert proxy.requests["GetObject"] == 2  # the flipped body was refused and fetched again
    proxy.inject("flip", times=1, strip_checksums=True)  # the control: without S3's checksum,
    assert source.get_range(ref, 0, ref.size) != SMALL  # nothing here can tell


def test_real_botocore_calls_on_the_same_client_are_left_alone(
    source: S3Source, objects: dict[str, ObjectRef]
) -> None:
    ref = objects["big.bin"]
    assert source.get_range(ref, 0, KiB) == BIG[:KiB]  # a template exists, its hook is in place
    response = source._reads.get_object(Bucket=ref.bucket, Key=ref.key, Range="bytes=0-99")
    assert response["Body"].read() == BIG[:100]


def checksum_headers(algorithm: str, body: bytes) -> dict[str, str]:
    digest = (zlib.crc32(body).to_bytes(4, "big") if algorithm == "crc32"
              else hashlib.new(algorithm, body).digest())
    return {f"x-amz-checksum-{algorithm}": base64.b64encode(digest).decode()}


@pytest.mark.parametrize("algorithm", ["crc32", "sha1", "sha256", "sha512"])
def test_checksums_match_the_body_or_raise(algorithm: str) -> None:
    body = b"some bytes" * 100
    signedget._check_checksum(checksum_headers(algorithm, body), body)
    with pytest.raises(botocore.exceptions.FlexibleChecksumError):
        signedget._check_checksum(checksum_headers(algorithm, body), body[:-1] + b"X")


def test_part_checksums_and_missing_ones_are_not_checked() -> None:
    signedget._check_checksum({"x-amz-checksum-crc32": "AAAAAA==-3"}, b"anything")
    signedget._check_checksum({}, b"anything")


def test_s3_error_bodies_give_code_and_message() -> None:
    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce</Message></Error>"
    assert signedget._error_of(body) == ("SlowDown", "Reduce")
    assert signedget._error_of(b"") == ("", "")
    assert signedget._error_of(b"<html>proxy error</html>") == ("", "")


def test_a_botocore_that_never_calls_the_hook_means_plain_calls(
    source: S3Source, objects: dict[str, ObjectRef], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should botocore stop emitting ``before-send``, reads go on through plain calls."""
    source._reads.meta.events.unregister("before-send.s3.GetObject", source._signed._capture)
    calls = count_botocore_gets(source, monkeypatch)
    ref = objects["big.bin"]
    for start in (0, 8 * KiB):
        assert source.get_range(ref, start, start + KiB) == BIG[start : start + KiB]
    # One try (it sent a real GET of the object), then plain calls only.
    assert [("Range" in call) for call in calls] == [False, True, True]
    assert "plain botocore calls from now on" in caplog.text


def test_unsigned_requests_make_unsigned_templates(
    proxy: FaultProxy, s3server: S3Server
) -> None:
    """``--no-sign-request``: the template carries no signature and reads work as before."""
    s3 = s3server.client()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    put = s3.put_object(Bucket=bucket, Key="public.bin", Body=BIG, ACL="public-read")
    ref = ObjectRef(bucket, "public.bin", None, put["ETag"], len(BIG), 0.0)
    source = S3Source(S3Settings(region="us-east-1", endpoint_url=proxy.endpoint,
                                 no_sign_request=True))
    assert source.get_range(ref, 0, KiB) == BIG[:KiB]
    assert source.get_range(ref, 9 * KiB, 10 * KiB) == BIG[9 * KiB : 10 * KiB]
    put = s3.put_object(Bucket=bucket, Key="other.bin", Body=SMALL, ACL="public-read")
    other = ObjectRef(bucket, "other.bin", None, put["ETag"], len(SMALL), 0.0)
    assert source.get_range(other, 0, other.size) == SMALL  # derived from the bucket's base
    for template in source._signed._templates.values():
        names = {name.lower() for name in template.headers}
        assert not names & {"authorization", "x-amz-security-token"}


def test_gets_from_templates_reuse_one_connection(
    source: S3Source, objects: dict[str, ObjectRef], proxy: FaultProxy
) -> None:
    """Each body is read whole before the response is closed, so keep-alive holds: a
    connection closed after every GET would add a TCP handshake (a TLS one on S3) to each."""
    ref = objects["big.bin"]
    for start in range(0, 200 * KiB, 10 * KiB):
        assert source.get_range(ref, start, start + 4 * KiB) == BIG[start : start + 4 * KiB]
    assert proxy.requests["GetObject"] == 20
    assert proxy.accepted == 1


# -- templates derived from a bucket's base ---------------------------------------------------

# Keys whose URL encoding differs from their text in every way S3 allows.
AWKWARD_KEYS = [
    "plain.bin", "with space.bin", "plus+and%25percent.bin", "a/b//c/./d/../e.bin",
    "query?x=1&y=2#frag", "tilde~and*star'quote\"", "unicode/\u00e9t\u00e9-\u6570\u636e.bin",
    "/leading-slash", "trailing/", "semi;colon,comma:colon@at$dollar!bang(paren)[brack]",
    "\u0001control\u007f",
]


def put_awkward(s3, *, lines: int = 1) -> list[tuple[ObjectRef, bytes]]:
    """Objects under awkward keys in a new versioned bucket, each with its own bytes (``lines``
    more lines each than the one before)."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    made = []
    for number, key in enumerate(AWKWARD_KEYS):
        body = f"{number}: {key}\n".encode() * (number + lines)
        put = s3.put_object(Bucket=bucket, Key=key, Body=body)
        made.append((ObjectRef(bucket, key, put["VersionId"], put["ETag"], len(body), 0.0), body))
    return made


@pytest.fixture(scope="module")
def awkward(s3server: S3Server) -> list[tuple[ObjectRef, bytes]]:
    return put_awkward(s3server.client())


def test_a_buckets_objects_share_one_capture_and_read_their_own_bytes(
    source: S3Source, awkward: list[tuple[ObjectRef, bytes]], proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_botocore_gets(source, monkeypatch)
    for ref, body in awkward:
        assert source.get_range(ref, 0, ref.size) == body
        assert source.get_range(ref, 1, 3) == body[1:3]
    assert len(calls) == 1  # the first object's capture; every other template was derived
    assert proxy.requests["GetObject"] == 2 * len(awkward)


def test_derived_templates_are_what_botocore_makes(
    source: S3Source, awkward: list[tuple[ObjectRef, bytes]]
) -> None:
    signed = source._signed
    first = signed._captured(awkward[0][0])
    base = signed._base_of(first, awkward[0][0])
    assert base is not None
    for ref, _body in awkward:
        derived, captured = signed._derive(base, ref), signed._captured(ref)
        assert derived.url == captured.url
        assert signedget._signer_of(derived) == signedget._signer_of(captured)
        assert signedget._signer_of(derived)[0] == "AWS4-HMAC-SHA256"


@pytest.mark.parametrize("why", ["signs for another region", "has no request signer"])
def test_without_a_base_that_reproduces_its_template_botocore_makes_every_template(
    source: S3Source, awkward: list[tuple[ObjectRef, bytes]], monkeypatch: pytest.MonkeyPatch,
    why: str,
) -> None:
    """As when botocore signs a bucket for another region than the client's (after a redirect),
    or a botocore without the signer this uses: every object's template is botocore's."""
    if why == "signs for another region":
        monkeypatch.setattr(source._reads._request_signer, "_region_name", "eu-west-1")
    else:
        monkeypatch.setattr(source._signed, "_signer", None)
    calls = count_botocore_gets(source, monkeypatch)
    for ref, body in awkward[:3]:
        assert source.get_range(ref, 0, ref.size) == body
    assert len(calls) == 3
    assert not source._signed._bases


def test_a_failure_a_new_signature_may_cure_drops_the_buckets_base(
    source: S3Source, awkward: list[tuple[ObjectRef, bytes]], proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_botocore_gets(source, monkeypatch)
    (first, first_body), (second, second_body) = awkward[:2]
    assert source.get_range(first, 0, first.size) == first_body
    proxy.inject("error", status=403, code="SignatureDoesNotMatch", times=1)
    assert source.get_range(second, 0, second.size) == second_body  # derived, refused, redone
    assert not source._signed._bases
    assert [("Range" in call) for call in calls] == [False, True]
    assert source.get_range(awkward[2][0], 0, 4) == awkward[2][1][:4]  # botocore makes the next
    assert len(calls) == 3


def test_a_failure_a_new_signature_may_cure_drops_every_template_of_the_bucket(
    source: S3Source, objects: dict[str, ObjectRef], awkward: list[tuple[ObjectRef, bytes]],
    proxy: FaultProxy,
) -> None:
    """The bucket's templates were signed from the base that failed: sent, each would be
    refused in turn, and ``REFUSALS_TO_GIVE_UP`` of them in a row give templates up for good.
    Another bucket's stay."""
    elsewhere = objects["small.txt"]
    assert source.get_range(elsewhere, 0, 4) == SMALL[:4]
    for ref, body in awkward[:3]:
        assert source.get_range(ref, 0, ref.size) == body
    first, first_body = awkward[0]
    proxy.inject("error", status=403, code="SignatureDoesNotMatch", times=1)
    assert source.get_range(first, 0, first.size) == first_body  # refused, redone by botocore
    assert list(source._signed._templates) == [signedget._name(elsewhere)]
