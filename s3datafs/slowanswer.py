"""Say so while S3 keeps us waiting for an answer, instead of saying nothing for minutes.

Why: a request that gets no answer (an endpoint that accepts connections and never replies, a
black-holed network, a proxy that hangs) is given up after ``request_timeout`` seconds per
attempt, three attempts: ``s3datafs mount`` then sat silent for 90 s before its error, and a
user could not tell a hung endpoint from a slow listing. ``SlowAnswers`` watches the requests
of a client (botocore's ``before-send`` and ``response-received`` events, which bracket every
attempt, failed ones included) and logs a warning when an attempt is still unanswered after
``after`` seconds, naming the endpoint and how long the wait may last: once, until S3 answers
again (retries and parallel requests of a listing that all hang say nothing more; the error
that ends the wait says the rest). An answer that comes after the warning is logged too, so the
log does not end on a false alarm, and a later hang is warned of again.

Invariants: the events' handlers only touch a dict under a lock and never raise (a notice must
not change a request's outcome: a watcher that cannot start, for want of a thread, is done
without). One daemon thread per process watches every client's requests (a process may make
many clients: one each would pile up sleeping threads), started at the first request, again in
a forked child, which has none; it looks once a second, blocks every signal (``quietthread``)
and dies with the process. The URL is logged as its scheme and host only (a request's path and
query name keys, and a presigned one would carry a signature).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .quietthread import start_quiet_thread

log = logging.getLogger(__name__)

_LOOK_EVERY = 1.0  # seconds between looks at the requests in progress


@dataclass
class _Waiting:
    operation: str
    endpoint: str
    since: float
    told: bool = False


class SlowAnswers:
    """Warn of requests unanswered after ``after`` seconds; register with ``watch(client)``."""

    def __init__(self, *, after: float, per_attempt: float, attempts: int) -> None:
        self._after = after
        self._per_attempt = per_attempt
        self._attempts = attempts
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}  # by the thread that sent the request
        self._warned = False  # since S3 last answered

    def watch(self, client: Any) -> None:
        client.meta.events.register("before-send.s3", self._sent)
        client.meta.events.register("response-received.s3", self._answered)
        _WATCHER.follow(self)

    def _sent(self, request: Any = None, event_name: str = "", **_: Any) -> None:
        try:
            parts = urlsplit(getattr(request, "url", "") or "")
            endpoint = f"{parts.scheme}://{parts.netloc}"
        except ValueError:  # botocore sent it; should it not parse, the notice goes without
            endpoint = "its endpoint"
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self._waiting[threading.get_ident()] = _Waiting(operation, endpoint, time.monotonic())
        _WATCHER.ensure_running()

    def _answered(self, exception: BaseException | None = None, **_: Any) -> None:
        with self._lock:
            waiting = self._waiting.pop(threading.get_ident(), None)
            if waiting is None or exception is not None:
                return
            told, self._warned = waiting.told, False
        if told:
            log.warning("S3 at %s answered after %.0f s (%s)", waiting.endpoint,
                        time.monotonic() - waiting.since, waiting.operation)

    def look(self, now: float) -> None:
        """Warn of a request unanswered for ``after`` seconds, unless warned since S3 last
        answered (called by the watcher thread)."""
        with self._lock:
            due = [w for w in self._waiting.values() if now - w.since >= self._after]
            for waiting in due:
                waiting.told = True
            if self._warned or not due:
                return
            self._warned, waiting = True, due[0]
        log.warning(
            "no answer from S3 at %s for %.0f s (%s): still waiting, up to %.0f s per "
            "attempt, %d attempts; check --endpoint-url and the network",
            waiting.endpoint, now - waiting.since, waiting.operation, self._per_attempt,
            self._attempts)


class _Watcher:
    """The process's one thread that looks at every ``SlowAnswers`` (held weakly: a client
    dropped is no longer looked at)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._followed: weakref.WeakSet[SlowAnswers] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._starting = False

    def follow(self, answers: SlowAnswers) -> None:
        with self._lock:
            self._followed.add(answers)

    def ensure_running(self) -> None:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()  # none in a fork
            start = not alive and not self._starting
            self._starting |= start
        if not start:
            return
        try:  # outside the lock: starting a thread may take a while, or fail
            thread = start_quiet_thread(self._look, name="s3datafs-slow-answers")
        except RuntimeError as exc:  # no thread to be had (a pids limit): no notices, then
            log.debug("cannot watch for slow answers: %s", exc)
            thread = None
        with self._lock:
            self._thread, self._starting = thread, False

    def _look(self) -> None:
        while True:
            time.sleep(_LOOK_EVERY)
            with self._lock:
                followed = list(self._followed)
            now = time.monotonic()
            for answers in followed:
                answers.look(now)


_WATCHER = _Watcher()
