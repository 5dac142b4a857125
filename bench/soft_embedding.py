"""Time SPD soft embeddings: fused Pallas kernel vs the XLA reference, on the default backend.

Meaningful on TPU/GPU only; on CPU the kernel is interpreted, so its time says nothing about the
chip (the script says so). Defaults are LLaDA2-mini shapes: vocab 157184, hidden 2048, one
32-token block, top-1 (what DMax uses).

    python bench/soft_embedding.py --batch 8 --top-k 1 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import median_ms  # noqa: E402
from kernels_pallas.soft_embedding import soft_embeddings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=157184)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--mask-id", type=int, default=156895)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    backend = jax.default_backend()
    if backend == "cpu":
        print("note: CPU backend — the Pallas kernel runs in interpret mode; its time is not a kernel "
              "timing. Run on a TPU or GPU.")
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    table = jax.random.normal(k1, (args.vocab, args.hidden), args.dtype)
    shape = (args.batch, args.length, args.top_k)
    ids = jax.random.randint(k2, shape, 0, args.vocab, jnp.int32)
    probs = jax.random.dirichlet(k3, jnp.ones(args.top_k + 1), shape[:2])[..., : args.top_k]
    print(f"backend={backend} V={args.vocab} H={args.hidden} B={args.batch} T={args.length} "
          f"K={args.top_k} dtype={args.dtype}")
    results = {}
    for impl in ("xla", "pallas"):
        fn = jax.jit(functools.partial(soft_embeddings, mask_id=args.mask_id, impl=impl))
        results[impl] = fn(table, ids, probs)
        print(f"  {impl:6s} {median_ms(fn, table, ids, probs, repeats=args.iters)[1]:9.3f} ms")
    diff = jnp.max(jnp.abs(results["xla"].astype(jnp.float32) - results["pallas"].astype(jnp.float32)))
    print(f"  max |xla - pallas| = {float(diff):.3e}")


if __name__ == "__main__":
    main()
