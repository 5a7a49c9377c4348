"""``slowanswer``: the rules of when a wait on S3 is told, driven by hand (no network, no clock).

The requests go through botocore's events end to end in ``test_faults``; here each event is a
call, and each look of the watcher thread a ``look(now)`` at a time the test chooses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import SimpleNamespace

import pytest

from s3datafs import slowanswer

AFTER = 10.0


def sent(answers: slowanswer.SlowAnswers) -> None:
    """A request this thread sends (botocore's ``before-send``)."""
    request = SimpleNamespace(url="https://s3.example:9000/bucket/key?versionId=v")
    answers._sent(request=request, event_name="before-send.s3.HeadObject")


def told(caplog: pytest.LogCaptureFixture) -> list[str]:
    said = [r.getMessage() for r in caplog.records if r.name == "s3datafs.slowanswer"]
    caplog.clear()
    return said


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> slowanswer.SlowAnswers:
    monkeypatch.setattr(slowanswer._WATCHER, "ensure_running", lambda: None)  # looks by hand
    return slowanswer.SlowAnswers(after=AFTER, per_attempt=30.0, attempts=3)


def test_a_wait_is_told_once_it_lasts_and_again_after_s3_has_answered(
    answers: slowanswer.SlowAnswers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="s3datafs.slowanswer")
    sent(answers)
    start = time.monotonic()
    answers.look(start + AFTER / 2)
    assert told(caplog) == []  # not yet: a request in progress is not a slow one
    answers.look(start + AFTER + 1)
    (warning,) = told(caplog)
    assert warning.startswith("no answer from S3 at https://s3.example:9000 for ")
    answers.look(start + AFTER + 2)
    assert told(caplog) == []  # once
    answers._answered()
    assert told(caplog)[0].startswith("S3 at https://s3.example:9000 answered after ")
    sent(answers)  # a later hang, after S3 answered: told again
    answers.look(time.monotonic() + AFTER + 1)
    assert told(caplog)[0].startswith("no answer from S3 at https://s3.example:9000 for ")


def test_the_watcher_starts_again_in_a_forked_child() -> None:
    """A child of fork has no thread but the one that forked: a watcher started before the
    fork is not running there (a daemon forks after its command asked S3 for settings)."""
    watcher = slowanswer._Watcher()
    watcher.ensure_running()
    assert watcher._thread is not None
    assert watcher._thread.is_alive()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            watcher.ensure_running()
            running = watcher._thread is not None and watcher._thread in threading.enumerate()
            os.write(write_end, b"running" if running else b"none")
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as said:
        assert said.read() == b"running"
    assert os.waitpid(pid, 0)[1] == 0
