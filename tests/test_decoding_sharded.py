"""Decoding with parameters sharded over a mesh of 8 fake CPU devices gives the tokens of one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from test_decoding_oracle import random_params

from dmax_jax.config import tiny_config
from dmax_jax.decoding import generate

CFG = tiny_config()
PROMPTS = [[5, 6, 7], [9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49], list(range(10, 29))]
KW = dict(block_length=8, gen_length=24, prompt_bucket=16, threshold=0.05)

# two extra compilations over 8 fake devices take minutes on a small CPU host
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
                                 "--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")]


def _partition(shape, mesh) -> PartitionSpec:
    """Shard the largest dim divisible by the fsdp axis over it and another dim over tensor."""
    axes = [None] * len(shape)
    for name in ("fsdp", "tensor"):
        n = mesh.shape[name]
        free = [d for d in np.argsort(shape)[::-1] if axes[d] is None and shape[d] % n == 0 and shape[d] >= n]
        if free:
            axes[free[0]] = name
    return PartitionSpec(*axes)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=0, lm_head_scale=10.0)


@pytest.mark.parametrize("strategy", ["spd", "threshold", "llada2"])
def test_sharded_params_decode_like_one_device(params, strategy):
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    place = lambda a: jax.device_put(a, NamedSharding(mesh, _partition(a.shape, mesh)))
    sharded = jax.tree.map(place, params)
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(sharded))
    one = generate((params, CFG), PROMPTS, strategy=strategy, **KW)
    many = generate((sharded, CFG), PROMPTS, strategy=strategy, **KW)
    assert many.token_ids == one.token_ids
    assert many.nfe == one.nfe and many.tokens_ref == one.tokens_ref
