"""How the command line spends less time starting and exiting: the garbage collector's part.

Measured for ``s3datafs mount`` (issue 4, "mount command start to first 4 KiB read"):

- Starting allocates several hundred thousand objects, most of which live as long as the
  process: the modules, and botocore's parsed S3 model and endpoint data. With the default
  thresholds (700, 10, 10) that runs ~160 young, ~14 middle and a full collection that find
  almost nothing to free: ~20-30 ms. ``begin()`` raises the young threshold to
  ``START_THRESHOLD`` (collections still run, ~20 instead of ~175) until ``settle()``.
- ``settle()`` restores the thresholds ``begin()`` found and freezes what exists
  (``gc.freeze``): collections from then on skip the start-up objects. Without the freeze the
  collections deferred by ``begin()`` would all come due right after the mount is ready, a
  ~30 ms pause in the middle of the first read; and every later full collection of a daemon
  would walk objects that never die. The price: cyclic garbage that exists at that moment is
  never freed (measured: ~2,500 objects in a mount daemon, once).
- The command line calls ``settle()`` before any command other than ``mount`` runs; ``mount``
  calls it once the mount is usable (in the daemon, or in the foreground).
- The parent of a mount daemon has nothing left to do once the daemon reported and the result is
  printed: ``exit_soon()`` settles (the interpreter's final collections then skip everything:
  ~70 ms less) and lets ``finish()`` end the process the way libfuse's ``fuse_daemonize`` parent
  does, with ``_exit`` after flushing, instead of tearing down every module (~15 ms more).
  ``finish()`` is what ``python -m s3datafs`` ends with; atexit handlers (logging's flush and
  close among them) still run first.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import NoReturn

START_THRESHOLD = 50_000  # young collections every 50,000 net allocations (default 700)

_saved: tuple[int, int, int] | None = None
_exit_soon = False


def begin() -> None:
    """Collect less often while the process starts (until ``settle``)."""
    global _saved
    if _saved is None:
        _saved = gc.get_threshold()
        gc.set_threshold(START_THRESHOLD, *_saved[1:])


def settle() -> None:
    """Start-up is over: thresholds back to what ``begin`` found, start-up objects frozen."""
    global _saved
    if _saved is not None:
        gc.set_threshold(*_saved)
        _saved = None
    gc.freeze()


def exit_soon() -> None:
    """Only exiting is left to do (the parent of a daemon that reported ready): see ``finish``."""
    global _exit_soon
    settle()
    _exit_soon = True


def finish(code: int) -> NoReturn:
    """``sys.exit(code)``; after ``exit_soon()``, without the interpreter's teardown."""
    if _exit_soon:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)
