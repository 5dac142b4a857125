"""Decode prompts with a DMax / LLaDA2-MoE checkpoint: one JSON object per prompt.

    python decode.py --model DIR --prompt "What is 2+3?" [--prompt ...] [--strategy spd]
    python decode.py --model DIR --prompts prompts.jsonl --out results.jsonl --html trace.html

``--prompts`` is a JSONL file whose lines are objects with a ``"prompt"`` string (or bare JSON
strings). Output objects carry ``index`` (prompt number), ``prompt``, ``text``, ``token_ids`` (cut at
the first EOS), ``nfe``, ``tokens`` (= len(token_ids)), ``tokens_ref`` (the reference's count of
non-EOS generated tokens), ``tpf`` (= tokens_ref / nfe) and ``seconds`` (the batch's decode time).
With ``--out`` results go to a temporary file renamed into place at the end, so a failed run never
leaves a half-written file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

# transformers serves tokenizers and configs here (no torch models): keep its torch advisory quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dmax_jax.decoding.cli_args import add_decode_args, decode_config_from_args  # noqa: E402
from dmax_jax.decoding.config import DecodeConfig  # noqa: E402

CLI_DEFAULTS = DecodeConfig(dtype="bfloat16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Decode prompts with Soft Parallel Decoding or a baseline.")
    ap.add_argument("--model", help="HF model directory (config.json, *.safetensors, tokenizer)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    src.add_argument("--prompts", help="JSONL file: one {\"prompt\": ...} object (or JSON string) per line")
    ap.add_argument("--batch-size", type=int, default=1)
    add_decode_args(ap, CLI_DEFAULTS)
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                    help="wrap each prompt in the tokenizer's chat template (default on)")
    ap.add_argument("--out", help="write JSONL here instead of stdout")
    ap.add_argument("--html", help="write the decoding trace of every prompt as one HTML page")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    args.config = decode_config_from_args(args, CLI_DEFAULTS, prog="decode.py")
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


def encode_prompts(texts: list[str], tokenizer, chat: bool) -> list[list[int]]:
    from dmax_jax.data.chat import apply_chat_template, encode

    if chat:
        return [apply_chat_template(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
                for t in texts]
    return [encode(tokenizer, t) for t in texts]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.model is None and not args.prompt and args.prompts is None:
            return run_demo(args)
        texts = read_prompts(args)
        if args.model is None:  # prompts but no model: the shipped tiny DMax
            from dmax_jax.demo import default_model_dir

            args.model = str(default_model_dir("dmax"))
        return run(args, texts)
    except (ValueError, FileNotFoundError) as e:
        print(f"decode.py: error: {e}", file=sys.stderr)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    """No --model and no prompts: decode a few held-out demo problems with the shipped tiny DMax model
    (the demo's own block/generation geometry) and print answers with NFE and TPF."""
    from dmax_jax.demo import decode_examples, default_model_dir, format_examples

    strategy = args.strategy or "spd"
    print(f"decode.py: no --model given: decoding 4 held-out problems with the embedded demo model "
          f"{default_model_dir('dmax')} ({strategy}); pass --model DIR for a real checkpoint",
          file=sys.stderr)
    print(format_examples(decode_examples("dmax", n=4, strategy=strategy, threshold=args.threshold)))
    return 0


def run(args: argparse.Namespace, texts: list[str]) -> int:
    from tqdm import tqdm

    import dmax_jax
    from dmax_jax.data.chat import resolve_special_ids
    from dmax_jax.decoding import buckets, generate

    cfg = args.config
    model = dmax_jax.load_pretrained(args.model, dtype=cfg.dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; decode.py needs one to encode prompts")
    ids = resolve_special_ids(model.config, model.tokenizer, strict=False)
    prompts = encode_prompts(texts, model.tokenizer, args.chat)
    # validate everything before decoding anything: errors name the prompt number
    buckets.validate_prompts(prompts, vocab_size=model.config.vocab_size, mask_id=ids.mask_id,
                             gen_length=cfg.gen_length, block=cfg.block_length,
                             max_positions=model.config.max_position_embeddings)
    cfg = cfg.replace(mask_id=ids.mask_id, eos_id=ids.eos_id, trace=args.html is not None)
    out_f, tmp = sys.stdout, None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(prefix=".decode-", suffix=".jsonl", dir=out_dir)
        out_f = os.fdopen(fd, "w", encoding="utf-8")
    traces = []
    try:
        bar = tqdm(total=len(prompts), desc=f"decode ({cfg.strategy})", unit="prompt", file=sys.stderr)
        for lo in range(0, len(prompts), args.batch_size):
            batch = prompts[lo:lo + args.batch_size]
            res = generate(model, batch, cfg, batch_size=args.batch_size,
                           request_ids=list(range(lo, lo + len(batch))))
            for j, toks in enumerate(res.token_ids):
                row = {"index": lo + j, "prompt": texts[lo + j],
                       "text": model.tokenizer.decode(toks, skip_special_tokens=True), "token_ids": toks,
                       "nfe": res.nfe[j], "tokens": res.tokens[j], "tokens_ref": res.tokens_ref[j],
                       "tpf": res.tpf[j],
                       "seconds": res.seconds}
                out_f.write(json.dumps(row, ensure_ascii=False) + "\n")
            traces.extend(res.trace or [])
            bar.update(len(batch))
        bar.close()
        if args.html:
            from dmax_jax.viz.html import write_trace_html

            write_trace_html(args.html, traces, model.tokenizer, prompt_text=texts,
                             title=f"DMax decoding trace ({cfg.strategy})")
        if tmp is not None:
            out_f.close()
            os.replace(tmp, args.out)
            tmp = None
    finally:
        if tmp is not None:
            out_f.close()
            os.unlink(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
