"""train.py on bad input, on Ctrl-C and on reruns: one or a few lines and an exit status, never a traceback;
the run's records (train_config.yaml, metrics.jsonl) stay true. In-process through ``main`` (the
compiled step is shared with tests/test_train_loop.py's config), plus one subprocess for ``--help``."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

from dmax_jax.demo.data import generate_task_data
from dmax_jax.training import loop
from dmax_jax.training.config import TrainConfigError, load_train_config
from dmax_jax.training.metrics import truncate_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return generate_task_data("generate:arith:48", tmp_path_factory.mktemp("task"))


def _args(task, out: Path, *extra: str) -> list[str]:
    """The same run config as tests/test_train_loop.py (one compiled step for both files)."""
    train_file, tok = task
    return ["--config", str(TINY), f"data.paths=[{train_file}]", f"model.tokenizer={tok}",
            "model.overrides.num_hidden_layers=1", "model.overrides.first_k_dense_replace=0",
            "data.max_length=64", "data.batch_size=8", "data.num_epochs=1", "step.block_length=8",
            "optim.total_steps=4", "optim.warmup_ratio=0.25", "run.log_every=1", "run.progress_bar=false",
            "run.export_hf_at_end=false", "run.tensorboard=false", f"run.out_dir={out}", *extra]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = load_script("train.py").main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_short(err: str) -> None:
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 6, err


# ---- bad data -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "a"', "invalid JSON"),
    ('{"question": "How many?"}', "'answer' must be a string, but the row has no 'answer'"),
    ('[1, 2]', "row is a list, expected a JSON object"),
])
def test_bad_data_line_is_one_message_naming_file_and_line(task, tmp_path, capsys, line, message):
    rows = Path(task[0]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:5] + [line] + rows[5:]) + "\n")
    code, _, err = _main(_args(task, tmp_path / "run", f"data.paths=[{bad}]"), capsys)
    assert code == 2 and f"bad.jsonl:6: {message}" in err and err.startswith("train.py: data error:")
    _assert_short(err)


def test_bad_data_line_in_a_subprocess_is_exit_2_without_traceback(task, tmp_path):
    """The same through a real `python train.py` (stderr as a user sees it, warnings included)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(task[0]).read_text().splitlines()[0] + "\n{broken\n")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *_args(task, tmp_path / "run",
                                                                      f"data.paths=[{bad}]")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"{bad}:2: invalid JSON" in proc.stderr
    _assert_short(proc.stderr)


def test_skip_bad_rows_reports_them_on_the_console(task, tmp_path, capsys):
    rows = Path(task[0]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows[:3] + ["not json"] + rows[3:]) + "\n")
    code, out, err = _main(_args(task, tmp_path / "run", f"data.paths=[{bad}]", "data.skip_bad_rows=true",
                                 "run.num_steps=1"), capsys)
    assert code == 0, err
    assert "skipped 1 bad data rows (data.skip_bad_rows=true)" in out and "bad.jsonl:4: invalid JSON" in out


def test_generated_data_spec_is_refused_by_the_library(task, tmp_path):
    cfg = load_train_config(TINY, [f"run.out_dir={tmp_path}", "run.num_steps=1"])
    with pytest.raises(TrainConfigError, match="data.paths: 'generate:arith:512' is generated demo data"):
        loop.train(cfg)


def test_old_block_size_key_says_it_was_renamed(capsys):
    code, _, err = _main(["--config", str(TINY), "step.block_size=8"], capsys)
    assert code == 2 and "step.block_size was renamed step.block_length" in err
    _assert_short(err)


# ---- reruns and resumes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(task, tmp_path_factory):
    """A finished 2-update run (checkpoint every update)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = load_script("train.py").main(_args(task, out, "run.num_steps=2", "run.save_every=1"))
    assert code == 0
    return out


def test_rerun_of_a_finished_run_with_a_changed_config_is_refused(task, finished, capsys):
    before = (finished / "train_config.yaml").read_text()
    code, _, err = _main(_args(task, finished, "run.num_steps=2", "run.save_every=1", "optim.lr=0.5"), capsys)
    assert code == 2 and "optim.lr: checkpoint 0.001 vs now 0.5" in err and "run.allow_config_change" in err
    assert (finished / "train_config.yaml").read_text() == before and _steps(finished) == [1, 2]
    _assert_short(err)


def test_resume_with_a_changed_batch_size_is_one_message(task, finished, capsys):
    code, _, err = _main(_args(task, finished, "run.num_steps=2", "data.batch_size=16"), capsys)
    assert code == 2 and "data.batch_size: checkpoint 8 vs now 16" in err
    assert err.startswith("train.py: checkpoint error: cannot resume")
    _assert_short(err)


def test_rerun_of_a_finished_run_with_the_same_config_trains_nothing_and_says_so(task, finished, capsys):
    code, out, _ = _main(_args(task, finished, "run.num_steps=2", "run.save_every=1"), capsys)
    assert code == 0 and "already at update 2 of 2: nothing to train" in out and "done: steps 2 → 2" in out
    assert _steps(finished) == [1, 2]


def test_allowed_config_change_keeps_the_previous_config(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_args(task, out, "run.num_steps=1"), capsys)[0] == 0
    code, stdout, err = _main(_args(task, out, "run.num_steps=2", "optim.b2=0.9",
                                    "run.allow_config_change=true"), capsys)
    assert code == 0, err
    assert "config changes allowed on resume: optim.b2: checkpoint 0.999 vs now 0.9" in stdout
    assert "b2: 0.999" in (out / "train_config.before_1.yaml").read_text()
    assert "b2: 0.9\n" in (out / "train_config.yaml").read_text() and _steps(out) == [1, 2]


def test_resume_after_kill_drops_metric_rows_past_the_checkpoint(task, tmp_path, capsys):
    """kill -9 after update 3 was logged but before it was saved: the resumed run logs 3 again, once."""
    out = tmp_path / "run"
    assert _main(_args(task, out, "run.num_steps=2", "run.save_every=1"), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n" + '{"step": 4, "lo')  # + a torn line
    assert _main(_args(task, out, "run.num_steps=4", "run.save_every=1"), capsys)[0] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] > 0


def test_truncate_jsonl_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 2, 3)) + '{"step"')
    assert truncate_jsonl(path, 2) == 3  # two rows past step 2 and the torn line
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 2]
    assert truncate_jsonl(tmp_path / "missing.jsonl", 0) == 0


# ---- Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(task, tmp_path, capsys, monkeypatch):
    real_build = loop.build_train_program

    def build_interrupted_at_update_3(model_config, cfg):
        built = real_build(model_config, cfg)

        def step_fn(state, batch):
            if int(state.step) == 2:
                raise KeyboardInterrupt
            return built.step_fn(state, batch)

        return dataclasses.replace(built, step_fn=step_fn)

    monkeypatch.setattr(loop, "build_train_program", build_interrupted_at_update_3)
    out = tmp_path / "run"
    argv = _args(task, out, "run.num_steps=4", "run.save_every=1")
    code, _, err = _main(argv, capsys)
    assert code == 130
    assert f"last checkpoint: update 2 in {out / 'checkpoints'}" in err
    assert "resume with: python train.py --config" in err and f"run.out_dir={out}" in err
    _assert_short(err)
    monkeypatch.setattr(loop, "build_train_program", real_build)
    assert _main(argv, capsys)[0] == 0 and _steps(out) == [1, 2, 3, 4]


def test_ctrl_c_between_steps_saves_the_update_and_stops(task, tmp_path, capsys, monkeypatch, request):
    """A real SIGINT (to this process) during update 3: the loop finishes it, saves it, exits 130."""
    # The loop only takes over Ctrl-C from Python's default handler (never from an embedding program's):
    # start from that, whatever an earlier test in this worker process left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    real_build = loop.build_train_program

    def build_signalling_in_update_3(model_config, cfg):
        built = real_build(model_config, cfg)

        def step_fn(state, batch):
            if int(state.step) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return built.step_fn(state, batch)

        return dataclasses.replace(built, step_fn=step_fn)

    monkeypatch.setattr(loop, "build_train_program", build_signalling_in_update_3)
    out = tmp_path / "run"
    code, _, err = _main(_args(task, out, "run.num_steps=4", "run.save_every=0"), capsys)
    assert code == 130 and "saving at the end of this update" in err
    assert f"interrupted after update 3; last checkpoint: update 3 in {out / 'checkpoints'}" in err
    assert _steps(out) == [1, 2, 3] and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is removed


# ---- help -----------------------------------------------------------------------------------------------
def test_help_names_the_real_default_and_shows_defaults():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert "``" not in text and "default: none = the embedded demo" in text
    assert "Without any argument it runs the embedded demo" in text and "configs/tiny.yaml" in text
    assert text.count("(default: off)") == 2  # every flag states its default
