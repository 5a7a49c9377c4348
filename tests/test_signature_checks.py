"""GETs against a server that checks every signature and permission (moto with IAM auth).

``signedget`` signs a template per object (the bucket's first through botocore, the rest
derived from its base) and adds ``Range`` and ``If-Match`` unsigned. The rest of the suite runs
moto with auth off, where any signature passes, and a refused template falls back to botocore
quietly (by design: a new signature may cure it). So a template S3 would refuse is invisible
there. Here moto enforces IAM auth, and each read must be exactly one GET answered 206: no 403,
no botocore retry; for awkward keys, versioned objects, requester-pays and session tokens.

And a reader whose policy grants s3:GetObject but not s3:GetObjectVersion, which every GET of a
pinned version needs: its reads go by ETag alone, still the pinned bytes or an error.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from conftest import ALLOW_ALL, checking_server
from test_signedget import count_botocore_gets, put_awkward

from devtools.s3server import S3Server
from s3datafs.errors import AccessDeniedError, StaleObjectError
from s3datafs.model import ObjectRef
from s3datafs.s3source import S3Settings, S3Source


@dataclass(frozen=True)
class Keys:
    key_id: str
    secret: str
    token: str | None = None


@dataclass(frozen=True)
class CheckedWorld:
    server: S3Server
    user: Keys  # an IAM user allowed everything
    role: Keys  # temporary credentials of a role allowed everything (a session token)
    reader: Keys  # s3:GetObject alone
    s3: Any  # the admin's boto3 client
    objects: list[tuple[ObjectRef, bytes]]  # under AWKWARD_KEYS, in a versioned bucket


@pytest.fixture(scope="module")
def world() -> Iterator[CheckedWorld]:
    """A role with a lease, and a versioned bucket of awkward keys, made by the admin."""
    with checking_server() as (server, admin):
        iam, s3, sts = (boto3.client(name, **admin) for name in ("iam", "s3", "sts"))
        role = iam.create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                           "Action": "sts:AssumeRole"}],
        }))["Role"]
        iam.put_role_policy(RoleName="reader", PolicyName="all", PolicyDocument=ALLOW_ALL)
        lease = sts.assume_role(RoleArn=role["Arn"], RoleSessionName="job")["Credentials"]
        objects = put_awkward(s3, lines=50)
        bucket = objects[0][0].bucket
        iam.create_user(UserName="getter")
        iam.put_user_policy(UserName="getter", PolicyName="get", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": f"arn:aws:s3:::{bucket}/*"},
                          {"Effect": "Deny", "Action": "s3:GetObject",
                           "Resource": f"arn:aws:s3:::{bucket}/denied.bin"}],
        }))
        getter = iam.create_access_key(UserName="getter")["AccessKey"]
        yield CheckedWorld(
            server,
            Keys(admin["aws_access_key_id"], admin["aws_secret_access_key"]),
            Keys(lease["AccessKeyId"], lease["SecretAccessKey"], lease["SessionToken"]),
            Keys(getter["AccessKeyId"], getter["SecretAccessKey"]),
            s3,
            objects,
        )


def source_with(world: CheckedWorld, keys: Keys, **settings: Any) -> S3Source:
    return S3Source(S3Settings(
        region="us-east-1", endpoint_url=world.server.endpoint, access_key_id=keys.key_id,
        secret_access_key=keys.secret, session_token=keys.token, read_deadline=10.0,
        request_timeout=5.0, **settings,
    ))


def answers(world: CheckedWorld) -> collections.Counter[tuple[str, int]]:
    return collections.Counter(
        (record["op"], record["status"]) for record in world.server.stats()["requests"])


@pytest.mark.parametrize(
    ("who", "settings"),
    [("user", {}), ("role", {}), ("user", {"requester_pays": True})],
    ids=["user-keys", "session-token", "requester-pays"],
)
def test_every_template_get_passes_a_server_that_checks_signatures(
    world: CheckedWorld, who: str, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = source_with(world, getattr(world, who), **settings)
    calls = count_botocore_gets(source, monkeypatch)
    world.server.reset_stats()
    for ref, body in world.objects:
        assert source.get_range(ref, 0, ref.size) == body
        assert source.get_range(ref, 3, 40) == body[3:40]
    assert len(calls) == 1  # the first object's capture; every other template was derived
    assert answers(world) == {("GetObject", 206): 2 * len(world.objects)}  # none refused


def test_the_check_is_real_a_wrong_secret_is_refused(world: CheckedWorld) -> None:
    """Without this, the test above could pass against a server that checks nothing."""
    source = source_with(world, Keys(world.user.key_id, "not-the-secret"))
    ref, _body = world.objects[0]
    with pytest.raises(AccessDeniedError, match="SignatureDoesNotMatch"):
        source.get_range(ref, 0, 4)


def test_without_s3_get_object_version_reads_go_by_etag_alone(
    world: CheckedWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """The first GET naming a version is refused, then made without it (one warning); every
    read after is one GET. An object overwritten since reads StaleObjectError, as If-Match
    has it, never the new bytes."""
    source = source_with(world, world.reader)
    world.server.reset_stats()
    with caplog.at_level(logging.WARNING, logger="s3datafs.s3source"):
        for ref, body in world.objects[:4]:
            assert source.get_range(ref, 0, ref.size) == body
            assert source.get_range(ref, 2, 9) == body[2:9]
    assert answers(world) == {("GetObject", 403): 1, ("GetObject", 206): 8}
    bucket = world.objects[0][0].bucket
    assert [r.getMessage() for r in caplog.records] == [
        f"may not read object versions in bucket '{bucket}' (s3:GetObjectVersion is not "
        "granted): reading them by ETag alone (If-Match): the pinned bytes, or ESTALE once an "
        "object is overwritten"]
    put = world.s3.put_object(Bucket=bucket, Key="overwritten.bin", Body=b"old bytes")
    ref = ObjectRef(bucket, "overwritten.bin", put["VersionId"], put["ETag"], 9, 0.0)
    world.s3.put_object(Bucket=bucket, Key="overwritten.bin", Body=b"new bytes")
    with pytest.raises(StaleObjectError):
        source.get_range(ref, 0, 4)


def test_a_version_may_be_read_by_etag_only_for_want_of_that_permission(
    world: CheckedWorld,
) -> None:
    """Refused keys are not a missing permission: no second GET."""
    source = source_with(world, Keys(world.reader.key_id, "not-the-secret"))
    world.server.reset_stats()
    ref, _body = world.objects[1]
    with pytest.raises(AccessDeniedError, match="SignatureDoesNotMatch"):
        source.get_range(ref, 0, 4)
    assert sum(answers(world).values()) == 1 + 1  # the template's refusal, botocore's redo


def test_an_object_denied_by_etag_too_keeps_its_first_error_and_the_versions(
    world: CheckedWorld, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused without its version as well (a policy that denies the object): the error is the
    first one, and the bucket's versions are not given up for it."""
    bucket = world.objects[0][0].bucket
    put = world.s3.put_object(Bucket=bucket, Key="denied.bin", Body=b"secret")
    ref = ObjectRef(bucket, "denied.bin", put["VersionId"], put["ETag"], 6, 0.0)
    source = source_with(world, world.reader)
    first = "reading a pinned version needs s3:GetObjectVersion"
    with caplog.at_level(logging.WARNING, logger="s3datafs.s3source"), pytest.raises(
            AccessDeniedError, match=first):
        source.get_range(ref, 0, 6)
    assert not caplog.records
    assert not source._versions_unreadable
