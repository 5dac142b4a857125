"""``generate``: validate a request (:class:`DecodeConfig`), bucket it, run the compiled program, account.

Compiled programs are cached by (static spec, model config, argument shapes/dtypes/shardings) and
compiled ahead of time (``jit(...).lower(...).compile()``), so ``GenerateResult.seconds`` never
includes compilation and :func:`compile_count` counts compilations exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import buckets
from dmax_jax.decoding.config import DecodeConfig
from dmax_jax.decoding.loop import TRACE_COUNT, DecodeSpec, decode_program
from dmax_jax.decoding.stats import GenerateResult, build_result

_COMPILED: dict = {}


def compile_count(strategy: str | None = None) -> int:
    """Number of decode programs compiled in this process (optionally for one strategy)."""
    return TRACE_COUNT[strategy] if strategy else sum(TRACE_COUNT.values())


def _model_parts(model) -> tuple[dict, ModelConfig]:
    if isinstance(model, tuple) and len(model) == 2:
        params, config = model
    elif hasattr(model, "params") and hasattr(model, "config"):
        params, config = model.params, model.config
    else:
        raise TypeError("model must be a Pretrained-like object with .params and .config, or a "
                        f"(params, config) tuple; got {type(model).__name__}")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a dmax_jax.config.ModelConfig, got {type(config).__name__}")
    return params, config


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), jnp.result_type(a), getattr(a, "sharding", None)) for a in leaves)


def _executable(spec: DecodeSpec, config: ModelConfig, args: tuple):
    """``(compiled program, seconds spent compiling it now — 0.0 when cached)``."""
    key = (spec, config, _signature(args))
    exe = _COMPILED.get(key)
    if exe is not None:
        return exe, 0.0
    t = time.perf_counter()
    fn = jax.jit(functools.partial(decode_program, spec, config))
    exe = _COMPILED[key] = fn.lower(*args).compile()
    return exe, time.perf_counter() - t


def generate(model, prompt_ids: Sequence[Sequence[int]] | Sequence[int], config: DecodeConfig | None = None,
             *,
             batch_size: int | None = None, request_ids: Sequence[int] | None = None,
             **overrides: Any) -> GenerateResult:
    """Decode a batch of prompts (spec §5) and return tokens, NFE/TPF and optional traces.

    ``config``: a :class:`DecodeConfig` (default ``DecodeConfig()``); ``overrides`` are its fields as
    keywords (``strategy="llada2", threshold=0.95``; ``soft_embedding_impl`` is the old name of
    ``soft_impl``), applied on top and validated like the config itself. At most ``gen_length``
    tokens come back per row. ``dtype`` None = the model's ``compute_dtype`` (float32 if it has none).

    Sampling (``temperature > 0``) draws row ``i`` from keys derived from ``(seed, request_ids[i],
    forward index)``: a prompt gets the same tokens in any batch if its request id is the same.
    ``batch_size`` pads the batch with copies of row 0 (results dropped) so that a ragged final
    batch reuses the compiled program.
    """
    params, mcfg = _model_parts(model)
    cfg = (config or DecodeConfig()).replace(**overrides) if overrides else (config or DecodeConfig())
    if not isinstance(cfg, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(cfg).__name__}")
    cfg = cfg.resolve(mcfg, getattr(model, "compute_dtype", None))
    rows = buckets.normalize_prompts(prompt_ids)
    buckets.validate_prompts(rows, vocab_size=mcfg.vocab_size, mask_id=cfg.mask_id, gen_length=cfg.gen_length,
                             block=cfg.block_length, max_positions=mcfg.max_position_embeddings)
    n_real = len(rows)
    rids = list(range(n_real)) if request_ids is None else [int(r) for r in request_ids]
    if len(rids) != n_real:
        raise ValueError(f"request_ids has {len(rids)} entries for {n_real} prompts")
    if batch_size is not None:
        if batch_size < n_real:
            raise ValueError(f"batch_size {batch_size} is smaller than the {n_real} prompts given")
        rows = rows + [rows[0]] * (batch_size - n_real)
        rids = rids + [rids[0]] * (batch_size - n_real)

    B = cfg.block_length
    bucket = cfg.prompt_bucket or buckets.round_up(max(buckets.DEFAULT_PROMPT_BUCKET, B), B)
    padded, capacity = buckets.shapes([len(r) for r in rows], cfg.gen_length, B, bucket)
    ids, lens = buckets.pack_prompts(rows, padded, cfg.mask_id)
    static, row_params = cfg.split(lens, rids)
    spec = DecodeSpec(**dataclasses.asdict(static), prompt_len=padded, capacity=capacity)
    args = (params, ids, row_params)

    exe, compile_seconds = _executable(spec, mcfg, args)
    t1 = time.perf_counter()
    out = jax.device_get(exe(*args))
    t2 = time.perf_counter()
    meta = None
    if cfg.trace:
        meta = {"block_length": B, "mask_id": cfg.mask_id, "eos_id": cfg.eos_id,
                "first_cross": cfg.strategy != "llada2"}
    return build_result(out, [len(r) for r in rows[:n_real]], eos_id=cfg.eos_id, seconds=t2 - t1,
                        compile_seconds=compile_seconds, strategy=cfg.strategy, trace_meta=meta)
