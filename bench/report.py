"""Results of a benchmark run: figures, rows, the issue's targets, tables and JSON.

A *figure* is one contender's result for one workload in one profile: the headline value in the
row's unit, plus what the S3 server counted (requests, GetObject body bytes), the serving
process's CPU seconds and peak RSS. A *row* is one workload in one profile with a figure per
contender and per ceiling, and whether our figure meets the target of issue 4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OURS = "s3datafs"
PEERS = ("s3fs-kc", "s3fs", "rclone-off", "rclone-full")
CEILINGS = ("boto3", "download+read", "local", "page cache")


@dataclass
class Figure:
    """One contender's result for one workload (see module docstring)."""

    value: float | None
    seconds: float = 0.0
    ops: int = 0
    nbytes: int = 0
    s3_requests: int | None = None
    s3_bytes: int | None = None
    s3_ops: dict[str, int] = field(default_factory=dict)
    cpu_s: float | None = None
    rss_kib: int | None = None
    capped: bool = False
    error: str | None = None
    # Our daemon's counters over the workload (``user.s3datafs.stats`` of the mount root, after
    # less before): what it fetched, found cached, left uncached. Empty for the peers.
    daemon: dict[str, int] = field(default_factory=dict)

    @property
    def amplification(self) -> float | None:
        """S3 bytes fetched per byte read."""
        if self.s3_bytes is None or not self.nbytes:
            return None
        return self.s3_bytes / self.nbytes


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    ceiling: str | None  # the figure the target compares against, if any


WORKLOADS = [
    Workload("cold_seq", "cold sequential read, 1 MiB reads", "MB/s", True, "boto3"),
    Workload("reread_same", "re-read, same mount", "MB/s", True, "page cache"),
    Workload("reread_remount", "re-read after remount, caches dropped", "MB/s", True, "local"),
    Workload("rand_4k_1t", "random 4 KiB reads, 1 thread, cold", "ops/s", True, "boto3"),
    Workload("rand_4k_8t", "random 4 KiB reads, 8 threads, cold", "ops/s", True, "boto3"),
    Workload("rand_64k_1t", "random 64 KiB reads, 1 thread, cold", "ops/s", True, "boto3"),
    Workload("rand_64k_8t", "random 64 KiB reads, 8 threads, cold", "ops/s", True, "boto3"),
    Workload("small_files", "small files read by 8 threads, cold", "files/s", True, "boto3"),
    Workload("find", "find (stat all) over the small tree after mount", "s", False, "boto3"),
    Workload("first_read", "mount command start to first 4 KiB read", "s", False, "boto3"),
    Workload(
        "scattered", "read 1% of the big file, scattered 1 MiB chunks", "s", False, "download+read"
    ),
    Workload(
        "scattered_8t",
        "read 1% of the big file, scattered 1 MiB chunks, 8 threads",
        "s",
        False,
        "download+read",
    ),
    Workload("readers8", "8 parallel sequential readers, aggregate", "MB/s", True, None),
    Workload("rss8", "peak RSS of the FUSE process, 8 parallel readers", "MiB", False, None),
]
BY_KEY = {w.key: w for w in WORKLOADS}


@dataclass
class Row:
    profile: str
    workload: str
    figures: dict[str, Figure] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None


# ---------------------------------------------------------------- targets (issue 4)


def _v(row: Row, name: str) -> float | None:
    fig = row.figures.get(name)
    return None if fig is None or fig.error or fig.value is None else fig.value


def _peers(row: Row) -> list[float]:
    return [v for name in PEERS if (v := _v(row, name)) is not None]


def _all(*conditions: bool | None) -> bool | None:
    return None if any(c is None for c in conditions) else all(conditions)


def _ratio_at_least(ours: float | None, other: float | None, factor: float) -> bool | None:
    return None if ours is None or other is None else ours >= factor * other


def _cold_seq(row: Row) -> bool | None:
    ours = _v(row, OURS)
    beats = None if ours is None else all(ours > p for p in _peers(row))
    return _all(_ratio_at_least(ours, _v(row, "boto3"), 0.85), beats)


def _reread_same(row: Row) -> bool | None:
    return _ratio_at_least(_v(row, OURS), _v(row, "s3fs-kc"), 0.9)


def _reread_remount(row: Row) -> bool | None:
    fig = row.figures.get(OURS)
    zero = None if fig is None or fig.s3_bytes is None else fig.s3_bytes == 0
    return _all(_ratio_at_least(_v(row, OURS), _v(row, "local"), 0.5), zero)


def _random(limit: float) -> Callable[[Row], bool | None]:
    def check(row: Row) -> bool | None:
        fig = row.figures.get(OURS)
        amp = None if fig is None else fig.amplification
        small = None if amp is None else amp <= limit
        return _all(_ratio_at_least(_v(row, OURS), _v(row, "boto3"), 0.8), small)

    return check


def _small_files(row: Row) -> bool | None:
    ours = _v(row, OURS)
    beats = None if ours is None else all(ours > p for p in _peers(row))
    return _all(_ratio_at_least(ours, _v(row, "boto3"), 1.0), beats)


def _find(row: Row) -> bool | None:
    fig, ours = row.figures.get(OURS), _v(row, OURS)
    zero = None if fig is None or fig.s3_requests is None else fig.s3_requests == 0
    fast = None if ours is None else all(ours * 10 <= p for p in _peers(row))
    return _all(zero, fast)


def _first_read(row: Row) -> bool | None:
    ours = _v(row, OURS)
    return None if ours is None else all(ours < p for p in _peers(row))


def _scattered(row: Row) -> bool | None:
    ours, full = _v(row, OURS), _v(row, "download+read")
    return None if ours is None or full is None else ours * 20 <= full


def _rss(row: Row) -> bool | None:
    ours = _v(row, OURS)
    return None if ours is None else ours <= 256


TARGETS: dict[str, tuple[str, Callable[[Row], bool | None]]] = {
    "cold_seq": (">= 0.85x boto3, above every peer", _cold_seq),
    "reread_same": (">= 0.9x s3fs-kc", _reread_same),
    "reread_remount": (">= 0.5x local disk cold; 0 S3 bytes", _reread_remount),
    "rand_4k_1t": (">= 0.8x boto3; S3 bytes <= 16x read", _random(16)),
    "rand_4k_8t": (">= 0.8x boto3; S3 bytes <= 16x read", _random(16)),
    "rand_64k_1t": (">= 0.8x boto3; S3 bytes <= 4x read", _random(4)),
    "rand_64k_8t": (">= 0.8x boto3; S3 bytes <= 4x read", _random(4)),
    "small_files": (">= boto3, above every peer", _small_files),
    "find": ("0 S3 requests; >= 10x faster than every peer", _find),
    "first_read": ("below every peer", _first_read),
    "scattered": (">= 20x faster than download+read", _scattered),
    "scattered_8t": (">= 20x faster than download+read", _scattered),
    "rss8": ("<= 256 MiB", _rss),
}


def judge(row: Row) -> None:
    text, check = TARGETS.get(row.workload, ("", lambda r: None))
    row.target, row.met = text, check(row)


# ---------------------------------------------------------------- tables


def _fmt_value(fig: Figure | None, unit: str) -> str:
    if fig is None:
        return "-"
    if fig.error:
        return "error"
    if fig.value is None:
        return "-"
    value = fig.value
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if value >= 0.1 else 3
    return f"{value:,.{digits}f}{'*' if fig.capped else ''}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt_s3(fig: Figure | None) -> str:
    if fig is None or fig.error or fig.s3_requests is None:
        return "-"
    text = f"{fig.s3_requests} req, {human_bytes(fig.s3_bytes)}"
    if fig.amplification is not None and fig.nbytes < (64 << 20):
        text += f" ({fig.amplification:.1f}x)"
    if fig.cpu_s is not None:
        text += f", {fig.cpu_s:.1f} cpu-s"
    return text


def _ceiling_cell(row: Row, workload: Workload, fmt: Callable[[Figure | None], str]) -> str:
    names = [n for n in CEILINGS if n in row.figures]
    return "; ".join(f"{n}: {fmt(row.figures[n])}" for n in names) or "-"


def _met(row: Row) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[row.met]


def markdown_tables(rows: list[Row], contenders: list[str]) -> str:
    """Two markdown tables per profile: headline values, then S3 and CPU per contender."""
    out: list[str] = []
    for profile in dict.fromkeys(r.profile for r in rows):
        prof_rows = [r for r in rows if r.profile == profile]
        out.append(f"\n### Profile `{profile}`: results\n")
        out.append("| workload | unit | " + " | ".join(contenders) + " | ceilings | target | met |")
        out.append("|---|---|" + "---:|" * len(contenders) + "---|---|---|")
        for row in prof_rows:
            w = BY_KEY[row.workload]

            def value(fig: Figure | None, unit: str = w.unit) -> str:
                return _fmt_value(fig, unit)

            cells = [value(row.figures.get(c)) for c in contenders]
            ceiling = _ceiling_cell(row, w, value)
            out.append(
                f"| {w.title} | {w.unit} | "
                + " | ".join(cells)
                + f" | {ceiling} | {row.target} | {_met(row)} |"
            )
        out.append(f"\n### Profile `{profile}`: S3 requests, bytes (amplification), CPU\n")
        out.append("| workload | " + " | ".join(contenders) + " | ceilings |")
        out.append("|---|" + "---|" * len(contenders) + "---|")
        for row in prof_rows:
            if row.workload == "rss8":
                continue
            w = BY_KEY[row.workload]
            cells = [_fmt_s3(row.figures.get(c)) for c in contenders]
            ceiling = _ceiling_cell(row, w, _fmt_s3)
            out.append(f"| {w.title} | " + " | ".join(cells) + f" | {ceiling} |")
    out.append("\n`*` = stopped at the workload's time cap; rate computed from what was done.")
    return "\n".join(out)


def errors(rows: list[Row]) -> list[str]:
    return [
        f"{r.profile} {r.workload} {name}: {fig.error}"
        for r in rows
        for name, fig in r.figures.items()
        if fig.error
    ]


# ---------------------------------------------------------------- JSON


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    payload = {
        **meta,
        "workloads": [asdict(w) for w in WORKLOADS],
        "rows": [asdict(r) for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1))
    tmp.replace(path)


def load_rows(payload: dict[str, Any]) -> list[Row]:
    rows = []
    for raw in payload["rows"]:
        figures = {name: Figure(**fig) for name, fig in raw["figures"].items()}
        rows.append(Row(raw["profile"], raw["workload"], figures, raw["target"], raw["met"]))
    return rows
