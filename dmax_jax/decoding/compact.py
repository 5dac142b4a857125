"""Compacted forwards: a block step's forward computed only for the rows that need it.

Why: on a compute-bound device (a CPU; a GPU or TPU once the batch is wide) a forward costs every
row of its batch, and inside a block step most rows often need none: they finished their block and wait
for the step loop to exit, they take their step-0 logits from the cross-block forward, or they do
not cross a block boundary at all. :func:`compacted` gathers the rows that need the forward into
the smallest of a few static widths (``compact_widths``: n, n/2, n/4 — all in one program, a
``lax.switch`` picks the branch at run time, so nothing recompiles), runs it there and scatters the
results back. A row's arithmetic does not depend on its batch company (attention is per row, the
experts per token), so the tokens are those of the full-width forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

COMPACT_DIVISORS = (4, 2)  # a forward over n rows may also run at ceil(n/4) and ceil(n/2) rows


def compact_widths(n: int, enabled: bool = True) -> tuple[int, ...]:
    """The static widths (ascending, ending at ``n``) a forward over ``n`` rows may run at
    (``enabled=False``: only ``n``; a forward that no row needs is still skipped)."""
    return tuple(sorted({n, *(-(-n // d) for d in COMPACT_DIVISORS if enabled)}))


def take_rows(a: jax.Array, idx: jax.Array | None) -> jax.Array:
    """Rows ``idx`` of ``a`` (leading axis); all of ``a`` for ``None``."""
    return a if idx is None else a[idx]


def put_rows(a: jax.Array, idx: jax.Array | None, v: jax.Array) -> jax.Array:
    """``a`` with rows ``idx`` set to ``v``; ``v`` itself for ``None`` (every row)."""
    return v if idx is None else a.at[idx].set(v)


def compacted(needed: jax.Array, run: Callable[[jax.Array | None], Any], base: Any,
              put: Callable[[Any, jax.Array | None, Any, jax.Array], Any], *, enabled: bool = True) -> Any:
    """``put(base, idx, run(idx), needed[idx])`` with ``idx`` the rows of ``needed [n]`` (bool) first,
    cut to the smallest compact width holding them (``enabled=False``: all rows); ``base`` itself
    when no row is needed.

    ``run(idx)`` computes the forward for rows ``idx`` (``[w]`` int32, distinct; ``None`` in the
    full-width branch: all rows in order, so that branch gathers and scatters nothing — XLA keeps a
    gather by ``arange``, a copy of every cache row); ``put`` writes its results into ``base`` at
    those rows (``take_rows`` / ``put_rows`` read and write either form). A branch wider than the
    count also computes rows that are not needed (the last argument is False for them): ``put`` must
    leave what they hold in ``base`` unchanged (or write only what nobody reads, e.g. scratch
    positions)."""
    n = needed.shape[0]
    widths = compact_widths(n, enabled)
    order = jnp.argsort(~needed, stable=True).astype(jnp.int32)   # needed rows first

    def branch(w: int):
        def go(b):
            idx = None if w == n else order[:w]
            return put(b, idx, run(idx), take_rows(needed, idx))
        return go

    count = needed.sum()
    which = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(widths), count))
    return jax.lax.switch(which, [lambda b: b] + [branch(w) for w in widths], base)
