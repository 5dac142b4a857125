"""``generate``'s driver of the block step: one compiled program per request shape, blocks as a
``lax.while_loop``.

Structure (all inside one XLA computation, no host round trip per step or per block)::

    prefill (1 NFE)                                      # spd / threshold; llada2: its first forward
    while any row live:                                  # one block of every live row per iteration
        block.first_logits   the cross-block forward (block k > 0)
        block.decode_block   the strategy's step loop (the engine runs this same step)
        _finish_block        write back, EOS early stop, advance
    -> DecodeOutput(x [b, C], nfe [b], gen_end [b], trace)

Rows progress independently: each has its own prompt length, block starts, positions and knobs
(:class:`~dmax_jax.decoding.config.RowParams`); a row that stopped (converged in this block, or
finished with EOS / its last block) is frozen while the others continue, and its NFE stops counting.
Every row therefore gets exactly the tokens it gets alone. The block counter ``k`` is shared: block
``k`` of every row starts at ``s0 + k·B``, so whether the first forward is the cross-block one
(``k > 0``) is uniform across the batch.

Where this departs from the references (algorithm §5, §7), on purpose:
* batch > 1: every stop test is per row (dInfer's are batch-global; its evals use batch 1);
* prompts shorter than a block: no stale MASK K/V in the cache (see ``forwards.prefill``);
* threshold: dInfer commits the K/V of a block's last forward directly when that forward saw no
  MASK (an unrolled no-op forward); here the next block's first forward is always the cross-block
  one. Same NFE (that forward is the next block's first either way) and mathematically the same
  K/V and logits, so the same tokens. A forward that transfers nothing while masks remain (every
  masked argmax is MASK) ends the block at temperature 0, where the reference would loop forever;
  the per-block forward count is capped at the worst case of one token per check;
* llada2: temperature 0 is argmax (the HF copy samples multinomially even then, algorithm §7.12), and
  finished blocks' K/V are cached instead of recomputed every step (same logits, block-causal);
* the result is cut to ``gen_length`` (``gen_end <= P + gen_length``; ``config`` module doc).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import block
from dmax_jax.decoding import forwards as fw
from dmax_jax.decoding.buckets import row_geometry
from dmax_jax.decoding.config import ProgramSpec, RowParams


@flax.struct.dataclass
class DecodeOutput:
    """What the compiled ``generate`` program returns (device arrays; ``stats.build_result`` reads it).

    Args:
        x: ``[b, C]`` every row's final sequence.
        nfe: ``[b]`` model forwards per row, the prefill counted.
        gen_end: ``[b]`` end of each row's returned region (``<= P + gen_length``).
        trace: ``{tokens, confidence, state [K, S, b, B], valid [K, S, b], block_start [K, b]}`` or None.
    """

    x: jax.Array
    nfe: jax.Array
    gen_end: jax.Array
    trace: Any = None


def _trace_buffers(spec: ProgramSpec, b: int):
    if not spec.trace:
        return None
    shp = (spec.max_blocks, spec.record_steps, b, spec.block_length)
    return {"tokens": jnp.zeros(shp, jnp.int32), "confidence": jnp.zeros(shp, jnp.float32),
            "state": jnp.zeros(shp, jnp.int8), "valid": jnp.zeros(shp[:3], bool),
            "block_start": jnp.zeros((spec.max_blocks, b), jnp.int32)}


def _store_trace(tr, k, start, rec: block.StepRecord | None):
    """Block ``k``'s step record into the trace buffers."""
    if tr is None:
        return None
    new = {"tokens": rec.tokens, "confidence": rec.confidence, "state": rec.state, "valid": rec.valid,
           "block_start": start}
    return {name: buf.at[k].set(new[name]) for name, buf in tr.items()}


def _finish_block(spec: ProgramSpec, rows: RowParams, k, x, start, live, xb, gen_end, n_blocks, *,
                  eos_in_prompt_tail: bool):
    """Write the block back, apply the EOS early stop and advance the row.

    ``eos_in_prompt_tail``: dInfer stops on an EOS anywhere in ``x[start:end]`` (algorithm §5.2), so an
    EOS in the prompt tail that shares the first block counts; the LLaDA2 HF ``generate`` tests only
    the generated part, ``x[P:end]`` (algorithm §5.5b) — the one deliberate difference between the two.
    Both overwrite nothing that is returned after the stop (dInfer's ``x[end:] = EOS`` is kept).
    """
    B = spec.block_length
    x = jnp.where(live[:, None], fw.row_update(x, start, xb), x)
    prompt = fw.positions(start, B) < rows.prompt_lens[:, None]
    seen = xb if eos_in_prompt_tail else jnp.where(prompt, spec.mask_id, xb)
    eos = live & (seen == rows.eos_id[:, None]).any(-1)
    after = jnp.arange(x.shape[1])[None, :] >= (start + B)[:, None]
    x = jnp.where(eos[:, None] & after, rows.eos_id[:, None], x)
    gen_end = jnp.where(live, jnp.minimum(start + B, rows.prompt_lens + rows.gen_length), gen_end)
    live = live & ~eos & (k + 1 < n_blocks)
    return x, live, gen_end


def decode_program(spec: ProgramSpec, config: ModelConfig, params, prompt_ids,
                   rows: RowParams) -> DecodeOutput:
    """The traced program of ``generate`` (wrap in ``jax.jit`` with ``spec``/``config`` bound)."""
    (strategy,) = spec.strategies
    b, B, dt = prompt_ids.shape[0], spec.block_length, jnp.dtype(spec.dtype)
    s0, _, n_blocks = row_geometry(rows.prompt_lens, rows.gen_length, B)
    x = jnp.full((b, spec.capacity), spec.mask_id, jnp.int32).at[:, :spec.prompt_len].set(prompt_ids)
    if strategy == "llada2":  # the first forward is block 0's first step: no NFE of its own
        first, cache = fw.first_block(params, config, x, s0, spec.prompt_len, spec.capacity, B, dt,
                                      platform=spec.platform)
        nfe = jnp.zeros((b,), jnp.int32)
    else:                     # the prefill: 1 NFE (algorithm §6)
        cache = fw.prefill(params, config, prompt_ids, s0, spec.capacity, B, dt, platform=spec.platform)
        first, nfe = jnp.zeros((b, B, config.vocab_size), jnp.float32), jnp.ones((b,), jnp.int32)

    def outer(c):
        k, x, cache, nfe, live, gen_end, tr = c
        start = s0 + jnp.minimum(k, n_blocks - 1) * B
        crossing = jnp.broadcast_to(k > 0, live.shape)
        logits0, cache = block.first_logits(spec, config, params, x, start, crossing, cache, first)
        given = crossing | (strategy == "llada2")   # llada2's block 0: the first forward's logits
        out = block.decode_block(spec, strategy, config, params, rows, x, start, live, cache,
                                 (logits0, given), nfe)
        tr = _store_trace(tr, k, start, out.record)
        x, live, gen_end = _finish_block(spec, rows, k, x, start, live, out.tokens, gen_end, n_blocks,
                                         eos_in_prompt_tail=strategy != "llada2")
        return k + 1, x, cache, out.nfe, live, gen_end, tr

    init = (jnp.int32(0), x, cache, nfe, n_blocks > 0, s0, _trace_buffers(spec, b))
    _, x, _, nfe, _, gen_end, tr = jax.lax.while_loop(lambda c: jnp.any(c[4]), outer, init)
    return DecodeOutput(x=x, nfe=nfe, gen_end=gen_end, trace=tr)
