"""The chain of decode settings, host to device: ``DecodeConfig`` → ``RowParams`` → ``ProgramSpec``.

    DecodeConfig   host, one per request, validated at construction (every knob; what callers build)
        │  .row_params(prompt_lens, request_ids)
        ▼
    RowParams      device, traced, one entry per row: changing a value never recompiles
        │  .program_spec(platform, capacity=..)   (generate)    program.engine_spec(..)   (Engine)
        ▼
    ProgramSpec    static, hashable: the compile key of a decode program (with the model config and
                   the argument shapes); carries the target platform of every per-platform choice

Why one chain: ``generate``, ``decode.py``, the eval CLI, the demo and the server all take the same
knobs; validating them in one place means a bad value (τ = 1.5, ``dtype="float8"``) gets the same
``DecodeConfigError`` naming the field and its allowed range everywhere, before anything compiles.

``gen_length`` rule: any positive length. Blocks are aligned to multiples of ``block_length`` from
``s0 = B·floor(P/B)`` (algorithm §5.1), so the last block may reach past ``P + gen_length``; those
positions are decoded with their block (they are in its bidirectional attention) but never
returned: a result holds at most ``gen_length`` tokens, as the LLaDA2 HF ``generate`` returns
``x[P : P + gen_length]`` (algorithm §5.5b) and as dInfer's eval, whose bucketed ``G`` makes ``P + G`` a
block multiple (algorithm §5.1), never decodes past ``P + G``. TPF counts the returned region only.
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

from dmax_jax.config import DTYPE_NAMES
from dmax_jax.decoding.strategies import threshold_max_forwards
from dmax_jax.model.quant import WEIGHT_MODES

STRATEGIES = ("spd", "threshold", "llada2")
# The knobs a request may set on its own (traced, per row); every other field is a program setting.
PER_REQUEST = ("strategy", "gen_length", "threshold", "accept_threshold", "steps", "temperature", "top_p",
               "sample_top_k", "seed")
SOFT_IMPLS = ("auto", "pallas", "xla")
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


@flax.struct.dataclass
class RowParams:
    """Traced per-row values of a decode program, each ``[batch]``; changing them never recompiles,
    and every row of a batch may carry its own.

    Args:
        prompt_lens: int32 real prompt length.
        request_ids: int32 sampling stream of the row (``fold_in``), independent of the batch.
        gen_length: int32 tokens asked for (the result is cut to it).
        eos_id: int32 EOS id.
        seed: int32 sampling seed.
        threshold: f32 τ_dec (spd) / τ (threshold, llada2).
        accept_threshold: f32 τ_acc (spd).
        temperature: f32; 0 = a greedy row (also inside a sampling program).
        top_p: f32 nucleus mass of a sampled row (1: off).
        top_k: int32 most likely tokens a sampled row draws from (0: off).
        steps: int32 forwards per block (spd cap, llada2 steps, threshold's bound).
    """

    prompt_lens: jax.Array
    request_ids: jax.Array
    gen_length: jax.Array
    eos_id: jax.Array
    seed: jax.Array
    threshold: jax.Array
    accept_threshold: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    steps: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Knobs of one decode request; invalid values raise :class:`DecodeConfigError` at construction.

    Args:
        strategy: ``spd`` (Soft Parallel Decoding, algorithm §5.2), ``threshold`` (dInfer threshold
            decoding, §5.5a) or ``llada2`` (the LLaDA2 HF ``generate`` schedule, §5.5b).
        block_length: tokens per block (B).
        gen_length: at most this many tokens come back (module doc).
        threshold: τ_dec of spd / τ of threshold and llada2, in [0, 1].
        accept_threshold: τ_acc of spd's convergence test, in [0, 1].
        steps: spd's forward cap per block / llada2's refinement steps per block (None: block_length;
            llada2 caps it at gen_length); threshold takes none.
        temperature: 0 = argmax; above 0 the row samples (Gumbel-max with its own keys).
        top_p: a sampled row draws from the smallest set of most likely tokens whose probability
            reaches ``top_p`` (after temperature and ``sample_top_k``; 1 = off), in (0, 1].
        sample_top_k: a sampled row draws from its ``sample_top_k`` most likely tokens (0 = off); the
            request field ``top_k`` (not SPD's soft mixing width ``top_k``). Both filters follow
            LLaDA2's ``_sample_with_temperature_topk_topp`` (``decoding.strategies.filter_logits``);
            at temperature 0 they change nothing (the argmax survives both).
        seed: int32 sampling seed; keys are ``fold_in(fold_in(key(seed), request id), forward)``.
        top_k: spd's soft-embedding mixing over the top k predictions (spd only).
        soft_impl: soft-embedding kernel: ``auto`` | ``pallas`` | ``xla``.
        dtype: compute dtype name (None: the model's compute dtype).
        weights: ``native`` (the params as loaded) | ``int8`` (weight-only int8, per-channel scales,
            ``model/quant.py``; ``generate`` quantizes native params on each call: quantize once
            with ``quantize_model`` when calling it in a loop; the engine quantizes at construction).
        max_unroll: threshold decoding's forwards per progress check at most.
        expected_tpf: threshold decoding's expected tokens per forward (unrolling rule).
        prompt_bucket: prompt padding multiple of ``generate`` (None: ``max(128, block_length)``
            rounded to the block).
        mask_id: the [MASK] id (None: the model config's).
        eos_id: the EOS id (None: the model config's).
        trace: record every step for the HTML viewer.
    """

    strategy: str = "spd"
    block_length: int = 32
    gen_length: int = 256
    threshold: float = 0.5
    accept_threshold: float = 0.9
    steps: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    sample_top_k: int = 0
    seed: int = 0
    top_k: int = 1
    soft_impl: str = "auto"
    dtype: str | None = None
    weights: str = "native"
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
        _real("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0:
            raise DecodeConfigError("top_p", "must be in (0, 1], got 0")
        _int("sample_top_k", self.sample_top_k, 0)
        _int("seed", self.seed, INT32_MIN)
        _int("top_k", self.top_k, 1)
        _choice("soft_impl", self.soft_impl, SOFT_IMPLS)
        if self.dtype is not None:
            _choice("dtype", self.dtype, DTYPE_NAMES)
        _choice("weights", self.weights, WEIGHT_MODES)
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


    # ---- the chain: per-row device values and the static program spec ------------------------------
    def step_count(self) -> int:
        """Forwards per block of this request (the runtime value ``RowParams.steps``)."""
        if self.strategy == "threshold":
            return threshold_max_forwards(self.block_length, self.expected_tpf, self.max_unroll)
        n = self.block_length if self.steps is None else int(self.steps)
        return min(n, self.gen_length) if self.strategy == "llada2" else n

    def max_steps(self) -> int:
        """Static bound on forwards per block (the step loop's trip count and trace depth)."""
        n = self.step_count()
        return n if self.strategy == "threshold" else max(self.block_length, n)

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
                         temperature=full(self.temperature, np.float32),
                         top_p=full(self.top_p, np.float32), top_k=full(self.sample_top_k, np.int32),
                         steps=full(self.step_count(), np.int32))

    def program_spec(self, platform: str, *, capacity: int, prompt_len: int = 0) -> ProgramSpec:
        """``generate``'s compile key for this (resolved) config: one strategy, greedy or sampling
        decided by ``temperature``, rows of ``capacity`` positions, a ``prompt_len`` prompt bucket."""
        if self.mask_id is None or self.dtype is None:
            raise ValueError("DecodeConfig.program_spec needs mask_id and dtype: call resolve(model_config)")
        return ProgramSpec(strategies=(self.strategy,), block_length=self.block_length, mask_id=self.mask_id,
                           max_steps=(self.max_steps(),), greedy=self.temperature == 0, top_k=self.top_k,
                           max_unroll=self.max_unroll, expected_tpf=self.expected_tpf,
                           soft_impl=self.soft_impl, dtype=self.dtype, platform=platform, capacity=capacity,
                           trace=self.trace, prompt_len=prompt_len)


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything static about one compiled decode program (hashable: the compile key, with the model
    config and the argument shapes). ``generate`` builds it with :meth:`DecodeConfig.program_spec`,
    the engine with ``serving.program.engine_spec``; the block step (``decoding.block``) reads it.

    Args:
        strategies: the step rules the program runs (``generate``: one; the engine: those it serves).
        block_length: tokens per block (B).
        mask_id: the [MASK] token id.
        max_steps: per strategy, the static bound on forwards per block.
        greedy: True: argmax program; False: sampling program (rows at temperature 0 still take the
            argmax); None: chosen per call from the rows' temperatures (the engine).
        top_k: SPD's soft-embedding mixing width.
        max_unroll: threshold decoding's forwards per progress check at most.
        expected_tpf: threshold decoding's expected tokens per forward (unrolling rule).
        soft_impl: soft-embedding kernel (``auto`` | ``pallas`` | ``xla``).
        dtype: compute dtype name (KV cache too).
        platform: the platform the program is compiled for (``dmax_jax.platforms.platform_of`` the
            parameters), passed to every model forward and soft-embedding call.
        capacity: positions per row that may hold valid tokens (KV-cache slots attention reads).
        trace: record confidences and trace states of every step (``generate(trace=True)``).
        snapshots: record the block after every forward (the engine's provisional snapshots).
        prompt_len: ``generate``: the padded prompt bucket.
        prefill_chunk: the engine: prompt tokens per prefill entry (a multiple of B).
        prefill_batch: the engine: prompt chunks per prefill call at most.
        exit_factor: the engine: a round's step loop ends once at most ``1/exit_factor`` of its rows
            are live (0: every block runs to its end, as in ``generate``).
        compact: forwards run for the rows that need them only (``decoding.compact``).
    """

    strategies: tuple[str, ...]
    block_length: int
    mask_id: int
    max_steps: tuple[int, ...]
    greedy: bool | None
    top_k: int
    max_unroll: int
    expected_tpf: int
    soft_impl: str
    dtype: str
    platform: str
    capacity: int
    trace: bool = False
    snapshots: bool = False
    prompt_len: int = 0
    prefill_chunk: int = 0
    prefill_batch: int = 0
    exit_factor: int = 0
    compact: bool = False

    def steps_of(self, strategy: str) -> int:
        """The static forward bound of ``strategy``'s step loop."""
        return self.max_steps[self.strategies.index(strategy)]

    @property
    def record_steps(self) -> int:
        """Depth of a block's step record: the largest bound of the program's strategies."""
        return max(self.max_steps)

    @property
    def max_blocks(self) -> int:
        return self.capacity // self.block_length

    @property
    def row_len(self) -> int:
        """Positions of a token / cache row: ``capacity`` plus, in the engine, scratch columns (the
        K/V a cross forward of a row that does not cross writes; an overhanging prefill chunk)."""
        if not self.prefill_chunk:
            return self.capacity
        return self.capacity + max(2 * self.block_length, self.prefill_chunk)

