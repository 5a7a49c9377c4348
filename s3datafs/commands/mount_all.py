"""``s3datafs mount-all SPEC``: mount every dataset of a spec at DATA_ROOT/NAME, all or nothing.

Flow (``run`` shares it): spec -> ``DatasetSpec``s (``datasets``) -> one ``MountPlan`` per
dataset -> ``start_mount`` for each, in spec order.

- **Plans first.** Every plan is built (and so checked locally: names, modes, credentials files,
  options, endpoint and region) before anything is mounted; a mistake in the last dataset mounts
  nothing. A value a dataset's field gave is refused by the field's name (``'kernelReadahead'``),
  not by the option's; so is a pin S3 refuses (``check 'versionId'``, once mounting began).
- **Options as defaults.** The command takes ``mount``'s options; each applies to every dataset
  unless the dataset's own field says otherwise (``endpointUrl``, ``region``, keys or
  ``noSignRequest`` over ``--profile``/``--credentials-file``/``--no-sign-request``, ``versionId``
  or ``snapshot`` over ``--as-of``). Options that only make sense for one dataset (``--name``,
  ``--version-id``, ``--etag``, ...) are refused: they belong in the spec.
- **Credentials stay in memory.** A dataset's keys go into its plan in this process, and
  ``start_mount`` forks the daemon, which inherits them: they are never in argv, the environment of
  another process, the mount table, a log (every dataset's secrets are given to the redactor of
  every log) or a file we write.
- **All or nothing.** If a dataset fails to mount, or a stop signal arrives while mounting, the
  datasets already mounted are unmounted (newest first) and the mount point directories this
  command created are removed; the error names the dataset. If the command is killed outright
  while mounting (SIGKILL, the OOM killer), its daemons unmount themselves: each is held until
  every dataset has mounted (``daemon.release``).
- ``--foreground`` mounts everything, tells the service manager READY=1, and unmounts everything
  on SIGTERM/SIGINT/SIGHUP (or stops once every mount is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import (
    config,
    daemon,
    datasets,
    envblock,
    logsetup,
    mounting,
    s3source,
    sdnotify,
    supervisor,
)
from ..datasets import DatasetError, DatasetSpec
from ..errors import ConfigError, S3DataFSError, UsageError
from ..plan import MountPlan
from .mount import _announce as announce_mount
from .mount import add_mount_options, build_plan, hide_options, start_mount
from .unmount import NotMountedError, unmount_path

log = logging.getLogger(__name__)

# global options that describe one dataset: (attribute, option, spec field or None)
PER_DATASET_OPTIONS = (
    ("name", "--name", "name"),
    ("version_id", "--version-id", "versionId"),
    ("etag", "--etag", "etag"),
    ("snapshot", "--snapshot", "snapshot"),
    ("save_snapshot", "--save-snapshot", None),
    ("expect_fingerprint", "--expect-fingerprint", None),
)
# spec fields that map onto options other commands own: field -> (attribute, option)
OPTIONAL_FIELDS = {"asOf": ("as_of", "--as-of"), "snapshot": ("snapshot", "--snapshot")}
# Options whose values a dataset's field may give instead: option -> field. An error about such
# a value (checked as the option's is when planned, or refused by S3 when mounted: "check
# --version-id") names the field when the dataset gave it (``_in_spec_words``).
SPEC_FIELDS_OF_OPTIONS = {
    "--kernel-readahead": "kernelReadahead",
    "--archive": "archive",
    "--as-of": "asOf",
    "--endpoint-url": "endpointUrl",
    "--region": "region",
    "--version-id": "versionId",
    "--etag": "etag",
}
# Those a spec alone sets: mount-all and run have no such option, so it is never their name.
_SPEC_ONLY_OPTIONS = frozenset({"--version-id", "--etag"})


@dataclass(frozen=True)
class PlannedDataset:
    spec: DatasetSpec
    plan: MountPlan


@dataclass(frozen=True)
class MountedDataset:
    planned: PlannedDataset
    summary: dict
    created: Path | None  # the highest directory mounting created, removed again on unmount

    @property
    def plan(self) -> MountPlan:
        return self.planned.plan


class Interrupted(S3DataFSError):
    """A stop signal arrived while mounting; everything was unmounted again."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}: nothing left mounted")
        self.exit_code = 128 + signum


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "mount-all", help="mount every dataset of a spec (JSON or YAML), all or nothing"
    )
    add_spec_argument(parser, positional=True)
    add_mount_options(parser)
    hide_per_dataset_options(parser)
    parser.set_defaults(handler=run)


def hide_per_dataset_options(parser: argparse.ArgumentParser, *also: str) -> None:
    """Out of ``--help``: they are parsed only to be refused with a line saying what to do
    (``also``: more options, by attribute, that mean nothing to this command)."""
    hide_options(parser, *(attribute for attribute, _option, _field in PER_DATASET_OPTIONS), *also)


def add_spec_argument(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    help_text = f"JSON or YAML file, or - for stdin (default: ${datasets.ENV_VAR})"
    if positional:
        parser.add_argument("spec", nargs="?", metavar="SPEC", help=help_text)
    else:
        parser.add_argument("--datasets", dest="spec", metavar="SPEC", help=help_text)


def run(args: argparse.Namespace) -> int:
    planned = load_plans(args)
    if not planned:
        return 0
    with supervisor.DeferredSignals() as deferred:
        mounted = mount_datasets(planned, args, deferred, outlive_command=not args.foreground)
        for item in mounted:
            announce(item, file=sys.stdout)
        if not args.foreground:
            return 0
        return _hold(mounted, deferred)


def _hold(mounted: list[MountedDataset], deferred: supervisor.DeferredSignals) -> int:
    names = ", ".join(item.plan.name for item in mounted)
    sdnotify.notify("READY=1", f"STATUS=serving {len(mounted)} datasets: {names}")
    serving = {int(item.summary["pid"]): item for item in mounted}

    def gone(pid: int, status: int) -> None:
        """A daemon ended while we serve: unmounted by someone (fine), or died (say so)."""
        item = serving.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            log.info("%s: unmounted (%s)", item.planned.spec.label, item.plan.mountpoint)
            what = "unmounted"
        else:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            log.warning("%s: its daemon (pid %d) died (%s): %s is a dead mount, files there "
                        "fail with ENOTCONN; stop and start again to mount it anew",
                        item.planned.spec.label, pid, how, item.plan.mountpoint)
            what = f"died ({how})"
        sdnotify.notify(f"STATUS=serving {len(serving)} of {len(mounted)} datasets; "
                        f"{item.plan.name} {what}")

    try:
        supervisor.hold(list(serving), pending=deferred.received, on_exit=gone)
    finally:
        sdnotify.notify("STOPPING=1")
        problems = unmount_datasets(mounted)
    for problem in problems:
        print(f"s3datafs: {problem}", file=sys.stderr)
    return 1 if problems else 0  # stopping on request is a clean exit (systemd expects 0)


# -- spec -> plans -----------------------------------------------------------------------------


def load_plans(args: argparse.Namespace) -> list[PlannedDataset]:
    """Read the spec ``args.spec`` names, set up console logging, and plan every dataset."""
    specs = datasets.load_specs(args.spec)
    ignored = args.spec is not None and bool(os.environ.get(datasets.ENV_VAR))
    # Keys in the variable must not stay in /proc/*/environ, nor reach a job: used or not.
    envblock.scrub(datasets.ENV_VAR)
    _log_to(None, args, [secret for spec in specs for secret in spec.secrets()])
    if ignored:
        log.warning("$%s is set but not used: the datasets come from %s", datasets.ENV_VAR,
                    "stdin" if args.spec == "-" else args.spec)
    planned = plan_datasets(specs, args)  # the command's options are checked even so
    if not planned:  # a job's platform that passes "[]" (run goes on to the job)
        print("s3datafs: the datasets spec lists no datasets: nothing to mount", file=sys.stderr)
    return planned


def plan_datasets(specs: list[DatasetSpec], args: argparse.Namespace) -> list[PlannedDataset]:
    """One checked ``MountPlan`` per dataset; nothing is mounted or contacted yet."""
    _refuse_per_dataset_options(args)
    planned = [PlannedDataset(spec, _plan(spec, args)) for spec in specs]
    _refuse_shared_mountpoints(planned)
    # The datasets' logs share a directory: a problem there is the command's, said once (it was
    # said as the first dataset's when that one was mounted).
    for directory, cache_dir in sorted({
        (item.plan.log_file.parent, item.plan.cache_dir) for item in planned
        if item.plan.log_file not in (None, logsetup.STDERR)
    }):
        logsetup.check_log_directory(directory, cache_dir=cache_dir)
    return planned


def _refuse_shared_mountpoints(planned: list[PlannedDataset]) -> None:
    """Names were checked in the spec; a snapshot's own name is only known once planned."""
    first_at: dict[Path, PlannedDataset] = {}
    for item in planned:
        other = first_at.setdefault(item.plan.mountpoint, item)
        if other is not item:
            raise DatasetError(
                f"datasets #{other.spec.index} and #{item.spec.index} would both mount at "
                f"{item.plan.mountpoint}: give one of them another 'name'",
                2,
            )


def _refuse_per_dataset_options(args: argparse.Namespace) -> None:
    for attribute, option, spec_field in PER_DATASET_OPTIONS:
        if getattr(args, attribute, None) is not None:
            where = (f"set '{spec_field}' in the spec instead" if spec_field
                     else "not supported here: use 's3datafs mount' (or 'snapshot') per dataset")
            raise UsageError(f"{option} describes a single dataset: {where}")


def _plan(spec: DatasetSpec, args: argparse.Namespace) -> MountPlan:
    try:
        plan = build_plan(dataset_args(spec, args))
        if spec.has_keys:
            keys = dataclasses.replace(
                plan.s3,
                profile=None,
                access_key_id=spec.access_key_id,
                secret_access_key=spec.secret_access_key,
                session_token=spec.session_token,
            )
            plan = dataclasses.replace(plan, s3=keys)
        s3source.check_settings(plan.s3)  # endpoint and region, as mounting would: plans first
    except S3DataFSError as exc:
        raise DatasetError(f"{spec.label}: {_in_spec_words(str(exc), spec)}",
                           exc.exit_code) from None
    return plan


def dataset_args(spec: DatasetSpec, defaults: argparse.Namespace) -> argparse.Namespace:
    """``mount``'s arguments for ``spec``: the command's options, overridden by the spec."""
    args = argparse.Namespace(**vars(defaults))
    args.uri, args.mountpoint, args.foreground = str(spec.uri), None, False
    # a snapshot file names its dataset unless the spec does
    args.name = spec.name if spec.name_given or spec.snapshot is None else None
    args.version_id, args.etag = spec.version_id, spec.etag
    args.endpoint_url = spec.endpoint_url or args.endpoint_url
    args.region = spec.region or args.region
    args.archive = spec.archive or getattr(args, "archive", None)
    args.kernel_readahead = spec.kernel_readahead or getattr(args, "kernel_readahead", None)
    for spec_field, (attribute, option) in OPTIONAL_FIELDS.items():
        value = getattr(spec, attribute)
        if value is not None and not hasattr(args, attribute):
            raise UsageError(
                f"{spec_field!r} needs 's3datafs mount {option}', "
                f"which this version of s3datafs does not have"
            )
        if value is not None and hasattr(args, attribute):  # else the command-wide option
            setattr(args, attribute, value)
    if spec.as_of is None and (spec.version_id or spec.snapshot) and hasattr(args, "as_of"):
        args.as_of = None  # the dataset's own pin wins over a command-wide --as-of
    if spec.has_keys or spec.no_sign_request:
        args.credentials_file, args.profile = None, None
    if spec.requester_pays is not None:
        args.requester_pays = spec.requester_pays
    if spec.no_sign_request is not None:
        args.no_sign_request = spec.no_sign_request
    elif spec.has_keys:
        args.no_sign_request = False
    return args


# -- plans -> mounts ---------------------------------------------------------------------------


def mount_datasets(
    planned: list[PlannedDataset],
    args: argparse.Namespace,
    deferred: supervisor.DeferredSignals,
    *,
    outlive_command: bool,
) -> list[MountedDataset]:
    """Mount every plan in order, or none: on failure or a stop signal, undo and raise.

    ``outlive_command=False``: the mounts are this process's, unmounted when it ends however it
    ends (SIGKILL too: their daemons learn of it from the kernel). Else they outlive it once
    all are mounted; until then they are held, and unmount if it dies."""
    secrets = [secret for item in planned for secret in item.spec.secrets()]
    if len(planned) > 1:  # one copy for every daemon, shared (``mounting`` says why)
        mounting.load_serving_modules()
    mounted: list[MountedDataset] = []
    try:
        for item in planned:
            if deferred.received:
                raise Interrupted(deferred.received[0])
            # What this command made since its last freeze (botocore's data, the serving
            # modules, the plans, their garbage) is left out of collections, here and in the
            # daemon forked next: a collection writes to every object it looks at, and a page
            # written to is shared no more. (Measured, 20 datasets: without it the 19th daemon,
            # then the command, ran a full collection; the 19th and 20th daemons each held
            # 12.5 MiB more of their own than the others.)
            gc.freeze()
            mounted.append(_mount_one(item, args, secrets, outlive_command))
        if deferred.received:
            raise Interrupted(deferred.received[0])
    except BaseException as exc:
        problems = unmount_datasets(mounted)
        if outlive_command:
            for done in mounted:
                daemon.let_go(int(done.summary["pid"]))
        if isinstance(exc, S3DataFSError) and not isinstance(exc, Interrupted):
            raise DatasetError(_failure(item, exc, mounted, problems), exc.exit_code) from None
        raise
    finally:
        _log_to(None, args, secrets)
    if outlive_command:  # all mounted: from now on they outlive this command
        for done in mounted:
            daemon.release(int(done.summary["pid"]))
    return mounted


def _mount_one(
    item: PlannedDataset, args: argparse.Namespace, secrets: list[str], outlive_command: bool
) -> MountedDataset:
    _log_to(item.plan.log_file, args, secrets)  # the daemon forked next inherits this
    created = _highest_missing(item.plan.mountpoint)
    summary = start_mount(item.plan, foreground=False, outlive_command=outlive_command,
                          held=outlive_command)
    return MountedDataset(item, summary, created)


def _failure(
    item: PlannedDataset, exc: S3DataFSError, mounted: list[MountedDataset], problems: list[str]
) -> str:
    message = f"{item.spec.label}: {_in_spec_words(str(exc), item.spec)}"
    if mounted:
        names = ", ".join(repr(done.plan.name) for done in mounted)
        message += f" (unmounted {names} again)"
    if problems:
        message += f"; but: {'; '.join(problems)}"
    return message


def _in_spec_words(message: str, spec: DatasetSpec) -> str:
    """``message`` naming the spec's field instead of the option for each value the dataset gave
    itself (``'versionId'``, not ``--version-id``), and for what only a spec can give; the
    command's own options, every dataset's defaults, keep their names."""
    for option, field in SPEC_FIELDS_OF_OPTIONS.items():
        if option in _SPEC_ONLY_OPTIONS or getattr(spec, datasets.FIELDS[field]) is not None:
            message = re.sub(rf"(?<![\w-]){re.escape(option)}(?![\w-])", repr(field), message)
    return message


def unmount_datasets(mounted: list[MountedDataset]) -> list[str]:
    """Unmount ``mounted`` newest first (lazily if busy); return what could not be done."""
    problems = []
    for item in reversed(mounted):
        try:
            lazily = _unmount(item.plan.mountpoint)
        except NotMountedError:  # unmounted already (by the job, or its daemon on SIGTERM)
            lazily = False
        except Exception as exc:  # the others must still be unmounted
            problems.append(str(exc) if isinstance(exc, ConfigError) else
                            f"cannot unmount {item.plan.mountpoint}: {exc!r}")
            continue
        config.remove_created(item.plan.mountpoint, item.created)
        # a lazily detached daemon serves its open files until they are closed: do not wait
        supervisor.reap(int(item.summary["pid"]), timeout=0 if lazily else 10)
    return problems


def _unmount(mountpoint: Path) -> bool:
    """Unmount and wait for the daemon; detach lazily if busy (returns True then)."""
    try:
        unmount_path(mountpoint, lazy=False)
    except ConfigError as exc:
        if "busy" not in str(exc):
            raise
        log.warning("%s is busy: detaching it lazily", mountpoint)
        unmount_path(mountpoint, lazy=True)
        return True
    return False


def _highest_missing(path: Path) -> Path | None:
    """The directory ``start_mount`` will create for ``path`` (itself or an ancestor), if any."""
    if os.path.lexists(path):
        return None
    highest = path
    while not os.path.lexists(highest.parent) and highest.parent != highest:
        highest = highest.parent
    return highest


def _log_to(log_file: Path | None, args: argparse.Namespace, secrets: list[str]) -> None:
    """Log to the console and ``log_file``, redacting every dataset's secrets.

    This process's previous log file is closed first; a daemon forked earlier keeps its own copy.
    """
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()
    logsetup.setup(debug=args.debug, verbose=args.verbose, log_file=log_file, secrets=secrets)


def announce(item: MountedDataset, *, file: TextIO) -> None:
    """``mount``'s one-line report for one dataset, to ``file``."""
    with contextlib.redirect_stdout(file):
        announce_mount(item.plan, item.summary)
