"""Objects in an archive storage class (S3 Glacier Flexible Retrieval, Deep Archive): S3 lists
them, but refuses to GET one that is not restored (``InvalidObjectState``). Datasets meet them
through lifecycle rules that archive old objects. The mount says so when it lists them, and a
read of one fails with a line that says what to do, not a bare S3 error code.
"""

from __future__ import annotations

import errno
import logging
import uuid
from pathlib import Path

import pytest
from conftest import Cli, errno_of

from devtools.s3server import S3Server
from s3datafs import s3source
from s3datafs.errors import S3RequestError
from s3datafs.s3source import S3Settings, S3Source

BODY = b"archived bytes\n" * 10


def source_for(server: S3Server) -> S3Source:
    return S3Source(S3Settings(region="us-east-1", endpoint_url=server.endpoint,
                               access_key_id="testing", secret_access_key="testing",
                               read_deadline=5.0))


def bucket_with(s3, classes: dict[str, str], *, versioned: bool = False) -> str:
    """A new bucket holding ``p/<key>`` in each key's storage class."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    if versioned:
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for key, storage_class in classes.items():
        s3.put_object(Bucket=bucket, Key=f"p/{key}", Body=BODY, StorageClass=storage_class)
    return bucket


CLASSES = {"a.bin": "STANDARD", "b.bin": "GLACIER", "c.bin": "DEEP_ARCHIVE",
           "d.bin": "GLACIER", "e.bin": "GLACIER_IR", "f.bin": "INTELLIGENT_TIERING"}


@pytest.mark.parametrize("versioned", [False, True])
def test_a_listing_counts_its_archived_objects_in_one_warning(
    s3, s3server: S3Server, versioned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = bucket_with(s3, CLASSES, versioned=versioned)
    if versioned:  # a key archived once and written again since is not archived
        s3.put_object(Bucket=bucket, Key="p/a.bin", Body=BODY, StorageClass="DEEP_ARCHIVE")
        s3.put_object(Bucket=bucket, Key="p/a.bin", Body=BODY)
    source = source_for(s3server)
    with caplog.at_level(logging.WARNING, logger="s3datafs.s3source"):
        refs = list(source.list_latest(bucket, "p/", versioned=versioned))
    assert [ref.key for ref in refs] == [f"p/{key}" for key in CLASSES]  # listed all the same
    assert [r.getMessage() for r in caplog.records] == [
        f"3 of the objects listed under s3://{bucket}/p/ are archived (DEEP_ARCHIVE: 1, "
        "GLACIER: 2): reading one fails until it is restored (aws s3api restore-object)"]


def test_reading_an_archived_object_says_to_restore_it(s3, s3server: S3Server) -> None:
    bucket = bucket_with(s3, {"b.bin": "GLACIER"})
    source = source_for(s3server)
    ref = source.head(bucket, "p/b.bin")
    with pytest.raises(S3RequestError) as raised:
        source.get_range(ref, 0, 4)
    assert str(raised.value) == (
        f"s3://{bucket}/p/b.bin is archived and not restored, so S3 will not read it "
        "(InvalidObjectState): restore it (aws s3api restore-object), then read it again")


@pytest.mark.parametrize("storage_class", ["GLACIER", "DEEP_ARCHIVE"])
def test_the_head_of_an_archived_object_warns(
    s3, s3server: S3Server, storage_class: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A single-object dataset is pinned by its HEAD, not listed."""
    bucket = bucket_with(s3, {"b.bin": storage_class, "a.bin": "STANDARD"})
    source = source_for(s3server)
    with caplog.at_level(logging.WARNING, logger="s3datafs.s3source"):
        source.head(bucket, "p/a.bin")
        source.head(bucket, "p/b.bin")
    assert [r.getMessage() for r in caplog.records] == [
        f"s3://{bucket}/p/b.bin is archived ({storage_class}) and not restored: reading it fails "
        "until it is (aws s3api restore-object)"]


@pytest.mark.fuse
def test_a_mount_with_archived_objects_serves_the_others(
    cli: Cli, s3, s3server: S3Server
) -> None:
    bucket = bucket_with(s3, {"a.bin": "STANDARD", "b.bin": "GLACIER"})
    cli.expect_log("are archived|is archived and not restored")
    result = cli.run("mount", f"s3://{bucket}/p/")
    assert result.returncode == 0, result.stderr
    assert "1 of the objects listed under" in result.stderr
    mountpoint = Path(result.stdout.rsplit(" at ", 1)[1].split(" (", 1)[0])
    try:
        assert (mountpoint / "a.bin").read_bytes() == BODY
        assert (mountpoint / "b.bin").stat().st_size == len(BODY)  # listed, with its size
        assert errno_of((mountpoint / "b.bin").read_bytes) == errno.EIO
    finally:
        assert cli.unmount(mountpoint).returncode == 0
    logged = "".join(path.read_text() for path in cli.log_dir.glob("*.log"))
    assert "b.bin is archived and not restored" in logged


@pytest.mark.parametrize(
    ("head", "warned"),
    [
        ({"StorageClass": "GLACIER", "Restore": 'ongoing-request="false", expiry-date="x"'}, ""),
        ({"StorageClass": "GLACIER", "Restore": 'ongoing-request="true"'}, "GLACIER"),
        ({"StorageClass": "INTELLIGENT_TIERING", "ArchiveStatus": "DEEP_ARCHIVE_ACCESS"},
         "DEEP_ARCHIVE_ACCESS"),
        ({"StorageClass": "INTELLIGENT_TIERING"}, ""),
        ({"StorageClass": "GLACIER_IR"}, ""),
    ],
    ids=["restored", "restoring", "tiering-archive", "tiering", "instant-retrieval"],
)
def test_a_head_warns_only_of_what_cannot_be_read_now(
    head: dict, warned: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What moto cannot show: a restored copy is read as any object; one being restored, or
    an Intelligent-Tiering archive tier, is not read until it is done."""
    with caplog.at_level(logging.WARNING, logger="s3datafs.s3source"):
        s3source._warn_if_archived(head, "s3://b-1/k")
    assert [r.getMessage() for r in caplog.records] == ([
        f"s3://b-1/k is archived ({warned}) and not restored: reading it fails until it is "
        "(aws s3api restore-object)"] if warned else [])
