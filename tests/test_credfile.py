"""``credfile``: a credentials file read again when it changes, its last good keys kept."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from s3datafs import config, credfile, logsetup
from s3datafs.config import Credentials
from s3datafs.errors import ConfigError


def write(path: Path, key: str, secret: str, mode: int = 0o600) -> None:
    """A new file renamed over ``path``, as agents write (and so a new identity at once: an
    in-place rewrite of the same size within one timestamp tick waits for the timed re-read)."""
    new = path.with_suffix(".new")
    new.write_text(f"[p]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    new.chmod(mode)
    new.replace(path)


@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(credfile, "_CHECK_SECONDS", 0.0)
    path = tmp_path / "credentials"
    write(path, "KEY1", "secret-one")
    return path


def test_a_changed_file_is_read_before_the_next_request(keys: Path) -> None:
    credentials = credfile.CredentialsFile(keys, "p").load()
    assert credentials.get_frozen_credentials().access_key == "KEY1"
    write(keys, "KEY2", "secret-two")
    frozen = credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == ("KEY2", "secret-two")


def test_an_unchanged_file_is_read_again_once_a_while(
    keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = credfile.CredentialsFile(keys, "p")
    credentials = provider.load()
    reads = []
    real = provider._read
    monkeypatch.setattr(provider, "_read", lambda: reads.append(1) or real())
    for _ in range(100):
        credentials.get_frozen_credentials()
    assert reads == []
    monkeypatch.setattr(credfile, "_REREAD_SECONDS", 0.0)
    credentials.get_frozen_credentials()
    assert reads == [1]


def test_a_file_unfit_to_read_keeps_the_last_keys_with_one_warning(
    keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    credentials = credfile.CredentialsFile(keys, "p").load()
    write(keys, "KEY2", "secret-two", mode=0o644)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            time.sleep(0.01)  # a new mtime each time: every check sees a change
            keys.touch()
            assert credentials.get_frozen_credentials().access_key == "KEY1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"credentials file {keys} is open to other users (mode 0644): run chmod 600 {keys} "
        "(for a Kubernetes Secret volume, set defaultMode: 0400): "
        "keeping the keys read before"
    ]
    keys.chmod(0o600)
    keys.touch()
    assert credentials.get_frozen_credentials().access_key == "KEY2"


def test_secrets_read_later_are_redacted_from_the_log(
    keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "_redactor", logsetup.RedactSecrets(["secret-one"]))
    credentials = credfile.CredentialsFile(keys, "p").load()
    write(keys, "KEY2", "secret-two")
    credentials.get_frozen_credentials()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s %s", ("secret-one",
                               "secret-two"), None)
    assert logsetup._redactor.filter(record)
    assert record.getMessage() == "*** ***"


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_file_its_group_may_read_is_used(tmp_path: Path, mode: int) -> None:
    """0440, group fsGroup: a Kubernetes Secret volume of a pod with an fsGroup, whatever its
    defaultMode says, and read-only."""
    path = tmp_path / "credentials"
    write(path, "KEY1", "secret-one", mode=mode)
    assert credfile.CredentialsFile(path, "p").load().get_frozen_credentials().access_key == "KEY1"


@pytest.mark.parametrize("mode", [0o620, 0o604, 0o602, 0o660, 0o644])
def test_a_file_others_may_read_or_anyone_else_may_change_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "credentials"
    write(path, "KEY1", "secret-one", mode=mode)
    with pytest.raises(ConfigError, match=f"open to other users \\(mode 0{mode:o}\\)"):
        credfile.CredentialsFile(path, "p").load()


def test_a_file_unfit_from_the_first_read_fails_the_session(tmp_path: Path) -> None:
    """With no keys read before, there is nothing to keep: the problem is the caller's error."""
    path = tmp_path / "credentials"
    write(path, "KEY1", "secret-one", mode=0o644)
    with pytest.raises(ConfigError, match="open to other users"):
        credfile.CredentialsFile(path, "p").load()


def test_a_file_swapped_for_one_of_the_same_size_and_mtime_is_read(keys: Path) -> None:
    """A new file (a Kubernetes secret's symlink swap, ``cp -p``) may keep the size and the
    mtime: its inode still tells it apart."""
    credentials = credfile.CredentialsFile(keys, "p").load()
    assert credentials.get_frozen_credentials().access_key == "KEY1"
    before = keys.stat()
    write(keys, "KEY2", "secret-two")  # as long as KEY1/secret-one
    os.utime(keys, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert keys.stat().st_size == before.st_size
    assert credentials.get_frozen_credentials().access_key == "KEY2"


def test_a_file_rewritten_while_it_is_read_is_read_again(
    keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's identity is taken before it is read: a rewrite meanwhile is a change."""
    provider = credfile.CredentialsFile(keys, "p")
    real = credfile.read_credentials_file

    def read_then_rewritten(path: Path, section: str | None) -> Credentials:
        keys_read = real(path, section)
        if keys_read.access_key_id == "KEY1":
            write(keys, "KEY2", "secret-two")  # the agent renews the file just after our read
        return keys_read

    monkeypatch.setattr(credfile, "read_credentials_file", read_then_rewritten)
    credentials = provider.load()
    assert credentials.get_frozen_credentials().access_key == "KEY2"


@pytest.mark.parametrize("value", ["AKIA EXAMPLE", "AKIA\tEXAMPLE", "AKIA\nEXAMPLE", "AKIA\u00a0X"])
def test_a_key_with_a_space_or_any_character_no_aws_key_has_is_refused_unnamed(
    value: str,
) -> None:
    """Inside a key, such a character would reach an HTTP header, whose refusal quotes it."""
    with pytest.raises(ConfigError) as refused:
        config.credential_value(value, "credentials file k [p] aws_access_key_id")
    assert str(refused.value).startswith("credentials file k [p] aws_access_key_id is empty or")
    assert value not in str(refused.value)
    assert config.credential_value(" AKIA!~EXAMPLE\n", "key") == "AKIA!~EXAMPLE"
