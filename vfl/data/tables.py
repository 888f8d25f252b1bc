"""A party's own training table: loading, validation, alignment, splits.

Each party loads only its own file (CSV or Parquet) with pandas:

1. the id column and every feature column must exist (the error lists what does); the
   guest's label column too, and only the guest has one; which columns are features, and
   which hold categories or dates, says a :class:`~vfl.data.features.FeatureSpec`;
2. the checks of :mod:`vfl.data.checks`: ids are text, a row without one is not used;
   numbers must be numeric and finite (unless an imputation policy fills NaN/inf), dates
   must parse, labels be numbers or the job's classes; an error names the file, its line
   and the column, never the value;
3. preprocessing (:mod:`vfl.data.preprocess`: imputation, encodings, standard scaling) is
   fitted on training rows only and exported as plain JSON to be saved with the model;
4. the PSI result (this party's rows in the shared order) selects and orders the rows;
5. the guest holds out test rows (stratified) and takes validation rows from the
   training rows; the per-epoch batch order comes from a seeded CSPRNG (AES-CTR keyed by
   a 32-byte seed kept in the checkpoint), and the last partial batch is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from sklearn.model_selection import train_test_split

from protocols.errors import ConfigError, DataError
from vfl.data.checks import FRAME, Inspection, Origin, Severity, inspect_frame, read_file
from vfl.data.features import FeatureSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """Which file and columns make up a party's table.

    Parameters
    ----------
    path
        The CSV or Parquet file (a DataFrame's name in :func:`frame_table`).
    id_column
        The id column (always read as text).
    label_column
        The label column at the party holding labels, else None.
    features
        The feature columns and their encodings.
    label_like
        The job's label column's name: at a party without labels a column of this name is
        refused as a feature, unless ``features.feature_columns`` lists it.
    classes
        The label values (as text) in class order: ``classes[i]`` is label ``i``; None:
        labels must be numeric.
    binary_labels
        With ``classes`` None: labels must be 0 or 1.
    """

    path: Path
    id_column: str = "id"
    label_column: str | None = None
    features: FeatureSpec = FeatureSpec()
    label_like: str | None = None
    classes: tuple[str, ...] | None = None
    binary_labels: bool = False


@dataclass(frozen=True)
class PartyTable:
    """Validated rows: ids, features by kind, labels.

    ``features`` holds the numeric columns ``columns`` as float64 (NaN only where imputation
    will fill); ``text`` the categorical columns ``text_columns`` (None where missing);
    ``days`` the date columns ``date_columns`` as days since 1970-01-01 UTC (NaN where
    missing). Rows without an id (``ids[i] == ""`` after stripping; ``dropped_ids`` of
    them) keep their place, so PSI row numbers index this table, and hold only missing
    values. ``spec`` is the feature spec resolved: ``spec.feature_columns`` lists every
    feature column in order.
    """

    source: Path
    ids: np.ndarray
    columns: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray | None = None
    file_rows: np.ndarray | None = None  # each row's place in the file (None: in file order)
    text_columns: tuple[str, ...] = ()
    text: np.ndarray | None = None
    date_columns: tuple[str, ...] = ()
    days: np.ndarray | None = None
    spec: FeatureSpec = FeatureSpec()
    dropped_ids: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every feature column (numeric, categorical, date), in the spec's order."""
        if self.spec.feature_columns is not None:
            return self.spec.feature_columns
        return self.columns + self.text_columns + self.date_columns

    def id_rows(self) -> np.ndarray:
        """The rows that have an id (the others are never aligned, trained on or scored)."""
        return np.flatnonzero([bool(str(i).strip()) for i in self.ids])

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
            text=None if self.text is None else self.text[rows],
            days=None if self.days is None else self.days[rows],
        )


def load_table(spec: TableSpec) -> PartyTable:
    """Steps 1-2 of the module docstring: the table, or a :class:`DataError` naming its first
    problem (:func:`vfl.data.checks.check_table` lists them all)."""
    origin = Origin.of(spec.path)
    found = inspect_frame(read_file(spec), spec=spec, origin=origin)
    return _table(found, spec, origin, more="run `vfl data check`")


def frame_table(frame: pd.DataFrame, *, spec: TableSpec) -> PartyTable:
    """Steps 1-2 for rows already read (``spec.path`` names them in errors; rows are
    numbered by position from 0)."""
    return _table(inspect_frame(frame, spec=spec, origin=FRAME), spec, FRAME, more="")


def _table(found: Inspection, spec: TableSpec, origin: Origin, *, more: str) -> PartyTable:
    """The table ``found`` describes, or a :class:`DataError` for its first error (and how
    many more there are, with ``more`` said after them)."""
    errors = [f for f in found.findings if f.severity is Severity.ERROR]
    if errors or found.features is None or found.values is None:
        first, others = errors[0], len(errors) - 1
        plural = "s" if others > 1 else ""
        note = f" ({others} more problem{plural}{': ' + more if more else ''})" if others else ""
        raise DataError(first.located(str(spec.path), unit=origin.unit) + note, public=first.public)
    for warning in found.findings:
        logger.warning("%s", warning.located(str(spec.path), unit=origin.unit))
    dropped = int((~found.usable).sum())
    if dropped:
        logger.info("%s: %d rows have no id and are not used", spec.path, dropped)
    return PartyTable(
        source=spec.path,
        ids=found.ids,
        columns=found.numeric,
        features=found.values,
        labels=found.labels,
        text_columns=found.categorical,
        text=found.text,
        date_columns=found.dates,
        days=found.days,
        spec=found.features,
        dropped_ids=dropped,
    )


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
