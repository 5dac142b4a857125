"""Training config (YAML + overrides), the loop (exact resume, keep_last, non-finite stop, HF export)
and ``train.py`` end to end. The in-process runs share one compiled step (the cache of
``training.program.build_train_program``): same model (one MoE layer, to keep the CPU compile
short), step, optimizer and mesh config, on the 8 fake CPU devices of conftest."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from mp_worker import reuse_train_programs
from scripts import load_script

from dmax_jax.checkpoint.hf import load_hf_params
from dmax_jax.checkpoint.train_state import (
    TrainCheckpointer,
    abstract_with_shardings,
    check_resume_compatible,
)
from dmax_jax.demo.data import generate_task_data
from dmax_jax.training import loop
from dmax_jax.training.config import (
    TrainConfig,
    TrainConfigError,
    dump_train_config,
    load_train_config,
    train_config_from_dict,
)
from dmax_jax.training.loop import NonFiniteLossError, ResumeMismatchError, train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ---- config ---------------------------------------------------------------------------------------
def test_tiny_yaml_with_overrides_is_typed():
    cfg = load_train_config(CONFIGS / "tiny.yaml", ["run.num_steps=5", "optim.lr=2e-6", "data.paths=a.jsonl",
                                                    "model.overrides.num_hidden_layers=2", "step.remat=null"])
    assert cfg.run.num_steps == 5 and isinstance(cfg.optim.lr, float) and cfg.optim.lr == 2e-6
    assert cfg.data.paths == ("a.jsonl",)
    assert cfg.model.overrides == {"vocab_size": 640, "num_hidden_layers": 2}
    assert cfg.auto == ("optim.total_steps", "step.mask_id")
    resolved = cfg.resolve(total_steps=9, mask_id=2)
    assert resolved.optim.total_steps == 9 and resolved.step.mask_id == 2 and resolved.auto == ()
    with pytest.raises(TrainConfigError, match="step.mask_id: 2 but .* MASK id is 5"):
        resolved.resolve(total_steps=9, mask_id=5)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_train_config(CONFIGS / "llada2_mini_oput.yaml", ["model.source=hf:/ckpt/mini"])
    dump_train_config(cfg, tmp_path / "c.yaml")
    assert load_train_config(tmp_path / "c.yaml") == cfg
    resolved = cfg.resolve(total_steps=100, mask_id=156895)
    assert train_config_from_dict(resolved.to_dict()) == resolved


@pytest.mark.parametrize("override, message", [
    ("run.num_step=3", r"unknown key run.num_step \(did you mean run.num_steps\?\)"),
    ("bogus.x=1", "unknown key bogus"),
    ("run.log_every=ten", "run.log_every: expected an integer, got 'ten'"),
    ("data.batch_size=true", "data.batch_size: expected an integer"),
    ("run.async_save=1", "run.async_save: expected true/false"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.paths=3", r"data.paths: expected a list"),
    ("run=3", "run: expected a mapping"),
    ("step.mode=ar", "step: StepConfig.mode 'ar'"),
    ("model.source=ckpt", "model.source: 'ckpt' must be one of"),
    ("run.keep_last=0", "run.keep_last: invalid value 0"),
    ("run.num_steps", "must look like key.path=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(CONFIGS / "tiny.yaml", [override])


def test_missing_sections_and_files():
    with pytest.raises(TrainConfigError, match="missing required key model"):
        load_train_config(None, [])
    with pytest.raises(TrainConfigError, match="missing required key data.paths"):
        load_train_config(None, ["model.source=preset:tiny", "data.max_length=8"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_train_config("nope.yaml")


def test_reference_presets():
    mini = load_train_config(CONFIGS / "llada2_mini_oput.yaml",
                             ["model.source=hf:/x", "data.paths=[d.jsonl]"])
    assert (mini.optim.lr, mini.data.num_epochs, mini.data.batch_size) == (2e-6, 2, 8)
    assert mini.step.block_length == 32 and mini.model.source == "hf:/x"
    assert (mini.data.noise_low, mini.data.noise_high, mini.data.max_length) == (0.75, 0.75, 2048)
    assert (mini.step.compute_dtype, mini.step.remat, mini.step.mode) == ("bfloat16", "full", "oput")
    pod = load_train_config(CONFIGS / "dmax_16b_pod.yaml", ["model.source=hf:/x"])
    assert pod.mesh.shape(64) == (1, 16, 4, 1)
    assert isinstance(pod, TrainConfig)


# ---- the loop -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_program_per_config():
    """Runs with the same config share one compiled train step (``mp_worker.reuse_train_programs``)."""
    with reuse_train_programs():
        yield


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return generate_task_data("generate:arith:48", tmp_path_factory.mktemp("task"))


def test_generated_task_data_follows_the_spec(task_data, tmp_path):
    from dmax_jax.demo.task import chat_row, generate_problems

    train_file, _ = task_data
    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines()]
    assert rows == [chat_row(p) for p in generate_problems(48)]
    varied_file, tok = generate_task_data("generate:arith_varied:48", tmp_path / "varied")
    varied = [json.loads(line) for line in Path(varied_file).read_text().splitlines()]
    assert varied == [chat_row(p) for p in generate_problems(48, phrasing="varied")] != rows
    assert (Path(tok) / "tokenizer.json").is_file()
    for bad in ("generate:arith:x", "generate:algebra:4", "generate:arith:4:5", "generate:arith:0"):
        with pytest.raises(TrainConfigError, match="data.paths"):
            generate_task_data(bad, tmp_path / "bad")


def _cfg(task_data, out: Path, *overrides: str) -> TrainConfig:
    train_file, tok = task_data
    base = [f"data.paths=[{train_file}]", f"model.tokenizer={tok}", "model.overrides.num_hidden_layers=1",
            "model.overrides.first_k_dense_replace=0", "data.max_length=64", "data.batch_size=8",
            "data.num_epochs=1", "step.block_length=8",
            "optim.total_steps=4", "optim.warmup_ratio=0.25", "run.log_every=1", "run.progress_bar=false",
            "run.export_hf_at_end=false", f"run.out_dir={out}"]
    return load_train_config(CONFIGS / "tiny.yaml", base + list(overrides))


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _built(task_data, out: Path):
    """The loop's mesh / shardings / jitted step for the test config (the module's shared program)."""
    cfg = _cfg(task_data, out).resolve(total_steps=4, mask_id=2)
    return loop.build_train_program(loop.resolve_model_config(cfg), cfg)


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(task_data, tmp_path_factory):
    """4 steps straight (with HF export) and 2 steps + resume to 4 (saving every step, keep 2)."""
    root = tmp_path_factory.mktemp("runs")
    straight = train(_cfg(task_data, root / "a", "run.num_steps=4", "run.export_hf_at_end=true"))
    first = train(_cfg(task_data, root / "b", "run.num_steps=2", "run.save_every=1", "run.keep_last=2"))
    steps_after_first = _steps(root / "b")
    resumed = train(_cfg(task_data, root / "b", "run.num_steps=4", "run.save_every=1", "run.keep_last=2"))
    return dict(root=root, straight=straight, first=first, resumed=resumed,
                steps_after_first=steps_after_first, task_data=task_data)


def test_resume_is_bit_identical(runs):
    a, first, b = runs["straight"], runs["first"], runs["resumed"]
    assert (first.start_step, first.final_step, b.start_step, b.final_step) == (0, 2, 2, 4)
    assert int(a.state.step) == int(b.state.step) == 4
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # params, Adam moments, step
    # Same batches in the same order: every step's loss matches the straight run's.
    la, lb = _losses(runs["root"] / "a"), _losses(runs["root"] / "b")
    assert sorted(lb) == [1, 2, 3, 4] and lb == la
    assert all(np.isfinite(v) for v in la.values()) and la[4] != la[1]


def test_keep_last_and_checkpoint_metadata(runs):
    out = runs["root"] / "b"
    assert runs["steps_after_first"] == [1, 2] and _steps(out) == [3, 4]
    with TrainCheckpointer(out / "checkpoints") as ck:
        meta = ck.read_metadata(4)
    assert meta["step"] == 4 and meta["config"]["optim"]["total_steps"] == 4
    assert meta["config"]["step"]["mask_id"] == 2  # derived from the model config + tokenizer
    assert meta["micro_step"] == int(runs["resumed"].state.step) == 4 and "rng" not in meta
    # The checkpoint restores onto the mesh's shardings and equals the final state.
    built = _built(runs["task_data"], out)
    with TrainCheckpointer(out / "checkpoints") as ck:
        state, _ = ck.restore(4, abstract_with_shardings(built.abstract_state, built.state_shardings), None)
    assert state.params["embedding"].sharding == built.state_shardings.params["embedding"]
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(runs["resumed"].state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_export_at_end_loads_back(runs):
    a = runs["straight"]
    assert a.hf_export_dir is not None and (Path(a.hf_export_dir) / "tokenizer.json").exists()
    loaded = load_hf_params(a.hf_export_dir)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(a.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert json.loads((Path(a.hf_export_dir) / "config.json").read_text())["vocab_size"] == 640


def test_resume_refuses_a_changed_data_config(runs, task_data):
    with pytest.raises(ResumeMismatchError, match="data.seed: checkpoint 42 vs now 7"):
        train(_cfg(task_data, runs["root"] / "b", "run.num_steps=4", "data.seed=7"))
    with pytest.raises(TrainConfigError, match="run.resume is false"):
        train(_cfg(task_data, runs["root"] / "b", "run.num_steps=4", "run.resume=false"))


def test_resume_accepts_the_same_data_file_named_relatively(task_data, tmp_path, monkeypatch):
    """A run started as `data.paths=[rel/train.jsonl]` resumes when relaunched with the absolute path
    (and vice versa); a different file is still a mismatch."""
    train_file = Path(task_data[0])
    monkeypatch.chdir(train_file.parent.parent)
    rel = _cfg(task_data, tmp_path, f"data.paths=[{train_file.parent.name}/{train_file.name}]")
    meta = {"config": rel.to_dict()}
    check_resume_compatible(meta, _cfg(task_data, tmp_path).to_dict(), "ckpt")
    other = tmp_path / "other.jsonl"
    with pytest.raises(ResumeMismatchError, match="data.paths"):
        check_resume_compatible(meta, _cfg(task_data, tmp_path, f"data.paths=[{other}]").to_dict(), "ckpt")


@pytest.mark.parametrize("save_every, kept", [(1, [1, 2]), (2, [2])])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(runs, task_data, tmp_path, monkeypatch,
                                                              save_every, kept):
    """Step 3 produces a NaN loss and NaN params: the run raises, step 3 (and 4) are never saved."""
    real_build = loop.build_train_program

    def build_with_nan(model_config, cfg):
        built = real_build(model_config, cfg)  # the module's shared, already compiled step

        def step_fn(state, batch):
            state, metrics = built.step_fn(state, batch)
            if int(state.step) == 3:
                state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
                metrics = dict(metrics, loss=metrics["loss"] * np.nan)
            return state, metrics

        return dataclasses.replace(built, step_fn=step_fn)

    monkeypatch.setattr(loop, "build_train_program", build_with_nan)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan .* micro-step 3 .* checkpoint: step "
                                                 f"{kept[-1]}"):
        train(_cfg(task_data, out, "run.num_steps=4", f"run.save_every={save_every}", "run.keep_last=3"))
    assert _steps(out) == kept
    assert 3 not in _losses(out) and sorted(_losses(out)) == [1, 2]
    monkeypatch.setattr(loop, "build_train_program", real_build)
    built = _built(task_data, out)
    with TrainCheckpointer(out / "checkpoints") as ck:
        state, _ = ck.restore(kept[-1], abstract_with_shardings(built.abstract_state, built.state_shardings),
                              None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# ---- train.py -------------------------------------------------------------------------------------
def _train_script():
    return load_script("train.py")


def test_train_py_print_config_defaults_to_tiny_preset(capsys):
    script = _train_script()
    assert script.main(["--print-config"]) == 0
    out = capsys.readouterr().out
    assert "configs/tiny.yaml" in out and "source: preset:tiny" in out
    assert script.main(["--config", str(CONFIGS / "tiny.yaml"), "run.num_stepz=2"]) == 2
    assert "unknown key run.num_stepz" in capsys.readouterr().err


@pytest.mark.slow
def test_train_py_end_to_end(tmp_path):
    """The tiny preset (1 layer and short rows to keep CPU time low) for 2 steps in a subprocess."""
    out = tmp_path / "run"
    args = [sys.executable, str(REPO / "train.py"), "--config", str(CONFIGS / "tiny.yaml"),
            f"run.out_dir={out}",
            "data.paths=[generate:arith:32]", "data.max_length=64", "step.block_length=8",
            "model.overrides.num_hidden_layers=1", "run.log_every=1", "run.progress_bar=false"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(args + ["run.num_steps=2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: steps 0 → 2" in proc.stdout
    assert (out / "task_data" / "train.jsonl").exists() and (out / "hf_final" / "model.safetensors").exists()
    assert json.loads((out / "hf_final" / "config.json").read_text())["num_hidden_layers"] == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] > 0 for r in rows)
    assert (out / "tensorboard").is_dir() and _steps(out) == [2]
