"""--as-of end to end: a versioned bucket written in three rounds, mounted as it was after each.

LastModified has one-second resolution in moto's listings, so rounds are ~1.1 s apart and each
view is taken at the newest LastModified of its round (read back from S3): it includes the whole
round and nothing of the next. Round by round (``k/`` prefix)::

    round 1: a=A1  b=B1  d/e=E1
    round 2: a=A2  b deleted          c=C1 (created later)
    round 3: a=A3  b=B2 (recreated)   d/e deleted
"""

from __future__ import annotations

import datetime
import time
import uuid

import pytest
from conftest import Cli, sha256
from test_mount_e2e import tree

from devtools.s3server import S3Server

pytestmark = pytest.mark.fuse

ROUNDS = [
    {"k/a": b"A1", "k/b": b"B1", "k/d/e": b"E1"},
    {"k/a": b"A2", "k/b": None, "k/c": b"C1"},
    {"k/a": b"A3", "k/b": b"B2", "k/d/e": None},
]


def expected(after: int) -> dict[str, str]:
    state: dict[str, bytes] = {}
    for changes in ROUNDS[: after + 1]:
        for key, body in changes.items():
            if body is None:
                state.pop(key)
            else:
                state[key] = body
    view = {}
    for key, body in state.items():
        relative = key[len("k/") :]
        if "/" in relative:
            view[relative.rsplit("/", 1)[0]] = "dir"
        view[relative] = sha256(body)
    return view


def write_rounds(s3, bucket: str) -> list[str]:
    """Write the rounds; return, per round, the ISO time of its newest LastModified."""
    for changes in ROUNDS:
        # S3 keeps LastModified to the second: each round starts just after a second begins,
        # in a second of its own (a round that straddled a boundary made 4 stamps of 3 rounds).
        time.sleep(1.02 - time.time() % 1)
        for key, body in changes.items():
            if body is None:
                s3.delete_object(Bucket=bucket, Key=key)
            else:
                s3.put_object(Bucket=bucket, Key=key, Body=body)
    listing = s3.list_object_versions(Bucket=bucket, Prefix="k/")
    stamps = sorted({e["LastModified"] for e in listing["Versions"] + listing["DeleteMarkers"]})
    assert len(stamps) == len(ROUNDS), stamps  # each round within one second of its own
    return [stamp.astimezone(datetime.UTC).isoformat() for stamp in stamps]


@pytest.fixture(scope="module")
def rounds(s3server: S3Server) -> tuple[str, list[str]]:
    """A versioned bucket with the rounds written (``write_rounds``), and their times: written
    once, in 2-3 s of waits for the next second, for the tests here, which only read it."""
    s3 = s3server.client()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket, write_rounds(s3, bucket)


def test_as_of_shows_each_round_exactly(cli: Cli, rounds: tuple[str, list[str]]) -> None:
    bucket, times = rounds
    for number, when in enumerate(times):
        mountpoint = cli.mount(f"s3://{bucket}/k/", str(cli.root / f"r{number}"), "--as-of", when)
        assert tree(mountpoint) == expected(number), f"as of round {number + 1} ({when})"
    naive = times[0].replace("+00:00", "")  # a time without a zone is UTC
    again = cli.mount(f"s3://{bucket}/k/", str(cli.root / "naive"), "--as-of", naive)
    assert tree(again) == expected(0)


def test_as_of_single_object_and_snapshot_record_the_time(
    cli: Cli, rounds: tuple[str, list[str]]
) -> None:
    bucket, times = rounds
    single = cli.mount(f"s3://{bucket}/k/a", str(cli.root / "a"), "--as-of", times[1])
    assert (single / "a").read_bytes() == b"A2"
    said = cli.run("mount", f"s3://{bucket}/k/", str(cli.root / "k"), "--as-of", times[1])
    assert said.returncode == 0, said.stderr
    assert f", as of {times[1].replace('+00:00', 'Z')}" in said.stdout  # which time it shows
    file = cli.root / "round1.gz"
    result = cli.run("snapshot", f"s3://{bucket}/k/", "-o", str(file), "--as-of", times[0])
    assert result.returncode == 0, result.stderr
    assert ", as of " in result.stdout
    then = cli.run("diff", str(file), f"s3://{bucket}/k/", "--as-of", times[0])
    assert then.returncode == 0, then.stdout + then.stderr  # the URI as of round 1 is the file
    mountpoint = cli.mount("--snapshot", str(file), str(cli.root / "from-file"))
    assert tree(mountpoint) == expected(0)
    warmed = cli.run("prefetch", f"s3://{bucket}/k/d/e", "--as-of", times[0])  # deleted since
    assert warmed.returncode == 0, warmed.stderr
    gone = cli.run("mount", f"s3://{bucket}/k/d/e", str(cli.root / "e"), "--as-of", times[2])
    assert gone.returncode == 1
    assert "no such object or prefix as of" in gone.stderr
