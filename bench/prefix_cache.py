"""The engine's prefix cache on vs off, side by side: a few-shot workload and a multi-turn chat.

The shipped demo model with its positions raised to ``--positions`` (or ``--model random``:
``bench/serve.py``'s random LLaDA2-MoE with the demo tokenizer) serves both workloads
from two engines that differ only in the prefix cache (``prefix_cache_blocks`` default vs 0),
each warmed up first, run in the background thread the server uses; clients are threads
submitting token ids (no HTTP, so the numbers are the engine's):

- few-shot: ``--requests`` prompts of ``--shots`` worked demo problems (~100 tokens each, the same
  for every request) and one new question, ``--concurrency`` clients in a closed loop;
- chat: ``--conversations`` conversations of ``--turns`` turns in parallel; each turn resends the
  conversation so far (prompt + the reply's tokens) and one new question.

Reported per workload and setting: time to the first committed block (submit → first
``BlockCommitted``) p50 / p99, aggregate generated tokens/s, prompt chunks prefilled and prompt
tokens served from the cache, and whether every request's tokens equal the cache-off engine's when
each engine serves the workload's requests one at a time (a second pass, cache emptied first).

    python bench/prefix_cache.py [--requests 24] [--shots 10] [--concurrency 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))      # bench/serve.py
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from serve import add_random_model_args, random_model_dir  # noqa: E402  (bench/serve.py's random model)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24, help="few-shot requests")
    ap.add_argument("--shots", type=int, default=10, help="shared worked problems (~800 tokens)")
    ap.add_argument("--concurrency", type=int, default=2, help="few-shot closed-loop clients")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=4, help="engine slots")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", choices=("demo", "random"), default="demo",
                    help="the shipped demo dmax model (positions raised to --positions) or a random one")
    ap.add_argument("--positions", type=int, default=1024, help="the model's positions (engine capacity)")
    add_random_model_args(ap)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if min(args.requests, args.shots, args.concurrency, args.conversations, args.turns, args.max_batch,
           args.max_tokens) < 1:
        ap.error("every count must be >= 1")
    return args


def few_shot_prompts(tok, shots: int, n: int) -> list[list[int]]:
    from dmax_jax.data.chat import encode
    from dmax_jax.demo import test_problems

    probs = test_problems(shots + n)
    head = "".join(f"Question: {p['question']}\nAnswer: {p['answer']}\n\n" for p in probs[:shots])
    return [encode(tok, f"{head}Question: {p['question']}\nAnswer:") for p in probs[shots:]]


class Timed:
    """One request's submit → first committed block and end times (the engine thread's listener)."""

    def __init__(self) -> None:
        self.t0, self.first, self.done = time.perf_counter(), None, threading.Event()

    def __call__(self, ev) -> None:
        from dmax_jax.serving import BlockCommitted, Finished

        if isinstance(ev, BlockCommitted) and self.first is None:
            self.first = time.perf_counter() - self.t0
        if isinstance(ev, Finished):
            self.done.set()


def submit(eng, ids, d) -> tuple:
    from dmax_jax.serving import EngineRequest

    t = Timed()
    h = eng.submit(EngineRequest(tuple(ids), d), listener=t)
    t.done.wait()
    return t.first, h.result(0)


def few_shot(eng, d, prompts, conc):
    with cf.ThreadPoolExecutor(conc) as ex:
        return list(ex.map(lambda ids: submit(eng, ids, d), prompts))


def chat(eng, d, tok, conversations: int, turns: int, concurrency: int | None = None):
    from dmax_jax.data.chat import encode
    from dmax_jax.demo import test_problems

    qs = [p["question"] for p in test_problems(conversations * turns, seed=1)]

    def talk(c):
        ids, out = [], []
        for t in range(turns):
            ids = ids + encode(tok, f"\nUser: {qs[c * turns + t]}\nAssistant:")
            first, fin = submit(eng, ids, d)
            out.append((first, fin))
            ids = ids + list(fin.token_ids)       # the client resends the reply with the next turn
        return out

    with cf.ThreadPoolExecutor(concurrency or conversations) as ex:
        return [r for conv in ex.map(talk, range(conversations)) for r in conv]


def measure(eng, run) -> dict:
    s0, t = eng.stats(), time.perf_counter()
    recs = run()
    wall, s1 = time.perf_counter() - t, eng.stats()
    firsts = np.array([f for f, _ in recs])
    fins = [fin for _, fin in recs]
    return {"ttfb_p50_s": float(np.percentile(firsts, 50)), "ttfb_p99_s": float(np.percentile(firsts, 99)),
            "tok_s": sum(len(f.token_ids) for f in fins) / wall, "wall_s": wall,
            "prefill_chunks": s1["prefill_chunks"] - s0["prefill_chunks"],
            "cached_tokens": sum(f.usage.cached_tokens for f in fins),
            "prompt_tokens": sum(f.usage.prompt_tokens for f in fins), "tokens": [f.token_ids for f in fins]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import dmax_jax
    from dmax_jax.demo import default_model_dir
    from dmax_jax.serve import serve_defaults
    from dmax_jax.serving import Engine

    with tempfile.TemporaryDirectory() as tmp:
        path = (default_model_dir("dmax") if args.model == "demo"
                else random_model_dir(Path(tmp) / "random", args))
        model = dmax_jax.load_pretrained(path)
        defaults, _ = serve_defaults(path, {"gen_length": args.max_tokens})
        d = next(iter(defaults.values())).replace(gen_length=args.max_tokens)
    # the demo model was trained on 512 positions; RoPE takes any position, so its slots can hold 8-shot
    # prompts (its answers past 512 are worse, which changes nothing in an on-vs-off comparison)
    model = dataclasses.replace(model, config=model.config.replace(max_position_embeddings=args.positions))
    prompts = few_shot_prompts(model.tokenizer, args.shots, args.requests)
    engines = {}
    for name, blocks, gen in (("off", 0, False), ("on", None, True), ("prompts only", None, False)):
        eng = engines[name] = Engine(model, d, max_batch=args.max_batch, capacity=args.positions,
                                     prefill_chunk=d.prompt_bucket or 128, strategies=tuple(defaults),
                                     prefix_cache_blocks=blocks, prefix_cache_generated=gen)
        eng.start()
        few_shot(eng, d, prompts[:1], 1)          # the first real round: host-side caches
        eng.prefix.index.clear()
    rows = []
    tok, conv, turns = model.tokenizer, args.conversations, args.turns
    workloads = {"few-shot": lambda e, c: (lambda: few_shot(e, d, prompts, c or args.concurrency)),
                 "chat": lambda e, c: (lambda: chat(e, d, tok, conv, turns, c))}
    for wl, make in workloads.items():
        res = {name: measure(eng, make(eng, None)) for name, eng in engines.items()}
        # Exactness on one schedule: every engine alone per request (concurrency 1), so the batches are
        # the same with the cache on and off (under concurrency the batch company differs run to run,
        # and the engine's batch invariance is itself only as exact as XLA:CPU's row grouping).
        for eng in engines.values():
            eng.prefix.index.clear()
        exact = {name: measure(eng, make(eng, 1))["tokens"] for name, eng in engines.items()}
        for name, r in res.items():
            r.pop("tokens")
            rows.append({"workload": wl, "cache": name, **r, "tokens_equal_off": exact[name] == exact["off"]})
    for eng in engines.values():
        eng.stop()
    print(table(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "args": vars(args),
                                               "rows": rows}, indent=1))
    return 0 if all(r["tokens_equal_off"] for r in rows) else 1


def table(rows: list[dict], args) -> str:
    what = ("the demo dmax model" if args.model == "demo" else
            f"random LLaDA2-MoE (hidden {args.hidden}, {args.layers} layers, {args.experts} experts)")
    out = [f"{what}, {args.positions} positions per slot, "
           f"{args.max_batch} slots, {args.max_tokens} tokens per request; {time.strftime('%Y-%m-%d')}",
           "| workload | prefix cache | TTFB p50 s | TTFB p99 s | tok/s | prompt chunks prefilled "
           "| cached / prompt tokens | tokens = off |", "|---|---|---|---|---|---|---|---|"]
    off = {r["workload"]: r for r in rows if r["cache"] == "off"}
    for r in rows:
        o = off[r["workload"]]
        ratio = "" if r is o else (f" ({o['ttfb_p50_s'] / r['ttfb_p50_s']:.1f}× lower)")
        out.append(f"| {r['workload']} | {r['cache']} | {r['ttfb_p50_s']:.3f}{ratio} | {r['ttfb_p99_s']:.3f} "
                   f"| {r['tok_s']:.1f} | {r['prefill_chunks']} "
                   f"| {r['cached_tokens']} / {r['prompt_tokens']} | {r['tokens_equal_off']} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
