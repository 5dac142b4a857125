"""The block step: decode (part of) one block for a batch of rows. One step, two drivers.

``generate`` (:mod:`dmax_jax.decoding.loop`) calls it once per block inside a ``lax.while_loop``
over blocks; the serving engine (:mod:`dmax_jax.serving.program`) calls it once per round over the
slots it gathered, per served strategy. Everything a decoding rule touches lives here, once:

    first_logits   the cross-block forward of the rows starting block k > 0 (commits block k-1,
                   algorithm §5.2 step 1); its logits are those rows' step-0 logits
    decode_block   the strategy's step loop: one forward per step (hard or soft input embeddings,
                   algorithm §5.2 step 2), the token choice, the step rule (SPD transfer and
                   revision, algorithm §5.2 steps 3-4; threshold, §5.5a; llada2, §5.5b), the next soft
                   inputs (§5.2 step 5), the stop rules, and the step record (trace / snapshots)

Rows are independent: each carries its own block start, knobs (``RowParams``), forward counter and
``live`` flag; a row that stops is frozen while the others go on, so a row's tokens never depend on
its batch. Forwards run only for the rows that need them (``decoding.compact``; at full width when
``ProgramSpec.compact`` is off). The engine may stop a block early (``ProgramSpec.exit_factor``) and
resume it in a later call from ``Resume`` (its step count, soft inputs, unroll counter).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import forwards as fw
from dmax_jax.decoding import strategies as st
from dmax_jax.decoding.compact import compacted, put_rows, take_rows
from dmax_jax.decoding.config import ProgramSpec, RowParams
from dmax_jax.model.kv_cache import KVCache
from dmax_jax.model.llada2 import embedding_table


@flax.struct.dataclass
class Resume:
    """Where a block paused by an earlier call stands (the engine's rows; each ``[n]`` / ``[n, B, H]``).

    Args:
        resumed: the row continues a paused block (else it starts the block afresh).
        steps_done: forwards of this block the row already ran.
        left: threshold decoding's forwards left before its next progress check.
        embeds: SPD's next input embeddings (soft) of the paused block.
    """

    resumed: jax.Array
    steps_done: jax.Array
    left: jax.Array
    embeds: jax.Array


@flax.struct.dataclass
class StepRecord:
    """The block after every forward of one call, ``[S, n, B]`` (``valid [S, n]``: the row ran that
    forward). ``confidence`` / ``state`` only with ``ProgramSpec.trace`` (else None)."""

    tokens: jax.Array
    valid: jax.Array
    confidence: Any = None
    state: Any = None


@flax.struct.dataclass
class _Rows:
    """What every step rule reads of the block's rows (fixed for the block step)."""

    params: RowParams       # the rows' traced knobs
    table: jax.Array        # the embedding table
    prompt: jax.Array       # [n, B] prompt-tail positions
    decoded: jax.Array      # [n, B] positions SPD decodes (and may revise): past the prompt
    steps_done: Any         # forwards of this block run in earlier calls (0 or [n])


@flax.struct.dataclass
class BlockOutput:
    """What one call of :func:`decode_block` leaves, per row.

    Args:
        tokens: ``[n, B]`` the block's tokens (rows that did not run: their entry tokens).
        nfe: ``[n]`` forward counters after the call.
        finished: ``[n]`` the block is decoded (False: paused by the engine's early exit).
        embeds: ``[n, B, H]`` SPD's next input embeddings (what a paused row resumes from).
        left: ``[n]`` threshold decoding's unroll counter (what a paused row resumes from).
        record: the step record, or None (neither ``trace`` nor ``snapshots``).
    """

    tokens: jax.Array
    nfe: jax.Array
    finished: jax.Array
    embeds: Any
    left: jax.Array
    record: Any


def cache_rows(cache: KVCache, idx) -> KVCache:
    """Rows ``idx`` of a cache (its row axis is 1); the cache itself for ``None``."""
    if idx is None:
        return cache
    return KVCache({n: a[:, idx] for n, a in cache.k.items()}, {n: a[:, idx] for n, a in cache.v.items()},
                   cache.length[idx])


def put_cache_rows(cache: KVCache, idx, part: KVCache) -> KVCache:
    """``cache`` with ``part``'s K/V written into rows ``idx`` (``None``: all rows; lengths untouched)."""
    if idx is None:
        return cache.replace(k=part.k, v=part.v)
    return cache.replace(k={n: a.at[:, idx].set(part.k[n]) for n, a in cache.k.items()},
                         v={n: a.at[:, idx].set(part.v[n]) for n, a in cache.v.items()})


def first_logits(spec: ProgramSpec, cfg: ModelConfig, params, x: jax.Array, start: jax.Array,
                 crossing: jax.Array, cache: KVCache, base: jax.Array) -> tuple[jax.Array, KVCache]:
    """The cross-block forward of the ``crossing`` rows (hard tokens of blocks k-1 and k from ``x``;
    commits block k-1, algorithm §5.3): ``(their block-k logits, the cache)``; other rows keep
    ``base``'s logits and their cache. Rows computed without crossing (a compact width wider than
    the count) write their unused K/V into scratch columns past ``capacity`` and keep their length."""
    B, dt = spec.block_length, jnp.dtype(spec.dtype)

    def run(idx):
        part, crosses = cache_rows(cache, idx), take_rows(crossing, idx)
        at = jnp.where(crosses, take_rows(start, idx), spec.capacity + B)  # others: scratch
        logits, new = fw.cross_forward(params, cfg, take_rows(x, idx), at, part, B, dt,
                                       cache_window=spec.capacity, platform=spec.platform)
        return logits, new.replace(length=jnp.where(crosses, new.length, part.length))

    def put(acc, idx, res, _):
        (logits, c), (lg, part) = acc, res
        c = put_cache_rows(c, idx, part)
        return put_rows(logits, idx, lg), c.replace(length=put_rows(c.length, idx, part.length))

    return compacted(crossing, run, (base, cache), put, enabled=spec.compact)


def _block_logits(spec: ProgramSpec, cfg: ModelConfig, params, cache, start, need, embeds, base):
    """The block forward on ``embeds`` for the ``need`` rows (compacted); other rows keep ``base``."""

    def run(idx):
        return fw.block_forward(params, cfg, take_rows(embeds, idx), take_rows(start, idx),
                                cache_rows(cache, idx), spec.block_length, jnp.dtype(spec.dtype),
                                cache_window=spec.capacity, platform=spec.platform)

    def put(acc, idx, lg, keep):  # a row not needed keeps its logits (step 0: the cross forward's)
        return put_rows(acc, idx, jnp.where(keep[:, None, None], lg, take_rows(acc, idx)))

    return compacted(need, run, base, put, enabled=spec.compact)


def _pick(spec: ProgramSpec, rows: RowParams, logits, nfe, live, *, tempered: bool):
    """``choose_tokens`` per row with the row's own key ``(seed, request id, forward counter)``. A
    program of ``greedy=None`` takes the argmax branch when every live row is at temperature 0."""

    def pick(greedy: bool):
        keys = None if greedy else st.row_keys(rows.seed, rows.request_ids, nfe)
        return st.choose_tokens(logits, greedy=greedy, temperature=rows.temperature, keys=keys,
                                tempered_confidence=tempered, need_probs=spec.top_k > 1, top_p=rows.top_p,
                                top_k=rows.top_k)

    if spec.greedy is not None:
        return pick(spec.greedy)
    cold = ((rows.temperature == 0) | ~live).all()
    return jax.lax.cond(cold, lambda: pick(True), lambda: pick(False))


def _record(spec: ProgramSpec, rec: StepRecord | None, step, run, tokens, conf, state_fn):
    if rec is None:
        return None
    rec = rec.replace(tokens=rec.tokens.at[step].set(tokens), valid=rec.valid.at[step].set(run))
    if spec.trace:
        rec = rec.replace(confidence=rec.confidence.at[step].set(conf),
                          state=rec.state.at[step].set(state_fn()))
    return rec


def empty_record(spec: ProgramSpec, n: int) -> StepRecord | None:
    """A zero step record for ``n`` rows, or None when the program records nothing."""
    if not (spec.trace or spec.snapshots):
        return None
    shape = (spec.record_steps, n, spec.block_length)
    full = (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int8)) if spec.trace else (None, None)
    return StepRecord(jnp.zeros(shape, jnp.int32), jnp.zeros(shape[:2], bool), *full)


def _spd_rule(spec: ProgramSpec, b, step, xb, x0, conf, probs, left):
    """SPD (algorithm §5.2 steps 3-5): cutoff transfer and revision, then the next soft inputs."""
    M = spec.mask_id
    u = st.spd_update(xb, b.decoded, x0, conf, b.params.threshold, b.params.accept_threshold, M)
    emb = st.soft_inputs(b.table, u.tokens, x0, conf, probs, u.soft, top_k=spec.top_k, mask_id=M,
                         impl=spec.soft_impl, dtype=jnp.dtype(spec.dtype), platform=spec.platform)
    at_cap = b.steps_done + step + 1 >= b.params.steps
    stop = u.stop | at_cap
    return u.tokens, emb, left, stop, lambda: st.spd_states(u, b.prompt, stop, M)


def _threshold_rule(spec: ProgramSpec, b, step, xb, x0, conf, probs, left):
    """dInfer threshold decoding (algorithm §5.5a): final commits, a progress check every
    ``unroll_count`` forwards. At temperature 0 a forward that transfers nothing while masks remain
    (every masked argmax is MASK) would repeat forever in the reference: it ends the block here."""
    M = spec.mask_id
    tokens, transfer = st.threshold_update(xb, x0, conf, b.params.threshold, M)
    n_mask = (tokens == M).sum(-1)
    left = left - 1
    stuck = ~transfer.any(-1) & (n_mask > 0) & (b.params.temperature == 0)
    stop = ((left == 0) & (n_mask == 0)) | stuck
    left = jnp.where(left == 0, st.unroll_count(n_mask, spec.expected_tpf, spec.max_unroll), left)
    return tokens, None, left, stop, lambda: st.final_states(tokens, b.prompt, M)


def _llada2_rule(spec: ProgramSpec, b, step, xb, x0, conf, probs, left):
    """The LLaDA2 HF ``generate`` rule (algorithm §5.5b): the step's transfer count, with a threshold
    override; the block ends when it holds no MASK or its steps are spent."""
    M, rows = spec.mask_id, b.params
    n = st.transfer_count(spec.block_length, rows.steps, b.steps_done + step)
    tokens, _ = st.llada2_update(xb, x0, conf, rows.threshold, n, M)
    stop = ~(tokens == M).any(-1) | (b.steps_done + step + 1 >= rows.steps)
    return tokens, None, left, stop, lambda: st.final_states(tokens, b.prompt, M)


RULES = {"spd": _spd_rule, "threshold": _threshold_rule, "llada2": _llada2_rule}


def _while(spec: ProgramSpec, bound: int, body, carry):
    """``carry = body(carry)`` while ``step < bound`` and a row is live (``carry = (step, done, ...)``).
    With ``exit_factor`` (the engine) also no longer than more than ``1 / exit_factor`` of the rows
    that entered live are still live, after at least one step.

    Why the early exit: a block's forwards are as many as its slowest row needs, and on a
    compute-bound device every forward costs all ``n`` rows. Rows still live at the exit are paused
    (tokens, soft inputs and counters kept: ``Resume``) and continue in the engine's next round,
    while the rows that finished commit and start their next block beside them. A paused row's
    forwards are exactly those it would have run without the pause."""
    live0 = (~carry[1]).sum()

    def go_on(c):
        live = (~c[1]).sum()
        if not spec.exit_factor:
            return (c[0] < bound) & (live > 0)
        return (c[0] < bound) & (live > 0) & ((c[0] == 0) | (live * spec.exit_factor > live0))

    return jax.lax.while_loop(go_on, body, carry)


def decode_block(spec: ProgramSpec, strategy: str, cfg: ModelConfig, params, rows: RowParams, x: jax.Array,
                 start: jax.Array, live: jax.Array, cache: KVCache, step0: tuple[jax.Array, jax.Array],
                 nfe: jax.Array, resume: Resume | None = None) -> BlockOutput:
    """Decode the block at ``start`` of every ``live`` row of ``x [n, W]`` with ``strategy``'s rule.

    ``step0 = (logits [n, B, V], given [n])``: rows ``given`` take those logits at step 0 (the cross
    forward's, :func:`first_logits`, or llada2's first forward); every other forward is the block
    forward against ``cache``. ``nfe`` counts every forward of a row (and keys its samples).
    ``resume`` (engine): rows continuing a paused block. Returns the rows' :class:`BlockOutput`."""
    B, M, dt = spec.block_length, spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)
    xb0 = fw.row_slice(x, start, B)
    pos = fw.positions(start, B)
    b = _Rows(params=rows, table=table, prompt=pos < rows.prompt_lens[:, None],
              decoded=pos >= rows.prompt_lens[:, None], steps_done=0 if resume is None else resume.steps_done)
    hard = lambda xb: jnp.take(table, xb, axis=0).astype(dt)  # noqa: E731
    emb0 = hard(xb0) if strategy == "spd" else None
    left0 = st.unroll_count((xb0 == M).sum(-1), spec.expected_tpf, spec.max_unroll)
    if resume is not None:
        left0 = jnp.where(resume.resumed, resume.left, left0)
        if emb0 is not None:
            emb0 = jnp.where(resume.resumed[:, None, None], resume.embeds, emb0)
    logits0, given = step0

    def body(c):
        step, done, xb, emb, left, nfe, rec = c
        run = ~done
        if strategy == "llada2":  # a row past its own step count, or without MASK, is done
            run = run & (xb == M).any(-1) & (b.steps_done + step < rows.steps)
        need = run & ~((step == 0) & given)
        inputs = hard(xb) if emb is None else emb
        logits = _block_logits(spec, cfg, params, cache, start, need, inputs, logits0)
        x0, conf, probs = _pick(spec, rows, logits, nfe, live, tempered=strategy == "llada2")
        tokens, emb_next, left, stop, states = RULES[strategy](spec, b, step, xb, x0, conf, probs, left)
        rec = _record(spec, rec, step, run, tokens, conf, states)
        xb = jnp.where(run[:, None], tokens, xb)
        if emb is not None:
            emb = jnp.where(run[:, None, None], emb_next, emb)
        return step + 1, done | ~run | stop, xb, emb, left, nfe + run, rec

    init = (jnp.int32(0), ~live, xb0, emb0, left0, nfe, empty_record(spec, x.shape[0]))
    _, done, xb, emb, left, nfe, rec = _while(spec, spec.steps_of(strategy), body, init)
    return BlockOutput(tokens=xb, nfe=nfe, finished=done, embeds=emb, left=left, record=rec)
