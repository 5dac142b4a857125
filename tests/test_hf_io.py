"""HF checkpoint I/O: names/shapes against spec §1.3, layouts, round trips, casts, errors, sharding."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dmax_jax.checkpoint import hf
from dmax_jax.checkpoint.hf import (
    CheckpointError,
    CheckpointNotFoundError,
    load_hf_params,
    param_shapes,
    save_hf_params,
)
from dmax_jax.config import ModelConfig, tiny_config

VARIANTS = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "no_shared": {"num_shared_experts": 0},
    "two_shared": {"num_shared_experts": 2},
    "all_moe": {"first_k_dense_replace": 0},
    "two_dense": {"first_k_dense_replace": 2},
    "all_dense": {"first_k_dense_replace": 3},
}


def reference_hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Spec §1.3 written out independently of the key table."""
    V, H, D, Nq, Nkv = c.vocab_size, c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    F, Im, E, S = c.intermediate_size, c.moe_intermediate_size, c.num_experts, c.num_shared_experts
    d = {"model.word_embeddings.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        d |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
              p + "attention.query_key_value.weight": ((Nq + 2 * Nkv) * D, H),
              p + "attention.query_layernorm.weight": (D,), p + "attention.key_layernorm.weight": (D,),
              p + "attention.dense.weight": (H, Nq * D)}
        if i < c.first_k_dense_replace:
            d |= {p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                  p + "mlp.down_proj.weight": (H, F)}
            continue
        d |= {p + "mlp.gate.weight": (E, H), p + "mlp.gate.expert_bias": (E,)}
        for e in range(E):
            q = p + f"mlp.experts.{e}."
            d |= {q + "gate_proj.weight": (Im, H), q + "up_proj.weight": (Im, H),
                  q + "down_proj.weight": (H, Im)}
        if S:
            d |= {p + "mlp.shared_experts.gate_proj.weight": (Im * S, H),
                  p + "mlp.shared_experts.up_proj.weight": (Im * S, H),
                  p + "mlp.shared_experts.down_proj.weight": (H, Im * S)}
    if not c.tie_word_embeddings:
        d["lm_head.weight"] = (V, H)
    return d


def contract_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """docs/internals.md "Parameter tree", written out independently."""
    V, H, D, Nq, Nkv = c.vocab_size, c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    F, Im, E, S = c.intermediate_size, c.moe_intermediate_size, c.num_experts, c.num_shared_experts
    d = {"embedding": (V, H), "final_norm/scale": (H,)}
    for stack, n in (("dense_layers", c.num_dense_layers), ("moe_layers", c.num_moe_layers)):
        if not n:
            continue
        d |= {f"{stack}/input_norm/scale": (n, H), f"{stack}/post_norm/scale": (n, H),
              f"{stack}/attention/qkv": (n, H, Nq + 2 * Nkv, D), f"{stack}/attention/out": (n, Nq, D, H),
              f"{stack}/attention/q_norm/scale": (n, D), f"{stack}/attention/k_norm/scale": (n, D)}
    if c.num_dense_layers:
        n = c.num_dense_layers
        d |= {"dense_layers/mlp/gate": (n, H, F), "dense_layers/mlp/up": (n, H, F),
              "dense_layers/mlp/down": (n, F, H)}
    if c.num_moe_layers:
        n = c.num_moe_layers
        d |= {"moe_layers/moe/router": (n, H, E), "moe_layers/moe/expert_bias": (n, E),
              "moe_layers/moe/experts_gate": (n, E, H, Im), "moe_layers/moe/experts_up": (n, E, H, Im),
              "moe_layers/moe/experts_down": (n, E, Im, H)}
        if S:
            d |= {"moe_layers/moe/shared/gate": (n, H, Im * S), "moe_layers/moe/shared/up": (n, H, Im * S),
                  "moe_layers/moe/shared/down": (n, Im * S, H)}
    if not c.tie_word_embeddings:
        d["lm_head"] = (H, V)
    return d


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_params(c: ModelConfig, dtype=jnp.float32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32).astype(s.dtype)),
                        param_shapes(c, dtype))


def file_shapes(d) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "numpy") as h:
                out |= {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}
    return out


def assert_bit_identical(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


def to_merged(split_dir, out_dir, c: ModelConfig) -> None:
    """dFactory merged layout built by hand: stack each layer's experts, drop ``.{e}`` and ``.weight``."""
    t = {}
    for f in os.listdir(split_dir):
        if f.endswith(".safetensors"):
            t |= load_file(os.path.join(split_dir, f))
    merged = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    for i in range(c.num_dense_layers, c.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            p = f"model.layers.{i}.mlp.experts."
            merged[p + proj] = np.stack([t[p + f"{e}.{proj}.weight"] for e in range(c.num_experts)])
    os.makedirs(out_dir)
    save_file(merged, os.path.join(out_dir, "model.safetensors"))
    c.to_json(os.path.join(out_dir, "config.json"))


# ---- names and shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_shapes_match_contract_and_model(variant):
    c = tiny_config(**VARIANTS[variant])
    got = {k: v.shape for k, v in flat(param_shapes(c)).items()}
    assert got == contract_shapes(c)
    assert flat(param_shapes(c, jnp.bfloat16))["moe_layers/moe/expert_bias" if c.num_moe_layers
                                               else "embedding"].dtype == (
        jnp.float32 if c.num_moe_layers else jnp.bfloat16)
    from dmax_jax.model.llada2 import init_params

    model = jax.eval_shape(lambda: init_params(c, jax.random.key(0), jnp.bfloat16))
    assert {k: (v.shape, v.dtype) for k, v in flat(model).items()} == \
        {k: (v.shape, v.dtype) for k, v in flat(param_shapes(c, jnp.bfloat16)).items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_names_and_shapes_are_the_references(variant, tmp_path):
    c = tiny_config(**VARIANTS[variant])
    save_hf_params(random_params(c), c, tmp_path / "ck")
    got = file_shapes(tmp_path / "ck")
    assert {k: s for k, (s, _) in got.items()} == reference_hf_shapes(c)
    assert {dt for _, dt in got.values()} == {"F32"}
    assert ModelConfig.from_json(tmp_path / "ck") == c


# ---- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_split_is_bit_identical(dtype, tmp_path):
    c = tiny_config()
    p = random_params(c, dtype, seed=1)
    save_hf_params(p, c, tmp_path / "a")
    q = load_hf_params(tmp_path / "a", dtype=dtype)
    assert_bit_identical(p, q)
    save_hf_params(q, c, tmp_path / "b")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("variant", ["base", "all_moe", "two_shared"])
def test_merged_layout_loads_like_split(variant, tmp_path):
    c = tiny_config(**VARIANTS[variant])
    p = random_params(c, seed=2)
    save_hf_params(p, c, tmp_path / "split")
    to_merged(tmp_path / "split", tmp_path / "merged", c)
    names = set(file_shapes(tmp_path / "merged"))
    assert f"model.layers.{c.num_dense_layers}.mlp.experts.down_proj" in names
    assert_bit_identical(p, load_hf_params(tmp_path / "merged"))
    save_hf_params(load_hf_params(tmp_path / "merged"), c, tmp_path / "back")
    assert set(file_shapes(tmp_path / "back")) == set(reference_hf_shapes(c))


def test_layout_semantics_match_torch_linear(tmp_path):
    """Loaded kernels compute what the HF tensors compute (y = x Wᵀ), head order Q, K, V."""
    c = tiny_config()
    shapes = reference_hf_shapes(c)
    rng = np.random.default_rng(3)
    t = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    os.makedirs(tmp_path / "ck")
    save_file(t, str(tmp_path / "ck" / "model.safetensors"))
    p = flat(load_hf_params(tmp_path / "ck", c))
    x = rng.standard_normal(c.hidden_size).astype(np.float32)
    nq, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    L1 = "model.layers.1."  # first MoE layer = moe_layers[0]
    qkv_hf = (x @ t[L1 + "attention.query_key_value.weight"].T).reshape(nq + 2 * nkv, d)
    qkv = np.einsum("h,hnd->nd", x, np.asarray(p["moe_layers/attention/qkv"][0]))
    np.testing.assert_allclose(qkv, qkv_hf, rtol=1e-5, atol=1e-5)
    o = rng.standard_normal((nq, d)).astype(np.float32)
    np.testing.assert_allclose(np.einsum("nd,ndh->h", o, np.asarray(p["moe_layers/attention/out"][0])),
                               o.reshape(-1) @ t[L1 + "attention.dense.weight"].T, rtol=1e-5, atol=1e-5)
    for proj, leaf in (("gate_proj", "experts_gate"), ("down_proj", "experts_down")):
        w = t[L1 + f"mlp.experts.5.{proj}.weight"]
        v = rng.standard_normal(w.shape[1]).astype(np.float32)
        ours = np.asarray(p[f"moe_layers/moe/{leaf}"][0, 5])
        np.testing.assert_allclose(v @ ours, v @ w.T, rtol=1e-5, atol=1e-5)
    same = np.testing.assert_array_equal
    same(np.asarray(p["dense_layers/mlp/down"][0]), t["model.layers.0.mlp.down_proj.weight"].T)
    same(np.asarray(p["moe_layers/moe/router"][1]), t["model.layers.2.mlp.gate.weight"].T)
    same(np.asarray(p["lm_head"]), t["lm_head.weight"].T)
    same(np.asarray(p["moe_layers/moe/expert_bias"][1]), t["model.layers.2.mlp.gate.expert_bias"])


def test_sharded_files_with_index(tmp_path):
    c = tiny_config()
    p = random_params(c, seed=4)
    limit = 100_000
    save_hf_params(p, c, tmp_path / "ck", max_shard_bytes=limit)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    files = sorted(f for f in os.listdir(tmp_path / "ck") if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files)
    got = file_shapes(tmp_path / "ck")
    assert set(index["weight_map"]) == set(got) == set(reference_hf_shapes(c))
    assert index["metadata"]["total_size"] == sum(4 * int(np.prod(s)) for s, _ in got.values())
    for f in files:  # a shard only overflows the limit when one tensor alone is larger
        sizes = [4 * int(np.prod(got[n][0])) for n, g in index["weight_map"].items() if g == f]
        assert sum(sizes) <= limit or len(sizes) == 1
    assert_bit_identical(p, load_hf_params(tmp_path / "ck"))


def test_f32_to_bf16_cast(tmp_path):
    c = tiny_config()
    p = random_params(c, seed=5)
    save_hf_params(p, c, tmp_path / "ck")
    q = flat(load_hf_params(tmp_path / "ck", dtype=jnp.bfloat16))
    for k, v in flat(p).items():
        want = jnp.float32 if k.endswith("expert_bias") else jnp.bfloat16
        assert q[k].dtype == want, k
        np.testing.assert_array_equal(np.asarray(q[k]), np.asarray(v).astype(want))
    save_hf_params(p, c, tmp_path / "bf", dtype=jnp.bfloat16)
    dts = {k: dt for k, (_, dt) in file_shapes(tmp_path / "bf").items()}
    assert {dt for k, dt in dts.items() if not k.endswith("expert_bias")} == {"BF16"}
    assert {dt for k, dt in dts.items() if k.endswith("expert_bias")} == {"F32"}
    assert ModelConfig.from_json(tmp_path / "bf").torch_dtype == "bfloat16"
    assert_bit_identical(jax.tree.map(jnp.asarray, _unflat(q)),
                         load_hf_params(tmp_path / "bf", dtype=jnp.bfloat16))


def _unflat(d: dict) -> dict:
    out: dict = {}
    for k, v in d.items():
        node = out
        *head, last = k.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def test_zero_width_shared_tensors_are_accepted(tmp_path):
    c = tiny_config(num_shared_experts=0)
    save_hf_params(random_params(c), c, tmp_path / "ck")
    t = load_file(str(tmp_path / "ck" / "model.safetensors"))
    t["model.layers.1.mlp.shared_experts.up_proj.weight"] = np.zeros((0, c.hidden_size), np.float32)
    save_file(t, str(tmp_path / "ck" / "model.safetensors"))
    assert "shared" not in load_hf_params(tmp_path / "ck")["moe_layers"]["moe"]


# ---- errors ----------------------------------------------------------------------------------------
def test_every_mismatch_in_one_error(tmp_path):
    c = tiny_config()
    save_hf_params(random_params(c), c, tmp_path / "ck")
    t = load_file(str(tmp_path / "ck" / "model.safetensors"))
    del t["model.norm.weight"], t["model.layers.2.mlp.experts.7.up_proj.weight"]
    t["model.layers.1.attention.dense.weight"] = np.zeros((3, 3), np.float32)
    t["model.layers.9.foo.weight"] = np.zeros(2, np.float32)
    t["model.layers.0.input_layernorm.weight"] = np.zeros(c.hidden_size, np.int32)
    save_file(t, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError) as ei:
        load_hf_params(tmp_path / "ck")
    err = ei.value
    assert [m.split()[0] for m in err.missing] == ["model.layers.2.mlp.experts.7.up_proj.weight",
                                                   "model.norm.weight"]
    assert err.unexpected == ["model.layers.9.foo.weight  [2]"]
    assert err.misshapen == [f"model.layers.1.attention.dense.weight  expected [{c.hidden_size}, "
                             f"{c.num_attention_heads * c.head_dim}] got [3, 3]"]
    assert len(err.other) == 1 and "I32" in err.other[0]
    assert "5 problems" in str(err) and "model.norm.weight  expected [64]" in str(err)


def test_missing_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_hf_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no \\*.safetensors"):
        load_hf_params(tmp_path / "empty")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        load_hf_params(tmp_path / "pickle")
    c = tiny_config()
    save_hf_params(random_params(c), c, tmp_path / "ck", max_shard_bytes=100_000)
    os.remove(tmp_path / "ck" / "config.json")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_hf_params(tmp_path / "ck")
    assert flat(load_hf_params(tmp_path / "ck", c)).keys() == contract_shapes(c).keys()
    second = sorted(f for f in os.listdir(tmp_path / "ck") if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / "ck" / second)
    with pytest.raises(CheckpointNotFoundError, match="shard files") as ei:
        load_hf_params(tmp_path / "ck", c)
    assert ei.value.other == [second]


def test_inconsistent_checkpoints_are_rejected(tmp_path):
    c = tiny_config()
    save_hf_params(random_params(c), c, tmp_path / "ck")
    to_merged(tmp_path / "ck", tmp_path / "merged", c)
    t = load_file(str(tmp_path / "merged" / "model.safetensors"))
    t["model.layers.1.mlp.experts.0.gate_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(t, str(tmp_path / "merged" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mixes split"):
        load_hf_params(tmp_path / "merged")
    with pytest.raises(ValueError, match="float64"):
        load_hf_params(tmp_path / "ck", dtype=jnp.float64)
    with pytest.raises(CheckpointError, match="shardings tree") as ei:
        load_hf_params(tmp_path / "ck", shardings={"embedding": None})
    assert "lm_head" in ei.value.missing


def test_save_rejects_bad_params_and_existing_dirs(tmp_path):
    c = tiny_config()
    p = random_params(c)
    bad = dict(p, lm_head=jnp.zeros((2, 2)), extra=jnp.zeros(3))
    del bad["final_norm"]
    with pytest.raises(CheckpointError) as ei:
        save_hf_params(bad, c, tmp_path / "x")
    assert ei.value.missing == ["final_norm/scale  expected [64]"]
    assert ei.value.unexpected == ["extra  [3]"] and ei.value.misshapen[0].startswith("lm_head")
    assert not (tmp_path / "x").exists()
    save_hf_params(p, c, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not empty"):
        save_hf_params(p, c, tmp_path / "ck")
    q = random_params(c, seed=9)
    save_hf_params(q, c, tmp_path / "ck", overwrite=True)
    assert_bit_identical(q, load_hf_params(tmp_path / "ck"))


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    c = tiny_config()
    p = random_params(c)
    save_hf_params(p, c, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    real = hf._write_safetensors
    calls = []

    def flaky(file, items):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real(file, items)

    monkeypatch.setattr(hf, "_write_safetensors", flaky)
    for target, kw in ((tmp_path / "new", {}), (tmp_path / "ck", {"overwrite": True})):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            save_hf_params(random_params(c, seed=7), c, target, max_shard_bytes=100_000, **kw)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no half-written dir, no temp left over
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


# ---- placement -------------------------------------------------------------------------------------
def test_load_into_shardings(tmp_path):
    devices = jax.devices()
    assert len(devices) >= 2, "tests/conftest.py should provide 8 fake CPU devices"
    c = tiny_config()
    n = max(k for k in range(2, len(devices) + 1) if c.num_experts % k == 0 and c.vocab_size % k == 0)
    mesh = Mesh(np.array(devices[:n]), ("x",))
    shard = lambda *spec: NamedSharding(mesh, P(*spec))
    p = random_params(c, seed=6)
    save_hf_params(p, c, tmp_path / "ck")
    shardings = jax.tree.map(lambda s: shard(), param_shapes(c))
    shardings["embedding"] = shard("x", None)
    for k in ("experts_gate", "experts_up", "experts_down"):
        shardings["moe_layers"]["moe"][k] = shard(None, "x")
    q = load_hf_params(tmp_path / "ck", shardings=shardings)
    assert_bit_identical(p, q)
    fq, fs = flat(q), flat(shardings)
    for k in fq:
        assert fq[k].sharding == fs[k], k
    experts = q["moe_layers"]["moe"]["experts_up"]
    assert {s.data.shape for s in experts.addressable_shards} == {(2, c.num_experts // n, 64, 32)}
    one = load_hf_params(tmp_path / "ck", shardings=shard())
    assert all(x.sharding == shard() for x in jax.tree.leaves(one))
    with pytest.raises(CheckpointError, match="cannot place embedding"):
        load_hf_params(tmp_path / "ck", shardings=dict(shardings, embedding=shard(None, None, "x")))
