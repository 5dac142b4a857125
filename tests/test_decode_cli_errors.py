"""decode.py refuses bad input up front: exit status 2 and one line naming the flag and its allowed
range, never a traceback — checked in a subprocess (what a user sees) and, for many random values,
in-process with hypothesis. Nothing here loads a model: every check happens before that."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    (["--prompt", "hi", "--threshold", "1.5"], "--threshold: must be in [0, 1], got 1.5"),
    (["--prompt", "hi", "--accept-threshold", "2"], "--accept-threshold: must be in [0, 1], got 2.0"),
    (["--prompt", "hi", "--gen-length", "0"], "--gen-length: must be in [1, "),
    (["--prompt", "hi", "--strategy", "threshold", "--steps", "4"], "--steps: strategy 'threshold'"),
    (["--prompt", "hi", "--prompt-bucket", "48"], "--prompt-bucket: must be a positive multiple of block"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--model", "/nonexistent/model", "--prompt", "hi"], "--model: model directory /nonexistent/model"),
    (["--threshold", "0.3"], "--threshold has no single meaning in the demo"),
    (["--steps", "3"], "--steps has no single meaning in the demo"),
    (["--prompts", "/nonexistent/p.jsonl"], "/nonexistent/p.jsonl"),
    (["--model", "/nonexistent/model"], "--model: model directory /nonexistent/model does not exist"),
    (["--prompt", "hi", "--out", "/dev/null/r.jsonl"], "--out /dev/null/r.jsonl: cannot write there: "
                                                      "/dev/null is a file"),
]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "decode.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("argv,message", CASES[:4] + CASES[6:8])
def test_bad_flags_exit_2_with_one_line(argv, message):
    p = _run(argv)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("decode.py: error: ") and message in lines[0]
    assert p.stdout == ""


def test_argparse_choices_name_the_flag_and_the_choices():
    p = _run(["--prompt", "hi", "--dtype", "float8"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--dtype" in p.stderr and "float8" in p.stderr and "bfloat16" in p.stderr


def _main(cli, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def cli():
    return load_script("decode.py")


@pytest.mark.parametrize("argv,message", CASES)
def test_bad_flags_in_process(cli, capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@settings(max_examples=40, deadline=None)
@given(x=hs.floats(allow_nan=False).filter(lambda v: not 0.0 <= v <= 1.0),
       flag=hs.sampled_from(["--threshold", "--accept-threshold"]))
def test_any_threshold_outside_unit_interval_is_refused(cli, x, flag):
    rc, err = _main(cli, ["--prompt", "hi", f"{flag}={x!r}"])
    assert rc == 2 and f"{flag}: must be in [0, 1]" in err and err.count("\n") == 1


@settings(max_examples=40, deadline=None)
@given(n=hs.integers(max_value=0), flag=hs.sampled_from(["--gen-length", "--block-length", "--steps",
                                                          "--top-k", "--max-unroll", "--expected-tpf"]))
def test_any_non_positive_count_is_refused(cli, n, flag):
    rc, err = _main(cli, ["--prompt", "hi", f"{flag}={n}"])
    assert rc == 2 and f"{flag}: must be in [1, " in err and err.count("\n") == 1


def test_help_shows_defaults_without_rest_backticks():
    p = _run(["--help"])
    assert p.returncode == 0 and "``" not in p.stdout
    for text in ("--gen-length GEN_LENGTH", "(default: 256)", "(default: 0.5)", "(default: bfloat16)",
                 "dmax_decode.json"):
        assert text in p.stdout, text


def test_empty_model_dir_and_dir_without_config(cli, tmp_path):
    rc, err = _main(cli, ["--model", str(tmp_path), "--prompt", "hi"])
    assert rc == 2 and "is empty" in err and err.count("\n") == 1
    (tmp_path / "model.safetensors").write_bytes(b"")
    rc, err = _main(cli, ["--model", str(tmp_path), "--prompt", "hi"])
    assert rc == 2 and "has no config.json" in err


def test_unwritable_outputs_are_named_before_any_model_loads(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv, flag in ((["--prompt", "hi", "--out", str(blocker / "r.jsonl")], "--out"),
                       (["--prompt", "hi", "--html", str(blocker / "sub" / "t.html")], "--html"),
                       (["--html", str(blocker / "t.html")], "--html")):          # the demo too
        rc, err = _main(cli, argv)
        assert rc == 2 and err.startswith(f"decode.py: error: {flag} ") and f"{blocker} is a file" in err
        assert err.count("\n") == 1
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_out_and_html_must_be_file_paths(cli, tmp_path):
    rc, err = _main(cli, ["--prompt", "hi", "--out", str(tmp_path)])
    assert rc == 2 and "--out" in err and "is a directory" in err
    rc, err = _main(cli, ["--html", str(tmp_path)])                 # demo mode checks it too
    assert rc == 2 and "--html" in err and "is a directory" in err
