"""Logging for the command and the daemon.

- In the foreground (and in the daemon until it reports ready) records go to stderr, so the user
  sees mount-time warnings such as skipped keys; the daemon also writes to its log file, and once
  detached to the file only.
- botocore, boto3 and urllib3 stay at WARNING even with ``--debug``: their DEBUG output contains
  signed headers.
- pyfuse3 logs an ERROR whenever the kernel refuses an answer with ENOENT: the request is no
  longer waited for (its reader was interrupted, or the mount ended while a read waited on S3).
  That is expected, so those records are dropped.
- ``kill -USR1 <daemon pid>`` writes every thread's Python stack to the log file
  (``faulthandler``, from the signal handler itself: it works while the daemon hangs).
- The log file is reopened when it was moved or deleted (``logrotate`` without
  ``copytruncate``; a daemon cannot take SIGHUP for it, SIGHUP unmounts). ``faulthandler``
  writes to its own duplicate of the file's descriptor, renewed with the file, so a dump never
  lands in whatever file reuses a closed descriptor number.
- What UTF-8 cannot encode (a mount point or key that is not UTF-8, held as ``surrogateescape``)
  is written to the file backslash-escaped, as stderr writes it.
- Failed reads are logged as ``failurelog`` allows: never a line per read.
- botocore's warning that temporary credentials could not be refreshed (an STS call for a role
  failed) goes to the log file only: the error it raises then says what failed, in one line.
- botocore's own warnings (a refresh of temporary keys that failed, with a traceback each time;
  the metadata service's "expiration extension") come on every use of the keys while the cause
  lasts: an STS outage wrote 3 MB a minute with no read failing. Each kind is logged at most
  once per ``REPEAT_SECONDS``, in one line (the exception's type and message for its
  traceback), and the next one says how many were held back.
- A record logged with ``extra=FILE_ONLY`` skips the terminal: a failure the command prints
  itself is also written to the log file, where whoever reads the log later finds why.
- A redacting filter replaces every known secret value (secret key, session token) in any record,
  as a last line of defence: no code path is supposed to log one.
- ``--log-file -`` (``STDERR``) logs to standard error instead of a file, in the file's format and
  level, and the daemon keeps its stderr for it once ready: a container's log (``kubectl logs``)
  or a service's journal then holds the mounts' warnings, and nothing is left in the container.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import logging
import logging.handlers
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .config import prepare_cache_dir, shared_dir
from .errors import ConfigError

_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
STDERR = Path("-")  # --log-file -: the log goes to standard error, kept by the daemon
_STDERR_LOG = "stderr-log"  # the handler's name
_CHATTY = ("botocore", "boto3", "urllib3", "s3transfer", "pyfuse3")


class _ConsoleFormatter(logging.Formatter):
    """One line per record on the terminal; tracebacks go to the log file (or with --debug)."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__("s3datafs: %(levelname)s: %(message)s")
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self._tracebacks:
            return super().format(record)
        return self.formatMessage(_with_message(record))


def _with_message(record: logging.LogRecord) -> logging.LogRecord:
    record.message = record.getMessage()
    return record


REPEAT_SECONDS = 60.0  # botocore's warnings of one kind: at most one line per this


class _RepeatedWarnings(logging.Filter):
    """botocore's records, each kind (logger and message template) at most once per
    ``REPEAT_SECONDS``, in one line (see the module docstring). One instance serves every
    handler: the first to see a record decides for all (the answer is kept on the record)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = time.monotonic  # looked up now: a test puts its own clock there first
        self._lock = threading.Lock()  # botocore logs from the GET worker threads
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("botocore"):
            return True
        decided = getattr(record, "s3datafs_shown", None)
        if decided is not None:
            return decided
        kind = (record.name, str(record.msg))
        with self._lock:
            now, last = self._clock(), self._last.get(kind)
            shown = last is None or now - last >= REPEAT_SECONDS
            if shown:
                self._last[kind] = now
                held = self._held.pop(kind, 0)
            else:
                self._held[kind] = self._held.get(kind, 0) + 1
        if shown:
            line = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                error = record.exc_info[1]
                line += f" ({type(error).__name__}: {' '.join(str(error).split())})"
            if held:
                line += f" [{held} more like it in the last {REPEAT_SECONDS:.0f} s not logged]"
            record.msg, record.args, record.exc_info, record.exc_text = line, None, None, None
        record.s3datafs_shown = shown
        return shown


class RedactSecrets(logging.Filter):
    """Replaces known secrets in every record: those given at ``setup`` for good, and the last
    ``ADDED_KEPT`` added later (a credentials file renewed every 15 minutes for a month added
    5,760, and each record then cost 0.36 ms; a key renewed long ago is used nowhere now)."""

    ADDED_KEPT = 32

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._given = [s for s in secrets if s]
        self._secrets = self._given

    def add(self, secrets: Iterable[str | None]) -> None:
        added = self._secrets[len(self._given):]
        added += [s for s in secrets if s and s not in self._secrets and s not in added]
        self._secrets = [*self._given, *added[-self.ADDED_KEPT:]]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            for secret in self._secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


_redactor = RedactSecrets(())  # the one ``setup`` installed


def redact(*secrets: str | None) -> None:
    """Hide ``secrets`` too from now on (keys read after ``setup``: a credentials file again)."""
    _redactor.add(secrets)


class _LogFile(logging.handlers.WatchedFileHandler):
    """The daemon's log file, reopened (mode 0600) once rotated away; SIGUSR1's stack dumps
    follow it (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self._dump_fd = -1
        self._told = False  # of a record that could not be written
        # A path may hold any byte (``surrogateescape``): escaped, as on stderr, not a record
        # lost with "cannot write log file".
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def _open(self):  # type: ignore[no-untyped-def]  # logging's own signature
        # Never through a symlink, never into someone else's file, always 0600: a log directory
        # may be shared (S3DATAFS_LOG_DIR, --log-file in /tmp) and the daemon may be root.
        fd = os.open(
            self.baseFilename,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or not stat.S_ISREG(info.st_mode):
                raise ConfigError(
                    f"log file {self.baseFilename} is not a file of uid {os.geteuid()}: "
                    "choose another with --log-file"
                )
            os.fchmod(fd, 0o600)
            stream = os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise
        dump_fd = os.dup(stream.fileno())
        faulthandler.register(signal.SIGUSR1, file=dump_fd, all_threads=True)
        if self._dump_fd >= 0:
            os.close(self._dump_fd)  # only now: faulthandler holds the new one already
        self._dump_fd = dump_fd
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        # logging's own handlers reopen outside their error handling: a file that cannot be
        # made again (its directory gone, a symlink or another user's file in its place) would
        # raise from the caller's log call, and a FUSE handler reporting an error would end the
        # mount. Such a record is lost instead, and stderr is told once.
        if self.follow():
            logging.StreamHandler.emit(self, record)

    def follow(self) -> bool:
        """Reopen the file if it was moved or deleted; whether it is open (see ``emit``)."""
        try:
            self.reopenIfNeeded()
            if self.stream is None:
                self.stream = self._open()
        except Exception:
            self.handleError(None)
            return False
        return True

    def handleError(self, record: logging.LogRecord | None) -> None:  # noqa: N802 - logging's
        if not self._told:
            self._told = True
            error = sys.exc_info()[1]
            with contextlib.suppress(Exception):
                print(f"s3datafs: cannot write log file {self.baseFilename}: {error}",
                      file=sys.stderr)

    def close(self) -> None:
        super().close()
        if self._dump_fd >= 0:  # dumps stop with the handler (mount-all opens one per dataset)
            faulthandler.unregister(signal.SIGUSR1)
            os.close(self._dump_fd)
            self._dump_fd = -1


def follow_rotation() -> None:
    """Reopen a log file that was rotated away even when nothing is logged: stack dumps
    (SIGUSR1) go where the file is now. The daemon calls this every few seconds."""
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, _LogFile):
            with handler.lock:
                handler.follow()


def _not_a_refused_answer(record: logging.LogRecord) -> bool:
    """False for pyfuse3's "fuse_reply_* failed with No such file or directory" (see above)."""
    return not (
        record.getMessage().endswith("fuse_reply_* failed with No such file or directory")
    )


FILE_ONLY = {"file_only": True}


def _not_for_the_terminal(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def _not_said_again_by_the_error(record: logging.LogRecord) -> bool:
    """False for botocore's "Refreshing temporary credentials failed during mandatory refresh
    period" and "... the refreshed credentials are still expired", which an exception always
    follows (see above)."""
    return not (record.name == "botocore.credentials" and any(
        said in record.getMessage() for said in ("mandatory refresh", "still expired")))


def setup(
    *,
    debug: bool,
    verbose: bool,
    log_file: Path | None,
    secrets: Iterable[str] = (),
    cache_dir: Path | None = None,
) -> None:
    """Configure the root logger: stderr always, plus ``log_file`` when given (``cache_dir``:
    see ``check_log_directory``)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    global _redactor
    redactor = _redactor = RedactSecrets(secrets)

    console = logging.StreamHandler(sys.stderr)
    if log_file == STDERR:  # the log itself: its format and level, kept once detached
        console.setLevel(logging.DEBUG if debug else logging.INFO)
        console.setFormatter(logging.Formatter(_FORMAT))
        console.set_name(_STDERR_LOG)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    else:
        console.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
        console.setFormatter(_ConsoleFormatter(tracebacks=debug))
        console.set_name("console")
    repeated = _RepeatedWarnings()
    console.addFilter(repeated)
    console.addFilter(redactor)
    console.addFilter(_not_said_again_by_the_error)
    console.addFilter(_not_for_the_terminal)  # what the command prints itself, said once
    root.addHandler(console)

    if log_file is not None and log_file != STDERR:
        # No symlink of another user on the way, no directory others may swap: a root daemon
        # would create its log wherever they chose. The directory may be shared if sticky (a
        # --log-file in /tmp): the file is opened with O_NOFOLLOW and must be this user's.
        check_log_directory(log_file.parent, cache_dir=cache_dir)
        try:
            handler = _LogFile(log_file)
        except OSError as exc:
            why = ("it is a symbolic link, which is never followed" if exc.errno == errno.ELOOP
                   else exc.strerror)
            raise ConfigError(
                f"cannot write log file {log_file}: {why}: choose another with --log-file"
            ) from None
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(repeated)
        handler.addFilter(redactor)
        root.addHandler(handler)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    fuse_logger = logging.getLogger("pyfuse3")
    if _not_a_refused_answer not in fuse_logger.filters:
        fuse_logger.addFilter(_not_a_refused_answer)


def check_log_directory(directory: Path, *, cache_dir: Path | None = None) -> None:
    """Make or check a directory of log files (``config.shared_dir``), or say what to do.

    A log directory in ``cache_dir`` (one volume for both) comes after the cache directory is
    made ready: on a fresh volume (0777, made private at its first use) it was made first, in a
    directory others could still write, and refused; and the volume, no longer empty, was then
    never made private, so every later start was refused too.
    """
    if cache_dir is not None and Path(os.path.abspath(directory)).is_relative_to(
        os.path.abspath(cache_dir)
    ):
        prepare_cache_dir(cache_dir)
    shared_dir(directory, "log directory", "choose another with --log-file or S3DATAFS_LOG_DIR")


def logs_to_stderr() -> bool:
    """Whether the log is standard error (``--log-file -``): the daemon keeps it open then."""
    return any(handler.get_name() == _STDERR_LOG for handler in logging.getLogger().handlers)


def detach_console() -> None:
    """Stop logging to the terminal (the daemon is about to close it; see ``logs_to_stderr``)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "console":
            root.removeHandler(handler)
