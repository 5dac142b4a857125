"""The quick OPUT demo (``python train.py`` with no arguments): fine-tune the shipped ``base`` for a few
CPU minutes with the project's training loop, then evaluate it against ``base`` and print one table.

Why it exists: the paper's claim (an OPUT fine-tune decodes many more tokens per forward with Soft
Parallel Decoding at kept accuracy) should be visible on a laptop in minutes, with the error bar its
100 problems allow.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmax_jax.demo.examples import DEMO_DECODE, DemoDecode, default_model_dir, load_demo_model, test_problems

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: the demo's training recipes
QUICK_CONFIG = "oput_quick.yaml"
QUICK_MODEL = "dmax_quick"   # the fine-tune's folder under out_dir, named apart from the shipped dmax


def config_path(name: str) -> Path:
    """One of the demo's training configs (``base.yaml``, ``dmax.yaml``, ``oput_quick.yaml``)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"demo config {path} not found (the demo ships {known})")
    return path


def quick_config_path() -> Path:
    """The quick demo's training config (``dmax_jax/demo/configs/oput_quick.yaml``)."""
    return config_path(QUICK_CONFIG)


def _distilled_data(cfg: Any, base: Any, out: Path, distill_rows: int | None, log: Any) -> str:
    """The OPUT data: ``base``'s own answers to the config's generated train questions."""
    from dmax_jax.demo.data import materialize
    from dmax_jax.demo.distill import distill_file

    paths = materialize(cfg).data.paths
    if len(paths) != 1:
        raise ValueError(f"quick demo: distillation needs one data path, got data.paths={list(paths)}")
    gold = paths[0]
    if distill_rows is None:
        with open(gold, encoding="utf-8") as f:
            n = sum(1 for _ in f)
    else:
        n = distill_rows
    log(f"quick demo: 1/3 base answers {n} train questions (threshold decoding, τ = "
        f"{DEMO_DECODE.baseline_threshold}) → the OPUT data")
    return str(distill_file(base, gold, out / "distill", n, resume=True, log=None))


def write_model_folder(model: Any, path: Path) -> Path:
    """The fine-tune as an HF folder that ``decode.py --model`` / the server load: weights, config,
    tokenizer and the shipped ``dmax``'s ``dmax_decode.json`` (the demo's prompt format and SPD
    settings, which this fine-tune shares)."""
    model.save_pretrained(path)
    shutil.copyfile(default_model_dir("dmax") / "dmax_decode.json", path / "dmax_decode.json")
    return path


def run_quick_demo(out_dir: str | os.PathLike = "runs/demo_quick", *, limit: int = 100,
                   overrides: Sequence[str] = (), distill_rows: int | None = None,
                   decode: DemoDecode = DEMO_DECODE, log: Any = print) -> dict[str, Any]:
    """OPUT-fine-tune the shipped ``base`` (``configs/oput_quick.yaml``) on ``base``'s own answers to the
    config's train questions (the shipped ``dmax``'s recipe; ``distill_rows`` of them, default all,
    0 = the gold answers), then decode ``limit`` held-out problems with base and the new fine-tune
    under threshold decoding (τ = 0.95) and SPD (τ_dec = ``decode.spd_threshold`` and 0), print one
    table with 95 % intervals and write it (``out_dir/eval``); the fine-tune goes to
    ``out_dir/dmax_quick`` as an HF folder.
    Returns ``{"train_seconds", "eval_seconds", "records", "headline", "paths", "summary"}``.
    A second call with the same ``out_dir`` and config resumes the finished run instead of training again.
    """
    from dmax_jax.data.chat import load_tokenizer
    from dmax_jax.demo.data import materialize
    from dmax_jax.demo.grid import evaluate_grid, headline, results_markdown, write_results
    from dmax_jax.pretrained import Pretrained
    from dmax_jax.training.config import load_train_config
    from dmax_jax.training.loop import resolve_model_config, train

    out = Path(out_dir).absolute()
    base_dir = default_model_dir("base")
    base = load_demo_model("base")
    fixed = [f"model.source=hf:{base_dir}", f"model.tokenizer={base_dir}", f"run.out_dir={out / 'train'}"]
    cfg = load_train_config(quick_config_path(), [*fixed, *overrides])
    t0 = time.time()
    if distill_rows != 0:
        data = _distilled_data(cfg, base, out, distill_rows, log)
        cfg = load_train_config(quick_config_path(), [*fixed, f"data.paths=[{data}]", *overrides])
    cfg = materialize(cfg)
    log(f"quick demo: 2/3 OPUT fine-tune of {base_dir} ({cfg.run.num_steps} steps, batch "
        f"{cfg.data.batch_size}, noise U({cfg.data.noise_low}, {cfg.data.noise_high})) → {out}")
    summary = train(cfg)
    train_seconds = time.time() - t0
    tuned = Pretrained(resolve_model_config(cfg), summary.state.params, load_tokenizer(base_dir))
    model_dir = write_model_folder(tuned, out / QUICK_MODEL)
    models = {"base": base, "dmax": tuned}
    # the paper's baseline cell, SPD at the demo's τ_dec and at the most aggressive τ_dec = 0
    spd_taus = tuple(dict.fromkeys((decode.spd_threshold, 0.0)))
    log(f"quick demo: 3/3 decoding {limit} held-out problems with base and the fine-tune")
    t1 = time.time()
    records = []
    rows = test_problems(limit)
    for strategy, taus in (("threshold", (decode.baseline_threshold,)), ("spd", spd_taus)):
        records += evaluate_grid(models, rows, out_dir=out / "eval", strategies=(strategy,),
                                 thresholds=taus, decode=decode, progress=log is not None)
    eval_seconds = time.time() - t1
    paths = write_results(records, out / "eval", decode, extra={"train_seconds": round(train_seconds, 1),
                                                                "eval_seconds": round(eval_seconds, 1)})
    log("")
    log(f"'dmax' below is {QUICK_MODEL}, the fine-tune you just trained (not the shipped "
        f"dmax_jax/assets/demo/dmax); {limit} problems, so accuracies carry ± several points "
        "(tools/eval_demo.py evaluates 1,000).")
    log(results_markdown(records, decode))
    log(f"\ntrain {train_seconds:.0f}s, eval {eval_seconds:.0f}s; wrote {paths['markdown'].parent}")
    log(f"your fine-tune {QUICK_MODEL} is an HF folder: python decode.py --model {model_dir} --prompt "
        "\"Ella is 8 years old. Liam is 4 times as old as Ella. How old is Liam?\"")
    return {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "records": records,
            "headline": headline(records, decode), "paths": paths, "summary": summary}
