"""HF checkpoint I/O: stream a safetensors directory into our parameter tree and write it back.

Why it is shaped this way:
- Memory: one host buffer per destination leaf, filled tensor by tensor and handed to JAX before the
  next leaf is started. With an accelerator the host holds at most one leaf plus one tensor; on CPU
  the 64-byte-aligned buffer becomes the array itself (``device_put`` adopts it without a copy), so
  the peak is the model plus one tensor. Files are read with safetensors' ``pread`` backend: an mmap
  would add every touched page of the file to the process RSS (measured: 2x the model).
- Safety: only ``*.safetensors`` are read (never pickle); every missing, unexpected or misshapen
  tensor is collected and reported in one ``CheckpointError`` before any data is read.
- Saving writes the split-expert layout (what HF LLaDA2.0-mini / DMax ship) tensor by tensor into a
  temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from dmax_jax.checkpoint.finite import check_finite
from dmax_jax.checkpoint.hf_keys import (
    SPLIT,
    ZERO_WIDTH_SHARED,
    Entry,
    detect_layout,
    hf_entries,
    leaf_shapes,
)
from dmax_jax.config import ModelConfig, parse_dtype

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_ST_CODES = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}

Path_ = str | os.PathLike
LeafPath = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config; ``missing``/``unexpected``/``misshapen`` list each
    offending tensor so that one run shows every problem. The message shows the first
    :data:`SHOWN_PER_KIND` of each kind (a wrong ``hidden_size`` touches every tensor; thousands of
    lines would bury the cause); the attributes hold them all."""

    SHOWN_PER_KIND = 6

    def __init__(self, message: str, *, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 misshapen: Sequence[str] = (), other: Sequence[str] = ()):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.misshapen, self.other = list(misshapen), list(other)
        lines = [message]
        for kind, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                            ("problem", other)):
            lines += [f"  {kind:<10} {it}" for it in items[:self.SHOWN_PER_KIND]]
            if len(items) > self.SHOWN_PER_KIND:
                lines.append(f"  ... and {len(items) - self.SHOWN_PER_KIND} more {kind}")
        super().__init__("\n".join(lines))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory, its config.json or its safetensors files are absent."""


# ---- abstract target --------------------------------------------------------------------------------
def _resolve_dtype(dtype: Any) -> np.dtype:
    return parse_dtype(dtype, "parameter dtype")


def _leaf_dtype(f32: bool, dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float32) if f32 else dtype


def _nest(flat: dict[LeafPath, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _flatten(tree: Any, is_leaf: Callable[[Any], bool], prefix: LeafPath = ()) -> dict[LeafPath, Any]:
    if isinstance(tree, Mapping) and not is_leaf(tree):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, is_leaf, (*prefix, str(k))))
        return out
    return {prefix: tree}


def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, computed from the key table (it must
    equal ``jax.eval_shape`` of the model's ``init_params``; a test checks that)."""
    dt = _resolve_dtype(dtype)
    return _nest({p: jax.ShapeDtypeStruct(s, _leaf_dtype(f32, dt))
                  for p, (s, f32) in leaf_shapes(config).items()})


# ---- reading ----------------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and the index's weight map (None without an index)."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint path {path} is not a directory")
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointNotFoundError(f"{index} names shard files that do not exist", other=absent)
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{path} holds only pickle weights {pickles}; only safetensors are read "
                                  "(convert them with safetensors first)")
        raise CheckpointNotFoundError(f"no *.safetensors files (and no {INDEX_FILE}) in {path}")
    return files, None


def _open(file: Path) -> Any:
    try:
        return safe_open(file, framework="numpy", backend="pread")
    except TypeError as e:  # an older safetensors without safe_open(backend=...)
        version = getattr(sys.modules["safetensors"], "__version__", "?")
        raise RuntimeError(f"safetensors {version} has no pread backend (0.8.0 has it); upgrade it") from e


def _read_headers(files: list[Path]) -> dict[Path, dict[str, tuple[tuple[int, ...], str]]]:
    """file → {name: (shape, safetensors dtype code)}, in on-disk (offset) order."""
    out = {}
    for f in files:
        try:
            with _open(f) as h:
                out[f] = {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype())
                          for k in h.offset_keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read safetensors header of {f}: {e}") from e
    return out


def _check(headers: dict, weight_map: dict[str, str] | None, expected: dict[str, Entry],
           path: Path) -> dict[str, tuple[Path, str]]:
    """Validate every tensor at once; returns name → (file, dtype code)."""
    where: dict[str, tuple[Path, str]] = {}
    other: list[str] = []
    for f, tensors in headers.items():
        for name, (_, code) in tensors.items():
            if name in where:
                other.append(f"{name} stored twice ({where[name][0].name} and {f.name})")
            where[name] = (f, code)
            if weight_map is not None and weight_map.get(name) != f.name:
                other.append(f"{name} is in {f.name} but the index maps it to {weight_map.get(name)}")
    if weight_map is not None:
        other += [f"index maps {n} to {f}, which lacks it" for n, f in weight_map.items() if n not in where]
    shapes = {n: s for t in headers.values() for n, (s, _) in t.items()}
    missing = [f"{n}  expected {list(e.layout.hf)}" for n, e in expected.items() if n not in where]
    unexpected = [f"{n}  {list(shapes[n])}" for n in where if n not in expected
                  and not (ZERO_WIDTH_SHARED.fullmatch(n) and 0 in shapes[n])]
    misshapen = [f"{n}  expected {list(e.layout.hf)} got {list(shapes[n])}"
                 for n, e in expected.items() if n in where and shapes[n] != e.layout.hf]
    other += [f"{n} has dtype {where[n][1]}; only {sorted(_ST_DTYPES)} are read"
              for n in expected if n in where and where[n][1] not in _ST_DTYPES]
    if missing or unexpected or misshapen or other:
        count = len(missing) + len(unexpected) + len(misshapen) + len(other)
        raise CheckpointError(f"checkpoint {path} does not match the config "
                              f"({count} problem{'s' * (count != 1)})",
                              missing=missing, unexpected=unexpected, misshapen=misshapen, other=other)
    return where


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """Aligned so that jax.device_put on CPU adopts the memory instead of copying it."""
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def _copy_into(dst: np.ndarray, src: np.ndarray, axis: int, block: int = 128) -> None:
    """``dst[...] = src`` in slabs along ``axis`` (the HF tensor's row axis): a transposing copy of
    a whole large tensor strides through memory; slabs keep it cache-sized (about 2x faster)."""
    if src.size < 1 << 20 or axis == 0 and src.flags.c_contiguous:
        dst[...] = src
        return
    for i in range(0, src.shape[axis], block):
        sl = (slice(None),) * axis + (slice(i, i + block),)
        dst[sl] = src[sl]


def _place(buf: np.ndarray, sharding: jax.sharding.Sharding | None, leaf: LeafPath) -> jax.Array:
    try:
        if sharding is None:
            return jax.device_put(buf, may_alias=True)
        return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])
    except Exception as e:  # re-raised with the leaf's name: JAX errors do not say which leaf
        raise CheckpointError(f"cannot place {'/'.join(leaf)} {list(buf.shape)} into {sharding}: {e}") from e


def _leaf_shardings(shardings: Any, leaves: list[LeafPath]) -> dict[LeafPath, Any]:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return dict.fromkeys(leaves, shardings)
    flat = _flatten(shardings, lambda x: isinstance(x, jax.sharding.Sharding))
    missing = ["/".join(p) for p in leaves if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in set(leaves)]
    if missing or unexpected:
        raise CheckpointError("shardings tree does not match the parameter tree",
                              missing=missing, unexpected=unexpected)
    return flat


def load_hf_params(path: Path_, config: ModelConfig | None = None, *, dtype: Any = jnp.float32,
                   shardings: Any = None) -> dict:
    """Load an HF LLaDA2-MoE safetensors directory (split or merged experts) into our parameter tree.

    ``config`` defaults to the directory's config.json. Every leaf is cast to ``dtype`` (except
    float32 ``expert_bias``). ``shardings``: None (default device), one ``Sharding`` for every leaf,
    or a tree of them matching the parameters; each leaf is built straight into its sharding.
    """
    path = Path(path)
    files, weight_map = _checkpoint_files(path)
    if config is None:
        try:
            config = ModelConfig.from_json(path)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"no config.json in {path} (pass config= explicitly)") from e
    dt = _resolve_dtype(dtype)
    headers = _read_headers(files)
    try:
        layout = detect_layout([n for t in headers.values() for n in t])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    entries = hf_entries(config, layout)
    expected = {e.name: e for e in entries}
    where = _check(headers, weight_map, expected, path)

    shapes = leaf_shapes(config)
    leaf_shard = _leaf_shardings(shardings, list(shapes))
    order = {k: i for i, k in enumerate((f, n) for f, t in headers.items() for n in t)}  # on-disk order
    by_leaf: dict[LeafPath, list[Entry]] = {p: [] for p in shapes}
    for e in entries:
        by_leaf[e.leaf].append(e)
    out = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in files}
        for leaf, (shape, f32) in shapes.items():
            buf = _host_buffer(shape, _leaf_dtype(f32, dt))
            srcs = sorted(by_leaf[leaf], key=lambda e: order[(where[e.name][0], e.name)])
            for e in srcs:
                x = handles[where[e.name][0]].get_tensor(e.name)
                check_finite(x, e.name, where[e.name][0], CheckpointError)
                _copy_into(buf[e.index], e.layout.to_ours(x), e.layout.perm.index(0))
                del x
            out[leaf] = _place(buf, leaf_shard[leaf], leaf)
            del buf
    return _nest(out)


# ---- writing ----------------------------------------------------------------------------------------
def _write_safetensors(file: Path, items: list[tuple[str, np.dtype, tuple[int, ...], Callable]]) -> None:
    """Stream tensors into one safetensors file: header with precomputed offsets, then raw bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, _ in items:
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_CODES[dt.name], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, dt, shape, produce in items:
            a = np.ascontiguousarray(produce(), dtype=dt)
            if a.shape != shape:
                raise CheckpointError(f"internal: {name} produced {a.shape}, header says {shape}")
            f.write(a.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())


def _check_params(flat: dict[LeafPath, Any], config: ModelConfig) -> None:
    shapes = leaf_shapes(config)
    missing = ["/".join(p) + f"  expected {list(s)}" for p, (s, _) in shapes.items() if p not in flat]
    unexpected = ["/".join(p) + f"  {list(np.shape(v))}" for p, v in flat.items() if p not in shapes]
    misshapen = ["/".join(p) + f"  expected {list(shapes[p][0])} got {list(np.shape(v))}"
                 for p, v in flat.items() if p in shapes and tuple(np.shape(v)) != shapes[p][0]]
    if missing or unexpected or misshapen:
        raise CheckpointError("parameters do not match the config", missing=missing, unexpected=unexpected,
                              misshapen=misshapen)


def save_hf_params(params: dict, config: ModelConfig, path: Path_, *, dtype: Any = None,
                   max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> None:
    """Write ``params`` as an HF split-expert safetensors directory plus config.json.

    ``dtype`` None keeps each leaf's dtype (``expert_bias`` is always float32). Shards larger than
    ``max_shard_bytes`` split into ``model-0000k-of-0000n.safetensors`` with an index. The directory
    appears atomically: written under a temporary name in the same parent, then renamed.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors is little-endian; writing from a big-endian host is not supported")
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    flat = _flatten(params, lambda x: False)
    _check_params(flat, config)
    out_dt = None if dtype is None else _resolve_dtype(dtype)
    if out_dt is not None:
        config = config.replace(torch_dtype=out_dt.name)

    cache: dict[tuple, np.ndarray] = {}

    def host_slice(leaf: LeafPath, j: int | None) -> np.ndarray:
        # One (leaf, layer) slice on the host at a time: entries come layer-major, rule by rule.
        key = (leaf, j)
        if key not in cache:
            cache.clear()
            arr = flat[leaf]
            cache[key] = np.asarray(arr if j is None else arr[j])
        return cache[key]

    items = []
    for e in hf_entries(config, SPLIT):
        leaf_dt = np.dtype(flat[e.leaf].dtype)
        dt = _leaf_dtype(e.f32, out_dt if out_dt is not None else leaf_dt)
        if dt.name not in _ST_CODES:
            raise CheckpointError(f"cannot save {'/'.join(e.leaf)}: dtype {dt.name} has no safetensors code")
        j, rest = (e.index[0], e.index[1:]) if e.index else (None, ())
        items.append((e.name, dt, e.layout.hf,
                      lambda e=e, j=j, rest=rest: e.layout.to_hf(host_slice(e.leaf, j)[rest])))
    shards: list[list] = [[]]
    size = 0
    for it in items:
        n = int(np.prod(it[2], dtype=np.int64)) * it[1].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            _write_safetensors(tmp / fname, shard)
            for name, dt, shape, _ in shard:
                weight_map[name] = fname
                total += int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        config.to_json(tmp / "config.json")
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, path: Path) -> None:
    """Move the finished directory into place; an existing one is replaced only after success."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
