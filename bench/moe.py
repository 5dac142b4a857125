"""MoE backends side by side on this machine: one routed-expert layer, and the demo model's decode
block forward, per ``moe_impl``; outputs checked against ``dense``.

Layer shapes (tokens, experts, top-k, hidden, expert width): the demo model at batch 1 and 16 of a
32-token block, the serving bench's random model, and a 64-expert model. Reported: median ms over
``--repeats`` timed runs after a compile run, the ratio to the first backend, and the largest
difference from ``dense`` relative to its largest magnitude (every backend must stay within 1e-5).

    python bench/moe.py [--backends ragged,tiled,dense] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import median_ms  # noqa: E402

LAYERS = {  # name -> (tokens, experts, top_k, hidden, expert width)
    "demo b1": (32, 8, 2, 96, 48), "demo b16": (512, 8, 2, 96, 48),
    "random b16": (512, 16, 2, 192, 96), "64 experts b16": (512, 64, 4, 256, 128),
}
TOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    from dmax_jax.model.experts import MOE_IMPLS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ragged,tiled,dense", help="moe_impl values, comma-separated")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"comma list of {list(LAYERS)}")
    ap.add_argument("--no-forward", action="store_true", help="skip the demo block forward")
    args = ap.parse_args(argv)
    args.backends = args.backends.split(",")
    args.layers = args.layers.split(",")
    bad = [b for b in args.backends if b not in MOE_IMPLS] + [x for x in args.layers if x not in LAYERS]
    if bad or args.repeats < 1:
        ap.error(f"unknown backend or layer {bad} (backends {MOE_IMPLS}, layers {list(LAYERS)}); "
                 "--repeats >= 1")
    return args


def layer_inputs(tokens, experts, k, hidden, width, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32)  # noqa: E731
    return (f(tokens, hidden), jnp.asarray(idx, jnp.int32), jnp.asarray(rng.random((tokens, k)), jnp.float32),
            f(experts, hidden, width), f(experts, hidden, width), f(experts, width, hidden))


def layer_rows(args) -> list[dict]:
    from dmax_jax.model.experts import routed_experts

    rows = []
    for name in args.layers:
        inputs = layer_inputs(*LAYERS[name])
        ref = np.asarray(routed_experts(*inputs, impl="dense"))
        for b in args.backends:
            fn = jax.jit(lambda *a, b=b: routed_experts(*a, impl=b))
            _, ms, out = median_ms(fn, *inputs, repeats=args.repeats)
            err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
            rows.append({"what": f"MoE layer, {name}", "backend": b, "ms": ms, "err": err})
    return rows


def forward_rows(args) -> list[dict]:
    """The demo model's ``block_forward`` (32-token block against a 128-slot cache) per backend."""
    import dmax_jax
    from dmax_jax.decoding.forwards import positions
    from dmax_jax.demo import default_model_dir
    from dmax_jax.model.kv_cache import init_cache
    from dmax_jax.model.llada2 import forward
    from dmax_jax.model.masks import MaskSpec

    m = dmax_jax.load_pretrained(default_model_dir("dmax"))
    cfg, rows = m.config, []
    for batch in (1, 16):
        cache = init_cache(cfg, batch, 128, jnp.float32).replace(length=jnp.full((batch,), 64, jnp.int32))
        emb = jax.random.normal(jax.random.key(0), (batch, 32, cfg.hidden_size))
        start = jnp.full((batch,), 64, jnp.int32)
        outs = {}
        for b in dict.fromkeys(["dense", *args.backends]):
            fn = jax.jit(lambda p, e, s, c, b=b: forward(
                p, cfg, inputs_embeds=e, positions=positions(s, 32), mask=MaskSpec("block_causal", 32),
                cache=c, moe_impl=b)[0])
            _, ms, outs[b] = median_ms(fn, m.params, emb, start, cache, repeats=args.repeats)
            if b in args.backends:
                rows.append({"what": f"demo block forward, batch {batch}", "backend": b, "ms": ms})
        ref = np.asarray(outs["dense"])
        for r in rows[-len(args.backends):]:
            r["err"] = float(np.abs(np.asarray(outs[r["backend"]]) - ref).max() / np.abs(ref).max())
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = layer_rows(args) + ([] if args.no_forward else forward_rows(args))
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPU cores, median of {args.repeats}")
    ratios = " | ".join(f"{b} / {args.backends[0]}" for b in args.backends[1:])
    print(f"| what | {' | '.join(args.backends)} | {ratios} | max rel. err |")
    print("|---" * (2 * len(args.backends) + 1) + "|")
    for what in dict.fromkeys(r["what"] for r in rows):
        got = {r["backend"]: r for r in rows if r["what"] == what}
        first = got[args.backends[0]]["ms"]
        print(f"| {what} | " + " | ".join(f"{got[b]['ms']:.2f} ms" for b in args.backends) + " | "
              + " | ".join(f"{first / got[b]['ms']:.2f}x faster" for b in args.backends[1:])
              + f" | {max(r['err'] for r in got.values()):.1e} |")
    worst = max(r["err"] for r in rows)
    if worst > TOL:
        print(f"moe: a backend differs from dense by {worst:.1e} > {TOL:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
