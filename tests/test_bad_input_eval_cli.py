"""`python -m dmax_jax.eval` on bad input: exit status 2, one short stderr line naming the culprit, no
traceback; before the weights are read. Most cases call ``main`` in-process (fast); a few spawn the
real command to check what a user's shell sees. Property-based: random malformed JSONL rows, random
out-of-range flags, and the prompt + gen-length fit rule against the decoder's block geometry.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmax_jax
from dmax_jax.config import tiny_config
from dmax_jax.decoding.buckets import row_geometry
from dmax_jax.decoding.config import DecodeConfig
from dmax_jax.eval.__main__ import check_fits, main
from dmax_jax.eval.benchmarks import EvalError, get_benchmark
from dmax_jax.eval.harness import RUN_CONFIG_FILE, SAMPLES_FILE, SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "tests" / "data" / "gsm8k" / "test.jsonl"
SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclasses.dataclass
class Result:
    token_ids: list
    nfe: list
    tokens: list
    tokens_ref: list
    tpf: list
    seconds: float


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """config.json (512 positions, like the shipped demo model) + tokenizer; no weights needed."""
    from transformers import AutoTokenizer

    from dmax_jax.data.tokenizer_build import build_tokenizer

    root = tmp_path_factory.mktemp("evalcli")
    tok = AutoTokenizer.from_pretrained(build_tokenizer(root / "tok"))
    model = root / "model"
    model.mkdir()
    tiny_config(max_position_embeddings=512).to_json(model / "config.json")
    tok.save_pretrained(model)
    return model


@pytest.fixture
def fake_model(monkeypatch, model_dir):
    """Stub the weights and the decoder: every answer is '#### 18' after 2 forwards."""
    from dmax_jax.data.chat import load_tokenizer

    tok = load_tokenizer(model_dir)
    calls = []

    def generate(pretrained, prompt_ids, config, **kw):
        calls.append(config)
        ids = tok("#### 18", add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        return Result([ids] * n, [2] * n, [len(ids)] * n, [len(ids)] * n, [len(ids) / 2] * n, 0.1)

    monkeypatch.setattr(dmax_jax, "load_pretrained", lambda path, dtype: types.SimpleNamespace(),
                        raising=False)
    monkeypatch.setattr(dmax_jax, "generate", generate, raising=False)
    return calls


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse and decode_config_from_args exit themselves
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def args(model, out, *extra, data=GSM8K):
    return ["--model", model, "--benchmark", "gsm8k", "--data", data, "--out", out, "--quiet",
            "--gen-length", "64", *extra]


def assert_short_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    assert err.startswith("python -m dmax_jax.eval"), err
    for needle in needles:
        assert needle in err, (needle, err)


# ---- model directory ----------------------------------------------------------------------------------
def test_model_directory_problems(tmp_path, capsys, model_dir):
    (tmp_path / "empty").mkdir()
    assert_short_error(*run(args(tmp_path / "empty", tmp_path / "o"), capsys), "is empty")
    assert_short_error(*run(args(tmp_path / "nowhere", tmp_path / "o"), capsys), "does not exist")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((model_dir / "config.json").read_text())
    assert_short_error(*run(args(no_tok, tmp_path / "o"), capsys), "no tokenizer files", "--tokenizer DIR")
    raw = json.loads((model_dir / "config.json").read_text())
    del raw["rope_theta"]
    (no_tok / "config.json").write_text(json.dumps(raw))
    assert_short_error(*run(args(no_tok, tmp_path / "o"), capsys), "has no `rope_theta`")
    assert not (tmp_path / "o").exists()  # nothing was written for a run that never started


def test_default_gen_length_beyond_the_model(tmp_path, capsys, model_dir):
    argv = ["--model", model_dir, "--benchmark", "gsm8k", "--data", GSM8K, "--out", tmp_path / "o"]
    code, err = run(argv, capsys)
    assert_short_error(code, err, "--gen-length 2048 (the default) does not fit", "max_position_embeddings "
                       "is 512", "pass --gen-length")
    room = int(err.split("pass --gen-length ")[1].split()[0])
    code, err = run([*argv, "--gen-length", room + 1], capsys)
    assert_short_error(code, err, f"--gen-length {room + 1} does not fit")
    assert not (tmp_path / "o").exists()


@SETTINGS
@given(st.lists(st.integers(1, 600), min_size=1, max_size=4), st.integers(1, 700),
       st.sampled_from([1, 16, 32]), st.integers(64, 1024))
def test_fit_rule_matches_the_decoder_geometry(lens, gen, block, max_pos):
    cfg = DecodeConfig(gen_length=gen, block_length=block)
    fits = all(row_geometry(n, gen, block)[1] <= max_pos for n in lens)
    try:
        check_fits(lens, cfg, max_pos, "", "d.jsonl")
        assert fits
    except EvalError as e:
        assert not fits and "--gen-length" in str(e)
        if "pass --gen-length" in str(e):  # the suggested value fits exactly
            room = int(str(e).split("pass --gen-length ")[1].split()[0])
            assert all(row_geometry(n, room, block)[1] <= max_pos for n in lens)
            assert not all(row_geometry(n, room + 1, block)[1] <= max_pos for n in lens)


# ---- data files -------------------------------------------------------------------------------------
def test_data_file_problems(tmp_path, capsys, model_dir):
    out = tmp_path / "o"
    assert_short_error(*run(args(model_dir, out, data=tmp_path / "missing.jsonl"), capsys),
                       "JSONL file not found", "missing.jsonl")
    assert_short_error(*run(args(model_dir, out, data=tmp_path), capsys), "is not a file")
    bad = tmp_path / "bad.jsonl"
    good = GSM8K.read_text().splitlines()[0]
    bad.write_text(f"{good}\n\n{{\"question\": \"q\"\n")
    assert_short_error(*run(args(model_dir, out, data=bad), capsys), f"{bad}:3: invalid JSON")
    bad.write_text(f"{good}\n" + json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    assert_short_error(*run(args(model_dir, out, data=bad), capsys), f"{bad}:2", "####")
    bad.write_bytes(good.encode() + b"\n\xff\xfe\n")
    assert_short_error(*run(args(model_dir, out, data=bad), capsys), f"{bad}:2: not UTF-8")
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(b"this is not gzip")
    assert_short_error(*run(args(model_dir, out, data=gz), capsys), "cannot read it as gzip")
    gz.write_bytes(gzip.compress(good.encode() + b"\n")[:-12])  # truncated archive
    assert_short_error(*run(args(model_dir, out, data=gz), capsys), str(gz))
    gz.write_bytes(gzip.compress((good + "\n").encode()))
    assert get_benchmark("gsm8k").load(gz)[0]["question"].startswith("Janet")  # a good .gz is read
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert_short_error(*run(args(model_dir, out, data=empty), capsys), "no rows")


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_ROW = st.one_of(
    st.text(max_size=20).map(lambda t: t.replace("\n", " ")),  # arbitrary text, mostly not JSON
    _JSON.map(json.dumps),
    st.fixed_dictionaries({}, optional={"question": _JSON | st.text(max_size=10),
                                        "answer": _JSON | st.text(max_size=10).map(lambda t: f"x\n#### {t}")})
    .map(json.dumps),
)


@SETTINGS
@given(_ROW)
def test_random_malformed_rows_are_named_by_file_and_line(tmp_path, row_text):
    path = tmp_path / "rows.jsonl"
    path.write_text(GSM8K.read_text().splitlines()[0] + "\n" + row_text + "\n")
    bench = get_benchmark("gsm8k")
    try:
        rows = bench.load(path)
    except EvalError as e:
        assert f"{path}:2" in str(e) and "\n" not in str(e)
        return
    # loaded: the row (if not blank) is a real GSM8K row with a question and a numeric gold answer
    if len(rows) == 2:
        assert isinstance(rows[1]["question"], str) and rows[1]["question"].strip()
        assert bench.gold(rows[1])


# ---- flags ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--threshold", "1.5"], "--threshold: must be in [0, 1], got 1.5"),
    (["--threshold", "-0.1"], "--threshold: must be in [0, 1]"),
    (["--accept-threshold", "2"], "--accept-threshold: must be in [0, 1], got 2"),
    (["--block-length", "0"], "--block-length"), (["--temperature", "-1"], "--temperature"),
    (["--steps", "0"], "--steps"), (["--strategy", "threshold", "--steps", "4"], "--steps"),
    (["--limit", "0"], "--limit: must be >= 1"), (["--batch-size", "zero"], "--batch-size"),
    (["--dtype", "float8"], "--dtype"), (["--strategy", "beam"], "--strategy"),
    (["--threshold", "nan"], "--threshold"), (["--top-k", "2", "--strategy", "llada2"], "--top-k"),
    (["--seed", "1.5"], "--seed"),
])
def test_out_of_range_flags_name_the_flag(tmp_path, capsys, model_dir, flags, needle):
    assert_short_error(*run(args(model_dir, tmp_path / "o", *flags), capsys), needle)


@SETTINGS
@given(st.sampled_from(["--threshold", "--accept-threshold"]),
       st.floats(allow_nan=False).filter(lambda x: not 0 <= x <= 1))
def test_random_thresholds_outside_0_1(tmp_path, capsys, model_dir, flag, value):
    # "--flag=-1e+16": argparse reads a bare "-1e+16" as an option ("expected one argument")
    assert_short_error(*run(args(model_dir, tmp_path / "o", f"{flag}={value!r}"), capsys), flag, "[0, 1]")


@SETTINGS
@given(st.sampled_from(["--block-length", "--gen-length", "--limit", "--batch-size", "--top-k"]),
       st.integers(max_value=0))
def test_random_non_positive_counts(tmp_path, capsys, model_dir, flag, value):
    assert_short_error(*run(args(model_dir, tmp_path / "o", f"{flag}={value}"), capsys), flag)


def test_unknown_benchmark_and_missing_data_flag(tmp_path, capsys, model_dir):
    argv = ["--model", model_dir, "--benchmark", "gsm9k", "--out", tmp_path / "o"]
    assert_short_error(*run(argv, capsys), "--benchmark", "invalid choice", "gsm8k")
    argv = ["--model", model_dir, "--benchmark", "math500", "--out", tmp_path / "o"]
    assert_short_error(*run(argv, capsys), "--data is required for math500")


# ---- the --out directory ------------------------------------------------------------------------------
def test_retry_after_a_run_that_failed_before_its_first_sample(tmp_path, capsys, model_dir, fake_model,
                                                               monkeypatch):
    out = tmp_path / "o"
    real = dmax_jax.generate

    def out_of_memory(*a, **k):
        raise MemoryError("device out of memory")

    monkeypatch.setattr(dmax_jax, "generate", out_of_memory)
    with pytest.raises(MemoryError):  # not an input error: it propagates, after run_config.json was written
        main([str(a) for a in args(model_dir, out, "--limit", "1")])
    assert (out / RUN_CONFIG_FILE).exists() and not (out / SAMPLES_FILE).read_text()
    monkeypatch.setattr(dmax_jax, "generate", real)
    code, _ = run(args(model_dir, out, "--limit", "1", "--threshold", "0.7"), capsys)  # other settings: fine
    assert code == 0 and json.loads((out / RUN_CONFIG_FILE).read_text())["decode_config"]["threshold"] == 0.7
    # now the directory holds a sample: another configuration is refused, naming what changed
    code, err = run(args(model_dir, out, "--limit", "1", "--threshold", "0.5"), capsys)
    assert_short_error(code, err, "records a different run", "decode_config.threshold: 0.7 -> 0.5")


def test_out_directory_problems(tmp_path, capsys, model_dir, fake_model):
    (tmp_path / "file").write_text("x")
    assert_short_error(*run(args(model_dir, tmp_path / "file"), capsys), "exists and is not a directory")
    assert_short_error(*run(args(model_dir, tmp_path / "file" / "o"), capsys),
                       f"--out {tmp_path / 'file' / 'o'}: cannot write there: {tmp_path / 'file'} is a file")
    out = tmp_path / "o"
    assert run(args(model_dir, out, "--limit", "2"), capsys)[0] == 0
    lines = (out / SAMPLES_FILE).read_text().splitlines(keepends=True)
    (out / SAMPLES_FILE).write_text("{broken\n" + "".join(lines))
    assert_short_error(*run(args(model_dir, out, "--limit", "2"), capsys), f"{SAMPLES_FILE}:1: corrupt")
    (out / SAMPLES_FILE).write_text("".join(lines))
    (out / RUN_CONFIG_FILE).write_text("{half")
    assert_short_error(*run(args(model_dir, out, "--limit", "2"), capsys), f"{RUN_CONFIG_FILE} is corrupt")


def test_summary_line_pluralised_and_ctrl_c_says_how_to_resume(tmp_path, capsys, model_dir, fake_model,
                                                                monkeypatch):
    out = tmp_path / "o"
    argv = [a for a in args(model_dir, out, "--limit", "1") if a != "--quiet"]
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1].startswith("1 sample: accuracy 100.00 %, TPF")
    assert captured.out.count("| gsm8k |") == 1  # one summary table
    assert "gsm8k: 100%" in captured.err and "1/1" in captured.err  # the tqdm bar
    assert json.loads((out / SUMMARY_FILE).read_text())["samples"] == 1

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dmax_jax, "generate", interrupted)
    assert main([str(a) for a in args(model_dir, out, "--limit", "3")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{out / SAMPLES_FILE}" in err and "run the same command again" in err


# ---- the real command, as a shell runs it -------------------------------------------------------------
@pytest.mark.parametrize("case", ["empty_model", "threshold", "default_gen_length"])
def test_subprocess_exit_status_and_stderr(tmp_path, case):
    demo = REPO / "dmax_jax" / "assets" / "demo" / "dmax"
    (tmp_path / "empty").mkdir()
    bare = tmp_path / "bare"  # the shipped demo model without its dmax_decode.json: the eval defaults apply
    shutil.copytree(demo, bare, ignore=shutil.ignore_patterns("dmax_decode.json", "*.safetensors"))
    model, extra, needle = {
        "empty_model": (tmp_path / "empty", ["--gen-length", "64"], "is empty"),
        "threshold": (demo, ["--threshold", "1.5"], "--threshold"),
        "default_gen_length": (bare, [], "--gen-length 2048 (the default) does not fit"),
    }[case]
    cmd = [sys.executable, "-m", "dmax_jax.eval", "--model", str(model), "--benchmark", "gsm8k", "--data",
           str(GSM8K), "--out", str(tmp_path / "o"), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- samples.jsonl corrupted at random -----------------------------------------------------------
_RECORD = {"index": 0, "prompt": "p", "response": "r", "extracted": ["1"], "gold": "1", "correct": True,
           "detail": "", "nfe": 2, "tokens": 3, "tokens_ref": 3, "tpf": 1.5, "seconds": 0.1, "batch_id": 0,
           "batch_size": 1}
_GARBAGE = st.one_of(
    st.binary(max_size=24).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=24).map(lambda t: t.replace("\n", "").encode()),
    # JSON objects that lack batch_id, so never a valid record
    st.dictionaries(st.sampled_from(sorted(set(_RECORD) - {"batch_id"})), _SCALAR, max_size=6)
    .map(lambda d: json.dumps(d).encode()),
)


@SETTINGS
@given(st.integers(0, 3), _GARBAGE)
def test_random_corrupt_sample_lines(tmp_path, position, garbage):
    from dmax_jax.eval.harness import load_samples

    lines = [json.dumps({**_RECORD, "index": i, "batch_id": i}).encode() + b"\n" for i in range(3)]
    lines.insert(position, garbage + b"\n")
    path = tmp_path / SAMPLES_FILE
    path.write_bytes(b"".join(lines))
    try:
        records = load_samples(str(path))
    except EvalError as e:
        assert position < 3 and f"{path}:{position + 1}: corrupt" in str(e) and "\n" not in str(e)
        return
    assert position == 3 and sorted(records) == [0, 1, 2]  # a bad last line is a torn write: dropped
    assert path.read_bytes() == b"".join(lines[:3])


def test_prompts_the_model_cannot_take(tmp_path, capsys, model_dir):
    from dmax_jax.data.chat import load_tokenizer

    mask_text = load_tokenizer(model_dir).convert_ids_to_tokens(2)  # tiny_config: mask_token_id = 2
    data = tmp_path / "mask.jsonl"
    data.write_text(json.dumps({"question": f"What is {mask_text} + 1?", "answer": "#### 3"}) + "\n")
    assert_short_error(*run(args(model_dir, tmp_path / "o", data=data), capsys),
                       f"row 0 of {data}: its prompt contains the mask token (id 2)")
    small = tmp_path / "small"
    shutil.copytree(model_dir, small)
    raw = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**raw, "vocab_size": 40}))
    assert_short_error(*run(args(small, tmp_path / "o"), capsys),   # found at load, before any prompt
                       f"--model {small}: the tokenizer has", "vocab_size (config.json) is 40")


def test_model_decode_defaults_are_layered_said_and_recorded(tmp_path, capsys, model_dir, fake_model):
    """A model's dmax_decode.json sits between the eval defaults and the flags."""
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    demo = REPO / "dmax_jax" / "assets" / "demo" / "dmax" / "dmax_decode.json"
    shutil.copy(demo, model / "dmax_decode.json")
    argv = ["--model", model, "--benchmark", "gsm8k", "--data", GSM8K, "--out", tmp_path / "o", "--quiet",
            "--limit", "1", "--threshold", "0.4"]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert f"decode defaults from {model / 'dmax_decode.json'}: " in err and "gen_length=64" in err
    assert "threshold" not in err  # given as a flag: the file's spd threshold (0.5) is not used
    used = fake_model[-1]
    assert (used.gen_length, used.dtype, used.prompt_bucket, used.threshold) == (64, "float32", 64, 0.4)
    recorded = json.loads((tmp_path / "o" / RUN_CONFIG_FILE).read_text())["decode_config"]
    assert recorded["gen_length"] == 64 and recorded["threshold"] == 0.4
    shutil.copy(demo, model / "dmax_decode.json")
    raw = json.loads((model_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "max_position_embeddings": 96}))
    code, err = run([a for a in argv if a not in ("--threshold", "0.4")], capsys)
    assert code == 2 and f"--gen-length 64 (from {model / 'dmax_decode.json'}) does not fit" in err, err
    (model / "dmax_decode.json").write_text('{"format": "dmax_decode/1", "decode": {"gen_length": 0}}')
    assert_short_error(*run([*argv[:-2]], capsys), "dmax_decode.json", "gen_length")
