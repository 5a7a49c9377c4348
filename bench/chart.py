"""Bar charts of a benchmark run: ours vs peers vs the ceiling, per workload and profile.

``python -m bench.chart [RESULTS.json] [--out bench/results.png]`` reads the JSON written by
``bench/bench_reads.py`` (default ``bench/out/latest.json``) and draws one small panel per
workload: groups are the network profiles, bars are the contenders and the workload's ceiling.
Rates (higher is better) and times (lower is better) are labelled as such; panels whose values
span more than two orders of magnitude use a log scale. matplotlib is a bench-only dependency
(``pip install -e '.[bench]'``); the figure is rendered off-screen (Agg) at a commit-friendly size.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .report import BY_KEY, OURS, PEERS, WORKLOADS, Row, load_rows

HERE = Path(__file__).resolve().parent
COLORS = {
    OURS: "#d62728",
    "s3fs-kc": "#1f77b4",
    "s3fs": "#aec7e8",
    "rclone-off": "#ff7f0e",
    "rclone-full": "#ffbb78",
    "ceiling": "#7f7f7f",
}
PANELS = [w.key for w in WORKLOADS]


def _value(row: Row | None, name: str) -> float:
    if row is None:
        return math.nan
    fig = row.figures.get(name)
    if fig is None or fig.error or fig.value is None:
        return math.nan
    return float(fig.value)


def _series(rows: list[Row], workload: str, profiles: list[str]) -> dict[str, list[float]]:
    """Bar heights per contender (and "ceiling"), one per profile."""
    by_profile = {r.profile: r for r in rows if r.workload == workload}
    ceiling = BY_KEY[workload].ceiling
    names = [OURS, *PEERS]
    series = {n: [_value(by_profile.get(p), n) for p in profiles] for n in names}
    if ceiling is not None:
        series["ceiling"] = [_value(by_profile.get(p), ceiling) for p in profiles]
    return {n: v for n, v in series.items() if any(not math.isnan(x) for x in v)}


def _panel(ax: Any, rows: list[Row], workload: str, profiles: list[str]) -> None:
    w = BY_KEY[workload]
    series = _series(rows, workload, profiles)
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [p + (i - (len(series) - 1) / 2) * width for p in range(len(profiles))]
        label = f"ceiling ({w.ceiling})" if name == "ceiling" else name
        ax.bar(xs, values, width, color=COLORS[name], label=label)
    positives = [v for vs in series.values() for v in vs if v > 0 and not math.isnan(v)]
    if positives and max(positives) / min(positives) > 100:
        ax.set_yscale("log")
    ax.set_xticks(range(len(profiles)), profiles)
    better = "higher is better" if w.higher_is_better else "lower is better"
    ceiling = f", grey = {w.ceiling}" if w.ceiling else ""
    ax.set_title(f"{w.title}\n{w.unit}, {better}{ceiling}", fontsize=8)
    ax.tick_params(labelsize=7)
    for row in rows:
        if row.workload == workload and row.met is False:
            ax.annotate(
                "target missed",
                (profiles.index(row.profile), 0),
                fontsize=6,
                xytext=(0, -18),
                textcoords="offset points",
                ha="center",
                color="red",
            )


def draw(payload: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(payload)
    profiles = list(dict.fromkeys(r.profile for r in rows))
    panels = [k for k in PANELS if any(r.workload == k and r.figures for r in rows)]
    cols = 4
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(16, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        _panel(ax, rows, key, profiles)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    labels = [label.split(" (")[0] for label in labels]
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 0.975),
    )
    settings = payload.get("settings", {}).get("dataset", {})
    fig.suptitle(
        f"s3datafs vs peers: {settings.get('big_size', 0) >> 20} MiB file, "
        f"{settings.get('small_count', '?')} small files; "
        f"{payload.get('machine', {}).get('cores', '?')} cores",
        y=0.998,
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, default=HERE / "out" / "latest.json")
    parser.add_argument("--out", type=Path, default=HERE / "results.png")
    args = parser.parse_args(argv)
    draw(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
