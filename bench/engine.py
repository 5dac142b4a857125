"""Engine settings side by side (no HTTP): forward compaction on / off at a few ``exit_factor`` values.

Every setting serves the same ``--requests`` held-out demo chat prompts, all submitted at once to an
engine with ``--max-batch`` slots (the steady load of a full server), ``--reps`` times; the settings
run interleaved (setting A, B, ..., A, B, ...) so that a noisy machine hurts them alike. Reported per
setting: best and median tok/s, rounds and sequential forwards per pass, warm-up (compile) seconds,
and whether every request's tokens equal those of the first setting (they must: the settings change
the schedule, never a row's arithmetic). Ratios are to the first setting.

    python bench/engine.py [--requests 32] [--max-batch 16] [--reps 3] [--settings c4,f4,c2,f2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402


def parse_settings(text: str) -> list[tuple[bool, int]]:
    """``c4`` = compacted forwards, exit_factor 4; ``f2`` = full-width forwards, exit_factor 2."""
    out = []
    for item in text.split(","):
        if len(item) < 2 or item[0] not in "cf" or not item[1:].isdigit() or int(item[1:]) < 1:
            raise ValueError(f"--settings: {item!r} is not c<N> or f<N> with N >= 1 (e.g. c4,f4)")
        out.append((item[0] == "c", int(item[1:])))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settings", default="c4,f4,c2,f2", help="comma list of c<exit_factor> / f<exit_factor>")
    args = ap.parse_args(argv)
    if min(args.requests, args.max_batch, args.max_tokens, args.reps) < 1:
        ap.error("--requests, --max-batch, --max-tokens and --reps must be >= 1")
    try:
        args.settings = parse_settings(args.settings)
    except ValueError as e:
        ap.error(str(e))
    return args


def demo_requests(n: int, max_tokens: int):
    """The server's view of ``n`` held-out demo questions: chat template, demo prompt format, knobs."""
    import dmax_jax
    from dmax_jax.data.chat import apply_chat_template
    from dmax_jax.demo import default_model_dir, test_problems
    from dmax_jax.serve import serve_defaults
    from dmax_jax.serving import EngineRequest

    path = default_model_dir("dmax")
    model = dmax_jax.load_pretrained(path)
    defaults, template = serve_defaults(path, {"gen_length": max_tokens})
    d = next(iter(defaults.values()))
    reqs = []
    for p in test_problems(n):
        msg = [{"role": "user", "content": template.replace("{prompt}", p["question"])}]
        ids = apply_chat_template(model.tokenizer, msg, add_generation_prompt=True)
        reqs.append(EngineRequest(tuple(ids), d.replace(gen_length=max_tokens)))
    return model, d, tuple(defaults), reqs


def one_pass(eng, reqs) -> tuple[float, list, dict]:
    s0 = eng.stats()
    t = time.perf_counter()
    handles = [eng.submit(r) for r in reqs]
    eng.run_until_idle()
    wall = time.perf_counter() - t
    s1 = eng.stats()
    fins = [h.result(0) for h in handles]
    return wall, fins, {k: s1[k] - s0[k] for k in ("rounds", "forwards")}


def main(argv=None) -> int:
    args = parse_args(argv)
    from dmax_jax.serving import Engine

    capacity = 128   # the recorded runs' slots: the demo's prompt bucket 64 + 64 tokens

    model, d, strategies, reqs = demo_requests(args.requests, args.max_tokens)
    engines = {}
    for compact, ef in args.settings:
        eng = Engine(model, d, max_batch=args.max_batch, capacity=capacity,
                     prefill_chunk=d.prompt_bucket or 128, strategies=strategies, exit_factor=ef,
                     compact=compact)
        eng.warmup()
        one_pass(eng, reqs[: args.max_batch])  # first real round: host-side caches
        engines[(compact, ef)] = eng
    walls = {k: [] for k in engines}
    tokens, counts = {}, {}
    for _ in range(args.reps):
        for k, eng in engines.items():
            wall, fins, counts[k] = one_pass(eng, reqs)
            walls[k].append(wall)
            tokens[k] = [tuple(f.token_ids) for f in fins]
    n_tok = sum(len(t) for t in next(iter(tokens.values())))
    first = next(iter(engines))
    print(f"demo model, {args.requests} requests at once on {args.max_batch} slots, {n_tok} tokens, "
          f"{args.reps} interleaved passes")
    print("| forwards | exit_factor | best tok/s | median tok/s | vs first | rounds | sequential forwards "
          "| compile s | tokens == first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, eng in engines.items():
        best, med = n_tok / min(walls[k]), n_tok / float(np.median(walls[k]))
        ref = n_tok / min(walls[first])
        name = "compacted" if k[0] else "full width"
        print(f"| {name} | {k[1]} | {best:.0f} | {med:.0f} | {best / ref:.2f}x "
              f"| {counts[k]['rounds']} | {counts[k]['forwards']} | {eng.stats()['compile_seconds']:.1f} "
              f"| {tokens[k] == tokens[first]} |")
    return 0 if all(tokens[k] == tokens[first] for k in engines) else 1


if __name__ == "__main__":
    sys.exit(main())
