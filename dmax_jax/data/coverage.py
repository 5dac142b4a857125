"""How many training rows keep at least one answer token after truncation to ``data.max_length``.

Why before training: the loss covers only positions after the prompt (algorithm §3), so a row whose
prompt alone fills ``max_length`` teaches nothing. If every row is like that the run trains on zero
answer tokens and reports "final loss 0.0000" — a success that is not one. Counting costs one
batched tokenization of the prompts (not of the answers) when the data is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dmax_jax.data.chat import chat_text

_BATCH = 512


@dataclasses.dataclass(frozen=True)
class AnswerRoom:
    """``no_answer`` rows leave no answer token; the longest prompt has ``longest`` tokens (row
    ``longest_where``)."""

    rows: int
    no_answer: int
    longest: int
    longest_where: str


def answer_room(store: Any, tokenizer: Any, max_length: int) -> AnswerRoom:
    """Count the rows of ``store`` (a ``RowStore``) whose prompt (rendered with the generation prompt,
    as ``tokenize_example`` renders it) has ``max_length`` tokens or more."""
    no_answer, longest, where = 0, -1, ""
    for lo in range(0, len(store), _BATCH):
        idx = range(lo, min(lo + _BATCH, len(store)))
        texts = [chat_text(tokenizer, store.messages(i)[:-1], add_generation_prompt=True) for i in idx]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for i, n in zip(idx, lengths):
            no_answer += n >= max_length
            if n > longest:
                longest, where = n, store.describe(i)
    return AnswerRoom(len(store), no_answer, longest, where)


def no_answer_error(room: AnswerRoom, max_length: int) -> str:
    """The one-line error when no row leaves an answer token."""
    return (f"data.max_length {max_length}: all {room.rows} rows' prompts fill it, so no answer token is "
            f"left to train on (the longest prompt, {room.longest_where}, has {room.longest} tokens); "
            f"raise data.max_length above the prompts' lengths")
