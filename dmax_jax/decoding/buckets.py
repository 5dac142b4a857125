"""Where every row's blocks lie, and the static shapes a request compiles to (algorithm §5.1).

Why buckets: the decode program is one compiled XLA computation per static shape. Prompts are
padded to a multiple of ``prompt_bucket`` (itself a multiple of the block) and the cache/sequence
capacity is ``prompt bucket + gen_length rounded up to the block``, so every prompt of one bucket
reuses one compilation. Row geometry (algorithm §5.1, per row so rows of different lengths coexist):

    s0 = B * floor(P / B)            first decoded block starts here (may hold the prompt tail)
    T  = B * ceil((P + G) / B)       end of the last block
    n_blocks = (T - s0) / B

The functions work on Python ints, NumPy and traced jax arrays alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dmax_jax.model.layers import round_up  # noqa: F401  (re-exported: decoding's callers)

DEFAULT_PROMPT_BUCKET = 128


def row_geometry(prompt_len, gen_length, block: int):
    """``(s0, T, n_blocks)`` for prompt length(s) ``P`` (algorithm §5.1)."""
    s0 = (prompt_len // block) * block
    end = round_up(prompt_len + gen_length, block)
    return s0, end, (end - s0) // block


def shapes(prompt_lens: Sequence[int], gen_length: int, block: int, prompt_bucket: int) -> tuple[int, int]:
    """Static ``(padded prompt length, capacity)`` of a request. ``capacity`` covers every row's
    ``T`` and is the KV-cache size, so it is fixed per (prompt bucket, gen bucket)."""
    if prompt_bucket <= 0 or prompt_bucket % block:
        raise ValueError(f"prompt_bucket {prompt_bucket} must be a positive multiple of block_length {block}")
    padded = round_up(max(prompt_lens), prompt_bucket)
    return padded, padded + round_up(gen_length, block)


def normalize_prompts(prompt_ids) -> list[list[int]]:
    """``list[int]`` (one prompt) or ``list[list[int]]`` → list of rows."""
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of token ids or a list of such lists")
    single = all(isinstance(t, (int, np.integer)) for t in prompt_ids)
    rows = [list(prompt_ids)] if single else [list(r) for r in prompt_ids]
    return [[int(t) for t in r] for r in rows]


def validate_prompts(rows: list[list[int]], *, vocab_size: int, mask_id: int, gen_length: int, block: int,
                     max_positions: int) -> None:
    """Clear errors naming the row: empty prompts, ids outside the vocabulary, the MASK token inside
    a prompt (it would be decoded as a hole), or positions beyond ``max_position_embeddings``."""
    if gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    if block <= 0:
        raise ValueError(f"block_length must be positive, got {block}")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt row {i} is empty")
        arr = np.asarray(r)
        bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
        if bad.size:
            raise ValueError(f"prompt row {i}: token id {int(arr[bad[0]])} at index {int(bad[0])} is outside "
                             f"the vocabulary [0, {vocab_size})")
        hit = np.flatnonzero(arr == mask_id)
        if hit.size:
            raise ValueError(f"prompt row {i} contains the mask token {mask_id} at index {int(hit[0])}; "
                             "prompts must not contain [MASK] (it would be decoded as a hole)")
        _, end, _ = row_geometry(len(r), gen_length, block)
        if end > max_positions:
            raise ValueError(f"prompt row {i}: {len(r)} prompt tokens + gen_length {gen_length} (rounded up "
                             f"to the block: {end} positions) exceed max_position_embeddings {max_positions}")


def pack_prompts(rows: list[list[int]], padded_len: int, fill_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [batch, padded_len] int32 filled with fill_id, lengths [batch] int32)``."""
    ids = np.full((len(rows), padded_len), fill_id, np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, np.asarray([len(r) for r in rows], np.int32)
