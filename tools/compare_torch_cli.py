"""Command line of tools/compare_torch.py: flags with their defaults, and every check that can run
before any weights load (flag ranges via ``DecodeConfig``, both HF directories, their config.json,
the torch side's ``auto_map`` code, lengths against the model's positions).

Kept apart from the comparison itself so that each file stays short; the parity tool imports it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from dmax_jax.checkpoint.hf import CheckpointNotFoundError
from dmax_jax.cli import OneLineParser
from dmax_jax.config import ModelConfigError
from dmax_jax.decoding.cli_args import add_decode_args, decode_config_from_args
from dmax_jax.decoding.config import DecodeConfig, DecodeConfigError

DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
PERTURB_RE = re.compile(r"^\s*([\w.]+)\[([\d,\s]+)\]\s*\+=\s*([-+0-9.eE]+)\s*$")
PROG = "compare_torch.py"
# The llada2 decode knobs of the comparison, validated by DecodeConfig like every other command line.
DECODE_DEFAULTS = {"block_length": 32, "gen_length": 64, "threshold": 0.95, "steps": None}


def _ranged(cast: Any, ok: Any, want: str) -> Any:
    """An argparse ``type`` that parses with ``cast`` and accepts only values with ``ok(value)``."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")
        return value
    return parse


_count = _ranged(int, lambda v: v >= 1, "an integer >= 1")
_seed = _ranged(int, lambda v: v >= 0, "an integer >= 0 (a numpy seed)")
_tolerance = _ranged(float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def _perturbation(text: str) -> str:
    if not PERTURB_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME[i,j,...]+=DELTA")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description="Parity check of dmax_jax against the PyTorch model of the same HF "
                "directory (loaded through its auto_map remote code): logits under the three masks and "
                "from inputs_embeds, and llada2 decoding token for token. Exit 0 PASS, 1 FAIL, 2 bad input.")
    add = p.add_argument
    add("--hf-dir", required=True, metavar="DIR",
        help="HF directory (config.json with auto_map, safetensors, remote code)")
    add("--torch-hf-dir", default=None, metavar="DIR", help="load the torch side from here instead "
        "(default: --hf-dir)")
    add("--dtype", choices=sorted(DEFAULT_TOL), default="float32", help="dtype of both sides "
        "(default: float32)")
    add("--torch-device", default="cpu", help="torch device (default: cpu)")
    add("--torch-threads", type=_count, default=None, metavar="N", help="torch.set_num_threads (1 is much "
        "faster for tiny test models on a busy CPU; default: torch's choice)")
    add("--seq-len", type=_count, default=64, metavar="N", help="tokens per row; noisy_clean uses 2 x "
        "seq-len tokens at positions 0..seq-len-1 (default: 64)")
    add("--batch", type=_count, default=2, metavar="N", help="rows per case (default: 2)")
    add("--seed", type=_seed, default=0, help="numpy seed of the random ids and soft inputs (default: 0)")
    add("--prompt-len", type=_count, default=20, metavar="N", help="prompt tokens of the llada2 case "
        "(default: 20)")
    add("--block-size", dest="renamed_block_size", default=None, help=argparse.SUPPRESS)
    add_decode_args(p, DecodeConfig(strategy="llada2", **DECODE_DEFAULTS), fields=tuple(DECODE_DEFAULTS),
                    group_title="llada2 decoding and masks")
    add("--tol", type=_tolerance, default=None, help="max relative logits difference "
        "(default: 1e-4 in float32, 3e-2 in bfloat16)")
    add("--perturb-torch", type=_perturbation, default=None, metavar="NAME[i,j]+=DELTA",
        help="add DELTA to one entry of a torch parameter (a check that the tool sees divergence)")
    add("--no-generate", action="store_true", help="skip the llada2 decoding comparison")
    add("--json", action="store_true", help="print the report as JSON (default: a table)")
    return p


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading weights: flags (DecodeConfig ranges), both
    directories, their config.json, the torch side's auto_map code, lengths vs the model's positions.
    Fills ``args.block_length/gen_length/threshold/steps``; raises the project's typed errors."""
    from dmax_jax.config import ModelConfig
    from dmax_jax.pretrained import check_model_dir

    if args.renamed_block_size is not None:
        raise DecodeConfigError("block_size", "was renamed --block-length")
    cfg = decode_config_from_args(args, DecodeConfig(strategy="llada2", **DECODE_DEFAULTS), prog=PROG)
    for field in DECODE_DEFAULTS:
        setattr(args, field, getattr(cfg, field))
    config = ModelConfig.from_json(check_model_dir(args.hf_dir))
    torch_dir = check_model_dir(args.torch_hf_dir or args.hf_dir)
    auto_map = ModelConfig.from_json(torch_dir).raw.get("auto_map") or {}
    module = str(auto_map.get("AutoModelForCausalLM", "")).split(".")[0]
    if not module:
        raise ModelConfigError(f"{torch_dir / 'config.json'} has no auto_map.AutoModelForCausalLM (the "
                               "remote code the torch side is loaded with)", "auto_map")
    if not (torch_dir / f"{module}.py").is_file():
        raise CheckpointNotFoundError(f"{torch_dir} has no {module}.py (named by auto_map)")
    limit = config.max_position_embeddings
    if args.seq_len > limit:
        raise DecodeConfigError("seq_len", f"must be <= max_position_embeddings {limit}, got {args.seq_len}")
    end = -(-(args.prompt_len + args.gen_length) // args.block_length) * args.block_length
    if not args.no_generate and end > limit:
        raise DecodeConfigError("gen_length", f"--prompt-len {args.prompt_len} + --gen-length "
                                f"{args.gen_length} (rounded up to the block: {end} positions) exceed "
                                f"max_position_embeddings {limit}")
    if args.torch_device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DecodeConfigError("torch_device", f"{args.torch_device!r} but torch sees no CUDA device")


