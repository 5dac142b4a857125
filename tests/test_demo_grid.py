"""The demo's evaluation maths and plot without any model: 95 % intervals against published values,
the plot's τ labels never overlapping, and the library core never importing the demo."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from dmax_jax.demo.grid import compare, with_intervals
from dmax_jax.demo.intervals import difference_interval, mean_interval, ratio_interval, wilson_interval
from dmax_jax.demo.plot import tradeoff_figure

PACKAGE = Path(__file__).resolve().parents[1] / "dmax_jax"


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 81/263 → [0.2553, 0.3662]; 0/10 → [0, 0.2775]; 15/148 → [0.0624, 0.1605]
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (0, 10): (0.0, 0.2775),
                             (15, 148): (0.0624, 0.1605)}.items():
        assert wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(5, 4)


def test_newcombe_difference_matches_published_values():
    # Newcombe (1998b), method 10: 56/70 - 48/80 → [0.0524, 0.3339]; 9/10 - 3/10 → [0.1705, 0.8090]
    assert difference_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert difference_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=1e-4)


def test_mean_and_ratio_intervals():
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and hi - mean == pytest.approx(1.959964 * (5 / 3) ** 0.5 / 2, rel=1e-6)
    r_lo, r_hi = ratio_interval(4.0, 3.8, 4.2, 2.0, 1.9, 2.1)
    assert r_lo < 2.0 < r_hi and r_lo * r_hi == pytest.approx(4.0)  # symmetric on the log scale
    se_log = ((0.2 / 1.959964 / 4.0) ** 2 + (0.1 / 1.959964 / 2.0) ** 2) ** 0.5  # se = half-width / z
    assert r_hi == pytest.approx(2.0 * 2.718281828 ** (1.959964 * se_log), rel=1e-5)


def test_compare_reports_the_difference_interval_in_points():
    ref = {"accuracy": 48 / 80, "samples": 80, "tpf": 2.0}
    new = {"accuracy": 56 / 70, "samples": 70, "tpf": 5.0}
    c = compare(new, ref)
    assert c["tpf_ratio"] == 2.5 and c["accuracy_delta_points"] == pytest.approx(20.0)
    assert c["accuracy_delta_ci_points"] == pytest.approx([5.24, 33.39], abs=1e-2)
    assert c["tpf_ratio_ci"] is None  # no per-problem TPF intervals in these records
    assert with_intervals(ref)["correct"] == 48


def test_plot_labels_never_overlap_even_in_a_cluster():
    records = [{"model": m, "strategy": s, "threshold": t, "accuracy": 0.13 + 0.002 * i,
                "tpf": 1.5 + 0.03 * i, "samples": 1000} for i, (m, s, t) in enumerate(itertools.product(
                    ("base", "dmax"), ("threshold", "spd"), (0.95, 0.9, 0.8, 0.7)))]
    fig = tradeoff_figure(records)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(records)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


def test_the_library_core_never_imports_the_demo():
    offenders = []
    for sub in ("model", "training", "decoding", "data", "checkpoint"):
        for path in (PACKAGE / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path}: {n}" for n in names
                              if n.startswith(("dmax_jax.demo", "dmax_jax.tasks"))]
    assert offenders == []


def test_shipped_models_carry_the_demo_decode_defaults():
    """build_demo writes dmax_decode.json from the demo geometry; the shipped files must agree, and the
    decoding library must read them back as the demo decodes (prompt wrap, gen length, τ per decoder)."""
    import json

    from dmax_jax.decoding.config import DecodeConfig
    from dmax_jax.decoding.model_defaults import load_model_defaults
    from dmax_jax.demo.examples import ASSET_DIR, DEMO_DECODE, decode_defaults
    from dmax_jax.demo.task import gsm8k_prompt

    for name, strategy in (("base", "threshold"), ("dmax", "spd")):
        path = ASSET_DIR / name / "dmax_decode.json"
        assert json.loads(path.read_text()) == decode_defaults(strategy)
        loaded = load_model_defaults(ASSET_DIR / name)
        assert loaded.wrap("Q?") == gsm8k_prompt("Q?")
        cfg = loaded.config(DecodeConfig(), {})
        assert (cfg.strategy, cfg.gen_length, cfg.threshold) == (
            strategy, DEMO_DECODE.gen_length, DEMO_DECODE.default_threshold(strategy))
