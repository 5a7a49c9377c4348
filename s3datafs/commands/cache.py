"""``s3datafs cache stats|clear``: look at and empty the persistent block cache.

Both work on the cache directory offline (no mount needed). ``clear`` takes each object's cache
lock while deleting it, so it is safe while mounts are using the cache: their next read of a
cleared block is a miss and goes to S3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from .. import config, keptcatalogs
from ..archive.index import clear_indexes
from ..cache import disk
from ..errors import ConfigError
from ..units import counted, human_size
from ..uri import parse_s3_uri


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cache", help="show or clear the block cache")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    stats = actions.add_parser("stats", help="size, blocks and bytes per dataset")
    stats.add_argument("--cache-dir", type=Path, help="default: the mount default")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=run_stats)
    clear = actions.add_parser("clear", help="delete cached blocks, zip member indexes and "
                               "kept snapshot catalogs (all, or those under one URI)")
    clear.add_argument("uri", nargs="?", help="only objects under this s3:// URI")
    clear.add_argument("--cache-dir", type=Path, help="default: the mount default")
    clear.set_defaults(handler=run_clear)


def run_stats(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or config.default_cache_dir()
    with _cache_errors(cache_dir):
        usage = disk.usage(cache_dir)
        kept = keptcatalogs.usage(cache_dir)
    if args.json:
        print(
            json.dumps(
                {"bytes": usage.bytes, "blocks": usage.blocks, "by_dataset": usage.by_dataset,
                 "snapshot_catalogs": {"count": kept.catalogs, "bytes": kept.bytes}}
            )
        )
        return 0
    absent = "" if cache_dir.exists() else f" (there is no {cache_dir} yet: check --cache-dir)"
    print(f"cache: {human_size(usage.bytes)} in {counted(usage.blocks, 'block')}{absent}")
    for dataset, size in sorted(usage.by_dataset.items(), key=lambda item: -item[1]):
        print(f"  {human_size(size):>10}  {dataset}")
    if kept.catalogs:
        print(f"catalogs of snapshot files kept for the next mount: {human_size(kept.bytes)} in "
              f"{counted(kept.catalogs, 'catalog')}")
    return 0


@contextlib.contextmanager
def _cache_errors(cache_dir: Path) -> Iterator[None]:
    """A cache directory that is a file, unreadable or failing: one line, not a traceback."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"cache directory {cache_dir} is not a directory: check --cache-dir")
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            f"cannot use cache directory {cache_dir}: {exc.strerror or exc}: check --cache-dir"
        ) from None


def run_clear(args: argparse.Namespace) -> int:
    under = parse_s3_uri(args.uri) if args.uri else None
    cache_dir = args.cache_dir or config.default_cache_dir()
    with _cache_errors(cache_dir):
        if cache_dir.exists():  # what it deletes must be only this user's to change
            config.prepare_cache_dir(cache_dir)
        removed = disk.clear(cache_dir, under)
        indexes = clear_indexes(cache_dir, under)
        catalogs = keptcatalogs.clear(cache_dir, under)
    removed_parts = [f"the cached blocks of {counted(removed, 'object')}"]
    if indexes:
        removed_parts.append(f"{indexes} zip member index{'' if indexes == 1 else 'es'}")
    if catalogs:
        removed_parts.append(counted(catalogs, "snapshot catalog"))
    *first, last = removed_parts
    print(f"s3datafs: removed {', '.join(first) + ' and ' if first else ''}{last}")
    return 0
