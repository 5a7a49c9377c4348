"""The last resort against a hung test: its stacks, then nothing of the run left behind, then exit.

conftest's ``time_limit`` fails a test that runs past its time with SIGALRM. Some hangs no
signal reaches: a read of a FUSE mount whose daemon stopped answering waits in the kernel until
the daemon answers or its connection ends (a signal only makes the kernel ask the daemon to
interrupt); a worker thread trio cannot cancel. For those, ``Watchdog`` is a thread that wakes
at a deadline which the fixture sets again for every test, and then:

1. prints every thread's stack to the real stderr (the run's output may be captured);
2. lazily unmounts every FUSE mount below ``below`` (pytest's base temp dir);
3. SIGKILLs this process's children: the S3 servers, commands in flight;
4. says so in one line;
5. SIGKILLs the daemons of the ``Cli`` runners it was told of (``track``) and exits at once
   with ``EXIT_STATUS`` (124, as timeout(1) does). A dead daemon ends its FUSE connection, and
   with it the wait of a reader stuck in the kernel: that thread must not get far.

So a hang costs CI minutes, not its whole limit, and leaves no mount or server behind.

The thread needs the GIL, which a thread blocked in a system call has let go. For a hang that
holds it (a C loop), faulthandler's own timer, ``LAST_RESORT_SECONDS`` later, still prints the
stacks and exits, leaving the rest to the machine.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from s3datafs.runtime import mount_table

EXIT_STATUS = 124
LAST_RESORT_SECONDS = 30
T = TypeVar("T")


class Runner(Protocol):
    """What the watchdog needs of a ``Cli``."""

    def daemon_pids(self) -> list[int]: ...


class Watchdog:
    """A daemon thread that ends the run at a deadline; see the module docstring."""

    def __init__(self, report_fd: int) -> None:
        self._report_fd = report_fd
        self._deadline: float | None = None
        self._what = ""
        self._below: Path | None = None
        self._runners: list[Runner] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str, below: Path) -> None:
        """End the run in ``seconds`` unless ``disarm`` comes first; ``what`` names the test."""
        with self._changed:
            self._deadline = time.monotonic() + seconds
            self._what, self._below = what, below
            self._changed.notify()
        faulthandler.dump_traceback_later(
            seconds + LAST_RESORT_SECONDS, exit=True, file=self._report_fd
        )

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        with self._changed:
            self._deadline = None
            self._changed.notify()

    def track(self, runner: Runner) -> None:
        with self._changed:
            self._runners.append(runner)

    def untrack(self, runner: Runner) -> None:
        with self._changed:
            self._runners.remove(runner)

    def _watch(self) -> None:
        with self._changed:
            while self._deadline is None or time.monotonic() < self._deadline:
                left = None if self._deadline is None else self._deadline - time.monotonic()
                self._changed.wait(left)
            what, below, runners = self._what, self._below, list(self._runners)
        faulthandler.dump_traceback(file=self._report_fd, all_threads=True)
        mounts = _unmount_below(below) if below is not None else []
        children = _kill(_children())
        # The daemons last, right before the exit: a dead daemon frees the stuck thread, which
        # must not get far (its teardown would start commands that outlive the run).
        daemons = [pid for runner in runners for pid in _quietly(runner.daemon_pids, [])]
        self._report(
            f"\nwatchdog: {what} still ran past its time limit, where no signal reaches (stacks "
            f"above); unmounted {mounts}, killed child processes {children} and daemons "
            f"{daemons}; ending the run (exit status {EXIT_STATUS})\n"
        )
        _kill(daemons)
        os._exit(EXIT_STATUS)

    def _report(self, text: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._report_fd, text.encode(errors="replace"))


def _quietly(action: Callable[[], T], default: T) -> T:
    """``action()``, or ``default`` if it raises: the run is ending, do what can be done."""
    try:
        return action()
    except Exception:  # noqa: BLE001
        return default


def _unmount_below(below: Path) -> list[str]:
    """Lazily unmount every FUSE mount below ``below``, deepest first; their paths."""
    prefix = str(below).rstrip("/") + "/"
    points = [
        entry.mountpoint
        for entry in _quietly(mount_table, [])
        if entry.fstype.startswith("fuse") and entry.mountpoint.startswith(prefix)
    ]
    for point in reversed(points):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False, timeout=10,
                           capture_output=True)
    return points


def _children() -> list[int]:
    """The processes whose parent is this one (zombies aside)."""
    me, children = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
            if int(parent) == me and state != "Z":
                children.append(int(stat.parent.name))
    return children


def _kill(pids: list[int]) -> list[int]:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids
