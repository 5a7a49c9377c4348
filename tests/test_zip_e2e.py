"""Zip datasets end to end: real mounts of archives made with ``zipfile``, against the S3 server.

Every member is compared with the bytes it was made from; bad archives must fail the mount with
one line, or fail reads of the bad member with EIO, and never serve wrong bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import time
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Cli, errno_of, garble_root_page, mount_stats, sha256
from test_mount_e2e import tree
from zipcraft import header_offset, lzma_zip_without_end_marker, make_zip, patch, sample_bytes

from s3datafs.units import human_size

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024

MEMBERS = {
    "train/a/1.txt": b"first member\n",
    "train/a/2.bin": sample_bytes(2, 200_000),
    "train/b/deep/3.bin": sample_bytes(3, 3 * 1024 * 1024 + 777),  # several blocks and runs
    "train/empty.txt": b"",
    "labels.csv": b"".join(b"%d,%d\n" % (i, i % 10) for i in range(5000)),
    "with space & \u00fc.txt": b"unicode name\n",
}
METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def expected(members: dict[str, bytes], directories: tuple[str, ...] = ()) -> dict[str, str]:
    result = {}
    for name in [*members, *directories]:
        parts = name.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            result["/".join(parts[:depth])] = "dir"
        result[name.rstrip("/")] = "dir" if name.endswith("/") else sha256(members[name])
    return result


def put(s3, bucket: str, key: str, body: bytes) -> dict:
    return s3.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.mark.parametrize("methods", [METHODS, (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)],
                         ids=["stored+deflate", "bzip2+lzma"])
def test_zip_mounts_as_its_members_byte_identical(
    cli: Cli, s3, make_bucket, methods: tuple[int, ...]
) -> None:
    bucket = make_bucket()
    put(s3, bucket, "mnist.zip", make_zip(MEMBERS, methods=methods, directories=("empty-dir/",)))
    mountpoint = cli.mount(f"s3://{bucket}/mnist.zip")
    assert mountpoint == cli.data_root / "mnist"
    assert tree(mountpoint) == expected(MEMBERS, ("empty-dir/",))
    info = os.stat(mountpoint / "train/a/1.txt")
    assert info.st_size == len(MEMBERS["train/a/1.txt"])
    # DOS times carry no zone: they are shown as UTC.
    assert info.st_mtime == pytest.approx(1620284890)  # 2021-05-06 07:08:10 UTC
    assert os.getxattr(mountpoint / "labels.csv", "user.s3datafs.member") == b"labels.csv"
    assert os.getxattr(mountpoint, "user.s3datafs.object_count") == str(len(MEMBERS)).encode()


def test_a_zip_mount_reports_its_members_not_the_archive(cli: Cli, s3, make_bucket) -> None:
    """The mount's line and ``status`` count the members and their bytes, as ``ls`` and ``du``
    of the mount do, not the one archive object (4 MiB of zeros deflate to a few KiB)."""
    bucket = make_bucket()
    members = {"zeros.bin": bytes(4 * MiB), "a/one.txt": b"one\n"}
    put(s3, bucket, "z.zip", make_zip(members, methods=(zipfile.ZIP_DEFLATED,)))
    mounted = cli.run("mount", f"s3://{bucket}/z.zip")
    mountpoint = cli.data_root / "z"
    try:
        assert mounted.returncode == 0, mounted.stderr
        total = sum(map(len, members.values()))
        assert f" (2 objects, {human_size(total)}, fingerprint " in mounted.stdout
        rows = json.loads(cli.run("status", "--json").stdout)
        (row,) = [row for row in rows if row["mountpoint"] == str(mountpoint)]
        assert (row["object_count"], row["total_bytes"]) == (2, total)
    finally:
        assert cli.unmount(mountpoint).returncode == 0


def test_an_lzma_member_without_an_end_marker_reads_as_its_header_says(
    cli: Cli, s3, make_bucket
) -> None:
    """As 7-Zip writes LZMA members: no end marker (flag bit 1 unset), the header's size alone
    ends the stream. It read as a zip bomb (EIO): fed its last bytes, the decoder made up a
    byte past the member's end from the range coder's flush."""
    bucket = make_bucket()
    body = sample_bytes(61, 100_000)
    put(s3, bucket, "seven.zip", lzma_zip_without_end_marker("m.bin", body))
    mountpoint = cli.mount(f"s3://{bucket}/seven.zip")
    assert os.stat(mountpoint / "m.bin").st_size == len(body)
    assert (mountpoint / "m.bin").read_bytes() == body


def test_random_ranges_inside_members_match(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    big = MEMBERS["train/b/deep/3.bin"]
    offsets = [3 * 1024 * 1024, 17, 2_000_000, 1_048_576 - 5, 0, len(big) - 100]
    with open(mountpoint / "train/b/deep/3.bin", "rb", buffering=0) as member:
        for offset in offsets:
            member.seek(offset)
            assert member.read(4096) == big[offset: offset + 4096], offset


def test_remount_reads_no_index_and_no_data(cli: Cli, s3, s3server, make_bucket) -> None:
    bucket = make_bucket()
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    s3server.reset_stats()
    assert tree(mountpoint) == expected(MEMBERS)
    # The mount's counters are the archive's GETs, as the server counted them.
    stats = mount_stats(mountpoint)
    assert stats["s3_requests"] == s3server.ops()["GetObject"]
    assert stats["s3_bytes"] == s3server.stats()["get_bytes"]
    assert cli.unmount(mountpoint).returncode == 0
    s3server.reset_stats()
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    assert tree(mountpoint) == expected(MEMBERS)
    # Only the pin is resolved again (HEAD): no index read, no member bytes.
    assert "GetObject" not in s3server.ops()
    assert s3server.ops()["HeadObject"] == 1
    stats = mount_stats(mountpoint)
    assert (stats["s3_requests"], stats["s3_bytes"]) == (0, 0)
    assert stats["disk_bytes"] >= len(s3.get_object(Bucket=bucket, Key="d.zip")["Body"].read()) // 2


def remounted_reads_from_the_disk(
    cli: Cli, s3server, uri: str, mountpoint: Path, read: Callable[[Path], dict[str, int]]
) -> Path:
    """Unmount ``mountpoint`` and mount ``uri`` again on the same cache: ``read`` (which gives
    the mount's stats) then decompresses nothing and sends no GET. The new mount point."""
    assert cli.unmount(mountpoint).returncode == 0
    s3server.reset_stats()
    mountpoint = cli.mount(uri)
    stats = read(mountpoint)
    assert (stats["decompressions"], stats["s3_requests"]) == (0, 0)
    assert "GetObject" not in s3server.ops()
    return mountpoint


def test_random_reads_in_large_bzip2_and_lzma_members_decompress_each_once(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Their decompressors cannot be copied: each member is decompressed once (4 readers at
    once), into the disk cache, and every later read, after a remount too, is a disk read (no
    GET, no decompression). ``cache stats`` counts the copies with the archive's dataset;
    ``cache clear`` deletes them."""
    bucket = make_bucket()
    members = {"big-bzip2.bin": sample_bytes(51, 10 * MiB + 123),
               "big-lzma.bin": sample_bytes(52, 10 * MiB + 456)}
    put(s3, bucket, "d.zip",
        make_zip(members, methods=(zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA), fast_lzma=True))
    rng = random.Random(5)
    # Past the first 8 MiB: a first read before that goes the live way, as a sequential
    # reader's does (one more decompression, of what lies before it).
    reads = [(name, rng.randrange(8 * MiB, len(data))) for name, data in members.items()
             for _ in range(25)]
    rng.shuffle(reads)

    def read_at_random(mountpoint: Path) -> dict[str, int]:
        def read(job: tuple[str, int]) -> None:
            name, offset = job
            with open(mountpoint / name, "rb", buffering=0) as member:
                got = os.pread(member.fileno(), 64 * 1024, offset)
            assert got == members[name][offset: offset + 64 * 1024], (name, offset)

        with ThreadPoolExecutor(4) as readers:  # a shuffling loader's workers
            list(readers.map(read, reads))
        return mount_stats(mountpoint)

    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    assert read_at_random(mountpoint)["decompressions"] == 2
    mountpoint = remounted_reads_from_the_disk(
        cli, s3server, f"s3://{bucket}/d.zip", mountpoint, read_at_random)
    assert cli.unmount(mountpoint).returncode == 0
    usage = json.loads(cli.run("cache", "stats", "--json").stdout)
    assert list(usage["by_dataset"]) == [f"s3://{bucket}/d.zip"]
    assert usage["bytes"] >= sum(map(len, members.values()))
    cli.run("cache", "clear", f"s3://{bucket}/d.zip")
    assert json.loads(cli.run("cache", "stats", "--json").stdout)["bytes"] == 0


def test_random_reads_in_a_large_deflated_member_inflate_it_once(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """A random reader of a large deflated member pays one inflation, into the disk cache, and a
    remount reads it with no decompression and no GET. A member whose CRC fails, or that
    inflates past its declared size (a zip bomb), fails with EIO and is never kept: a remount
    decompresses it again."""
    bucket = make_bucket()
    members = {"big.bin": sample_bytes(53, 24 * MiB + 321),
               "crc.bin": sample_bytes(54, 12 * MiB), "bomb.bin": sample_bytes(55, 12 * MiB)}
    body = make_zip(members, methods=(zipfile.ZIP_DEFLATED,))
    body = patch(body, "crc.bin", crc=0x12345678)
    body = patch(body, "bomb.bin", size=10 * MiB)  # inflates to 12 MiB
    put(s3, bucket, "d.zip", body)
    cli.expect_log(r"CRC-32 mismatch|inflates past")
    big, read = members["big.bin"], 64 * 1024
    rng = random.Random(6)
    # Past the first 8 MiB: a first read before that goes the live way, as a sequential
    # reader's does. The second read is behind the first: it waits for the inflation's end.
    offsets = [20 * MiB + 5, 9 * MiB + 7] + [rng.randrange(8 * MiB, len(big)) for _ in range(40)]

    def read_big(mountpoint: Path) -> dict[str, int]:
        with open(mountpoint / "big.bin", "rb", buffering=0) as member:
            for offset in offsets:
                got = os.pread(member.fileno(), read, offset)
                assert got == big[offset: offset + read], offset
        stats = mount_stats(mountpoint)
        assert sha256((mountpoint / "big.bin").read_bytes()) == sha256(big)
        return stats

    def pread(mountpoint: Path, name: str, offset: int) -> bytes:
        with open(mountpoint / name, "rb", buffering=0) as member:
            return os.pread(member.fileno(), read, offset)

    def bad_ones_fail(mountpoint: Path) -> None:
        # Served ahead of the inflation, before the CRC is known (as a live position serves a
        # large member): the bytes are the archive's. The member's end waits for the checks.
        assert pread(mountpoint, "crc.bin", 9 * MiB) == members["crc.bin"][9 * MiB: 9 * MiB + read]
        for name, size in (("crc.bin", 12 * MiB), ("bomb.bin", 10 * MiB)):
            assert errno_of(lambda name=name, size=size: pread(mountpoint, name, size - read)) \
                == errno.EIO, name
            assert errno_of((mountpoint / name).read_bytes) == errno.EIO, name

    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    assert read_big(mountpoint)["decompressions"] == 1
    bad_ones_fail(mountpoint)
    mountpoint = remounted_reads_from_the_disk(
        cli, s3server, f"s3://{bucket}/d.zip", mountpoint, read_big)
    bad_ones_fail(mountpoint)  # decompressed again, not read from the disk
    stats = mount_stats(mountpoint)
    assert stats["decompressions"] >= 2
    assert cli.unmount(mountpoint).returncode == 0


def test_archive_file_keeps_the_object(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = make_zip(MEMBERS)
    put(s3, bucket, "d.zip", body)
    mountpoint = cli.mount(f"s3://{bucket}/d.zip", "--archive", "file")
    assert (mountpoint / "d.zip").read_bytes() == body


def test_archive_zip_on_a_prefix_says_it_does_not_apply(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    body = make_zip(MEMBERS)
    put(s3, bucket, "p/d.zip", body)
    cli.expect_log("--archive zip is for a single object")
    result = cli.run("mount", f"s3://{bucket}/p/", "--archive", "zip")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"s3datafs: WARNING: --archive zip is for a single object; "
                             f"s3://{bucket}/p/ is a prefix: mounted as it is\n")
    assert (cli.data_root / "p" / "d.zip").read_bytes() == body


def test_zip_bytes_under_another_name_are_detected(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    arrays = make_zip({"a.npy": b"x" * 100})
    for key in ("dataset", "weights.npz"):
        put(s3, bucket, key, arrays)
    put(s3, bucket, "plain.bin", b"not a zip" * 1000)
    assert (cli.mount(f"s3://{bucket}/dataset") / "a.npy").read_bytes() == b"x" * 100
    assert (cli.mount(f"s3://{bucket}/plain.bin") / "plain.bin").read_bytes() == b"not a zip" * 1000
    # A zip-based file format is a file its reader opens whole, unless told otherwise.
    assert (cli.mount(f"s3://{bucket}/weights.npz") / "weights.npz").read_bytes() == arrays
    unpacked = cli.mount(f"s3://{bucket}/weights.npz", "--archive", "zip",
                         "--name", "weights-members")
    assert (unpacked / "a.npy").read_bytes() == b"x" * 100


def test_a_pytorch_checkpoint_under_any_name_is_a_file_torch_load_can_open(
    cli: Cli, s3, make_bucket
) -> None:
    """torch.save writes a zip; a checkpoint named pytorch_model.bin was mounted as the
    directory of its records, and torch.load failed with IsADirectoryError."""
    bucket = make_bucket()
    checkpoint = make_zip({"archive/data.pkl": b"pickle", "archive/byteorder": b"little",
                           "archive/data/0": b"\0" * 64, "archive/.data/version": b"3"})
    put(s3, bucket, "hf/pytorch_model.bin", checkpoint)
    mountpoint = cli.mount(f"s3://{bucket}/hf/pytorch_model.bin")
    assert (mountpoint / "pytorch_model.bin").read_bytes() == checkpoint
    assert "pytorch_model.bin is a PyTorch file, a zip inside: mounted as one file" in (
        cli.log_dir / "pytorch_model.log").read_text()


def test_zip64_archive(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    many = {f"d{i % 17}/f{i}.txt": b"%d\n" % i for i in range(70_000)}  # > 65,535 members
    many["big.bin"] = sample_bytes(9, 300_000)
    put(s3, bucket, "many.zip", make_zip(many, methods=METHODS, force_zip64=True))
    mountpoint = cli.mount(f"s3://{bucket}/many.zip")
    assert (mountpoint / f"d{69_991 % 17}/f69991.txt").read_bytes() == b"69991\n"
    assert (mountpoint / "big.bin").read_bytes() == many["big.bin"]
    assert len(os.listdir(mountpoint / "d0")) == len([n for n in many if n.startswith("d0/")])


def test_unsafe_member_names_are_skipped_with_a_warning(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    unsafe = ["/etc/passwd", "../escape.txt", "a/../../b.txt", "C:/windows.txt",
              "back\\slash.txt", "n" * 256, "dup.txt"]
    members = {name: b"unsafe" for name in unsafe}
    members["ok/fine.txt"] = b"fine"
    body = _append_duplicate(make_zip(members))
    put(s3, bucket, "u.zip", body)
    cli.expect_log(r"skipping member")
    mounted = cli.run("mount", f"s3://{bucket}/u.zip")
    assert mounted.returncode == 0, mounted.stderr
    assert "7 unsafe keys skipped" in mounted.stdout  # the archive's members are counted
    mountpoint = cli.data_root / "u"
    assert tree(mountpoint) == {"ok": "dir", "ok/fine.txt": sha256(b"fine"),
                                "dup.txt": sha256(b"second copy")}  # the later, as unzip
    log = (cli.log_dir / "u.log").read_text()
    assert log.count("skipping member") == 7


def _append_duplicate(body: bytes) -> bytes:
    buffer = io.BytesIO(body)
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "a") as archive:
        warnings.simplefilter("ignore")
        archive.writestr("dup.txt", b"second copy")
    return buffer.getvalue()


def test_overwritten_unversioned_archive_fails_reads_never_new_bytes(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket()
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    cli.expect_log(r"changed or was deleted since it was pinned")
    changed = {name: data.replace(b"e", b"E") for name, data in MEMBERS.items()}
    put(s3, bucket, "d.zip", make_zip(changed, methods=METHODS))
    for name in ("labels.csv", "train/a/2.bin"):
        assert errno_of((mountpoint / name).read_bytes) in (errno.EIO, errno.ESTALE)


def test_versioned_archive_serves_pinned_members_after_overwrite(
    cli: Cli, s3, make_bucket
) -> None:
    bucket = make_bucket(versioned=True)
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    put(s3, bucket, "d.zip", make_zip({"other.txt": b"new"}))
    s3.delete_object(Bucket=bucket, Key="d.zip")
    assert tree(mountpoint) == expected(MEMBERS)
    assert os.getxattr(mountpoint / "labels.csv", "user.s3datafs.version_id")


def test_snapshot_pins_the_archive(cli: Cli, s3, make_bucket, tmp_path: Path) -> None:
    bucket = make_bucket(versioned=True)
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    snap = tmp_path / "d.snap"
    result = cli.run("snapshot", f"s3://{bucket}/d.zip", "-o", str(snap))
    assert result.returncode == 0, result.stderr
    put(s3, bucket, "d.zip", make_zip({"other.txt": b"new"}))
    mountpoint = cli.mount("--snapshot", str(snap), str(tmp_path / "m"))
    assert tree(mountpoint) == expected(MEMBERS)
    assert (mountpoint / "labels.csv").read_bytes() == MEMBERS["labels.csv"]


# -- bad archives -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"this is not a zip at all" * 100, "is not a zip archive"),
        (make_zip(MEMBERS)[:-30], "is not a zip archive"),  # truncated: the end record is cut
        (make_zip(MEMBERS)[:5000] + make_zip(MEMBERS)[-22:], "is corrupt"),  # directory gone
        (b"", "it is empty"),
    ],
    ids=["not-a-zip", "truncated-end", "truncated-middle", "empty"],
)
def test_bad_archive_fails_the_mount_with_one_line(
    cli: Cli, s3, make_bucket, body: bytes, message: str
) -> None:
    bucket = make_bucket()
    put(s3, bucket, "bad.zip", body)
    result = cli.run("mount", f"s3://{bucket}/bad.zip")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert "--archive=file" in lines[0]
    assert "Traceback" not in result.stderr
    assert not cli.mounts_below_root()


def test_bad_members_fail_with_eio_and_the_rest_reads(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    members = {name: sample_bytes(i, 50_000) for i, name in enumerate(
        ["good.bin", "crc.bin", "bomb.bin", "encrypted.bin", "method.bin", "crcstored.bin",
         "tiny.bin"])}
    body = make_zip(members, methods=(zipfile.ZIP_DEFLATED,) * 5 + (zipfile.ZIP_STORED,)
                    + (zipfile.ZIP_DEFLATED,))
    body = patch(body, "crc.bin", crc=0x12345678)
    body = patch(body, "bomb.bin", size=30_000)  # declared smaller, inflates to 50,000 bytes
    body = patch(body, "encrypted.bin", flags=1)
    body = patch(body, "method.bin", method=9)  # deflate64
    body = patch(body, "crcstored.bin", crc=0x12345678)
    body = patch(body, "tiny.bin", size=1000)  # ~28 KB of deflate cannot be 1,000 bytes
    put(s3, bucket, "bad.zip", body)
    cli.expect_log(r"CRC-32 mismatch|inflates past|encrypted|deflate64|member|far beyond")
    mountpoint = cli.mount(f"s3://{bucket}/bad.zip")
    assert "tiny.bin" not in os.listdir(mountpoint)  # skipped at mount, with a warning
    assert (mountpoint / "good.bin").read_bytes() == members["good.bin"]
    for name in ("crc.bin", "bomb.bin", "encrypted.bin", "method.bin", "crcstored.bin"):
        assert errno_of((mountpoint / name).read_bytes) == errno.EIO, name
    log = (cli.log_dir / "bad.log").read_text()
    for reason in ("CRC-32 mismatch", "inflates past", "is encrypted", "deflate64"):
        assert reason in log
    assert (mountpoint / "good.bin").read_bytes() == members["good.bin"]


def test_overlapping_members_are_skipped(cli: Cli, s3, make_bucket) -> None:
    bucket = make_bucket()
    members = {"a.bin": sample_bytes(1, 10_000), "b.bin": sample_bytes(2, 10_000)}
    body = make_zip(members)
    body = patch(body, "b.bin", offset=header_offset(body, "a.bin") + 10)
    put(s3, bucket, "o.zip", body)
    cli.expect_log(r"overlaps member")
    mountpoint = cli.mount(f"s3://{bucket}/o.zip")
    assert os.listdir(mountpoint) == ["a.bin"]
    assert (mountpoint / "a.bin").read_bytes() == members["a.bin"]


def test_prefetch_warms_members_and_cache_clear_forgets_the_index(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    bucket = make_bucket()
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    result = cli.run("prefetch", f"s3://{bucket}/d.zip")
    assert result.returncode == 0, result.stderr
    assert f"prefetched {len(MEMBERS)} members" in result.stdout
    s3server.reset_stats()
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    assert tree(mountpoint) == expected(MEMBERS)
    assert "GetObject" not in s3server.ops()  # index and every member came from the cache
    assert cli.unmount(mountpoint).returncode == 0
    result = cli.run("cache", "clear", f"s3://{bucket}/d.zip")
    assert "and 1 zip member index" in result.stdout
    s3server.reset_stats()
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    assert s3server.ops()["GetObject"] == 1  # the index again: one GET of the archive's end


def test_prefetch_keeps_large_bzip2_and_lzma_members_decompressed(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """A job's first random reads of them are then disk reads: no decompression, no GET. A
    deflated member is not kept ahead; a bad one is a warning, and its reads still fail."""
    bucket = make_bucket()
    members = {"a.bz2.bin": sample_bytes(61, 10 * MiB + 1), "b.xz.bin": sample_bytes(62, 10 * MiB),
               "c.deflate.bin": sample_bytes(63, 10 * MiB), "d.bad.bin": sample_bytes(64, 3 * MiB)}
    body = make_zip(members, methods=(zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA, zipfile.ZIP_DEFLATED,
                                      zipfile.ZIP_BZIP2), fast_lzma=True)
    put(s3, bucket, "d.zip", patch(body, "d.bad.bin", crc=0x12345678))
    result = cli.run("prefetch", f"s3://{bucket}/d.zip")
    assert result.returncode == 0, result.stderr
    assert "; 2 members kept decompressed (20.0 MiB)" in result.stdout
    (warning,) = result.stderr.splitlines()  # one line, no traceback
    assert "d.bad.bin" in warning
    assert "CRC-32 mismatch" in warning
    cli.expect_log(r"CRC-32 mismatch")
    s3server.reset_stats()
    mountpoint = cli.mount(f"s3://{bucket}/d.zip")
    rng = random.Random(7)
    for name in ("a.bz2.bin", "b.xz.bin"):
        with open(mountpoint / name, "rb", buffering=0) as member:
            for offset in [rng.randrange(len(members[name])) for _ in range(20)]:
                got = os.pread(member.fileno(), 64 * 1024, offset)
                assert got == members[name][offset: offset + 64 * 1024], (name, offset)
    stats = mount_stats(mountpoint)
    assert (stats["decompressions"], stats["s3_requests"]) == (0, 0)
    assert "GetObject" not in s3server.ops()
    assert errno_of((mountpoint / "d.bad.bin").read_bytes) == errno.EIO


def test_max_prefetch_memory_bounds_the_spans_a_zip_is_read_in(
    cli: Cli, s3, s3server, make_bucket
) -> None:
    """Members read in archive order are fetched in spans that grow up to 8 MiB; the spans kept
    in memory are bounded by --max-prefetch-memory, and the largest span by a quarter of it (a
    span, the two ahead and one more), so a small bound means short GETs."""
    bucket = make_bucket()
    members = {f"m{i:03d}.bin": sample_bytes(i, 100_000) for i in range(160)}
    put(s3, bucket, "d.zip", make_zip(members))

    def largest_get(*options: str) -> int:
        mountpoint = cli.mount(f"s3://{bucket}/d.zip", "--no-cache", *options)
        s3server.reset_stats()
        for name, body in members.items():  # in archive order
            assert (mountpoint / name).read_bytes() == body
        gets = [r["range"] for r in s3server.stats()["requests"] if r["op"] == "GetObject"]
        assert cli.unmount(mountpoint).returncode == 0
        bounds = [tuple(map(int, g.removeprefix("bytes=").split("-"))) for g in gets]
        return max(end + 1 - start for start, end in bounds)

    assert largest_get() > 4 * MiB  # default 64M: spans grow to 8 MiB
    assert largest_get("--max-prefetch-memory", "1M") <= 512 * 1024  # the smallest span


def test_a_member_index_damaged_on_disk_fails_with_eio_once_and_is_built_again(
    cli: Cli, s3, make_bucket
) -> None:
    """Damage the open does not see (SQLite keeps no page checksums): names fail with EIO and
    one log line, the kept index goes, and the next mount reads the index again."""
    bucket = make_bucket()
    put(s3, bucket, "d.zip", make_zip(MEMBERS, methods=METHODS))
    uri = f"s3://{bucket}/d.zip"
    mountpoint = cli.mount(uri)
    assert cli.unmount(mountpoint).returncode == 0
    (index,) = (cli.root / "cache" / "archives").glob("*.db")
    garble_root_page(index, "entries_by_name")
    cli.expect_log(r"the catalog .* is damaged \(database disk image is malformed\)")
    mountpoint = cli.mount(uri)
    for _ in range(2):
        assert errno_of(lambda: os.stat(mountpoint / "labels.csv")) == errno.EIO
    assert not index.exists()  # removed at once: the next mount builds it
    logged = "".join(path.read_text() for path in cli.log_dir.glob("*.log"))
    assert logged.count("is damaged") == 1
    assert ("is damaged (database disk image is malformed): its copy kept in the cache was "
            "removed: unmount and mount again to build it anew") in logged
    assert cli.unmount(mountpoint).returncode == 0
    mountpoint = cli.mount(uri)
    assert tree(mountpoint) == expected(MEMBERS)
    assert index.exists()


def test_a_stored_member_whose_crc_fails_fails_every_read_of_it_whole(
    cli: Cli, s3, make_bucket
) -> None:
    """A stored member's CRC is checked once the pieces served cover it; found bad, it fails
    every read for a minute (``members._RETRY_BAD``, half a second here), then is fetched again
    and counted from nothing. The pieces served before it failed were still in the reader's
    memory and the kernel's pages, which no count saw again: the second read of it whole, past
    that minute, completed with no error. Now each whole read ends in EIO; a piece read alone is
    the pinned archive's bytes (a CRC says nothing of a piece)."""
    bucket = make_bucket()
    member = sample_bytes(1, 4_000_000)
    body = make_zip({"good.bin": sample_bytes(0, 50_000), "bad.bin": member},
                    methods=(zipfile.ZIP_STORED,))
    put(s3, bucket, "bad.zip", patch(body, "bad.bin", crc=0x12345678))
    cli.expect_log(r"member 'bad.bin' .*: CRC-32 mismatch")
    # The daemon is forked from the command: what the command's sitecustomize set, it has.
    hook = cli.root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import s3datafs.archive.members\ns3datafs.archive.members._RETRY_BAD = 0.5\n")
    cli.env["PYTHONPATH"] = os.pathsep.join([str(hook), cli.env["PYTHONPATH"]])
    mountpoint = cli.mount(f"s3://{bucket}/bad.zip")
    path = mountpoint / "bad.bin"
    for _ in range(3):  # the first finds it bad, the others each come after its time to fail
        assert errno_of(path.read_bytes) == errno.EIO
        time.sleep(0.6)
    with open(path, "rb") as handle:
        handle.seek(2_000_000)
        assert handle.read(10_000) == member[2_000_000:2_010_000]
    assert (mountpoint / "good.bin").read_bytes() == sample_bytes(0, 50_000)
