"""Taking a variable out of this process's environment *block*, not just out of ``os.environ``.

Why: ``S3DATAFS_DATASETS`` may hold AWS keys. ``/proc/<pid>/environ`` shows the environment a
process was started with, read from its memory, and ``unsetenv`` only drops the pointer to the
string; every mount daemon forked from ``run`` or ``mount-all`` would show the keys there for as
long as the job runs (readable by the same user, and root). So the variable's value is
overwritten where it lies, then removed from ``os.environ`` (and so from what children get).

Linux and glibc or musl: the C ``environ`` array points at the strings; this process's own
memory is written, nothing else.
"""

from __future__ import annotations

import ctypes
import os


def scrub(name: str) -> None:
    """Remove ``name`` from the environment and overwrite its value in this process's memory."""
    prefix = name.encode() + b"="
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    index = 0
    while (address := environ[index]) is not None:
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1
    os.environ.pop(name, None)
