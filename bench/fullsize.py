"""Full-size compile proof for DMax-16B from abstract shapes: compiled, never run, no weights allocated.

    python bench/fullsize.py [--train-moe-impls ep,dense] [--mesh fsdp=2,expert=4] [--batch 1,8,32]
                             [--skip-train] [--skip-decode] [--json]

(a) The OPUT train step exactly as ``train.py`` builds it (``training.program.build_train_program``: the real
    ``make_train_step`` under ``jit_train_step`` with the state / batch shardings) for the recipe
    ``configs/llada2_mini_oput.yaml`` (global batch 8 x 2048 → 4096 tokens ``[noisy | clean]``,
    bf16 compute, f32 master weights + Adam, remat, ``xla_blockwise`` block-sparse attention) on
    DMax-16B shapes, over an 8-device mesh of fake CPU devices (``fsdp x expert`` as
    ``configs/dmax_16b_pod.yaml`` does for 64). Prints per-device argument / output / temp bytes
    from ``compiled.memory_analysis()`` and whether they fit one H200 with headroom.
(b) The decode block forward (``decoding.cache.block_forward``, bf16 weights, one device) at each
    batch, block 32, cache 2,048: XLA's ``cost_analysis()`` next to the roofline
    (``dmax_jax.perf.roofline``). XLA counts a while-loop body once, and the layers are a scan, so
    the per-layer costs are recovered from two one-layer compiles (dense-only, MoE-only) and
    scaled to the real depth (``depth_corrected_cost``).

Compile time is flat in depth (layers are scanned). The fake devices are CPU devices: XLA:CPU
lowers ``ragged_dot`` densely (every expert for every row) and its buffer assignment is not the
GPU's, so the numbers bound, but do not measure, a GPU run (the module's README text says more).
"""

from __future__ import annotations

import os
import sys

_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}".strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmax_jax.checkpoint.hf import param_shapes  # noqa: E402
from dmax_jax.config import PRESETS, ModelConfig  # noqa: E402
from dmax_jax.decoding import forwards as kv  # noqa: E402
from dmax_jax.model.kv_cache import KVCache  # noqa: E402
from dmax_jax.model.llada2 import forward  # noqa: E402
from dmax_jax.model.masks import MaskSpec  # noqa: E402
from dmax_jax.perf import roofline as rf  # noqa: E402

H200_BYTES = 141e9
HEADROOM_BYTES = 120e9
TRAIN_RECIPE = REPO / "configs" / "llada2_mini_oput.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dmax_16b", choices=sorted(PRESETS))
    ap.add_argument("--train-config", default=str(TRAIN_RECIPE))
    ap.add_argument("--mesh", default="fsdp=2,expert=4", help="mesh axis sizes (8 devices in all)")
    ap.add_argument("--train-moe-impls", default="ep,dense",
                    help="step.moe_impl values to compile the train step with, comma-separated")
    ap.add_argument("--batch", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--decode-variants", default="bfloat16:default,float32:default,float32:dense",
                    help="DTYPE:IMPL items; IMPL 'default' = block_forward as decoding calls it")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    return ap.parse_args(argv)


def _csv(text: str, what: str, cast=str) -> list:
    try:
        out = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what} {text!r}: bad comma-separated list") from None
    if not out:
        raise SystemExit(f"{what} {text!r}: empty")
    return out


def mesh_overrides(text: str) -> list[str]:
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in _csv(text, "--mesh"):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit():
            raise SystemExit(f"--mesh {text!r}: items must be data|fsdp|expert|tensor=N, got {item!r}")
        sizes[name] = int(value)
    return [f"mesh.{k}={v}" for k, v in sizes.items()]


# ---- (a) train step ---------------------------------------------------------------------------------
def compile_train_step(preset: str, recipe: str, mesh: str, moe_impl: str) -> dict:
    """Compile the real OPUT step for the recipe at full size; per-device memory from XLA."""
    from dmax_jax.training import loop
    from dmax_jax.training.config import load_train_config
    from dmax_jax.training.program import build_train_program
    from dmax_jax.training.step import REQUIRED_KEYS

    cfg = load_train_config(recipe, [f"model.source=preset:{preset}", "data.paths=[abstract.jsonl]",
                                     f"step.moe_impl={moe_impl}", *mesh_overrides(mesh)])
    model_config = loop.resolve_model_config(cfg)
    cfg = cfg.resolve(total_steps=1000, mask_id=model_config.resolved_mask_token_id)
    built = build_train_program(model_config, cfg)  # exactly what train() compiles
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         built.abstract_state, built.state_shardings)
    rows, length = cfg.data.batch_size, cfg.data.max_length
    batch = {k: jax.ShapeDtypeStruct((rows,) if k == "flag" else (rows, length), jnp.int32,
                                     sharding=built.batch_shardings[k]) for k in REQUIRED_KEYS}
    t0 = time.perf_counter()
    compiled = built.step_fn.lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    n_params = sum(rf.param_counts(model_config).values())
    return {
        "moe_impl": moe_impl, "mesh": dict(built.mesh.shape), "global_batch": rows,
        "tokens_per_row": 2 * length,
        "compute_dtype": cfg.step.compute_dtype, "remat": cfg.step.remat,
        "attention_backend": cfg.step.attention_backend,
        "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes, "peak_bytes": peak,
        "state_bytes_even_split": 12 * n_params / built.mesh.size,  # f32 params + 2 Adam moments
        "fits_h200_with_headroom": peak <= HEADROOM_BYTES, "compile_s": seconds,
    }


# ---- (b) decode block forward -----------------------------------------------------------------------
def _abstract_cache(cfg: ModelConfig, batch: int, capacity: int, dtype) -> KVCache:
    def stack(n):
        return jax.ShapeDtypeStruct((n, batch, capacity, cfg.num_key_value_heads, cfg.head_dim), dtype)

    stacks = [(n, k) for n, k in (("dense_layers", cfg.num_dense_layers), ("moe_layers", cfg.num_moe_layers))
              if k]
    return KVCache({n: stack(k) for n, k in stacks}, {n: stack(k) for n, k in stacks},
                   jax.ShapeDtypeStruct((batch,), jnp.int32))


DECODE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def block_forward_cost(cfg: ModelConfig, batch: int, block: int, cache: int, dtype: str = "bfloat16",
                       moe_impl: str | None = None, device: jax.Device | None = None) -> dict[str, float]:
    """The compiler's cost analysis of the decode block forward (weights and cache in ``dtype``):
    the model ``forward`` over a block with the KV cache, as decoding calls it. ``moe_impl`` None =
    the model's default for the platform; ``device`` compiles for that (compile-only) device and its
    platform's kernels (``bench/aot.py``: TPU), default the host's CPU."""
    dt = DECODE_DTYPES[dtype]
    platform = None if device is None else device.platform

    def fn(params, embeds, start, c):
        return forward(params, cfg, inputs_embeds=embeds, positions=kv.positions(start, block),
                       mask=MaskSpec("block_causal", block), cache=c, dtype=dt,
                       moe_impl=moe_impl or "auto", platform=platform)[0]

    args = (param_shapes(cfg, dt), jax.ShapeDtypeStruct((batch, block, cfg.hidden_size), dt),
            jax.ShapeDtypeStruct((batch,), jnp.int32), _abstract_cache(cfg, batch, cache, dt))
    if device is not None:
        on = jax.sharding.SingleDeviceSharding(device)
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), args)
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, list):  # older jax: one dict per computation
        ca = ca[0]
    return {"flops": float(ca["flops"]), "bytes": float(ca["bytes accessed"])}


def depth_corrected_cost(cfg: ModelConfig, batch: int, block: int, cache: int, dtype: str = "bfloat16",
                         moe_impl: str | None = None, device: jax.Device | None = None) -> dict[str, float]:
    """Cost at the real depth from three one-layer-per-stack programs. XLA's cost analysis counts
    a while-loop body once (and adds loop-carry copies), so the scanned 20-layer program cannot be
    read directly; with stacks of length 1: dense = O + D, moe = O + M, both = O + D + M, and the
    forward costs O + n_dense·D + n_moe·M."""
    if not (cfg.num_dense_layers and cfg.num_moe_layers):
        raise ValueError("depth_corrected_cost needs both a dense and a MoE stack")

    def cost(n_layers: int, n_dense: int) -> dict[str, float]:
        c = cfg.replace(num_hidden_layers=n_layers, first_k_dense_replace=n_dense)
        return block_forward_cost(c, batch, block, cache, dtype, moe_impl, device)

    dense, moe, both = cost(1, 1), cost(1, 0), cost(2, 1)
    out = {}
    for k in both:
        d, m = both[k] - moe[k], both[k] - dense[k]
        out[k] = both[k] - d - m + cfg.num_dense_layers * d + cfg.num_moe_layers * m
        out[f"{k}_per_moe_layer"] = m
        out[f"{k}_per_dense_layer"] = d
        out[f"{k}_outside_layers"] = both[k] - d - m
    return out


def roofline_by_layer(cfg: ModelConfig, batch: int, block: int, cache: int, dtype: str) -> dict[str, float]:
    """The roofline's bytes split like ``depth_corrected_cost``: one dense layer, one MoE layer, the
    rest (lm_head + final norm; the block's embeddings come in as an argument)."""
    p = rf.forward_bytes(cfg, batch, block, cache, weight_dtype=dtype)
    layer = (p["attention"] + p["kv_cache"]) / cfg.num_hidden_layers
    moe = (p["routed_experts"] + p["shared_experts"] + p["router"]) / cfg.num_moe_layers
    return {"roofline_bytes_per_dense_layer": layer + p["dense_mlp"] / cfg.num_dense_layers,
            "roofline_bytes_per_moe_layer": layer + moe,
            "roofline_bytes_outside_layers": p["lm_head"] + p["final_norm"]}


def decode_rows(cfg: ModelConfig, batches: list[int], block: int, cache: int,
                variants: list[tuple[str, str | None]]) -> list[dict]:
    """One row per (dtype, moe_impl) variant and batch: XLA's depth-corrected cost vs the roofline
    in the same weight dtype (touched experts under uniform routing, and every expert)."""
    out = []
    for dtype, impl in variants:
        for b in batches:
            t0 = time.perf_counter()
            xla = depth_corrected_cost(cfg, b, block, cache, dtype, impl)
            floor = rf.floor(cfg, b, block, cache, "h200", weight_dtype=dtype)
            every = sum(rf.forward_bytes(cfg, b, block, cache, weight_dtype=dtype,
                                         distinct_experts=cfg.num_experts).values())

            out.append({"dtype": dtype, "moe_impl": impl or "block_forward default", "batch": b,
                        "xla_bytes": xla["bytes"], "xla_flops": xla["flops"],
                        "xla_bytes_per_moe_layer": xla["bytes_per_moe_layer"],
                        "xla_bytes_per_dense_layer": xla["bytes_per_dense_layer"],
                        "xla_bytes_outside_layers": xla["bytes_outside_layers"],
                        **roofline_by_layer(cfg, b, block, cache, dtype),
                        "roofline_bytes": floor.bytes, "roofline_flops": floor.flops,
                        "all_experts_bytes": every, "roofline_ms_h200": floor.ms,
                        "ratio_to_roofline": xla["bytes"] / floor.bytes,
                        "compile_s": time.perf_counter() - t0})
    return out


def parse_variants(text: str) -> list[tuple[str, str | None]]:
    out = []
    for item in _csv(text, "--decode-variants"):
        dtype, _, impl = item.partition(":")
        if dtype not in DECODE_DTYPES or not impl:
            raise SystemExit(f"--decode-variants: {item!r} must be DTYPE:IMPL with DTYPE in "
                             f"{sorted(DECODE_DTYPES)} and IMPL 'default' or a moe_impl name")
        out.append((dtype, None if impl == "default" else impl))
    return out


def print_report(result: dict) -> None:
    for r in result.get("train", []):
        print(f"train step, moe_impl={r['moe_impl']}, mesh {r['mesh']}, batch {r['global_batch']} x "
              f"{r['tokens_per_row']} tokens, {r['compute_dtype']}, remat={r['remat']}, "
              f"{r['attention_backend']} (compile {r['compile_s']:.0f} s)")
        print(f"  per device: arguments {r['argument_bytes'] / 1e9:.1f} GB (even split of f32 params + Adam: "
              f"{r['state_bytes_even_split'] / 1e9:.1f}), outputs {r['output_bytes'] / 1e9:.1f} "
              f"(aliased {r['alias_bytes'] / 1e9:.1f}), temp {r['temp_bytes'] / 1e9:.1f} → peak "
              f"{r['peak_bytes'] / 1e9:.1f} GB: "
              f"{'fits' if r['fits_h200_with_headroom'] else 'does NOT fit'} one H200 "
              f"(≤ {HEADROOM_BYTES / 1e9:.0f} of {H200_BYTES / 1e9:.0f} GB)")
    if result.get("decode"):
        print(f"decode block forward (1 device, block {result['block']}, cache {result['cache']}): "
              "XLA:CPU cost (depth-corrected) vs roofline in the same weight dtype")
        print("dtype     moe_impl                batch  xla GB  all-experts GB  roofline GB  xla/roofline  "
              "xla GFLOP  roofline GFLOP  floor ms")
        for r in result["decode"]:
            print(f"{r['dtype']:9s} {r['moe_impl']:22s} {r['batch']:6d}  {r['xla_bytes'] / 1e9:6.1f}  "
                  f"{r['all_experts_bytes'] / 1e9:14.1f}  {r['roofline_bytes'] / 1e9:11.1f}  "
                  f"{r['ratio_to_roofline']:12.2f}  {r['xla_flops'] / 1e9:9.0f}  "
                  f"{r['roofline_flops'] / 1e9:14.0f}  {r['roofline_ms_h200']:8.2f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if jax.device_count() != 8 and not args.skip_train:
        raise SystemExit(f"fullsize: the train step needs 8 devices, found {jax.device_count()} "
                         "(XLA_FLAGS was set before this script ran?)")
    cfg = PRESETS[args.preset]()
    result: dict = {"preset": args.preset, "block": args.block, "cache": args.cache}
    if not args.skip_train:
        result["train"] = [compile_train_step(args.preset, args.train_config, args.mesh, impl)
                           for impl in _csv(args.train_moe_impls, "--train-moe-impls")]
        result["train_bytes_per_device"] = {r["moe_impl"]: r["peak_bytes"] for r in result["train"]}
    if not args.skip_decode:
        result["decode"] = decode_rows(cfg, _csv(args.batch, "--batch", int), args.block, args.cache,
                                       parse_variants(args.decode_variants))
        first = result["decode"][0]
        main_rows = [r for r in result["decode"]
                     if (r["dtype"], r["moe_impl"]) == (first["dtype"], first["moe_impl"])]
        result["decode_variant"] = f"{first['dtype']}:{first['moe_impl']}"
        result["decode_bytes_per_forward"] = {r["batch"]: r["xla_bytes"] for r in main_rows}
        result["roofline_bytes_per_forward"] = {r["batch"]: r["roofline_bytes"] for r in main_rows}
    result["wall_s"] = time.perf_counter() - t0
    if not args.json:
        print_report(result)
        print(f"wall {result['wall_s']:.0f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fullsize: {e}") from None
