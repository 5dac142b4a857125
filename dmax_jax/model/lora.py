"""LoRA adapters on LLaDA2-MoE: qwix's ``LoraProvider`` for the einsum / matmul weights, our own for the
routed experts.

What qwix covers: attention ``qkv`` / ``out`` (einsums), the dense MLP and the shared expert (``@``
matmuls) — ``qwix.apply_lora_to_model`` intercepts those ops inside the linen modules and adds
``<weight>_lora_a`` / ``<weight>_lora_b`` params (A he-uniform, B zero: the adapted model starts equal to
the base), stacked along the layer axis by ``nn.scan`` like every other param. What we add:

- ``_LinenLoraProvider.einsum``: qwix 0.1.8's LoRA einsum stores a debug attribute on the module, which
  linen's compact modules refuse (``SetAttributeFrozenModuleError``); ours is the same computation
  without the attribute.
- routed experts (``experts_{gate,up,down}``, stacked ``[n, E, in, out]`` weights fed to the grouped-
  matmul kernels, which qwix cannot see): per-expert adapters ``[n, E, in, r]`` / ``[n, E, r, out]``,
  merged into the weight in the forward (``W + alpha/r · A B``) before the kernel runs.
- a coverage check: every targeted weight must have received its adapters (qwix finds the weight by
  tracing the einsum operand back to the param; a miss would silently train nothing).

Adapter trees are nested dicts shaped like the params tree (same module paths), holding only the
``*_lora_a`` / ``*_lora_b`` leaves; ``combine`` / ``merge`` put them together with the base.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.providers import lora as qwix_lora

from dmax_jax.config import ModelConfig

LORA_TARGETS = ("attention", "mlp", "shared", "experts")
DEFAULT_TARGETS = ("attention", "mlp", "shared")
BASE_DTYPES = ("bfloat16", "float32")
# qwix module paths (linen ``module.path`` joined by "/") per target.
_MODULE_RE = {"attention": r"(dense|moe)_layers/attention", "mlp": r"dense_layers/mlp",
              "shared": r"moe_layers/moe/shared"}
_WEIGHTS = {"attention": ("qkv", "out"), "mlp": ("gate", "up", "down"), "shared": ("gate", "up", "down")}
EXPERT_WEIGHTS = ("experts_gate", "experts_up", "experts_down")
SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``rank`` 0 = off (full fine-tuning); ``alpha``: the update is scaled by ``alpha / rank``;
    ``targets``: a subset of ``LORA_TARGETS``; ``base_dtype``: how the frozen base is stored."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    base_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0 (0 = off), got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be a non-empty list of distinct names from "
                             f"{list(LORA_TARGETS)}, got {list(targets)}")
        object.__setattr__(self, "targets", targets)
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {list(BASE_DTYPES)} (int8 / nf4 QLoRA bases are "
                             f"not implemented), got {self.base_dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class _LinenLoraProvider(qwix.LoraProvider):
    """qwix's LoRA with an einsum that works inside linen compact modules (see the module docstring),
    and outputs in the un-adapted op's dtype: the float32 adapters' delta is added, then the sum is cast
    back (bf16 compute stays bf16, as ``nn.scan``'s carry requires)."""

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    out_sharding=None):
        out = super().dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                  out_sharding=out_sharding)
        return out.astype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))

    def einsum(self, einsum_str, *operands, **kwargs):
        res = qwix_lora.ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
        rule, _ = self._get_current_rule_and_op_id("einsum", repeated_call=True)
        if not isinstance(rule, qwix.LoraRule):
            return res
        lhs, rhs = operands
        name = qwix_lora.flax_util.find_param(rhs, qwix_lora.ptq.WithAux)
        if name is None:
            return res
        a_shape, b_shape, lora_str, a_t, b_t = qwix_lora._parse_einsum_str_for_lora(
            lhs.shape, rhs.shape, einsum_str, rule.rank)
        a, b = qwix_lora._get_or_create_lora_params(name=name, rule=rule, a_shape=a_shape, b_shape=b_shape,
                                                    a_sharding_transpose=a_t, b_sharding_transpose=b_t)
        return (res + jnp.einsum(lora_str, lhs, a, b, **kwargs) * (rule.alpha / rule.rank)).astype(res.dtype)


def qwix_targets(lora: LoraConfig) -> tuple[str, ...]:
    return tuple(t for t in lora.targets if t in _MODULE_RE)


def adapt_model(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """The qwix-intercepted model (or ``model`` itself when no qwix target is chosen)."""
    targets = qwix_targets(lora)
    if not targets:
        return model
    regex = "(" + "|".join(_MODULE_RE[t] for t in targets) + ")"
    return qwix.apply_lora_to_model(model, _LinenLoraProvider(module_path=regex, rank=lora.rank,
                                                              alpha=float(lora.alpha)))


def _expert_adapters(base_moe: dict, lora: LoraConfig, rng: jax.Array, boxed: bool) -> dict:
    """Per-expert A ``[n, E, in, r]`` (he-uniform over ``in``) and B ``[n, E, r, out]`` (zeros)."""
    out = {}
    for i, name in enumerate(EXPERT_WEIGHTS):
        w = nn.meta.unbox(base_moe[name])
        n, e, fin, fout = w.shape
        a = jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1)(
            jax.random.fold_in(rng, i), (n, e, fin, lora.rank), jnp.float32)
        b = jnp.zeros((n, e, lora.rank, fout), jnp.float32)
        if boxed:
            names = base_moe[name].names
            a = nn.LogicallyPartitioned(a, (names[0], names[1], names[2], None))
            b = nn.LogicallyPartitioned(b, (names[0], names[1], None, names[3]))
        out[name + "_lora_a"], out[name + "_lora_b"] = a, b
    return out


def init_adapters(config: ModelConfig, lora: LoraConfig, rng: jax.Array, *, boxed: bool = False) -> dict:
    """The adapter tree (float32). Trace it under ``jax.jit`` / ``eval_shape``: the base params qwix's
    init also draws are dropped (dead code). Raises when a targeted weight got no adapter."""
    from dmax_jax.model.llada2 import LLaDA2MoeModel

    model = adapt_model(LLaDA2MoeModel(config, param_dtype=jnp.float32), lora)
    full = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    adapters = adapter_part(full)
    if "experts" in lora.targets and "moe_layers" in full:
        moe = _expert_adapters(full["moe_layers"]["moe"], lora, jax.random.fold_in(rng, 7), boxed)
        adapters.setdefault("moe_layers", {}).setdefault("moe", {}).update(moe)
    check_coverage(adapters, config, lora)
    return adapters if boxed else nn.meta.unbox(adapters)


def expected_adapters(config: ModelConfig, lora: LoraConfig) -> list[str]:
    """The ``stack/module/weight`` paths that must carry adapters for ``lora.targets``."""
    paths = []
    stacks = [s for s, n in (("dense_layers", config.num_dense_layers), ("moe_layers", config.num_moe_layers))
              if n > 0]
    for t in lora.targets:
        if t == "attention":
            paths += [f"{s}/attention/{w}" for s in stacks for w in _WEIGHTS[t]]
        elif t == "mlp" and "dense_layers" in stacks:
            paths += [f"dense_layers/mlp/{w}" for w in _WEIGHTS[t]]
        elif t == "shared" and "moe_layers" in stacks and config.num_shared_experts > 0:
            paths += ["/".join(("moe_layers", "moe", "shared", w)) for w in _WEIGHTS[t]]
        elif t == "experts" and "moe_layers" in stacks:
            paths += [f"moe_layers/moe/{w}" for w in EXPERT_WEIGHTS]
    return paths


def check_coverage(adapters: dict, config: ModelConfig, lora: LoraConfig) -> None:
    have = {"/".join(p[:-1] + (p[-1][:-len("_lora_a")],))
            for p in _paths(adapters) if p[-1].endswith("_lora_a")}
    want = expected_adapters(config, lora)
    if not want:
        raise ValueError(f"step.lora.targets {list(lora.targets)}: this model has none of these weights")
    missing = [p for p in want if p not in have]
    if missing or len(have) != len(want):
        raise ValueError(f"LoRA adapters do not match the targets {list(lora.targets)}: missing {missing}, "
                         f"unexpected {sorted(have - set(want))}")


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out += _paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def adapter_part(tree: dict) -> dict:
    """The ``*_lora_a`` / ``*_lora_b`` leaves of a params tree (nested dicts, empty branches dropped)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = adapter_part(v)
            if sub:
                out[k] = sub
        elif k.endswith(SUFFIXES):
            out[k] = v
    return out


def _deep_update(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_update(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _merge_experts(moe: dict, scale: float, dtype) -> dict:
    """Routed-expert adapters folded into their weights: ``W + scale · A B`` (per layer and expert)."""
    moe = dict(moe)
    for name in EXPERT_WEIGHTS:
        a, b = moe.pop(name + "_lora_a", None), moe.pop(name + "_lora_b", None)
        if a is None:
            continue
        delta = jnp.einsum("leir,lero->leio", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        moe[name] = (moe[name].astype(jnp.float32) + delta).astype(dtype)
    return moe


def combine(base: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The tree the adapted model applies: base + qwix adapters as sibling leaves; routed-expert
    adapters already merged (their kernels read one weight)."""
    tree = _deep_update(base, adapters)
    if "experts" in lora.targets and "moe_layers" in tree:
        dtype = base["moe_layers"]["moe"]["experts_gate"].dtype
        moe = _merge_experts(tree["moe_layers"]["moe"], lora.scale, dtype)
        tree["moe_layers"] = dict(tree["moe_layers"], moe=moe)
    return tree


def merge(base: dict, adapters: dict, lora: LoraConfig, dtype=jnp.float32) -> dict:
    """A plain params tree (no adapter leaves) equal to the adapted model: every ``W + alpha/r · A B``
    in ``dtype`` — what the HF export writes."""
    tree = jax.tree.map(lambda x: x.astype(dtype), combine(base, adapters, lora))
    return _merge_qwix(tree, lora.scale, dtype)


def _merge_qwix(tree: dict, scale: float, dtype) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _merge_qwix(v, scale, dtype)
        elif not k.endswith(SUFFIXES):
            a, b = tree.get(k + "_lora_a"), tree.get(k + "_lora_b")
            if a is None:
                out[k] = v
                continue
            # a: [n, *contracted, r] flattened by qwix's einsum rule; b: [n, r, *kept] (layer axis leads).
            n, r = a.shape[0], a.shape[-1]
            delta = jnp.einsum("lir,lro->lio", a.reshape(n, -1, r).astype(jnp.float32),
                               b.reshape(n, r, -1).astype(jnp.float32)) * scale
            out[k] = (v.astype(jnp.float32) + delta.reshape(v.shape)).astype(dtype)
    return out
