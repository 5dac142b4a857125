"""The demo tokenizer: BPE trained on the arithmetic task, plus sequence-length accounting.

Why: with a generic byte-level vocabulary every word would cost several tokens and the demo's
prompt + answer would not fit its 128-token budget. Training ``build_tokenizer`` (algorithm §3 special
tokens, eos = pad = 1, mask = 2, LLaDA2 chat template) on the task's own train text makes every word
one piece. Numbers are one token per digit, or (scales with ``whole_numbers``) one token each: the
build then checks that every number of the corpus became a single piece.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dmax_jax.data.tokenizer_build import build_tokenizer
from dmax_jax.demo.task import SCALES, generate_problems, gsm8k_prompt

# Tokenizer sizes: digit tokenizers keep the 640 of the earlier demo (configs/tiny.yaml's vocab_size);
# a whole-number one needs room for ~660 word pieces and 0..99 (the model's vocab_size must cover it).
DEMO_VOCAB_SIZES = {False: 640, True: 768}
WHOLE_NUMBERS = range(100)  # one token each in a ``whole_numbers`` tokenizer (the task draws <= 60)
# Role names live between the <role> special tokens, so the BPE must learn them as ordinary text.
_CHAT_WORDS = ("HUMAN", "ASSISTANT", "SYSTEM")


def tokenizer_corpus(problems: Sequence[dict[str, str]]) -> list[str]:
    """Texts the BPE is trained on: each prompt exactly as the user turn shows it, and each answer."""
    texts = [gsm8k_prompt(p["question"]) for p in problems]
    texts += [p["answer"] for p in problems]
    # As frequent as the prompts, so each role name merges into a single piece.
    texts += [word for word in _CHAT_WORDS for _ in problems]
    return texts


def build_task_tokenizer(out_dir: str | os.PathLike, *, n_problems: int = 20_000, seed: int = 0,
                         vocab_size: int | None = None, phrasing: str = "fixed",
                         scale: str = "gsm") -> str:
    """Train the demo tokenizer on ``n_problems`` train-split problems (solutions worded per
    ``phrasing``, numbers per ``scale``; see ``task.PHRASINGS`` / ``task.SCALES``) and save it to
    ``out_dir``. ``vocab_size`` defaults to ``demo_vocab_size(scale)``."""
    if n_problems < 1:
        raise ValueError(f"n_problems must be >= 1, got {n_problems}")
    vocab_size = demo_vocab_size(scale) if vocab_size is None else vocab_size
    whole = SCALES[scale].whole_numbers
    corpus = tokenizer_corpus(generate_problems(n_problems, seed=seed, split="train", phrasing=phrasing,
                                                scale=scale))
    if whole:  # every 0..99 as often as a frequent word, so rare numbers (held-out ones too) merge
        corpus += [str(n) for n in WHOLE_NUMBERS for _ in range(max(1, n_problems // 10))]
    build_tokenizer(out_dir, corpus, vocab_size=vocab_size, whole_numbers=whole)
    if whole:
        _check_whole_numbers(out_dir, corpus, vocab_size)
    return os.fspath(out_dir)


def demo_vocab_size(scale: str) -> int:
    """Size of the demo tokenizer of ``scale`` (a key of ``task.SCALES``)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return DEMO_VOCAB_SIZES[SCALES[scale].whole_numbers]


def _check_whole_numbers(out_dir: str | os.PathLike, corpus: Sequence[str], vocab_size: int) -> None:
    """Refuse a tokenizer whose BPE did not merge 0..99 and every number of the corpus into one piece."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    numbers = sorted({int(n) for text in corpus for n in re.findall(r"\d+", text)} | set(WHOLE_NUMBERS))
    split = [n for n in numbers if len(tok(str(n), add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(f"vocab_size {vocab_size} is too small to keep every number whole: "
                         f"{split[:8]}{' ...' if len(split) > 8 else ''} are still split; raise vocab_size")


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids of the chat-templated GSM8K prompt, ending with the assistant header (algorithm §5.4)."""
    messages = [{"role": "user", "content": gsm8k_prompt(question)}]
    return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def sequence_lengths(tokenizer: Any, problems: Sequence[dict[str, str]]) -> dict[str, np.ndarray]:
    """Per-problem token counts under the chat template.

    ``prompt``: user turn + assistant header; ``answer``: the assistant content plus its
    ``<|role_end|>``; ``total``: the full two-turn conversation plus one EOS, the sequence a training
    row holds before padding. Renders then batch-encodes, which is what ``apply_chat_template(
    tokenize=True)`` does one conversation at a time.
    """
    if not problems:
        raise ValueError("sequence_lengths needs at least one problem")
    users = [[{"role": "user", "content": gsm8k_prompt(p["question"])}] for p in problems]
    chats = [u + [{"role": "assistant", "content": p["answer"]}] for u, p in zip(users, problems)]
    heads = tokenizer.apply_chat_template(users, add_generation_prompt=True, tokenize=False)
    fulls = tokenizer.apply_chat_template(chats, tokenize=False)
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    for head, full, p in zip(head_ids, full_ids, problems):
        if full[: len(head)] != head:
            raise ValueError(f"chat template does not extend the generation prompt for {p['question']!r}")
    prompt = np.asarray([len(h) for h in head_ids], dtype=np.int64)
    total = np.asarray([len(f) + 1 for f in full_ids], dtype=np.int64)
    return {"prompt": prompt, "answer": total - prompt - 1, "total": total}


def format_length_stats(lengths: dict[str, np.ndarray]) -> str:
    """One line per series: min / mean / p50 / p95 / max."""
    rows = []
    for name, arr in lengths.items():
        p50, p95 = np.percentile(arr, [50, 95])
        rows.append(f"{name:>7}: min {arr.min():3d}  mean {arr.mean():6.1f}  p50 {p50:5.0f}  "
                    f"p95 {p95:5.0f}  max {arr.max():3d}")
    return "\n".join(rows)


def _as_ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]
