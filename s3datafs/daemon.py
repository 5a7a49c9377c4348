"""Run a mount in the background the way mount tools do: fork first, report over a pipe.

Protocol:
- The parent forks *before* trio, threads or any connection exist (forking a threaded process is
  unsafe). What it has loaded (modules, botocore's parsed data from its settings check) the
  child inherits rather than loads again; pyfuse3, trio and the serving modules the parent of
  one daemon never loads, and the child loads them while S3 answers its pins (``mounting``); a
  command about to fork several loads them first, for all to share. The child starts a new
  session and does all the work: resolve, catalog, mount. One thread may exist at a fork:
  ``startup.read_ahead``'s, were it still advising files (it takes ~10 ms; the first fork comes
  ~300 ms after the start). The child has no copy of it; the one lock it takes, the import lock
  (to find a package), a fork takes first and hands the child free; at worst the child keeps
  the read-only descriptor of a module file it had open.
- The child writes exactly one JSON line to the pipe: ``{"ok": true, ...summary}`` once the mount
  is usable, or ``{"ok": false, "error": "...", "exit": N}`` when it failed. It then closes the pipe
  and, on success, points stdin/stdout/stderr at /dev/null so that whoever ran ``s3datafs mount``
  (a shell, a test's ``subprocess.run``) is not kept waiting on inherited descriptors; stderr
  stays when it is the log (``--log-file -``, asked for: a container's or a service's log).
- The parent returns the child's verdict; a child that dies without a word is a failure that
  points at the log file. Only the child ever touches the mount.
- A child whose ready line cannot be delivered (the mount command was killed, or interrupted,
  while it waited) unmounts at once and exits: nobody asked for that mount any more.
- The child closes the descriptors the mount command was started with (above 2; see
  ``note_inherited_descriptors``): a caller's ``flock`` on a job lock, or a pipe whose reader
  waits for EOF, would otherwise be held for as long as the mount lives.
- The command's death is also sent to the child as ``PARENT_GONE`` (``PR_SET_PDEATHSIG``), so a
  child stuck on its way to the mount (S3 not answering) gives up at once rather than after
  its retries: before the mount is ready the signal raises ``Abandoned`` wherever the child
  is. A mount that is to outlive its command (``s3datafs mount``) stops listening once ready
  (``mount-all``'s are held first: below); one that is not (``run``, ``mount-all
  --foreground``: their datasets are the command's, for as long as it lives) keeps the signal,
  and its serving loop unmounts on it (see ``mount.serve``): a ``run`` killed with SIGKILL
  leaves no mount behind, nor the mount point directories it made (a daemon removes what was
  made for its mount when it ends, see ``commands.mount``). The kernel's notice is of the end
  of the *thread* that forked: ``spawn`` is called from the main thread, which lives as long
  as the command.
- A mount *held* until released (``held=True``: each of ``mount-all``'s datasets, all or
  nothing) is to outlive its command only once the command says so (``release``), after every
  dataset has mounted: a command killed outright before that (SIGKILL, the OOM killer, a time
  limit) leaves no mount behind either. The word comes over a pipe of its own, not a signal: the
  command writes one byte and may exit at once; the daemon, which stopped listening to the
  kernel's notice when ready, reads the byte before the pipe's end, so a release is never taken
  for a death. The pipe's end without the byte (the command died) is ``PARENT_GONE`` to the
  serving loop. Daemons forked later close the write ends of the earlier ones' pipes, which
  they inherit, so each pipe ends with the command.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from . import logsetup, startup
from .errors import S3DataFSError
from .quietthread import start_quiet_thread

log = logging.getLogger(__name__)

Report = Callable[[dict], None]


PARENT_GONE = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1
_INHERITED: dict[int, tuple[int, int]] = {}  # descriptor -> (device, inode) at start
_HELD: dict[int, int] = {}  # pid of a daemon held until released -> write end of its pipe
_RELEASE = b"r"


def note_inherited_descriptors() -> None:
    """Remember the descriptors above 2 this process was started with, for a daemon forked
    later to close (called first thing by the command line and the mount helper)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                info = os.fstat(fd)
                _INHERITED[fd] = (info.st_dev, info.st_ino)


def _close_inherited(keep: int) -> None:
    """Close what ``note_inherited_descriptors`` saw, unless the number is now another file's."""
    for fd, identity in _INHERITED.items():
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            if fd != keep and (info.st_dev, info.st_ino) == identity:
                os.close(fd)


def spawn(
    child_main: Callable[[Report], None], *, log_hint: str, outlive_command: bool = True,
    held: bool = False,
) -> dict:
    """Fork; run ``child_main(report)`` in a detached child; return the child's report.

    ``outlive_command``: the mount stays when this process ends (else see the module
    docstring); ``held``: only once ``release``d (see the module docstring)."""
    command = os.getpid()
    read_fd, write_fd = os.pipe()
    release_fd, hold_fd = os.pipe() if held else (-1, -1)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, observed through the tests' mounts
        os.close(read_fd)
        for fd in (hold_fd, *_HELD.values()):  # the command's ends: each pipe ends with it
            if fd >= 0:
                os.close(fd)
        os._exit(_child(child_main, write_fd, command, outlive_command, release_fd))
    os.close(write_fd)
    if held:
        os.close(release_fd)
        _HELD[pid] = hold_fd
    with os.fdopen(read_fd, "rb") as pipe:
        line = pipe.readline()
    try:
        verdict = json.loads(line)
    except ValueError:
        verdict = None
    if not isinstance(verdict, dict) or "ok" not in verdict:
        os.waitpid(pid, 0)
        let_go(pid)
        return {"ok": False, "exit": 1, "error": f"the mount daemon died during start: {log_hint}"}
    if not verdict["ok"]:
        os.waitpid(pid, 0)  # it exits right after reporting; reap it
        let_go(pid)
    return verdict


def release(pid: int) -> None:
    """Let the daemon ``pid``, held until now, outlive this command."""
    fd = _HELD.pop(pid)
    try:
        os.write(fd, _RELEASE)
    except OSError:  # it is gone already (unmounted meanwhile): nothing to release
        pass
    finally:
        os.close(fd)


def let_go(pid: int) -> None:
    """Close the pipe of a held daemon that was unmounted (or failed): nothing more to say. If
    it still serves (detached lazily, or an unmount that failed) it hears the command died."""
    fd = _HELD.pop(pid, None)
    if fd is not None:
        os.close(fd)


def _child(
    child_main: Callable[[Report], None], write_fd: int, command: int, outlive_command: bool,
    release_fd: int,
) -> int:
    os.setsid()
    os.chdir("/")
    _close_inherited(keep=write_fd)
    pipe = os.fdopen(write_fd, "w", encoding="utf-8")

    def report_ready(summary: dict) -> None:
        if release_fd >= 0:  # held: from now on the pipe tells whether the command let go
            _signal_when_parent_dies(0)
            try:
                start_quiet_thread(_await_release, name="release", args=(release_fd,))
            except RuntimeError:  # no thread to be had: this mount outlives the command at once
                log.warning("cannot wait for mount-all to finish (no thread): this mount stays "
                            "even if a later dataset fails")
                signal.signal(PARENT_GONE, signal.SIG_IGN)
        elif outlive_command:  # from now on the command's end is no news to this mount
            _signal_when_parent_dies(0)
            signal.signal(PARENT_GONE, signal.SIG_IGN)  # which drops one sent already
        if not _send(pipe, {"ok": True, **summary}):  # the mount command was stopped meanwhile
            raise Abandoned("the mount command is gone")
        logsetup.detach_console()
        _detach_stdio()
        startup.settle()  # serve with the usual garbage collection (start-up objects frozen)

    try:
        signal.signal(PARENT_GONE, _abandon)
        _signal_when_parent_dies(PARENT_GONE)
        if os.getppid() != command:  # it died before the kernel was told to say so
            raise Abandoned("the mount command is gone")
        child_main(report_ready)
        return 0
    except Abandoned:
        logsetup.detach_console()  # whoever ran the command has moved on: the log file only
        log.warning("the mount command is gone: unmounting what nobody waits for any more")
        return 1
    except S3DataFSError as exc:
        log.debug("mount failed", exc_info=True)
        _send(pipe, {"ok": False, "error": str(exc), "exit": exc.exit_code})
    except BaseException as exc:
        log.exception("mount daemon failed")
        _send(pipe, {"ok": False, "exit": 1, "error": f"internal error: {type(exc).__name__}"})
    return 1


def _await_release(release_fd: int) -> None:
    """In a held daemon: the pipe's end before the release byte means the command died."""
    try:
        released = os.read(release_fd, 1) == _RELEASE
    except OSError:
        released = False
    finally:
        os.close(release_fd)
    if not released:
        os.kill(os.getpid(), PARENT_GONE)  # the serving loop unmounts (see mount.serve)


class Abandoned(BaseException):  # an interruption, never to be handled as an error on the way
    """The mount command stopped waiting (killed, or Ctrl-C) before the mount was ready."""


def _abandon(signum: int, frame: object) -> None:
    raise Abandoned("the mount command is gone")


def _signal_when_parent_dies(signum: int) -> None:
    """Have the kernel send ``signum`` when the parent dies (0: nothing)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _send(pipe, message: dict) -> bool:  # a text file object
    """Whether ``message`` reached the mount command."""
    if pipe.closed:
        return False
    try:
        pipe.write(json.dumps(message) + "\n")
        pipe.close()
    except OSError:  # the parent is gone (killed); nothing to tell
        return False
    return True


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if logsetup.logs_to_stderr() else (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
