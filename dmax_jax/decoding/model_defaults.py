"""``dmax_decode.json``: the prompt format and decode defaults that travel with a model directory.

Why: a model is trained on one prompt format and decodes well at some settings (the shipped demo
models: ``Question: …\\nLet's think step by step\\nAnswer:`` inside the chat template, gen 64,
float32); when those live in demo code, ``decode.py --model DIR --prompt …`` silently decodes
something else. The file is optional (an HF checkpoint has none: then nothing is wrapped and the
command's own defaults apply); when present every key is checked. Format (docs/internals.md)::

    {
      "format": "dmax_decode/1",
      "prompt_template": "Question: {prompt}\\nLet's think step by step\\nAnswer:",
      "chat": true,
      "decode": {"strategy": "spd", "gen_length": 64, "threshold": 0.5, "dtype": "float32"},
      "strategies": {"threshold": {"threshold": 0.95}}
    }

``prompt_template`` holds ``{prompt}`` exactly once (plain substitution, no other braces are
interpreted); ``chat`` says whether the wrapped prompt goes through the tokenizer's chat template;
``decode`` holds DecodeConfig fields; ``strategies`` per-strategy overrides applied when that
strategy is chosen. Layering: DecodeConfig defaults < ``decode`` < ``strategies[strategy]`` < flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dmax_jax.decoding.config import STRATEGIES, DecodeConfig, DecodeConfigError

FILE_NAME = "dmax_decode.json"
FORMAT = "dmax_decode/1"
PLACEHOLDER = "{prompt}"
_KEYS = ("format", "prompt_template", "chat", "decode", "strategies")


class ModelDefaultsError(ValueError):
    """A malformed ``dmax_decode.json``; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class ModelDecodeDefaults:
    prompt_template: str = PLACEHOLDER
    chat: bool = True
    decode: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    strategies: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    path: str | None = None

    def wrap(self, prompt: str) -> str:
        """The prompt as the model expects it (before the chat template)."""
        return self.prompt_template.replace(PLACEHOLDER, prompt)

    def config(self, base: DecodeConfig, overrides: Mapping[str, Any]) -> DecodeConfig:
        """``base`` < this file's ``decode`` < its ``strategies[chosen]`` < ``overrides`` (flags)."""
        where = self.path or FILE_NAME
        strategy = overrides.get("strategy", self.decode.get("strategy", base.strategy))
        layered = {**self.decode, **self.strategies.get(strategy, {}), **overrides}
        try:
            return base.replace(**layered)
        except TypeError as e:  # unknown keys are caught at load time; keep the message typed anyway
            raise ModelDefaultsError(f"{where}: {e}") from None


def _fail(path: Path, msg: str) -> ModelDefaultsError:
    return ModelDefaultsError(f"{path}: {msg}")


def _check_decode(path: Path, key: str, d: Any, strategy: str | None = None) -> dict[str, Any]:
    """Every key a DecodeConfig field, every value in range (checked on its own, with ``strategy``)."""
    if not isinstance(d, dict):
        raise _fail(path, f"{key!r} must be an object of DecodeConfig fields, got {type(d).__name__}")
    if strategy is not None and "strategy" in d:
        raise _fail(path, f"{key!r} must not set 'strategy' itself")
    try:
        DecodeConfig.from_dict({**d, **({"strategy": strategy} if strategy else {})}, where=f"{path} {key!r}")
    except DecodeConfigError as e:
        raise _fail(path, f"{key}.{e}") from None
    return dict(d)


def load_model_defaults(model_dir: str | os.PathLike) -> ModelDecodeDefaults | None:
    """The directory's ``dmax_decode.json``, checked, or None when the directory has none."""
    path = Path(model_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not readable as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"must hold a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; known keys: {', '.join(_KEYS)}")
    if raw.get("format") != FORMAT:
        raise _fail(path, f"'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    template = raw.get("prompt_template", PLACEHOLDER)
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise _fail(path, f"'prompt_template' must be a string holding {PLACEHOLDER} exactly once")
    chat = raw.get("chat", True)
    if not isinstance(chat, bool):
        raise _fail(path, f"'chat' must be true or false, got {chat!r}")
    decode = _check_decode(path, "decode", raw.get("decode", {}))
    strategies = raw.get("strategies", {})
    if not isinstance(strategies, dict) or any(s not in STRATEGIES for s in strategies):
        raise _fail(path, f"'strategies' must map strategy names ({', '.join(STRATEGIES)}) to objects")
    per = {s: _check_decode(path, f"strategies.{s}", v, strategy=s) for s, v in strategies.items()}
    return ModelDecodeDefaults(prompt_template=template, chat=chat, decode=decode, strategies=per,
                               path=str(path))
