"""The engine's compiled programs: slot gather / scatter and prefill around the block step.

Device state (donated every call): ``x [slots + 1, L]`` token rows, the KV cache ``[.., slots + 1,
L, ..]`` and a paused SPD block's soft inputs, with ``L = ProgramSpec.row_len`` (capacity + scratch
columns; the extra row is scratch too). One engine round is up to two calls, each skipped by the
host when it has nothing to do::

    prefill_program   write this round's prompt chunks into their slots' rows and, if any lies before
                      its slot's first block ``s0``, forward them against the slots' cache rows
    round_program     gather the decoding slots into the round's width, then the block step
                      (``decoding.block``): ``first_logits`` for the slots starting block k > 0, and
                      ``decode_block`` per served strategy over its slots; scatter back

The decoding itself is :mod:`dmax_jax.decoding.block`'s, the very step ``generate`` runs, so a
slot's tokens equal ``generate`` decoding its prompt alone. ``lower_engine`` lowers the programs
from shapes only (the ahead-of-time compile tool); :class:`~dmax_jax.serving.engine.Engine` builds
its programs through the same :func:`lower_programs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.decoding import block
from dmax_jax.decoding import forwards as fw
from dmax_jax.decoding.compiled import abstract, replicated
from dmax_jax.decoding.config import DecodeConfig, ProgramSpec, RowParams
from dmax_jax.decoding.strategies import threshold_max_forwards
from dmax_jax.model.kv_cache import KVCache, init_cache
from dmax_jax.model.llada2 import forward
from dmax_jax.model.masks import MaskSpec
from dmax_jax.model.quant import params_for
from dmax_jax.platforms import in_mesh_of, platform_of
from dmax_jax.serving import prefix_cache as pc
from dmax_jax.serving.compact import resolve_compact

SERVED_STRATEGIES = ("spd", "threshold")


@flax.struct.dataclass
class SlotState:
    """The engine's device buffers, one row per slot plus the scratch row."""

    x: jax.Array       # [slots + 1, L] int32; a paused block's partly decoded tokens stay in place
    cache: KVCache
    emb: jax.Array     # [slots + 1, B, H] a paused SPD block's next input embeddings (soft)


@flax.struct.dataclass
class SlotRound:
    """Per-entry inputs of one round (each ``[n]``, n = the round's width): entry j works on slot
    ``slot[j]``; unused entries are idle on the scratch row.

    Args:
        slot: the slot of the entry (unused entries: the scratch row).
        decoding: advance this slot by (the rest of) one block.
        strategy: index into ``ProgramSpec.strategies``.
        k: block index of the request (0 = first block).
        start: first position of the block.
        nfe: forwards so far (prefill = 1); the sampling key counter.
        resumed: the slot's block was paused mid-way by an earlier round.
        steps_done: forwards of the current block run so far (0 unless resumed).
        left: threshold decoding's forwards left before its next progress check (resumed).
        rows: the request's ``RowParams`` (temperature 0 = greedy row).
    """

    slot: jax.Array
    decoding: jax.Array
    strategy: jax.Array
    k: jax.Array
    start: jax.Array
    nfe: jax.Array
    resumed: jax.Array
    steps_done: jax.Array
    left: jax.Array
    rows: RowParams


@flax.struct.dataclass
class RoundOutput:
    """What a round returns per entry (``[n]`` / ``[n, B]``; snapshots ``[S, n, B]``).

    Args:
        tokens: the block's tokens after the round.
        finished: the block is decoded (else it paused: tokens, soft inputs and ``left`` resume it).
        left: threshold decoding's unroll counter (what a paused block resumes from).
        nfe: forward counters after the round.
        snapshots: the block after every forward of this round (provisional steps).
        snapshot_valid: ``[S, n]`` the entry ran that forward.
    """

    tokens: jax.Array
    finished: jax.Array
    left: jax.Array
    nfe: jax.Array
    snapshots: jax.Array
    snapshot_valid: jax.Array


@flax.struct.dataclass
class PrefillChunk:
    """Up to ``prefill_batch`` prompt chunks, one per prefilling slot (each ``[p]``; ``ids [p, chunk]``):
    entry i writes ``ids[i]`` to positions ``[start[i], start[i] + chunk)`` of slot ``slot[i]``.
    Unused entries point at the scratch slot (index = number of slots), so every entry can be
    computed and written without touching a live slot."""

    slot: jax.Array        # int32
    start: jax.Array       # int32
    ids: jax.Array         # [p, chunk] int32 (MASK past the prompt)
    forward: jax.Array     # bool: some of the chunk lies before s0, so its K/V are needed
    reset: jax.Array       # bool: first chunk of the request: clear the row to MASK first
    length: jax.Array      # int32: the slot's valid cache length after this chunk


def check_settings(strategies: tuple[str, ...], **ints: int) -> None:
    """Engine settings: served strategies, positive integers, chunks made of whole blocks."""
    for s in strategies:
        if s not in SERVED_STRATEGIES:
            why = " (llada2 recomputes the whole prefix every step)" if s == "llada2" else ""
            raise ValueError(f"strategy {s!r} is not served by the engine{why}; "
                             f"served: {SERVED_STRATEGIES}")
    if not strategies or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must be a non-empty tuple without repeats, got {strategies}")
    for name, v in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if ints["prefill_chunk"] % ints["block_length"]:
        raise ValueError(f"prefill_chunk {ints['prefill_chunk']} must be a multiple of block_length "
                         f"{ints['block_length']}")


def engine_spec(params, model_config: ModelConfig, defaults: DecodeConfig, *, max_batch: int,
                capacity: int | None = None, strategies: tuple[str, ...] | None = None,
                prefill_chunk: int = 128, prefill_batch: int = 8, exit_factor: int = 4,
                compact: bool | str = "auto") -> ProgramSpec:
    """The engine's static program spec (settings validated): ``defaults`` (resolved) gives the
    block length, top-k, kernels, dtype and ids; the platform is that of ``params``' devices."""
    B = defaults.block_length
    strategies = tuple(strategies) if strategies else (defaults.strategy,) + tuple(
        s for s in SERVED_STRATEGIES if s != defaults.strategy)
    check_settings(strategies, max_batch=max_batch, block_length=B, prefill_chunk=prefill_chunk,
                   prefill_batch=prefill_batch, top_k=defaults.top_k, max_unroll=defaults.max_unroll,
                   expected_tpf=defaults.expected_tpf, exit_factor=exit_factor)
    cap = model_config.max_position_embeddings if capacity is None else int(capacity)
    if cap < B or cap > model_config.max_position_embeddings:
        raise ValueError(f"capacity {cap} must be in [block_length {B}, "
                         f"max_position_embeddings {model_config.max_position_embeddings}]")
    bounds = {"spd": B, "threshold": threshold_max_forwards(B, defaults.expected_tpf, defaults.max_unroll)}
    platform = platform_of(params)
    return ProgramSpec(strategies=strategies, block_length=B, mask_id=defaults.mask_id,
                       max_steps=tuple(bounds[s] for s in strategies), greedy=None, top_k=defaults.top_k,
                       max_unroll=defaults.max_unroll, expected_tpf=defaults.expected_tpf,
                       soft_impl=defaults.soft_impl, dtype=defaults.dtype, platform=platform,
                       capacity=cap - cap % B, snapshots=True, prefill_chunk=prefill_chunk,
                       prefill_batch=min(prefill_batch, max_batch), exit_factor=exit_factor,
                       compact=resolve_compact(compact, platform))


def init_state(spec: ProgramSpec, cfg: ModelConfig, slots: int) -> SlotState:
    """``slots`` rows plus the scratch row of unused entries."""
    x = jnp.full((slots + 1, spec.row_len), spec.mask_id, jnp.int32)
    dt = jnp.dtype(spec.dtype)
    emb = jnp.zeros((slots + 1, spec.block_length, cfg.hidden_size), dt)
    return SlotState(x=x, cache=init_cache(cfg, slots + 1, spec.row_len, dt), emb=emb)


def prefill_program(spec: ProgramSpec, cfg: ModelConfig, params, state: SlotState,
                    pc: PrefillChunk) -> SlotState:
    """Write the chunks' tokens and, if any chunk lies before its slot's ``s0``, forward all chunks
    as one ``[p, chunk]`` batch against their slots' cache rows (block-causal, committed). K/V past
    a slot's ``s0`` land beyond its valid ``length`` and stay invisible, as in ``generate``'s prefill."""
    rows = jnp.where(pc.reset[:, None], spec.mask_id, state.x[pc.slot])
    x = state.x.at[pc.slot].set(fw.row_update(rows, pc.start, pc.ids))

    def chunk_forward(cache: KVCache) -> KVCache:
        part = block.cache_rows(cache, pc.slot).replace(length=pc.start)
        _, part = forward(params, cfg, pc.ids, positions=fw.positions(pc.start, spec.prefill_chunk),
                          mask=MaskSpec("block_causal", spec.block_length), cache=part, commit=True,
                          dtype=jnp.dtype(spec.dtype), cache_window=spec.capacity, platform=spec.platform)
        return block.put_cache_rows(cache, pc.slot, part)

    cache = jax.lax.cond(pc.forward.any(), chunk_forward, lambda c: c, state.cache)
    cache = cache.replace(length=cache.length.at[pc.slot].set(pc.length))
    return SlotState(x=x, cache=cache, emb=state.emb)


def _gather(state: SlotState, slot) -> SlotState:
    return SlotState(x=state.x[slot], cache=block.cache_rows(state.cache, slot), emb=state.emb[slot])


def _scatter(state: SlotState, part: SlotState, slot) -> SlotState:
    """``part``'s rows back into their slots (entries on the scratch row may collide: it holds nothing)."""
    c = block.put_cache_rows(state.cache, slot, part.cache)
    cache = c.replace(length=c.length.at[slot].set(part.cache.length))
    return SlotState(x=state.x.at[slot].set(part.x), cache=cache, emb=state.emb.at[slot].set(part.emb))


def round_program(spec: ProgramSpec, cfg: ModelConfig, params, state: SlotState,
                  r: SlotRound) -> tuple[SlotState, RoundOutput]:
    """Advance every decoding slot through (the rest of) its block, or until its step loop exits
    early (``exit_factor``), with the block step ``generate`` runs. Entries work on their slots
    (gathered, then scattered back): the host packs the decoding slots into the smallest compiled
    width holding them, so a lightly loaded engine does not compute its idle slots."""
    B, n = spec.block_length, r.start.shape[0]
    part = _gather(state, r.slot)
    crossing = r.decoding & (r.k > 0) & ~r.resumed
    logits0 = jnp.zeros((n, B, cfg.vocab_size), jnp.float32)
    logits0, cache = block.first_logits(spec, cfg, params, part.x, r.start, crossing, part.cache, logits0)
    resume = block.Resume(resumed=r.resumed, steps_done=r.steps_done, left=r.left, embeds=part.emb)
    tokens, nfe, finished = fw.row_slice(part.x, r.start, B), r.nfe, jnp.ones(n, bool)
    emb, left = part.emb, r.left
    rec = block.empty_record(spec, n)
    for i, name in enumerate(spec.strategies):
        rows = r.decoding & (r.strategy == i)
        out = block.decode_block(spec, name, cfg, params, r.rows, part.x, r.start, rows, cache,
                                 (logits0, crossing), nfe, resume)
        tokens = jnp.where(rows[:, None], out.tokens, tokens)
        nfe, finished = jnp.where(rows, out.nfe, nfe), jnp.where(rows, out.finished, finished)
        left = jnp.where(rows, out.left, left)
        if out.embeds is not None:
            emb = jnp.where(rows[:, None, None], out.embeds, emb)
        rec = rec.replace(tokens=jnp.where(rows[None, :, None], out.record.tokens, rec.tokens),
                          valid=jnp.where(rows[None, :], out.record.valid, rec.valid))
    x = jnp.where(r.decoding[:, None], fw.row_update(part.x, r.start, tokens), part.x)
    out = RoundOutput(tokens=tokens, finished=finished, left=left, nfe=nfe, snapshots=rec.tokens,
                      snapshot_valid=rec.valid)
    return _scatter(state, SlotState(x=x, cache=cache, emb=emb), r.slot), out


def batch_widths(max_batch: int, widths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The round widths compiled (default 1, max_batch // 4, max_batch): a round gathers its decoding
    slots into the smallest width holding them, so a lightly loaded engine does not pay for its idle
    slots."""
    out = tuple(sorted(set({1, max(1, max_batch // 4), max_batch} if widths is None else widths)))
    if not out or out[-1] != max_batch or out[0] < 1:
        raise ValueError(f"widths {widths} must be positive batch widths ending at max_batch {max_batch}")
    return out


def prefill_widths(spec: ProgramSpec) -> tuple[int, ...]:
    """The prefill widths compiled: 1 chunk, or ``prefill_batch`` chunks."""
    return tuple(sorted({1, spec.prefill_batch}))


def idle_round(slots: int, width: int, idle_row: RowParams) -> SlotRound:
    """Host inputs of a round whose ``width`` entries are all idle on the scratch row (the engine
    fills in its decoding slots; ``idle_row``: one row of ``RowParams``)."""
    z = np.zeros(width, np.int32)
    rows = jax.tree.map(lambda a: np.repeat(a, width), idle_row)
    return SlotRound(slot=np.full(width, slots, np.int32), decoding=np.zeros(width, bool), strategy=z.copy(),
                     k=z.copy(), start=z.copy(), nfe=z.copy(), resumed=np.zeros(width, bool),
                     steps_done=z.copy(), left=z.copy(), rows=rows)


def idle_prefill(spec: ProgramSpec, slots: int, width: int) -> PrefillChunk:
    """Host inputs of a prefill call whose ``width`` entries are all idle on the scratch row."""
    return PrefillChunk(slot=np.full(width, slots, np.int32), start=np.zeros(width, np.int32),
                        ids=np.full((width, spec.prefill_chunk), spec.mask_id, np.int32),
                        forward=np.zeros(width, bool), reset=np.zeros(width, bool),
                        length=np.zeros(width, np.int32))


def program_lowerings(spec: ProgramSpec, cfg: ModelConfig, params, slots: int, widths: tuple[int, ...],
                      idle_row: RowParams, prefix_entries: int = 0
                      ) -> dict[str, Callable[[], jax.stages.Lowered]]:
    """``{"round:<width>" | "prefill:<width>" | "prefix_load" | "prefix_save": thunk lowering that
    program}`` from shapes only (the prefix cache's two with ``prefix_entries`` > 0): the slot state
    (and the prefix pool) is donated, and it and every small input / output live replicated on the
    parameters' devices. The one lowering path of the :class:`Engine` and of :func:`lower_engine`."""
    sh = replicated(params)
    state = _placed_shapes(functools.partial(init_state, spec, cfg, slots), sh)
    p = abstract(params)
    # traced inside the parameters' mesh: kernel calls run per shard (model.partitioned)
    rnd = _jit(in_mesh_of(params, functools.partial(round_program, spec, cfg)), 1, (state, sh), sh)
    pre = _jit(in_mesh_of(params, functools.partial(prefill_program, spec, cfg)), 1, state, sh)
    out = {f"round:{w}": functools.partial(
        lambda w: rnd.lower(p, state, abstract(idle_round(slots, w, idle_row), sh)), w) for w in widths}
    out.update({f"prefill:{w}": functools.partial(
        lambda w: pre.lower(p, state, abstract(idle_prefill(spec, slots, w), sh)), w)
        for w in prefill_widths(spec)})
    if prefix_entries:
        out.update(_prefix_lowerings(spec, cfg, slots, prefix_entries, state, sh))
    return out


def _placed_shapes(make: Callable, sh):
    """``ShapeDtypeStruct``s of what ``make()`` builds, each placed on ``sh`` (None: unplaced)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), jax.eval_shape(make))


def _jit(fn: Callable, donate: int, outputs, sh):
    """``fn`` jitted with argument ``donate`` donated and its outputs placed like ``outputs`` (a tree of
    placed shapes or shardings), when the engine's buffers live on a mesh (``sh`` not None)."""
    if sh is None:
        return jax.jit(fn, donate_argnums=(donate,))
    placed = jax.tree.map(lambda a: getattr(a, "sharding", a), outputs)
    return jax.jit(fn, donate_argnums=(donate,), out_shardings=placed)


def _prefix_lowerings(spec: ProgramSpec, cfg: ModelConfig, slots: int, entries: int, state, sh) -> dict:
    """The prefix cache's load / save programs (``serving.prefix_cache``), lowered from shapes."""
    pool = _placed_shapes(functools.partial(pc.init_pool, spec, cfg, entries), sh)
    move = abstract(pc.idle_move(spec, slots, entries), sh)
    load = _jit(functools.partial(pc.load_program, spec), 0, state, sh)
    save = _jit(functools.partial(pc.save_program, spec), 1, pool, sh)
    return {"prefix_load": lambda: load.lower(state, pool, move),
            "prefix_save": lambda: save.lower(state, pool, move)}


def lower_engine(params, model_config: ModelConfig, defaults: DecodeConfig, *, max_batch: int,
                 capacity: int | None = None, strategies: tuple[str, ...] | None = None,
                 prefill_chunk: int = 128, prefill_batch: int = 8, widths: tuple[int, ...] | None = None,
                 exit_factor: int = 4, compact: bool | str = "auto", prefix_cache_blocks: int | None = None
                 ) -> dict[str, jax.stages.Lowered]:
    """The programs ``Engine(model, defaults, max_batch=..., capacity=..., ...)`` runs, lowered from
    shapes (``params`` may be ``ShapeDtypeStruct``s sharded on compile-only devices): ``round:<w>``
    per round width, ``prefill:<w>`` per prefill width and the prefix cache's ``prefix_load`` /
    ``prefix_save`` (unless ``prefix_cache_blocks`` is 0). ``.compile()`` each."""
    defaults = defaults.resolve(model_config)
    params = params_for(params, defaults.weights)       # as Engine.__init__
    spec = engine_spec(params, model_config, defaults, max_batch=max_batch, capacity=capacity,
                       strategies=strategies, prefill_chunk=prefill_chunk, prefill_batch=prefill_batch,
                       exit_factor=exit_factor, compact=compact)
    idle = defaults.row_params([1], [0])
    widths = batch_widths(max_batch, widths)
    entries = prefix_entries(spec, max_batch, prefix_cache_blocks)
    lowerings = program_lowerings(spec, model_config, params, max_batch, widths, idle, entries)
    return {name: lower() for name, lower in lowerings.items()}


def prefix_entries(spec: ProgramSpec, slots: int, blocks: int | None) -> int:
    """The prefix pool's entries: ``blocks``, or by default as many blocks as the slots hold."""
    if blocks is None:
        return slots * (spec.capacity // spec.block_length)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
        raise ValueError(f"prefix_cache_blocks must be an integer >= 0 (0: off), got {blocks!r}")
    return blocks
