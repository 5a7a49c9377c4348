"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing mounted, nothing left.

The promise (issue text): malformed URIs, a bucket, key or version that does not exist, access
denied, ``--etag``/``--version-id`` that do not match or name a prefix, a mount point that is a
file, non-empty or already mounted, a loose credentials file, an unknown option... each gets a
one-line ``s3datafs: <problem>: <what to do>``, exit 2 for usage errors and 1 otherwise, no
traceback, and nothing half-mounted left behind (a mount point directory the command created is
removed again).

Every case runs the real command (``cli``) and is checked the same way (``run_case``):
exit status; stderr is exactly one line starting ``s3datafs: `` and containing the case's fragment;
no ``Traceback`` and no ``internal error``; nothing on stdout; no mount added or removed; no path
created or removed in the test's tree (mount points included, the data root itself excepted); no
state file, catalog or daemon process left; and, unless the case needs S3 to tell, no request
reached the S3 server (usage errors are found before any network).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from conftest import Cli, CliResult, checking_server

from devtools.s3server import S3Server
from s3datafs import cli, config, s3source
from s3datafs.commands import mount as mount_command
from s3datafs.errors import AccessDeniedError, StaleObjectError

pytestmark = pytest.mark.fuse

USAGE, FAILURE = 2, 1
BOOKKEEPING = ("log", "cache", "run")  # the test tree's own state dirs, checked separately


@dataclass(frozen=True)
class World:
    """S3 state shared by the whole module (built once: buckets are never modified by a case)."""

    b: str  # unversioned: p/x.bin, p/y.bin
    vb: str  # versioned: d.csv written twice
    v1: str  # VersionId of the first d.csv
    etag1: str  # ETag of the first d.csv (quoted, as S3 sends it)
    etag2: str  # ETag of the second d.csv
    etag_x: str  # ETag of p/x.bin
    missing: str  # a valid bucket name that does not exist

    def values(self, cli: Cli) -> dict[str, str]:
        return {**vars(self), "root": str(cli.root)}


@pytest.fixture(scope="module")
def world(s3server: S3Server) -> World:
    s3 = s3server.client()
    bucket, vbucket = (f"t-{uuid.uuid4().hex[:16]}" for _ in range(2))
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="p/x.bin", Body=b"x")
    s3.put_object(Bucket=bucket, Key="p/y.bin", Body=b"y")
    s3.create_bucket(Bucket=vbucket)
    s3.put_bucket_versioning(Bucket=vbucket, VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket=vbucket, Key="d.csv", Body=b"v1\n")
    second = s3.put_object(Bucket=vbucket, Key="d.csv", Body=b"v2\n")
    return World(
        b=bucket,
        vb=vbucket,
        v1=first["VersionId"],
        etag1=first["ETag"],
        etag2=second["ETag"],
        etag_x=s3.head_object(Bucket=bucket, Key="p/x.bin")["ETag"],
        missing=f"t-missing-{uuid.uuid4().hex[:12]}",
    )


# -- cases ---------------------------------------------------------------------------------------

Setup = Callable[[Cli, World], None]


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # after "s3datafs"; {b} {vb} {v1} {etag1} {etag2} {root}... substituted
    exit_code: int
    fragment: str  # must appear in the one stderr line (substituted like argv)
    setup: Setup | None = None  # local state made before the run (counts as pre-existing)
    s3: bool = False  # the command needs S3 to find the problem (else: no request may be sent)
    env: dict[str, str | None] = field(default_factory=dict)  # None removes the variable
    log: str | None = None  # a WARNING/ERROR daemon log line this case provokes


def case(id_: str, argv: list[str], exit_code: int, fragment: str, **options: object):
    return pytest.param(Case(tuple(argv), exit_code, fragment, **options), id=id_)


def make_symlink(relative: str, target: str) -> Setup:
    def setup(cli: Cli, world: World) -> None:
        path = cli.root / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.symlink_to(target)

    return setup


def make_file(relative: str, text: str = "x", mode: int = 0o600) -> Setup:
    def setup(cli: Cli, world: World) -> None:
        path = cli.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    return setup


def make_dir(relative: str) -> Setup:
    def setup(cli: Cli, world: World) -> None:
        (cli.root / relative).mkdir(parents=True)

    return setup


def mount_first(cli: Cli, world: World) -> None:
    cli.mount(f"s3://{world.b}/p/", str(cli.root / "mnt"))


CREDENTIALS = "[default]\naws_access_key_id = AKIDTEST\naws_secret_access_key = testing\n"
NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}
NO_CONFIG_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
ETAG_NONE_HAS = "0123456789abcdef0123456789abcdef"

URI_CASES = [
    case("uri-http", ["mount", "http://b/k"], USAGE, "not an S3 URI: 'http://b/k'"),
    case("uri-one-slash", ["mount", "s3:/b"], USAGE, "not an S3 URI: 's3:/b'"),
    case("uri-scheme-only", ["mount", "s3://"], USAGE, "S3 URI has no bucket"),
    case("uri-no-bucket-with-key", ["mount", "s3:///k"], USAGE, "S3 URI has no bucket"),
    case("uri-empty", ["mount", ""], USAGE, "empty S3 URI"),
    case("uri-scheme-uppercase", ["mount", "S3://bucket/k"], USAGE, "not an S3 URI"),
    case("bucket-underscore", ["mount", "s3://B_ad/k"], USAGE, "invalid bucket name 'B_ad'"),
    case("bucket-capitals", ["mount", "s3://MyBucket/k"], USAGE, "invalid bucket name 'MyBucket'"),
    case("bucket-ip-address", ["mount", "s3://192.168.1.1/k"], USAGE, "cannot be an IP address"),
    case("bucket-too-short", ["mount", "s3://ab/k"], USAGE, "invalid bucket name 'ab'"),
    case("bucket-double-dot", ["mount", "s3://bucket..name/k"], USAGE, "two adjacent periods"),
    case("bucket-leading-dash", ["mount", "s3://-bucket/k"], USAGE, "invalid bucket name"),
]

NAME_CASES = [
    case("name-dotdot", ["mount", "s3://{b}/p/", "--name", ".."], USAGE, "invalid dataset name"),
    case("name-dot", ["mount", "s3://{b}/p/", "--name", "."], USAGE, "invalid dataset name '.'"),
    case("name-empty", ["mount", "s3://{b}/p/", "--name", ""], USAGE, "invalid dataset name ''"),
    case("name-slash", ["mount", "s3://{b}/p/", "--name", "a/b"], USAGE, "may not contain '/'"),
    case("name-newline", ["mount", "s3://{b}/p/", "--name", "a\nb"], USAGE, "control characters"),
    case(
        "name-256-bytes",
        ["mount", "s3://{b}/p/", "--name", "n" * 256],
        USAGE,
        "longer than 255 bytes",
    ),
    case(
        "name-256-bytes-in-128-chars",
        ["mount", "s3://{b}/p/", "--name", "é" * 128],
        USAGE,
        "longer than 255 bytes",
    ),
    case(
        "default-name-too-long",
        ["mount", "s3://{b}/" + "k" * 300],
        USAGE,
        "choose a shorter --name",
    ),
]

OPTION_CASES = [
    case("uid-not-numeric", ["mount", "s3://{b}/p/", "--uid", "abc"], USAGE, "--uid 'abc'"),
    case("gid-negative", ["mount", "s3://{b}/p/", "--gid", "-1"], USAGE, "--gid '-1'"),
    case("uid-too-large", ["mount", "s3://{b}/p/", "--uid", "4294967295"], USAGE, "numeric id"),
    case("uid-superscript-digit", ["mount", "s3://{b}/p/", "--uid", "\u00b2"], USAGE, "numeric id"),
    case("prefetch-files-superscript", ["mount", "s3://{b}/p/", "--prefetch-files", "\u00b3"],
         USAGE, "is not a number of files"),
    case("file-mode-not-octal", ["mount", "s3://{b}/p/", "--file-mode", "999"], USAGE, "octal"),
    case("block-larger-than-memory-cache", ["mount", "s3://{b}/p/", "--block-size", "64M"],
         USAGE, "two blocks of --block-size (64.0 MiB), at least 128.0 MiB"),
    case("memory-cache-below-two-blocks", ["mount", "s3://{b}/p/", "--memory-cache-size", "64K"],
         USAGE, "two blocks of --block-size (64.0 KiB), at least 128.0 KiB"),
    case("dir-mode-too-large", ["mount", "s3://{b}/p/", "--dir-mode", "77777"], USAGE, "range"),
    case(
        "unknown-option",
        ["mount", "--bogus", "s3://{b}/p/"],
        USAGE,
        "unrecognized arguments: --bogus",
    ),
    case("abbreviated-option", ["mount", "s3://{b}/p/", "--arch", "file"], USAGE,
         "unrecognized arguments: --arch file (see 's3datafs mount --help')"),
    case(
        "extra-argument",
        ["mount", "s3://{b}/p/", "{root}/m", "extra"],
        USAGE,
        "unrecognized arguments: extra",
    ),
    case("option-without-value", ["mount", "s3://{b}/p/", "--name"], USAGE, "expected one arg"),
    case("missing-uri", ["mount"], USAGE, "required: uri"),
    case("no-command", [], USAGE, "required: COMMAND"),
    case("unknown-subcommand", ["frobnicate"], USAGE, "invalid choice: 'frobnicate'"),
    case("status-unknown-option", ["status", "--bogus"], USAGE,
         "unrecognized arguments: --bogus (see 's3datafs status --help')"),
    case("unmount-missing-path", ["unmount"], USAGE, "required: mountpoint"),
    case(
        "no-sign-request-with-credentials-file",
        ["mount", "s3://{b}/p/", "--no-sign-request", "--credentials-file", "{root}/creds"],
        USAGE,
        "contradict",
        setup=make_file("creds", CREDENTIALS),
    ),
    case(
        "endpoint-url-not-a-url",
        ["mount", "s3://{b}/p/", "--endpoint-url", "not-a-url"],
        USAGE,
        "not-a-url",
    ),
    case(
        "region-malformed",
        ["mount", "s3://{b}/p/", "--region", "not a region"],
        USAGE,
        "'not a region'",
    ),
]

PIN_CASES = [
    case(
        "version-id-on-prefix",
        ["mount", "s3://{b}/p/", "--version-id", "{v1}"],
        USAGE,
        "s3://{b}/p/ is a prefix",
    ),
    case("etag-on-prefix", ["mount", "s3://{b}/p/", "--etag", "abc"], USAGE, "is a prefix"),
    case("version-id-on-bucket", ["mount", "s3://{b}", "--version-id", "{v1}"], USAGE, "prefix"),
    case(
        "etag-on-prefix-without-slash",  # only a HEAD can tell it is not an object
        ["mount", "s3://{b}/p", "--etag", "abc"],
        USAGE,
        "s3://{b}/p is a prefix",
        s3=True,
    ),
    case(
        "etag-mismatch",
        ["mount", "s3://{b}/p/x.bin", "--etag", ETAG_NONE_HAS],
        FAILURE,
        f'expected "{ETAG_NONE_HAS}", S3 has {{etag_x}}',
        s3=True,
    ),
    case(
        "etag-of-another-version",
        ["mount", "s3://{vb}/d.csv", "--version-id", "{v1}", "--etag", "{etag2}"],
        FAILURE,
        "ETag mismatch for s3://{vb}/d.csv: expected {etag2}, S3 has {etag1}",
        s3=True,
    ),
    case(
        "version-id-missing",
        ["mount", "s3://{vb}/d.csv", "--version-id", "nosuchversion"],
        FAILURE,
        "version 'nosuchversion' of s3://{vb}/d.csv does not exist",
        s3=True,
    ),
    case(
        "version-id-on-unversioned-bucket",
        ["mount", "s3://{b}/p/x.bin", "--version-id", "{v1}"],
        FAILURE,
        "check --version-id",
        s3=True,
    ),
]

S3_CASES = [
    case(
        "bucket-missing",
        ["mount", "s3://{missing}/p/"],
        FAILURE,
        "bucket '{missing}' does not exist",
        s3=True,
    ),
    case(
        "bucket-missing-foreground",
        ["mount", "-f", "s3://{missing}/p/", "{root}/fg"],
        FAILURE,
        "bucket '{missing}' does not exist",
        s3=True,
    ),
    case(
        "key-missing",
        ["mount", "s3://{b}/nokey.txt"],
        FAILURE,
        "no such object or prefix: s3://{b}/nokey.txt",
        s3=True,
    ),
    case(
        "prefix-missing",
        ["mount", "s3://{b}/nope/"],
        FAILURE,
        "no such object or prefix: s3://{b}/nope/",
        s3=True,
    ),
    case(
        "key-missing-foreground",
        ["mount", "--foreground", "s3://{b}/p/nokey.txt"],
        FAILURE,
        "no such object or prefix",
        s3=True,
    ),
    case(
        "no-credentials",
        ["mount", "s3://{b}/p/"],
        FAILURE,
        "no AWS credentials found",
        s3=True,
        env=NO_CREDENTIALS,
    ),
    case(
        "session-token-from-the-environment-on-two-lines",  # http.client would quote it
        ["mount", "s3://{b}/p/"],
        FAILURE,
        "a request header holds a character HTTP does not allow (a line break in a credential",
        env={"AWS_SESSION_TOKEN": "TOKENPART1\nTOKENPART2"},
    ),
    case(
        "anonymous-on-private-bucket",
        ["mount", "s3://{b}/p/x.bin", "--no-sign-request"],
        FAILURE,
        "access denied to s3://{b}/p/x.bin",
        s3=True,
    ),
    case(
        "endpoint-unreachable",
        ["mount", "s3://{b}/p/", "--endpoint-url", "http://127.0.0.1:1"],
        FAILURE,
        ":1/{b}?versioning\": check the endpoint (--endpoint-url) and network",
        s3=True,
    ),
    case(
        "profile-missing",
        ["mount", "s3://{b}/p/", "--profile", "nosuchprofile"],
        FAILURE,
        "profile 'nosuchprofile' not found",
        env=NO_CONFIG_FILES,
        log="mount daemon failed",
    ),
]

LOCAL_CASES = [
    case(
        "mountpoint-is-file",
        ["mount", "s3://{b}/p/", "{root}/afile"],
        FAILURE,
        "mount point {root}/afile is not a directory",
        setup=make_file("afile"),
    ),
    case(
        "default-mountpoint-is-file",
        ["mount", "s3://{b}/p/"],
        FAILURE,
        "is not a directory",
        setup=make_file("data/p"),
    ),
    case(
        "mountpoint-not-empty",
        ["mount", "s3://{b}/p/", "{root}/full"],
        FAILURE,
        "mount point {root}/full is not empty",
        setup=make_file("full/something"),
    ),
    case(
        "mountpoint-already-mounted",
        ["mount", "s3://{b}/p/", "{root}/mnt"],
        FAILURE,
        "{root}/mnt is already a mount point",
        setup=mount_first,
    ),
    case(
        "mountpoint-parent-is-file",
        ["mount", "s3://{b}/p/", "{root}/afile/sub"],
        FAILURE,
        "mount point {root}/afile/sub: Not a directory",
        setup=make_file("afile"),
    ),
    case(
        "mountpoint-existing-empty-is-kept",
        ["mount", "s3://{missing}/p/", "{root}/empty"],
        FAILURE,
        "does not exist",
        setup=make_dir("empty"),
        s3=True,
    ),
    case(
        "mountpoint-created-parents-are-removed",
        ["mount", "s3://{missing}/p/", "{root}/a/b/c"],
        FAILURE,
        "does not exist",
        s3=True,
    ),
    case(
        "data-root-in-proc",
        ["mount", "s3://{b}/p/", "--data-root", "/proc/nope"],
        FAILURE,
        "cannot create mount point /proc/nope/p",
    ),
    case(
        "data-root-is-file",
        ["mount", "s3://{b}/p/", "--data-root", "{root}/afile"],
        FAILURE,
        "mount point {root}/afile/p: Not a directory",
        setup=make_file("afile"),
    ),
    case(
        "log-file-uncreatable",
        ["mount", "s3://{b}/p/", "--log-file", "/proc/nope/x.log"],
        FAILURE,
        "/proc/nope",
    ),
    case(
        "log-file-symlink",
        ["mount", "s3://{b}/p/", "--log-file", "{root}/logs/link.log"],
        FAILURE,
        "cannot write log file {root}/logs/link.log: it is a symbolic link, which is never "
        "followed: choose another with --log-file",
        setup=make_symlink("logs/link.log", "real.log"),
    ),
    case(
        "cache-dir-uncreatable",
        ["mount", "s3://{b}/p/", "--cache-dir", "/proc/nope"],
        FAILURE,
        "/proc/nope",
        log="mount daemon failed",
    ),
    case(
        "credentials-file-mode-0644",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "(mode 0644): run chmod 600 {root}/creds",
        setup=make_file("creds", CREDENTIALS, 0o644),
    ),
    case(
        "credentials-file-mode-0660",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "chmod 600",
        setup=make_file("creds", CREDENTIALS, 0o660),
    ),
    case(
        "credentials-file-missing",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/nocreds"],
        FAILURE,
        "cannot read credentials file {root}/nocreds",
    ),
    case(
        "credentials-file-is-directory",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/credsdir"],
        FAILURE,
        "is not a regular file",
        setup=make_dir("credsdir"),
    ),
    case(
        "credentials-file-without-default",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "has no [default] section",
        setup=make_file("creds", CREDENTIALS.replace("[default]", "[other]")),
    ),
    case(
        "credentials-file-without-profile",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds", "--profile", "prod"],
        FAILURE,
        "has no [prod] section",
        setup=make_file("creds", CREDENTIALS),
    ),
    case(
        "credentials-file-without-secret",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "lacks aws_secret_access_key",
        setup=make_file("creds", "[default]\naws_access_key_id = AKIDTEST\n"),
    ),
    case(
        "credentials-file-token-on-two-lines",  # the value never reaches an error or a log
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "credentials file {root}/creds [default] aws_session_token is empty or holds a line "
        "break, a space or another character no AWS credential has: write it on one line",
        setup=make_file("creds", CREDENTIALS + "aws_session_token = TOKENPART1\n  TOKENPART2\n"),
    ),
    case(
        "credentials-file-not-ini",
        ["mount", "s3://{b}/p/", "--credentials-file", "{root}/creds"],
        FAILURE,
        "cannot parse credentials file",
        setup=make_file("creds", "aws_access_key_id AKIDTEST\n"),
    ),
    case(
        "unmount-not-mounted",
        ["unmount", "{root}/empty"],
        FAILURE,
        "{root}/empty is not mounted",
        setup=make_dir("empty"),
    ),
    case(
        "unmount-nonexistent-path",
        ["unmount", "{root}/nonexistent"],
        FAILURE,
        "{root}/nonexistent is not mounted",
    ),
    case("umount-alias-not-mounted", ["umount", "{root}"], FAILURE, "is not mounted"),
]

CASES = URI_CASES + NAME_CASES + OPTION_CASES + PIN_CASES + S3_CASES + LOCAL_CASES


# -- checking ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    mounts: frozenset[tuple[str, str]]  # (mount point, fstype) below the watched paths
    paths: frozenset[str]  # below the test root, bookkeeping dirs and mounted trees excluded
    states: frozenset[str]  # runtime state files
    catalogs: frozenset[str]
    daemons: frozenset[int]  # processes running with this test's runtime dir


def _below(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def snapshot(cli: Cli, watched: list[str]) -> Snapshot:
    mounts = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if _below(fields[4], watched):
                mounts.add((fields[4], fields[fields.index("-") + 1]))
    paths = set()
    for directory, dirs, files in os.walk(cli.root):
        here = Path(directory)
        if here == cli.root:
            dirs[:] = [d for d in dirs if d not in BOOKKEEPING]
        paths.update(str((here / n).relative_to(cli.root)) for n in dirs + files)
        dirs[:] = [d for d in dirs if not os.path.ismount(here / d)]  # not into mounted trees
    paths.discard("data")  # the data root itself may be created (and kept) by a failed mount
    marker = f"S3DATAFS_RUNTIME_DIR={cli.root / 'run'}\0".encode()
    daemons = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes():
                daemons.add(int(environ.parent.name))
        except OSError:
            continue
    return Snapshot(
        mounts=frozenset(mounts),
        paths=frozenset(paths),
        states=frozenset(p.name for p in (cli.root / "run").glob("*.json")),
        catalogs=frozenset(p.name for p in (cli.root / "cache" / "catalogs").glob("*.db")),
        daemons=frozenset(daemons),
    )


def _diff(before: frozenset, after: frozenset) -> str:
    return f"added {sorted(after - before)}, removed {sorted(before - after)}"


def problems_of(
    result: CliResult,
    *,
    exit_code: int,
    fragment: str,
    before: Snapshot,
    after: Snapshot,
    ops: dict[str, int] | None,
) -> dict[str, str]:
    """Every way ``result`` falls short of a clean failure, by check name."""
    problems = {}
    stderr = result.stderr.strip()
    if result.returncode != exit_code:
        problems["exit"] = f"exit {result.returncode}, expected {exit_code}"
    if not stderr.startswith("s3datafs: ") or "\n" in stderr:
        problems["one-line"] = "stderr is not one 's3datafs: ' line"
    if fragment not in stderr:
        problems["fragment"] = f"stderr lacks {fragment!r}"
    if "Traceback" in result.stdout + result.stderr:
        problems["traceback"] = "a traceback was printed"
    if "internal error" in stderr:
        problems["internal"] = "reported as an internal error"
    if result.stdout:
        problems["stdout"] = "something was printed on stdout"
    if after.mounts != before.mounts:
        problems["mounts"] = "mount table changed: " + _diff(before.mounts, after.mounts)
    if after.paths != before.paths:
        problems["paths"] = "files or directories changed: " + _diff(before.paths, after.paths)
    for name in ("states", "catalogs", "daemons"):
        if getattr(after, name) - getattr(before, name):
            problems[name] = f"{name} left behind: " + _diff(
                getattr(before, name), getattr(after, name)
            )
    if ops:
        problems["offline"] = f"S3 requests were sent: {ops}"
    return problems


def judge(problems: dict[str, str], result: CliResult) -> None:
    details = f"\nexit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert not problems, "\n".join(f"{name}: {text}" for name, text in problems.items()) + details


def run_case(
    cli: Cli, bad: Case, *, values: dict[str, str], world: World | None, s3server: S3Server | None
) -> None:
    """Run one bad command and check it failed cleanly (``s3server``: check it stayed offline)."""
    argv = [arg.format(**values) for arg in bad.argv]
    fragment = bad.fragment.format(**values)
    if bad.log:
        cli.expect_log(bad.log)
    if bad.setup is not None:
        bad.setup(cli, world)
    env = dict(cli.env)
    for name, value in bad.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    watched = [str(cli.root)] + [a for a in argv if a.startswith("/")]
    before = snapshot(cli, watched)
    if s3server is not None:
        s3server.reset_stats()
    result = cli.run(*argv, env=env)
    ops = s3server.ops() if s3server is not None and not bad.s3 else None
    after = snapshot(cli, watched)
    problems = problems_of(
        result, exit_code=bad.exit_code, fragment=fragment, before=before, after=after, ops=ops
    )
    judge(problems, result)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_fails_cleanly(cli: Cli, s3server: S3Server, world: World, bad: Case) -> None:
    run_case(cli, bad, values=world.values(cli), world=world, s3server=s3server)


def test_unmount_of_a_foreign_mount_refuses_and_leaves_it(
    cli: Cli, s3server: S3Server, world: World
) -> None:
    target = cli.root / "tmpfs"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "none", str(target)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        bad = Case(("unmount", "{root}/tmpfs"), FAILURE, "is not an s3datafs mount (it is tmpfs)")
        run_case(cli, bad, values=world.values(cli), world=world, s3server=s3server)
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=False)


# -- credentials S3 refuses: a second moto server with authentication on ---------------------------

LOCKED = "locked-bucket"


@dataclass(frozen=True)
class AuthWorld:
    server: S3Server
    key_id: str  # an IAM user with no permissions at all
    secret: str


@pytest.fixture(scope="module")
def auth_world() -> Iterator[AuthWorld]:
    """moto with IAM auth enforced after the first three requests, which build the fixture."""
    with S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        iam.create_user(UserName="nobody")  # no-auth request 1
        key = iam.create_access_key(UserName="nobody")["AccessKey"]  # 2
        server.client().create_bucket(Bucket=LOCKED)  # 3
        yield AuthWorld(server, key["AccessKeyId"], key["SecretAccessKey"])


DENIED = f"access denied to s3://{LOCKED}"


@pytest.mark.parametrize(
    ("uri", "keys", "fragment"),
    [
        pytest.param(
            f"s3://{LOCKED}/p/", "nobody", f"{DENIED}/p/ (AccessDenied)", id="no-permission"
        ),
        pytest.param(
            f"s3://{LOCKED}/p/", "wrong-secret", f"{DENIED} (SignatureDoesNotMatch)", id="secret"
        ),
        pytest.param(
            f"s3://{LOCKED}/p/", "unknown", f"{DENIED} (InvalidAccessKeyId)", id="unknown-key"
        ),
        pytest.param(
            f"s3://{LOCKED}/d.bin",
            "unknown",
            f"{DENIED} (InvalidAccessKeyId)",
            id="unknown-key-object",
        ),
    ],
)
def test_access_denied(cli: Cli, auth_world: AuthWorld, uri: str, keys: str, fragment: str) -> None:
    key_id, secret = {
        "nobody": (auth_world.key_id, auth_world.secret),
        "wrong-secret": (auth_world.key_id, "not-the-secret"),
        "unknown": ("AKIDUNKNOWN0000000000", "whatever"),
    }[keys]
    bad = Case(
        ("mount", uri),
        FAILURE,
        fragment,
        s3=True,
        env={
            "AWS_ENDPOINT_URL": auth_world.server.endpoint,
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
        },
    )
    run_case(cli, bad, values={"root": str(cli.root)}, world=None, s3server=None)


@dataclass(frozen=True)
class PolicyWorld:
    server: S3Server
    versioned: str  # a versioned bucket holding data/x.bin; ListBucket, GetBucketVersioning
    unlisted: str  # a versioned bucket holding data/x.bin; GetBucketVersioning, no listing
    plain: str  # an unversioned bucket holding data/x.bin; no listing
    env: dict[str, str]  # the reader's keys: GetObject everywhere, and the above
    admin_env: dict[str, str]  # keys allowed everything


@pytest.fixture(scope="module")
def policy_world() -> Iterator[PolicyWorld]:
    """A reader with the read-only policies people write by hand (no version permissions)."""
    with checking_server() as (server, admin):
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        versioned, unlisted, plain = (
            f"{kind}-{uuid.uuid4().hex[:12]}" for kind in ("versioned", "unlisted", "plain"))
        for bucket in (versioned, unlisted, plain):
            s3.create_bucket(Bucket=bucket)
            if bucket != plain:
                s3.put_bucket_versioning(Bucket=bucket,
                                         VersioningConfiguration={"Status": "Enabled"})
            s3.put_object(Bucket=bucket, Key="data/x.bin", Body=b"x" * 100)
        statements = [
            {"Effect": "Allow", "Action": "s3:GetObject",
             "Resource": [f"arn:aws:s3:::{bucket}/*" for bucket in (versioned, unlisted, plain)]},
            {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketVersioning"],
             "Resource": f"arn:aws:s3:::{versioned}"},
            {"Effect": "Allow", "Action": "s3:GetBucketVersioning",
             "Resource": f"arn:aws:s3:::{unlisted}"},
        ]
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": statements}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield PolicyWorld(server, versioned, unlisted, plain, {
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}, {
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": admin["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": admin["aws_secret_access_key"]})


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        pytest.param("s3://{unlisted}/data/", "access denied to s3://{unlisted}/data/ "
                     "(AccessDenied): listing a versioned bucket needs s3:ListBucketVersions; ",
                     id="no-listing"),
        pytest.param("s3://{plain}/data/typo.bin", "s3://{plain}/data/typo.bin is no object "
                     "(check the key), and listing it as a prefix was refused: access denied to "
                     "s3://{plain}/data/typo.bin/ (AccessDenied): listing needs s3:ListBucket; ",
                     id="no-object-no-listing"),
    ],
)
def test_access_denied_names_the_permission_missing(
    cli: Cli, policy_world: PolicyWorld, uri: str, fragment: str
) -> None:
    names = {"versioned": policy_world.versioned, "unlisted": policy_world.unlisted,
             "plain": policy_world.plain}
    bad = Case(("mount", uri.format(**names)), FAILURE, fragment.format(**names), s3=True,
               env=policy_world.env)
    run_case(cli, bad, values={"root": str(cli.root)}, world=None, s3server=None)


def mount_as_reader(
    cli: Cli, policy_world: PolicyWorld, what: str, warning: str | None = None
) -> None:
    """Mount ``what`` (a URI, or ``--snapshot=FILE``) with the reader's keys, expecting
    ``warning`` alone (or nothing); read x.bin whole."""
    env = {**cli.env, **policy_world.env}
    result = cli.run("mount", what, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"s3datafs: WARNING: {warning}\n" if warning else "")
    mountpoint = Path(result.stdout.rsplit(" at ", 1)[1].split(" (", 1)[0])
    try:
        assert (mountpoint / "x.bin").read_bytes() == b"x" * 100
    finally:
        assert cli.run("unmount", str(mountpoint), env=env).returncode == 0


@pytest.mark.parametrize(
    ("path", "warning"),
    [
        pytest.param("data/", "may not list the versions of bucket '{bucket}' "
                     "(s3:ListBucketVersions is not granted): pinning s3://{bucket}/data/ by ETag "
                     "only", id="prefix"),
        pytest.param("data/x.bin", "may not read object versions in bucket '{bucket}' "
                     "(s3:GetObjectVersion is not granted): reading them by ETag alone "
                     "(If-Match): the pinned bytes, or ESTALE once an object is overwritten",
                     id="object"),
    ],
)
def test_a_versioned_dataset_mounts_by_etag_without_the_version_permissions(
    cli: Cli, policy_world: PolicyWorld, path: str, warning: str
) -> None:
    """s3:GetObject and s3:ListBucket are enough: a prefix is listed without versions (its GETs
    then name none), and one object's HEAD names its version but its GETs may go without."""
    bucket = policy_world.versioned
    cli.expect_log(warning.split(" '")[0])
    mount_as_reader(cli, policy_world, f"s3://{bucket}/{path}", warning.format(bucket=bucket))


def test_a_snapshot_of_versions_mounts_for_a_reader_who_may_not_read_versions(
    cli: Cli, policy_world: PolicyWorld
) -> None:
    """Its reads go by ETag alone. (Its one HEAD, of a version, needs s3:GetObjectVersion on
    S3, not on moto: that fallback is ``test_snapshot``'s.)"""
    bucket, snapshot = policy_world.versioned, cli.root / "x.snap"
    made = cli.run("snapshot", f"s3://{bucket}/data/", "-o", str(snapshot),
                   env={**cli.env, **policy_world.admin_env})
    assert made.returncode == 0, made.stderr
    header, row = gzip.decompress(snapshot.read_bytes()).decode().splitlines()
    assert json.loads(header)["versioned"]
    assert json.loads(row)[1]  # the version the snapshot pins
    cli.expect_log("may not read object versions in bucket")
    mount_as_reader(cli, policy_world, f"--snapshot={snapshot}")
    logged = "".join(path.read_text() for path in cli.log_dir.glob("*.log"))
    assert f"may not read object versions in bucket '{bucket}'" in logged


AWS_SAYS = ('User: arn:aws:iam::123456789012:user/job is not authorized to perform: '
            's3:GetObject on resource: "arn:aws:s3:::b-1/k" because no identity-based policy '
            'allows the s3:GetObject action')
KMS_SAYS = ('User: arn:aws:iam::123456789012:user/job is not authorized to perform: kms:Decrypt '
            'on resource: arn:aws:kms:us-east-1:123456789012:key/1234 because no identity-based '
            'policy allows the kms:Decrypt action')


@pytest.mark.parametrize(
    ("operation", "code", "message", "version_id", "needed"),
    [
        ("HeadObject", "403", "Forbidden", None, "(403): reading it needs "
         "s3:GetObject, and S3 answers 403 for a key that does not exist to whom may not list "
         "the bucket (s3:ListBucket): check the key; "),
        ("HeadObject", "403", "", "v1", "(403): reading a pinned version needs "
         "s3:GetObjectVersion, and S3 answers 403 for a key"),
        ("GetObject", "AccessDenied", "Access Denied", None,
         "(AccessDenied): reading it needs s3:GetObject; "),
        ("GetObject", "AccessDenied", AWS_SAYS, None,
         f"(AccessDenied) (S3 said: {AWS_SAYS}): reading it needs s3:GetObject; "),
        ("GetObject", "AccessDenied", KMS_SAYS, "v1",
         f"(AccessDenied) (S3 said: {KMS_SAYS}): its KMS key needs kms:Decrypt; "),
        ("ListObjectsV2", "AccessDenied", "", None,
         "(AccessDenied): listing needs s3:ListBucket; "),
        ("GetObject", "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist "
         "in our records.", None, "(InvalidAccessKeyId) (S3 said: The AWS Access Key Id you "
         "provided does not exist in our records.): check the credentials"),
        ("GetObject", "SignatureDoesNotMatch", "", "v1", "(SignatureDoesNotMatch): check the cred"),
    ],
)
def test_a_denied_request_says_what_it_needed(
    operation: str, code: str, message: str, version_id: str | None, needed: str
) -> None:
    """Policies that are missing a permission name it; keys S3 did not accept do not (it is
    the keys then, not the policy). What S3 said is kept unless it is a bare "Access Denied"."""
    error = botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message},
         "ResponseMetadata": {"HTTPStatusCode": 403}},
        operation)
    mapped = s3source._map_client_error(error, "s3://b-1/k", version_id)
    assert isinstance(mapped, AccessDeniedError)
    assert f"access denied to s3://b-1/k {needed}" in str(mapped)


def test_a_failed_mount_removes_only_the_directories_it_made(tmp_path: Path) -> None:
    """``remove_created`` stops at the highest directory ``prepare_mountpoint`` made: an empty
    parent that was there before (``a``) is the user's, and stays."""
    (tmp_path / "a").mkdir()
    mountpoint = tmp_path / "a" / "b" / "c"
    highest = config.prepare_mountpoint(mountpoint)
    assert highest == tmp_path / "a" / "b"
    config.remove_created(mountpoint, highest)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert not any((tmp_path / "a").iterdir())


@pytest.mark.parametrize("debug", [False, True])
def test_our_error_inside_trios_exception_groups_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], debug: bool
) -> None:
    """A command whose nurseries end with one of our errors says that error, as if raised
    alone (``--debug``: the whole group, for its traceback); any other group is internal."""
    stale = StaleObjectError("s3://b-1/k changed after mount")

    def failing(_args: object) -> int:
        raise ExceptionGroup("nursery", [ExceptionGroup("nursery", [stale])])

    monkeypatch.setattr(mount_command, "run", failing)
    argv = ["mount", "s3://b-1/k", *(["--debug"] if debug else [])]
    if debug:
        with pytest.raises(ExceptionGroup):
            cli.main(argv)
        return
    assert cli.main(argv) == stale.exit_code
    assert capsys.readouterr().err == "s3datafs: s3://b-1/k changed after mount\n"
    for other in (IndexError("list index out of range"),
                  ExceptionGroup("nursery", [IndexError("list index out of range")])):
        monkeypatch.setattr(mount_command, "run", functools.partial(raising, other))
        assert cli.main(["mount", "s3://b-1/k"]) == 1
        assert capsys.readouterr().err.startswith(f"s3datafs: internal error: {other!r} ")


def raising(error: BaseException, *_args: object) -> None:
    raise error
