"""A party's own training table: loading, validation, preprocessing, alignment, splits.

Each party loads only its own file (CSV or Parquet) with pandas:

1. the id column and every feature column must exist (the error lists what does);
   the guest's label column too, and only the guest has one;
2. features must be numeric and finite: a text value, NaN or infinity is an error naming
   the file, row and column, unless an imputation policy fills NaN/inf (text is always an
   error); errors never quote the value itself;
3. preprocessing (imputation, standard scaling) is fitted on training rows only and
   exported as plain JSON to be saved with the model (never pickled);
4. the PSI result (this party's rows in the shared order) selects and orders the rows;
5. the guest holds out test rows (stratified) and takes validation rows from the
   training rows; the per-epoch batch order comes from a seeded CSPRNG (AES-CTR keyed by
   a 32-byte seed kept in the checkpoint), and the last partial batch is dropped.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from sklearn.model_selection import train_test_split

from protocols.errors import ConfigError, DataError


class ImputePolicy(StrEnum):
    """What to do with missing or infinite feature values."""

    ERROR = "error"
    MEAN = "mean"
    MEDIAN = "median"
    ZERO = "zero"


@dataclass(frozen=True)
class TableSpec:
    """Which file and columns make up a party's table."""

    path: Path
    id_column: str = "id"
    label_column: str | None = None
    feature_columns: tuple[str, ...] | None = None  # None: every other column
    impute: ImputePolicy = ImputePolicy.ERROR


@dataclass(frozen=True)
class PartyTable:
    """Validated rows: ids, float64 features (NaN only where imputation will fill), labels."""

    source: Path
    ids: np.ndarray
    columns: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray | None = None
    file_rows: np.ndarray | None = None  # each row's place in the file (None: in file order)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: np.ndarray) -> PartyTable:
        """These rows, in this order (e.g. the PSI's shared order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise DataError(f"{self.source}: row indices out of range for {len(self)} rows")
        return replace(
            self,
            ids=self.ids[rows],
            features=self.features[rows],
            labels=None if self.labels is None else self.labels[rows],
            file_rows=(np.arange(len(self)) if self.file_rows is None else self.file_rows)[rows],
        )


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path, keep_default_na=True)
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # a truncated/damaged .gz
        raise DataError(
            f"{path}: cannot be read as {path.suffix or 'CSV'} ({type(exc).__name__})"
        ) from None


def load_table(spec: TableSpec) -> PartyTable:
    """Steps 1-2 of the module docstring."""
    return frame_table(_read(spec.path), spec=spec)


def frame_table(frame: pd.DataFrame, *, spec: TableSpec) -> PartyTable:
    """Steps 1-2 for rows already read (``spec.path`` names them in errors)."""
    where = str(spec.path)
    available = list(frame.columns)
    needed = [spec.id_column] + ([spec.label_column] if spec.label_column else [])
    features = (
        list(spec.feature_columns)
        if spec.feature_columns is not None
        else [c for c in available if c not in needed]
    )
    for column in needed + features:
        if column not in frame.columns:
            raise DataError(f"{where}: no column {column!r}; the file has {available}")
    if not features:
        raise DataError(f"{where}: no feature columns besides {needed}")
    ids = frame[spec.id_column]
    if ids.isna().any():
        raise DataError(f"{where} row {_first(ids.isna())}, column {spec.id_column!r}: missing id")
    values = np.empty((len(frame), len(features)), dtype=np.float64)
    for j, column in enumerate(features):
        raw = frame[column]
        numeric = pd.to_numeric(raw, errors="coerce")
        text = numeric.isna() & raw.notna()
        if text.any():
            raise DataError(
                f"{where} row {_first(text)}, column {column!r}: not a number; fix the file or "
                "drop the column from the feature list"
            )
        values[:, j] = numeric.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any() and spec.impute is ImputePolicy.ERROR:
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{where} row {row}, column {features[col]!r}: missing or infinite value; fix the "
            "file or configure an imputation policy (mean, median, zero)"
        )
    values[bad] = np.nan  # imputed by the preprocessor, from training rows only
    labels = None
    if spec.label_column:
        numeric = pd.to_numeric(frame[spec.label_column], errors="coerce").to_numpy(
            dtype=np.float64
        )
        if not np.isfinite(numeric).all():
            row = int(np.argwhere(~np.isfinite(numeric))[0][0])
            raise DataError(
                f"{where} row {row}, column {spec.label_column!r}: missing or non-numeric label"
            )
        labels = numeric
    return PartyTable(
        source=spec.path,
        ids=ids.astype(str).to_numpy(),
        columns=tuple(features),
        features=values,
        labels=labels,
    )


def _first(mask: pd.Series) -> int:
    return int(np.argmax(mask.to_numpy()))


@dataclass(frozen=True)
class Preprocessor:
    """Imputation and standard scaling, fitted on training rows only (step 3)."""

    columns: tuple[str, ...]
    fill: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]

    @classmethod
    def fit(cls, table: PartyTable, rows: np.ndarray, *, impute: ImputePolicy) -> Preprocessor:
        """Learn fill values, means and scales from ``rows`` of ``table``."""
        x = table.features[np.asarray(rows, dtype=np.int64)]
        if not len(x):
            raise ConfigError("cannot fit preprocessing on zero training rows")
        with np.errstate(all="ignore"):
            if impute is ImputePolicy.MEDIAN:
                fill = np.nanmedian(x, axis=0)
            elif impute is ImputePolicy.ZERO:
                fill = np.zeros(x.shape[1])
            else:
                fill = np.nanmean(x, axis=0)
        fill = np.where(np.isfinite(fill), fill, 0.0)
        filled = np.where(np.isnan(x), fill, x)
        mean = filled.mean(axis=0)
        scale = filled.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        return cls(
            columns=table.columns,
            fill=tuple(map(float, fill)),
            mean=tuple(map(float, mean)),
            scale=tuple(map(float, scale)),
        )

    def transform(self, table: PartyTable) -> np.ndarray:
        """Impute and scale every row of ``table``."""
        if table.columns != self.columns:
            raise DataError(
                f"{table.source}: columns {table.columns} differ from the model's {self.columns}"
            )
        fill = np.array(self.fill)
        x = np.where(np.isnan(table.features), fill, table.features)
        out: np.ndarray = (x - np.array(self.mean)) / np.array(self.scale)
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain JSON to save with the model."""
        return {
            "columns": list(self.columns),
            "fill": list(self.fill),
            "mean": list(self.mean),
            "scale": list(self.scale),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Preprocessor:
        """Read what :meth:`to_json` wrote, checking its shape."""
        try:
            out = cls(
                columns=tuple(str(c) for c in obj["columns"]),
                fill=tuple(float(v) for v in obj["fill"]),
                mean=tuple(float(v) for v in obj["mean"]),
                scale=tuple(float(v) for v in obj["scale"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"preprocessing parameters are malformed: {exc}") from None
        if not len(out.columns) == len(out.fill) == len(out.mean) == len(out.scale):
            raise DataError("preprocessing parameters have inconsistent lengths")
        return out


@dataclass(frozen=True)
class Splits:
    """Guest-side row indices (into the aligned table) for training, validation and test."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_rows(
    labels: np.ndarray,
    *,
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    stratified: bool = True,
    file_rows: np.ndarray | None = None,
    shuffle: bytes | None = None,
) -> Splits:
    """Stratified test hold-out, then validation rows taken from the training rows (step 5).

    ``stratified = False`` splits without looking at the labels: the split the host learns
    (``FIT_ROWS``, ``BATCH``, ``EVAL_BATCH``) then depends on no label, as ``rr_labels``'
    ε-label-DP needs (docs/protocol.md §4.7.2).

    ``file_rows`` (each aligned row's line in the party's own file) makes the split a
    function of the customers, not of the PSI's order, which every PSI draws afresh: the
    rows are split in file order, and each split lists its rows in an order keyed by the
    32-byte ``shuffle`` (so what the host is sent shows nothing of the guest's file order).
    Together with the job's seed this reruns a job bit for bit (docs/protocol.md §4.4.2).
    Without ``file_rows`` each split is sorted.
    """
    if not (0 < test_fraction < 1 and 0 <= validation_fraction < 1):
        raise ConfigError("test_fraction must lie in (0, 1) and validation_fraction in [0, 1)")
    order = np.arange(len(labels))
    if file_rows is not None:
        if len(file_rows) != len(labels) or shuffle is None:
            raise ConfigError("file_rows needs one line per row, and a shuffle key")
        order = np.argsort(np.asarray(file_rows), kind="stable")
    ordered = np.asarray(labels)[order]
    rows = np.arange(len(ordered))
    stratify = ordered if stratified and len(np.unique(ordered)) <= 20 else None
    train, test = train_test_split(
        rows, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    validation = np.array([], dtype=np.int64)
    if validation_fraction > 0:
        inner = ordered[train] if stratify is not None else None
        train, validation = train_test_split(
            train, test_size=validation_fraction, random_state=seed, stratify=inner
        )
    parts = [order[np.sort(part)] for part in (train, validation, test)]
    if file_rows is not None and shuffle is not None:
        parts = [_keyed(part, shuffle, what) for part, what in zip(parts, range(3), strict=True)]
    else:
        parts = [np.sort(part) for part in parts]
    return Splits(train=parts[0], validation=parts[1], test=parts[2])


def _keyed(rows: np.ndarray, key: bytes, which: int) -> np.ndarray:
    """``rows`` in an order drawn from ``key`` (AES-256-CTR, the split ``which`` as nonce)."""
    stream = Cipher(algorithms.AES(key), modes.CTR(which.to_bytes(16, "big"))).encryptor()
    keys = np.frombuffer(stream.update(bytes(8 * len(rows))), dtype="<u8")
    return rows[np.argsort(keys, kind="stable")]


class BatchOrder:
    """The guest's per-epoch batch order from a 32-byte seed (AES-256-CTR keystream)."""

    def __init__(self, seed: bytes, *, batch_size: int) -> None:
        if len(seed) != 32:
            raise ConfigError("the batch-order seed must be 32 bytes")
        if batch_size < 1:
            raise ConfigError("batch_size must be positive")
        self.seed = seed
        self.batch_size = batch_size

    def epoch(self, rows: np.ndarray, epoch: int) -> list[np.ndarray]:
        """Shuffled full batches of ``rows`` for ``epoch`` (the last partial batch is dropped)."""
        nonce = epoch.to_bytes(16, "big")
        stream = Cipher(algorithms.AES(self.seed), modes.CTR(nonce)).encryptor()
        keys = np.frombuffer(stream.update(bytes(8 * len(rows))), dtype="<u8")
        order = np.asarray(rows)[np.argsort(keys, kind="stable")]
        full = len(order) // self.batch_size
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(full)]
