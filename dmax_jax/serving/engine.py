"""A block-level continuous-batching engine for SPD / threshold decoding.

``Engine(model, max_batch=8, block_length=32, capacity=...)`` owns ``max_batch`` slots; slot i is
row i of one fixed-capacity KV cache and token buffer. Every engine *round* is one call of one
compiled program that (1) prefills up to ``prefill_chunk`` prompt tokens of one admitted request
and (2) advances every decoding slot by one block — the step loop stays inside ``lax.while_loop``.
Between rounds the host admits queued requests into free slots, retires finished ones and emits
events. Requests are batch-invariant: their tokens equal ``dmax_jax.generate`` on the prompt alone.

Usage::

    eng = Engine(model, max_batch=8, block_length=32).start()
    h = eng.submit(EngineRequest(prompt_ids, max_tokens=256, temperature=0.0))
    for ev in h: ...           # ProvisionalStep* / BlockCommitted* / Finished
    eng.stop(drain=True)
"""

from __future__ import annotations

from collections.abc import Callable

from dmax_jax.serving.requests import EngineRequest, Event, RequestHandle

SERVED_STRATEGIES = ("spd", "threshold")


class Engine:
    """Slot engine. Construction validates the configuration; :meth:`start` runs the round loop in
    a background thread (or drive it synchronously with :meth:`step` / :meth:`run_until_idle`).

    ``model``: a ``Pretrained`` (``.params``, ``.config``) or ``(params, config)``; parameters may
    be sharded over a mesh exactly as for ``generate`` (the engine's own buffers are then
    replicated over the same devices). ``max_batch`` slots; ``block_length`` B (static);
    ``capacity`` positions per slot (default: the model's ``max_position_embeddings``; a request
    needs ``B * ceil((len(prompt) + max_tokens) / B)``); ``prefill_chunk`` prompt tokens prefilled
    per round (a multiple of B); ``strategies`` the strategies served (``spd``, ``threshold``;
    ``llada2`` is not served); ``dtype`` the compute dtype (cache too); ``top_k``, ``max_unroll``,
    ``expected_tpf``, ``soft_embedding_impl`` as in ``generate`` (static); ``mask_id`` / ``eos_id``
    default to the model config's.
    """

    def __init__(self, model, *, max_batch: int = 8, block_length: int = 32, capacity: int | None = None,
                 prefill_chunk: int = 128, strategies: tuple[str, ...] = SERVED_STRATEGIES, dtype=None,
                 top_k: int = 1, max_unroll: int = 4, expected_tpf: int = 4,
                 soft_embedding_impl: str = "auto", mask_id: int | None = None, eos_id: int | None = None):
        raise NotImplementedError("engine implementation in progress")

    # ---- client API (thread-safe) ----------------------------------------------------------------
    def submit(self, request: EngineRequest,
               listener: Callable[[Event], None] | None = None) -> RequestHandle:
        """Validate and queue a request; raises :class:`EngineRequestError` (field named) for a bad
        one and :class:`EngineClosedError` after :meth:`stop`. Returns its handle at once."""
        raise NotImplementedError

    def abort(self, request_id: int, reason: str = "abort") -> bool:
        """End a request at whatever stage it is (queued, prefilling, decoding) and free its slot
        before the next round; its handle gets ``Finished(reason)`` with the tokens committed so
        far. ``reason="stop"`` is the server's stop-string hook. False if it already finished."""
        raise NotImplementedError

    # ---- running ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Compile (if not yet) and run the round loop in a background thread; returns self."""
        raise NotImplementedError

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain`` finishes every queued / running request first,
        otherwise they end with ``reason="abort"``. Joins the background thread."""
        raise NotImplementedError

    def step(self) -> bool:
        """One round in the caller's thread (not while started): admit, run the program once,
        emit events. Returns whether any request is still queued or running."""
        raise NotImplementedError

    def run_until_idle(self, max_rounds: int | None = None) -> int:
        """Call :meth:`step` until nothing is queued or running; returns the rounds run."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Compile the round program now (``start`` does it too)."""
        raise NotImplementedError

    def compile_count(self) -> int:
        """Times this engine's round program was traced (1 after warm-up, and it stays 1)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Counters: rounds, queued, prefilling, decoding, free slots, finished requests."""
        raise NotImplementedError
