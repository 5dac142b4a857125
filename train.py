"""Train DMax (OPUT) with JAX: ``python train.py --config configs/X.yaml [key.path=value ...]``.

With no arguments it runs the embedded demo: a short OPUT fine-tune of the shipped tiny ``base`` model
on CPU (``configs/demo_oput_quick.yaml``, a few minutes), then evaluates it against ``base`` and prints
the paper-style table (``dmax_jax.demo.run_quick_demo``). ``--config configs/tiny.yaml`` trains a tiny
random model instead. Overrides use dotted keys and YAML values, e.g. ``run.num_steps=20``,
``data.paths=[a.jsonl,b.jsonl]``, ``model.source=hf:/ckpt/LLaDA2.0-mini``. A run resumes from the
newest checkpoint in ``run.out_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# transformers serves tokenizers and configs here (no torch models): keep its torch advisory quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="overrides: key.path=value (YAML value), applied in order")
    parser.add_argument("--config", type=Path, default=None,
                        help="training YAML (default: configs/tiny.yaml)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (one process per host on a pod)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key.path=value, got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config is None and not args.overrides and not args.print_config:
        return run_embedded_demo()
    if args.config is None:
        args.config = DEFAULT_CONFIG
        print(f"train.py: no --config given; running the tiny CPU preset {args.config}", flush=True)
    import yaml

    from dmax_jax.training.config import TrainConfigError, load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except (TrainConfigError, FileNotFoundError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from dmax_jax.training.loop import NonFiniteLossError, train

    try:
        summary = train(cfg)
    except TrainConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 3
    loss = summary.final_metrics.get("loss")
    print(f"done: steps {summary.start_step} → {summary.final_step} in {summary.seconds:.1f}s; "
          f"final loss {loss if loss is None else f'{loss:.4f}'}; checkpoint {summary.last_checkpoint_step} "
          f"in {summary.checkpoint_dir}"
          + (f"; HF export {summary.hf_export_dir}" if summary.hf_export_dir else ""))
    return 0


def run_embedded_demo() -> int:
    """``python train.py``: OPUT fine-tune of the shipped demo ``base``, evaluated and tabulated."""
    from dmax_jax.demo import run_quick_demo

    print("train.py: no --config given; running the embedded demo (OPUT fine-tune of the shipped tiny "
          "base model, then evaluation); see README", flush=True)
    try:
        run_quick_demo()
    except FileNotFoundError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
