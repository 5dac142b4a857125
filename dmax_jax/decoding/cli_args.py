"""The decode flags every command line shares (decode.py, the eval CLI, the server), built from DecodeConfig.

    parser = argparse.ArgumentParser(...)
    add_decode_args(parser, defaults=DecodeConfig(gen_length=2048))
    args = parser.parse_args()
    config = decode_config_from_args(args, base=DecodeConfig(gen_length=2048))   # exits 2 on bad input

Flags default to ``None`` ("not given") so that a caller can layer defaults (DecodeConfig defaults
< a model directory's ``dmax_decode.json`` < flags given on the command line); the help text shows
the effective default of ``defaults``. A value outside its range ends the program with one line
naming the flag and the allowed range (exit status 2, argparse's usage-error status), no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from dmax_jax.decoding.config import DTYPE_NAMES, SOFT_IMPLS, STRATEGIES, DecodeConfig, DecodeConfigError
from dmax_jax.model.quant import WEIGHT_MODES

# field -> (type, help); choices come from the config module
_FLAGS: dict[str, tuple[Any, str]] = {
    "strategy": (str, "decoder: spd (Soft Parallel Decoding), threshold (dInfer threshold decoding) or "
                      "llada2 (the LLaDA2 HF generate schedule)"),
    "block_length": (int, "tokens per block"),
    "gen_length": (int, "tokens to generate at most (the result never holds more)"),
    "threshold": (float, "tau_dec of spd / tau of threshold and llada2, in [0, 1]"),
    "accept_threshold": (float, "tau_acc of spd's stop rule, in [0, 1]"),
    "steps": (int, "spd: forward cap per block (unset: block length); llada2: steps per block (unset: "
                   "block length, capped at gen length); threshold takes none"),
    "temperature": (float, "sampling temperature (0 = greedy)"),
    "top_p": (float, "sampled rows draw from the smallest most-likely set holding this probability mass, "
                     "in (0, 1] (1 = off)"),
    "sample_top_k": (int, "sampled rows draw from their k most likely tokens (0 = off)"),
    "seed": (int, "sampling seed (rows draw from fold_in(seed, row index, forward index))"),
    "top_k": (int, "spd soft-embedding mixing over the top k predictions"),
    "soft_impl": (str, "soft-embedding kernel"),
    "dtype": (str, "compute dtype (and parameter dtype where the command loads a model)"),
    "weights": (str, "weights as loaded (native) or int8 weight-only (per-channel scales, quantized at "
                     "load)"),
    "max_unroll": (int, "threshold: forwards per progress check at most"),
    "expected_tpf": (int, "threshold: expected tokens per forward of the unrolling rule"),
    "prompt_bucket": (int, "prompts are padded to a multiple of this (unset: max(128, block length))"),
}
_CHOICES = {"strategy": STRATEGIES, "soft_impl": SOFT_IMPLS, "dtype": DTYPE_NAMES, "weights": WEIGHT_MODES}
CLI_FIELDS = tuple(_FLAGS)


def flag_name(field: str) -> str:
    """``accept_threshold`` -> ``--accept-threshold``."""
    return "--" + field.replace("_", "-")


def add_decode_args(parser: argparse.ArgumentParser, defaults: DecodeConfig | None = None, *,
                    fields: Iterable[str] = CLI_FIELDS, group_title: str = "decoding") -> None:
    """Add one flag per DecodeConfig field in ``fields``; help shows the default from ``defaults``."""
    defaults = defaults or DecodeConfig()
    group = parser.add_argument_group(group_title)
    for field in fields:
        if field not in _FLAGS:
            raise ValueError(f"no command-line flag for DecodeConfig field {field!r}; known: {CLI_FIELDS}")
        typ, text = _FLAGS[field]
        default = getattr(defaults, field)
        shown = "unset" if default is None else default
        kw: dict[str, Any] = {"type": typ, "default": None, "dest": field,
                              "help": f"{text} (default: {shown})"}
        if field in _CHOICES:
            kw["choices"] = _CHOICES[field]
            kw["metavar"] = "{" + ",".join(_CHOICES[field]) + "}"
        group.add_argument(flag_name(field), **kw)


def given_fields(args: argparse.Namespace, fields: Iterable[str] = CLI_FIELDS) -> dict[str, Any]:
    """The decode flags given on the command line (``field -> value``)."""
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def config_error_line(err: DecodeConfigError, prog: str) -> str:
    """One line naming the flag (or the field, if it has no flag) and the allowed range."""
    name = flag_name(err.field) if err.field in _FLAGS else err.field
    return f"{prog}: error: {name}: {err.reason}"


def decode_config_from_args(args: argparse.Namespace, base: DecodeConfig | None = None, *,
                            prog: str | None = None, **fixed: Any) -> DecodeConfig:
    """``base`` with the given flags (and ``fixed`` fields) applied; bad values exit with status 2."""
    base = base or DecodeConfig()
    try:
        return base.replace(**{**given_fields(args), **fixed})
    except DecodeConfigError as e:
        print(config_error_line(e, prog or _prog()), file=sys.stderr)
        raise SystemExit(2) from None


def _prog() -> str:
    import os

    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "decode"
