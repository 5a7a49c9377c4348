"""Faults between s3datafs and S3, below FUSE: ``S3Source`` and ``BlockReader`` against the real
boto3 path, through the fault-injecting proxy (``faultproxy.FaultProxy``) in front of moto.

What is proven here (the FUSE-level twins are in ``test_faults_e2e.py``):

- transient failures (5xx, SlowDown, resets, truncated, short, long or mislabelled bodies,
  garbage) are retried and the read returns exactly the pinned bytes;
- non-transient ones (403, 404/NoSuchVersion/NoSuchKey, 412, 400) are not retried: one GET;
- ``read_deadline`` bounds ``get_range`` against a stalled server, a server stalling inside the
  body and a refused connection; ``BlockReader(read_timeout=...)`` bounds a read even when the
  source itself would wait longer, and also while waiting for a connection slot;
- a body of the wrong length, a wrong or missing Content-Range are never returned;
- flipped bytes: detected (and retried) when a GET covers a whole object with an MD5 ETag;
  undetectable inside a ranged body (S3 sends no checksum for ranges) - asserted, so that the
  documented limit and the code cannot drift apart;
- a cache directory removed while in use is made again, as private as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest
import trio
from fakes import trio_test
from faultproxy import FaultProxy

from devtools.s3server import S3Server
from s3datafs import reader as reader_module
from s3datafs import s3source, slowanswer
from s3datafs.cache.blockfile import object_digest
from s3datafs.cache.disk import DiskCache
from s3datafs.errors import (
    AccessDeniedError,
    S3DataFSError,
    S3RequestError,
    StaleObjectError,
    TransientS3Error,
)
from s3datafs.model import ObjectRef
from s3datafs.reader import BlockReader
from s3datafs.s3source import S3Settings, S3Source
from s3datafs.signedget import Fetched

KiB = 1024
BIG = bytes((i * 7 + i // 251) % 256 for i in range(300 * KiB))  # several 64 KiB blocks
SMALL = b"a small object, read whole in one GET\n" * 40
HARD_LIMIT = 20.0  # seconds any single call below may take before the test calls it a hang


@pytest.fixture(scope="module")
def objects(s3server: S3Server) -> dict[str, ObjectRef]:
    """A bucket with one big and one small object, pinned as a mount would pin them."""
    s3 = s3server.client()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    refs = {}
    for key, body in (("big.bin", BIG), ("small.txt", SMALL)):
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        head = s3.head_object(Bucket=bucket, Key=key)
        refs[key] = ObjectRef(bucket, key, None, head["ETag"], len(body), 0.0)
    return refs


def source_for(proxy: FaultProxy, **settings: Any) -> S3Source:
    values = {"read_deadline": 10.0, "request_timeout": 5.0, "connect_timeout": 2.0, **settings}
    return S3Source(
        S3Settings(
            region="us-east-1",
            endpoint_url=proxy.endpoint,
            access_key_id="testing",
            secret_access_key="testing",
            **values,
        )
    )


def bounded(call: Callable[[], bytes], limit: float = HARD_LIMIT) -> tuple[object, float]:
    """Run ``call`` in a thread; (its result or exception, seconds taken). Fails on a hang."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"the call was still running after {limit}s"
    return outcome[0], time.monotonic() - started


def gets(proxy: FaultProxy) -> int:
    return proxy.requests["GetObject"]


# -- transient faults are retried ------------------------------------------------------------------

TRANSIENT = [
    pytest.param("error", {"status": 500, "code": "InternalError"}, id="500-InternalError"),
    pytest.param("error", {"status": 502, "code": "BadGateway"}, id="502"),
    pytest.param("error", {"status": 503, "code": "SlowDown"}, id="503-SlowDown"),
    pytest.param("error", {"status": 503, "code": "ServiceUnavailable"}, id="503-Unavailable"),
    pytest.param("error", {"status": 504, "code": "GatewayTimeout"}, id="504"),
    pytest.param("error", {"status": 429, "code": "TooManyRequests"}, id="429"),
    pytest.param("error", {"status": 400, "code": "RequestTimeout"}, id="400-RequestTimeout"),
    pytest.param("reset", {}, id="reset"),
    pytest.param("garbage", {}, id="garbage"),
    pytest.param("truncate", {"keep": 0.5}, id="truncate"),
    pytest.param("truncate", {"keep": 0.0}, id="truncate-empty"),
    pytest.param("reset_body", {}, id="reset-mid-body"),
    pytest.param("short", {"keep": 0.9}, id="short-body"),
    pytest.param("long", {}, id="long-body"),
    pytest.param("shift_range", {"by": 1}, id="content-range-shifted"),
    pytest.param("shift_range", {"by": -64 * KiB}, id="content-range-other-block"),
    pytest.param("drop_range", {}, id="content-range-missing"),
]


@pytest.mark.parametrize(("action", "options"), TRANSIENT)
def test_transient_faults_are_retried_and_the_pinned_bytes_returned(
    proxy: FaultProxy, objects: dict[str, ObjectRef], action: str, options: dict
) -> None:
    source = source_for(proxy)
    ref = objects["big.bin"]
    proxy.inject(action, times=2, **options)
    result, _ = bounded(lambda: source.get_range(ref, 64 * KiB, 192 * KiB))
    assert result == BIG[64 * KiB : 192 * KiB]
    assert proxy.injected_count(action) == 2
    assert gets(proxy) == 3  # two failures, one success: no more, no less


def test_whole_object_reads_survive_every_fault(
    proxy: FaultProxy, objects: dict[str, ObjectRef]
) -> None:
    """The same faults on a whole-object GET (the path small files take: MD5 checked too).

    One is not a fault there: without Content-Range, a body of the whole object's length is what
    a server ignoring Range sends, and it is exactly what was asked (and its MD5 matches)."""
    source = source_for(proxy)
    ref = objects["small.txt"]
    for param in TRANSIENT:
        action, options = param.values
        proxy.inject(action, **options)
        result, _ = bounded(lambda: source.get_range(ref, 0, ref.size))
        assert result == SMALL, param.id
    assert proxy.injected_count() == len(TRANSIENT)
    assert gets(proxy) == 2 * len(TRANSIENT) - 1  # drop_range: served by the first GET


# -- non-transient errors are not retried ----------------------------------------------------------

PERMANENT = [
    pytest.param(403, "AccessDenied", AccessDeniedError, id="403"),
    pytest.param(404, "NoSuchVersion", StaleObjectError, id="404-NoSuchVersion"),
    pytest.param(404, "NoSuchKey", StaleObjectError, id="404-NoSuchKey"),
    pytest.param(404, "NoSuchBucket", StaleObjectError, id="404-NoSuchBucket"),  # deleted since
    pytest.param(412, "PreconditionFailed", StaleObjectError, id="412"),
    pytest.param(400, "InvalidArgument", S3RequestError, id="400-InvalidArgument"),
]


@pytest.mark.parametrize(("status", "code", "error"), PERMANENT)
def test_non_transient_errors_fail_at_once_with_one_get(
    proxy: FaultProxy,
    objects: dict[str, ObjectRef],
    status: int,
    code: str,
    error: type[S3DataFSError],
) -> None:
    source = source_for(proxy)
    proxy.inject("error", status=status, code=code, times=None)
    result, took = bounded(lambda: source.get_range(objects["big.bin"], 0, 4 * KiB))
    assert isinstance(result, error), result
    assert not isinstance(result, TransientS3Error)
    assert gets(proxy) == 1
    assert took < 2.0
    assert "testing" not in str(result)  # never a credential in a message


def test_a_vanished_pinned_version_is_stale_without_faults(
    s3server: S3Server, proxy: FaultProxy, objects: dict[str, ObjectRef]
) -> None:
    """The real server's own 412 (ETag changed) and 404 (no such version) are classified alike."""
    source = source_for(proxy)
    ref = objects["small.txt"]
    changed = ObjectRef(
        ref.bucket, ref.key, None, '"0123456789abcdef0123456789abcdef"', ref.size, 0
    )
    gone = ObjectRef(ref.bucket, ref.key, "no-such-version", ref.etag, ref.size, 0)
    for pinned in (changed, gone):
        result, _ = bounded(lambda pinned=pinned: source.get_range(pinned, 0, 10))
        assert isinstance(result, StaleObjectError), result
    assert gets(proxy) == 2


# -- bounded waits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["stall", "stall_body"])
def test_the_read_deadline_bounds_a_stalled_server(
    proxy: FaultProxy, objects: dict[str, ObjectRef], action: str
) -> None:
    """The socket timeout (here 30 s) is far beyond the deadline: the deadline must win."""
    source = source_for(proxy, read_deadline=1.5, request_timeout=30.0)
    proxy.inject(action, times=None)
    result, took = bounded(lambda: source.get_range(objects["big.bin"], 0, 128 * KiB))
    assert isinstance(result, TransientS3Error), result
    assert took < 1.5 + 1.0, f"took {took:.1f}s against a 1.5 s deadline"
    proxy.clear()
    assert source.get_range(objects["big.bin"], 0, 128 * KiB) == BIG[: 128 * KiB]


def test_the_read_deadline_bounds_retries_against_a_refused_connection(
    objects: dict[str, ObjectRef],
) -> None:
    settings = S3Settings(
        region="us-east-1",
        endpoint_url="http://127.0.0.1:1",
        access_key_id="testing",
        secret_access_key="testing",
        read_deadline=1.5,
    )
    result, took = bounded(lambda: S3Source(settings).get_range(objects["big.bin"], 0, 10))
    assert isinstance(result, TransientS3Error), result
    assert "giving up" in str(result)
    assert took < 1.5 + 1.0


def test_slow_but_answering_s3_is_waited_for(
    proxy: FaultProxy, objects: dict[str, ObjectRef]
) -> None:
    source = source_for(proxy, read_deadline=5.0)
    proxy.inject("delay", seconds=0.5, times=3)
    result, took = bounded(lambda: source.get_range(objects["big.bin"], 0, 4 * KiB))
    assert result == BIG[: 4 * KiB]
    assert gets(proxy) == 1  # a slow answer is not a failure: no retry
    assert took >= 0.5


@trio_test
async def test_the_reader_bounds_a_read_even_when_the_source_would_wait_longer(
    s3server: S3Server, objects: dict[str, ObjectRef]
) -> None:
    """``read_timeout`` is the hard bound: it counts the wait for a connection slot too; a slow
    failure is repeated at once for a moment (the kernel's retry must not double the wait); a
    stalled request's slot comes back once S3 answers again."""
    with FaultProxy(s3server.endpoint) as proxy:
        source = source_for(proxy, read_deadline=60.0, request_timeout=60.0)
        limiter = trio.CapacityLimiter(2)
        reader = BlockReader(
            source,
            block_size=64 * KiB,
            memory_cache_bytes=1 << 20,
            s3_limiter=limiter,
            read_timeout=1.5,
        )
        ref = objects["big.bin"]
        proxy.inject("stall", times=None)
        failures: list[tuple[BaseException, float]] = []

        async def read_block(index: int) -> None:
            started = trio.current_time()
            try:
                await reader.read(ref, index * 64 * KiB, 100)
            except TransientS3Error as exc:
                failures.append((exc, trio.current_time() - started))

        with trio.fail_after(HARD_LIMIT):
            async with trio.open_nursery() as nursery:
                for index in range(4):  # two get a slot and stall, two wait for a slot
                    nursery.start_soon(read_block, index)
        assert len(failures) == 4
        assert all(took < 1.5 + 1.0 for _, took in failures), failures
        assert "read-timeout" in str(failures[0][0])
        # The kernel retries a failed read at once: that retry fails at once too, without a GET.
        sent = gets(proxy)
        with trio.fail_after(0.5), pytest.raises(TransientS3Error, match="read-timeout"):
            await reader.read(ref, 0, 100)
        assert gets(proxy) == sent
        proxy.clear()  # S3 is back: the stalled connections are closed, their slots return
        await trio.sleep(reader_module._FAILED_TTL)  # the memory of the failure fades
        with trio.fail_after(HARD_LIMIT):
            assert await reader.read(ref, 0, 200 * KiB) == BIG[: 200 * KiB]


# -- integrity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["short", "long", "shift_range", "drop_range", "truncate"])
def test_a_body_that_is_not_the_asked_range_is_never_returned(
    proxy: FaultProxy, objects: dict[str, ObjectRef], action: str
) -> None:
    source = source_for(proxy, read_deadline=1.0)
    proxy.inject(action, times=None)
    result, _ = bounded(lambda: source.get_range(objects["big.bin"], 64 * KiB, 128 * KiB))
    assert isinstance(result, TransientS3Error), result
    assert gets(proxy) >= 2  # retried until the deadline, never served


@pytest.mark.parametrize(
    "strip", [pytest.param(True, id="md5-etag"), pytest.param(False, id="s3-checksum")]
)
def test_flipped_bytes_in_a_whole_object_body_are_detected_and_refetched(
    proxy: FaultProxy, objects: dict[str, ObjectRef], strip: bool
) -> None:
    """Real S3 sends no checksum for a Range request, so the MD5 ETag is what catches the flip
    (``strip``); moto does send one for a whole-object range, which botocore checks: either way
    the corrupted body is refetched, never served."""
    source = source_for(proxy)
    ref = objects["small.txt"]
    proxy.inject("flip", times=1, strip_checksums=strip)
    result, _ = bounded(lambda: source.get_range(ref, 0, ref.size))
    assert result == SMALL
    assert gets(proxy) == 2


def test_flipped_bytes_inside_a_ranged_body_cannot_be_detected(
    proxy: FaultProxy, objects: dict[str, ObjectRef]
) -> None:
    """The documented limit: S3 sends no checksum for a range, so a body of the right length
    with the right Content-Range is served as received (over HTTPS, TLS rules this out)."""
    source = source_for(proxy)
    proxy.inject("flip", times=1, at=5)
    result = source.get_range(objects["big.bin"], 0, 64 * KiB)
    assert result != BIG[: 64 * KiB]
    assert len(result) == 64 * KiB
    assert sum(a != b for a, b in zip(result, BIG, strict=False)) == 1


def test_etags_that_are_not_md5_digests_switch_the_check_off_instead_of_failing_reads(
    proxy: FaultProxy, objects: dict[str, ObjectRef], caplog: pytest.LogCaptureFixture
) -> None:
    """Two identical bodies that disagree with the ETag mean the store's ETags are not MD5s
    (SSE-KMS, S3-compatible stores): the read is served and the check is off, with a warning."""
    source = source_for(proxy)
    ref = objects["small.txt"]
    proxy.inject("flip", times=None, at=3, strip_checksums=True)  # the same bytes every time
    result, _ = bounded(lambda: source.get_range(ref, 0, ref.size))
    assert isinstance(result, bytes)
    assert gets(proxy) == 2
    assert "not MD5 digests" in caplog.text
    assert source.get_range(ref, 0, ref.size) == result  # now without a second GET
    assert gets(proxy) == 3


# -- the disk cache under trouble ------------------------------------------------------------------


def test_a_cache_directory_removed_while_in_use_is_made_again_and_private(tmp_path: Path) -> None:
    """``cache clear`` or ``rm -rf`` while mounted: the next write makes the directories again
    (0700 all the way, as at first) instead of failing every later write of that object."""
    cache_dir = tmp_path / "cache"
    cache = DiskCache(cache_dir, block_size=4096, capacity=1 << 20)
    ref = ObjectRef("bucket", "key", None, '"etag"', 2 * 4096, 0.0)
    digest = object_digest(ref)
    cache.write(ref, digest, 0, [b"a" * 4096])
    shutil.rmtree(cache_dir)
    cache.write(ref, digest, 1, [b"b" * 4096])
    assert cache.read_run(digest, ref.size, range(1, 2)) == {1: b"b" * 4096}
    for directory, _dirs, names in os.walk(cache_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600


# -- the backoff, on a clock of the test's --------------------------------------------------------


def retried_source(monkeypatch: pytest.MonkeyPatch, failures: int, deadline: float):
    """(source, waits): a source whose first ``failures`` GETs are SlowDown, each retry waiting
    the longest its jitter allows, on a clock that only ``time.sleep`` moves."""
    source = S3Source(S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:1",
                                 access_key_id="testing", secret_access_key="testing",
                                 read_deadline=deadline))
    left = [failures]
    waits: list[float] = []

    def flaky(ref: ObjectRef, start: int, end: int) -> bytes:
        left[0] -= 1
        if left[0] >= 0:
            raise TransientS3Error("SlowDown")
        return bytes(end - start)

    monkeypatch.setattr(source, "_get_range_once", flaky)
    monkeypatch.setattr(s3source.random, "uniform", lambda low, high: high)
    monkeypatch.setattr(s3source.time, "monotonic", lambda: sum(waits))
    monkeypatch.setattr(s3source.time, "sleep", waits.append)
    return source, waits


def test_backoff_between_retries_doubles_up_to_five_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full-jitter backoff, capped: uncapped, late attempts would wait minutes (and give up
    early, their next wait beyond the deadline)."""
    source, waits = retried_source(monkeypatch, failures=12, deadline=3600.0)
    assert source.get_range(ObjectRef("b-1", "k", None, '"e"', 10, 0.0), 0, 10) == bytes(10)
    assert waits[:3] == pytest.approx([0.2, 0.4, 0.8])
    assert (len(waits), max(waits)) == (12, 5.0)


def test_no_wait_before_a_retry_reaches_past_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retry whose wait would end after the deadline is not waited for: it gives up."""
    source, waits = retried_source(monkeypatch, failures=100, deadline=1.0)
    with pytest.raises(TransientS3Error, match="giving up .* after 3 attempts"):
        source.get_range(ObjectRef("b-1", "k", None, '"e"', 10, 0.0), 0, 10)
    assert waits == pytest.approx([0.2, 0.4])  # 0.6 s; the next 0.8 s would end at 1.4 s


# -- secrets ---------------------------------------------------------------------------------------


def test_the_settings_name_every_secret_for_the_redactor() -> None:
    settings = S3Settings(access_key_id="AKID", secret_access_key="SECRET", session_token="TOKEN")
    assert settings.secrets() == ["SECRET", "TOKEN"]
    assert "SECRET" not in repr(settings)
    assert "TOKEN" not in repr(settings)


@pytest.mark.parametrize(("status", "code", "kind"), [
    (403, "AccessDenied", AccessDeniedError),  # the role's trust policy refuses the token
    (400, "InvalidIdentityToken", AccessDeniedError),
    (503, "ServiceUnavailable", TransientS3Error),  # retried, as S3's own
])
def test_a_failed_call_for_credentials_names_the_credentials_not_the_bucket(
    status: int, code: str, kind: type
) -> None:
    response = {"Error": {"Code": code, "Message": "Not authorized to perform sts:Assume..."},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    exc = botocore.exceptions.ClientError(response, "AssumeRoleWithWebIdentity")
    mapped = s3source._map_client_error(exc, "s3://b-1/k")
    assert type(mapped) is kind
    assert str(mapped).startswith(
        f"cannot get AWS credentials for s3://b-1/k: AssumeRoleWithWebIdentity: {code}: Not auth")


def test_an_http_client_failure_is_named_by_its_kind_never_by_its_text() -> None:
    """Its text may quote a request header, and so a credential."""
    inner = RuntimeError("bad header 'X-Amz-Security-Token: TOKEN42'")
    mapped = s3source._map_botocore_error(
        botocore.exceptions.HTTPClientError(error=inner), "s3://b-1/k"
    )
    assert isinstance(mapped, TransientS3Error)
    assert "TOKEN42" not in str(mapped)
    assert "(RuntimeError)" in str(mapped)


def test_keys_that_come_expired_at_a_read_fail_it_naming_the_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore's RuntimeError for keys handed out expired, met while a GET is signed, is ours
    (access denied, naming the clock); any other RuntimeError is not botocore's to map: it is
    raised as it is (a bug must not pass for expired keys)."""
    source = S3Source(S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:1",
                                 access_key_id="testing", secret_access_key="testing"))
    ref = ObjectRef("b-1", "k", None, '"e"', 100, 0.0)
    raised = [RuntimeError("Credentials were refreshed, but the refreshed credentials are "
                           "still expired.")]

    def get(ref: ObjectRef, start: int, end: int) -> Fetched:
        raise raised[0]

    monkeypatch.setattr(source, "_signed", type("Gets", (), {"get": staticmethod(get)})())
    with pytest.raises(AccessDeniedError, match="had expired already: check this machine's"):
        source.get_range(ref, 0, 10)
    raised[0] = RuntimeError("can't start new thread")
    with pytest.raises(RuntimeError, match="can't start new thread"):
        source.get_range(ref, 0, 10)


def test_a_socket_error_while_a_body_streams_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below botocore (urllib3, the socket) a reset is an ``OSError``: a transient failure,
    retried, not an unexpected error failing the read."""
    source = S3Source(S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:1",
                                 access_key_id="testing", secret_access_key="testing"))
    ref = ObjectRef("b-1", "k", None, '"e"', 100, 0.0)
    resets = [ConnectionResetError(104, "Connection reset by peer")]

    def get(ref: ObjectRef, start: int, end: int) -> Fetched:
        if resets:
            raise resets.pop()
        return Fetched(bytes(end - start), f"bytes {start}-{end - 1}/{ref.size}", None, None)

    waits: list[float] = []
    monkeypatch.setattr(source, "_signed", type("Gets", (), {"get": staticmethod(get)})())
    monkeypatch.setattr(s3source.time, "sleep", waits.append)
    assert source.get_range(ref, 0, 10) == bytes(10)
    assert len(waits) == 1  # one retry


# -- saying so while S3 does not answer ------------------------------------------------------------


@pytest.fixture
def quick_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3source, "SLOW_ANSWER_NOTICE", 0.3)
    monkeypatch.setattr(slowanswer, "_LOOK_EVERY", 0.05)
    monkeypatch.setattr(slowanswer, "_WATCHER", slowanswer._Watcher())  # one that looks often


def notices(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "s3datafs.slowanswer"]


def test_a_request_s3_does_not_answer_is_warned_of_once_while_it_waits(
    proxy: FaultProxy, objects: dict[str, ObjectRef], quick_notice: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A hung endpoint: the wait is said once (not again for each retry), naming the endpoint
    and the operation, and nothing but the endpoint of the URL (no bucket, key or query)."""
    caplog.set_level(logging.WARNING, logger="s3datafs.slowanswer")
    source = source_for(proxy, request_timeout=0.6)
    proxy.inject("stall", op="*", times=None)
    result, _ = bounded(lambda: source.head(objects["big.bin"].bucket, "big.bin"))
    assert isinstance(result, TransientS3Error), result
    assert proxy.injected_count("stall") == 3  # three attempts
    (said,) = notices(caplog)
    assert said.startswith(f"no answer from S3 at {proxy.endpoint.rstrip('/')} for ")
    assert "(HeadObject)" in said
    assert "up to 1 s per attempt, 3 attempts" in said
    assert "big.bin" not in said
    assert objects["big.bin"].bucket not in said


def test_an_answer_after_the_warning_is_said_and_a_quick_one_says_nothing(
    proxy: FaultProxy, objects: dict[str, ObjectRef], quick_notice: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="s3datafs.slowanswer")
    source = source_for(proxy)
    proxy.inject("delay", op="*", seconds=0.8, times=1)
    ref = source.head(objects["big.bin"].bucket, "big.bin")
    assert ref.size == len(BIG)
    said = notices(caplog)
    assert len(said) == 2, said
    assert said[1].endswith("answered after 1 s (HeadObject)")
    caplog.clear()
    assert source.head(objects["big.bin"].bucket, "big.bin").size == len(BIG)
    assert notices(caplog) == []


def test_a_watcher_that_cannot_start_fails_no_request(
    proxy: FaultProxy, objects: dict[str, ObjectRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notice must not change a request's outcome: with no thread to be had (a pids limit)
    the request goes on without a watcher (the thread's RuntimeError failed every HEAD and
    LIST, and so the mount)."""

    def no_thread(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(slowanswer, "start_quiet_thread", no_thread)
    monkeypatch.setattr(slowanswer, "_WATCHER", slowanswer._Watcher())  # none running yet
    source = source_for(proxy)
    for _ in range(2):  # and again: it is tried again, and fails no request either
        assert source.head(objects["big.bin"].bucket, "big.bin").size == len(BIG)


def test_one_watcher_thread_for_every_client_and_it_takes_no_signal(
    proxy: FaultProxy, objects: dict[str, ObjectRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs in the daemon from before its start window, where a stop signal it took would
    end the process and leave a dead mount (see quietthread)."""
    monkeypatch.setattr(slowanswer, "_WATCHER", slowanswer._Watcher())
    before = {t for t in threading.enumerate() if t.name == "s3datafs-slow-answers"}
    for _ in range(3):
        source_for(proxy).head(objects["big.bin"].bucket, "big.bin")
    started = {t for t in threading.enumerate() if t.name == "s3datafs-slow-answers"} - before
    assert started == {slowanswer._WATCHER._thread}
    assert signal.SIGTERM in blocked_signals(slowanswer._WATCHER._thread.native_id)


def blocked_signals(thread_id: int) -> set[int]:
    """The signals thread ``thread_id`` of this process blocks (its SigBlk in /proc)."""
    status = Path(f"/proc/self/task/{thread_id}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:"))
               .split()[1], 16)
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}
