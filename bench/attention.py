"""Attention backends side by side on the OPUT training layout ``[noisy | clean]`` (algorithm §2.1).

For each half length L the sequence is 2L tokens, mask ``noisy_clean`` with block 32. Each backend
runs forward + backward (gradients w.r.t. q, k, v of ``sum(out * w)``) under one ``jax.jit``;
we report the best wall time of ``--reps`` runs after a warm-up, the peak memory of that program
from XLA's compiled memory analysis (arguments + outputs + temporaries - aliased), and the live
fractions of the mask (block-level: ``block x block`` tiles holding an allowed entry; tile-level, the share of
tiles ``xla_blockwise`` computes).

Default head config: batch 1, 8 query heads / 2 kv heads (GQA 4, as LLaDA2-mini's 16/4),
head_dim 128, float32 — LLaDA2-mini's per-head shape at half its heads, so the L=2048 dense
reference fits a few minutes on a small CPU; ``--heads 16 --kv-heads 4`` gives the real model.

    python bench/attention.py [--quick] [--lengths 512 1024 2048] [--heads 8] [--kv-heads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmax_jax.model.attention_backends import attention  # noqa: E402
from dmax_jax.model.attention_backends.blockwise import default_tile  # noqa: E402
from dmax_jax.model.attention_backends.tiles import padded_layout, tile_liveness  # noqa: E402
from dmax_jax.model.masks import MaskSpec  # noqa: E402

BACKENDS = ("xla_dense", "xla_blockwise")
TARGET_TIME, TARGET_MEM, TARGET_MEM_AT = 0.5, 0.35, 2048


def _step(backend: str, spec: MaskSpec):
    def loss(q, k, v, w):
        out = attention(q, k, v, spec=spec, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _measure(backend: str, spec: MaskSpec, args, reps: int) -> dict:
    t0 = time.perf_counter()
    compiled = _step(backend, spec).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    result = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    # XLA:CPU leaves peak_memory_in_bytes at arguments + outputs; temporaries are the real cost.
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    return {"time": min(times), "compile": compile_s, "peak": peak,
            "temp": mem.temp_size_in_bytes, "grads": result[1]}


def _live_fraction(spec: MaskSpec, length: int, tile: int) -> float:
    """Share of ``tile x tile`` score tiles (each half padded to the tile) with an allowed entry."""
    return float(tile_liveness(padded_layout(spec, length, tile), tile, tile).mean())


def _max_rel_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(a, b))


def run(lengths, *, block: int, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
        reps: int) -> list[dict]:
    spec = MaskSpec("noisy_clean", block)
    rows = []
    for half in lengths:
        t = 2 * half
        ks = jax.random.split(jax.random.key(half), 4)
        q = jax.random.normal(ks[0], (batch, t, heads, head_dim), dtype)
        k = jax.random.normal(ks[1], (batch, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(ks[2], (batch, t, kv_heads, head_dim), dtype)
        w = jax.random.normal(ks[3], q.shape, jnp.float32)
        res = {b: _measure(b, spec, (q, k, v, w), reps) for b in BACKENDS}
        tile = default_tile(spec, t)
        tiles_live = _live_fraction(spec, t, tile)
        dense, blockwise = res["xla_dense"], res["xla_blockwise"]
        rows.append({
            "L": half, "T": t, "live_blocks": _live_fraction(spec, t, block), "tile": tile,
            "live_tiles": tiles_live, "dense_s": dense["time"], "blockwise_s": blockwise["time"],
            "time_ratio": blockwise["time"] / dense["time"], "dense_mib": dense["peak"] / 2**20,
            "blockwise_mib": blockwise["peak"] / 2**20, "mem_ratio": blockwise["peak"] / dense["peak"],
            "grad_rel_diff": _max_rel_diff(blockwise["grads"], dense["grads"]),
            "compile_s": (dense["compile"], blockwise["compile"]),
        })
        print(f"  L={half}: dense {dense['time']:.3f}s, blockwise {blockwise['time']:.3f}s "
              f"(compile {dense['compile']:.1f}s / {blockwise['compile']:.1f}s)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'L':>5} {'T=2L':>5} {'live blk':>8} {'live tile':>9} {'dense s':>8} {'blockw s':>8} "
            f"{'t ratio':>7} {'dense MiB':>9} {'blockw MiB':>10} {'mem ratio':>9} {'grad rel':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['L']:>5} {r['T']:>5} {r['live_blocks']:>8.3f} {r['live_tiles']:>9.3f} "
              f"{r['dense_s']:>8.3f} {r['blockwise_s']:>8.3f} {r['time_ratio']:>7.3f} "
              f"{r['dense_mib']:>9.1f} {r['blockwise_mib']:>10.1f} {r['mem_ratio']:>9.3f} "
              f"{r['grad_rel_diff']:>8.1e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="L in {256, 512}, 2 reps (smoke run)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="half lengths L")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    lengths = a.lengths or ([256, 512] if a.quick else [512, 1024, 2048])
    reps = a.reps or 2
    print(f"backend {jax.default_backend()} | noisy_clean block {a.block} | batch {a.batch}, heads "
          f"{a.heads}/{a.kv_heads} kv, head_dim {a.head_dim}, {a.dtype} | fwd+bwd, best of {reps}")
    rows = run(lengths, block=a.block, batch=a.batch, heads=a.heads, kv_heads=a.kv_heads,
               head_dim=a.head_dim, dtype=a.dtype, reps=reps)
    print()
    print_table(rows)
    ok = all(r["time_ratio"] <= TARGET_TIME for r in rows)
    at = [r for r in rows if r["L"] == TARGET_MEM_AT]
    mem_ok = all(r["mem_ratio"] <= TARGET_MEM for r in at)
    print(f"\ntime ratio <= {TARGET_TIME} at every L: {'yes' if ok else 'NO'}; "
          f"memory ratio <= {TARGET_MEM} at L={TARGET_MEM_AT}: "
          f"{('yes' if mem_ok else 'NO') if at else 'not measured'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
