"""Tests for devtools/s3server.py: counting, control endpoints, fast ranged GETs vs stock moto."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # devtools/ is not an installed package
    sys.path.insert(0, str(ROOT))

from devtools.s3server import (  # noqa: E402
    S3Server,
    classify,
    clean_aws_env,
    loopback_host,
    resolve_range,
)

SCRIPT = ROOT / "devtools" / "s3server.py"
BUCKET = "data"
MIB = 1 << 20
BIG = random.Random(1).randbytes(5 * MIB + 12345)
DOC_V1, DOC_V2 = b"first version of doc\n" * 1000, b"second version, longer\n" * 2000
VOLATILE = {"date", "last-modified", "x-amzn-requestid", "x-amz-version-id", "server"}


def _populate(client: Any) -> dict[str, str]:
    """Same objects on every server: 'pre' (before versioning), 'doc' twice, 'big', 'gone'."""
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="pre", Body=b"written before versioning" * 100)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    v1 = client.put_object(Bucket=BUCKET, Key="doc", Body=DOC_V1)["VersionId"]
    v2 = client.put_object(Bucket=BUCKET, Key="doc", Body=DOC_V2)["VersionId"]
    client.put_object(Bucket=BUCKET, Key="dir/big file+ü", Body=BIG, Metadata={"a": "b"})
    client.put_object(Bucket=BUCKET, Key="empty", Body=b"")
    gone = client.put_object(Bucket=BUCKET, Key="gone", Body=b"deleted soon")["VersionId"]
    client.delete_object(Bucket=BUCKET, Key="gone")
    return {"v1": v1, "v2": v2, "gone": gone}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    with S3Server() as fast, S3Server(fast_ranges=False) as stock:
        fast_client, stock_client = fast.client(), stock.client()
        yield {
            "fast": fast,
            "stock": stock,
            "fast_client": fast_client,
            "stock_client": stock_client,
            # Clients that do not ask for checksums (no x-amz-checksum-mode: ENABLED).
            "fast_plain": fast.client(response_checksum_validation="when_required"),
            "stock_plain": stock.client(response_checksum_validation="when_required"),
            "fast_versions": _populate(fast_client),
            "stock_versions": _populate(stock_client),
        }


def _get(client: Any, **kwargs: Any) -> tuple[Any, dict[str, str], bytes | str]:
    """(status, headers minus volatile ones, body or error code) of a GetObject."""
    try:
        response = client.get_object(Bucket=BUCKET, **kwargs)
    except ClientError as exc:
        meta = exc.response["ResponseMetadata"]
        return meta["HTTPStatusCode"], {}, exc.response["Error"]["Code"]
    meta = response["ResponseMetadata"]
    headers = {k: v for k, v in meta["HTTPHeaders"].items() if k not in VOLATILE}
    headers["has-version-id"] = str("x-amz-version-id" in meta["HTTPHeaders"])
    return meta["HTTPStatusCode"], headers, response["Body"].read()


def _both(
    servers: dict[str, Any], version: str | None = None, client: str = "client", **kwargs: Any
) -> tuple[Any, Any]:
    """The same GetObject on both servers, through each one's ``{side}_{client}``."""
    results = []
    for side in ("fast", "stock"):
        extra = {"VersionId": servers[f"{side}_versions"][version]} if version else {}
        results.append(_get(servers[f"{side}_{client}"], **kwargs, **extra))
    return results[0], results[1]


def test_counts_and_records(servers: dict[str, Any]) -> None:
    srv, client = servers["fast"], servers["fast_client"]
    client.create_bucket(Bucket="counts")
    client.put_bucket_versioning(Bucket="counts", VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket="counts", Key="a/b c", Body=b"0123456789")
    v2 = client.put_object(Bucket="counts", Key="a/b c", Body=b"abcdefghijklmnop")["VersionId"]
    srv.reset_stats()
    etag = client.head_object(Bucket="counts", Key="a/b c")["ETag"]
    body = client.get_object(
        Bucket="counts", Key="a/b c", Range="bytes=2-5", IfMatch=etag, VersionId=v2
    )["Body"].read()
    assert body == b"cdef"
    assert client.get_object(Bucket="counts", Key="a/b c")["Body"].read() == b"abcdefghijklmnop"
    with pytest.raises(ClientError):
        client.get_object(Bucket="counts", Key="missing")
    client.head_bucket(Bucket="counts")
    client.list_objects_v2(Bucket="counts", Prefix="a/")
    client.list_objects(Bucket="counts")
    client.list_object_versions(Bucket="counts")
    client.get_bucket_versioning(Bucket="counts")
    client.delete_object(Bucket="counts", Key="a/b c")
    client.list_buckets()
    stats = srv.stats()
    assert stats["ops"] == {
        "HeadObject": 1,
        "GetObject": 3,
        "HeadBucket": 1,
        "ListObjectsV2": 1,
        "ListObjects": 1,
        "ListObjectVersions": 1,
        "GetBucketVersioning": 1,
        "DeleteObject": 1,
        "Other": 1,
    }
    assert stats["get_bytes"] == 4 + 16  # the 404's error body is not counted
    assert stats["fast_gets"] == 2  # the ranged GET and the whole one; the 404 is moto's
    ranged = stats["requests"][1]
    assert ranged == {
        "op": "GetObject",
        "bucket": "counts",
        "key": "a/b c",
        "version_id": v2,
        "range": "bytes=2-5",
        "if_match": etag,
        "status": 206,
    }
    assert [r["status"] for r in stats["requests"][:4]] == [200, 206, 200, 404]
    assert srv.ops() == stats["ops"]  # control requests are not counted


def test_reset(servers: dict[str, Any]) -> None:
    srv = servers["fast"]
    servers["fast_client"].head_bucket(Bucket=BUCKET)
    assert srv.ops()
    srv.reset_stats()
    assert srv.stats() == {"ops": {}, "get_bytes": 0, "fast_gets": 0, "requests": []}


def test_fast_ranges_match_stock(servers: dict[str, Any]) -> None:
    rng, size = random.Random(7), len(BIG)
    ranges = [f"bytes={a}-{a + rng.randrange(1, 3 * MIB)}" for a in rng.sample(range(size), 40)]
    ranges += ["bytes=0-0", f"bytes={size - 1}-", f"bytes={size - 10}-{size + 99}", "bytes=-1"]
    ranges += ["bytes=-1000", f"bytes=-{size * 2}", "bytes=7-", f"bytes=0-{size - 1}"]
    ranges += [f"bytes={size}-", "bytes=-0", "bytes=9-3", "bytes=0-1,5-6", "bytes=x-y"]
    before = servers["fast"].stats()["fast_gets"]
    answered = 0
    for spec in ranges:
        fast, stock = _both(servers, Key="dir/big file+ü", Range=spec)
        assert fast == stock, spec
        if fast[0] == 206:
            first, last = map(int, fast[1]["content-range"].split()[1].split("/")[0].split("-"))
            assert fast[2] == BIG[first : last + 1]
            answered += 1
            whole = last - first + 1 == len(BIG)  # moto shows the checksum then, and so do we
            assert ("x-amz-checksum-crc32" in fast[1]) == whole
    assert servers["fast"].stats()["fast_gets"] - before == answered  # every 206: the fast path


@pytest.mark.parametrize("client", ["client", "plain"])  # asking for checksums, or not
@pytest.mark.parametrize(
    ("key", "version", "extra"),
    [
        ("dir/big file+ü", None, {}),  # metadata, streamed in several chunks
        ("doc", None, {}),
        ("doc", "v1", {}),
        ("pre", None, {"VersionId": "null"}),
        ("empty", None, {}),
        ("gone", None, {}),  # a delete marker: moto's 404
        ("doc", None, {"IfMatch": '"not-the-etag"'}),  # moto's 412
    ],
)
def test_whole_object_gets_match_stock(
    servers: dict[str, Any], client: str, key: str, version: str | None, extra: dict[str, str]
) -> None:
    before = servers["fast"].stats()["fast_gets"]
    fast, stock = _both(servers, version, client, Key=key, **extra)
    assert fast == stock
    served = fast[0] == 200
    assert servers["fast"].stats()["fast_gets"] - before == served  # errors are moto's own
    if served:
        assert ("x-amz-checksum-crc32" in fast[1]) == (client == "client")


@pytest.mark.parametrize("version", ["v1", "v2", None])
def test_versions_match_stock(servers: dict[str, Any], version: str | None) -> None:
    for spec in ("bytes=0-99", "bytes=5000-", "bytes=-17", "bytes=20999-21000", "bytes=30000-"):
        fast, stock = _both(servers, version, Key="doc", Range=spec)
        assert fast == stock
        assert fast[0] == (416 if spec == "bytes=30000-" and version == "v1" else 206)


def test_if_match(servers: dict[str, Any]) -> None:
    etag = servers["fast_client"].head_object(Bucket=BUCKET, Key="doc")["ETag"]
    for if_match in (etag, etag.strip('"')):
        fast, stock = _both(servers, Key="doc", Range="bytes=3-9", IfMatch=if_match)
        assert fast == stock
        assert (fast[0], fast[2]) == (206, DOC_V2[3:10])
    fast, stock = _both(servers, "v1", Key="doc", Range="bytes=3-9", IfMatch=etag)
    assert fast == stock == (412, {}, "PreconditionFailed")


def test_not_found(servers: dict[str, Any]) -> None:
    fast, stock = _both(servers, Key="doc", Range="bytes=0-9", VersionId="bogus")
    assert fast == stock == (404, {}, "NoSuchVersion")
    fast, stock = _both(servers, Key="nope", Range="bytes=0-9")
    assert fast == stock == (404, {}, "NoSuchKey")
    fast, stock = _both(servers, Key="gone", Range="bytes=0-3")  # delete marker on top
    assert fast == stock == (404, {}, "NoSuchKey")
    fast, stock = _both(servers, "gone", Key="gone", Range="bytes=0-6")
    assert fast == stock
    assert fast[2] == b"deleted"
    with pytest.raises(ClientError, match="NoSuchBucket"):
        servers["fast_client"].get_object(Bucket="no-such-bucket", Key="k", Range="bytes=0-1")


def test_null_version(servers: dict[str, Any]) -> None:
    fast, stock = _both(servers, Key="pre", Range="bytes=8-13", VersionId="null")
    assert fast == stock
    assert (fast[0], fast[2], fast[1]["has-version-id"]) == (206, b"before", "False")
    client = servers["fast_client"]
    versions = client.list_object_versions(Bucket=BUCKET, Prefix="pre")["Versions"]
    assert [v["VersionId"] for v in versions] == ["null"]
    head = client.head_object(Bucket=BUCKET, Key="pre", VersionId="null")
    assert "x-amz-version-id" not in head["ResponseMetadata"]["HTTPHeaders"]  # moto omits it


def test_big_object_fast_range(servers: dict[str, Any]) -> None:
    srv, client = servers["fast"], servers["fast_client"]
    payload = random.Random(3).randbytes(64 * MIB)
    client.put_object(Bucket=BUCKET, Key="huge", Body=payload)
    before = srv.stats()
    start = 40 * MIB + 17
    response = client.get_object(
        Bucket=BUCKET, Key="huge", Range=f"bytes={start}-{start + MIB - 1}"
    )
    assert response["Body"].read() == payload[start : start + MIB]
    after = srv.stats()
    assert after["fast_gets"] == before["fast_gets"] + 1
    assert after["get_bytes"] == before["get_bytes"] + MIB
    client.delete_object(Bucket=BUCKET, Key="huge")


def test_script_port_file_and_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "url"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port-file", str(port_file), "--no-fast-ranges"],
        stdout=subprocess.PIPE,
        env=clean_aws_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:")
        assert port_file.read_text().strip() == line.split(" ", 1)[1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_refuses_non_loopback() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--host", "0.0.0.0"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "non-loopback" in result.stderr
    assert loopback_host("localhost") == "127.0.0.1"
    assert loopback_host("::1") == "::1"
    for host in ("10.0.0.1", "example.com", ""):
        with pytest.raises(ValueError, match="non-loopback"):
            loopback_host(host)


def test_client_ignores_caller_profile(
    servers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    assert servers["fast"].client().head_bucket(Bucket=BUCKET)["ResponseMetadata"]


def test_clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent.pem")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    env = clean_aws_env()
    assert {k: v for k, v in env.items() if k.startswith("AWS_")} == {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-200", 100, (90, 99)),
        ("bytes=50-", 100, (50, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-500", 100, (0, 99)),
        ("bytes=100-", 100, None),
        ("bytes=-0", 100, None),
        ("bytes=5-4", 100, None),
        ("bytes=0-1,3-4", 100, None),
        ("bytes=-", 100, None),
        ("bytes=0-0", 0, None),
    ],
)
def test_resolve_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert resolve_range(header, size) == expected


@pytest.mark.parametrize(
    ("method", "path", "query", "op"),
    [
        ("GET", "/b", {"list-type": ["2"], "prefix": ["x"]}, "ListObjectsV2"),
        ("GET", "/b/", {}, "ListObjects"),
        ("GET", "/b", {"versions": [""], "key-marker": ["k"]}, "ListObjectVersions"),
        ("GET", "/b", {"versioning": [""]}, "GetBucketVersioning"),
        ("GET", "/b", {"location": [""]}, "Other"),
        ("PUT", "/b", {}, "CreateBucket"),
        ("PUT", "/b", {"versioning": [""]}, "PutBucketVersioning"),
        ("HEAD", "/b", {}, "HeadBucket"),
        ("GET", "/b/k", {"versionId": ["v"]}, "GetObject"),
        ("GET", "/b/k", {"tagging": [""]}, "Other"),
        ("HEAD", "/b/k/", {}, "HeadObject"),
        ("PUT", "/b/k", {"x-id": ["PutObject"]}, "PutObject"),
        ("PUT", "/b/k", {"partNumber": ["1"], "uploadId": ["u"]}, "Other"),
        ("DELETE", "/b/k", {"versionId": ["v"]}, "DeleteObject"),
        ("GET", "/", {}, "Other"),
    ],
)
def test_classify(method: str, path: str, query: dict[str, list[str]], op: str) -> None:
    bucket, _, key = path[1:].partition("/")
    assert classify(method, bucket, key, query, {}) == op
