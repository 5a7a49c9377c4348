"""``s3datafs prefetch``'s scheduling: how many objects and GETs it keeps in flight."""

from __future__ import annotations

import pytest
import trio
from fakes import trio_test

from s3datafs.commands import prefetch


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
    await prefetch._warm_all(reader, iter(range(count)), count, Progress())  # type: ignore[arg-type]
    assert reader.parallel == [each] * count
    assert reader.most == most
