"""Decode benchmark: the three strategies side by side on a small random model (CPU by default).

For each strategy: compile once (warm-up), decode ``--prompts`` prompts of one bucket one at a time,
and report ms per model forward, NFE, TPF, TPS, the share of decode time that is *not* model
forward (bookkeeping: SPD update, soft embeddings, loop control), and the compile count after the
warm-up (must not move). The forward-only time comes from one compiled program that runs exactly
the same forwards (prefill, cross-block and block forwards of the same shapes, or full recomputes
for llada2) back to back, each fed by the previous one so XLA cannot hoist them, and each reducing
its whole logits block (so the lm_head is not pruned away). On a loaded or tiny CPU setup the
share is within timing noise (it can come out negative); use a larger model for a stable figure.

    python bench/decode.py [--hidden 256 --layers 4 --vocab 4096] [--prompts 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmax_jax.config import tiny_config  # noqa: E402
from dmax_jax.decoding import compile_count, generate  # noqa: E402
from dmax_jax.decoding import forwards as kv  # noqa: E402
from dmax_jax.decoding.buckets import row_geometry, shapes  # noqa: E402
from dmax_jax.model.llada2 import init_params  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--prompt-bucket", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--logit-scale", type=float, default=10.0, help="sharpen the random model's softmax")
    ap.add_argument("--strategies", default="spd,threshold,llada2")
    ap.add_argument("--repeats", type=int, default=5, help="timings take the best of this many runs")
    return ap.parse_args(argv)


@functools.cache
def _forward_program(cfg, strategy: str, padded: int, capacity: int, block: int):
    """One compiled forwards-only program per (strategy, bucket); counts and offsets are traced."""
    dt = jnp.float32

    def llada2(params, x, start0, n_cross, n_block):
        def one(_, x):
            lg = kv.window_logits(params, cfg, x, start0, block, dt)  # as decode
            return x.at[0, 0].set(jnp.where(lg.max() > 1e30, 0, x[0, 0]))  # a true dependency
        return jax.lax.fori_loop(0, n_block, one, x)

    def cached(params, x, start0, n_cross, n_block):
        cache = kv.prefill(params, cfg, x[:, :padded], start0, capacity, block, dt)
        emb = jnp.take(params["embedding"], kv.row_slice(x, start0, block), axis=0)

        def cross(i, c):
            cache, e = c
            lg, cache = kv.cross_forward(params, cfg, x, start0 + (i + 1) * block, cache, block, dt)
            return cache, jnp.where(lg.max() > 1e30, 0.0, e)

        def plain(_, e):
            lg = kv.block_forward(params, cfg, e, start0, cache, block, dt)
            return jnp.where(lg.max() > 1e30, 0.0, e)

        cache, emb = jax.lax.fori_loop(0, n_cross, cross, (cache, emb))
        return jax.lax.fori_loop(0, n_block, plain, emb)

    return jax.jit(llada2 if strategy == "llada2" else cached)


def forwards_only(params, cfg, strategy, prompt, nfe, block, gen_length, bucket, repeats):
    """Seconds for the same forwards as one decode of ``prompt`` with ``nfe`` forwards, in one program."""
    padded, capacity = shapes([len(prompt)], gen_length, block, bucket)
    x = np.full((1, capacity), cfg.resolved_mask_token_id, np.int32)
    x[0, :len(prompt)] = prompt
    s0, _, n_blocks = row_geometry(len(prompt), gen_length, block)
    n_cross = 0 if strategy == "llada2" else max(n_blocks - 1, 0)
    n_block = nfe if strategy == "llada2" else nfe - 1 - n_cross  # prefill counted in nfe
    fn = _forward_program(cfg, strategy, padded, capacity, block)
    args = (params, jnp.asarray(x), jnp.asarray([s0], jnp.int32), jnp.int32(n_cross), jnp.int32(n_block))
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = tiny_config(hidden_size=a.hidden, num_hidden_layers=a.layers, vocab_size=a.vocab,
                      intermediate_size=a.hidden * 3 // 2, moe_intermediate_size=a.hidden // 2)
    params = dict(jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0)))
    params["lm_head"] = params["lm_head"] * a.logit_scale
    rng = np.random.default_rng(0)
    lo = max(1, a.prompt_bucket // 2 + 1)
    prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, size=rng.integers(lo, a.prompt_bucket + 1))]
               for _ in range(a.prompts)]
    kw = dict(block_length=a.block_length, gen_length=a.gen_length, prompt_bucket=a.prompt_bucket,
              threshold=a.threshold)
    print(f"model: H={cfg.hidden_size} layers={cfg.num_hidden_layers} V={cfg.vocab_size}; block "
          f"{a.block_length}, gen {a.gen_length}, {a.prompts} prompts of one bucket, backend "
          f"{jax.default_backend()}")
    head = (f"{'strategy':<10}{'ms/fwd':>8}{'NFE':>7}{'TPF':>7}{'TPS':>9}{'non-fwd':>9}{'compile s':>11}"
            f"{'compiles +':>11}")
    print(head)
    print("-" * len(head))
    for strategy in a.strategies.split(","):
        warm = generate((params, cfg), [prompts[0]], strategy=strategy, **kw)
        count = compile_count()
        res = [generate((params, cfg), [p], strategy=strategy, **kw) for p in prompts]
        new_compiles = compile_count() - count
        secs = np.array([min([r.seconds] + [generate((params, cfg), [p], strategy=strategy, **kw).seconds
                                            for _ in range(a.repeats - 1)]) for r, p in zip(res, prompts)])
        nfe = np.array([r.nfe[0] for r in res])
        tpf = np.mean([r.tpf[0] for r in res])
        tps = np.mean([r.tokens_ref[0] / t for r, t in zip(res, secs)])
        fwd = np.array([forwards_only(params, cfg, strategy, p, int(n), a.block_length, a.gen_length,
                                      a.prompt_bucket, a.repeats) for p, n in zip(prompts, nfe)])
        share = 1 - fwd.sum() / secs.sum()
        ms_fwd = 1e3 * fwd.sum() / nfe.sum()
        print(f"{strategy:<10}{ms_fwd:>8.2f}{nfe.mean():>7.1f}{tpf:>7.2f}{tps:>9.0f}{100 * share:>8.1f}%"
              f"{warm.compile_seconds:>11.1f}{new_compiles:>11d}")
    print("non-fwd = 1 − (same forwards alone) / (compiled decode); 'compiles +' = compilations during "
          "the timed prompts (0 expected)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
