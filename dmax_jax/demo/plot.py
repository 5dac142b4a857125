"""The demo's trade-off plot: accuracy vs tokens per forward, one line per (model, decoder) over τ,
each point with its 95 % interval and a τ label placed where it overlaps no other label or point."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STYLES = {("base", "threshold"): ("tab:blue", "o", "-"), ("base", "spd"): ("tab:blue", "s", "--"),
          ("dmax", "threshold"): ("tab:red", "o", "-"), ("dmax", "spd"): ("tab:red", "s", "--")}
# Label offsets (points) tried in order, nearest first; a label moved further than the first ring
# gets a thin leader line back to its point.
_OFFSETS = [(dx * r, dy * r) for r in (6, 12, 20, 30) for dx, dy in
            ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]


def _place_labels(ax: Any, fig: Any, labels: Sequence[tuple[str, float, float, str]]) -> None:
    """Annotate each ``(text, x, y, color)`` at the first offset whose box overlaps nothing placed yet."""
    renderer = fig.canvas.get_renderer()
    taken = []
    for _, x, y, _ in labels:  # the points themselves (a 6-pt box each)
        px, py = ax.transData.transform((x, y))
        taken.append((px - 4, py - 4, px + 4, py + 4))
    for text, x, y, color in labels:
        for i, (dx, dy) in enumerate(_OFFSETS):
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            arrow = None if i < 8 else {"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6}
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                              color=color, ha=ha, va=va, arrowprops=arrow)
            box = ann.get_window_extent(renderer)
            rect = (box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1)
            inside = ax.get_window_extent(renderer)
            fits = (inside.x0 <= rect[0] and rect[2] <= inside.x1
                    and inside.y0 <= rect[1] and rect[3] <= inside.y1)
            if fits and not any(rect[0] < t[2] and t[0] < rect[2] and rect[1] < t[3] and t[1] < rect[3]
                                for t in taken):
                taken.append(rect)
                break
            if i < len(_OFFSETS) - 1:
                ann.remove()


def plot_tradeoff(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy vs TPF (PNG via matplotlib's Agg backend). Vertical bars: the Wilson 95 % interval of
    each accuracy; horizontal bars: TPF's 95 % interval where the record holds one (``tpf_ci``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmax_jax.demo.grid import with_intervals

    records = [with_intervals(r) for r in records]
    fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    labels = []
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
    n = max(r["samples"] for r in records)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Demo: accuracy vs parallelism over τ (labels), {n} problems, 95 % intervals", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.margins(x=0.08, y=0.12)
    fig.tight_layout()
    fig.canvas.draw()
    _place_labels(ax, fig, labels)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
