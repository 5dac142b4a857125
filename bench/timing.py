"""The benches' one timing loop: a first call (compile + warm-up), then the median of timed calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_ms(fn: Callable, *args, repeats: int) -> tuple[float, float, Any]:
    """``(seconds of the first call, median ms of the next `repeats` calls, the first call's output)``;
    every call waits for its result (``block_until_ready``)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t))
    return first, statistics.median(times), out
