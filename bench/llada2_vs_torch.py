"""``llada2`` decoding, ours vs the PyTorch reference, side by side in one process on the same weights.

    taskset -c 0 python bench/llada2_vs_torch.py [--gen-lengths 128,256] [--prompts 2] [--json]

Both sides run single-threaded (``torch.set_num_threads(1)``; XLA:CPU without its Eigen thread pool —
this script sets ``XLA_FLAGS`` before importing jax unless you set it), batch 1, float32, greedy,
block 32, 32 steps per block, τ = 0.95 (the HF defaults, algorithm §5.5b). The reference is
``tools/torch_reference`` loaded through ``transformers`` ``trust_remote_code`` exactly as a real
checkpoint would be (its sampler replaced by argmax: the dFactory copy samples even at temperature
0). The weights are random (``--hidden`` etc. set the size), written once as an HF directory that
both sides load. Prints ms per generated token for both (wall and process CPU time: the machine may
be shared), the ratio, NFE, and whether the tokens are identical (they must be: the script exits 1
otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AUTO_MAP = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--gen-lengths", default="128,256", help="comma-separated generation lengths")
    ap.add_argument("--prompt-len", type=int, default=40, help="prompt tokens (random ids)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per generation length (batch 1 each)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per prompt (best kept)")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size of the random model")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (first one dense)")
    ap.add_argument("--experts", type=int, default=16, help="routed experts (top 4 of them)")
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def model_config(args):
    from dmax_jax.config import tiny_config

    return tiny_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=args.hidden // 4, moe_intermediate_size=args.hidden // 2,
                       num_experts=args.experts, num_experts_per_tok=4, n_group=4, topk_group=2,
                       max_position_embeddings=1024)


def random_params(config, seed: int = 0) -> dict:
    """N(0, 1/fan_in) matrices, norms 1 ± 0.3, lm_head ×4 (peaky softmax, so the τ override fires)."""
    from dmax_jax.checkpoint.hf import param_shapes

    rng = np.random.default_rng(seed)
    nq_d = config.num_attention_heads * config.head_dim

    def leaf(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        last = name.rsplit("/", 1)[-1]
        if name.endswith("scale"):
            v = 1.0 + 0.3 * rng.standard_normal(x.shape)
        elif name.endswith("expert_bias"):
            v = 0.2 * rng.standard_normal(x.shape)
        elif name == "embedding":
            v = rng.standard_normal(x.shape)
        else:
            fan_in = {"qkv": config.hidden_size, "out": nq_d}.get(last, x.shape[-2])
            gain = {"router": 2.0, "lm_head": 4.0}.get(last, 1.0)
            v = gain * rng.standard_normal(x.shape) / np.sqrt(fan_in)
        return np.asarray(v, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def write_hf_dir(path: Path, config) -> Path:
    from dmax_jax.checkpoint.hf import save_hf_params

    save_hf_params(random_params(config), config, path)
    for f in ("configuration_llada2_moe.py", "modeling_llada2_moe.py"):
        shutil.copy(REPO / "tools" / "torch_reference" / f, path / f)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = AUTO_MAP
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_reference(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()

    def greedy(logits, temperature=0.0, top_k=None, top_p=None):
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        token = probs.argmax(-1)
        return token, probs.gather(-1, token[..., None])[..., 0]

    model._sample_with_temperature_topk_topp = greedy
    return model


def _timed(fn):
    """``(result, wall seconds, CPU seconds of this process)``: CPU time is robust to other processes
    sharing the cores, wall time is what a user waits."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_length(ours, ref, prompts, gen: int, repeats: int, kw: dict) -> dict:
    """Per prompt, best of ``repeats`` interleaved runs on both sides (whole calls); tokens must agree."""
    import torch

    import dmax_jax

    cfg = ours.config
    dmax_jax.generate(ours, [prompts[0]], gen_length=gen, **kw)  # compile (excluded from the timing)

    def theirs_fn(p):
        with torch.no_grad():
            return ref.generate(inputs=torch.tensor([p]), temperature=0.0, block_length=kw["block_length"],
                                steps=kw["steps"], gen_length=gen, threshold=kw["threshold"],
                                eos_id=cfg.eos_token_id, mask_id=cfg.resolved_mask_token_id)

    tot = {"ours_wall": 0.0, "ours_cpu": 0.0, "torch_wall": 0.0, "torch_cpu": 0.0}
    n_tok, nfe, same = 0, 0, True
    for p in prompts:
        best = {k: float("inf") for k in tot}
        for _ in range(repeats):
            res, w, c = _timed(lambda p=p: dmax_jax.generate(ours, [p], gen_length=gen, **kw))
            best["ours_wall"], best["ours_cpu"] = min(best["ours_wall"], w), min(best["ours_cpu"], c)
            out, w, c = _timed(lambda p=p: theirs_fn(p))
            best["torch_wall"], best["torch_cpu"] = min(best["torch_wall"], w), min(best["torch_cpu"], c)
        tot = {k: tot[k] + best[k] for k in tot}
        theirs = [int(t) for t in out[0].tolist()]
        theirs = theirs[: theirs.index(cfg.eos_token_id)] if cfg.eos_token_id in theirs else theirs
        same &= theirs == res.token_ids[0]
        n_tok += max(len(res.token_ids[0]), 1)
        nfe += res.nfe[0]
    ms = {f"{k}_ms_per_token": 1e3 * v / n_tok for k, v in tot.items()}
    return {"gen_length": gen, "prompts": len(prompts), "tokens": n_tok, "nfe": nfe, **ms,
            "speedup_wall": tot["torch_wall"] / tot["ours_wall"],
            "speedup_cpu": tot["torch_cpu"] / tot["ours_cpu"],
            "identical": bool(same)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import dmax_jax

    torch.set_num_threads(1)
    config = model_config(args)
    rng = np.random.default_rng(1)
    avoid = {config.resolved_mask_token_id, config.eos_token_id}
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, args.prompt_len) if int(t) not in avoid]
               for _ in range(args.prompts)]
    kw = dict(strategy="llada2", block_length=32, steps=32, threshold=0.95, temperature=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_hf_dir(Path(tmp), config)
        ours = dmax_jax.load_pretrained(path, dtype="float32")
        ref = load_reference(path)
        rows = [run_length(ours, ref, prompts, int(g), args.repeats, kw) for g in args.gen_lengths.split(",")]
    setup = {"threads": 1, "xla_flags": os.environ["XLA_FLAGS"], "torch_threads": torch.get_num_threads(),
             "params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(ours.params))),
             "prompt_len": args.prompt_len, **{k: v for k, v in kw.items() if k != "temperature"}}
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows}))
    else:
        print(f"llada2 decoding, batch 1, 1 thread each, {setup['params']:,} parameters, prompt "
              f"{args.prompt_len}, block 32, 32 steps, tau 0.95")
        print("| gen | NFE | tokens | ours ms/token (wall / CPU) | torch ms/token (wall / CPU) "
              "| ours faster (wall / CPU) | tokens identical |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['gen_length']} | {r['nfe']} | {r['tokens']} | {r['ours_wall_ms_per_token']:.2f} / "
                  f"{r['ours_cpu_ms_per_token']:.2f} | {r['torch_wall_ms_per_token']:.2f} / "
                  f"{r['torch_cpu_ms_per_token']:.2f} | {r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x "
                  f"| {r['identical']} |")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
