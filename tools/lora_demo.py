"""LoRA OPUT of the shipped demo ``base`` at the shipped ``dmax``'s data and steps (issue 29, item 3a).

    python tools/lora_demo.py --out results/lora_int8/models/lora_r16 [--rank 16 --alpha 32
        --targets attention,mlp,shared --lr 2e-3 --work runs/lora_demo]

Same recipe as ``tools/build_demo.py``'s ``dmax`` stage (``dmax_jax/demo/configs/dmax.yaml``: 2,500 OPUT
steps of batch 16 on base's own answers to the first 8,000 train questions), with ``step.lora.rank`` set:
the base is frozen (``--base-dtype``, float32 by default like the demo's compute), only the adapters
train. Writes the merged model as an HF folder (plus ``dmax_decode.json``) to ``--out`` and the adapters
alone to ``--out/adapters``. The OPUT data are regenerated (task data + base's self-distillation) under
``--work`` unless they exist.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="merged HF model folder to write")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "lora_demo", help="run folders + OPUT data")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="attention,mlp,shared")
    ap.add_argument("--base-dtype", default="float32")
    ap.add_argument("--lr", type=float, default=2e-3, help="adapter learning rate (full OPUT: 5e-4)")
    ap.add_argument("--override", action="append", default=[], metavar="key=value")
    return ap.parse_args(argv)


def oput_data(work: Path) -> Path:
    """base's own answers to the first 8,000 train questions (``build_demo.py``'s distill stage)."""
    from dmax_jax.demo.data import generate_task_data
    from dmax_jax.demo.distill import distill_file
    from dmax_jax.demo.examples import ASSET_DIR

    train, _ = generate_task_data("generate:arith_small:30000", work / "base" / "task_data")
    return distill_file(Path(ASSET_DIR) / "base", train, work / "distill", 8000, resume=True, progress=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from dmax_jax.data.chat import load_tokenizer
    from dmax_jax.demo import config_path
    from dmax_jax.demo.examples import ASSET_DIR, write_decode_defaults
    from dmax_jax.pretrained import Pretrained
    from dmax_jax.training.config import load_train_config
    from dmax_jax.training.loop import resolve_model_config, train
    from dmax_jax.training.lora import export_params, save_adapters

    t0 = time.time()
    data = oput_data(args.work.absolute())
    base = Path(ASSET_DIR) / "base"
    run_dir = args.work.absolute() / args.out.name
    cfg = load_train_config(config_path("dmax.yaml"), [
        f"run.out_dir={run_dir}", f"model.source=hf:{base}", f"model.tokenizer={base}",
        f"data.paths=[{data}]",
        f"step.lora.rank={args.rank}", f"step.lora.alpha={args.alpha}", f"step.lora.targets=[{args.targets}]",
        f"step.lora.base_dtype={args.base_dtype}", f"optim.lr={args.lr}", "run.progress_bar=false",
        *args.override])
    summary = train(cfg)
    lora = cfg.step.lora
    params = jax.device_get(export_params(summary.state.params, lora))
    tok = load_tokenizer(str(base))
    Pretrained(resolve_model_config(cfg), params, tok).save_pretrained(args.out, overwrite=True)
    write_decode_defaults(args.out, "spd")
    save_adapters(summary.state.params, lora, args.out / "adapters")
    print(f"lora_demo: {args.out} (train loop {summary.seconds:.0f}s, total {time.time() - t0:.0f}s, "
          f"final loss {summary.final_metrics.get('loss')})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
