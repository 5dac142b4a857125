"""Full-size DMax-16B programs compiled by the chips' own compilers, from this host (no chip).

    python bench/aot.py [--only train,generate,engine,bytes] [--out results/aot]

Each case is ``python -m dmax_jax.aot`` (``dmax_jax.aot.compile_program``) on a named chip and
topology: the OPUT step at the reference recipe on 8 x H200 and on TPU v5p (the recipe on
v5p:2x2x2; ``configs/dmax_16b_pod.yaml`` on v5p:4x4x4), ``generate`` (SPD) at batch 1 / 8 / 32 and
the serving engine's round program (16 slots) on one H200 and on a TPU v6e slice (32 GiB chips:
the 32 GB of bf16 weights sharded expert-parallel over 4 chips). Then the TPU compiler's bytes per
decode forward at the real depth (one v5p chip, batch 1) next to the roofline floor
(``dmax_jax.perf.roofline``). Prints one table; writes one JSON per case under ``--out``.
Needs the ``aot`` extra. Takes 20-40 minutes on a 2-core host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

RECIPE = str(REPO / "configs" / "llada2_mini_oput.yaml")
POD = str(REPO / "configs" / "dmax_16b_pod.yaml")
DECODE = {"model": "preset:dmax_16b", "prompt_len": 256, "gen_length": 256}
CASES = {
    "train": [
        dict(target="h200", topology="1x1x8", program="train", config=RECIPE),
        dict(target="v5p", topology="v5p:2x2x2", program="train", config=RECIPE),
        dict(target="v5p", topology="v5p:4x4x4", program="train", config=POD),
    ],
    "generate": [dict(target=t, topology=topo, program="generate", batch=b, **DECODE)
                 for t, topo in (("h200", "1x1x1"), ("v6e", "v6e:2x2")) for b in (1, 8, 32)],
    "engine": [dict(target=t, topology=topo, program="engine", max_batch=16, **DECODE)
               for t, topo in (("h200", "1x1x1"), ("v6e", "v6e:2x2"))],
}


def _name(case: dict) -> str:
    extra = f"_b{case['batch']}" if "batch" in case else ""
    return f"{case['program']}_{case['target']}_{case['topology'].replace(':', '_')}{extra}"


def run_case(case: dict, out: Path) -> dict:
    from dmax_jax.aot import compile_program

    t0 = time.perf_counter()
    try:
        report = compile_program(**case)
    except Exception as e:  # noqa: BLE001  (a failed compile is a row of the table, with its reason)
        report = {**case, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"{_name(case)}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def forward_bytes_row(target: str = "v5p", batch: int = 1, block: int = 32, cache: int = 2048) -> dict:
    """The TPU compiler's bytes per decode block forward at the real depth (depth-corrected, as in
    bench/fullsize.py) next to the roofline floor in bf16."""
    from bench.fullsize import depth_corrected_cost  # noqa: PLC0415
    from dmax_jax.aot.targets import topology_devices  # noqa: PLC0415
    from dmax_jax.config import PRESETS  # noqa: PLC0415
    from dmax_jax.perf import roofline as rf  # noqa: PLC0415

    cfg = PRESETS["dmax_16b"]()
    device = topology_devices(target, None)[0]
    got = depth_corrected_cost(cfg, batch, block, cache, "bfloat16", None, device)
    floor = rf.floor(cfg, batch, block, cache, "h200", weight_dtype="bfloat16")
    every = sum(rf.forward_bytes(cfg, batch, block, cache, weight_dtype="bfloat16",
                                 distinct_experts=cfg.num_experts).values())
    return {"target": target, "batch": batch, "block": block, "cache": cache,
            "compiled_bytes": got["bytes"], "roofline_bytes": floor.bytes, "all_experts_bytes": every,
            "ratio_to_roofline": got["bytes"] / floor.bytes,
            "compiled_bytes_per_moe_layer": got["bytes_per_moe_layer"]}


def _gb(x) -> str:
    return f"{x / 1e9:7.1f}" if isinstance(x, (int, float)) else f"{'-':>7s}"


def print_table(rows: list[dict]) -> None:
    print(f"{'program':9s} {'target':6s} {'topology':10s} {'mesh':26s} {'batch':>5s} {'peak GB':>7s} "
          f"{'HBM GB':>7s} {'fits':5s} {'compile s':>9s}  kernels")
    for r in rows:
        if "error" in r:
            print(f"{r['program']:9s} {r['target']:6s} {r['topology']:10s} ERROR {r['error']}")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        batch = r.get("global_batch", r.get("batch", r.get("max_batch", "")))
        kernels = ", ".join(f"{k.split(':')[-1]} x{n}" for k, n in r["kernels"].items() if ":" in k)
        print(f"{r['program']:9s} {r['target']:6s} {r['topology']:10s} {mesh:26s} {batch!s:>5s} "
              f"{_gb(r['peak_bytes'])} {_gb(r['hbm_bytes'])} {str(r['fits']):5s} "
              f"{r['compile_seconds']:9.0f}  "
              f"{kernels}  remat warnings: {r['remat_warnings']}")


def markdown_table(rows: list[dict]) -> str:
    """The README's table of ``rows`` (reports as ``compile_program`` returns them)."""
    from dmax_jax.aot.targets import TARGETS  # noqa: PLC0415

    lines = ["| program | chip, topology | mesh | rows | peak GB / chip | HBM GB | fits | compile s "
             "| kernels |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['program']} | {r['target']} {r['topology']} | | | | | error | | "
                         f"{r['error']} |")
            continue
        chip = TARGETS[r["target"]]  # HBM and fit as the chip table states them now
        fits = r["peak_bytes"] <= chip.fits_bytes
        mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        batch = r.get("global_batch", r.get("batch", r.get("max_batch", "")))
        kernels = ", ".join(f"{k.split(':')[-1]} ×{n}" for k, n in r["kernels"].items() if ":" in k)
        lines.append(f"| {r['program']} | {r['target']} {r['topology']} | {mesh} | {batch} | "
                     f"{r['peak_bytes'] / 1e9:.1f} | {chip.hbm_bytes / 1e9:.0f} | {fits} | "
                     f"{r['compile_seconds']:.0f} | {kernels} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="train,generate,engine,bytes")
    ap.add_argument("--out", default=str(REPO / "results" / "aot"))
    ap.add_argument("--from-results", action="store_true",
                    help="compile nothing: print the markdown table of the JSON files in --out")
    args = ap.parse_args(argv)
    if args.from_results:
        order = {"train": 0, "generate": 1, "engine": 2}
        rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*.json"))
                if p.name.startswith(tuple(order))]
        rows.sort(key=lambda r: (order[r["program"]], r["target"] != "h200", r["target"],
                                 r.get("batch", 0) or 0, r["topology"]))
        print(markdown_table(rows))
        return 0
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in (*CASES, "bytes")]
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; choose from {', '.join([*CASES, 'bytes'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_case(case, out) for part in parts if part in CASES for case in CASES[part]]
    print_table(rows)
    if "bytes" in parts:
        row = forward_bytes_row()
        (out / "forward_bytes_v5p_b1.json").write_text(json.dumps(row, indent=2) + "\n")
        print(f"decode forward on one {row['target']} chip, batch {row['batch']}, block {row['block']}, "
              f"cache {row['cache']}: compiled {row['compiled_bytes'] / 1e9:.1f} GB vs roofline "
              f"{row['roofline_bytes'] / 1e9:.1f} GB ({row['ratio_to_roofline']:.2f}x; every expert "
              f"{row['all_experts_bytes'] / 1e9:.1f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
