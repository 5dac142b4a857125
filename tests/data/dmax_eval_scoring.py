"""lm-eval ``process_results`` of the demo tasks: ``dmax_jax.eval``'s GSM8K scoring, so lm-eval and
``python -m dmax_jax.eval --benchmark gsm8k`` count the same answers right."""

from __future__ import annotations

from typing import Any

from dmax_jax.eval.benchmarks import get_benchmark


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"acc": float(get_benchmark("gsm8k").score(results[0], doc).correct)}
