"""The per-tensor finiteness check of checkpoint loading.

Why while streaming: a NaN or inf in one weight makes every forward produce garbage (decode "works"
and prints nonsense, training stops with a non-finite loss far from the cause). Checking each tensor
as it is read costs one pass over data already in cache, and the error can name the tensor and file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def check_finite(x: np.ndarray, name: str, file: Path, error: type[Exception]) -> None:
    """Raise ``error`` naming ``name`` in ``file`` when ``x`` holds a NaN or an infinity."""
    if x.dtype.kind not in "fV" and not str(x.dtype).startswith("bfloat"):
        return
    if np.isfinite(x).all():
        return
    bad = ~np.isfinite(x)
    if bad.any():
        count, first = int(bad.sum()), np.unravel_index(int(np.argmax(bad)), x.shape)
        raise error(f"tensor {name} in {file} holds {count} non-finite value{'s' * (count != 1)} "
                    f"(first at index {list(map(int, first))}: {x[first]}); the checkpoint is corrupt")
