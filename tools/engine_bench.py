"""Engine throughput on the shipped demo model (no HTTP): sequential ``generate`` per request vs the
slot engine at concurrency 1 and with every request submitted at once; checks the tokens match.

    python tools/engine_bench.py [--n 32] [--max-batch 16] [--strategy spd] [--threshold 0.5]
                                 [--max-tokens 64] [--capacity 128]
"""

from __future__ import annotations

import argparse
import threading
import time

import jax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--strategy", default="spd", choices=("spd", "threshold"))
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=128)
    args = ap.parse_args()

    from dmax_jax.decoding import DecodeConfig, generate
    from dmax_jax.demo import load_demo_model, test_problems
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import build_input_ids
    from dmax_jax.serving import Engine, EngineRequest

    model = load_demo_model("dmax")
    bench = get_benchmark("gsm8k")
    prompts = [build_input_ids(model.tokenizer, bench.prompt(r)) for r in test_problems(args.n)]
    cfg = DecodeConfig(strategy=args.strategy, block_length=32, gen_length=args.max_tokens,
                       threshold=args.threshold, prompt_bucket=64)
    reqs = [EngineRequest(p, cfg) for p in prompts]

    generate(model, [prompts[0]], cfg)  # compile
    t = time.perf_counter()
    ref = [generate(model, [p], cfg) for p in prompts]
    seq_s = time.perf_counter() - t
    n_tok = sum(r.tokens[0] for r in ref)

    eng = Engine(model, cfg, max_batch=args.max_batch, capacity=args.capacity, prefill_chunk=64,
                 strategies=(args.strategy,))
    eng.start()
    t = time.perf_counter()
    one = [eng.submit(r).result() for r in reqs]
    c1_s = time.perf_counter() - t
    t = time.perf_counter()
    handles = [eng.submit(r) for r in reqs]
    many = [h.result() for h in handles]
    all_s = time.perf_counter() - t
    eng.stop()
    same = sum(list(f.token_ids) == g.token_ids[0] and list(o.token_ids) == g.token_ids[0]
               for f, o, g in zip(many, one, ref))
    nfe = sum(f.usage.nfe for f in many)
    print(f"device {jax.devices()[0].platform}, {args.n} requests, {n_tok} tokens, strategy {args.strategy} "
          f"tau {args.threshold}, threads {threading.active_count()}")
    print(f"sequential generate : {seq_s:7.2f} s  {n_tok / seq_s:8.1f} tok/s")
    print(f"engine concurrency 1: {c1_s:7.2f} s  {n_tok / c1_s:8.1f} tok/s")
    print(f"engine all at once  : {all_s:7.2f} s  {n_tok / all_s:8.1f} tok/s  (max_batch {args.max_batch})")
    tpf = sum(f.usage.tokens_ref for f in many) / nfe
    print(f"tokens equal to generate: {same}/{args.n}; TPF {tpf:.2f}; compile count {eng.compile_count()}")


if __name__ == "__main__":
    main()
