"""Deviceless compiles with the chips' own compilers (``python -m dmax_jax.aot``): the tiny model's
programs for an H200 (2 GPUs) and a TPU v5p slice (4 chips) contain the chips' kernels for the MoE
and attention, never XLA's fallbacks; bad flags are one line. Needs the ``aot`` extra (jax[tpu],
jax[cuda12]); without it the compile tests skip with that reason."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmax_jax.aot import targets
from dmax_jax.aot.report import kernels

REPO = Path(__file__).resolve().parents[1]
HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
needs_tpu = pytest.mark.skipif(not HAS_TPU, reason="needs the aot extra: jax[tpu] (libtpu) for TPU compiles")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs the aot extra: jax[cuda12] for GPU compiles")

# The tiny test model with TPU-legal tiles (Mosaic blocks: last two dims multiples of (8, 128)).
TINY_128 = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128, "head_dim": 128,
            "num_attention_heads": 2, "num_key_value_heads": 1}
GPU = ("h200", "1x1x2", {"moe": "PallasTritonRaggedDot", "train_attention": "block_diffusion_flash"})
TPU = ("v5p", "v5p:2x2x1", {"moe": ":gmm", "train_attention": "splash_mha"})


def _aot(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmax_jax.aot", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("aot") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": "preset:tiny", "overrides": TINY_128},
        "data": {"paths": ["unused.jsonl"], "max_length": 256, "batch_size": 4},
        "step": {"mode": "oput", "block_length": 32, "compute_dtype": "bfloat16", "remat": "full",
                 "attention_backend": "auto"},
        "mesh": {"fsdp": -1}}))
    return path


def _compile(tmp_path: Path, chip: tuple, program: str, *extra: str) -> dict:
    target, topology, _ = chip
    out = tmp_path / f"{target}_{program}.json"
    r = _aot("--target", target, "--topology", topology, "--program", program, *extra, "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["target"] == target and report["fits"] is True and report["peak_bytes"] > 0
    assert report["remat_warnings"] == 0
    return report


def _has(report: dict, name: str) -> bool:
    return any(name in k for k in report["kernels"])


@pytest.mark.slow
@pytest.mark.parametrize("chip", [pytest.param(GPU, marks=needs_cuda, id="h200"),
                                  pytest.param(TPU, marks=needs_tpu, id="v5p")])
def test_train_step_compiles_with_the_chips_kernels(chip, tiny_yaml, tmp_path):
    report = _compile(tmp_path, chip, "train", "--config", str(tiny_yaml))
    names = chip[2]
    assert _has(report, names["moe"]) and _has(report, names["train_attention"]), report["kernels"]
    assert report["platform"] == ("gpu" if chip is GPU else "tpu")
    assert report["mesh"]["fsdp"] == report["devices"]


@pytest.mark.slow
@pytest.mark.parametrize("program", ["generate", "engine"])
@pytest.mark.parametrize("chip", [pytest.param(GPU, marks=needs_cuda, id="h200"),
                                  pytest.param(TPU, marks=needs_tpu, id="v5p")])
def test_decode_programs_compile_with_the_chips_kernels(chip, program, tiny_yaml, tmp_path):
    report = _compile(tmp_path, chip, program, "--config", str(tiny_yaml), "--prompt-len", "64",
                      "--gen-length", "64", "--max-batch", "2", "--batch", "2")
    assert _has(report, chip[2]["moe"]) and _has(report, "decode_attention"), report["kernels"]
    assert report["mesh"]["expert"] == report["devices"]  # experts sharded: expert parallel decode
    if program == "engine":    # the prefix cache's copy programs compile too; the pool counts beside
        progs = report["programs"]
        assert {"prefix_load", "prefix_save"} <= set(progs)
        assert all(p["resident_beside_bytes"] > 0 for p in progs.values())


@pytest.mark.slow
@needs_cuda
def test_a_backend_that_falls_back_to_xla_is_an_error(tiny_yaml):
    r = _aot("--target", "h200", "--topology", "1x1x2", "--program", "train", "--config", str(tiny_yaml),
             "step.moe_impl=ragged")
    assert r.returncode == 1
    assert "no MoE grouped matmul kernel" in r.stderr and "moe_impl=ragged" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--target", "a100", "--program", "train"], "--target: invalid choice"),
    (["--target", "h200", "--program", "serve"], "--program: invalid choice"),
    (["--target", "h200", "--program", "train"], "--program train needs --config"),
    (["--target", "h200", "--program", "generate", "--batch", "0"], "--batch: must be >= 1"),
    (["--target", "h200", "--topology", "v5p:2x2", "--program", "generate"], "SLICESxHOSTSxDEVICES"),
    (["--target", "v5p", "--topology", "v6e:2x2", "--program", "generate"], "names chip 'v6e'"),
    (["--target", "h200", "--program", "generate", "--mesh", "pipeline=2"], "--mesh 'pipeline=2'"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message):
    r = _aot(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("python -m dmax_jax.aot: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_gpu_target_protos_hold_their_data_sheet_numbers():
    for name, tgt in targets.TARGETS.items():
        if tgt.platform != "gpu":
            continue
        text = (targets.TARGET_DIR / f"{name}.txtpb").read_text()
        assert text.startswith("# NVIDIA") and "datasheet" in text.splitlines()[0]
        device_bytes = int(re.search(r"device_memory_size: (\d+)", text).group(1))
        assert tgt.hbm_bytes <= device_bytes < 1.1 * tgt.hbm_bytes


def test_kernel_names_are_read_from_compiled_hlo():
    hlo = "\n".join([
        '  %splash_mha_fwd_no_residuals.3 = (f32[2]) custom-call(%a), custom_call_target="tpu_custom_call"',
        '  %gmm.1 = bf16[8,8] custom-call(%a), custom_call_target="tpu_custom_call", x',
        '  ROOT %gmm = bf16[8,8] custom-call(%a), custom_call_target="tpu_custom_call"',
        '  %pallas_call.60 = bf16[8] custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", '
        'backend_config={name = "_unknown_"} metadata={op_name="x/tokamax:{\\"op\\":{\\"__type\\":'
        '\\"tokamax._src.ops.ragged_dot.pallas_triton.PallasTritonRaggedDot\\"}}"}',
        '  %pallas_call.7 = bf16[8] custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", '
        'backend_config={name = "block_diffusion_flash_fwd"}',
        '  %cc = s32[] custom-call(), custom_call_target="AllocateBuffer"',
        '  %add.1 = f32[] add(%a, %b)',
    ])
    assert kernels(hlo) == {"AllocateBuffer": 1, "__gpu$xla.gpu.triton:PallasTritonRaggedDot": 1,
                            "__gpu$xla.gpu.triton:block_diffusion_flash_fwd": 1, "tpu_custom_call:gmm": 2,
                            "tpu_custom_call:splash_mha_fwd_no_residuals": 1}
