"""Test session setup, before JAX is imported anywhere:

- 8 fake CPU devices (sharding tests);
- fast XLA:CPU compilation (optimisation level 0, no fusion emitters): the tiny test models spend
  far more time compiling than running, and this cuts compile time about 3x. Numerics are still
  float32 IEEE; set DMAX_TEST_XLA_OPT=1 to test with the default optimising pipeline instead.
"""

import os

_flags = ["--xla_force_host_platform_device_count=8"]
if os.environ.get("DMAX_TEST_XLA_OPT") != "1":
    _flags += ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
_current = os.environ.get("XLA_FLAGS", "")
_missing = [f for f in _flags if f.split("=")[0] not in _current]
os.environ["XLA_FLAGS"] = " ".join([_current, *_missing]).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run on the CPU: with the `aot` extra (jax[cuda12]) installed, JAX would otherwise try to
# start CUDA on this GPU-less host (and log a traceback); compile-only GPU/TPU devices need no backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock file would serialise the workers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _initial_compile_cache_dir():
    import jax

    return jax.config.jax_compilation_cache_dir


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache_leak(_initial_compile_cache_dir):
    """A test (or a module fixture) that turns on JAX's persistent compile cache (``serve.build`` does,
    for the CLI) would change every later test of its xdist worker: fail it, and put the setting back."""
    import jax

    yield
    now = jax.config.jax_compilation_cache_dir
    if now != _initial_compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", _initial_compile_cache_dir)
        pytest.fail(f"jax_compilation_cache_dir was left at {now!r} (was {_initial_compile_cache_dir!r})")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs_after_each_file():
    """Every compiled XLA:CPU program keeps its JIT code mapped; one test file can leave ~25,000
    memory maps, and a pytest-xdist worker that runs many files reaches the kernel's limit
    (vm.max_map_count, 65,530), where LLVM's next mmap fails and the worker dies (segfault / abort)
    mid-compile. Dropping the compiled programs at the end of each file unmaps them."""
    yield
    import gc

    import jax

    from dmax_jax.decoding.compiled import COMPILED

    COMPILED.reset()          # each file starts as a fresh process would: no programs, no counts
    jax.clear_caches()
    gc.collect()
