"""Start-up cost of the command line (issue 4, mount to first read): what each command imports,
botocore's data loaded once per process, and the garbage collector during start-up."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import botocore.exceptions
import botocore.loaders
import pytest

from s3datafs import cli, mounting, s3source, startup
from s3datafs.s3source import S3Settings, S3Source

HEAVY = ("boto3", "botocore", "pyfuse3", "trio")


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_a_command_line_registers_only_the_command_it_names() -> None:
    assert _commands(cli.build_parser(["mount", "s3://b/p/", "/mnt"])) == {"mount"}
    assert _commands(cli.build_parser(["umount", "/mnt"])) == {"unmount", "umount"}
    assert _commands(cli.build_parser(["mount-all", "spec.yaml"])) == {"mount-all"}
    every = _commands(cli.build_parser())
    assert {"mount", "status", "snapshot", "unmount", "cache"} <= every
    for argv in ([], ["--help"], ["--version"], ["bogus"], ["-h", "mount"]):
        assert _commands(cli.build_parser(argv)) == every


def test_commands_that_need_no_s3_or_fuse_import_neither(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from s3datafs import cli\n"
        "code = cli.main(['status'])\n"
        f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "S3DATAFS_RUNTIME_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.splitlines()[-1] == "0 []"


def test_the_mount_commands_leave_pyfuse3_and_trio_to_their_daemons() -> None:
    """A daemon imports them while it waits on S3 for its pins (``mounting``); importing the
    commands that fork daemons, and those that share their options, loads neither (a command
    about to fork several daemons loads them itself then: ``mounting.load_serving_modules``)."""
    code = (
        "import sys\n"
        "from s3datafs.commands import diff, mount, mount_all, run, snapshot\n"
        "print(sorted(m for m in ('pyfuse3', 'trio', 's3datafs.fuse_ops') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "[]"


@pytest.fixture
def module_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module of the given source under a name of its own; forget it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"loaded_{len(names)}_{tmp_path.name.replace('-', '_')}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_a_module_loads_in_a_thread_of_its_own(module_file: Callable[[str], str]) -> None:
    name = module_file("import threading\nLOADED_IN = threading.current_thread().name\n")
    assert mounting._Loading(name).module().LOADED_IN == "s3datafs-load"


def test_without_a_thread_the_module_loads_when_it_is_wanted(
    module_file: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_thread(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(mounting, "start_quiet_thread", no_thread)
    name = module_file("import threading\nLOADED_IN = threading.current_thread().name\n")
    loading = mounting._Loading(name)
    assert name not in sys.modules
    assert loading.module().LOADED_IN == "MainThread"


def test_a_module_that_fails_to_load_fails_where_it_is_wanted(
    module_file: Callable[[str], str]
) -> None:
    name = module_file("raise ImportError('libfuse3.so.3: cannot open shared object file')\n")
    loading = mounting._Loading(name)
    with pytest.raises(ImportError, match="libfuse3"):
        loading.module()


def test_a_module_loaded_already_takes_no_thread(
    module_file: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon of mount-all finds the serving modules loaded by its command."""
    name = module_file("VALUE = 1\n")
    __import__(name)

    def no_thread_wanted(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a thread was started for a module loaded already")

    monkeypatch.setattr(mounting, "start_quiet_thread", no_thread_wanted)
    assert mounting._Loading(name).module().VALUE == 1


def test_serving_modules_that_fail_to_load_are_left_to_each_daemon(
    module_file: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command loading them for its daemons says nothing; a daemon then fails to load them
    again, and says why (pyfuse3 without libfuse3: what to install)."""
    name = module_file("raise ImportError('libfuse3.so.3: cannot open shared object file')\n")
    monkeypatch.setattr(mounting, "_SERVING", name)
    mounting.load_serving_modules()
    assert name not in sys.modules
    with pytest.raises(ImportError, match="libfuse3"):
        mounting._Loading(name).module()


def test_botocore_data_is_loaded_once_per_process() -> None:
    settings = S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:9")
    s3source.check_settings(settings)
    first, second = S3Source(settings), S3Source(settings)
    clients = (first._client, first._reads, second._client, second._reads)
    loaders = {id(client._loader) for client in clients}  # botocore keeps it there
    assert len(loaders) == 1
    loader = first._client._loader
    assert isinstance(loader, s3source._S3Loader)
    assert first._reads.meta.service_model.service_name == "s3"


def test_the_next_source_of_the_same_settings_takes_the_checked_session_and_client_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:9")
    s3source.check_settings(settings)
    checked_client = s3source._checked[3]
    source = S3Source(settings)
    assert source._client is checked_client
    assert source._reads is not checked_client
    assert S3Source(settings)._client is not checked_client  # once only
    s3source.check_settings(settings)
    other = S3Settings(region="eu-west-1", endpoint_url="http://127.0.0.1:9")
    assert S3Source(other)._client.meta.region_name == "eu-west-1"  # other settings: fresh
    assert s3source._checked is None  # and the check's are gone
    s3source.check_settings(settings)
    (_, at, _, checked_client) = s3source._checked
    monkeypatch.setattr(s3source.time, "monotonic",
                        lambda: at + s3source.CHECKED_REUSE_SECONDS + 1)
    assert S3Source(settings)._client is not checked_client  # too late: read afresh


def test_the_same_settings_checked_again_soon_keep_their_session_and_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mount-all checks each dataset's settings when it plans it and again before forking its
    daemon: settings it has just checked keep the session and client made then, which every
    daemon forked meanwhile takes a copy of, instead of one pair made per check."""
    settings = S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:9")
    s3source.check_settings(settings)
    (_, at, session, client) = s3source._checked
    s3source.check_settings(S3Settings(region="us-east-1", endpoint_url="http://127.0.0.1:9"))
    assert s3source._checked == (settings, at, session, client)
    other = S3Settings(region="eu-west-1", endpoint_url="http://127.0.0.1:9")
    s3source.check_settings(other)
    assert s3source._checked[3] is not client  # other settings: checked anew
    s3source.check_settings(settings)
    (_, at, _, client) = s3source._checked
    monkeypatch.setattr(s3source.time, "monotonic",
                        lambda: at + s3source.CHECK_AGAIN_SECONDS + 1)
    s3source.check_settings(settings)
    renewed = s3source._checked[3]
    assert renewed is not client  # no longer fresh enough for the next daemon: made anew
    assert S3Source(settings)._client is renewed


def test_the_s3_data_loader_knows_s3_without_a_scan_and_finds_other_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loader = s3source._S3Loader()
    scans: list[str] = []
    scan = botocore.loaders.Loader.list_available_services

    def counted(self, type_name: str) -> list[str]:
        scans.append(type_name)
        return scan(self, type_name)

    monkeypatch.setattr(botocore.loaders.Loader, "list_available_services", counted)
    assert loader.load_service_model("s3", "service-2")["metadata"]["endpointPrefix"] == "s3"
    assert scans == []  # no scan of ~450 directories
    # Credential providers make sts (roles, web identity) and sso clients from the session.
    assert loader.load_service_model("sts", "service-2")["metadata"]["endpointPrefix"] == "sts"
    assert scans == ["service-2"]
    with pytest.raises(botocore.exceptions.UnknownServiceError, match="sts"):
        loader.load_service_model("no-such-service", "service-2")  # botocore's list, named


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    startup._saved = None
    gc.set_threshold(*thresholds)
    gc.unfreeze()


@pytest.mark.usefixtures("restore_gc")
def test_start_up_collects_less_often_until_settled() -> None:
    before = gc.get_threshold()
    startup.begin()
    assert gc.get_threshold()[0] == startup.START_THRESHOLD
    startup.begin()  # idempotent: settle restores what the first begin found
    startup.settle()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() > 0
    startup.settle()  # without begin: thresholds untouched
    assert gc.get_threshold() == before


@pytest.mark.usefixtures("restore_gc")
@pytest.mark.parametrize("argv", [
    ["status", "--bogus"],  # an unknown argument
    ["mount", "s3://my-bucket/k", "--block-size", "3"],  # a usage error found by the command
    ["status", "--help"],  # argparse exits
])
def test_the_command_line_leaves_the_thresholds_as_it_found_them(argv: list[str]) -> None:
    """``main`` raises the young threshold while it starts; however the command ends, a caller
    that stays in the process (tests call ``main`` in-process) gets the thresholds back."""
    found = gc.get_threshold()
    with contextlib.suppress(SystemExit):
        cli.main(argv)
    assert gc.get_threshold() == found


@pytest.mark.usefixtures("restore_gc")
def test_ctrl_c_ends_a_command_with_130_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from s3datafs.commands import status

    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(status, "run", interrupted)
    assert cli.main(["status"]) == 130  # 128 + SIGINT, as a shell reports it
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("restore_gc")
def test_an_internal_error_is_one_line_unless_debug_asks_for_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from s3datafs.commands import mount

    def broken(_args: argparse.Namespace) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(mount, "run", broken)
    assert cli.main(["mount", "s3://my-bucket/k"]) == 1
    assert capsys.readouterr().err == (
        "s3datafs: internal error: RuntimeError('a bug') (run with --debug for details)\n")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["mount", "s3://my-bucket/k", "--debug"])


@pytest.mark.usefixtures("restore_gc")
def test_a_command_other_than_mount_runs_with_the_collector_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only ``mount`` settles once usable; every other command's work is not start-up."""
    from s3datafs.commands import status

    found, seen = gc.get_threshold(), []
    monkeypatch.setattr(status, "run", lambda _args: seen.append(gc.get_threshold()) or 0)
    assert cli.main(["status"]) == 0
    assert seen == [found]


class ThreadRunAtOnce:
    """Stands in for ``threading.Thread``: runs its target in ``start``, and notes its name."""

    names: list[str] = []

    def __init__(self, *, target, args, name: str, daemon: bool) -> None:
        self.target, self.args = target, args
        self.names.append(name)

    def start(self) -> None:
        self.target(*self.args)


def test_a_mount_has_the_files_it_loads_read_ahead_and_other_commands_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Advice only (``posix_fadvise(WILLNEED)``), of the packages a mount imports and of
    botocore's S3 model, from a thread; nothing for a command that mounts nothing."""
    advised: list[str] = []
    monkeypatch.setattr(startup.os, "posix_fadvise",
                        lambda fd, *_: advised.append(os.readlink(f"/proc/self/fd/{fd}")))
    monkeypatch.setattr(threading, "Thread", ThreadRunAtOnce)
    monkeypatch.setattr(ThreadRunAtOnce, "names", [])
    startup.read_ahead(["status"])
    assert (ThreadRunAtOnce.names, advised) == ([], [])
    startup.read_ahead(["mount", "s3://b/p/"])
    assert ThreadRunAtOnce.names == ["s3datafs-read-ahead"]
    botocore_data = Path(botocore.loaders.__file__).parent / "data"
    assert str(botocore_data / "endpoints.json") in advised
    assert any(path.startswith(str(botocore_data / "s3")) for path in advised)
    assert not [path for path in advised if path.endswith(".py") or "tests/" in path
                or "/testing/" in path]  # trio's own tests and test helpers: never loaded
