"""Keys in memory stay out of core files and out of other processes' reach (``PR_SET_DUMPABLE``).

Every s3datafs process may hold AWS keys in memory: a mount daemon for as long as it serves,
``mount-all`` and ``run`` (and each of their daemons) those of every dataset of the spec, which
Python cannot scrub from memory. A process that is not *dumpable* leaves no core file when it
crashes (``systemd-coredump`` keeps those on disk for days), and no other process of its user can
read its memory (``ptrace``, ``/proc/PID/mem``) or ``/proc/PID/environ`` (keys given in ``AWS_*``
variables); root still can (a debugger or ``py-spy`` run as root). ssh-agent and gpg-agent do
the same.

- Set once at the command's start (``cli.main``); the daemons forked later inherit it. A program
  that ``run`` starts is dumpable again: the kernel resets the flag at ``execve``.
- ``/proc/PID`` files of a process that is not dumpable belong to root: a user's process can no
  longer read even its own ``/proc/self/environ`` (nothing here does; ``envblock`` works on
  memory), while it can still name itself (``comm``) and list ``/proc/self/fd``.
- It never fails a command (another kernel, a seccomp filter): the mount goes on without.
"""

from __future__ import annotations

import contextlib
import ctypes

_PR_SET_DUMPABLE = 4


def refuse_core_dumps() -> None:
    """Make this process (and the children it forks) not dumpable."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)

