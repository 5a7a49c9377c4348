"""The zip dataset of issue 7: one deterministic archive, half stored and half deflated members.

:func:`build` writes ``data.zip`` with Python's :mod:`zipfile` from a :class:`ZipSpec` and a seed,
so the same spec gives the same bytes on every run:

- ``members`` files in nested directories (``dNN/sNN/...``, a few directly under ``dNN/`` and at
  the top), with explicit directory entries as ``zip -r`` writes them, in path order; every 997th
  name carries a non-ASCII suffix (zipfile sets the UTF-8 flag for those).
- Sizes: ~0.2 % of the members are 2-8 MiB (log-uniform), 0.1 % are empty, the rest log-normal
  (sigma 1, capped at 1 MiB), scaled so that all members add up to ``total_mib`` (uncompressed).
- Half the members (a seeded shuffle) are ``ZIP_STORED`` random bytes; the other half are
  ``ZIP_DEFLATED`` (level 6) text-like data: lines of words and numbers with ~2 % of runs of random
  bytes, which deflates ~2.3x, so inflating costs something real.
- Every member starts with its own name and index, then a slice of a seeded pool at a seeded
  offset: no two members share their bytes, so a member served from the wrong offset or under the
  wrong name cannot go unnoticed.

:class:`Verifier` holds name -> (size, sha256) and raises :class:`WrongData` on any mismatch; the
benchmark lets that abort the run. The manifest (members, sizes, digests, central directory range)
is written next to the zip, and ``build(..., cache_dir)`` reuses both if the spec matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
DATE = (2024, 1, 2, 3, 4, 6)  # every entry's timestamp: identical bytes on every build
FORMAT = 1  # bump when the layout or the content changes (invalidates cached zips)


@dataclass(frozen=True)
class ZipSpec:
    members: int = 20_000
    total_mib: int = 1024
    seed: int = 7
    dirs: int = 20
    subdirs: int = 10


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    sha256: str
    deflated: bool


@dataclass
class ZipData:
    """The built archive and what is in it (archive order)."""

    path: Path
    spec: ZipSpec
    size: int  # bytes of the zip object
    sha256: str
    members: list[Member]
    dir_entries: int
    cd_offset: int  # start of the central directory; the index is [cd_offset, size)
    deflated_compressed: int  # compressed bytes of the deflated members
    build_seconds: float

    @property
    def index_bytes(self) -> int:
        return self.size - self.cd_offset

    @property
    def member_bytes(self) -> int:
        return sum(m.size for m in self.members)

    def summary(self) -> dict[str, Any]:
        stored = [m for m in self.members if not m.deflated]
        deflated = [m for m in self.members if m.deflated]
        sizes = sorted(m.size for m in self.members)
        return {
            "spec": asdict(self.spec),
            "zip_bytes": self.size,
            "zip_sha256": self.sha256,
            "members": len(self.members),
            "dir_entries": self.dir_entries,
            "member_bytes": self.member_bytes,
            "stored": {"count": len(stored), "bytes": sum(m.size for m in stored)},
            "deflated": {"count": len(deflated), "bytes": sum(m.size for m in deflated)},
            "deflated_compressed_bytes": self.deflated_compressed,
            "index_bytes": self.index_bytes,
            "size_median": sizes[len(sizes) // 2],
            "size_mean": round(self.member_bytes / max(1, len(sizes))),
            "size_max": sizes[-1],
            "empty": sum(1 for s in sizes if s == 0),
            "build_seconds": round(self.build_seconds, 1),
        }


class WrongData(Exception):
    """A contender returned bytes, sizes or a listing that differ from what was written."""


class Verifier:
    """Expected size and sha256 of every member; ``check`` raises :class:`WrongData`."""

    def __init__(self, members: list[Member]) -> None:
        self.expected = {m.name: (m.size, m.sha256) for m in members}

    def check(self, who: str, name: str, data: bytes) -> None:
        size, digest = self.expected[name]
        if len(data) != size:
            raise WrongData(f"{who}: {name}: {len(data)} bytes, expected {size}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise WrongData(f"{who}: {name}: sha256 differs ({size} bytes)")

    def check_listing(self, who: str, found: dict[str, int]) -> None:
        """``found`` = relative path -> size of every regular file seen."""
        missing = sorted(set(self.expected) - set(found))
        extra = sorted(set(found) - set(self.expected))
        wrong = sorted(n for n in found if n in self.expected and found[n] != self.expected[n][0])
        if missing or extra or wrong:
            raise WrongData(
                f"{who}: listing differs: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(extra)} unexpected (e.g. {extra[:3]}), {len(wrong)} with wrong sizes "
                f"(e.g. {[(n, found[n], self.expected[n][0]) for n in wrong[:3]]})"
            )


# ---------------------------------------------------------------- layout and content


def _sizes(spec: ZipSpec, rng: random.Random) -> list[int]:
    n, total = spec.members, spec.total_mib * MiB
    n_big = max(1, n // 500)
    n_empty = n // 1000
    big = [int(2 ** rng.uniform(21, 23)) for _ in range(n_big)]
    if sum(big) > total * 0.4:  # tiny totals: keep the big ones under 40 % of the bytes
        big = [max(1, int(b * total * 0.4 / sum(big))) for b in big]
    raw = [rng.lognormvariate(0.0, 1.0) for _ in range(n - n_big - n_empty)]
    left = total - sum(big)
    small = [max(1, min(MiB, int(x * left / sum(raw)))) for x in raw]
    sizes = big + [0] * n_empty + small
    rng.shuffle(sizes)
    return sizes


def _names(spec: ZipSpec, rng: random.Random) -> list[str]:
    """Member paths, in no particular order (the archive sorts them)."""
    names = []
    for i in range(spec.members):
        pick = rng.random()
        top = f"d{rng.randrange(spec.dirs):02d}"
        if pick < 0.002:
            folder = ""
        elif pick < 0.05:
            folder = top + "/"
        else:
            folder = f"{top}/s{rng.randrange(spec.subdirs):02d}/"
        suffix = "-\u00e9t\u00e9" if i % 997 == 996 else ""
        names.append(f"{folder}m{i:05d}{suffix}")
    return names


def _dirs_of(names: list[str]) -> list[str]:
    dirs: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:depth]) + "/")
    return sorted(dirs)


def _text_pool(size: int, rng: random.Random) -> bytes:
    """Text-like bytes: lines of words and numbers with ~2 % runs of random bytes (~2.3x)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.02:
            out += rng.randbytes(rng.randint(64, 512))
        else:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            out += f"{rng.randrange(10**9):09d} {text} v={rng.random():.6f}\n".encode()
    return bytes(out[:size])


def _content(name: str, index: int, size: int, pool: bytes, rng: random.Random) -> bytes:
    head = f"{name}\n{index}\n".encode()
    offset = rng.randrange(len(pool) - size) if size < len(pool) else 0
    return (head + pool[offset : offset + size])[:size]


# ---------------------------------------------------------------- build


def build(spec: ZipSpec, workdir: Path, cache_dir: Path | None = None, log: Any = print) -> ZipData:
    """The archive for ``spec``: from ``cache_dir`` if built there before, else written now."""
    key = f"zip-v{FORMAT}-{spec.members}-{spec.total_mib}-{spec.seed}-{spec.dirs}-{spec.subdirs}"
    where = cache_dir if cache_dir is not None else workdir
    where.mkdir(parents=True, exist_ok=True)
    path, manifest = where / f"{key}.zip", where / f"{key}.json"
    if cache_dir is not None and path.exists() and manifest.exists():
        data = _load(manifest, path)
        if data is not None:
            log(f"zip: reusing {path} ({data.size / MiB:.0f} MiB)")
            return data
    log(f"zip: building {spec.members} members, {spec.total_mib} MiB -> {path}")
    data = _write(spec, path)
    manifest.write_text(json.dumps(_manifest(data)))
    log(
        f"zip: built in {data.build_seconds:.1f}s: {data.size / MiB:.1f} MiB zip, "
        f"{data.member_bytes / MiB:.1f} MiB in members, index {data.index_bytes / 1e6:.2f} MB"
    )
    return data


def _write(spec: ZipSpec, path: Path) -> ZipData:
    started = time.perf_counter()
    rng = random.Random(spec.seed)
    sizes = _sizes(spec, rng)
    names = _names(spec, rng)
    deflate = [i % 2 == 1 for i in range(spec.members)]
    rng.shuffle(deflate)
    pool_size = 16 * MiB if spec.total_mib * MiB >= 64 * MiB else 4 * MiB
    pool_size = max(pool_size, max(sizes) + MiB)
    random_pool = random.Random(spec.seed + 1).randbytes(2 * pool_size)
    text_pool = _text_pool(pool_size, random.Random(spec.seed + 2))
    order = sorted(range(spec.members), key=lambda i: names[i])
    members: list[Member] = []
    content_rng = random.Random(spec.seed + 3)
    dirs_written: set[str] = set()
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for i in order:
            name = names[i]
            for d in _dirs_of([name]):
                if d not in dirs_written:
                    info = zipfile.ZipInfo(d, date_time=DATE)
                    info.external_attr = (0o40755 << 16) | 0x10
                    archive.writestr(info, b"")
                    dirs_written.add(d)
            pool = text_pool if deflate[i] else random_pool
            data = _content(name, i, sizes[i], pool, content_rng)
            info = zipfile.ZipInfo(name, date_time=DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if deflate[i] else zipfile.ZIP_STORED
            archive.writestr(info, data, compresslevel=6 if deflate[i] else None)
            members.append(Member(name, len(data), hashlib.sha256(data).hexdigest(), deflate[i]))
    os.replace(tmp, path)
    with zipfile.ZipFile(path) as archive:
        cd_offset = archive.start_dir
        compressed = sum(
            i.compress_size for i in archive.infolist() if i.compress_type == zipfile.ZIP_DEFLATED
        )
    return ZipData(
        path=path,
        spec=spec,
        size=path.stat().st_size,
        sha256=_file_sha256(path),
        members=members,
        dir_entries=len(dirs_written),
        cd_offset=cd_offset,
        deflated_compressed=compressed,
        build_seconds=time.perf_counter() - started,
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(data: ZipData) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "spec": asdict(data.spec),
        "size": data.size,
        "sha256": data.sha256,
        "dir_entries": data.dir_entries,
        "cd_offset": data.cd_offset,
        "deflated_compressed": data.deflated_compressed,
        "build_seconds": data.build_seconds,
        "members": [[m.name, m.size, m.sha256, m.deflated] for m in data.members],
    }


def _load(manifest: Path, path: Path) -> ZipData | None:
    raw = json.loads(manifest.read_text())
    if raw.get("format") != FORMAT or path.stat().st_size != raw["size"]:
        return None
    return ZipData(
        path=path,
        spec=ZipSpec(**raw["spec"]),
        size=raw["size"],
        sha256=raw["sha256"],
        members=[Member(*row) for row in raw["members"]],
        dir_entries=raw["dir_entries"],
        cd_offset=raw["cd_offset"],
        deflated_compressed=raw["deflated_compressed"],
        build_seconds=raw["build_seconds"],
    )


# ---------------------------------------------------------------- what gets read


def sample(data: ZipData, fraction: float = 0.01, seed: int = 11) -> tuple[list[str], str]:
    """``fraction`` of the members (seeded random choice), and a first member outside it."""
    names = [m.name for m in data.members]
    k = max(1, math.ceil(len(names) * fraction))
    rng = random.Random(seed)
    chosen = rng.sample(names, k)
    taken = set(chosen)
    candidates = [m.name for m in data.members if m.name not in taken and 0 < m.size <= MiB]
    return chosen, rng.choice(candidates)
