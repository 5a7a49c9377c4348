"""``python -m s3datafs`` and the ``s3datafs`` command (``main``, its entry point).

Both start the same way: a command that mounts has the kernel read ahead the files it will
load before anything else is imported (``startup.read_ahead``), and both end through
``startup.finish`` (a daemon's parent exits without the interpreter's teardown).
"""

import sys
from typing import NoReturn

from . import startup


def main() -> NoReturn:
    startup.read_ahead(sys.argv[1:])  # first: those files come in while the imports go on
    from .cli import main as command

    startup.finish(command())


if __name__ == "__main__":
    main()
