"""The embedded CPU demo: two shipped tiny LLaDA2-MoE models, their example problems, the paper-style
evaluation grid (accuracy and TPF for {model} x {decoder} x {threshold}) and the quick OPUT run.

Why it exists: the paper's claim (an OPUT fine-tune decodes many more tokens per forward with Soft
Parallel Decoding at kept accuracy) should be visible on a laptop in minutes. ``base`` is a
block-diffusion masked-diffusion model pretrained from scratch on generated GSM8K-format arithmetic
problems (``dmax_jax.tasks``), the stand-in for LLaDA2.0-mini; ``dmax`` is its OPUT fine-tune, the
stand-in for DMax. Both were made by ``tools/build_demo.py`` with the project's own training loop.
Real checkpoints use the same entry points with ``--model DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAMES = ("base", "dmax")
STRATEGIES = ("threshold", "spd")
QUICK_CONFIG = "demo_oput_quick.yaml"


@dataclasses.dataclass(frozen=True)
class DemoDecode:
    """Decoding geometry of the demo task (prompts 44-63 tokens; answers <= 60 tokens + EOS on the first
    1,000 held-out problems).

    The first block starts at 32 * floor(P / 32) = 32 and holds the prompt tail; 64 generated
    positions cover every answer in at most three 32-token blocks. ``prompt_bucket`` 64 keeps the
    KV cache at 128 slots. ``spd_threshold`` is the τ_dec the demo shows by default; ``baseline_threshold``
    the threshold decoder's τ the paper compares against (0.95).
    """

    block_length: int = 32
    gen_length: int = 64
    prompt_bucket: int = 64
    accept_threshold: float = 0.9
    spd_threshold: float = 0.5
    baseline_threshold: float = 0.95
    batch_size: int = 50

    def generate_kwargs(self, strategy: str, threshold: float) -> dict[str, Any]:
        """Keyword arguments of ``dmax_jax.generate`` for one (strategy, τ) cell."""
        if strategy not in STRATEGIES:
            raise ValueError(f"demo strategy {strategy!r} is not one of {STRATEGIES}")
        kw = {"strategy": strategy, "block_length": self.block_length, "gen_length": self.gen_length,
              "threshold": float(threshold), "prompt_bucket": self.prompt_bucket}
        if strategy == "spd":
            kw["accept_threshold"] = self.accept_threshold
        return kw


DEMO_DECODE = DemoDecode()
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)


# ---- shipped models and example problems ---------------------------------------------------------------
def default_model_dir(name: str = "dmax") -> Path:
    """Directory of the shipped demo model ``name`` ("base" or "dmax"), checked to be loadable."""
    if name not in MODEL_NAMES:
        raise ValueError(f"demo model {name!r} is not one of {MODEL_NAMES}")
    path = ASSET_DIR / name
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"shipped demo model {path} is incomplete (missing "
                                f"{missing or ['*.safetensors']}); rebuild it with "
                                "`python tools/build_demo.py`")
    return path


def load_demo_model(name_or_dir: str | os.PathLike = "dmax", dtype: str = "float32") -> Any:
    """A ``Pretrained`` from a shipped model name or any HF directory (the real checkpoints too)."""
    from dmax_jax.pretrained import load_pretrained

    name = os.fspath(name_or_dir)
    path = default_model_dir(name) if name in MODEL_NAMES else Path(name)
    model = load_pretrained(path, dtype=dtype)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer files; the demo needs one")
    return model


def test_problems(n: int = 500, seed: int = 0) -> list[dict[str, str]]:
    """The held-out problems (``{"question", "answer"}``, never in any training split)."""
    from dmax_jax.tasks.arith import generate_problems

    return generate_problems(n, seed=seed, split="test")


def write_test_jsonl(path: str | os.PathLike, n: int = 1000, seed: int = 0) -> Path:
    """Write the held-out split as GSM8K jsonl (what ``get_benchmark("gsm8k").load`` reads)."""
    from dmax_jax.tasks.arith import write_jsonl

    return write_jsonl(path, test_problems(n, seed))


def example_questions(n: int = 4) -> list[str]:
    """The questions ``python decode.py`` shows by default (the first ``n`` held-out problems)."""
    return [p["question"] for p in test_problems(n)]


def decode_examples(model: Any = "dmax", *, n: int = 4, strategy: str = "spd", threshold: float | None = None,
                    decode: DemoDecode = DEMO_DECODE) -> list[dict[str, Any]]:
    """Decode the first ``n`` held-out problems; one dict per problem (question, response, gold,
    correct, nfe, tokens, tpf). ``model``: a ``Pretrained``, a shipped name or an HF directory."""
    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import build_input_ids

    pretrained = model if hasattr(model, "params") else load_demo_model(model)
    bench = get_benchmark("gsm8k")
    rows = test_problems(n)
    tau = (decode.spd_threshold if strategy == "spd" else decode.baseline_threshold) if threshold is None \
        else threshold
    ids = [build_input_ids(pretrained.tokenizer, bench.prompt(r)) for r in rows]
    res = generate(pretrained, ids, **decode.generate_kwargs(strategy, tau))
    out = []
    for i, row in enumerate(rows):
        text = pretrained.tokenizer.decode(res.token_ids[i], skip_special_tokens=True)
        out.append({"question": row["question"], "response": text, "gold": bench.gold(row),
                    "correct": bool(bench.score(text, row).correct), "nfe": res.nfe[i],
                    "tokens": res.tokens_ref[i], "tpf": res.tpf[i]})
    return out


def format_examples(results: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable block per decoded example."""
    parts = []
    for i, r in enumerate(results):
        mark = "correct" if r["correct"] else f"wrong (gold {r['gold']})"
        parts.append(f"[{i}] {r['question']}\n{r['response']}\n-> {mark}; NFE {r['nfe']}, "
                     f"{r['tokens']} tokens, TPF {r['tpf']:.2f}")
    return "\n\n".join(parts)


# ---- self-distilled OPUT data (spec §3: DMax's answers are the base model's own generations) ------------
def self_distill(model: Any, rows: Sequence[Mapping[str, Any]], *, strategy: str = "threshold",
                 threshold: float | None = None, decode: DemoDecode = DEMO_DECODE,
                 log: Any = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Replace each chat row's assistant turn by ``model``'s own decoded answer to its user turn.

    Why: DMax's OPUT data are LLaDA2.0-mini's own generations (self-distillation), not gold answers, so the
    fine-tune sharpens the base model's own distribution. ``rows``: ``{"messages": [user, assistant]}``.
    Returns ``(rows, stats)``; stats counts rows, EOS-terminated answers and answers whose final
    ``#### N`` equals the original one (kept either way, as in the reference data).
    """
    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import build_input_ids

    bench = get_benchmark("gsm8k")
    tau = decode.baseline_threshold if threshold is None else threshold
    kw = decode.generate_kwargs(strategy, tau)
    out, agree, finished = [], 0, 0
    for start in range(0, len(rows), decode.batch_size):
        chunk = rows[start:start + decode.batch_size]
        for i, r in enumerate(chunk, start):
            if [m.get("role") for m in r.get("messages", [])] != ["user", "assistant"]:
                raise ValueError(f"self_distill: row {i} is not one user + one assistant turn")
        ids = [build_input_ids(model.tokenizer, r["messages"][0]["content"]) for r in chunk]
        res = generate(model, ids, batch_size=decode.batch_size, **kw)
        for i, r in enumerate(chunk):
            text = model.tokenizer.decode(res.token_ids[i], skip_special_tokens=True).strip()
            finished += int(res.tokens_ref[i] < decode.gen_length)
            agree += int(bench.score(text, {"answer": r["messages"][1]["content"]}).correct)
            out.append({"messages": [dict(r["messages"][0]), {"role": "assistant", "content": text}]})
        if log and (start // decode.batch_size) % 20 == 0:
            log(f"self_distill: {len(out)}/{len(rows)} rows")
    stats = {"rows": len(out), "strategy": strategy, "threshold": tau, "finished": finished,
             "answer_agrees_with_gold": agree}
    return out, stats


def distill_file(base: Any, train_file: str | os.PathLike, out_dir: str | os.PathLike, n: int, *,
                 resume: bool = False, log: Any = print) -> Path:
    """``base``'s own answers to the first ``n`` chat rows of ``train_file`` → ``out_dir/train.jsonl``
    (+ ``stats.json``): the OPUT data of ``tools/build_demo.py`` and of the quick demo.
    ``base``: a ``Pretrained``, a shipped name or an HF directory. ``resume`` reuses an existing file."""
    from dmax_jax.tasks.arith import write_jsonl

    out = Path(out_dir)
    result = out / "train.jsonl"
    if resume and result.is_file():
        return result
    with open(train_file, encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        raise ValueError(f"distill: {n} rows requested but {train_file} has only {len(rows)} rows")
    model = base if hasattr(base, "params") else load_demo_model(base)
    new_rows, stats = self_distill(model, rows, log=log)
    write_jsonl(result, new_rows)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if log:
        log(f"distill: {n} trajectories of base → {result} ({stats})")
    return result


# ---- the evaluation grid ---------------------------------------------------------------------------------
def evaluate_grid(models: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, out_dir: str | os.PathLike,
                  strategies: Iterable[str] = STRATEGIES, thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                  limit: int | None = None, decode: DemoDecode = DEMO_DECODE, log: Any = print
                  ) -> list[dict[str, Any]]:
    """Run ``dmax_jax.eval.harness.run_eval`` (GSM8K scoring) for every (model, strategy, τ) cell.

    Each cell writes ``out_dir/runs/<model>_<strategy>_<τ>/`` (samples.jsonl, summary.json; resumable).
    Returns one record per cell: model, strategy, threshold, accuracy, tpf, mean_nfe, samples, tps.
    """
    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import run_eval

    bench = get_benchmark("gsm8k")
    records = []
    for name, model in models.items():
        for strategy in strategies:
            for tau in thresholds:
                kw = decode.generate_kwargs(strategy, tau)
                cell = Path(out_dir) / "runs" / f"{name}_{strategy}_{tau:g}"

                def generate_fn(prompt_ids, model=model, kw=kw):
                    return generate(model, prompt_ids, batch_size=decode.batch_size, **kw)

                summary = run_eval(bench, list(rows), generate_fn, model.tokenizer, out_dir=cell,
                                   batch_size=decode.batch_size, decode_config=kw, limit=limit)
                rec = {"model": name, "strategy": strategy, "threshold": float(tau),
                       **{k: summary[k] for k in ("accuracy", "tpf", "mean_nfe", "samples", "tps")}}
                log(f"{name:>6} {strategy:>9} τ={tau:<4g} accuracy {100 * rec['accuracy']:5.1f}%  "
                    f"TPF {rec['tpf']:5.2f}  NFE {rec['mean_nfe']:5.1f}")
                records.append(rec)
    return records


def _cell(records: Sequence[Mapping[str, Any]], model: str, strategy: str,
          tau: float) -> Mapping[str, Any] | None:
    for r in records:
        if r["model"] == model and r["strategy"] == strategy and abs(r["threshold"] - tau) < 1e-9:
            return r
    return None


def headline(records: Sequence[Mapping[str, Any]], decode: DemoDecode = DEMO_DECODE) -> dict[str, Any] | None:
    """The paper's comparison: ``base`` + threshold at τ = 0.95 vs ``dmax`` + SPD at its τ_dec."""
    ref = _cell(records, "base", "threshold", decode.baseline_threshold)
    new = _cell(records, "dmax", "spd", decode.spd_threshold)
    if ref is None or new is None:
        return None
    return {"baseline": dict(ref), "dmax_spd": dict(new), "tpf_ratio": new["tpf"] / ref["tpf"],
            "accuracy_delta_points": 100 * (new["accuracy"] - ref["accuracy"])}


KEPT_ACCURACY_POINTS = 2.0  # "at kept accuracy": within this many points of base + threshold (τ = 0.95)
TARGET_TPF_RATIO = 2.5       # the issue's bar (the paper: 2.04 → 5.47 TPF on GSM8K, 2.7×)


def criterion(records: Sequence[Mapping[str, Any]],
              decode: DemoDecode = DEMO_DECODE) -> dict[str, Any] | None:
    """The paper's claim checked over the whole sweep: the fastest ``dmax`` + SPD cell whose accuracy is
    within ``KEPT_ACCURACY_POINTS`` of ``base`` + threshold at τ = 0.95, its TPF ratio against the
    target, and the accuracy ``base`` + SPD vs ``dmax`` + SPD keep at the most aggressive τ swept."""
    ref = _cell(records, "base", "threshold", decode.baseline_threshold)
    spd = {m: [r for r in records if r["model"] == m and r["strategy"] == "spd"] for m in MODEL_NAMES}
    if ref is None or not spd["dmax"]:
        return None
    kept = [r for r in spd["dmax"] if 100 * (r["accuracy"] - ref["accuracy"]) >= -KEPT_ACCURACY_POINTS]
    best = max(kept, key=lambda r: r["tpf"], default=None)
    out: dict[str, Any] = {"best_kept_dmax_spd": None if best is None else dict(best),
                           "tpf_ratio": None if best is None else best["tpf"] / ref["tpf"],
                           "target_tpf_ratio": TARGET_TPF_RATIO}
    out["met_tpf_target"] = out["tpf_ratio"] is not None and out["tpf_ratio"] >= TARGET_TPF_RATIO
    tau = min(r["threshold"] for r in spd["dmax"])
    base_aggr, dmax_aggr = _cell(records, "base", "spd", tau), _cell(records, "dmax", "spd", tau)
    if base_aggr is not None and dmax_aggr is not None:
        out["aggressive_tau"] = tau
        out["aggressive_accuracy_gap_points"] = 100 * (dmax_aggr["accuracy"] - base_aggr["accuracy"])
    return out


def results_markdown(records: Sequence[Mapping[str, Any]], decode: DemoDecode = DEMO_DECODE) -> str:
    """Paper-style table: one row per (model, decoder), one column per τ, cells "accuracy % / TPF"."""
    taus = sorted({r["threshold"] for r in records}, reverse=True)
    pairs = list(dict.fromkeys((r["model"], r["strategy"]) for r in records))
    n = max(r["samples"] for r in records)
    lines = [f"Accuracy (%) / TPF on {n} held-out problems (block {decode.block_length}, gen length "
             f"{decode.gen_length}, τ_acc {decode.accept_threshold} for SPD).", "",
             "| model | decoder | " + " | ".join(f"τ={t:g}" for t in taus) + " |",
             "|---|---|" + "---|" * len(taus)]
    for model, strategy in pairs:
        cells = []
        for t in taus:
            r = _cell(records, model, strategy, t)
            cells.append("—" if r is None else f"{100 * r['accuracy']:.1f} / {r['tpf']:.2f}")
        lines.append(f"| {model} | {strategy} | " + " | ".join(cells) + " |")
    h = headline(records, decode)
    if h is not None:
        b, d = h["baseline"], h["dmax_spd"]
        lines += ["", f"**Headline**: base + threshold (τ={b['threshold']:g}): {100 * b['accuracy']:.1f}% "
                      f"at TPF {b['tpf']:.2f} → dmax + SPD (τ={d['threshold']:g}): "
                      f"{100 * d['accuracy']:.1f}% at TPF {d['tpf']:.2f} — "
                      f"{h['tpf_ratio']:.2f}× tokens per forward, accuracy "
                      f"{h['accuracy_delta_points']:+.1f} points."]
    c = criterion(records, decode)
    if c is not None:
        best = c["best_kept_dmax_spd"]
        text = ("no dmax + SPD cell keeps accuracy" if best is None else
                f"fastest dmax + SPD cell within {KEPT_ACCURACY_POINTS:g} points of base + threshold "
                f"(τ={decode.baseline_threshold:g}): τ={best['threshold']:g}, "
                f"{100 * best['accuracy']:.1f}% at TPF {best['tpf']:.2f} = {c['tpf_ratio']:.2f}× "
                f"(target ≥ {TARGET_TPF_RATIO:g}×: "
                f"{'met' if c['met_tpf_target'] else 'not met'})")
        if "aggressive_tau" in c:
            text += (f"; at τ={c['aggressive_tau']:g} dmax + SPD is "
                     f"{c['aggressive_accuracy_gap_points']:+.1f} points vs base + SPD")
        lines += ["", f"**Criterion**: {text}."]
    return "\n".join(lines)


def plot_tradeoff(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy vs TPF, one line per (model, decoder) over τ (PNG via matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {("base", "threshold"): ("tab:blue", "o", "-"), ("base", "spd"): ("tab:blue", "s", "--"),
              ("dmax", "threshold"): ("tab:red", "o", "-"), ("dmax", "spd"): ("tab:red", "s", "--")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for pair in dict.fromkeys((r["model"], r["strategy"]) for r in records):
        pts = sorted((r for r in records if (r["model"], r["strategy"]) == pair),
                     key=lambda r: -r["threshold"])
        color, marker, ls = styles.get(pair, ("tab:gray", "^", ":"))
        ax.plot([r["tpf"] for r in pts], [100 * r["accuracy"] for r in pts], color=color, marker=marker,
                linestyle=ls, label=f"{pair[0]} + {pair[1]}")
        for r in pts:
            ax.annotate(f"{r['threshold']:g}", (r["tpf"], 100 * r["accuracy"]), textcoords="offset points",
                        xytext=(3, 3), fontsize=7, color=color)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Demo: accuracy vs parallelism over τ (labels)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_results(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                  decode: DemoDecode = DEMO_DECODE,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``results.md``, ``results.json`` and ``tradeoff.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(results_markdown(records, decode) + "\n", encoding="utf-8")
    js = out / "results.json"
    payload = {"decode": dataclasses.asdict(decode), "cells": list(records),
               "headline": headline(records, decode),
               "criterion": criterion(records, decode), **(dict(extra) if extra else {})}
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return {"markdown": md, "json": js, "plot": plot_tradeoff(records, out / "tradeoff.png")}


# ---- the quick OPUT run (``python train.py`` with no arguments) --------------------------------------------
def quick_config_path() -> Path:
    """``configs/demo_oput_quick.yaml`` of this checkout (configs are not part of the wheel)."""
    path = REPO_ROOT / "configs" / QUICK_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the quick demo runs from a source checkout")
    return path


def run_quick_demo(out_dir: str | os.PathLike = "runs/demo_quick", *, limit: int = 100,
                   overrides: Sequence[str] = (), distill_rows: int | None = None,
                   decode: DemoDecode = DEMO_DECODE, log: Any = print) -> dict[str, Any]:
    """OPUT-fine-tune the shipped ``base`` for a few CPU minutes with the project's training loop
    (``configs/demo_oput_quick.yaml``) on ``base``'s own answers to the config's train questions (the
    shipped ``dmax``'s recipe, see :func:`distill_file`; ``distill_rows`` of them, default all,
    0 = the gold answers), then decode ``limit`` held-out problems with base and the new fine-tune
    under threshold decoding (τ = 0.95) and SPD (τ_dec = ``decode.spd_threshold`` and 0), print the table
    and write it (``out_dir/eval``). Returns ``{"train_seconds", "records", "headline", ...}``.
    A second call with the same ``out_dir`` resumes the finished run instead of training again.
    """
    import time

    from dmax_jax.data.chat import load_tokenizer
    from dmax_jax.pretrained import Pretrained
    from dmax_jax.training.config import load_train_config
    from dmax_jax.training.loop import prepare_data, resolve_model_config, train

    out = Path(out_dir).absolute()
    base_dir = default_model_dir("base")
    base = load_demo_model("base")
    fixed = [f"model.source=hf:{base_dir}", f"model.tokenizer={base_dir}", f"run.out_dir={out / 'train'}"]
    cfg = load_train_config(quick_config_path(), [*fixed, *overrides])
    t0 = time.time()
    if distill_rows != 0:
        paths = prepare_data(cfg)[0].data.paths
        if len(paths) != 1:
            raise ValueError(f"quick demo: distillation needs one data path, got data.paths={list(paths)}")
        gold = paths[0]
        if distill_rows is None:
            with open(gold, encoding="utf-8") as f:
                n = sum(1 for _ in f)
        else:
            n = distill_rows
        log(f"quick demo: base answers {n} train questions (threshold decoding, τ = "
            f"{decode.baseline_threshold}) → the OPUT data")
        data = distill_file(base, gold, out / "distill", n, resume=True, log=log)
        cfg = load_train_config(quick_config_path(), [*fixed, f"data.paths=[{data}]", *overrides])
    log(f"quick demo: OPUT fine-tune of {base_dir} ({cfg.run.num_steps} steps, batch {cfg.data.batch_size}, "
        f"noise U({cfg.data.noise_low}, {cfg.data.noise_high})) → {out}")
    summary = train(cfg)
    train_seconds = time.time() - t0
    tuned = Pretrained(resolve_model_config(cfg), summary.state.params, load_tokenizer(base_dir))
    models = {"base": base, "dmax": tuned}
    # the paper's baseline cell, SPD at the demo's τ_dec and at the most aggressive τ_dec = 0
    spd_taus = tuple(dict.fromkeys((decode.spd_threshold, 0.0)))
    cells = (("threshold", (decode.baseline_threshold,)), ("spd", spd_taus))
    t1 = time.time()
    records = []
    rows = test_problems(limit)
    for strategy, taus in cells:
        records += evaluate_grid(models, rows, out_dir=out / "eval", strategies=(strategy,),
                                 thresholds=taus, decode=decode, log=log)
    eval_seconds = time.time() - t1
    paths = write_results(records, out / "eval", decode, extra={"train_seconds": round(train_seconds, 1),
                                                                "eval_seconds": round(eval_seconds, 1)})
    log("")
    log("'dmax' below is the fine-tune you just trained (the shipped one: dmax_jax/assets/demo/dmax).")
    log(results_markdown(records, decode))
    log(f"\ntrain {train_seconds:.0f}s, eval {eval_seconds:.0f}s; wrote {paths['markdown'].parent}")
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "records": records,
            "headline": headline(records, decode), "paths": paths, "summary": summary}
