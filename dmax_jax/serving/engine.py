"""A block-level continuous-batching engine for SPD / threshold decoding.

``Engine(model, defaults, max_batch=8, capacity=...)`` owns ``max_batch`` slots; slot i is row i of
one fixed-capacity KV cache and token buffer. Every engine *round* is one call of one compiled
program that advances every decoding slot by one block with the block step ``generate`` runs
(``decoding.block``; the step loop stays inside ``lax.while_loop``), preceded, when requests were
admitted, by one call of the compiled prefill program (one chunk of ``prefill_chunk`` prompt tokens
for each of up to ``prefill_batch`` of them). Between rounds the host admits queued requests into
free slots, retires finished ones and emits events. Requests are batch-invariant: their tokens equal
``dmax_jax.generate`` on the prompt alone.

Usage::

    eng = Engine(model, DecodeConfig(block_length=32), max_batch=8).start()
    h = eng.submit(EngineRequest(prompt_ids, eng.defaults.replace(gen_length=256, temperature=0.0)))
    for ev in h: ...           # ProvisionalStep* / BlockCommitted* / Finished
    eng.stop(drain=True)
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from dmax_jax.decoding.api import model_parts
from dmax_jax.decoding.compiled import COMPILED, abstract, replicated, signature
from dmax_jax.decoding.config import DecodeConfig
from dmax_jax.model.quant import params_for
from dmax_jax.serving import program as prog
from dmax_jax.serving.prefix_cache import PrefixCache, init_pool
from dmax_jax.serving.program import SERVED_STRATEGIES
from dmax_jax.serving.requests import (
    BlockCommitted,
    EngineClosedError,
    EngineRequest,
    Event,
    Finished,
    ProvisionalStep,
    RequestHandle,
    Usage,
)
from dmax_jax.serving.slots import Limits, Slot, round_forwards, round_inputs, validate

__all__ = ["SERVED_STRATEGIES", "Engine"]

log = logging.getLogger(__name__)


class Engine:
    """Slot engine. Construction validates the configuration; :meth:`start` runs the round loop in
    a background thread (or drive it synchronously with :meth:`step` / :meth:`run_until_idle`).

    Args:
        model: a ``Pretrained`` (``.params``, ``.config``) or ``(params, config)``; parameters may be
            sharded over a mesh exactly as for ``generate`` (the engine's own buffers are then
            replicated over the same devices).
        defaults: the :class:`DecodeConfig` of requests that bring none; its program settings
            (``block_length``, ``top_k``, ``soft_impl``, ``dtype`` (None: the model's compute dtype),
            ``weights``, ``max_unroll``, ``expected_tpf``, ``mask_id`` / ``eos_id``) are the engine's,
            for every request. Default ``DecodeConfig()``.
        max_batch: slots.
        capacity: positions per slot (default: the model's ``max_position_embeddings``; a request
            needs ``B * ceil((len(prompt) + max_tokens) / B)``).
        strategies: the strategies served (``spd``, ``threshold``; llada2 is not served); default
            ``defaults.strategy`` first, then the other.
        prefill_chunk: prompt tokens prefilled per admitted request per round (a multiple of B).
        prefill_batch: requests prefilled per round at most, so at most ``prefill_chunk *
            prefill_batch`` prompt tokens delay the slots already decoding.
        widths: the round widths compiled (default 1, max_batch // 4, max_batch): a round computes
            only the smallest width holding its decoding slots, wherever they sit; the prefill
            program likewise for 1 or ``prefill_batch`` chunks (``prefill_widths``).
        exit_factor: a round's step loop ends once at most ``1/exit_factor`` of the slots that
            entered it are still decoding their block; those pause and resume next round beside the
            slots that start new blocks (1: one forward per round; large: every block to its end).
        compact: every forward of a round runs only for the rows that need it, at n, n/2 or n/4 rows
            (``decoding.compact``; pays on a compute-bound device, costs compile time; same tokens);
            ``"auto"``: on for CPU, off for GPU / TPU — of the parameters' devices.
        prefix_cache_blocks: blocks of committed K/V the prefix cache keeps (``serving.prefix_cache``;
            requests sharing a prompt prefix skip its prefill, tokens unchanged); default as many
            blocks as the slots hold; 0 turns it off.
        prefix_cache_generated: also keep a finished request's committed generated blocks (the next
            chat turn resends them). Their K/V come from the cross-block forward: equal to a prefill's
            in exact arithmetic, not bit for bit (a different grouping of rows), so a later request
            can differ where a decision sits on a float tie; False keeps prompt blocks only (bit-exact).
    """

    def __init__(self, model, defaults: DecodeConfig | None = None, *, max_batch: int = 8,
                 capacity: int | None = None, strategies: tuple[str, ...] | None = None,
                 prefill_chunk: int = 128, prefill_batch: int = 8, widths: tuple[int, ...] | None = None,
                 exit_factor: int = 4, compact: bool | str = "auto", prefix_cache_blocks: int | None = None,
                 prefix_cache_generated: bool = True):
        self.params, self.config = model_parts(model)
        defaults = DecodeConfig() if defaults is None else defaults
        if not isinstance(defaults, DecodeConfig):
            raise TypeError(f"defaults must be a DecodeConfig, got {type(defaults).__name__}")
        self.defaults = defaults.resolve(self.config, getattr(model, "compute_dtype", None))
        self.params = params_for(self.params, self.defaults.weights)   # int8 weight-only, as generate
        self.spec = prog.engine_spec(self.params, self.config, self.defaults, max_batch=max_batch,
                                     capacity=capacity, strategies=strategies, prefill_chunk=prefill_chunk,
                                     prefill_batch=prefill_batch, exit_factor=exit_factor, compact=compact)
        self.max_batch = max_batch
        self.widths = prog.batch_widths(max_batch, widths)
        self.prefill_widths = prog.prefill_widths(self.spec)
        self.eos_id = self.defaults.eos_id
        self.limits = Limits(self.spec.strategies, self.spec.capacity, self.config.vocab_size,
                             self.defaults.replace(strategy=self.spec.strategies[0]))
        self._idle_row = self.defaults.row_params([1], [0])
        self.prefix = PrefixCache(self.spec, self.config, max_batch,
                                  prog.prefix_entries(self.spec, max_batch, prefix_cache_blocks),
                                  generated=prefix_cache_generated)
        self._sharding = replicated(self.params)
        self._state = None
        self._programs: dict = {}
        self._lock = threading.Condition()
        self._queue: collections.deque = collections.deque()   # (handle, prompt, DecodeConfig)
        self._slots: list[Slot | None] = [None] * max_batch
        self._next_id = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._counters = collections.Counter(rounds=0, forwards=0, blocks=0, paused=0, finished=0)
        self.error: Exception | None = None  # what ended the background thread, if a round failed

    # ---- properties --------------------------------------------------------------------------------
    @property
    def block_length(self) -> int:
        return self.spec.block_length

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.spec.strategies

    # ---- client API (thread-safe) ----------------------------------------------------------------
    def submit(self, request: EngineRequest,
               listener: Callable[[Event], None] | None = None) -> RequestHandle:
        """Validate and queue a request; raises :class:`EngineRequestError` (field named) for a bad
        one and :class:`EngineClosedError` after :meth:`stop`. Returns its handle at once."""
        prompt, cfg = validate(request, self.limits)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is stopped; it accepts no more requests")
            handle = RequestHandle(self._next_id, request, listener)
            self._next_id += 1
            self._queue.append((handle, prompt, cfg))
            self._lock.notify_all()
        return handle

    def abort(self, handle_id: int, reason: str = "abort") -> bool:
        """End a request at whatever stage it is (queued, prefilling, decoding) and free its slot
        before the next round; its handle gets ``Finished(reason)`` with the tokens committed so
        far. ``reason="stop"`` is the server's stop-string hook. False if it already finished."""
        if reason not in ("abort", "stop"):
            raise ValueError(f"abort reason must be 'abort' or 'stop', got {reason!r}")
        with self._lock:
            for item in self._queue:
                if item[0].id == handle_id:
                    self._queue.remove(item)
                    self._finish_queued(item[0], reason)
                    return True
            for i, slot in enumerate(self._slots):
                if slot is not None and slot.handle.id == handle_id:
                    self._release(i, reason)
                    return True
        return False

    # ---- running ---------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compile the engine's programs now (``start`` and ``step`` do it too): one per round width
        and one per prefill width, built by ``program.program_lowerings`` (what ``lower_engine``
        lowers) and shared, through the one compile cache, by every engine of this configuration."""
        if self._state is not None:
            return
        spec, cfg, sh = self.spec, self.config, self._sharding
        def build(make):     # the engine's device buffers, born on the parameters' devices
            return (jax.jit(make, out_shardings=sh) if sh else jax.jit(make))()
        self._state = build(functools.partial(prog.init_state, spec, cfg, self.max_batch))
        if self.prefix.enabled:
            self.prefix.pool = build(functools.partial(init_pool, spec, cfg, self.prefix.index.entries))
        t = time.perf_counter()
        lowerings = prog.program_lowerings(spec, cfg, self.params, self.max_batch, self.widths,
                                           self._idle_row, self.prefix.index.entries)
        sig = signature(abstract(self.params))
        for name, lower in lowerings.items():
            self._programs[name], _ = COMPILED.program(self._key() + (self._cache_name(name), sig), lower)
        self._exe = functools.partial(self._call, "round")
        self._prefill_exe = functools.partial(self._call, "prefill")
        self._counters["compile_seconds"] = time.perf_counter() - t

    def _key(self) -> tuple:
        return ("engine", self.spec, self.config, self.max_batch, self._sharding)

    def _call(self, kind: str, params, state, inputs):
        """Run the compiled ``kind`` program of the inputs' width."""
        return self._programs[f"{kind}:{inputs.slot.shape[0]}"](params, state, inputs)

    def program_names(self) -> set[str]:
        """The engine's programs: one per round width and per prefill width, and the prefix cache's
        load and save (when on)."""
        names = {f"round:{w}" for w in self.widths} | {f"prefill:{p}" for p in self.prefill_widths}
        return names | ({"prefix_load", "prefix_save"} if self.prefix.enabled else set())

    def _cache_name(self, name: str) -> str:
        """A program's name in the compile cache: the prefix programs' shapes follow the pool."""
        return f"{name}:{self.prefix.index.entries}" if name.startswith("prefix") else name

    def compile_count(self) -> int:
        """Compilations of this engine's configuration in this process (engines of one configuration
        share them): one per program (:meth:`program_names`) after warm-up, and it stays so."""
        key, names = self._key(), {self._cache_name(n) for n in self.program_names()}
        return COMPILED.compiles(lambda k: k[:5] == key and k[5] in names)

    def start(self) -> Engine:
        """Compile (if not yet) and run the round loop in a background thread; returns self."""
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine was stopped; create a new one")
            if self._thread is not None:
                return self
        self.warmup()
        self._thread = threading.Thread(target=self._loop, name="dmax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain`` finishes every queued / running request first,
        otherwise they end with ``reason="abort"``. Joins the background thread."""
        with self._lock:
            self._closed, self._stopping, self._drain = True, True, drain
            if not drain:
                self._abort_all("abort")
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def step(self) -> bool:
        """One round in the caller's thread (not while started): admit, run the program once,
        emit events. Returns whether any request is still queued or running."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its background thread; step() is for synchronous use")
        self.warmup()
        self._round()
        with self._lock:
            return self._has_work()

    def run_until_idle(self, max_rounds: int | None = None) -> int:
        """Call :meth:`step` until nothing is queued or running; returns the rounds run."""
        n, more = 0, True
        while more and (max_rounds is None or n < max_rounds):
            more = self.step()
            n += 1
        return n

    def stats(self) -> dict:
        """Counters: rounds, busy seconds, ``forwards`` (model forwards run one after another,
        ``slots.round_forwards``), blocks, ``paused`` (blocks a round left mid-way), queued /
        prefilling / decoding / free slots, finished."""
        with self._lock:
            live = [s for s in self._slots if s is not None]
            return {**self._counters, **self.prefix.stats(), "queued": len(self._queue),
                    "prefilling": sum(s.prefilling for s in live),
                    "decoding": sum(not s.prefilling for s in live),
                    "free_slots": self.max_batch - len(live), "compile_count": self.compile_count()}

    # ---- internals -------------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._queue) or any(s is not None for s in self._slots) or self.prefix.busy

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._has_work():
                        self._lock.wait()
                    if self._stopping and (not self._drain or not self._has_work()):
                        return
                self._round()
        except Exception as e:  # a failed round ends every request with the error, and the engine
            log.exception("engine round failed; every request ends with reason 'error'")
            with self._lock:
                self.error = e
                self._closed = True
                self._abort_all("error", error=f"{type(e).__name__}: {e}")

    def _finish_queued(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        usage = Usage(prompt_tokens=len(handle.request.prompt_ids), tokens=0, tokens_ref=0, nfe=0, blocks=0)
        handle._emit(Finished(handle.id, reason, (), usage, error))
        self._counters["finished"] += 1

    def _release(self, i: int, reason: str, error: str | None = None) -> None:
        slot, self._slots[i] = self._slots[i], None
        if reason != "error" and not slot.prefilling:   # its committed blocks, for the next turn
            self.prefix.queue_release(i, *slot.committed(self.block_length))
        slot.handle._emit(Finished(slot.handle.id, reason, tuple(slot.tokens), slot.usage(), error))
        self._counters["finished"] += 1

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        while self._queue:
            self._finish_queued(self._queue.popleft()[0], reason, error)
        for i, s in enumerate(self._slots):
            if s is not None:
                self._release(i, reason, error)

    def _admit(self) -> None:
        for i in range(self.max_batch):
            if self._slots[i] is None and self._queue:
                handle, prompt, cfg = self._queue.popleft()
                slot = self._slots[i] = Slot.admit(handle, prompt, cfg, self.strategies.index(cfg.strategy))
                slot.cursor = slot.cached = self.prefix.admit(i, prompt, slot.s0)

    def _prefill_inputs(self, prefill: list[int], width: int) -> prog.PrefillChunk:
        """The next prompt chunk of each ``prefill`` slot (at most ``width``) in ``width`` entries;
        their cursors advance here."""
        C = self.spec.prefill_chunk
        pc = prog.idle_prefill(self.spec, self.max_batch, width)
        for e, i in enumerate(prefill):
            s = self._slots[i]
            c = s.cursor
            chunk = s.prompt[c:c + C]
            pc.ids[e, :chunk.size] = chunk
            pc.slot[e], pc.start[e], pc.forward[e], pc.reset[e] = i, c, c < s.s0, c == 0
            pc.length[e] = min(c + C, s.s0)
            s.cursor = c + C
            if c < s.s0 <= c + C:     # its prompt blocks are committed after this call: cache them
                self.prefix.queue_save(i, s.prompt, s.s0 // self.block_length)
        return pc

    def _run(self, r: prog.SlotRound | None, pc: prog.PrefillChunk | None) -> prog.RoundOutput | None:
        """The prefix cache's moves, the round's prefill call (if ``pc``), then its block call (if
        ``r``); the block outputs."""
        self._state = self.prefix.run(self._programs, self._state)
        if pc is not None:
            self._state = self._prefill_exe(self.params, self._state, pc)
        if r is None:
            jax.block_until_ready(self._state.x)
            return None
        self._state, out = self._exe(self.params, self._state, r)
        return jax.device_get(out)

    def _round(self) -> None:
        with self._lock:
            self.prefix.flush()    # saves first: a released row is read before it is reused
            self._admit()
            waiting = [i for i, s in enumerate(self._slots) if s is not None and s.prefilling]
            prefill = sorted(waiting, key=lambda i: self._slots[i].handle.id)[:self.spec.prefill_batch]
            pc = None
            if prefill:  # advances the cursors: a slot may decode this round
                pc = self._prefill_inputs(prefill, next(p for p in self.prefill_widths if p >= len(prefill)))
            decoding = [i for i, s in enumerate(self._slots) if s is not None and not s.prefilling]
            if not prefill and not decoding:
                self._state = self.prefix.run(self._programs, self._state)
                return
            width = next(w for w in self.widths if w >= len(decoding))
            r = (round_inputs(self._slots, decoding, width, self._idle_row, self.block_length)
                 if decoding else None)
            plan = {j: (i, self._slots[i]) for j, i in enumerate(decoding)}
        t = time.perf_counter()
        out = self._run(r, pc)
        with self._lock:
            self._counters.update(rounds=1, busy_seconds=time.perf_counter() - t, prefill_chunks=len(prefill),
                                  forwards=round_forwards(r, out, pc, len(self.strategies)))
            if out is not None:
                self._counters[f"rounds_width_{width}"] += 1
                self._process(plan, out)

    def _process(self, plan: dict, out: prog.RoundOutput) -> None:
        B = self.block_length
        for j, (i, slot) in plan.items():  # entry j of the round worked on slot i
            if self._slots[i] is not slot:  # aborted while the round ran
                continue
            h = slot.handle
            slot.nfe = int(out.nfe[j])
            ran = np.flatnonzero(out.snapshot_valid[:, j])
            if h.request.provisional:
                for s in ran:
                    snap = slot.generated(out.snapshots[s, j], B)
                    step = slot.steps_done + int(s)
                    h._emit(ProvisionalStep(h.id, slot.k, step, tuple(int(t) for t in snap)))
            if not out.finished[j]:  # paused mid-block: it resumes next round
                slot.steps_done, slot.left = slot.steps_done + ran.size, int(out.left[j])
                self._counters["paused"] += 1
                continue
            slot.steps_done = 0
            new, reason = slot.commit_block(out.tokens[j], B, self.eos_id)
            h._emit(BlockCommitted(h.id, slot.k - 1, tuple(new), slot.nfe))
            self._counters["blocks"] += 1
            if reason is not None:
                self._release(i, reason)
