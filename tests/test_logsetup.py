"""``logsetup``: a log file that cannot be written never breaks the code that logs."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3datafs import logsetup
from s3datafs.errors import ConfigError


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


def test_a_path_that_is_not_utf8_is_written_to_the_log_file_escaped(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mount point or a key may hold any byte (``surrogateescape``): such a record was lost,
    and stderr said "cannot write log file ...: 'utf-8' codec can't encode"."""
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    logging.getLogger("s3datafs.test").warning("mounted at /data/caf\udce9")
    assert "mounted at /data/caf\\udce9\n" in log_file.read_text()
    assert "cannot write log file" not in capsys.readouterr().err


def test_a_log_file_found_readable_by_others_is_made_private(
    tmp_path: Path, restored_logging: None
) -> None:
    log_file = tmp_path / "d.log"
    log_file.write_text("")
    log_file.chmod(0o644)
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    assert log_file.stat().st_mode & 0o777 == 0o600


def test_each_reopening_of_a_rotated_log_file_closes_what_it_replaced(
    tmp_path: Path, restored_logging: None
) -> None:
    """The stack dumps' duplicate of the old file is closed, not leaked once per rotation."""
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    log = logging.getLogger("s3datafs.test")
    log.warning("first")
    open_before = len(os.listdir("/proc/self/fd"))
    for rotation in range(3):
        log_file.rename(tmp_path / f"d.log.{rotation}")
        log.warning("after rotation %d", rotation)
    assert len(os.listdir("/proc/self/fd")) == open_before
    assert "after rotation 2" in log_file.read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_the_terminal_gets_warnings_or_with_verbose_info_and_the_file_gets_info(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str], verbose: bool
) -> None:
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=verbose, log_file=log_file, secrets=())
    log = logging.getLogger("s3datafs.test")
    log.info("an info line")
    log.warning("a warning line")
    told = capsys.readouterr().err
    assert "s3datafs: WARNING: a warning line" in told
    assert ("an info line" in told) is verbose
    assert "INFO s3datafs.test" in log_file.read_text()


def test_secrets_are_redacted_on_the_terminal_and_in_the_file(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=["s3cr3tvalue"])
    log = logging.getLogger("s3datafs.test")
    log.warning("refused with key %s", "s3cr3tvalue")
    told = capsys.readouterr().err
    assert "refused with key ***" in told
    assert "s3cr3tvalue" not in told
    logsetup.detach_console()  # a daemon once detached: the file alone
    log.warning("refused again with key %s", "s3cr3tvalue")
    written = log_file.read_text()
    assert "refused again with key ***" in written
    assert "s3cr3tvalue" not in written


def test_a_traceback_goes_to_the_file_not_the_terminal_without_debug(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    try:
        raise ValueError("deep down")
    except ValueError:
        logging.getLogger("s3datafs.test").exception("it failed")
    assert capsys.readouterr().err == "s3datafs: ERROR: it failed\n"
    assert "Traceback" in log_file.read_text()


def test_a_closed_log_file_leaves_no_stack_dump_on_its_descriptor(
    tmp_path: Path, restored_logging: None
) -> None:
    """mount-all opens one log file per dataset: a closed one's number may be reused next."""
    logsetup.setup(debug=False, verbose=False, log_file=tmp_path / "d.log", secrets=())
    root = logging.getLogger()
    (handler,) = [h for h in root.handlers if isinstance(h, logsetup._LogFile)]
    root.removeHandler(handler)
    handler.close()
    assert not faulthandler.unregister(signal.SIGUSR1)  # nothing was registered any more


def test_a_warning_botocore_repeats_is_logged_once_a_minute_in_one_line(
    tmp_path: Path, restored_logging: None, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An STS outage: botocore warns, with a traceback, on every use of the keys (3 MB a minute
    with 8 readers, no read failing). Each kind: one line a minute, then how many were held."""
    now = [1000.0]
    monkeypatch.setattr(logsetup.time, "monotonic", lambda: now[0])
    log_file = tmp_path / "d.log"
    logsetup.setup(debug=False, verbose=False, log_file=log_file, secrets=())
    botocore_log = logging.getLogger("botocore.credentials")
    ours = logging.getLogger("s3datafs.test")

    def refresh_fails() -> None:
        try:
            raise ConnectionError("Connection was closed before we\nreceived a valid response")
        except ConnectionError:
            botocore_log.warning("Refreshing temporary credentials failed during %s refresh "
                                 "period.", "advisory", exc_info=True)

    for _ in range(500):
        refresh_fails()
        ours.warning("ours, always")
    now[0] += logsetup.REPEAT_SECONDS
    refresh_fails()
    now[0] += logsetup.REPEAT_SECONDS  # a minute with no more of them: nothing was held back
    refresh_fails()
    lines = log_file.read_text().splitlines()
    assert "Traceback" not in log_file.read_text()
    theirs = [line for line in lines if "botocore.credentials" in line]
    said = ("Refreshing temporary credentials failed during advisory refresh period. "
            "(ConnectionError: Connection was closed before we received a valid response)")
    assert [line.partition("]: ")[2] for line in theirs] == [
        said, f"{said} [499 more like it in the last 60 s not logged]", said]
    assert sum("ours, always" in line for line in lines) == 500
    assert capsys.readouterr().err.count("Refreshing temporary credentials") == 3


def test_a_log_file_that_is_not_a_regular_file_is_refused_and_left_as_it_is(
    tmp_path: Path, restored_logging: None
) -> None:
    """A device there (/dev/null, say) would have been made 0600 for every user."""
    device = tmp_path / "null"
    os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    device.chmod(0o666)
    with pytest.raises(ConfigError, match=f"log file {device} is not a file of uid"):
        logsetup.setup(debug=False, verbose=False, log_file=device, secrets=())
    assert stat.S_IMODE(device.stat().st_mode) == 0o666


def test_secrets_added_later_are_redacted_the_last_32_of_them_and_those_given_always() -> None:
    """A credentials file renewed every 15 minutes for a month added 5,760 secrets to check
    every record against."""
    redactor = logsetup.RedactSecrets(["given-secret"])
    for rotation in range(100):
        redactor.add([f"secret-{rotation:03}", f"token-{rotation:03}", "given-secret"])
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s %s %s %s", (
        "given-secret", "token-099", "secret-084", "secret-083"), None)
    redactor.filter(record)
    assert record.getMessage() == "*** *** *** secret-083"
