"""The hardware floor of one LLaDA2-MoE forward: bytes it must read, FLOPs it must do, ms on a chip.

Why a pure-Python model: the decode forward of a 16 B MoE at small batch is bandwidth-bound, and the
floor is set by the bytes of the weights actually touched. This module counts them from the
``ModelConfig`` shapes alone (no JAX), so benchmarks and tests can put a measured time or XLA's cost
analysis next to an independent number.

What a forward of ``batch`` rows x ``block`` new tokens against ``cache_length`` cached positions
must read (every weight once per forward; activations are a few MB and left out):

* attention: fused QKV + output projection + the four norms of every layer;
* dense FFN layers (``first_k_dense_replace``), the shared experts and the router of every MoE layer
  (the router is read in its stored dtype, the f32 ``expert_bias`` beside it);
* the touched routed experts: ``distinct experts per MoE layer`` x one expert's bytes;
* embedding: only the ``batch x block`` rows gathered (not the table); lm_head: the whole matrix;
* KV cache: K and V of ``cache_length`` positions, every layer, every row.

Distinct experts under uniform routing (:func:`expected_distinct_experts`): for tokens routed
independently by a rule that treats experts symmetrically (i.i.d. router scores through the
group-limited top-k: 8 groups, keep 4, top-8 of 256), each expert is among a token's K with
probability exactly ``K/E``, so ``E[distinct] = E·(1 − (1 − K/E)^T)`` for ``T`` tokens — exact, the
group limit changes only the spread around it. Any non-uniform routing of independent tokens
touches fewer on average (the expression is concave in the per-expert probabilities), and real
tokens of one block are correlated, so this is an upper estimate of the touched experts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Vendors' data sheets: NVIDIA H200 Tensor Core GPU (SXM: 141 GB HBM3e, 4.8 TB/s, 989 TFLOP/s dense
# BF16 — the sheet's 1,979 is with 2:4 sparsity); Google Cloud TPU v5p (95 GB HBM2e, 2,765 GB/s,
# 459 TFLOP/s BF16) and Trillium / v6e (32 GB HBM, 1,640 GB/s, 918 TFLOP/s BF16) system pages.
DATA_SHEET = "vendors' data sheets (NVIDIA H200 SXM; Google Cloud TPU v5p, v6e)"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    hbm_bytes: float


CHIPS = {
    "h200": Chip("H200", 4.8e12, 989e12, 141e9),
    "v5p": Chip("TPU v5p", 2.765e12, 459e12, 95e9),
    "v6e": Chip("TPU v6e", 1.64e12, 918e12, 32e9),
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1, "float8": 1}


class RooflineError(ValueError):
    """A bad roofline query (unknown chip / dtype, non-positive sizes); the message names it."""


def get_chip(name: str) -> Chip:
    if name not in CHIPS:
        raise RooflineError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise RooflineError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def expected_distinct_experts(num_experts: int, experts_per_token: int, tokens: int) -> float:
    """Mean number of distinct experts ``T`` independently, uniformly routed tokens touch (module
    docstring: exact for any expert-symmetric rule, group-limited top-k included)."""
    if not 0 < experts_per_token <= num_experts or tokens < 0:
        raise RooflineError(f"need 0 < K <= E and T >= 0, got E={num_experts} K={experts_per_token} "
                            f"T={tokens}")
    return num_experts * (1.0 - (1.0 - experts_per_token / num_experts) ** tokens)


# ---- parameter counts (one place; tests recompute them by hand) ------------------------------------
def attention_params(cfg: Any) -> int:
    """Per layer: fused QKV, output projection, q/k norms, input and post-attention norms."""
    h, nq, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return h * (nq + 2 * nkv) * d + nq * d * h + 2 * d + 2 * h


def expert_params(cfg: Any) -> int:
    """One routed expert (gate, up, down)."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def param_counts(cfg: Any) -> dict[str, int]:
    """Parameters by part (``expert_bias`` counted in ``router``)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    n_moe = cfg.num_moe_layers
    e = cfg.num_experts if n_moe else 0
    return {
        "embedding": v * h,
        "lm_head": 0 if cfg.tie_word_embeddings else h * v,
        "attention": cfg.num_hidden_layers * attention_params(cfg),
        "dense_mlp": cfg.num_dense_layers * 3 * h * cfg.intermediate_size,
        "shared_experts": n_moe * cfg.num_shared_experts * expert_params(cfg),
        "router": n_moe * (h * e + (e if cfg.moe_router_enable_expert_bias else 0)),
        "routed_experts": n_moe * e * expert_params(cfg),
        "final_norm": h,
    }


def active_params_per_token(cfg: Any) -> int:
    """Parameters one token multiplies through (K routed experts, not all E; lm_head included)."""
    c = param_counts(cfg)
    routed = cfg.num_moe_layers * cfg.num_experts_per_tok * expert_params(cfg)
    head = c["lm_head"] or c["embedding"]
    return c["attention"] + c["dense_mlp"] + c["shared_experts"] + c["router"] + routed + head


def weight_bytes(cfg: Any, weight_dtype: str = "bfloat16") -> float:
    """Bytes of all parameters in ``weight_dtype`` (the f32 ``expert_bias`` at 4 bytes)."""
    c = param_counts(cfg)
    bias = cfg.num_moe_layers * cfg.num_experts if cfg.moe_router_enable_expert_bias else 0
    return (sum(c.values()) - bias) * dtype_bytes(weight_dtype) + 4 * bias


# ---- one forward -------------------------------------------------------------------------------------
def forward_bytes(cfg: Any, batch: int, block: int, cache_length: int, *, weight_dtype: str = "bfloat16",
                  kv_dtype: str | None = None, distinct_experts: float | None = None) -> dict[str, float]:
    """Bytes by part that a forward of ``batch x block`` tokens must read (module docstring).
    ``distinct_experts`` (per MoE layer) defaults to the uniform-routing expectation."""
    _check_sizes(batch, block, cache_length)
    w, kvb = dtype_bytes(weight_dtype), dtype_bytes(kv_dtype or weight_dtype)
    c = param_counts(cfg)
    n_moe, tokens = cfg.num_moe_layers, batch * block
    if distinct_experts is None:
        distinct_experts = (expected_distinct_experts(cfg.num_experts, cfg.num_experts_per_tok, tokens)
                            if n_moe else 0.0)
    bias = n_moe * cfg.num_experts if (n_moe and cfg.moe_router_enable_expert_bias) else 0
    head = c["lm_head"] or c["embedding"]  # tied: the table is read whole as the head
    kv = (cfg.num_hidden_layers * batch * cache_length * 2 * cfg.num_key_value_heads * cfg.head_dim * kvb)
    return {
        "attention": c["attention"] * w,
        "dense_mlp": c["dense_mlp"] * w,
        "shared_experts": c["shared_experts"] * w,
        "router": (c["router"] - bias) * w + bias * 4,
        "routed_experts": n_moe * distinct_experts * expert_params(cfg) * w,
        "embedding_rows": tokens * cfg.hidden_size * w,
        "lm_head": head * w,
        "final_norm": c["final_norm"] * w,
        "kv_cache": kv,
    }


def forward_flops(cfg: Any, batch: int, block: int, cache_length: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) by part: the matmuls of the active parameters, and attention
    scores + weighted values over ``cache_length + block`` keys per query (block-causal: a block
    sees the whole cache and itself)."""
    _check_sizes(batch, block, cache_length)
    t = batch * block
    h, d, nq = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
    proj = cfg.num_hidden_layers * (h * (nq + 2 * cfg.num_key_value_heads) * d + nq * d * h)
    routed = cfg.num_moe_layers * cfg.num_experts_per_tok * expert_params(cfg)
    c = param_counts(cfg)
    router = cfg.num_moe_layers * h * cfg.num_experts if cfg.num_moe_layers else 0
    return {
        "projections": 2 * t * proj,
        "dense_mlp": 2 * t * c["dense_mlp"],
        "shared_experts": 2 * t * c["shared_experts"],
        "router": 2 * t * router,
        "routed_experts": 2 * t * routed,
        "lm_head": 2 * t * h * cfg.vocab_size,
        "attention_scores": cfg.num_hidden_layers * 2 * 2 * t * nq * d * (cache_length + block),
    }


@dataclasses.dataclass(frozen=True)
class Floor:
    """The roofline of one forward on ``chips`` chips sharing the bytes and FLOPs evenly
    (ideal expert/tensor parallelism; communication left out)."""

    chip: str
    chips: int
    bytes: float
    flops: float
    memory_ms: float
    compute_ms: float

    @property
    def ms(self) -> float:
        return max(self.memory_ms, self.compute_ms)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_ms >= self.compute_ms else "compute"


def floor(cfg: Any, batch: int, block: int, cache_length: int, chip: str = "h200", *, chips: int = 1,
          weight_dtype: str = "bfloat16", distinct_experts: float | None = None) -> Floor:
    """The floor in ms of one forward: max(bytes / HBM bandwidth, FLOPs / peak bf16)."""
    if chips < 1:
        raise RooflineError(f"chips must be >= 1, got {chips}")
    spec = get_chip(chip)
    b = sum(forward_bytes(cfg, batch, block, cache_length, weight_dtype=weight_dtype,
                          distinct_experts=distinct_experts).values())
    f = sum(forward_flops(cfg, batch, block, cache_length).values())
    return Floor(spec.name, chips, b, f, 1e3 * b / (chips * spec.hbm_bytes_per_s),
                 1e3 * f / (chips * spec.bf16_flops_per_s))


def spd_mean_floor_ms(cfg: Any, tpf: float, block: int, cache_length: int, chip: str = "h200", *,
                      chips: int = 1) -> float:
    """Mean floor per forward of batch-1 SPD decoding at ``tpf`` tokens per forward: every block's
    first forward is the cross-block one (``2·block`` tokens: previous + current), the other
    ``block/tpf − 1`` forwards see ``block`` tokens (the prefill is left out)."""
    per_block = block / tpf
    if per_block < 1:
        raise RooflineError(f"tpf {tpf} exceeds the block length {block}")
    cross = floor(cfg, 1, 2 * block, cache_length, chip, chips=chips).ms
    single = floor(cfg, 1, block, cache_length, chip, chips=chips).ms
    return (cross + (per_block - 1) * single) / per_block


def _check_sizes(batch: int, block: int, cache_length: int) -> None:
    if batch < 1 or block < 1 or cache_length < 0:
        raise RooflineError(f"need batch >= 1, block >= 1, cache_length >= 0; got {batch}, {block}, "
                            f"{cache_length}")


