"""An independent float64 NumPy forward of LLaDA2-MoE written straight from spec §1.2 and §2.

Deliberately naive (per-token loops for routing, per-head loops for attention, explicit RoPE
formula) so that it shares no code or tricks with ``dmax_jax.model``.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope(x, pos, rdim, theta):
    """x [T, D]: rotate the first rdim dims, r'_i = r_i cos θ_i − r_{i+h} sin θ_i, etc."""
    out = x.copy()
    h = rdim // 2
    for t in range(x.shape[0]):
        for i in range(h):
            th = pos[t] * theta ** (-2.0 * i / rdim)
            a, b = x[t, i], x[t, i + h]
            out[t, i] = a * np.cos(th) - b * np.sin(th)
            out[t, i + h] = b * np.cos(th) + a * np.sin(th)
    return out


def spec_allowed(kind: str, length: int, block: int) -> np.ndarray:
    """Spec §2 set formulas, written out case by case."""
    m = np.zeros((length, length), bool)
    if kind == "full":
        return ~m
    if kind == "block_causal":
        for q in range(length):
            for k in range(length):
                m[q, k] = k // block <= q // block
        return m
    half = length // 2
    for q in range(length):
        for k in range(length):
            q0, k0 = q >= half, k >= half
            bq, bk = (q - half * q0) // block, (k - half * k0) // block
            bd = bq == bk and q0 == k0
            obc = bq > bk and (not q0) and k0
            bc = bq >= bk and q0 and k0
            m[q, k] = bd or obc or bc
    return m


def _route(u, router, bias, cfg):
    s = 1.0 / (1.0 + np.exp(-(u @ router)))
    sb = s + bias
    e, g = cfg.num_experts, cfg.n_group
    per = e // g
    if g > 1:
        gscore = [sum(sorted(sb[j * per:(j + 1) * per])[-2:]) for j in range(g)]
        keep = sorted(range(g), key=lambda j: -gscore[j])[: cfg.topk_group]
        allowed = [ex for ex in range(e) if ex // per in keep]
    else:
        allowed = list(range(e))
    chosen = sorted(allowed, key=lambda ex: -sb[ex])[: cfg.num_experts_per_tok]
    w = np.array([s[ex] for ex in chosen])
    if len(chosen) > 1:
        w = w / (w.sum() + 1e-20)
    return chosen, w * cfg.routed_scaling_factor


def route_numpy(logits_u, router, bias, cfg):
    """Brute-force routing for one token's hidden vector (exposed for the router test)."""
    return _route(logits_u, router, bias, cfg)


def forward_numpy(params, cfg, ids=None, embeds=None, positions=None, allowed=None) -> np.ndarray:
    """Logits [B, T, V] in float64. ``params`` is our param tree (any array type)."""
    p = _to64(params)
    h_all = p["embedding"][np.asarray(ids)] if embeds is None else np.asarray(embeds, np.float64)
    b, t = h_all.shape[:2]
    pos = np.arange(t) if positions is None else np.asarray(positions)
    allowed = np.ones((t, t), bool) if allowed is None else allowed
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = nq // nkv
    out = []
    for bi in range(b):
        h = h_all[bi]
        pb = pos if pos.ndim == 1 else pos[bi]
        for layer in range(cfg.num_hidden_layers):
            dense = layer < cfg.num_dense_layers
            st = p["dense_layers"] if dense else p["moe_layers"]
            j = layer if dense else layer - cfg.num_dense_layers
            a = st["attention"]
            x = _rms(h, st["input_norm"]["scale"][j], cfg.rms_norm_eps)
            qkv = np.einsum("th,hnd->tnd", x, a["qkv"][j])
            q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            o = np.zeros((t, nq, d))
            for hq in range(nq):
                qh = _rope(_rms(q[:, hq], a["q_norm"]["scale"][j], cfg.rms_norm_eps), pb, cfg.rope_dim,
                           cfg.rope_theta)
                kh = _rope(_rms(k[:, hq // g], a["k_norm"]["scale"][j], cfg.rms_norm_eps), pb, cfg.rope_dim,
                           cfg.rope_theta)
                sc = qh @ kh.T / np.sqrt(d)
                sc = np.where(allowed, sc, -np.inf)
                sc = np.exp(sc - sc.max(-1, keepdims=True))
                sc /= sc.sum(-1, keepdims=True)
                o[:, hq] = sc @ v[:, hq // g]
            h = h + np.einsum("tnd,ndh->th", o, a["out"][j])
            u = _rms(h, st["post_norm"]["scale"][j], cfg.rms_norm_eps)
            if dense:
                m = st["mlp"]
                f = (_silu(u @ m["gate"][j]) * (u @ m["up"][j])) @ m["down"][j]
            else:
                m = st["moe"]
                f = np.zeros_like(u)
                for ti in range(t):
                    chosen, w = _route(u[ti], m["router"][j], m["expert_bias"][j], cfg)
                    for ex, wk in zip(chosen, w):
                        e_out = (_silu(u[ti] @ m["experts_gate"][j][ex]) * (u[ti] @ m["experts_up"][j][ex]))
                        f[ti] += wk * (e_out @ m["experts_down"][j][ex])
                if "shared" in m:
                    s = m["shared"]
                    f = f + (_silu(u @ s["gate"][j]) * (u @ s["up"][j])) @ s["down"][j]
            h = h + f
        h = _rms(h, p["final_norm"]["scale"], cfg.rms_norm_eps)
        head = p["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]
        out.append(h @ head)
    return np.stack(out)


def _to64(tree):
    if isinstance(tree, dict):
        return {k: _to64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
