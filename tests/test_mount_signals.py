"""Stop signals while a mount starts: whatever moment they come, nothing is left mounted.

A mount command stopped while it waits (``timeout 5 s3datafs mount ...``, Ctrl-C, a service
manager giving up) must not leave its daemon to mount anyway; a daemon stopped in the moment
between the kernel mount and its signal receiver must not leave a dead mount; a foreground mount
stopped while it pins must remove the mount point it created. The listing is slowed down with the
fault proxy to make "while it waits" last long enough to aim at.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Cli
from zipcraft import make_zip

from s3datafs import runtime
from s3datafs.quietthread import QuietThreadPool, start_quiet_thread
from s3datafs.runtime import mount_table, pid_alive

pytestmark = pytest.mark.fuse


@pytest.fixture
def bucket(s3, make_bucket) -> str:
    name = make_bucket()
    s3.put_object(Bucket=name, Key="p/a.txt", Body=b"a\n")
    return name


def start(cli: Cli, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "s3datafs", *args], env=env or cli.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def children(pid: int) -> list[int]:
    """The mount daemons ``pid`` forked: its children running s3datafs that lead a session of
    their own (a daemon's first step). Importing trio runs ``ldconfig`` in a child of its own,
    which is no daemon, and which runs s3datafs too until it has exec'd (a review saw a test
    kill that child instead of the daemon)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return [child for child in found
            if b"s3datafs" in _cmdline(child) and _session_of(child) == child]


def _session_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[3])  # after the name: state ppid pgrp sid


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def mounted_at(path: Path) -> bool:
    return any(entry.mountpoint == str(path) for entry in mount_table())


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_mount_command_stopped_while_it_waits_leaves_no_mount(
    cli: Cli, proxy, bucket: str, signum: int
) -> None:
    proxy.inject("delay", op="ListObjectsV2", seconds=2.0, times=None)
    target = cli.root / "mnt"
    target.mkdir()
    command = start(cli, "mount", f"s3://{bucket}/p/", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        proxy.wait_injected(1, timeout=30)  # the daemon is listing (each list waits 2 s)
        daemons = children(command.pid)
        assert daemons, "no daemon yet"
        command.send_signal(signum)
        command.communicate(timeout=30)
        assert command.returncode != 0
        wait_gone(daemons)  # it mounted, could not say so, and unmounted
        assert not mounted_at(target)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    cli.expect_log("mount command is gone")


def test_a_mount_command_killed_while_s3_stalls_takes_its_daemon_and_mount_point_along(
    cli: Cli, proxy, bucket: str
) -> None:
    """SIGKILL (``timeout -s KILL``, an OOM kill): the kernel tells the daemon, which gives up
    at once (not after its retries) and removes the mount point the command made."""
    proxy.inject("stall", op="ListObjectsV2", times=None)
    target = cli.root / "made" / "mnt"
    command = start(cli, "mount", f"s3://{bucket}/p/", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        proxy.wait_injected(1, timeout=30)  # the daemon waits for S3
        daemons = children(command.pid)
        assert daemons
        command.kill()
        command.communicate(timeout=30)
        wait_gone(daemons, timeout=5)
        assert not (cli.root / "made").exists()
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
        proxy.clear()
    cli.expect_log("mount command is gone")


def test_an_abandoned_daemon_leaves_the_mount_point_to_the_next_command_there(
    cli: Cli, proxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed command's lock on the mount point went with it; the next command, holding it
    now, may be preparing that very directory: the daemon must not remove it under it."""
    proxy.inject("stall", op="ListObjectsV2", times=None)
    target = cli.root / "made" / "mnt"
    command = start(cli, "mount", f"s3://{bucket}/p/", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    monkeypatch.setenv("S3DATAFS_RUNTIME_DIR", cli.env["S3DATAFS_RUNTIME_DIR"])
    daemons: list[int] = []
    try:
        proxy.wait_injected(1, timeout=30)
        (daemon,) = daemons = children(command.pid)
        os.kill(daemon, signal.SIGSTOP)  # so that the next command surely comes first
        command.kill()
        command.wait(timeout=30)  # (its pipes stay open in the stopped daemon)
        with runtime.mounting(str(target)):  # the next command
            os.kill(daemon, signal.SIGCONT)
            wait_gone([daemon], timeout=5)
            assert target.is_dir()
    finally:
        for pid in daemons:  # a stopped daemon must not outlive a failed test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if command.poll() is None:
            command.kill()
            command.communicate()
        proxy.clear()
    cli.expect_log("mount command is gone")


def test_a_daemon_killed_while_it_lists_fails_the_mount_pointing_at_its_log(
    cli: Cli, proxy, bucket: str
) -> None:
    proxy.inject("delay", op="ListObjectsV2", seconds=2.0, times=None)
    target = cli.root / "mnt"
    command = start(cli, "mount", f"s3://{bucket}/p/", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        deadline = time.monotonic() + 30
        while not (daemons := children(command.pid)):
            assert time.monotonic() < deadline, "no daemon"
            time.sleep(0.01)
        os.kill(daemons[0], signal.SIGKILL)  # no word said: the command must notice anyway
        _out, err = command.communicate(timeout=30)
        assert command.returncode == 1
        assert err == ("s3datafs: the mount daemon died during start: "
                       f"see {cli.log_dir / 'p.log'}\n")
        assert not target.exists()  # the mount point it made is removed
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()


@pytest.mark.parametrize("attempt", range(3))
def test_a_daemon_stopped_right_after_the_kernel_mount_leaves_no_dead_mount(
    cli: Cli, bucket: str, attempt: int
) -> None:
    target = cli.root / "mnt"
    target.mkdir()
    command = start(cli, "mount", f"s3://{bucket}/p/", str(target))
    daemons: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not mounted_at(target):  # aim at the moment the kernel has the mount
            daemons = children(command.pid) or daemons
            assert time.monotonic() < deadline, "never mounted"
        for daemon in daemons:
            os.kill(daemon, signal.SIGTERM)
        command.communicate(timeout=30)
        wait_gone(daemons)
        assert not mounted_at(target), "a stop signal in the start window left a (dead) mount"
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_foreground_mount_stopped_while_it_pins_removes_the_mount_point_it_made(
    cli: Cli, proxy, bucket: str, stop: signal.Signals
) -> None:
    proxy.inject("delay", op="ListObjectsV2", seconds=3.0, times=None)
    target = cli.root / "new" / "mnt"
    command = start(cli, "mount", "--foreground", f"s3://{bucket}/p/", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        deadline = time.monotonic() + 10
        while not target.is_dir():
            assert time.monotonic() < deadline, "the mount point was never made"
            time.sleep(0.05)
        proxy.wait_injected(1, timeout=30)  # it pins: its listing waits 3 s
        command.send_signal(stop)
        command.communicate(timeout=30)
        assert command.returncode == 128 + stop
        assert not (cli.root / "new").exists()
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()


def test_two_mounts_at_one_place_at_once_make_one_mount(cli: Cli, proxy, bucket: str) -> None:
    """Both would find the place free while the first still lists: the second is told."""
    proxy.inject("delay", op="ListObjectsV2", seconds=2.0, times=None)
    env = {**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    target = cli.root / "shared"
    first = start(cli, "mount", f"s3://{bucket}/p/", str(target), env=env)
    try:
        proxy.wait_injected(1, timeout=30)  # the first lists (2 s), holding the place
        second = cli.run("mount", f"s3://{bucket}/p/", str(target), "--name", "other", env=env)
        assert second.returncode == 1
        assert second.stderr == (f"s3datafs: {target}: another s3datafs mount there is under "
                                 "way: wait for it, or choose another mount point\n")
        first.communicate(timeout=30)
        assert first.returncode == 0
        assert sum(entry.mountpoint == str(target) for entry in mount_table()) == 1
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()


def test_a_foreground_zip_mount_stopped_while_s3_stalls_exits_at_once(
    cli: Cli, s3, make_bucket, proxy
) -> None:
    """systemd stops ``mount --foreground`` with SIGTERM: the archive's spans read ahead and
    stuck on a stalled S3 must not hold the process (it took ~60 s, a GET's deadline)."""
    bucket = make_bucket()
    members = {f"m{i:03d}.bin": os.urandom(256 * 1024) for i in range(160)}
    s3.put_object(Bucket=bucket, Key="d.zip", Body=make_zip(members))
    target = cli.root / "mnt"
    command = start(cli, "mount", "--foreground", f"s3://{bucket}/d.zip", str(target),
                    env={**cli.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    stuck: subprocess.Popen | None = None
    try:
        deadline = time.monotonic() + 30
        while not mounted_at(target):
            assert command.poll() is None, "the mount command ended"
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.05)
        names = sorted(members)
        for name in names[:20]:  # in archive order: spans grow, and are read ahead
            assert (target / name).read_bytes() == members[name]
        proxy.inject("stall", times=None)
        for name in names[20:]:  # on until a read waits on the stalled S3
            stuck = subprocess.Popen(["cat", str(target / name)], stdout=subprocess.DEVNULL)
            try:
                stuck.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                break
        assert proxy.injected_count("stall"), "no GET reached the stalled S3"
        stopped = time.monotonic()
        command.send_signal(signal.SIGTERM)
        command.communicate(timeout=60)
        assert time.monotonic() - stopped < 10
        assert not mounted_at(target)
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
        if command.poll() is None:
            command.kill()
            command.communicate()



def test_sigterm_stops_a_busy_foreground_mount_at_once(cli: Cli, bucket: str) -> None:
    """What ``systemctl stop`` of ``s3datafs@.service`` does: ``unmount`` refuses a busy mount,
    SIGTERM does not. The daemon detaches it, exits 0, and a file still open fails cleanly."""
    target = cli.root / "mnt"
    target.mkdir()
    command = start(cli, "mount", "--foreground", f"s3://{bucket}/p/", str(target))
    held = None
    try:
        deadline = time.monotonic() + 30
        while not mounted_at(target):
            assert command.poll() is None, command.communicate()[1]
            assert time.monotonic() < deadline, "never mounted"
            time.sleep(0.05)
        held = open(target / "a.txt", "rb")  # noqa: SIM115 - open across the stop on purpose
        assert "is busy" in cli.run("unmount", str(target)).stderr
        command.send_signal(signal.SIGTERM)
        command.communicate(timeout=30)
        assert command.returncode == 0
        assert not mounted_at(target)
        with pytest.raises(OSError, match="not connected") as raised:
            held.read()
        assert raised.value.errno == errno.ENOTCONN
    finally:
        if held is not None:
            held.close()
        if command.poll() is None:
            command.kill()
            command.communicate()


def unit_command(directive: str) -> list[str]:
    """The s3datafs arguments of ``directive`` in packaging's ``s3datafs@.service``."""
    unit = Path(__file__).resolve().parent.parent / "packaging/systemd/s3datafs@.service"
    line = next(line for line in unit.read_text().splitlines() if line.startswith(directive + "="))
    command = line.partition("=")[2].lstrip("-").split()
    assert command[0].endswith("/s3datafs"), line
    return command[1:]


def test_the_service_starts_again_after_its_daemon_was_killed(cli: Cli, bucket: str) -> None:
    """A daemon killed outright (the OOM killer) leaves a dead mount, which the next start of
    ``s3datafs@.service`` would refuse; its ExecStopPost, which systemd runs however the main
    process ended, clears it. Here the unit's own commands, with %f and the URI filled in."""
    target = cli.root / "mnt"
    target.mkdir()
    fill = {"%f": str(target), "${S3DATAFS_URI}": f"s3://{bucket}/p/", "$S3DATAFS_OPTIONS": ""}
    execstart = [fill.get(word, word) for word in unit_command("ExecStart")]
    execstoppost = [fill.get(word, word) for word in unit_command("ExecStopPost")]
    for attempt in range(2):
        command = start(cli, *filter(None, execstart))
        try:
            deadline = time.monotonic() + 30
            while not mounted_at(target):
                assert command.poll() is None, f"start {attempt}: {command.communicate()[1]}"
                assert time.monotonic() < deadline, "never mounted"
                time.sleep(0.05)
            command.send_signal(signal.SIGKILL)
            command.communicate(timeout=30)
            assert mounted_at(target)  # dead: nobody unmounted it
        finally:
            if command.poll() is None:
                command.kill()
                command.communicate()
        assert cli.run(*execstoppost).returncode == 0
        assert not mounted_at(target)
    nothing = cli.run(*execstoppost)  # after a clean stop there is nothing to unmount
    assert (nothing.returncode, nothing.stdout) == (
        0, f"s3datafs: nothing is mounted at {target}\n")


def test_a_failed_start_of_the_service_leaves_a_live_mount_there_alone(
    cli: Cli, bucket: str
) -> None:
    """Something is mounted at %f already (by hand, or by fstab too): the unit's start fails,
    and its ExecStopPost, which systemd runs then as well, must not take that mount away."""
    target = cli.mount(f"s3://{bucket}/p/", str(cli.root / "mnt"))
    fill = {"%f": str(target), "${S3DATAFS_URI}": f"s3://{bucket}/p/", "$S3DATAFS_OPTIONS": ""}
    execstart = [fill.get(word, word) for word in unit_command("ExecStart")]
    execstoppost = [fill.get(word, word) for word in unit_command("ExecStopPost")]
    assert cli.run(*filter(None, execstart)).returncode != 0  # already a mount point
    left = cli.run(*execstoppost)
    assert (left.returncode, left.stdout) == (
        0, f"s3datafs: {target} is served by a live daemon: left as it is\n")
    assert (target / "a.txt").read_bytes() == b"a\n"


_WAITING_KEYS = """\
import json, pathlib, sys, time
pathlib.Path(sys.argv[1]).touch()
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.02)
print(json.dumps({"Version": 1, "AccessKeyId": "testing", "SecretAccessKey": "testing"}))
"""


def test_a_foreground_mount_as_pid_1_stopped_while_it_starts_mounts_nothing(
    cli: Cli, bucket: str, tmp_path: Path
) -> None:
    """``mount --foreground`` as a container's PID 1 (a sidecar): a SIGTERM before the command
    has a handler of its own (importing, getting keys) was dropped by the kernel, and the
    mount then served until the grace period's SIGKILL left a dead mount. Here the keys come
    from a ``credential_process`` that waits, and the signal comes meanwhile."""
    script, asked, answer = tmp_path / "keys.py", tmp_path / "asked", tmp_path / "answer"
    script.write_text(_WAITING_KEYS)
    config = tmp_path / "aws-config"
    config.write_text(f"[profile slow]\ncredential_process = {sys.executable} {script} {asked} "
                      f"{answer}\n")
    env = {**cli.env, "AWS_CONFIG_FILE": str(config)}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name)
    target = cli.root / "made" / "mnt"
    command = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "s3datafs", "mount",
         "--foreground", "--profile", "slow", f"s3://{bucket}/p/", str(target)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not asked.exists():
            assert command.poll() is None, command.communicate()
            assert time.monotonic() < deadline, "the keys were never asked for"
            time.sleep(0.02)
        (init,) = [int(pid) for pid in
                   Path(f"/proc/{command.pid}/task/{command.pid}/children").read_text().split()]
        os.kill(init, signal.SIGTERM)
        answer.touch()
        command.communicate(timeout=30)
        assert command.returncode == 128 + signal.SIGTERM
        assert not mounted_at(target)
        assert not (cli.root / "made").exists()
    finally:
        answer.touch()
        if command.poll() is None:
            command.kill()
            command.communicate()
        if mounted_at(target):
            subprocess.run(["fusermount3", "-u", "-z", str(target)], check=False)


def test_our_background_threads_never_take_the_process_s_signals() -> None:
    """A stop signal goes to any thread that does not block it: the daemon's start window and
    the supervisor's waits rely on every thread of ours blocking them (a watcher thread that
    did not made a daemon stopped right after the kernel mount die, leaving a dead mount)."""
    seen: list[set[int]] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    start_quiet_thread(lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                       name="t").join(5)
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1} <= seen[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the caller's mask is back


def test_a_pool_of_ours_takes_no_signal() -> None:
    """A pool starts its threads in whichever thread submits work, with that thread's mask."""
    with QuietThreadPool(1, thread_name_prefix="t") as pool:
        blocked = pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result(5)
    assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= blocked


SERVED_TO_THE_END = """
import signal, sys, threading, time
from pathlib import Path
from s3datafs import mount

worker = None

def serving_loop(*_args):
    # trio's receiver unblocks the stop signals in the main thread; its worker threads,
    # started then, keep them unblocked
    global worker
    signal.pthread_sigmask(signal.SIG_UNBLOCK, mount._SERVING_SIGNALS)
    worker = threading.Thread(target=threading.Event().wait, daemon=True)
    worker.start()

def unmount(unmount):  # between the loop's end and the unmount: a SIGTERM to that worker
    signal.pthread_kill(worker.ident, signal.SIGTERM)
    time.sleep(0.2)

mount._init = lambda *_args: None
mount._device_at = lambda _mountpoint: None
mount._covered_by = lambda *_args: None
mount.connection.fuse_descriptors = lambda: set()
mount.trio.run = serving_loop
mount.pyfuse3.close = unmount
mount.serve(object(), Path("/nowhere"), [], on_ready=lambda: None)
print("served to the end")
"""


def test_a_stop_signal_after_the_serving_loop_ends_the_process_no_more() -> None:
    """From the loop's end to the unmount, a stop signal taken by one of trio's workers (its
    signals unblocked) ran the default action: the daemon died before unmounting."""
    done = subprocess.run([sys.executable, "-c", SERVED_TO_THE_END], capture_output=True,
                          text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout) == (0, "served to the end\n"), done.stderr
