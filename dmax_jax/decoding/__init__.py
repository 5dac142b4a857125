"""Block decoding for LLaDA2-MoE: Soft Parallel Decoding and the threshold / HF-generate baselines.

``generate(model, prompt_ids, config=DecodeConfig(...), **overrides) -> GenerateResult`` runs one
compiled program per request shape (prefill + block loop + step loop, all ``lax.while_loop``);
``compile_count()`` reports how many programs were compiled. Modules: ``config`` (``DecodeConfig``,
validation, static/traced split), ``buckets`` (prompt buckets, row geometry), ``strategies``
(per-step rules), ``forwards`` (model calls against the KV cache), ``loop`` (the compiled program),
``stats`` (results, NFE/TPF, traces), ``trace_schema`` (trace state names), ``api`` (``generate``),
``cli_args`` (the shared argparse flags).
"""

from dmax_jax.decoding.api import compile_count, generate
from dmax_jax.decoding.config import (
           SOFT_IMPLS,
           STRATEGIES,
           DecodeConfig,
           DecodeConfigError,
           DecodeStatic,
           RowParams,
)
from dmax_jax.decoding.loop import DecodeSpec
from dmax_jax.decoding.stats import DecodeTrace, GenerateResult
from dmax_jax.decoding.trace_schema import STATE_NAMES

__all__ = ["DecodeConfig", "DecodeConfigError", "DecodeSpec", "DecodeStatic", "DecodeTrace", "GenerateResult",
           "RowParams", "SOFT_IMPLS", "STATE_NAMES", "STRATEGIES", "compile_count", "generate"]
