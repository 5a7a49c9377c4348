"""Load, CI-sized: 64 readers over a few hundred files plus 8 readers of one big file, 25 s.

The same workload as ``bench/bench_load.py`` (which runs the full 10,000-file, several-minute
version and records its numbers in ``bench/RESULTS.md``), through the test fixtures' mount:

- zero errors and zero wrong bytes (every read is compared with the reference bytes);
- the daemon's RSS stays bounded and flat after warm-up;
- no file descriptor or thread leak: after the measured phase the daemon holds no more fds or
  threads than at the end of the warm-up (pools and worker threads at working size) plus a small
  slack, and both stay within what its limits allow.
"""

from __future__ import annotations

import json

import pytest
from conftest import Cli

from bench.bench_load import MOUNT_OPTIONS, PREFIX, run_load, small_names, upload

pytestmark = pytest.mark.fuse

FILES = 300
BIG_MIB = 48
S3_CONNECTIONS = 32  # S3Settings.max_connections: the GET pool and the GET worker threads
DISK_WORKERS = 4  # the reader's disk limiter


def test_concurrent_readers_get_exact_bytes_and_the_daemon_does_not_leak(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    big = upload(s3, bucket, FILES, BIG_MIB << 20)
    mountpoint = cli.mount(f"s3://{bucket}/{PREFIX}", *MOUNT_OPTIONS)
    pid = cli.daemon_pid(mountpoint)
    report = run_load(
        mountpoint,
        pid,
        small_names(FILES),
        big,
        warmup=5,
        duration=20,
        readers=64,
        big_readers=8,
    )
    print(json.dumps(report.as_dict(), indent=2))  # shown with -s, and on failure
    assert report.problems == []
    assert (report.errors, report.wrong) == (0, 0)
    assert report.small_reads > 1000
    assert report.big_reads > 50
    before, warm, after, peak = report.before, report.warm, report.after, report.peak
    # File descriptors: the GET pool may hold one socket per connection; nothing else grows.
    assert after.fds <= warm.fds + 8, report
    assert peak.fds <= before.fds + 2 * S3_CONNECTIONS + 16, report
    # Threads: worker threads are bounded by the limiters; nothing else grows.
    assert after.threads <= warm.threads + 8, report
    assert peak.threads <= before.threads + S3_CONNECTIONS + DISK_WORKERS + 16, report
    # Memory: bounded, and flat once warm.
    assert peak.rss_mib < 450, report
    assert after.rss_mib <= warm.rss_mib + 64, report
