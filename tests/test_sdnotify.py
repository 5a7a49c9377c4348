"""sd_notify: datagrams to ``NOTIFY_SOCKET``, and READY=1/STOPPING=1 from a foreground mount."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli

from s3datafs import sdnotify


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace (no path length or cleanup issues)."""
    name = f"s3datafs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        yield sock, "@" + name


def test_notify_sends_one_datagram_to_an_abstract_socket(abstract_socket) -> None:
    sock, address = abstract_socket
    assert sdnotify.notify("READY=1", "STATUS=ok", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_sends_to_a_socket_path() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": path})
            assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234", "/nonexistent/socket"])
def test_notify_without_a_usable_socket_does_nothing(value: str) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False
    assert sdnotify.notify("READY=1", environ={}) is False


@pytest.mark.fuse
def test_a_foreground_mount_says_ready_then_stopping(
    cli: Cli, s3, make_bucket, abstract_socket
) -> None:
    sock, address = abstract_socket
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="p/a.txt", Body=b"a\n")
    target = cli.root / "fg"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "s3datafs",
            "mount",
            "--foreground",
            f"s3://{bucket}/p/",
            str(target),
        ],
        env={**cli.env, "NOTIFY_SOCKET": address},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = sock.recv(4096).decode()
        assert message.splitlines() == ["READY=1", f"STATUS=serving s3://{bucket}/p/ at {target}"]
        assert os.path.ismount(target)  # ready means usable
        assert (target / "a.txt").read_bytes() == b"a\n"
        assert cli.unmount(target).returncode == 0  # what ExecStop does: unmount and wait
        assert sock.recv(4096) == b"STOPPING=1"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        process.stderr.close()
    assert not os.path.ismount(target)


def mount_all_in_foreground(cli: Cli, address: str, spec: str) -> subprocess.Popen:
    """``mount-all --foreground -`` reading ``spec``, told to notify ``address``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "s3datafs", "mount-all", "--foreground", "-"],
        env={**cli.env, "NOTIFY_SOCKET": address},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdin.write(spec)
    process.stdin.close()
    return process


@contextlib.contextmanager
def datasets_a_and_b_served(cli: Cli, s3, make_bucket, address: str) -> Iterator[subprocess.Popen]:
    """``mount-all --foreground`` of two single-object datasets, ``a`` (a.bin) and ``b``
    (b.bin); killed and reaped at the end if the test did not stop it."""
    bucket = make_bucket()
    for name in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=f"{name}.bin", Body=name.encode())
    spec = f'[{{"uri": "s3://{bucket}/a.bin"}}, {{"uri": "s3://{bucket}/b.bin"}}]'
    process = mount_all_in_foreground(cli, address, spec)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.fuse
@pytest.mark.parametrize("daemons_too", [False, True], ids=["command", "control-group"])
def test_mount_all_foreground_says_ready_once_all_are_mounted_and_stops_cleanly(
    cli: Cli, s3, make_bucket, abstract_socket, daemons_too: bool
) -> None:
    """``daemons_too``: as systemd stops a unit by default (KillMode=control-group), SIGTERM to
    the command and to every daemon at once; the daemons unmount themselves meanwhile, which is
    no failure of the command's."""
    sock, address = abstract_socket
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"A")
    s3.put_object(Bucket=bucket, Key="b.bin", Body=b"B")
    spec = f'[{{"uri": "s3://{bucket}/a.bin"}}, {{"uri": "s3://{bucket}/b.bin"}}]'
    process = mount_all_in_foreground(cli, address, spec)
    try:
        assert sock.recv(4096).decode().startswith("READY=1\nSTATUS=serving 2 datasets: a, b")
        assert (cli.data_root / "a" / "a.bin").read_bytes() == b"A"
        assert (cli.data_root / "b" / "b.bin").read_bytes() == b"B"
        daemons = [cli.daemon_pid(cli.data_root / name) for name in ("a", "b")]
        for pid in [process.pid, *(daemons if daemons_too else [])]:
            os.kill(pid, signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert process.wait(timeout=30) == 0, process.stderr.read()  # a clean exit
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert cli.mounts_below_root() == []
    assert not Path(cli.data_root / "a").exists()


@pytest.mark.fuse
def test_mount_all_foreground_killed_outright_leaves_no_mount(
    cli: Cli, s3, make_bucket, abstract_socket
) -> None:
    """systemd's last resort is SIGKILL (after TimeoutStopSec): the daemons learn from the
    kernel that the command is gone, and unmount."""
    sock, address = abstract_socket
    bucket = make_bucket()
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"A")
    process = mount_all_in_foreground(cli, address, f'[{{"uri": "s3://{bucket}/a.bin"}}]')
    try:
        assert sock.recv(4096).startswith(b"READY=1")
        process.kill()
        process.wait(timeout=10)
        cli.wait_until_nothing_is_mounted()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    cli.expect_log("the command that mounted this .* is gone: unmounting")


@pytest.mark.fuse
def test_mount_all_foreground_says_when_a_daemon_dies_and_serves_the_others(
    cli: Cli, s3, make_bucket, abstract_socket
) -> None:
    sock, address = abstract_socket
    with datasets_a_and_b_served(cli, s3, make_bucket, address) as process:
        assert sock.recv(4096).startswith(b"READY=1")
        victim = cli.daemon_pid(cli.data_root / "a")
        os.kill(victim, signal.SIGKILL)
        assert sock.recv(4096) == b"STATUS=serving 1 of 2 datasets; a died (killed by SIGKILL)"
        assert (cli.data_root / "b" / "b.bin").read_bytes() == b"b"
        process.terminate()
        assert process.wait(timeout=30) == 0
        said = process.stderr.read()
    assert (f"s3datafs: WARNING: dataset 'a': its daemon (pid {victim}) died (killed by "
            f"SIGKILL): {cli.data_root / 'a'} is a dead mount") in said
    assert cli.mounts_below_root() == []  # the dead one too


@pytest.mark.fuse
def test_mount_all_foreground_serves_the_others_when_one_dataset_is_unmounted(
    cli: Cli, s3, make_bucket, abstract_socket
) -> None:
    """An operator unmounts one dataset of a running service: its daemon exits 0, which is
    said as an unmount (not a death), the others serve on, and the stop is still clean."""
    sock, address = abstract_socket
    with datasets_a_and_b_served(cli, s3, make_bucket, address) as process:
        assert sock.recv(4096).startswith(b"READY=1")
        assert cli.unmount(cli.data_root / "a").returncode == 0
        assert sock.recv(4096) == b"STATUS=serving 1 of 2 datasets; a unmounted"
        assert (cli.data_root / "b" / "b.bin").read_bytes() == b"b"
        process.terminate()
        assert sock.recv(4096) == b"STOPPING=1"
        assert process.wait(timeout=30) == 0
        said = process.stderr.read()
    assert "WARNING" not in said, said
    assert "died" not in said, said
    assert cli.mounts_below_root() == []
    assert not (cli.data_root / "a").exists()  # the mount points mount-all made are gone
    assert not (cli.data_root / "b").exists()
