"""``mount-all`` and ``unmount --all`` end to end: the real command, FUSE mounts, moto on 127.0.0.1.

- Three datasets (an object, a prefix, an older version pinned by VersionId and ETag) land at
  the right names with the right bytes; a fourth that cannot mount leaves nothing mounted.
- Per-dataset credentials against a moto server that enforces IAM: each dataset can only be
  read with its own keys, and the keys appear in no process's command line or environment, not in
  the mount table, not in any log or file s3datafs wrote.
- ``unmount --all`` runs in a private mount namespace, so it cannot touch mounts of other
  processes on this machine (its own copies of them are all it may unmount).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from conftest import Cli, CliResult, checking_server, files_below, kernel_readahead_kb
from faultproxy import FaultProxy
from zipcraft import make_zip

from devtools.s3server import S3Server
from s3datafs import daemon, mounting, runtime
from s3datafs.cli import build_parser, main
from s3datafs.commands import mount_all, unmount
from s3datafs.datasets import DatasetSpec
from s3datafs.errors import S3DataFSError
from s3datafs.uri import parse_s3_uri

pytestmark = pytest.mark.fuse

TRAIN = {"train/a/1.txt": b"one\n", "train/b.bin": os.urandom(200_000), "train/c.txt": b""}


def run_cli(cli: Cli, *args: str, stdin: str | None = None, env: dict | None = None) -> CliResult:
    done = subprocess.run(
        [sys.executable, "-m", "s3datafs", *args],
        input=stdin if stdin is not None else "",
        env=env or cli.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


def read_tree(root: Path) -> dict[str, bytes]:
    found = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


@dataclass(frozen=True)
class Three:
    bucket: str
    spec: list[dict]
    expected: dict[str, dict[str, bytes]]  # dataset name -> relative path -> bytes


@pytest.fixture
def three(s3, make_bucket) -> Three:
    bucket = make_bucket(versioned=True)
    mnist = {"train/0.png": os.urandom(300_000), "labels.csv": b"0,5\n"}
    s3.put_object(Bucket=bucket, Key="sets/mnist.zip", Body=make_zip(mnist))
    for key, body in TRAIN.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    old = s3.put_object(Bucket=bucket, Key="models/weights.bin", Body=b"version one")
    s3.put_object(Bucket=bucket, Key="models/weights.bin", Body=b"version two!")
    spec = [
        {"uri": f"s3://{bucket}/sets/mnist.zip"},
        {"uri": f"s3://{bucket}/train/"},
        {
            "uri": f"s3://{bucket}/models/weights.bin",
            "name": "weights-v1",
            "version_id": old["VersionId"],
            "etag": old["ETag"].strip('"'),
        },
    ]
    expected = {
        "mnist": mnist,  # a zip mounts as its members
        "train": {key.removeprefix("train/"): body for key, body in TRAIN.items()},
        "weights-v1": {"weights.bin": b"version one"},
    }
    return Three(bucket, spec, expected)


def assert_nothing_left(cli: Cli) -> None:
    assert cli.mounts_below_root() == []
    assert not list((cli.root / "run").glob("*.json")), "a state file survived"
    assert not cli.data_root.exists() or not any(cli.data_root.iterdir())


def test_mount_all_mounts_every_dataset_at_its_name(cli: Cli, three: Three) -> None:
    spec_file = cli.root / "datasets.yaml"
    spec_file.write_text(json.dumps(three.spec))  # JSON is YAML too
    result = run_cli(cli, "mount-all", str(spec_file))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert sorted(os.listdir(cli.data_root)) == ["mnist", "train", "weights-v1"]
    for name, files in three.expected.items():
        assert os.path.ismount(cli.data_root / name)
        assert read_tree(cli.data_root / name) == files
    status = json.loads(run_cli(cli, "status", "--json").stdout)
    assert {row["uri"] for row in status} >= {item["uri"] for item in three.spec}
    # One command line for all three daemons; their names tell them apart (15 bytes at most).
    names = {Path(row["mountpoint"]).name: Path(f"/proc/{row['pid']}/comm").read_text().strip()
             for row in status if Path(row["mountpoint"]).parent == cli.data_root}
    assert names == {"mnist": "s3datafs/mnist", "train": "s3datafs/train",
                     "weights-v1": "s3datafs/weight"}


def test_the_daemons_share_the_serving_modules_their_command_loaded(
    cli: Cli, three: Three
) -> None:
    """Three daemons, one import of pyfuse3 and trio: the command's, before its first fork
    (``mounting.load_serving_modules``), which each daemon inherits instead of importing them
    again (it was once per daemon). ``-X importtime`` has every process say what it imports."""
    env = {**cli.env, "PYTHONPROFILEIMPORTTIME": "1"}
    result = run_cli(cli, "mount-all", "-", stdin=json.dumps(three.spec), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert [imported.count(name) for name in ("pyfuse3", "trio", "s3datafs.fuse_ops")] == [1] * 3
    for name, files in three.expected.items():
        assert read_tree(cli.data_root / name) == files


def test_what_the_command_made_is_frozen_before_each_daemon_is_forked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A collection, in the command or in a daemon, would write to every object the command
    made since its last freeze, and the daemons would share those pages no more."""
    made = [["made by the command"]]
    collectable_at_fork: list[bool] = []

    def mount_one(item: mount_all.PlannedDataset, *_args: object) -> mount_all.MountedDataset:
        collectable_at_fork.append(any(obj is made[-1] for obj in gc.get_objects()))
        made.append([item.spec.name])  # made after this fork, before the next
        return mount_all.MountedDataset(item, {"pid": 0}, None)

    monkeypatch.setattr(mount_all, "_mount_one", mount_one)
    monkeypatch.setattr(mount_all, "_log_to", lambda *_args: None)
    monkeypatch.setattr(mounting, "load_serving_modules", lambda: None)  # not this test's
    specs = [DatasetSpec(n, parse_s3_uri(f"s3://my-bucket/{n}/"), f"d{n}") for n in (1, 2)]
    planned = [mount_all.PlannedDataset(spec, plan=None) for spec in specs]
    mount_all.mount_datasets(planned, argparse.Namespace(), types.SimpleNamespace(received=[]),
                             outlive_command=False)
    assert collectable_at_fork == [False, False]


def test_a_failing_fourth_dataset_leaves_nothing_mounted(cli: Cli, three: Three) -> None:
    broken = {"uri": three.spec[0]["uri"], "name": "broken", "etag": "0" * 32}
    result = run_cli(cli, "mount-all", "-", stdin=json.dumps([*three.spec, broken]))
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("s3datafs: dataset 'broken': ETag mismatch")
    # The spec's words for its pins, the one it did not give too: mount-all has no such option.
    assert "the object changed, or 'etag'/'versionId' is wrong" in line
    assert "unmounted 'mnist', 'train', 'weights-v1' again" in line
    assert_nothing_left(cli)


def test_a_pin_that_s3_refuses_is_named_as_the_spec_names_it(cli: Cli, three: Three) -> None:
    missing = {"uri": three.spec[2]["uri"], "name": "gone", "versionId": "no-such-version"}
    result = run_cli(cli, "mount-all", "-", stdin=json.dumps([missing]))
    assert result.returncode == 1
    assert result.stderr.endswith("does not exist: check 'versionId'\n"), result.stderr
    assert_nothing_left(cli)


def test_a_rollback_removes_every_directory_mounting_made(cli: Cli, three: Three) -> None:
    """A data root two levels missing is made for the first mount; a later failure takes
    all of it away again, not just the mount points."""
    data_root = cli.root / "made" / "for" / "data"
    broken = {"uri": three.spec[0]["uri"], "name": "broken", "etag": "0" * 32}
    result = run_cli(cli, "mount-all", "-", "--data-root", str(data_root),
                     stdin=json.dumps([*three.spec, broken]))
    assert result.returncode == 1
    assert "unmounted 'mnist', 'train', 'weights-v1' again" in result.stderr
    assert cli.mounts_below_root() == []
    assert not (cli.root / "made").exists()


def test_two_snapshots_of_one_name_are_refused_before_anything_mounts(
    cli: Cli, s3, s3server: S3Server, make_bucket
) -> None:
    """A snapshot's dataset name is in the file, so only known once planned: two of one name
    would share a mount point."""
    bucket = make_bucket()
    for key in ("p/a.txt", "q/b.txt"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    specs = cli.root / "specs"
    specs.mkdir()
    for prefix in ("p", "q"):
        made = run_cli(cli, "snapshot", f"s3://{bucket}/{prefix}/", "-o",
                       str(specs / f"{prefix}.snap"), "--name", "same")
        assert made.returncode == 0, made.stderr
    spec = json.dumps([{"uri": f"s3://{bucket}/{prefix}/", "snapshot": f"{prefix}.snap"}
                       for prefix in ("p", "q")])
    before = sum(s3server.ops().values())
    (specs / "datasets.json").write_text(spec)  # snapshot paths are relative to the spec
    result = run_cli(cli, "mount-all", str(specs / "datasets.json"))
    assert result.returncode == 2
    assert result.stderr == (f"s3datafs: datasets #1 and #2 would both mount at "
                             f"{cli.data_root / 'same'}: give one of them another 'name'\n")
    assert_nothing_left(cli)
    assert sum(s3server.ops().values()) == before


def mount_two_stalling_the_second(
    cli: Cli, s3, make_bucket, proxy: FaultProxy, **popen
) -> subprocess.Popen:
    """``mount-all`` of two datasets, started; the second's listing stalls until
    ``proxy.clear()``, so once ``proxy.wait_injected(2)`` the first is mounted and the second
    under way."""
    bucket = make_bucket()
    for key in ("a/x.bin", "b/y.bin"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    proxy.inject("delay", op="ListObjectsV2", seconds=0, times=1)  # the first dataset's list
    proxy.inject("stall", op="ListObjectsV2", times=1)  # the second's, until released
    spec = cli.root / "datasets.json"
    spec.write_text(json.dumps([{"uri": f"s3://{bucket}/a/"}, {"uri": f"s3://{bucket}/b/"}]))
    return subprocess.Popen(
        [sys.executable, "-m", "s3datafs", "mount-all", str(spec)], stdin=subprocess.DEVNULL,
        env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint}, **popen,
    )


def test_a_stop_signal_during_the_last_mount_unmounts_everything(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    """Signals wait while a daemon mounts; one that came during the last mount is still
    honoured once it is ready: all unmounted again, and 128 + the signal's number."""
    command = mount_two_stalling_the_second(cli, s3, make_bucket, proxy, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
    try:
        proxy.wait_injected(2, timeout=30)  # the second mount is under way
        command.send_signal(signal.SIGTERM)
        proxy.clear()  # it finishes
        out, err = command.communicate(timeout=60)
    finally:
        command.kill()
        command.wait()
    assert command.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == "s3datafs: interrupted by SIGTERM: nothing left mounted"
    assert out == ""
    assert_nothing_left(cli)


def test_a_command_killed_outright_while_mounting_leaves_nothing_mounted(
    cli: Cli, s3, make_bucket, proxy: FaultProxy
) -> None:
    """All or nothing holds when the command cannot undo what it did (SIGKILL, the OOM killer, a
    time limit): the daemons are held until every dataset has mounted, and unmount themselves
    when the command dies first, taking the directories made for them too."""
    cli.expect_log("the command that mounted this .* is gone: unmounting")  # the first's
    cli.expect_log("the mount command is gone: unmounting what nobody waits for")  # the second's
    command = mount_two_stalling_the_second(cli, s3, make_bucket, proxy,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proxy.wait_injected(2, timeout=30)  # the first is mounted, the second under way
        assert os.path.ismount(cli.data_root / "a")
        command.kill()
        command.wait()
        proxy.clear()
        cli.wait_until_nothing_is_mounted(timeout=30)
    finally:
        command.kill()
        command.wait()
    deadline = time.monotonic() + 10  # each daemon removes its directories as it ends
    while cli.data_root.exists() and any(cli.data_root.iterdir()):
        assert time.monotonic() < deadline, list(cli.data_root.iterdir())
        time.sleep(0.05)
    assert_nothing_left(cli)


def test_a_daemon_that_fails_after_its_ready_report_exits() -> None:
    """The report went out (its pipe is closed): the failure is the log's, and the daemon ends
    (a second report on the closed pipe raised out of the forked child, which then ran on in
    its command's code)."""

    def ready_then_fail(report: daemon.Report) -> None:
        report({"pid": os.getpid()})
        raise S3DataFSError("failed while serving")

    command = os.getpid()
    try:
        verdict = daemon.spawn(ready_then_fail, log_hint="(test)")
    finally:
        if os.getpid() != command:  # the daemon must never go on in pytest's code
            os._exit(3)
    assert verdict["ok"]
    _pid, status = os.waitpid(verdict["pid"], 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_a_held_daemon_that_dies_during_start_leaves_no_pipe_open() -> None:
    """A held daemon's pipe is closed however its start ends: a failure it reports, or its
    death before any report (the command would hold the pipe's end to the end otherwise, and
    ``mount-all`` run in process - the tests - gathered one per such death)."""
    before = dict(daemon._HELD)
    verdict = daemon.spawn(lambda report: os._exit(0), log_hint="(test)", held=True)
    assert not verdict["ok"]
    assert "died during start" in verdict["error"]
    assert before == daemon._HELD


def test_each_dataset_gets_the_kernel_readahead_its_spec_asks_for(
    cli: Cli, s3, make_bucket
) -> None:
    """A dataset read through ``mmap`` at random wants 128K, one read in order 1M or more: one
    spec, one ``mount-all``, each mount's backing device set as its dataset says."""
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="db/data.mdb", Body=b"lmdb")
    s3.put_object(Bucket=bucket, Key="shards/0.tar", Body=b"tar")
    spec_file = cli.root / "datasets.yaml"
    spec_file.write_text(f"- {{uri: s3://{bucket}/db/, kernelReadahead: 128K}}\n"
                         f"- {{uri: s3://{bucket}/shards/}}\n")
    result = run_cli(cli, "mount-all", "--kernel-readahead", "4M", str(spec_file))
    assert result.returncode == 0, result.stderr
    assert kernel_readahead_kb(cli.data_root / "db") == "128"
    assert kernel_readahead_kb(cli.data_root / "shards") == "4096"  # the command's, as default
    assert (cli.data_root / "db" / "data.mdb").read_bytes() == b"lmdb"


def test_snapshot_and_as_of_fields_reach_the_mount(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket(versioned=True)
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"recorded\n")
    snapshot = cli.root / "specs" / "p.jsonl.gz"
    snapshot.parent.mkdir()
    made = run_cli(cli, "snapshot", f"s3://{bucket}/p/", "-o", str(snapshot))
    assert made.returncode == 0, made.stderr
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"overwritten\n")
    spec_file = snapshot.parent / "datasets.yaml"
    future = f"- {{uri: s3://{bucket}/p/, name: later, asOf: '2999-01-01'}}\n"
    spec_file.write_text(future)
    refused = run_cli(cli, "mount-all", str(spec_file))
    assert refused.returncode == 2
    assert refused.stderr.startswith("s3datafs: dataset 'later': ")
    assert "future" in refused.stderr
    spec_file.write_text(f"- {{uri: s3://{bucket}/p/, name: later}}\n")
    command_wide = run_cli(cli, "mount-all", "--as-of", "2999-01-01", str(spec_file))
    assert command_wide.returncode == 2  # a default for every dataset, not dropped
    assert "future" in command_wide.stderr
    spec_file.write_text(f"- {{uri: s3://{bucket}/p/, snapshot: p.jsonl.gz}}\n")  # relative
    result = run_cli(cli, "mount-all", str(spec_file))
    assert result.returncode == 0, result.stderr
    assert (cli.data_root / "p" / "a.txt").read_bytes() == b"recorded\n"


BAD_SPECS = [
    pytest.param((), "- {uri: s3://b-1/x, verson_id: v}", "did you mean 'version_id'", id="typo"),
    pytest.param(("--etag", "abc"), "[]", "--etag describes a single dataset", id="global-etag"),
    pytest.param(("--uid", "x"), "- uri: s3://b-1/x", "dataset 'x': --uid 'x' is not", id="uid"),
    pytest.param((), "[{uri: s3://b-1/x", "line 1, column 18", id="syntax"),
    # A value the spec gives is refused by its field's name, not by the option's (the
    # command's own option, the default of every dataset, is named as the option).
    pytest.param((), "- {uri: s3://b-1/x, kernelReadahead: 3K}",
                 "dataset 'x': 'kernelReadahead' '3K' must be a multiple of 4K", id="readahead"),
    pytest.param((), "- {uri: s3://b-1/x, kernel_readahead: lots}",
                 "dataset 'x': 'kernelReadahead' 'lots' is not a size", id="readahead-size"),
    pytest.param(("--kernel-readahead", "3K"), "- {uri: s3://b-1/x}",
                 "dataset 'x': --kernel-readahead '3K' must be", id="readahead-option"),
    pytest.param((), "- {uri: s3://b-1/x, archive: tar}",
                 "dataset 'x': 'archive' 'tar' is not one of auto, zip, file", id="archive"),
    pytest.param((), "- {uri: s3://b-1/x, asOf: yesterday}",
                 "dataset 'x': 'asOf' 'yesterday' is not a time: use ISO 8601", id="as-of"),
    pytest.param((), "- {uri: s3://b-1/x, asOf: '2999-01-01'}",
                 "dataset 'x': 'asOf' '2999-01-01' is in the future", id="as-of-future"),
    pytest.param((), "- {uri: s3://b-1/x, region: 'us east'}",
                 "dataset 'x': 'region' 'us east' is not a region name: use one such as us-east-1",
                 id="region"),
    pytest.param((), "[{uri: s3://b-1/x}, {uri: s3://b-1/y, region: 'us east'}]",  # plans first:
                 "dataset 'y': 'region' 'us east'", id="region-second"),  # x is not mounted
    pytest.param((), "- {uri: s3://b-1/x, endpointUrl: 'no url'}",
                 "dataset 'x': 'endpointUrl' 'no url' is not an endpoint URL", id="endpoint"),
    pytest.param(("--endpoint-url", "no url"), "- {uri: s3://b-1/x}",
                 "dataset 'x': --endpoint-url 'no url' is not an endpoint URL",
                 id="endpoint-option"),
]


@pytest.mark.parametrize(("args", "spec", "fragment"), BAD_SPECS)
def test_bad_specs_mount_nothing_and_contact_nothing(
    cli: Cli, s3server: S3Server, args: tuple[str, ...], spec: str, fragment: str
) -> None:
    before = sum(s3server.ops().values())
    result = run_cli(cli, "mount-all", "-", *args, stdin=spec)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert fragment in line
    assert "Traceback" not in result.stderr
    assert_nothing_left(cli)
    assert sum(s3server.ops().values()) == before, "a bad spec reached S3"


def test_an_unusable_log_directory_is_the_commands_problem_not_a_datasets(
    cli: Cli, s3server: S3Server, three: Three
) -> None:
    """Every dataset logs into the one directory: said once, before anything is mounted (it
    was said as the first dataset's, 'dataset 'mnist': cannot use log directory ...')."""
    before = sum(s3server.ops().values())
    result = run_cli(cli, "mount-all", "-", stdin=json.dumps(three.spec),
                     env={**cli.env, "S3DATAFS_LOG_DIR": "/proc/nope"})
    assert (result.returncode, result.stderr) == (1, (
        "s3datafs: cannot use log directory /proc/nope: No such file or directory: choose "
        "another with --log-file or S3DATAFS_LOG_DIR\n"))
    assert_nothing_left(cli)
    assert sum(s3server.ops().values()) == before


def in_a_private_mount_namespace(cli: Cli, script: str) -> dict:
    """Run ``script`` (Python that prints one JSON line) in a mount namespace of its own, so
    ``unmount --all`` there sees only its mounts; its report."""
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        env=cli.env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_unmount_all_unmounts_every_s3datafs_mount(cli: Cli, three: Three) -> None:
    """In a private mount namespace: what ``--all`` sees there is ours, or copies of others'."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a private mount namespace")
    spec = json.dumps(three.spec[:2])
    script = f"""
import json, os, subprocess, sys
def s3datafs(*args):
    return subprocess.run([sys.executable, "-m", "s3datafs", *args], input={spec!r},
                          capture_output=True, text=True)
mounted = s3datafs("mount-all", "-")
before = [os.path.ismount(p) for p in {[str(cli.data_root / n) for n in ("mnist", "train")]!r}]
try:
    result = s3datafs("unmount", "--all")
finally:
    for name in ("mnist", "train"):
        subprocess.run(["fusermount3", "-u", "-z", {str(cli.data_root)!r} + "/" + name],
                       capture_output=True)
left = [line for line in open("/proc/self/mountinfo") if " fuse.s3datafs " in line]
print(json.dumps({{"mount": mounted.returncode, "stderr": mounted.stderr + result.stderr,
                  "before": before, "unmount": result.returncode, "left": left}}))
"""
    report = in_a_private_mount_namespace(cli, script)
    assert report["mount"] == 0, report["stderr"]
    assert report["before"] == [True, True]
    assert report["unmount"] == 0, report["stderr"]
    assert report["left"] == []
    assert not list((cli.root / "run").glob("*.json")), "unmount --all left a daemon's state"


def test_unmount_all_reports_a_busy_mount_and_unmounts_the_others(cli: Cli, three: Three) -> None:
    """A file held open on the mount ``--all`` meets first: that one is said to be busy (and
    what to do), the command goes on to the others and exits 1, and nothing waits. In a private
    mount namespace: ``--all`` there sees ours, and copies of the machine's that only the
    namespace loses (only our lines are looked at)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a private mount namespace")
    points = [str(cli.data_root / name) for name in ("mnist", "train", "weights-v1")]
    spec = json.dumps(three.spec)
    script = f"""
import json, os, subprocess, sys, time
def s3datafs(*args):
    return subprocess.run([sys.executable, "-m", "s3datafs", *args], input={spec!r},
                          capture_output=True, text=True, timeout=60)
points = {points!r}
mounted = s3datafs("mount-all", "-")
held = open(os.path.join(points[-1], "weights.bin"), "rb")  # the newest: --all meets it first
try:
    began = time.monotonic()
    result = s3datafs("unmount", "--all")
    took = time.monotonic() - began
    left = [os.path.ismount(p) for p in points]
    read = held.read()
finally:
    held.close()
    for path in points:
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
print(json.dumps({{"mount": mounted.returncode, "stderr": mounted.stderr + result.stderr,
                  "unmount": result.returncode, "took": took, "left": left,
                  "read": read.decode()}}))
"""
    report = in_a_private_mount_namespace(cli, script)
    assert report["mount"] == 0, report["stderr"]
    ours = [line for line in report["stderr"].splitlines() if str(cli.root) in line]
    assert ours == [f"s3datafs: {points[-1]} is busy: close the files using it, or use --lazy"]
    assert report["unmount"] == 1
    assert report["left"] == [False, False, True]  # the others unmounted, the busy one served
    assert report["read"] == "version one"
    assert report["took"] < 20  # no wait for the busy one's daemon (the command waits 30 s)


def test_unmount_all_if_dead_clears_the_dead_mounts_and_leaves_the_live_ones(
    cli: Cli, three: Three
) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a private mount namespace")
    spec = json.dumps(three.spec[:2])
    mnist, train = str(cli.data_root / "mnist"), str(cli.data_root / "train")
    script = f"""
import json, os, signal, subprocess, sys, time
def s3datafs(*args):
    return subprocess.run([sys.executable, "-m", "s3datafs", *args], input={spec!r},
                          capture_output=True, text=True)
mounted = s3datafs("mount-all", "-")
rows = json.loads(s3datafs("status", "--json").stdout)
os.kill(next(r["pid"] for r in rows if r["mountpoint"] == {mnist!r}), signal.SIGKILL)
time.sleep(0.5)  # the kernel ends its connection: a dead mount
try:
    result = s3datafs("unmount", "--all", "--if-dead")
    left = [os.path.ismount(p) for p in ({mnist!r}, {train!r})]
finally:
    for path in ({mnist!r}, {train!r}):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
print(json.dumps({{"mount": mounted.returncode, "stderr": mounted.stderr + result.stderr,
                  "unmount": result.returncode, "out": result.stdout, "left": left}}))
"""
    report = in_a_private_mount_namespace(cli, script)
    assert report["mount"] == 0, report["stderr"]
    assert report["unmount"] == 0, report["stderr"]
    assert report["left"] == [False, True]  # the dead one cleared, the live one left
    ours = [line for line in report["out"].splitlines() if str(cli.root) in line]  # the
    # namespace holds a copy of every mount of the machine's, other runs' too
    assert ours == [f"s3datafs: {train} is served by a live daemon: left as it is"]


def test_unmount_all_unmounts_a_mount_nested_in_another_first(cli: Cli, s3, make_bucket) -> None:
    """A mount on an empty directory of another (a zip's directory entry) keeps that one busy
    until it is gone: ``--all`` unmounts the newest first, and leaves nothing mounted."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a private mount namespace")
    bucket = make_bucket()
    body = make_zip({"a.txt": b"a"}, directories=["empty/"])
    s3.put_object(Bucket=bucket, Key="outer.zip", Body=body)
    s3.put_object(Bucket=bucket, Key="inner/b.txt", Body=b"b")
    outer = cli.data_root / "outer"
    script = f"""
import json, os, subprocess, sys
def s3datafs(*args):
    return subprocess.run([sys.executable, "-m", "s3datafs", *args], capture_output=True,
                          text=True)
outer = {str(outer)!r}
mounted = [s3datafs("mount", "s3://{bucket}/outer.zip", outer),
           s3datafs("mount", "s3://{bucket}/inner/", outer + "/empty")]
try:
    result = s3datafs("unmount", "--all")
finally:
    for path in (outer + "/empty", outer):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
left = [line for line in open("/proc/self/mountinfo") if " fuse.s3datafs " in line]
print(json.dumps({{"mount": [m.returncode for m in mounted],
                  "stderr": "".join(m.stderr for m in mounted) + result.stderr,
                  "unmount": result.returncode, "left": left}}))
"""
    report = in_a_private_mount_namespace(cli, script)
    assert report["mount"] == [0, 0], report["stderr"]
    assert (report["unmount"], report["left"]) == (0, []), report["stderr"]


def test_an_unmount_that_fails_because_the_mount_went_meanwhile_succeeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another unmount got there first (systemd, a second ``unmount``): what was asked is done,
    so it is no error, and the state file goes."""
    monkeypatch.setenv("S3DATAFS_RUNTIME_DIR", str(tmp_path / "run"))
    target = str(tmp_path / "m")
    table = [runtime.MountEntry(target, runtime.FSTYPE, "s3://b-1/p/")]
    monkeypatch.setattr(runtime, "mount_table", lambda: list(table))

    def beaten_to_it(mountpoint: str, lazy: bool) -> str:
        table.clear()
        return "entry not found"

    monkeypatch.setattr(unmount, "_unmount", beaten_to_it)
    runtime.write_state(target, {"pid": 0})
    unmount.unmount_path(target, lazy=False)
    assert runtime.read_state(target) is None


def test_unmount_needs_a_mount_point_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["unmount"]) == 2
    assert "required: mountpoint (or --all)" in capsys.readouterr().err
    assert main(["unmount", "--all", "/data/x"]) == 2
    assert "give either MOUNTPOINT or --all, not both" in capsys.readouterr().err


# -- per-dataset credentials, against a moto server that enforces IAM -------------------------


@dataclass(frozen=True)
class Keys:
    key_id: str
    secret: str


@dataclass(frozen=True)
class IamWorld:
    server: S3Server
    buckets: dict[str, str]  # user -> the bucket only that user may read
    keys: dict[str, Keys]  # user -> keys


def _policy(bucket: str) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:*",
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        }
    )


@pytest.fixture(scope="module")
def iam_world() -> Iterator[IamWorld]:
    """An admin bootstraps in the three unauthenticated requests; then two users, a bucket each."""
    with checking_server() as (server, admin):
        iam, s3 = boto3.client("iam", **admin), boto3.client("s3", **admin)
        buckets, keys = {}, {}
        for user in ("alice", "bob"):
            bucket = f"{user}-{uuid.uuid4().hex[:12]}"
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=f"{user}.txt", Body=f"{user}'s data\n".encode())
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="own", PolicyDocument=_policy(bucket))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            buckets[user], keys[user] = bucket, Keys(key["AccessKeyId"], key["SecretAccessKey"])
        yield IamWorld(server, buckets, keys)


def _keyed_spec(world: IamWorld, keys_of: dict[str, str]) -> list[dict]:
    return [
        {
            "uri": f"s3://{world.buckets[user]}/{user}.txt",
            "endpointUrl": world.server.endpoint,
            "aws_access_key_id": world.keys[keys_of[user]].key_id,
            "aws_secret_access_key": world.keys[keys_of[user]].secret,
        }
        for user in ("alice", "bob")
    ]


def _daemon_pids(cli: Cli) -> list[int]:
    return [json.loads(path.read_text())["pid"] for path in (cli.root / "run").glob("*.json")]


def _proc_texts(name: str) -> Iterator[tuple[str, bytes]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                yield entry.name, Path(entry.path, name).read_bytes()
            except OSError:
                continue


def test_each_dataset_uses_its_own_keys_and_they_leak_nowhere(
    cli: Cli, iam_world: IamWorld
) -> None:
    spec_file = cli.root / "keyed.json"
    spec_file.write_text(json.dumps(_keyed_spec(iam_world, {"alice": "alice", "bob": "bob"})))
    spec_file.chmod(0o600)
    result = run_cli(cli, "mount-all", str(spec_file), "--verbose")
    assert result.returncode == 0, result.stderr
    assert (cli.data_root / "alice" / "alice.txt").read_bytes() == b"alice's data\n"
    assert (cli.data_root / "bob" / "bob.txt").read_bytes() == b"bob's data\n"

    secrets = [value.encode() for k in iam_world.keys.values() for value in (k.key_id, k.secret)]
    daemons = _daemon_pids(cli)
    assert len(daemons) == 2
    for pid, cmdline in _proc_texts("cmdline"):
        assert not any(secret in cmdline for secret in secrets), f"a key is in pid {pid}'s argv"
    for pid in daemons:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(secret in environ for secret in secrets), "a key is in a daemon's env"
    mountinfo = Path("/proc/self/mountinfo").read_bytes()
    assert not any(secret in mountinfo for secret in secrets)
    assert not any(secret.decode() in result.stdout + result.stderr for secret in secrets)
    written = list(files_below(cli.root, besides=[spec_file]))
    assert any(path.suffix == ".log" for path, _content in written)
    for path, content in written:
        assert not any(secret in content for secret in secrets), f"a key is in {path}"


def test_keys_of_another_dataset_are_refused_and_nothing_stays(
    cli: Cli, iam_world: IamWorld
) -> None:
    swapped = _keyed_spec(iam_world, {"alice": "alice", "bob": "alice"})
    result = run_cli(cli, "mount-all", "-", stdin=json.dumps(swapped))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("s3datafs: dataset 'bob': access denied")
    assert "(unmounted 'alice' again)" in line
    assert_nothing_left(cli)


@pytest.mark.parametrize(("command", "hidden"), [
    ("mount-all", ["--name", "--version-id", "--etag", "--snapshot", "--save-snapshot",
                   "--expect-fingerprint"]),
    ("run", ["--name", "--version-id", "--save-snapshot", "--foreground"]),
    ("prefetch", ["--name", "--data-root", "--prefetch-files"]),
    ("snapshot", ["--data-root"]),
])
def test_help_leaves_out_the_options_a_command_refuses_or_ignores(
    command: str, hidden: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = capsys.readouterr().out
    assert "--endpoint-url" in shown
    assert not [option for option in hidden if f"{option} " in shown or f"{option}\n" in shown]


def test_log_file_dash_leaves_the_working_directory_unchecked(cli: Cli, three: Three) -> None:
    """``--log-file -``: the log is standard error, and the directory the command runs in is
    no log directory (a job's working directory may be one others can write)."""
    work = cli.root / "shared-work"
    work.mkdir()
    work.chmod(0o777)
    (work / "input.txt").write_text("the job's")
    spec = cli.root / "one.json"
    spec.write_text(json.dumps(three.spec[1:2]))
    log = cli.root / "stderr.log"  # the daemon keeps it: no pipe, whose end would wait for it
    with open(log, "w") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "s3datafs", "mount-all", str(spec), "--log-file", "-"],
            env=cli.env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, timeout=60, check=False)
    try:
        assert result.returncode == 0, log.read_text()
        assert os.path.ismount(cli.data_root / "train")
        assert stat.S_IMODE(work.stat().st_mode) == 0o777  # left as it is
    finally:
        for point in cli.mounts_below_root():
            assert cli.unmount(Path(point)).returncode == 0


def test_a_datasets_own_fields_win_over_the_commands_options() -> None:
    """What a dataset says for itself (region, endpoint, archive, a version pin, its own keys)
    wins; the command's options are the defaults of every dataset that says nothing."""
    args = build_parser(["mount-all"]).parse_args(
        ["mount-all", "spec.json", "--region", "eu-west-1", "--endpoint-url", "http://all",
         "--archive", "file", "--as-of", "1h", "--profile", "p", "--no-sign-request",
         "--requester-pays", "--kernel-readahead", "4M"])
    own = DatasetSpec(1, parse_s3_uri("s3://my-bucket/x.zip"), "x", version_id="v1",
                      endpoint_url="http://own", region="us-east-2", archive="zip",
                      access_key_id="AKID", secret_access_key="secret", requester_pays=False,
                      kernel_readahead="128K")
    got = mount_all.dataset_args(own, args)
    assert (got.region, got.endpoint_url, got.archive) == ("us-east-2", "http://own", "zip")
    assert got.kernel_readahead == "128K"
    assert (got.version_id, got.as_of) == ("v1", None)  # its own pin, not the command's time
    assert (got.profile, got.no_sign_request) == (None, False)  # its own keys, signed
    assert got.requester_pays is False
    plain = mount_all.dataset_args(DatasetSpec(2, parse_s3_uri("s3://my-bucket/y/"), "y"), args)
    assert (plain.region, plain.endpoint_url, plain.archive) == ("eu-west-1", "http://all", "file")
    assert plain.kernel_readahead == "4M"
    assert (plain.as_of, plain.profile, plain.no_sign_request) == ("1h", "p", True)
    assert plain.requester_pays is True
    pinned = DatasetSpec(3, parse_s3_uri("s3://my-bucket/z/"), "z", snapshot=Path("z.snap"))
    assert mount_all.dataset_args(pinned, args).name is None  # the file's own name applies
    signed = DatasetSpec(4, parse_s3_uri("s3://my-bucket/w/"), "w", no_sign_request=False)
    assert mount_all.dataset_args(signed, args).no_sign_request is False  # without keys too


def test_a_spec_that_lists_no_datasets_mounts_nothing_and_is_no_error(cli: Cli) -> None:
    """``datasets: []`` (every dataset commented out, say) is not a failure of the job."""
    spec = cli.root / "none.json"
    spec.write_text('{"datasets": []}')
    result = cli.run("mount-all", str(spec))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "s3datafs: the datasets spec lists no datasets: nothing to mount\n"


def test_the_lock_on_a_mount_point_refuses_a_second_command_and_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """POSIX locks are per process: the second command is another process."""
    monkeypatch.setenv("S3DATAFS_RUNTIME_DIR", str(tmp_path / "run"))
    second = ("from s3datafs import runtime\n"
              "with runtime.mounting('/data/m'):\n"
              "    print('mounting')\n")
    with runtime.mounting("/data/m"):
        refused = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True,
                                 env=os.environ, check=False)
        assert "/data/m: another s3datafs mount there is under way" in refused.stderr
    assert not list((tmp_path / "run").glob("*.lock"))  # one per mount point would pile up
    done = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True,
                          env=os.environ, check=True)
    assert done.stdout == "mounting\n"


def test_a_lock_file_its_holder_removed_meanwhile_is_taken_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("S3DATAFS_RUNTIME_DIR", str(tmp_path / "run"))
    lockf = runtime.fcntl.lockf
    taken: list[int] = []

    def holder_finished_first(fd: int, operation: int) -> None:
        if not taken:  # the holder removed the file just before this lock was granted
            runtime.state_path("/data/m").with_suffix(".lock").unlink()
        taken.append(os.fstat(fd).st_ino)
        lockf(fd, operation)

    monkeypatch.setattr(runtime.fcntl, "lockf", holder_finished_first)
    with runtime.mounting("/data/m"):
        path = runtime.state_path("/data/m").with_suffix(".lock")
        assert len(taken) == 2  # the file at the path is the one locked
        assert path.stat().st_ino == taken[-1]
