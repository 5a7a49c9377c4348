"""``s3datafs prefetch``: how many objects and GETs it keeps in flight, and what it does not
check since it mounts nothing."""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from fakes import trio_test

from s3datafs import cli
from s3datafs.commands import prefetch
from s3datafs.errors import (
    AccessDeniedError,
    MissingPermissionError,
    S3RequestError,
    StaleObjectError,
)


class CountingReader:
    """Stands in for the ``BlockReader``: notes each ``warm``'s parallel GETs, and the most in
    flight at once over every object."""

    def __init__(self) -> None:
        self.parallel: list[int] = []
        self.in_flight = self.most = 0

    def attach(self, nursery: trio.Nursery) -> None:
        pass

    async def warm(self, ref: object, parallel: int, loaded) -> None:
        self.parallel.append(parallel)
        self.in_flight += parallel
        self.most = max(self.most, self.in_flight)
        await trio.sleep(0.01)
        self.in_flight -= parallel
        loaded(1)


class Progress:
    def advance(self, size: int) -> None:
        pass


@pytest.mark.parametrize(("count", "each", "most"), [
    (1, prefetch.PARALLEL_RUNS, prefetch.PARALLEL_RUNS),  # one big object, a zip's archive
    (2, prefetch.PARALLEL_RUNS // 2, prefetch.PARALLEL_RUNS),
    (50, 2, 2 * prefetch.PARALLEL_OBJECTS),  # many objects: as many at once, 2 GETs each
])
@trio_test
async def test_the_objects_warmed_at_once_share_the_gets_in_flight(
    count: int, each: int, most: int
) -> None:
    reader = CountingReader()
    refs = iter([SimpleNamespace(size=1)] * count)
    await prefetch._warm_all(reader, refs, count, Progress(),  # type: ignore[arg-type]
                             prefetch._Failures())
    assert reader.parallel == [each] * count
    assert reader.most == most


def test_only_refusals_in_a_row_after_some_were_warmed_stop_a_prefetch() -> None:
    """Archived or deleted objects come in runs (a lifecycle rule, a removed folder) and the
    rest are warmed; refusals in a row mean the keys stopped working. One warmed object between
    refusals starts the count again."""
    failures = prefetch._Failures()
    failures.done(1)
    for _ in range(3 * prefetch._Failures.SHOWN):
        failures.add(S3RequestError("archived"))
        failures.add(StaleObjectError("deleted since"))
    for _ in range(prefetch._Failures.SHOWN - 1):
        failures.add(AccessDeniedError("refused"))
    failures.done(1)
    for _ in range(prefetch._Failures.SHOWN - 1):
        failures.add(AccessDeniedError("refused"))
    with pytest.raises(AccessDeniedError, match="refused the last 20 objects in a row, after 2 "
                       "objects had been prefetched"):
        failures.add(MissingPermissionError("refused", "s3:GetObject"))


@pytest.mark.parametrize("key", ["mnist.zip", "x" * 300])
def test_prefetch_checks_no_mount_point_nor_dataset_name(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing is mounted: a symbolic link at the default mount point (/data/mnist on a disk of
    its own) or a key too long to name a directory must not stop a prefetch (it was refused,
    naming MOUNTPOINT or --name, neither of which prefetch takes). Stopped later by S3 here."""
    root = tmp_path / "data"
    root.mkdir()
    os.symlink("/elsewhere", root / "mnist")
    monkeypatch.setenv("S3DATAFS_DATA_ROOT", str(root))
    monkeypatch.setenv("S3DATAFS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert cli.main(["prefetch", f"s3://my-bucket/{key}", "--no-sign-request"]) == 1
    assert "cannot reach S3" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_shows_the_share_done_the_rate_and_the_time_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """25 MiB a second since the start, whenever the line was last drawn; an empty dataset is
    all done."""
    clock = iter([0.0, 1.0, 2.0, 10.0, 11.0, 20.0, 21.0])
    monkeypatch.setattr(prefetch, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    terminal = Terminal()
    monkeypatch.setattr(prefetch.sys, "stderr", terminal)
    MiB = 1024 * 1024
    progress = prefetch._Progress(100 * MiB)
    progress.advance(25 * MiB)
    progress.advance(25 * MiB)
    progress.finish()
    assert terminal.getvalue().split("\r")[1:] == [
        "prefetch: 25.0 MiB / 100.0 MiB (25%) 25.0 MiB/s ETA 3s   ",
        "prefetch: 50.0 MiB / 100.0 MiB (50%) 25.0 MiB/s ETA 2s   \n",
    ]
    empty = prefetch._Progress(0)
    empty.advance(0)
    assert terminal.getvalue().endswith("prefetch: 0 B / 0 B (100%) 0 B/s ETA 0s   ")
    named = prefetch._Progress(0, "decompressing")  # the line of prefetch's second step
    named.advance(0)
    assert terminal.getvalue().endswith("\rdecompressing: 0 B / 0 B (100%) 0 B/s ETA 0s   ")
