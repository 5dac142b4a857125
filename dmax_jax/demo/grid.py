"""The paper-style evaluation grid of the demo: accuracy and TPF for {model} x {decoder} x {threshold},
the headline comparison and the paper's criterion, each stated with its 95 % interval.

Why intervals: at the quick demo's 100 problems an accuracy is uncertain by about ±7 points and at the
full evaluation's 1,000 by about ±2, so "-3.0 points" or "target not met" alone would be a verdict the
sample size cannot support (``dmax_jax.demo.intervals`` says which interval and why).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dmax_jax.demo.examples import DEFAULT_THRESHOLDS, DEMO_DECODE, DEMO_STRATEGIES, MODEL_NAMES, DemoDecode
from dmax_jax.demo.intervals import (
    difference_interval,
    mean_interval,
    points,
    ratio_interval,
    wilson_interval,
    with_intervals,
)

KEPT_ACCURACY_POINTS = 2.0  # "at kept accuracy": within this many points of base + threshold (τ = 0.95)
TARGET_TPF_RATIO = 2.5       # the bar (the paper: 2.04 → 5.47 TPF on GSM8K, 2.7×)
Record = Mapping[str, Any]


def cell_record(name: str, strategy: str, tau: float, summary: Mapping[str, Any],
                samples: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """One grid cell: the harness summary's numbers plus ``correct`` and the 95 % intervals
    (``tpf_ci`` only when the per-problem samples are given)."""
    rec = {"model": name, "strategy": strategy, "threshold": float(tau),
           **{k: summary[k] for k in ("accuracy", "tpf", "mean_nfe", "samples", "tps")}}
    if len(samples) >= 2:
        _, lo, hi = mean_interval([s["tokens_ref"] / s["nfe"] for s in samples])
        rec["tpf_ci"] = [lo, hi]
    return with_intervals(rec)


def evaluate_grid(models: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, out_dir: str | os.PathLike,
                  strategies: Iterable[str] = DEMO_STRATEGIES,
                  thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                  limit: int | None = None, decode: DemoDecode = DEMO_DECODE, progress: bool = True,
                  log: Any = None) -> list[dict[str, Any]]:
    """Run ``dmax_jax.eval.harness.run_eval`` (GSM8K scoring) for every (model, strategy, τ) cell.

    Each cell writes ``out_dir/runs/<model>_<strategy>_<τ>/`` (samples.jsonl, summary.json; resumable).
    Returns one :func:`cell_record` per cell. One tqdm bar counts decoded problems over all cells;
    ``log`` (if given) gets one line per finished cell.
    """
    from tqdm.auto import tqdm

    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import SAMPLES_FILE, load_samples, run_eval

    bench = get_benchmark("gsm8k")
    strategies, thresholds = tuple(strategies), tuple(thresholds)
    n = len(rows) if limit is None else min(limit, len(rows))
    records = []
    total = len(models) * len(strategies) * len(thresholds) * n
    with tqdm(total=total, desc="evaluate", unit="problem", disable=not progress, dynamic_ncols=True) as bar:
        for name, model in models.items():
            for strategy in strategies:
                for tau in thresholds:
                    kw = decode.generate_kwargs(strategy, tau)
                    cell = Path(out_dir) / "runs" / f"{name}_{strategy}_{tau:g}"
                    bar.set_postfix_str(f"{name} {strategy} τ={tau:g}", refresh=False)

                    def generate_fn(prompt_ids, model=model, kw=kw):
                        res = generate(model, prompt_ids, batch_size=decode.batch_size, **kw)
                        bar.update(len(prompt_ids))
                        return res

                    bar.update(sum(1 for i in load_samples(str(cell / SAMPLES_FILE)) if i < n))
                    # quiet: the grid shows one bar for all cells and prints one table at the end
                    summary = run_eval(bench, list(rows), generate_fn, model.tokenizer, out_dir=cell,
                                       batch_size=decode.batch_size, decode_config=kw, limit=limit,
                                       verbose=False)
                    samples = load_samples(str(cell / SAMPLES_FILE))
                    rec = cell_record(name, strategy, tau, summary, [samples[i] for i in range(n)])
                    if log:
                        line = (f"{name:>6} {strategy:>9} τ={tau:<4g} accuracy {100 * rec['accuracy']:5.1f}% "
                                f"{points(rec['accuracy_ci'])}  TPF {rec['tpf']:5.2f}  "
                                f"NFE {rec['mean_nfe']:5.1f}")
                        (bar.write if log is print else log)(line)
                    records.append(rec)
    return records


def find_cell(records: Sequence[Record], model: str, strategy: str, tau: float) -> Record | None:
    """The record of one (model, strategy, τ) cell, or None."""
    for r in records:
        if r["model"] == model and r["strategy"] == strategy and abs(r["threshold"] - tau) < 1e-9:
            return r
    return None


def compare(new: Record, ref: Record) -> dict[str, Any]:
    """``new`` against ``ref``: TPF ratio and accuracy difference (points), with 95 % intervals."""
    new, ref = with_intervals(new), with_intervals(ref)
    lo, hi = difference_interval(new["correct"], new["samples"], ref["correct"], ref["samples"])
    out = {"tpf_ratio": new["tpf"] / ref["tpf"],
           "accuracy_delta_points": 100 * (new["accuracy"] - ref["accuracy"]),
           "accuracy_delta_ci_points": [100 * lo, 100 * hi], "tpf_ratio_ci": None}
    if "tpf_ci" in new and "tpf_ci" in ref:
        out["tpf_ratio_ci"] = list(ratio_interval(new["tpf"], *new["tpf_ci"], ref["tpf"], *ref["tpf_ci"]))
    return out


def headline(records: Sequence[Record], decode: DemoDecode = DEMO_DECODE) -> dict[str, Any] | None:
    """The paper's comparison: ``base`` + threshold at τ = 0.95 vs ``dmax`` + SPD at its τ_dec."""
    ref = find_cell(records, "base", "threshold", decode.baseline_threshold)
    new = find_cell(records, "dmax", "spd", decode.spd_threshold)
    if ref is None or new is None:
        return None
    return {"baseline": with_intervals(ref), "dmax_spd": with_intervals(new), **compare(new, ref)}


def fastest_kept(cells: Sequence[Record], ref: Record) -> Record | None:
    """The highest-TPF cell whose accuracy is within ``KEPT_ACCURACY_POINTS`` of ``ref`` ("at kept
    accuracy"), or None."""
    kept = [r for r in cells if 100 * (r["accuracy"] - ref["accuracy"]) >= -KEPT_ACCURACY_POINTS]
    return max(kept, key=lambda r: r["tpf"], default=None)


def criterion(records: Sequence[Record], decode: DemoDecode = DEMO_DECODE) -> dict[str, Any] | None:
    """The paper's claim checked over the whole sweep: the fastest ``dmax`` + SPD cell whose accuracy is
    within ``KEPT_ACCURACY_POINTS`` of ``base`` + threshold at τ = 0.95, its TPF ratio against the
    target, and the accuracy ``base`` + SPD vs ``dmax`` + SPD keep at the most aggressive τ swept."""
    ref = find_cell(records, "base", "threshold", decode.baseline_threshold)
    spd = {m: [r for r in records if r["model"] == m and r["strategy"] == "spd"] for m in MODEL_NAMES}
    if ref is None or not spd["dmax"]:
        return None
    best = fastest_kept(spd["dmax"], ref)
    out: dict[str, Any] = {"best_kept_dmax_spd": None if best is None else with_intervals(best),
                           "tpf_ratio": None if best is None else best["tpf"] / ref["tpf"],
                           "target_tpf_ratio": TARGET_TPF_RATIO}
    out["met_tpf_target"] = out["tpf_ratio"] is not None and out["tpf_ratio"] >= TARGET_TPF_RATIO
    if best is not None:
        out["vs_baseline"] = compare(best, ref)
    tau = min(r["threshold"] for r in spd["dmax"])
    base_aggr, dmax_aggr = find_cell(records, "base", "spd", tau), find_cell(records, "dmax", "spd", tau)
    if base_aggr is not None and dmax_aggr is not None:
        out["aggressive_tau"] = tau
        gap = compare(dmax_aggr, base_aggr)
        out["aggressive_accuracy_gap_points"] = gap["accuracy_delta_points"]
        out["aggressive_accuracy_gap_ci_points"] = gap["accuracy_delta_ci_points"]
    return out


def _signed(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _verdict(ci: Sequence[float]) -> str:
    """What an accuracy-difference interval supports (not a verdict from the point estimate)."""
    if ci[0] > 0:
        return "better beyond the noise"
    if ci[1] < 0:
        return "worse beyond the noise"
    return "no difference this sample can resolve"


def _ratio(c: Mapping[str, Any]) -> str:
    ci = c.get("tpf_ratio_ci")
    return f"{c['tpf_ratio']:.2f}×" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _claim_lines(records: Sequence[Record], decode: DemoDecode) -> list[str]:
    lines = []
    h = headline(records, decode)
    if h is not None:
        b, d = h["baseline"], h["dmax_spd"]
        lines += ["", f"**Headline**: base + threshold (τ={b['threshold']:g}): {100 * b['accuracy']:.1f}% "
                      f"{points(b['accuracy_ci'])} at TPF {b['tpf']:.2f} → "
                      f"dmax + SPD (τ={d['threshold']:g}): "
                      f"{100 * d['accuracy']:.1f}% {points(d['accuracy_ci'])} at TPF {d['tpf']:.2f} — "
                      f"{h['tpf_ratio']:.2f}× tokens per forward, accuracy "
                      f"{h['accuracy_delta_points']:+.1f} points {_signed(h['accuracy_delta_ci_points'])} "
                      f"({_verdict(h['accuracy_delta_ci_points'])})."]
    c = criterion(records, decode)
    if c is not None:
        best = c["best_kept_dmax_spd"]
        if best is None:
            text = f"no dmax + SPD cell is within {KEPT_ACCURACY_POINTS:g} points of base + threshold"
        else:
            v = c["vs_baseline"]
            text = (f"fastest dmax + SPD cell within {KEPT_ACCURACY_POINTS:g} points of base + threshold "
                    f"(τ={decode.baseline_threshold:g}): τ={best['threshold']:g}, "
                    f"{100 * best['accuracy']:.1f}% at TPF {best['tpf']:.2f} = {_ratio(v)} base's TPF "
                    f"({'meets' if c['met_tpf_target'] else 'short of'} the ≥ {TARGET_TPF_RATIO:g}× "
                    f"target), accuracy {v['accuracy_delta_points']:+.1f} points "
                    f"{_signed(v['accuracy_delta_ci_points'])}")
        if "aggressive_tau" in c:
            text += (f"; at τ={c['aggressive_tau']:g} dmax + SPD is "
                     f"{c['aggressive_accuracy_gap_points']:+.1f} points "
                     f"{_signed(c['aggressive_accuracy_gap_ci_points'])} vs base + SPD")
        lines += ["", f"**Criterion**: {text}."]
    return lines


def results_markdown(records: Sequence[Record], decode: DemoDecode = DEMO_DECODE) -> str:
    """Paper-style table: one row per (model, decoder), one column per τ, cells "accuracy % / TPF";
    then the headline and the criterion with their 95 % intervals."""
    taus = sorted({r["threshold"] for r in records}, reverse=True)
    pairs = list(dict.fromkeys((r["model"], r["strategy"]) for r in records))
    n = max(r["samples"] for r in records)
    lo, hi = wilson_interval(n // 2, n)
    lines = [f"Accuracy (%) / TPF on {n} held-out problems (block {decode.block_length}, gen length "
             f"{decode.gen_length}, τ_acc {decode.accept_threshold} for SPD). 95 % intervals: an accuracy "
             f"is uncertain by up to ±{50 * (hi - lo):.1f} points at this n (Wilson; per cell in "
             "results.json); "
             "[a, b] below are 95 % intervals in points.", "",
             "| model | decoder | " + " | ".join(f"τ={t:g}" for t in taus) + " |",
             "|---|---|" + "---|" * len(taus)]
    for model, strategy in pairs:
        cells = []
        for t in taus:
            r = find_cell(records, model, strategy, t)
            cells.append("—" if r is None else f"{100 * r['accuracy']:.1f} / {r['tpf']:.2f}")
        lines.append(f"| {model} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _claim_lines(records, decode))


def write_results(records: Sequence[Record], out_dir: str | os.PathLike, decode: DemoDecode = DEMO_DECODE,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``results.md``, ``results.json`` and ``tradeoff.png`` under ``out_dir``."""
    from dmax_jax.demo.plot import plot_tradeoff  # lazy: matplotlib is an optional extra

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [with_intervals(r) for r in records]
    md = out / "results.md"
    md.write_text(results_markdown(records, decode) + "\n", encoding="utf-8")
    js = out / "results.json"
    payload = {"decode": dataclasses.asdict(decode), "cells": records, "headline": headline(records, decode),
               "criterion": criterion(records, decode), **(dict(extra) if extra else {})}
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return {"markdown": md, "json": js, "plot": plot_tradeoff(records, out / "tradeoff.png")}


def load_records(results_json: str | os.PathLike) -> tuple[list[dict[str, Any]], DemoDecode, dict[str, Any]]:
    """``(records, decode, extra)`` of a results.json written by :func:`write_results`, so the table and
    plot can be regenerated without decoding again."""
    payload = json.loads(Path(results_json).read_text(encoding="utf-8"))
    decode = DemoDecode(**payload["decode"])
    extra = {k: v for k, v in payload.items() if k not in ("decode", "cells", "headline", "criterion")}
    return [with_intervals(r) for r in payload["cells"]], decode, extra
