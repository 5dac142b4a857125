"""The compiled decode program: one jit per request shape, blocks and steps as ``lax.while_loop``s.

Structure (all inside one XLA computation, no host round trip per step or per block)::

    prefill (1 NFE)                                        # spd / threshold only
    while any row live:                                    # _block_loop: one block per iteration
        the strategy's step loop: one forward per step     # _spd_block / _threshold_block / _llada2_block
        _finish_block: write back, EOS early stop, advance
    -> x [b, C], nfe [b], gen_end [b] (+ trace buffers)

Rows progress independently: each has its own prompt length, block starts, positions and knobs
(:class:`~dmax_jax.decoding.config.RowParams`); a row that stopped (converged in this block, or
finished with EOS / its last block) is frozen while the others continue, and its NFE stops counting.
Every row therefore gets exactly the tokens it gets alone. The block counter ``k`` is shared: block
``k`` of every row starts at ``s0 + k·B``, so whether the first forward is the cross-block one
(``k > 0``) is uniform across the batch.

Compilations are counted by :data:`TRACE_COUNT` (one trace = one compilation of the program).

Where this departs from the references (spec §5, §7), on purpose:
* batch > 1: every stop test is per row (dInfer's are batch-global; its evals use batch 1);
* prompts shorter than a block: no stale MASK K/V in the cache (see ``forwards.prefill``);
* threshold: dInfer commits the K/V of a block's last forward directly when that forward saw no
  MASK (an unrolled no-op forward); here the next block's first forward is always the cross-block
  one. Same NFE (that forward is the next block's first either way) and mathematically the same
  K/V and logits, so the same tokens. A forward that transfers nothing while masks remain (every
  masked argmax is MASK) ends the block at temperature 0, where the reference would loop forever;
  the per-block forward count is capped at the worst case of one token per check;
* llada2: temperature 0 is argmax (the HF copy samples multinomially even then, spec §7.12), and
  finished blocks' K/V are cached instead of recomputed every step (same logits, block-causal);
* the result is cut to ``gen_length`` (``gen_end <= P + gen_length``; ``config`` module doc).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import forwards as fw
from dmax_jax.decoding import strategies as st
from dmax_jax.decoding.buckets import row_geometry
from dmax_jax.decoding.config import DecodeStatic, RowParams
from dmax_jax.model.llada2 import embedding_table

TRACE_COUNT: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class DecodeSpec(DecodeStatic):
    """Everything static about one compiled decode program: the config's static part plus the
    request's shapes (hashable; the compile key with the model config and argument signatures)."""

    prompt_len: int = 0    # padded prompt bucket
    capacity: int = 0      # sequence / KV-cache slots

    @property
    def max_blocks(self) -> int:
        return self.capacity // self.block_length


@dataclasses.dataclass
class Block:
    """What a strategy's step loop sees of the current block (traced values)."""

    k: jax.Array           # block counter (shared by the batch)
    x: jax.Array           # [b, C] sequence
    start: jax.Array       # [b] first position of the block
    xb: jax.Array          # [b, B] block tokens at entry
    prompt: jax.Array      # [b, B] prompt-tail positions
    live: jax.Array        # [b] rows still decoding
    nfe: jax.Array         # [b]
    cache: Any             # KVCache (cached strategies) or None
    trace: Any             # trace buffers or None


StepLoop = Callable[[Block], tuple[jax.Array, Any, jax.Array, Any]]  # -> (xb, cache, nfe, trace)


def _trace_buffers(spec: DecodeSpec, b: int):
    if not spec.trace:
        return None
    shp = (spec.max_blocks, spec.max_steps, b, spec.block_length)
    return {"tokens": jnp.zeros(shp, jnp.int32), "confidence": jnp.zeros(shp, jnp.float32),
            "state": jnp.zeros(shp, jnp.int8), "valid": jnp.zeros(shp[:3], bool),
            "block_start": jnp.zeros((spec.max_blocks, b), jnp.int32)}


def _record(tr, k, step, run, tokens, conf, state):
    if tr is None:
        return None
    return {**tr, "tokens": tr["tokens"].at[k, step].set(tokens),
            "confidence": tr["confidence"].at[k, step].set(conf),
            "state": tr["state"].at[k, step].set(state), "valid": tr["valid"].at[k, step].set(run)}


def _finish_block(spec: DecodeSpec, d: RowParams, blk: Block, xb, gen_end, n_blocks, *,
                  eos_in_prompt_tail: bool):
    """Write the block back, apply the EOS early stop and advance the row.

    ``eos_in_prompt_tail``: dInfer stops on an EOS anywhere in ``x[start:end]`` (spec §5.2), so an
    EOS in the prompt tail that shares the first block counts; the LLaDA2 HF ``generate`` tests only
    the generated part, ``x[P:end]`` (spec §5.5b) — the one deliberate difference between the two.
    Both overwrite nothing that is returned after the stop (dInfer's ``x[end:] = EOS`` is kept).
    """
    x, start, live = blk.x, blk.start, blk.live
    x = jnp.where(live[:, None], fw.row_update(x, start, xb), x)
    seen = xb if eos_in_prompt_tail else jnp.where(blk.prompt, spec.mask_id, xb)
    eos = live & (seen == d.eos_id[:, None]).any(-1)
    after = jnp.arange(x.shape[1])[None, :] >= (start + spec.block_length)[:, None]
    x = jnp.where(eos[:, None] & after, d.eos_id[:, None], x)
    gen_end = jnp.where(live, jnp.minimum(start + spec.block_length, d.prompt_lens + d.gen_length), gen_end)
    live = live & ~eos & (blk.k + 1 < n_blocks)
    return x, live, gen_end


def _block_loop(spec: DecodeSpec, d: RowParams, prompt_ids, cache, nfe, step_loop: StepLoop, *,
                eos_in_prompt_tail: bool):
    """The shared outer loop: one block of every live row per iteration."""
    B, b = spec.block_length, prompt_ids.shape[0]
    s0, _, n_blocks = row_geometry(d.prompt_lens, d.gen_length, B)
    x = jnp.full((b, spec.capacity), spec.mask_id, jnp.int32).at[:, :spec.prompt_len].set(prompt_ids)

    def outer(c):
        k, x, cache, nfe, live, gen_end, tr = c
        start = s0 + jnp.minimum(k, n_blocks - 1) * B
        if tr is not None:
            tr = {**tr, "block_start": tr["block_start"].at[k].set(start)}
        blk = Block(k=k, x=x, start=start, xb=fw.row_slice(x, start, B),
                    prompt=fw.positions(start, B) < d.prompt_lens[:, None], live=live, nfe=nfe,
                    cache=cache, trace=tr)
        xb, cache, nfe, tr = step_loop(blk)
        x, live, gen_end = _finish_block(spec, d, blk, xb, gen_end, n_blocks,
                                         eos_in_prompt_tail=eos_in_prompt_tail)
        return k + 1, x, cache, nfe, live, gen_end, tr

    init = (jnp.int32(0), x, cache, nfe, n_blocks > 0, s0, _trace_buffers(spec, b))
    _, x, _, nfe, _, gen_end, tr = jax.lax.while_loop(lambda c: jnp.any(c[4]), outer, init)
    return {"x": x, "nfe": nfe, "gen_end": gen_end, "trace": tr}


def _pick(spec: DecodeSpec, d: RowParams, logits, nfe, *, tempered: bool = False):
    keys = None if spec.greedy else st.row_keys(d.seed, d.request_ids, nfe)
    return st.choose_tokens(logits, greedy=spec.greedy, temperature=d.temperature, keys=keys,
                            tempered_confidence=tempered, need_probs=spec.top_k > 1)


def _cached_logits(spec: DecodeSpec, cfg: ModelConfig, params, blk: Block, first_logits=None):
    """``(logits_at(step, embeds), cache)``: the cross-block forward runs once per block, outside the
    step loop, so the step loop only reads the cache (no per-step cache copies in the carry).

    ``first_logits``: the first block's step-0 logits when they come with the prefill (llada2);
    otherwise block 0 starts with a block forward (spd / threshold: the prefill is a forward of its own).
    """
    B, b, dt = spec.block_length, blk.x.shape[0], jnp.dtype(spec.dtype)
    first = jnp.zeros((b, B, cfg.vocab_size), jnp.float32) if first_logits is None else first_logits
    logits0, cache = jax.lax.cond(
        blk.k > 0, lambda c: fw.cross_forward(params, cfg, blk.x, blk.start, c, B, dt),
        lambda c: (first, c), blk.cache)
    use0 = (lambda step: step == 0) if first_logits is not None else (lambda step: (step == 0) & (blk.k > 0))

    def logits_at(step, emb):
        return jax.lax.cond(use0(step), lambda: logits0,
                            lambda: fw.block_forward(params, cfg, emb, blk.start, cache, B, dt))

    return logits_at, cache


def _spd_block(spec: DecodeSpec, cfg: ModelConfig, params, d: RowParams, blk: Block):
    """SPD step loop (spec §5.2 steps 1-5): soft inputs, revisions, convergence; ≤ ``steps`` forwards."""
    M, dt = spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)
    logits_at, cache = _cached_logits(spec, cfg, params, blk)
    active = blk.xb == M

    def body(ic):
        step, xb, emb, done, nfe, tr = ic
        run = ~done
        x0, conf, probs = _pick(spec, d, logits_at(step, emb), nfe)
        nfe = nfe + run
        u = st.spd_update(xb, active, x0, conf, d.threshold, d.accept_threshold, M)
        emb_next = st.soft_inputs(table, u.tokens, x0, conf, probs, u.soft, top_k=spec.top_k, mask_id=M,
                                  impl=spec.soft_impl, dtype=dt)
        at_cap = step + 1 >= d.steps
        tr = _record(tr, blk.k, step, run, u.tokens, conf, st.spd_states(u, blk.prompt, u.stop | at_cap, M))
        xb = jnp.where(run[:, None], u.tokens, xb)
        emb = jnp.where(run[:, None, None], emb_next, emb)
        return step + 1, xb, emb, done | u.stop | at_cap, nfe, tr

    def cond(ic):  # the runtime per-row cap is folded into ``done``; max_steps bounds the trace
        return (ic[0] < spec.max_steps) & jnp.any(~ic[3])

    emb0 = jnp.take(table, blk.xb, axis=0).astype(dt)
    init = (jnp.int32(0), blk.xb, emb0, ~blk.live, blk.nfe, blk.trace)
    _, xb, _, _, nfe, tr = jax.lax.while_loop(cond, body, init)
    return xb, cache, nfe, tr


def _threshold_block(spec: DecodeSpec, cfg: ModelConfig, params, d: RowParams, blk: Block):
    """dInfer threshold decoding (spec §5.5a): final commits, ``max_unroll`` forwards per check."""
    M, dt = spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)
    logits_at, cache = _cached_logits(spec, cfg, params, blk)

    def body(ic):
        step, xb, left, done, nfe, tr = ic
        run = ~done
        x0, conf, _ = _pick(spec, d, logits_at(step, jnp.take(table, xb, axis=0).astype(dt)), nfe)
        nfe = nfe + run
        tokens, transfer = st.threshold_update(xb, x0, conf, d.threshold, M)
        n_mask = (tokens == M).sum(-1)
        left = left - 1
        # at temperature 0 a forward that transfers nothing (every masked argmax is MASK) repeats
        # forever in the reference; end the block instead
        stuck = ~transfer.any(-1) & (n_mask > 0) if spec.greedy else jnp.zeros_like(run)
        finished = ((left == 0) & (n_mask == 0)) | stuck
        left = jnp.where(left == 0, st.unroll_count(n_mask, spec.expected_tpf, spec.max_unroll), left)
        tr = _record(tr, blk.k, step, run, tokens, conf, st.final_states(tokens, blk.prompt, M))
        xb = jnp.where(run[:, None], tokens, xb)
        return step + 1, xb, left, done | (run & finished), nfe, tr

    def cond(ic):  # the static worst case of one token per check
        return (ic[0] < spec.max_steps) & jnp.any(~ic[3])

    left0 = st.unroll_count((blk.xb == M).sum(-1), spec.expected_tpf, spec.max_unroll)
    init = (jnp.int32(0), blk.xb, left0, ~blk.live, blk.nfe, blk.trace)
    _, xb, _, _, nfe, tr = jax.lax.while_loop(cond, body, init)
    return xb, cache, nfe, tr


def _llada2_block(spec: DecodeSpec, cfg: ModelConfig, params, d: RowParams, blk: Block, first_logits):
    """The LLaDA2 HF ``generate`` step loop (spec §5.5b): per-step transfer counts with a threshold
    override. The reference recomputes ``[0, end)`` every step; here the finished blocks' K/V come
    from the cache (``forwards`` module doc) — the same logits under block-causal attention."""
    B, M, dt = spec.block_length, spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)
    logits_at, cache = _cached_logits(spec, cfg, params, blk, first_logits)

    def body(ic):
        step, xb, done, nfe, tr = ic
        run = ~done & (xb == M).any(-1) & (step < d.steps)  # a row past its own step count is done
        logits = logits_at(step, jnp.take(table, xb, axis=0).astype(dt))
        x0, conf, _ = _pick(spec, d, logits, nfe, tempered=True)
        nfe = nfe + run
        tokens, _ = st.llada2_update(xb, x0, conf, d.threshold, st.transfer_count(B, d.steps, step), M)
        tr = _record(tr, blk.k, step, run, tokens, conf, st.final_states(tokens, blk.prompt, M))
        xb = jnp.where(run[:, None], tokens, xb)
        return step + 1, xb, done | ~run, nfe, tr

    def cond(ic):
        step, xb, done = ic[:3]
        return (step < spec.max_steps) & jnp.any(~done & (xb == M).any(-1) & (step < d.steps))

    _, xb, _, nfe, tr = jax.lax.while_loop(cond, body,
                                           (jnp.int32(0), blk.xb, ~blk.live, blk.nfe, blk.trace))
    return xb, cache, nfe, tr


def decode_program(spec: DecodeSpec, config: ModelConfig, params, prompt_ids, d: RowParams):
    """The traced program (wrap in ``jax.jit`` with ``spec``/``config`` bound)."""
    TRACE_COUNT[spec.strategy] += 1
    if spec.strategy not in ("spd", "threshold", "llada2"):
        raise ValueError(f"strategy {spec.strategy!r} is not one of {st.STRATEGIES}")
    b, B, dt = prompt_ids.shape[0], spec.block_length, jnp.dtype(spec.dtype)
    s0, _, _ = row_geometry(d.prompt_lens, d.gen_length, B)
    if spec.strategy == "llada2":  # the first forward is block 0's first step: no NFE of its own
        x = jnp.full((b, spec.prompt_len + B), spec.mask_id, jnp.int32)
        x = x.at[:, :spec.prompt_len].set(prompt_ids)
        first, cache = fw.first_block(params, config, x, s0, spec.prompt_len, spec.capacity, B, dt)
        return _block_loop(spec, d, prompt_ids, cache, jnp.zeros((b,), jnp.int32),
                           lambda blk: _llada2_block(spec, config, params, d, blk, first),
                           eos_in_prompt_tail=False)
    body = _spd_block if spec.strategy == "spd" else _threshold_block
    cache = fw.prefill(params, config, prompt_ids, s0, spec.capacity, B, dt)
    return _block_loop(spec, d, prompt_ids, cache, jnp.ones((b,), jnp.int32),  # the prefill: 1 NFE (spec §6)
                       lambda blk: body(spec, config, params, d, blk), eos_in_prompt_tail=True)
