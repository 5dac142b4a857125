"""``TrainConfig``: nested frozen dataclasses read from a small YAML file plus ``a.b=value`` overrides.

Why typed sections instead of a free dict: every key is checked against the dataclass field that
receives it (unknown keys and wrong types fail at load time with the dotted key in the message),
and each section is the very config object its module consumes (``DataConfig`` for the pipeline,
``OptimConfig`` for the optimizer, ...), so there is no second copy of the defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from dmax_jax.data.pipeline import DataConfig
from dmax_jax.training.optim import OptimConfig
from dmax_jax.training.sharding import MeshConfig
from dmax_jax.training.step import StepConfig

MODEL_SOURCES = ("hf:", "preset:", "config:")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# Fields the loop derives when the YAML leaves them out: the schedule length from the data size, the
# MASK id from the model config + tokenizer. Until then they hold a placeholder and are listed in
# ``TrainConfig.auto``; ``TrainConfig.resolve`` fills them.
AUTO_FIELDS = {"optim.total_steps": 1, "step.mask_id": 0}
# Keys that were renamed: an old config gets an error naming the new key instead of "unknown key".
RENAMED_KEYS = {"step.block_size": "step.block_length"}


class TrainConfigError(ValueError):
    """An invalid training config; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the model comes from.

    ``source``: ``hf:DIR`` (config.json + safetensors, loaded straight into the shardings),
    ``preset:NAME`` (``dmax_jax.config.PRESETS``, random init) or ``config:PATH.json`` (random init).
    Parameters are always float32 master weights (the ``TrainState`` contract); the compute dtype
    is ``step.compute_dtype``.
    ``overrides``: ``ModelConfig`` fields replaced on a preset/config source (e.g. ``vocab_size``).
    ``tokenizer``: a tokenizer directory; None = the ``hf:`` directory, or the generated one for
    ``generate:`` data.
    """

    source: str = "preset:tiny"
    tokenizer: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.source.startswith(MODEL_SOURCES) or self.source.split(":", 1)[1] == "":
            raise TrainConfigError(f"model.source: {self.source!r} must be one of "
                                   "'hf:DIR', 'preset:NAME', 'config:PATH.json'")
        if self.overrides and self.source.startswith("hf:"):
            raise TrainConfigError("model.overrides: not allowed with an hf: source (the checkpoint "
                                   "fixes the shapes; edit its config.json instead)")

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1]


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The run itself: where it writes, how long, how often it logs and checkpoints.

    ``num_steps`` None = ``data.num_epochs`` × steps per epoch. ``save_every`` 0 = save only at the
    end. ``keep_last`` checkpoints are kept. ``export_hf_at_end`` writes ``<out_dir>/hf_final``.
    ``allow_config_change``: resume although ``step`` / ``optim`` / ``seed`` differ from the
    checkpoint's (the previous ``train_config.yaml`` is kept as ``train_config.before_<step>.yaml``).
    ``resume_step``: resume from that checkpoint instead of the newest readable one (newer ones are
    moved aside into ``<out_dir>/checkpoints_set_aside``, never deleted).
    """

    out_dir: str = "runs/tiny"
    num_steps: int | None = None
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 3
    async_save: bool = True
    resume: bool = True
    resume_step: int | None = None
    allow_config_change: bool = False
    export_hf_at_end: bool = False
    export_dtype: str | None = None
    seed: int = 0
    metrics_jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        checks = {
            "num_steps": self.num_steps is None or self.num_steps > 0,
            "log_every": self.log_every > 0,
            "save_every": self.save_every >= 0,
            "keep_last": self.keep_last >= 1,
            "resume_step": self.resume_step is None or self.resume_step >= 1,
            "seed": 0 <= self.seed < 2**32,
            "export_dtype": self.export_dtype is None or self.export_dtype in EXPORT_DTYPES,
        }
        for key, ok in checks.items():
            if not ok:
                raise TrainConfigError(f"run.{key}: invalid value {getattr(self, key)!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole training run. Sections are the configs their modules consume.

    ``auto`` lists the ``AUTO_FIELDS`` the YAML left out (placeholders until ``resolve``).
    """

    model: ModelSection
    data: DataConfig
    optim: OptimConfig
    step: StepConfig
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    auto: tuple[str, ...] = ()

    def resolve(self, *, total_steps: int, mask_id: int) -> TrainConfig:
        """Fill the derived fields. An explicit ``step.mask_id`` must equal ``mask_id`` (the id the
        data uses), else the rollout would fill the wrong token."""
        optim, step = self.optim, self.step
        if "optim.total_steps" in self.auto:
            optim = dataclasses.replace(optim, total_steps=total_steps)
        if "step.mask_id" in self.auto:
            step = dataclasses.replace(step, mask_id=mask_id)
        elif step.mask_id != mask_id:
            raise TrainConfigError(f"step.mask_id: {step.mask_id} but the model config / tokenizer say the "
                                   f"MASK id is {mask_id}; remove step.mask_id or fix it")
        return dataclasses.replace(self, optim=optim, step=step, auto=())

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that ``train_config_from_dict`` reads back; auto fields
        that are still placeholders are left out."""
        d = _plain(dataclasses.asdict(self))
        for f in dataclasses.fields(self.step):
            if f.metadata.get("internal"):  # set from the devices, never from a config file
                d["step"].pop(f.name)
        for key in d.pop("auto"):
            section, name = key.split(".")
            d[section].pop(name)
        return d


# ---- dict → dataclass, type-checked ------------------------------------------------------------
def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and minimally converted) against the annotation ``tp``; errors name ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except TrainConfigError:
                continue
        raise TrainConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in args:
            return value
        raise TrainConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str) and origin is tuple and args[1:] == (Ellipsis,) and args[0] is str:
            value = [value]  # data.paths=train.jsonl: one path for a list of paths
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TrainConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list or tp is list else tuple(out)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TrainConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TrainConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TrainConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TrainConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    raise TrainConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown / missing keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.init and f.name != "auto" and not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    unknown = [k for k in data if k not in fields]
    for k in unknown:
        if f"{prefix}{k}" in RENAMED_KEYS:
            raise TrainConfigError(f"{prefix}{k} was renamed {RENAMED_KEYS[prefix + k]} (the project's one "
                                   "name for the block size); rename the key in your config")
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise TrainConfigError(f"unknown key {prefix}{k}{hint}; known keys of "
                               f"{where or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TrainConfigError(f"missing required key {prefix}{name}")
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise TrainConfigError(f"{where or cls.__name__}: {e}") from e


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build a ``TrainConfig`` from a nested dict (the YAML document)."""
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"the config must be a mapping at the top level, got {type(data).__name__}")
    if "auto" in data:
        raise TrainConfigError("unknown key auto (it is derived: leave optim.total_steps / step.mask_id out)")
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    auto = []
    for key, placeholder in AUTO_FIELDS.items():
        section, name = key.split(".")
        node = data.setdefault(section, {})
        if isinstance(node, dict) and node.get(name) is None:
            node[name] = placeholder
            auto.append(key)
    cfg = _build(TrainConfig, data, "")
    return dataclasses.replace(cfg, auto=tuple(auto))


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` to the nested dict ``data`` (value parsed as YAML: ``true``, ``3``,
    ``[a, b]``, ``null``; anything else stays a string)."""
    if "=" not in override:
        raise TrainConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise TrainConfigError(f"override {override!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise TrainConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_train_config(yaml_path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``yaml_path`` (None = start from an empty document), apply ``overrides`` in order, and
    build the typed config. Raises ``TrainConfigError`` naming the offending key."""
    data: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for o in overrides:
        apply_override(data, o)
    return train_config_from_dict(data)


def dump_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML that ``load_train_config`` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
