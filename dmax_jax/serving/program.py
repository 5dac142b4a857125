"""The engine's compiled programs: prefill chunks for admitted slots, then one block for every decoding slot.

Device state (donated every call): ``x [slots + 1, W]`` token rows and the KV cache
``[.., slots + 1, W, ..]`` with ``W = capacity + scratch`` (the extra row is scratch too). One round
is up to two calls, each skipped by the host when it has nothing to do::

    prefill_program: write ``P`` prompt chunks (P = the smallest compiled prefill width holding this
                    round's chunks) into their slots' rows and, if any lies before its slot's first
                    block ``s0``, forward them against the slots' cache rows
    round_program:
    step-0 logits:  cross-block forward for slots starting block k > 0 (commits block k-1), the plain
                    block forward for the others (first block, or a paused block resumed) — each run
                    for only the slots that need it (``compact.compacted``)
    per strategy:   its step loop (``lax.while_loop``) over the slots decoding with it, until their
                    blocks are done or too few are left (``_step_loop``: the rest pause, in ``x``/``emb``);
                    each forward computes only the rows still in their block (compacted)
    write back:     the block tokens into ``x``; outputs blocks, finished flags, forwards, step snapshots

Every slot carries its own block start, block index, knobs and forward counter, so slots at different
blocks share the batch and each row's arithmetic matches ``generate`` decoding it alone. Slots that
a compacted cross forward computes without needing it write their (unused) K/V into the scratch
slots past ``capacity`` and keep their cache length: nothing they hold is touched.
"""

from __future__ import annotations

import collections
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import forwards as fw
from dmax_jax.decoding import strategies as st
from dmax_jax.decoding.config import RowParams
from dmax_jax.model.kv_cache import KVCache, init_cache
from dmax_jax.model.llada2 import embedding_table, forward
from dmax_jax.model.masks import MaskSpec
from dmax_jax.serving.compact import compacted, put_rows, take_rows

TRACE_COUNT: collections.Counter = collections.Counter()  # traces, per (spec, config, slots, sharding, width)


@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """Everything static about the round program (hashable)."""

    strategies: tuple[str, ...]
    block_length: int
    capacity: int          # positions per slot (a multiple of block_length)
    prefill_chunk: int     # a multiple of block_length
    prefill_batch: int     # prompt chunks (of different slots) per round
    mask_id: int
    spd_max_steps: int
    threshold_max_steps: int
    top_k: int
    max_unroll: int
    expected_tpf: int
    soft_impl: str
    dtype: str
    exit_factor: int = 4   # a round's step loop ends once at most 1/exit_factor of its rows are live
    compact: bool = True   # forwards run for the rows that need them only (compact.py)

    @property
    def width(self) -> int:
        """Row width: capacity + scratch (cross-forward writes of idle slots, an overhanging chunk).
        No row's valid cache length ever passes ``capacity``, so attention reads the first
        ``capacity`` slots only (``cache_window``) and never pays for the scratch."""
        return self.capacity + max(2 * self.block_length, self.prefill_chunk)

    @property
    def max_steps(self) -> int:
        n = {"spd": self.spd_max_steps, "threshold": self.threshold_max_steps}
        return max(n[s] for s in self.strategies)


@flax.struct.dataclass
class SlotState:
    x: jax.Array       # [slots, W] int32; a paused block's partly decoded tokens stay in place
    cache: KVCache
    emb: jax.Array     # [slots, B, H] a paused spd block's next input embeddings (soft)


@flax.struct.dataclass
class SlotRound:
    """Per-entry traced inputs of one round (each ``[width]``): the slot an entry works on, where that
    slot is, plus its request's ``RowParams`` (the knobs ``generate`` traces; ``request_ids`` is the
    sampling stream)."""

    slot: jax.Array        # int32: the slot of this entry (unused entries: the scratch row)
    decoding: jax.Array    # bool: advance this slot by one block
    strategy: jax.Array    # int32: index into RoundSpec.strategies
    k: jax.Array           # int32: block index of the request (0 = first block)
    start: jax.Array       # int32: first position of the block
    nfe: jax.Array         # int32: forwards so far (prefill = 1); the sampling key counter
    resume: jax.Array      # bool: the slot's block was paused mid-way by an earlier round
    bstep: jax.Array       # int32: forwards of the current block run so far (0 unless resume)
    left: jax.Array        # int32: threshold's forwards left before its next progress check (resume)
    rows: RowParams        # temperature 0 = greedy row


@flax.struct.dataclass
class PrefillChunk:
    """Up to ``prefill_batch`` prompt chunks, one per prefilling slot (each ``[P]``; ``ids [P, chunk]``):
    entry p writes ``ids[p]`` to positions ``[start[p], start[p] + chunk)`` of slot ``slot[p]``.
    Unused entries point at the scratch slot (index = number of slots), so every entry can be
    computed and written without touching a live slot."""

    slot: jax.Array        # int32
    start: jax.Array       # int32
    ids: jax.Array         # [P, chunk] int32 (MASK past the prompt)
    forward: jax.Array     # bool: some of the chunk lies before s0, so its K/V are needed
    reset: jax.Array       # bool: first chunk of the request: clear the row to MASK first
    length: jax.Array      # int32: the slot's valid cache length after this chunk


def init_state(spec: RoundSpec, cfg: ModelConfig, slots: int) -> SlotState:
    """``slots`` rows plus the scratch row of unused prefill entries."""
    x = jnp.full((slots + 1, spec.width), spec.mask_id, jnp.int32)
    dt = jnp.dtype(spec.dtype)
    emb = jnp.zeros((slots + 1, spec.block_length, cfg.hidden_size), dt)
    return SlotState(x=x, cache=init_cache(cfg, slots + 1, spec.width, dt), emb=emb)


def _cache_rows(cache: KVCache, idx) -> KVCache:
    """Rows ``idx`` of a cache (its slot axis is 1); the cache itself for ``None``."""
    if idx is None:
        return cache
    return KVCache({n: a[:, idx] for n, a in cache.k.items()}, {n: a[:, idx] for n, a in cache.v.items()},
                   cache.length[idx])


def _put_cache_rows(cache: KVCache, idx, part: KVCache) -> KVCache:
    """``cache`` with ``part``'s K/V written into rows ``idx`` (``None``: all rows; lengths untouched)."""
    if idx is None:
        return cache.replace(k=part.k, v=part.v)
    return cache.replace(k={n: a.at[:, idx].set(part.k[n]) for n, a in cache.k.items()},
                         v={n: a.at[:, idx].set(part.v[n]) for n, a in cache.v.items()})


def prefill_program(spec: RoundSpec, cfg: ModelConfig, params, state: SlotState,
                    pc: PrefillChunk) -> SlotState:
    """Write the chunks' tokens and, if any chunk lies before its slot's ``s0``, forward all chunks
    as one ``[P, chunk]`` batch against their slots' cache rows (block-causal, committed). K/V past
    a slot's ``s0`` land beyond its valid ``length`` and stay invisible, as in ``generate``'s prefill."""
    M, dt = spec.mask_id, jnp.dtype(spec.dtype)
    rows = jnp.where(pc.reset[:, None], M, state.x[pc.slot])
    x = state.x.at[pc.slot].set(fw.row_update(rows, pc.start, pc.ids))

    def chunk_forward(cache: KVCache) -> KVCache:
        part = _cache_rows(cache, pc.slot).replace(length=pc.start)
        mask = MaskSpec("block_causal", spec.block_length)
        pos = fw.positions(pc.start, spec.prefill_chunk)
        _, part = forward(params, cfg, pc.ids, positions=pos, mask=mask, cache=part, commit=True, dtype=dt,
                          cache_window=spec.capacity)
        return _put_cache_rows(cache, pc.slot, part)

    cache = jax.lax.cond(pc.forward.any(), chunk_forward, lambda c: c, state.cache)
    cache = cache.replace(length=cache.length.at[pc.slot].set(pc.length))
    return SlotState(x=x, cache=cache, emb=state.emb)


def _cross(spec: RoundSpec, cfg: ModelConfig, params, state: SlotState, r: SlotRound):
    """The cross-block forward of the slots at block k > 0 (commits their block k-1), computed for
    those slots only (``compacted``): ``(their block logits, the cache, the mask of those slots)``."""
    B, dt, b = spec.block_length, jnp.dtype(spec.dtype), r.start.shape[0]
    cross = r.decoding & (r.k > 0) & ~r.resume

    def run(idx):
        part, crosses = _cache_rows(state.cache, idx), take_rows(cross, idx)
        start = jnp.where(crosses, take_rows(r.start, idx), spec.capacity + B)  # others: scratch
        logits, new = fw.cross_forward(params, cfg, take_rows(state.x, idx), start, part, B, dt,
                                       cache_window=spec.capacity)
        return logits, new.replace(length=jnp.where(crosses, new.length, part.length))

    def put(base, idx, res, _):  # rows not crossing wrote only scratch K/V and kept their length
        (logits, cache), (lg, part) = base, res
        cache = _put_cache_rows(cache, idx, part)
        return put_rows(logits, idx, lg), cache.replace(length=put_rows(cache.length, idx, part.length))

    base = (jnp.zeros((b, B, cfg.vocab_size), jnp.float32), state.cache)
    logits, cache = compacted(cross, run, base, put, enabled=spec.compact)
    return logits, cache, cross


def _logits_at(spec: RoundSpec, cfg: ModelConfig, params, cache, r: SlotRound, live, c0, step, emb):
    """Logits of forward ``step`` of the block for the ``live`` rows: at step 0 a slot at k > 0 uses
    the cross-block forward's (``c0 = (logits, mask)``), every other live row the block forward on
    ``emb``, computed for those rows only (``compacted``). Other rows' logits are not to be used."""
    logits_c, cross = c0
    need = live & ~((step == 0) & cross)

    def run(idx):
        return fw.block_forward(params, cfg, take_rows(emb, idx), take_rows(r.start, idx),
                                _cache_rows(cache, idx), spec.block_length, jnp.dtype(spec.dtype),
                                cache_window=spec.capacity)

    def put(base, idx, lg, keep):  # a row not needed keeps its logits (step 0: the cross forward's)
        return put_rows(base, idx, jnp.where(keep[:, None, None], lg, take_rows(base, idx)))

    return compacted(need, run, logits_c, put, enabled=spec.compact)


def _pick(spec: RoundSpec, r: SlotRound, logits, nfe, need_probs: bool):
    """``choose_tokens`` per row: rows at temperature 0 take the argmax, the others the Gumbel-max
    draw with their own key; the sampling program only runs if some decoding row samples."""
    d = r.rows

    def pick(greedy: bool):
        keys = None if greedy else st.row_keys(d.seed, d.request_ids, nfe)
        return st.choose_tokens(logits, greedy=greedy, temperature=d.temperature, keys=keys,
                                tempered_confidence=False, need_probs=need_probs)

    return jax.lax.cond(((d.temperature == 0) | ~r.decoding).all(), lambda: pick(True), lambda: pick(False))


def _record(rec, step, run, tokens):
    t, v = rec["tokens"], rec["valid"]
    return {"tokens": t.at[step].set(jnp.where(run[:, None], tokens, t[step])),
            "valid": v.at[step].set(v[step] | run)}


def _step_loop(body, ctx, carry, max_steps: int, exit_factor: int):
    """``carry = body(ctx, carry)`` while ``step < max_steps`` and a row is live, but no longer than
    more than ``1 / exit_factor`` of the rows that entered live are still live (after at least one
    step); ``carry = (step, done [n], per-row arrays [n, ..], rec (row axis 1))``.

    Why the early exit: a block's forwards are as many as its slowest row needs, and on a
    compute-bound device every forward costs all ``n`` rows. Rows still live at the exit are paused
    (their block tokens, soft inputs and counters are saved) and resume in the next round, while the
    rows that finished commit and start their next block beside them: nobody waits for a straggler.
    A paused row's forwards are exactly those it would have run without the pause.
    """
    live0 = (~carry[1]).sum()

    def go_on(c):
        live = (~c[1]).sum()
        return (c[0] < max_steps) & (live > 0) & ((c[0] == 0) | (live * exit_factor > live0))

    return jax.lax.while_loop(go_on, lambda c: body(ctx, c), carry)


def _spd_loop(spec: RoundSpec, cfg: ModelConfig, params, part: SlotState, r: SlotRound, rows, xb0, c0, nfe,
              rec):
    """SPD step loop (spec §5.2) over ``rows``, the rules of ``decoding.strategies``; a resumed row
    starts from its saved soft inputs. Returns the rows' tokens, counters, records, next inputs."""
    M, dt = spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)

    def body(ctx, ic):
        cache, r, c0, active = ctx
        step, done, (xb, emb, nfe), rec = ic
        run = ~done
        logits = _logits_at(spec, cfg, params, cache, r, run, c0, step, emb)
        x0, conf, probs = _pick(spec, r, logits, nfe, spec.top_k > 1)
        nfe = nfe + run
        u = st.spd_update(xb, active, x0, conf, r.rows.threshold, r.rows.accept_threshold, M)
        emb_next = st.soft_inputs(table, u.tokens, x0, conf, probs, u.soft, top_k=spec.top_k, mask_id=M,
                                  impl=spec.soft_impl, dtype=dt)
        rec = _record(rec, step, run, u.tokens)
        xb = jnp.where(run[:, None], u.tokens, xb)
        emb = jnp.where(run[:, None, None], emb_next, emb)
        return step + 1, done | u.stop | (r.bstep + step + 1 >= r.rows.steps), (xb, emb, nfe), rec

    emb0 = jnp.where(r.resume[:, None, None], part.emb, jnp.take(table, xb0, axis=0).astype(dt))
    ctx = (part.cache, r, c0, _decoded_positions(spec, r))
    _, done, (xb, emb, nfe), rec = _step_loop(body, ctx, (jnp.int32(0), ~rows, (xb0, emb0, nfe), rec),
                                              spec.spd_max_steps, spec.exit_factor)
    return xb, nfe, rec, done, emb


def _threshold_loop(spec: RoundSpec, cfg: ModelConfig, params, part: SlotState, r: SlotRound, rows, xb0, c0,
                    nfe, rec):
    """dInfer threshold step loop (spec §5.5a) over ``rows``; as ``generate``, a greedy row whose
    forward transfers nothing while masks remain ends its block; a resumed row keeps its unroll
    counter. Returns the rows' tokens, counters, records, unroll counters."""
    M, dt = spec.mask_id, jnp.dtype(spec.dtype)
    table = embedding_table(params)

    def body(ctx, ic):
        cache, r, c0 = ctx
        step, done, (xb, left, nfe), rec = ic
        emb = jnp.take(table, xb, axis=0).astype(dt)
        run = ~done
        logits = _logits_at(spec, cfg, params, cache, r, run, c0, step, emb)
        x0, conf, _ = _pick(spec, r, logits, nfe, False)
        nfe = nfe + run
        tokens, transfer = st.threshold_update(xb, x0, conf, r.rows.threshold, M)
        n_mask = (tokens == M).sum(-1)
        left = left - 1
        stuck = ~transfer.any(-1) & (n_mask > 0) & (r.rows.temperature == 0)
        finished = ((left == 0) & (n_mask == 0)) | stuck
        left = jnp.where(left == 0, st.unroll_count(n_mask, spec.expected_tpf, spec.max_unroll), left)
        rec = _record(rec, step, run, tokens)
        xb = jnp.where(run[:, None], tokens, xb)
        return step + 1, done | (run & finished), (xb, left, nfe), rec

    fresh = st.unroll_count((xb0 == M).sum(-1), spec.expected_tpf, spec.max_unroll)
    left0 = jnp.where(r.resume, r.left, fresh)
    ctx = (part.cache, r, c0)
    _, done, (xb, left, nfe), rec = _step_loop(body, ctx, (jnp.int32(0), ~rows, (xb0, left0, nfe), rec),
                                               spec.threshold_max_steps, spec.exit_factor)
    return xb, nfe, rec, done, left


LOOPS = {"spd": _spd_loop, "threshold": _threshold_loop}


def _decoded_positions(spec: RoundSpec, r: SlotRound) -> jax.Array:
    """``[n, B]`` the positions spd decodes, past the prompt: at a block's start exactly its MASKs (a
    prompt holds none; ``generate`` finds them so), in a resumed block also those decoded already."""
    return fw.positions(r.start, spec.block_length) >= r.rows.prompt_lens[:, None]


def _gather_slots(state: SlotState, slot) -> SlotState:
    return SlotState(x=state.x[slot], cache=_cache_rows(state.cache, slot), emb=state.emb[slot])


def _scatter_slots(state: SlotState, part: SlotState, slot) -> SlotState:
    """``part``'s rows back into their slots (entries on the scratch row may collide: it holds nothing)."""
    c = _put_cache_rows(state.cache, slot, part.cache)
    cache = c.replace(length=c.length.at[slot].set(part.cache.length))
    return SlotState(x=state.x.at[slot].set(part.x), cache=cache, emb=state.emb.at[slot].set(part.emb))


def round_program(spec: RoundSpec, cfg: ModelConfig, params, state: SlotState, r: SlotRound):
    """Advance every decoding slot through (the rest of) its block, or until its loop exits early
    (``_step_loop``); wrap in ``jax.jit`` with ``spec``/``config`` bound, ``state`` donated, after the
    round's ``prefill_program`` call if it had chunks.

    The block step works on ``n`` = the length of ``r``'s arrays entries, entry j on slot
    ``r.slot[j]`` (gathered, then scattered back): the host packs the decoding slots into the
    smallest compiled width holding them, so a lightly loaded engine does not compute its idle slots
    wherever they sit (unused entries are idle on the scratch row). Returns ``(state, out)``, per
    entry: ``out["blocks"] [n, B]`` the block's tokens, ``out["finished"] [n]`` whether the block is
    decoded (else it is paused: tokens, soft inputs and ``out["left"]`` resume it next round),
    ``out["nfe"] [n]`` the forward counters after the round, ``out["steps"] [S, n, B]`` /
    ``out["step_valid"] [S, n]`` the block after every forward of this round (provisional snapshots)."""
    B, n = spec.block_length, r.start.shape[0]
    part = _gather_slots(state, r.slot)
    logits_c, cache, cross = _cross(spec, cfg, params, part, r)
    part = part.replace(cache=cache)
    xb0 = fw.row_slice(part.x, r.start, B)
    rec = {"tokens": jnp.zeros((spec.max_steps, n, B), jnp.int32),
           "valid": jnp.zeros((spec.max_steps, n), bool)}
    xb, nfe, finished, emb, left = xb0, r.nfe, jnp.ones(n, bool), part.emb, r.left
    for i, name in enumerate(spec.strategies):
        rows = r.decoding & (r.strategy == i)
        xb_s, nfe, rec, done, resume = LOOPS[name](spec, cfg, params, part, r, rows, xb0, (logits_c, cross),
                                                   nfe, rec)
        xb = jnp.where(rows[:, None], xb_s, xb)
        finished = jnp.where(rows, done, finished)
        if name == "spd":
            emb = jnp.where(rows[:, None, None], resume, emb)
        else:
            left = jnp.where(rows, resume, left)
    x = jnp.where(r.decoding[:, None], fw.row_update(part.x, r.start, xb), part.x)
    out = {"blocks": xb, "finished": finished, "left": left, "nfe": nfe, "steps": rec["tokens"],
           "step_valid": rec["valid"]}
    return _scatter_slots(state, SlotState(x=x, cache=cache, emb=emb), r.slot), out


def state_sharding(params):
    """Where the engine's buffers live: replicated over the parameters' mesh (or their device)."""
    leaf = jax.tree.leaves(params)[0]
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, PartitionSpec())
    if sh is not None and len(sh.device_set) == 1:
        return jax.sharding.SingleDeviceSharding(next(iter(sh.device_set)))
    return None


PROGRAMS: dict = {}  # (spec, model config, slots, sharding) -> (jitted round, jitted prefill)


def jit_programs(key: tuple, shardings):
    """The jitted ``(round_program, prefill_program)`` of ``key = (spec, model config, slots,
    sharding)``, the slot state donated (its buffers are updated in place); traces count in
    ``TRACE_COUNT[key + ("block", width)]`` and ``TRACE_COUNT[key + ("prefill", P)]``."""
    spec, cfg, slots = key[:3]

    def block(params, state, r):
        TRACE_COUNT[(*key, "block", min(r.start.shape[0], slots))] += 1
        return round_program(spec, cfg, params, state, r)

    def prefill(params, state, pc):
        TRACE_COUNT[(*key, "prefill", pc.slot.shape[0])] += 1
        return prefill_program(spec, cfg, params, state, pc)

    if shardings is None:
        return jax.jit(block, donate_argnums=(1,)), jax.jit(prefill, donate_argnums=(1,))
    state_sh, out_sh = shardings
    return (jax.jit(block, donate_argnums=(1,), out_shardings=(state_sh, out_sh)),
            jax.jit(prefill, donate_argnums=(1,), out_shardings=state_sh))
