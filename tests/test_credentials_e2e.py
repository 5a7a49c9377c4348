"""Where a mount's keys come from, and who pays: keys that change while a mount lives (rotated
by botocore, rewritten in a file), roles through STS, metadata services, Requester Pays buckets.

A mount lives for days; the keys it reads with often do not (STS sessions, ``credential_process``
leases, a credentials file an agent renews). moto checks no signature, so the fault proxy plays
S3's part: it refuses GETs signed with a key the test has retired (403 ``InvalidAccessKeyId``,
what S3 answers for a key deleted at the end of its lease), or requests to a Requester Pays
bucket that do not say (signed) that the requester pays, and records which key signed each
request.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import botocore.credentials
import pytest
from conftest import Cli
from faultproxy import FaultProxy

from s3datafs import s3source

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024

# A credential_process that hands out a new key on every call, valid for LEASE seconds, and
# writes "KEY EXPIRY" to a registry so the proxy can tell when a key has expired.
LEASE = 4.0
_PROCESS = textwrap.dedent("""\
    import datetime, json, sys, time, uuid
    key = "LEASE" + uuid.uuid4().hex[:12].upper()
    expiry = time.time() + float(sys.argv[2])
    with open(sys.argv[1], "a") as registry:
        registry.write(f"{key} {expiry}\\n")
    print(json.dumps({
        "Version": 1, "AccessKeyId": key, "SecretAccessKey": "s" * 40, "SessionToken": "t" + key,
        "Expiration": datetime.datetime.fromtimestamp(expiry, datetime.timezone.utc).isoformat(),
    }))
""")


def _expired(registry: Path):
    def expired(access_key: str) -> bool:
        for line in registry.read_text().splitlines():
            key, _, expiry = line.partition(" ")
            if key == access_key:
                return time.time() >= float(expiry)
        return False

    return expired


def _leasing_profile(cli: Cli, tmp_path: Path, lease: float) -> Path:
    """Profile ``lease`` in the mount's only AWS config: keys from ``_PROCESS``, each valid for
    ``lease`` seconds; the registry it returns gets a line per call."""
    script, registry = tmp_path / "lease.py", tmp_path / "registry"
    script.write_text(_PROCESS)
    registry.touch()
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile lease]\ncredential_process = {sys.executable} {script} {registry} {lease}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        cli.env.pop(name)
    cli.env.update(AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "x"))
    return registry


def _gets(proxy: FaultProxy) -> list[str]:
    return [key for op, _, key in proxy.signed if op == "GetObject"]


def test_keys_botocore_renews_are_used_and_expired_ones_never_sent(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = make_bucket()
    data = os.urandom(8 * MiB)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=data)
    registry = _leasing_profile(cli, tmp_path, LEASE)
    proxy.inject("error", status=403, code="InvalidAccessKeyId", times=None,
                 signed_with=_expired(registry))
    mountpoint = cli.mount(f"s3://{bucket}/d/", "--endpoint-url", proxy.endpoint,
                           "--profile", "lease", "--no-cache")
    with open(mountpoint / "a.bin", "rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        assert os.pread(file.fileno(), 4096, 0) == data[:4096]
        time.sleep(LEASE + 1)  # the key that signed the first GET (and its template) expires
        assert os.pread(file.fileno(), 4096, 6 * MiB) == data[6 * MiB : 6 * MiB + 4096]
    assert proxy.injected == []  # no GET carried an expired key
    assert len(set(_gets(proxy))) >= 2


def _write_keys(path: Path, key: str) -> None:
    """Rewrite the file as agents do: a new file renamed over the old one, mode 0600."""
    temporary = path.with_suffix(".new")
    temporary.write_text(
        f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {'x' * 40}\n"
        f"aws_session_token = token-of-{key}\n"
    )
    temporary.chmod(0o600)
    temporary.replace(path)


def test_a_rewritten_credentials_file_is_used_while_mounted(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = make_bucket()
    data = {name: os.urandom(MiB) for name in ("a.bin", "b.bin", "c.bin")}
    for name, body in data.items():
        s3.put_object(Bucket=bucket, Key=f"d/{name}", Body=body)
    keys = tmp_path / "credentials"
    _write_keys(keys, "FILEKEY1")
    retired: set[str] = set()
    proxy.inject("error", status=403, code="InvalidAccessKeyId", times=None,
                 signed_with=retired.__contains__)
    mountpoint = cli.mount(f"s3://{bucket}/d/", "--endpoint-url", proxy.endpoint,
                           "--credentials-file", str(keys), "--no-cache", "--prefetch-files", "0")
    assert (mountpoint / "a.bin").read_bytes() == data["a.bin"]
    _write_keys(keys, "FILEKEY2")  # the agent renews the keys; the old ones are then retired
    retired.add("FILEKEY1")
    time.sleep(1.5)  # the file is looked at once a second at most
    assert (mountpoint / "b.bin").read_bytes() == data["b.bin"]
    assert proxy.injected == []
    assert set(_gets(proxy)) == {"FILEKEY1", "FILEKEY2"}

    keys.chmod(0o644)  # now unfit to read: the keys read before are kept, with one warning
    os.utime(keys)
    cli.expect_log(r"credentials file .* is open to other users .*: keeping the keys read before")
    time.sleep(1.5)
    assert (mountpoint / "c.bin").read_bytes() == data["c.bin"]
    assert _gets(proxy)[-1] == "FILEKEY2"


ROLE_SOURCES = ["web identity token", "assumed role profile"]


def _use_role(cli: Cli, source: str, sts_endpoint: str, tmp_path: Path) -> list[str]:
    """Make ``cli`` get its keys for a role from STS at ``sts_endpoint``, given by ``source``
    (EKS's web identity token, or a profile's ``role_arn``); returns the mount's arguments."""
    role = "arn:aws:iam::123456789012:role/reader"
    base_key = cli.env.pop("AWS_ACCESS_KEY_ID")
    base_secret = cli.env.pop("AWS_SECRET_ACCESS_KEY")
    cli.env.update(AWS_ENDPOINT_URL_STS=sts_endpoint,
                   AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"))
    if source == "web identity token":
        token = tmp_path / "token"
        token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJqb2IifQ.c2ln")
        cli.env.update(AWS_ROLE_ARN=role, AWS_WEB_IDENTITY_TOKEN_FILE=str(token))
        return []
    (tmp_path / "aws-config").write_text(
        f"[profile job]\nrole_arn = {role}\nsource_profile = base\n")
    (tmp_path / "aws-credentials").write_text(
        f"[base]\naws_access_key_id = {base_key}\naws_secret_access_key = {base_secret}\n")
    return ["--profile", "job"]


@pytest.mark.parametrize("source", ROLE_SOURCES)
def test_keys_from_sts_sign_the_reads(
    source: str, cli: Cli, s3server, s3, make_bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    """botocore's providers make an ``sts`` client from our session, whose data loader is
    tuned for ``s3``: it must still find the other services."""
    bucket = make_bucket()
    data = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=data)
    base_key = cli.env["AWS_ACCESS_KEY_ID"]
    options = _use_role(cli, source, s3server.endpoint, tmp_path)  # moto answers STS too
    mountpoint = cli.mount(f"s3://{bucket}/d/", "--endpoint-url", proxy.endpoint, *options,
                           "--no-cache")
    assert (mountpoint / "a.bin").read_bytes() == data
    signers = set(_gets(proxy))
    assert signers
    assert base_key not in signers  # the role's temporary keys signed them, not the base ones


@pytest.mark.parametrize("source", ROLE_SOURCES)
def test_a_role_whose_sts_cannot_be_reached_fails_the_mount_in_one_line(
    source: str, cli: Cli, make_bucket, tmp_path: Path
) -> None:
    bucket = make_bucket()
    options = _use_role(cli, source, "http://127.0.0.1:9", tmp_path)
    cli.expect_log("Refreshing temporary credentials failed")  # in the log file, not on stderr
    result = cli.run("mount", f"s3://{bucket}/", *options)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "http://127.0.0.1:9" in result.stderr
    assert f"cannot get AWS credentials for s3://{bucket}" in result.stderr  # not S3's fault
    assert "--endpoint-url" not in result.stderr
    assert not (cli.data_root / bucket).exists()


METADATA_KEY = "ASIAMETADATAKEY"


class _MetadataHandler(BaseHTTPRequestHandler):
    """Both metadata services: ECS/EKS Pod Identity's container endpoint (``/creds``) and EC2's
    instance metadata (IMDSv2: a token PUT, then the role's name, then its keys)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:  # noqa: N802 - http.server's name
        self._answer(b"imds-session-token" if self.path == "/latest/api/token" else None)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        roles = "/latest/meta-data/iam/security-credentials/"
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        keys = json.dumps({
            "Code": "Success", "AccessKeyId": METADATA_KEY, "SecretAccessKey": "m" * 40,
            "Token": "metadata-session-token", "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }).encode()
        self._answer({roles: b"reader", roles + "reader": keys, "/creds": keys}.get(self.path))

    def _answer(self, body: bytes | None) -> None:
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def metadata_endpoint() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetadataHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("service", ["container", "instance"])
def test_keys_from_a_metadata_service_sign_the_reads(
    service: str, cli: Cli, s3, make_bucket, proxy: FaultProxy, metadata_endpoint: str,
    tmp_path: Path,
) -> None:
    """ECS tasks and EKS Pod Identity get keys from a container endpoint, EC2 from instance
    metadata: what the mount command finds, its daemon must keep using."""
    bucket = make_bucket()
    data = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=data)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        cli.env.pop(name)
    cli.env.update(AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    if service == "container":
        cli.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"{metadata_endpoint}/creds"
    else:
        cli.env.pop("AWS_EC2_METADATA_DISABLED")
        cli.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"{metadata_endpoint}/"
    mountpoint = cli.mount(f"s3://{bucket}/d/", "--endpoint-url", proxy.endpoint, "--no-cache")
    assert (mountpoint / "a.bin").read_bytes() == data
    assert set(_gets(proxy)) == {METADATA_KEY}


def test_a_requester_pays_bucket_is_mounted_and_read_with_requester_pays(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = make_bucket(versioned=True)
    data = os.urandom(MiB)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=data)
    for op in ("ListObjectsV2", "ListObjectVersions", "HeadObject", "GetObject"):
        proxy.inject("error", op=op, status=403, code="AccessDenied", times=None,
                     unsigned="x-amz-request-payer")
    through_proxy = ("--endpoint-url", proxy.endpoint)
    refused = cli.run("mount", f"s3://{bucket}/d/", *through_proxy)
    assert refused.returncode == 1
    assert "a Requester Pays one --requester-pays" in refused.stderr
    injected = len(proxy.injected)
    for uri in (f"s3://{bucket}/d/", f"s3://{bucket}/d/a.bin"):  # a listing; a HEAD
        mountpoint = cli.mount(uri, *through_proxy, "--requester-pays", "--no-cache")
        assert (mountpoint / "a.bin").read_bytes() == data
        assert cli.unmount(mountpoint).returncode == 0
    snapshot = cli.run("snapshot", f"s3://{bucket}/d/", *through_proxy, "--requester-pays",
                       "-o", str(tmp_path / "d.snap"))
    assert snapshot.returncode == 0, snapshot.stderr
    assert len(proxy.injected) == injected  # none refused
    assert proxy.requests["GetObject"] >= 2


def test_a_900_second_role_session_is_not_renewed_on_every_read(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """botocore renews keys in their last 15 minutes on every use: a session of 900 s (the
    shortest STS grants, and a common one) is always there, and each GET called STS again
    (3 calls per GET measured). We renew 5 minutes ahead: one session serves these reads."""
    bucket = make_bucket()
    data = os.urandom(4 * MiB)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=data)
    registry = _leasing_profile(cli, tmp_path, 900)
    mountpoint = cli.mount(f"s3://{bucket}/d/", "--profile", "lease", "--no-cache")
    with open(mountpoint / "a.bin", "rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for block in range(32):
            offset = block * 128 * 1024
            assert os.pread(file.fileno(), 4096, offset) == data[offset : offset + 4096]
    # One session: the mount command's settings check, whose keys the daemon goes on using.
    assert len(registry.read_text().splitlines()) == 1


def test_renewal_windows_a_credential_provider_chose_are_kept() -> None:
    """Keys renewed 5 minutes ahead (2 at the latest) unless their provider chose its own
    windows (botocore's class defaults are not a choice)."""

    def credentials() -> botocore.credentials.RefreshableCredentials:
        return botocore.credentials.RefreshableCredentials(
            "AKID", "SECRET", "TOKEN", datetime.datetime.now(datetime.UTC),
            refresh_using=dict, method="test")

    defaults, chosen = credentials(), credentials()
    chosen._advisory_refresh_timeout, chosen._mandatory_refresh_timeout = 60, 30
    for each in (defaults, chosen):
        s3source._refresh_closer_to_expiry(each)
    assert (defaults._advisory_refresh_timeout, defaults._mandatory_refresh_timeout) == (
        s3source.ADVISORY_REFRESH_SECONDS, s3source.MANDATORY_REFRESH_SECONDS)
    assert (chosen._advisory_refresh_timeout, chosen._mandatory_refresh_timeout) == (60, 30)


def test_keys_that_come_expired_fail_the_mount_in_one_line_naming_the_clock(
    cli: Cli, s3, make_bucket, tmp_path: Path
) -> None:
    """botocore raises a plain RuntimeError for keys its provider handed out expired (a wrong
    clock, here or at the service): it was an "internal error", and at read time an
    "unexpected error" that no counter saw."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=b"a")
    _leasing_profile(cli, tmp_path, -60)
    cli.expect_log("the refreshed credentials are still expired")  # botocore's, the file only
    result = cli.run("mount", f"s3://{bucket}/d/", "--profile", "lease")
    assert result.returncode == 1
    assert result.stderr == (
        f"s3datafs: cannot use the AWS credentials for s3://{bucket}: the credential service "
        "gave keys that had expired already: check this machine's clock, and the service\n")
