"""``s3datafs run --datasets SPEC -- COMMAND ARGS...``: mount, run the job, always unmount.

The job container's one-liner (and a good PID 1): every dataset of the spec is mounted as by
``mount-all`` (all or nothing), then COMMAND runs as our child with SIGTERM/SIGINT/SIGHUP
forwarded (``supervisor``), then everything is unmounted whatever happened: success, failure,
the job killed, or ``s3datafs run`` itself asked to stop.

Exit status: the command's own; 128+N when signal N ended it (or arrived before it started);
126/127 when it could not be started; a mount failure's status when mounting failed (nothing is
left mounted then, and the command does not run). A dataset that cannot be unmounted afterwards
is reported, and turns a successful job's 0 into 1.

Mount messages go to stderr, so the job's stdout is the job's alone. When the spec came from
``S3DATAFS_DATASETS``, that variable (which may hold keys) is not passed on to the job.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import supervisor
from ..errors import UsageError
from .mount import add_mount_options
from .mount_all import (
    add_spec_argument,
    announce,
    hide_per_dataset_options,
    load_plans,
    mount_datasets,
    unmount_datasets,
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "run",
        help="mount every dataset of a spec, run a command, unmount",
        usage="%(prog)s [--datasets SPEC] [options] -- COMMAND [ARGS...]",
    )
    add_spec_argument(parser, positional=False)
    add_mount_options(parser)
    hide_per_dataset_options(parser, "foreground")  # a job's run always waits for the job
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the job to run, after --")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command to run: put it after --, e.g. s3datafs run -- python train.py")
    planned = load_plans(args)
    with supervisor.DeferredSignals() as deferred:
        mounted = mount_datasets(planned, args, deferred, outlive_command=False)
        for item in mounted:
            announce(item, file=sys.stderr)
        try:
            status = supervisor.run_command(command, dict(os.environ), pending=deferred.received)
        finally:
            problems = unmount_datasets(mounted)
    for problem in problems:
        print(f"s3datafs: after the command: {problem}", file=sys.stderr)
    return 1 if problems and status == 0 else status


