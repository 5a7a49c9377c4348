"""``pid1``: what the early handler of a container's PID 1 does outside PID 1, and what it keeps.

Each case that changes signal handlers runs in a forked child: pytest's own must stay as they
are. Recording as PID 1 itself is seen end to end (``test_run``, ``test_mount_signals``).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from s3datafs import pid1


def in_a_child(work: Callable[[], str]) -> tuple[str, int]:
    """``work()``'s word and the wait status of the forked child that ran it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.write(write_end, work().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as said:
        word = said.read().decode()
    return word, os.waitpid(pid, 0)[1]


def test_a_stop_signal_ignored_from_the_start_stays_ignored() -> None:
    """``nohup s3datafs run ...``: SIGHUP was to be ignored, not recorded as a stop."""

    def catch() -> str:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        pid1.catch_stop_signals()
        handlers = (signal.getsignal(signal.SIGHUP), signal.getsignal(signal.SIGTERM))
        return "kept" if handlers == (signal.SIG_IGN, pid1.record) else "caught"

    assert in_a_child(catch) == ("kept", 0)


def test_a_process_forked_from_pid_1_dies_of_a_stop_signal_as_if_never_caught() -> None:
    """A mount daemon forked before ``run`` took over the handler: SIGTERM ends it."""

    def stopped() -> str:
        signal.signal(signal.SIGTERM, pid1.record)  # inherited from PID 1
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal ends the process before this does
        return "recorded" if pid1.received else "lived on"

    word, status = in_a_child(stopped)
    assert word == ""
    assert os.WIFSIGNALED(status)
    assert os.WTERMSIG(status) == signal.SIGTERM


def test_what_was_taken_is_taken_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pid1, "received", [signal.SIGTERM, signal.SIGINT])
    assert pid1.take() == [signal.SIGTERM, signal.SIGINT]
    assert pid1.take() == []
