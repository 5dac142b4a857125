"""``Pretrained``: an HF directory loaded as (config, params, tokenizer) with a plain forward and save.

The small object users and our parity checks hold on to; everything heavy lives in the modules it
calls (checkpoint/hf.py for I/O, model/llada2.py for the network, data/chat.py for the tokenizer).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmax_jax.config import ModelConfig, parse_dtype
from dmax_jax.data.chat import TOKENIZER_FILES
from dmax_jax.model.llada2 import forward_jit
from dmax_jax.model.masks import MASK_KINDS, MaskSpec, default_positions


@dataclasses.dataclass
class Pretrained:
    config: ModelConfig
    params: Any
    tokenizer: Any | None = None
    path: str | None = None
    compute_dtype: Any = jnp.float32

    def forward(self, input_ids=None, *, inputs_embeds=None, position_ids=None, mask: str = "full",
                block_length: int = 32) -> jax.Array:
        """float32 logits ``[batch, length, vocab]``. For ``noisy_clean`` the input is the
        concatenation ``[noisy | clean]`` and position ids default to ``[0..L-1, 0..L-1]``."""
        if mask not in MASK_KINDS:
            raise ValueError(f"mask {mask!r} is not one of {MASK_KINDS}")
        spec = MaskSpec(mask, block_length)
        if input_ids is not None:
            input_ids = jnp.atleast_2d(jnp.asarray(input_ids, jnp.int32))
            length = input_ids.shape[1]
            if int(jnp.max(input_ids)) >= self.config.vocab_size or int(jnp.min(input_ids)) < 0:
                raise ValueError(f"input_ids outside the vocabulary [0, {self.config.vocab_size})")
        elif inputs_embeds is not None:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim == 2:
                inputs_embeds = inputs_embeds[None]
            length = inputs_embeds.shape[1]
        else:
            raise ValueError("pass input_ids or inputs_embeds")
        if position_ids is None:
            position_ids = default_positions(spec, length)
        position_ids = jnp.asarray(position_ids, jnp.int32)
        if int(jnp.max(position_ids)) >= self.config.max_position_embeddings:
            raise ValueError(f"position id {int(jnp.max(position_ids))} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        logits, _ = forward_jit(self.params, self.config, input_ids, inputs_embeds=inputs_embeds,
                                positions=position_ids, mask=spec, dtype=self.compute_dtype)
        return logits

    def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write the split-expert HF layout + config.json (+ the tokenizer files, if loaded)."""
        from dmax_jax.checkpoint.hf import save_hf_params

        save_hf_params(self.params, self.config, path, overwrite=overwrite)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(os.fspath(path))


def check_model_dir(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a directory with a config.json, else one-line
    ``CheckpointNotFoundError`` (absent, not a directory, empty, no config.json). Cheap: CLIs call
    it before reading anything large."""
    from dmax_jax.checkpoint.hf import CheckpointNotFoundError

    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise CheckpointNotFoundError(f"model path {p} is not a directory")
    if not any(p.iterdir()):
        raise CheckpointNotFoundError(f"model directory {p} is empty (expected config.json, *.safetensors)")
    if not (p / "config.json").is_file():
        raise CheckpointNotFoundError(f"model directory {p} has no config.json")
    return p


def load_pretrained(path: str | os.PathLike, dtype: str = "float32", *, compute_dtype: str | None = None,
                    shardings: Any = None) -> Pretrained:
    """Load an HF directory (config.json + safetensors [+ tokenizer]) into a ``Pretrained``.

    ``dtype`` is the parameter dtype; computation runs in ``compute_dtype`` (default: ``dtype``). A
    missing or empty directory, a missing config.json or missing safetensors raise one
    ``CheckpointNotFoundError`` line naming the directory; a bad config.json a ``ModelConfigError``; a
    non-finite weight a ``CheckpointError`` naming the tensor; a tokenizer that cannot be read or does
    not fit ``vocab_size`` / the special ids a ``TokenizerError`` naming the folder (and file).
    """
    from dmax_jax.checkpoint.hf import load_hf_params
    from dmax_jax.data.chat import check_tokenizer_fits, load_tokenizer

    param_dtype = parse_dtype(dtype, "dtype")
    run_dtype = param_dtype if compute_dtype is None else parse_dtype(compute_dtype, "compute_dtype")
    p = check_model_dir(path)
    config = ModelConfig.from_json(p)
    tokenizer = load_tokenizer(p) if any((p / f).exists() for f in TOKENIZER_FILES) else None
    if tokenizer is not None:      # checked before the (large) weights are read
        check_tokenizer_fits(config, tokenizer, f"model directory {p}")
    params = load_hf_params(p, config, dtype=np.dtype(param_dtype), shardings=shardings)
    return Pretrained(config, params, tokenizer, os.fspath(p), run_dtype)
