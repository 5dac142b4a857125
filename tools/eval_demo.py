"""Paper-style evaluation of the demo models: accuracy and TPF for {base, dmax} x {threshold, spd} over
a sweep of thresholds on the held-out arithmetic split, as a table (markdown + json) and a trade-off plot.

    python tools/eval_demo.py --out results/demo [--limit 100] [--thresholds 0.95,0.5,0.0]
    python tools/eval_demo.py --out results/real --model base=/ckpt/LLaDA2.0-mini --model dmax=/ckpt/DMax
    python tools/eval_demo.py --from-results results/demo/results.json   (table + plot again, no decoding)

Writes ``OUT/results.md``, ``OUT/results.json``, ``OUT/tradeoff.png`` and, per cell,
``OUT/runs/<model>_<strategy>_<τ>/{samples.jsonl, summary.json}`` (the eval harness; resumable, so a
re-run with a larger ``--limit`` only decodes the new problems). Scoring is the GSM8K benchmark of
``dmax_jax.eval``; decoding is ``dmax_jax.generate`` with the demo geometry (``dmax_jax.demo.DemoDecode``).
Every accuracy carries its Wilson 95 % interval and every difference Newcombe's (``dmax_jax.demo.intervals``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dmax_jax import demo  # noqa: E402


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be in [0, 1], got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/demo", help="output folder (default: %(default)s)")
    ap.add_argument("--from-results", type=Path, default=None, metavar="RESULTS_JSON",
                    help="rewrite results.md / tradeoff.png beside this results.json from its stored cells, "
                         "without decoding (default: off)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="model to evaluate (repeatable); default: the shipped base and dmax")
    ap.add_argument("--data", default=None,
                    help="GSM8K-format jsonl (default: the generated held-out split, OUT/test.jsonl)")
    ap.add_argument("--n-test", type=int, default=1000,
                    help="held-out problems to generate (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None,
                    help="evaluate only the first N problems (default: all)")
    ap.add_argument("--thresholds", type=_floats, default=demo.DEFAULT_THRESHOLDS,
                    help="comma-separated τ sweep (default: %(default)s)")
    ap.add_argument("--strategies", default=",".join(demo.DEMO_STRATEGIES),
                    help="comma-separated decoders among threshold,spd (default: %(default)s)")
    ap.add_argument("--spd-threshold", type=float, default=demo.DEMO_DECODE.spd_threshold,
                    help="τ_dec of the headline dmax + SPD cell (default: %(default)s)")
    ap.add_argument("--accept-threshold", type=_floats, default=(demo.DEMO_DECODE.accept_threshold,),
                    help="SPD's τ_acc (its block ends once every position is this confident; "
                         "default: %(default)s, the reference's)")
    ap.add_argument("--batch-size", type=int, default=demo.DEMO_DECODE.batch_size,
                    help="problems decoded together (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", help="parameter/compute dtype (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    if args.n_test < 500 and args.data is None:
        ap.error(f"--n-test must be >= 500 for a meaningful held-out accuracy, got {args.n_test}")
    strategies = tuple(s for s in args.strategies.split(",") if s)
    bad = [s for s in strategies if s not in demo.DEMO_STRATEGIES]
    if bad or not strategies:
        ap.error(f"--strategies: {bad or strategies} not among {demo.DEMO_STRATEGIES}")
    args.strategies = strategies
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--model expects NAME=DIR, got {spec!r}")
        models[name] = path
    args.models = models or {name: name for name in demo.MODEL_NAMES}
    return args


def regenerate(results_json: Path) -> int:
    """Table and plot again from the cells stored in ``results_json`` (no decoding)."""
    if not results_json.is_file():
        print(f"eval_demo.py: --from-results: {results_json} does not exist", file=sys.stderr)
        return 2
    records, decode, extra = demo.load_records(results_json)
    paths = demo.write_results(records, results_json.parent, decode, extra=extra)
    print(demo.results_markdown(records, decode))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_results is not None:
        return regenerate(args.from_results)
    from dmax_jax.eval.benchmarks import get_benchmark

    if len(args.accept_threshold) != 1:
        print(f"eval_demo: --accept-threshold takes one value, got {args.accept_threshold}", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = Path(args.data) if args.data else demo.write_test_jsonl(out / "test.jsonl", n=args.n_test)
    rows = get_benchmark("gsm8k").load(data)
    decode = dataclasses.replace(demo.DEMO_DECODE, batch_size=args.batch_size,
                                 spd_threshold=args.spd_threshold, accept_threshold=args.accept_threshold[0])
    thresholds = tuple(dict.fromkeys((*args.thresholds, decode.spd_threshold, decode.baseline_threshold)))
    models = {name: demo.load_demo_model(path, dtype=args.dtype) for name, path in args.models.items()}
    n = len(rows) if args.limit is None else min(args.limit, len(rows))
    print(f"evaluating {list(models)} x {list(args.strategies)} x τ {list(thresholds)} on {n} problems of "
          f"{data}", flush=True)
    t0 = time.time()
    records = demo.evaluate_grid(models, rows, out_dir=out, strategies=args.strategies, thresholds=thresholds,
                                 limit=args.limit, decode=decode, log=print)
    paths = demo.write_results(records, out, decode, extra={
        "models": {k: str(v) for k, v in args.models.items()}, "data": str(data),
        "eval_seconds": round(time.time() - t0, 1)})
    print(demo.results_markdown(records, decode))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
