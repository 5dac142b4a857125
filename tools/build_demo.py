"""Rebuild the two shipped demo models from scratch with the project's training loop, then evaluate.

    python tools/build_demo.py [--work runs/build_demo] [--assets dmax_jax/assets/demo] [--eval-limit N]

Stages (each timed; the times go to ``WORK/build_times.json``):
1. data + tokenizer: ``dmax_jax/demo/configs/base.yaml`` names ``generate:arith_small:N``; the demo's
   data step writes the train problems (chat rows, algorithm §5.4 prompt) and trains the task BPE (768
   tokens, numbers whole) under ``WORK/base/task_data``;
2. ``base``: block-diffusion masked-diffusion pretraining from a random init (step mode "mdm",
   ``[noisy | clean]`` layout, noise ratio drawn per sequence) → ``ASSETS/base``;
3. trajectories: ``base`` decodes the first ``--distill-rows`` train questions (threshold decoding,
   τ = 0.95); its own answers replace the gold ones, as DMax's OPUT data are LLaDA2.0-mini's own
   generations (algorithm §3) → ``WORK/distill/train.jsonl`` (``--distill-rows 0``: gold answers);
4. ``dmax``: OPUT fine-tune of ``base`` (step mode "oput", flag-duplicated rows, algorithm §3-4) on those
   rows → ``ASSETS/dmax``;
5. evaluation: ``tools/eval_demo.py`` over the held-out split → ``--results`` (table, json, plot).
Existing run folders are removed first (a rebuild never resumes a stale run) unless ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


DISTILL_ROWS = 8000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "build_demo",
                    help="run folders (checkpoints)")
    ap.add_argument("--assets", type=Path, default=ROOT / "dmax_jax" / "assets" / "demo",
                    help="where the HF model folders base/ and dmax/ are written")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "demo", help="evaluation output")
    ap.add_argument("--base-config", type=Path, default=None,
                    help="base pretraining YAML (default: dmax_jax/demo/configs/base.yaml)")
    ap.add_argument("--dmax-config", type=Path, default=None,
                    help="OPUT fine-tune YAML (default: dmax_jax/demo/configs/dmax.yaml)")
    ap.add_argument("--base-override", action="append", default=[], metavar="key=value",
                    help="override for the base pretraining config (repeatable)")
    ap.add_argument("--dmax-override", action="append", default=[], metavar="key=value",
                    help="override for the OPUT fine-tune config (repeatable)")
    ap.add_argument("--skip-base", action="store_true", help="reuse ASSETS/base (only fine-tune + evaluate)")
    ap.add_argument("--distill-rows", type=int, default=DISTILL_ROWS,
                    help="train questions answered by base for the OPUT data "
                         "(0: gold answers; default %(default)s)")
    ap.add_argument("--skip-eval", action="store_true", help="do not run the evaluation")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate only the first N held-out problems (default: all 1,000, as results/demo)")
    ap.add_argument("--resume", action="store_true",
                    help="keep existing run folders (resume their checkpoints)")
    args = ap.parse_args(argv)
    from dmax_jax.demo import config_path

    args.base_config = args.base_config or config_path("base.yaml")
    args.dmax_config = args.dmax_config or config_path("dmax.yaml")
    return args


def _fresh(path: Path, resume: bool) -> None:
    if path.exists() and not resume:
        shutil.rmtree(path)


def run_stage(config: Path, overrides: list[str]):
    """Train with the project loop; returns ``(summary, model_config, tokenizer)``."""
    from dmax_jax.data.chat import load_tokenizer
    from dmax_jax.demo.data import materialize
    from dmax_jax.training.config import load_train_config
    from dmax_jax.training.loop import resolve_model_config, train

    cfg = materialize(load_train_config(config, overrides))  # generate: data → files (the demo's data step)
    summary = train(cfg)
    return summary, resolve_model_config(cfg), load_tokenizer(cfg.model.tokenizer or cfg.model.location)


def export(summary, model_config, tokenizer, out: Path, strategy: str) -> Path:
    """Write the final params as an HF folder (float32 safetensors + config + tokenizer + the demo's
    dmax_decode.json)."""
    import jax

    from dmax_jax.demo.examples import write_decode_defaults
    from dmax_jax.pretrained import Pretrained

    params = jax.device_get(summary.state.params)
    Pretrained(model_config, params, tokenizer).save_pretrained(out, overwrite=True)
    write_decode_defaults(out, strategy)  # the prompt format and decode geometry travel with the model
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work, assets = args.work.absolute(), args.assets.absolute()
    times: dict[str, float] = {}
    t_all = time.time()

    base_run = work / "base"
    if not args.skip_base:
        _fresh(base_run, args.resume)
        t0 = time.time()
        summary, mcfg, tok = run_stage(args.base_config, [f"run.out_dir={base_run}", *args.base_override])
        export(summary, mcfg, tok, assets / "base", "threshold")
        times["base_pretrain_s"] = round(time.time() - t0, 1)
        times["base_train_loop_s"] = round(summary.seconds, 1)
        print(f"build_demo: base → {assets / 'base'} ({times['base_pretrain_s']:.0f}s, final loss "
              f"{summary.final_metrics.get('loss')})", flush=True)
    train_file = base_run / "task_data" / "train.jsonl"
    if not train_file.is_file():
        raise FileNotFoundError(f"{train_file} is missing: run without --skip-base "
                                "(the base stage writes it)")

    if args.distill_rows > 0:
        t0 = time.time()
        from dmax_jax.demo.distill import distill_file

        train_file = distill_file(assets / "base", train_file, work / "distill", args.distill_rows,
                                  resume=args.resume)
        times["distill_s"] = round(time.time() - t0, 1)

    dmax_run = work / "dmax"
    _fresh(dmax_run, args.resume)
    t0 = time.time()
    summary, mcfg, tok = run_stage(args.dmax_config, [
        f"run.out_dir={dmax_run}", f"model.source=hf:{assets / 'base'}", f"model.tokenizer={assets / 'base'}",
        f"data.paths=[{train_file}]", *args.dmax_override])
    export(summary, mcfg, tok, assets / "dmax", "spd")
    times["dmax_oput_s"] = round(time.time() - t0, 1)
    times["dmax_train_loop_s"] = round(summary.seconds, 1)
    print(f"build_demo: dmax → {assets / 'dmax'} ({times['dmax_oput_s']:.0f}s, final loss "
          f"{summary.final_metrics.get('loss')})", flush=True)

    if not args.skip_eval:
        import eval_demo  # tools/ is on sys.path when this file runs as a script

        t0 = time.time()
        eval_argv = ["--out", str(args.results), "--model", f"base={assets / 'base'}",
                     "--model", f"dmax={assets / 'dmax'}"]
        if args.eval_limit is not None:
            eval_argv += ["--limit", str(args.eval_limit)]
        eval_demo.main(eval_argv)
        times["eval_s"] = round(time.time() - t0, 1)
    times["total_s"] = round(time.time() - t_all, 1)
    work.mkdir(parents=True, exist_ok=True)
    (work / "build_times.json").write_text(json.dumps(times, indent=2) + "\n")
    print("build_demo: times (s) " + json.dumps(times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
