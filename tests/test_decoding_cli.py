"""decode.py end to end on a tiny HF directory (random weights + the test tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script
from test_decoding_oracle import random_params

from dmax_jax.checkpoint.hf import save_hf_params
from dmax_jax.config import tiny_config
from dmax_jax.data.tokenizer_build import MASK_TOKEN, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CFG = tiny_config()
ARGS = ["--block-length", "8", "--gen-length", "16", "--dtype", "float32", "--threshold", "0.3"]


def _cli():
    return load_script("decode.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    params = random_params(CFG, seed=0)
    save_hf_params(params, CFG, path)
    build_tokenizer(path, vocab_size=CFG.vocab_size)
    return path


def test_decode_cli_writes_jsonl_and_html(model_dir, tmp_path, capsys):
    cli = _cli()
    out, html = tmp_path / "res" / "out.jsonl", tmp_path / "trace.html"
    rc = cli.main(["--model", str(model_dir), "--prompt", "Tom has 3 apples.", "--prompt", "2+3=?",
                   "--prompt", "fox", "--strategy", "llada2", "--batch-size", "2", "--out", str(out),
                   "--html", str(html), *ARGS])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(r) >= {"text", "token_ids", "nfe", "tokens", "tokens_ref", "tpf", "seconds"}
        assert r["tokens"] == len(r["token_ids"]) and r["nfe"] >= 1
        assert r["tpf"] == pytest.approx(r["tokens_ref"] / r["nfe"])
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('class="trace"') >= 3
    assert list(out.parent.iterdir()) == [out]             # no temporary file left behind
    assert f"wrote the decoding trace page to {html}" in capsys.readouterr().err


def test_html_failure_after_decoding_keeps_the_out_results(model_dir, tmp_path, capsys, monkeypatch):
    import dmax_jax.viz.html

    def disk_full(path, *a, **k):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(dmax_jax.viz.html, "write_trace_html", disk_full)
    out, html = tmp_path / "out.jsonl", tmp_path / "trace.html"
    rc = _cli().main(["--model", str(model_dir), "--prompt", "fox", "--out", str(out), "--html", str(html),
                      *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"decode.py: error: --html {html}: cannot write the page")
    assert "No space left" in err[-1] and "Traceback" not in "".join(err)
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0]


def test_decode_cli_rejects_bad_prompts_without_partial_output(model_dir, tmp_path, capsys, monkeypatch):
    cli = _cli()
    out = tmp_path / "out.jsonl"
    rc = cli.main(["--model", str(model_dir), "--prompt", "fine", "--prompt", f"a {MASK_TOKEN} b",
                   "--no-chat", "--out", str(out), *ARGS])
    assert rc == 2 and "row 1 contains the mask token" in capsys.readouterr().err
    rc = cli.main(["--model", str(model_dir), "--prompt", "fine", "--out", str(out), "--block-length", "8",
                   "--gen-length", str(CFG.max_position_embeddings)])
    assert rc == 2 and "max_position_embeddings" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    import dmax_jax.demo.examples

    monkeypatch.setattr(dmax_jax.demo.examples, "ASSET_DIR", tmp_path / "no_assets")  # no shipped model
    rc = cli.main(["--prompt", "hello"])
    assert rc == 2 and "shipped demo model" in capsys.readouterr().err


def test_prompts_file_takes_strings_and_objects_and_names_bad_lines(tmp_path):
    cli = _cli()
    good = tmp_path / "prompts.jsonl"
    good.write_text('"bare string"\n\n{"prompt": "from an object", "id": 7}\n', encoding="utf-8")
    assert cli.read_prompts(cli.parse_args(["--prompts", str(good)])) == ["bare string", "from an object"]
    for body, message in (('"ok"\n{"text": "no prompt key"}\n', ":2: expected a JSON string or an object"),
                          ('"ok"\n{"prompt": \n', ":2: invalid JSON"),
                          ("\n\n", "no rows")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            cli.read_prompts(cli.parse_args(["--prompts", str(bad)]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cli.read_prompts(cli.parse_args(["--prompts", str(tmp_path / "missing.jsonl")]))


# ---- the shipped demo models: dmax_decode.json, demo mode ------------------------------------------
def test_prompt_with_the_shipped_model_gives_the_demo_answer(capsys):
    """The prompt format and decode defaults travel with the model (dmax_decode.json): a bare demo
    question through decode.py decodes exactly what the demo decodes."""
    from dmax_jax.demo import decode_examples, example_questions

    question = example_questions(1)[0]
    want = decode_examples("dmax", n=1)[0]
    assert _cli().main(["--prompt", question]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["text"] == want["response"] and row["nfe"] == want["nfe"]
    assert row["tpf"] == pytest.approx(want["tpf"]) and row["tokens"] <= 64     # gen 64 from the file
    assert row["compile_seconds"] >= 0.0 and row["seconds"] > 0.0


def test_demo_mode_compares_both_pairs_and_honours_flags(tmp_path, capsys):
    out, html = tmp_path / "demo.jsonl", tmp_path / "demo.html"
    rc = _cli().main(["--gen-length", "32", "--dtype", "float32", "--out", str(out), "--html", str(html)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "base + threshold" in table and "dmax + spd" in table and "mean TPF" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["model"], r["strategy"]) for r in rows] == [("base", "threshold")] * 4 + [("dmax", "spd")] * 4
    assert {r["threshold"] for r in rows if r["model"] == "base"} == {0.95}     # the model's own τ
    assert {r["threshold"] for r in rows if r["model"] == "dmax"} == {0.5}
    assert all(r["tokens"] <= 32 and r["tokens_ref"] <= 32 for r in rows)       # --gen-length honoured
    assert all(isinstance(r["correct"], bool) and r["gold"] for r in rows)
    page = html.read_text()
    assert page.count('class="trace"') == 8
    # the page's TPF is the JSON's (same prefill rule), row for row
    import re

    shown = [float(m) for m in re.findall(r"TPF <b>([0-9.]+)</b>", page)]
    assert shown == [round(r["tpf"], 2) for r in rows]
