"""Every grouped-matmul MoE backend equals the dense reference (outputs and gradients), ``auto``
resolves per platform as documented, and the GPU/TPU kernels lower from this CPU host.

On CPU: ``ragged`` is XLA, ``tiled`` plain JAX over expert-aligned row tiles, ``tokamax`` runs
tokamax's XLA implementation, ``megablox`` runs the TPU kernel in the Pallas interpreter.
Tolerances (float32, default-precision CPU matmuls, exact f32): outputs within 2e-5 and gradients
within 1e-4 of the largest reference magnitude — the backends sum the same products in different orders.
"""

from __future__ import annotations

import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.config import tiny_config
from dmax_jax.model import experts
from dmax_jax.model.experts import MoEBackendError, resolve_moe_impl, routed_experts
from dmax_jax.model.llada2 import forward, init_params
from dmax_jax.model.masks import MaskSpec

OUT_TOL, GRAD_TOL = 2e-5, 1e-4
CPU_BACKENDS = {  # backend -> extra keyword arguments on CPU
    "ragged": {},
    "tiled": {},
    "tokamax": {},
    "megablox": {"interpret": True},
    "ep": {},  # no mesh in context: the grouped path with the platform's auto matmul
}
# (tokens, experts, top-k, hidden, expert width): a decode block (batch 1 x 32 tokens, many
# experts, several of them empty) and a training-sized batch (rows not a multiple of 128).
SIZES = {"decode": (32, 64, 8, 64, 32), "train": (600, 16, 4, 128, 64)}


def _problem(tokens: int, n_experts: int, k: int, hidden: int, width: int, seed: int = 0):
    """Inputs with experts ``n_experts - 4 ..`` never routed to (empty groups)."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n_experts - 4, k, replace=False) for _ in range(tokens)])
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return (f32(rng.standard_normal((tokens, hidden))), jnp.asarray(idx, jnp.int32),
            f32(rng.random((tokens, k))), f32(0.2 * rng.standard_normal((n_experts, hidden, width))),
            f32(0.2 * rng.standard_normal((n_experts, hidden, width))),
            f32(0.2 * rng.standard_normal((n_experts, width, hidden))))


def _value_and_grads(impl: str, args, **kw):
    x, idx, w, wg, wu, wd = args

    def loss(x, w, wg, wu, wd):
        y = routed_experts(x, idx, w, wg, wu, wd, impl=impl, platform="cpu", **kw)
        return jnp.sum(y * jnp.cos(y)), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (_, y), grads = fn(x, w, wg, wu, wd)
    return y, grads


@functools.cache
def _dense(size: str):
    return _value_and_grads("dense", _problem(*SIZES[size]))


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("impl", sorted(CPU_BACKENDS))
def test_backend_equals_dense_reference(impl, size):
    args = _problem(*SIZES[size])
    want, want_grads = _dense(size)
    got, grads = _value_and_grads(impl, args, **CPU_BACKENDS[impl])
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=OUT_TOL * scale, rtol=0)
    for name, g, r in zip(("dx", "dw", "dgate", "dup", "ddown"), grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=GRAD_TOL * float(np.abs(r).max()), rtol=0, err_msg=name)
    for g in grads[2:]:  # experts nobody was routed to get exactly zero weight gradients
        assert not np.asarray(g[-4:]).any() and np.asarray(g[:-4]).any()


def test_auto_resolves_per_platform():
    assert resolve_moe_impl("auto", "cpu") == "tiled"
    assert resolve_moe_impl("auto", "gpu") == "tokamax"  # never XLA's densified ragged_dot on GPU
    assert resolve_moe_impl("auto", "tpu") == "megablox"
    assert resolve_moe_impl("auto") == experts.AUTO_IMPL[jax.default_backend()]
    assert experts.grouped_matmul("auto", "cpu") is experts.tiled_matmul
    assert experts.grouped_matmul("auto", "gpu").func is experts._tokamax_matmul
    assert experts.grouped_matmul("auto", "tpu").func is experts._megablox_matmul
    # int8 expert weights: megablox's gmm rejects int8, so TPU's auto is tokamax's Mosaic kernel; only
    # the GPU / TPU kernels take them as int8 (everything else is handed dequantized weights)
    int8_auto = [resolve_moe_impl("auto", p, int8=True) for p in ("cpu", "gpu", "tpu")]
    assert int8_auto == ["tiled", "tokamax", "tokamax"]
    assert experts.reads_int8("tokamax", "tpu") and experts.reads_int8("ep", "gpu")
    dequantized = [("megablox", "tpu"), ("tokamax", "cpu"), ("tiled", "cpu"), ("dense", "gpu")]
    assert not any(experts.reads_int8(i, p) for i, p in dequantized)


def test_unavailable_backends_raise(monkeypatch):
    with pytest.raises(MoEBackendError, match="TPU kernel"):
        resolve_moe_impl("megablox", "cpu")
    with pytest.raises(MoEBackendError, match="TPU kernel"):
        resolve_moe_impl("megablox", "gpu", interpret=True)
    with pytest.raises(MoEBackendError, match="not one of"):
        resolve_moe_impl("grouped", "cpu")
    with pytest.raises(MoEBackendError, match="platforms"):
        resolve_moe_impl("auto", "metal")
    assert issubclass(MoEBackendError, ValueError)
    args = _problem(*SIZES["decode"])
    with pytest.raises(MoEBackendError, match="megablox"):
        routed_experts(*args, impl="megablox", platform="cpu")
    experts._tokamax.cache_clear()
    monkeypatch.setitem(sys.modules, "tokamax", None)  # as if not installed
    try:
        with pytest.raises(MoEBackendError, match="needs the tokamax package"):
            resolve_moe_impl("tokamax", "gpu")
    finally:
        experts._tokamax.cache_clear()


def test_model_forward_per_backend():
    """The whole model: ``auto`` is bit-identical to ``tiled`` on CPU, ``tiled``, ``ragged`` and
    ``tokamax`` match ``dense``; an unknown ``moe_impl`` is a MoEBackendError."""
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    spec = MaskSpec("block_causal", 4)
    run = {impl: np.asarray(forward(params, cfg, ids, mask=spec, moe_impl=impl)[0])
           for impl in ("auto", "ragged", "tiled", "tokamax", "dense")}
    np.testing.assert_array_equal(run["auto"], run["tiled"])
    for impl in ("ragged", "tiled", "tokamax"):
        np.testing.assert_allclose(run[impl], run["dense"], atol=1e-5, rtol=1e-5, err_msg=impl)
    with pytest.raises(MoEBackendError, match="not one of"):
        forward(params, cfg, ids, mask=spec, moe_impl="grouped")


# ---------------------------------------------------------------- lowering for the chips

def _abstract_full_size():
    """DMax-16B's MoE shapes for one 32-token decode block (abstract: nothing allocated)."""
    n, e, k, h, im = 32, 256, 8, 2048, 512
    sd = jax.ShapeDtypeStruct
    return (sd((n, h), jnp.bfloat16), sd((n, k), jnp.int32), sd((n, k), jnp.float32),
            sd((e, h, im), jnp.bfloat16), sd((e, h, im), jnp.bfloat16), sd((e, im, h), jnp.bfloat16))


def _lowered_grad(impl: str, platform: str, target: str) -> str:
    def loss(x, idx, w, wg, wu, wd):
        y = routed_experts(x, idx, w, wg, wu, wd, impl=impl, platform=platform)
        return jnp.sum(y.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 2, 3, 4, 5))
    return jax.jit(grad).trace(*_abstract_full_size()).lower(lowering_platforms=(target,)).as_text()


def test_auto_on_gpu_lowers_to_tokamax_triton_for_cuda():
    """Forward and both backward products of the three projections are Triton kernels; no XLA
    ``ragged_dot`` is left in the program. (tokamax checks for a GPU unless cross-compiling.)"""
    tokamax = experts._tokamax()
    with tokamax.config.cross_compile(True):
        text = _lowered_grad("auto", "gpu", "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 9
    assert "chlo.ragged_dot" not in text
    assert "chlo.ragged_dot" in _lowered_grad("ragged", "gpu", "cuda")  # the walker sees XLA's op


def test_auto_on_tpu_lowers_to_megablox_for_tpu():
    """Mosaic lowering of megablox's gmm (forward, d/dx) and tgmm (d/dweights) runs on CPU."""
    text = _lowered_grad("auto", "tpu", "tpu")
    assert text.count("tpu_custom_call") >= 6
    assert {"gmm", "tgmm"} <= set(re.findall(r"\bt?gmm\b", text))
    assert "chlo.ragged_dot" not in text


needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
needs_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")


@pytest.mark.gpu_only
@needs_gpu
@pytest.mark.parametrize("size", sorted(SIZES))
def test_tokamax_on_gpu(size):
    args = _problem(*SIZES[size])
    with jax.default_matmul_precision("highest"):
        want = routed_experts(*args, impl="dense")
        got = routed_experts(*args, impl="tokamax")
    np.testing.assert_allclose(got, want, atol=1e-3 * float(np.abs(want).max()), rtol=0)


@pytest.mark.tpu_only
@needs_tpu
@pytest.mark.parametrize("impl", ["megablox", "tokamax"])
def test_tpu_kernels_on_device(impl):
    args = _problem(*SIZES["train"])
    with jax.default_matmul_precision("highest"):
        want = routed_experts(*args, impl="dense")
        got = routed_experts(*args, impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-3 * float(np.abs(want).max()), rtol=0)
