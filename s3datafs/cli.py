"""The ``s3datafs`` command: argv in, exit status out.

Conventions (those of mount tools): usage errors print one line and exit 2; every other failure
prints one line ``s3datafs: <problem>: <what to do>`` and exits 1; no traceback unless ``--debug``.
``mount`` returns only when the mount is usable (exit 0) or has failed with nothing left mounted.
Secrets are never taken from argv: keys come from the environment, a profile or a 0600
``--credentials-file``. Each subcommand lives in ``s3datafs.commands``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS
from .errors import S3DataFSError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (and exit 2), as the CLI promises."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="s3datafs", description="Mount pinned S3 datasets read-only.")
    parser.add_argument("--version", action="version", version=f"s3datafs {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except S3DataFSError as exc:
        print(f"s3datafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"s3datafs: internal error: {exc!r} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
