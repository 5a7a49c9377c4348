"""``logsetup``: a log file that cannot be written never breaks the code that logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3datafs import logsetup


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("in_its_place", ["symlink", "directory gone"])
def test_a_log_file_that_cannot_be_made_again_loses_records_not_the_caller(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str], in_its_place: str
) -> None:
    log_file = tmp_path / "logs" / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    log = logging.getLogger("s3datafs.test")
    log.error("before")
    log_file.rename(tmp_path / "d.log.1")  # logrotate moves it away ...
    if in_its_place == "symlink":  # ... and something else takes its name
        log_file.symlink_to(tmp_path / "elsewhere")
    else:
        log_file.parent.rmdir()
    for _ in range(3):  # logging must never raise into the code that logs
        log.error("after rotation")
    assert not (tmp_path / "elsewhere").exists()
    told = capsys.readouterr().err
    assert told.count(f"s3datafs: cannot write log file {log_file}") == 1
    assert "before" in (tmp_path / "d.log.1").read_text()
