"""ModelConfig: the LLaDA2-MoE hyper-parameters, read from and written back to an HF ``config.json``.

Why a frozen dataclass plus the raw dict: the typed fields drive the model, while ``raw`` keeps every
key of the original file (``auto_map``, ``architectures``, unknown extras) so that saving writes the
config back unchanged (algorithm §1.1).

Why a strict reader: a config.json that omits a field which changes the numbers must not be completed
with LLaDA2.0-mini's value (a missing ``rope_theta`` once decoded garbage with exit status 0). A key
may be absent only if it is in :data:`HF_DEFAULTS`, the defaults of inclusionAI's own
``LLaDA2MoeConfig`` / modeling code, i.e. what ``transformers`` would use for that file too; every
other field the model reads is required (:func:`required_fields`). The dataclass defaults (LLaDA2.0-mini,
algorithm §1.1) serve Python construction only (``ModelConfig(...)``, presets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llada2_moe", "llada2_moe_veomni")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # parameter / compute dtypes every CLI accepts

# Algorithm §0: LLaDA2.0-mini special ids (used when neither config nor tokenizer says otherwise).
LLADA2_MASK_ID = 156895
LLADA2_EOS_ID = 156892


class ModelConfigError(ValueError):
    """A model config that cannot describe a valid LLaDA2-MoE; the message names the file and field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelConfigNotFoundError(ModelConfigError, FileNotFoundError):
    """No config.json where one was expected."""


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


# Defaults of inclusionAI's LLaDA2MoeConfig.__init__ and its modeling code (the HF remote code), used
# when config.json omits the key. ``use_bias`` really defaults to True there (a bias-free checkpoint must
# say ``false``); the modeling code always has an expert_bias, computes sigmoid scores in fp32 and ignores
# ``norm_topk_prob``. ``head_dim`` defaults to hidden_size // num_attention_heads (see from_hf_dict).
# Two entries are not numerics: absent token ids are *unknown* (None; data/chat.resolve_special_ids asks
# the tokenizer) rather than HF's pad 126081, and ``torch_dtype`` only labels the saved weights.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu", "use_qkv_bias": False, "use_bias": True, "tie_word_embeddings": False,
    "max_position_embeddings": 16384, "rope_scaling": None, "partial_rotary_factor": 0.5, "rotary_dim": None,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "score_function": "sigmoid",
    "router_dtype": "fp32", "moe_router_enable_expert_bias": True, "norm_topk_prob": True,
    "pad_token_id": None, "eos_token_id": None, "mask_token_id": None, "torch_dtype": "bfloat16",
}
# Required although HF's class has a default: that default differs from every released LLaDA2 model
# (rope_theta 10000 vs 600000, rms_norm_eps 1e-5 vs 1e-6, vocab 30592, hidden 1024, 16 experts, ...).
_ALWAYS_REQUIRED = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "rms_norm_eps", "rope_theta", "num_experts")
_MOE_REQUIRED = ("first_k_dense_replace", "moe_intermediate_size", "num_experts_per_tok",
                 "num_shared_experts")

_KINDS = {  # JSON kind of each field; "?" = null allowed
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                     "first_k_dense_replace", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                     "num_shared_experts", "n_group", "topk_group"), "int"),
    **dict.fromkeys(("rotary_dim", "pad_token_id", "eos_token_id", "mask_token_id"), "int?"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "partial_rotary_factor", "routed_scaling_factor"),
                    "float"),
    **dict.fromkeys(("use_qkv_bias", "use_bias", "tie_word_embeddings", "moe_router_enable_expert_bias",
                     "norm_topk_prob"), "bool"),
    **dict.fromkeys(("hidden_act", "score_function", "router_dtype", "model_type", "torch_dtype"), "str"),
    "rope_scaling": "dict?",
}
_KIND_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "dict": "an object"}


def _show(value: Any, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error line must stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind_ok(kind: str, value: Any) -> bool:
    if value is None:
        return kind.endswith("?")
    base = kind.rstrip("?")
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, {"bool": bool, "str": str, "dict": dict}[base])


def required_fields(d: dict) -> tuple[str, ...]:
    """Keys a config.json ``d`` must contain: the always-required ones, the MoE shapes when it has
    experts, ``intermediate_size`` when it has a dense layer."""
    need = list(_ALWAYS_REQUIRED)
    experts = d.get("num_experts")
    moe = _kind_ok("int", experts) and experts > 0
    if moe:
        need += _MOE_REQUIRED
    first_dense = d.get("first_k_dense_replace")
    if not moe or not _kind_ok("int", first_dense) or first_dense > 0:  # unknown first_k: needed too
        need.append("intermediate_size")
    return tuple(need)


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
        """Number of leading head dims that are rotated (algorithm §1.2: int(D * partial_rotary_factor))."""
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
        """``mask_token_id``, else the LLaDA2 id 156895 (algorithm §0) when the vocabulary contains it."""
        if self.mask_token_id is not None:
            return int(self.mask_token_id)
        if LLADA2_MASK_ID >= self.vocab_size:
            raise ModelConfigError(f"config has no `mask_token_id` and the LLaDA2 mask id {LLADA2_MASK_ID} "
                                   f"is outside its vocabulary [0, {self.vocab_size})", "mask_token_id")
        return LLADA2_MASK_ID

    # ---- validation ----------------------------------------------------------------------------
    def validate(self, where: str = "ModelConfig") -> None:
        """Types first (so later checks compare numbers), then ranges and the combinations the model
        needs; raises :class:`ModelConfigError` naming ``where`` and the field."""
        def bad(field: str, why: str) -> None:
            raise ModelConfigError(f"{where}: `{field}` {why}", field)

        for field, kind in _KINDS.items():
            value = getattr(self, field)
            if not _kind_ok(kind, value):
                bad(field, f"must be {_KIND_WORDS[kind.rstrip('?')]}{' or null' * kind.endswith('?')}, "
                    f"got {_show(value)}")
        self._validate_attention(bad)
        self._validate_ffn(bad)
        for f in ("pad_token_id", "eos_token_id", "mask_token_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(f, f"= {_show(v)} is outside the vocabulary [0, {_show(self.vocab_size)})")

    def _validate_attention(self, bad: Any) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            bad("model_type", f"= {_show(self.model_type)} is not one of {SUPPORTED_MODEL_TYPES}")
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                bad(f, f"must be positive, got {_show(getattr(self, f))}")
        for f in ("rms_norm_eps", "rope_theta"):
            if getattr(self, f) <= 0:
                bad(f, f"must be > 0, got {_show(getattr(self, f))}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"= {_show(self.num_attention_heads)} is not divisible by "
                f"num_key_value_heads = {_show(self.num_key_value_heads)}")
        if self.rotary_dim is None and not 0 < self.partial_rotary_factor <= 1:
            bad("partial_rotary_factor", f"must be in (0, 1], got {_show(self.partial_rotary_factor)}")
        r, name = self.rope_dim, "rotary_dim" if self.rotary_dim is not None else "partial_rotary_factor"
        if r % 2 or r <= 0 or r > self.head_dim:
            bad(name, f"gives {_show(r)} rotated dims; they must be even, positive and <= head_dim "
                f"{_show(self.head_dim)}")
        if self.hidden_act != "silu":
            bad("hidden_act", f"= {_show(self.hidden_act)}: only 'silu' is implemented")
        for f in ("use_bias", "use_qkv_bias"):
            if getattr(self, f):
                bad(f, "= true: biases are not used by LLaDA2-MoE checkpoints and not implemented")
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("type", scaling.get("rope_type", "default"))
        if rope_type != "default":
            bad("rope_scaling", f"= {_show(self.rope_scaling)} is not supported (only default RoPE)")

    def _validate_ffn(self, bad: Any) -> None:
        if self.num_experts < 0:
            bad("num_experts", f"must be >= 0, got {_show(self.num_experts)}")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", f"must be >= 0, got {_show(self.first_k_dense_replace)}")
        if self.num_dense_layers > 0 and self.intermediate_size <= 0:
            bad("intermediate_size", f"must be positive (dense layers exist), got "
                f"{_show(self.intermediate_size)}")
        if self.num_moe_layers == 0:
            return
        E, G, K = self.num_experts, self.n_group, self.num_experts_per_tok
        if self.score_function != "sigmoid":
            bad("score_function", f"= {_show(self.score_function)}: only 'sigmoid' is implemented")
        if self.router_dtype not in ("fp32", "float32"):
            bad("router_dtype", f"= {_show(self.router_dtype)}: only 'fp32' is implemented")
        if self.moe_intermediate_size <= 0:
            bad("moe_intermediate_size", f"must be positive, got {_show(self.moe_intermediate_size)}")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", f"must be > 0, got {_show(self.routed_scaling_factor)}")
        if G <= 0:
            bad("n_group", f"must be positive, got {_show(G)}")
        if E % G:
            bad("num_experts", f"= {_show(E)} is not divisible by n_group = {_show(G)}")
        if not 0 < self.topk_group <= G:
            bad("topk_group", f"= {_show(self.topk_group)} must be in 1..n_group = {_show(G)}")
        if E // G < 2 and G > 1:
            bad("n_group", f"= {G} leaves {E // G} expert per group; the top-2 group score needs >= 2")
        if not 0 < K <= (E // G) * self.topk_group:
            bad("num_experts_per_tok", f"= {_show(K)} must be in 1..experts in the kept groups "
                f"({(E // G) * self.topk_group})")
        if self.num_shared_experts < 0:
            bad("num_shared_experts", f"must be >= 0, got {_show(self.num_shared_experts)}")

    # ---- HF interop ----------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Read a config.json dict strictly (module docstring); errors name ``source`` and the field."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"{source} must hold a JSON object, got {type(d).__name__}")
        missing = [k for k in required_fields(d) if k not in d]
        if missing:
            names = ", ".join(f"`{k}`" for k in missing)
            unknown = [k for k in d if k not in _KINDS]
            hints = [f"`{m[0]}`" for k in missing if (m := difflib.get_close_matches(k, unknown, 1, 0.8))]
            hint = f" (it has {', '.join(hints)}: a typo?)" if hints else ""
            raise ModelConfigError(f"{source} has no {names}{hint}", missing[0])
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kw = {k: d[k] for k in names if k in d}
        defaulted = {k: v for k, v in HF_DEFAULTS.items() if k not in kw}
        if "torch_dtype" not in kw and isinstance(d.get("dtype"), str):
            kw["torch_dtype"] = d["dtype"]
            defaulted.pop("torch_dtype")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        if "head_dim" not in kw and _kind_ok("int", hidden) and _kind_ok("int", heads) and heads > 0:
            defaulted["head_dim"] = hidden // heads
        eos = kw.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            kw["eos_token_id"] = eos[0] if eos else None
        try:
            return cls(**{**defaulted, **kw}, raw=dict(d))
        except ModelConfigError as e:
            where_from = (f" (`{e.field}` is not in {source}: the HF default {defaulted[e.field]!r} was used)"
                          if e.field in defaulted else "")
            msg = str(e).replace("ModelConfig: ", f"{source}: ", 1)
            raise ModelConfigError(msg + where_from, e.field) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read ``path`` (a config.json, or a directory holding one)."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, "config.json")
        if not os.path.isfile(p):
            raise ModelConfigNotFoundError(f"no config.json at {p}")
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{p} is not valid JSON: {e}") from None
        except OSError as e:
            raise ModelConfigError(f"cannot read {p}: {e.strerror}") from None
        return cls.from_hf_dict(d, source=p)

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
    """LLaDA2.0-mini / DMax-16B shapes (algorithm §1.1)."""
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
