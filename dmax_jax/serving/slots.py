"""Host-side bookkeeping of the engine: request validation, one slot's progress, block accounting.

A slot's request is laid out exactly as ``generate`` lays out a lone prompt (spec §5.1): blocks
start at ``s0 = B·floor(P/B)``; ``n_blocks`` blocks cover ``[s0, B·ceil((P + max_tokens)/B))``; the
returned tokens are the generated positions ``[P, P + max_tokens)`` cut at the first EOS.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dmax_jax.decoding.layout import row_geometry
from dmax_jax.serving.requests import EngineRequest, EngineRequestError, RequestHandle, Usage

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _int(field: str, v, lo: int, hi: int = INT32_MAX) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise EngineRequestError(field, f"must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _real(field: str, v, lo: float, hi: float) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(v)) or not lo <= float(v) <= hi:
        rng = f"in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f"a finite number >= {lo:g}"
        raise EngineRequestError(field, f"must be {rng}, got {v!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the engine can serve (for validation)."""

    strategies: tuple[str, ...]
    block_length: int
    capacity: int
    vocab_size: int
    mask_id: int


def validate(req: EngineRequest, lim: Limits) -> tuple[np.ndarray, str]:
    """``(prompt ids as int32 array, strategy)`` of a servable request, else
    :class:`EngineRequestError` naming the field."""
    if not isinstance(req, EngineRequest):
        raise TypeError(f"submit takes an EngineRequest, got {type(req).__name__}")
    strategy = lim.strategies[0] if req.strategy is None else req.strategy
    if strategy == "llada2":
        raise EngineRequestError("strategy", "'llada2' is not served by the engine (it recomputes the whole "
                                 "prefix every step, without a KV cache); served: "
                                 + ", ".join(lim.strategies))
    if strategy not in lim.strategies:
        raise EngineRequestError("strategy", f"must be one of {', '.join(lim.strategies)}; got {strategy!r}")
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
    hit = np.flatnonzero(ids == lim.mask_id)
    if hit.size:
        raise EngineRequestError("prompt_ids", f"holds the mask token {lim.mask_id} at index {int(hit[0])}; "
                                 "a prompt must not contain [MASK] (it would be decoded as a hole)")
    if ids.size + 1 > lim.capacity:
        raise EngineRequestError("prompt_ids", f"{ids.size} prompt tokens leave no room in the engine's "
                                 f"{lim.capacity} positions per request")
    max_tokens = _int("max_tokens", req.max_tokens, 1)
    _, end, _ = row_geometry(ids.size, max_tokens, lim.block_length)
    if end > lim.capacity:
        raise EngineRequestError("max_tokens", f"{ids.size} prompt tokens + max_tokens {max_tokens} (rounded "
                                 f"up to the block: {end} positions) exceed the engine's capacity "
                                 f"{lim.capacity}")
    _real("threshold", req.threshold, 0.0, 1.0)
    _real("accept_threshold", req.accept_threshold, 0.0, 1.0)
    _real("temperature", req.temperature, 0.0, math.inf)
    _int("seed", req.seed, INT32_MIN)
    _int("rng_id", req.rng_id, INT32_MIN)
    if req.steps is not None:
        if strategy != "spd":
            raise EngineRequestError("steps", f"only spd takes steps (strategy {strategy!r} stops when the "
                                     "block has no mask); leave it unset")
        _int("steps", req.steps, 1, lim.block_length)
    if not isinstance(req.provisional, bool):
        raise EngineRequestError("provisional", f"must be true or false, got {req.provisional!r}")
    return ids.astype(np.int32), strategy


@dataclasses.dataclass
class Slot:
    """One request in a slot: its layout, prefill cursor, block index and what it produced."""

    handle: RequestHandle
    prompt: np.ndarray
    strategy: int
    s0: int
    n_blocks: int
    cursor: int = 0                 # next prompt position to prefill
    k: int = 0                      # current block index
    nfe: int = 1                    # the prefill forward counts once (spec §6), however many chunks
    tokens: list = dataclasses.field(default_factory=list)
    tokens_ref: int = 0

    @classmethod
    def admit(cls, handle: RequestHandle, prompt: np.ndarray, strategy: int, block: int) -> Slot:
        s0, _, n = row_geometry(prompt.size, handle.request.max_tokens, block)
        return cls(handle=handle, prompt=prompt, strategy=strategy, s0=int(s0), n_blocks=int(n))

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
        lo, hi = max(start, self.plen), min(start + block, self.plen + self.handle.request.max_tokens)
        return xb[lo - start:hi - start]

    def commit_block(self, xb: np.ndarray, block: int, eos_id: int) -> tuple[list[int], str | None]:
        """Account a decoded block: ``(its new tokens cut at EOS, finish reason or None)``. An EOS
        anywhere in the block (prompt tail included, as ``generate``) ends the request."""
        gen = self.generated(xb, block)
        self.tokens_ref += int((gen != eos_id).sum())
        hits = np.flatnonzero(gen == eos_id)
        new = [int(t) for t in (gen[:hits[0]] if hits.size else gen)]
        self.tokens.extend(new)
        eos = bool((xb == eos_id).any())
        self.k += 1
        reason = "eos" if eos else ("length" if self.k >= self.n_blocks else None)
        return new, reason

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.plen, tokens=len(self.tokens), tokens_ref=self.tokens_ref,
                     nfe=self.nfe, blocks=self.k)
