"""Training metrics sinks: JSONL (one object per logged step), TensorBoard (tensorboardX) and a tqdm bar.

Why a small class: the loop produces one flat ``{name: number}`` dict per logged step; where it goes
(files only on process 0, a progress bar only when attached to a terminal or asked for) is decided
here once, so the loop stays about training.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

BAR_KEYS = (("loss", "loss", "{:.4f}"), ("grad_norm", "gnorm", "{:.3g}"), ("lr", "lr", "{:.2e}"),
            ("tokens_per_sec", "tok/s", "{:.0f}"))


def _jsonable(value: Any) -> Any:
    """Plain Python numbers (numpy scalars unwrapped); non-finite floats become strings (JSON has none)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of ``path`` with ``step <= last_step`` (and drop a torn last line); returns how many
    rows were dropped. A missing file is nothing to do."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill during the write
        if line.endswith("\n") and isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsWindow:
    """The per-micro-step metrics between two logged steps → one logged row.

    Why: losses are averaged over the window, while ``grad_norm`` / ``lr`` are the last update's and
    counts are summed. Throughput is timed from the end of this run's first step, so compilation is
    not counted.
    """

    def __init__(self) -> None:
        self._values: dict[str, list[float]] = {}
        self._t0 = math.nan
        self._tokens = 0.0

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._values.setdefault(k, []).append(v)
        now = time.time()
        if math.isnan(self._t0):
            self._t0 = now
        else:
            self._tokens += metrics["tokens"]

    def row(self, **extra: Any) -> dict[str, Any]:
        """The window's row (``extra`` added), then an empty window."""
        w = self._values
        row = {k: float(np.mean(v)) for k, v in w.items() if k not in ("tokens", "valid_sequences")}
        row.update(grad_norm=w["grad_norm"][-1], lr=w["lr"][-1], tokens=int(sum(w["tokens"])),
                   valid_sequences=int(sum(w["valid_sequences"])), **extra)
        now = time.time()
        if self._tokens:
            row["tokens_per_sec"] = self._tokens / max(now - self._t0, 1e-9)
            self._t0, self._tokens = now, 0.0
        self._values = {}
        return row


class MetricsWriter:
    """Write metric rows to ``<out_dir>/metrics.jsonl`` and TensorBoard ``<out_dir>/tensorboard``.

    Only the writing process (``enabled=True``, process 0 in the loop) touches files. Appends to an
    existing JSONL so a resumed run continues the same file (rows carry their step); rows past
    ``initial_step`` (written after the checkpoint being resumed, e.g. before a ``kill -9``) and a torn
    last line are dropped first, so every step appears once.
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True, jsonl: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, total_steps: int = 0,
                 initial_step: int = 0):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            truncate_jsonl(self.out_dir / "metrics.jsonl", initial_step)
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.out_dir / "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                             dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step`` in every enabled sink."""
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", float(v), int(step))
            self._tb.flush()
        if self._bar is not None:
            post = {label: fmt.format(float(metrics[k])) for k, label, fmt in BAR_KEYS if k in metrics}
            self._bar.set_postfix(post, refresh=False)

    def message(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
