"""ModelConfig: the LLaDA2-MoE hyper-parameters, read from and written back to an HF ``config.json``.

Why a frozen dataclass plus the raw dict: the typed fields drive the model, while ``raw`` keeps every
key of the original file (``auto_map``, ``architectures``, unknown extras) so that saving writes the
config back unchanged (spec §1.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llada2_moe", "llada2_moe_veomni")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # parameter / compute dtypes every CLI accepts

# Spec §0: LLaDA2.0-mini special ids (used when neither config nor tokenizer says otherwise).
LLADA2_MASK_ID = 156895
LLADA2_EOS_ID = 156892


class ModelConfigError(ValueError):
    """A model config that cannot describe a valid LLaDA2-MoE; the message names the field."""


class DtypeError(ValueError):
    """A dtype name outside :data:`DTYPE_NAMES`; the message lists the allowed names."""


def parse_dtype(name: Any, what: str = "dtype") -> jnp.dtype:
    """``"bfloat16"`` → ``jnp.dtype``; anything but float32/bfloat16/float16 (a name or a dtype
    object) raises :class:`DtypeError` naming ``what`` (e.g. ``"--dtype"``) and the allowed names."""
    key = name if isinstance(name, str) else repr(name)
    if name is not None and not isinstance(name, str):
        with contextlib.suppress(TypeError):
            key = jnp.dtype(name).name
    if key not in DTYPE_NAMES:
        raise DtypeError(f"{what}: {key!r} is not one of {', '.join(DTYPE_NAMES)}")
    return jnp.dtype(key)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 16384
    rope_theta: float = 600000.0
    rope_scaling: Any = None
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    router_dtype: str = "fp32"
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    pad_token_id: int | None = LLADA2_EOS_ID
    eos_token_id: int | None = LLADA2_EOS_ID
    mask_token_id: int | None = None
    model_type: str = "llada2_moe"
    torch_dtype: str = "bfloat16"
    raw: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def rope_dim(self) -> int:
        """Number of leading head dims that are rotated (spec §1.2: int(D * partial_rotary_factor))."""
        if self.rotary_dim is not None:
            return int(self.rotary_dim)
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def num_dense_layers(self) -> int:
        if self.num_experts in (None, 0):
            return self.num_hidden_layers
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def resolved_mask_token_id(self) -> int:
        return LLADA2_MASK_ID if self.mask_token_id is None else int(self.mask_token_id)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ModelConfigError(f"config field {field!r}: {why}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", f"{self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
            if int(getattr(self, f)) <= 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} not divisible by num_key_value_heads "
                f"{self.num_key_value_heads}")
        r = self.rope_dim
        if r % 2 or r <= 0 or r > self.head_dim:
            bad("rotary_dim", f"{r} must be even, positive and <= head_dim {self.head_dim}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' is implemented, got {self.hidden_act!r}")
        if self.use_bias or self.use_qkv_bias:
            bad("use_bias/use_qkv_bias", "biases are not used by LLaDA2-MoE checkpoints and not implemented")
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("type", scaling.get("rope_type", "default"))
        if rope_type != "default":
            bad("rope_scaling", f"{self.rope_scaling!r} not supported (only default RoPE)")
        if not 0 <= self.first_k_dense_replace:
            bad("first_k_dense_replace", "must be >= 0")
        if self.num_dense_layers > 0 and self.intermediate_size <= 0:
            bad("intermediate_size", "must be positive when dense layers exist")
        if self.num_moe_layers > 0:
            E, G, K = self.num_experts, self.n_group, self.num_experts_per_tok
            if self.score_function != "sigmoid":
                bad("score_function", f"only 'sigmoid' is implemented, got {self.score_function!r}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be positive")
            if G <= 0 or E % G:
                bad("num_experts", f"{E} not divisible by n_group {G}")
            if not 0 < self.topk_group <= G:
                bad("topk_group", f"{self.topk_group} must be in 1..n_group={G}")
            if E // G < 2 and G > 1:
                bad("n_group", f"each group needs >= 2 experts for the top-2 group score (E/G = {E // G})")
            if not 0 < K <= (E // G) * self.topk_group:
                bad("num_experts_per_tok", f"{K} must be in 1..experts in kept groups "
                    f"({(E // G) * self.topk_group})")
            if self.num_shared_experts < 0:
                bad("num_shared_experts", "must be >= 0")
        for f in ("pad_token_id", "eos_token_id", "mask_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= int(v) < self.vocab_size:
                bad(f, f"{v} outside the vocabulary [0, {self.vocab_size})")

    # ---- HF interop ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kw = {k: d[k] for k in names if k in d}
        if "model_type" not in d:
            raise ModelConfigError("config field 'model_type' is missing")
        for tid in ("pad_token_id", "eos_token_id"):  # absent means unknown, not the LLaDA2 default
            kw.setdefault(tid, None)
        eos = kw.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            kw["eos_token_id"] = eos[0] if eos else None
        if "torch_dtype" not in kw and isinstance(d.get("dtype"), str):
            kw["torch_dtype"] = d["dtype"]
        return cls(**kw, raw=dict(d))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.exists(p):
            raise FileNotFoundError(f"no config.json at {p}")
        with open(p) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelConfigError(f"{p} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        """The original config.json keys unchanged, plus our typed fields for keys it lacked."""
        out = dict(self.raw)
        for f in dataclasses.fields(self):
            if f.name == "raw" or f.name in out:
                continue
            if f.name in ("mask_token_id", "rotary_dim") and getattr(self, f.name) is None:
                continue
            out[f.name] = getattr(self, f.name)
        out.setdefault("architectures", ["LLaDA2MoeModelLM"])
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=False)

    def replace(self, **kw: Any) -> ModelConfig:
        raw = dict(self.raw)
        for k, v in kw.items():
            if k in raw:
                raw[k] = v
        return dataclasses.replace(self, **kw, raw=raw)


def llada2_mini_config() -> ModelConfig:
    """LLaDA2.0-mini / DMax-16B shapes (spec §1.1)."""
    return ModelConfig(model_type="llada2_moe")


def tiny_config(**overrides: Any) -> ModelConfig:
    """A few-hundred-KB config for tests: 3 layers (1 dense + 2 MoE), 8 experts in 4 groups."""
    base = dict(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, first_k_dense_replace=1,
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_shared_experts=1,
        n_group=4, topk_group=2, max_position_embeddings=4096, rope_theta=10000.0,
        pad_token_id=1, eos_token_id=1, mask_token_id=2, model_type="llada2_moe", torch_dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


PRESETS = {"llada2_mini": llada2_mini_config, "dmax_16b": llada2_mini_config, "tiny": tiny_config}
