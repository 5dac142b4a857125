"""OPUT train step (spec §4): loss, rollout, gradients, optimizer, accumulation, precision, remat."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mp_worker import (
    CPU_FAST_COMPILE,
    LENGTH,
    MASK_ID,
    host_params,
    make_batch,
    optim_config,
    problem_config,
    step_config,
)

from dmax_jax.model.llada2 import forward
from dmax_jax.model.masks import MaskSpec
from dmax_jax.training.optim import OptimConfig, lr_schedule, make_optimizer
from dmax_jax.training.state import init_train_state
from dmax_jax.training.step import (
    StepConfig,
    loss_fn,
    make_train_step,
    oput_rollout,
    reduce_sequence_losses,
    sequence_losses,
)

B = 4
jit = lambda f, **kw: jax.jit(f, compiler_options=CPU_FAST_COMPILE, **kw)
_value_and_grad = jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(1, 2))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def setup():
    cfg = problem_config()
    params = jax.tree.map(jnp.asarray, host_params())
    batch = make_batch(cfg.vocab_size, batch=B)
    rolled = np.asarray(jit(oput_rollout, static_argnums=(1, 2))(params, cfg, step_config(), batch))
    rolled_batch = {**batch, "noisy_input_ids": rolled}
    (loss, aux), grads = _value_and_grad(params, cfg, step_config(), rolled_batch)
    (loss_unrolled, _), grads_unrolled = _value_and_grad(params, cfg, step_config(), batch)
    return {"cfg": cfg, "params": params, "batch": batch, "rolled": rolled, "loss": loss, "aux": aux,
            "grads": grads, "loss_unrolled": loss_unrolled, "grads_unrolled": grads_unrolled}


# ---- loss ---------------------------------------------------------------------------------------
def _numpy_loss(logits, labels):
    per_row, used = [], []
    for lg, lb in zip(logits.astype(np.float64), labels):
        m = lb != -100
        if not m.any():
            per_row.append(0.0)
            continue
        z = lg[m]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        per_row.append(float(np.mean(lse - z[np.arange(len(z)), lb[m]])))
        used.append(per_row[-1])
    return np.array(per_row), (float(np.mean(used)) if used else 0.0), len(used)


@jax.jit
def _losses(logits, labels):
    per_row, count = sequence_losses(logits, labels)
    return per_row, count, reduce_sequence_losses(per_row, count)


def test_loss_matches_numpy_per_sequence_token_mean():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (4, 6)).astype(np.int32)
    labels[0, :4] = -100  # 2 labels
    labels[1, :] = -100  # no labels: contributes 0 and is left out of the mean
    labels[2, 1:] = -100  # 1 label
    per_row, count, (loss, aux) = _losses(logits, labels)
    want_rows, want_loss, n_valid = _numpy_loss(logits, labels)
    np.testing.assert_allclose(per_row, want_rows, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert int(aux["valid_sequences"]) == n_valid == 3
    assert int(aux["tokens"]) == int((labels != -100).sum()) == 2 + 0 + 1 + 6
    # a token mean per row, not a token mean over the batch
    assert not np.isclose(float(loss), float(np.sum(want_rows * count) / count.sum()))
    _, _, (empty, aux) = _losses(logits, np.full((4, 6), -100, np.int32))
    assert float(empty) == 0.0 and int(aux["valid_sequences"]) == 0


def test_batch_and_config_errors_name_the_culprit(setup):
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    with pytest.raises(KeyError, match="flag"):
        loss_fn(params, cfg, step_config(), {k: v for k, v in batch.items() if k != "flag"})
    with pytest.raises(ValueError, match="labels"):
        loss_fn(params, cfg, step_config(), {**batch, "labels": batch["labels"][:, :-1]})
    with pytest.raises(ValueError, match="mask_id"):
        loss_fn(params, cfg, step_config(mask_id=cfg.vocab_size), batch)
    for bad in ({"mode": "sft"}, {"compute_dtype": "float16"}, {"remat": "some"}, {"block_length": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StepConfig(mask_id=MASK_ID, **bad)


# ---- rollout ------------------------------------------------------------------------------------
def test_rollout_fills_exactly_masked_noisy_positions_of_flag_rows(setup):
    cfg, params, batch, rolled = setup["cfg"], setup["params"], setup["batch"], setup["rolled"]
    ids = np.concatenate([batch["noisy_input_ids"], batch["input_ids"]], axis=1)
    fwd = jit(lambda p, x: forward(p, cfg, x, mask=MaskSpec("noisy_clean", 16))[0])
    pred = np.asarray(jnp.argmax(fwd(params, ids), -1))[:, :LENGTH]
    noisy, flag = batch["noisy_input_ids"], batch["flag"]
    fill = (noisy == MASK_ID) & flag[:, None]
    assert fill.sum() > 10 and (~flag).any() and ((noisy == MASK_ID) & ~flag[:, None]).any()
    np.testing.assert_array_equal(rolled, np.where(fill, pred, noisy))
    np.testing.assert_array_equal(rolled[~flag], noisy[~flag])  # flag=False rows untouched
    np.testing.assert_array_equal(rolled[~fill], noisy[~fill])  # unmasked positions untouched
    assert (rolled[fill] != MASK_ID).mean() > 0.9  # the prediction really replaced the masks


def test_gradients_flow_only_through_the_loss_forward(setup):
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]

    def end_to_end(p):
        return loss_fn(p, cfg, step_config(), {**batch, "noisy_input_ids": oput_rollout(p, cfg, step_config(),
                                                                                         batch)})[0]

    loss, grads = jit(jax.value_and_grad(end_to_end))(params)
    np.testing.assert_allclose(loss, setup["loss"], rtol=1e-6)
    assert _max_diff(grads, setup["grads"]) < 1e-6
    # ... and the rollout matters: the loss on the un-rolled input has different gradients
    assert abs(float(setup["loss_unrolled"]) - float(loss)) > 1e-3
    assert _max_diff(setup["grads_unrolled"], grads) > 1e-4
    assert float(jnp.abs(grads["moe_layers"]["moe"]["expert_bias"]).max()) == 0.0


# ---- optimizer ----------------------------------------------------------------------------------
def test_lr_schedule_matches_spec_formula():
    cfg = OptimConfig(total_steps=1000, lr=2e-6, min_lr_ratio=0.05, warmup_ratio=0.03)
    sched = lr_schedule(cfg)
    warm = int(0.03 * 1000)
    for step in (0, 1, 15, 29, 30, 31, 200, 515, 999, 1000, 1500):
        if step < warm:
            want = 2e-6 * step / warm
        else:
            p = min((step - warm) / (1000 - warm), 1.0)
            want = 2e-6 * ((1 - 0.05) * 0.5 * (1 + math.cos(math.pi * p)) + 0.05)
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-15, err_msg=f"step {step}")
    assert float(sched(1000)) == pytest.approx(1e-7)
    assert float(lr_schedule(OptimConfig(total_steps=10, warmup_ratio=0.0))(0)) == pytest.approx(2e-6)
    for bad in ({"total_steps": 0}, {"lr": 0.0}, {"warmup_ratio": 1.0}, {"grad_accum_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OptimConfig(**{"total_steps": 10, **bad})


def test_train_step_updates_params_keeps_expert_bias_and_reports_metrics(setup):
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    ocfg = optim_config()
    opt = make_optimizer(ocfg)
    state0 = init_train_state(params, opt)
    step = jit(make_train_step(cfg, step_config(), opt))
    state1, m1 = step(state0, batch)
    state2, m2 = step(state1, batch)
    bias0 = np.asarray(params["moe_layers"]["moe"]["expert_bias"])
    assert np.abs(bias0).max() > 0.01  # weight decay would move a non-zero bias if it were not frozen
    np.testing.assert_array_equal(state2.params["moe_layers"]["moe"]["expert_bias"], bias0)
    for path, new in jax.tree_util.tree_leaves_with_path(state2.params):
        if "expert_bias" not in jax.tree_util.keystr(path):
            assert _max_diff(new, _get(params, path)) > 1e-4, jax.tree_util.keystr(path)
    assert int(state0.step) == 0 and int(state1.step) == 1 and int(state2.step) == 2
    assert jax.tree.structure(state2) == jax.tree.structure(state0)  # same tree in and out (donation)
    # metrics of the first step against separately computed values
    rolled, noisy = setup["rolled"], batch["noisy_input_ids"]
    fill = (noisy == MASK_ID) & batch["flag"][:, None]
    np.testing.assert_allclose(m1["loss"], setup["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], float(jax.tree.reduce(
        lambda a, g: a + jnp.sum(g * g), setup["grads"], 0.0)) ** 0.5, rtol=1e-4)
    assert int(m1["tokens"]) == int((batch["labels"] != -100).sum())
    assert int(m1["valid_sequences"]) == B
    np.testing.assert_allclose(m1["rollout_changed_fraction"],
                               (rolled[fill] != batch["input_ids"][fill]).mean(), rtol=1e-6)
    np.testing.assert_allclose(m1["lr"], float(lr_schedule(ocfg)(0)), rtol=1e-6)
    np.testing.assert_allclose(m2["lr"], float(lr_schedule(ocfg)(1)), rtol=1e-6)
    assert float(m2["loss"]) < float(m1["loss"])  # lr 1e-2 on one batch: the loss must drop


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_grad_accumulation_equals_one_big_batch(setup):
    cfg, params, batch = setup["cfg"], setup["params"], setup["batch"]
    scfg = step_config(mode="mdm")
    big_opt, acc_opt = make_optimizer(optim_config()), make_optimizer(optim_config(grad_accum_steps=2))
    big_state, big_m = jit(make_train_step(cfg, scfg, big_opt))(init_train_state(params, big_opt), batch)
    acc_step = jit(make_train_step(cfg, scfg, acc_opt))
    state = init_train_state(params, acc_opt)
    losses = []
    for half in (slice(0, B // 2), slice(B // 2, B)):
        state, m = acc_step(state, {k: v[half] for k, v in batch.items()})
        losses.append(float(m["loss"]))
        assert float(m["rollout_changed_fraction"]) == 0.0  # mdm: no rollout, flags ignored
        if half.start == 0:
            assert _max_diff(state.params, params) == 0.0  # nothing applied before the k-th micro-batch
    np.testing.assert_allclose(np.mean(losses), big_m["loss"], rtol=1e-5)
    assert _max_diff(state.params, big_state.params) < 2e-5
    assert _max_diff(big_state.params, params) > 1e-3
    # mdm loss is the loss on the un-rolled batch
    np.testing.assert_allclose(big_m["loss"], setup["loss_unrolled"], rtol=1e-5)


# ---- precision, remat, attention backend ---------------------------------------------------------
def _cosine(a, b) -> float:
    dot = sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    na = sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(a)) ** 0.5
    nb = sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(b)) ** 0.5
    return dot / (na * nb)


def test_bf16_compute_close_to_f32_with_f32_grads(setup):
    cfg, params = setup["cfg"], setup["params"]
    rolled_batch = {**setup["batch"], "noisy_input_ids": setup["rolled"]}
    (loss, _), grads = _value_and_grad(params, cfg, step_config(compute_dtype="bfloat16"), rolled_batch)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(loss, setup["loss"], rtol=1e-2)
    assert float(loss) != float(setup["loss"])  # it really ran in bf16
    assert _cosine(grads, setup["grads"]) > 0.98


@pytest.mark.parametrize("kw", [{"remat": "full"}, {"attention_backend": "xla_blockwise"}],
                         ids=["remat_full", "xla_blockwise"])
def test_same_loss_and_grads(setup, kw):
    rolled_batch = {**setup["batch"], "noisy_input_ids": setup["rolled"]}
    (loss, _), grads = _value_and_grad(setup["params"], setup["cfg"], step_config(**kw), rolled_batch)
    np.testing.assert_allclose(loss, setup["loss"], rtol=1e-5)
    assert _max_diff(grads, setup["grads"]) < 1e-5
