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

import jax
import numpy as np
import pytest
from mp_worker import reuse_train_programs
from scripts import load_script

from dmax_jax.demo.data import generate_task_data
from dmax_jax.training import loop
from dmax_jax.training.config import TrainConfigError, load_train_config
from dmax_jax.training.metrics import truncate_jsonl

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_program_per_config():
    """Runs with the same config share one compiled train step (``mp_worker.reuse_train_programs``)."""
    with reuse_train_programs():
        yield


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
    assert code == 2 and f"bad.jsonl:6: {message}" in err and err.startswith("train.py: error: ")
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
    assert err.startswith("train.py: error: cannot resume")
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


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory):
    """4 updates in one uninterrupted run: the state every resumed run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return loop.train(load_train_config(TINY, _args(task, out, "run.num_steps=4")[2:])).state


def _resume_equals(task, out: Path, straight, capsys) -> str:
    """Resume ``out`` to update 4 in-process; its state must equal the straight run's. Returns stderr."""
    summary = loop.train(load_train_config(TINY, _args(task, out, "run.num_steps=4", "run.save_every=1")[2:]))
    for x, y in zip(jax.tree.leaves(summary.state), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # params, Adam moments, step
    return capsys.readouterr().err


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"),
                                             (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_between_steps_saves_the_update_stops_and_resumes_bit_for_bit(
        task, tmp_path, capsys, monkeypatch, request, straight, sig, code, name):
    """A real SIGINT / SIGTERM (to this process) during update 3: the loop finishes it, saves it, prints
    the resume command and exits 130 / 143; resuming gives exactly the uninterrupted run."""
    # The loop only takes over a signal from Python's default handler (never from an embedding
    # program's): start from that, whatever an earlier test in this worker process left installed.
    default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
    previous = signal.signal(sig, default)
    request.addfinalizer(lambda: signal.signal(sig, previous))
    real_build = loop.build_train_program

    def build_signalling_in_update_3(model_config, cfg):
        built = real_build(model_config, cfg)

        def step_fn(state, batch):
            if int(state.step) == 2:
                os.kill(os.getpid(), sig)
            return built.step_fn(state, batch)

        return dataclasses.replace(built, step_fn=step_fn)

    monkeypatch.setattr(loop, "build_train_program", build_signalling_in_update_3)
    out = tmp_path / "run"
    argv = _args(task, out, "run.num_steps=4", "run.save_every=0")
    rc, _, err = _main(argv, capsys)
    assert rc == code and f"{name}: saving at the end of this update" in err
    assert f"interrupted after update 3; last checkpoint: update 3 in {out / 'checkpoints'}" in err
    assert "resume with: python train.py --config" in err and f"run.out_dir={out}" in err
    assert _steps(out) == [1, 2, 3] and "Traceback" not in err
    assert signal.getsignal(sig) is default  # the loop's handler is removed
    monkeypatch.setattr(loop, "build_train_program", real_build)
    _resume_equals(task, out, straight, capsys)
    assert _steps(out) == [1, 2, 3, 4]


# ---- broken checkpoints, resume_step ----------------------------------------------------------------------
def _truncate_checkpoint(step_dir: Path) -> None:
    """What a VM killed while the file system flushed leaves: every array file cut to half its size."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_unreadable_newest_checkpoint_is_named_kept_and_the_previous_one_resumed(task, tmp_path, capsys,
                                                                                 straight):
    out = tmp_path / "run"
    assert _main(_args(task, out, "run.num_steps=2", "run.save_every=1"), capsys)[0] == 0
    _truncate_checkpoint(out / "checkpoints" / "2")
    err = _resume_equals(task, out, straight, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("train: ")]
    assert lines[0].startswith(f"train: checkpoint 2 in {out / 'checkpoints'} cannot be read (")
    assert lines[1] == f"train: moved unreadable checkpoint 2 to {out / 'checkpoints_unreadable' / '2'} " \
                       "(kept for inspection)"
    assert lines[2] == "train: resuming from checkpoint 1, the newest readable one" and len(lines) == 3
    assert (out / "checkpoints_unreadable" / "2" / "state").is_dir() and _steps(out) == [1, 2, 3, 4]


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_args(task, out, "run.num_steps=1"), capsys)[0] == 0
    _truncate_checkpoint(out / "checkpoints" / "1")
    code, _, err = _main(_args(task, out, "run.num_steps=2"), capsys)
    assert code == 2 and "train: checkpoint 1 in" in err and "cannot be read" in err
    assert f"train.py: error: no checkpoint in {out / 'checkpoints'} can be read" in err
    _assert_short(err)
    assert _steps(out) == [1] and not (out / "checkpoints_unreadable").exists()


def test_resume_step_picks_a_checkpoint_and_sets_newer_ones_aside(task, tmp_path, capsys, straight):
    out = tmp_path / "run"
    assert _main(_args(task, out, "run.num_steps=2", "run.save_every=1"), capsys)[0] == 0
    code, _, err = _main(_args(task, out, "run.num_steps=2", "run.resume_step=5"), capsys)
    assert code == 2 and "run.resume_step: no checkpoint 5 in" in err and "[1, 2]" in err
    summary = loop.train(load_train_config(TINY, _args(task, out, "run.num_steps=4", "run.save_every=1",
                                                       "run.resume_step=1")[2:]))
    assert summary.start_step == 1 and (out / "checkpoints_set_aside" / "2").is_dir()
    assert "run.resume_step=1: checkpoint 2 moved to" in capsys.readouterr().err
    for x, y in zip(jax.tree.leaves(summary.state), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- outputs, model folders, data that leave nothing to learn ------------------------------------------
def test_unwritable_out_dir_is_named_before_anything_loads(task, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(loop, "build_train_program", lambda *a: pytest.fail("compiled before the check"))
    code, _, err = _main(_args(task, blocker / "run"), capsys)
    assert code == 2 and err.startswith(f"train.py: error: run.out_dir {blocker / 'run'}: cannot write there")
    assert f"{blocker} is a file" in err and err.count("\n") == 1


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_checkpoints(task, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = loop._save

    def save_until_disk_full(run, update):
        if update == 2:
            raise OSError(28, "No space left on device", str(out / "checkpoints" / "2"))
        real_save(run, update)

    monkeypatch.setattr(loop, "_save", save_until_disk_full)
    code, _, err = _main(_args(task, out, "run.num_steps=3", "run.save_every=1"), capsys)
    assert code == 1 and err.startswith(f"train.py: error: {out / 'checkpoints' / '2'}: No space left")
    assert "rerun the same command to resume" in err and err.count("\n") == 1
    assert (out / "checkpoints" / "1").is_dir()


def test_tokenizer_larger_than_vocab_size_is_refused_at_load(task, tmp_path, capsys):
    code, _, err = _main(_args(task, tmp_path / "run", "model.overrides.vocab_size=100"), capsys)
    assert code == 2 and "the tokenizer has" in err and "vocab_size (config.json) is 100" in err
    assert err.startswith(f"train.py: error: model.tokenizer {task[1]}: ")
    _assert_short(err)


def _qa_file(path: Path, long_rows: int, short_rows: int) -> Path:
    rows = [{"question": "How many apples? " * 40, "answer": "#### 3"}] * long_rows
    rows += [{"question": f"What is {i} plus 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
             for i in range(short_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_without_answer_tokens_are_counted_and_all_of_them_is_an_error(task, tmp_path, capsys):
    _, tok = task
    mixed = _qa_file(tmp_path / "mixed.jsonl", long_rows=5, short_rows=27)
    argv = [a.replace(str(task[0]), str(mixed)) for a in _args(task, tmp_path / "a", "run.num_steps=1")]
    code, stdout, _ = _main(argv, capsys)
    assert code == 0 and "5 data rows left no answer token after truncation to data.max_length 64" in stdout
    only_long = _qa_file(tmp_path / "long.jsonl", long_rows=16, short_rows=0)
    argv = [a.replace(str(task[0]), str(only_long)) for a in _args(task, tmp_path / "b", "run.num_steps=1")]
    code, _, err = _main(argv, capsys)
    assert code == 2 and err.startswith("train.py: error: data.max_length 64: all 16 rows' prompts fill it")
    assert "the longest prompt, row 0 of the valid rows, in" in err and err.count("\n") == 1


# ---- help -----------------------------------------------------------------------------------------------
def test_help_names_the_real_default_and_shows_defaults():
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert "``" not in text and "default: none = the embedded demo" in text
    assert "Without any argument it runs the embedded demo" in text and "configs/tiny.yaml" in text
    assert text.count("(default: off)") == 2  # every flag states its default
