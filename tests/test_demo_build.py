"""tools/build_demo.py end to end, shortened (its own file so that pytest-xdist's ``--dist loadfile``
runs it beside the other demo tests rather than after them)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from scripts import load_script

from dmax_jax import demo


@pytest.mark.slow
def test_build_demo_rebuilds_both_models_end_to_end(tmp_path):
    """tools/build_demo.py, shortened: base from scratch → OPUT → two HF folders; then, on the shipped
    base (a 2-step base answers nothing), the default recipe's middle stage: base's own answers."""
    build_demo = load_script("tools/build_demo.py")
    work, assets = tmp_path / "work", tmp_path / "assets"
    short = ["--work", str(work), "--assets", str(assets), "--skip-eval",
             "--base-override", "run.save_every=0",
             "--dmax-override", "run.num_steps=2", "--dmax-override", "run.save_every=0",
             "--base-override", "data.batch_size=8", "--dmax-override", "data.batch_size=8"]
    tiny_base = ["--base-override", "data.paths=[generate:arith_varied:64]",
                 "--base-override", "run.num_steps=2"]
    assert build_demo.main([*short, *tiny_base, "--distill-rows", "0"]) == 0
    base, dmax = demo.load_demo_model(assets / "base"), demo.load_demo_model(assets / "dmax")
    assert not np.allclose(np.asarray(base.params["embedding"]), np.asarray(dmax.params["embedding"]))
    gold = work / "base" / "task_data" / "train.jsonl"
    assert yaml.safe_load((work / "dmax" / "train_config.yaml").read_text())["data"]["paths"] == [str(gold)]
    assert {"base_pretrain_s", "dmax_oput_s"} <= set(json.loads((work / "build_times.json").read_text()))

    shutil.copytree(demo.default_model_dir("base"), assets / "base", dirs_exist_ok=True)
    assert build_demo.main([*short, "--skip-base", "--distill-rows", "16"]) == 0
    distilled = [json.loads(line) for line in (work / "distill" / "train.jsonl").read_text().splitlines()]
    assert [r["messages"][0] for r in distilled] == [json.loads(line)["messages"][0]
                                                     for line in gold.read_text().splitlines()[:16]]
    dmax_cfg = yaml.safe_load((work / "dmax" / "train_config.yaml").read_text())
    assert dmax_cfg["data"]["paths"] == [str(work / "distill" / "train.jsonl")]
    assert build_demo.parse_args([]).distill_rows == 8000  # the shipped dmax's recipe
