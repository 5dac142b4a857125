"""The demo's trade-off plot: accuracy vs tokens per forward, one line per (model, decoder) over τ,
each point with its 95 % interval and a τ label placed where it overlaps no other label or point."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dmax_jax.demo.intervals import with_intervals

STYLES = {("base", "threshold"): ("tab:blue", "o", "-"), ("base", "spd"): ("tab:blue", "s", "--"),
          ("dmax", "threshold"): ("tab:red", "o", "-"), ("dmax", "spd"): ("tab:red", "s", "--")}
# Label offsets (points) tried in order, nearest first; a label moved further than the first ring
# gets a thin leader line back to its point.
_OFFSETS = [(dx * r, dy * r) for r in (5, 10, 16, 24, 34, 46) for dx, dy in
            ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
Box = tuple[float, float, float, float]


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


Series = tuple[list[float], list[float], list[tuple[float, float]]]  # TPFs, accuracies (%), intervals


def _obstacles(ax: Any, series: Sequence[Series]) -> list[Box]:
    """Display-space boxes a label must not cover: each marker, each error bar and the lines between
    points (sampled every few pixels)."""
    boxes: list[Box] = []
    for xs, ys, cis in series:
        pts = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
        for (px, py), (x, (lo, hi)) in zip(pts, zip(xs, cis)):
            boxes.append((px - 4, py - 4, px + 4, py + 4))
            _, plo = ax.transData.transform((x, lo))
            _, phi = ax.transData.transform((x, hi))
            boxes.append((px - 2, min(plo, phi), px + 2, max(plo, phi)))
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = max(1, int(max(abs(x1 - x0), abs(y1 - y0)) / 3))
            for i in range(n + 1):
                x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
                boxes.append((x - 1.5, y - 1.5, x + 1.5, y + 1.5))
    return boxes


def _place_labels(ax: Any, fig: Any, labels: Sequence[tuple[str, float, float, str]],
                  obstacles: list[Box]) -> None:
    """Annotate each ``(text, x, y, color)`` at the first offset whose box overlaps no placed label and
    no obstacle; failing that, at the offset that overlaps the fewest obstacles (never another label
    when any offset avoids them)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed: list[Box] = []
    for text, x, y, color in labels:
        best = None
        for i, (dx, dy) in enumerate(_OFFSETS):
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            arrow = None if i < 8 else {"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.7}
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                              color=color, ha=ha, va=va, arrowprops=arrow)
            b = ann.get_window_extent(renderer)
            rect = (b.x0 - 1, b.y0 - 1, b.x1 + 1, b.y1 + 1)
            fits = (inside.x0 <= rect[0] and rect[2] <= inside.x1
                    and inside.y0 <= rect[1] and rect[3] <= inside.y1)
            cost = (0 if fits else 1000) + 100 * sum(_overlaps(rect, p) for p in placed) \
                + sum(_overlaps(rect, o) for o in obstacles)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, rect)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])


def plot_tradeoff(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy vs TPF as a PNG (:func:`tradeoff_figure`)."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(records)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def tradeoff_figure(records: Sequence[Mapping[str, Any]]) -> Any:
    """The figure (matplotlib's Agg backend). Vertical bars: the Wilson 95 % interval of each accuracy;
    horizontal bars: TPF's 95 % interval where the record holds one (``tpf_ci``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [with_intervals(r) for r in records]
    fig, ax = plt.subplots(figsize=(8.4, 5.6), dpi=120)
    labels, series = [], []
    for pair in dict.fromkeys((r["model"], r["strategy"]) for r in records):
        pts = sorted((r for r in records if (r["model"], r["strategy"]) == pair),
                     key=lambda r: -r["threshold"])
        color, marker, ls = STYLES.get(pair, ("tab:gray", "^", ":"))
        xs, ys = [r["tpf"] for r in pts], [100 * r["accuracy"] for r in pts]
        yerr = [[y - 100 * r["accuracy_ci"][0] for y, r in zip(ys, pts)],
                [100 * r["accuracy_ci"][1] - y for y, r in zip(ys, pts)]]
        xerr = None
        if all("tpf_ci" in r for r in pts):
            xerr = [[x - r["tpf_ci"][0] for x, r in zip(xs, pts)],
                    [r["tpf_ci"][1] - x for x, r in zip(xs, pts)]]
        ax.errorbar(xs, ys, yerr=yerr, xerr=xerr, color=color, marker=marker, linestyle=ls, capsize=2,
                    elinewidth=0.7, markersize=4, label=f"{pair[0]} + {pair[1]}")
        labels += [(f"{r['threshold']:g}", x, y, color) for r, x, y in zip(pts, xs, ys)]
        series.append((xs, ys, [(100 * r["accuracy_ci"][0], 100 * r["accuracy_ci"][1]) for r in pts]))
    n = max(r["samples"] for r in records)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Demo: accuracy vs parallelism over τ (labels), {n} problems, 95 % intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.margins(x=0.08, y=0.12)
    fig.tight_layout()
    fig.canvas.draw()
    _place_labels(ax, fig, labels, _obstacles(ax, series))
    return fig
