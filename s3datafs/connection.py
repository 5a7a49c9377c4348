"""Knowing when the kernel has ended a FUSE connection, so no request outlives its mount.

Why: pyfuse3's main loop returns only once every request handler has returned. After an unmount
the kernel has aborted the connection and nobody waits for those answers, yet a read waiting on
a slow or unreachable S3 kept the daemon alive until ``--read-timeout`` (60 s): ``s3datafs
unmount`` gave up after 30 s and systemd would have waited too. The daemon must instead drop
such requests at once (see ``Operations.abandon_requests``).

How: the kernel reports an aborted connection as ``EPOLLERR`` on its ``/dev/fuse`` descriptor
(and wakes every poller when it aborts). A private epoll set holds that descriptor with no events
asked for, so it reports only errors, never the ``EPOLLIN`` of each request; trio waits on the
epoll set's own descriptor. Nothing polls on a timer and no thread is spent.

A lazy unmount (``umount -l``) keeps the connection, and the files still open on it working,
until they are closed; only then does the kernel abort it and this fire.

pyfuse3 keeps its session descriptor private, so ``fuse_descriptors`` lists the descriptors of
``/dev/fuse`` (character device 10:229) open in this process: the one that appears across
``pyfuse3.init`` is the session's.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat

import trio

_FUSE_DEVICE = os.makedev(10, 229)  # /dev/fuse, whatever path it has in this mount namespace


def fuse_descriptors() -> set[int]:
    """The file descriptors of this process open on ``/dev/fuse``."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is closed by now
            info = os.stat(int(name))
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == _FUSE_DEVICE:
                found.add(int(name))
    return found


async def wait_disconnected(fuse_fd: int) -> None:
    """Return once the kernel has aborted the FUSE connection on ``fuse_fd``."""
    with select.epoll() as errors_only:
        errors_only.register(fuse_fd, 0)  # EPOLLERR and EPOLLHUP are always reported
        while True:
            await trio.lowlevel.wait_readable(errors_only.fileno())
            if any(events & (select.EPOLLERR | select.EPOLLHUP)
                   for _, events in errors_only.poll(0)):
                return
