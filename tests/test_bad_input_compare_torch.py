"""tools/compare_torch.py on bad input: exit status 2 and one stderr line naming the flag, file or field,
before any weights load (the directories here hold no safetensors at all, so a check that ran too late
would fail differently)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scripts import load_script

pytest.importorskip("torch")

from dmax_jax.config import tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tools" / "torch_reference"
AUTO_MAP = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}
compare_torch = load_script("tools/compare_torch.py")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """config.json (512 positions) with auto_map + the remote-code files; no weights."""
    path = tmp_path_factory.mktemp("ct") / "model"
    path.mkdir()
    cfg = tiny_config(max_position_embeddings=512).to_hf_dict()
    (path / "config.json").write_text(json.dumps({**cfg, "auto_map": AUTO_MAP}))
    for f in REFERENCE.glob("*.py"):
        shutil.copy(f, path / f.name)
    return path


def run(capsys, *argv) -> tuple[int, str]:
    try:
        code = compare_torch.main([str(a) for a in argv])
    except SystemExit as e:  # argparse / decode_config_from_args
        code = e.code
    return code, capsys.readouterr().err.strip()


def assert_short(code, err, *needles):
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("compare_torch.py: error:"), err
    for n in needles:
        assert n in err, (n, err)


def variant(tmp_path, hf_dir, edit=None, drop=()) -> Path:
    path = tmp_path / "v"
    shutil.copytree(hf_dir, path)
    raw = json.loads((path / "config.json").read_text())
    if edit:
        edit(raw)
    (path / "config.json").write_text(json.dumps(raw))
    for name in drop:
        (path / name).unlink()
    return path


def test_directory_and_config_problems(tmp_path, capsys, hf_dir):
    (tmp_path / "empty").mkdir()
    assert_short(*run(capsys, "--hf-dir", tmp_path / "empty"), "is empty")
    assert_short(*run(capsys, "--hf-dir", tmp_path / "nowhere"), "does not exist")
    assert_short(*run(capsys, "--hf-dir", hf_dir, "--torch-hf-dir", tmp_path / "nowhere"), "does not exist")
    no_rope = variant(tmp_path / "a", hf_dir, edit=lambda d: d.pop("rope_theta"))
    assert_short(*run(capsys, "--hf-dir", no_rope), "has no `rope_theta`")
    no_map = variant(tmp_path / "b", hf_dir, edit=lambda d: d.pop("auto_map"))
    assert_short(*run(capsys, "--hf-dir", no_map), "no auto_map.AutoModelForCausalLM")
    no_code = variant(tmp_path / "c", hf_dir, drop=["modeling_llada2_moe.py"])
    assert_short(*run(capsys, "--hf-dir", no_code), "has no modeling_llada2_moe.py")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("[]")
    assert_short(*run(capsys, "--hf-dir", tmp_path / "d"), "must hold a JSON object")


@pytest.mark.parametrize("flags,needle", [
    (["--threshold", "1.5"], "--threshold: must be in [0, 1], got 1.5"),
    (["--block-size", "8"], "--block-size: was renamed --block-length"),
    (["--block-length", "0"], "--block-length"), (["--gen-length", "0"], "--gen-length"),
    (["--steps", "0"], "--steps"), (["--seq-len", "0"], "--seq-len"), (["--seq-len", "x"], "--seq-len"),
    (["--batch", "-2"], "--batch"), (["--seed", "-1"], "--seed"), (["--tol", "0"], "--tol"),
    (["--tol", "nan"], "--tol"), (["--tol", "inf"], "--tol"), (["--torch-threads", "0"], "--torch-threads"),
    (["--perturb-torch", "w[0]=1"], "--perturb-torch"), (["--dtype", "float16"], "--dtype"),
    (["--seq-len", "600"], "--seq-len: must be <= max_position_embeddings 512"),
    (["--prompt-len", "500", "--gen-length", "64"], "--gen-length: --prompt-len 500 + --gen-length 64"),
    (["--torch-device", "cuda:0"], "--torch-device"),
])
def test_bad_flags_name_the_flag(capsys, hf_dir, flags, needle):
    assert_short(*run(capsys, "--hf-dir", hf_dir, *flags), needle)


def test_long_prompt_is_fine_without_generation(capsys, hf_dir, monkeypatch):
    """--no-generate skips the llada2 case, so its lengths are not held against the model."""
    seen = []
    monkeypatch.setattr(compare_torch, "_compare", lambda args: seen.append(args) or 0)
    assert compare_torch.main(["--hf-dir", str(hf_dir), "--prompt-len", "500", "--no-generate"]) == 0
    assert seen and seen[0].block_length == 32 and seen[0].threshold == 0.95


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["--threshold", "--block-length", "--gen-length", "--steps", "--seq-len", "--batch",
                        "--prompt-len", "--tol"]),
       st.one_of(st.integers(max_value=0), st.floats(min_value=1.0001, allow_infinity=False, allow_nan=False),
                 st.text(alphabet="abc-", min_size=1, max_size=4)))
def test_random_bad_values(capsys, hf_dir, flag, value):
    assume(not (flag == "--threshold" and value == 0))  # tau = 0 is allowed
    assume(not (flag == "--tol" and isinstance(value, float)))  # any finite tol > 0 is allowed
    if isinstance(value, float) and float(value).is_integer():  # a count must not be a whole number here
        value += 0.5
    assert_short(*run(capsys, "--hf-dir", hf_dir, f"{flag}={value}"), flag)


def test_subprocess_bad_flag_is_one_line(hf_dir):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, str(REPO / "tools" / "compare_torch.py"), "--hf-dir", str(hf_dir),
           "--threshold", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "compare_torch.py: error: --threshold: must be in [0, 1], got 2.0"
