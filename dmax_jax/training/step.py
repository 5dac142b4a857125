"""The On-Policy Uniform Training step (algorithm §4): rollout → loss forward → clipped AdamW update.

Layout (algorithm §2.1): every row is ``[noisy | clean]`` of length 2L with positions ``[0..L-1, 0..L-1]``
and the ``noisy_clean`` block mask. Per row:

1. rollout (``mode="oput"`` only, no gradient): one forward; for rows with ``flag`` every MASK token of
   the noisy half is replaced by the argmax prediction at its position (greedy, all at once);
2. loss forward on the (rolled-out) noisy half + the clean half; same-token labels, no shift:
   logit j predicts ``labels[j]``; CE averaged over the row's labels ≠ −100, then over rows.

A row with no label ≠ −100 contributes 0 and is left out of the mean over rows (the reference would
produce NaN; with the data transform this only happens when the prompt fills the whole sequence); a
batch without any label has loss 0 and zero gradient. Both forwards run inside one jit; the rollout
sees ``stop_gradient(params)`` so gradients flow only through the loss forward.

Mixed precision: params stay float32 (master weights); ``compute_dtype="bfloat16"`` makes the model cast
each weight to bf16 where it is used, logits and the loss are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from dmax_jax.config import ModelConfig
from dmax_jax.data.transforms import IGNORE_INDEX
from dmax_jax.model.experts import MOE_IMPLS
from dmax_jax.model.llada2 import REMAT_POLICIES, forward
from dmax_jax.model.lora import LoraConfig, combine
from dmax_jax.model.masks import MaskSpec
from dmax_jax.training.optim import current_lr
from dmax_jax.training.sharding import constrain
from dmax_jax.training.state import TrainState

MODES = ("oput", "mdm")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REQUIRED_KEYS = ("input_ids", "noisy_input_ids", "labels", "flag")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """``mode``: "oput" (rollout, algorithm §4) or "mdm" (plain masked diffusion, flag ignored);
    ``mask_id``: the MASK token id the rollout fills."""

    mask_id: int
    mode: str = "oput"
    block_length: int = 32
    compute_dtype: str = "float32"
    remat: str | None = None
    attention_backend: str = "xla_dense"
    moe_impl: str = "auto"  # model.experts.MOE_IMPLS; "auto" = tiled on CPU, tokamax / megablox on GPU / TPU
    # The mesh's platform, set by training.program (not a config key: the devices decide it).
    platform: str | None = dataclasses.field(default=None, metadata={"internal": True})
    # LoRA OPUT (model/lora.py; rank 0 = off): params are then {"base": frozen, "adapters": trained}.
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"StepConfig.mode {self.mode!r} is not one of {MODES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"StepConfig.compute_dtype {self.compute_dtype!r} is not one of "
                             f"{tuple(COMPUTE_DTYPES)}")
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"StepConfig.remat {self.remat!r} is not None or one of {tuple(REMAT_POLICIES)}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"StepConfig.moe_impl {self.moe_impl!r} is not one of {MOE_IMPLS}")
        if self.block_length <= 0:
            raise ValueError(f"StepConfig.block_length must be positive, got {self.block_length}")
        if int(self.mask_id) < 0:
            raise ValueError(f"StepConfig.mask_id must be a token id >= 0, got {self.mask_id}")

    @property
    def dtype(self):
        return COMPUTE_DTYPES[self.compute_dtype]


def _check_batch(batch: Mapping[str, jax.Array], model_config: ModelConfig, step_cfg: StepConfig) -> int:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing} (has {sorted(batch)})")
    shape = batch["input_ids"].shape
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids'] must be [batch, length], got shape {shape}")
    for k in ("noisy_input_ids", "labels"):
        if batch[k].shape != shape:
            raise ValueError(f"batch[{k!r}] shape {batch[k].shape} != input_ids shape {shape}")
    if batch["flag"].shape != shape[:1]:
        raise ValueError(f"batch['flag'] shape {batch['flag'].shape} != ({shape[0]},)")
    if step_cfg.mask_id >= model_config.vocab_size:
        raise ValueError(f"StepConfig.mask_id {step_cfg.mask_id} outside the vocabulary "
                         f"[0, {model_config.vocab_size})")
    return shape[1]


def _logits(params, model_config: ModelConfig, step_cfg: StepConfig, noisy, clean, *, remat):
    """Noisy-half logits ``[batch, L, vocab]`` (f32) of the ``[noisy | clean]`` forward."""
    half = noisy.shape[1]
    ids = constrain(jnp.concatenate([noisy, clean], axis=1).astype(jnp.int32), ("batch", "length"))
    if step_cfg.lora.enabled:
        params = combine(params["base"], params["adapters"], step_cfg.lora)
    logits, _ = forward(params, model_config, ids, mask=MaskSpec("noisy_clean", step_cfg.block_length),
                        dtype=step_cfg.dtype, attention_backend=step_cfg.attention_backend,
                        moe_impl=step_cfg.moe_impl, remat=remat, logits_prefix=half,
                        platform=step_cfg.platform, lora=step_cfg.lora)
    return constrain(logits, ("batch", "length", "vocab"))


def oput_rollout(params, model_config: ModelConfig, step_cfg: StepConfig, batch: Mapping[str, jax.Array]):
    """Algorithm §4 step 2: noisy ids ``[batch, L]`` after the on-policy rollout (no gradient)."""
    _check_batch(batch, model_config, step_cfg)
    noisy, clean = batch["noisy_input_ids"], batch["input_ids"]
    logits = _logits(jax.lax.stop_gradient(params), model_config, step_cfg, noisy, clean, remat=None)
    pred = jnp.argmax(logits, axis=-1).astype(noisy.dtype)
    fill = (noisy == step_cfg.mask_id) & batch["flag"].astype(bool)[:, None]
    return jax.lax.stop_gradient(jnp.where(fill, pred, noisy))


def apply_rollout(params, model_config: ModelConfig, step_cfg: StepConfig, batch: Mapping[str, jax.Array]
                  ) -> tuple[dict, jax.Array]:
    """The batch the loss sees — its noisy ids after the OPUT rollout in mode "oput", as given in
    "mdm" — and the share of rollout-filled tokens whose prediction differs from the clean token (0 in
    "mdm" mode or when nothing was filled). One place for the full and the LoRA step."""
    batch = dict(batch)
    if step_cfg.mode != "oput":
        return batch, jnp.zeros((), jnp.float32)
    noisy = batch["noisy_input_ids"]
    rolled = oput_rollout(params, model_config, step_cfg, batch)
    filled = (noisy == step_cfg.mask_id) & batch["flag"].astype(bool)[:, None]
    changed = (filled & (rolled != batch["input_ids"])).sum()
    batch["noisy_input_ids"] = rolled
    return batch, changed / jnp.maximum(filled.sum(), 1)


def step_metrics(loss, aux: dict, grads, opt_state, changed_fraction) -> dict:
    """The metrics of one train step (``make_train_step`` documents them); the full and the LoRA step
    report the same set."""
    return {"loss": loss, "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(current_lr(opt_state), jnp.float32), "tokens": aux["tokens"],
            "valid_sequences": aux["valid_sequences"],
            "rollout_changed_fraction": changed_fraction.astype(jnp.float32)}


def sequence_losses(logits: jax.Array, labels: jax.Array):
    """Per-row token-mean CE over labels ≠ −100. logits ``[B, L, V]``, labels ``[B, L]`` →
    (loss_per_row ``[B]`` f32 (0 for rows without labels), tokens_per_row ``[B]`` int32)."""
    valid = labels != IGNORE_INDEX
    logits = logits.astype(jnp.float32)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None].astype(jnp.int32), -1)[..., 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - target
    count = valid.sum(-1).astype(jnp.int32)
    total = jnp.where(valid, ce, 0.0).sum(-1)
    return total / jnp.maximum(count, 1).astype(jnp.float32), count


def loss_fn(params, model_config: ModelConfig, step_cfg: StepConfig, batch: Mapping[str, jax.Array]):
    """Algorithm §4 step 3 on ``batch['noisy_input_ids']`` as given (the rollout, if any, already applied).
    Returns ``(loss, aux)`` with aux ``{"tokens", "valid_sequences", "sequence_loss" [B]}``."""
    _check_batch(batch, model_config, step_cfg)
    logits = _logits(params, model_config, step_cfg, batch["noisy_input_ids"], batch["input_ids"],
                     remat=step_cfg.remat)
    per_row, count = sequence_losses(logits, batch["labels"])
    return reduce_sequence_losses(per_row, count)


def reduce_sequence_losses(per_row: jax.Array, count: jax.Array):
    """Mean of ``per_row`` over rows with ``count > 0`` (0 when there are none) and the aux dict."""
    has = count > 0
    n = has.sum().astype(jnp.int32)
    loss = jnp.where(has, per_row, 0.0).sum() / jnp.maximum(n, 1).astype(jnp.float32)
    return loss, {"tokens": count.sum().astype(jnp.int32), "valid_sequences": n, "sequence_loss": per_row}


def make_train_step(model_config: ModelConfig, step_cfg: StepConfig, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)``, pure (jit it, e.g. with ``jit_train_step``).

    metrics (f32/int32 scalars): ``loss``, ``grad_norm`` (global L2 of this micro-batch's gradient,
    before clipping), ``lr`` (of the latest optimizer update), ``tokens`` (loss tokens),
    ``valid_sequences``, ``rollout_changed_fraction`` (share of rollout-filled tokens whose prediction
    differs from the clean token; 0 in "mdm" mode or when nothing was filled).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        batch, changed_fraction = apply_rollout(state.params, model_config, step_cfg, batch)
        (loss, aux), grads = grad_fn(state.params, model_config, step_cfg, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = step_metrics(loss, aux, grads, opt_state, changed_fraction)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
