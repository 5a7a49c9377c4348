"""Keys from a ``--credentials-file`` (fstab's ``credentials_file=``), read again while mounted.

Why: the file may hold temporary keys (``aws_session_token``) that an agent rewrites before
they expire (a Vault or STS sidecar, a Kubernetes secret updated in place). A mount lives for
days; keys read once at mount time would fail every read once they expired.

How: the file is a botocore credential provider, first in the session's chain, whose
credentials are ``RefreshableCredentials`` that botocore refreshes (reads the file again) before
the next request is signed when either
- the file changed: its identity (inode, size, mtime; a Kubernetes secret is swapped in by a
  symlink) differs from the one read last, checked at most once per ``_CHECK_SECONDS``; or
- ``_REREAD_SECONDS`` went by (a rewrite that kept the identity).
Whether a refresh is due is decided here, on the monotonic clock (``refresh_needed``): botocore's
own rule, a wall-clock expiry in a local time zone, costs ~10 us per request, and ``signedget``
asks before every GET. The expiry botocore is told (``_EXPIRY`` ahead) only has to be ahead.
GET templates follow, since ``signedget`` checks the client's credentials before using one.

Invariants:
- A read that fails (the file gone, mode no longer 0600, being rewritten, malformed) keeps the
  keys read before, with one warning per distinct problem; a refresh never raises, so reads
  never fail because of the file alone. S3 says whether the keys still work.
- The command line reads the file first, before the daemon starts (what is wrong with it then
  fails the mount); each client's session reads it again when it is made.
- Every secret read is added to the log redactor (``logsetup.redact``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import botocore.credentials

from . import logsetup
from .config import Credentials, read_credentials_file
from .errors import ConfigError

log = logging.getLogger(__name__)

_EXPIRY = datetime.timedelta(days=1)
_CHECK_SECONDS = 1.0
_REREAD_SECONDS = 60.0


class _FileCredentials(botocore.credentials.RefreshableCredentials):
    """botocore's refreshable credentials, due for a refresh when ``due()`` says so."""

    due: Callable[[], bool] = staticmethod(lambda: False)

    def refresh_needed(self, refresh_in: float | None = None) -> bool:
        if refresh_in is not None and refresh_in <= 0:  # "have they expired?": botocore's clock
            return super().refresh_needed(refresh_in)
        return self.due()


class CredentialsFile(botocore.credentials.CredentialProvider):
    """A botocore credential provider that reads ``path`` again when it changes, and once a
    minute (see the module docstring)."""

    METHOD = "s3datafs-credentials-file"
    CANONICAL_NAME = "s3datafs-credentials-file"

    def __init__(self, path: Path, section: str | None) -> None:
        super().__init__()
        self._path = path
        self._section = section
        self._lock = threading.Lock()
        self._keys: Credentials | None = None
        self._warned: set[str] = set()
        self._identity: tuple[int, ...] | None = None  # of the file read last
        self._checked = -math.inf  # monotonic time of the last identity check
        self._stale = False  # the file changed since it was read, or it is time to read it
        self._read_at = -math.inf  # monotonic time of the last read

    def load(self) -> botocore.credentials.RefreshableCredentials:
        credentials = _FileCredentials.create_from_metadata(
            self._metadata(), refresh_using=self._metadata, method=self.METHOD
        )
        credentials.due = self._due
        return credentials

    def _due(self) -> bool:
        """Whether to read the file again; once true, until it is read (botocore asks several
        times before it refreshes)."""
        now = time.monotonic()
        if not self._stale and now - self._checked >= _CHECK_SECONDS:
            self._checked = now
            self._stale = now >= self._read_at + _REREAD_SECONDS or (
                _identity(self._path) != self._identity
            )
        return self._stale

    def _metadata(self) -> dict[str, str | None]:
        keys = self._read()
        expiry = datetime.datetime.now(datetime.UTC) + _EXPIRY
        return {
            "access_key": keys.access_key_id,
            "secret_key": keys.secret_access_key,
            "token": keys.session_token,
            "expiry_time": expiry.isoformat(),
        }

    def _read(self) -> Credentials:
        with self._lock:
            self._identity = _identity(self._path)  # first: a change while reading is seen
            self._stale, self._read_at = False, time.monotonic()
            try:
                keys = read_credentials_file(self._path, self._section)
            except ConfigError as exc:
                if self._keys is None:
                    raise
                if str(exc) not in self._warned:
                    self._warned.add(str(exc))
                    log.warning("%s: keeping the keys read before", exc)
                return self._keys
            logsetup.redact(keys.secret_access_key, keys.session_token)
            self._keys = keys
            return keys


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None  # gone: the next timed read warns
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns
