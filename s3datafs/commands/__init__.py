"""One module per subcommand; each has ``register(subparsers)`` and sets ``handler=run``.

To add a command, write its module here and list it in ``COMMANDS`` (the order is ``--help``'s).
"""

from __future__ import annotations

from . import cache, diff, mount, mount_all, prefetch, run, snapshot, status, unmount

COMMANDS = (mount, mount_all, run, unmount, status, snapshot, diff, prefetch, cache)
