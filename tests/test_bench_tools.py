"""The small pure helpers of the benchmark tools (the benchmarks themselves run by hand)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.env import filesystem_of
from bench.seq_split import parse_variant


def test_a_variant_is_a_name_and_its_mount_arguments() -> None:
    assert parse_variant("default=") == ("default", ())
    assert parse_variant("nc=--no-cache") == ("nc", ("--no-cache",))
    assert parse_variant("pf=--max-prefetch-memory 128M --block-size=1M") == (
        "pf", ("--max-prefetch-memory", "128M", "--block-size=1M"))


def test_a_variant_without_a_name_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=ARGS"):
        parse_variant("=--no-cache")


def test_the_filesystem_of_a_path_is_its_innermost_mount() -> None:
    assert filesystem_of(Path("/proc/self")).startswith("proc on proc at /proc ")
    assert " at / (" in filesystem_of(Path("/"))
    assert " at /proc (" not in filesystem_of(Path("/procfs-lookalike"))
