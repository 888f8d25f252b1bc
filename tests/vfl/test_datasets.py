"""The real data sets are found through VFL_DATA_DIR and checked against their sha256 list."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protocols.errors import DataError
from vfl.data.datasets import DEFAULT_DATA_DIR, data_dir, verify, verify_all


def test_default_and_env(tmp_path: Path) -> None:
    assert data_dir({}) == DEFAULT_DATA_DIR
    assert data_dir({"VFL_DATA_DIR": str(tmp_path)}) == tmp_path.resolve()


def test_real_files_verify() -> None:
    files = verify_all(folder=data_dir({}))
    assert len(files) == 11
    assert {f.name for f in files} >= {"default_credit_hetero_guest.csv", "breast_hetero_host.csv"}


def test_missing_folder_names_path_and_source(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        verify("breast_hetero_guest.csv", folder=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value) and "VFL_DATA_DIR" in str(info.value)
    assert "FATE" in str(info.value)


def test_modified_and_missing_files_are_caught(tmp_path: Path) -> None:
    src = data_dir({})
    shutil.copy(src / "README.md", tmp_path / "README.md")
    with pytest.raises(DataError, match="not found at"):
        verify("breast_hetero_guest.csv", folder=tmp_path)
    (tmp_path / "breast_hetero_guest.csv").write_bytes(
        (src / "breast_hetero_guest.csv").read_bytes()[:-10]
    )
    with pytest.raises(DataError, match="modified or truncated"):
        verify("breast_hetero_guest.csv", folder=tmp_path)
    with pytest.raises(DataError, match="not one of the data sets"):
        verify("other.csv", folder=tmp_path)
