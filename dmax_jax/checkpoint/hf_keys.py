"""The one table between HF tensor names (algorithm §1.3) and our parameter tree (docs/internals.md).

Each ``Rule`` names an HF tensor template, our leaf path and a ``Layout``: HF tensor → reshape to
``pre`` → transpose by ``perm`` gives our slice. Saving runs the same layout backwards, so the two
directions cannot drift apart. Per-layer tensors are stacked on axis 0 of their layer group's stack
(``dense_layers`` / ``moe_layers``); per-expert tensors (split layout) also on axis 1. The dFactory
merged layout is *derived* from the split expert rules (drop ``.{e}`` and ``.weight``, prepend
``E``), not written out again.

Dtype policy: every leaf takes the requested dtype except ``expert_bias``, which stays float32 as in
the reference (it only shifts the routing scores, and bf16 would change which experts win ties).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import numpy as np

from dmax_jax.config import ModelConfig

SPLIT, MERGED = "split", "merged"
LAYOUTS = (SPLIT, MERGED)
STACKS = ("dense_layers", "moe_layers")


@dataclasses.dataclass(frozen=True)
class Layout:
    """HF tensor ``hf`` → ``reshape(pre)`` → ``transpose(perm)`` = our slice (and back)."""

    hf: tuple[int, ...]
    pre: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def ours(self) -> tuple[int, ...]:
        return tuple(self.pre[p] for p in self.perm)

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """A view where possible: the caller's assignment into the host buffer does the copy."""
        return x.reshape(self.pre).transpose(self.perm)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(y.transpose(np.argsort(self.perm))).reshape(self.hf)

    def with_leading(self, n: int) -> Layout:
        """The same layout for a stack of ``n`` tensors on a new axis 0 (merged experts)."""
        return Layout((n, *self.hf), (n, *self.pre), (0, *(p + 1 for p in self.perm)))


def _same(shape: tuple[int, ...]) -> Layout:
    return Layout(shape, shape, tuple(range(len(shape))))


def _linear(out_dim: int, in_dim: int) -> Layout:
    """torch Linear weight ``[out, in]`` ↔ our kernel ``[in, out]``."""
    return Layout((out_dim, in_dim), (out_dim, in_dim), (1, 0))


def _qkv(c: ModelConfig) -> Layout:
    heads = c.num_attention_heads + 2 * c.num_key_value_heads
    return Layout((heads * c.head_dim, c.hidden_size), (heads, c.head_dim, c.hidden_size), (2, 0, 1))


def _attn_out(c: ModelConfig) -> Layout:
    nq, d, h = c.num_attention_heads, c.head_dim, c.hidden_size
    return Layout((h, nq * d), (h, nq, d), (1, 2, 0))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor family. ``hf`` may hold ``{layer}`` and ``{expert}``; ``path`` is the leaf path
    inside ``stack`` (or at the top level when ``stack`` is None)."""

    hf: str
    path: tuple[str, ...]
    layout: Callable[[ModelConfig], Layout]
    stack: str | None = None  # None | "dense_layers" | "moe_layers" | "both"
    per_expert: bool = False
    f32: bool = False  # dtype fixed to float32 whatever the requested dtype
    when: Callable[[ModelConfig], bool] = lambda c: True

    def merged(self) -> Rule:
        """dFactory merged-expert form: one ``[E, ...]`` tensor per layer, no ``.weight`` suffix."""
        assert self.per_expert
        hf = self.hf.replace(".{expert}", "").removesuffix(".weight")
        return dataclasses.replace(self, hf=hf, per_expert=False,
                                   layout=lambda c, f=self.layout: f(c).with_leading(c.num_experts))


_L = "model.layers.{layer}."
RULES: tuple[Rule, ...] = (
    Rule("model.word_embeddings.weight", ("embedding",), lambda c: _same((c.vocab_size, c.hidden_size))),
    Rule(_L + "input_layernorm.weight", ("input_norm", "scale"), lambda c: _same((c.hidden_size,)), "both"),
    Rule(_L + "attention.query_key_value.weight", ("attention", "qkv"), _qkv, "both"),
    Rule(_L + "attention.query_layernorm.weight", ("attention", "q_norm", "scale"),
         lambda c: _same((c.head_dim,)), "both"),
    Rule(_L + "attention.key_layernorm.weight", ("attention", "k_norm", "scale"),
         lambda c: _same((c.head_dim,)), "both"),
    Rule(_L + "attention.dense.weight", ("attention", "out"), _attn_out, "both"),
    Rule(_L + "post_attention_layernorm.weight", ("post_norm", "scale"), lambda c: _same((c.hidden_size,)),
         "both"),
    Rule(_L + "mlp.gate_proj.weight", ("mlp", "gate"), lambda c: _linear(c.intermediate_size, c.hidden_size),
         "dense_layers"),
    Rule(_L + "mlp.up_proj.weight", ("mlp", "up"), lambda c: _linear(c.intermediate_size, c.hidden_size),
         "dense_layers"),
    Rule(_L + "mlp.down_proj.weight", ("mlp", "down"), lambda c: _linear(c.hidden_size, c.intermediate_size),
         "dense_layers"),
    Rule(_L + "mlp.gate.weight", ("moe", "router"), lambda c: _linear(c.num_experts, c.hidden_size),
         "moe_layers"),
    Rule(_L + "mlp.gate.expert_bias", ("moe", "expert_bias"), lambda c: _same((c.num_experts,)), "moe_layers",
         f32=True, when=lambda c: bool(c.moe_router_enable_expert_bias)),
    Rule(_L + "mlp.experts.{expert}.gate_proj.weight", ("moe", "experts_gate"),
         lambda c: _linear(c.moe_intermediate_size, c.hidden_size), "moe_layers", per_expert=True),
    Rule(_L + "mlp.experts.{expert}.up_proj.weight", ("moe", "experts_up"),
         lambda c: _linear(c.moe_intermediate_size, c.hidden_size), "moe_layers", per_expert=True),
    Rule(_L + "mlp.experts.{expert}.down_proj.weight", ("moe", "experts_down"),
         lambda c: _linear(c.hidden_size, c.moe_intermediate_size), "moe_layers", per_expert=True),
    *(Rule(_L + f"mlp.shared_experts.{p}_proj.weight", ("moe", "shared", p),
           (lambda c, p=p: _linear(c.hidden_size, _shared_width(c)) if p == "down"
            else _linear(_shared_width(c), c.hidden_size)),
           "moe_layers", when=lambda c: c.num_shared_experts > 0) for p in ("gate", "up", "down")),
    Rule("model.norm.weight", ("final_norm", "scale"), lambda c: _same((c.hidden_size,))),
    Rule("lm_head.weight", ("lm_head",), lambda c: _linear(c.vocab_size, c.hidden_size),
         when=lambda c: not c.tie_word_embeddings),
)

# With num_shared_experts == 0 the dFactory module still exists with width 0 (``is not None`` check),
# so such checkpoints may carry zero-element shared tensors; they hold no data and are ignored.
ZERO_WIDTH_SHARED = re.compile(r"model\.layers\.\d+\.mlp\.shared_experts\.(gate|up|down)_proj\.weight")
_SPLIT_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
_MERGED_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj")


def _shared_width(c: ModelConfig) -> int:
    return c.moe_intermediate_size * c.num_shared_experts


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: where it lands in our tree (``leaf`` path, ``index`` into the stacked leaf)."""

    name: str
    leaf: tuple[str, ...]
    index: tuple[int, ...]
    layout: Layout
    f32: bool


def _stacks(rule: Rule, c: ModelConfig) -> Iterator[tuple[str, range]]:
    """(stack name, absolute layer ids) pairs the rule applies to."""
    groups = {"dense_layers": range(0, c.num_dense_layers),
              "moe_layers": range(c.num_dense_layers, c.num_hidden_layers)}
    names = STACKS if rule.stack == "both" else (rule.stack,)
    for s in names:
        if len(groups[s]):
            yield s, groups[s]


def active_rules(c: ModelConfig, layout: str = SPLIT) -> list[Rule]:
    if layout not in LAYOUTS:
        raise ValueError(f"expert layout {layout!r} is not one of {LAYOUTS}")
    out = []
    for r in RULES:
        if r.when(c):
            out.append(r.merged() if (r.per_expert and layout == MERGED) else r)
    return out


def hf_entries(c: ModelConfig, layout: str = SPLIT) -> list[Entry]:
    """Every HF tensor the config implies, in checkpoint order (by layer, then rule, then expert)."""
    top, per_layer = [], {}
    for r in active_rules(c, layout):
        lay = r.layout(c)
        if r.stack is None:
            top.append(Entry(r.hf, r.path, (), lay, r.f32))
            continue
        for stack, layers in _stacks(r, c):
            for j, i in enumerate(layers):
                experts = range(c.num_experts) if r.per_expert else (None,)
                for e in experts:
                    name = r.hf.format(layer=i, expert=e)
                    index = (j,) if e is None else (j, e)
                    per_layer.setdefault(i, []).append(Entry(name, (stack, *r.path), index, lay, r.f32))
    head = [e for e in top if e.leaf == ("embedding",)]
    tail = [e for e in top if e.leaf != ("embedding",)]
    return head + [e for i in sorted(per_layer) for e in per_layer[i]] + tail


def leaf_shapes(c: ModelConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], bool]]:
    """Our leaf path → (full stacked shape, float32-fixed), derived from the same rules."""
    out = {}
    for r in active_rules(c, SPLIT):
        ours = r.layout(c).ours
        if r.stack is None:
            out[r.path] = (ours, r.f32)
            continue
        for stack, layers in _stacks(r, c):
            lead = (len(layers), c.num_experts) if r.per_expert else (len(layers),)
            out[(stack, *r.path)] = ((*lead, *ours), r.f32)
    return out


def detect_layout(names: set[str] | list[str]) -> str:
    """``split`` or ``merged`` from the expert tensor names; a checkpoint holding both is an error."""
    split = any(_SPLIT_EXPERT.fullmatch(n) for n in names)
    merged = any(_MERGED_EXPERT.fullmatch(n) for n in names)
    if split and merged:
        raise ValueError("checkpoint mixes split (experts.{e}.*.weight) and merged (experts.*_proj) "
                         "expert tensors")
    return MERGED if merged else SPLIT
