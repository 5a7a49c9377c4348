"""Ranged GETs of pinned objects at a third of botocore's CPU cost: signed once, sent many times.

Why: a botocore ``get_object`` costs ~600 us of CPU for a 4 KiB range (measured against the
local S3: request building, event hooks, signing, and parsing two dozen response headers into
a dict), while the daemon serves such a read in ~1.3-1.7 ms of CPU in all. Random reads, small
files and zip members are one GET each, so that cost is a third of theirs.

How: botocore builds and signs a GET of the object, *without* ``Range`` and ``If-Match``, and
hands it over instead of sending it (a ``before-send`` handler returns an empty response, on
the calling thread only). That request - the URL botocore's endpoint rules chose, its signed
headers - is kept per object as a *template* and sent again for each range, with ``Range`` and
``If-Match`` added (S3 does not require headers outside ``x-amz-*`` to be signed), through the
client's own HTTP session: the same connection pool, timeouts, proxies and TLS settings.
Measured: ~260 us to make a template, ~210 us per GET with it, against ~600 us per botocore
GET; so even an object read once costs less.

Objects of one bucket: a template differs from its bucket's others only in the key (and version)
in its URL and in its signature. So the first one botocore makes in a bucket also gives the
bucket's *base* (the URL before the key, the headers but the signature's own), and the next
objects' templates are derived from it: the key encoded as botocore's serializer does
(``percent_encode(key, safe="/~")``, the version as its query), signed by the client's own
request signer. ~70-125 us instead of ~270 us per template (measured: a GET of a new object 567
-> 340 us of CPU): most of a dataset of small files is read once per object, so this is a
template per file.

Invariants:
- A template is at most ``TEMPLATE_SECONDS`` (4 min) old: a SigV4 signature is accepted for
  15 minutes around its date.
- A template is only sent while it is signed with the credentials the client holds now (its
  access key and session token, read from its own headers, against the signer's credentials,
  which botocore refreshes as for any call). Expiring credentials (STS, ``credential_process``,
  a container or instance role) are replaced by botocore 2-5 minutes before their end
  (``s3source._refresh_closer_to_expiry``), or before every call when a lease is shorter than
  that; a template signed with the old ones is made again instead of being sent to fail
  (``ExpiredToken``), or, for a key deleted at the end of its lease, to fail the read
  (``InvalidAccessKeyId``).
- Only a 200/206 is handled here. An error that a new signature or botocore's own handling
  could cure (a redirect to another region, a clock skew, an expired or rejected signature or
  token) drops the template and answers ``None``: the caller repeats the attempt with a plain
  botocore call, which handles it as before. Any other error becomes the ``ClientError``
  botocore would have raised (code and message from S3's XML), so errors map exactly as before.
  ``REFUSALS_TO_GIVE_UP`` such errors in a row, each followed by a botocore GET that succeeded
  (``cured``), and templates are given up for good (one warning): a store that wants ``Range``
  or ``If-Match`` signed refuses every one, and would cost a refused GET per read. A template's
  success starts the count again, so refusals now and then (credentials replaced, a redirect)
  change nothing.
- Integrity as botocore's: when S3 sends a whole-object checksum (it does for whole-object GETs
  of objects uploaded with one; never for a range, nor a multipart "-N" one), the body must
  match it: CRC32, SHA-1, SHA-256 and SHA-512 always, CRC32C and CRC64NVME when ``awscrt`` is
  installed (as botocore without it, others are not checked). A mismatch raises botocore's
  ``FlexibleChecksumError``.
- The body is read whole (urllib3 enforces Content-Length) and the connection goes back to the
  pool; the caller checks length and Content-Range as for any GET.
- It relies on three botocore internals, the client's ``_endpoint.http_session``, the
  ``before-send`` event and the client's ``_request_signer``: without the first it is not used
  at all (``for_client``); should the hook not be called, the first template's GET is sent by
  botocore for real and every GET after is a plain botocore call, with one warning; without
  the signer, every template is botocore's (no bases).
- A base is only kept if it reproduces the template it came from: the same URL, and a signature
  with the same credential scope (key id, region, service) and signed headers. A bucket botocore
  signs for another region than the client's, or with another scheme (S3 Express sessions),
  fails that check and keeps a template per object from botocore. A base is dropped with its
  bucket's templates when a GET fails in a way a new signature may cure, and it is renewed with
  them every ``TEMPLATE_SECONDS``.
- Thread-safe: templates and bases live in locked LRUs; the capture flag is thread-local, so
  concurrent real botocore calls on the same client are never intercepted.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from xml.etree import ElementTree

import botocore.awsrequest
import botocore.exceptions
import botocore.utils
import cachetools

from .model import ObjectRef, http_range

log = logging.getLogger(__name__)

TEMPLATE_SECONDS = 240.0
_TEMPLATES_KEPT = 4096
_BASES_KEPT = 64
# Headers a base leaves out: the signature's own (the signer adds them again) and the SDK's per
# call bookkeeping, which botocore adds after signing.
_NOT_IN_BASE = frozenset({
    "authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256",
    "amz-sdk-invocation-id", "amz-sdk-request",
})

# Errors a fresh botocore attempt may cure: redirects to the bucket's region, signature, clock
# and token trouble (botocore corrects clock skew and refreshes credentials itself).
_REDO_STATUS = {301, 307}
# Templates refused this many times in a row, each time cured by botocore's own GET, are given
# up: a store (or a proxy before it) that wants every header signed refuses them all, and each
# read would pay a refused GET before botocore's, for as long as the mount lives.
REFUSALS_TO_GIVE_UP = 3
_SIGNATURE_CODES = frozenset({"SignatureDoesNotMatch", "AuthorizationHeaderMalformed"})
_REDO_CODES = {
    "PermanentRedirect",
    "TemporaryRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "RequestTimeTooSkewed",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidToken",
}


def _crc32(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def _hashlib(name: str) -> Callable[[bytes], bytes]:
    return lambda data: hashlib.new(name, data).digest()


def _checksums() -> dict[str, Callable[[bytes], bytes]]:
    """Checksum algorithm -> digest function, in botocore's order of preference."""
    table: dict[str, Callable[[bytes], bytes]] = {}
    try:  # botocore checks these two only with the AWS CRT installed, and so do we
        from awscrt import checksums as crt
    except ImportError:
        pass
    else:
        if hasattr(crt, "crc64nvme"):
            table["crc64nvme"] = lambda data: crt.crc64nvme(data).to_bytes(8, "big")
        table["crc32c"] = lambda data: crt.crc32c(data).to_bytes(4, "big")
    table["crc32"] = _crc32
    for name in ("sha1", "sha256", "sha512"):
        table[name] = _hashlib(name)
    return table


_CHECKSUMS = _checksums()


@dataclass(frozen=True)
class Fetched:
    """A successful GET: its body and the response headers the caller checks."""

    data: bytes
    content_range: str | None
    encryption: str | None  # x-amz-server-side-encryption
    customer_algorithm: str | None  # x-amz-server-side-encryption-customer-algorithm
    body_seconds: float = 0.0  # reading the body once the headers were in (``linkrate``)
    etag: str | None = None  # the ETag and version S3 says it sent (``s3source._check_pin``)
    version_id: str | None = None


@dataclass(frozen=True)
class _Template:
    url: str
    headers: dict[str, str]
    made: float
    signed_with: tuple[str, str] = ("", "")  # access key and session token ("" if none)

    @classmethod
    def of(cls, url: str, headers: dict[str, str]) -> _Template:
        return cls(url, headers, time.monotonic(), _credentials_of(headers))


@dataclass(frozen=True)
class _Base:
    """What the templates of one bucket share (see the module docstring)."""

    prefix: str  # the URL up to the encoded key
    headers: dict[str, str]  # without those in ``_NOT_IN_BASE``
    made: float


class SignedGets:
    """GETs of ranges of pinned objects from templates made by ``client`` (see module doc)."""

    def __init__(self, client) -> None:  # a botocore S3 client (no static type)
        self._client = client
        self._session = client._endpoint.http_session  # the client's pool, timeouts, TLS
        self._signer = getattr(client, "_request_signer", None)  # signs derived templates
        self._templates: cachetools.LRUCache[tuple, _Template] = cachetools.LRUCache(
            _TEMPLATES_KEPT)
        self._bases: cachetools.LRUCache[str, _Base] = cachetools.LRUCache(_BASES_KEPT)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._unusable = False
        self._refusals = 0  # in a row, each cured by botocore (``cured``); a template's 2xx: 0
        client.meta.events.register_first("before-send.s3.GetObject", self._capture)

    @classmethod
    def for_client(cls, client) -> SignedGets | None:
        """``SignedGets`` for ``client``, or None if this botocore does not offer what it uses."""
        if getattr(getattr(client, "_endpoint", None), "http_session", None) is None:
            return None
        return cls(client)

    def get(self, ref: ObjectRef, start: int, end: int) -> Fetched | None:
        """Bytes ``[start, end)`` of ``ref``; None: repeat the attempt with botocore.

        Raises what botocore's ``get_object`` and its body's ``read`` would.
        """
        self._local.refused = None
        template = None if self._unusable else self._template(ref)
        if template is None:
            return None
        headers = {**template.headers, "Range": http_range(start, end), "If-Match": ref.etag}
        request = botocore.awsrequest.AWSPreparedRequest("GET", template.url, headers, None, True)
        response = self._session.send(request)
        raw = response.raw
        started = time.perf_counter()
        try:
            body = raw.read()
        finally:
            raw.close()
        body_seconds = time.perf_counter() - started
        status, answered = response.status_code, response.headers
        if status not in (200, 206):
            return self._failed(ref, status, body)
        self._refusals = 0
        _check_checksum(answered, body)
        return Fetched(
            body,
            answered.get("Content-Range"),
            answered.get("x-amz-server-side-encryption"),
            answered.get("x-amz-server-side-encryption-customer-algorithm"),
            body_seconds,
            answered.get("ETag"),
            answered.get("x-amz-version-id"),
        )

    def cured(self) -> None:
        """botocore's GET, made because ``get`` answered None on this thread, succeeded. If a
        template had been refused there, count it (see ``REFUSALS_TO_GIVE_UP``)."""
        refused, self._local.refused = getattr(self._local, "refused", None), None
        if refused is None:
            return
        with self._lock:
            self._refusals += 1
            if self._refusals < REFUSALS_TO_GIVE_UP or self._unusable:
                return
            self._unusable = True
        why = (": this store wants headers signed that s3datafs adds unsigned (Range, If-Match)"
               if refused in _SIGNATURE_CODES else "")
        log.warning("S3 refused %d GETs from signed templates in a row (%s) that botocore's "
                    "own GETs then got%s; plain botocore calls from now on (slower, as correct)",
                    REFUSALS_TO_GIVE_UP, refused, why)

    def forget(self, ref: ObjectRef) -> None:
        """Drop the bucket's base and all the bucket's templates, signed alike: botocore makes
        the next one. Kept, each would be sent to be refused in turn, and ``REFUSALS_TO_GIVE_UP``
        refusals in a row give templates up for good. Rare: a scan of ``_TEMPLATES_KEPT`` names
        at most."""
        with self._lock:
            for name in [name for name in self._templates if name[0] == ref.bucket]:
                del self._templates[name]
            self._bases.pop(ref.bucket, None)

    def _template(self, ref: ObjectRef) -> _Template | None:
        """The object's template, made now if missing or old (from the bucket's base if it has
        one); None if botocore sent no request through the hook (a botocore that no longer
        calls it: plain calls then, as before)."""
        name, now = _name(ref), time.monotonic()
        with self._lock:
            template = self._templates.get(name)
            base = self._bases.get(ref.bucket)
        if (
            template is not None
            and now - template.made < TEMPLATE_SECONDS
            and self._signed_with_current_credentials(template)
        ):
            return template
        if base is not None and now - base.made < TEMPLATE_SECONDS:
            template = self._derive(base, ref)
        else:
            template = self._captured(ref)
            if template is None:
                return None
            base = self._base_of(template, ref)
            if base is not None:
                with self._lock:
                    self._bases[ref.bucket] = base
        with self._lock:
            self._templates[name] = template
        return template

    def _signed_with_current_credentials(self, template: _Template) -> bool:
        """Whether the client would sign with the same access key and token now (botocore
        refreshes expiring credentials here, as before any call of its own). Without the
        signer (see the module docstring) this cannot be known, and only age limits a template.
        """
        if self._signer is None:
            return True
        credentials = getattr(self._signer, "_credentials", None)  # None: unsigned requests
        if credentials is None:
            return template.signed_with == ("", "")
        frozen = credentials.get_frozen_credentials()
        return template.signed_with == (frozen.access_key or "", frozen.token or "")

    def _derive(self, base: _Base, ref: ObjectRef) -> _Template:
        """A template for ``ref`` from its bucket's base, signed by the client's signer."""
        request = botocore.awsrequest.AWSRequest(
            "GET", base.prefix + botocore.utils.percent_encode(ref.key, safe="/~"),
            headers=dict(base.headers),
            params={"versionId": ref.version_id} if ref.version_id is not None else None,
        )
        self._signer.sign("GetObject", request)
        prepared = request.prepare()
        return _Template.of(prepared.url, dict(prepared.headers.items()))

    def _base_of(self, template: _Template, ref: ObjectRef) -> _Base | None:
        """The bucket's base from a template botocore made, if it reproduces that template."""
        if self._signer is None:
            return None
        tail = botocore.utils.percent_encode(ref.key, safe="/~")
        if ref.version_id is not None:
            tail += "?" + botocore.utils.percent_encode_sequence({"versionId": ref.version_id})
        if not template.url.endswith(tail):
            return None
        headers = {name: _text(value) for name, value in template.headers.items()
                   if name.lower() not in _NOT_IN_BASE}
        base = _Base(template.url[: -len(tail)], headers, template.made)
        again = self._derive(base, ref)
        if again.url != template.url or _signer_of(again) != _signer_of(template):
            return None
        return base

    def _captured(self, ref: ObjectRef) -> _Template | None:
        """A template botocore made (see ``_template``)."""
        self._local.captured = None
        self._local.capturing = True
        try:
            response = self._client.get_object(**object_params(ref))
        finally:
            self._local.capturing = False
        if self._local.captured is None:  # and botocore sent that GET, of the whole object
            response["Body"].close()  # unread: its connection is not reused, but not held
            log.warning("botocore no longer hands GETs to s3datafs before sending them: plain "
                        "botocore calls from now on (slower, as correct)")
            self._unusable = True
            return None
        url, headers = self._local.captured
        return _Template.of(url, headers)

    def _capture(self, request, **_kwargs):
        """botocore's ``before-send`` hook: keep the signed request, send nothing."""
        if not getattr(self._local, "capturing", False):
            return None  # a real call from this or another thread: not ours to touch
        self._local.captured = (request.url, dict(request.headers.items()))
        return botocore.awsrequest.AWSResponse(request.url, 200, {}, io.BytesIO())

    def _failed(self, ref: ObjectRef, status: int, body: bytes) -> None:
        code, message = _error_of(body)
        if status in _REDO_STATUS or code in _REDO_CODES:
            self.forget(ref)
            self._local.refused = code or str(status)
            return None
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": code or str(status), "Message": message},
             "ResponseMetadata": {"HTTPStatusCode": status}},
            "GetObject",
        )


def object_params(ref: ObjectRef) -> dict[str, str]:
    """``get_object``'s parameters naming the pinned object (its version when it has one)."""
    params = {"Bucket": ref.bucket, "Key": ref.key}
    if ref.version_id is not None:
        params["VersionId"] = ref.version_id
    return params


def _name(ref: ObjectRef) -> tuple[str, str, str | None]:
    return ref.bucket, ref.key, ref.version_id


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _signer_of(template: _Template) -> tuple[str, ...]:
    """Who signed, for what and which headers: the Authorization header without its date and
    signature ('' for an unsigned request)."""
    return _signature_scope(template.headers)


def _signature_scope(headers: dict[str, str]) -> tuple[str, ...]:
    algorithm, _, rest = _header(headers, "authorization").partition(" ")
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    scope = fields.get("Credential", "").split("/")
    del scope[1:2]  # the date
    return algorithm, *scope, fields.get("SignedHeaders", "")


def _credentials_of(headers: dict[str, str]) -> tuple[str, str]:
    """The access key in a signature and its session token ("" for none)."""
    scope = _signature_scope(headers)
    return scope[1] if len(scope) > 1 else "", _header(headers, "x-amz-security-token")


def _header(headers: dict[str, str], lower_name: str) -> str:
    return next((_text(value) for name, value in headers.items() if name.lower() == lower_name), "")


def _error_of(body: bytes) -> tuple[str, str]:
    """S3's error code and message from its XML body ('' for either when there is none)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    return root.findtext("Code") or "", root.findtext("Message") or ""


def _check_checksum(headers, body: bytes) -> None:
    """Raise ``FlexibleChecksumError`` if a whole-object checksum S3 sent does not match."""
    for algorithm, digest in _CHECKSUMS.items():
        expected = headers.get(f"x-amz-checksum-{algorithm}")
        if expected is None or "-" in expected:  # "-N": a checksum of part checksums
            continue
        if digest(body) != base64.b64decode(expected):
            raise botocore.exceptions.FlexibleChecksumError(
                error_msg=f"expected {algorithm} {expected} did not match the body's")
        return
