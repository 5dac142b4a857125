"""Routed-expert compute: the gated expert MLP written once over interchangeable grouped matmuls.

Every path computes ``sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` for the K experts
``e = idx[t, k]`` the router chose (algorithm §1.2 "MoE FFN"); the combine runs in float32. The
grouped paths sort the ``N * K`` assignments by expert so that each expert's rows are contiguous
(``sizes[e]`` rows for expert e) and run one grouped matmul per projection (``grouped_mlp``).

``moe_impl`` — the one MoE switch:

* ``"ragged"``: XLA's ``jax.lax.ragged_dot``. XLA on CPU and GPU expands it into a dense masked
  matmul, so it reads every expert's weights for every token (measured on CPU: same time for 1 or
  256 non-empty experts); ``auto`` never picks it.
* ``"tiled"``: plain JAX over expert-aligned row tiles (``model.expert_tiles``): each tile of rows
  belongs to one expert and meets only that expert's weights. The CPU default (1.8-5.6x faster than
  ``ragged`` on CPU from demo to 64-expert sizes); it lowers anywhere, but GPU / TPU have kernels.
* ``"tokamax"``: ``tokamax.ragged_dot``, the Pallas Triton kernel on GPU (grid = row tiles x
  column tiles x experts; a program whose expert has no rows left exits before loading a weight
  tile, so an empty expert costs no weight reads), the Pallas Mosaic kernel on TPU, and tokamax's
  XLA implementation on CPU (tests of this wrapper only; same cost as ``ragged``).
* ``"megablox"``: JAX's TPU grouped matmul ``megablox.gmm``. Its grid runs over the *active* row
  tiles only (tiles of experts with rows; ``make_group_metadata``), and the weight block of each
  step is the expert of that tile, so empty experts are never copied from HBM. TPU only; on CPU
  ``interpret=True`` runs the same kernel in the Pallas interpreter (tests).
* ``"dense"``: every expert on every token (``experts_dense``); the test reference, reads all.
* ``"ep"``: expert parallel over the mesh's ``expert`` axis (``experts_ep``); the local experts
  run the platform's ``auto`` grouped matmul.
* ``"auto"``: ``AUTO_IMPL[platform]`` — cpu -> tiled, gpu -> tokamax,
  tpu -> megablox (part of JAX itself, and its TPU lowering can be checked from a CPU host;
  tokamax's TPU kernel, a fork of it, traces only with a TPU — a compile-only one does — as the
  default device); on GPU / TPU under a mesh whose ``expert`` axis is > 1, ``ep`` with that kernel
  inside. int8 weights: ``AUTO_INT8_IMPL`` (tpu -> tokamax: ``megablox.gmm`` rejects int8).

int8 weight-only experts (``model/quant.py``) arrive as ``qwix.QArray(q [E, K, N] int8, scale
[E, 1, N] f32)``. On GPU / TPU the tokamax kernels (Triton; Mosaic TPU) take ``q`` itself: they load
int8 tiles (exact in bf16) and accumulate in f32, and the per-(expert, column) scale multiplies the
f32 output rows, ``out[m, n] · s[e(m), n]`` (``_int8_matmul``; exact since the scale is constant
along K). Every other backend (the CPU paths, ``megablox``, ``dense``) gets ``dequantize_as(w,
x.dtype)``, the values ``param_with_axes`` would have given. (tokamax's own QArray route was not
taken on GPU: its Triton kernel multiplies the B tile by an f32 scale before the dot, which turns
the bf16 matmul into an f32 / tf32 one.)

``platform`` is the compile target's (``dmax_jax.platforms``), never the host's when given. Kernel
backends run per shard under a mesh (``model.partitioned``): XLA cannot partition a custom call.

A backend the platform cannot run raises ``MoEBackendError``; nothing falls back silently.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from qwix import QArray

from dmax_jax.model.expert_tiles import tiled_matmul, tiled_mlp
from dmax_jax.model.layers import round_up
from dmax_jax.model.partitioned import rows_per_shard
from dmax_jax.model.quant import dequantize_as

MOE_IMPLS = ("auto", "ragged", "tiled", "tokamax", "megablox", "dense", "ep")
KERNEL_IMPLS = ("tokamax", "megablox")  # Pallas kernels (custom calls): run per shard under a mesh
AUTO_IMPL = {"cpu": "tiled", "gpu": "tokamax", "tpu": "megablox"}
AUTO_INT8_IMPL = {"cpu": "tiled", "gpu": "tokamax", "tpu": "tokamax"}
PLATFORMS = tuple(AUTO_IMPL)
TOKAMAX_IMPLEMENTATION = {"cpu": "xla", "gpu": "triton", "tpu": "mosaic_tpu"}
EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "fsdp", "expert")  # = training.sharding.BATCH_AXES (the model must not import training)

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class MoEBackendError(ValueError):
    """A ``moe_impl`` that is unknown or cannot run on the requested platform."""


def _platform(platform: str | None) -> str:
    name = jax.default_backend() if platform is None else platform
    name = {"cuda": "gpu", "rocm": "gpu"}.get(name, name)
    if name not in PLATFORMS:
        raise MoEBackendError(f"MoE backends know the platforms {PLATFORMS}, not {name!r}")
    return name


def resolve_moe_impl(impl: str, platform: str | None = None, *, interpret: bool = False,
                     int8: bool = False) -> str:
    """The concrete backend ``impl`` means on ``platform`` (default: JAX's default backend);
    ``int8``: for int8 expert weights (``auto`` picks a kernel that reads them)."""
    if impl not in MOE_IMPLS:
        raise MoEBackendError(f"moe_impl {impl!r} is not one of {MOE_IMPLS}")
    platform = _platform(platform)
    if impl == "auto":
        return (AUTO_INT8_IMPL if int8 else AUTO_IMPL)[platform]
    if impl == "megablox" and not (platform == "tpu" or (platform == "cpu" and interpret)):
        raise MoEBackendError(f"moe_impl 'megablox' is a TPU kernel and cannot run on {platform!r} "
                              "(only interpret=True on CPU, for tests); use 'auto', 'tokamax' or 'ragged'")
    if impl == "tokamax":
        _tokamax()
    return impl


# ---------------------------------------------------------------- grouped matmuls


def _ragged_matmul(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes)


@functools.cache
def _tokamax():
    """Import tokamax, parsing only its own absl flags: tokamax 0.0.12 parses all of ``sys.argv``
    on first use and fails under pytest or any CLI (fixed upstream, openxla/tokamax PR #957)."""
    try:
        import tokamax  # noqa: PLC0415  (optional accelerator dependency)
        from absl import flags  # noqa: PLC0415
    except ImportError as e:
        raise MoEBackendError(f"moe_impl 'tokamax' needs the tokamax package ({e})") from e
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv, known_only=True)
    logging.getLogger("absl").addFilter(_drop_autotuning_cache_miss)
    return tokamax


def _drop_autotuning_cache_miss(record: logging.LogRecord) -> bool:
    """tokamax logs every trace without a tuned config (with the whole group-size array) and then
    uses its heuristic config, which is what we want: keep that one message out of the logs."""
    return not str(record.msg).startswith("Autotuning cache miss")


def _tokamax_matmul(lhs, rhs, sizes, *, platform: str, interpret: bool = False):
    """``rhs``: bf16 / f32 weights, or an int8 ``QArray`` (read as int8 on GPU / TPU)."""
    implementation = TOKAMAX_IMPLEMENTATION[platform]
    if platform == "tpu" and interpret:
        implementation = [_mosaic_interpreter()]
    try:
        if isinstance(rhs, QArray):
            return _int8_matmul(lhs, rhs, sizes, implementation=implementation, pad_rows=platform == "tpu")
        return _tokamax().ragged_dot(lhs, rhs, sizes, implementation=implementation)
    except NotImplementedError as e:
        raise MoEBackendError(f"tokamax ragged_dot ({implementation!r}) cannot run here: {e}") from e


def _int8_matmul(lhs, rhs: QArray, sizes, *, implementation, pad_rows: bool):
    """``lhs @ (q · scale)`` per group from the int8 ``q`` itself: the kernel loads int8 tiles and
    returns f32 sums, then row m (of expert e(m)) is scaled by ``scale[e(m), 0, :]``. ``pad_rows``
    (Mosaic TPU): every dimension must be >= 128, so rows are padded to whole 128-row tiles."""
    m = lhs.shape[0]
    rows = round_up(m, 128) if pad_rows else m
    padded = jnp.pad(lhs, ((0, rows - m), (0, 0)))
    out = _tokamax().ragged_dot(padded, rhs.qvalue, sizes, preferred_element_type=jnp.float32,
                                implementation=implementation)[:m]
    expert = jnp.repeat(jnp.arange(rhs.shape[0]), sizes, total_repeat_length=m)  # rows past the groups: any
    return (out * jnp.take(rhs.scale[:, 0, :], expert, axis=0)).astype(lhs.dtype)


@functools.cache
def _mosaic_interpreter():
    """tokamax's Mosaic TPU kernel in the Pallas interpreter, runnable on a CPU host (tests)."""
    from tokamax._src.ops.ragged_dot.pallas_mosaic_tpu import PallasMosaicTpuRaggedDot  # noqa: PLC0415

    _tokamax()

    class Interpreted(PallasMosaicTpuRaggedDot):
        def supported_on(self, device) -> bool:  # any device: the interpreter runs anywhere
            return True

    return Interpreted(interpret=True)


def _megablox_tile(dim: int) -> int:
    """Largest of 512/256/128 dividing ``dim``; else the whole dimension (always a legal block)."""
    return next((t for t in (512, 256, 128) if dim % t == 0), dim)


def _megablox_matmul(lhs, rhs, sizes, *, interpret: bool):
    """``megablox.gmm`` needs the row count to be a multiple of its row tile: pad with rows that
    belong to no expert (the kernel never visits them) and cut them off again."""
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # noqa: PLC0415  (TPU kernel code)

    m, k = lhs.shape
    tm = min(128, round_up(m, 16))  # 16: the bf16 sublane tile
    mp = round_up(m, tm)
    tiling = (tm, _megablox_tile(k), _megablox_tile(rhs.shape[2]))
    padded = jnp.pad(lhs, ((0, mp - m), (0, 0)))
    out = gmm(padded, rhs.astype(lhs.dtype), sizes.astype(jnp.int32), lhs.dtype, tiling, None, None,
              False, interpret)
    return out[:m]


def grouped_matmul(impl: str, platform: str | None = None, *, interpret: bool = False,
                   int8: bool = False) -> GroupedMatmul:
    """``fn(lhs [M, K], rhs [E, K, N], sizes [E] int32) -> [M, N]`` (lhs dtype) of a grouped
    backend: rows ``sizes[:e].sum() ..`` form expert e. Rows past ``sizes.sum()`` are undefined.
    ``rhs`` may be an int8 ``QArray`` where ``reads_int8`` (``int8``: resolve ``auto`` for it)."""
    platform = _platform(platform)
    impl = resolve_moe_impl(impl, platform, interpret=interpret, int8=int8)
    if impl == "ragged":
        return _ragged_matmul
    if impl == "tiled":
        return tiled_matmul
    if impl == "tokamax":
        return functools.partial(_tokamax_matmul, platform=platform, interpret=interpret)
    if impl == "megablox":
        return functools.partial(_megablox_matmul, interpret=interpret or platform != "tpu")
    raise MoEBackendError(f"moe_impl {impl!r} is not a grouped matmul (one of ragged/tiled/tokamax/megablox)")


# ---------------------------------------------------------------- the expert MLP


def grouped_mlp(rows, sizes, w_gate, w_up, w_down, matmul: GroupedMatmul, *, partial: bool = False):
    """``down(silu(gate(rows)) * up(rows))`` per expert on expert-sorted ``rows [M, H]``.

    ``partial``: some trailing rows belong to no expert (expert-parallel receive buffers). They
    are zeroed on the way in and out, so neither their undefined kernel outputs nor those of the
    backward pass (rows no group covers are never written) can leak into results or gradients."""
    keep = None
    if partial:
        keep = (jnp.arange(rows.shape[0]) < jnp.sum(sizes))[:, None]
        rows = jnp.where(keep, rows, 0)
    if matmul is tiled_matmul:  # one tile layout for the three projections
        out = tiled_mlp(rows, sizes, w_gate, w_up, w_down)
    else:
        h = jax.nn.silu(matmul(rows, w_gate, sizes)) * matmul(rows, w_up, sizes)
        out = matmul(h.astype(rows.dtype), w_down, sizes)
    return out if keep is None else jnp.where(keep, out, 0)


def experts_grouped(x, idx, w, w_gate, w_up, w_down, *, matmul: GroupedMatmul = _ragged_matmul):
    """Dropless expert compute on expert-sorted tokens. x ``[N, H]``, idx/w ``[N, K]``."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = jnp.take(x, order // k, axis=0)
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    out = grouped_mlp(rows, sizes, w_gate, w_up, w_down, matmul)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", unsorted.astype(jnp.float32), w).astype(x.dtype)


def experts_dense(x, idx, w, w_gate, w_up, w_down):
    """Every expert on every token, then combine: the reference for every other backend."""
    e = w_gate.shape[0]
    h = jax.nn.silu(jnp.einsum("nh,ehi->nei", x, w_gate)) * jnp.einsum("nh,ehi->nei", x, w_up)
    out = jnp.einsum("nei,eih->neh", h, w_down)
    comb = jnp.zeros((x.shape[0], e), jnp.float32).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    return jnp.einsum("neh,ne->nh", out.astype(jnp.float32), comb).astype(x.dtype)


def reads_int8(impl: str, platform: str) -> bool:
    """Whether resolved backend ``impl`` takes int8 ``QArray`` weights as they are: tokamax's GPU /
    TPU kernels (``ep`` runs them inside); everything else gets dequantized weights."""
    return platform != "cpu" and impl in ("tokamax", "ep")


def _expert_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or EXPERT_AXIS not in mesh.axis_names else mesh.shape[EXPERT_AXIS]


def routed_experts(x, idx, w, w_gate, w_up, w_down, *, impl: str = "auto", platform: str | None = None,
                   interpret: bool = False, capacity_factor: float | None = None) -> jax.Array:
    """The MoE's expert output ``[N, H]`` for tokens x ``[N, H]`` routed to idx/w ``[N, K]``;
    weights ``[E, H, Im]`` (gate, up) and ``[E, Im, H]`` (down). ``platform`` selects the kernel
    family (default: JAX's default backend; lowering checks pass the target); ``interpret`` runs
    Pallas kernels in the interpreter; ``capacity_factor`` applies to ``ep`` only. Weights may be
    int8 ``QArray``s (all three or none): read as int8 where ``reads_int8``, else dequantized."""
    platform = _platform(platform)
    int8 = isinstance(w_gate, QArray)
    if impl == "auto" and platform != "cpu" and _expert_axis_size() > 1:
        impl = "ep"  # experts sharded over the mesh: move tokens to them, never gather the weights
    impl = resolve_moe_impl(impl, platform, interpret=interpret, int8=int8)
    if int8 and not reads_int8(impl, platform):
        w_gate, w_up, w_down = (dequantize_as(v, x.dtype) for v in (w_gate, w_up, w_down))
        int8 = False
    if impl == "dense":
        return experts_dense(x, idx, w, w_gate, w_up, w_down)
    if impl == "ep":
        inner = grouped_matmul("auto", platform, interpret=interpret, int8=int8)
        return experts_ep(x, idx, w, w_gate, w_up, w_down, matmul=inner, capacity_factor=capacity_factor)
    matmul = grouped_matmul(impl, platform, interpret=interpret, int8=int8)
    if impl in KERNEL_IMPLS:  # a custom call: XLA cannot partition it, so run it per shard
        grouped = functools.partial(experts_grouped, matmul=matmul)
        return rows_per_shard(grouped, (x, idx, w), (w_gate, w_up, w_down))
    return experts_grouped(x, idx, w, w_gate, w_up, w_down, matmul=matmul)


# ---------------------------------------------------------------- expert parallelism


def experts_ep(x, idx, w, w_gate, w_up, w_down, *, matmul: GroupedMatmul = _ragged_matmul,
               capacity_factor: float | None = None):
    """``experts_grouped`` run expert-parallel over the mesh in context: tokens travel to the
    shard that owns their expert (``all_to_all``), so each ``expert`` shard keeps only its
    ``E / X`` experts' weights instead of GSPMD gathering them (X = size of the ``expert`` axis).

    1. every device sorts its ``n * K`` assignments by destination shard (``expert // (E/X)``)
       into a send buffer ``[X, C, H]`` (plus the local expert id, -1 = empty slot);
    2. ``all_to_all`` swaps the buffers; each device runs ``grouped_mlp`` on what arrived
       (sorted by local expert, empty slots last and outside every group);
    3. a second ``all_to_all`` brings the outputs home for the float32 combine.

    Dropless by default (C = n * K), so it equals ``experts_grouped`` up to rounding.
    ``capacity_factor`` caps C at ``ceil(capacity_factor * n * K / X)`` and drops the overflow
    (contributes 0): not exact, for memory-bound runs only. ``lax.all_to_all`` (not
    ``ragged_all_to_all``) keeps this runnable on CPU. Tokens are sharded over ``TOKEN_AXES``;
    expert weights enter as ``P("expert", None, None)``. With no mesh, or an ``expert`` axis of
    size 1, there is nothing to distribute and it is ``experts_grouped`` itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
        return experts_grouped(x, idx, w, w_gate, w_up, w_down, matmul=matmul)
    n_shards, n_experts = mesh.shape[EXPERT_AXIS], w_gate.shape[0]
    if n_experts % n_shards:
        raise ValueError(f"expert parallelism: {n_experts} experts not divisible by the '{EXPERT_AXIS}' "
                         f"mesh axis of size {n_shards}")
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    n_token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if x.shape[0] % n_token_shards:
        raise ValueError(f"expert parallelism: {x.shape[0]} tokens not divisible by the {n_token_shards} "
                         f"devices of mesh axes {token_axes}")
    assignments = x.shape[0] // n_token_shards * idx.shape[1]
    cap = assignments if capacity_factor is None else min(
        assignments, max(1, math.ceil(capacity_factor * assignments / n_shards)))
    tok, wspec = P(token_axes, None), P(EXPERT_AXIS, None, None)
    body = functools.partial(_local_experts, n_shards=n_shards, capacity=cap, matmul=matmul)
    # check_vma=False: the Pallas kernels inside (megablox, tokamax) declare no varying-axes rules
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wspec, wspec, wspec), out_specs=tok,
                       check_vma=False)
    return fn(x, idx, w, w_gate, w_up, w_down)


def _local_experts(x, idx, w, w_gate, w_up, w_down, *, n_shards: int, capacity: int, matmul):
    """Per-device body: x ``[n, H]`` local tokens, weights ``[E/X, ...]`` local experts."""
    n, k = idx.shape
    hdim, e_local = x.shape[1], w_gate.shape[0]
    slots = n_shards * capacity

    # 1. pack assignments by destination shard
    flat = idx.reshape(-1)
    dest, local_id = flat // e_local, flat % e_local
    order = jnp.argsort(dest, stable=True)
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=n_shards)
    rank = jnp.arange(n * k) - (jnp.cumsum(counts) - counts)[dest_sorted]
    keep = rank < capacity
    slot = jnp.where(keep, dest_sorted * capacity + rank, slots)  # out of range = dropped
    send_x = jnp.zeros((slots, hdim), x.dtype).at[slot].set(jnp.take(x, order // k, axis=0), mode="drop")
    send_e = jnp.full((slots,), -1, jnp.int32).at[slot].set(local_id[order].astype(jnp.int32), mode="drop")

    # 2. exchange, run the local experts on what arrived (empty slots sort last, outside every group)
    recv_x = _swap(send_x.reshape(n_shards, capacity, hdim)).reshape(slots, hdim)
    recv_e = _swap(send_e.reshape(n_shards, capacity)).reshape(slots)
    key = jnp.where(recv_e >= 0, recv_e, e_local)
    by_expert = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
    out = grouped_mlp(jnp.take(recv_x, by_expert, axis=0), sizes, w_gate, w_up, w_down, matmul,
                      partial=True)
    out = jnp.zeros_like(out).at[by_expert].set(out)

    # 3. bring results home and combine with the routing weights
    back = _swap(out.reshape(n_shards, capacity, hdim)).reshape(slots, hdim)
    got = jnp.where(keep[:, None], jnp.take(back, jnp.minimum(slot, slots - 1), axis=0), 0)
    per_assignment = jnp.zeros_like(got).at[order].set(got).reshape(n, k, hdim)
    return jnp.einsum("nkh,nk->nh", per_assignment.astype(jnp.float32), w).astype(x.dtype)


def _swap(buf):
    """``buf[s]`` goes to expert shard s; returns ``[X, ...]`` with row s from shard s."""
    return jax.lax.all_to_all(buf, EXPERT_AXIS, split_axis=0, concat_axis=0, tiled=False)
