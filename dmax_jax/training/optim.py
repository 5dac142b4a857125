"""The optimizer of algorithm §4: global-norm clip → AdamW(warmup + cosine), ``expert_bias`` frozen.

Chain: ``clip_by_global_norm(max_grad_norm)`` → ``adamw`` (wrapped in ``inject_hyperparams`` so the
learning rate of the latest update sits in the state, where ``train_step`` reads it for its metrics)
→ ``set_to_zero`` on every ``expert_bias`` leaf. Zeroing at the *end* of the chain is what "frozen"
means here: AdamW's decoupled weight decay would otherwise move the bias even with a zero gradient.
The reference applies weight decay to all params (no no-decay groups), so do we.

Gradient accumulation (``grad_accum_steps = k > 1``) is ``optax.MultiSteps``: ``train_step`` is
called once per micro-batch and the inner chain runs every k-th call on the *mean* of the k micro
gradients, so clipping sees the accumulated gradient (as torch does). Because each micro-batch loss
is a mean over its sequences, the mean over k equal-size micro-batches equals the big-batch loss
(algorithm §4 step 3: mean over sequences of per-sequence token means) — exactly, as long as every
micro-batch has the same number of sequences with at least one label (rows without labels are rare:
the prompt must fill the whole sequence). ``total_steps`` counts optimizer updates, not micro-batches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

FROZEN_PARAMS = ("expert_bias",)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    total_steps: int
    lr: float = 2e-6
    min_lr_ratio: float = 0.05
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"OptimConfig.{field}: {why} (got {getattr(self, field)!r})")

        if int(self.total_steps) < 1:
            bad("total_steps", "must be >= 1")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            bad("b1", "b1 and b2 must be in [0, 1)")
        if not self.eps > 0:
            bad("eps", "must be > 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be > 0")
        if int(self.grad_accum_steps) < 1:
            bad("grad_accum_steps", "must be >= 1")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.total_steps)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Algorithm §4: ``lr·step/warm`` for ``step < warm = int(warmup_ratio·total)`` (linear from 0), then
    ``lr·[(1−r)·½(1+cos(π·p)) + r]``, ``p = (step−warm)/(total−warm)`` clipped to [0, 1],
    ``r = min_lr_ratio``. ``step`` = number of optimizer updates already applied (the first update
    uses ``step = 0``, as torch's LambdaLR does)."""
    warm, total, r = cfg.warmup_steps, int(cfg.total_steps), cfg.min_lr_ratio

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warmup = cfg.lr * s / max(warm, 1)
        p = jnp.clip((s - warm) / max(total - warm, 1), 0.0, 1.0)
        cosine = cfg.lr * ((1 - r) * 0.5 * (1 + jnp.cos(jnp.pi * p)) + r)
        return jnp.where(s < warm, warmup, cosine)

    return schedule


def frozen_mask(params) -> dict:
    """Tree of bools: True for leaves that must never change (any path containing ``FROZEN_PARAMS``)."""
    def is_frozen(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return any(n in FROZEN_PARAMS for n in names)

    return jax.tree_util.tree_map_with_path(is_frozen, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The algorithm §4 optimizer (see module docstring); MultiSteps-wrapped when ``grad_accum_steps > 1``."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    chain = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        adamw,
        optax.masked(optax.set_to_zero(), frozen_mask),
    )
    if cfg.grad_accum_steps == 1:
        return chain
    return optax.MultiSteps(chain, every_k_schedule=int(cfg.grad_accum_steps)).gradient_transformation()


def current_lr(opt_state) -> jax.Array:
    """Learning rate of the most recent update (the value ``inject_hyperparams`` keeps in the state)."""
    lr = optax.tree_utils.tree_get(opt_state, "learning_rate",
                                   filtering=lambda _, value: isinstance(value, jax.Array))
    if lr is None:
        raise ValueError("optimizer state has no 'learning_rate' hyper-parameter; "
                         "build the optimizer with make_optimizer")
    return lr
