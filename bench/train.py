"""OPUT train step vs plain masked-diffusion (MDM) step on the same model and batch, side by side.

OPUT adds one no-grad forward (the rollout) to a forward + backward, so its step should cost about
4/3 of the MDM step (target ≤ 1.45×). Also reports peak memory of the compiled step with and
without rematerialisation (XLA's compiled memory analysis; nothing is run for those).

    python bench/train.py                         # H=256, 4 layers, 2L=512: quick on CPU
    python bench/train.py --hidden 1024 --layers 8 --length 2048 --dtype bfloat16   # accelerator
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import tiny_config
from dmax_jax.model.llada2 import init_params
from dmax_jax.training.optim import OptimConfig, make_optimizer
from dmax_jax.training.state import init_train_state
from dmax_jax.training.step import StepConfig, make_train_step, oput_rollout

MASK_ID = 2


def model_config(args):
    heads = max(args.hidden // 64, 1)
    return tiny_config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        head_dim=64, first_k_dense_replace=1, moe_intermediate_size=args.hidden // 2,
        num_experts=args.experts, num_experts_per_tok=4, n_group=4, topk_group=2,
        max_position_embeddings=max(4096, args.length))


def make_batch(args) -> dict[str, np.ndarray]:
    """σ = 0.75 noise on the response, 1/8 of each row is prompt; half the rows have the OPUT flag."""
    rng = np.random.default_rng(0)
    b, n = args.batch, args.length
    clean = rng.integers(3, args.vocab, (b, n)).astype(np.int32)
    response = np.arange(n)[None, :] >= n // 8
    noisy = np.where(response & (rng.random((b, n)) < 0.75), MASK_ID, clean).astype(np.int32)
    return {"input_ids": clean, "noisy_input_ids": noisy, "labels": np.where(response, clean, -100),
            "flag": np.arange(b) % 2 == 0, "example_index": np.arange(b)}


def peak_bytes(compiled) -> tuple[float, float]:
    """(peak ≈ arguments + outputs + temporaries − donated aliases, temporaries) in MiB."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan"), float("nan")
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20, m.temp_size_in_bytes / 2**20


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--length", type=int, default=256, help="L: the forward runs on 2L tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="xla_dense")
    ap.add_argument("--iters", type=int, default=10)
    return ap.parse_args()


def main() -> None:
    args = parse_args()

    cfg = model_config(args)
    batch = {k: jnp.asarray(v) for k, v in make_batch(args).items()}
    params = init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"backend={jax.default_backend()} H={args.hidden} layers={args.layers} experts={args.experts} "
          f"V={args.vocab} batch={args.batch} 2L={2 * args.length} dtype={args.dtype} "
          f"attention={args.attention} params={n_params / 1e6:.1f}M")
    opt = make_optimizer(OptimConfig(total_steps=1000, lr=1e-5))

    def compiled(mode: str, remat):
        scfg = StepConfig(mask_id=MASK_ID, mode=mode, block_length=args.block, compute_dtype=args.dtype,
                          remat=remat, attention_backend=args.attention)
        state = init_train_state(jax.tree.map(jnp.copy, params), opt)  # the step donates its state
        t0 = time.perf_counter()
        fn = jax.jit(make_train_step(cfg, scfg, opt), donate_argnums=0).lower(state, batch).compile()
        return fn, state, time.perf_counter() - t0

    # the rollout alone (one no-grad forward): what OPUT adds on top of the MDM step
    roll_cfg = StepConfig(mask_id=MASK_ID, block_length=args.block, compute_dtype=args.dtype,
                          attention_backend=args.attention)
    t0 = time.perf_counter()
    roll = jax.jit(lambda p, b: oput_rollout(p, cfg, roll_cfg, b)).lower(params, batch).compile()
    roll_compile = time.perf_counter() - t0

    progs, states, compile_s = {}, {}, {}
    for mode in ("mdm", "oput"):
        progs[mode], states[mode], compile_s[mode] = compiled(mode, None)

    def run(mode):
        if mode == "rollout":
            return roll(params, batch)
        states[mode], m = progs[mode](states[mode], batch)
        return m

    # interleaved (mdm, oput, rollout, mdm, ...) so that load changes on a shared machine hit all alike
    samples = {m: [] for m in ("mdm", "oput", "rollout")}
    for i in range(args.iters + 1):
        for mode in samples:
            t0 = time.perf_counter()
            jax.block_until_ready(run(mode))
            if i:  # the first round is the warm-up
                samples[mode].append(time.perf_counter() - t0)
    times = {m: float(np.median(v)) for m, v in samples.items()}
    rows = []
    for mode in ("mdm", "oput"):
        peak, temp = peak_bytes(progs[mode])
        rows.append((mode, "none", times[mode] * 1e3, args.batch * args.length / times[mode], peak, temp,
                     compile_s[mode]))
    peak, temp = peak_bytes(roll)
    rows.append(("rollout", "none", times["rollout"] * 1e3, float("nan"), peak, temp, roll_compile))
    for remat in ("full", "dots"):
        fn, _, t_compile = compiled("oput", remat)
        peak, temp = peak_bytes(fn)
        rows.append(("oput", remat, float("nan"), float("nan"), peak, temp, t_compile))

    print(f"\n{'mode':<9}{'remat':<7}{'step ms':>10}{'tokens/s':>11}{'peak MiB':>10}{'temp MiB':>10}"
          f"{'compile s':>11}")
    for mode, remat, ms, tps, peak, temp, tc in rows:
        ms_s = "-" if np.isnan(ms) else f"{ms:.1f}"
        tps_s = "-" if np.isnan(tps) else f"{tps:.0f}"
        print(f"{mode:<9}{remat:<7}{ms_s:>10}{tps_s:>11}{peak:>10.1f}{temp:>10.1f}{tc:>11.1f}")
    ratio = times["oput"] / times["mdm"]
    print(f"\nOPUT / MDM step time: {ratio:.2f}x (target <= 1.45x; one extra no-grad forward ≈ 1.33x) "
          f"[{'ok' if ratio <= 1.45 else 'ABOVE TARGET'}]")
    print(f"rollout forward / MDM step: {times['rollout'] / times['mdm']:.2f} (expected about 1/3: a "
          "forward is ~1/3 of forward + backward; OPUT step ≈ MDM step + rollout)")
    print("tokens/s counts the L noisy-half (trained) tokens per row; timings: median of "
          f"{args.iters} interleaved rounds after one warm-up round.")


if __name__ == "__main__":
    main()
