"""Every structured attention backend equals ``xla_dense`` (outputs and d/dq, d/dk, d/dv).

Kernels run in the Pallas interpreter on CPU; ``tpu_only`` / ``gpu_only`` tests run them on the
chip. Lowering for the chips is proven on CPU (``lowering_platforms`` / ``jax.export``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from numpy_reference import spec_allowed

from dmax_jax.model import attention_backends
from dmax_jax.model.attention_backends import attention, dense_attention
from dmax_jax.model.attention_backends.blockwise import blockwise_attention
from dmax_jax.model.attention_backends.pallas_gpu import flash_mask, pallas_gpu_attention
from dmax_jax.model.attention_backends.splash import splash_attention
from dmax_jax.model.attention_backends.tiles import padded_layout, tile_liveness
from dmax_jax.model.masks import MaskSpec, allowed, layout_indices
from kernels_pallas.flash_attention import FlashMask, flash_attention, flash_attention_reference
from kernels_pallas.flash_attention.reference import allowed as flash_rule

KINDS = ("full", "block_causal", "noisy_clean")
TOL = {"float32": 2e-5, "bfloat16": 2e-2}  # relative to the largest reference magnitude


def _cases(seed: int, fast: tuple[tuple[str, int], ...] = ()):
    """Random shapes covering every kind x GQA ratio (block 4..64, lengths off the block grid,
    every third case bf16). Cases whose ``(kind, groups)`` is not in ``fast`` are marked slow."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (kind, groups) in enumerate((k, g) for k in KINDS for g in (1, 2, 4)):
        bs = int(rng.choice([4, 8, 16, 32, 64]))
        seg = min(int(bs * rng.integers(1, 4) + rng.integers(1, bs)), 80)
        seg -= seg % bs == 0  # never a multiple of the block
        length = 2 * seg if kind == "noisy_clean" else seg
        dtype = "bfloat16" if (i + seed) % 3 == 2 else "float32"
        marks = [] if (kind, groups) in fast else [pytest.mark.slow]
        out.append(pytest.param(kind, bs, length, groups, dtype, marks=marks,
                                id=f"{kind}-bs{bs}-T{length}-G{groups}-{dtype}"))
    return out


# Default (non-slow) runs: every kind and every GQA ratio at least once, noisy_clean with all three.
FAST = (("full", 1), ("block_causal", 2), ("noisy_clean", 1), ("noisy_clean", 2), ("noisy_clean", 4))


def _inputs(length: int, groups: int, dtype: str, *, batch: int = 2, nkv: int = 2, d: int = 16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    nq = nkv * groups
    q = jax.random.normal(ks[0], (batch, length, nq, d), dtype)
    k = jax.random.normal(ks[1], (batch, length, nkv, d), dtype)
    v = jax.random.normal(ks[2], (batch, length, nkv, d), dtype)
    w = jax.random.normal(ks[3], (batch, length, nq, d), jnp.float32)
    return q, k, v, w


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_matches_dense(fn, spec, q, k, v, w, dtype):
    dense = functools.partial(dense_attention, spec=spec)
    ref_out, ref_grads = _out_and_grads(dense, q, k, v, w)
    out, grads = _out_and_grads(fn, q, k, v, w)
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        tol = TOL[dtype] * max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, atol=tol, rtol=0, err_msg=f"{name} differs from xla_dense")


# ---------------------------------------------------------------- layout and liveness (shared)

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length,bs,multiple", [(26, 4, 8), (38, 5, 16), (64, 32, 32), (10, 16, 8)])
def test_padded_layout_keeps_layout_indices(kind, length, bs, multiple):
    spec = MaskSpec(kind, bs)
    lay = padded_layout(spec, length, multiple)
    assert lay.padded % multiple == 0 and lay.valid.sum() == length
    blk, clean = layout_indices(spec, length)
    np.testing.assert_array_equal(lay.blk[lay.valid], blk)
    np.testing.assert_array_equal(lay.clean[lay.valid], clean)
    ids = np.arange(lay.padded, dtype=np.int32)  # the arithmetic form used inside splash:
    for got in (lay.indices_of(ids, np), jax.jit(lambda i: lay.indices_of(i, jnp))(ids)):
        for g, want in zip(got, (lay.blk, lay.clean, lay.valid)):
            np.testing.assert_array_equal(np.asarray(g), want)
    x = jnp.arange(length, dtype=jnp.float32)[None, :, None]
    np.testing.assert_array_equal(lay.unpad(lay.pad(x)), x)
    assert float(jnp.abs(lay.pad(x)).sum()) == float(x.sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length,bs,tile", [(26, 4, 8), (70, 8, 16), (96, 16, 16), (46, 3, 8)])
def test_tile_liveness_equals_brute_force(kind, length, bs, tile):
    spec = MaskSpec(kind, bs)
    lay = padded_layout(spec, length, tile)
    m = allowed(lay.blk[:, None], lay.clean[:, None], lay.blk[None], lay.clean[None])
    m &= lay.valid[:, None] & lay.valid[None, :]
    n = lay.padded // tile
    brute = m.reshape(n, tile, n, tile).any(axis=(1, 3))
    np.testing.assert_array_equal(tile_liveness(lay, tile, tile), brute)


def test_noisy_clean_live_tiles_have_the_training_structure():
    """Tile == block: noisy block i sees noisy i and clean < i; clean block i sees clean <= i."""
    nb, bs = 5, 8
    live = tile_liveness(padded_layout(MaskSpec("noisy_clean", bs), 2 * nb * bs, bs), bs, bs)
    for i in range(nb):
        assert set(np.flatnonzero(live[i])) == {i} | {nb + j for j in range(i)}
        assert set(np.flatnonzero(live[nb + i])) == {nb + j for j in range(i + 1)}
    assert live.mean() < 0.35


# ---------------------------------------------------------------- xla_blockwise

@pytest.mark.parametrize("kind,bs,length,groups,dtype", _cases(seed=1, fast=FAST))
def test_blockwise_matches_dense(kind, bs, length, groups, dtype):
    spec = MaskSpec(kind, bs)
    fn = functools.partial(blockwise_attention, spec=spec, tile=8)  # many tiles, partial ones too
    _assert_matches_dense(fn, spec, *_inputs(length, groups, dtype), dtype)


@pytest.mark.parametrize("kind,bs,length,groups,dtype",
                         _cases(seed=4, fast=(("noisy_clean", 2),)))
def test_blockwise_default_tile_matches_dense(kind, bs, length, groups, dtype):
    spec = MaskSpec(kind, bs)
    fn = functools.partial(blockwise_attention, spec=spec)
    _assert_matches_dense(fn, spec, *_inputs(length, groups, dtype), dtype)


def test_blockwise_through_attention_entry_with_scale():
    spec = MaskSpec("noisy_clean", 4)
    q, k, v, w = _inputs(30, 2, "float32")
    fn = functools.partial(attention, spec=spec, backend="xla_blockwise", scale=0.3)
    ref = functools.partial(dense_attention, spec=spec, scale=0.3)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v), atol=2e-5)
    assert attention_backends.get("xla_blockwise") is blockwise_attention


def _max_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation (nested jaxprs included) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jex_core.Jaxpr):
                    biggest = max(biggest, _max_intermediate(sub))
    return biggest


def test_blockwise_never_builds_a_dense_score_tensor():
    """Forward and backward intermediates stay O(T * D) and O(tile^2), far below T^2."""
    spec, t = MaskSpec("noisy_clean", 8), 256
    q, k, v, w = _inputs(t, 2, "float32", batch=1, nkv=1, d=8)
    f = functools.partial(blockwise_attention, spec=spec, tile=16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
    assert _max_intermediate(jaxpr.jaxpr) < t * t // 4
    dense = jax.make_jaxpr(lambda q, k, v: dense_attention(q, k, v, spec=spec))(q, k, v)
    assert _max_intermediate(dense.jaxpr) >= t * t  # the walker does see dense scores


def test_blockwise_grad_memory_is_a_fraction_of_dense():
    spec, t = MaskSpec("noisy_clean", 16), 512
    q, k, v, _ = _inputs(t, 2, "float32", batch=1, nkv=1, d=16)

    def temp_bytes(fn):
        g = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, spec=spec)), argnums=(0, 1, 2))
        return jax.jit(g).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(blockwise_attention) < 0.2 * temp_bytes(dense_attention)


def test_invalid_inputs_raise():
    q, k, v, _ = _inputs(12, 2, "float32")
    with pytest.raises(ValueError, match="not divisible"):
        blockwise_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2),
                            spec=MaskSpec("full"))
    with pytest.raises(ValueError, match="even length"):
        blockwise_attention(q[:, :11], k[:, :11], v[:, :11], spec=MaskSpec("noisy_clean", 4))
    with pytest.raises(ValueError, match="do not match"):
        blockwise_attention(q, k[:, :10], v[:, :10], spec=MaskSpec("full"))
    with pytest.raises(ValueError, match="power of two"):
        pallas_gpu_attention(q, k, v, spec=MaskSpec("full"), tile=24, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, v, spec=MaskSpec("full"), block=64, interpret=True)
    with pytest.raises(ValueError, match="not one of"):
        attention_backends.get("flash")


# ---------------------------------------------------------------- Pallas GPU kernel (interpret)

@pytest.mark.parametrize("kind,bs,length,groups,dtype", _cases(seed=2, fast=(("noisy_clean", 2),)))
def test_pallas_gpu_matches_dense_interpret(kind, bs, length, groups, dtype):
    spec = MaskSpec(kind, bs)
    fn = functools.partial(pallas_gpu_attention, spec=spec, tile=16, interpret=True)
    _assert_matches_dense(fn, spec, *_inputs(length, groups, dtype, batch=1, nkv=1), dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_reference_on_the_adapters_mask_matches_dense(kind):
    """The model side (padding, ``FlashMask`` from the spec) is right iff the kernel's dense twin,
    fed what the adapter feeds the kernel, equals ``xla_dense``."""
    spec = MaskSpec(kind, 4)
    q, k, v, _ = _inputs(26, 2, "float32")
    lay, mask = padded_layout(spec, 26, 16), flash_mask(spec, 26, 16)
    got = lay.unpad(flash_attention_reference(lay.pad(q), lay.pad(k), lay.pad(v), mask))
    np.testing.assert_allclose(got, dense_attention(q, k, v, spec=spec), atol=2e-6)


def test_kernel_rule_copy_equals_the_model_rule():
    blk = np.arange(4)[:, None, None, None]
    clean = np.array([False, True])[None, :, None, None]
    k_blk, k_clean = np.arange(4)[None, None, :, None], np.array([False, True])[None, None, None, :]
    np.testing.assert_array_equal(flash_rule(blk, clean, k_blk, k_clean), allowed(blk, clean, k_blk, k_clean))


def _plain_mask(tp: int, tile: int, seed: int, live=None) -> FlashMask:
    """A mask the model would never build (random block ids and halves, scattered padding): the
    kernel must follow whatever plain arrays it is given."""
    rng = np.random.default_rng(seed)
    blk, clean = rng.integers(0, 4, tp).astype(np.int32), rng.random(tp) < 0.5
    valid = rng.random(tp) < 0.85
    n = tp // tile
    dense = FlashMask(blk, clean, valid, np.ones((n, n), bool), tile).dense() & valid[:, None]
    brute = dense.reshape(n, tile, n, tile).any(axis=(1, 3))
    return FlashMask(blk, clean, valid, brute if live is None else live, tile)


def test_flash_kernel_matches_its_reference_interpret():
    """Kernels-only test (no model code): outputs and gradients of the interpreted kernel equal the
    dense twin on the same plain mask; a live table that drops a needed tile changes the answer."""
    mask = _plain_mask(64, 16, seed=0)
    q, k, v, w = _inputs(64, 2, "float32", batch=1, nkv=2, d=24)
    kernel = functools.partial(flash_attention, mask=mask, interpret=True)
    ref = functools.partial(flash_attention_reference, mask=mask)
    (out, grads), (want, want_grads) = _out_and_grads(kernel, q, k, v, w), _out_and_grads(ref, q, k, v, w)
    for name, got, exp in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads)):
        tol = TOL["float32"] * max(1.0, float(np.abs(exp).max()))
        np.testing.assert_allclose(got, exp, atol=tol, rtol=0, err_msg=name)
    holes = mask.live & ~np.eye(4, dtype=bool)
    cut = _plain_mask(64, 16, seed=0, live=mask.live & ~holes)
    assert holes.any()
    assert not np.allclose(flash_attention(q, k, v, cut, interpret=True), want, atol=1e-3)


def _cuda_export(fn, *args):
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[triton])(*args)


@pytest.mark.parametrize("kind", KINDS)
def test_pallas_gpu_lowers_for_cuda(kind):
    """Pallas -> Triton IR lowering of forward, dq and dk/dv kernels runs on CPU."""
    spec = MaskSpec(kind, 32)  # T = 600: padded length 640 is not a power of two, head_dim 96 -> 128
    q = jax.ShapeDtypeStruct((1, 600, 8, 96), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 600, 2, 96), jnp.bfloat16)
    f = functools.partial(pallas_gpu_attention, spec=spec)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    text = _cuda_export(grad, q, kv, kv).mlir_module()
    for name in ("block_diffusion_flash_fwd", "block_diffusion_flash_dq", "block_diffusion_flash_dkv"):
        assert name in text


needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.gpu_only
@needs_gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_gpu_on_device(kind, dtype):
    spec = MaskSpec(kind, 32)
    fn = functools.partial(pallas_gpu_attention, spec=spec)
    _assert_matches_dense(fn, spec, *_inputs(2 * 150, 4, dtype, nkv=2, d=64), dtype)


# ---------------------------------------------------------------- splash (interpret)

@pytest.mark.parametrize("kind,bs,length,groups,dtype", _cases(seed=3, fast=(("noisy_clean", 4),)))
def test_splash_matches_dense_interpret(kind, bs, length, groups, dtype):
    spec = MaskSpec(kind, bs)
    fn = functools.partial(splash_attention, spec=spec, interpret=True)
    _assert_matches_dense(fn, spec, *_inputs(length, groups, dtype, batch=1, nkv=1), dtype)


def test_splash_mask_is_the_dense_mask():
    spec = MaskSpec("noisy_clean", 5)
    lay = padded_layout(spec, 46, 128)
    from dmax_jax.model.attention_backends.splash import BlockDiffusionMask  # noqa: PLC0415

    lazy = BlockDiffusionMask(lay)[:, :]
    real = np.flatnonzero(lay.valid)
    np.testing.assert_array_equal(lazy[np.ix_(real, real)], spec_allowed("noisy_clean", 46, 5))
    assert not lazy[:, ~lay.valid].any()


@pytest.mark.parametrize("kind", KINDS)
def test_splash_lowers_for_tpu(kind):
    """Mosaic lowering of the splash forward and fused backward kernels runs on CPU."""
    spec = MaskSpec(kind, 32)
    q = jax.ShapeDtypeStruct((1, 300, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
    f = functools.partial(splash_attention, spec=spec)
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    text = jax.jit(grad).trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2


needs_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")


@pytest.mark.tpu_only
@needs_tpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_on_device(kind, dtype):
    spec = MaskSpec(kind, 32)
    fn = functools.partial(splash_attention, spec=spec)
    _assert_matches_dense(fn, spec, *_inputs(2 * 300, 4, dtype, nkv=2, d=128), dtype)
