"""LoRA OPUT (issue 29): adapters start as a no-op, only adapters train, merge-then-export equals the
adapted model, adapters save alone, bad settings are one-line errors. float32 on the tiny 2-layer model
(1 dense + 1 MoE layer, shared expert): every adapter target is present."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mp_worker import (
    CPU_FAST_COMPILE,
    MASK_ID,
    host_params,
    make_batch,
    optim_config,
    problem_config,
    reuse_train_programs,
    step_config,
)

from dmax_jax.model.llada2 import forward
from dmax_jax.model.lora import LoraConfig, combine, init_adapters, merge
from dmax_jax.training.config import TrainConfigError, load_train_config
from dmax_jax.training.lora import (
    export_params,
    init_lora_state,
    load_adapters,
    make_lora_train_step,
    save_adapters,
)
from dmax_jax.training.optim import make_optimizer

ALL = ("attention", "mlp", "shared", "experts")
TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
# qwix 0.1.8 checks isinstance against flax's deprecated nnx.VariableState alias on every param.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
jit = lambda f, **kw: jax.jit(f, compiler_options=CPU_FAST_COMPILE, **kw)  # noqa: E731


def _logits(params, cfg, lora=None):
    ids = jnp.asarray(make_batch(cfg.vocab_size, batch=2)["input_ids"])
    return jit(lambda p: forward(p, cfg, ids, lora=lora)[0])(params)


@pytest.fixture(scope="module", autouse=True)
def _one_program_per_config():
    """Runs with the same config share one compiled train step (``mp_worker.reuse_train_programs``)."""
    with reuse_train_programs():
        yield


@pytest.fixture(scope="module")
def trained():
    """One LoRA OPUT step on every target (lr 1e-2 so that the adapters move visibly)."""
    cfg = problem_config()
    params = jax.tree.map(jnp.asarray, host_params())
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL, base_dtype="float32")
    scfg = step_config(lora=lora)
    opt = make_optimizer(optim_config())
    state = init_lora_state(params, cfg, lora, opt, seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg.vocab_size, batch=4).items()}
    new, metrics = jit(make_lora_train_step(cfg, scfg, opt))(state, batch)
    return {"cfg": cfg, "params": params, "lora": lora, "state": state, "new": new, "metrics": metrics}


@pytest.mark.parametrize("targets", [("attention", "mlp", "shared"), ("experts",)])
def test_adapters_start_as_a_noop_bit_for_bit(targets):
    cfg = problem_config()
    params = jax.tree.map(jnp.asarray, host_params())
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = jit(lambda k: init_adapters(cfg, lora, k))(jax.random.key(1))
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))  # A is random, B zero
    np.testing.assert_array_equal(np.asarray(_logits(combine(params, adapters, lora), cfg, lora)),
                                  np.asarray(_logits(params, cfg)))


def test_only_adapters_change_and_only_they_have_optimizer_state(trained):
    old, new = trained["state"].params, trained["new"].params
    for a, b in zip(jax.tree.leaves(old["base"]), jax.tree.leaves(new["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(old["adapters"]), jax.tree.leaves(new["adapters"]), strict=True)]
    assert min(moved) > 0, "every adapter leaf (A and B) gets an update"
    n_adapter = sum(x.size for x in jax.tree.leaves(old["adapters"]))
    n_opt = sum(x.size for x in jax.tree.leaves(trained["state"].opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter  # Adam's two moments of the adapters, nothing of the base
    assert np.isfinite(float(trained["metrics"]["loss"])) and float(trained["metrics"]["grad_norm"]) > 0


def test_merge_then_export_equals_the_adapted_model(trained, tmp_path):
    from dmax_jax.checkpoint.hf import load_hf_params
    from dmax_jax.checkpoint.train_state import export_hf

    cfg, lora, p = trained["cfg"], trained["lora"], trained["new"].params
    adapted = np.asarray(_logits(combine(p["base"], p["adapters"], lora), cfg, lora))
    assert np.abs(adapted - np.asarray(_logits(p["base"], cfg))).max() > 1e-4  # the step changed the model
    export_hf(export_params(p, lora), cfg, tmp_path / "hf")
    loaded = load_hf_params(tmp_path / "hf", cfg)
    np.testing.assert_allclose(np.asarray(_logits(loaded, cfg)), adapted, rtol=0, atol=2e-5)


def test_adapters_alone_round_trip(trained, tmp_path):
    p, lora = trained["new"].params, trained["lora"]
    save_adapters(p, lora, tmp_path)
    adapters, lora2 = load_adapters(tmp_path)
    assert lora2 == lora
    for a, b in zip(jax.tree.leaves(p["adapters"]), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    merged = merge(p["base"], adapters, lora)
    assert not any(k.endswith(("_lora_a", "_lora_b")) for k in jax.tree_util.tree_flatten_with_path(merged)[0]
                   for k in [jax.tree_util.keystr(k[0])])


def test_bf16_compute_keeps_bf16_activations():
    """The adapted forward traces under bf16 compute (the scan carry stays bf16)."""
    cfg = problem_config()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), host_params())
    lora = LoraConfig(rank=4, targets=ALL)
    adapters = jit(lambda k: init_adapters(cfg, lora, k))(jax.random.key(1))
    ids = jnp.zeros((1, 8), jnp.int32)
    out = jax.eval_shape(lambda p: forward(p, cfg, ids, dtype=jnp.bfloat16, lora=lora)[0],
                         combine(params, adapters, lora))
    assert out.dtype == jnp.float32 and out.shape == (1, 8, cfg.vocab_size)


@pytest.mark.parametrize("override, key", [
    ("step.lora.rank=-1", "rank"), ("step.lora.alpha=0", "alpha"),
    ("step.lora.targets=[attention,foo]", "targets"), ("step.lora.targets=[]", "targets"),
    ("step.lora.base_dtype=nf4", "base_dtype"),
    ("step.lora.rank=x", "step.lora.rank")])
def test_bad_lora_settings_name_the_key(override, key):
    with pytest.raises(TrainConfigError) as e:
        load_train_config(TINY_YAML, [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step.lora") and key in msg


def test_lora_off_is_the_full_step_config():
    assert not step_config().lora.enabled and step_config().mask_id == MASK_ID
    assert dataclasses.replace(step_config(), lora=LoraConfig(rank=8)).lora.scale == 16.0 / 8


@pytest.mark.slow
def test_lora_run_resumes_bit_exact_and_exports_merged(tmp_path):
    """4 LoRA steps straight vs 2 + resume to 4 through the training loop: every state leaf (frozen
    base, adapters, Adam moments, step) equal; the HF export at the end is the merged model."""
    from dmax_jax.checkpoint.hf import load_hf_params
    from dmax_jax.demo.data import generate_task_data
    from dmax_jax.training.loop import resolve_model_config, train

    train_file, tok = generate_task_data("generate:arith:48", tmp_path / "task")

    def cfg(out, *more):
        return load_train_config(TINY_YAML, [
            f"data.paths=[{train_file}]", f"model.tokenizer={tok}", "model.overrides.num_hidden_layers=2",
            "model.overrides.first_k_dense_replace=1", "data.max_length=64", "data.batch_size=8",
            "data.num_epochs=1", "step.block_length=8", "optim.total_steps=4", "optim.lr=1e-2",
            "run.log_every=1", "run.progress_bar=false", f"run.out_dir={tmp_path / out}", "step.lora.rank=4",
            "step.lora.targets=[attention,mlp,shared,experts]", "step.lora.base_dtype=float32", *more])

    a = train(cfg("a", "run.num_steps=4", "run.export_hf_at_end=true"))
    train(cfg("b", "run.num_steps=2", "run.save_every=1"))
    b = train(cfg("b", "run.num_steps=4", "run.save_every=1"))
    assert b.start_step == 2
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c = a.config
    mcfg = resolve_model_config(c)
    p = a.state.params
    adapted = np.asarray(_logits(combine(p["base"], p["adapters"], c.step.lora), mcfg, c.step.lora))
    exported = np.asarray(_logits(load_hf_params(a.hf_export_dir, mcfg), mcfg))
    np.testing.assert_allclose(exported, adapted, rtol=0, atol=2e-5)
    adapters, lora = load_adapters(tmp_path / "a" / "adapters")  # written beside hf_final
    assert lora == c.step.lora
    for x, y in zip(jax.tree.leaves(p["adapters"]), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
