"""What a client hands the engine and what it gets back: requests, events, handles, typed errors.

A request lives through ``queued → prefilling → decoding → finished``; every stage can be aborted.
Events arrive in order on the request's :class:`RequestHandle`:

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

# A request's knobs default to DecodeConfig's: one source of decode defaults.
_DEFAULT = DecodeConfig()

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
    """One generation request. Every knob is a traced value: changing it never recompiles.

    ``prompt_ids``: token ids (no [MASK]); ``max_tokens``: generated tokens at most (the blocks cover
    ``ceil((len(prompt) + max_tokens) / block_length)`` block positions, as ``generate``'s
    ``gen_length``); ``strategy``: one of the engine's strategies (None: its first);
    ``threshold`` τ_dec / τ, ``accept_threshold`` τ_acc (spd), ``steps`` spd forwards per block
    (None: ``block_length``); ``temperature`` 0 = greedy; ``seed`` and ``rng_id`` pick the sampling
    keys ``fold_in(fold_in(key(seed), rng_id), forward_index)`` — ``rng_id`` 0 is what ``generate``
    uses for a lone prompt; ``provisional``: also emit :class:`ProvisionalStep` events;
    ``block_length``: None, or the engine's (anything else is an error, not a silent change).
    """

    prompt_ids: Sequence[int]
    max_tokens: int
    strategy: str | None = None
    threshold: float = _DEFAULT.threshold
    accept_threshold: float = _DEFAULT.accept_threshold
    steps: int | None = _DEFAULT.steps
    temperature: float = _DEFAULT.temperature
    seed: int = _DEFAULT.seed
    rng_id: int = 0
    provisional: bool = False
    block_length: int | None = None

    @classmethod
    def from_config(cls, prompt_ids: Sequence[int], config, *, rng_id: int = 0,
                    provisional: bool = False) -> EngineRequest:
        """The request ``generate(model, prompt_ids, config)`` decodes (``gen_length`` → ``max_tokens``).
        The engine's own static settings (top-k, unrolling, dtype) apply; a different block length is
        rejected."""
        return cls(prompt_ids=prompt_ids, max_tokens=config.gen_length, strategy=config.strategy,
                   threshold=config.threshold, accept_threshold=config.accept_threshold, steps=config.steps,
                   temperature=config.temperature, seed=config.seed, rng_id=rng_id, provisional=provisional,
                   block_length=config.block_length)


@dataclasses.dataclass(frozen=True)
class Usage:
    """Accounting of one request (spec §6): ``nfe`` model forwards including the prefill forward
    (counted once, as ``generate`` does, however many chunks it took); ``tokens`` generated tokens
    returned; ``tokens_ref`` non-EOS tokens of the decoded region (``generate``'s count);
    ``tpf = tokens_ref / nfe``; ``blocks`` decoded blocks."""

    prompt_tokens: int
    tokens: int
    tokens_ref: int
    nfe: int
    blocks: int

    @property
    def tpf(self) -> float:
        return self.tokens_ref / self.nfe if self.nfe else 0.0


@dataclasses.dataclass(frozen=True)
class ProvisionalStep:
    """The current block after forward ``step`` of block ``block``: ``tokens`` covers the block's
    generated positions (prompt tail excluded, cut at ``max_tokens``) as they are: [MASK] where still
    undecided, EOS not cut; SPD may still revise any of them. The last step equals the block's
    :class:`BlockCommitted` tokens before the EOS cut."""

    request_id: int
    block: int
    step: int
    tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockCommitted:
    """Final tokens of block ``block`` (generated positions only, cut at the first EOS and at
    ``max_tokens``; EOS itself excluded); ``nfe`` the request's forwards so far."""

    request_id: int
    block: int
    token_ids: tuple[int, ...]
    nfe: int


@dataclasses.dataclass(frozen=True)
class Finished:
    """Last event of a request: all generated ``token_ids``, why it ended, its usage, and for
    ``reason == "error"`` the error message."""

    request_id: int
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

    def __init__(self, request_id: int, request: EngineRequest, listener: Callable[[Event], None] | None):
        self.id = request_id
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

    def next_event(self, timeout: float | None = None) -> Event:
        """The next event (blocks; ``queue.Empty`` after ``timeout`` seconds)."""
        return self._events.get(timeout=timeout)

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
