"""Which failed reads reach the log: enough to tell what is wrong, never a line per read.

A read that fails is retried by the kernel at once, and a data loader that skips unreadable
samples goes on to the next file: in an outage (a revoked role, a deleted bucket, S3 down) a
mount would otherwise write a line per file tried, hundreds of MB a day, for days.

Rules (``FailureLog.report``):
- A stale object, a bad archive member or a damaged catalog (the same answer for the mount's
  life) is logged once per message; any other failure once per subject (the object read) per
  ``REPEAT_QUIET``.
- On top of that, each kind of failure (its errno: EIO, EACCES, ESTALE, ...) gets at most
  ``BURST`` lines per ``WINDOW``. What is held back is counted, and one line says how many when
  the window ends (``flush``, called every few seconds by the daemon, or the next report).
- Memory is bounded: the per-subject and per-message tables are trimmed past ``KEPT`` entries
  (a failure forgotten that way may be logged again: the burst limit still holds).

Not thread-safe: the FUSE handlers and the daemon's periodic task share the trio thread.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("s3datafs.fuse_ops")  # the records keep the name they always had

REPEAT_QUIET = 10.0  # seconds the same failure of one subject is not logged again
BURST = 20  # lines per kind of failure per window
WINDOW = 60.0  # seconds
KEPT = 1024  # entries per table before old ones are dropped


@dataclass
class _Window:
    started: float
    logged: int = 0
    held: int = 0  # failures not logged in this window


class FailureLog:
    """See the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._once: set[str] = set()  # permanent failures already logged
        self._last: dict[str, float] = {}  # other failures: when last logged, by subject
        self._windows: dict[int, _Window] = {}  # by errno

    def report(
        self,
        message: str,
        code: int,
        *,
        subject: str,
        permanent: bool,
        exc_info: BaseException | None = None,
    ) -> bool:
        """A read of ``subject`` failed with ``message`` (errno ``code``); whether it was logged
        (with ``exc_info``'s traceback, if given)."""
        now = self._clock()
        self.flush(now)
        if permanent:
            if message in self._once:
                return False
        elif now - self._last.get(subject, -REPEAT_QUIET) < REPEAT_QUIET:
            return False
        window = self._windows.setdefault(code, _Window(now))
        if window.logged >= BURST:
            window.held += 1
            return False
        window.logged += 1
        if permanent:
            if len(self._once) >= KEPT:
                self._once.clear()
            self._once.add(message)
        else:
            if len(self._last) >= KEPT:
                self._last = {k: t for k, t in self._last.items() if now - t < REPEAT_QUIET}
            self._last[subject] = now
        log.error("%s", message, exc_info=exc_info)
        return True

    def flush(self, now: float | None = None) -> None:
        """End the windows that are over: one line for each that held failures back."""
        now = self._clock() if now is None else now
        for code, window in list(self._windows.items()):
            if now - window.started < WINDOW:
                continue
            del self._windows[code]
            if window.held:
                log.error(
                    "%d more failed reads (%s) were not logged in the last %.0f s",
                    window.held,
                    errno.errorcode.get(code, code),
                    now - window.started,
                )
