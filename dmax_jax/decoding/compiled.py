"""The one compile cache of decode programs (``generate``'s and the serving engine's).

Why a process-wide cache: compiling a decode program takes seconds to minutes, and every
``generate`` call of one request shape, and every ``Engine`` of one configuration, runs the same
program. Entries are keyed by everything that changes the program: the :class:`ProgramSpec` (which
carries the target platform), the model config, which program (``generate``, an engine round width,
a prefill width) and the signature of the arguments (shapes, dtypes, shardings). The cache holds
compiled executables (``jax.jit(...).lower(...).compile()``: ahead of time, so a timed call never
includes compilation) and counts the compilations per program kind (``compile_count``).

This is the only module-level mutable state of the decoding and serving packages.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


class CompileCache:
    """Compiled executables by key, how many were compiled per key (less its argument signature),
    and a fingerprint of each program as lowered (what ``lower_generate`` / ``lower_engine`` return
    must equal what ran)."""

    def __init__(self, max_programs: int = 64) -> None:
        # Least recently used first. Bounded: each compiled program keeps its code mapped (XLA:CPU
        # maps its JIT code; a process has at most vm.max_map_count maps), and a long evaluation over
        # many shapes must not grow without end. An engine keeps its own programs besides.
        self._programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.max_programs = max_programs
        self._compiles: collections.Counter = collections.Counter()
        self._fingerprints: dict[Hashable, str] = {}

    def program(self, key: tuple, lower: Callable[[], jax.stages.Lowered]) -> tuple[Any, float]:
        """``(compiled executable, seconds spent compiling it now — 0.0 when cached)``."""
        exe = self._programs.get(key)
        if exe is not None:
            self._programs.move_to_end(key)
            return exe, 0.0
        t = time.perf_counter()
        lowered = lower()
        self._fingerprints[key] = fingerprint(lowered)
        exe = self._programs[key] = lowered.compile()
        self._compiles[key[:-1]] += 1
        while len(self._programs) > self.max_programs:
            self._programs.popitem(last=False)
        return exe, time.perf_counter() - t

    def compiles(self, match: Callable[[tuple], bool]) -> int:
        """Compilations so far (dropped entries included) of the keys ``match`` accepts (key minus its
        last item, the argument signature)."""
        return sum(n for k, n in self._compiles.items() if match(k))

    def fingerprints(self, match: Callable[[tuple], bool]) -> set[str]:
        """Fingerprints of the programs compiled under the keys ``match`` accepts."""
        return {f for k, f in self._fingerprints.items() if match(k)}

    def clear(self) -> None:
        """Drop the executables (the counts go on): for benchmarks that time compilation itself."""
        self._programs.clear()

    def reset(self) -> None:
        """Drop the executables, the counts and the fingerprints: a fresh process's cache (tests)."""
        self._programs.clear()
        self._compiles.clear()
        self._fingerprints.clear()


COMPILED = CompileCache()


def fingerprint(lowered: jax.stages.Lowered) -> str:
    """SHA-256 of a lowered program's text (no debug locations): equal programs, equal prints."""
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def signature(tree: Any) -> tuple:
    """Hashable shapes, dtypes and shardings of a pytree of arrays or ``ShapeDtypeStruct``s."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), jnp.result_type(a), getattr(a, "sharding", None)) for a in leaves)


def replicated(params: Any):
    """Where a program's small inputs and outputs live: replicated over the parameters' mesh, or on
    their one device (None: the parameters carry no sharding, e.g. NumPy arrays)."""
    leaf = jax.tree.leaves(params)[0]
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
        return NamedSharding(sh.mesh, PartitionSpec())
    if sh is not None and len(sh.device_set) == 1:
        return jax.sharding.SingleDeviceSharding(next(iter(sh.device_set)))
    return None


def abstract(tree: Any, sharding=None) -> Any:
    """``ShapeDtypeStruct``s of a pytree (an array's or struct's own sharding kept; ``sharding`` for
    the others)."""
    def one(a):
        own = getattr(a, "sharding", None) if isinstance(a, (jax.Array, jax.ShapeDtypeStruct)) else None
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else jnp.result_type(a),
                                    sharding=own or sharding)

    return jax.tree.map(one, tree)
