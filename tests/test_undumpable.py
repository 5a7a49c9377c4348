"""undumpable: s3datafs processes hold keys in memory, so none of them is dumpable.

Checked in child processes (the flag is per process, and a test must not change pytest's), one of
them run as an unprivileged user: the case the flag is for, where ``/proc/PID`` files turn root's
(what a daemon still does there must go on working).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from s3datafs import mounting, undumpable

NOBODY = 65534
GET_DUMPABLE = "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    return result.stdout


def as_nobody(work) -> list[str]:
    """``work()``'s lines from a forked child that became an unprivileged user (root's Python
    may not be executable by it: no exec, the child goes on with this interpreter)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, "\n".join(work()).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        lines = output.read().splitlines()
    assert os.waitpid(pid, 0)[1] == 0
    return lines


def test_every_command_makes_its_process_undumpable(tmp_path) -> None:
    code = ("from s3datafs import cli, mount_helper\n"
            f"cli.main(['cache', 'stats', '--cache-dir', {str(tmp_path)!r}])\n"
            f"{GET_DUMPABLE}\n")
    assert python(code).splitlines()[-1] == "0"
    assert python(f"from s3datafs import mount_helper\nmount_helper.main(['--help'])\n"
                  f"{GET_DUMPABLE}\n").splitlines()[-1] == "0"


def test_the_command_run_starts_is_dumpable_again() -> None:
    """``run``'s job (here with a spec of no datasets, so nothing is mounted) is dumpable: the
    kernel resets the flag at ``execve``, and nothing of ours sets it in the job."""
    result = subprocess.run(
        [sys.executable, "-m", "s3datafs", "run", "--datasets", "-", "--",
         sys.executable, "-c", GET_DUMPABLE],
        input="[]", capture_output=True, text=True, check=True, timeout=60, cwd="/")
    assert result.stdout.strip() == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_undumpable_users_process_still_names_itself_and_lists_its_descriptors() -> None:
    def work() -> list[str]:
        undumpable.refuse_core_dumps()
        mounting._name_process("imagenet-train")  # as a daemon names itself
        with open("/proc/self/comm") as comm:
            name = comm.read().strip()
        dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        return [name, str(len(os.listdir("/proc/self/fd")) > 2), str(dumpable)]

    assert as_nobody(work) == ["s3datafs/imagen", "True", "0"]
