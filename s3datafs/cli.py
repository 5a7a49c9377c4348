"""The ``s3datafs`` command: argv in, exit status out.

Conventions (those of mount tools): usage errors (a bad datasets spec too) print one line and exit
2; every other failure prints one line ``s3datafs: <problem>: <what to do>`` and exits 1 (``diff``:
2, as diff(1)); no traceback unless ``--debug``.
``mount`` returns only when the mount is usable (exit 0) or has failed with nothing left mounted.
Secrets are never taken from argv: keys come from the environment, a profile or a 0600
``--credentials-file``. Each subcommand lives in ``s3datafs.commands``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, commands, daemon, startup, undumpable
from .errors import S3DataFSError, UsageError, first_ours


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line (and exit 2), as the CLI promises, and
    takes options by their whole names only: an abbreviation written in a script, a systemd
    unit or a spec today (``--arch``) could name another option, or none, once a later release
    adds one that starts the same; fstab's ``-o`` options are whole names already."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; or, when ``argv`` starts with a command, that command alone.

    Registering a command imports its module (and what it imports: botocore, pyfuse3, trio), so
    a command line that names its command up front registers only that one. Anything else (no
    command, an unknown one, ``--help``, ``--version``) gets every command, so help and usage
    errors are the same as ever.
    """
    parser = _Parser(prog="s3datafs", description="Mount pinned S3 datasets read-only.")
    parser.add_argument("--version", action="version", version=f"s3datafs {__version__}")
    subparsers = parser.add_subparsers(dest="subcommand", required=True, parser_class=_Parser,
                                       metavar="COMMAND")
    only = commands.module_for(argv[0]) if argv else None
    for module in (only,) if only else commands.MODULES:
        commands.load(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    undumpable.refuse_core_dumps()  # before any key is read
    debug = "--debug" in argv
    daemon.note_inherited_descriptors()
    startup.begin()  # until the command runs; ``mount`` settles once the mount is usable
    try:
        args, unknown = build_parser(argv).parse_known_args(argv)
        if unknown:  # argparse would point at the top level's --help, not the command's
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} "
                             f"(see 's3datafs {args.subcommand} --help')")
        if not getattr(args, "fast_start", False):
            startup.settle()
        status = args.handler(args)
        sys.stdout.flush()  # here, where a reader gone away is seen (below), not at exit
        return status
    except S3DataFSError as exc:
        print(f"s3datafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except ExceptionGroup as group:  # from trio's nurseries: their first error of ours, if any
        if debug:
            raise
        if (exc := first_ours(group)) is None:
            return _internal_error(group)
        print(f"s3datafs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of our output went away (``| head``)
        with contextlib.suppress(OSError):  # so that the exit's flush of stdout says nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # as a command killed by SIGPIPE: no traceback, no message
    except Exception as exc:
        if debug:
            raise
        return _internal_error(exc)
    finally:  # however it ended (--help, a usage error): the thresholds back, for a caller that
        startup.settle()  # stays in this process, as the tests do (a settled one: no change)


def _internal_error(exc: Exception) -> int:
    print(f"s3datafs: internal error: {exc!r} (run with --debug for details)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
