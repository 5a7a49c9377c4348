"""Typed errors: one family for the user (one-line messages), one errno for the kernel.

Every error a user can cause or meet derives from ``S3DataFSError``; its ``str()`` is the whole
one-line message the CLI prints (it names the problem and, where it helps, what to do). Errors
that can cross the FUSE boundary carry the ``errno`` the kernel should see; ``fuse_ops`` is the
only place that turns them into ``pyfuse3.FUSEError``.

``exit_code`` follows the usual convention: 2 for a usage error, 1 for anything else.
"""

from __future__ import annotations

import errno as _errno


class S3DataFSError(Exception):
    """Base of every error with a message meant for a person."""

    errno: int = _errno.EIO
    exit_code: int = 1


class UsageError(S3DataFSError):
    """The command line itself is wrong (bad option, malformed URI, bad name)."""

    exit_code = 2


class SettingError(UsageError):
    """The value given for one setting is refused; the message starts with the setting as the
    command line names it (``--kernel-readahead '3K' must be ...``), which ``mount-all`` turns
    into the field of a datasets spec that gave the value (``'kernelReadahead'``)."""

    def __init__(self, setting: str, value: str, problem: str) -> None:
        super().__init__(f"{setting} {value!r} {problem}")


class ConfigError(S3DataFSError):
    """A file or setting the command relies on is unusable (credentials file mode, mount point)."""


class NotFoundError(S3DataFSError):
    """The bucket, object, version or prefix does not exist."""

    errno = _errno.ENOENT


class AccessDeniedError(S3DataFSError):
    """S3 refused the credentials or the request."""

    errno = _errno.EACCES


class MissingPermissionError(AccessDeniedError):
    """The keys were accepted, but their policy does not grant ``permission`` (an IAM action)."""

    def __init__(self, message: str, permission: str) -> None:
        super().__init__(message)
        self.permission = permission


class PinMismatchError(S3DataFSError):
    """The data in S3 is not the data the user pinned (ETag or version)."""


class UnsupportedError(S3DataFSError):
    """What was asked cannot be honoured on this bucket (``--as-of`` without versioning)."""


class StaleObjectError(S3DataFSError):
    """A pinned object changed or vanished after mount; its bytes can no longer be served."""

    errno = _errno.ESTALE


class TransientS3Error(S3DataFSError):
    """S3 failed in a way that may succeed when tried again (throttling, 5xx, lost connection)."""


class S3RequestError(S3DataFSError):
    """S3 failed in a way that retrying will not fix."""


class ArchiveError(S3DataFSError):
    """A zip archive (or one of its members) is malformed or cannot be read as pinned."""


class MountFailed(S3DataFSError):
    """A background mount reported failure; carries the daemon's message and exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_ours(group: BaseExceptionGroup) -> S3DataFSError | None:
    """The first of our errors in ``group`` (nurseries within nurseries), for its one line."""
    ours = group.subgroup(lambda exc: isinstance(exc, S3DataFSError))
    while isinstance(ours, BaseExceptionGroup):
        ours = ours.exceptions[0]
    return ours
