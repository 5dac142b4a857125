"""Fixed-capacity KV cache for block decoding (algorithm §5.3).

Slot i holds absolute position i. ``length[b]`` counts the valid slots of row b; attention hides the
rest, so a cache can be allocated once per (prompt, generation) bucket and never reshaped — the
decode loop compiles once per bucket. Layers are grouped like the parameter stacks
(``dense_layers`` / ``moe_layers``) so a scanned stack reads its slice without a copy.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dmax_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    k: dict  # stack name -> [layers, batch, capacity, kv_heads, head_dim]
    v: dict
    length: jax.Array  # [batch] int32

    @property
    def capacity(self) -> int:
        return next(iter(self.k.values())).shape[2]

    def stack(self, name: str):
        return self.k[name], self.v[name]

    def write(self, new_k: dict, new_v: dict, positions: jax.Array,
              valid_tokens: int | None = None, *, rowwise: bool = False) -> KVCache:
        """Store a block's K/V (``[layers, batch, block, kv_heads, head_dim]`` per stack) at its
        positions (``[batch, block]``, contiguous per row) and advance ``length`` past its first
        ``valid_tokens`` tokens (all by default). The cross-block step commits only the previous block
        (algorithm §5.2): its current-block K/V land in slots beyond ``length`` and stay invisible."""
        start = positions[:, 0]
        n_valid = positions.shape[1] if valid_tokens is None else valid_tokens

        def put(cache, upd):
            upd = upd.astype(cache.dtype)
            if rowwise:
                # GPU: one dynamic-update-slice per row. The vmapped form is a batched scatter that
                # XLA:GPU's SPMD partitioner aborts on (multi-GPU decode programs); on CPU the
                # per-row form deadlocks sharded programs' collectives, so CPU / TPU keep the vmap.
                for row in range(cache.shape[1]):
                    cache = jax.lax.dynamic_update_slice(cache, upd[:, row:row + 1],
                                                         (0, row, start[row], 0, 0))
                return cache
            return jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice(c, u, (0, s, 0, 0)),
                            in_axes=(1, 1, 0), out_axes=1)(cache, upd, start)

        k = {n: put(self.k[n], new_k[n]) for n in self.k}
        v = {n: put(self.v[n], new_v[n]) for n in self.v}
        return KVCache(k, v, jnp.maximum(self.length, start + n_valid).astype(jnp.int32))


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, capacity, config.num_key_value_heads, config.head_dim)
    k, v = {}, {}
    for name, n in (("dense_layers", config.num_dense_layers), ("moe_layers", config.num_moe_layers)):
        if n:
            k[name] = jnp.zeros((n, *shape), dtype)
            v[name] = jnp.zeros((n, *shape), dtype)
    return KVCache(k, v, jnp.zeros((batch,), jnp.int32))
