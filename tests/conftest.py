"""Shared fixtures: a real S3 server process, isolated s3datafs environments, real FUSE mounts.

- ``s3server`` is one moto server process on 127.0.0.1 for the whole session; tests isolate
  themselves with their own bucket (``make_bucket``) and read server-side counters from it.
- ``cli`` runs the real ``s3datafs`` command as a subprocess, with every path (data root, cache,
  runtime state, logs) inside the test's tmp dir and a clean AWS environment. Its teardown
  *always* unmounts whatever is mounted below the tmp dir: graceful unmount, then
  ``fusermount3 -u -z``, then SIGKILL of any daemon left, so no test can leave a mount behind.
- The teardown also fails the test on any WARNING or ERROR in the daemon logs that the test did
  not declare with ``cli.expect_log(...)``.
- ``isolated_cli`` is that fixture's set-up and teardown for a ``Cli`` against another endpoint
  (the synthetic server of very large objects, ``synths3``).
- Every test has ``TEST_SECONDS`` (``time_limit``): a hang fails its test, with every thread's
  stack, instead of holding CI for its whole 90 minutes with nothing to show.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

CHECKOUT = Path(__file__).resolve().parent.parent  # the s3datafs under test
sys.path.insert(0, str(CHECKOUT))
# ... and in every command the tests start (the CLI, its daemons, inner pytest runs), whatever
# their working directory: a clone that shares another checkout's venv, whose editable install
# points there, would otherwise test that checkout's code wherever a test changes directory.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))

from faultproxy import FaultProxy  # noqa: E402
from hypothesis import settings  # noqa: E402
from watchdog import Watchdog  # noqa: E402

from devtools.s3server import S3Server, clean_aws_env  # noqa: E402
from s3datafs.runtime import mount_table  # noqa: E402

# Property tests draw the same examples at every run, so a failure in CI reproduces from the
# commit alone (and the report's blob replays it); ``make fuzz`` draws new ones.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuse: needs /dev/fuse and mounts for real")
    # A suite started in the background by a shell without job control (``make test &``, some CI
    # runners) inherits SIGINT and SIGQUIT ignored, and an ignored signal stays ignored across
    # exec: every command the tests start would then shrug off the Ctrl-C the signal tests send.
    # A handler (unlike SIG_IGN) is reset to the default by exec, so the commands start as from a
    # terminal.
    for number, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGQUIT, signal.SIG_DFL),
    ):
        if signal.getsignal(number) == signal.SIG_IGN:
            signal.signal(number, handler)
    # The real stderr, taken before pytest captures it: stacks written to a captured stream are
    # lost when the watchdog ends the process (and ``--capture=sys`` has no descriptor at all).
    # pytest's own faulthandler plugin is off (pyproject: it would cancel the watchdog after any
    # failure, leaving that test's teardown unbounded); crashes still print their stacks here.
    global _STDERR_FD, _WATCHDOG
    _STDERR_FD = os.dup(2)
    faulthandler.enable(file=_STDERR_FD, all_threads=True)
    _WATCHDOG = Watchdog(_STDERR_FD)


# Limits per test; the environment may lower them (tests/test_time_limits.py runs pytest so).
TEST_SECONDS = int(os.environ.get("S3DATAFS_TEST_SECONDS", 180))  # the slowest test takes ~30 s
WATCHDOG_SECONDS = int(os.environ.get("S3DATAFS_WATCHDOG_SECONDS", 60))  # no signal reaches
_STDERR_FD = 2  # the real stderr, duplicated by pytest_configure
_WATCHDOG: Watchdog | None = None  # started by pytest_configure


@pytest.fixture(autouse=True)
def time_limit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[None]:
    """Fail a test that runs past ``TEST_SECONDS``; end the run if even that cannot stop it.

    SIGALRM raises ``TimeoutError`` in the main thread, so the test fails and its fixtures'
    teardowns still unmount; inside a trio run it does not (trio's state would be left broken
    for every later test): ``fakes.trio_test`` runs under trio's own, shorter deadline. A thread
    blocked where neither reaches (a read of a mount whose daemon no longer answers waits in
    the kernel; a worker thread trio cannot cancel) gets ``WATCHDOG_SECONDS`` more; then the
    watchdog (``tests/watchdog.py``) prints every thread's stack, kills the daemons, unmounts,
    stops the S3 servers and ends the run: no summary line, but minutes, not CI's whole limit,
    and nothing left behind. Autouse, so it is set up before the test's other fixtures and torn
    down after.
    """

    def expired(_signum: int, _frame: object) -> None:
        faulthandler.dump_traceback(file=_STDERR_FD, all_threads=True)
        if not trio.lowlevel.in_trio_run():
            raise TimeoutError(f"the test ran past {TEST_SECONDS} s: a hang? (stacks above)")

    assert _WATCHDOG is not None
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_SECONDS)
    _WATCHDOG.arm(TEST_SECONDS + WATCHDOG_SECONDS, request.node.nodeid,
                  below=tmp_path_factory.getbasetemp())
    try:
        yield
    finally:
        _WATCHDOG.disarm()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def s3server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def proxy(s3server: S3Server) -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of the S3 server (``faultproxy``); no rules yet."""
    with FaultProxy(s3server.endpoint, seed=6) as running:
        yield running


@pytest.fixture(scope="session")
def _s3_client(s3server: S3Server):  # a boto3 client; botocore has no static type
    return s3server.client()


@pytest.fixture
def s3(_s3_client):
    """A boto3 client of ``s3server``, one for the session: a client holds no state a test could
    see (tests isolate themselves by bucket), and making one (a session, the S3 model) took
    0.1-0.5 s of each of the 239 tests that use it."""
    return _s3_client


@pytest.fixture
def make_bucket(s3):
    """Create a fresh bucket (optionally versioned) and return its name."""

    def make(*, versioned: bool = False) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        s3.create_bucket(Bucket=name)
        if versioned:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    return make


ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


@contextlib.contextmanager
def checking_server() -> Iterator[tuple[S3Server, dict[str, str]]]:
    """A moto server that checks every request's signature and its IAM permissions, and the
    boto3 client arguments of an admin allowed everything (made with the three unchecked
    requests it allows first). moto checks nothing in the other tests."""
    import boto3  # only here: most of conftest's users never need it

    with S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        setup = {"endpoint_url": server.endpoint, "region_name": "us-east-1"}
        anonymous = boto3.client(
            "iam", aws_access_key_id="testing", aws_secret_access_key="testing", **setup
        )
        anonymous.create_user(UserName="admin")
        anonymous.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=ALLOW_ALL)
        made = anonymous.create_access_key(UserName="admin")["AccessKey"]
        yield server, {"aws_access_key_id": made["AccessKeyId"],
                       "aws_secret_access_key": made["SecretAccessKey"], **setup}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_below(root: Path, *, besides: Iterable[Path] = ()) -> Iterator[tuple[Path, bytes]]:
    """Every regular file below ``root`` (not below ``besides``) with its bytes, for leak checks.

    A live daemon replaces its state file every second (temp file + rename), so a file listed
    may be gone when read: it is skipped (its final name is listed too).
    """
    skip = tuple(besides)
    for path in root.rglob("*"):
        if path.is_mount() or any(path == s or path.is_relative_to(s) for s in skip):
            continue
        try:
            if path.is_file():
                yield path, path.read_bytes()
        except FileNotFoundError:
            continue


def kernel_readahead_kb(mountpoint: Path) -> str:
    """A mount's kernel readahead in KiB, from its backing device (``--kernel-readahead``)."""
    device = next(e.device for e in mount_table() if e.mountpoint == str(mountpoint))
    return Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip()


def garble_root_page(catalog: Path, name: str) -> None:
    """Overwrite the root page of the table or index ``name`` in a catalog file: damage that
    ``Catalog.open`` (the meta table only) does not meet, and every query through ``name`` does."""
    with contextlib.closing(sqlite3.connect(catalog)) as conn:
        (page,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                               (name,)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    with open(catalog, "r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\xa5" * page_size)


def mount_stats(mountpoint: Path) -> dict[str, int]:
    """A mount's read counters, as its root's ``user.s3datafs.stats`` attribute gives them."""
    return json.loads(os.getxattr(mountpoint, "user.s3datafs.stats"))


def errno_of(action: Callable[[], object]) -> int:
    """The errno of the OSError ``action`` raises; fails the test if it raises none."""
    try:
        action()
    except OSError as exc:
        return exc.errno
    pytest.fail("expected an OSError, got success")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    """The real command in an isolated environment; remembers what it mounted."""

    def __init__(self, root: Path, endpoint: str) -> None:
        self.root = root
        self.data_root = root / "data"
        self.log_dir = root / "log"
        self.env = clean_aws_env()
        self.env.update(
            AWS_ENDPOINT_URL=endpoint,
            S3DATAFS_DATA_ROOT=str(self.data_root),
            S3DATAFS_CACHE_DIR=str(root / "cache"),
            S3DATAFS_RUNTIME_DIR=str(root / "run"),
            S3DATAFS_LOG_DIR=str(self.log_dir),
        )
        # A failed mount is written to its log too; a test that fails a mount says so itself.
        self._expected_logs: list[re.Pattern[str]] = [re.compile(r" cannot mount s3://.* at ")]

    def run(
        self, *args: str, timeout: float = 60, env: dict | None = None, cwd: Path | None = None
    ) -> CliResult:
        completed = subprocess.run(
            [sys.executable, "-m", "s3datafs", *args],
            env=env or self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    def mount(self, *args: str) -> Path:
        """Mount (``args`` as for ``s3datafs mount``), assert success, return the mount point."""
        result = self.run("mount", *args)
        assert result.returncode == 0, result.stderr
        mountpoint = Path(result.stdout.rsplit(" at ", 1)[1].split(" (", 1)[0])
        assert os.path.ismount(mountpoint)
        return mountpoint

    def unmount(self, mountpoint: Path) -> CliResult:
        return self.run("unmount", str(mountpoint))

    def expect_log(self, pattern: str) -> None:
        """Declare a WARNING/ERROR log line this test provokes on purpose."""
        self._expected_logs.append(re.compile(pattern))

    def unexpected_log_lines(self) -> list[str]:
        lines = []
        for log_file in self.log_dir.glob("*.log"):
            for line in log_file.read_text(errors="replace").splitlines():
                if (" WARNING " in line or " ERROR " in line) and not any(
                    p.search(line) for p in self._expected_logs
                ):
                    lines.append(line)
        return lines

    def mounts_below_root(self) -> list[str]:
        prefix = str(self.root) + "/"
        return [e.mountpoint for e in mount_table() if e.mountpoint.startswith(prefix)]

    def wait_until_nothing_is_mounted(self, timeout: float = 10) -> None:
        """For daemons that unmount by themselves (their command died)."""
        deadline = time.monotonic() + timeout
        while mounts := self.mounts_below_root():
            assert time.monotonic() < deadline, f"still mounted: {mounts}"
            time.sleep(0.05)

    def daemon_pid(self, mountpoint: Path) -> int:
        """The daemon serving ``mountpoint`` (other tests' mounts may be listed too)."""
        rows = json.loads(self.run("status", "--json").stdout)
        return next(row["pid"] for row in rows if row["mountpoint"] == str(mountpoint))

    def cleanup(self) -> list[str]:
        """Leave nothing mounted and no daemon running, whatever the test did.

        Returns what went wrong on the way: an unmount that failed or hung (its daemon did not
        exit), with the daemons' thread stacks, so a rare hang leaves evidence behind.
        """
        trouble = []
        for point in reversed(self.mounts_below_root()):
            try:
                result = self.run("unmount", point, timeout=45)  # the command waits 30 s itself
                code = result.returncode
                failed = code and (result.stderr.strip() or f"exit {code}")
            except subprocess.TimeoutExpired:
                failed = "timed out"
            if failed:
                trouble.append(f"unmount {point}: {failed}\n{self._daemon_stacks()}")
                subprocess.run(["fusermount3", "-u", "-z", point], check=False)
        for pid in self.daemon_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return trouble

    def daemon_pids(self) -> list[int]:
        """Every daemon this runner started that may still run."""
        return [pid for pid, _ in self._daemons()]

    def _daemons(self) -> list[tuple[int, Path | None]]:
        """(pid, log file) of every daemon with a state file under this runner's root."""
        daemons = []
        for state in (self.root / "run").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                daemon = json.loads(state.read_text())
                log_file = daemon.get("log_file")
                daemons.append((int(daemon["pid"]), Path(log_file) if log_file else None))
        return daemons

    def _daemon_stacks(self) -> str:
        """Thread stacks of the live daemons, for a hang's report.

        py-spy when installed (it also shows native frames); else the daemon's own dump, which
        SIGUSR1 makes it append to its log file.
        """
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        stacks = []
        for pid, log_file in self._daemons():
            if Path(spy).exists():
                dump = subprocess.run(
                    [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, check=False
                )
                stacks.append(f"daemon {pid}:\n{dump.stdout}{dump.stderr}")
            elif log_file is not None:
                with contextlib.suppress(OSError):
                    told = log_file.stat().st_size
                    os.kill(pid, signal.SIGUSR1)
                    time.sleep(0.5)
                    with log_file.open(errors="replace") as log:
                        log.seek(told)
                        stacks.append(f"daemon {pid} (its own dump):\n{log.read()}")
        return "\n".join(stacks)


@contextlib.contextmanager
def isolated_cli(root: Path, endpoint: str) -> Iterator[Cli]:
    """A ``Cli`` below ``root`` talking to ``endpoint``; on the way out it unmounts everything
    it mounted, then fails on a mount left, a troubled unmount or an unexpected log line."""
    runner = Cli(root, endpoint)
    trouble: list[str] = []
    assert _WATCHDOG is not None
    _WATCHDOG.track(runner)
    try:
        yield runner
    finally:
        trouble = runner.cleanup()
        _WATCHDOG.untrack(runner)
    assert not runner.mounts_below_root(), "a mount survived the test's cleanup"
    assert not trouble, "unmounting after the test went wrong:\n" + "\n".join(trouble)
    unexpected = runner.unexpected_log_lines()
    assert not unexpected, "unexpected warnings in the daemon log:\n" + "\n".join(unexpected)


@pytest.fixture
def cli(s3server: S3Server, tmp_path: Path) -> Iterator[Cli]:
    with isolated_cli(tmp_path, s3server.endpoint) as runner:
        yield runner
