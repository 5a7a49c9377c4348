"""``s3datafs snapshot URI -o FILE``: pin a dataset and write its snapshot file, mounting nothing.

Same rules and options as ``mount`` (``add_source_options``: ``--name``, ``--version-id``,
``--etag``, ``--as-of``, ``--expect-fingerprint``, S3 access). The listing is pinned into a
scratch catalog under the cache directory (removed afterwards) and the file is written from it in
key order, so memory stays flat whatever the size. The file appears only when everything
succeeded, the expected fingerprint included; on any failure nothing is written (an existing FILE
is left as it was).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from .. import config, logsetup, pinning, s3source
from ..catalog import Catalog
from ..snapshot import write_snapshot
from ..units import counted, human_size
from ..uri import dataset_name, parse_s3_uri, validate_name
from .mount import add_source_options, hide_options, s3_settings, source_pins, writable_file


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "snapshot", help="write a snapshot file of a dataset (what mount would pin), no mount"
    )
    parser.add_argument("uri", help="s3://bucket, s3://bucket/prefix/ or s3://bucket/key")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="the snapshot file to write (gzip'd JSON lines)",
    )
    add_source_options(parser)
    add_scratch_options(parser)
    hide_options(parser, "data_root")  # nothing is mounted
    parser.set_defaults(handler=run)


def add_scratch_options(parser: argparse.ArgumentParser) -> None:
    """Where scratch catalogs go, and logging: for commands that pin without mounting."""
    parser.add_argument("--cache-dir", type=Path, help="where the scratch catalog is built")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument("--debug", action="store_true", help="log everything, show tracebacks")


def run(args: argparse.Namespace) -> int:
    uri = parse_s3_uri(args.uri)
    name = validate_name(args.name if args.name is not None else dataset_name(uri))
    pins, as_of = source_pins(args)
    expected = pinning.parse_expected(args.expect_fingerprint)
    output = writable_file(args.output, "--output")
    assert output is not None
    settings = s3_settings(args)
    logsetup.setup(
        debug=args.debug, verbose=args.verbose, log_file=None, secrets=settings.secrets()
    )
    s3source.check_settings(settings)
    cache_dir = args.cache_dir or config.default_cache_dir()
    config.prepare_cache_dir(cache_dir)
    with pinning.scratch_catalog(cache_dir) as catalog_path:
        source = s3source.S3Source(settings)
        pinning.pin(source, catalog_path, uri=uri, pins=pins, as_of=as_of)
        with contextlib.closing(Catalog.open(catalog_path)) as catalog:
            pinning.check_fingerprint(catalog.meta, expected)
            header = write_snapshot(catalog, output, name=name)
    when = f", as of {header.as_of}" if header.as_of else ""
    print(
        f"s3datafs: wrote {output}: {header.uri} ({counted(header.object_count, 'object')}, "
        f"{human_size(header.total_bytes)}{when}, fingerprint {header.fingerprint})",
        flush=True,
    )
    return 0
