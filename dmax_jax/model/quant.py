"""int8 weight-only decoding: per-output-channel symmetric int8 weights, dequantized where they are used.

Why weight-only: DMax-16B at batch 1 is bound by the bytes of the weights each forward touches (~21 GB
in bf16); int8 storage halves the weights' resident bytes. A quantized weight ``W`` becomes two leaves:
``W`` itself as int8 ``q = round(W / s)`` and ``W_qscale`` (float32, ``s = max|W| / 127`` over the
contracted axes, one scale per output channel — per layer, per expert). ``layers.param_with_axes``
sees the ``_qscale`` sibling and hands the module ``q · s`` instead of ``q``: attention einsums, dense
MLP and shared expert work unchanged, and under ``jax.jit`` the multiply sits right next to its
consumer (XLA fuses it into the dot where it can). The routed experts take ``layers.quantized_param``
instead: ``qwix.QArray(q, s)`` un-dequantized, which the GPU / TPU grouped-matmul kernels read as int8
tiles with the scale applied to their output rows (``experts.py``); the CPU paths ``dequantize_as``.

Quantized: attention ``qkv`` / ``out``, dense MLP, shared expert, routed experts. Kept: embedding (a
gather reads a few rows), ``lm_head`` (the logits), router (routing decisions), norms, ``expert_bias``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from qwix import QArray

WEIGHT_MODES = ("native", "int8")
SCALE_SUFFIX = "_qscale"
# weight name -> contracted axes of the *stacked* weight (axis 0 = layer).
_CONTRACTED = {"qkv": (1,), "out": (1, 2), "gate": (1,), "up": (1,), "down": (1,),
               "experts_gate": (2,), "experts_up": (2,), "experts_down": (2,)}
_MODULES = ("attention", "mlp", "shared", "moe")


def _quantizable(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-1] in _CONTRACTED and path[-2] in _MODULES


def quantize_weight(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(int8 q, float32 scale)`` with ``w ≈ q · scale``; ``scale`` keeps ``axes`` as size 1."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """``q · scale`` in float32 (the module casts to its compute dtype)."""
    return q.astype(jnp.float32) * scale


def dequantize_as(w: jax.Array | QArray, dtype) -> jax.Array:
    """``w`` in ``dtype``: an int8 ``QArray(q, scale)`` dequantized (``q · scale`` in float32, then
    cast: the same values ``param_with_axes`` gives), a plain array cast."""
    if isinstance(w, QArray):
        return dequantize(w.qvalue, w.scale).astype(dtype)
    return w.astype(dtype)


def is_quantized(params: Mapping) -> bool:
    """Whether any leaf of ``params`` carries an int8 scale sibling."""
    for k, v in params.items():
        if isinstance(v, Mapping) and is_quantized(v):
            return True
        if str(k).endswith(SCALE_SUFFIX):
            return True
    return False


def _walk(tree: Mapping, fn, path: tuple[str, ...] = ()) -> dict:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = _walk(v, fn, path + (k,))
        elif _quantizable(path + (k,)):
            out[k], out[k + SCALE_SUFFIX] = fn(v, _CONTRACTED[k])
        else:
            out[k] = v
    return out


def quantize_params(params: Mapping) -> dict:
    """The int8 weight-only tree of a float params tree (concrete arrays; jitted per weight)."""
    if is_quantized(params):
        raise ValueError("quantize_params: these params are already int8-quantized")
    one = jax.jit(quantize_weight, static_argnums=1)
    return _walk(params, one)


def quantize_abstract(params: Mapping) -> dict:
    """``quantize_params`` on ``jax.ShapeDtypeStruct`` leaves (with shardings: the int8 weight keeps its
    weight's, the scale drops the contracted axes): for compile-only programs."""
    def one(s, axes):
        q = jax.ShapeDtypeStruct(s.shape, jnp.int8, sharding=getattr(s, "sharding", None))
        shape = tuple(1 if i in axes else n for i, n in enumerate(s.shape))
        sh = getattr(s, "sharding", None)
        if sh is not None and hasattr(sh, "spec"):
            spec = tuple(sh.spec) + (None,) * (len(s.shape) - len(sh.spec))
            sh = sh.update(spec=jax.sharding.PartitionSpec(*(None if i in axes else p
                                                             for i, p in enumerate(spec))))
        return q, jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)

    return _walk(params, one)


def weight_bytes(params: Mapping) -> int:
    """Bytes of every leaf (shapes and dtypes only)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def params_for(params: Mapping, weights: str) -> Mapping:
    """The params a program reads for ``DecodeConfig.weights``: as given (``native``, or already
    quantized) or int8-quantized now, abstract trees included. Nothing is cached: a caller that
    decodes many times quantizes once (``quantize_model``) and keeps the result."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights: must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    if weights == "native" or is_quantized(params):
        return params
    leaves = jax.tree.leaves(params)
    abstract = bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    return quantize_abstract(params) if abstract else quantize_params(params)


def quantize_model(model: Any, weights: str) -> Any:
    """``model`` (a ``Pretrained``-like dataclass or a ``(params, config)`` tuple) with its params as
    ``params_for(params, weights)``: quantize once at load, so every later ``generate`` call reads
    the int8 tree as is instead of quantizing the native one again. ``native``: ``model`` itself."""
    if weights == "native":
        return model
    if isinstance(model, tuple):
        params, config = model
        return params_for(params, weights), config
    return dataclasses.replace(model, params=params_for(model.params, weights))
