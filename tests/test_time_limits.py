"""The suite's own time limits (conftest's ``time_limit``, ``tests/watchdog.py``), proven on
tests that hang.

Each case runs pytest in a subprocess on a small test file written here, with the limits
lowered through the environment and this directory's conftest loaded as a plugin, so its
fixtures and limits apply as they do to the suite: a real S3 server, real mounts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from watchdog import EXIT_STATUS

from s3datafs.runtime import mount_table

TESTS_DIR = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, source: str, *, test_seconds: int, watchdog_seconds: int
               ) -> subprocess.CompletedProcess[str]:
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(textwrap.dedent(source))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "S3DATAFS_TEST_SECONDS": str(test_seconds),
        "S3DATAFS_WATCHDOG_SECONDS": str(watchdog_seconds),
    }
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:faulthandler",
               "-p", "no:cacheprovider", "-q", "--basetemp", str(tmp_path / "inner"),
               str(test_file)]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_a_test_past_its_time_fails_with_its_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, """
        import time

        def test_sleeps():
            time.sleep(60)

        def test_next():
            pass
    """, test_seconds=1, watchdog_seconds=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 passed" in result.stdout
    assert "TimeoutError: the test ran past 1 s" in result.stdout
    assert "in test_sleeps" in result.stderr  # every thread's stack, on the real stderr


@pytest.mark.fuse
def test_a_hang_no_signal_reaches_ends_the_run_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """A read of a mount whose daemon is stopped waits in the kernel, where SIGALRM only asks
    the daemon to interrupt: the watchdog must end the run, unmount, and stop the daemon and
    the S3 server."""
    pids_file, inner = tmp_path / "pids", tmp_path / "inner"
    try:
        result = run_pytest(tmp_path, f"""
            import os, signal

            def test_reads_a_stopped_daemons_mount(cli, s3, make_bucket, s3server):
                bucket = make_bucket()
                s3.put_object(Bucket=bucket, Key="a.bin", Body=b"x" * 1000)
                mountpoint = cli.mount(f"s3://{{bucket}}/")
                daemon = cli.daemon_pid(mountpoint)
                with open({str(pids_file)!r}, "w") as pids:
                    pids.write(f"{{s3server.pid}} {{daemon}}")
                os.kill(daemon, signal.SIGSTOP)
                (mountpoint / "a.bin").read_bytes()

            def test_never_reached():
                pass
        """, test_seconds=2, watchdog_seconds=2)
        assert result.returncode == EXIT_STATUS, result.stdout + result.stderr
        assert "watchdog: test_inner.py::test_reads_a_stopped_daemons_mount still ran past" in (
            result.stderr
        )
        assert "in test_reads_a_stopped_daemons_mount" in result.stderr  # the stuck thread
        assert "passed" not in result.stdout
        assert not _mounts_below(inner)
        server, daemon = map(int, pids_file.read_text().split())
        assert _ended(server)
        assert _ended(daemon)
    finally:  # what a watchdog that failed its job left behind
        for point in reversed(_mounts_below(inner)):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False)
        if pids_file.exists():
            for pid in map(int, pids_file.read_text().split()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _mounts_below(directory: Path) -> list[str]:
    prefix = f"{directory}/"
    return [entry.mountpoint for entry in mount_table() if entry.mountpoint.startswith(prefix)]


def _ended(pid: int, within: float = 10) -> bool:
    """Whether ``pid`` is gone (or a zombie) within ``within`` seconds: SIGKILL takes a moment."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rpartition(")")[2].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False
