"""How many GETs does a contender keep in flight during a cold sequential read?

``python -m bench.inflight [--big-mib 512] [--profiles 20ms,s3like] [--contenders s3datafs,...]``

Behind the proxy every S3 connection is a TCP connection to one port, so ``ss -tni`` sampled every
20 ms shows them all; a connection whose ``bytes_received`` grew since the last sample is moving a
response body. With a per-connection cap (``s3like``: 100 MB/s) throughput is about
``active connections x 100 MB/s``, so this says whether a slow cold read is short of parallel
GETs (readahead too shallow) or short of something else (CPU, the server).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import peers, workloads
from .bench_reads import ALL_CONTENDERS, PROFILES, contenders, log, parse_args
from .env import Backend, Dataset, drop_caches
from .netproxy import NetProxy

PEER_RE = re.compile(r"127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:(\d+)")
RECEIVED_RE = re.compile(r"bytes_received:(\d+)")


def connections(port: int) -> dict[str, int]:
    """bytes_received per established connection to 127.0.0.1:``port``."""
    out = subprocess.run(
        ["ss", "-tni", "state", "established", f"dst 127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    found = {}
    for line, info in zip(out, out[1:], strict=False):
        peer = PEER_RE.search(line)
        if peer and int(peer[2]) == port:
            received = RECEIVED_RE.search(info)
            found[peer[1]] = int(received[1]) if received else 0
    return found


def sample(port: int, stop: threading.Event, into: list[tuple[int, int]]) -> None:
    """Append (open connections, connections that received data) every 20 ms until ``stop``."""
    before: dict[str, int] = {}
    while not stop.is_set():
        now = connections(port)
        into.append((len(now), sum(1 for k, v in now.items() if v > before.get(k, 0))))
        before = now
        time.sleep(0.02)


def measure(
    endpoint: str, contender: peers.Contender, dataset: Dataset, work: Path, tag: str
) -> str:
    """Mount fresh, read the big file cold while sampling connections; one line of results."""
    port = int(endpoint.rsplit(":", 1)[1])
    drop_caches()
    samples: list[tuple[int, int]] = []
    stop = threading.Event()
    cache = work / f"cache-{tag}"
    with contender.mount(endpoint, dataset.big_prefix, work / "mnt", cache) as mount:
        sampler = threading.Thread(target=sample, args=(port, stop, samples))
        sampler.start()
        try:
            done = workloads.sequential(mount.path / dataset.big_name, time.monotonic() + 120)
        finally:
            stop.set()
            sampler.join()
    shutil.rmtree(cache, ignore_errors=True)
    active = [a for _, a in samples] or [0]
    opened = [n for n, _ in samples] or [0]
    return (
        f"{done.mbps():6.0f} MB/s; connections open max {max(opened)}; receiving per 20 ms "
        f"sample: mean {statistics.mean(active):.1f}, max {max(active)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=512)
    parser.add_argument("--profiles", default="20ms,s3like")
    parser.add_argument("--contenders", default="s3datafs,s3fs-kc")
    args = parser.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    names = [c for c in args.contenders.split(",") if c in ALL_CONTENDERS]
    dataset = Dataset(big_size=args.big_mib << 20, small_count=0)
    work = Path(tempfile.mkdtemp(prefix="s3datafs-inflight-", dir="/var/tmp"))
    settings, _ = parse_args(["--contenders", ",".join(names)])
    try:
        with Backend() as backend:
            backend.upload(dataset, log=log)
            for profile in profiles:
                delay, rate = PROFILES[profile]
                with NetProxy(backend.endpoint, delay_ms=delay, rate_mbps=rate) as proxy:
                    for contender in contenders(settings, work / profile):
                        line = measure(proxy.endpoint, contender, dataset, work, profile)
                        print(f"{profile:7} {contender.name:12} {line}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
