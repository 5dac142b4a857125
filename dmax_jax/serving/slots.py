"""Host-side bookkeeping of the engine: request validation, one slot's progress, block accounting.

A slot's request is laid out exactly as ``generate`` lays out a lone prompt (algorithm §5.1): blocks
start at ``s0 = B·floor(P/B)``; ``n_blocks`` blocks cover ``[s0, B·ceil((P + max_tokens)/B))``; the
returned tokens are the generated positions ``[P, P + max_tokens)`` cut at the first EOS.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dmax_jax.decoding.buckets import row_geometry
from dmax_jax.decoding.config import (
    INT32_MAX,
    INT32_MIN,
    PER_REQUEST,
    DecodeConfig,
    DecodeConfigError,
    RowParams,
)
from dmax_jax.serving.program import idle_round
from dmax_jax.serving.requests import EngineRequest, EngineRequestError, RequestHandle, Usage

FIELDS = {"gen_length": "max_tokens"}  # DecodeConfig field -> EngineRequest field


def _int(field: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise EngineRequestError(field, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine serves: its strategies, capacity, vocabulary and the resolved decode
    settings every request shares (``base``: block length, mask/EOS ids, top-k, dtype, ...)."""

    strategies: tuple[str, ...]
    capacity: int
    vocab_size: int
    base: DecodeConfig


def _prompt(req: EngineRequest, lim: Limits) -> np.ndarray:
    try:
        ids = np.asarray(list(req.prompt_ids))
    except TypeError:
        raise EngineRequestError("prompt_ids", "must be a sequence of token ids") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise EngineRequestError("prompt_ids", "must be a non-empty flat sequence of integer token ids")
    bad = np.flatnonzero((ids < 0) | (ids >= lim.vocab_size))
    if bad.size:
        raise EngineRequestError("prompt_ids", f"token id {int(ids[bad[0]])} at index {int(bad[0])} is "
                                 f"outside the vocabulary [0, {lim.vocab_size})")
    mask_id = lim.base.mask_id
    hit = np.flatnonzero(ids == mask_id)
    if hit.size:
        raise EngineRequestError("prompt_ids", f"holds the mask token {mask_id} at index {int(hit[0])}; "
                                 "a prompt must not contain [MASK] (it would be decoded as a hole)")
    if ids.size + 1 > lim.capacity:
        raise EngineRequestError("prompt_ids", f"{ids.size} prompt tokens leave no room in the engine's "
                                 f"{lim.capacity} positions per request")
    return ids.astype(np.int32)


def validate(req: EngineRequest, lim: Limits) -> tuple[np.ndarray, DecodeConfig]:
    """``(prompt ids int32, the request's DecodeConfig)`` of a servable request, else
    :class:`EngineRequestError` naming the field. The config is the engine's (``lim.base``) with the
    request's per-request knobs (``PER_REQUEST``); ``DecodeConfig`` validated those already."""
    if not isinstance(req, EngineRequest):
        raise TypeError(f"submit takes an EngineRequest, got {type(req).__name__}")
    asked = lim.base if req.decode is None else req.decode
    if not isinstance(asked, DecodeConfig):
        raise EngineRequestError("decode", f"must be a DecodeConfig or None, got {type(asked).__name__}")
    strategy = asked.strategy
    if strategy == "llada2":
        raise EngineRequestError("strategy", "'llada2' is not served by the engine (it recomputes the whole "
                                 "prefix every step, without a KV cache); served: "
                                 + ", ".join(lim.strategies))
    if strategy not in lim.strategies:
        raise EngineRequestError("strategy", f"must be one of {', '.join(lim.strategies)}; got {strategy!r}")
    B = lim.base.block_length
    if asked.block_length != B:
        raise EngineRequestError("block_length", f"this engine decodes blocks of {B} tokens; got "
                                 f"{asked.block_length!r}")
    ids = _prompt(req, lim)
    try:
        cfg = lim.base.replace(**{f: getattr(asked, f) for f in PER_REQUEST},
                               top_k=lim.base.top_k if strategy == "spd" else 1)
    except DecodeConfigError as e:
        raise EngineRequestError(FIELDS.get(e.field, e.field), e.reason) from None
    _, end, _ = row_geometry(ids.size, cfg.gen_length, B)
    if end > lim.capacity:
        raise EngineRequestError("max_tokens", f"{ids.size} prompt tokens + max_tokens {cfg.gen_length} "
                                 f"(rounded up to the block: {end} positions) exceed the engine's capacity "
                                 f"{lim.capacity}")
    if cfg.steps is not None:
        _int("steps", cfg.steps, 1, B)  # the step loop's static bound is one forward per token
    _int("request_id", req.request_id, INT32_MIN, INT32_MAX)
    if not isinstance(req.provisional, bool):
        raise EngineRequestError("provisional", f"must be true or false, got {req.provisional!r}")
    return ids, cfg


@dataclasses.dataclass
class Slot:
    """One request in a slot: its layout, prefill cursor, block index and what it produced."""

    handle: RequestHandle
    prompt: np.ndarray
    strategy: int                   # index into the engine's strategies
    row: RowParams                  # the request's traced knobs, one row (NumPy)
    max_tokens: int                 # the request's gen_length
    s0: int
    n_blocks: int
    cursor: int = 0                 # next prompt position to prefill
    k: int = 0                      # current block index
    steps_done: int = 0             # forwards of block k run so far (> 0: paused mid-block)
    left: int = 0                   # threshold's unroll counter of a paused block
    nfe: int = 1                    # the prefill forward counts once (algorithm §6), however many chunks
    tokens: list = dataclasses.field(default_factory=list)
    tokens_ref: int = 0
    cached: int = 0                 # prompt positions whose K/V came from the prefix cache
    blocks: list = dataclasses.field(default_factory=list)   # every decoded block's B tokens

    @classmethod
    def admit(cls, handle: RequestHandle, prompt: np.ndarray, cfg: DecodeConfig, strategy: int) -> Slot:
        s0, _, n = row_geometry(prompt.size, cfg.gen_length, cfg.block_length)
        row = cfg.row_params([prompt.size], [handle.request.request_id])
        return cls(handle=handle, prompt=prompt, strategy=strategy, row=row, max_tokens=cfg.gen_length,
                   s0=int(s0), n_blocks=int(n))

    @property
    def plen(self) -> int:
        return int(self.prompt.size)

    @property
    def prefilling(self) -> bool:
        return self.cursor < self.plen

    def start(self, block: int) -> int:
        return self.s0 + self.k * block

    def generated(self, xb: np.ndarray, block: int) -> np.ndarray:
        """The block's positions inside ``[P, P + max_tokens)``."""
        start = self.start(block)
        lo, hi = max(start, self.plen), min(start + block, self.plen + self.max_tokens)
        return xb[lo - start:hi - start]

    def commit_block(self, xb: np.ndarray, block: int, eos_id: int) -> tuple[list[int], str | None]:
        """Account a decoded block: ``(its new tokens cut at EOS, finish reason or None)``. An EOS
        anywhere in the block (prompt tail included, as ``generate``) ends the request."""
        gen = self.generated(xb, block)
        self.tokens_ref += int((gen != eos_id).sum())
        hits = np.flatnonzero(gen == eos_id)
        new = [int(t) for t in (gen[:hits[0]] if hits.size else gen)]
        self.tokens.extend(new)
        self.blocks.append(np.array(xb, np.int32))
        eos = bool((xb == eos_id).any())
        self.k += 1
        reason = "eos" if eos else ("length" if self.k >= self.n_blocks else None)
        return new, reason

    def committed(self, block: int) -> tuple[np.ndarray, int]:
        """``(row tokens, n)``: the row's first ``n`` blocks are committed (prompt blocks before
        ``s0``, and every decoded block but the last: block k is committed by block k+1's cross
        forward); their K/V may enter the prefix cache."""
        return np.concatenate([self.prompt[:self.s0], *self.blocks]), self.s0 // block + max(self.k - 1, 0)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.plen, tokens=len(self.tokens), tokens_ref=self.tokens_ref,
                     nfe=self.nfe, blocks=self.k, cached_tokens=self.cached)


def round_inputs(slots: list, decoding: list[int], width: int, idle_row: RowParams, block: int):
    """Host arrays (``program.SlotRound``) for the ``decoding`` slots (at most ``width``) that advance
    one block this round: entry j works on slot ``decoding[j]``; the rest idle on the scratch row."""
    r = idle_round(len(slots), width, idle_row)
    rows = [idle_row] * width
    for j, i in enumerate(decoding):
        s = slots[i]
        r.slot[j], r.decoding[j], r.strategy[j], r.k[j] = i, True, s.strategy, s.k
        r.start[j], r.nfe[j] = s.start(block), s.nfe
        r.resumed[j], r.steps_done[j], r.left[j] = s.steps_done > 0, s.steps_done, s.left
        rows[j] = s.row
    return r.replace(rows=jax.tree.map(lambda *a: np.concatenate(a), *rows))


def round_forwards(r, out, pc, n_strategies: int) -> int:
    """How many model forwards one engine round ran one after another: the prefill call's forward
    (if one of its chunks ``pc``, a ``program.PrefillChunk``, lies before its slot's ``s0``), then,
    for ``program.round_program``'s host inputs ``r`` (a ``SlotRound``) and its ``out`` (a
    ``RoundOutput``), the cross
    forward (if a decoding slot starts a block past its first) and per strategy its loop's
    forwards — step 0's block forward only if one of its slots is at its first block or resumes a
    paused one (the others use the cross logits), one per later step any of its rows took.

    Why count them: on an accelerator whose forward over a few rows is bound by reading the weights
    (DMax-16B at these batch sizes), a forward costs about the same for 1 row or 16, so generated
    tokens per sequential forward is what batching buys there, independent of this host's speed."""
    n = int(pc is not None and bool(np.asarray(pc.forward).any()))
    if r is None or out is None:
        return n
    dec, strat = np.asarray(r.decoding), np.asarray(r.strategy)
    cross = dec & (np.asarray(r.k) > 0) & ~np.asarray(r.resumed)
    valid = np.asarray(out.snapshot_valid)
    n += int(cross.any())
    for i in range(n_strategies):
        rows = dec & (strat == i)
        if rows.any():
            n += int((rows & ~cross).any()) + int(valid[1:, rows].any(axis=1).sum())
    return n
