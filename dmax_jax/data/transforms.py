"""Algorithm §3 per-example transform: messages → clean ids, labels, noisy ids, OPUT flag.

Why the noise is keyed, not drawn from grain's per-worker rng: the random bits of an example must be
a function of ``(seed, example_index, epoch)`` only, so that the batch a step sees does not depend on
the number of hosts, the worker count, the batch layout or a resume. The draw order is part of the
contract (tests rebuild it by hand)::

    rng = np.random.default_rng([seed, example_index, epoch])
    sigma = rng.uniform(noise_low, noise_high)        # one noise level per sequence
    u = rng.random(max_length)                        # one uniform per position
    masked = (u < sigma) & (position >= prompt_length)
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dmax_jax.data.chat import SpecialIds, chat_text, encode

IGNORE_INDEX = -100


class BadRow(ValueError):
    """A data row that cannot become a training example; the message says why (no location)."""


def row_messages(row: Any, mask_text: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a row: ``{"messages": [...]}`` as is, or ``{"question", "answer"}`` as a
    user/assistant pair (what ``build_dataset_oput.py`` writes). Raises ``BadRow`` naming the field."""
    if not isinstance(row, Mapping):
        raise BadRow(f"row is a {type(row).__name__}, expected a JSON object")
    has_messages = "messages" in row
    has_qa = "question" in row or "answer" in row
    if has_messages and has_qa:
        raise BadRow("row has both 'messages' and 'question'/'answer'; keep one form")
    if has_messages:
        raw = row["messages"]
        if not isinstance(raw, (list, tuple)) or len(raw) < 2:
            raise BadRow("'messages' must be a list of at least 2 messages (prompt + assistant answer)")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise BadRow(f"messages[{i}] must be an object with string 'role' and 'content'")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"last message has role {messages[-1]['role']!r}, expected 'assistant'")
    elif has_qa:
        for key in ("question", "answer"):
            if key not in row:
                raise BadRow(f"'{key}' must be a string, but the row has no '{key}'")
            if not isinstance(row.get(key), str):
                raise BadRow(f"'{key}' must be a string, got {type(row.get(key)).__name__}")
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answer"]}]
    else:
        raise BadRow("row has neither 'messages' nor 'question'/'answer'")
    if not messages[-1]["content"].strip():
        raise BadRow("the assistant answer is empty")
    if mask_text is not None:
        for i, m in enumerate(messages):
            if mask_text in m["content"]:
                raise BadRow(f"message {i} ({m['role']}) contains the mask token string {mask_text!r}")
    return messages


def tokenize_example(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_length: int,
                     pad_id: int) -> tuple[np.ndarray, int]:
    """Algorithm §3 step 1: the full conversation's ids, right-truncated / right-padded with PAD to
    ``max_length``, and the prompt length (tokens of the prompt rendered with a generation prompt)."""
    full = chat_text(tokenizer, messages, add_generation_prompt=False)
    prompt = chat_text(tokenizer, messages[:-1], add_generation_prompt=True)
    prompt_length = len(encode(tokenizer, prompt))
    ids = encode(tokenizer, full)[:max_length]
    input_ids = np.full((max_length,), pad_id, dtype=np.int32)
    input_ids[: len(ids)] = ids
    return input_ids, prompt_length


def noise_example(input_ids: np.ndarray, prompt_length: int, rng: np.random.Generator, *,
                  noise_low: float, noise_high: float, special: SpecialIds,
                  eos_keep: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm §3 steps 2–5: ``(labels, noisy_input_ids)`` from clean ids (draw order: module docstring).

    Labels keep every response position, masked or not (step 4); of the trailing PAD/EOS run only the
    first ``eos_keep`` positions keep loss (``eos_keep`` = the block size, 32, in the reference).
    """
    length = input_ids.shape[0]
    labels = input_ids.astype(np.int32, copy=True)
    labels[:prompt_length] = IGNORE_INDEX
    sigma = rng.uniform(noise_low, noise_high)
    u = rng.random(length)
    masked = (u < sigma) & (np.arange(length) >= prompt_length)
    noisy = np.where(masked, special.mask_id, input_ids).astype(np.int32)
    not_pad = np.flatnonzero(input_ids != special.pad_id)
    run_start = int(not_pad[-1]) + 1 if not_pad.size else 0
    if run_start < length:
        labels[max(run_start + eos_keep, prompt_length):] = IGNORE_INDEX
    return labels, noisy


def example_rng(seed: int, example_index: int, epoch: int) -> np.random.Generator:
    """The per-example noise generator: a pure function of (seed, example index, epoch)."""
    return np.random.default_rng([int(seed), int(example_index), int(epoch)])


class OputTransform(grain.transforms.Map):
    """Grain map: ``{"messages", "flag", "example_index", "epoch"}`` → one training example (numpy).

    Output keys follow docs/internals.md: ``input_ids``/``noisy_input_ids``/``labels`` int32 ``[L]``,
    ``flag`` bool, ``example_index`` int64. The epoch only seeds the noise; it is not emitted.

    Each thread tokenizes with its own copy of the tokenizer: an HF fast tokenizer keeps truncation /
    padding state in its Rust backend, so sharing one object with prefetch threads (or with the
    caller, who may pad) can silently pad or truncate another thread's encoding.
    """

    def __init__(self, tokenizer: Any, *, max_length: int, noise_low: float, noise_high: float,
                 seed: int, special: SpecialIds, eos_keep: int = 32):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if not 0.0 <= noise_low <= noise_high <= 1.0:
            raise ValueError(f"need 0 <= noise_low <= noise_high <= 1, got {noise_low}, {noise_high}")
        if eos_keep < 0:
            raise ValueError(f"eos_keep must be >= 0, got {eos_keep}")
        self.tokenizer = copy.deepcopy(tokenizer)  # private: only ever copied, never encodes
        self._local = threading.local()
        self.max_length = int(max_length)
        self.noise_low, self.noise_high = float(noise_low), float(noise_high)
        self.seed = int(seed)
        self.special = special
        self.eos_keep = int(eos_keep)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]  # thread-local copies are rebuilt in the receiving process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _thread_tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
        input_ids, prompt_length = tokenize_example(
            self._thread_tokenizer(), element["messages"], self.max_length, self.special.pad_id)
        rng = example_rng(self.seed, element["example_index"], element["epoch"])
        labels, noisy = noise_example(
            input_ids, prompt_length, rng, noise_low=self.noise_low, noise_high=self.noise_high,
            special=self.special, eos_keep=self.eos_keep)
        return {
            "input_ids": input_ids,
            "noisy_input_ids": noisy,
            "labels": labels,
            "flag": np.asarray(bool(element["flag"])),
            "example_index": np.asarray(int(element["example_index"]), dtype=np.int64),
        }
