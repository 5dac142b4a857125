"""Parity check: our JAX LLaDA2-MoE against the PyTorch model of the same HF directory.

    python tools/compare_torch.py --hf-dir DIR [--dtype float32] [--tol 1e-4] [--no-generate] [--json] ...
    (flags and their checks: tools/compare_torch_cli.py; ``--help`` lists them with defaults)

Why: a port is only trustworthy if, on the same weights, it reproduces the reference implementation.
The PyTorch side is loaded exactly as users load the checkpoint — ``transformers.AutoModelForCausalLM
.from_pretrained(DIR, trust_remote_code=True)`` through the directory's ``auto_map`` (LLaDA2.0-mini
and DMax ship ``"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig"`` and
``"AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"``); ours through
``dmax_jax.load_pretrained(DIR)``. The torch-side attention masks are built here from the set
formulas of algorithm §2 (independently of ``dmax_jax.model.masks``) and passed the way the dFactory
``generate`` passes them: a 4-D additive mask (0 / -inf) in the model dtype.

Cases: logits under the ``full``, ``block_causal`` and ``noisy_clean`` masks, logits from
``inputs_embeds`` (soft mixtures of token and mask embeddings, as SPD feeds them), and ``llada2``
decoding (algorithm §5.5b) token for token. The real dFactory ``generate`` samples multinomially even at
temperature 0; when the loaded class does not declare ``greedy_at_zero_temperature`` its sampler is
replaced by argmax for this comparison (the generate loop itself is left untouched).

Verdict: PASS when every logits case has ``max |ours - torch| / max |torch| <= tol`` and the decoded
tokens are identical. Exit code 0 on PASS, 1 on FAIL, 2 on bad input (one line ``compare_torch.py: error:
...`` naming the flag, file or field; checked before any weights load) or a loading error. Use float32 for
verdicts: in bfloat16 both implementations drift from float32 by rounding that flips MoE routing
decisions on some tokens, so element-wise maxima there measure routing luck more than correctness.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.append(str(Path(__file__).resolve().parent))  # the sibling compare_torch_cli.py
from compare_torch_cli import DEFAULT_TOL, PERTURB_RE, PROG, build_parser, check_inputs  # noqa: E402

from dmax_jax.checkpoint.hf import CheckpointError  # noqa: E402
from dmax_jax.config import DtypeError, ModelConfigError  # noqa: E402
from dmax_jax.decoding.config import DecodeConfigError  # noqa: E402


# ---- algorithm §2 masks and positions, written from the set formulas ---------------------------------
def allowed_matrix(kind: str, length: int, block: int) -> np.ndarray:
    """``[length, length]`` bool, True where query q may attend key k (algorithm §2.1 / §2.2)."""
    j = np.arange(length)
    if kind == "full":
        return np.ones((length, length), bool)
    if kind == "block_causal":
        b = j // block
        return b[None, :] <= b[:, None]
    if kind == "noisy_clean":
        if length % 2:
            raise ValueError(f"noisy_clean needs an even length [noisy | clean], got {length}")
        half = length // 2
        clean = j >= half
        blk = (j - half * clean) // block
        bq, bk = blk[:, None], blk[None, :]
        cq, ck = clean[:, None], clean[None, :]
        bd = (bq == bk) & (cq == ck)
        obc = (bq > bk) & ~cq & ck
        bc = (bq >= bk) & cq & ck
        return bd | obc | bc
    raise ValueError(f"unknown mask kind {kind!r}")


def positions_for(kind: str, length: int) -> np.ndarray:
    """Absolute positions; the two halves of ``noisy_clean`` both use ``0..L-1`` (algorithm §2.1)."""
    if kind == "noisy_clean":
        return np.concatenate([np.arange(length // 2), np.arange(length // 2)])
    return np.arange(length)


# ---- loading ----------------------------------------------------------------------------------------
def load_torch(hf_dir: str, dtype: str, device: str):
    """The directory's PyTorch model via ``auto_map`` remote code; missing/unexpected keys are errors
    (a silently random-initialised tensor would show up as a bogus divergence)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                       output_loading_info=True, **{dtype_kw: tdt})
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise RuntimeError(f"PyTorch model from {hf_dir} did not load cleanly: "
                           + "; ".join(f"{k}: {v[:8]}" for k, v in problems.items() if v))
    return model.to(device).eval()


def apply_perturbation(model, spec: str) -> str:
    """``NAME[i,j,...]+=DELTA`` on a parameter or buffer of the torch model (a sensitivity self-check)."""
    import torch

    m = PERTURB_RE.match(spec)
    if not m:
        raise ValueError(f"--perturb-torch {spec!r}: expected NAME[i,j,...]+=DELTA")
    name, idx, delta = m.group(1), tuple(int(i) for i in m.group(2).split(",")), float(m.group(3))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if name not in tensors:
        raise ValueError(f"--perturb-torch: the torch model has no parameter or buffer {name!r}")
    t = tensors[name]
    if len(idx) != t.dim() or any(not 0 <= i < s for i, s in zip(idx, t.shape)):
        raise ValueError(f"--perturb-torch: index {list(idx)} does not fit {name} of shape {list(t.shape)}")
    with torch.no_grad():
        t[idx] += delta
    return f"{name}{list(idx)} += {delta}"


# ---- cases -----------------------------------------------------------------------------------------
def random_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, avoid: list[int]) -> np.ndarray:
    """Uniform ids over the vocabulary without the ``avoid`` ids (mask, and EOS for prompts)."""
    keep = np.setdiff1d(np.arange(vocab), np.asarray(avoid))
    return keep[rng.integers(0, keep.size, shape)].astype(np.int64)


def compare_logits(name: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> dict[str, Any]:
    """Max abs / relative (to max |ref|) difference, argmax agreement, first position over tolerance."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    per_pos = diff.max(-1) / max(scale, 1e-30)  # [batch, length]
    bad = np.argwhere(per_pos > tol)
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())
    rel = float(per_pos.max()) if finite else float("inf")
    return {"case": name, "shape": list(ref.shape), "max_abs_torch": scale, "max_abs_diff": float(diff.max()),
            "max_rel_diff": rel, "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "first_diverging": None if not len(bad) else {"row": int(bad[0][0]), "position": int(bad[0][1])},
            "ok": finite and rel <= tol}


def logits_cases(pre, model, args, tol: float) -> list[dict[str, Any]]:
    import torch

    cfg = pre.config
    mask_id, vocab = cfg.resolved_mask_token_id, cfg.vocab_size
    rng = np.random.default_rng(args.seed)
    dev = next(model.parameters()).device
    tdt = next(model.parameters()).dtype
    ids = random_ids(rng, (args.batch, args.seq_len), vocab, [mask_id])
    noisy = np.where(rng.random(ids.shape) < 0.5, mask_id, ids)  # masked diffusion input, algorithm §3
    table = model.get_input_embeddings().weight.detach().to(torch.float32).cpu().numpy()
    p = rng.random((args.batch, args.seq_len, 1)).astype(np.float32)
    soft = torch.from_numpy(p * table[ids] + (1 - p) * table[mask_id]).to(tdt)  # SPD-like soft inputs
    soft = soft.to(torch.float32).cpu().numpy()  # both sides get the same (model-dtype) values

    cases = [("full", "full", ids, None), ("block_causal", "block_causal", ids, None),
             ("noisy_clean", "noisy_clean", np.concatenate([noisy, ids], 1), None),
             ("inputs_embeds", "block_causal", None, soft)]
    out = []
    for name, kind, x, emb in cases:
        length = (x if x is not None else emb).shape[1]
        allowed = torch.from_numpy(allowed_matrix(kind, length, args.block_length)).to(dev)
        additive = torch.zeros(allowed.shape, dtype=tdt, device=dev).masked_fill(~allowed, float("-inf"))
        pos = torch.from_numpy(positions_for(kind, length))[None].to(dev)
        with torch.no_grad():
            kw = ({"input_ids": torch.from_numpy(x).to(dev)} if x is not None
                  else {"inputs_embeds": torch.from_numpy(emb).to(device=dev, dtype=tdt)})
            ref = model(attention_mask=additive[None, None], position_ids=pos, **kw).logits
        ref = ref.to(torch.float32).cpu().numpy()
        ours = pre.forward(x, mask=kind, block_length=args.block_length) if x is not None else \
            pre.forward(inputs_embeds=emb, mask=kind, block_length=args.block_length)
        out.append(compare_logits(name, np.asarray(ours, np.float32), ref, tol))
    return out


def _greedy_sampler(logits, temperature=0.0, top_k=None, top_p=None):
    import torch

    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    token = probs.argmax(-1)
    return token, probs.gather(-1, token[..., None])[..., 0]


def generation_case(pre, model, args) -> dict[str, Any]:
    """``llada2`` decoding on both sides; the first diverging generated token or ``identical``."""
    import torch

    try:
        import dmax_jax

        ours_generate = dmax_jax.generate
    except (ImportError, AttributeError) as e:
        return {"case": "llada2", "skipped": f"dmax_jax.generate is not available ({e})", "ok": True}
    cfg = pre.config
    mask_id, eos_id = cfg.resolved_mask_token_id, cfg.eos_token_id
    if eos_id is None:
        raise ValueError("the model config has no eos_token_id; llada2 decoding needs one")
    note = None
    if not getattr(type(model), "greedy_at_zero_temperature", False):
        if not hasattr(model, "_sample_with_temperature_topk_topp"):
            return {"case": "llada2", "skipped": "the torch model has no _sample_with_temperature_topk_topp "
                    "to make greedy; its generate would sample", "ok": True}
        model._sample_with_temperature_topk_topp = _greedy_sampler
        note = "torch sampler replaced by argmax (the dFactory generate samples even at temperature 0)"
    rng = np.random.default_rng(args.seed + 1)
    prompts = random_ids(rng, (args.batch, args.prompt_len), cfg.vocab_size, [mask_id, eos_id]).tolist()
    steps = args.steps or args.block_length
    res = ours_generate(pre, prompts, strategy="llada2", block_length=args.block_length,
                        gen_length=args.gen_length, threshold=args.threshold, steps=steps, temperature=0.0)
    dev = next(model.parameters()).device
    rows = []
    for r, prompt in enumerate(prompts):
        out = model.generate(inputs=torch.tensor([prompt], device=dev), temperature=0.0,
                             block_length=args.block_length, steps=steps, gen_length=args.gen_length,
                             threshold=args.threshold, eos_id=eos_id, mask_id=mask_id)
        theirs = [int(t) for t in out[0].tolist()]
        if eos_id in theirs:  # the HF generate keeps the first EOS; ours cuts before it
            theirs = theirs[: theirs.index(eos_id)]
        ours = list(res.token_ids[r])
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if first is None and len(ours) != len(theirs):
            first = min(len(ours), len(theirs))
        row = {"row": r, "ours_len": len(ours), "torch_len": len(theirs), "first_diverging": first}
        if first is not None:
            row["ours_token"] = ours[first] if first < len(ours) else "<end>"
            row["torch_token"] = theirs[first] if first < len(theirs) else "<end>"
        rows.append(row)
    ok = all(r["first_diverging"] is None for r in rows)
    return {"case": "llada2", "rows": rows, "ok": ok, "note": note,
            "settings": {"prompt_len": args.prompt_len, "gen_length": args.gen_length, "steps": steps,
                         "block_length": args.block_length, "threshold": args.threshold}}


# ---- report ----------------------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    lines = [f"ours: dmax_jax.load_pretrained({report['hf_dir']!r})   torch: {report['torch_class']} "
             f"from {report['torch_hf_dir']!r}   dtype {report['dtype']}   tol {report['tol']:g}"]
    if report.get("perturbation"):
        lines.append(f"torch weights perturbed: {report['perturbation']}")
    lines.append(f"{'case':<14} {'shape':<16} {'max|torch|':>11} {'max abs diff':>13} {'max rel diff':>13} "
                 f"{'argmax agree':>13}  first diverging (row, pos)   status")
    for c in report["logits"]:
        fd = c["first_diverging"]
        where = "-" if fd is None else f"({fd['row']}, {fd['position']})"
        lines.append(f"{c['case']:<14} {str(c['shape']):<16} {c['max_abs_torch']:>11.4g} "
                     f"{c['max_abs_diff']:>13.3e} {c['max_rel_diff']:>13.3e} {c['argmax_agree']:>13.4f}  "
                     f"{where:<28} "
                     f"{'ok' if c['ok'] else 'DIVERGES'}")
    g = report.get("generation")
    if g is None:
        lines.append("llada2 decoding: not run (--no-generate)")
    elif "skipped" in g:
        lines.append(f"llada2 decoding: skipped — {g['skipped']}")
    else:
        s = g["settings"]
        lines.append(f"llada2 decoding (prompt {s['prompt_len']}, gen {s['gen_length']}, block "
                     f"{s['block_length']}, steps {s['steps']}, threshold {s['threshold']}):")
        if g.get("note"):
            lines.append(f"  note: {g['note']}")
        for r in g["rows"]:
            if r["first_diverging"] is None:
                lines.append(f"  row {r['row']}: identical ({r['ours_len']} tokens)")
            else:
                lines.append(f"  row {r['row']}: first diverging token at generated position "
                             f"{r['first_diverging']}: ours {r['ours_token']} vs torch {r['torch_token']} "
                             f"(lengths {r['ours_len']} / {r['torch_len']})")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; bad input → one ``error:`` line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        import torch  # noqa: F401  (optional extra: pip install -e .[torch])
    except ImportError:
        print(f"{PROG}: error: PyTorch is not installed (pip install -e .[torch])", file=sys.stderr)
        return 2
    try:
        check_inputs(args)
        return _compare(args)
    except DecodeConfigError as e:  # every field checked here is a flag of the same name
        print(f"{PROG}: error: --{e.field.replace('_', '-')}: {e.reason}", file=sys.stderr)
    except (ModelConfigError, CheckpointError, DtypeError, OSError, RuntimeError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


def _compare(args: argparse.Namespace) -> int:
    import jax
    import torch

    import dmax_jax

    tol = DEFAULT_TOL[args.dtype] if args.tol is None else args.tol
    torch_dir = args.torch_hf_dir or args.hf_dir
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.dtype == "float32":  # f32 parity means f32 matmuls on accelerators too
        jax.config.update("jax_default_matmul_precision", "highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pre = dmax_jax.load_pretrained(args.hf_dir, dtype=args.dtype)
    model = load_torch(torch_dir, args.dtype, args.torch_device)
    perturbation = apply_perturbation(model, args.perturb_torch) if args.perturb_torch else None
    report: dict[str, Any] = {"hf_dir": args.hf_dir, "torch_hf_dir": torch_dir, "dtype": args.dtype,
                              "tol": tol, "torch_class": type(model).__name__, "perturbation": perturbation}
    report["logits"] = logits_cases(pre, model, args, tol)
    report["generation"] = None if args.no_generate else generation_case(pre, model, args)
    ok = all(c["ok"] for c in report["logits"]) and (report["generation"] or {"ok": True})["ok"]
    report["verdict"] = "PASS" if ok else "FAIL"
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
