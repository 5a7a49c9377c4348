"""Members read in archive order share spans of the archive; scattered reads fetch only theirs."""

from __future__ import annotations

import random
import threading
import zipfile

from fakes import FakeSource
from zipcraft import make_zip, sample_bytes

from s3datafs.archive import index, members
from s3datafs.cache.disk import DiskCache
from s3datafs.model import MemberRef

NAMES = [f"d{i % 9}/m{i:04d}.bin" for i in range(400)]
DATA = {name: sample_bytes(i, 20_000 + (i * 7919) % 30_000) for i, name in enumerate(NAMES)}


def archive_members(methods: tuple[int, ...]) -> tuple[FakeSource, list[MemberRef]]:
    source = FakeSource()
    source.create_bucket("b")
    archive = source.put("b", "a.zip", make_zip(DATA, methods=methods))
    found, skipped = index.read_index(source, archive)
    assert not skipped
    refs = [MemberRef(archive, m.name, m.header_offset, m.data_limit, m.method, m.flags,
                      m.compressed_size, m.size, m.crc32, m.mtime) for m in found]
    source.calls.clear()
    source.ranges.clear()
    return source, sorted(refs, key=lambda r: r.header_offset)


def test_reading_every_member_in_archive_order_takes_few_gets() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    reader = members.MemberSource(source)
    for ref in refs:
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    archive_bytes = refs[0].archive.size
    # A member per GET would be 400; spans of up to 8 MiB cover the ~14 MiB archive in a few.
    assert source.calls["get_range"] <= 4 + archive_bytes // members._MIN_SPAN


def test_eight_threads_in_archive_order_share_spans_and_get_the_right_bytes() -> None:
    source, refs = archive_members((zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED))
    reader = members.MemberSource(source)
    queue = iter(refs)
    lock = threading.Lock()
    wrong: list[str] = []

    def work() -> None:
        while True:
            with lock:
                ref = next(queue, None)
            if ref is None:
                return
            if reader.get_range(ref, 0, ref.size) != DATA[ref.path]:
                wrong.append(ref.path)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    assert source.calls["get_range"] < len(refs) // 4


def test_scattered_members_fetch_only_themselves() -> None:
    source, refs = archive_members((zipfile.ZIP_STORED,))
    reader = members.MemberSource(source)
    chosen = random.Random(7).sample(refs[::3], 20)  # never two neighbours in a row
    chosen.sort(key=lambda r: -r.header_offset)  # and backwards: no streak
    for ref in chosen:
        assert reader.get_range(ref, 0, ref.size) == DATA[ref.path]
    assert source.calls["get_range"] == len(chosen)
    fetched = sum(end - start for _ref, start, end in source.ranges)
    assert fetched <= sum(r.size for r in chosen) + len(chosen) * members._HEADER_GUESS


def test_members_are_kept_on_disk_as_archive_blocks(tmp_path) -> None:
    source, refs = archive_members((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED))
    disk = DiskCache(tmp_path, block_size=64 * 1024, capacity=1 << 30)
    scattered = refs[::50]
    first = members.MemberSource(source, disk=disk)
    for ref in scattered:
        assert first.get_range(ref, 0, ref.size) == DATA[ref.path]
    gets = source.calls["get_range"]
    assert gets == len(scattered)
    # Whole blocks only: a scattered member costs at most its blocks, rounded out.
    for (_archive, start, end), ref in zip(source.ranges, scattered, strict=True):
        assert start % disk.block_size == 0
        assert end - start <= ref.compressed_size + 2 * disk.block_size + members._HEADER_GUESS
    # A new process (a remount) finds them on disk: no GET, the same bytes.
    again = members.MemberSource(source, disk=DiskCache(tmp_path, block_size=64 * 1024,
                                                        capacity=1 << 30))
    for ref in scattered:
        assert again.get_range(ref, 0, ref.size) == DATA[ref.path]
    assert source.calls["get_range"] == gets
    # Only archive blocks were stored: one cache object, not one per member.
    assert len(list((tmp_path / "blocks").rglob("meta.json"))) == 1
