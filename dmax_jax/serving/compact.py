"""The engine's compaction setting: whether its forwards run for the rows that need them only.

The mechanism (gather the needed rows into the smallest static width, run, scatter back) is the
block step's, in :mod:`dmax_jax.decoding.compact`; this module decides ``compact="auto"`` for the
platform the engine's programs are compiled for (``dmax_jax.platforms.platform_of`` the parameters,
never the host's default backend, so an ahead-of-time compile for a GPU picks the GPU's setting).
"""

from __future__ import annotations

from typing import Any

from dmax_jax.decoding.compact import compact_widths, compacted, put_rows, take_rows
from dmax_jax.platforms import platform_of

__all__ = ["AUTO_COMPACT", "compact_widths", "compacted", "put_rows", "resolve_compact", "take_rows"]

# ``compact="auto"``: on where forwards are compute-bound at serving widths. A GPU or TPU reads the
# weights once per forward whatever its width at these batch sizes, and a compacted forward adds a
# copy of the gathered rows' KV cache: off there until bench/engine.py shows otherwise on the device.
AUTO_COMPACT = {"cpu": True, "gpu": False, "tpu": False}


def resolve_compact(setting: bool | str, target: Any) -> bool:
    """``True`` / ``False`` as given; ``"auto"``: ``AUTO_COMPACT`` of the target platform (``target``:
    a platform name, or the parameters / their shapes, whose devices name it)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"compact must be True, False or 'auto', got {setting!r}")
    platform = target if isinstance(target, str) else platform_of(target)
    if platform not in AUTO_COMPACT:
        raise ValueError(f"compact='auto' knows the platforms {tuple(AUTO_COMPACT)}, not {platform!r}")
    return AUTO_COMPACT[platform]
