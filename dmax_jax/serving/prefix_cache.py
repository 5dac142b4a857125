"""The engine's prefix cache: committed blocks' K/V kept across requests (algorithm §5.1 layout).

:class:`PrefixCache` is what the engine calls: at admission it copies the longest cached chain of a
request's prompt blocks into the slot (prefill then starts past it); when a slot's prompt blocks are
prefilled, and when a request ends, it saves the slot's committed blocks. The index (which blocks,
keyed by their tokens; eviction) is :mod:`prefix_index`'s; the device side is here.

The pool holds ``entries`` blocks of committed K/V (``[layers, entries + 1, B, kv_heads, head_dim]``
per layer stack; the extra entry is scratch) beside the engine's slot state, on the same devices.
Two compiled programs move whole blocks between a slot's cache row and the pool, at fixed shapes
(one slot, ``capacity / B`` block entries; unused entries point at the scratch entry), so serving
never compiles more than these two however the traffic looks:

    prefix_load   slot row <- pool: a hit's blocks land at positions [0, h), the row's tokens are
                  reset to the prompt, its valid length is h; prefill goes on from h
    prefix_save   pool <- slot row: blocks the index asked for, read below the row's committed length
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig
from dmax_jax.decoding.config import ProgramSpec
from dmax_jax.model.kv_cache import init_cache
from dmax_jax.serving.prefix_index import PrefixIndex


@flax.struct.dataclass
class PrefixPool:
    k: dict   # stack name -> [layers, entries + 1, B, kv_heads, head_dim]
    v: dict


@flax.struct.dataclass
class PrefixMove:
    """One slot's block moves (``entry [capacity / B]``: the pool entry of block j, or the scratch
    entry); ``ids [row_len]`` and ``length`` are the row's tokens and valid length after a load."""

    slot: jax.Array
    entry: jax.Array
    ids: jax.Array
    length: jax.Array


def block_bytes(cfg: ModelConfig, block_length: int, dtype) -> int:
    """Bytes of one cached block: K and V of every layer."""
    return (2 * cfg.num_hidden_layers * block_length * cfg.num_key_value_heads * cfg.head_dim
            * jnp.dtype(dtype).itemsize)


def entries_for_bytes(budget: float, cfg: ModelConfig, block_length: int, dtype) -> int:
    """Pool entries a byte budget holds (``--prefix-cache-gb``)."""
    if budget < 0:
        raise ValueError(f"prefix cache budget must be >= 0 bytes, got {budget}")
    return int(budget // block_bytes(cfg, block_length, dtype))


def init_pool(spec: ProgramSpec, cfg: ModelConfig, entries: int) -> PrefixPool:
    c = init_cache(cfg, entries + 1, spec.block_length, jnp.dtype(spec.dtype))
    return PrefixPool(k=c.k, v=c.v)


def idle_move(spec: ProgramSpec, slots: int, entries: int) -> PrefixMove:
    """Host inputs of a move that touches only the scratch slot and entry (filled in by the engine)."""
    nb = spec.capacity // spec.block_length
    return PrefixMove(slot=np.int32(slots), entry=np.full(nb, entries, np.int32),
                      ids=np.full(spec.row_len, spec.mask_id, np.int32), length=np.int32(0))


def _blocks(a: jax.Array, slot, spec: ProgramSpec) -> jax.Array:
    """Row ``slot``'s first ``capacity`` positions as ``[layers, capacity / B, B, ...]``."""
    L, _, _, *rest = a.shape
    row = jax.lax.dynamic_index_in_dim(a, slot, axis=1, keepdims=False)[:, :spec.capacity]
    return row.reshape(L, spec.capacity // spec.block_length, spec.block_length, *rest)


def load_program(spec: ProgramSpec, state, pool: PrefixPool, mv: PrefixMove):
    """``state`` with the pool's blocks ``mv.entry`` copied into row ``mv.slot`` (positions past the
    hit get scratch K/V beyond the valid length: invisible, and prefill overwrites them)."""
    def put(a, p):
        blocks = p[:, mv.entry].reshape(p.shape[0], 1, spec.capacity, *p.shape[3:])
        return jax.lax.dynamic_update_slice(a, blocks.astype(a.dtype), (0, mv.slot, 0, 0, 0))

    c = state.cache
    cache = c.replace(k={n: put(a, pool.k[n]) for n, a in c.k.items()},
                      v={n: put(a, pool.v[n]) for n, a in c.v.items()},
                      length=c.length.at[mv.slot].set(mv.length))
    return state.replace(x=state.x.at[mv.slot].set(mv.ids), cache=cache)


def save_program(spec: ProgramSpec, state, pool: PrefixPool, mv: PrefixMove) -> PrefixPool:
    """``pool`` with row ``mv.slot``'s blocks written to entries ``mv.entry`` (scratch: not saved)."""
    c = state.cache
    return PrefixPool(k={n: p.at[:, mv.entry].set(_blocks(c.k[n], mv.slot, spec)) for n, p in pool.k.items()},
                      v={n: p.at[:, mv.entry].set(_blocks(c.v[n], mv.slot, spec)) for n, p in pool.v.items()})


class PrefixCache:
    """The engine's prefix cache (host index + device pool). Runs in the engine's round thread:
    :meth:`flush` (saves queued since the last round), then :meth:`admit` per admitted request,
    then :meth:`run` before the round's prefill; ``queue_*`` may be called under the engine's lock
    from any thread. Saves are issued before loads, and both before the slot's next prefill, so a
    row is read before it is reused and an entry is written before it is read.

    Args:
        spec: the engine's program spec (block length, capacity, dtype, mask id).
        cfg: the model config.
        slots: the engine's slots (the scratch row is index ``slots``).
        entries: pool entries (blocks); 0 turns the cache off.
        generated: also save a finished request's committed generated blocks (:meth:`queue_release`).
    """

    def __init__(self, spec: ProgramSpec, cfg: ModelConfig, slots: int, entries: int,
                 generated: bool = True) -> None:
        if not isinstance(generated, bool):
            raise ValueError(f"prefix_cache_generated must be True or False, got {generated!r}")
        self.spec, self.cfg, self.slots, self.generated = spec, cfg, slots, generated
        self.index = PrefixIndex(entries, spec.block_length)
        self.block_bytes = block_bytes(cfg, spec.block_length, spec.dtype)
        self._pending: list[tuple[int, np.ndarray, int]] = []   # (slot, row tokens, blocks) to save
        self._moves: list[tuple[str, PrefixMove]] = []
        self.pool = None

    @property
    def enabled(self) -> bool:
        return self.index.enabled

    def _move(self, slot: int, entries: list[tuple[int, int]]) -> PrefixMove:
        mv = idle_move(self.spec, self.slots, self.index.entries)
        mv.entry[[j for j, _ in entries]] = [e for _, e in entries]
        return mv.replace(slot=np.int32(slot))

    def queue_save(self, slot: int, tokens: np.ndarray, n_blocks: int) -> None:
        """Save row ``slot``'s first ``n_blocks`` blocks (committed; ``tokens`` their ids) next round."""
        if self.enabled and n_blocks > 0:
            self._pending.append((slot, np.asarray(tokens, np.int32), n_blocks))

    def queue_release(self, slot: int, tokens: np.ndarray, n_blocks: int) -> None:
        """A finished request's committed blocks: its generated ones too when ``generated`` (its
        prompt blocks were saved when prefilled; saving them again only refreshes their LRU place)."""
        if self.generated:
            self.queue_save(slot, tokens, n_blocks)

    def flush(self) -> None:
        """Plan the queued saves (index inserts; evictions happen here)."""
        pending, self._pending = self._pending, []
        for slot, tokens, n in pending:
            new = self.index.insert(tokens, n)
            if new:
                self._moves.append(("save", self._move(slot, new)))

    def admit(self, slot: int, prompt: np.ndarray, s0: int) -> int:
        """Match ``prompt``'s blocks before ``s0`` and plan the copy into row ``slot``; returns the
        positions reused (the prefill cursor), 0 on a miss."""
        B, C = self.spec.block_length, self.spec.prefill_chunk
        # Whole prefill chunks only: the rest is then prefilled in exactly the chunks (start, length,
        # contents) a cache-off engine runs, so its float results are bit for bit the same.
        entries = self.index.match(prompt, s0 // B, C // B) if self.enabled else []
        if not entries:
            return 0
        h = len(entries) * B
        mv = self._move(slot, list(enumerate(entries)))
        mv.ids[:h] = prompt[:h]
        self._moves.append(("load", mv.replace(length=np.int32(h))))
        return h

    @property
    def busy(self) -> bool:
        """Saves are queued or moves planned (the engine runs a round for them)."""
        return bool(self._pending or self._moves)

    def run(self, programs: dict, state):
        """Issue the planned moves in order; returns the slot state (the pool is kept here)."""
        moves, self._moves = self._moves, []
        for kind, mv in moves:
            if kind == "save":
                self.pool = programs["prefix_save"](state, self.pool, mv)
            else:
                state = programs["prefix_load"](state, self.pool, mv)
        return state

    def stats(self) -> dict:
        s = self.index.stats()
        return s | {"prefix_cache_bytes": s["prefix_cache_blocks"] * self.block_bytes,
                    "prefix_cache_capacity_bytes": self.index.entries * self.block_bytes}
