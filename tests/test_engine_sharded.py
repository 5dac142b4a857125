"""The engine with parameters sharded over 8 fake CPU devices serves the tokens of ``generate`` alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from test_decoding_oracle import random_params
from test_decoding_sharded import _partition
from test_engine import CFG, alone, assert_same, engine, random_requests, request, serve_with_arrivals

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
                                 "--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")]


def test_sharded_params_serve_the_tokens_of_generate():
    params = random_params(CFG, seed=0, lm_head_scale=10.0)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    place = lambda a: jax.device_put(a, NamedSharding(mesh, _partition(a.shape, mesh)))  # noqa: E731
    sharded = jax.tree.map(place, params)
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(sharded))
    reqs = random_requests(np.random.default_rng(3), 4, max_prompt=40)
    shared = list(range(3, 30))     # 3 shared blocks: the second request copies 2 (one prefill chunk)
    reqs += [request(shared + [5, 6], 17), request(shared + [9], 17, strategy="threshold")]
    eng = engine(sharded, max_batch=2)
    handles = serve_with_arrivals(eng, reqs, arrivals=[0, 0, 2, 3, 4, 60])  # the 6th after the 5th ended
    for i, (r, h) in enumerate(zip(reqs, handles)):
        assert_same(h.result(0), alone(params, r), f"request {i}")
    assert eng.compile_count() == len(eng.program_names())
    assert handles[5].result(0).usage.cached_tokens == 16 and eng.stats()["prefix_cache_hits"] >= 1
    state = jax.tree.leaves(eng._state)
    assert all(len(a.sharding.device_set) == 8 for a in state)  # the slot buffers live on the mesh
