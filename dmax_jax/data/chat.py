"""Tokenizer loading, the chat template, and the special ids (MASK / EOS / PAD).

Why one module: training data (algorithm §3), decoding prompts and evaluation must all build text and ids
exactly the same way as the reference — ``apply_chat_template(..., tokenize=False)`` followed by a
plain ``tok(text, add_special_tokens=False)`` — and must agree on which ids mean MASK, EOS and PAD.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from dmax_jax.config import LLADA2_MASK_ID, ModelConfig

Messages = Sequence[dict[str, str]]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit its model; names the folder and the file."""


# Files that hold a vocabulary (tokenizer_config.json alone does not: transformers then falls back to
# a slow sentencepiece conversion and fails with a message that names neither folder nor file).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """Load a ``transformers`` tokenizer from an HF directory (the checkpoint dir or a tokenizer dir).
    A missing folder or file, or one transformers cannot read, is one line naming both."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise FileNotFoundError(f"tokenizer directory {p!r} does not exist")
    if not any(os.path.exists(os.path.join(p, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{p!r} holds no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    present = [f for f in VOCAB_FILES if os.path.exists(os.path.join(p, f))]
    if not present:
        raise TokenizerError(f"{p}: tokenizer.json is missing (the folder has tokenizer_config.json but no "
                             f"vocabulary file: {', '.join(VOCAB_FILES)})")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        _check_json_file(os.path.join(p, name))
    try:
        return _auto_tokenizer(p, trust_remote_code)
    except Exception as e:  # noqa: BLE001 — transformers / tokenizers raise many types for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TokenizerError(f"{os.path.join(p, present[0])}: cannot load the tokenizer ({first})") from None


def _check_json_file(path: str) -> None:
    """An unreadable or truncated JSON file of the tokenizer, named (transformers' own message would
    name neither it nor its folder)."""
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _auto_tokenizer(p: str, trust_remote_code: bool) -> Any:
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer parses config.json to guess the tokenizer class; its warnings about the LLaDA2 config
    # (unknown model type without remote code, the `rope_scaling` field) concern torch models, not the
    # tokenizer loaded here, so they are muted for this call only.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(max(verbosity, hf_logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rope_scaling.*deprecated", category=FutureWarning)
            return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)


def check_tokenizer_fits(config: ModelConfig, tokenizer: Any, where: str) -> None:
    """The tokenizer's ids must index the model's embedding: a tokenizer larger than config.json's
    ``vocab_size`` would give ids past its end — garbage in decoding, a non-finite loss in training,
    far from the cause. ``where`` names the model folder (or config key) in the error."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise TokenizerError(f"{where}: the tokenizer has {size} tokens but the model's vocab_size "
                             f"(config.json) is {config.vocab_size}; ids >= {config.vocab_size} would index "
                             "past the embedding (is this the model's own tokenizer?)")
    try:
        resolve_special_ids(config, tokenizer, strict=False)     # mask / EOS / PAD exist and fit
    except ValueError as e:
        raise TokenizerError(f"{where}: {e}") from None


def chat_text(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    """The chat-template text of ``messages`` (``tokenize=False``), as the reference renders it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat_template")
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added BOS/EOS (the template already carries every special)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def apply_chat_template(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the chat template of ``messages``: render with ``tokenize=False`` then ``encode``.

    Two steps (not ``tokenize=True``) because that is what the reference does (algorithm §3 step 1): the
    template text is tokenized as one string with ``add_special_tokens=False``.
    """
    return encode(tokenizer, chat_text(tokenizer, messages, add_generation_prompt))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids with a fixed meaning. ``pad_id`` pads the right end of training rows and is the id of the
    trailing-EOS rule (the reference uses ``tok.pad_token_id`` there; EOS = PAD in LLaDA2)."""

    mask_id: int
    eos_id: int
    pad_id: int


def _config_id(config: ModelConfig, field: str) -> int | None:
    """A config id counts only if it was really given: a config read from a file (non-empty ``raw``)
    must contain the key, because ``ModelConfig`` fills absent keys with the LLaDA2 defaults."""
    value = getattr(config, field)
    if value is None:
        return None
    if config.raw and field not in config.raw:
        return None
    return int(value)


def _tokenizer_id(tokenizer: Any, kind: str) -> int | None:
    value = getattr(tokenizer, f"{kind}_token_id", None)
    return None if value is None else int(value)


def resolve_special_ids(config: ModelConfig | None, tokenizer: Any | None, *,
                        strict: bool = True) -> SpecialIds:
    """MASK / EOS / PAD ids: the config's ``mask_token_id`` / ``eos_token_id`` / ``pad_token_id`` first,
    then the tokenizer's mask / eos / pad tokens.

    The LLaDA2 MASK default (156895, algorithm §0) is used only when neither source names a mask but the
    tokenizer's vocabulary actually reaches that id (a LLaDA2-sized tokenizer) — never for a tokenizer
    that could not contain it. With ``strict`` a config id that disagrees with the tokenizer's raises,
    since one of the two is then wrong and the model would learn the wrong token.
    """
    if config is None and tokenizer is None:
        raise ValueError("resolve_special_ids needs a model config or a tokenizer (got neither)")
    resolved: dict[str, int] = {}
    missing = []
    for kind in ("mask", "eos", "pad"):
        from_cfg = _config_id(config, f"{kind}_token_id") if config is not None else None
        from_tok = _tokenizer_id(tokenizer, kind) if tokenizer is not None else None
        if strict and from_cfg is not None and from_tok is not None and from_cfg != from_tok:
            raise ValueError(f"{kind} id conflict: config {kind}_token_id={from_cfg} but tokenizer "
                             f"{kind}_token_id={from_tok}; fix one of them (or pass strict=False)")
        value = from_cfg if from_cfg is not None else from_tok
        if value is None and kind == "mask" and tokenizer is not None and len(tokenizer) > LLADA2_MASK_ID:
            value = LLADA2_MASK_ID
        if value is None:
            missing.append(kind)
        else:
            resolved[kind] = value
    if missing:
        raise ValueError(
            "no id for " + ", ".join(missing) + " token(s): set "
            + ", ".join(f"{k}_token_id in config.json" for k in missing)
            + " or give the tokenizer " + ", ".join(f"a {k}_token" for k in missing)
        )
    limit = config.vocab_size if config is not None else len(tokenizer)
    for kind, value in resolved.items():
        if not 0 <= value < limit:
            raise ValueError(f"{kind} id {value} is outside the vocabulary [0, {limit})")
    if resolved["mask"] in (resolved["eos"], resolved["pad"]):
        raise ValueError(f"mask id {resolved['mask']} equals the eos/pad id; masked and padded positions "
                         "would be indistinguishable")
    return SpecialIds(mask_id=resolved["mask"], eos_id=resolved["eos"], pad_id=resolved["pad"])


def mask_token_text(tokenizer: Any, mask_id: int) -> str:
    """The string of the MASK token, used to reject training texts that would inject MASK ids."""
    tok = tokenizer.convert_ids_to_tokens(int(mask_id))
    if not isinstance(tok, str) or not tok:
        raise ValueError(f"tokenizer has no token string for mask id {mask_id}")
    return tok
