"""The demo's data step: ``generate:TASK[:N]`` entries of a training config's ``data.paths`` → files.

Why here and not in the training library: training reads files and never imports the demo; a client
(``train.py``, ``tools/build_demo.py``, the quick demo) calls :func:`materialize` before ``train`` for a
config that asks for generated demo data. ``generate:arith[:N]`` (or ``generate:arith_varied[:N]``,
several wordings per solution step; ``generate:arith_small[:N]``, varied wordings over small numbers,
the shipped demo's task) writes N (default 2000) train problems as chat rows (user turn = the algorithm §5.4
GSM8K prompt, as the demo evaluates) plus the task tokenizer (640 tokens, 768 with whole numbers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dmax_jax.training.config import TrainConfig, TrainConfigError

GENERATE_PREFIX = "generate:"
# generate:<task> names → the arithmetic task's (solution phrasing, number scale): dmax_jax.demo.task's
# PHRASINGS and SCALES.
GENERATED_TASKS = {"arith": ("fixed", "gsm"), "arith_varied": ("varied", "gsm"),
                   "arith_small": ("varied", "small")}
DEFAULT_PROBLEMS = 2000
TOKENIZER_PROBLEMS = 5000  # the BPE is trained on at most this many train problems


def parse_spec(spec: str) -> tuple[tuple[str, str], int]:
    """``generate:TASK[:N]`` → ``((phrasing, scale), N)``; anything else is a ``TrainConfigError`` naming
    data.paths."""
    parts = spec[len(GENERATE_PREFIX):].split(":") if spec.startswith(GENERATE_PREFIX) else []
    if (not parts or parts[0] not in GENERATED_TASKS or len(parts) > 2
            or (len(parts) == 2 and not parts[1].isdigit())):
        raise TrainConfigError(f"data.paths: {spec!r} is not 'generate:TASK' or 'generate:TASK:N' with TASK "
                               f"one of {sorted(GENERATED_TASKS)}")
    n = int(parts[1]) if len(parts) == 2 else DEFAULT_PROBLEMS
    if n < 1:
        raise TrainConfigError(f"data.paths: {spec!r} asks for {n} problems")
    return GENERATED_TASKS[parts[0]], n


def generate_task_data(spec: str, out: Path) -> tuple[str, str]:
    """Write the data of ``spec`` under ``out``: ``(train.jsonl, tokenizer dir)``.

    Deterministic; reused when a previous call wrote the same spec (``stamp.json``). On a multi-host
    run process 0 writes and every process waits for it.
    """
    import jax

    from dmax_jax.demo.task import chat_row, generate_problems, write_jsonl
    from dmax_jax.demo.tokenizer import build_task_tokenizer

    (phrasing, scale), n = parse_spec(spec)
    out = Path(out)
    train_file, tok_dir, stamp = out / "train.jsonl", out / "tokenizer", out / "stamp.json"
    if jax.process_index() == 0 and not (stamp.is_file() and json.loads(stamp.read_text()) == {"spec": spec}):
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(train_file, (chat_row(p) for p in generate_problems(n, seed=0, split="train",
                                                                        phrasing=phrasing, scale=scale)))
        build_task_tokenizer(tok_dir, n_problems=min(n, TOKENIZER_PROBLEMS), seed=0, phrasing=phrasing,
                             scale=scale)
        stamp.write_text(json.dumps({"spec": spec}))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dmax_jax.demo.generate_task_data")
    return str(train_file), str(tok_dir)


def needs_materialize(cfg: TrainConfig) -> bool:
    """Whether ``cfg.data.paths`` names generated demo data."""
    return any(p.startswith(GENERATE_PREFIX) for p in cfg.data.paths)


def materialize(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its one ``generate:`` path replaced by the written file (under
    ``run.out_dir/task_data``) and ``model.tokenizer`` defaulting to the generated tokenizer."""
    paths = list(cfg.data.paths)
    generated = [i for i, p in enumerate(paths) if p.startswith(GENERATE_PREFIX)]
    if len(generated) > 1:
        raise TrainConfigError("data.paths: at most one generate: entry")
    if not generated:
        return cfg
    i = generated[0]
    paths[i], tok_dir = generate_task_data(paths[i], Path(cfg.run.out_dir).absolute() / "task_data")
    model = cfg.model if cfg.model.tokenizer else dataclasses.replace(cfg.model, tokenizer=tok_dir)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, paths=tuple(paths)))
