"""``generate``: validate a request, bucket it, run the compiled decode program, account the result.

Compiled programs are cached by (static spec, model config, argument shapes/dtypes/shardings) and
compiled ahead of time (``jit(...).lower(...).compile()``), so ``GenerateResult.seconds`` never
includes compilation and :func:`compile_count` counts compilations exactly.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import layout
from dmax_jax.decoding.loop import TRACE_COUNT, DecodeSpec, decode_program
from dmax_jax.decoding.stats import GenerateResult, build_result
from dmax_jax.decoding.strategies import STRATEGIES, threshold_max_forwards

SOFT_IMPLS = ("pallas", "xla", "auto")
_COMPILED: dict = {}


def compile_count(strategy: str | None = None) -> int:
    """Number of decode programs compiled in this process (optionally for one strategy)."""
    return TRACE_COUNT[strategy] if strategy else sum(TRACE_COUNT.values())


def clear_compiled() -> None:
    """Drop cached executables (the counter keeps counting)."""
    _COMPILED.clear()


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


def generate(model, prompt_ids: Sequence[Sequence[int]] | Sequence[int], *, strategy: str = "spd",
             block_length: int = 32, gen_length: int = 256, threshold: float = 0.5, steps: int | None = None,
             accept_threshold: float = 0.9, temperature: float = 0.0, seed: int = 0,
             mask_id: int | None = None, eos_id: int | None = None, trace: bool = False,
             soft_embedding_impl: str = "auto", dtype=None, top_k: int = 1, max_unroll: int = 4,
             expected_tpf: int = 4, prompt_bucket: int | None = None, batch_size: int | None = None,
             request_ids: Sequence[int] | None = None) -> GenerateResult:
    """Decode a batch of prompts (spec §5) and return tokens, NFE/TPF and optional traces.

    ``strategy``: ``spd`` (Soft Parallel Decoding, τ_dec = ``threshold``, τ_acc = ``accept_threshold``),
    ``threshold`` (dInfer threshold decoding with ``max_unroll``/``expected_tpf`` unrolling; pass
    ``max_unroll=1`` for one forward per check) or ``llada2`` (HF ``generate``; ``threshold`` is its
    acceptance threshold, 0.95 in the HF default; ``steps`` its refinement steps per block, default
    ``block_length``, capped at ``gen_length``). For ``spd`` ``steps`` caps the forwards per block
    (default ``block_length``, spec §7.7); ``threshold`` takes no ``steps``.

    Sampling (``temperature > 0``) draws row ``i`` from keys derived from ``(seed, request_ids[i],
    forward index)``: a prompt gets the same tokens in any batch if its request id is the same.
    ``dtype`` is the compute dtype (default: the model's ``compute_dtype`` if it has one, else f32).
    ``prompt_bucket`` (default max(128, block) rounded to the block) sets the prompt padding;
    ``batch_size`` pads the batch with copies of row 0 (results dropped) so that a ragged final
    batch reuses the compiled program.
    """
    params, config = _model_parts(model)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if soft_embedding_impl not in SOFT_IMPLS:
        raise ValueError(f"soft_embedding_impl {soft_embedding_impl!r} is not one of {SOFT_IMPLS}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 1 or max_unroll < 1 or expected_tpf < 1:
        raise ValueError(f"top_k ({top_k}), max_unroll ({max_unroll}) and expected_tpf ({expected_tpf}) "
                         "must be >= 1")
    if dtype is None:
        dtype = getattr(model, "compute_dtype", jnp.float32)
    mask_id = config.resolved_mask_token_id if mask_id is None else int(mask_id)
    eos_id = config.eos_token_id if eos_id is None else int(eos_id)
    if eos_id is None:
        raise ValueError("eos_id is not set and the model config has no eos_token_id")
    rows = layout.normalize_prompts(prompt_ids)
    layout.validate_prompts(rows, vocab_size=config.vocab_size, mask_id=mask_id, gen_length=gen_length,
                            block=block_length, max_positions=config.max_position_embeddings)
    n_real = len(rows)
    rids = list(range(n_real)) if request_ids is None else [int(r) for r in request_ids]
    if len(rids) != n_real:
        raise ValueError(f"request_ids has {len(rids)} entries for {n_real} prompts")
    if batch_size is not None:
        if batch_size < n_real:
            raise ValueError(f"batch_size {batch_size} is smaller than the {n_real} prompts given")
        rows = rows + [rows[0]] * (batch_size - n_real)
        rids = rids + [rids[0]] * (batch_size - n_real)

    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if strategy == "threshold":
        if steps is not None:
            raise ValueError("strategy 'threshold' stops when the block has no mask; it takes no steps")
        step_count = max_steps = threshold_max_forwards(block_length, expected_tpf, max_unroll)
    else:
        step_count = block_length if steps is None else int(steps)
        if strategy == "llada2":
            step_count = min(step_count, gen_length)
        max_steps = max(block_length, step_count)  # static bound; the count itself is a runtime value

    bucket = prompt_bucket or layout.round_up(max(128, block_length), block_length)
    padded, capacity = layout.shapes([len(r) for r in rows], gen_length, block_length, bucket)
    ids, lens = layout.pack_prompts(rows, padded, mask_id)
    spec = DecodeSpec(strategy=strategy, block=block_length, prompt_len=padded, capacity=capacity,
                      mask_id=mask_id, greedy=temperature == 0, max_steps=max_steps,
                      top_k=top_k, max_unroll=max_unroll, expected_tpf=expected_tpf,
                      soft_impl=soft_embedding_impl, dtype=jnp.dtype(dtype).name, trace=bool(trace))
    dyn = {"prompt_lens": lens, "request_ids": np.asarray(rids, np.int32),
           "gen_length": np.int32(gen_length), "eos_id": np.int32(eos_id), "seed": np.int32(seed),
           "threshold": np.float32(threshold),
           "accept_threshold": np.float32(accept_threshold),
           "temperature": np.float32(temperature if temperature > 0 else 1.0),
           "steps": np.int32(step_count)}
    args = (params, ids, dyn)

    exe, compile_seconds = _executable(spec, config, args)
    t1 = time.perf_counter()
    out = jax.device_get(exe(*args))
    t2 = time.perf_counter()
    meta = None
    if trace:
        meta = {"block_length": block_length, "mask_id": mask_id, "eos_id": eos_id,
                "first_cross": strategy != "llada2"}
    res = build_result(out, [len(r) for r in rows[:n_real]], eos_id=eos_id, seconds=t2 - t1,
                       compile_seconds=compile_seconds, strategy=strategy, trace_meta=meta)
    return res
