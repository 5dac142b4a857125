"""Decode prompts with a DMax / LLaDA2-MoE checkpoint: one JSON object per prompt.

    python decode.py                                   # the demo: base + threshold vs dmax + SPD
    python decode.py --model DIR --prompt "What is 2+3?" [--prompt ...] [--strategy spd]
    python decode.py --model DIR --prompts prompts.jsonl --out results.jsonl --html trace.html

Settings, lowest first: DecodeConfig defaults (dtype bfloat16 here), the model directory's
dmax_decode.json (prompt template + decode defaults; the shipped demo models have one), then the
flags given. --prompts is a JSONL file of {"prompt": ...} objects or bare JSON strings. Output
objects carry index, prompt, text, token_ids (cut at the first EOS), nfe, tokens (= len(token_ids)),
tokens_ref (the reference's count of non-EOS generated tokens), tpf (= tokens_ref / nfe), seconds
(the batch's decode time, compilation excluded) and compile_seconds (compilation for that batch, 0
when the program was cached). With --out results go to a temporary file renamed into place at the
end, so a failed run never leaves a half-written file. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# transformers serves tokenizers and configs here (no torch models): keep its torch advisory quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dmax_jax.cli import OneLineParser  # noqa: E402
from dmax_jax.decoding.cli_args import add_decode_args, config_error_line, flag_name, given_fields  # noqa: E402
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError  # noqa: E402

PROG = "decode.py"
CLI_DEFAULTS = DecodeConfig(dtype="bfloat16")
# The demo (no --model, no prompts) shows two fixed pairs at each model's own settings, so the
# strategy-specific knobs have no single meaning there: refused, never silently ignored.
DEMO_PAIRS = (("base", "threshold"), ("dmax", "spd"))
DEMO_REFUSED = ("strategy", "threshold", "accept_threshold", "steps", "top_k", "max_unroll", "expected_tpf")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = OneLineParser(prog=PROG, description="Decode prompts with Soft Parallel Decoding or a "
                                 "baseline. Without --model and prompts: the embedded demo, base + threshold "
                                 "decoding side by side with dmax + SPD on four held-out problems.")
    ap.add_argument("--model", help="HF model directory (config.json, *.safetensors, tokenizer; optional "
                    "dmax_decode.json). Default: the shipped demo model dmax")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    src.add_argument("--prompts", help="JSONL file: one {\"prompt\": ...} object (or JSON string) per line")
    ap.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (default: 1)")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap each prompt in the tokenizer's chat template (default: the model's "
                    "dmax_decode.json, else on)")
    ap.add_argument("--out", help="write JSONL here instead of stdout")
    ap.add_argument("--html", help="write the decoding trace of every prompt as one HTML page")
    add_decode_args(ap, CLI_DEFAULTS, group_title="decoding (a model's dmax_decode.json overrides these "
                    "defaults; flags override both)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts is None:
        if not args.prompt:
            raise ValueError("give at least one --prompt or a --prompts FILE.jsonl")
        return list(args.prompt)
    from dmax_jax.eval.benchmarks import read_jsonl

    out = []
    for n, obj in read_jsonl(args.prompts, objects_only=False):
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise ValueError(f"{args.prompts}:{n}: expected a JSON string or an object with a "
                             "string 'prompt'")
        out.append(text)
    return out


def check_model_dir(path: str | os.PathLike) -> Path:
    """The cheap checks (exists, a directory, not empty, has config.json) before anything loads."""
    from dmax_jax.pretrained import check_model_dir as check

    try:
        return check(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model: {e}") from None


def model_settings(model_dir: Path, args: argparse.Namespace, fixed: dict[str, Any] | None = None):
    """``(DecodeConfig, prompt template defaults or None, chat)`` for one model: the layering of the
    module doc; a bad value names its flag (or the file that set it)."""
    from dmax_jax.decoding.model_defaults import ModelDecodeDefaults, load_model_defaults

    defaults = load_model_defaults(model_dir)
    flags = {**given_fields(args), **(fixed or {})}
    try:
        cfg = (defaults or ModelDecodeDefaults()).config(CLI_DEFAULTS, flags)
    except DecodeConfigError as e:
        if e.field in flags or defaults is None:
            raise ValueError(config_error_line(e, PROG).split(": error: ", 1)[1]) from None
        raise ValueError(f"{defaults.path}: {e}") from None
    chat = args.chat if args.chat is not None else (defaults.chat if defaults else True)
    return cfg, defaults, chat


def encode_prompts(texts: list[str], tokenizer, chat: bool, defaults=None) -> list[list[int]]:
    from dmax_jax.data.chat import apply_chat_template, encode

    wrapped = [defaults.wrap(t) for t in texts] if defaults is not None else list(texts)
    if chat:
        return [apply_chat_template(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
                for t in wrapped]
    return [encode(tokenizer, t) for t in wrapped]


def load_model(model_dir: Path, cfg: DecodeConfig):
    import dmax_jax
    from dmax_jax.model.quant import quantize_model

    # --weights int8: quantized once here; each batch's generate call then reads the int8 tree as is
    model = quantize_model(dmax_jax.load_pretrained(model_dir, dtype=cfg.dtype), cfg.weights)
    if model.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; decode.py needs one to encode prompts")
    return model


def decode_texts(model, texts: list[str], cfg: DecodeConfig, *, chat: bool, defaults, batch_size: int,
                 trace: bool, desc: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """Validate every prompt first (errors name the prompt number), then decode in batches: one
    output dict per prompt and the traces (if ``trace``)."""
    from tqdm import tqdm

    from dmax_jax.data.chat import resolve_special_ids
    from dmax_jax.decoding import buckets, generate

    ids = resolve_special_ids(model.config, model.tokenizer, strict=False)
    prompts = encode_prompts(texts, model.tokenizer, chat, defaults)
    buckets.validate_prompts(prompts, vocab_size=model.config.vocab_size, mask_id=ids.mask_id,
                             gen_length=cfg.gen_length, block=cfg.block_length,
                             max_positions=model.config.max_position_embeddings)
    cfg = cfg.replace(mask_id=ids.mask_id, eos_id=ids.eos_id, trace=trace)
    rows, traces = [], []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr)
    for lo in range(0, len(prompts), batch_size):
        batch = prompts[lo:lo + batch_size]
        res = generate(model, batch, cfg, batch_size=batch_size, request_ids=list(range(lo, lo + len(batch))))
        for j, toks in enumerate(res.token_ids):
            rows.append({"index": lo + j, "prompt": texts[lo + j],
                         "text": model.tokenizer.decode(toks, skip_special_tokens=True), "token_ids": toks,
                         "nfe": res.nfe[j], "tokens": res.tokens[j], "tokens_ref": res.tokens_ref[j],
                         "tpf": res.tpf[j], "seconds": res.seconds, "compile_seconds": res.compile_seconds})
        traces.extend(res.trace or [])
        bar.update(len(batch))
    bar.close()
    return rows, traces


class AtomicJsonl:
    """``--out`` written to a temporary file renamed into place by :meth:`commit` (or stdout)."""

    def __init__(self, path: str | None):
        self.path, self.tmp, self.f = path, None, sys.stdout
        if path:
            out_dir = os.path.dirname(os.path.abspath(path))
            os.makedirs(out_dir, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=".decode-", suffix=".jsonl", dir=out_dir)
            self.f = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        if self.tmp is not None:
            self.f.close()
            os.replace(self.tmp, self.path)
            self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.f.close()
            os.unlink(self.tmp)
            self.tmp = None


def check_out_paths(args: argparse.Namespace) -> None:
    """Both outputs writable before any model loads (a decode must not end in an unwritable path)."""
    from dmax_jax.cli import check_writable

    for flag, path in (("--out", args.out), ("--html", args.html)):
        if path:
            check_writable(flag, path)


def write_html(path: str, write) -> None:
    """Write the trace page (after ``--out`` is committed: a failure here loses no results) and say
    where it went; an error names the flag."""
    try:
        write(path)
    except OSError as e:
        raise ValueError(f"--html {path}: cannot write the page ({e.strerror or e}); the decoded results "
                         "were kept") from None
    print(f"{PROG}: wrote the decoding trace page to {os.path.abspath(path)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out_paths(args)
        if args.model is None and not args.prompt and args.prompts is None:
            return run_demo(args)
        if args.model is None:  # prompts but no model: the shipped tiny DMax
            from dmax_jax.demo import default_model_dir

            args.model = str(default_model_dir("dmax"))
        model_dir = check_model_dir(args.model)       # the model is named before the prompts are asked for
        texts = read_prompts(args)
        cfg, defaults, chat = model_settings(model_dir, args)
        return run(args, model_dir, texts, cfg, defaults, chat)
    except (ValueError, OSError) as e:  # OSError: missing files, unreadable paths
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, model_dir: Path, texts: list[str], cfg: DecodeConfig, defaults,
        chat: bool) -> int:
    model = load_model(model_dir, cfg)
    out = AtomicJsonl(args.out)
    try:
        rows, traces = decode_texts(model, texts, cfg, chat=chat, defaults=defaults,
                                    batch_size=args.batch_size, trace=args.html is not None,
                                    desc=f"decode ({cfg.strategy})")
        for row in rows:
            out.write(row)
        out.commit()
    finally:
        out.discard()
    if args.html:
        from dmax_jax.viz.html import write_trace_html

        write_html(args.html, lambda p: write_trace_html(p, traces, model.tokenizer, prompt_text=texts,
                                                         title=f"DMax decoding trace ({cfg.strategy})"))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """No --model and no prompts: the held-out example problems, decoded by base + threshold decoding
    and by dmax + SPD at each model's own dmax_decode.json settings, side by side (stdout); --out gets
    one JSON object per (model, problem), --html one page with every trace."""
    refused = [f for f in DEMO_REFUSED if f in given_fields(args)]
    if refused:
        raise ValueError(f"{flag_name(refused[0])} has no single meaning in the demo, which compares base + "
                         "threshold decoding with dmax + SPD at each model's own settings; pass --model DIR "
                         "or --prompt TEXT to choose a decoder")
    print(f"{PROG}: no --model given: the embedded demo models decode {N_EXAMPLES} held-out problems; pass "
          "--model DIR (and --prompt) for a real checkpoint", file=sys.stderr)
    results, traces = decode_demo_pairs(args)
    out = AtomicJsonl(args.out) if args.out else None
    try:
        if out is not None:
            for row in results:
                out.write(row)
            out.commit()
    finally:
        if out is not None:
            out.discard()
    print(format_pairs(results))
    if args.html:
        write_html(args.html, lambda p: write_demo_html(p, traces))
    return 0


N_EXAMPLES = 4


def decode_demo_pairs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[tuple]]:
    """Every ``DEMO_PAIRS`` (model, strategy) over the first ``N_EXAMPLES`` held-out problems, scored
    strictly: right when the last ``#### N`` line is the gold number (``correct_reference``: the
    reference's top-2 GSM8K checker, which the evaluation tables use)."""
    from dmax_jax.demo import default_model_dir, test_problems
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.extract import canonicalize, final_answer

    bench = get_benchmark("gsm8k")
    problems = test_problems(N_EXAMPLES)
    questions = [p["question"] for p in problems]
    settings = []  # every pair's settings are checked before anything is loaded
    for name, strategy in DEMO_PAIRS:
        model_dir = default_model_dir(name)
        cfg, defaults, chat = model_settings(model_dir, args, fixed={"strategy": strategy})
        if defaults is None:
            raise FileNotFoundError(f"shipped demo model {model_dir} has no dmax_decode.json")
        settings.append((name, strategy, model_dir, cfg, defaults, chat))
    results, traces = [], []
    for name, strategy, model_dir, cfg, defaults, chat in settings:
        model = load_model(model_dir, cfg)
        rows, tr = decode_texts(model, questions, cfg, chat=chat, defaults=defaults,
                                batch_size=args.batch_size, trace=args.html is not None,
                                desc=f"{name} + {strategy}")
        for row, prob in zip(rows, problems):
            answer, gold = final_answer(row["text"]), bench.gold(prob)
            row.update(model=name, strategy=strategy, threshold=cfg.threshold, gold=gold, answer=answer,
                       correct=answer is not None and canonicalize(answer) == canonicalize(gold),
                       correct_reference=bool(bench.score(row["text"], prob).correct))
        results.extend(rows)
        traces.append((f"{name} + {strategy} (tau {cfg.threshold:g})", model.tokenizer, questions, tr))
    return results, traces


def write_demo_html(path: str, traces: list[tuple]) -> None:
    """One page with the traces of every pair (the demo models share one tokenizer; checked)."""
    from dmax_jax.viz.html import write_trace_html

    vocab = traces[0][1].get_vocab()
    if any(t[1].get_vocab() != vocab for t in traces[1:]):
        raise ValueError("--html: the demo models have different tokenizers; one page needs one")
    rows = [tr for _, _, _, trs in traces for tr in trs]
    prompts = [f"[{label}] {q}" for label, _, qs, _ in traces for q in qs]
    write_trace_html(path, rows, traces[0][1], prompt_text=prompts,
                     title="DMax demo: base + threshold decoding vs dmax + SPD")


def format_pairs(results: list[dict[str, Any]]) -> str:
    """Per problem one line per pair (answer, right/wrong, NFE, TPF); then accuracy and mean TPF."""
    pairs = list(dict.fromkeys((r["model"], r["strategy"]) for r in results))
    label = {p: f"{p[0]} + {p[1]}" for p in pairs}
    width = max(len(v) for v in label.values())
    lines = []
    for i in sorted({r["index"] for r in results}):
        rows = [r for r in results if r["index"] == i]
        lines.append(f"[{i}] {rows[0]['prompt']}")
        for r in rows:
            mark = "right" if r["correct"] else f"wrong (gold {r['gold']})"
            answer = " | ".join(line.strip() for line in r["text"].strip().splitlines()) or "(empty)"
            lines.append(f"  {label[(r['model'], r['strategy'])]:<{width}}  answer {r['answer'] or '-':>4}  "
                         f"{mark:<16} NFE {r['nfe']:>3}  TPF {r['tpf']:5.2f}  {answer}")
        lines.append("")
    means = {}
    for p in pairs:
        rows = [r for r in results if (r["model"], r["strategy"]) == p]
        means[p] = sum(r["tpf"] for r in rows) / len(rows)
        lines.append(f"{label[p]:<{width}}  {sum(r['correct'] for r in rows)}/{len(rows)} right, "
                     f"mean TPF {means[p]:.2f} (tau {rows[0]['threshold']:g})")
    if len(pairs) == 2 and means[pairs[0]] > 0:
        lines.append(f"{label[pairs[1]]} decodes {means[pairs[1]] / means[pairs[0]]:.2f}x the tokens per "
                     f"forward of {label[pairs[0]]} on these problems")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
