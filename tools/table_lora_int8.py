"""The markdown table of ``tools/eval_lora_int8.py`` (issue 29): one row per cell, with 95 % intervals.

Columns: accuracy [Wilson], TPF [normal], TPF ratio over base + threshold τ 0.95 [ratio interval], accuracy
change vs the row's reference [Newcombe; paired for int8 / bf16 vs f32 on the same problems], and for
LoRA rows the TPF gain as a fraction of full OPUT's: (TPF − TPF_base+thr) / (TPF_dmax − TPF_base+thr) at
the same τ_dec.
"""

from __future__ import annotations

import math
from pathlib import Path

from dmax_jax.demo.grid import compare, find_cell
from dmax_jax.eval.harness import load_samples

WEIGHTS_OF = {"dmax": "f32", "dmax_bf16": "bf16", "dmax_int8": "int8 (f32 compute)",
              "dmax_int8_bf16": "int8 (bf16 compute)"}


def _samples(out: Path, rec: dict) -> list[dict]:
    cell = out / "runs" / f"{rec['model']}_{rec['strategy']}_{rec['threshold']:g}"
    got = load_samples(str(cell / "samples.jsonl"))
    return [got[i] for i in range(rec["samples"])]


def paired(a: list[dict], b: list[dict], key) -> tuple[float, float, float]:
    """Mean of ``key(a_i) - key(b_i)`` over the same problems, with its normal 95 % interval."""
    d = [key(x) - key(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(n - 1, 1))
    h = 1.959964 * sd / math.sqrt(n)
    return m, m - h, m + h


def _tpf(s: dict) -> float:
    return s["tokens_ref"] / s["nfe"]


def _row(out: Path, cells: list[dict], rec: dict) -> str:
    base_thr = find_cell(cells, "base", "threshold", 0.95)
    c = compare(rec, base_thr) if base_thr is not None else None
    lo, hi = rec["accuracy_ci"]
    tlo, thi = rec.get("tpf_ci", (math.nan, math.nan))
    ratio = "—" if c is None else (f"{c['tpf_ratio']:.2f}× [{c['tpf_ratio_ci'][0]:.2f}, "
                                   f"{c['tpf_ratio_ci'][1]:.2f}]")
    vs = "—"
    frac = "—"
    name = rec["model"]
    if name in ("dmax_bf16", "dmax_int8", "dmax_int8_bf16"):
        ref = find_cell(cells, "dmax", rec["strategy"], rec["threshold"])
        if ref is not None and ref["samples"] == rec["samples"]:
            a, b = _samples(out, rec), _samples(out, ref)
            m, lo_, hi_ = paired(a, b, lambda s: 100.0 * bool(s["correct"]))
            tm, tl, th = paired(a, b, _tpf)
            vs = (f"vs f32: {m:+.1f} pts [{lo_:+.1f}, {hi_:+.1f}] paired; TPF {100 * tm / ref['tpf']:+.2f} % "
                  f"[{100 * tl / ref['tpf']:+.2f}, {100 * th / ref['tpf']:+.2f}]")
    elif c is not None and not (name == "base" and rec["strategy"] == "threshold"):
        d = c["accuracy_delta_ci_points"]
        vs = f"vs base+thr: {c['accuracy_delta_points']:+.1f} pts [{d[0]:+.1f}, {d[1]:+.1f}]"
    full = find_cell(cells, "dmax", rec["strategy"], rec["threshold"])
    if name.startswith("lora") and full is not None and base_thr is not None:
        frac = f"{(rec['tpf'] - base_thr['tpf']) / (full['tpf'] - base_thr['tpf']):.2f}"
    tau = f"{rec['strategy']} τ={rec['threshold']:g}"
    return (f"| {name} | {WEIGHTS_OF.get(name, 'f32')} | {tau} | {100 * rec['accuracy']:.1f} "
            f"[{100 * lo:.1f}, {100 * hi:.1f}] | {rec['tpf']:.2f} [{tlo:.2f}, {thi:.2f}] | {ratio} | {vs} "
            f"| {frac} |")


def lora_vs_full(out: Path, cells: list[dict], name: str, tau: float, boot: int = 2000) -> str | None:
    """One line: LoRA − full OPUT (paired accuracy and TPF on the same problems) and the LoRA TPF gain as
    a fraction of full OPUT's with a bootstrap 95 % interval (problems resampled jointly for the three
    cells); None if a cell is missing."""
    import random

    recs = [find_cell(cells, "base", "threshold", 0.95), find_cell(cells, "dmax", "spd", tau),
            find_cell(cells, name, "spd", tau)]
    if any(r is None for r in recs) or len({r["samples"] for r in recs}) != 1:
        return None
    base, full, lora = (_samples(out, r) for r in recs)
    a, t = paired(lora, full, lambda s: 100.0 * bool(s["correct"])), paired(lora, full, _tpf)
    rng, n, frac = random.Random(0), len(base), []
    for _ in range(boot):
        idx = [rng.randrange(n) for _ in range(n)]
        mb, mf, ml = (sum(_tpf(c[i]) for i in idx) for c in (base, full, lora))
        frac.append((ml - mb) / (mf - mb))
    frac.sort()
    gain = (sum(map(_tpf, lora)) - sum(map(_tpf, base))) / (sum(map(_tpf, full)) - sum(map(_tpf, base)))
    return (f"- {name} vs full OPUT, SPD τ={tau:g}: accuracy {a[0]:+.1f} pts [{a[1]:+.1f}, {a[2]:+.1f}], TPF "
            f"{t[0]:+.2f} [{t[1]:+.2f}, {t[2]:+.2f}] (paired); TPF gain over base+thr = {gain:.2f}"
            f" of full OPUT's [{frac[int(0.025 * boot)]:.2f}, {frac[int(0.975 * boot) - 1]:.2f}] (bootstrap)")


def write_table(out: Path, cells: list[dict]) -> str:
    """``OUT/results.md`` from the cells; returns its text."""
    order = {"base": 0, "dmax": 1, "dmax_bf16": 2, "dmax_int8": 3, "dmax_int8_bf16": 4}
    cells = sorted(cells, key=lambda r: (order.get(r["model"], 9), r["model"], r["strategy"] != "threshold",
                                         -r["threshold"]))
    n = min(r["samples"] for r in cells)
    head = [f"Demo models on {n} held-out problems (block 32, gen length 64, SPD τ_acc 0.9). 95 % intervals "
            "in brackets.", "",
            "| model | weights | decoder | accuracy % | TPF | TPF / base+thr τ0.95 | accuracy (and TPF) "
            "change | LoRA gain / full-OPUT gain |", "|---|---|---|---|---|---|---|---|"]
    lora = sorted({r["model"] for r in cells if r["model"].startswith("lora")})
    extra = [line for name in lora for tau in (0.5, 0.0) if (line := lora_vs_full(out, cells, name, tau))]
    text = "\n".join(head + [_row(out, cells, r) for r in cells] + ([""] + extra if extra else [])) + "\n"
    (out / "results.md").write_text(text)
    return text
