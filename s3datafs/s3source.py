"""The S3 edge: with ``signedget`` and ``credfile``, the only modules importing botocore.

Design:
- ``S3Source`` implements ``model.ObjectSource`` over one botocore client. Clients are thread-safe,
  so one instance serves every worker thread; its connection pool is sized by
  ``S3Settings.max_connections`` and callers bound their own concurrency to that number.
- Every GET is pinned: ``Range`` always, ``VersionId`` when the object has one, ``IfMatch`` with the
  pinned ETag always. A 412, a vanished version or a vanished key is a ``StaleObjectError``: the
  pinned bytes no longer exist, and no other bytes are ever returned in their place. A GET that
  names a version needs s3:GetObjectVersion, which read-only policies written by hand often
  lack: once one is refused for it (``MissingPermissionError``) and the same GET without the
  version succeeds, the bucket's objects are read by ETag alone, with one warning; ``IfMatch``
  still makes that the pinned bytes or an error, and only an overwritten object is lost.
- A refused request's error names the permission it needed (``_denied``).
- The body is read inside the retried call and checked: its length and ``Content-Range`` must be
  exactly what was asked, otherwise it is treated like a dropped connection (retried, never
  served). Transient failures (connection refused/reset, timeouts, truncated bodies, 5xx, 429,
  SlowDown and other throttling) are retried with full-jitter exponential backoff until
  ``read_deadline``; permanent ones (403, 404/NoSuchVersion, 412, other 4xx) fail at once.
- GETs are sent from per-object templates that botocore signed (``signedget``: a third of a
  botocore call's CPU); whatever that path cannot handle it leaves to a plain botocore call.
  Both give the same checks below and the same errors.
- Every GET tells ``link`` (``linkrate.LinkRate``) when it began and ended and how fast its body
  came: the reader splits the reads it waits for in two GETs once the link shows itself slow.
- GETs have their own client with botocore's retries off (one attempt per call) and socket
  timeouts no longer than the deadline, so the deadline is ours alone: botocore's retries would
  multiply our attempts and could wait 3 x 30 s on a stalled server. Listing and HEAD (mount
  time) keep botocore's standard retries. The reader adds a hard bound around the whole call
  (``BlockReader(read_timeout=...)``), which also covers a server that trickles bytes.
- What a GET can and cannot prove about its bytes: S3 sends no checksum for a ranged GET (and we
  always send Range), so a body of the right length with the right Content-Range but flipped
  bytes cannot be told from the real thing - except when the GET covers the whole object and
  the ETag is the object's MD5 (single-part upload, not SSE-KMS/SSE-C): then the MD5 is checked
  and a mismatch is retried like a dropped connection. If two identical bodies disagree with the
  ETag, the store's ETags are not MD5 digests (S3-compatible stores, directory buckets): the check
  is switched off with one warning rather than failing every read. Over HTTPS, TLS authenticates
  every byte in transit, which is the real protection for ranged reads.
- Listings are turned into pinned refs by ``listing`` (pure: which version of a key, in which
  order, how sub-prefixes are listed concurrently); this module only supplies the pages, from
  ListObjectsV2 on an unversioned bucket and ListObjectVersions on a versioned one, and maps
  errors raised in listing workers like any other.
- Errors leave this module typed (``errors.*``), with messages that name the S3 URI and never a
  credential.
- Start-up cost (issue 4, mount to first read): a client on a fresh botocore session parses
  botocore's JSON data (endpoints, the S3 model and endpoint rules: ~80 ms) and first scans all ~450
  service directories to check that ``s3`` exists (~10 ms, ~50 ms with a cold page cache). So an
  ``S3Source`` makes its two clients from one session (credentials and config read as before), and
  every session shares one process-wide data loader (``_shared_loader``): the data is parsed once
  per process, and a forked daemon inherits it from the ``check_settings`` its parent ran. That
  session, and the client it checked with, serve the ``S3Source`` made next with the same settings
  within seconds (the mount's daemon; each daemon of a ``mount-all`` whose datasets share their
  settings, from one check): only the client for reads is new. The loader knows that
  ``s3`` exists without scanning (other services, which credential providers load, after the scan).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import http.client
import logging
import os
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.loaders
import botocore.model
import botocore.session
import botocore.utils
import urllib3.exceptions
from botocore import UNSIGNED

from .credfile import CredentialsFile
from .errors import (
    AccessDeniedError,
    ConfigError,
    MissingPermissionError,
    NotFoundError,
    S3DataFSError,
    S3RequestError,
    SettingError,
    StaleObjectError,
    TransientS3Error,
)
from .linkrate import LinkRate
from .listing import (
    Page,
    Selection,
    checked_pages,
    list_ordered,
    pinnable_etag,
    required,
    select_key,
)
from .model import ObjectRef, http_range, normalize_etag
from .signedget import Fetched, SignedGets, object_params
from .slowanswer import SlowAnswers

log = logging.getLogger(__name__)

# What a reader of a stale object can do (a snapshot of the old pin would fail the same way).
_SEE_CURRENT = "mount the URI again to see the current data"
_ACCESS_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
# Calls botocore's credential providers make (a role through STS, an SSO profile).
_CREDENTIAL_OPERATIONS = {
    "AssumeRole",
    "AssumeRoleWithWebIdentity",
    "AssumeRoleWithSAML",
    "GetRoleCredentials",
    "CreateToken",
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
    "429",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "ThrottledException",
    "PriorRequestNotComplete",
    "OperationAborted",
}
# GetBucketVersioning: no permission for it (valid keys), or a store that does not have it.
_VERSIONING_UNKNOWN = {
    "AccessDenied", "403", "NotImplemented", "501", "MethodNotAllowed", "405", "InvalidRequest"
}
# What a GET of pinned bytes gets once they are gone (the bucket with them, too): ESTALE.
_GONE = {"NoSuchKey", "NoSuchVersion", "NoSuchBucket", "404", "PreconditionFailed", "412"}
_TRANSIENT_BOTOCORE = (
    botocore.exceptions.ConnectionError,  # endpoint refused/unreachable, connect timeout, proxy
    botocore.exceptions.HTTPClientError,  # read timeout, connection closed, broken body stream
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.FlexibleChecksumError,  # a checksum S3 sent did not match: corrupted
)
# Failures while reading a body, below botocore (urllib3, http.client, the socket).
_BODY_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)
_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_NOT_MD5_ENCRYPTION = ("aws:kms", "aws:kms:dsse")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3. Secrets are excluded from ``repr`` so they cannot leak into logs."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    no_sign_request: bool = False
    requester_pays: bool = False  # every request says the requester pays (x-amz-request-payer)
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    # The keys above came from this file ([section]): it is read again while mounted (credfile).
    credentials_file: str | None = None
    credentials_section: str | None = None
    max_connections: int = 32
    connect_timeout: float = 10.0
    request_timeout: float = 30.0  # per socket read
    read_deadline: float = 60.0  # total time one get_range may take, retries included
    list_workers: int = 8  # sub-prefixes listed at once (mount time only; well under the pool)
    list_page_size: int = 1000  # keys per listing page (S3's maximum; tests use small pages)

    def secrets(self) -> list[str]:
        """Values that must never appear in any output (used by the log redactor)."""
        return [s for s in (self.secret_access_key, self.session_token) if s]


class S3Source:
    """``ObjectSource`` backed by botocore."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        checked = _take_checked(settings)
        if checked is None:
            self._client, self._reads = _make_clients(settings, for_reads=(False, True))
        else:  # the session and client check_settings made: only the reads' client is new
            session, self._client = checked
            (self._reads,) = _make_clients(settings, for_reads=(True,), session=session)
        self._signed = SignedGets.for_client(self._reads)  # GETs from per-object templates
        self._lock = threading.Lock()
        self._verify_md5 = True  # off once the store shows ETags that are not MD5 digests
        self._md5_mismatch: dict[ObjectRef, str] = {}  # the last bad MD5 per object
        self._versions_unreadable: set[str] = set()  # buckets read by ETag alone (``_fetch``)
        self.link = LinkRate()  # body rates of the GETs: the reader splits waited reads by it

    # -- resolution (mount time) -------------------------------------------------------------

    def bucket_versioning(self, bucket: str) -> bool | None:
        try:
            response = self._client.get_bucket_versioning(Bucket=bucket)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _VERSIONING_UNKNOWN:  # ETag pinning needs no versioning state
                return None
            raise _map_client_error(exc, f"s3://{bucket}") from None
        except (botocore.exceptions.BotoCoreError, RuntimeError) as exc:
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
            raise _map_client_error(exc, uri, version_id) from None
        except (botocore.exceptions.BotoCoreError, RuntimeError) as exc:
            raise _map_botocore_error(exc, uri) from None
        _warn_if_archived(response, uri)
        return ObjectRef(
            bucket=bucket,
            key=key,
            version_id=response.get("VersionId"),
            etag=pinnable_etag(response.get("ETag"), uri),
            size=int(required(response, "ContentLength", uri)),
            last_modified=required(response, "LastModified", uri).timestamp(),
        )

    def list_latest(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[ObjectRef]:
        return self._list(bucket, prefix, Selection(versioned))

    def list_as_of(self, bucket: str, prefix: str, as_of: float) -> Iterator[ObjectRef]:
        return self._list(bucket, prefix, Selection(True, as_of))

    def head_as_of(self, bucket: str, key: str, as_of: float) -> ObjectRef:
        uri = f"s3://{bucket}/{key}"
        pages = self._pages(bucket, True, key, None)
        try:
            ref = select_key(bucket, key, pages, Selection(True, as_of))
        except botocore.exceptions.ClientError as exc:
            raise _map_client_error(exc, uri) from None
        except (botocore.exceptions.BotoCoreError, RuntimeError) as exc:
            raise _map_botocore_error(exc, uri) from None
        if ref is None:
            raise NotFoundError(f"no such object at that time: {uri}")
        return ref

    def _list(self, bucket: str, prefix: str, selection: Selection) -> Iterator[ObjectRef]:
        uri = f"s3://{bucket}/{prefix}"
        # The current objects' archive classes (the listing's workers count); not as of a time,
        # whose versions are other than the current ones.
        archived = collections.Counter() if selection.as_of is None else None
        fetch = functools.partial(self._pages, bucket, selection.versioned, archived=archived)
        try:
            yield from list_ordered(
                fetch, bucket, prefix, selection, workers=self._settings.list_workers
            )
        except botocore.exceptions.ClientError as exc:
            raise _map_client_error(exc, uri) from None
        except (botocore.exceptions.BotoCoreError, RuntimeError) as exc:
            raise _map_botocore_error(exc, uri) from None
        if archived:
            classes = ", ".join(f"{name}: {count}" for name, count in sorted(archived.items()))
            log.warning("%d of the objects listed under %s are archived (%s): reading one fails "
                        "until it is restored (aws s3api restore-object)",
                        archived.total(), uri, classes)

    def _pages(
        self, bucket: str, versioned: bool, prefix: str, delimiter: str | None,
        archived: collections.Counter[str] | None = None,
    ) -> Iterable[Page]:
        """Listing pages, from ListObjectVersions (versioned) or ListObjectsV2; with
        ``archived``, the current objects in an archive class are counted there by class."""
        operation = "list_object_versions" if versioned else "list_objects_v2"
        kwargs = {"Bucket": bucket, "Prefix": prefix,
                  "PaginationConfig": {"PageSize": self._settings.list_page_size}}
        if delimiter is not None:
            kwargs["Delimiter"] = delimiter
        pages = self._client.get_paginator(operation).paginate(**kwargs)
        pages = checked_pages(pages, f"s3://{bucket}/{prefix}", versioned=versioned)
        return pages if archived is None else self._counting_archived(pages, archived)

    def _counting_archived(
        self, pages: Iterable[Page], archived: collections.Counter[str]
    ) -> Iterator[Page]:
        for page in pages:
            found = [item["StorageClass"] for item in (*page.get("Contents", ()),
                                                       *page.get("Versions", ()))
                     if item.get("StorageClass") in _ARCHIVE_CLASSES
                     and item.get("IsLatest", True)]
            if found:
                with self._lock:  # the listing's workers share the counter
                    archived.update(found)
            yield page

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
                # debug: a 503 storm would write a line per retry; the giving up is logged
                log.debug("retrying %s [%d, %d) in %.2fs: %s", ref.uri, start, end, delay, exc)
                time.sleep(delay)

    def _get_range_once(self, ref: ObjectRef, start: int, end: int) -> bytes:
        get = self.link.begin()
        try:
            fetched = self._fetch(ref, start, end)
        except BaseException:
            self.link.end(get)  # over, with no body to tell the rate
            raise
        data = fetched.data
        self.link.end(get, len(data), fetched.body_seconds)
        _check_body(ref, start, end, data, fetched.content_range)
        _check_pin(ref, fetched)
        if start == 0 and end == ref.size and self._verify_md5:
            self._check_md5(ref, data, fetched)
        return data

    def _fetch(self, ref: ObjectRef, start: int, end: int) -> Fetched:
        """One GET of ``[start, end)``, its errors mapped to ours; by ETag alone where this
        bucket's versions may not be read (``_by_etag``)."""
        if ref.version_id is None:
            return self._fetch_as_named(ref, start, end)
        if ref.bucket in self._versions_unreadable:
            return self._by_etag(ref, start, end)
        try:
            return self._fetch_as_named(ref, start, end)
        except MissingPermissionError as exc:
            if exc.permission != _GET_VERSION:
                raise
            try:
                fetched = self._by_etag(ref, start, end)
            except AccessDeniedError:  # not for want of that permission alone, then
                raise exc from None
        self._read_versions_by_etag(ref.bucket)  # once that worked
        return fetched

    def _by_etag(self, ref: ObjectRef, start: int, end: int) -> Fetched:
        """The GET of a version without naming it: with ``If-Match`` it is the pinned bytes or
        an error all the same. The version S3 then says it sent is the current one, which is
        no pin's business (the same ETag is the same bytes), so it is not passed on."""
        fetched = self._fetch_as_named(dataclasses.replace(ref, version_id=None), start, end)
        return dataclasses.replace(fetched, version_id=None)

    def _read_versions_by_etag(self, bucket: str) -> None:
        """A read-only policy without s3:GetObjectVersion: read ``bucket``'s objects by ETag,
        as the pins of a bucket whose versions may not be listed are (``resolve``)."""
        with self._lock:
            if bucket in self._versions_unreadable:
                return
            self._versions_unreadable.add(bucket)
        log.warning("may not read object versions in bucket %r (s3:GetObjectVersion is not "
                    "granted): reading them by ETag alone (If-Match): the pinned bytes, or "
                    "ESTALE once an object is overwritten", bucket)

    def _fetch_as_named(self, ref: ObjectRef, start: int, end: int) -> Fetched:
        """One GET of ``[start, end)`` of ``ref`` as it names itself, its errors mapped to ours."""
        try:
            fetched = self._signed.get(ref, start, end) if self._signed is not None else None
            if fetched is None:  # no template here, or an error botocore handles better
                fetched = self._get_with_botocore(ref, start, end)
                if self._signed is not None:
                    self._signed.cured()
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _GONE:
                raise StaleObjectError(
                    f"{ref.uri} changed or was deleted since it was pinned "
                    f"(pinned ETag {ref.etag}, version {ref.version_id or '-'}): "
                    f"{_code(exc)}; {_SEE_CURRENT}"
                ) from None
            raise _map_client_error(exc, ref.uri, ref.version_id) from None
        except (botocore.exceptions.BotoCoreError, RuntimeError) as exc:
            raise _map_botocore_error(exc, ref.uri) from None
        except _BODY_ERRORS as exc:  # anything botocore let through while the body streamed
            raise TransientS3Error(f"lost the connection reading {ref.uri}: {exc}") from None
        return fetched

    def _get_with_botocore(self, ref: ObjectRef, start: int, end: int) -> Fetched:
        response = self._reads.get_object(
            **object_params(ref), Range=http_range(start, end), IfMatch=ref.etag)
        body = response["Body"]
        started = time.perf_counter()
        try:  # botocore's own read: it checks Content-Length and maps urllib3's errors
            data = body.read()
        finally:
            body.close()
        return Fetched(data, response.get("ContentRange"), response.get("ServerSideEncryption"),
                       response.get("SSECustomerAlgorithm"), time.perf_counter() - started,
                       response.get("ETag"), response.get("VersionId"))

    def _check_md5(self, ref: ObjectRef, data: bytes, fetched: Fetched) -> None:
        """A whole-object body must hash to an MD5 ETag (see the module docstring)."""
        match = _PLAIN_MD5_ETAG.match(ref.etag)
        encrypted = fetched.encryption in _NOT_MD5_ENCRYPTION
        if match is None or encrypted or fetched.customer_algorithm:
            return
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest == match[1].lower():
            return
        with self._lock:
            seen = self._md5_mismatch.pop(ref, None)
            if seen != digest:  # the first bad body of this object: a corrupted transfer?
                if len(self._md5_mismatch) > 1024:
                    self._md5_mismatch.clear()
                self._md5_mismatch[ref] = digest
                raise TransientS3Error(
                    f"{ref.uri}: the bytes received do not match ETag {ref.etag} (MD5 {digest}): "
                    f"corrupted in transit"
                )
            self._verify_md5 = False
        log.warning(
            "ETags here are not MD5 digests of the objects' bytes (two identical downloads of %s "
            "have MD5 %s, its ETag is %s): whole-object MD5 checks are off for this mount",
            ref.uri,
            digest,
            ref.etag,
        )


def _check_body(
    ref: ObjectRef, start: int, end: int, data: bytes, content_range: str | None
) -> None:
    """Refuse any body that is not exactly ``[start, end)`` of the pinned object."""
    match = _CONTENT_RANGE.match(content_range or "")
    if match is None:
        # A server that ignores Range answers 200 (no Content-Range) with the whole object: only
        # acceptable when the whole object is exactly what was asked. Retrying would not help.
        if content_range is None and len(data) == end - start and start == 0 and end == ref.size:
            return
        if len(data) == ref.size != end - start:
            raise S3RequestError(f"{ref.uri}: server ignored the Range header ({content_range!r})")
        raise TransientS3Error(f"{ref.uri}: response without a valid Content-Range")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if total != "*" and int(total) != ref.size:  # no retry makes it the pinned size
        raise StaleObjectError(
            f"{ref.uri} is {total} bytes in S3, not the {ref.size} it was pinned with (it "
            f"changed, or the listing misstated its size); {_SEE_CURRENT}"
        )
    if len(data) != end - start:
        raise TransientS3Error(
            f"wrong body length for {ref.uri}: {len(data)} bytes, {end - start} asked"
        )
    if (first, last + 1) != (start, end):
        raise TransientS3Error(f"{ref.uri}: Content-Range {content_range!r} is not what was asked")


def _warn_if_archived(head: dict, uri: str) -> None:
    """Say so when a HEAD shows an object S3 will not read until it is restored: an archive
    class whose restored copy is missing or not ready yet (``Restore``), or an
    Intelligent-Tiering archive tier."""
    archive = head.get("ArchiveStatus")
    if head.get("StorageClass") in _ARCHIVE_CLASSES:
        if 'ongoing-request="false"' in head.get("Restore", ""):
            return  # a restored copy is there to read
        archive = head["StorageClass"]
    elif archive not in _ARCHIVE_STATUSES:
        return
    log.warning("%s is archived (%s) and not restored: reading it fails until it is "
                "(aws s3api restore-object)", uri, archive)


def _check_pin(ref: ObjectRef, fetched: Fetched) -> None:
    """Refuse a body that S3 says is of another ETag or version than the pinned one.

    S3 never sends one (``If-Match`` and ``versionId`` see to that), but a store that ignores
    them (some S3-compatible gateways) answers with the current object's bytes: its ETag and
    version headers are then all that tells them apart. A header that is missing tells nothing.
    """
    etag, version = fetched.etag, fetched.version_id
    if etag is not None and normalize_etag(etag) != ref.etag:
        raise StaleObjectError(
            f"{ref.uri} changed since it was pinned: S3 sent ETag {normalize_etag(etag)} for "
            f"pinned ETag {ref.etag} (this store ignores If-Match); {_SEE_CURRENT}"
        )
    if version is not None and ref.version_id is not None and version != ref.version_id:
        raise StaleObjectError(
            f"{ref.uri} changed since it was pinned: S3 sent version {version} for pinned version "
            f"{ref.version_id} (this store ignores versionId); {_SEE_CURRENT}"
        )


def check_settings(settings: S3Settings) -> None:
    """Reject settings botocore itself refuses (profile, endpoint, region) without any request.

    The CLI calls this before it forks, so such mistakes are usage errors with no daemon started;
    it also loads botocore's data, which the daemon (a fork) then finds loaded, and leaves its
    session and client to the ``S3Source`` made next with the same settings (``_take_checked``).
    The same settings checked again soon after (``mount-all``: each dataset when planned, and
    again before its daemon is forked) are not made anew: every daemon forked meanwhile takes a
    copy of that one session and client, pages it shares with the others until it writes them.
    """
    global _checked
    if (_checked is not None and _checked[0] == settings
            and time.monotonic() - _checked[1] <= CHECK_AGAIN_SECONDS):
        return
    session = _session(settings)
    (client,) = _make_clients(settings, for_reads=(False,), session=session)
    _checked = (settings, time.monotonic(), session, client)


# check_settings' session and client, for the S3Source that the same command makes next, most
# often in the daemon it forks: a session and a client less to make on the way to a mount's
# first read (~5-13 and ~4-10 ms). Taken once, and only soon after: an S3Source made later (a
# remount by a long-lived process) reads credentials and config afresh.
_checked: tuple[S3Settings, float, botocore.session.Session, object] | None = None
CHECKED_REUSE_SECONDS = 10.0
CHECK_AGAIN_SECONDS = CHECKED_REUSE_SECONDS / 2  # older, made anew: fresh for the next daemon


def _take_checked(settings: S3Settings) -> tuple[botocore.session.Session, object] | None:
    """check_settings' session and client if it just checked these very ``settings``."""
    global _checked
    checked, _checked = _checked, None
    if checked is None:
        return None
    checked_settings, at, session, client = checked
    if checked_settings != settings or time.monotonic() - at > CHECKED_REUSE_SECONDS:
        return None
    return session, client


def _session(settings: S3Settings) -> botocore.session.Session:
    """A fresh botocore session for ``settings`` (credentials and config read anew)."""
    with _refused_settings(settings):
        session = botocore.session.Session(profile=settings.profile)
        session.register_component(
            "data_loader", _shared_loader(session.get_config_variable("data_path"))
        )
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=parse_timestamp
        )
        if settings.credentials_file is not None:
            path, section = Path(settings.credentials_file), settings.credentials_section
            session.get_component("credential_provider").insert_before(
                "env", CredentialsFile(path, section)
            )
    return session


def _make_clients(
    settings: S3Settings, *, for_reads: tuple[bool, ...],
    session: botocore.session.Session | None = None,
) -> list:  # no static type
    """Clients of one session (a fresh one unless given), one per ``for_reads`` flag (see
    ``_client``)."""
    session = session or _session(settings)
    with _refused_settings(settings):
        return [_client(session, settings, reads) for reads in for_reads]


@contextlib.contextmanager
def _refused_settings(settings: S3Settings) -> Iterator[None]:
    """botocore's refusals of a profile, region or endpoint, as our errors."""
    try:
        yield
    except botocore.exceptions.ProfileNotFound:
        raise ConfigError(
            f"AWS profile {settings.profile!r} not found: check ~/.aws/config, "
            f"~/.aws/credentials or --profile"
        ) from None
    except botocore.exceptions.InvalidRegionError:
        raise SettingError("--region", str(settings.region),
                           "is not a region name: use one such as us-east-1") from None
    except ValueError as exc:  # botocore's message for a malformed endpoint URL
        raise SettingError("--endpoint-url", str(settings.endpoint_url),
                           f"is not an endpoint URL ({exc}): use one such as https://host:port"
                           ) from None


CONTROL_ATTEMPTS = 3  # of every request but reads (HEAD, LIST, ...): botocore's standard mode
SLOW_ANSWER_NOTICE = 5.0  # seconds without an answer before the log says so (slowanswer)


def _client(session: botocore.session.Session, settings: S3Settings, for_reads: bool):
    """A client; ``for_reads``: one attempt per call, timeouts within the read deadline."""
    bound = settings.read_deadline if for_reads else float("inf")
    config = botocore.config.Config(
        max_pool_connections=settings.max_connections,
        connect_timeout=min(settings.connect_timeout, bound),
        read_timeout=min(settings.request_timeout, bound),
        retries={"mode": "standard", "total_max_attempts": 1 if for_reads else CONTROL_ATTEMPTS},
        signature_version=UNSIGNED if settings.no_sign_request else None,
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
        user_agent_extra="s3datafs",
        # GETs are built here from pinned refs, never from user input: botocore's check of
        # every call's parameters against the model is ~5 % of a small GET's CPU, for nothing.
        parameter_validation=not for_reads,
    )
    keys = {}
    if settings.credentials_file is None:  # else the session's provider reads them (credfile)
        keys = {
            "aws_access_key_id": settings.access_key_id,
            "aws_secret_access_key": settings.secret_access_key,
            "aws_session_token": settings.session_token,
        }
    client = session.create_client(
        "s3",
        region_name=settings.region,
        endpoint_url=settings.endpoint_url,
        config=config,
        **keys,
    )
    if settings.requester_pays:
        client.meta.events.register("before-parameter-build.s3", _requester_pays)
    if not for_reads:  # reads have --read-timeout and their own log lines (reader.py)
        SlowAnswers(after=SLOW_ANSWER_NOTICE, per_attempt=settings.request_timeout,
                    attempts=CONTROL_ATTEMPTS).watch(client)
    _refresh_closer_to_expiry(getattr(client._request_signer, "_credentials", None))
    return client


# botocore renews temporary keys in their last 15 minutes, on every use and keeping the old
# keys when that fails ("advisory"), and must renew them in their last 10 ("mandatory"). A role
# session of 900 s, the shortest and a common one, is always in its last 15 minutes: every use
# of the keys called STS again (measured: 3 AssumeRole per GET, 47 a second with 8 readers),
# and a failing STS filled the log. The AWS SDKs for Java and JavaScript renew 5 minutes ahead.
ADVISORY_REFRESH_SECONDS = 5 * 60
MANDATORY_REFRESH_SECONDS = 2 * 60


def _refresh_closer_to_expiry(credentials: object) -> None:
    """Renew ``credentials`` (botocore's, if refreshable) 5 minutes ahead, must 2 minutes ahead;
    windows a provider chose itself are kept."""
    if not isinstance(credentials, botocore.credentials.RefreshableCredentials):
        return
    chosen = vars(credentials)  # botocore's class defaults are not in the instance's dict
    if "_advisory_refresh_timeout" not in chosen and "_mandatory_refresh_timeout" not in chosen:
        credentials._advisory_refresh_timeout = ADVISORY_REFRESH_SECONDS
        credentials._mandatory_refresh_timeout = MANDATORY_REFRESH_SECONDS


def _requester_pays(params: dict, model: botocore.model.OperationModel, **kwargs: object) -> None:
    """``RequestPayer=requester`` on every operation that takes it (HEAD, GET, the listings;
    the signed GET templates are made by a GetObject call, so they carry the header too)."""
    if model.input_shape is not None and "RequestPayer" in model.input_shape.members:
        params.setdefault("RequestPayer", "requester")


class _S3Loader(botocore.loaders.Loader):
    """botocore's data loader, quick to load the ``s3`` service.

    ``load_service_model`` first lists every service that has the requested data, which means
    listing each of ~450 directories in botocore's data, to ask whether the service is among
    them. For ``s3`` the answer is yes without a scan (were its data missing, the load itself
    would fail). Other services are loaded too, after botocore's scan: credential providers
    make clients of their own from the session (``sts`` for an assumed role or a web identity
    token, as on EKS; ``sso`` and ``sso-oidc`` for SSO profiles).
    """

    def list_available_services(self, type_name: str) -> _ServicesWithS3:
        return _ServicesWithS3(functools.partial(super().list_available_services, type_name))


class _ServicesWithS3(Sequence[str]):
    """botocore's list of services, scanned for (by ``scan``) only when not asked about ``s3``."""

    def __init__(self, scan: Callable[[], list[str]]) -> None:
        self._scan = scan

    @functools.cached_property
    def _services(self) -> list[str]:
        return self._scan()

    def __contains__(self, name: object) -> bool:
        return name == "s3" or name in self._services

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - Sequence's int and slice overloads
        return self._services[index]

    def __len__(self) -> int:
        return len(self._services)


_LOADERS: dict[str | None, botocore.loaders.Loader] = {}
_LOADERS_LOCK = threading.Lock()


def _shared_loader(data_path: str | None) -> botocore.loaders.Loader:
    """The process's data loader for botocore's ``data_path`` setting (as botocore builds it)."""
    with _LOADERS_LOCK:
        loader = _LOADERS.get(data_path)
        if loader is None:
            paths = data_path.split(os.pathsep) if data_path else []
            loader = _LOADERS[data_path] = _S3Loader(
                extra_search_paths=[os.path.expanduser(os.path.expandvars(p)) for p in paths]
            )
        return loader


def parse_timestamp(text: str) -> datetime.datetime:
    """botocore's timestamp parser, fast for the forms S3 sends.

    botocore parses every timestamp with dateutil: half of the client's CPU time for a
    1,000-entry listing page, and ~75 us of every GET (its Last-Modified header), ~10 % of a
    random 4 KiB read's GET. ``fromisoformat`` takes the ISO 8601 of listings and the standard
    library's RFC 5322 parser the HTTP dates of headers, each ~15x faster. Anything else (epoch
    numbers) goes to botocore's own parser. Always timezone-aware (UTC if none).
    """
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        try:
            parsed = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return botocore.utils.parse_timestamp(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=datetime.UTC)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# Storage classes S3 reads only once restored (Glacier Flexible Retrieval, Deep Archive); the
# Intelligent-Tiering archive tiers say so in a HEAD's ArchiveStatus, not in a listing.
_ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
_ARCHIVE_STATUSES = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})

# What a denied request needed granted, by operation; a version's HEAD or GET needs more.
_PERMISSION_NEEDED = {
    "ListObjectsV2": ("listing needs", "s3:ListBucket"),
    "ListObjectVersions": ("listing a versioned bucket needs", "s3:ListBucketVersions"),
    "HeadObject": ("reading it needs", "s3:GetObject"),
    "GetObject": ("reading it needs", "s3:GetObject"),
}
_GET_VERSION = "s3:GetObjectVersion"  # which reads by ETag alone may do without (``_fetch``)
_VERSION_PERMISSION = ("reading a pinned version needs", _GET_VERSION)
# Only a policy can cure these: the keys themselves were accepted.
_POLICY_DENIED = {"AccessDenied", "403"}
_CHECK_KEYS = ("check the credentials and their policy, --profile or --credentials-file; a "
               "public bucket needs --no-sign-request, a Requester Pays one --requester-pays")


def _denied(
    code: str, message: str, operation: str | None, uri: str, version_id: str | None
) -> AccessDeniedError:
    """The error for a request S3 refused: what it needed, and where to look. S3's own message
    is kept when it says more than "Access Denied" (AWS names the action and the policy that
    refused it, for requests within an account)."""
    said = message.strip()
    if said.lower() in ("access denied", "forbidden", code.lower()):  # says nothing more
        said = ""
    if code not in _POLICY_DENIED or operation not in _PERMISSION_NEEDED:
        said = f" (S3 said: {said})" if said else ""
        return AccessDeniedError(f"access denied to {uri} ({code}){said}: {_CHECK_KEYS}")
    reads = operation in ("HeadObject", "GetObject")
    what, permission = (_VERSION_PERMISSION if reads and version_id
                        else _PERMISSION_NEEDED[operation])
    if reads and "kms" in said.lower():  # the object's key, not the object, refused us
        what, permission = "its KMS key needs", "kms:Decrypt"
    hint = ""
    if operation == "HeadObject" and code == "403":  # a HEAD's 403 has no body to say more
        hint = (", and S3 answers 403 for a key that does not exist to whom may not list the "
                "bucket (s3:ListBucket): check the key")
    said = f" (S3 said: {said})" if said else ""
    return MissingPermissionError(
        f"access denied to {uri} ({code}){said}: {what} {permission}{hint}; {_CHECK_KEYS}",
        permission)


def _map_client_error(
    exc: botocore.exceptions.ClientError, uri: str, version_id: str | None = None
) -> S3DataFSError:
    """Our error for ``exc``, a request about ``uri`` (of ``version_id``, if it named one)."""
    code = _code(exc)
    message = exc.response.get("Error", {}).get("Message") or code
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    transient = code in _TRANSIENT or status in (429, 500, 502, 503, 504)
    if exc.operation_name in _CREDENTIAL_OPERATIONS:  # botocore's providers asked STS or SSO
        text = f"cannot get AWS credentials for {uri}: {exc.operation_name}: {code}: {message}"
        if transient:
            return TransientS3Error(text)
        return AccessDeniedError(f"{text}: check the role, its trust policy and the token")
    if code == "NoSuchBucket":
        bucket = uri[len("s3://") :].split("/", 1)[0]
        return NotFoundError(
            f"bucket {bucket!r} does not exist: check the name, --endpoint-url and --region"
        )
    if code in _ACCESS_DENIED:
        return _denied(code, message, exc.operation_name, uri, version_id)
    if code == "InvalidObjectState":
        return S3RequestError(f"{uri} is archived and not restored, so S3 will not read it "
                              "(InvalidObjectState): restore it (aws s3api restore-object), then "
                              "read it again")
    if transient:
        return TransientS3Error(f"S3 error on {uri}: {code}: {message}")
    return S3RequestError(f"S3 error on {uri}: {code}: {message}")


_EXPIRED_ON_ARRIVAL = "refreshed credentials are still expired"  # botocore's RuntimeError


def _while_getting_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` came up through botocore's credential providers (an STS or metadata
    service call, made while signing): its traceback passes through ``botocore.credentials``.
    The failing URL cannot tell: S3's own host changes with the bucket's region."""
    frames = traceback.walk_tb(exc.__traceback__)
    return any(frame.f_globals.get("__name__") == "botocore.credentials" for frame, _ in frames)


def _map_botocore_error(
    exc: botocore.exceptions.BotoCoreError | RuntimeError, uri: str
) -> S3DataFSError:
    """Ours for ``exc``; a ``RuntimeError`` is botocore's only for keys that came expired
    (any other is not botocore's to map, and is raised again). A network failure met while
    getting credentials (STS, for a role's keys, called while signing) is not blamed on S3
    and ``--endpoint-url``."""
    if not isinstance(exc, botocore.exceptions.BotoCoreError):
        if _EXPIRED_ON_ARRIVAL not in str(exc):
            raise exc
        return AccessDeniedError(
            f"cannot use the AWS credentials for {uri}: the credential service gave keys that "
            "had expired already: check this machine's clock, and the service")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return AccessDeniedError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, use "
            "--profile or --credentials-file, or --no-sign-request for a public bucket"
        )
    if isinstance(exc, botocore.exceptions.FlexibleChecksumError):
        return TransientS3Error(f"{uri}: the bytes received do not match S3's checksum: {exc}")
    if type(exc) is botocore.exceptions.HTTPClientError:
        # Not a network failure botocore knows: its text may quote a request header's value,
        # and so a credential (http.client refuses a header holding a line break).
        inner = exc.kwargs.get("error")
        if isinstance(inner, ValueError):
            return S3RequestError(
                f"S3 request for {uri} failed: a request header holds a character HTTP does not "
                "allow (a line break in a credential or a setting?)")
        return TransientS3Error(
            f"cannot reach S3 for {uri}: the HTTP client failed ({type(inner).__name__})")
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        if _while_getting_credentials(exc):
            return TransientS3Error(
                f"cannot get AWS credentials for {uri}: {exc}: the credential service (STS, for "
                "a role's keys) cannot be reached: check the network and the role's settings")
        return TransientS3Error(
            f"cannot reach S3 for {uri}: {exc}: check the endpoint (--endpoint-url) and network")
    return S3RequestError(f"S3 request for {uri} failed: {exc}")
