"""SPD soft embeddings: Pallas kernels (interpret mode) == plain-JAX reference == float64 formula.

Tolerances: float32 outputs agree to 1e-5 (same f32 math, different summation order); bf16 outputs
are the same f32 values rounded once, so they differ by at most one bf16 ulp (relative 2^-7).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.soft_embedding import soft_embeddings, soft_embeddings_reference
from kernels_pallas.soft_embedding.kernel import soft_embeddings_gpu, soft_embeddings_tpu
from kernels_pallas.soft_embedding.reference import NORM_EPS

KERNELS = {"tpu": soft_embeddings_tpu, "gpu": soft_embeddings_gpu}
MASK_ID = 2
F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2.0**-7, atol=1e-6)


def _table(rng: np.random.Generator, vocab: int, hidden: int, dtype) -> jax.Array:
    """Rows with visibly different norms, so the norm target n* matters."""
    rows = rng.standard_normal((vocab, hidden)) * rng.uniform(0.3, 3.0, (vocab, 1))
    return jnp.asarray(rows, dtype)


def _inputs(rng: np.random.Generator, vocab: int, batch: int, length: int, top_k: int):
    """Ids and probs covering every regime, position by position (flattened index % 4):
    0 → p = 0 (pure MASK row), 1 → p = (1, 0, ...) (pure token row), 2 → Σp = 1 exactly
    (dyadic, so r = 0 with no rounding), 3 → Σp < 1 (mass left for the MASK row)."""
    n = batch * length
    ids = rng.integers(0, vocab, (n, top_k))
    probs = np.zeros((n, top_k))
    for i in range(n):
        kind = i % 4
        if kind == 1:
            probs[i, 0] = 1.0
        elif kind == 2:
            probs[i] = rng.multinomial(64, np.ones(top_k) / top_k) / 64.0
        elif kind == 3:
            probs[i] = rng.dirichlet(np.ones(top_k + 1))[:top_k]
    ids = jnp.asarray(ids.reshape(batch, length, top_k), jnp.int32)
    return ids, jnp.asarray(probs.reshape(batch, length, top_k), jnp.float32)


def _formula_f64(table, token_ids, probs, mask_id: int) -> np.ndarray:
    """The spec's formula in float64 NumPy, one position at a time (independent oracle)."""
    table = np.asarray(table, np.float64)
    ids, probs = np.asarray(token_ids), np.asarray(probs, np.float64)
    b, t, k = ids.shape
    out = np.zeros((b, t, table.shape[1]))
    e_m = table[mask_id]
    for i in range(b):
        for j in range(t):
            r = max(0.0, 1.0 - probs[i, j].sum())
            mix, target = r * e_m, r * np.linalg.norm(e_m)
            for c in range(k):
                e = table[ids[i, j, c]]
                mix = mix + probs[i, j, c] * e
                target += probs[i, j, c] * np.linalg.norm(e)
            out[i, j] = mix * target / (np.linalg.norm(mix) + NORM_EPS)
    return out


# (vocab, hidden, batch, length, top_k, dtype): hidden 64/96/200 are not multiples of 128,
# vocab 37 is not a multiple of the TPU row block, lengths 19/5 are not multiples of the tile.
CASES = [
    (50, 64, 2, 8, 1, jnp.float32),
    (37, 96, 1, 19, 3, jnp.float32),
    (64, 200, 2, 5, 3, jnp.bfloat16),
    (300, 128, 1, 32, 1, jnp.bfloat16),
]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"V{c[0]}-H{c[1]}-N{c[2]}x{c[3]}-K{c[4]}-"
                                                    f"{jnp.dtype(c[5]).name}")
def test_kernel_matches_reference(kernel: str, case) -> None:
    vocab, hidden, batch, length, top_k, dtype = case
    rng = np.random.default_rng(hidden + top_k)
    table = _table(rng, vocab, hidden, dtype)
    ids, probs = _inputs(rng, vocab, batch, length, top_k)
    run = jax.jit(functools.partial(KERNELS[kernel], mask_id=MASK_ID, out_dtype=dtype, interpret=True))
    got = run(table, ids, probs)
    want = soft_embeddings_reference(table, ids, probs, MASK_ID, out_dtype=dtype)
    assert got.shape == (batch, length, hidden) and got.dtype == dtype
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)

    # The two degenerate regimes, checked against the table itself (not just the reference).
    flat = np.asarray(got, np.float32).reshape(-1, hidden)
    rows = np.asarray(table, np.float32)
    flat_ids = np.asarray(ids).reshape(-1, top_k)
    np.testing.assert_allclose(flat[0::4], np.broadcast_to(rows[MASK_ID], flat[0::4].shape), **tol)
    np.testing.assert_allclose(flat[1::4], rows[flat_ids[1::4, 0]], **tol)


@pytest.mark.parametrize("top_k", [1, 3])
def test_reference_matches_float64_formula(top_k: int) -> None:
    rng = np.random.default_rng(top_k)
    table = _table(rng, 40, 48, jnp.float32)
    ids, probs = _inputs(rng, 40, 2, 6, top_k)
    got = soft_embeddings_reference(table, ids, probs, MASK_ID, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), _formula_f64(table, ids, probs, MASK_ID), rtol=1e-5,
                               atol=1e-5)
    # Rescaling puts every output on the interpolated norm shell n*.
    e = np.asarray(table, np.float64)
    p = np.asarray(probs, np.float64)
    norms = np.linalg.norm(e, axis=-1)
    r = np.maximum(0.0, 1.0 - p.sum(-1))
    target = (p * norms[np.asarray(ids)]).sum(-1) + r * norms[MASK_ID]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64), axis=-1), target, rtol=1e-5)


def test_reference_casts_and_defaults_dtype() -> None:
    rng = np.random.default_rng(0)
    table = _table(rng, 20, 32, jnp.float32)
    ids, probs = _inputs(rng, 20, 1, 4, 1)
    assert soft_embeddings_reference(table, ids, probs, MASK_ID).dtype == jnp.float32
    bf = soft_embeddings_reference(table, ids, probs, MASK_ID, out_dtype=jnp.bfloat16)
    f32 = soft_embeddings_reference(table, ids, probs, MASK_ID, out_dtype=jnp.float32)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf), np.asarray(f32.astype(jnp.bfloat16)))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_out_of_range_ids_are_clipped_like_the_reference(kernel: str) -> None:
    rng = np.random.default_rng(1)
    table = _table(rng, 24, 64, jnp.float32)
    ids = jnp.asarray([[[-5, 3], [7, 24]], [[100, 0], [23, -1]]], jnp.int32)
    probs = jnp.full(ids.shape, 0.4, jnp.float32)
    clipped = jnp.clip(ids, 0, 23)
    got = KERNELS[kernel](table, ids, probs, MASK_ID, out_dtype=jnp.float32, interpret=True)
    want = soft_embeddings_reference(table, clipped, probs, MASK_ID, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32_TOL)
    np.testing.assert_allclose(np.asarray(soft_embeddings_reference(table, ids, probs, MASK_ID)),
                               np.asarray(want), **F32_TOL)


def test_mosaic_kernel_splits_long_inputs_into_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the SMEM budget for prefetched ids/probs the wrapper issues several pallas_calls."""
    from kernels_pallas.soft_embedding import kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "TPU_MAX_PREFETCH", 48)  # K = 3 → 16 positions per call
    calls = []
    one_call = kernel_mod._tpu_call
    monkeypatch.setattr(kernel_mod, "_tpu_call", lambda *a: calls.append(a[1].shape) or one_call(*a))
    rng = np.random.default_rng(5)
    table = _table(rng, 40, 64, jnp.float32)
    ids, probs = _inputs(rng, 40, 2, 20, 3)  # 40 positions → 3 calls, the last one padded
    got = kernel_mod.soft_embeddings_tpu(table, ids, probs, MASK_ID, out_dtype=jnp.float32, interpret=True)
    want = soft_embeddings_reference(table, ids, probs, MASK_ID, out_dtype=jnp.float32)
    assert calls == [(16, 3)] * 3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32_TOL)


def test_dispatcher_paths_on_cpu() -> None:
    rng = np.random.default_rng(2)
    table = _table(rng, 30, 96, jnp.bfloat16)
    ids, probs = _inputs(rng, 30, 2, 4, 1)
    want = soft_embeddings_reference(table, ids, probs, MASK_ID)
    assert want.dtype == jnp.bfloat16  # out_dtype=None keeps the table dtype
    np.testing.assert_array_equal(np.asarray(soft_embeddings(table, ids, probs, MASK_ID, impl="xla")),
                                  np.asarray(want))
    np.testing.assert_array_equal(np.asarray(soft_embeddings(table, ids, probs, MASK_ID)), np.asarray(want))
    jitted = jax.jit(functools.partial(soft_embeddings, mask_id=MASK_ID, impl="pallas",
                                       out_dtype=jnp.float32))
    got = jitted(table, ids, probs)  # interpret=None → interpreted on CPU
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(soft_embeddings_reference(table, ids, probs, MASK_ID,
                                                                    out_dtype=jnp.float32)), **F32_TOL)


def test_dispatcher_rejects_bad_requests() -> None:
    table = jnp.ones((10, 16), jnp.float32)
    ids = jnp.zeros((1, 3, 1), jnp.int32)
    probs = jnp.full((1, 3, 1), 0.5, jnp.float32)
    with pytest.raises(ValueError, match="impl 'triton'"):
        soft_embeddings(table, ids, probs, 2, impl="triton")
    with pytest.raises(ValueError, match="cannot be compiled for CPU"):
        soft_embeddings(table, ids, probs, 2, impl="pallas", interpret=False)
    with pytest.raises(ValueError, match="interpret applies"):
        soft_embeddings(table, ids, probs, 2, impl="xla", interpret=True)
    with pytest.raises(ValueError, match="table must be"):
        soft_embeddings(table[0], ids, probs, 2)
    with pytest.raises(TypeError, match="table must be a floating"):
        soft_embeddings(table.astype(jnp.int32), ids, probs, 2)
    with pytest.raises(ValueError, match="token_ids must be"):
        soft_embeddings(table, ids[..., 0], probs, 2)
    with pytest.raises(TypeError, match="token_ids must be an integer"):
        soft_embeddings(table, ids.astype(jnp.float32), probs, 2)
    with pytest.raises(ValueError, match="probs shape"):
        soft_embeddings(table, ids, probs[:, :2], 2)
    with pytest.raises(TypeError, match="probs must be a floating"):
        soft_embeddings(table, ids, ids, 2)
    with pytest.raises(ValueError, match="mask_id 10 is outside"):
        soft_embeddings(table, ids, probs, 10)
    with pytest.raises(TypeError, match="out_dtype"):
        soft_embeddings(table, ids, probs, 2, out_dtype=jnp.int32)
    with pytest.raises(TypeError, match="mask_id must be a static"):
        jax.jit(lambda m: soft_embeddings(table, ids, probs, m))(2)


LOWER_CASES = [(1000, 200, 1, jnp.bfloat16), (4096, 2048, 3, jnp.float32)]


def _lower(kernel, platform: str, vocab: int, hidden: int, top_k: int, dtype) -> str:
    fn = jax.jit(functools.partial(kernel, mask_id=7, out_dtype=jnp.bfloat16))
    args = (jax.ShapeDtypeStruct((vocab, hidden), dtype), jax.ShapeDtypeStruct((1, 32, top_k), jnp.int32),
            jax.ShapeDtypeStruct((1, 32, top_k), jnp.float32))
    return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"H{c[1]}-K{c[2]}")
def test_mosaic_kernel_lowers_for_tpu(case) -> None:
    """Pallas → Mosaic lowering (block-shape rules included) runs without a TPU; the Mosaic
    compiler itself only runs on the chip."""
    text = _lower(soft_embeddings_tpu, "tpu", *case)
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("case", LOWER_CASES, ids=lambda c: f"H{c[1]}-K{c[2]}")
def test_triton_kernel_lowers_for_cuda(case) -> None:
    """Pallas → Triton IR lowering runs without a GPU; PTX compilation happens in XLA on the GPU."""
    text = _lower(soft_embeddings_gpu, "cuda", *case)
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_triton_kernel_on_gpu() -> None:
    rng = np.random.default_rng(3)
    table = _table(rng, 1000, 200, jnp.bfloat16)
    ids, probs = _inputs(rng, 1000, 2, 32, 3)
    got = soft_embeddings(table, ids, probs, MASK_ID, impl="pallas")
    want = soft_embeddings_reference(table, ids, probs, MASK_ID)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16_TOL)


@pytest.mark.tpu_only
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_mosaic_kernel_on_tpu() -> None:
    rng = np.random.default_rng(4)
    table = _table(rng, 1000, 200, jnp.bfloat16)
    ids, probs = _inputs(rng, 1000, 2, 32, 3)
    got = soft_embeddings(table, ids, probs, MASK_ID, impl="pallas")
    want = soft_embeddings_reference(table, ids, probs, MASK_ID)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **BF16_TOL)
