"""Background threads that never take the process's signals.

Why: a signal sent to a process goes to any one of its threads that does not block it. The
daemon blocks its stop signals while a stop would leave a dead mount (from the kernel mount
until its signal receiver is in place, and from the loop's end until the unmount), and the
supervisor blocks the signals it waits for (``sigtimedwait``); both rely on no other thread
taking them, where the default action ends the process. A thread started earlier with the
signals unblocked did take them: a daemon stopped right after the kernel mount left a dead
mount once the slow-answer watcher (``slowanswer``) was running.

Invariant: threads of our own that outlive the call that starts them are started here, with
every signal blocked (a thread keeps the mask it was started with; the starting thread's own
mask is put back at once), or are a ``QuietThreadPool``'s, which block them first thing (a pool
starts its threads in whichever thread submits work, with that thread's mask: a review found
the zip cache's writer taking SIGTERM after the serving loop's end).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def start_quiet_thread(
    target: Callable[..., object], *, name: str, args: tuple[Any, ...] = ()
) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` with every signal blocked; raises what
    ``Thread.start`` raises (``RuntimeError`` when no thread can be started)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def block_every_signal() -> None:
    """Block every signal in the calling thread (a pool's threads, as they start)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


class QuietThreadPool(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose threads block every signal before any work."""

    def __init__(self, max_workers: int, *, thread_name_prefix: str) -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix,
                         initializer=block_every_signal)
