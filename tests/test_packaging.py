"""packaging/: systemd units verified by systemd itself, examples that our own parsers accept,
and the container entrypoint's command line. Nothing here mounts."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s3datafs.cli import build_parser
from s3datafs.config import default_log_dir
from s3datafs.datasets import parse_specs
from s3datafs.mount_helper import translate_options

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
SYSTEMD = PACKAGING / "systemd"
REPO = PACKAGING.parent


def _unit_option(unit: Path, key: str) -> str:
    for line in unit.read_text().splitlines():
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{unit.name} has no {key}=")


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def verifiable(tmp_path: Path):
    """Copy a unit to tmp_path under ``name``, pointing its commands at this s3datafs."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): cannot verify")
    command = shutil.which("s3datafs") or str(Path(sys.executable).parent / "s3datafs")

    def copy(source: str, name: str) -> Path:
        text = (SYSTEMD / source).read_text().replace("/usr/local/bin/s3datafs", command)
        target = tmp_path / name
        target.write_text(text)
        return target

    return copy


def test_the_mount_unit_passes_systemd_analyze_verify(verifiable) -> None:
    unit = verifiable("data-mnist.mount", "data-mnist.mount")
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # the check has teeth: a unit named for another mount point is refused
    wrong = verifiable("data-mnist.mount", "data-other.mount")
    assert _verify(wrong).returncode != 0


def test_the_template_service_passes_systemd_analyze_verify(verifiable) -> None:
    unit = verifiable("s3datafs@.service", "s3datafs@data-mnist.service")
    done = _verify(unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert _unit_option(unit, "Type") == "notify"


def test_unit_names_are_escaped_mount_points() -> None:
    mount = SYSTEMD / "data-mnist.mount"
    if shutil.which("systemd-escape"):
        where = _unit_option(mount, "Where")
        escaped = subprocess.run(
            ["systemd-escape", "--path", "--suffix=mount", where],
            capture_output=True,
            text=True,
            check=True,
        )
        assert escaped.stdout.strip() == mount.name


def test_example_options_are_accepted_by_the_helper_and_the_mount_command() -> None:
    translate_options(_unit_option(SYSTEMD / "data-mnist.mount", "Options"))
    for line in (SYSTEMD / "fstab.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            source, target, fstype, options, *_ = line.split()
            assert fstype == "s3datafs"
            translate_options(options)
    env = dict(
        line.split("=", 1)
        for line in (SYSTEMD / "data-mnist.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    options = shlex.split(env["S3DATAFS_OPTIONS"])
    args = build_parser().parse_args(["mount", env["S3DATAFS_URI"], "/data/mnist", *options])
    assert args.version_id
    assert args.allow_other


def test_the_kubernetes_example_is_consistent() -> None:
    documents = list(yaml.safe_load_all((PACKAGING / "kubernetes" / "pod.yaml").read_text()))
    by_kind = {document["kind"]: document for document in documents if document}
    specs = parse_specs(by_kind["ConfigMap"]["data"]["datasets.yaml"], origin="configmap")
    assert [spec.name for spec in specs] == ["mnist", "imagenet", "glue"]
    assert "[default]" in by_kind["Secret"]["stringData"]["credentials"]
    (container,) = by_kind["Pod"]["spec"]["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["S3DATAFS_DATASETS_FILE"] == f"{mounts['datasets']}/datasets.yaml"
    assert env["S3DATAFS_CREDENTIALS_FILE"] == f"{mounts['credentials']}/credentials"
    assert container["securityContext"]["privileged"] is True
    run = build_parser().parse_args(["run", *env["S3DATAFS_OPTIONS"].split(), "--", "job"])
    assert run.log_file == Path("-")  # the entrypoint splits the options at blanks


def test_the_dockerfile_copies_what_exists() -> None:
    dockerfile = (PACKAGING / "container" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    entrypoint = PACKAGING / "container" / "entrypoint.sh"
    assert entrypoint.stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        pytest.param({}, ["job", "a b"], id="no-spec-runs-the-job"),
        pytest.param(
            {"S3DATAFS_DATASETS": "- uri: s3://b-1/x"}, ["run", "--", "job", "a b"], id="env-spec"
        ),
        pytest.param(
            {"file": "datasets.yaml"},
            ["run", "--datasets", "{config}/datasets.yaml", "--", "job", "a b"],
            id="config-spec",
        ),
        pytest.param(
            {"file": "datasets.json", "credentials": True},
            [
                "run",
                "--datasets",
                "{config}/datasets.json",
                "--credentials-file",
                "{config}/credentials/credentials",
                "--",
                "job",
                "a b",
            ],
            id="config-spec-and-credentials",
        ),
        pytest.param(
            {"S3DATAFS_DATASETS": "[]", "S3DATAFS_OPTIONS": " --allow-other  --uid 1000 *"},
            ["run", "--allow-other", "--uid", "1000", "*", "--", "job", "a b"],
            id="options-for-every-dataset",
        ),
    ],
)
def test_the_container_entrypoint_wraps_the_job(
    tmp_path: Path, setup: dict, expected: list[str]
) -> None:
    bin_dir, config = tmp_path / "bin", tmp_path / "etc"
    bin_dir.mkdir()
    config.mkdir()
    for name in ("s3datafs", "job"):  # stand-ins that print their argv, one item per line
        fake = bin_dir / name
        fake.write_text(f'#!/bin/sh\nprintf "%s\\n" {name if name == "job" else ""} "$@"\n')
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "S3DATAFS_CONFIG_DIR": str(config)}
    env.update({name: value for name, value in setup.items() if name.startswith("S3DATAFS_")})
    if "file" in setup:
        (config / setup["file"]).write_text("[]")
    if setup.get("credentials"):
        (config / "credentials").mkdir()
        (config / "credentials" / "credentials").write_text("[default]\n")
    done = subprocess.run(
        ["sh", str(PACKAGING / "container" / "entrypoint.sh"), "job", "a b"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    printed = [line for line in done.stdout.splitlines() if line]
    assert printed == [item.format(config=config) for item in expected]


@pytest.mark.parametrize("spec_file", ["given", "found"])
def test_the_container_entrypoint_refuses_datasets_given_twice(
    tmp_path: Path, spec_file: str
) -> None:
    """A spec file (given, or found in the config directory) and the variable: which one was
    meant? Mounting one and dropping the other would start the job without its data."""
    config = tmp_path / "etc"
    config.mkdir()
    (config / "datasets.yaml").write_text("[]")
    env = {"PATH": os.environ["PATH"], "S3DATAFS_CONFIG_DIR": str(config),
           "S3DATAFS_DATASETS": "- uri: s3://b-1/x"}
    if spec_file == "given":
        env["S3DATAFS_DATASETS_FILE"] = str(config / "datasets.yaml")
    done = subprocess.run(["sh", str(PACKAGING / "container" / "entrypoint.sh"), "true"],
                          env=env, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"s3datafs: datasets given twice, by {config}/datasets.yaml and by "
                           "$S3DATAFS_DATASETS: keep one of them\n")


def test_the_logrotate_file_rotates_the_default_logs_and_sends_no_signal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGHUP unmounts: a postrotate copied from another daemon's file took the mount away.
    The daemon follows its file by itself (see logsetup)."""
    monkeypatch.delenv("S3DATAFS_LOG_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root's daemons: the packaged ones
    text = (PACKAGING / "logrotate" / "s3datafs").read_text()
    rules = [line.split("#")[0].strip() for line in text.splitlines()]
    rules = [rule for rule in rules if rule]
    assert rules[0] == f"{default_log_dir()}/*.log {{"
    assert rules[-1] == "}"
    assert not {"postrotate", "copytruncate", "sharedscripts"} & {rule.split()[0] for rule in rules}
    assert "delaycompress" in rules
