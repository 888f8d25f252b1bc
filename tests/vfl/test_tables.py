"""A party's table: validation errors, preprocessing on training rows, splits, batch order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocols.errors import DataError
from vfl.data.datasets import data_dir, verify
from vfl.data.features import FeatureSpec, ImputePolicy
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import (
    BatchOrder,
    TableSpec,
    load_table,
    split_rows,
)

FOLDER = data_dir(os.environ)


def guest_spec() -> TableSpec:
    return TableSpec(
        path=verify("default_credit_hetero_guest.csv", folder=FOLDER).path, label_column="y"
    )


def test_real_tables_load() -> None:
    guest = load_table(guest_spec())
    host = load_table(TableSpec(path=verify("default_credit_hetero_host.csv", folder=FOLDER).path))
    assert guest.features.shape == (30000, 13) and guest.labels is not None
    assert set(np.unique(guest.labels)) == {0.0, 1.0}
    assert host.features.shape == (30000, 10) and host.labels is None
    assert guest.columns[0] == "x0" and "y" not in guest.columns


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "t.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "y": [0, 1, 0, 1],
            "x0": [1.0, 2.0, 3.0, 4.0],
            "x1": [5, 6, 7, 8],
        }
    )


def test_errors_name_file_row_and_column_never_the_value(tmp_path: Path) -> None:
    bad = frame().astype({"x1": object})
    bad.loc[2, "x1"] = "secret-text"
    path = write(tmp_path, bad)
    with pytest.raises(DataError) as info:
        load_table(TableSpec(path=path, label_column="y"))
    message = str(info.value)
    assert (
        str(path) in message
        and "line 4" in message  # data row 2, after the header line
        and "'x1'" in message
        and "secret" not in message
    )


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_missing_and_infinite_values(tmp_path: Path, value: float) -> None:
    bad = frame()
    bad.loc[1, "x0"] = value
    path = write(tmp_path, bad, "t.parquet")
    with pytest.raises(DataError, match=r"row 2, column 'x0': missing or infinite"):
        load_table(TableSpec(path=path, label_column="y"))  # Parquet: rows count from 1
    median = FeatureSpec(impute=ImputePolicy.MEDIAN)
    table = load_table(TableSpec(path=path, label_column="y", features=median))
    pre = Preprocessor.fit(table, np.array([0, 1, 2]))
    assert pre.fill[0] == 2.0  # median of rows 0 and 2 (row 1 missing; row 3 not a training row)
    assert np.isfinite(pre.transform(table)).all()


def test_missing_columns_and_files(tmp_path: Path) -> None:
    path = write(tmp_path, frame())
    with pytest.raises(
        DataError, match=r"no column 'label'; the file has \['id', 'y', 'x0', 'x1'\]"
    ):
        load_table(TableSpec(path=path, label_column="label"))
    with pytest.raises(DataError, match="does not exist"):
        load_table(TableSpec(path=tmp_path / "none.csv"))
    missing_label = frame()
    missing_label.loc[3, "y"] = np.nan
    with pytest.raises(DataError, match="line 5, column 'y': missing or non-numeric label"):
        load_table(TableSpec(path=write(tmp_path, missing_label, "l.csv"), label_column="y"))


def test_preprocessing_uses_training_rows_only_and_round_trips() -> None:
    table = load_table(guest_spec())
    splits = split_rows(table.labels, test_fraction=0.2, validation_fraction=0.1, seed=0)  # type: ignore[arg-type]
    pre = Preprocessor.fit(table, splits.train)
    x = pre.transform(table)
    assert np.allclose(x[splits.train].mean(axis=0), 0, atol=1e-9)
    assert not np.allclose(x[splits.test].mean(axis=0), 0, atol=1e-9)  # test rows did not shape it
    again = Preprocessor.from_json(pre.to_json())
    assert again == pre
    with pytest.raises(DataError, match="malformed"):
        Preprocessor.from_json({"columns": []})


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    labels = load_table(guest_spec()).labels
    assert labels is not None
    s = split_rows(labels, test_fraction=0.2, validation_fraction=0.1, seed=0)
    assert len(s.test) == 6000 and len(s.validation) == 2400 and len(s.train) == 21600
    assert not (set(s.test) & set(s.train)) and not (set(s.validation) & set(s.train))
    assert abs(labels[s.test].mean() - labels.mean()) < 0.002
    assert (
        split_rows(labels, test_fraction=0.2, validation_fraction=0.1, seed=0).test == s.test
    ).all()


def test_alignment_takes_rows_in_the_shared_order() -> None:
    table = load_table(guest_spec())
    aligned = table.take(np.array([5, 2, 9]))
    assert aligned.ids.tolist() == [table.ids[5], table.ids[2], table.ids[9]]
    assert (aligned.features[1] == table.features[2]).all()
    with pytest.raises(DataError, match="out of range"):
        table.take(np.array([30000]))


def test_batch_order() -> None:
    order = BatchOrder(bytes(range(32)), batch_size=4)
    rows = np.arange(10, 21)  # 11 rows: two full batches, 3 dropped
    e0, e0_again, e1 = order.epoch(rows, 0), order.epoch(rows, 0), order.epoch(rows, 1)
    assert [b.tolist() for b in e0] == [b.tolist() for b in e0_again]  # reproducible from the seed
    assert len(e0) == 2 and all(len(b) == 4 for b in e0)
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    assert len(set(np.concatenate(e0))) == 8 and set(np.concatenate(e0)) <= set(rows)
    assert [b.tolist() for b in BatchOrder(bytes(32), batch_size=4).epoch(rows, 0)] != [
        b.tolist() for b in e0
    ]
