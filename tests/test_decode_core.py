"""One decoding core: ``generate`` and the serving engine run the same block step
(``decoding.block.decode_block``), and the ahead-of-time lowerings (``lower_generate``,
``lower_engine``) build, from shapes only, exactly the programs the two run."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import pytest
from test_decoding_oracle import random_params

from dmax_jax.config import tiny_config
from dmax_jax.decoding import DecodeConfig, block, generate, lower_generate
from dmax_jax.decoding.compiled import COMPILED, abstract, fingerprint
from dmax_jax.serving import Engine, EngineRequest
from dmax_jax.serving.program import lower_engine

CFG = tiny_config()
DC = DecodeConfig(block_length=8, gen_length=16, threshold=0.3, prompt_bucket=16)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=0, lm_head_scale=10.0)


def test_generate_and_the_engine_trace_the_same_block_step(params, monkeypatch):
    """Both drivers call ``block.decode_block`` (and ``block.first_logits``): a change to the SPD
    transfer rule there is a change to both. Lowering traces without compiling."""
    callers = {"decode_block": set(), "first_logits": set()}
    for name in callers:
        original = getattr(block, name)

        def spy(*a, _name=name, _original=original, **k):
            callers[_name].add(inspect.stack()[1].frame.f_globals["__name__"])
            return _original(*a, **k)

        monkeypatch.setattr(block, name, spy)
    for strategy in ("spd", "threshold", "llada2"):
        lower_generate(params, CFG, DC.replace(strategy=strategy), batch=2, prompt_len=5)
    lower_engine(params, CFG, DC, max_batch=2, capacity=64, prefill_chunk=16, widths=(2,))
    want = {"dmax_jax.decoding.loop", "dmax_jax.serving.program"}
    assert callers["decode_block"] == want and callers["first_logits"] == want


def test_lower_generate_from_shapes_is_the_program_generate_runs(params):
    res = generate((params, CFG), [[5, 6, 7], [9, 10]], DC)
    assert res.tokens[0] > 0
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params)
    from_shapes = lower_generate(shapes, CFG, DC, batch=2, prompt_len=3)
    assert fingerprint(from_shapes) == fingerprint(lower_generate(params, CFG, DC, batch=2, prompt_len=3))
    ran = COMPILED.fingerprints(lambda k: k[0] == "generate" and k[1].capacity == from_shapes_capacity())
    assert fingerprint(from_shapes) in ran          # the very program generate compiled and ran
    compiled = from_shapes.compile()
    ids = np.zeros((2, 16), np.int32)
    out = compiled(params, ids, DC.resolve(CFG).row_params([3, 2], [0, 1]))
    assert out.x.shape == (2, from_shapes_capacity())


def from_shapes_capacity() -> int:
    return 16 + 16      # prompt bucket 16 + gen_length 16


def test_lower_engine_from_shapes_is_what_the_engine_runs(params):
    kw = dict(max_batch=1, capacity=64, prefill_chunk=16)
    lowered = lower_engine(abstract(params), CFG, DC, **kw)
    assert set(lowered) == {"round:1", "prefill:1", "prefix_load", "prefix_save"}
    eng = Engine((params, CFG), DC, **kw)
    eng.warmup()
    assert set(lowered) == eng.program_names()
    for name, low in lowered.items():
        key = eng._cache_name(name)      # the prefix programs' key names carry the pool size
        ran = COMPILED.fingerprints(lambda k, key=key: k[:5] == eng._key() and k[5] == key)
        assert ran == {fingerprint(low)}, name
    lowered["round:1"].compile()                 # compiles from shapes alone
    h = eng.submit(EngineRequest([5, 6, 7], DC))
    eng.run_until_idle()
    assert list(h.result(0).token_ids) == generate((params, CFG), [[5, 6, 7]], DC).token_ids[0]


def test_int8_weights_engine_equals_generate(params):
    """``DecodeConfig.weights`` is a program setting both drivers apply the same way."""
    cfg = DC.replace(weights="int8")
    eng = Engine((params, CFG), cfg, max_batch=1, capacity=64, prefill_chunk=16, strategies=("spd",))
    h = eng.submit(EngineRequest([5, 6, 7, 8], cfg))
    eng.run_until_idle()
    ref = generate((params, CFG), [[5, 6, 7, 8]], cfg)
    assert list(h.result(0).token_ids) == ref.token_ids[0] and h.result(0).usage.nfe == ref.nfe[0]
