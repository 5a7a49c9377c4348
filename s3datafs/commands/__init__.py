"""One module per subcommand; each has ``register(subparsers)`` and sets ``handler=run``.

To add a command, write its module here and list it in ``COMMANDS`` (the order is ``--help``'s).
"""

from __future__ import annotations

from . import mount, status, unmount

COMMANDS = (mount, unmount, status)
