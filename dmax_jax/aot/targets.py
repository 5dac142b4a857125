"""Named chips and their compile-only devices: the real TPU / GPU compilers, no chip attached.

TPU targets come from libtpu's topologies (``jax[tpu]``); GPU targets from a ``GpuTargetConfig``
text proto shipped in ``aot/targets/*.txtpb`` (each file's first line gives the data-sheet numbers
it holds) with the CUDA plugin (``jax[cuda12]``). ``topology_devices`` returns the devices of a
topology; ``jax.jit(f).lower(*sharded ShapeDtypeStructs).compile()`` on them runs the chip's own
compiler (Mosaic / Triton kernels included) and ``memory_analysis()`` is the chip's memory plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from pathlib import Path

import jax

TARGET_DIR = Path(__file__).resolve().parent / "targets"
HEADROOM = 0.10  # a program "fits" when its peak leaves 10 % of the chip's HBM free


class TargetError(ValueError):
    """An unknown target, a malformed topology, or a compiler plugin that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Args:
    name: the ``--target`` name (``h200``, ``v5p``, ...).
    platform: ``gpu`` or ``tpu``.
    hbm_bytes: memory per chip as the data sheet states it (decimal GB; the GPU protos carry the
        device's exact size, which is larger), what "fits" is measured against.
    devices_per_host: chips per host VM / node (the process count of a topology follows from it).
    default_topology: used when ``--topology`` is not given.
    source: where ``hbm_bytes`` comes from.
    """

    name: str
    platform: str
    hbm_bytes: int
    devices_per_host: int
    default_topology: str
    source: str

    @property
    def fits_bytes(self) -> int:
        return int(self.hbm_bytes * (1 - HEADROOM))


TARGETS = {
    "h100": Target("h100", "gpu", 80 * 10**9, 8, "1x1x8", "H100 SXM5 data sheet: 80 GB HBM3 (h100.txtpb)"),
    "h200": Target("h200", "gpu", 141 * 10**9, 8, "1x1x8", "H200 SXM data sheet: 141 GB HBM3e (h200.txtpb)"),
    "b200": Target("b200", "gpu", 180 * 10**9, 8, "1x1x8", "HGX B200 data sheet: 180 GB HBM3e (b200.txtpb)"),
    "v5e": Target("v5e", "tpu", 16 * 10**9, 4, "v5e:2x2", "Cloud TPU v5e: 16 GB HBM2 per chip"),
    "v5p": Target("v5p", "tpu", 95 * 10**9, 4, "v5p:2x2x1", "Cloud TPU v5p: 95 GB HBM2e per chip"),
    "v6e": Target("v6e", "tpu", 32 * 10**9, 4, "v6e:2x2", "Cloud TPU v6e: 32 GB HBM per chip"),
}

_GPU_TOPOLOGY = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_TPU_TOPOLOGY = re.compile(r"^(?:([a-z0-9]+):)?(\d+(?:x\d+)+)$")


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"--target {name!r} is not one of {', '.join(TARGETS)}")
    return TARGETS[name]


def normalize_topology(target: Target, topology: str | None) -> str:
    """``1x1x8`` (GPU: slices x hosts x devices per host) or ``v5p:2x2x2`` / ``2x2x2`` (TPU chips)."""
    topology = topology or target.default_topology
    if target.platform == "gpu":
        if not _GPU_TOPOLOGY.match(topology):
            raise TargetError(f"--topology {topology!r}: a GPU topology is SLICESxHOSTSxDEVICES, e.g. 1x1x8")
        return topology
    m = _TPU_TOPOLOGY.match(topology)
    if not m:
        raise TargetError(f"--topology {topology!r}: a TPU topology is like {target.name}:2x2x2")
    if m.group(1) not in (None, target.name):
        raise TargetError(f"--topology {topology!r} names chip {m.group(1)!r} "
                          f"but --target is {target.name!r}")
    return f"{target.name}:{m.group(2)}"


def num_devices(target: Target, topology: str) -> int:
    dims = topology.split(":")[-1].split("x")
    return math.prod(int(d) for d in dims)


def num_hosts(target: Target, topology: str) -> int:
    """Processes a job on this topology runs (one per host): GPU ``AxBxC`` = A*B; TPU chips / 4."""
    if target.platform == "gpu":
        a, b, _ = (int(x) for x in topology.split("x"))
        return a * b
    return max(1, num_devices(target, topology) // target.devices_per_host)


def _prepare_host() -> None:
    """Compile-only devices need no host accelerator: keep the host backend on CPU (a CPU host with
    the CUDA plugin installed would otherwise try, and fail, to start CUDA) and skip the plugin's
    check of the host's CUDA libraries (there is no GPU whose driver they must match)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # libtpu takes a machine-wide lock file unless told otherwise: compile-only use needs no chip to
    # guard, and two compiles at once (pytest -n 2, a second terminal) must not lock each other out.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


@functools.cache
def topology_devices(name: str, topology: str | None = None) -> tuple[jax.Device, ...]:
    """The compile-only devices of ``topology`` on chip ``name`` (cached: one topology object each)."""
    from jax.experimental import topologies  # noqa: PLC0415

    target = get_target(name)
    topo = normalize_topology(target, topology)
    _prepare_host()
    try:
        if target.platform == "tpu":
            desc = topologies.get_topology_desc(topo, platform="tpu")
        else:
            proto = (TARGET_DIR / f"{target.name}.txtpb").read_text()
            desc = topologies.get_topology_desc(platform="cuda", target_config=proto, topology=topo)
    except Exception as e:  # noqa: BLE001  (plugin errors come as RuntimeError / XlaRuntimeError / ImportError)
        extra = "jax[tpu] (libtpu)" if target.platform == "tpu" else "jax[cuda12]"
        raise TargetError(f"cannot make compile-only {target.name} devices for {topo!r}: "
                          f"{str(e).splitlines()[0][:300]} (needs {extra}: pip install -e '.[aot]')") from e
    devices = tuple(desc.devices)
    if len(devices) != num_devices(target, topo):
        raise TargetError(f"topology {topo!r} gave {len(devices)} devices, "
                          f"expected {num_devices(target, topo)}")
    return devices
