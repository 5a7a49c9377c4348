"""Mount one dataset in this process: pin it while the serving modules load, then serve it.

Before anything is mounted the dataset is pinned into a catalog (``pinning.pin``: from S3, or
from a ``--snapshot`` file), checked against ``--expect-fingerprint`` and, with
``--save-snapshot``, written down; a zip single object is then swapped for the catalog of its
members (``archive.index``). A failure in any of these leaves nothing mounted. Then ``mount``
serves the catalog (pyfuse3 and trio: its docstring says how a mount lives and ends).

Why two modules: start-up (issue 4, "mount command start to first read"). Pinning waits on S3
(GetBucketVersioning, then a listing or a HEAD: two round trips or more), and importing pyfuse3,
trio and the serving modules costs ~70 ms of CPU. The mount command does not import them
(``plan`` holds the data it needs), so a daemon imports them in a thread of its own (``_Loading``)
while its main thread waits on S3: the two overlap instead of adding up. Pinning needs none of
what that thread imports (pyfuse3, trio, our serving modules; everything pinning uses came with
this module), so the two threads do not wait on each other's imports. A thread that cannot be
started, or an import that fails, costs nothing but the overlap: the import is then made (and
fails, if it must) on the main thread, where the module is wanted.

Many daemons (``mount-all``, ``run``): the command imports the serving modules itself before it
forks the first of several daemons (``load_serving_modules``), and every daemon finds them
loaded: one copy of their pages, shared copy-on-write, instead of one per daemon, and one import
instead of one per dataset. A single mount keeps the overlap above.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import os
import sqlite3
import stat
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path

from . import pinning, runtime
from .archive.index import archive_catalog
from .catalog import Catalog
from .errors import ConfigError
from .keptcatalogs import KeptCatalogs, kept_files
from .plan import MountPlan, MountSummary
from .quietthread import start_quiet_thread
from .s3source import S3Source
from .snapshot import write_snapshot

log = logging.getLogger(__name__)

_SERVING = "s3datafs.mount"  # pyfuse3, trio, the reader, the FUSE operations
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
_COMM_BYTES = 15  # TASK_COMM_LEN less its NUL
# A disk that refuses the catalogs' writes: full, over quota, read-only.
_DISK_TROUBLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


def mount_dataset(
    plan: MountPlan, on_ready: Callable[[MountSummary], None], created: Path | None = None
) -> None:
    """Resolve, pin, catalog and serve ``plan`` until unmounted; ``on_ready`` once it is usable.

    ``created``: the highest directory made for the mount point, recorded in the state file so
    that ``unmount`` of a mount whose daemon was killed removes it as the daemon would have."""
    _check_fuse_device()  # before S3 is asked anything: a container without FUSE fails at once
    _check_allow_other(plan.allow_other)  # and a user's --allow-other that fusermount3 refuses
    _limit_malloc_arenas()
    _name_process(plan.name)
    serving = _Loading(_SERVING)  # after the two above: its thread inherits what they set
    source = S3Source(plan.s3)
    catalogs = plan.cache_dir / "catalogs"
    catalog_path = catalogs / f"{runtime.state_path(str(plan.mountpoint)).stem}-{os.getpid()}.db"
    try:
        with _writing_catalogs(plan.cache_dir):
            catalogs.mkdir(parents=True, exist_ok=True, mode=0o700)
            _sweep_dead_catalogs(catalogs)
            built = pinning.pin(
                source, catalog_path, uri=plan.uri, pins=plan.pins, as_of=plan.as_of,
                snapshot=plan.snapshot, kept=KeptCatalogs(plan.cache_dir, plan.disk_cache_bytes),
            )
        with contextlib.ExitStack() as closing:
            pinned = closing.enter_context(contextlib.closing(Catalog.open(catalog_path)))
            # Damage met while serving: the copy kept for the next mount goes (``Catalog``).
            pinned.on_damage = lambda: pinned.remove_copies(kept_files(plan.cache_dir))
            pinning.check_fingerprint(pinned.meta, plan.expect_fingerprint)
            if plan.save_snapshot is not None:
                write_snapshot(pinned, plan.save_snapshot, name=plan.name)
            # A zip single object is mounted as its members, from its persistent member catalog.
            with _writing_catalogs(plan.cache_dir):
                members = archive_catalog(source, pinned, plan.archive, plan.cache_dir)
            catalog = pinned if members is None else closing.enter_context(
                contextlib.closing(members))
            if members is not None:
                members.on_damage = lambda: members.remove_copies([members.path])
            summary = MountSummary(
                catalog.meta.object_count, catalog.meta.total_bytes,
                built.skipped_count + (members.meta.skipped_count if members else 0),
                os.getpid(), catalog.meta.fingerprint,
            )
            _serving(serving).serve_pinned(plan, source, catalog, summary, on_ready, created,
                                           closing)
    finally:
        try:
            catalog_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a cache dir gone read-only: the next mount sweeps the file
            log.info("cannot remove the catalog %s: %s", catalog_path, exc.strerror)


def load_serving_modules() -> None:
    """Import the serving modules here, in a command about to fork several daemons (see the
    module docstring). Safe before a fork (``daemon``): importing them starts no thread and
    leaves no connection or file open (pyfuse3, trio and ours, checked). One that fails to
    import is left to each daemon, which says why (``_serving``)."""
    with contextlib.suppress(Exception):
        importlib.import_module(_SERVING)


class _Loading:
    """A module imported in a thread of its own while the caller goes on (see the docstring);
    none when the module is loaded already (``load_serving_modules``)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        if name in sys.modules:
            return
        with contextlib.suppress(RuntimeError):  # no thread to be had: imported when wanted
            self._thread = start_quiet_thread(self._load, name="s3datafs-load")

    def module(self) -> types.ModuleType:
        """The module, once its import has ended; imported here if the thread could not."""
        if self._thread is not None:
            self._thread.join()
        return importlib.import_module(self._name)  # at once, if the thread imported it

    def _load(self) -> None:
        # A failure is left to ``module``: importing again there raises it where it belongs.
        with contextlib.suppress(BaseException):
            importlib.import_module(self._name)


def _serving(loading: _Loading) -> types.ModuleType:
    """The serving modules; pyfuse3 that cannot load (libfuse3 missing, or another one) is told
    as what to install, in one line, not as an internal error."""
    try:
        return loading.module()
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "pyfuse3":
            raise
        raise ConfigError(f"cannot load pyfuse3 ({exc}): {_FUSE_HELP}") from None


def _limit_malloc_arenas() -> None:
    """Keep glibc to two malloc arenas in the daemon (must run before worker threads start).

    glibc gives threads their own arenas (up to eight per core) and keeps what is freed in them;
    the GET worker threads each pass megabytes through, so the daemon's RSS settled far above what
    it used. Measured on the CI-sized load test: 228 MiB settled RSS with the default, 195 MiB
    with two arenas (same as ``MALLOC_ARENA_MAX=2``, which cannot be set after the process starts).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)


def _name_process(dataset: str) -> None:
    """Name the serving process ``s3datafs/<dataset>``, before worker threads (which inherit it).

    The daemons of one ``mount-all`` or ``run`` share a command line; their names tell them apart
    in ``top``, ``ps -o comm`` and ``pgrep s3datafs``. The kernel keeps 15 bytes of a name.
    """
    # The name's bytes as given: a --name, or a key, that is not UTF-8 failed the mount with
    # "internal error: UnicodeEncodeError". A character cut in two at the end is left out.
    whole = f"s3datafs/{dataset}".encode(errors="surrogateescape")
    cut = _COMM_BYTES
    while cut < len(whole) and whole[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    with contextlib.suppress(OSError), open("/proc/thread-self/comm", "wb") as comm:
        comm.write(whole[:cut])


def _sweep_dead_catalogs(directory: Path) -> None:
    """Remove catalogs left by daemons that died without cleaning up (the pid ends the name)."""
    for path in directory.glob("*-*.db"):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not runtime.pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()


_FUSE_DEVICE = "/dev/fuse"
_FUSE_CONF = "/etc/fuse.conf"  # where fusermount3 looks (Debian's, and libfuse's default)
_FUSE_HELP = ("FUSE must be usable here: install fuse3 (Debian: apt-get install fuse3), and run a "
              "container with --device /dev/fuse --cap-add SYS_ADMIN")
# libfuse's reasons that no install or container flag mends: what does, instead.
_FUSE_REMEDIES = (
    ("user_allow_other", "add user_allow_other to /etc/fuse.conf, or mount without --allow-other"),
    ("failed to open /dev/fuse: Permission denied",
     "this user may not open /dev/fuse: mount as root, or give the user access to the device"),
    ("no write access to mountpoint",
     "a user's mount point must be a directory that user may write: choose one of your own"),
    ("not owned by user",
     "a user's mount point, if sticky, must be their own: choose a directory of your own"),
    ("fusermount3: mount failed: Operation not permitted",
     "fusermount3 must be setuid root for a mount by another user than root (as Debian's fuse3 "
     "installs it), or mount as root"),
)


def fuse_remedy(reason: str) -> str:
    return next((remedy for said, remedy in _FUSE_REMEDIES if said in reason), _FUSE_HELP)


def _check_fuse_device() -> None:
    try:
        fd = os.open(_FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        remedy = fuse_remedy(f"failed to open {_FUSE_DEVICE}: {exc.strerror}")
        raise ConfigError(f"cannot open {_FUSE_DEVICE} ({exc.strerror}): {remedy}") from None
    try:
        is_device = stat.S_ISCHR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    if not is_device:
        raise ConfigError(f"cannot open {_FUSE_DEVICE} (not a device): {_FUSE_HELP}")


def _check_allow_other(allow_other: bool) -> None:
    """Refuse now a user's ``--allow-other`` that fusermount3 would refuse only once the
    dataset is pinned (minutes for a million keys): it wants a line ``user_allow_other`` in
    ``/etc/fuse.conf``. Read as fusermount3 reads it, as the user (a file they may not read
    allows nothing), line by line up to the last newline, less a ``#`` comment and blanks."""
    if not allow_other or os.geteuid() == 0:
        return
    try:
        with open(_FUSE_CONF, encoding="utf-8", errors="replace") as conf:
            lines = conf.read().split("\n")[:-1]
    except OSError:
        lines = []
    if not any(line.partition("#")[0].strip() == "user_allow_other" for line in lines):
        raise ConfigError(f"cannot mount with --allow-other: {_FUSE_CONF} has no line "
                          "user_allow_other, without which only root may: "
                          f"{fuse_remedy('user_allow_other')}")


@contextlib.contextmanager
def _writing_catalogs(cache_dir: Path) -> Iterator[None]:
    """The dataset's catalogs are written under the cache directory: a full or read-only disk
    there is the user's to fix, said in one line (was "internal error: OperationalError")."""
    try:
        yield
    except (sqlite3.OperationalError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _DISK_TROUBLE:
            raise
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(
            f"cannot write the dataset's catalog under {cache_dir} ({reason}): free space "
            "there, or choose another --cache-dir"
        ) from None
