"""Block decoding for LLaDA2-MoE: Soft Parallel Decoding and the threshold / HF-generate baselines.

The chain of decode settings (``config``)::

    DecodeConfig  (host, per request, validated)  →  RowParams  (device, traced, per row)
                  →  ProgramSpec  (static, hashable: the compile key, with the target platform)

One block step (``block``: cross-block forward, step rules, soft embeddings, stop rules, step
record), two drivers: ``generate`` (``loop``: a ``lax.while_loop`` over blocks, one compiled program
per request shape) and the serving engine (``dmax_jax.serving.program``: one call per round over its
slots). Modules: ``config`` (the chain), ``buckets`` (prompt buckets, row geometry), ``strategies``
(per-step rules as pure batched functions), ``forwards`` (model calls against the KV cache),
``compact`` (forwards for the rows that need them), ``block`` (the block step), ``loop``
(``generate``'s program), ``compiled`` (the one compile cache), ``stats`` (results, NFE/TPF,
traces), ``trace_schema`` (trace state names), ``api`` (``generate``, ``lower_generate``),
``cli_args`` (the shared argparse flags), ``model_defaults`` (a model directory's dmax_decode.json).
"""

from dmax_jax.decoding.api import clear_compiled, compile_count, generate, lower_generate
from dmax_jax.decoding.config import (
           SOFT_IMPLS,
           STRATEGIES,
           DecodeConfig,
           DecodeConfigError,
           ProgramSpec,
           RowParams,
)
from dmax_jax.decoding.stats import DecodeTrace, GenerateResult
from dmax_jax.decoding.trace_schema import STATE_NAMES

__all__ = ["DecodeConfig", "DecodeConfigError", "DecodeTrace", "GenerateResult", "ProgramSpec", "RowParams",
           "SOFT_IMPLS", "STATE_NAMES", "STRATEGIES", "clear_compiled", "compile_count", "generate",
           "lower_generate"]
