"""Benchmarks, answer extraction, sandboxed code execution and the resumable eval loop
(algorithm §5.4, §6)."""

from dmax_jax.eval.benchmarks import BENCHMARK_NAMES, Benchmark, Score, extract_code, get_benchmark
from dmax_jax.eval.extract import canonicalize, extract_candidates, gsm8k_gold, is_correct
from dmax_jax.eval.harness import build_input_ids, run_eval

__all__ = [
    "BENCHMARK_NAMES", "Benchmark", "Score", "build_input_ids", "canonicalize", "extract_candidates",
    "extract_code", "get_benchmark", "gsm8k_gold", "is_correct", "run_eval",
]
