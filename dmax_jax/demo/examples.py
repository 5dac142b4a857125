"""The shipped demo models, the decoding geometry of the demo task and its example problems.

``base`` (dmax_jax/assets/demo/base) is a block-diffusion masked-diffusion model pretrained from scratch
on the arithmetic task (``dmax_jax.demo.task``), the stand-in for LLaDA2.0-mini; ``dmax`` is its OPUT
fine-tune, the stand-in for DMax. Both were made by ``tools/build_demo.py`` with the project's own
training loop. Real checkpoints use the same entry points with a model directory instead of a name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dmax_jax.decoding import STRATEGIES, model_defaults

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
MODEL_NAMES = ("base", "dmax")
# The generate: task the shipped models are trained and evaluated on (dmax_jax.demo.data.GENERATED_TASKS;
# the YAMLs under demo/configs name the same one).
DEMO_TASK = "arith_small"
# The decoders the demo compares (the paper's Table: threshold decoding vs SPD); a subset of
# dmax_jax.decoding.STRATEGIES, which also holds the LLaDA2 reference decoder the demo does not sweep.
DEMO_STRATEGIES = tuple(s for s in ("threshold", "spd") if s in STRATEGIES)
DEFAULT_THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5, 0.3, 0.0)


@dataclasses.dataclass(frozen=True)
class DemoDecode:
    """Decoding geometry of the demo task (prompts 44-63 tokens; answers <= 60 tokens + EOS on the first
    1,000 held-out problems).

    The first block starts at 32 * floor(P / 32) = 32 and holds the prompt tail; 64 generated
    positions cover every answer in at most three 32-token blocks. ``prompt_bucket`` 64 keeps the
    KV cache at 128 slots. ``spd_threshold`` is the τ_dec the demo shows by default; ``baseline_threshold``
    the threshold decoder's τ the paper compares against (0.95).
    """

    block_length: int = 32
    gen_length: int = 64
    prompt_bucket: int = 64
    accept_threshold: float = 0.9
    spd_threshold: float = 0.5
    baseline_threshold: float = 0.95
    batch_size: int = 50

    def generate_kwargs(self, strategy: str, threshold: float) -> dict[str, Any]:
        """Keyword arguments of ``dmax_jax.generate`` for one (strategy, τ) cell."""
        if strategy not in DEMO_STRATEGIES:
            raise ValueError(f"demo strategy {strategy!r} is not one of {DEMO_STRATEGIES}")
        kw = {"strategy": strategy, "block_length": self.block_length, "gen_length": self.gen_length,
              "threshold": float(threshold), "prompt_bucket": self.prompt_bucket}
        if strategy == "spd":
            kw["accept_threshold"] = self.accept_threshold
        return kw

    def default_threshold(self, strategy: str) -> float:
        """The τ each decoder is shown at: τ_dec for SPD, the paper's baseline τ for threshold decoding."""
        return self.spd_threshold if strategy == "spd" else self.baseline_threshold


DEMO_DECODE = DemoDecode()


def decode_defaults(strategy: str, decode: DemoDecode = DEMO_DECODE) -> dict[str, Any]:
    """The ``dmax_decode.json`` of a demo model directory: the task's prompt format, this geometry and
    the model's own decoder (``base``: threshold, ``dmax``: spd), so ``decode.py --model DIR`` decodes
    the demo models the way the demo does."""
    from dmax_jax.demo.task import GSM8K_PROMPT

    return {"format": model_defaults.FORMAT,
            "prompt_template": GSM8K_PROMPT.replace("{question}", model_defaults.PLACEHOLDER),
            "chat": True,
            "decode": {"strategy": strategy, "block_length": decode.block_length,
                       "gen_length": decode.gen_length, "prompt_bucket": decode.prompt_bucket,
                       "accept_threshold": decode.accept_threshold, "dtype": "float32"},
            "strategies": {"threshold": {"threshold": decode.baseline_threshold},
                           "spd": {"threshold": decode.spd_threshold},
                           "llada2": {"threshold": decode.baseline_threshold}}}


def write_decode_defaults(model_dir: str | os.PathLike, strategy: str,
                          decode: DemoDecode = DEMO_DECODE) -> Path:
    """Write :func:`decode_defaults` into ``model_dir`` (``tools/build_demo.py`` after each export)."""
    import json

    path = Path(model_dir) / model_defaults.FILE_NAME
    path.write_text(json.dumps(decode_defaults(strategy, decode), indent=2) + "\n", encoding="utf-8")
    return path


def default_model_dir(name: str = "dmax") -> Path:
    """Directory of the shipped demo model ``name`` ("base" or "dmax"), checked to be loadable."""
    if name not in MODEL_NAMES:
        raise ValueError(f"demo model {name!r} is not one of {MODEL_NAMES}")
    path = ASSET_DIR / name
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"shipped demo model {path} is incomplete (missing "
                                f"{missing or ['*.safetensors']}); rebuild it with "
                                "`python tools/build_demo.py`")
    return path


def load_demo_model(name_or_dir: str | os.PathLike = "dmax", dtype: str = "float32") -> Any:
    """A ``Pretrained`` from a shipped model name or any HF directory (the real checkpoints too)."""
    from dmax_jax.pretrained import load_pretrained

    name = os.fspath(name_or_dir)
    path = default_model_dir(name) if name in MODEL_NAMES else Path(name)
    model = load_pretrained(path, dtype=dtype)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer files; the demo needs one")
    return model


def test_problems(n: int = 500, seed: int = 0, task: str = DEMO_TASK) -> list[dict[str, str]]:
    """The held-out problems of ``task`` (a ``generate:`` task name; default the shipped models' task)
    as ``{"question", "answer"}``, never in any training split."""
    from dmax_jax.demo.data import GENERATED_TASKS
    from dmax_jax.demo.task import generate_problems

    if task not in GENERATED_TASKS:
        raise ValueError(f"task must be one of {sorted(GENERATED_TASKS)}, got {task!r}")
    phrasing, scale = GENERATED_TASKS[task]
    return generate_problems(n, seed=seed, split="test", phrasing=phrasing, scale=scale)


test_problems.__test__ = False  # a data function, not a pytest test


def write_test_jsonl(path: str | os.PathLike, n: int = 1000, seed: int = 0) -> Path:
    """Write the held-out split as GSM8K jsonl (what ``get_benchmark("gsm8k").load`` reads)."""
    from dmax_jax.demo.task import write_jsonl

    return write_jsonl(path, test_problems(n, seed))


def example_questions(n: int = 4) -> list[str]:
    """The questions ``python decode.py`` shows by default (the first ``n`` held-out problems)."""
    return [p["question"] for p in test_problems(n)]


def decode_examples(model: Any = "dmax", *, n: int = 4, strategy: str = "spd", threshold: float | None = None,
                    decode: DemoDecode = DEMO_DECODE) -> list[dict[str, Any]]:
    """Decode the first ``n`` held-out problems; one dict per problem (question, response, gold,
    correct, nfe, tokens, tpf). ``model``: a ``Pretrained``, a shipped name or an HF directory."""
    from dmax_jax.decoding import generate
    from dmax_jax.eval.benchmarks import get_benchmark
    from dmax_jax.eval.harness import build_input_ids

    pretrained = model if hasattr(model, "params") else load_demo_model(model)
    bench = get_benchmark("gsm8k")
    rows = test_problems(n)
    tau = decode.default_threshold(strategy) if threshold is None else threshold
    ids = [build_input_ids(pretrained.tokenizer, bench.prompt(r)) for r in rows]
    res = generate(pretrained, ids, **decode.generate_kwargs(strategy, tau))
    out = []
    for i, row in enumerate(rows):
        text = pretrained.tokenizer.decode(res.token_ids[i], skip_special_tokens=True)
        out.append({"question": row["question"], "response": text, "gold": bench.gold(row),
                    "correct": bool(bench.score(text, row).correct), "nfe": res.nfe[i],
                    "tokens": res.tokens_ref[i], "tpf": res.tpf[i]})
    return out


def format_examples(results: Sequence[Mapping[str, Any]]) -> str:
    """Human-readable block per decoded example."""
    parts = []
    for i, r in enumerate(results):
        mark = "correct" if r["correct"] else f"wrong (gold {r['gold']})"
        parts.append(f"[{i}] {r['question']}\n{r['response']}\n-> {mark}; NFE {r['nfe']}, "
                     f"{r['tokens']} tokens, TPF {r['tpf']:.2f}")
    return "\n\n".join(parts)
