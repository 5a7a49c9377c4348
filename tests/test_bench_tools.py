"""The small helpers of the benchmark and dev tools (the benchmarks themselves run by hand)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.bench_load import Usage, reading
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


def test_the_load_reading_says_what_grew_during_the_measured_phase() -> None:
    warm, idle = Usage(rss_mib=288.0, fds=35, threads=17), Usage(372.0, 35, 2)
    midway = Usage(rss_mib=370.0, fds=35, threads=16)
    plateau = reading(warm, midway, Usage(rss_mib=372.0, fds=35, threads=14), idle)
    assert "RSS 288 -> 372 MiB (+84, +2 of it in the second half)" in plateau
    assert "nothing grew in the second half of the measured phase" in plateau
    assert plateau.endswith("Once the workers idled out: 2 threads, 35 open fds, 372 MiB RSS.")
    leak = reading(warm, Usage(330.0, 35, 16), Usage(rss_mib=372.0, fds=36, threads=14), None)
    assert "open fds and RSS grew in the second half of the measured phase" in leak
    no_midway = reading(warm, None, Usage(rss_mib=300.0, fds=35, threads=14), None)
    assert "RSS 288 -> 300 MiB (+12)" in no_midway
    assert "nothing grew in the measured phase" in no_midway
