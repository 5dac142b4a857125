"""Issue 29's demo table: LoRA OPUT vs full OPUT, and the shipped ``dmax`` with int8 weights vs f32 / bf16.

    python tools/eval_lora_int8.py --out results/lora_int8 [--limit N]
        [--lora lora_r16=results/lora_int8/models/lora_r16 ...] [--only base,dmax,...]
    python tools/eval_lora_int8.py --out results/lora_int8 --table-only   (table from stored cells)

Cells (the demo's evaluation grid, ``dmax_jax.demo.evaluate_grid``; demo geometry, 1,000 held-out
problems unless ``--limit``): ``base`` + threshold τ 0.95 (the reference) and + SPD; ``dmax`` (full OPUT)
+ SPD in float32, bfloat16 and with int8 weights (``DecodeConfig.weights="int8"``, f32 compute); each
``--lora`` model + SPD. SPD at τ_dec 0.5 (the demo's) and 0. Intervals: Wilson (accuracy), normal
(mean per-problem TPF), Newcombe (accuracy differences, independent samples) and — int8 / bf16 against
f32 on the same problems — paired normal intervals of the per-problem differences.
Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmax_jax import demo  # noqa: E402
from dmax_jax.demo.examples import DemoDecode  # noqa: E402
from dmax_jax.model.quant import quantize_model  # noqa: E402

SPD_TAUS = (0.5, 0.0)


@dataclasses.dataclass(frozen=True)
class WeightsDecode(DemoDecode):
    """The demo geometry with ``DecodeConfig.weights`` set."""

    weights: str = "native"

    def generate_kwargs(self, strategy: str, threshold: float) -> dict:
        return {**super().generate_kwargs(strategy, threshold), "weights": self.weights}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/lora_int8"))
    ap.add_argument("--limit", type=int, default=None, help="first N held-out problems (default: all 1,000)")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                    help="LoRA-OPUT model (repeatable)")
    ap.add_argument("--only", default=None, help="comma-separated model names to evaluate now")
    ap.add_argument("--table-only", action="store_true", help="rebuild the table from stored cells")
    return ap.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, str, tuple[str, ...], tuple[float, ...]]]:
    """(cell name, model dir, dtype, weights, strategies, τs) per evaluated model."""
    rows = [("base", "base", "float32", "native", ("threshold",), (0.95,)),
            ("base", "base", "float32", "native", ("spd",), SPD_TAUS),
            ("dmax", "dmax", "float32", "native", ("spd",), SPD_TAUS),
            ("dmax_bf16", "dmax", "bfloat16", "native", ("spd",), SPD_TAUS),
            ("dmax_int8", "dmax", "float32", "int8", ("spd",), SPD_TAUS),
            ("dmax_int8_bf16", "dmax", "bfloat16", "int8", ("spd",), SPD_TAUS)]
    for spec in args.lora:
        name, _, path = spec.partition("=")
        rows.append((name, path, "float32", "native", ("spd",), SPD_TAUS))
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r[0] in keep]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dmax_jax.eval.benchmarks import get_benchmark

    out = args.out
    data = demo.write_test_jsonl(out / "test.jsonl", n=1000)
    rows = get_benchmark("gsm8k").load(data)
    records = []
    for name, path, dtype, weights, strategies, taus in plan(args):
        model = quantize_model(demo.load_demo_model(path, dtype=dtype), weights)  # int8: once per model
        decode = WeightsDecode(**dataclasses.asdict(demo.DEMO_DECODE), weights=weights)
        records += demo.evaluate_grid({name: model}, rows, out_dir=out, strategies=strategies,
                                      thresholds=taus, limit=args.limit, decode=decode,
                                      log=None if args.table_only else print, progress=False)
    n = min(r["samples"] for r in records)
    old = json.loads((out / "results.json").read_text())["cells"] if (out / "results.json").is_file() else []
    keyed = {(r["model"], r["strategy"], r["threshold"]): r for r in old}
    keyed.update({(r["model"], r["strategy"], r["threshold"]): r for r in records})
    cells = list(keyed.values())
    (out / "results.json").write_text(json.dumps({"cells": cells, "n": n}, indent=1) + "\n")
    from table_lora_int8 import write_table  # tools/ is on sys.path when run as a script

    print(write_table(out, cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
