"""One module per subcommand; each has ``register(subparsers)`` and sets ``handler=run``.

To add a command, write its module here and list it in ``MODULES`` (the order is ``--help``'s),
with its command-line name in ``NAMES`` if that differs from the module's.

Modules are imported on demand: ``load(name)`` imports the one module a command line needs, so
``s3datafs status`` never imports botocore, pyfuse3 or trio (~0.15 s), and ``mount`` does not
import what only other commands use (YAML specs, the supervisor: ~10 ms). ``COMMANDS`` (every
command module, in order) still exists for whoever wants them all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = (
    "mount",
    "mount_all",
    "run",
    "unmount",
    "status",
    "snapshot",
    "diff",
    "prefetch",
    "cache",
)
NAMES = {"mount-all": "mount_all", "umount": "unmount"}  # command-line name -> module, if not equal


def module_for(command: str) -> str | None:
    """The module that registers ``command`` (a name or alias on the command line), if any."""
    name = NAMES.get(command, command)
    return name if name in MODULES else None


def load(module: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{module}")


def __getattr__(name: str) -> tuple[ModuleType, ...]:
    if name == "COMMANDS":
        return tuple(load(module) for module in MODULES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
