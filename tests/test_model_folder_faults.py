"""Broken model folders: a NaN weight, a missing or corrupt tokenizer, a config.json ``vocab_size``
smaller than the tokenizer. Each is one error naming the folder / file / tensor — from the library
(``load_pretrained``) and from every command that loads a model (decode.py, the server, the eval CLI),
exit status 2 — found before (or while) the weights stream in, never as garbage output later."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scripts import load_script
from server_util import write_model_dir

import dmax_jax
from dmax_jax import serve
from dmax_jax.checkpoint.hf import CheckpointError
from dmax_jax.config import tiny_config
from dmax_jax.data.chat import TokenizerError
from dmax_jax.eval.__main__ import main as eval_main

CFG = tiny_config()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("good"), CFG)


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _poison(folder: Path) -> tuple[str, Path]:
    """Set one element of one float tensor to NaN; returns (tensor name, file)."""
    file = sorted(folder.glob("*.safetensors"))[-1]
    tensors = load_file(file)
    name = sorted(k for k, v in tensors.items() if v.dtype.kind == "f" and v.size > 4)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[3] = np.nan
    save_file(tensors, file, metadata={"format": "pt"})
    return name, file


def _commands(folder: Path, tmp_path: Path) -> list[tuple[str, int, str]]:
    """(command, exit status, stderr) of decode.py, the server and the eval CLI on ``folder``."""
    import contextlib
    import io

    out = []
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "answer": "#### 5"}) + "\n")
    runs = {"decode.py": lambda: load_script("decode.py").main(["--model", str(folder), "--prompt", "hi",
                                                                "--dtype", "float32"]),
            "serve": lambda: serve.main(["--model", str(folder), "--port", "0", "--compile-cache", "none"]),
            "eval": lambda: eval_main(["--model", str(folder), "--benchmark", "gsm8k", "--data", str(data),
                                       "--out", str(tmp_path / "eval"), "--block-length", "8",
                                       "--gen-length", "16", "--quiet"])}
    for name, run in runs.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out.append((name, run(), err.getvalue()))
    return out


def _assert_named_everywhere(folder: Path, tmp_path: Path, *needles: str) -> None:
    for command, code, err in _commands(folder, tmp_path):
        lines = [ln for ln in err.splitlines() if ln.strip() and "compiling" not in ln]
        assert code == 2, (command, err)
        assert "Traceback" not in err and len(lines) == 1 and ": error: " in lines[0], (command, err)
        assert all(n in lines[0] for n in needles), (command, lines[0], needles)


def test_a_nan_weight_is_named_while_streaming(good, tmp_path):
    folder = _copy(good, tmp_path)
    name, file = _poison(folder)
    with pytest.raises(CheckpointError, match=rf"tensor {name} in {file} holds 1 non-finite value"):
        dmax_jax.load_pretrained(folder)
    _assert_named_everywhere(folder, tmp_path, f"tensor {name}", "non-finite")


def test_missing_tokenizer_json_names_the_folder_and_the_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "tokenizer.json").unlink()
    assert (folder / "tokenizer_config.json").exists()
    with pytest.raises(TokenizerError, match=rf"^{folder}: tokenizer.json is missing"):
        dmax_jax.load_pretrained(folder)
    _assert_named_everywhere(folder, tmp_path, str(folder), "tokenizer.json is missing")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_truncated_tokenizer_files_are_named(good, tmp_path, name):
    folder = _copy(good, tmp_path)
    (folder / name).write_text((folder / name).read_text()[:40])
    with pytest.raises(TokenizerError, match=rf"^{folder / name}: not valid JSON"):
        dmax_jax.load_pretrained(folder)


def test_a_tokenizer_file_transformers_rejects_is_named(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match=rf"^{folder / 'tokenizer.json'}: cannot load the tokenizer"):
        dmax_jax.load_pretrained(folder)


def test_vocab_size_below_the_tokenizer_is_refused_before_the_weights(good, tmp_path):
    folder = _copy(good, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100            # the weights still hold 384 rows: never read, the check comes first
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"the tokenizer has \d+ tokens but the model's vocab_size "
                                             r"\(config.json\) is 100"):
        dmax_jax.load_pretrained(folder)
    _assert_named_everywhere(folder, tmp_path, str(folder), "vocab_size (config.json) is 100")


def test_special_ids_outside_the_vocabulary_are_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mask_token_id"] = CFG.vocab_size + 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((TokenizerError, ValueError), match=r"mask"):
        dmax_jax.load_pretrained(folder)
