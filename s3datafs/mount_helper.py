"""``mount.s3datafs``: the helper mount(8) runs for ``mount -t s3datafs`` and fstab lines.

mount(8) (libmount) looks for ``/sbin/mount.<type>`` (also ``/sbin/fs.d``, ``/sbin/fs``) and
calls it as ``mount.s3datafs SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE]``; systemd ``.mount`` units
go through mount(8) the same way. The kernel lists our mounts as type ``fuse.s3datafs``, and
mount(8) looks for ``mount.fuse.s3datafs`` for that type (``mount -o remount DIR``, fstab lines
of type ``fuse.s3datafs``; without it, ``mount.fuse`` runs ``s3datafs`` as if it were a mount
program). So installing is two symlinks to the one helper (``make install-helper``).

How ``-o`` is read:
- Every long option of ``s3datafs mount`` is an ``-o`` option, its dashes as ``_`` or ``-``
  (``endpoint_url=URL`` and ``endpoint-url=URL`` are ``--endpoint-url URL``). The table is made
  from the ``mount`` command's own parser, so an option added there is usable here at once.
  Options taking a value need ``=VALUE``; flags (``allow_other``) refuse one. ``foreground`` and
  ``data_root`` are not options here: the helper must return once mounted, and DIR is given.
- Generic options mount(8) and fstab use are accepted and ignored: ``_netdev``, ``nofail``,
  ``auto``, ``noauto``, ``user``, ``nouser``, ``users``, ``defaults``, ``x-*`` (``X-*`` too),
  ``comment=*``, the atime options and ``sync``/``async``, ``silent``/``loud``;
  ``nodev``, ``nosuid`` and ``exec`` too (mount(8) adds them for ``user``/``users``; a dataset
  holds no device nodes). ``noexec`` is ``--noexec``. ``ro`` and ``noatime`` are what every
  s3datafs mount is anyway, and so is ``rw`` accepted: mount(8) puts ``rw`` first in the options
  of every mount whose fstab line or command line does not say ``ro`` (``defaults`` reaches the
  helper as ``rw``), and the helper cannot tell that from a typed one. The mount is read-only
  whatever it says; ``-v`` says so.
- ``remount`` (``mount -o remount DIR``, ``systemctl reload`` of a ``.mount`` unit) changes
  nothing: a mount keeps the pins and settings it was mounted with. It succeeds when DIR is an
  s3datafs mount; options of ``s3datafs mount`` in it whose values differ from the mount's own
  (its state file records them) get a warning that they were not applied (unmount and mount
  again for that), ``rw`` is ignored as for a mount (mount(8) passes it on
  remount too, for an fstab line that does not say ``ro``), and the options the kernel reports for
  a FUSE mount (``user_id=``, ``group_id=``, ``default_permissions``, ...), which mount(8) passes
  back, are ignored (``allow_other`` where the mount has it: asked of one without, it is an
  option not applied); ``noexec`` or ``exec`` against what the mount is, is refused.
- Anything else is refused in one line, unless ``-s`` (sloppy) asks to ignore it with a warning.
- Credentials are never option values: the options are visible in ``ps`` and, for mount(8), the
  fstab. Keys come from the environment, a profile, a role or ``credentials_file=FILE`` (e.g. 0600);
  ``aws_secret_access_key=`` and friends are refused by name, even with ``-s``.

Exit status follows mount(8)'s helper convention: 0 mounted, 1 bad invocation or options, 32 the
mount failed. Nothing is printed on success unless ``-v``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import daemon, undumpable
from .errors import MountFailed, S3DataFSError, UsageError

PROG = "mount.s3datafs"
EXIT_USAGE, EXIT_FAILURE = 1, 32
IGNORED = frozenset(
    {
        "_netdev",
        "nofail",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "defaults",
        "nodev",
        "nosuid",
        "exec",
        "ro",
        "rw",
        "noatime",
        # Every s3datafs mount is noatime and read-only: how atime would be kept, and whether
        # writes would be synchronous, change nothing. (``suid`` and ``dev`` stay refused: they
        # would lift the nosuid and nodev every mount has.)
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
        "atime",
        "sync",
        "async",
        "silent",
        "loud",
    }
)
# What the kernel reports for a FUSE mount, passed back by mount(8) on ``remount``; and
# ``allow_other`` where the mount has it (``remount``: asked of one without, it is not applied).
REMOUNT_IGNORED = frozenset({"remount", "default_permissions", "relatime", "nosymfollow"})
REMOUNT_IGNORED_PREFIXES = ("user_id=", "group_id=", "rootmode=", "max_read=", "blksize=")
IGNORED_PREFIXES = ("x-", "comment=")
# Options of mount(8) that would lift what every s3datafs mount keeps: refused, saying so.
LIFTING = {"suid": "nosuid", "dev": "nodev"}
NOT_OPTIONS = frozenset({"help", "foreground", "data_root"})  # the helper's own business
SECRET_OPTIONS = frozenset(
    {
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "access_key",
        "secret_key",
        "secret",
        "password",
        "passwd",
        "token",
    }
)
CREDENTIALS_HELP = (
    "credentials are never mount options (ps and fstab would show them): use "
    "credentials_file=FILE (e.g. mode 0600), profile=NAME, the environment or an instance role"
)


@dataclass(frozen=True)
class OptionSpec:
    long: str  # e.g. "--endpoint-url"
    takes_value: bool


@dataclass(frozen=True)
class Translation:
    args: list[str] = field(default_factory=list)  # long options for ``s3datafs mount``
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HelperCall:
    source: str
    directory: str
    options: str
    sloppy: bool
    fake: bool
    verbose: bool


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def option_table() -> dict[str, OptionSpec]:
    """``-o`` name (dashes as ``_``) -> the ``s3datafs mount`` option it stands for."""
    table = {}
    for action in _mount_parser()._actions:  # argparse has no public list of actions
        longs = [option for option in action.option_strings if option.startswith("--")]
        if not longs:
            continue
        key = longs[0][2:].replace("-", "_")
        if key not in NOT_OPTIONS:
            table[key] = OptionSpec(longs[0], takes_value=action.nargs != 0)
    return table


def _mount_parser() -> argparse.ArgumentParser:
    from .cli import build_parser  # the command line this helper translates into

    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return commands.choices["mount"]


def translate_options(
    text: str, *, sloppy: bool = False, table: dict[str, OptionSpec] | None = None
) -> Translation:
    """Turn a mount(8) option string into ``s3datafs mount`` long options (see module doc)."""
    table = option_table() if table is None else table
    result = Translation()
    for item in (part.strip() for part in text.split(",")):
        if item:
            _translate_one(item, table, sloppy, result)
    return result


def _translate_one(
    item: str, table: dict[str, OptionSpec], sloppy: bool, result: Translation
) -> None:
    name, has_value, value = item.partition("=")
    key = name.replace("-", "_")
    if key.lower() in SECRET_OPTIONS:  # AWS_SECRET_ACCESS_KEY=... too
        raise UsageError(f"option {name!r} refused: {CREDENTIALS_HELP}")
    if item in IGNORED or item.lower().startswith(IGNORED_PREFIXES):  # X-mount.mkdir too
        result.ignored.append(item)
        return
    if name in IGNORED:  # a flag of mount(8)'s with a value: ``user=bob``
        raise UsageError(f"option {name!r} takes no value: write just {name}")
    spec = table.get(key)
    if spec is None and key in LIFTING:  # not "did you mean 'uid'?": a different thing
        raise UsageError(f"option {name!r} refused: every s3datafs mount is {LIFTING[key]}; "
                         f"remove {name}")
    if spec is None and key in NOT_OPTIONS:
        raise UsageError(f"option {name!r} is not for -o: the helper mounts in the background, "
                         "at the mount point mount(8) gives it")
    if spec is None:
        if sloppy:  # by name only: an unknown option's value may be anything, a secret too
            result.warnings.append(f"ignoring unknown option {name!r} (sloppy mode)")
            return
        raise UsageError(f"unknown option {name!r}{_did_you_mean(key, table)}")
    if spec.takes_value and not (has_value and value):
        raise UsageError(f"option {name!r} needs a value: {name}=VALUE")
    if not spec.takes_value and has_value:
        raise UsageError(f"option {name!r} takes no value: write just {name}")
    result.args.append(f"{spec.long}={value}" if spec.takes_value else spec.long)


def _did_you_mean(key: str, table: dict[str, OptionSpec]) -> str:
    close = difflib.get_close_matches(key, [*table, *IGNORED], n=1)
    return f": did you mean {close[0]!r}?" if close else ""


def parse_call(argv: Sequence[str]) -> HelperCall:
    """mount(8)'s calling convention: SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE]."""
    parser = _Parser(prog=PROG, add_help=False)
    parser.add_argument("source")
    parser.add_argument("directory")
    parser.add_argument("-s", dest="sloppy", action="store_true")
    parser.add_argument("-f", dest="fake", action="store_true")
    parser.add_argument("-n", dest="no_mtab", action="store_true")
    parser.add_argument("-v", dest="verbose", action="store_true")
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("-t", dest="type")
    args = parser.parse_args(list(argv))
    return HelperCall(
        source=args.source,
        directory=args.directory,
        options=",".join(args.options),
        sloppy=args.sloppy,
        fake=args.fake,
        verbose=args.verbose,
    )


def mount(call: HelperCall) -> None:
    """Run ``s3datafs mount SOURCE DIR --option...`` in the background; return once usable.

    The ``mount`` command itself runs, so whatever it does with its options, the helper does too;
    its one-line report is shown only with ``-v`` (mount helpers are quiet).
    """
    from .commands import mount as mount_command

    items = _items(call.options)
    if "remount" in items:
        remount(call, items)
        return
    translation = translate_options(call.options, sloppy=call.sloppy)
    if "rw" in items:
        _say(call, f"{PROG}: rw ignored: s3datafs mounts are read-only")
    for warning in translation.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    args = _mount_parser().parse_args([call.source, call.directory, *translation.args])
    if call.fake:
        plan = mount_command.build_plan(args)
        _say(call, f"{PROG}: would mount {plan.uri} at {plan.mountpoint} (-f: nothing done)")
        return
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        mount_command.run(args)
    _say(call, report.getvalue().rstrip("\n"))


def remount(call: HelperCall, items: list[str]) -> None:
    """``-o remount``: nothing to change on a mounted s3datafs at DIR (see the module doc)."""
    from . import runtime
    from .config import is_dead_mount

    if "rw" in items:  # as for a mount: mount(8) passes it for every line not saying "ro"
        _say(call, f"{PROG}: rw ignored: s3datafs mounts are read-only")
    target = os.path.realpath(call.directory)
    ours = [
        entry for entry in runtime.mount_table()
        if entry.mountpoint == target and entry.fstype == runtime.FSTYPE
    ]
    if not ours:
        raise MountFailed(f"{call.directory} is not an s3datafs mount: nothing to remount")
    if is_dead_mount(target, ours[-1].owner_to_ask_as()):
        raise MountFailed(f"{call.directory} is a dead mount (its daemon is gone): unmount it "
                          "and mount again")
    # noexec or exec as the mount already is: mount(8) passes the mount's options back, noexec
    # included. The other one is a change of who may execute what, asked for and impossible
    # here: refused, not warned of. (mount(8) drops "exec" against a noexec mount's "noexec":
    # a noexec mount whose options lack noexec was asked for exec.)
    if "noexec" in ours[-1].options:
        wrong = "exec" if "noexec" not in items else None
    else:
        wrong = "noexec" if "noexec" in items else None
    if wrong is not None:
        raise MountFailed(
            f"cannot remount {call.directory} {wrong}: a remount changes nothing; unmount and "
            f"mount again with {wrong}"
        )
    # allow_other as the mount already is, which the kernel lists and mount(8) passes back, is
    # no change; asked of a mount without it, it is an option of ours not applied (warned of).
    passed_back = {"allow_other"} & ours[-1].super_options
    kept = [
        item
        for item in items
        if item not in REMOUNT_IGNORED and not item.startswith(REMOUNT_IGNORED_PREFIXES)
        and item not in ("exec", "noexec", *passed_back)
    ]
    translation = translate_options(",".join(kept), sloppy=call.sloppy)
    for warning in translation.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    changed = _options_changed(call, translation.args, runtime.read_state(target))
    if changed:
        names = ", ".join(changed)
        print(
            f"{PROG}: warning: remount of {call.directory} changes nothing ({names} not applied): "
            "unmount and mount again to change a mount's settings",
            file=sys.stderr,
        )
    _say(call, f"{PROG}: {call.directory} remounted: nothing to change")


def _options_changed(call: HelperCall, args: list[str], state: dict | None) -> list[str]:
    """The options of ``args`` (``s3datafs mount`` long options) whose value differs from what
    the mount at ``call.directory`` was started with (its state file says): ``systemctl
    reload`` passes the fstab line's options again, and the same values were warned of as
    not applied at every reload. All of them when the mount did not record its options (an
    earlier release's daemon)."""
    parser = _mount_parser()
    given = parser.parse_args([call.source, call.directory, *args])
    running = state.get("options") if isinstance(state, dict) else None
    changed = []
    for option in dict.fromkeys(arg.partition("=")[0] for arg in args):  # the last value wins
        dest = parser._option_string_actions[option].dest  # argparse: no public lookup
        if not isinstance(running, dict) or running.get(dest) != getattr(given, dest):
            changed.append(option)
    return changed


def _items(options: str) -> list[str]:
    return [item for item in (part.strip() for part in options.split(",")) if item]


def _say(call: HelperCall, message: str) -> None:
    if call.verbose and message:
        print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    undumpable.refuse_core_dumps()  # before any key is read
    daemon.note_inherited_descriptors()
    call: HelperCall | None = None
    try:
        call = parse_call(argv)
        mount(call)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except S3DataFSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        if call is not None and "debug" in (item.strip() for item in call.options.split(",")):
            raise  # -o debug: the traceback is what was asked for
        print(f"{PROG}: internal error: {exc!r} (add -o debug for details)", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
