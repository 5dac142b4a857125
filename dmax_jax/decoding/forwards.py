"""The model forwards of block decoding, against the fixed-capacity KV cache (algorithm §5.1-5.3).

Cache invariant (per row): slots ``[0, length)`` hold the K/V of *final hard tokens* of every
position before the current block, computed under the block-causal mask. Three forwards keep it:

* ``prefill``   one forward over the padded prompt bucket; ``length = s0`` (start of the first
                decoded block). Slots past ``s0`` were written but stay invisible, so a prompt
                shorter than a block does not leave stale MASK K/V in the cache — a deliberate
                departure from the reference's P < 32 quirk (algorithm §7.10), which a full recompute
                could not reproduce either.
* ``cross``     the first forward of every block after the first: previous + current block
                (2B hard tokens), commits the previous block (``commit_length = B``); only the
                current-block logits are used.
* ``block``     the current block alone (hard or soft input embeddings), nothing committed.

``first_block``  the LLaDA2 HF ``generate``'s first forward (prompt bucket + one block): the first
                block's logits and the prompt's K/V. That schedule recomputes ``[0, end)`` every
                step (algorithm §5.5b); under block-causal attention the K/V of a finished block never
                change, so its later steps are ``cross`` (first step of a block) and ``block``
                forwards against the cache — the same logits for a fraction of the work.

``platform`` (every function): the platform the program is compiled for (``ProgramSpec.platform``), so
the model's per-platform kernels are those of the target devices, not of the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig
from dmax_jax.model.kv_cache import KVCache, init_cache
from dmax_jax.model.llada2 import forward
from dmax_jax.model.masks import MaskSpec


def row_slice(a: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """``a[i, start[i]:start[i]+size]`` for every row (indices clamp like ``dynamic_slice``)."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, 0))(a, start)


def row_update(a: jax.Array, start: jax.Array, upd: jax.Array) -> jax.Array:
    """Write ``upd[i]`` at ``a[i, start[i]:]`` for every row."""
    return jax.vmap(lambda r, u, s: jax.lax.dynamic_update_slice_in_dim(r, u, s, 0))(a, upd, start)


def positions(start: jax.Array, size: int) -> jax.Array:
    return start[:, None] + jnp.arange(size, dtype=jnp.int32)[None, :]


def prefill(params, config: ModelConfig, prompt_ids: jax.Array, s0: jax.Array, capacity: int, block: int,
            dtype, platform: str | None = None) -> KVCache:
    """Prompt-bucket forward ``[b, Pp]`` → cache whose valid prefix is ``[0, s0)`` per row."""
    b, length = prompt_ids.shape
    cache = init_cache(config, b, capacity, dtype)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    _, cache = forward(params, config, prompt_ids, positions=pos, mask=MaskSpec("block_causal", block),
                       cache=cache, commit=True, dtype=dtype, platform=platform)
    return cache.replace(length=s0.astype(jnp.int32))


def first_block(params, config: ModelConfig, x: jax.Array, s0: jax.Array, padded_len: int, capacity: int,
                block: int, dtype, platform: str | None = None) -> tuple[jax.Array, KVCache]:
    """Forward of ``x[:, :padded_len + B]`` (prompt bucket + MASKs; holds every row's first block
    ``[s0, s0 + B)``) → ``(first-block logits [b, B, V], cache valid on [0, s0))``. Positions past a
    row's first block cannot influence it (block-causal), so the logits are the reference's first
    step's; the K/V written past ``s0`` stay invisible (``length = s0``)."""
    b, length = x.shape[0], padded_len + block
    cache = init_cache(config, b, capacity, dtype)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    logits, cache = forward(params, config, x[:, :length], positions=pos,
                            mask=MaskSpec("block_causal", block), cache=cache, commit=True, dtype=dtype,
                            platform=platform)
    return row_slice(logits, s0, block), cache.replace(length=s0.astype(jnp.int32))


def cross_forward(params, config: ModelConfig, x: jax.Array, start: jax.Array, cache: KVCache, block: int,
                  dtype, cache_window: int | None = None,
                  platform: str | None = None) -> tuple[jax.Array, KVCache]:
    """Previous + current block from ``x`` (hard ids) against ``cache[:start − B]``; commits the
    previous block. Returns the current block's logits ``[b, B, V]`` and the advanced cache.
    ``cache_window``: as in ``model.llada2.forward``."""
    prev = jnp.maximum(start - block, 0)  # only rows already finished can reach < 0
    ids = row_slice(x, prev, 2 * block)
    logits, cache = forward(params, config, ids, positions=positions(prev, 2 * block),
                            mask=MaskSpec("block_causal", block), cache=cache, commit=True,
                            commit_length=block, dtype=dtype, cache_window=cache_window,
                            platform=platform)
    return logits[:, block:], cache


def block_forward(params, config: ModelConfig, embeds: jax.Array, start: jax.Array, cache: KVCache,
                  block: int, dtype, cache_window: int | None = None,
                  platform: str | None = None) -> jax.Array:
    """Current block from input embeddings ``[b, B, H]`` against the cache; logits ``[b, B, V]``."""
    logits, _ = forward(params, config, inputs_embeds=embeds, positions=positions(start, block),
                        mask=MaskSpec("block_causal", block), cache=cache, dtype=dtype,
                        cache_window=cache_window, platform=platform)
    return logits
