"""LLaDA2-MoE in PyTorch, written from the spec (§1.2, §1.3, §5.5b) as an independent reference.

Why it exists: the real checkpoint's remote code cannot be downloaded here. This file is a second,
independent implementation of the forward pass and of the dFactory HF ``generate`` in HF remote-code
form (``auto_map`` → ``modeling_llada2_moe.LLaDA2MoeModelLM``), so that ``tools/compare_torch.py``
exercises the same loading path as a real checkpoint. It favours plainness over speed: experts run in
a Python loop, attention is materialised, nothing is cached.

Parameter names are the HF split-expert names of algorithm §1.3 (``model.word_embeddings.weight``,
``model.layers.{i}.attention.query_key_value.weight``, ``...mlp.experts.{e}.gate_proj.weight``, …).

``attention_mask``: ``None`` = bidirectional; a boolean tensor (True = may attend) of shape
``[B, Tk]``, ``[B, Tq, Tk]`` or ``[B, 1, Tq, Tk]``; or a floating 4-D *additive* mask (0 / -inf),
which is what the dFactory ``generate`` passes (``log`` of a 0/1 block mask).

``generate`` follows algorithm §5.5(b) literally, with one deliberate difference: at ``temperature == 0``
it takes the argmax (the dFactory copy samples multinomially even at temperature 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada2_moe import LLaDA2MoeConfig

try:  # transformers >= 5: initialisers that skip tensors already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - older transformers
    _init = nn.init


class LLaDA2MoeRMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, *then* multiply by the weight (dFactory)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_dim(config: LLaDA2MoeConfig) -> int:
    if getattr(config, "rotary_dim", None):
        return int(config.rotary_dim)
    return int(config.head_dim * config.partial_rotary_factor)


def _rope_theta(config: LLaDA2MoeConfig) -> float:
    theta = getattr(config, "llada2_rope_theta", None) or getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; used for the dense layers, experts and shared experts."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeAttention(nn.Module):
    """Fused QKV (split Q | K | V by heads), QK-norm before partial neox RoPE, GQA, fp32 softmax."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.nq, self.nkv, self.d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary_dim = _rotary_dim(config)
        self.theta = _rope_theta(config)
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, (self.nq + 2 * self.nkv) * self.d, bias=False)
        self.query_layernorm = LLaDA2MoeRMSNorm(self.d, config.rms_norm_eps)
        self.key_layernorm = LLaDA2MoeRMSNorm(self.d, config.rms_norm_eps)
        self.dense = nn.Linear(self.nq * self.d, h, bias=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, D]; rotate the first ``rotary_dim`` dims, pass the rest through."""
        r = self.rotary_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, r, 2, dtype=torch.float32, device=x.device) / r))
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, r/2]
        emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, r]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        qkv = self.query_key_value(h).view(b, t, self.nq + 2 * self.nkv, self.d)
        q = qkv[:, :, : self.nq].transpose(1, 2)
        k = qkv[:, :, self.nq: self.nq + self.nkv].transpose(1, 2)
        v = qkv[:, :, self.nq + self.nkv:].transpose(1, 2)
        q = self._rope(self.query_layernorm(q), positions)
        k = self._rope(self.key_layernorm(k), positions)
        group = self.nq // self.nkv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.d)
        probs = torch.softmax(scores.to(torch.float32) + additive_mask, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.nq * self.d)
        return self.dense(out)


class LLaDA2MoeGate(nn.Module):
    """Router: fp32 sigmoid scores; ``expert_bias`` only steers selection (algorithm §1.2 MoE 1–3)."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scaling = float(config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [N, H] → (expert ids [N, K], fp32 weights [N, K])."""
        scores = torch.sigmoid(u.to(torch.float32) @ self.weight.to(torch.float32).t())  # [N, E]
        biased = scores if self.expert_bias is None else scores + self.expert_bias.to(torch.float32)
        n = biased.shape[0]
        grouped = biased.view(n, self.n_group, self.num_experts // self.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep_groups = group_score.topk(self.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
        expert_keep = group_keep[:, :, None].expand_as(grouped).reshape(n, self.num_experts)
        masked = biased.masked_fill(~expert_keep, float("-inf"))
        ids = masked.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        if self.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return ids, w * self.scaling


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (a plain loop over experts) plus optional shared experts."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        h, im = config.hidden_size, config.moe_intermediate_size
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList([LLaDA2MoeMLP(h, im) for _ in range(config.num_experts)])
        s = config.num_shared_experts or 0
        self.shared_experts = LLaDA2MoeMLP(h, im * s) if s > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        u = x.reshape(-1, shape[-1])
        ids, w = self.gate(u)
        y = torch.zeros_like(u)
        for e, expert in enumerate(self.experts):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel():
                y.index_add_(0, tok, expert(u[tok]) * w[tok, slot, None].to(u.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(u)
        return y.view(shape)


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = bool(config.num_experts) and layer_idx >= config.first_k_dense_replace
        self.mlp = (LLaDA2MoeSparseMoeBlock(config) if moe
                    else LLaDA2MoeMLP(config.hidden_size, config.intermediate_size))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h), positions, additive_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = float(getattr(self.config, "initializer_range", 0.02) or 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding, LLaDA2MoeGate)):
            _init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, LLaDA2MoeGate) and module.expert_bias is not None:
            _init.zeros_(module.expert_bias)
        if isinstance(module, LLaDA2MoeRMSNorm):
            _init.ones_(module.weight)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T, H]`` (after the final norm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=h.device)[None]
        positions = position_ids.expand(b, t)
        additive = _additive_mask(attention_mask, b, t, h.device)
        for layer in self.layers:
            h = layer(h, positions, additive)
        return self.norm(h)


def _additive_mask(mask: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """Any accepted mask form → fp32 additive mask broadcastable to ``[B, heads, T, T]``."""
    if mask is None:
        return torch.zeros(1, 1, 1, 1, device=device)
    if mask.dtype == torch.bool or not mask.is_floating_point():
        allowed = mask.to(torch.bool)
        if allowed.dim() == 2:  # key padding [B, Tk]
            allowed = allowed[:, None, None, :]
        elif allowed.dim() == 3:
            allowed = allowed[:, None]
        if allowed.dim() != 4:
            raise ValueError(f"boolean attention_mask must be 2-D, 3-D or 4-D, got shape {tuple(mask.shape)}")
        return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    if mask.dim() != 4:
        raise ValueError("a floating attention_mask must be a 4-D additive mask [B, 1, Tq, Tk] (0 / -inf); "
                         f"got shape {tuple(mask.shape)}")
    return mask.to(torch.float32)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """Backbone + LM head (``lm_head`` absent when embeddings are tied). Logits are returned in fp32."""

    greedy_at_zero_temperature = True  # tells tools/compare_torch.py not to replace the sampler

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.tied = bool(config.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def get_output_embeddings(self) -> nn.Linear | None:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        if past_key_values is not None:
            raise ValueError("this reference model has no KV cache (past_key_values must be None)")
        h = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids)
        w = self.model.word_embeddings.weight if self.tied else self.lm_head.weight
        logits = F.linear(h, w).to(torch.float32)
        if return_dict is False:
            return (logits,)
        return CausalLMOutputWithPast(logits=logits)

    # ---- algorithm §5.5(b): the dFactory HF generate --------------------------------------------------
    @staticmethod
    def _get_num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
        """``block // steps`` tokens per step, one more for the first ``block % steps`` steps."""
        sched = torch.full((steps,), block_length // steps, dtype=torch.int64)
        sched[: block_length % steps] += 1
        return sched

    def _sample_with_temperature_topk_topp(self, logits: torch.Tensor, temperature: float = 0.0,
                                           top_k: int | None = None, top_p: float | None = None,
                                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, its probability). Greedy at temperature 0 (see module docstring)."""
        logits = logits.to(torch.float32)
        if temperature > 0:
            logits = logits / temperature
        if top_k is not None and top_k > 0:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, order = logits.sort(dim=-1, descending=True)
            drop = srt.softmax(-1).cumsum(-1) > top_p
            drop[..., 1:] = drop[..., :-1].clone()
            drop[..., 0] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        if temperature == 0:
            token = probs.argmax(-1)
        else:
            flat = probs.reshape(-1, probs.shape[-1])
            token = torch.multinomial(flat, 1).view(probs.shape[:-1])
        return token, probs.gather(-1, token[..., None])[..., 0]

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, temperature: float = 0.0,
                 block_length: int = 32, steps: int = 32, gen_length: int = 2048,
                 top_p: float | None = None, top_k: int | None = None, eos_early_stop: bool = False,
                 minimal_topk: int = 1, threshold: float = 0.95,
                 eos_id: int = 156892, mask_id: int = 156895) -> torch.Tensor:
        """Block-wise refinement without a cache (algorithm §5.5b); batch 1 like the reference.

        Returns ``[1, n]``: the generated tokens up to and including the first EOS (or ``gen_length``).
        ``eos_early_stop`` is accepted for signature compatibility; the block-level EOS stop always applies.
        """
        del eos_early_stop
        if inputs is None or inputs.dim() != 2 or inputs.shape[0] != 1:
            raise ValueError("inputs must be a [1, prompt_len] tensor (the reference generate is batch 1)")
        steps = min(steps, gen_length // minimal_topk)
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps} after capping at gen_length // minimal_topk)")
        dev = self.model.word_embeddings.weight.device
        prompt = inputs.to(dev)
        p = prompt.shape[1]
        n_blocks = -(-(p + gen_length) // block_length)
        total = n_blocks * block_length
        blk = torch.arange(total, device=dev) // block_length
        allowed = blk[None, :] <= blk[:, None]  # algorithm §2.2: key block <= query block
        x = torch.full((1, total), mask_id, dtype=torch.long, device=dev)
        x[:, :p] = prompt
        sched = self._get_num_transfer_tokens(block_length, steps)
        for b in range(p // block_length, n_blocks):
            end = (b + 1) * block_length
            mask = allowed[:end, :end][None, None]
            pos = torch.arange(end, device=dev)[None]
            for step in range(steps):
                cur = x[:, end - block_length: end].clone()
                masked = cur == mask_id
                if not masked.any():
                    break
                logits = self(x[:, :end], attention_mask=mask, position_ids=pos).logits[:, -block_length:]
                x0, x0_p = self._sample_with_temperature_topk_topp(logits, temperature, top_k, top_p)
                conf = torch.where(masked, x0_p, torch.full_like(x0_p, float("-inf")))[0]
                n_s = int(sched[step])
                high = conf > threshold
                transfer = torch.zeros_like(high)
                if int(high.sum()) >= n_s:
                    transfer = high
                else:
                    transfer[conf.topk(min(n_s, int(masked.sum()))).indices] = True
                cur[0, transfer] = x0[0, transfer]
                x[:, end - block_length: end] = cur
            if (x[0, p:end] == eos_id).any():
                break
        gen = x[0, p: p + gen_length]
        hits = (gen == eos_id).nonzero()
        n = int(hits[0, 0]) + 1 if hits.numel() else gen_length
        return gen[None, :n]
