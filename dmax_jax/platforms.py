"""The platform a program is compiled for — taken from its devices, never from the host.

Every per-platform choice (the MoE grouped matmul, the attention kernel, the soft-embedding kernel,
the engine's compaction) is made for the devices a program's arguments live on: concrete arrays on
a GPU, or ``jax.ShapeDtypeStruct``s sharded over compile-only TPU / GPU devices of a deviceless
topology (``dmax_jax.aot``). A CPU host compiling for an H200 must build the program an H200 runs;
``jax.default_backend()`` (the host's) would silently pick the CPU kernels instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from jax.sharding import Mesh, Sharding

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


class PlatformError(ValueError):
    """Devices of no known platform, or of several platforms in one program."""


def normalize(name: str) -> str:
    """``cuda`` / ``rocm`` -> ``gpu``; ``cpu`` / ``tpu`` as they are; anything else is an error."""
    if name not in _ALIASES:
        raise PlatformError(f"unknown platform {name!r}; known: {PLATFORMS} (and cuda/rocm for gpu)")
    return _ALIASES[name]


def _devices(x: Any) -> set:
    if isinstance(x, Mesh):
        return set(x.devices.flat)
    if isinstance(x, Sharding):
        return set(x.device_set)
    if isinstance(x, jax.Device):
        return {x}
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, Sharding):
        return set(sharding.device_set)
    if isinstance(x, jax.Array):  # committed or not, an array knows its devices
        return set(x.devices())
    return set()


def platform_of(tree: Any, *, default: str | None = None) -> str:
    """The one platform of the devices ``tree`` (a Mesh, Sharding, Device, array, sharded
    ShapeDtypeStruct, or a pytree of those) lives on. Leaves with no devices (Python numbers,
    unsharded structs) say nothing; if none says anything, ``default`` (or the host's default
    backend when ``default`` is None: plain NumPy inputs run there)."""
    if isinstance(tree, (Mesh, Sharding, jax.Device)):
        leaves = [tree]
    else:
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, (Mesh, Sharding, jax.Device)))
    found = {normalize(d.platform) for leaf in leaves for d in _devices(leaf)}
    if len(found) > 1:
        raise PlatformError(f"one program's arguments live on several platforms: {sorted(found)}")
    if found:
        return found.pop()
    return normalize(default if default is not None else jax.default_backend())


def resolve(platform: str | None) -> str:
    """``platform`` normalized; None means the host's default backend (eager callers only:
    program builders pass ``platform_of`` their arguments)."""
    return normalize(jax.default_backend() if platform is None else platform)


def mesh_of(tree: Any):
    """The one multi-device ``Mesh`` the leaves of ``tree`` are ``NamedSharding``-ed over, or None
    (single device, unsharded leaves)."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
              if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)}
    meshes = {m for m in meshes if m.size > 1}
    if len(meshes) > 1:
        raise PlatformError(f"one program's arguments are sharded over {len(meshes)} different meshes")
    return meshes.pop() if meshes else None


def mesh_context(tree: Any):
    """Trace a program over ``tree`` (its parameters) inside their mesh: kernel calls then run per
    shard (``model.partitioned``) — XLA cannot partition a Pallas kernel's custom call."""
    mesh = mesh_of(tree)
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def in_mesh_of(tree: Any, fn):
    """``fn`` traced inside ``mesh_context(tree)`` (wrap the function a program jits)."""
    import functools  # noqa: PLC0415

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with mesh_context(tree):
            return fn(*args, **kwargs)

    return traced
