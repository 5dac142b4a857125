"""Choose SPD's τ_acc on a validation split, never on the reported held-out problems.

    python tools/sweep_accept_threshold.py [--out runs/val_tau_acc] [--n 500] [--accept 0.9,0.7,0.5,0.3]
                                           [--thresholds 0.8,0.7,0.5,0.3,0]

The validation rows are held-out problems of another seed (seed 1) minus every question of the
1,000 reported ones (seed 0), so picking a knob here cannot fit the reported table. Prints base +
threshold (τ = 0.95) and dmax + SPD for every (τ_acc, τ_dec), then the fastest dmax + SPD setting
within 2 points of base; ``tools/eval_demo.py --accept-threshold X`` then reports it on the 1,000.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dmax_jax import demo  # noqa: E402
from dmax_jax.demo.grid import fastest_kept  # noqa: E402


def validation_rows(n: int) -> list[dict[str, str]]:
    """``n`` held-out problems of seed 1 that are not among the reported seed-0 ones."""
    reported = {r["question"] for r in demo.test_problems(1000, seed=0)}
    rows = [r for r in demo.test_problems(n + 300, seed=1) if r["question"] not in reported][:n]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} validation problems outside the reported ones (asked {n})")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/val_tau_acc"))
    ap.add_argument("--n", type=int, default=500, help="validation problems")
    ap.add_argument("--accept", default="0.9,0.7,0.5,0.3", help="τ_acc values")
    ap.add_argument("--thresholds", default="0.8,0.7,0.5,0.3,0", help="τ_dec values")
    args = ap.parse_args(argv)
    from dmax_jax.demo.task import write_jsonl
    from dmax_jax.eval.benchmarks import get_benchmark

    rows = get_benchmark("gsm8k").load(write_jsonl(args.out / "val.jsonl", validation_rows(args.n)))
    base = demo.evaluate_grid({"base": demo.load_demo_model("base")}, rows, out_dir=args.out / "base",
                              strategies=("threshold",), thresholds=[0.95], progress=False)[0]
    print(f"base + threshold τ=0.95: {100 * base['accuracy']:.1f}% @ {base['tpf']:.2f} TPF", flush=True)
    dmax, cells = demo.load_demo_model("dmax"), []
    for acc in (float(a) for a in args.accept.split(",")):
        dec = dataclasses.replace(demo.DEMO_DECODE, accept_threshold=acc)
        for r in demo.evaluate_grid({"dmax": dmax}, rows, out_dir=args.out / f"tau_acc_{acc:g}",
                                    strategies=("spd",), decode=dec, progress=False,
                                    thresholds=[float(t) for t in args.thresholds.split(",")]):
            cells.append({"accept_threshold": acc, **r})
            print(f"dmax + SPD τ_acc={acc:g} τ={r['threshold']:g}: {100 * r['accuracy']:.1f}% @ "
                  f"{r['tpf']:.2f} TPF ({r['tpf'] / base['tpf']:.2f}x)", flush=True)
    best = fastest_kept(cells, base)
    sweep = {"base": base, "dmax_spd": cells, "chosen": best}
    (args.out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    if best is None:
        print("no dmax + SPD setting within 2 points of base on the validation split")
        return 1
    print(f"chosen: τ_acc={best['accept_threshold']:g} τ={best['threshold']:g} "
          f"({100 * best['accuracy']:.1f}% @ {best['tpf']:.2f} TPF, {best['tpf'] / base['tpf']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
