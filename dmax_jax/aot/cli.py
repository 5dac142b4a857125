"""The ``python -m dmax_jax.aot`` command line: flags → ``compile_program`` → report (stdout, --json)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmax_jax.cli import OneLineParser, OutputPathError, check_writable, error_line

PROG = "python -m dmax_jax.aot"


def build_parser() -> argparse.ArgumentParser:
    from dmax_jax.aot.programs import PROGRAMS  # noqa: PLC0415
    from dmax_jax.aot.targets import TARGETS  # noqa: PLC0415

    ap = OneLineParser(prog=PROG, description="Compile a program for a chip with no chip attached "
                       "(the chip's own compiler) and report its memory plan and kernels.")
    ap.add_argument("--target", required=True, choices=sorted(TARGETS), help="the chip")
    ap.add_argument("--topology", default=None,
                    help="GPU: SLICESxHOSTSxDEVICES (1x1x8); TPU: CHIP:AxBxC (v5p:2x2x2); default per chip")
    ap.add_argument("--program", required=True, choices=PROGRAMS)
    ap.add_argument("--config", default=None, help="train YAML (train program; optional otherwise)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="train config overrides")
    ap.add_argument("--model", default=None,
                    help="DIR (an HF folder: its config.json) or preset:NAME; default: the config's "
                    "model.source, or preset:dmax_16b for generate/engine without --config")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="train rows per step (default: data.batch_size x the topology's hosts)")
    ap.add_argument("--mesh", default=None,
                    help="generate/engine mesh, e.g. expert=4 or tensor=2,expert=4 "
                    "(default: expert over all devices)")
    ap.add_argument("--batch", type=int, default=1, help="generate: rows decoded together")
    ap.add_argument("--prompt-len", type=int, default=256, help="generate/engine: prompt tokens per row")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--strategy", default="spd", choices=("spd", "threshold", "llada2"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="generate/engine weights and compute")
    ap.add_argument("--weights", default="native", choices=("native", "int8"),
                    help="generate/engine: weights as --dtype (native) or int8 weight-only with per-channel "
                         "scales (DecodeConfig.weights)")
    ap.add_argument("--max-batch", type=int, default=16, help="engine: slots")
    ap.add_argument("--capacity", type=int, default=None,
                    help="engine: positions per slot (default prompt-len + gen-length)")
    ap.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    return ap


def _positive(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    counts = ("batch", "prompt_len", "gen_length", "block_length", "max_batch", "capacity", "global_batch")
    for name in counts:
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"argument --{name.replace('_', '-')}: must be >= 1, got {v}")
    if args.overrides and args.config is None:
        ap.error(f"key=value overrides ({args.overrides[0]}) need --config")
    if args.program == "train" and args.weights != "native":
        ap.error("--weights int8 applies to the generate / engine programs (LoRA OPUT's base: step.lora)")
    if args.program == "train" and args.config is None:
        ap.error("--program train needs --config (a train YAML, e.g. configs/llada2_mini_oput.yaml)")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _positive(ap, args)
    try:
        if args.json:
            check_writable("--json", args.json)
        from dmax_jax.aot import compile_program  # noqa: PLC0415  (imports JAX and the model)
        from dmax_jax.aot.report import dumps  # noqa: PLC0415

        report = compile_program(
            target=args.target, topology=args.topology, program=args.program, config=args.config,
            overrides=args.overrides, model=args.model, global_batch=args.global_batch, mesh=args.mesh,
            batch=args.batch, prompt_len=args.prompt_len, gen_length=args.gen_length,
            block_length=args.block_length, strategy=args.strategy, dtype=args.dtype,
            max_batch=args.max_batch, capacity=args.capacity, weights=args.weights)
    except (OutputPathError, ValueError, FileNotFoundError) as e:
        print(error_line(PROG, str(e).splitlines()[0] if str(e) else type(e).__name__), file=sys.stderr)
        return 2
    except RuntimeError as e:  # KernelFallbackError: the program is not the chip's program
        if type(e).__name__ != "KernelFallbackError":
            raise
        print(error_line(PROG, str(e)), file=sys.stderr)
        return 1
    text = dumps(report)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
