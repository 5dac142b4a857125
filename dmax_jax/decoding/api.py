"""``generate`` and ``lower_generate``: validate a request (:class:`DecodeConfig`), bucket it, build
its :class:`ProgramSpec`, run (or lower) the compiled program, account.

Programs are compiled ahead of time (``jax.jit(...).lower(...).compile()``) through the one compile
cache (:mod:`dmax_jax.decoding.compiled`), so ``GenerateResult.seconds`` never includes compilation
and :func:`compile_count` counts compilations exactly. ``lower_generate`` is the same path from
abstract shapes only (``jax.ShapeDtypeStruct`` parameters, e.g. on compile-only TPU / GPU devices),
for the ahead-of-time compile tool: nothing is allocated.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import buckets
from dmax_jax.decoding.compiled import COMPILED, abstract, replicated, signature
from dmax_jax.decoding.config import DecodeConfig, ProgramSpec, RowParams
from dmax_jax.decoding.loop import decode_program
from dmax_jax.decoding.stats import GenerateResult, build_result
from dmax_jax.model.quant import params_for
from dmax_jax.platforms import in_mesh_of, platform_of


def compile_count(strategy: str | None = None) -> int:
    """Number of ``generate`` programs compiled in this process (optionally for one strategy)."""
    return COMPILED.compiles(lambda k: k[0] == "generate"
                             and (strategy is None or k[1].strategies == (strategy,)))


def clear_compiled() -> None:
    """Drop the cached executables (the compile counter keeps counting): for benchmarks that time
    compilation itself (bench/roofline.py)."""
    COMPILED.clear()


def model_parts(model) -> tuple[Any, ModelConfig]:
    """``(params, config)`` of a ``Pretrained``-like model or a ``(params, config)`` tuple."""
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


def _shapes(cfg: DecodeConfig, prompt_lens: Sequence[int]) -> tuple[int, int]:
    """``(padded prompt length, capacity)`` of a request (``buckets.shapes`` with the config's bucket)."""
    B = cfg.block_length
    bucket = cfg.prompt_bucket or buckets.round_up(max(buckets.DEFAULT_PROMPT_BUCKET, B), B)
    return buckets.shapes(list(prompt_lens), cfg.gen_length, B, bucket)


def _lowering(spec: ProgramSpec, mcfg: ModelConfig, params, ids, rows: RowParams):
    """``(the arguments as structs, a thunk lowering the program)``: the one lowering path of
    ``generate`` and ``lower_generate``, from shapes only; ids and row values live replicated on the
    parameters' devices."""
    sh = replicated(params)
    args = (abstract(params), abstract(ids, sh), abstract(rows, sh))
    program = in_mesh_of(params, functools.partial(decode_program, spec, mcfg))  # kernels run per shard
    return args, lambda: jax.jit(program).lower(*args)


def _program(spec: ProgramSpec, mcfg: ModelConfig, params, ids, rows: RowParams):
    """``(compiled program, compile seconds)`` of ``generate`` (cached by spec, config and shapes)."""
    args, lower = _lowering(spec, mcfg, params, ids, rows)
    return COMPILED.program(("generate", spec, mcfg, signature(args)), lower)


def lower_generate(params, model_config: ModelConfig, decode_config: DecodeConfig, *, batch: int,
                   prompt_len: int) -> jax.stages.Lowered:
    """The program ``generate`` runs for ``batch`` prompts of at most ``prompt_len`` tokens under
    ``decode_config``, lowered from shapes (``params`` may be ``ShapeDtypeStruct``s with shardings;
    ids and row values are built as structs replicated on the same devices). ``.compile()`` it."""
    cfg = decode_config.resolve(model_config)
    params = params_for(params, cfg.weights)
    padded, capacity = _shapes(cfg, [prompt_len])
    spec = cfg.program_spec(platform_of(params), capacity=capacity, prompt_len=padded)
    ids = jax.ShapeDtypeStruct((batch, padded), np.int32)
    rows = cfg.row_params([prompt_len] * batch, list(range(batch)))   # host values: only shapes are used
    return _lowering(spec, model_config, params, ids, rows)[1]()


def generate(model, prompt_ids: Sequence[Sequence[int]] | Sequence[int], config: DecodeConfig | None = None,
             *,
             batch_size: int | None = None, request_ids: Sequence[int] | None = None,
             **overrides: Any) -> GenerateResult:
    """Decode a batch of prompts (algorithm §5) and return tokens, NFE/TPF and optional traces.

    ``config``: a :class:`DecodeConfig` (default ``DecodeConfig()``); ``overrides`` are its fields as
    keywords (``strategy="llada2", threshold=0.95``; ``soft_embedding_impl`` is the old name of
    ``soft_impl``), applied on top and validated like the config itself. At most ``gen_length``
    tokens come back per row. ``dtype`` None = the model's ``compute_dtype`` (float32 if it has none).

    Sampling (``temperature > 0``) draws row ``i`` from keys derived from ``(seed, request_ids[i],
    forward index)``: a prompt gets the same tokens in any batch if its request id is the same.
    ``batch_size`` pads the batch with copies of row 0 (results dropped) so that a ragged final
    batch reuses the compiled program.
    """
    params, mcfg = model_parts(model)
    cfg = (config or DecodeConfig()).replace(**overrides) if overrides else (config or DecodeConfig())
    if not isinstance(cfg, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(cfg).__name__}")
    cfg = cfg.resolve(mcfg, getattr(model, "compute_dtype", None))
    params = params_for(params, cfg.weights)  # int8: quantized per call unless pre-quantized (quantize_model)
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

    padded, capacity = _shapes(cfg, [len(r) for r in rows])
    ids, lens = buckets.pack_prompts(rows, padded, cfg.mask_id)
    row_params = cfg.row_params(lens, rids)
    spec = cfg.program_spec(platform_of(params), capacity=capacity, prompt_len=padded)
    exe, compile_seconds = _program(spec, mcfg, params, ids, row_params)
    t1 = time.perf_counter()
    out = jax.device_get(exe(params, ids, row_params))
    t2 = time.perf_counter()
    meta = None
    if cfg.trace:
        meta = {"block_length": cfg.block_length, "mask_id": cfg.mask_id, "eos_id": cfg.eos_id,
                "first_cross": cfg.strategy != "llada2"}
    return build_result(out, [len(r) for r in rows[:n_real]], eos_id=cfg.eos_id, seconds=t2 - t1,
                        compile_seconds=compile_seconds, strategy=cfg.strategy, trace_meta=meta)
