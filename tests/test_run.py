"""``s3datafs run``: mount, run the job, pass its status through, always unmount.

Each case runs the real command around a real job against the moto server, then checks that
nothing is mounted any more, no daemon state is left and no mount point directory it made stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli
from zipcraft import make_zip

from s3datafs import supervisor
from s3datafs.runtime import mount_table, pid_alive

pytestmark = pytest.mark.fuse

BODY = os.urandom(100_000)  # the member of sets/mnist.zip


@pytest.fixture
def bucket(s3, make_bucket) -> str:
    name = make_bucket()
    s3.put_object(Bucket=name, Key="sets/mnist.zip", Body=make_zip({"mnist.bin": BODY}))
    s3.put_object(Bucket=name, Key="train/x.txt", Body=b"x\n")
    return name


@pytest.fixture
def spec(bucket: str) -> str:
    """One dataset: each mount costs time, and one is enough to see it unmounted."""
    return json.dumps([{"uri": f"s3://{bucket}/sets/mnist.zip"}])


def run(cli: Cli, spec: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "s3datafs", "run", "--datasets", "-", *args],
        input=spec,
        env=env or cli.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_all_unmounted(cli: Cli) -> None:
    assert cli.mounts_below_root() == []
    assert not list((cli.root / "run").glob("*.json"))
    assert not cli.data_root.exists(), "run left the mount point directories it created"


def test_success_runs_the_job_on_the_mounted_data_then_unmounts(cli: Cli, bucket: str) -> None:
    """Spec from S3DATAFS_DATASETS (not passed on to the job); options apply to every dataset."""
    out = cli.root / "copy.bin"
    job = (
        f'test -z "$S3DATAFS_DATASETS" && cp {cli.data_root}/mnist/mnist.bin {out} && '
        f"stat -c %a {cli.data_root}/train/x.txt && echo job-output"
    )
    spec = [{"uri": f"s3://{bucket}/sets/mnist.zip"}, {"uri": f"s3://{bucket}/train/"}]
    env = {**cli.env, "S3DATAFS_DATASETS": json.dumps(spec)}
    done = subprocess.run(
        [sys.executable, "-m", "s3datafs", "run", "--file-mode", "0440", "--", "sh", "-c", job],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "440\njob-output\n"  # the job's output alone
    assert out.read_bytes() == BODY
    assert done.stderr.count("s3datafs: mounted ") == 2
    assert_all_unmounted(cli)


@pytest.mark.parametrize("from_file", [False, True], ids=["spec-in-the-variable", "file-too"])
def test_keys_from_the_variable_are_in_no_process_environment(
    cli: Cli, bucket: str, from_file: bool
) -> None:
    """/proc/<pid>/environ shows what a process started with: the daemons forked from run
    must not show the spec's keys there for as long as the job runs. The variable is taken out
    also when a spec file is given beside it (an image's default spec, a platform's variable):
    unused, it still holds keys."""
    spec = [{"uri": f"s3://{bucket}/train/", "awsAccessKeyId": "testing",
             "awsSecretAccessKey": "testing", "awsSessionToken": "SPECTOKEN42"}]
    spec_file = cli.root / "spec.json"
    spec_file.write_text(json.dumps([{"uri": f"s3://{bucket}/train/"}]))
    job = (
        "import glob, json, os, sys\n"
        f"states = [json.load(open(p)) for p in glob.glob('{cli.root}/run/*.json')]\n"
        "pids = [os.getpid(), os.getppid(), *(state['pid'] for state in states)]\n"
        "assert len(pids) == 3, pids\n"
        "seen = [open(f'/proc/{pid}/environ', 'rb').read() for pid in pids]\n"
        "sys.exit(sum(b'SPECTOKEN42' in environ for environ in seen))\n"
    )
    given = ["--datasets", str(spec_file)] if from_file else []
    done = subprocess.run(
        [sys.executable, "-m", "s3datafs", "run", *given, "--", sys.executable, "-c", job],
        env={**cli.env, "S3DATAFS_DATASETS": json.dumps(spec)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    ignored = f"$S3DATAFS_DATASETS is set but not used: the datasets come from {spec_file}"
    assert (ignored in done.stderr) is from_file
    assert_all_unmounted(cli)


def test_scrub_overwrites_the_whole_value_and_drops_the_variable() -> None:
    """``envblock.scrub`` in a process of its own: no byte of the value is left in the block
    ``/proc/self/environ`` shows, and neither ``os.environ`` nor a child has the variable."""
    check = (
        "import os, subprocess, sys\n"
        "from s3datafs import envblock\n"
        "envblock.scrub('S3DATAFS_DATASETS')\n"
        "block = open('/proc/self/environ', 'rb').read()\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get("
        "\"S3DATAFS_DATASETS\"))'], capture_output=True, text=True).stdout\n"
        "at = block.index(b'S3DATAFS_DATASETS=') + len('S3DATAFS_DATASETS=')\n"
        "print(block[at : at + len('SPECTOKEN42')] == bytes(11),\n"
        "      'S3DATAFS_DATASETS' in os.environ, child.strip())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "S3DATAFS_DATASETS": "SPECTOKEN42"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "None"]


@pytest.mark.parametrize(
    ("job", "status"),
    [
        pytest.param("exit 7", 7, id="exit-7"),
        pytest.param("kill -KILL $$", 128 + signal.SIGKILL, id="killed-by-signal-9"),
    ],
)
def test_the_job_status_is_passed_through(cli: Cli, spec: str, job: str, status: int) -> None:
    done = run(cli, spec, "--", "sh", "-c", job)
    assert done.returncode == status
    assert_all_unmounted(cli)


def test_a_mount_kept_busy_by_a_leftover_process_is_detached(cli: Cli, spec: str) -> None:
    """A job may leave a background process reading a dataset: run still unmounts (lazily),
    and the daemon serves the file still open after run has ended."""
    go, read = cli.root / "go", cli.root / "read"
    leftover = (f"exec 3< {cli.data_root}/mnist/mnist.bin; "
                f"(while [ ! -e {go} ]; do sleep 0.05; done; wc -c <&3 > {read}) "
                ">/dev/null 2>&1 & exit 0")
    started = time.monotonic()
    done = run(cli, spec, "--", "sh", "-c", leftover)
    assert done.returncode == 0, done.stderr
    assert "is busy: detaching it lazily" in done.stderr
    assert time.monotonic() - started < 30
    assert cli.mounts_below_root() == []
    go.touch()  # run has ended: the leftover reads now
    deadline = time.monotonic() + 10
    while not read.exists() or not read.read_text().strip():
        assert time.monotonic() < deadline, "the leftover never read"
        time.sleep(0.05)
    assert read.read_text().split() == [str(len(BODY))]


@contextlib.contextmanager
def run_in_the_background(cli: Cli, spec: str, setup: str = "") -> Iterator[subprocess.Popen]:
    """``s3datafs run`` whose job runs the shell commands ``setup``, then sleeps: yielded once
    the job runs, killed with its job on the way out."""
    marker = cli.root / "job-pid"
    job = f"{setup}echo $$ > {marker}.new && mv {marker}.new {marker} && exec sleep 60"
    process = subprocess.Popen(
        [sys.executable, "-m", "s3datafs", "run", "--datasets", "-", "--", "sh", "-c", job],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=cli.env, text=True,
    )
    job_pid = None
    try:
        process.stdin.write(spec)
        process.stdin.close()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert process.poll() is None, "run ended early"
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        job_pid = int(marker.read_text())
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if job_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job_pid, signal.SIGKILL)


def test_run_killed_with_sigkill_leaves_no_mount(cli: Cli, spec: str) -> None:
    """No cleanup can run in a process killed outright (an OOM kill, a CI runner's timeout):
    the kernel tells the daemons that the run is gone, and they unmount."""
    with run_in_the_background(cli, spec) as process:
        assert len(cli.mounts_below_root()) == 1
        process.kill()
        process.wait(timeout=10)
        cli.wait_until_nothing_is_mounted()
        deadline = time.monotonic() + 10  # the daemons remove what the run created, then end
        while cli.data_root.exists():
            assert time.monotonic() < deadline, "the mount point directories were left"
            time.sleep(0.05)
    cli.expect_log("the command that mounted this .* is gone: unmounting")


def test_run_killed_while_a_dataset_is_covered_leaves_that_mount_serving(
    cli: Cli, spec: str
) -> None:
    """The daemon hears that its run is gone, but another file system is mounted over its
    dataset (by the job): unmounting by path would take that one off instead. What to do is the
    user's to say: the mount is left as it is, and its daemon serves on."""
    mountpoint = cli.data_root / "mnist"
    try:
        with run_in_the_background(cli, spec, f"mount -t tmpfs tmpfs {mountpoint} && ") as run:
            daemon = cli.daemon_pid(mountpoint)
            run.kill()
            run.wait(timeout=10)
            log = cli.log_dir / "mnist.log"
            deadline = time.monotonic() + 10
            while " is gone" not in log.read_text():
                assert time.monotonic() < deadline, "the daemon did not hear that run is gone"
                time.sleep(0.05)
            assert "but a tmpfs file system is mounted over" in log.read_text()
            assert [e.fstype for e in mount_table() if e.mountpoint == str(mountpoint)] == [
                "fuse.s3datafs", "tmpfs"]
            subprocess.run(["umount", str(mountpoint)], check=True)
            assert pid_alive(daemon)
            assert (mountpoint / "mnist.bin").read_bytes() == BODY  # served on
    finally:
        if [e for e in mount_table() if e.mountpoint == str(mountpoint) and e.fstype == "tmpfs"]:
            subprocess.run(["umount", str(mountpoint)], check=False)
    assert cli.unmount(mountpoint).returncode == 0
    cli.expect_log("the command that mounted this is gone, but a tmpfs file system is mounted")


def test_a_job_that_unmounts_a_dataset_itself_is_not_a_failure(cli: Cli, spec: str) -> None:
    done = run(cli, spec, "--", sys.executable, "-m", "s3datafs", "unmount",
               str(cli.data_root / "mnist"))
    assert done.returncode == 0, done.stderr
    assert_all_unmounted(cli)



def test_a_dataset_left_mounted_after_a_successful_job_makes_the_run_fail(
    cli: Cli, spec: str
) -> None:
    """The job stacks a tmpfs of its own on the dataset: run says so (and leaves the tmpfs,
    the topmost mount there, alone), and exits 1, not the job's 0."""
    mountpoint = cli.data_root / "mnist"
    cli.expect_log("the command that mounted this is gone, but a tmpfs file system is mounted "
                   "over .*: left mounted")  # the daemon, once run has ended, leaves it too
    try:
        done = run(cli, spec, "--", "mount", "-t", "tmpfs", "tmpfs", str(mountpoint))
        assert done.returncode == 1, done.stderr
        assert (f"s3datafs: after the command: a tmpfs file system is mounted over the s3datafs "
                f"mount at {mountpoint}: unmount it first") in done.stderr
        log = cli.log_dir / "mnist.log"
        deadline = time.monotonic() + 10
        while "left mounted" not in log.read_text():  # the daemon's word on run's end
            assert time.monotonic() < deadline, "the daemon never heard that run ended"
            time.sleep(0.05)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)  # the dataset's is left to cli


def test_without_fusermount3_root_still_unmounts_everything(cli: Cli, bucket: str) -> None:
    """Root mounts need no helper, so fuse3's tools may be missing: umount2 does it then."""
    two = json.dumps([{"uri": f"s3://{bucket}/sets/mnist.zip"}, {"uri": f"s3://{bucket}/train/"}])
    done = run(cli, two, "--", sys.executable, "-c", "pass",
               env={**cli.env, "PATH": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    assert_all_unmounted(cli)


def test_a_missing_command_is_127_and_unmounts(cli: Cli, spec: str) -> None:
    done = run(cli, spec, "--", "no-such-command-s3datafs")
    assert done.returncode == 127
    assert done.stderr.splitlines()[-1] == "s3datafs: command not found: no-such-command-s3datafs"
    assert_all_unmounted(cli)


def test_a_mount_failure_runs_nothing(cli: Cli, spec: str) -> None:
    marker = cli.root / "ran"
    broken = json.dumps([*json.loads(spec), {"uri": "s3://no-such-bucket-s3datafs/x"}])
    done = run(cli, broken, "--", "touch", str(marker))
    assert done.returncode == 1
    assert "dataset 'x': bucket 'no-such-bucket-s3datafs' does not exist" in done.stderr
    assert not marker.exists()
    assert_all_unmounted(cli)


def test_sigterm_is_forwarded_and_everything_is_unmounted(cli: Cli, spec: str) -> None:
    marker = cli.root / "job-started"
    job = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))\n"
        f"pathlib.Path({str(marker)!r}).write_text('up')\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3datafs",
            "run",
            "--datasets",
            "-",
            "--",
            sys.executable,
            "-c",
            job,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=cli.env,
        text=True,
    )
    try:
        process.stdin.write(spec)
        process.stdin.close()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        assert len(cli.mounts_below_root()) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 42  # the job saw SIGTERM and chose its status
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert_all_unmounted(cli)


def test_no_command_is_a_usage_error(cli: Cli, spec: str) -> None:
    done = run(cli, spec)
    assert done.returncode == 2
    assert "no command to run" in done.stderr
    assert_all_unmounted(cli)


def test_daemons_are_reaped(cli: Cli, spec: str) -> None:
    """The job sees the daemons; once run returns they are gone (not zombies of a live parent)."""
    pids = cli.root / "pids"
    done = run(cli, spec, "--", "sh", "-c", f"cat {cli.root}/run/*.json > {pids}")
    assert done.returncode == 0, done.stderr
    daemons = [int(part.split(",")[0]) for part in pids.read_text().split('"pid": ')[1:]]
    assert len(daemons) == 1
    assert not any(pid_alive(pid) for pid in daemons)
    assert not Path(f"/proc/{daemons[0]}").exists()


# -- the supervisor alone (no mounts) -------------------------------------------------------------


NO_BLOCKED_SIGNALS = 'test "$(grep SigBlk /proc/self/status)" = "SigBlk:\t0000000000000000"'


@pytest.fixture(autouse=False)
def quick_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """In pytest, a helper thread may take SIGCHLD: poll often instead of waiting a second."""
    monkeypatch.setattr(supervisor, "POLL_SECONDS", 0.02)


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        pytest.param(["true"], 0, id="success"),
        pytest.param(["sh", "-c", "exit 3"], 3, id="exit-3"),
        pytest.param(["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM, id="sigterm"),
        pytest.param(["sh", "-c", "kill -PIPE $$"], 128 + signal.SIGPIPE, id="sigpipe-not-ignored"),
        pytest.param(["sh", "-c", NO_BLOCKED_SIGNALS], 0, id="no-blocked-signals"),
    ],
)
@pytest.mark.usefixtures("quick_poll")
def test_run_command_reports_status_as_a_shell_does(argv: list[str], status: int) -> None:
    assert supervisor.run_command(argv, os.environ) == status


@pytest.mark.usefixtures("quick_poll")
def test_run_command_refuses_what_cannot_start_and_honours_pending_signals(tmp_path) -> None:
    with pytest.raises(supervisor.CommandNotRunnable) as missing:
        supervisor.run_command(["no-such-command-s3datafs"], os.environ)
    assert missing.value.exit_code == 127
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n")
    plain.chmod(0o644)
    with pytest.raises(supervisor.CommandNotRunnable) as not_executable:
        supervisor.run_command([str(plain)], os.environ)
    assert not_executable.value.exit_code == 126
    assert supervisor.run_command(["false"], os.environ, pending=[signal.SIGTERM]) == 143


def test_an_executable_without_a_shebang_runs_as_a_shell_script(tmp_path) -> None:
    """As execvp and every shell run it (posix_spawnp says ENOEXEC)."""
    job = tmp_path / "job"
    job.write_text('exit "$1"\n')
    job.chmod(0o755)
    assert supervisor.run_command([str(job), "7"], os.environ) == 7


@pytest.mark.usefixtures("quick_poll")
def test_a_script_without_a_shebang_starts_as_any_job_and_is_found_on_path(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell that runs it gets no blocked signals and SIGPIPE at its default, too; a bare
    name is looked up on PATH, as execvp does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    job = bin_dir / "job"
    job.write_text(f'{NO_BLOCKED_SIGNALS} || exit 9\nkill -PIPE $$\nexit 0\n')
    job.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert supervisor.run_command(["job"], os.environ) == 128 + signal.SIGPIPE


@pytest.mark.usefixtures("quick_poll")
def test_hold_returns_a_stop_signal_that_came_while_mounting_at_once() -> None:
    daemon = subprocess.Popen(["true"])
    try:
        assert supervisor.hold([daemon.pid], pending=[signal.SIGTERM]) == signal.SIGTERM
    finally:
        daemon.wait()


def test_hold_returns_once_every_daemon_is_gone() -> None:
    """In a process of its own: nothing else there may take the SIGCHLD or reap the daemons."""
    script = (
        "import os\n"
        "from s3datafs import supervisor\n"
        "daemons = [os.posix_spawnp(argv[0], argv, os.environ) for argv in (['true'],\n"
        "                                                                   ['sleep', '0.2'])]\n"
        "told = {}\n"
        "print(supervisor.hold(daemons, on_exit=told.__setitem__))\n"
        "print(sorted(os.waitstatus_to_exitcode(status) for status in told.values()),\n"
        "      set(told) == set(daemons))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=15, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n[0, 0] True\n"  # each daemon's end was told


def test_a_process_forked_while_stop_signals_are_deferred_dies_of_them_as_usual() -> None:
    """A daemon forked while ``run`` or ``mount-all`` mounts inherits the handler: it must not
    swallow the SIGTERM meant to stop it."""
    with supervisor.DeferredSignals() as deferred:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            signal.raise_signal(signal.SIGTERM)  # handled before this returns
            os._exit(0)  # reached only if the signal was swallowed
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGTERM
    assert deferred.received == []


def test_a_stop_signal_ignored_from_the_start_stays_ignored() -> None:
    """``nohup s3datafs run ...``: SIGHUP stays ignored while mounting, and so in the job."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with supervisor.DeferredSignals():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != term  # deferred
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == term  # and back to what it was
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_terminal_ctrl_c_reaches_the_job_once(cli: Cli) -> None:
    """Ctrl-C signals the whole foreground process group: run must not forward it again."""
    marker, count = cli.root / "ready", cli.root / "count"
    job = (
        "import pathlib, signal, time\n"
        "seen = []\n"
        "signal.signal(signal.SIGINT, lambda *_: seen.append(1))\n"
        f"pathlib.Path({str(marker)!r}).write_text('up')\n"
        "deadline = time.monotonic() + 20\n"
        "while not seen and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "time.sleep(0.5)\n"  # time for a second, forwarded SIGINT to arrive
        f"pathlib.Path({str(count)!r}).write_text(str(len(seen)))\n"
    )
    master, slave = os.openpty()
    argv = [sys.executable, "-m", "s3datafs", "run", "-v", "--", sys.executable, "-c", job]
    env = {**cli.env, "S3DATAFS_DATASETS": "[]"}
    output: list[bytes] = []
    with subprocess.Popen(
        ["setsid", "--ctty", *argv], stdin=slave, stdout=slave, stderr=slave, env=env
    ) as process:
        os.close(slave)
        # Read the terminal while the command runs, as a terminal does: read only after it
        # ended, what it wrote last can be lost (the master may see EIO before the kernel has
        # moved the slave's last output across, which a busy machine delays).
        reading = threading.Thread(target=_drain, args=(master, output), daemon=True)
        reading.start()
        try:
            deadline = time.monotonic() + 20
            while not marker.exists():
                assert process.poll() is None, "run ended before the job started"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.write(master, b"\x03")  # the terminal's Ctrl-C
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
            reading.join(10)
            os.close(master)
    terminal = b"".join(output).decode(errors="replace")
    # Two SIGINTs close together may merge into one, so the count alone cannot prove it: the
    # log says what run did.
    assert "SIGINT from the terminal: the command received it too" in terminal
    assert "forwarding" not in terminal
    assert count.read_text() == "1"


def _drain(master: int, into: list[bytes]) -> None:
    """Append what the terminal shows until every slave end is closed (EIO)."""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every slave end is closed
            return
        if not chunk:
            return
        into.append(chunk)


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_a_sigterm_to_run_as_pid_1_before_it_is_ready_stops_it_before_anything_mounts(
    cli: Cli, spec: str
) -> None:
    """The kernel drops a signal PID 1 has no handler for: ``docker stop`` while the interpreter
    was still importing was lost, and the job started. Here ``run`` is PID 1 of a new PID
    namespace and waits for its spec on stdin, before its own handlers exist."""
    marker = cli.root / "job-started"
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "s3datafs", "run",
         "--datasets", "-", "--", "touch", str(marker)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=cli.env, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        init = None
        while init is None or not _catches(init, signal.SIGTERM):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "PID 1 never caught SIGTERM while starting"
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            init = int(children.split()[0]) if children.split() else None
            time.sleep(0.01)
        os.kill(init, signal.SIGTERM)
        process.stdin.write(spec)
        process.stdin.close()
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert "interrupted by SIGTERM" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert not marker.exists(), "the job ran"
    assert_all_unmounted(cli)


def test_log_file_dash_logs_to_standard_error_for_the_whole_life_of_the_mounts(
    cli: Cli, spec: str
) -> None:
    """A container's log is its stderr (``kubectl logs``); a log file inside it is lost with it.
    The daemons keep the command's stderr once ready: their last words come after the job's."""
    done = run(cli, spec, "--log-file", "-", "--", "sh", "-c", "echo job done >&2")
    assert done.returncode == 0, done.stderr
    job_line = done.stderr.splitlines().index("job done")
    after = done.stderr.splitlines()[job_line + 1:]
    assert any(re.search(r" INFO s3datafs\.mount\[\d+\]: unmounted .*/mnist$", line)
               for line in after), done.stderr
    assert not cli.log_dir.exists() or not any(cli.log_dir.iterdir())
    assert_all_unmounted(cli)


def test_a_spec_of_no_datasets_runs_the_job_and_says_so(cli: Cli) -> None:
    done = run(cli, "[]", "--", "sh", "-c", "echo job")
    assert (done.returncode, done.stdout) == (0, "job\n")
    assert done.stderr == "s3datafs: the datasets spec lists no datasets: nothing to mount\n"
