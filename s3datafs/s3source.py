"""The S3 edge: the only module that imports boto3/botocore.

Design:
- ``S3Source`` implements ``model.ObjectSource`` over one botocore client. Clients are thread-safe,
  so one instance serves every worker thread; its connection pool is sized by
  ``S3Settings.max_connections`` and callers bound their own concurrency to that number.
- Every GET is pinned: ``Range`` always, ``VersionId`` when the object has one, ``IfMatch`` with the
  pinned ETag always. A 412, a vanished version or a vanished key is a ``StaleObjectError``: the
  pinned bytes no longer exist, and no other bytes are ever returned in their place.
- The body is read inside the retried call and checked: its length and ``Content-Range`` must be
  exactly what was asked, otherwise it is treated like a dropped connection (retried, never
  served). Transient failures are retried with full-jitter exponential backoff until the
  per-request deadline; botocore's own retries are kept small so the deadline stays ours.
- Errors leave this module typed (``errors.*``), with messages that name the S3 URI and never a
  credential.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
import botocore.config
import botocore.exceptions
from botocore import UNSIGNED

from .errors import (
    AccessDeniedError,
    ConfigError,
    NotFoundError,
    S3DataFSError,
    S3RequestError,
    StaleObjectError,
    TransientS3Error,
    UsageError,
)
from .model import ObjectRef, http_range

log = logging.getLogger(__name__)

_ACCESS_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_TRANSIENT = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
}
_GONE = {"NoSuchKey", "NoSuchVersion", "404", "PreconditionFailed", "412"}
_TRANSIENT_BOTOCORE = (
    botocore.exceptions.ConnectionError,  # covers endpoint, connect-timeout, read-timeout, reset
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ConnectionClosedError,
)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Secrets are excluded from ``repr`` so they cannot leak into logs."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    no_sign_request: bool = False
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    max_connections: int = 32
    connect_timeout: float = 10.0
    request_timeout: float = 30.0  # per socket read
    read_deadline: float = 60.0  # total time one get_range may take, retries included

    def secrets(self) -> list[str]:
        """Values that must never appear in any output (used by the log redactor)."""
        return [s for s in (self.secret_access_key, self.session_token) if s]


class S3Source:
    """``ObjectSource`` backed by boto3."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._client = _make_client(settings)

    # -- resolution (mount time) -------------------------------------------------------------

    def bucket_versioning(self, bucket: str) -> bool | None:
        try:
            response = self._client.get_bucket_versioning(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("AccessDenied", "403"):  # valid keys, no permission for this call
                return None
            raise _map_client_error(exc, f"s3://{bucket}") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _map_botocore_error(exc, f"s3://{bucket}") from None
        return response.get("Status") in ("Enabled", "Suspended")

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectRef:
        uri = f"s3://{bucket}/{key}"
        kwargs = {"Bucket": bucket, "Key": key}
        if version_id is not None:
            kwargs["VersionId"] = version_id
        try:
            response = self._client.head_object(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchKey", "NoSuchVersion", "400", "InvalidArgument"):
                what = f"version {version_id} of {uri}" if version_id else uri
                raise NotFoundError(f"no such object: {what}") from None
            raise _map_client_error(exc, uri) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _map_botocore_error(exc, uri) from None
        return ObjectRef(
            bucket=bucket,
            key=key,
            version_id=response.get("VersionId"),
            etag=response["ETag"],
            size=int(response["ContentLength"]),
            last_modified=response["LastModified"].timestamp(),
        )

    def list_latest(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[ObjectRef]:
        uri = f"s3://{bucket}/{prefix}"
        try:
            if versioned:
                yield from self._list_versions(bucket, prefix)
            else:
                yield from self._list_objects(bucket, prefix)
        except botocore.exceptions.ClientError as exc:
            raise _map_client_error(exc, uri) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _map_botocore_error(exc, uri) from None

    def _list_objects(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield _ref_from_listing(bucket, item, version_id=None)

    def _list_versions(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        # Only the latest version of each key counts; a key whose latest entry is a delete
        # marker has no IsLatest version and so is absent, as in a plain listing.
        paginator = self._client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Versions", ()):
                if item.get("IsLatest"):
                    yield _ref_from_listing(bucket, item, version_id=item["VersionId"])

    # -- reads (after mount) -----------------------------------------------------------------

    def get_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        deadline = time.monotonic() + self._settings.read_deadline
        attempt = 0
        while True:
            try:
                return self._get_range_once(ref, start, end)
            except TransientS3Error as exc:
                attempt += 1
                delay = random.uniform(0, min(5.0, 0.1 * 2**attempt))
                if time.monotonic() + delay >= deadline:
                    raise TransientS3Error(
                        f"giving up on {ref.uri} bytes {start}-{end - 1} after {attempt} "
                        f"attempts: {exc}"
                    ) from None
                log.info("retrying %s [%d, %d) in %.2fs: %s", ref.uri, start, end, delay, exc)
                time.sleep(delay)

    def _get_range_once(self, ref: ObjectRef, start: int, end: int) -> bytes:
        kwargs = {"Bucket": ref.bucket, "Key": ref.key, "Range": http_range(start, end)}
        kwargs["IfMatch"] = ref.etag
        if ref.version_id is not None:
            kwargs["VersionId"] = ref.version_id
        try:
            response = self._client.get_object(**kwargs)
            with response["Body"] as body:
                data = body.read()
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _GONE:
                raise StaleObjectError(
                    f"{ref.uri} changed or was deleted after mount "
                    f"(pinned ETag {ref.etag}, version {ref.version_id or '-'}): "
                    f"{_code(exc)}; remount to see the current data"
                ) from None
            raise _map_client_error(exc, ref.uri) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise _map_botocore_error(exc, ref.uri) from None
        _check_body(ref, start, end, data, response.get("ContentRange"))
        return data


def _check_body(
    ref: ObjectRef, start: int, end: int, data: bytes, content_range: str | None
) -> None:
    """Refuse any body that is not exactly ``[start, end)`` of the pinned object."""
    if len(data) != end - start:
        raise TransientS3Error(f"short body for {ref.uri}: {len(data)} of {end - start} bytes")
    match = _CONTENT_RANGE.match(content_range or "")
    if match is None:
        # A server that ignores Range answers 200 with the whole object: only acceptable when
        # the whole object is exactly what was asked.
        if start == 0 and end == ref.size:
            return
        raise S3RequestError(f"{ref.uri}: server ignored the Range header ({content_range!r})")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if (first, last + 1) != (start, end) or (total != "*" and int(total) != ref.size):
        raise TransientS3Error(f"{ref.uri}: Content-Range {content_range!r} is not what was asked")


def _ref_from_listing(bucket: str, item: dict, *, version_id: str | None) -> ObjectRef:
    return ObjectRef(
        bucket=bucket,
        key=item["Key"],
        version_id=version_id,
        etag=item["ETag"],
        size=int(item["Size"]),
        last_modified=item["LastModified"].timestamp(),
    )


def check_settings(settings: S3Settings) -> None:
    """Reject settings boto3 itself refuses (profile, endpoint, region) without any request.

    The CLI calls this before it forks, so such mistakes are usage errors with no daemon started.
    """
    _make_client(settings)


def _make_client(settings: S3Settings):  # botocore clients have no static type
    config = botocore.config.Config(
        max_pool_connections=settings.max_connections,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.request_timeout,
        retries={"mode": "standard", "max_attempts": 3},
        signature_version=UNSIGNED if settings.no_sign_request else None,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
        user_agent_extra="s3datafs",
    )
    try:
        session = boto3.session.Session(
            profile_name=settings.profile,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            region_name=settings.region,
        )
        return session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(
            f"AWS profile {settings.profile!r} not found: check ~/.aws/config, "
            f"~/.aws/credentials or --profile"
        ) from None
    except botocore.exceptions.InvalidRegionError:
        raise UsageError(
            f"invalid --region {settings.region!r}: use a name such as us-east-1"
        ) from None
    except ValueError as exc:  # botocore's message for a malformed endpoint URL
        raise UsageError(
            f"invalid --endpoint-url {settings.endpoint_url!r}: {exc}; use e.g. https://host:port"
        ) from None


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _map_client_error(exc: botocore.exceptions.ClientError, uri: str) -> S3DataFSError:
    code = _code(exc)
    message = exc.response.get("Error", {}).get("Message") or code
    if code == "NoSuchBucket":
        bucket = uri[len("s3://") :].split("/", 1)[0]
        return NotFoundError(
            f"bucket {bucket!r} does not exist: check the name, --endpoint-url and --region"
        )
    if code in _ACCESS_DENIED:
        return AccessDeniedError(
            f"access denied to {uri} ({code}): check the credentials, --profile or "
            f"--credentials-file, or use --no-sign-request for a public bucket"
        )
    if code in _TRANSIENT:
        return TransientS3Error(f"S3 error on {uri}: {code}: {message}")
    return S3RequestError(f"S3 error on {uri}: {code}: {message}")


def _map_botocore_error(exc: botocore.exceptions.BotoCoreError, uri: str) -> S3DataFSError:
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AccessDeniedError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, use "
            "--profile or --credentials-file, or --no-sign-request for a public bucket"
        )
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return TransientS3Error(f"cannot reach S3 for {uri}: {exc}")
    return S3RequestError(f"S3 request for {uri} failed: {exc}")
