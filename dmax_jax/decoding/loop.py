"""The compiled decode program: one jit per request shape, blocks and steps as ``lax.while_loop``s.

Structure (all inside one XLA computation, no host round trip per step or per block)::

    prefill (1 NFE)                                        # spd / threshold only
    while any row live:                                    # outer loop: one block per iteration
        inner while: one forward per iteration             # strategy rule decides per row
        write block back, EOS early stop, advance
    -> x [b, C], nfe [b], gen_end [b] (+ trace buffers)

Rows progress independently: each has its own prompt length, block starts and positions; a row
that stopped (converged in this block, or finished with EOS / its last block) is frozen while the
others continue, and its NFE stops counting. Every row therefore gets exactly the tokens it gets
alone. The block counter ``k`` is shared: block ``k`` of every row starts at ``s0 + k·B``, so
whether the first forward is the cross-block one (``k > 0``) is uniform across the batch.

Compilations are counted by :data:`TRACE_COUNT` (one trace = one compilation of the program).

Where this departs from the references (spec §5, §7), on purpose:
* batch > 1: every stop test is per row (dInfer's are batch-global; its evals use batch 1);
* prompts shorter than a block: no stale MASK K/V in the cache (see ``cache.prefill``);
* threshold: dInfer commits the K/V of a block's last forward directly when that forward saw no
  MASK (an unrolled no-op forward); here the next block's first forward is always the cross-block
  one. Same NFE (that forward is the next block's first either way) and mathematically the same
  K/V and logits, so the same tokens; the previous block's K/V merely come from the cross forward
  instead of the no-op one (and that forward is 2B tokens wide instead of B). A forward that
  transfers nothing while masks remain (every masked argmax is MASK) ends the block at
  temperature 0, where the reference would loop forever; the per-block forward count is capped at
  the worst case of one token per check;
* llada2: temperature 0 is argmax (the HF copy samples multinomially even then, spec §7.12), and
  the recompute covers the whole bucket instead of ``[0, window)`` — identical under block-causal.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import cache as kv
from dmax_jax.decoding import strategies as st
from dmax_jax.decoding.layout import row_geometry
from dmax_jax.model.llada2 import embedding_table

TRACE_COUNT: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about one compiled decode program (hashable; part of the compile key)."""

    strategy: str
    block: int
    prompt_len: int        # padded prompt bucket
    capacity: int          # sequence / KV-cache slots
    mask_id: int
    greedy: bool
    max_steps: int         # forwards per block: spd cap, llada2 steps, threshold worst case
    top_k: int = 1         # spd soft-embedding mixing
    max_unroll: int = 4    # threshold
    expected_tpf: int = 4  # threshold
    soft_impl: str = "auto"
    dtype: str = "float32"
    trace: bool = False

    @property
    def max_blocks(self) -> int:
        return self.capacity // self.block


class Dyn(dict):
    """Traced per-request values: prompt_lens, request_ids, gen_length, eos_id, seed, threshold,
    accept_threshold, temperature, steps (llada2) — changing them never recompiles."""


def _trace_buffers(spec: DecodeSpec, b: int):
    if not spec.trace:
        return None
    shp = (spec.max_blocks, spec.max_steps, b, spec.block)
    return {"tokens": jnp.zeros(shp, jnp.int32), "confidence": jnp.zeros(shp, jnp.float32),
            "state": jnp.zeros(shp, jnp.int8), "valid": jnp.zeros(shp[:3], bool),
            "block_start": jnp.zeros((spec.max_blocks, b), jnp.int32)}


def _record(tr, k, step, run, tokens, conf, state):
    if tr is None:
        return None
    return {**tr, "tokens": tr["tokens"].at[k, step].set(tokens),
            "confidence": tr["confidence"].at[k, step].set(conf),
            "state": tr["state"].at[k, step].set(state), "valid": tr["valid"].at[k, step].set(run)}


def _finish_block(spec: DecodeSpec, eos_id, x, xb, start, live, gen_end, k, n_blocks):
    """Write the block back, apply the EOS early stop (spec §5.2: an EOS in the block ends the row;
    dInfer also overwrites everything after the block with EOS) and advance the row."""
    x = jnp.where(live[:, None], kv.row_update(x, start, xb), x)
    eos = live & (xb == eos_id).any(-1)
    after = jnp.arange(x.shape[1])[None, :] >= (start + spec.block)[:, None]
    x = jnp.where(eos[:, None] & after, eos_id, x)
    gen_end = jnp.where(live, start + spec.block, gen_end)
    live = live & ~eos & (k + 1 < n_blocks)
    return x, live, gen_end


def _cached_program(spec: DecodeSpec, cfg: ModelConfig, params, prompt_ids, d: Dyn):
    """SPD and threshold decoding over the prefix KV cache."""
    B, M, dt = spec.block, spec.mask_id, jnp.dtype(spec.dtype)
    b = prompt_ids.shape[0]
    table = embedding_table(params)
    plen = d["prompt_lens"]
    s0, _, n_blocks = row_geometry(plen, d["gen_length"], B)
    x = jnp.full((b, spec.capacity), M, jnp.int32).at[:, :spec.prompt_len].set(prompt_ids)
    cache = kv.prefill(params, cfg, prompt_ids, s0, spec.capacity, B, dt)
    nfe = jnp.ones((b,), jnp.int32)  # the prefill forward counts (spec §6)

    def outer(c):
        k, x, cache, nfe, live, gen_end, tr = c
        start = s0 + jnp.minimum(k, n_blocks - 1) * B
        xb0 = kv.row_slice(x, start, B)
        prompt = kv.positions(start, B) < plen[:, None]
        if tr is not None:
            tr = {**tr, "block_start": tr["block_start"].at[k].set(start)}

        # The cross-block forward runs once per block, outside the step loop, so the step loop only
        # reads the cache (a loop invariant: no per-step cache copies in the carry).
        logits0, cache = jax.lax.cond(
            k > 0, lambda c: kv.cross_forward(params, cfg, x, start, c, B, dt),
            lambda c: (jnp.zeros((b, B, cfg.vocab_size), jnp.float32), c), cache)

        def logits_at(step, emb):
            return jax.lax.cond((step == 0) & (k > 0), lambda: logits0,
                                lambda: kv.block_forward(params, cfg, emb, start, cache, B, dt))

        def pick(logits, nfe):
            keys = None if spec.greedy else st.row_keys(d["seed"], d["request_ids"], nfe)
            return st.choose_tokens(logits, greedy=spec.greedy, temperature=d["temperature"], keys=keys,
                                    tempered_confidence=False, need_probs=spec.top_k > 1)

        if spec.strategy == "spd":
            active = xb0 == M

            def body(ic):
                step, xb, emb, done, nfe, tr = ic
                logits = logits_at(step, emb)
                run = ~done
                x0, conf, probs = pick(logits, nfe)
                nfe = nfe + run
                u = st.spd_update(xb, active, x0, conf, d["threshold"], d["accept_threshold"], M)
                emb_next = st.soft_inputs(table, u.tokens, x0, conf, probs, u.soft, top_k=spec.top_k,
                                          mask_id=M, impl=spec.soft_impl, dtype=dt)
                final = u.stop | (step + 1 >= d["steps"])
                tr = _record(tr, k, step, run, u.tokens, conf, st.spd_states(u, prompt, final, M))
                xb = jnp.where(run[:, None], u.tokens, xb)
                emb = jnp.where(run[:, None, None], emb_next, emb)
                return step + 1, xb, emb, done | u.stop, nfe, tr

            emb0 = jnp.take(table, xb0, axis=0).astype(dt)
            init = (jnp.int32(0), xb0, emb0, ~live, nfe, tr)
        else:  # threshold
            def body(ic):
                step, xb, left, done, nfe, tr = ic
                logits = logits_at(step, jnp.take(table, xb, axis=0).astype(dt))
                run = ~done
                x0, conf, _ = pick(logits, nfe)
                nfe = nfe + run
                tokens, transfer = st.threshold_update(xb, x0, conf, d["threshold"], M)
                n_mask = (tokens == M).sum(-1)
                left = left - 1
                # at temperature 0 a forward that transfers nothing (every masked argmax is MASK)
                # repeats forever in the reference; end the block instead
                stuck = ~transfer.any(-1) & (n_mask > 0) if spec.greedy else jnp.zeros_like(run)
                finished = ((left == 0) & (n_mask == 0)) | stuck
                left = jnp.where(left == 0, st.unroll_count(n_mask, spec.expected_tpf, spec.max_unroll), left)
                tr = _record(tr, k, step, run, tokens, conf, st.final_states(tokens, prompt, M))
                xb = jnp.where(run[:, None], tokens, xb)
                return step + 1, xb, left, done | (run & finished), nfe, tr

            left0 = st.unroll_count((xb0 == M).sum(-1), spec.expected_tpf, spec.max_unroll)
            init = (jnp.int32(0), xb0, left0, ~live, nfe, tr)

        def cond(ic):  # spd: the runtime step cap (<= spec.max_steps); threshold: the static bound
            return (ic[0] < jnp.minimum(d["steps"], spec.max_steps)) & jnp.any(~ic[3])

        _, xb, _, _, nfe, tr = jax.lax.while_loop(cond, body, init)
        x, live_next, gen_end = _finish_block(spec, d["eos_id"], x, xb, start, live, gen_end, k, n_blocks)
        return k + 1, x, cache, nfe, live_next, gen_end, tr

    init = (jnp.int32(0), x, cache, nfe, n_blocks > 0, s0, _trace_buffers(spec, b))
    _, x, _, nfe, _, gen_end, tr = jax.lax.while_loop(lambda c: jnp.any(c[4]), outer, init)
    return {"x": x, "nfe": nfe, "gen_end": gen_end, "trace": tr}


def _llada2_program(spec: DecodeSpec, cfg: ModelConfig, params, prompt_ids, d: Dyn):
    """The LLaDA2 HF ``generate`` schedule (spec §5.5b): no cache, full block-causal recompute every
    step, per-step transfer counts with a threshold override, stop after a block holding EOS."""
    B, M, dt = spec.block, spec.mask_id, jnp.dtype(spec.dtype)
    b = prompt_ids.shape[0]
    plen, gen = d["prompt_lens"], d["gen_length"]
    s0, _, n_blocks = row_geometry(plen, gen, B)
    steps = d["steps"]  # runtime value <= spec.max_steps: changing it does not recompile
    x = jnp.full((b, spec.capacity), M, jnp.int32).at[:, :spec.prompt_len].set(prompt_ids)
    nfe = jnp.zeros((b,), jnp.int32)

    def outer(c):
        k, x, nfe, live, gen_end, tr = c
        start = s0 + jnp.minimum(k, n_blocks - 1) * B
        prompt = kv.positions(start, B) < plen[:, None]
        if tr is not None:
            tr = {**tr, "block_start": tr["block_start"].at[k].set(start)}

        def body(ic):
            step, xb, done, nfe, tr = ic
            run = ~done & (xb == M).any(-1)
            logits = kv.row_slice(kv.full_forward(params, cfg, kv.row_update(x, start, xb), B, dt), start, B)
            keys = None if spec.greedy else st.row_keys(d["seed"], d["request_ids"], nfe)
            x0, conf, _ = st.choose_tokens(logits, greedy=spec.greedy, temperature=d["temperature"],
                                           keys=keys, tempered_confidence=True)
            nfe = nfe + run
            tokens, _ = st.llada2_update(xb, x0, conf, d["threshold"], st.transfer_count(B, steps, step), M)
            tr = _record(tr, k, step, run, tokens, conf, st.final_states(tokens, prompt, M))
            xb = jnp.where(run[:, None], tokens, xb)
            return step + 1, xb, done | ~run, nfe, tr

        def cond(ic):
            step, xb, done = ic[:3]
            return (step < steps) & jnp.any(~done & (xb == M).any(-1))

        xb0 = kv.row_slice(x, start, B)
        _, xb, _, nfe, tr = jax.lax.while_loop(cond, body, (jnp.int32(0), xb0, ~live, nfe, tr))
        # EOS only counts in the generated part (the block may hold the prompt tail)
        xb_gen = jnp.where(prompt, M, xb)
        x = jnp.where(live[:, None], kv.row_update(x, start, xb), x)
        eos = live & (xb_gen == d["eos_id"]).any(-1)
        gen_end = jnp.where(live, jnp.minimum(start + B, plen + gen), gen_end)
        live = live & ~eos & (k + 1 < n_blocks)
        return k + 1, x, nfe, live, gen_end, tr

    init = (jnp.int32(0), x, nfe, n_blocks > 0, s0, _trace_buffers(spec, b))
    _, x, nfe, _, gen_end, tr = jax.lax.while_loop(lambda c: jnp.any(c[3]), outer, init)
    return {"x": x, "nfe": nfe, "gen_end": gen_end, "trace": tr}


def decode_program(spec: DecodeSpec, config: ModelConfig, params, prompt_ids, dyn: dict):
    """The traced program (wrap in ``jax.jit`` with ``spec``/``config`` bound)."""
    TRACE_COUNT[spec.strategy] += 1
    d = Dyn(dyn)
    if spec.strategy == "llada2":
        return _llada2_program(spec, config, params, prompt_ids, d)
    if spec.strategy in ("spd", "threshold"):
        return _cached_program(spec, config, params, prompt_ids, d)
    raise ValueError(f"strategy {spec.strategy!r} is not one of {st.STRATEGIES}")
