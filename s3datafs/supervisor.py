"""Process plumbing for commands that stay while datasets are mounted (``run``, ``mount-all -f``).

Three duties, each the way shells and init-style wrappers (tini, dumb-init) do it:

- **No signal lost while mounting.** ``DeferredSignals`` records SIGTERM/SIGINT/SIGHUP instead of
  dying, so a stop request in the middle of mounting still ends with everything unmounted. A
  daemon forked meanwhile inherits the handler; in any other process it re-raises the signal with
  the default action, so daemons behave exactly as without it. As PID 1 it also takes over
  what ``pid1`` recorded before it was there.
- **Run the job as our child, signals forwarded.** ``run_command`` blocks the stop signals and
  SIGCHLD and waits for them with ``sigtimedwait``: no handler races, and ``si_code`` tells a
  signal someone *sent* us (``kill``, ``docker stop``: forwarded to the job) from one the terminal
  generated for the whole foreground process group (Ctrl-C: the job got it already; forwarding
  would deliver it twice). The job is started with ``posix_spawnp`` and an empty signal mask, with
  SIGPIPE and SIGXFSZ back to their defaults (Python ignores them; the job must not inherit that).
- **Reap every child.** As PID 1 of a container we inherit orphans; every SIGCHLD reaps all
  exited children, remembering the job's status. The exit status is the shell's: the job's own,
  or 128+N when signal N ended it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any

from . import pid1
from .errors import S3DataFSError
from .pid1 import STOP_SIGNALS

log = logging.getLogger(__name__)

SI_KERNEL = 0x80  # si_code of signals the kernel generates, e.g. the terminal's Ctrl-C
_RESET_IN_JOB = (signal.SIGPIPE, signal.SIGXFSZ)
# Also reap without a SIGCHLD now and then: a thread that does not block SIGCHLD (none of ours;
# maybe a library's) would take it instead of sigtimedwait.
POLL_SECONDS = 1.0


class CommandNotRunnable(S3DataFSError):
    """The job command could not be started (127: not found, 126: not executable), as shells say."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DeferredSignals:
    """Within ``with``: stop signals are recorded in ``received`` instead of acting."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._owner = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        for signum in _stop_signals():  # an ignored one (nohup) stays ignored, also in the job
            self._previous[signum] = signal.signal(signum, self._record)
        self.received.extend(pid1.take())  # what came to PID 1 before there was this handler
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self._owner:  # a forked daemon: act as if this handler did not exist
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("received %s: stopping once mounting is done", signal.Signals(signum).name)
        self.received.append(signum)


def _stop_signals() -> set[int]:
    """The stop signals this process does not ignore."""
    return {signum for signum in STOP_SIGNALS if signal.getsignal(signum) != signal.SIG_IGN}


def exit_status(wait_status: int) -> int:
    """A ``waitpid`` status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def run_command(argv: Sequence[str], env: Mapping[str, str], *, pending: Sequence[int] = ()) -> int:
    """Run ``argv`` to completion with stop signals forwarded; return its shell exit status.

    ``pending`` is ``DeferredSignals.received``: looked at once the signals are blocked, so a stop
    request that came before cannot be lost (the command is then not started: 128+N).
    """
    waited = {*_stop_signals(), signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        if pending:
            return 128 + pending[0]
        pid = _spawn(argv, env)
        status: int | None = None
        while status is None:
            info = signal.sigtimedwait(waited, POLL_SECONDS)
            if info is not None and info.si_signo != signal.SIGCHLD:
                _forward(pid, info)
            else:
                status = reap_children().get(pid)
        return exit_status(status)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def hold(
    daemons: Iterable[int],
    *,
    pending: Sequence[int] = (),
    on_exit: Callable[[int, int], None] = lambda pid, status: None,
) -> int:
    """Wait for a stop signal (returned) or for every daemon in ``daemons`` to exit (0);
    ``on_exit(pid, wait status)`` is told of each daemon that exits meanwhile."""
    waited = {*_stop_signals(), signal.SIGCHLD}
    alive = set(daemons)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        if pending:
            return pending[0]
        while alive:
            info = signal.sigtimedwait(waited, POLL_SECONDS)
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.info("received %s: unmounting", signal.Signals(info.si_signo).name)
                return info.si_signo
            for pid, status in reap_children().items():
                if pid in alive:
                    alive.discard(pid)
                    on_exit(pid, status)
        log.info("every mount is gone: stopping")
        return 0
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reap(pid: int, *, timeout: float = 10.0) -> None:
    """Wait (up to ``timeout``) for our child ``pid`` to be gone, reaping it.

    A process can look dead in /proc (its main thread a zombie) a moment before the last of its
    threads is, and only then can it be reaped; a child left unreaped when we exit would stay a
    zombie of PID 1.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child, or reaped already
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def reap_children() -> dict[int, int]:
    """Reap every exited child; return {pid: wait status}."""
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped[pid] = status


def _spawn(argv: Sequence[str], env: Mapping[str, str]) -> int:
    try:
        try:
            return os.posix_spawnp(
                argv[0], list(argv), dict(env), setsigmask=set(), setsigdef=_RESET_IN_JOB
            )
        except OSError as exc:
            script = _shell_script(exc, argv[0], env)
            if script is None:
                raise
            # An executable file with no #! line is a shell script, as execvp and shells run it.
            return os.posix_spawn(
                _SHELL, [_SHELL, script, *argv[1:]], dict(env), setsigmask=set(),
                setsigdef=_RESET_IN_JOB,
            )
    except FileNotFoundError:
        raise CommandNotRunnable(f"command not found: {argv[0]}", 127) from None
    except PermissionError:
        raise CommandNotRunnable(f"command not executable: {argv[0]}", 126) from None
    except OSError as exc:
        raise CommandNotRunnable(f"cannot run {argv[0]}: {exc.strerror}", 126) from None


_SHELL = "/bin/sh"


def _shell_script(exc: OSError, command: str, env: Mapping[str, str]) -> str | None:
    """The path of ``command`` if the kernel refused it as no executable format (ENOEXEC)."""
    if exc.errno != errno.ENOEXEC:
        return None
    return command if "/" in command else shutil.which(command, path=env.get("PATH"))


def _forward(pid: int, info: signal.struct_siginfo) -> None:
    name = signal.Signals(info.si_signo).name
    if info.si_code == SI_KERNEL:
        log.info("%s from the terminal: the command received it too", name)
        return
    log.info("forwarding %s to the command (pid %d)", name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, info.si_signo)
