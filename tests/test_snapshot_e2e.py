"""Snapshot files, fingerprints and diff end to end: the real command, real mounts, local moto.

Files are read through a mount only after S3 was changed where a test is about pinning, so the
page cache cannot hide a daemon serving the wrong version. Bad inputs reuse the clean-failure
checks of ``test_bad_input`` (one stderr line, exit status, nothing mounted or left behind, and no
S3 request unless the case needs S3 to find the problem).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli, errno_of, garble_root_page
from test_bad_input import Case, run_case
from test_faults_e2e import fill, tmpfs
from test_mount_e2e import NESTED, expected_tree, put_all, tree

from devtools.s3server import S3Server
from s3datafs import snapshot as snapshot_module

pytestmark = pytest.mark.fuse

FINGERPRINT = re.compile(r"fingerprint ([0-9a-f]{64})")
LISTS = {"ListObjects", "ListObjectsV2", "ListObjectVersions"}


def fingerprint_in(text: str) -> str:
    match = FINGERPRINT.search(text)
    assert match, text
    return match[1]


def snapshot(cli: Cli, *args: str) -> str:
    """Run ``s3datafs snapshot ARGS``, assert success, return the fingerprint it printed."""
    result = cli.run("snapshot", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("s3datafs: wrote ")
    return fingerprint_in(result.stdout)


def overwrite_everything(s3, bucket: str) -> None:
    for key in NESTED:
        if not key.endswith("/"):
            s3.put_object(Bucket=bucket, Key=key, Body=b"overwritten " + key.encode())
    s3.delete_object(Bucket=bucket, Key="train/a/1.txt")
    s3.put_object(Bucket=bucket, Key="train/added-later.txt", Body=b"late")


def snapshot_of_nested(cli: Cli, s3, make_bucket) -> tuple[str, Path, str]:
    """A versioned bucket holding ``NESTED`` and a snapshot file of its ``train/``: the bucket,
    the file, and the fingerprint ``snapshot`` printed."""
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    file = cli.root / "train.snapshot.gz"
    return bucket, file, snapshot(cli, f"s3://{bucket}/train/", "-o", str(file))


def test_a_snapshot_through_a_link_replaces_the_file_it_names_and_the_link_stays(
    cli: Cli, s3, make_bucket
) -> None:
    """FILE a symbolic link (as /dev/stdout is, with stdout redirected to a file): the snapshot
    replaces the file the link names. Replacing the link instead turned it into a regular
    file (as root, /dev/stdout for every process) and left the named file as it was."""
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    named = cli.root / "snapshots" / "v1.snapshot.gz"
    named.parent.mkdir()
    named.write_bytes(b"an older file")
    link = cli.root / "latest.snapshot.gz"
    link.symlink_to(os.path.relpath(named, link.parent))
    printed = snapshot(cli, f"s3://{bucket}/train/", "-o", str(link))
    assert link.is_symlink()
    assert link.resolve() == named.resolve()
    assert snapshot_module.read_header(named).fingerprint == printed


def test_snapshot_then_mount_from_file_is_identical_with_zero_lists(
    cli: Cli, s3, s3server: S3Server, make_bucket
) -> None:
    bucket, file, printed = snapshot_of_nested(cli, s3, make_bucket)
    s3server.reset_stats()
    mountpoint = cli.mount(
        "--snapshot", str(file), str(cli.root / "m"), "--cache-dir", str(cli.root / "fresh-cache")
    )
    assert s3server.ops() == {"HeadObject": 1}  # no LIST, no GetBucketVersioning: one HEAD only
    assert tree(mountpoint) == expected_tree(NESTED, "train/")
    assert os.getxattr(mountpoint, "user.s3datafs.fingerprint").decode() == printed
    assert not set(s3server.ops()) & LISTS
    status = cli.run("status")
    assert printed in status.stdout
    rows = json.loads(cli.run("status", "--json").stdout)  # other tests' mounts may show too
    (state,) = [row for row in rows if row["mountpoint"] == str(mountpoint)]
    assert state["fingerprint"] == printed
    assert state["uri"] == f"s3://{bucket}/train/"


def test_a_remount_of_the_same_snapshot_uses_the_catalog_kept_from_the_first(
    cli: Cli, s3, s3server: S3Server, make_bucket
) -> None:
    _, file, _ = snapshot_of_nested(cli, s3, make_bucket)
    cache = cli.root / "cache"
    first = cli.mount("--snapshot", str(file), str(cli.root / "m1"), "--cache-dir", str(cache))
    expected = tree(first)
    assert cli.unmount(first).returncode == 0
    (kept,) = (cache / "catalogs" / "snapshots").glob("*.db")
    assert kept.stat().st_nlink == 1  # the mount's own link went with it
    s3server.reset_stats()
    second = cli.mount("--snapshot", str(file), str(cli.root / "m2"), "--cache-dir", str(cache))
    assert kept.stat().st_nlink == 2  # the mount serves the kept catalog itself
    assert s3server.ops() == {"HeadObject": 1}
    assert tree(second) == expected == expected_tree(NESTED, "train/")
    stats = cli.run("cache", "stats", "--cache-dir", str(cache))
    assert "catalogs of snapshot files kept for the next mount: " in stats.stdout
    assert " in 1 catalog" in stats.stdout
    cleared = cli.run("cache", "clear", "--cache-dir", str(cache))
    assert cleared.stdout.rstrip().endswith(" and 1 snapshot catalog"), cleared.stdout
    assert tree(second) == expected  # a mount serving it goes on


def test_a_kept_catalog_damaged_past_what_a_mount_checks_fails_with_eio_and_goes(
    cli: Cli, s3, make_bucket
) -> None:
    """Damage to the name index only: the kept catalog passes the remount's checks (meta, first
    file), then every name fails with EIO; the kept copy goes, so the next mount builds anew."""
    _, file, _ = snapshot_of_nested(cli, s3, make_bucket)
    cache = cli.root / "cache"
    args = ("--snapshot", str(file), "--cache-dir", str(cache))
    first = cli.mount(*args, str(cli.root / "m1"))
    expected = tree(first)
    assert cli.unmount(first).returncode == 0
    (kept,) = (cache / "catalogs" / "snapshots").glob("*.db")
    garble_root_page(kept, "entries_by_name")
    cli.expect_log(r"the catalog .* is damaged \(database disk image is malformed\): its copy")
    second = cli.mount(*args, str(cli.root / "m2"))
    assert errno_of(lambda: os.stat(second / "a")) == errno.EIO
    assert not kept.exists()
    assert cli.unmount(second).returncode == 0
    third = cli.mount(*args, str(cli.root / "m3"))
    assert tree(third) == expected == expected_tree(NESTED, "train/")
    assert kept.exists()  # built and kept again


def test_a_snapshot_serves_the_old_bytes_after_overwrites(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    file = cli.root / "train.snapshot.gz"
    printed = snapshot(cli, f"s3://{bucket}/train/", "-o", str(file), "--name", "train-v1")
    overwrite_everything(s3, bucket)
    result = cli.run("mount", "--snapshot", str(file))
    assert result.returncode == 0, result.stderr
    assert fingerprint_in(result.stdout) == printed
    mountpoint = cli.data_root / "train-v1"  # the name comes from the file
    assert tree(mountpoint) == expected_tree(NESTED, "train/")


def test_save_snapshot_records_the_mount_and_mounts_elsewhere(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    file = cli.root / "saved.gz"
    first = cli.run(
        "mount", f"s3://{bucket}/train/", str(cli.root / "one"), "--save-snapshot", str(file)
    )
    assert first.returncode == 0, first.stderr
    content = gzip.decompress(file.read_bytes())
    header = json.loads(content.split(b"\n", 1)[0])
    assert header["fingerprint"] == fingerprint_in(first.stdout)
    for secret in (cli.env["AWS_SECRET_ACCESS_KEY"], cli.env["AWS_ENDPOINT_URL"], str(cli.root)):
        assert secret.encode() not in content  # no credential, endpoint or local path
    assert header["object_count"] == 6
    overwrite_everything(s3, bucket)
    elsewhere = cli.mount("--snapshot", str(file), str(cli.root / "two"), "--name", "again")
    assert tree(elsewhere) == expected_tree(NESTED, "train/")
    assert tree(cli.root / "one") == tree(elsewhere)


def test_expect_fingerprint_accepts_the_same_data(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, {"p/x.bin": b"x", "p/y.bin": b"y"})
    printed = snapshot(cli, f"s3://{bucket}/p/", "-o", str(cli.root / "1.gz"))
    again = snapshot(
        cli, f"s3://{bucket}/p/", "-o", str(cli.root / "2.gz"), "--expect-fingerprint", printed
    )
    assert again == printed
    mountpoint = cli.mount(f"s3://{bucket}/p/", "--expect-fingerprint", printed.upper())
    assert (mountpoint / "x.bin").read_bytes() == b"x"
    assert os.getxattr(mountpoint, "user.s3datafs.fingerprint").decode() == printed


def test_diff_of_equal_and_different_datasets(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, {"p/keep": b"k", "p/change": b"1", "p/drop": b"d", "p/dir/": b""})
    before = cli.root / "before.gz"
    snapshot(cli, f"s3://{bucket}/p/", "-o", str(before))
    same = cli.run("diff", str(before), f"s3://{bucket}/p/")
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith("s3datafs: no differences (fingerprint ")
    s3.put_object(Bucket=bucket, Key="p/change", Body=b"22")
    s3.delete_object(Bucket=bucket, Key="p/drop")
    s3.put_object(Bucket=bucket, Key="p/new", Body=b"n")
    after = cli.root / "after.gz"
    snapshot(cli, f"s3://{bucket}/p/", "-o", str(after))
    for b_side in (str(after), f"s3://{bucket}/p/"):
        changed = cli.run("diff", str(before), b_side)
        assert changed.returncode == 1, changed.stderr
        lines = changed.stdout.splitlines()
        assert lines[0].startswith("~ change: version ")
        assert "size 1 -> 2" in lines[0]
        assert lines[1:3] == ["- drop", "+ new"]
        assert lines[3].startswith("s3datafs: 1 added, 1 removed, 1 changed (fingerprint ")
    piped = subprocess.Popen(  # diff A B | head -0: the reader goes before the output comes
        [sys.executable, "-m", "s3datafs", "diff", str(before), str(after)], env=cli.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    piped.stdout.close()
    assert piped.wait(timeout=60) == 128 + signal.SIGPIPE
    assert piped.stderr.read() == b""
    piped.stderr.close()
    trouble = cli.run("diff", str(before), str(cli.root / "missing.gz"))
    assert trouble.returncode == 2
    assert trouble.stderr.count("\n") == 1
    assert "does not exist" in trouble.stderr


def test_diff_of_a_copy_elsewhere_compares_contents_not_version_ids(
    cli: Cli, s3, make_bucket
) -> None:
    """A version id names a version of one key: a copy never shares it, and an object written
    before versioning is null afterwards; neither is a change."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/a.txt": b"a", "p/b/c.txt": b"c"})
    before = cli.root / "before.gz"
    snapshot(cli, f"s3://{bucket}/p/", "-o", str(before))  # unversioned: no version ids
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put_all(s3, bucket, {"q/a.txt": b"a", "q/b/c.txt": b"c"})  # a copy, with version ids
    for a_side, b_side in ((str(before), f"s3://{bucket}/p/"),
                           (f"s3://{bucket}/p/", f"s3://{bucket}/q/")):
        same = cli.run("diff", a_side, b_side)
        assert same.returncode == 0, same.stdout + same.stderr
    nulls = cli.root / "nulls.gz"
    snapshot(cli, f"s3://{bucket}/p/", "-o", str(nulls))  # versioned now: every id is null
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"a")  # the same bytes, a real version id
    same = cli.run("diff", str(nulls), f"s3://{bucket}/p/")
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.startswith("s3datafs: no differences in contents (fingerprint ")
    other = make_bucket(versioned=True)  # a copy in another bucket, under the same keys
    put_all(s3, other, {"p/a.txt": b"a", "p/b/c.txt": b"c"})
    same = cli.run("diff", f"s3://{bucket}/p/", f"s3://{other}/p/")
    assert same.returncode == 0, same.stdout + same.stderr



def test_diff_shows_each_path_on_one_line_and_counts_each_kind(cli: Cli, s3, make_bucket) -> None:
    """A path with blanks at either end is JSON-quoted, the prefix's own directory marker is
    ./, and the summary counts what was added apart from what was removed."""
    bucket = make_bucket()
    put_all(s3, bucket, {"p/plain": b"x"})
    before = cli.root / "before.gz"
    snapshot(cli, f"s3://{bucket}/p/", "-o", str(before))
    put_all(s3, bucket, {"p/": b"", "p/ lead": b"l", "p/trail ": b"t"})
    result = cli.run("diff", str(before), f"s3://{bucket}/p/")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["+ ./", '+ " lead"', '+ "trail "']
    assert lines[3].startswith("s3datafs: 3 added, 0 removed, 0 changed (fingerprint ")

# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_snapshot(s3server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A versioned bucket and a good snapshot of it, made once; cases copy and spoil it."""
    s3 = s3server.client()
    bucket = "t-snap-" + os.urandom(6).hex()
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = s3.put_object(Bucket=bucket, Key="p/a.bin", Body=b"first")
    s3.put_object(Bucket=bucket, Key="p/b.bin", Body=b"second")
    plain = "t-plain-" + os.urandom(6).hex()
    s3.create_bucket(Bucket=plain)
    s3.put_object(Bucket=plain, Key="p/x", Body=b"x")
    root = tmp_path_factory.mktemp("snap-src")
    runner = Cli(root, s3server.endpoint)
    result = runner.run("snapshot", f"s3://{bucket}/p/", "-o", str(root / "good.gz"))
    assert result.returncode == 0, result.stderr
    return {"bucket": bucket, "plain": plain, "file": root / "good.gz", "first": first, "s3": s3}


def spoiled(edit) -> object:  # edit(bytes) -> bytes; the file lands at {root}/snap.gz
    def setup(cli: Cli, world: dict) -> None:
        data = world["file"].read_bytes()
        (cli.root / "snap.gz").write_bytes(edit(data))

    return setup


def edit_lines(change) -> object:  # change(list of JSON values) -> list
    def edit(data: bytes) -> bytes:
        values = [json.loads(line) for line in gzip.decompress(data).splitlines()]
        return gzip.compress("\n".join(json.dumps(v) for v in change(values)).encode() + b"\n")

    return edit


def flip_inside(data: bytes) -> bytes:
    spoilt = bytearray(data)
    spoilt[len(data) // 2] ^= 0x55
    return bytes(spoilt)


def _with(values: list, index: int, **fields) -> list:
    updated = list(values)
    if index == 0:
        updated[0] = {**values[0], **fields}
    else:
        record = list(values[index])
        for position, value in fields.items():
            record[int(position[1:])] = value
        updated[index] = record
    return updated


MOUNT = ["mount", "--snapshot", "{root}/snap.gz", "{root}/mnt"]
SNAPSHOT_CASES = {
    "truncated": (spoiled(lambda d: d[: len(d) - 20]), "truncated"),
    "corrupted": (spoiled(flip_inside), "corrupted"),
    "edited-etag": (
        spoiled(edit_lines(lambda v: _with(v, 1, f2="0" * 32))),
        "its objects have fingerprint",
    ),
    "edited-count": (
        spoiled(edit_lines(lambda v: _with(v, 0, object_count=3))),
        "it lists 2 objects, its header says 3",
    ),
    "unknown-format": (
        spoiled(edit_lines(lambda v: _with(v, 0, format="s3datafs-snapshot/9"))),
        "has format 's3datafs-snapshot/9'",
    ),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_CASES))
def test_a_bad_snapshot_file_mounts_nothing(
    cli: Cli, s3server: S3Server, good_snapshot: dict, case: str
) -> None:
    setup, fragment = SNAPSHOT_CASES[case]
    bad = Case(tuple(MOUNT), 1, fragment, setup=setup)
    run_case(cli, bad, values={"root": str(cli.root)}, world=good_snapshot, s3server=s3server)


@pytest.mark.parametrize("command", ["mount", "snapshot"])
def test_a_snapshot_written_onto_a_full_disk_is_one_line_and_leaves_nothing(
    cli: Cli, s3, make_bucket, command: str
) -> None:
    """``mount --save-snapshot`` and ``snapshot -o`` onto a disk that fills up while the file is
    written: one line naming the file, no temporary file left, and nothing mounted."""
    bucket = make_bucket(versioned=True)
    put_all(s3, bucket, NESTED)
    target = cli.root / "m"
    with tmpfs(cli.root / "full", "16k") as full:
        fill(full)
        saved = full / "saved.gz"
        if command == "mount":
            result = cli.run("mount", f"s3://{bucket}/train/", str(target),
                             "--save-snapshot", str(saved))
        else:
            result = cli.run("snapshot", f"s3://{bucket}/train/", "-o", str(saved))
        assert (result.returncode, result.stdout) == (1, "")
        said = f"s3datafs: cannot write snapshot {saved}: No space left on device\n"
        assert result.stderr == said
        assert os.listdir(full) == ["filler"]  # the temporary file is gone
    assert cli.mounts_below_root() == []
    assert not target.exists()


def test_a_snapshot_whose_pinned_version_is_gone_fails_at_the_one_head(
    cli: Cli, s3server: S3Server, good_snapshot: dict
) -> None:
    world = good_snapshot
    world["s3"].delete_object(
        Bucket=world["bucket"], Key="p/a.bin", VersionId=world["first"]["VersionId"]
    )
    bad = Case(
        tuple(MOUNT),
        1,
        "which is gone from S3",
        s3=True,
        setup=lambda c, w: shutil.copy(w["file"], c.root / "snap.gz"),
    )
    run_case(cli, bad, values={"root": str(cli.root)}, world=world, s3server=s3server)


def other(id_: str, argv: list[str], exit_code: int, fragment: str, *, s3: bool = False):
    return pytest.param(Case(tuple(argv), exit_code, fragment, s3=s3), id=id_)


BUCKET_P = ["s3://{bucket}/p/", "{root}/mnt"]
OTHER_CASES = [
    other("snapshot-and-other-uri", [*MOUNT[:3], "s3://other-bucket/x/"], 2, "records s3://"),
    other("snapshot-and-as-of", [*MOUNT, "--as-of", "1d"], 2, "drop --as-of"),
    other("snapshot-missing", ["mount", "--snapshot", "{root}/none.gz"], 1, "does not exist"),
    other(
        "expect-not-hex",
        ["mount", *BUCKET_P, "--expect-fingerprint", "abc"],
        2,
        "not a fingerprint",
    ),
    other(
        "expect-mismatch-mount",
        ["mount", *BUCKET_P, "--expect-fingerprint", "0" * 64],
        1,
        "fingerprint mismatch for s3://{bucket}/p/: expected 0000",
        s3=True,
    ),
    other(
        "expect-mismatch-snapshot",
        ["snapshot", "s3://{bucket}/p/", "-o", "{root}/o.gz", "--expect-fingerprint", "f" * 64],
        1,
        "the data has",
        s3=True,
    ),
    other(
        "snapshot-output-dir-missing",
        ["snapshot", "s3://{bucket}/p/", "-o", "{root}/x/o.gz"],
        1,
        "does not exist",
    ),
    other(
        "snapshot-and-two-mount-points",  # the file names the URI: a second one is a mistake
        ["mount", "--snapshot", "{root}/snap.gz", "{root}/a", "{root}/b"],
        2,
        "with --snapshot, give only the MOUNTPOINT (the file names the URI)",
    ),
    other(
        "save-snapshot-is-a-dir",
        ["mount", *BUCKET_P, "--save-snapshot", "{root}"],
        1,
        "is a directory",
    ),
    other(
        "as-of-unversioned-mount",
        ["mount", "s3://{plain}/p/", "{root}/mnt", "--as-of", "1h"],
        1,
        "is not versioned",
        s3=True,
    ),
    other(
        "as-of-unversioned-snapshot",
        ["snapshot", "s3://{plain}/p/", "-o", "{root}/o.gz", "--as-of", "1h"],
        1,
        "is not versioned",
        s3=True,
    ),
    other("as-of-future", ["mount", *BUCKET_P, "--as-of", "2999-01-01"], 2, "in the future"),
    other("as-of-unparseable", ["mount", *BUCKET_P, "--as-of", "last tuesday"], 2, "is not a time"),
    other(
        "as-of-with-version-id",
        ["mount", "s3://{bucket}/p/a.bin", "--as-of", "1h", "--version-id", "v"],
        2,
        "--as-of and --version-id",
    ),
]


@pytest.mark.parametrize("bad", OTHER_CASES)
def test_bad_snapshot_and_as_of_options_fail_cleanly(
    cli: Cli, s3server: S3Server, good_snapshot: dict, bad: Case
) -> None:
    shutil.copy(good_snapshot["file"], cli.root / "snap.gz")
    values = {
        "root": str(cli.root),
        "bucket": good_snapshot["bucket"],
        "plain": good_snapshot["plain"],
    }
    run_case(cli, bad, values=values, world=good_snapshot, s3server=s3server)
