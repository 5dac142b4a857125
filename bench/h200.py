"""Prepared H200 check: DMax-16B-shaped random bf16 model on one GPU, decode forward ms per MoE
backend and SPD end to end, each against the roofline floor; writes one JSON file.

Install and run on the GPU machine (repo root; ``bench/h200.sh`` does both, ≤ 8 minutes)::

    python -m pip install -e ".[cuda]"
    python bench/h200.py --out results/h200.json
    python bench/h200.py --allow-cpu --tiny --out /tmp/h200_smoke.json   # CPU smoke run (tests)

1. Random weights are created on the device leaf by leaf from ``checkpoint.hf.param_shapes``
   (normal(0, 0.02) in bf16, norms 1, ``expert_bias`` 0): never a 32 GB host copy.
2. Decode forward: the ``block_forward`` call of decoding (current block's embeddings against a
   full cache of ``--cache`` slots) with each ``moe_impl`` of ``--backends``, batch 1 / 8 / 32,
   median of ``--repeats`` timed runs after a compile + warm-up run, next to the roofline floor of
   the same shapes on one H200 (``dmax_jax.perf.roofline``; uniform routing). A backend the
   platform lacks is recorded with its error message, not replaced by another.
3. SPD end to end at batch 1: ``dmax_jax.generate`` with ``threshold=1.0`` so that every block
   takes exactly ``block`` forwards (one token per forward: random weights are never confident) —
   the point is the time per forward in the real compiled decode loop, not accuracy. Compared with
   the floor of the same forward mix (1 prefill, 1 cross-block forward per block after the first,
   the rest single-block).

Exits with status 1 and a one-line message when no GPU is present, unless ``--allow-cpu --tiny``.
Backend names must be ``moe_impl`` values (``model.experts.MOE_IMPLS``); one the platform cannot
run raises ``MoEBackendError`` when traced and is recorded as unavailable with its message.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import median_ms  # noqa: E402
from dmax_jax.checkpoint.hf import param_shapes  # noqa: E402
from dmax_jax.config import ModelConfig, llada2_mini_config, tiny_config  # noqa: E402
from dmax_jax.decoding import forwards as kv  # noqa: E402
from dmax_jax.model.experts import MOE_IMPLS, MoEBackendError, resolve_moe_impl  # noqa: E402
from dmax_jax.model.kv_cache import KVCache  # noqa: E402
from dmax_jax.model.llada2 import forward  # noqa: E402
from dmax_jax.model.masks import MaskSpec  # noqa: E402
from dmax_jax.perf import roofline as rf  # noqa: E402

GPU_BACKENDS = "tokamax,ragged,dense,megablox"  # auto = tokamax on GPU (recorded in the JSON)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--backends", default=GPU_BACKENDS, help="moe_impl values, comma-separated")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-length", type=int, default=256, help="SPD: generated tokens (blocks x block)")
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--max-minutes", type=float, default=6.0,
                    help="stop starting new measurements after this long (recorded as skipped)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test config instead of DMax-16B")
    ap.add_argument("--allow-cpu", action="store_true", help="with --tiny: run on CPU (smoke test)")
    return ap.parse_args(argv)


def check_platform(args: argparse.Namespace) -> str:
    platform = jax.devices()[0].platform
    if platform == "gpu":
        return platform
    if args.allow_cpu and args.tiny:
        return platform
    raise SystemExit(f"h200: no GPU found (jax platform {platform!r}, devices {jax.devices()}); install "
                     "jax[cuda12] (pip install -e '.[cuda]') on a GPU machine, or pass --allow-cpu --tiny "
                     "for a CPU smoke run")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple, dtype) -> jax.Array:
    return 0.02 * jax.random.normal(key, shape, dtype)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random bf16 parameters made on the default device one leaf at a time."""
    shapes = param_shapes(cfg, jnp.bfloat16)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, s) in enumerate(flat):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            leaves.append(jnp.ones(s.shape, s.dtype))
        elif name == "expert_bias":
            leaves.append(jnp.zeros(s.shape, s.dtype))
        else:
            leaves.append(_normal(jax.random.fold_in(key, i), tuple(s.shape), s.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def full_cache(cfg: ModelConfig, batch: int, capacity: int, seed: int) -> KVCache:
    """A cache whose every slot is valid (random K/V), as deep into a 2k context as it gets."""
    k, v = {}, {}
    key = jax.random.key(seed)
    stacks = (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers))
    for i, (name, n) in enumerate(stacks):
        if n:
            shape = (n, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
            k[name] = jax.random.normal(jax.random.fold_in(key, 2 * i), shape, jnp.bfloat16)
            v[name] = jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape, jnp.bfloat16)
    return KVCache(k, v, jnp.full((batch,), capacity, jnp.int32))


def decode_forward_fn(cfg: ModelConfig, block: int, moe_impl: str):
    """``decoding.cache.block_forward``'s model call, with ``moe_impl`` chosen."""
    def fn(params, embeds, start, cache):
        return forward(params, cfg, inputs_embeds=embeds, positions=kv.positions(start, block),
                       mask=MaskSpec("block_causal", block), cache=cache, dtype=jnp.bfloat16,
                       moe_impl=moe_impl)[0]

    return jax.jit(fn)


def time_call(fn, args, repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, median ms of ``repeats`` runs)."""
    first, ms, _ = median_ms(fn, *args, repeats=repeats)
    return first, ms


def backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in MOE_IMPLS]
    if not names or bad:
        raise SystemExit(f"h200: --backends {text!r}: unknown moe_impl {bad}; known {MOE_IMPLS}")
    return names


def measure_decode(cfg, params, args, deadline: float, result: dict, save) -> None:
    """Fill ``result["decode"]`` / ``["unavailable_backends"]``, saving after every measurement (a
    crash or an out-of-memory keeps what came before; a failed run is recorded with its error)."""
    impls, unavailable, rows = backends(args.backends), result["unavailable_backends"], result["decode"]
    for b in [int(x) for x in args.batch.split(",")]:
        cache = full_cache(cfg, b, args.cache, seed=b)
        embeds = 0.02 * jax.random.normal(jax.random.key(b), (b, args.block, cfg.hidden_size), jnp.bfloat16)
        start = jnp.full((b,), args.cache, jnp.int32)
        floor = rf.floor(cfg, b, args.block, args.cache, "h200")
        for impl in impls:
            if impl in unavailable:
                continue
            if time.perf_counter() > deadline:
                rows.append({"backend": impl, "batch": b, "skipped": "time budget"})
                continue
            fn = decode_forward_fn(cfg, args.block, impl)
            try:
                first, ms = time_call(fn, (params, embeds, start, cache), args.repeats)
            except MoEBackendError as e:  # the platform lacks this backend: recorded, never replaced
                unavailable[impl] = f"{type(e).__name__}: {e}"
                print(f"  {impl}: unavailable ({unavailable[impl]})", flush=True)
                continue
            except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: record it, measure the rest
                rows.append({"backend": impl, "batch": b, "failed": str(e)[:2000]})
                print(f"  {impl:8s} batch {b:3d}: FAILED {str(e).splitlines()[0][:200]}", flush=True)
                save()
                continue
            rows.append({"backend": impl, "batch": b, "ms": ms, "compile_and_first_s": first,
                         "floor_ms": floor.ms, "floor_bytes": floor.bytes, "ratio_to_floor": ms / floor.ms})
            print(f"  {impl:8s} batch {b:3d}: {ms:8.2f} ms (floor {floor.ms:.2f}, x{ms / floor.ms:.2f})",
                  flush=True)
            save()
        del cache


def measure_spd(cfg, params, args) -> dict:
    """SPD at batch 1, one token per forward; ms per forward against the floor of the same mix."""
    from dmax_jax.decoding import generate

    prompt = [int(t) % (cfg.vocab_size - 3) + 3 for t in range(args.prompt_length)]
    if cfg.resolved_mask_token_id in prompt:
        prompt = [t if t != cfg.resolved_mask_token_id else 3 for t in prompt]
    kw = dict(strategy="spd", block_length=args.block, gen_length=args.gen_length, threshold=1.0,
              dtype=jnp.bfloat16, prompt_bucket=args.prompt_length)
    generate((params, cfg), [prompt], **kw)  # compile + warm-up
    res = generate((params, cfg), [prompt], **kw)
    nfe, blocks = int(res.nfe[0]), -(-args.gen_length // args.block)
    cross = max(blocks - 1, 0)
    single = nfe - 1 - cross
    floor_s = 1e-3 * (rf.floor(cfg, 1, args.prompt_length, 0, "h200").ms
                      + cross * rf.floor(cfg, 1, 2 * args.block, args.cache, "h200").ms
                      + single * rf.floor(cfg, 1, args.block, args.cache, "h200").ms)
    return {"nfe": nfe, "tokens": int(res.tokens_ref[0]), "seconds": res.seconds,
            "ms_per_forward": 1e3 * res.seconds / nfe, "tokens_per_s": res.tokens_ref[0] / res.seconds,
            "floor_seconds": floor_s, "floor_ms_per_forward": 1e3 * floor_s / nfe,
            "ratio_to_floor": res.seconds / floor_s, "compile_seconds": res.compile_seconds,
            "note": "threshold 1.0: one token per forward; floors use cache length --cache for every forward"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + 60 * args.max_minutes
    platform = check_platform(args)
    backends(args.backends)  # bad names fail before 32 GB of weights are made
    cfg = tiny_config() if args.tiny else llada2_mini_config()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "platform": platform, "jax": jax.__version__,
              "config": "tiny" if args.tiny else "dmax_16b", "block": args.block, "cache": args.cache,
              "auto_moe_impl": resolve_moe_impl("auto"), "roofline_source": rf.DATA_SHEET,
              "decode": [], "unavailable_backends": {}, "spd": None, "complete": False}

    def save() -> None:
        result["wall_s"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=1))

    params = random_params(cfg)
    jax.block_until_ready(params)
    result["params_s"] = time.perf_counter() - t0
    print(f"h200: {result['device']} ({platform}), random bf16 {result['config']} params in "
          f"{result['params_s']:.1f} s", flush=True)
    measure_decode(cfg, params, args, deadline, result, save)
    if time.perf_counter() < deadline:
        try:
            result["spd"] = measure_spd(cfg, params, args)
        except jax.errors.JaxRuntimeError as e:
            result["spd"] = {"failed": str(e)[:2000]}
    else:
        result["spd"] = {"skipped": "time budget"}
    result["complete"] = True
    save()
    spd = result["spd"]
    if "ms_per_forward" in spd:
        print(f"  spd batch 1: {spd['nfe']} forwards, {spd['ms_per_forward']:.2f} ms/forward "
              f"(floor {spd['floor_ms_per_forward']:.2f}), {spd['tokens_per_s']:.0f} tokens/s")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
