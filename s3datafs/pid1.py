"""Stop signals that reach s3datafs as a container's PID 1 before its commands can handle them.

The kernel drops a signal sent to PID 1 while PID 1 has no handler for it (init must not die
of a default action). ``s3datafs run`` is PID 1 of job containers, and the interpreter spends
its first half second or more importing before ``run`` installs ``supervisor.DeferredSignals``:
a ``docker stop`` or a pod deleted in that window was lost, the datasets were mounted and the
job ran until the grace period's SIGKILL. So importing the package as PID 1 installs
``record`` at once (``s3datafs/__init__``); ``DeferredSignals`` (``run``, ``mount-all``) and a
foreground mount's own handler (a sidecar's ``mount --foreground``) take over what it
recorded, and the command stops before mounting anything (exit 128+N).

Invariants: only PID 1 records (elsewhere a stop signal before the command is ready ends the
process, as it always did); a signal ignored from the start (nohup) stays ignored; a process
forked meanwhile (a mount daemon) acts as if this handler did not exist; what ``exec`` starts
gets the defaults back, as for every caught signal.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
received: list[int] = []


def catch_stop_signals() -> None:
    """Record stop signals from now on (PID 1 only; called as the package is imported)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, record)


def record(signum: int, _frame: FrameType | None) -> None:
    if os.getpid() != 1:  # a forked daemon: the default action, as if nobody had caught it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    received.append(signum)


def take() -> list[int]:
    """The signals recorded so far, forgotten here (their new owner acts on them)."""
    taken = received[:]
    del received[: len(taken)]
    return taken
