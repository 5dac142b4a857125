"""The embedded CPU demo: two shipped tiny LLaDA2-MoE models, their task, the paper-style evaluation grid
and the quick OPUT run. It uses the library and is never used by it (nothing under model/, training/,
decoding/, data/ or checkpoint/ imports it).

Modules, one job each: ``task`` (the arithmetic word problems), ``tokenizer`` (the task BPE), ``data``
(``generate:`` data specs → files, the demo's data step), ``examples`` (shipped models, decode geometry,
example problems), ``distill`` (self-distilled OPUT data), ``grid`` + ``intervals`` + ``plot`` (the
evaluation table, its 95 % intervals and the trade-off plot), ``quick`` (``python train.py``).
"""

from dmax_jax.demo.data import GENERATE_PREFIX, generate_task_data, materialize, needs_materialize
from dmax_jax.demo.distill import distill_file, self_distill
from dmax_jax.demo.examples import (
    ASSET_DIR,
    DEFAULT_THRESHOLDS,
    DEMO_DECODE,
    DEMO_STRATEGIES,
    MODEL_NAMES,
    DemoDecode,
    decode_examples,
    default_model_dir,
    example_questions,
    format_examples,
    load_demo_model,
    test_problems,
    write_test_jsonl,
)
from dmax_jax.demo.grid import (
    KEPT_ACCURACY_POINTS,
    TARGET_TPF_RATIO,
    criterion,
    evaluate_grid,
    headline,
    load_records,
    results_markdown,
    write_results,
)
from dmax_jax.demo.plot import plot_tradeoff
from dmax_jax.demo.quick import config_path, quick_config_path, run_quick_demo

__all__ = [
    "ASSET_DIR", "DEFAULT_THRESHOLDS", "DEMO_DECODE", "DEMO_STRATEGIES", "GENERATE_PREFIX",
    "KEPT_ACCURACY_POINTS", "MODEL_NAMES", "TARGET_TPF_RATIO", "DemoDecode", "config_path", "criterion",
    "decode_examples", "default_model_dir", "distill_file", "evaluate_grid", "example_questions",
    "format_examples", "generate_task_data", "headline", "load_demo_model", "load_records", "materialize",
    "needs_materialize", "plot_tradeoff", "quick_config_path", "results_markdown", "run_quick_demo",
    "self_distill", "test_problems", "write_results", "write_test_jsonl",
]
