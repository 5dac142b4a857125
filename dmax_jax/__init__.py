"""dmax-jax: DMax (On-Policy Uniform Training + Soft Parallel Decoding) for LLaDA2-MoE in JAX.

Public API (documented in the README):
- ``load_pretrained(path, dtype="float32") -> Pretrained`` (``.config``, ``.params``, ``.tokenizer``,
  ``.forward(...)``, ``.save_pretrained(path)``)
- ``generate(pretrained, prompt_ids, config: DecodeConfig | None = None, **overrides) -> GenerateResult``
- ``DecodeConfig`` (every decode knob, validated; ``DecodeConfigError`` names the bad field)
- ``ModelConfig``, ``MaskSpec``
"""

from dmax_jax.config import ModelConfig
from dmax_jax.model.masks import MaskSpec
from dmax_jax.pretrained import Pretrained, load_pretrained

_DECODING = ("generate", "GenerateResult", "DecodeConfig", "DecodeConfigError")
__all__ = ["ModelConfig", "MaskSpec", "Pretrained", "load_pretrained", *_DECODING]


def __getattr__(name):  # decoding is imported lazily: it pulls in kernels and is not needed to load
    if name in _DECODING:
        from dmax_jax import decoding

        return getattr(decoding, name)
    raise AttributeError(f"module 'dmax_jax' has no attribute {name!r}")
