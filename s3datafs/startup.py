"""How the command line spends less time starting and exiting: the garbage collector's part.

Measured for ``s3datafs mount`` (issue 4, "mount command start to first 4 KiB read"):

- Starting allocates several hundred thousand objects, most of which live as long as the
  process: the modules, and botocore's parsed S3 model and endpoint data. With the default
  thresholds (700, 10, 10) that runs ~160 young, ~14 middle and a full collection that find
  almost nothing to free: ~20-30 ms. ``begin()`` raises the young threshold to
  ``START_THRESHOLD`` (collections still run, ~20 instead of ~175) until ``settle()``.
- ``settle()`` restores the thresholds ``begin()`` found and freezes what exists
  (``gc.freeze``): collections from then on skip the start-up objects. Without the freeze the
  collections deferred by ``begin()`` would all come due right after the mount is ready, a
  ~30 ms pause in the middle of the first read; and every later full collection of a daemon
  would walk objects that never die. The price: cyclic garbage that exists at that moment is
  never freed (measured: ~2,500 objects in a mount daemon, once).
- The command line calls ``settle()`` before any command other than ``mount`` runs; ``mount``
  calls it once the mount is usable (in the daemon, or in the foreground).
- The parent of a mount daemon has nothing left to do once the daemon reported and the result is
  printed: ``exit_soon()`` settles (the interpreter's final collections then skip everything:
  ~70 ms less) and lets ``finish()`` end the process the way libfuse's ``fuse_daemonize`` parent
  does, with ``_exit`` after flushing, instead of tearing down every module (~15 ms more).
  ``finish()`` is what ``python -m s3datafs`` ends with; atexit handlers (logging's flush and
  close among them) still run first.

And the disk's part. A mount loads ~860 files (modules: botocore's, trio's, ours; botocore's
S3 model), one after another: from a cold page cache (a job's fresh container, a benchmark
that drops the caches) that cost ~80 ms more than warm. ``read_ahead(argv)``, for the commands
that mount, asks the kernel for those files at once (``posix_fadvise(WILLNEED)`` from a thread:
the kernel reads them concurrently while the imports go on), so most are in memory when an
import wants them. It only advises: a file read ahead for nothing costs a read, never a
behaviour; a file missed is read as before.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

START_THRESHOLD = 50_000  # young collections every 50,000 net allocations (default 700)

# The commands that mount (``read_ahead``), and the packages their processes import: the mount
# command, then its daemon (trio, pyfuse3). The standard library's modules are not asked for:
# advising them as well measured no better (bench/RESULTS.md, session 31).
MOUNTING_COMMANDS = frozenset({"mount", "mount-all", "run"})
MOUNTING_PACKAGES = ("s3datafs", "botocore", "urllib3", "dateutil", "jmespath", "cachetools",
                     "trio", "outcome", "sniffio", "sortedcontainers", "idna", "attr", "pyfuse3")
_NOT_LOADED = frozenset({"tests", "_tests", "testing", "data"})  # botocore's data: below
BOTOCORE_DATA = ("endpoints.json", "partitions.json", "sdk-default-configuration.json",
                 "_retry.json", "s3")  # of botocore/data: what an S3 client loads

_saved: tuple[int, int, int] | None = None
_exit_soon = False


def begin() -> None:
    """Collect less often while the process starts (until ``settle``)."""
    global _saved
    if _saved is None:
        _saved = gc.get_threshold()
        gc.set_threshold(START_THRESHOLD, *_saved[1:])


def settle() -> None:
    """Start-up is over: thresholds back to what ``begin`` found, start-up objects frozen."""
    global _saved
    if _saved is not None:
        gc.set_threshold(*_saved)
        _saved = None
    gc.freeze()


def exit_soon() -> None:
    """Only exiting is left to do (the parent of a daemon that reported ready): see ``finish``."""
    global _exit_soon
    settle()
    _exit_soon = True


def finish(code: int) -> NoReturn:
    """``sys.exit(code)``; after ``exit_soon()``, without the interpreter's teardown."""
    if _exit_soon:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


def read_ahead(argv: list[str]) -> None:
    """For a command that mounts (``argv[0]``), have the kernel read the files it will load, in
    a thread of its own (see the module docstring); else nothing."""
    if argv[:1] and argv[0] in MOUNTING_COMMANDS:
        import threading

        threading.Thread(target=_advise, args=(mounting_files(),), name="s3datafs-read-ahead",
                         daemon=True).start()


def mounting_files() -> Iterator[str]:
    """The compiled modules and extensions of ``MOUNTING_PACKAGES``, and botocore's S3 data,
    package by package in the order they are imported (lazily: walked by the thread)."""
    import importlib.util

    for name in MOUNTING_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)  # finds, imports nothing
        except (ImportError, ValueError):
            continue
        for root in (spec.submodule_search_locations or []) if spec else []:
            yield from _compiled_below(root)
            if name == "botocore":
                yield from _botocore_data(os.path.join(root, "data"))


def _compiled_below(root: str) -> Iterator[str]:
    """The compiled modules and extensions below ``root``, but of what a mount never loads."""
    suffix = f".{sys.implementation.cache_tag}.pyc"
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [sub for sub in subfolders if sub not in _NOT_LOADED]
        yield from (os.path.join(folder, name) for name in names
                    if name.endswith((suffix, ".so")))


def _botocore_data(data: str) -> Iterator[str]:
    for entry in BOTOCORE_DATA:
        path = os.path.join(data, entry)
        if not os.path.isdir(path):
            yield path
            continue
        for folder, _subfolders, names in os.walk(path):
            yield from (os.path.join(folder, name) for name in names)


def _advise(paths: Iterator[str]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
