"""Roofline of one decode forward: bytes, FLOPs and the floor in ms on a named chip (no device needed).

    python bench/roofline.py [--preset dmax_16b] [--batch 1,8,32] [--block 32] [--cache 2048]
                             [--chip h200] [--chips 1] [--json]
    python bench/roofline.py --model DIR [--prompt TEXT] [--gen-length 256]   # + measured routing

The counts come from ``dmax_jax.perf.roofline`` (its docstring says what is counted and why).
Distinct experts per MoE layer: the uniform-routing expectation ``E·(1 − (1 − K/E)^T)``; with
``--model`` also the mean over the block forwards of a real SPD decode of ``--prompt`` (the router's
choices are read inside the compiled program through a method interceptor + host callback), and
the floor under that measured routing. The ``spd mean`` line is the per-forward floor of batch-1
SPD at ``--tpf`` tokens per forward: one cross-block forward (2 blocks) per block, the rest 1 block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmax_jax.config import PRESETS, ModelConfig  # noqa: E402
from dmax_jax.perf import roofline as rf  # noqa: E402

DEFAULT_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                  "in May. How many clips did Natalia sell altogether in April and May?")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="dmax_16b", choices=sorted(PRESETS))
    ap.add_argument("--model", help="HF model directory: its config, and routing measured on a real decode")
    ap.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--cache", type=int, default=2048, help="cached positions each row attends")
    ap.add_argument("--chip", default="h200", choices=sorted(rf.CHIPS))
    ap.add_argument("--chips", type=int, default=1, help="chips sharing the bytes evenly")
    ap.add_argument("--weight-dtype", default="bfloat16", choices=sorted(rf.DTYPE_BYTES))
    ap.add_argument("--tpf", type=float, default=6.2, help="tokens per forward for the spd-mean line "
                    "(6.2 = mean of the reference's six DMax TPF figures)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="--model: the decoded prompt")
    ap.add_argument("--gen-length", type=int, default=256, help="--model: tokens generated")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    return ap.parse_args(argv)


def batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch {text!r}: expected comma-separated integers") from None
    if not out or min(out) < 1:
        raise SystemExit(f"--batch {text!r}: batch sizes must be >= 1")
    return out


def rows(cfg: ModelConfig, args: argparse.Namespace, measured: dict[int, float] | None) -> list[dict]:
    """One dict per batch size: bytes by part, totals, FLOPs and floors (uniform, and measured)."""
    out = []
    for b in batches(args.batch):
        parts = rf.forward_bytes(cfg, b, args.block, args.cache, weight_dtype=args.weight_dtype)
        fl = rf.floor(cfg, b, args.block, args.cache, args.chip, chips=args.chips,
                      weight_dtype=args.weight_dtype)
        uniform = (rf.expected_distinct_experts(cfg.num_experts, cfg.num_experts_per_tok, b * args.block)
                   if cfg.num_moe_layers else 0.0)
        row = {"batch": b, "tokens": b * args.block, "distinct_experts": uniform,
               "bytes": fl.bytes, "bytes_by_part": parts, "flops": fl.flops,
               "floor_ms": fl.ms, "memory_ms": fl.memory_ms, "compute_ms": fl.compute_ms, "bound": fl.bound}
        if measured and b in measured:
            m = rf.floor(cfg, b, args.block, args.cache, args.chip, chips=args.chips,
                         weight_dtype=args.weight_dtype, distinct_experts=measured[b])
            row.update(measured_distinct_experts=measured[b], measured_bytes=m.bytes, measured_floor_ms=m.ms)
        out.append(row)
    return out


def print_table(cfg: ModelConfig, cfg_name: str, args: argparse.Namespace, table: list[dict],
                spd_ms: float) -> None:
    chip = rf.get_chip(args.chip)
    print(f"{cfg_name}: block {args.block}, cache {args.cache}, weights {args.weight_dtype}, "
          f"{args.chips} x {chip.name} ({chip.hbm_bytes_per_s / 1e12:.3g} TB/s, "
          f"{chip.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16; {rf.DATA_SHEET})")
    head = ["batch", "experts/layer", "experts GB", "other GB", "KV GB", "total GB", "GFLOP", "floor ms",
            "bound"]
    widths = [5, 13, 10, 8, 7, 8, 8, 8, 7]
    measured = any("measured_floor_ms" in r for r in table)
    if measured:
        head += ["measured experts", "measured ms"]
        widths += [16, 11]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in table:
        p = r["bytes_by_part"]
        other = r["bytes"] - p["routed_experts"] - p["kv_cache"]
        cells = [r["batch"], f"{r['distinct_experts']:.1f}", f"{p['routed_experts'] / 1e9:.2f}",
                 f"{other / 1e9:.2f}", f"{p['kv_cache'] / 1e9:.2f}", f"{r['bytes'] / 1e9:.2f}",
                 f"{r['flops'] / 1e9:.0f}", f"{r['floor_ms']:.2f}", r["bound"]]
        if measured:
            got = "measured_floor_ms" in r
            cells += [f"{r['measured_distinct_experts']:.1f}" if got else "-",
                      f"{r['measured_floor_ms']:.2f}" if got else "-"]
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
    need = rf.weight_bytes(cfg, args.weight_dtype)
    print(f"weights {need / 1e9:.1f} GB: {'fit' if need < args.chips * chip.hbm_bytes else 'do NOT fit'} in "
          f"{args.chips} x {chip.hbm_bytes / 1e9:.0f} GB (KV cache and activations not counted)")
    print(f"spd mean per forward at batch 1, TPF {args.tpf}: {spd_ms:.2f} ms "
          f"(1 cross-block forward of {2 * args.block} tokens per block of {args.block / args.tpf:.2f} "
          "forwards)")


# ---- measured routing -------------------------------------------------------------------------------
def measure_routing(model, prompt_ids: list[int], *, block: int, gen_length: int) -> dict[str, float]:
    """Distinct experts per MoE layer call during a real SPD decode of one prompt, averaged over the
    calls that saw exactly one block (the ``block_forward`` steps) and over the cross-block ones."""
    import flax.linen as nn
    import jax
    import numpy as np

    from dmax_jax.decoding import api
    from dmax_jax.model.moe import MoE, route

    seen: list[tuple[int, int]] = []

    def record(idx):
        idx = np.asarray(idx)
        seen.append((idx.shape[0], len(np.unique(idx))))

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, MoE) and context.method_name == "__call__":
            cfg = mod.config
            u = args[0].reshape(-1, cfg.hidden_size)
            logits = u.astype(np.float32) @ mod.get_variable("params", "router").astype(np.float32)
            bias = (mod.get_variable("params", "expert_bias") if cfg.moe_router_enable_expert_bias
                    else jax.numpy.zeros((cfg.num_experts,), np.float32))
            jax.debug.callback(record, route(logits, bias, cfg)[0])
        return out

    api.clear_compiled()  # the interceptor must be traced into a fresh program (and not reused later)
    try:
        with nn.intercept_methods(interceptor):
            res = api.generate(model, [prompt_ids], strategy="spd", block_length=block, gen_length=gen_length)
    finally:
        api.clear_compiled()
    single = [d for n, d in seen if n == block]
    cross = [d for n, d in seen if n == 2 * block]
    if not single:
        raise RuntimeError("no single-block forward was observed during the decode")
    return {"block_forward": float(np.mean(single)), "block_forward_calls": len(single),
            "cross_forward": float(np.mean(cross)) if cross else float("nan"),
            "layer_calls": len(seen), "nfe": int(res.nfe[0])}


def load_model(path: str, prompt: str):
    from dmax_jax import load_pretrained
    from dmax_jax.data.chat import apply_chat_template, encode

    model = load_pretrained(path, "float32")
    if model.tokenizer is None:
        raise SystemExit(f"--model {path}: no tokenizer files; the measured routing needs one")
    try:
        ids = apply_chat_template(model.tokenizer, [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a tokenizer without a chat template: plain text
        ids = encode(model.tokenizer, prompt)
    return model, ids


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.block < 1 or args.cache < 0 or args.chips < 1:
        raise SystemExit("--block and --chips must be >= 1, --cache >= 0")
    measured, routing = None, None
    if args.model:
        if not Path(args.model).is_dir():
            raise SystemExit(f"--model {args.model}: not a directory")
        model, ids = load_model(args.model, args.prompt)
        cfg, name = model.config, args.model
        routing = measure_routing(model, ids, block=args.block, gen_length=args.gen_length)
        measured = {1: routing["block_forward"]}
    else:
        cfg, name = PRESETS[args.preset](), args.preset
    table = rows(cfg, args, measured)
    spd_ms = rf.spd_mean_floor_ms(cfg, args.tpf, args.block, args.cache, args.chip, chips=args.chips)
    result = {"config": name, "block": args.block, "cache": args.cache, "chip": args.chip,
              "chips": args.chips,
              "weight_dtype": args.weight_dtype, "source": rf.DATA_SHEET, "rows": table,
              "spd_mean_floor_ms": spd_ms, "tpf": args.tpf, "measured_routing": routing,
              "weight_bytes": rf.weight_bytes(cfg, args.weight_dtype)}
    if args.json:
        print(json.dumps(result))
    else:
        print_table(cfg, name, args, table, spd_ms)
        if routing:
            print(f"measured routing ({routing['block_forward_calls']} block forwards): "
                  f"{routing['block_forward']:.1f} distinct experts per layer per block forward, "
                  f"{routing['cross_forward']:.1f} per cross-block forward")
    return result


if __name__ == "__main__":
    try:
        main()
    except rf.RooflineError as e:
        raise SystemExit(f"roofline: {e}") from None
