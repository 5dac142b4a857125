"""Evaluation loop: prompts → chat template → batched generation → scoring → resumable jsonl + summary.

Why resumable: a full GSM8K run at gen length 2048 takes hours; every batch is appended and flushed
to ``samples.jsonl`` so an interrupted run continues where it stopped. A truncated last line (crash
mid-write) is dropped and the file rewritten; any other corrupt line is an error. ``run_config.json``
pins benchmark, chat mode and decode config so a resume never mixes two configurations.

Accounting (algorithm §6): per sample ``tpf = tokens_ref / nfe`` (non-EOS generated tokens over all
forwards incl. prefill); reported TPF is the **mean of per-sample ratios**. TPS is the mean of
per-sample ``tokens_ref / seconds`` where ``seconds`` is the wall time of the ``generate`` call that
produced the sample (the reference runs batch 1; with larger batches this is per-sequence speed,
see ``throughput_tps`` for aggregate tokens per second).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dmax_jax.data.chat import apply_chat_template, encode
from dmax_jax.eval.benchmarks import Benchmark, EvalError, Row, get_benchmark

SAMPLES_FILE, SUMMARY_FILE, RUN_CONFIG_FILE = "samples.jsonl", "summary.json", "run_config.json"
_RESULT_FIELDS = ("token_ids", "nfe", "tokens", "tokens_ref", "tpf", "seconds")


def build_input_ids(tokenizer: Any, user_message: str, chat: bool = True) -> list[int]:
    """Token ids of one zero-shot prompt: chat template with a generation prompt, no extra specials."""
    if chat:
        return apply_chat_template(tokenizer, [{"role": "user", "content": user_message}],
                                   add_generation_prompt=True)
    return encode(tokenizer, user_message)


def _check_result(result: Any, batch: int) -> None:
    """Fail loudly on a decoder that breaks the GenerateResult contract (docs/internals.md)."""
    missing = [f for f in _RESULT_FIELDS if not hasattr(result, f)]
    if missing:
        raise TypeError(f"generate_fn returned {type(result).__name__} without fields {missing}")
    for field in _RESULT_FIELDS[:-1]:
        rows = len(getattr(result, field))
        if rows != batch:
            raise ValueError(f"GenerateResult.{field} has {rows} rows, expected {batch}")
    for i in range(batch):
        if result.nfe[i] <= 0:
            raise ValueError(f"GenerateResult.nfe[{i}] = {result.nfe[i]}: every sample needs >= 1 forward")
        if not math.isclose(result.tpf[i], result.tokens_ref[i] / result.nfe[i], rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"GenerateResult.tpf[{i}] = {result.tpf[i]} != tokens_ref/nfe "
                             f"= {result.tokens_ref[i]}/{result.nfe[i]}")
    if not result.seconds >= 0:
        raise ValueError(f"GenerateResult.seconds = {result.seconds} must be >= 0")


_RECORD_TYPES: dict[str, Any] = {"index": int, "prompt": str, "correct": bool, "nfe": int, "tokens": int,
                                 "tokens_ref": int, "tpf": (int, float), "seconds": (int, float),
                                 "batch_id": int}


def _parse_record(line: bytes) -> dict:
    """One samples.jsonl line as a record with every field ``summarize`` needs (ValueError if not)."""
    if not line.endswith(b"\n"):
        raise ValueError("line not terminated")
    record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    bad = [k for k, t in _RECORD_TYPES.items()
           if not isinstance(record.get(k), t) or (t is int and isinstance(record.get(k), bool))]
    if bad:
        raise ValueError(f"fields {bad} missing or of the wrong type")
    if record["nfe"] < 1 or record["index"] < 0:
        raise ValueError("nfe must be >= 1 and index >= 0")
    return record


def load_samples(path: str) -> dict[int, dict]:
    """Records already written, by index. A truncated/corrupt **last** line is dropped and the file
    rewritten without it (a crash mid-write; that sample is decoded again); a corrupt earlier line
    or a duplicated index raises :class:`EvalError` naming ``file:line``."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as fh:
        lines = fh.readlines()
    records: dict[int, dict] = {}
    keep = len(lines)
    for lineno, line in enumerate(lines, start=1):
        try:
            record = _parse_record(line)
        except ValueError as exc:
            if lineno == len(lines):
                keep = lineno - 1
                break
            raise EvalError(f"{path}:{lineno}: corrupt sample record ({str(exc)[:80]}); "
                            "fix or delete the file") from None
        if record["index"] in records:
            raise EvalError(f"{path}:{lineno}: duplicate sample index {record['index']}")
        records[record["index"]] = record
    if keep < len(lines):
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.writelines(lines[:keep])
        os.replace(tmp, path)
    return records


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each leaf that differs (nested dicts by dotted key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_out_dir(out_dir: str | os.PathLike, config: dict) -> int:
    """Check, without writing, that ``out_dir`` can take this run (see :func:`check_run_config`);
    returns how many samples it already holds. The CLI calls it before loading the model."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"--out {out_dir} exists and is not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise EvalError(f"--out {out_dir}: cannot write there ({existing} is not a writable directory)")
    done = load_samples(os.path.join(out_dir, SAMPLES_FILE))
    check_run_config(out_dir, config, has_samples=bool(done), write=False)
    return len(done)


def check_run_config(out_dir: str, config: dict, has_samples: bool, write: bool = True) -> None:
    """Refuse to mix two configurations in one ``out_dir``: an existing ``run_config.json`` must equal
    ``config``, unless no sample was written yet (a run that failed before its first sample may be
    retried with other settings); then, and for a new directory, ``config`` is (re)written."""
    path = os.path.join(out_dir, RUN_CONFIG_FILE)
    if os.path.exists(path) and has_samples:
        try:
            with open(path, encoding="utf-8") as fh:
                previous = json.load(fh)
        except ValueError as exc:
            raise EvalError(f"{path} is corrupt ({exc}); delete it or use a fresh --out directory") from None
        if previous != config:
            changed = "; ".join(_differences(previous, config)[:4])
            raise EvalError(f"{path} records a different run ({changed}); use a fresh --out directory "
                            "or the settings of that run")
        return
    if not write:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def hardware_string() -> str:
    """``"8x NVIDIA H200 (gpu)"``-style description of the JAX devices."""
    import jax

    devices = jax.devices()
    return f"{len(devices)}x {devices[0].device_kind} ({devices[0].platform})"


def summarize(benchmark: str, records: Sequence[dict], decode_config: dict, hardware: str) -> dict:
    """Accuracy, TPF (mean of per-sample ratios), TPS and counts over ``records``."""
    n = len(records)
    if n == 0:
        raise ValueError("no samples to summarise")
    batch_seconds = {r["batch_id"]: r["seconds"] for r in records}
    total_time = sum(batch_seconds.values())
    timed = all(r["seconds"] > 0 for r in records)  # a decoder that reports no time gives no TPS
    return {
        "benchmark": benchmark,
        "samples": n,
        "accuracy": sum(bool(r["correct"]) for r in records) / n,
        "tpf": sum(r["tokens_ref"] / r["nfe"] for r in records) / n,
        "tps": sum(r["tokens_ref"] / r["seconds"] for r in records) / n if timed else None,
        "throughput_tps": sum(r["tokens_ref"] for r in records) / total_time if timed else None,
        "mean_nfe": sum(r["nfe"] for r in records) / n,
        "mean_tokens": sum(r["tokens"] for r in records) / n,
        "hardware": hardware,
        "decode_config": dict(decode_config),
    }


def markdown_table(summary: dict) -> str:
    def fmt(x: float | None, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    head = "| benchmark | samples | accuracy (%) | TPF | TPS | mean NFE | mean tokens | hardware |"
    row = (f"| {summary['benchmark']} | {summary['samples']} | {100 * summary['accuracy']:.2f} | "
           f"{summary['tpf']:.3f} | {fmt(summary['tps'], '.1f')} | {summary['mean_nfe']:.1f} | "
           f"{summary['mean_tokens']:.1f} | {summary['hardware']} |")
    return "\n".join([head, "|" + "---|" * 8, row])


def run_config(bench: Benchmark, decode_config: dict, chat: bool) -> dict:
    """What ``run_config.json`` pins for a resume: benchmark, chat mode and the decode config."""
    return {"benchmark": bench.name, "chat": chat, "decode_config": json.loads(json.dumps(decode_config))}


def _resume(bench: Benchmark, rows: list[Row], out_dir: str,
            config: dict) -> tuple[dict[int, dict], list[str]]:
    """Records already in ``out_dir`` (checked against this run) and every row's prompt."""
    os.makedirs(out_dir, exist_ok=True)
    samples_path = os.path.join(out_dir, SAMPLES_FILE)
    done = load_samples(samples_path)
    check_run_config(out_dir, config, has_samples=bool(done))
    prompts = [bench.prompt(row) for row in rows]
    for index, record in done.items():
        if index < len(rows) and record.get("prompt") != prompts[index]:
            raise EvalError(f"{samples_path}: record {index} was made from a different prompt; "
                            "the data file changed since that run — use a fresh --out directory")
    return done, prompts


def _record(bench: Benchmark, row: Row, index: int, prompt: str, response: str, result: Any, j: int,
            batch_id: int, batch_size: int) -> dict:
    score = bench.score(response, row)
    return {
        "index": index, "prompt": prompt, "response": response, "extracted": score.extracted,
        "gold": bench.gold(row), "correct": bool(score.correct), "detail": score.detail,
        "nfe": int(result.nfe[j]), "tokens": int(result.tokens[j]),
        "tokens_ref": int(result.tokens_ref[j]), "tpf": float(result.tpf[j]),
        "seconds": float(result.seconds), "batch_id": batch_id, "batch_size": batch_size,
    }


def run_eval(benchmark: Benchmark | str, rows: Sequence[Row], generate_fn: Callable[[list[list[int]]], Any],
             tokenizer: Any, *, out_dir: str | os.PathLike, batch_size: int, decode_config: dict,
             limit: int | None = None, chat: bool = True, hardware: str | None = None,
             verbose: bool = True) -> dict:
    """Evaluate ``rows[:limit]`` and return the summary (also written to ``out_dir/summary.json``).

    ``generate_fn(list of prompt id lists) -> GenerateResult`` (docs/internals.md); ``decode_config``
    is recorded, not interpreted (the caller bakes it into ``generate_fn``). Indices already present in
    ``out_dir/samples.jsonl`` are skipped. ``hardware`` defaults to :func:`hardware_string`.
    ``verbose``: a tqdm bar on stderr while decoding and the summary table on stdout at the end.
    """
    from tqdm.auto import tqdm

    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1 or None, got {limit}")
    rows = list(rows[:limit] if limit is not None else rows)
    out_dir = os.fspath(out_dir)
    done, prompts = _resume(bench, rows, out_dir, run_config(bench, decode_config, chat))
    samples_path = os.path.join(out_dir, SAMPLES_FILE)
    pending = [i for i in range(len(rows)) if i not in done]
    next_batch_id = 1 + max((r.get("batch_id", -1) for r in done.values()), default=-1)
    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc=bench.name, unit="sample",
               disable=not verbose, file=sys.stderr, dynamic_ncols=True)
    with bar, open(samples_path, "a", encoding="utf-8") as fh:
        for start in range(0, len(pending), batch_size):
            indices = pending[start:start + batch_size]
            result = generate_fn([build_input_ids(tokenizer, prompts[i], chat) for i in indices])
            _check_result(result, len(indices))
            lines = []
            for j, i in enumerate(indices):
                response = tokenizer.decode(list(result.token_ids[j]), skip_special_tokens=True)
                done[i] = _record(bench, rows[i], i, prompts[i], response, result, j, next_batch_id,
                                  len(indices))
                lines.append(json.dumps(done[i], ensure_ascii=False) + "\n")
            fh.writelines(lines)
            fh.flush()
            os.fsync(fh.fileno())
            next_batch_id += 1
            finished = [done[k] for k in done if k < len(rows)]
            bar.set_postfix(acc=f"{sum(r['correct'] for r in finished) / len(finished):.1%}",
                            tpf=f"{sum(r['tpf'] for r in finished) / len(finished):.2f}", refresh=False)
            bar.update(len(indices))
    records = [done[i] for i in range(len(rows))]
    summary = summarize(bench.name, records, decode_config, hardware or hardware_string())
    with open(os.path.join(out_dir, SUMMARY_FILE), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    if verbose:
        print(markdown_table(summary))
    return summary
