"""The training state: one pytree that jit donates, the mesh shards and orbax saves.

It holds no PRNG key: the OPUT noise comes from the host data pipeline's per-example RNG
(``data/transforms.py``), so the step itself is deterministic. Checkpoints written while the state
still had an ``rng`` leaf resume through ``TrainCheckpointer.restore``, which drops it.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """``step`` int32 scalar (= number of ``train_step`` calls, i.e. micro-batches seen);
    ``params`` float32 master weights; ``opt_state`` the optax state."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Fresh state at step 0. ``params`` must be the unboxed float32 master weights; they are not
    copied (jit the call with ``out_shardings`` to build a sharded state without a host copy)."""
    boxed = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    if any(isinstance(x, nn.meta.AxisMetadata) for x in boxed):
        raise ValueError("init_train_state: params still carry partitioning boxes; "
                         "pass nn.meta.unbox(params)")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("init_train_state: params tree is empty")
    bad = sorted({str(x.dtype) for x in leaves if x.dtype != jnp.float32})
    if bad:
        raise ValueError(f"init_train_state: master weights must be float32, got leaves of dtype {bad}")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
