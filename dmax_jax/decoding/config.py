"""``DecodeConfig``: every knob of one decode request, validated once, split into compile key + traced values.

Why one object: ``generate``, ``decode.py``, the eval CLI, the demo and the server all take the same
knobs; validating them in one place means a bad value (τ = 1.5, ``dtype="float8"``) gets the same
``DecodeConfigError`` naming the field and its allowed range everywhere, before anything compiles.

Split (what recompiles and what does not): :meth:`DecodeConfig.static_part` is the hashable part of
the compile key (strategy, block length, greedy vs sampling, forward bound per block, soft-embedding
settings, dtype, trace); :meth:`DecodeConfig.row_params` builds the traced per-row values
(:class:`RowParams`: gen length, EOS id, seed, thresholds, temperature, step count) — changing those
never recompiles, and each row of one batch may carry its own.

``gen_length`` rule: any positive length. Blocks are aligned to multiples of ``block_length`` from
``s0 = B·floor(P/B)`` (spec §5.1), so the last block may reach past ``P + gen_length``; those
positions are decoded with their block (they are in its bidirectional attention) but never
returned: a result holds at most ``gen_length`` tokens, as the LLaDA2 HF ``generate`` returns
``x[P : P + gen_length]`` (spec §5.5b) and as dInfer's eval, whose bucketed ``G`` makes ``P + G`` a
block multiple (spec §5.1), never decodes past ``P + G``. TPF counts the returned region only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("spd", "threshold", "llada2")
SOFT_IMPLS = ("auto", "pallas", "xla")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Old keyword of ``generate`` → field name (kept so existing callers keep working).
ALIASES = {"soft_embedding_impl": "soft_impl"}


class DecodeConfigError(ValueError):
    """A decode knob outside its allowed range; ``field`` names it (CLIs map it to their flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _int(name: str, v: Any, lo: int, hi: int = INT32_MAX, *, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise DecodeConfigError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
    if not lo <= int(v) <= hi:
        raise DecodeConfigError(name, f"must be in [{lo}, {hi}], got {v}")


def _real(name: str, v: Any, lo: float, hi: float) -> None:
    allowed = f"in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a finite number >= {lo:g}"
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise DecodeConfigError(name, f"must be {allowed}, got {v!r}")
    if not math.isfinite(float(v)) or not lo <= float(v) <= hi:
        raise DecodeConfigError(name, f"must be {allowed}, got {v}")


def _dtype_name(dtype: Any) -> str:
    try:
        return jnp.dtype(dtype).name
    except TypeError as e:
        raise DecodeConfigError("dtype", f"must be one of {', '.join(DTYPE_NAMES)}; got {dtype!r}") from e


def _choice(name: str, v: Any, allowed: Sequence[str]) -> None:
    if v not in allowed:
        raise DecodeConfigError(name, f"must be one of {', '.join(allowed)}; got {v!r}")


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
    """The config's part of the compile key (hashable). Shapes (prompt bucket, capacity) are added by
    the program builder from the request."""

    strategy: str
    block_length: int
    mask_id: int
    greedy: bool
    max_steps: int      # static bound on forwards per block: spd cap, llada2 steps, threshold worst case
    top_k: int
    max_unroll: int
    expected_tpf: int
    soft_impl: str
    dtype: str
    trace: bool


@flax.struct.dataclass
class RowParams:
    """Traced per-row values of a decode program, each ``[batch]``; changing them never recompiles."""

    prompt_lens: jax.Array        # int32: real prompt length
    request_ids: jax.Array        # int32: RNG stream of the row (fold_in), independent of the batch
    gen_length: jax.Array         # int32: tokens asked for (result cut to it)
    eos_id: jax.Array             # int32
    seed: jax.Array               # int32
    threshold: jax.Array          # f32: τ_dec (spd) / τ (threshold, llada2)
    accept_threshold: jax.Array   # f32: τ_acc (spd)
    temperature: jax.Array        # f32: 1.0 when greedy (unused then)
    steps: jax.Array              # int32: forwards per block (spd cap, llada2 steps, threshold bound)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Knobs of one decode request; invalid values raise :class:`DecodeConfigError` at construction.

    ``strategy``: ``spd`` (Soft Parallel Decoding: τ_dec = ``threshold``, τ_acc = ``accept_threshold``,
    soft top-``top_k`` mixing with ``soft_impl``), ``threshold`` (dInfer threshold decoding, τ =
    ``threshold``, ``max_unroll``/``expected_tpf`` forwards per progress check; takes no ``steps``) or
    ``llada2`` (the HF ``generate``: ``threshold`` its acceptance threshold, ``steps`` refinement steps
    per block). ``steps``: spd's forward cap per block / llada2's steps (default ``block_length``;
    llada2 caps it at ``gen_length``). ``gen_length``: at most this many tokens come back (module doc).
    ``dtype``: compute dtype (None: the model's). ``prompt_bucket``: prompt padding multiple (None:
    ``max(128, block_length)`` rounded to the block). ``mask_id``/``eos_id``: None = the model config's.
    ``trace``: record every step for the HTML viewer.
    """

    strategy: str = "spd"
    block_length: int = 32
    gen_length: int = 256
    threshold: float = 0.5
    accept_threshold: float = 0.9
    steps: int | None = None
    temperature: float = 0.0
    seed: int = 0
    top_k: int = 1
    soft_impl: str = "auto"
    dtype: str | None = None
    max_unroll: int = 4
    expected_tpf: int = 4
    prompt_bucket: int | None = None
    mask_id: int | None = None
    eos_id: int | None = None
    trace: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and not isinstance(self.dtype, str):  # accept jnp dtypes, store the name
            object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        _choice("strategy", self.strategy, STRATEGIES)
        _int("block_length", self.block_length, 1)
        _int("gen_length", self.gen_length, 1)
        _real("threshold", self.threshold, 0.0, 1.0)
        _real("accept_threshold", self.accept_threshold, 0.0, 1.0)
        _real("temperature", self.temperature, 0.0, math.inf)
        _int("seed", self.seed, INT32_MIN)
        _int("top_k", self.top_k, 1)
        _choice("soft_impl", self.soft_impl, SOFT_IMPLS)
        if self.dtype is not None:
            _choice("dtype", self.dtype, DTYPE_NAMES)
        _int("max_unroll", self.max_unroll, 1)
        _int("expected_tpf", self.expected_tpf, 1)
        _int("mask_id", self.mask_id, 0, optional=True)
        _int("eos_id", self.eos_id, 0, optional=True)
        _int("steps", self.steps, 1, optional=True)
        if self.strategy == "threshold" and self.steps is not None:
            raise DecodeConfigError("steps", "strategy 'threshold' stops when the block has no mask; it "
                                    f"takes no steps (got {self.steps}; leave it unset)")
        if self.top_k > 1 and self.strategy != "spd":
            raise DecodeConfigError("top_k", f"soft top-k mixing is SPD's; strategy {self.strategy!r} needs "
                                    f"top_k 1, got {self.top_k}")
        if self.prompt_bucket is not None:
            _int("prompt_bucket", self.prompt_bucket, 1)
            if self.prompt_bucket % self.block_length:
                raise DecodeConfigError("prompt_bucket", f"must be a positive multiple of block_length "
                                        f"{self.block_length}, got {self.prompt_bucket}")
        if not isinstance(self.trace, bool):
            raise DecodeConfigError("trace", f"must be true or false, got {self.trace!r}")

    # ---- construction helpers -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "decode config") -> DecodeConfig:
        """From a mapping (a JSON file, request body); unknown keys are an error naming ``where``."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise DecodeConfigError(unknown[0], f"unknown field in {where}; known fields: "
                                    f"{', '.join(cls.field_names())}")
        return cls(**dict(d))

    def replace(self, **overrides: Any) -> DecodeConfig:
        """A validated copy with ``overrides`` (old keyword names accepted, unknown ones a TypeError)."""
        kw = {ALIASES.get(k, k): v for k, v in overrides.items()}
        unknown = sorted(set(kw) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown decode option(s) {unknown}; DecodeConfig fields: "
                            f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **kw)

    def resolve(self, model_config: Any, default_dtype: Any = None) -> DecodeConfig:
        """Fill ``mask_id``/``eos_id`` from the model config and ``dtype`` from ``default_dtype``."""
        mask = model_config.resolved_mask_token_id if self.mask_id is None else self.mask_id
        eos = model_config.eos_token_id if self.eos_id is None else self.eos_id
        if eos is None:
            raise DecodeConfigError("eos_id", "not set and the model config has no eos_token_id")
        dtype = self.dtype
        if dtype is None:
            dtype = "float32" if default_dtype is None else _dtype_name(default_dtype)
        return dataclasses.replace(self, mask_id=int(mask), eos_id=int(eos), dtype=dtype)

    # ---- the split ------------------------------------------------------------------------------
    def step_count(self) -> int:
        """Forwards per block of this request (the runtime value ``RowParams.steps``)."""
        if self.strategy == "threshold":
            from dmax_jax.decoding.strategies import threshold_max_forwards

            return threshold_max_forwards(self.block_length, self.expected_tpf, self.max_unroll)
        n = self.block_length if self.steps is None else int(self.steps)
        return min(n, self.gen_length) if self.strategy == "llada2" else n

    def static_part(self) -> DecodeStatic:
        """The compile-key part (needs :meth:`resolve` first: mask id and dtype are static)."""
        if self.mask_id is None or self.dtype is None:
            raise ValueError("DecodeConfig.static_part needs mask_id and dtype: call resolve(model_config)")
        n = self.step_count()
        max_steps = n if self.strategy == "threshold" else max(self.block_length, n)
        return DecodeStatic(strategy=self.strategy, block_length=self.block_length, mask_id=self.mask_id,
                            greedy=self.temperature == 0, max_steps=max_steps, top_k=self.top_k,
                            max_unroll=self.max_unroll, expected_tpf=self.expected_tpf,
                            soft_impl=self.soft_impl, dtype=self.dtype, trace=self.trace)

    def row_params(self, prompt_lens: Sequence[int], request_ids: Sequence[int]) -> RowParams:
        """The traced values, one entry per row (NumPy; ``jax.tree.map`` them onto devices as needed)."""
        if self.eos_id is None:
            raise ValueError("DecodeConfig.row_params needs eos_id: call resolve(model_config)")
        b = len(prompt_lens)

        def full(v, dt):
            return np.full((b,), v, dt)

        return RowParams(prompt_lens=np.asarray(prompt_lens, np.int32),
                         request_ids=np.asarray(request_ids, np.int32),
                         gen_length=full(self.gen_length, np.int32), eos_id=full(self.eos_id, np.int32),
                         seed=full(self.seed, np.int32), threshold=full(self.threshold, np.float32),
                         accept_threshold=full(self.accept_threshold, np.float32),
                         temperature=full(self.temperature if self.temperature > 0 else 1.0, np.float32),
                         steps=full(self.step_count(), np.int32))

    def split(self, prompt_lens: Sequence[int], request_ids: Sequence[int]) -> tuple[DecodeStatic, RowParams]:
        """``(static_part(), row_params(...))`` of a resolved config."""
        return self.static_part(), self.row_params(prompt_lens, request_ids)
