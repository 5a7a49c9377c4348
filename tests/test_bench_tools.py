"""The small helpers of the benchmark and dev tools (the benchmarks themselves run by hand)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.env import filesystem_of
from bench.seq_split import parse_variant
from devtools.s3server import stop_process


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


def test_an_ext4_filesystem_says_whether_it_has_a_journal() -> None:
    described = filesystem_of(Path("/var/tmp"))
    if not described.startswith("ext4 "):
        pytest.skip("the scratch filesystem is not ext4")
    assert described.endswith(("; journal", "; no journal"))


def test_stop_process_signals_first_and_kills_only_what_outlives_the_grace() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_process(polite, signal.SIGTERM, 10.0)
    assert polite.returncode == -signal.SIGTERM  # ended by the signal, not killed

    stubborn = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)")], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    stubborn.stdout.readline()  # its handler is in place
    started = time.monotonic()
    stop_process(stubborn, signal.SIGTERM, 0.5)
    assert stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started >= 0.5
    stubborn.stdout.close()

    stop_process(stubborn, signal.SIGTERM, 0.5)  # already ended: nothing to do, no error
