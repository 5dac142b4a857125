"""Decode attention over the KV cache (``kernels_pallas.decode_attention``): both kernel
formulations (Mosaic TPU, Triton GPU) in the Pallas interpreter == the plain-JAX reference == the
model's dense cached attention; the model adapter; deviceless compiles by the chips' compilers.

Tolerances: float32 2e-5 absolute (online vs one-shot softmax, values of order 1); bfloat16 2e-2
(one bf16 rounding of probabilities and of the output).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmax_jax.model.attention_backends.decode import decode_kernel_attention, use_kernel
from dmax_jax.model.attention_layer import _cached_attention
from dmax_jax.model.masks import MaskSpec
from kernels_pallas.decode_attention import decode_attention, decode_attention_reference

TOL = {"float32": 2e-5, "bfloat16": 2e-2}
FORMULATIONS = ("tpu", "gpu")

# (batch, tq, nq, nkv, d, cap, block, cache_lens, kind, block_kv, cache splits (None = default))
CASES = {
    "one-block-gqa3-ragged": (3, 8, 6, 2, 16, 64, 8, (0, 17, 40), "block_causal", 16, 3),
    "two-blocks-gqa4": (2, 16, 8, 2, 16, 48, 8, (48, 5), "block_causal", None, None),
    "mha-odd-cap-d8-full": (2, 8, 2, 2, 8, 40, 8, (33, 40), "full", None, None),
    "empty-caches": (2, 8, 4, 1, 16, 32, 8, (0, 0), "block_causal", None, None),
    "many-splits": (2, 4, 4, 2, 16, 96, 4, (96, 33), "block_causal", 16, 4),
    "one-row-default-splits": (1, 8, 4, 2, 16, 64, 8, (40,), "block_causal", 16, None),  # TPU: 2
    "cross-block-256-rows": (2, 64, 8, 2, 16, 64, 32, (64, 20), "block_causal", 16, 2),  # 2 GPU row tiles
}


def _inputs(case, dtype="float32", seed=0):
    b, tq, nq, nkv, d, cap, bs, lens, kind, _, _ = case
    rng = np.random.default_rng(seed)

    def rnd(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q, kc, vc = rnd(b, tq, nq, d), rnd(b, cap, nkv, d), rnd(b, cap, nkv, d)
    kn, vn = rnd(b, tq, nkv, d), rnd(b, tq, nkv, d)
    lens = jnp.asarray(lens, jnp.int32)
    start = -(-lens // bs) * bs  # a cached call starts at (or after) the cache length
    positions = (start[:, None] + jnp.arange(tq)[None]).astype(jnp.int32)
    return q, kc, vc, lens, kn, vn, positions, MaskSpec(kind, bs)


def _blk(positions, spec):
    return jnp.zeros_like(positions) if spec.kind == "full" else positions // spec.block_length


def _close(got, want, dtype, what):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=TOL[dtype], rtol=0, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference_and_model_dense(name):
    case = CASES[name]
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(case)
    blk = _blk(positions, spec)
    ref = decode_attention_reference(q, kc, vc, lens, kn, vn, blk, blk)
    dense = _cached_attention(q, kn, vn, positions, (kc, vc, lens), spec, "cpu")
    _close(ref, dense, "float32", "reference vs model dense")
    for platform in FORMULATIONS:
        out = decode_attention(q, kc, vc, lens, kn, vn, blk, blk, impl="pallas", platform=platform,
                               interpret=True, block_kv=case[9], splits=case[10])
        assert out.shape == q.shape and out.dtype == q.dtype
        _close(out, ref, "float32", f"{platform} kernel vs reference")


def test_bfloat16():
    case = (2, 16, 4, 2, 32, 64, 8, (64, 23), "block_causal", 16, 2)
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(case, "bfloat16", seed=1)
    blk = _blk(positions, spec)
    ref = decode_attention_reference(q, kc, vc, lens, kn, vn, blk, blk)
    _close(ref, _cached_attention(q, kn, vn, positions, (kc, vc, lens), spec, "cpu"), "bfloat16", "dense")
    for platform in FORMULATIONS:
        out = decode_attention(q, kc, vc, lens, kn, vn, blk, blk, impl="pallas", platform=platform,
                               interpret=True, block_kv=16)
        assert out.dtype == jnp.bfloat16
        _close(out, ref, "bfloat16", platform)


def test_slots_past_cache_len_are_never_seen():
    """NaN in every unused slot changes nothing (the kernels never use data past cache_len)."""
    case = CASES["one-block-gqa3-ragged"]
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(case)
    blk = _blk(positions, spec)
    unused = jnp.arange(kc.shape[1])[None, :, None, None] >= lens[:, None, None, None]
    kc_nan, vc_nan = jnp.where(unused, jnp.nan, kc), jnp.where(unused, jnp.nan, vc)
    ref = decode_attention_reference(q, kc, vc, lens, kn, vn, blk, blk)
    for platform in FORMULATIONS:
        out = decode_attention(q, kc_nan, vc_nan, lens, kn, vn, blk, blk, impl="pallas", platform=platform,
                               interpret=True, block_kv=16)
        _close(out, ref, "float32", platform)


@pytest.mark.parametrize("kind", ["block_causal", "full"])
def test_model_adapter_matches_dense(kind):
    case = (2, 16, 4, 2, 16, 32, 8, (32, 9), kind, None, None)
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(case, seed=2)
    dense = _cached_attention(q, kn, vn, positions, (kc, vc, lens), spec, "cpu")
    for platform in FORMULATIONS:
        out = decode_kernel_attention(q, kn, vn, positions, (kc, vc, lens), spec, platform=platform,
                                      interpret=True)
        _close(out, dense, "float32", platform)


def test_dispatch_rules():
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(CASES["empty-caches"])
    blk = _blk(positions, spec)
    args = (q, kc, vc, lens, kn, vn, blk, blk)
    ref = decode_attention_reference(*args)
    np.testing.assert_array_equal(decode_attention(*args, platform="cpu"), ref)  # auto on CPU = xla
    with pytest.raises(ValueError, match="interpret=True"):
        decode_attention(*args, impl="pallas", platform="cpu", interpret=False)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(*args, impl="splash")
    with pytest.raises(ValueError, match="k_new/v_new"):
        decode_attention(q, kc, vc, lens, kn[:, :1], vn, blk, blk)
    with pytest.raises(ValueError, match="cache_len"):
        decode_attention(q, kc, vc, lens[:1], kn, vn, blk, blk)
    # DMax-16B (16 q / 4 kv heads): blocks and cross-blocks take the kernel, a prompt prefill dense
    assert use_kernel(32, 16, 4) and use_kernel(64, 16, 4) and not use_kernel(2048, 16, 4)


# ------------------------------------------------------------ deviceless compiles (real compilers)

H200 = """gpu_device_info { threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 } device_description_str: "NVIDIA H200"
"""

_COMPILE = textwrap.dedent("""
    import functools, sys
    import numpy as np, jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from kernels_pallas.decode_attention import decode_attention
    platform = sys.argv[1]
    if platform == "tpu":
        topo = topologies.get_topology_desc("v5p:2x2x1", platform="tpu")
    else:
        topo = topologies.get_topology_desc(platform="cuda", target_config=sys.stdin.read(),
                                            topology="1x1x1")
    mesh = Mesh(np.array(topo.devices[:1]).reshape(1), ("x",))
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))
    tq, nq, nkv, d, cap, bf = 16, 4, 2, 128, 256, jnp.bfloat16
    for b, splits in ((2, 1), (1, 2)):  # one output, and partials merged by log-sum-exp
        args = (S((b, tq, nq, d), bf), S((b, cap, nkv, d), bf), S((b, cap, nkv, d), bf),
                S((b,), jnp.int32), S((b, tq, nkv, d), bf), S((b, tq, nkv, d), bf), S((b, tq), jnp.int32),
                S((b, tq), jnp.int32))
        fn = functools.partial(decode_attention, impl="pallas", platform=platform, block_kv=128,
                               splits=splits)
        with jax.default_device(topo.devices[0]):
            compiled = jax.jit(fn).lower(*args).compile()
        assert jax.default_backend() == "cpu"
        print(compiled.as_text())
""")


def _compile_hlo(platform: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # other processes may hold libtpu's lock file
    proc = subprocess.run([sys.executable, "-c", _COMPILE, platform], input=H200, env=env, text=True,
                          capture_output=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_mosaic_kernel_compiles_for_tpu_deviceless():
    pytest.importorskip("libtpu", reason="needs libtpu (jax[tpu]) for the deviceless TPU compiler")
    hlo = _compile_hlo("tpu")
    assert hlo.count("tpu_custom_call") == 2 and "decode_attention_tpu" in hlo


def test_triton_kernel_compiles_for_h200_deviceless():
    pytest.importorskip("jax_cuda12_plugin", reason="needs jax[cuda12] for the deviceless GPU compiler")
    hlo = _compile_hlo("gpu")
    assert hlo.count("__gpu$xla.gpu.triton") == 2 and "decode_attention_gpu" in hlo


@pytest.mark.parametrize("batch", [2, 3])
def test_model_adapter_per_shard_under_a_mesh(batch):
    """Under a mesh the kernel runs in shard_map: rows over ``data`` when the batch divides it
    (else whole on every device), kv heads over ``tensor``; the result is the dense one."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices")
    mesh = jax.make_mesh((2, 1, 1, 2), ("data", "fsdp", "expert", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)  # as the model's meshes
    case = (batch, 8, 4, 2, 16, 32, 8, (32, 9, 0)[:batch], "block_causal", None, None)
    q, kc, vc, lens, kn, vn, positions, spec = _inputs(case, seed=3)
    dense = _cached_attention(q, kn, vn, positions, (kc, vc, lens), spec, "cpu")
    fn = jax.jit(lambda *a: decode_kernel_attention(*a[:4], a[4:], spec, platform="tpu", interpret=True))
    with jax.set_mesh(mesh):
        out = fn(q, kn, vn, positions, kc, vc, lens)
    _close(out, dense, "float32", f"batch {batch}")
