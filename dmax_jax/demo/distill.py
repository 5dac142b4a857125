"""Self-distilled OPUT data (algorithm §3: DMax's answers are the base model's own generations).

Why: DMax's OPUT data are LLaDA2.0-mini's own generations, not gold answers, so the fine-tune sharpens
the base model's own distribution. ``tools/build_demo.py`` and the quick demo both make their OPUT data
here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dmax_jax.demo.examples import DEMO_DECODE, DemoDecode, load_demo_model


def self_distill(model: Any, rows: Sequence[Mapping[str, Any]], *, strategy: str = "threshold",
                 threshold: float | None = None, decode: DemoDecode = DEMO_DECODE,
                 progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Replace each chat row's assistant turn by ``model``'s own decoded answer to its user turn.

    ``rows``: ``{"messages": [user, assistant]}``. Returns ``(rows, stats)``; stats counts rows,
    EOS-terminated answers and answers whose final ``#### N`` equals the original one (kept either way,
    as in the reference data). ``progress`` shows a tqdm bar over the rows.
    """
    from tqdm.auto import tqdm

    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import build_input_ids

    for i, r in enumerate(rows):
        if [m.get("role") for m in r.get("messages", [])] != ["user", "assistant"]:
            raise ValueError(f"self_distill: row {i} is not one user + one assistant turn")
    bench = get_benchmark("gsm8k")
    tau = decode.baseline_threshold if threshold is None else threshold
    kw = decode.generate_kwargs(strategy, tau)
    out, agree, finished = [], 0, 0
    with tqdm(total=len(rows), desc="distill", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), decode.batch_size):
            chunk = rows[start:start + decode.batch_size]
            ids = [build_input_ids(model.tokenizer, r["messages"][0]["content"]) for r in chunk]
            res = generate(model, ids, batch_size=decode.batch_size, **kw)
            for i, r in enumerate(chunk):
                text = model.tokenizer.decode(res.token_ids[i], skip_special_tokens=True).strip()
                finished += int(res.tokens_ref[i] < decode.gen_length)
                agree += int(bench.score(text, {"answer": r["messages"][1]["content"]}).correct)
                out.append({"messages": [dict(r["messages"][0]), {"role": "assistant", "content": text}]})
            bar.update(len(chunk))
    stats = {"rows": len(out), "strategy": strategy, "threshold": tau, "finished": finished,
             "answer_agrees_with_gold": agree}
    return out, stats


def distill_file(base: Any, train_file: str | os.PathLike, out_dir: str | os.PathLike, n: int, *,
                 resume: bool = False, log: Any = print, progress: bool = True) -> Path:
    """``base``'s own answers to the first ``n`` chat rows of ``train_file`` → ``out_dir/train.jsonl``
    (+ ``stats.json``): the OPUT data of ``tools/build_demo.py`` and of the quick demo.
    ``base``: a ``Pretrained``, a shipped name or an HF directory. ``resume`` reuses an existing file
    written for the same ``n`` (``stats.json`` records it)."""
    from dmax_jax.demo.task import write_jsonl

    out = Path(out_dir)
    result, stats_file = out / "train.jsonl", out / "stats.json"
    if (resume and result.is_file() and stats_file.is_file()
            and json.loads(stats_file.read_text())["rows"] == n):
        return result
    with open(train_file, encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        raise ValueError(f"distill: {n} rows requested but {train_file} has only {len(rows)} rows")
    model = base if hasattr(base, "params") else load_demo_model(base)
    new_rows, stats = self_distill(model, rows, progress=progress)
    write_jsonl(result, new_rows)
    stats_file.write_text(json.dumps(stats, indent=2) + "\n")
    if log:
        log(f"distill: {n} trajectories of base → {result} ({stats})")
    return result
