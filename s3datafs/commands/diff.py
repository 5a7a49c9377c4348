"""``s3datafs diff A B``: did the dataset change? Two snapshot files, or a file and a URI.

Each operand is pinned into a scratch catalog exactly as ``mount`` would pin it (a file is
verified against its header and needs no S3 at all; a URI is resolved and listed, ``--as-of``
applying to URI operands), then both are walked in key order together. Objects are compared by
their path in the mounted tree (the key relative to the dataset's prefix), so a dataset can be
compared with a copy under another prefix; an object is *changed* when its ETag or size differs,
or its VersionId when both sides are versions of one key (see ``_versions_comparable``).
Output, one line each, in path order::

    + path                      only in B (added)
    - path                      only in A (removed)
    ~ path: etag E1 -> E2, ...  in both, different

then a summary line. Exit status as diff(1): 0 no differences, 1 differences, 2 trouble (any
error, printed as one line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from .. import config, logsetup, pinning, s3source
from ..catalog import Catalog
from ..errors import S3DataFSError
from ..model import ObjectRef
from ..snapshot import load_snapshot
from ..uri import parse_s3_uri
from .mount import add_s3_access_options, s3_settings
from .snapshot import add_scratch_options

DIFFERENT = 1


class DiffTrouble(S3DataFSError):
    """Any failure of ``diff``: exit 2, so that 1 keeps meaning "they differ"."""

    exit_code = 2


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "diff", help="compare two datasets (snapshot files or s3:// URIs)"
    )
    parser.add_argument("a", metavar="A", help="snapshot file or s3:// URI (the old side)")
    parser.add_argument("b", metavar="B", help="snapshot file or s3:// URI (the new side)")
    parser.add_argument("--as-of", metavar="TIME", help="view URI operands as of TIME")
    add_s3_access_options(parser)
    add_scratch_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DiffTrouble:
        raise
    except S3DataFSError as exc:
        raise DiffTrouble(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    as_of = None if args.as_of is None else config.parse_as_of(args.as_of, time.time())
    settings = s3_settings(args)
    logsetup.setup(
        debug=args.debug, verbose=args.verbose, log_file=None, secrets=settings.secrets()
    )
    cache_dir = args.cache_dir or config.default_cache_dir()
    config.prepare_cache_dir(cache_dir)
    with contextlib.ExitStack() as stack:
        catalogs = []
        for operand in (args.a, args.b):
            path = stack.enter_context(pinning.scratch_catalog(cache_dir))
            _pin_operand(operand, path, settings, as_of)
            catalogs.append(stack.enter_context(contextlib.closing(Catalog.open(path))))
        old, new = catalogs
        counts = {"+": 0, "-": 0, "~": 0}
        for sign, path, text in differences(old, new):
            counts[sign] += 1
            print(f"{sign} {_shown(path)}{text}")
    return _summary(counts, old.meta.fingerprint, new.meta.fingerprint)


def _pin_operand(
    operand: str, catalog_path: Path, settings: s3source.S3Settings, as_of: float | None
) -> None:
    if operand.startswith("s3://"):
        s3source.check_settings(settings)
        source = s3source.S3Source(settings)
        pinning.pin(source, catalog_path, uri=parse_s3_uri(operand), as_of=as_of)
    else:
        load_snapshot(Path(operand), catalog_path)


def differences(old: Catalog, new: Catalog) -> Iterator[tuple[str, str, str]]:
    """``(sign, path, details)`` for every path that differs, in path order."""
    olds, news = _by_path(old), _by_path(new)
    a, b = next(olds, None), next(news, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            yield "-", a[0], ""
            a = next(olds, None)
        elif a is None or b[0] < a[0]:
            yield "+", b[0], ""
            b = next(news, None)
        else:
            changes = _changes(a[1], b[1])
            if changes:
                yield "~", a[0], ": " + changes
            a, b = next(olds, None), next(news, None)


def _by_path(catalog: Catalog) -> Iterator[tuple[str, ObjectRef]]:
    """Objects by path relative to the dataset root (keys sharing a prefix keep their order)."""
    prefix = len(catalog.meta.prefix)
    for ref in catalog.objects():
        yield ref.key[prefix:], ref


def _changes(a: ObjectRef, b: ObjectRef) -> str:
    pairs = [
        ("etag", a.etag.strip('"'), b.etag.strip('"')),
        ("size", a.size, b.size),
    ]
    if _versions_comparable(a, b):
        pairs.insert(0, ("version", a.version_id, b.version_id))
    return ", ".join(f"{name} {x} -> {y}" for name, x, y in pairs if x != y)


def _versions_comparable(a: ObjectRef, b: ObjectRef) -> bool:
    """Version ids say something only between versions of one key, both real ones: a copy
    under another prefix or bucket never shares them, and the 'null' of an object written
    before versioning is the absent id of a snapshot taken then."""
    return ((a.bucket, a.key) == (b.bucket, b.key)
            and None not in (a.version_id, b.version_id)
            and "null" not in (a.version_id, b.version_id))


def _shown(path: str) -> str:
    """The path as printed: as is, or JSON-quoted if it holds characters a line cannot."""
    if path == "":
        return "./"  # the prefix's own directory marker
    return path if path.isprintable() and path.strip() == path else json.dumps(path)


def _summary(counts: dict[str, int], old: str, new: str) -> int:
    if not any(counts.values()):
        print(
            f"s3datafs: no differences (fingerprint {new})"
            if old == new
            else f"s3datafs: no differences in contents (fingerprint {old} -> {new}: other "
            "keys or version ids)"
        )
        return 0
    print(
        f"s3datafs: {counts['+']} added, {counts['-']} removed, {counts['~']} changed "
        f"(fingerprint {old} -> {new})"
    )
    return DIFFERENT
