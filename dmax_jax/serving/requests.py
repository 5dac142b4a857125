"""What a client hands the engine and what it gets back: requests, events, handles, typed errors.

A request lives through ``queued → prefilling → decoding → finished``; every stage can be aborted.
Events arrive in order on the request's :class:`RequestHandle` (``handle_id``: the engine's number of
the submitted request, ``RequestHandle.id``; not the sampling stream ``EngineRequest.request_id``):

* :class:`ProvisionalStep` (only if ``EngineRequest.provisional``): the current block after one
  model forward — tokens that may still be revised (SPD) or still hold [MASK]; never final text.
* :class:`BlockCommitted`: the generated tokens of one finished block — final, never revised.
* :class:`Finished`: the last event; ``reason`` is ``"eos"``, ``"length"`` (``max_tokens`` or the
  last block), ``"stop"`` (the server's stop-string hook called :meth:`Engine.abort` with
  ``reason="stop"``), ``"abort"`` or ``"error"``; ``usage`` holds NFE / TPF / block counts.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from dmax_jax.decoding.config import DecodeConfig

FINISH_REASONS = ("eos", "length", "stop", "abort", "error")
log = logging.getLogger(__name__)


class EngineRequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EngineClosedError(RuntimeError):
    """``submit`` after :meth:`Engine.stop` (or before the engine could start)."""


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One generation request. Every per-request knob is a traced value: changing it never recompiles.

    Args:
        prompt_ids: token ids (no [MASK]).
        decode: the request's :class:`DecodeConfig` (None: the engine's defaults). The engine takes
            its per-request part (``config.PER_REQUEST``: strategy, ``gen_length`` = the most tokens
            returned, thresholds, steps, temperature, seed); its ``block_length`` must be the
            engine's; the program settings (top-k, kernels, dtype, unrolling) are the engine's.
        request_id: the request's sampling stream: keys are
            ``fold_in(fold_in(key(seed), request_id), forward_index)`` — ``generate``'s
            ``request_ids[i]``; 0 is what ``generate`` uses for a lone prompt.
        provisional: also emit :class:`ProvisionalStep` events.
    """

    prompt_ids: Sequence[int]
    decode: DecodeConfig | None = None
    request_id: int = 0
    provisional: bool = False


@dataclasses.dataclass(frozen=True)
class Usage:
    """Accounting of one request (algorithm §6): ``nfe`` model forwards including the prefill forward
    (counted once, as ``generate`` does, however many chunks it took); ``tokens`` generated tokens
    returned; ``tokens_ref`` non-EOS tokens of the decoded region (``generate``'s count);
    ``tpf = tokens_ref / nfe``; ``blocks`` decoded blocks; ``cached_tokens`` prompt tokens whose
    prefill the prefix cache saved."""

    prompt_tokens: int
    tokens: int
    tokens_ref: int
    nfe: int
    blocks: int
    cached_tokens: int = 0

    @property
    def tpf(self) -> float:
        return self.tokens_ref / self.nfe if self.nfe else 0.0


@dataclasses.dataclass(frozen=True)
class ProvisionalStep:
    """The current block after forward ``step`` of block ``block``: ``tokens`` covers the block's
    generated positions (prompt tail excluded, cut at ``max_tokens``) as they are: [MASK] where still
    undecided, EOS not cut; SPD may still revise any of them. The last step equals the block's
    :class:`BlockCommitted` tokens before the EOS cut."""

    handle_id: int
    block: int
    step: int
    tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockCommitted:
    """Final tokens of block ``block`` (generated positions only, cut at the first EOS and at
    ``max_tokens``; EOS itself excluded); ``nfe`` the request's forwards so far."""

    handle_id: int
    block: int
    token_ids: tuple[int, ...]
    nfe: int


@dataclasses.dataclass(frozen=True)
class Finished:
    """Last event of a request: all generated ``token_ids``, why it ended, its usage, and for
    ``reason == "error"`` the error message."""

    handle_id: int
    reason: str
    token_ids: tuple[int, ...]
    usage: Usage
    error: str | None = None


Event = ProvisionalStep | BlockCommitted | Finished


class RequestHandle:
    """The client side of one submitted request: iterate it (blocking) for its events, or
    :meth:`result` to wait for :class:`Finished`. Thread-safe; an optional ``listener`` passed to
    :meth:`Engine.submit` is called with every event from the engine thread (keep it cheap, e.g.
    ``loop.call_soon_threadsafe``)."""

    def __init__(self, handle_id: int, request: EngineRequest, listener: Callable[[Event], None] | None):
        self.id = handle_id
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._listener = listener
        self._done = threading.Event()
        self._final: Finished | None = None

    def _emit(self, event: Event) -> None:
        if isinstance(event, Finished):
            self._final = event
        self._events.put(event)
        if self._listener is not None:
            try:
                self._listener(event)
            except Exception:  # a client's bug must not stop the engine thread serving the others
                log.exception("listener of request %d failed; it gets no more events", self.id)
                self._listener = None
        if isinstance(event, Finished):
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, Finished):
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the request to finish; ``TimeoutError`` after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        assert self._final is not None
        return self._final
