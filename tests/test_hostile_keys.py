"""Hostile keys and names, secrets and permissions, through real mounts.

Keys: every key moto stores is either shown byte for byte (spaces, tabs, CR, newlines, ``%``,
``\\``, control characters, any Unicode - NFC and NFD spellings are two files, names differing
only in case are two files, 255-byte names, 100 levels of directories) or skipped with one
warning and counted, as the README documents (empty, ``.`` and ``..`` segments, NUL, segments over
255 bytes, a file whose name is also a directory). Nothing resolves outside the mount root: the
tree holds exactly the expected entries, no symlink, and no skipped key's bytes anywhere.

Objects are created with ``S3Server.populate`` (moto's backend, no HTTP PUT), because moto's HTTP
front refuses a PUT of a key with a newline; listing and ranged GETs of such keys work. Each
object's bytes are ``s3fastlist.content(key, size)``, unique per key.

Secrets and permissions: the cache directory is 0700 all the way down and its files 0600, the
log 0600; ``allow_other`` only when asked; a secret key and session token given in a credentials
file appear in no log (even with ``--debug``), no error, no state or cache file, not in the mount
table and not in the daemon's command line or environment; no signature material is logged.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import Cli, errno_of, files_below
from faultproxy import FaultProxy

from devtools.s3fastlist import content
from devtools.s3server import S3Server
from s3datafs.cache.disk import is_region_file
from s3datafs.uri import mount_table_source, parse_s3_uri, uri_of_mount_table_source

pytestmark = pytest.mark.fuse

SHOWN = [
    "sp ace/file name.txt",
    "tab\there",
    "new\nline",
    "cr\rret",
    "pct%41.txt",
    "%2F",
    "back\\slash",
    "a\\..\\b",
    "日本語/ファイル.txt",
    "emoji😀.bin",
    "nfc-\u00e9",
    "nfd-e\u0301",
    "Case.txt",
    "case.txt",
    "CASE.TXT",
    "x" * 255,
    "é" * 127,  # 254 bytes
    "d/" * 100 + "leaf",
    "-rf",
    " lead",
    "trail ",
    "dot.",
    "...",
    ".hidden",
    "ctl\x01\x1f",
    "del\x7f",
    "q?uery#frag",
    "amp&plus+eq=;",
    "\u202eRTL",
    "\ufeffbom",
    "fd/child",
    "empty-marker/",
]
SKIPPED = [
    "y" * 256,
    "é" * 128,  # 256 bytes
    "a" * 1024,
    "a//b",
    "../escape",
    "a/../../etc/passwd",
    "./dot",
    "a/./b",
    "/lead-slash",
    "trailing/..",
    "nul\0byte",
    "fd",  # a file whose name is also a directory: the directory wins
]
PREFIX = "p/"


def expected_tree(keys: list[str]) -> dict[str, bytes | None]:
    """Relative path -> bytes (None for a directory) of what the mount must show."""
    tree: dict[str, bytes | None] = {}
    for key in keys:
        parts = key.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            tree["/".join(parts[:depth])] = None
        tree[key.rstrip("/")] = None if key.endswith("/") else content(PREFIX + key, size_of(key))
    return tree


def size_of(key: str) -> int:
    return 0 if key.endswith("/") else 100 + len(key.encode("utf-8")) % 97


def mounted_tree(root: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            assert not stat.S_ISLNK(info.st_mode), path
            assert os.path.realpath(path).startswith(str(root) + "/"), path
            relative = os.path.relpath(path, root)
            found[relative] = None if stat.S_ISDIR(info.st_mode) else Path(path).read_bytes()
    return found


def test_hostile_keys_are_shown_exactly_or_skipped_and_nothing_escapes(
    cli: Cli, s3server: S3Server, make_bucket
) -> None:
    bucket = make_bucket()
    keys = SHOWN + SKIPPED
    assert s3server.populate(bucket, [(PREFIX + k, size_of(k)) for k in keys]) == len(keys)
    s3server.populate(bucket, [("p2/outside.txt", 10)])  # a sibling prefix: never shown
    cli.expect_log("skipping key")
    result = cli.run("mount", f"s3://{bucket}/p/")
    assert result.returncode == 0, result.stderr
    assert f", {len(SKIPPED)} unsafe keys skipped" in result.stdout
    mountpoint = cli.data_root / "p"
    shown = mounted_tree(mountpoint)
    assert shown == expected_tree(SHOWN)
    assert "nfc-\u00e9" in shown
    assert "nfd-e\u0301" in shown  # not normalised: two names
    skipped_bytes = {content(PREFIX + k, size_of(k)) for k in SKIPPED}
    assert not skipped_bytes & {v for v in shown.values() if v is not None}
    assert sorted(os.listdir(cli.root)) == ["cache", "data", "log", "run"]  # nothing escaped
    assert sorted(os.listdir(cli.data_root)) == ["p"]
    assert errno_of(lambda: os.stat(mountpoint / "escape")) == 2
    log = (cli.log_dir / "p.log").read_text(errors="replace")
    assert log.count("skipping key") == len(SKIPPED)  # one warning each


def test_a_hostile_prefix_and_mount_point_survive_the_mount_table(
    cli: Cli, s3server: S3Server, make_bucket
) -> None:
    """Spaces, commas, a backslash and a tab in the URI and the mount point: the mount table's
    escapes are undone, so ``status`` and ``unmount`` find the mount."""
    bucket = make_bucket()
    prefix = "we ird,pre\\fix\t%20/"
    s3server.populate(bucket, [(prefix + "f.txt", 5)])
    mountpoint = cli.root / "mount point, with\\odd\tname"
    result = cli.run("mount", f"s3://{bucket}/{prefix}", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert (mountpoint / "f.txt").read_bytes() == content(prefix + "f.txt", 5)
    rows = json.loads(cli.run("status", "--json").stdout)
    row = next(r for r in rows if r["mountpoint"] == str(mountpoint))
    assert row["uri"] == f"s3://{bucket}/{prefix}"
    assert row["state"] == "mounted"
    assert cli.unmount(mountpoint).returncode == 0
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize("key", ["données/", "données/ünï ☃.txt"], ids=["prefix", "object"])
def test_a_uri_beyond_ascii_mounts_and_status_names_it_from_anywhere(
    cli: Cli, s3server: S3Server, make_bucket, key: str
) -> None:
    """libfuse takes its options (the source column among them) as ASCII only."""
    bucket = make_bucket()
    s3server.populate(bucket, [("données/ünï ☃.txt", 7)])
    mountpoint = cli.mount(f"s3://{bucket}/{key}", "--name", "fr")
    assert (mountpoint / "ünï ☃.txt").read_bytes() == content("données/ünï ☃.txt", 7)
    elsewhere = {**cli.env, "S3DATAFS_RUNTIME_DIR": str(cli.root / "other-run")}  # no state
    rows = json.loads(cli.run("status", "--json", env=elsewhere).stdout)  # other tests' too
    assert [row["uri"] for row in rows if row["mountpoint"] == str(mountpoint)] == [
        f"s3://{bucket}/{key}"]


@pytest.mark.parametrize(("key", "source"), [
    # Always two hex digits: a tab then ``A`` must not read as ``%9A``.
    ("a,b c\t\x7f\x01\\x/", "a%2Cb%20c%09%7F%01%5Cx/"),
    ("données/ünï ☃.txt", "donn%C3%A9es/%C3%BCn%C3%AF%20%E2%98%83.txt"),  # libfuse: ASCII only
    ("100%20real", "100%2520real"),  # not the same as "100 real"
    ("bad-\udcff-utf8", "bad-%FF-utf8"),  # a key that is not UTF-8 (surrogateescape)
])
def test_the_mount_tables_source_is_ascii_and_names_the_uri_exactly(key: str, source: str) -> None:
    uri = parse_s3_uri(f"s3://bkt/{key}")
    assert mount_table_source(uri) == f"s3://bkt/{source}"
    assert uri_of_mount_table_source(mount_table_source(uri)) == str(uri)


# -- permissions and secrets -----------------------------------------------------------------------


def mount_options(mountpoint: Path) -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            fields = line.split()
            if fields[4] == str(mountpoint):
                separator = fields.index("-")
                return set(fields[5].split(",")) | set(fields[separator + 3].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def test_allow_other_is_off_unless_asked(cli: Cli, s3server: S3Server, make_bucket) -> None:
    bucket = make_bucket()
    s3server.populate(bucket, [("p/f.txt", 5)])
    private = cli.mount(f"s3://{bucket}/p/")
    assert "allow_other" not in mount_options(private)
    assert {"ro", "default_permissions", "noatime", "nosuid", "nodev"} <= mount_options(private)
    shared = cli.mount(f"s3://{bucket}/p/", str(cli.root / "shared"), "--allow-other")
    assert "allow_other" in mount_options(shared)


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYDISTINCTSECRET"
TOKEN = "FQoGZXIvYXdzEDISTINCTSESSIONTOKEN0123456789abcdef"
KEY_ID = "AKIADISTINCTKEYID0001"


def test_no_secret_in_logs_errors_files_or_the_process_table(
    cli: Cli, s3server: S3Server, make_bucket
) -> None:
    bucket = make_bucket()
    s3server.populate(bucket, [("p/f.bin", 300_000)])
    creds = cli.root / "creds"
    creds.write_text(
        f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
        f"aws_session_token = {TOKEN}\n"
    )
    creds.chmod(0o600)
    outputs: list[str] = []
    with FaultProxy(s3server.endpoint) as proxy:
        mountpoint = cli.mount(
            f"s3://{bucket}/p/",
            "--credentials-file",
            str(creds),
            "--debug",
            "--endpoint-url",
            proxy.endpoint,
        )
        pid = cli.daemon_pid(mountpoint)
        # Errors in the daemon log, with --debug: access denied, then a read that gives up.
        cli.expect_log("access denied to")
        proxy.inject("error", status=403, code="AccessDenied", times=None)
        assert errno_of(lambda: (mountpoint / "f.bin").read_bytes()) == 13
        proxy.clear()
        assert (mountpoint / "f.bin").read_bytes() == content("p/f.bin", 300_000)
        process = [
            Path(f"/proc/{pid}/cmdline").read_bytes(),
            Path(f"/proc/{pid}/environ").read_bytes(),
        ]
        outputs.append(Path("/proc/self/mountinfo").read_text(errors="replace"))
        outputs.append(cli.run("status", "--json").stdout)
        assert cli.unmount(mountpoint).returncode == 0
    # Errors on the command line, with --debug: a bucket that does not exist, S3 unreachable.
    for uri, endpoint in (
        (f"s3://{bucket}-nope/p/", s3server.endpoint),
        (f"s3://{bucket}/p/", "http://127.0.0.1:1"),
    ):
        failed = cli.run(
            "mount",
            uri,
            str(cli.root / "m2"),
            "--credentials-file",
            str(creds),
            "--endpoint-url",
            endpoint,
            "--debug",
            "--foreground",
        )
        assert failed.returncode != 0
        outputs += [failed.stdout, failed.stderr]
    cli.expect_log("mount daemon failed|does not exist|cannot reach S3")
    for _path, written in files_below(cli.root, besides=[creds]):
        outputs.append(written.decode("utf-8", "replace"))
    text = "\n".join(outputs) + "\n".join(p.decode("utf-8", "replace") for p in process)
    for secret in (SECRET, TOKEN):
        assert secret not in text
    for material in ("X-Amz-Signature", "Signature=", "AWS4-HMAC-SHA256", "x-amz-security-token"):
        assert material not in text


def test_cache_and_log_files_are_private(cli: Cli, s3server: S3Server, make_bucket) -> None:
    bucket = make_bucket()
    s3server.populate(bucket, [("p/f.bin", 3 * 1024 * 1024), ("p/g.bin", 1000)])
    mountpoint = cli.mount(f"s3://{bucket}/p/")
    assert len((mountpoint / "f.bin").read_bytes()) == 3 * 1024 * 1024
    (mountpoint / "g.bin").read_bytes()
    assert cli.unmount(mountpoint).returncode == 0
    cache = cli.root / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    files = regions = 0
    for directory, _dirs, names in os.walk(cache):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            assert mode & 0o077 == 0, (directory, name, oct(mode))
            files += 1
            regions += is_region_file(name)
    assert regions >= 2  # the region files of the two objects read
    assert files > regions  # and the cache's lock and catalog, just as private
    for log in cli.log_dir.glob("*.log"):
        assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
