"""A first run that keeps its word: the test suite installs nothing itself (browser tests skip with the
reason when Chromium is absent), ``python train.py`` says where its demo files go and how to start over,
and its fine-tune is an HF folder — named apart from the shipped ``dmax`` — that ``decode.py`` loads."""

from __future__ import annotations

import json
import subprocess

import browser
import pytest
from scripts import load_script

from dmax_jax.demo import load_demo_model
from dmax_jax.demo.quick import QUICK_MODEL, write_model_folder


def test_browser_helper_skips_without_chromium_and_never_installs(monkeypatch):
    monkeypatch.setattr(browser, "_find", lambda: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]} looking for Chromium"))
    monkeypatch.delenv("DMAX_REQUIRE_CHROMIUM", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"Chromium not found .*`apt-get install -y chromium`"):
        browser.chromium_path()
    monkeypatch.setenv("DMAX_REQUIRE_CHROMIUM", "1")   # a CI that must not lose the check fails instead
    with pytest.raises(browser.ChromiumUnavailable, match="Chromium not found"):
        browser.chromium_path()


@pytest.mark.parametrize("earlier_run", [False, True])
def test_demo_says_where_its_files_go_and_how_to_start_over(tmp_path, monkeypatch, capsys, earlier_run):
    import dmax_jax.demo

    monkeypatch.chdir(tmp_path)
    if earlier_run:
        (tmp_path / "runs" / "demo_quick" / "train" / "checkpoints").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(dmax_jax.demo, "run_quick_demo", lambda out: calls.append(str(out)))
    assert load_script("train.py").main([]) == 0 and calls == ["runs/demo_quick"]
    out = capsys.readouterr().out
    assert "Its files go to runs/demo_quick" in out and "remove runs/demo_quick to start over" in out
    assert ("holds an earlier demo run, which is reused" in out) == earlier_run


def test_demo_refuses_an_unwritable_folder_before_loading_anything(tmp_path, monkeypatch, capsys):
    import dmax_jax.demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the demo's folder should go")
    monkeypatch.setattr(dmax_jax.demo, "run_quick_demo", lambda out: pytest.fail("demo started"))
    assert load_script("train.py").main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: the demo folder runs/demo_quick: cannot write there") and \
        "Traceback" not in err


def test_the_demo_fine_tune_is_an_hf_folder_decode_py_loads(tmp_path, capsys):
    folder = write_model_folder(load_demo_model("base"), tmp_path / QUICK_MODEL)
    assert folder.name == "dmax_quick" and (folder / "dmax_decode.json").is_file()
    out = tmp_path / "r.jsonl"
    rc = load_script("decode.py").main(["--model", str(folder), "--prompt", "Ella is 8 years old. How old "
                                        "is Ella?", "--gen-length", "32", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    row = json.loads(out.read_text())
    assert row["nfe"] >= 1 and row["tokens"] >= 1
