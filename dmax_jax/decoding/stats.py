"""Per-request results: generated tokens, NFE/TPF accounting (algorithm §6) and decode traces.

Accounting follows the dInfer evaluation (algorithm §6, §7.13): NFE counts every model forward of the
request including the prefill; ``tokens_ref`` counts the non-EOS tokens of the generated region
(so non-EOS tokens after the first EOS inside the final block count, as do [MASK] tokens that
survive when ``threshold > accept_threshold``, algorithm §7.6); ``tpf = tokens_ref / nfe``.
``token_ids`` is the generated text proper: everything before the first EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dmax_jax.decoding.trace_schema import STATE_NAMES

DecodeTrace = dict[str, Any]  # JSON-serialisable, schema in docs/internals.md


@dataclasses.dataclass
class GenerateResult:
    """Result of :func:`dmax_jax.decoding.generate`, one list entry per prompt row.

    Args:
        token_ids: generated tokens, cut at the first EOS (EOS excluded).
        nfe: model forwards, prefill counted.
        tokens: ``len(token_ids[i])``.
        tokens_ref: non-EOS tokens in the generated region (the reference's count, algorithm §6).
        tpf: ``tokens_ref / nfe``.
        seconds: wall time of the compiled decode (compilation excluded).
        trace: one :data:`DecodeTrace` per row with ``DecodeConfig(trace=True)``, else None.
        compile_seconds: time spent compiling for this call (0 when cached).
        strategy: the decoder that ran.
    """

    token_ids: list[list[int]]
    nfe: list[int]
    tokens: list[int]
    tokens_ref: list[int]
    tpf: list[float]
    seconds: float
    trace: list[DecodeTrace] | None = None
    compile_seconds: float = 0.0
    strategy: str = ""

    @property
    def tps(self) -> list[float]:
        """Per-row tokens per second (``tokens_ref / seconds``; rows of a batch share the wall time)."""
        return [t / self.seconds if self.seconds > 0 else float("nan") for t in self.tokens_ref]


def row_outputs(x: np.ndarray, prompt_len: int, gen_end: int, eos_id: int) -> tuple[list[int], int]:
    """``(token_ids cut at the first EOS, tokens_ref)`` of one row of the final sequence."""
    region = x[prompt_len:gen_end]
    hits = np.flatnonzero(region == eos_id)
    cut = region[: hits[0]] if hits.size else region
    return [int(t) for t in cut], int((region != eos_id).sum())


def build_result(out: Any, prompt_lens: list[int], *, eos_id: int, seconds: float, compile_seconds: float,
                 strategy: str, trace_meta: dict | None) -> GenerateResult:
    """Host-side conversion of the program's ``loop.DecodeOutput`` (fetched to the host) into a
    :class:`GenerateResult`."""
    x, nfe, gen_end = np.asarray(out.x), np.asarray(out.nfe), np.asarray(out.gen_end)
    ids, refs = [], []
    for i, p in enumerate(prompt_lens):
        t, r = row_outputs(x[i], p, int(gen_end[i]), eos_id)
        ids.append(t)
        refs.append(r)
    nfe_l = [int(n) for n in nfe[: len(prompt_lens)]]
    traces = None
    if trace_meta is not None:
        traces = traces_from_buffers(out.trace, prompt_lens, **trace_meta)
        for tr, n, r in zip(traces, nfe_l, refs):  # the viewer's TPF is the result's (RESULT_KEYS)
            tr.update(nfe=n, prefill_forwards=int(n - len(tr["steps"])), tokens_ref=r)
    return GenerateResult(token_ids=ids, nfe=nfe_l, tokens=[len(t) for t in ids], tokens_ref=refs,
                          tpf=[r / n if n else 0.0 for r, n in zip(refs, nfe_l)], seconds=seconds,
                          trace=traces, compile_seconds=compile_seconds, strategy=strategy)


def traces_from_buffers(buf: dict, prompt_lens: list[int], *, block_length: int, mask_id: int, eos_id: int,
                        first_cross: bool) -> list[DecodeTrace]:
    """Fixed-size trace buffers ``[blocks, steps, batch, block]`` → one :data:`DecodeTrace` per row.

    ``first_cross``: the first step of every block after the first is the cross-block forward
    (cached strategies); ``block`` counts decoded blocks from 0, ``block_start`` is absolute.
    """
    tok, conf = np.asarray(buf["tokens"]), np.asarray(buf["confidence"])
    state, valid, starts = np.asarray(buf["state"]), np.asarray(buf["valid"]), np.asarray(buf["block_start"])
    out = []
    for i, p in enumerate(prompt_lens):
        steps = []
        for k, s in zip(*np.nonzero(valid[:, :, i])):
            steps.append({"block": int(k), "block_start": int(starts[k, i]), "step": int(s),
                          "cross": bool(first_cross and k > 0 and s == 0),
                          "tokens": [int(t) for t in tok[k, s, i]],
                          "confidence": [float(c) for c in conf[k, s, i]],
                          "state": [STATE_NAMES[c] for c in state[k, s, i]]})
        out.append({"prompt_len": int(p), "block_length": int(block_length), "mask_id": int(mask_id),
                    "eos_id": int(eos_id), "steps": steps})
    return out
