"""Training data pipeline: files → validated rows → (OPUT duplication) → per-epoch shuffle → shard by
process → algorithm §3 transform → batch → prefetch, on grain's ``MapDataset`` index arithmetic.

Why index arithmetic: every element is addressed by a global position ``i``; its epoch is
``i // units_per_epoch`` and its example index comes from a seeded per-epoch permutation. Nothing
depends on workers or hosts, so process ``p`` of ``P`` taking positions ``p, p+P, …`` gives exactly the
global batches of one process with ``P`` times the batch, and the iterator state (a position) resumes
exactly. Each epoch is trimmed to whole global batches (the reference's ``drop_last``).

Example indices: ``k`` in ``[0, num_examples)``. With ``oput_duplicate`` (algorithm §3 "Dataset build")
``k < N`` is row ``k`` with flag True and ``k >= N`` row ``k - N`` with flag False; otherwise ``k`` is
row ``k`` with the row's own ``"flag"`` (or ``default_flag``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from dmax_jax.data.chat import SpecialIds, mask_token_text, resolve_special_ids
from dmax_jax.data.coverage import answer_room, no_answer_error
from dmax_jax.data.transforms import BadRow, OputTransform, row_messages

MAX_REPORTED_BAD_ROWS = 20


class DataError(ValueError):
    """A bad data file or row; the message starts with ``path:line`` (or ``path:row N`` for parquet)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data settings. ``batch_size`` is per process; the global batch is
    ``batch_size * process_count``. ``num_epochs=None`` repeats forever."""

    paths: tuple[str, ...]
    max_length: int = 2048
    noise_low: float = 0.75
    noise_high: float = 0.75
    seed: int = 42
    shuffle: bool = True
    batch_size: int = 1
    num_epochs: int | None = 2
    oput_duplicate: bool = True
    oput_pair_in_batch: bool = False
    default_flag: bool | None = None
    eos_keep: int = 32
    skip_bad_rows: bool = False
    read_threads: int = 4
    prefetch_buffer: int = 8
    worker_count: int = 0

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))

        def bad(field: str, why: str) -> None:
            raise ValueError(f"DataConfig.{field}: {why}")

        if not self.paths:
            bad("paths", "no data files given")
        if self.max_length <= 0:
            bad("max_length", f"must be positive, got {self.max_length}")
        if not 0.0 <= self.noise_low <= self.noise_high <= 1.0:
            bad("noise_low/noise_high",
                f"need 0 <= low <= high <= 1, got {self.noise_low}, {self.noise_high}")
        if not 0 <= self.seed < 2**32:
            bad("seed", f"must be in [0, 2**32), got {self.seed}")
        if self.batch_size <= 0:
            bad("batch_size", f"must be positive, got {self.batch_size}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            bad("num_epochs", f"must be positive or None, got {self.num_epochs}")
        if self.oput_pair_in_batch and not self.oput_duplicate:
            bad("oput_pair_in_batch", "needs oput_duplicate=True (the pair is the flag True/False copies)")
        if self.oput_pair_in_batch and self.batch_size % 2:
            bad("batch_size", f"must be even with oput_pair_in_batch, got {self.batch_size}")
        if self.oput_duplicate and self.default_flag is not None:
            bad("default_flag", "is only used without oput_duplicate (duplication sets the flags)")
        if self.eos_keep < 0:
            bad("eos_keep", f"must be >= 0, got {self.eos_keep}")
        if self.read_threads < 0 or self.prefetch_buffer < 0 or self.worker_count < 0:
            bad("read_threads/prefetch_buffer/worker_count", "must be >= 0")


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files named by ``paths`` (glob patterns expand, sorted); every entry must match a file."""
    out: list[str] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"data path pattern {p!r} matches no file")
        for m in matches:
            if not os.path.isfile(m):
                raise FileNotFoundError(f"data file {m!r} does not exist (or is not a file)")
            if not m.endswith((".jsonl", ".parquet")):
                raise DataError(f"{m}: unsupported data file type (use .jsonl or .parquet)")
            out.append(m)
    return out


class RowStore:
    """Validated rows of jsonl/parquet files, read lazily by row index.

    Every file is scanned once at construction (each row parsed and checked) so that the row count —
    hence the index space — is known and identical on every process. Jsonl rows are re-read by byte
    offset (``os.pread``: thread-safe, nothing held open); parquet tables are kept in memory.
    """

    def __init__(self, paths: Sequence[str], *, mask_text: str | None, oput_duplicate: bool,
                 default_flag: bool | None, skip_bad_rows: bool):
        self.paths = expand_paths(paths)
        self._mask_text = mask_text
        self._oput_duplicate = oput_duplicate
        self._default_flag = default_flag
        self._skip = skip_bad_rows
        self.bad_rows = 0
        self.bad_row_messages: list[str] = []
        self._tables: dict[int, Any] = {}
        file_ids: list[int] = []
        locs: list[tuple[int, int]] = []
        flags: list[bool] = []
        for fid, path in enumerate(self.paths):
            rows = self._scan_parquet(fid, path) if path.endswith(".parquet") else self._scan_jsonl(path)
            for loc, flag in rows:
                file_ids.append(fid)
                locs.append(loc)
                flags.append(flag)
        if not locs:
            raise DataError(f"no valid rows in {', '.join(self.paths)} ({self.bad_rows} bad rows skipped)")
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._locs = np.asarray(locs, dtype=np.int64)
        self._flags = np.asarray(flags, dtype=bool)

    def __len__(self) -> int:
        return int(self._file_ids.shape[0])

    def _check(self, where: str, row: Any) -> bool | None:
        """Validate one parsed row: its OPUT flag, or None when skipped (raises unless skipping)."""
        try:
            row_messages(row, self._mask_text)
            flag = row.get("flag")
            if flag is not None and not isinstance(flag, bool):
                raise BadRow(f"'flag' must be true/false, got {flag!r}")
            if self._oput_duplicate and flag is not None:
                raise BadRow("row already has a 'flag' but oput_duplicate=True would emit it twice "
                             "(data already duplicated? set oput_duplicate=False)")
            if not self._oput_duplicate and flag is None:
                if self._default_flag is None:
                    raise BadRow("row has no 'flag' (set oput_duplicate=True or DataConfig.default_flag)")
                flag = self._default_flag
            return bool(flag)
        except BadRow as e:
            return self._bad(f"{where}: {e}")

    def _bad(self, message: str) -> None:
        if not self._skip:
            raise DataError(message)
        self.bad_rows += 1
        if len(self.bad_row_messages) < MAX_REPORTED_BAD_ROWS:
            self.bad_row_messages.append(message)
        return None

    def _scan_jsonl(self, path: str) -> list[tuple[tuple[int, int], bool]]:
        out = []
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():  # blank lines (e.g. at the end of a file) are not rows
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    self._bad(f"{path}:{lineno}: invalid JSON: {e}")
                    continue
                checked = self._check(f"{path}:{lineno}", row)
                if checked is not None:
                    out.append(((start, len(line)), checked))
        return out

    def _scan_parquet(self, fid: int, path: str) -> list[tuple[tuple[int, int], bool]]:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read parquet file: {e}") from e
        self._tables[fid] = table
        out = []
        index = 0
        for batch in table.to_batches():
            for row in batch.to_pylist():
                checked = self._check(f"{path}:row {index}", _drop_nulls(row))
                if checked is not None:
                    out.append(((index, 1), checked))
                index += 1
        return out

    def row(self, i: int) -> dict[str, Any]:
        """The parsed row ``i`` (of the valid rows, in file order)."""
        fid, (a, b) = int(self._file_ids[i]), self._locs[i]
        if fid in self._tables:
            return _drop_nulls(self._tables[fid].slice(int(a), 1).to_pylist()[0])
        fd = os.open(self.paths[fid], os.O_RDONLY)
        try:
            return json.loads(os.pread(fd, int(b), int(a)))
        finally:
            os.close(fd)

    def messages(self, i: int) -> list[dict[str, str]]:
        return row_messages(self.row(i))

    def describe(self, i: int) -> str:
        """Where valid row ``i`` lives, for messages: its file and (0-based) row among the valid ones."""
        return f"row {i} of the valid rows, in {self.paths[int(self._file_ids[i])]}"

    def flag(self, i: int) -> bool:
        return bool(self._flags[i])


def _drop_nulls(row: Mapping[str, Any]) -> dict[str, Any]:
    """Parquet rows carry every column; a null means the field is absent in that row."""
    return {k: v for k, v in row.items() if v is not None}


class _UnitToExamples(grain.transforms.Map):
    """``(unit, epoch)`` → the unit's examples stacked on a leading axis (1, or 2 in pair mode)."""

    def __init__(self, store: RowStore, transform: OputTransform, *, duplicate: bool, pairs: bool):
        self.store, self.transform = store, transform
        self.duplicate, self.pairs = duplicate, pairs

    def _example(self, k: int, epoch: int) -> dict[str, np.ndarray]:
        n = len(self.store)
        row = k % n if self.duplicate else k
        flag = (k < n) if self.duplicate else self.store.flag(row)
        return self.transform.map({"messages": self.store.messages(row), "flag": flag,
                                   "example_index": k, "epoch": epoch})

    def map(self, element: tuple[int, int]) -> dict[str, np.ndarray]:
        unit, epoch = int(element[0]), int(element[1])
        ks = (unit, unit + len(self.store)) if self.pairs else (unit,)
        examples = [self._example(k, epoch) for k in ks]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class _AttachEpoch:
    """``(global position, unit) -> (unit, epoch)``; a class (not a lambda) so worker processes can
    unpickle it."""

    def __init__(self, units_per_epoch: int):
        self.units_per_epoch = units_per_epoch

    def __call__(self, position: int, unit: int) -> tuple[int, int]:
        return int(unit), position // self.units_per_epoch


def _flatten_units(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``[B/u, u, ...]`` → ``[B, ...]`` (u = examples per unit)."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def _allow_grain_workers() -> None:
    """grain 0.2.x worker processes read an absl flag and crash when the program never parsed absl
    flags (google/grain#1355). Mark them parsed, keeping every default, unless already parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class TrainData:
    """The batched dataset plus what the training loop logs. ``iter(data)`` gives a
    ``grain.DatasetIterator`` whose ``get_state``/``set_state`` (or ``grain.checkpoint``) checkpoint
    the position exactly. The state's form depends on ``worker_count``: resume with the same value."""

    dataset: grain.IterDataset
    store: RowStore
    special: SpecialIds
    num_examples: int
    examples_per_epoch: int
    steps_per_epoch: int
    no_answer_rows: int = 0          # rows whose prompt fills max_length (data/coverage.py)

    @property
    def bad_rows(self) -> int:
        """Rows skipped with ``skip_bad_rows`` (their reasons: ``store.bad_row_messages``)."""
        return self.store.bad_rows

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def make_dataset(config: DataConfig, tokenizer: Any, *, process_index: int = 0, process_count: int = 1,
                 special_ids: SpecialIds | None = None) -> TrainData:
    """Build this process's batches (each ``[batch_size, …]``, keys per docs/internals.md).

    ``special_ids`` defaults to ``resolve_special_ids(None, tokenizer)``; pass the resolved ids of the
    model config to keep config and data in agreement.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    special = special_ids if special_ids is not None else resolve_special_ids(None, tokenizer)
    store = RowStore(config.paths, mask_text=mask_token_text(tokenizer, special.mask_id),
                     oput_duplicate=config.oput_duplicate, default_flag=config.default_flag,
                     skip_bad_rows=config.skip_bad_rows)
    n_rows = len(store)
    room = answer_room(store, tokenizer, config.max_length)
    if room.no_answer == n_rows:
        raise DataError(no_answer_error(room, config.max_length))
    num_examples = 2 * n_rows if config.oput_duplicate else n_rows
    per_unit = 2 if config.oput_pair_in_batch else 1
    num_units = num_examples // per_unit
    units_per_global_batch = config.batch_size * process_count // per_unit
    units_per_epoch = num_units // units_per_global_batch * units_per_global_batch
    if units_per_epoch == 0:
        raise DataError(f"{num_examples} examples are fewer than one global batch "
                        f"({config.batch_size} x {process_count} processes)")

    units = grain.MapDataset.range(num_units)
    if config.shuffle:
        units = units.shuffle(seed=config.seed)  # reshuffled per epoch (seed + epoch) after repeat
    units = units[:units_per_epoch].repeat(config.num_epochs)
    units = units.map_with_index(_AttachEpoch(units_per_epoch))
    units = units[process_index::process_count]

    transform = OputTransform(tokenizer, max_length=config.max_length, noise_low=config.noise_low,
                              noise_high=config.noise_high, seed=config.seed, special=special,
                              eos_keep=config.eos_keep)
    batches = (units.map(_UnitToExamples(store, transform, duplicate=config.oput_duplicate,
                                         pairs=config.oput_pair_in_batch))
               .batch(config.batch_size // per_unit, drop_remainder=True)
               .map(_flatten_units))
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                        prefetch_buffer_size=config.prefetch_buffer))
    if config.worker_count > 0:
        _allow_grain_workers()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
    return TrainData(dataset=dataset, store=store, special=special, num_examples=num_examples,
                     examples_per_epoch=units_per_epoch * per_unit,
                     steps_per_epoch=units_per_epoch // units_per_global_batch, no_answer_rows=room.no_answer)
