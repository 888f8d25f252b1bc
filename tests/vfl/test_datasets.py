"""The real data sets: bundled in data/ as .csv.gz, or in VFL_DATA_DIR (plain or gzip), and
checked against their sha256 list."""

from __future__ import annotations

import doctest
import gzip
import hashlib
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from protocols.errors import ConfigError, DataError
from vfl import datasets
from vfl.data.datasets import (
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    data_dir,
    find,
    read_bytes,
    verify,
    verify_all,
)
from vfl.data.ids import load_id_column
from vfl.data.tables import TableSpec, load_table

BUNDLED = REPO_ROOT / "data"
SHA_LINE = re.compile(r"^([0-9a-f]{64})\s+(\S+)$")


def listed(folder: Path) -> dict[str, str]:
    lines = (folder / "README.md").read_text(encoding="utf-8").splitlines()
    return {m.group(2): m.group(1) for m in map(SHA_LINE.match, lines) if m}


def test_default_and_env(tmp_path: Path) -> None:
    assert DEFAULT_DATA_DIR == BUNDLED
    assert data_dir({}) == DEFAULT_DATA_DIR
    assert data_dir({"VFL_DATA_DIR": str(tmp_path)}) == tmp_path.resolve()


def test_bundled_copy_matches_the_listed_checksums() -> None:
    """data/README.md lists the sha256 of each file's uncompressed content and of each .gz;
    the committed files match both, and the folder holds nothing else."""
    sums = listed(BUNDLED)
    content = {n: s for n, s in sums.items() if not n.endswith(".gz")}
    packed = {n: s for n, s in sums.items() if n.endswith(".gz")}
    assert len(content) == 11 and set(packed) == {f"{n}.gz" for n in content}
    files = {p.name for p in BUNDLED.iterdir()}
    assert files == set(packed) | {"README.md"}
    for name, digest in packed.items():
        raw = (BUNDLED / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == digest, name
        assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == content[name[:-3]], name


def test_bundled_copy_is_found_with_vfl_data_dir_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VFL_DATA_DIR", raising=False)
    folder = data_dir(os.environ)
    assert folder == BUNDLED
    files = verify_all(folder=folder)
    assert len(files) == 11
    assert all(f.path == BUNDLED / f"{f.name}.gz" for f in files)
    guest = next(f for f in files if f.name == "breast_hetero_guest.csv")
    assert guest.size == len(read_bytes(guest.path)) == 57913  # the uncompressed size
    frame = pd.read_csv(guest.path)
    assert frame.shape == (569, 12) and list(frame.columns[:2]) == ["id", "y"]


def test_real_files_verify() -> None:
    """The folder the other tests use ($VFL_DATA_DIR or the bundled one)."""
    files = verify_all(folder=data_dir(os.environ))
    assert len(files) == 11
    assert {f.name for f in files} >= {"default_credit_hetero_guest.csv", "breast_hetero_host.csv"}


def test_a_folder_of_plain_csv_files_works_too(tmp_path: Path) -> None:
    """VFL_DATA_DIR may hold the original .csv files; a plain file wins over a .gz."""
    shutil.copy(BUNDLED / "README.md", tmp_path / "README.md")
    gz = BUNDLED / "breast_hetero_host.csv.gz"
    (tmp_path / "breast_hetero_host.csv").write_bytes(gzip.decompress(gz.read_bytes()))
    plain = verify("breast_hetero_host.csv", folder=tmp_path)
    assert plain.path == tmp_path / "breast_hetero_host.csv"
    shutil.copy(gz, tmp_path)
    assert verify("breast_hetero_host.csv", folder=tmp_path) == plain
    (tmp_path / "breast_hetero_host.csv").unlink()
    packed = verify("breast_hetero_host.csv", folder=tmp_path)
    assert packed.path == tmp_path / gz.name
    assert (packed.sha256, packed.size) == (plain.sha256, plain.size)


def test_find_prefers_the_plain_name_and_falls_back_to_it(tmp_path: Path) -> None:
    assert find("a.csv", folder=tmp_path) == tmp_path / "a.csv"  # neither: the plain name
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(b"id\n1\n"))
    assert find("a.csv", folder=tmp_path) == tmp_path / "a.csv.gz"
    (tmp_path / "a.csv").write_text("id\n1\n")
    assert find("a.csv", folder=tmp_path) == tmp_path / "a.csv"
    assert find("a.csv.gz", folder=tmp_path) == tmp_path / "a.csv.gz"


def test_missing_folder_names_path_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        verify("breast_hetero_guest.csv", folder=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "VFL_DATA_DIR" in message
    assert "FATE" in message and str(BUNDLED) in message


def test_modified_and_missing_files_are_caught(tmp_path: Path) -> None:
    shutil.copy(BUNDLED / "README.md", tmp_path / "README.md")
    name = "breast_hetero_guest.csv"
    with pytest.raises(DataError, match="not found at") as info:
        verify(name, folder=tmp_path)
    assert str(tmp_path) in str(info.value) and f"{name}.gz" in str(info.value)
    original = read_bytes(BUNDLED / f"{name}.gz")
    (tmp_path / name).write_bytes(original[:-10])
    with pytest.raises(DataError, match="modified or truncated"):
        verify(name, folder=tmp_path)
    (tmp_path / name).unlink()
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(original.replace(b"0.", b"1.", 1)))
    with pytest.raises(DataError, match="modified or truncated"):
        verify(name, folder=tmp_path)
    (tmp_path / f"{name}.gz").write_bytes((BUNDLED / f"{name}.gz").read_bytes()[:-100])
    with pytest.raises(DataError, match="not a readable gzip file"):
        verify(name, folder=tmp_path)
    with pytest.raises(DataError, match="not one of the data sets"):
        verify("other.csv", folder=tmp_path)
    with pytest.raises(DataError, match="not one of the data sets"):
        verify(f"{name}.gz", folder=tmp_path)  # data sets are named by their CSV name


def test_a_party_table_reads_csv_gz_with_file_and_row_in_errors(tmp_path: Path) -> None:
    """A [data] table may name a .csv.gz: it loads like the CSV, and a bad value is reported
    with the file and the row, as for a plain CSV."""
    path = BUNDLED / "breast_hetero_guest.csv.gz"
    table = load_table(TableSpec(path=path, label_column="y"))
    assert len(table) == 569 and table.columns == tuple(f"x{i}" for i in range(10))
    bad = tmp_path / "bad.csv.gz"
    bad.write_bytes(gzip.compress(b"id,y,x0\n1,0,0.5\n2,1,oops\n"))
    with pytest.raises(DataError) as info:
        load_table(TableSpec(path=bad, label_column="y"))
    assert str(bad) in str(info.value) and "line 3, column 'x0'" in str(info.value)
    assert "oops" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "not gzip", "bad stream"])
def test_a_damaged_csv_gz_is_a_data_error(tmp_path: Path, damage: str) -> None:
    packed = (BUNDLED / "breast_hetero_guest.csv.gz").read_bytes()
    path = tmp_path / "guest.csv.gz"
    if damage == "bad stream":  # a valid gzip header, then a corrupt deflate stream (zlib.error)
        packed = packed[:20] + bytes(b ^ 0x5A for b in packed[20:400]) + packed[400:]
    path.write_bytes(packed[:20000] if damage == "truncated" else packed)
    if damage == "not gzip":
        path.write_bytes(b"id,y\n1,0\n")
    with pytest.raises(DataError, match="cannot be read") as info:
        load_table(TableSpec(path=path, label_column="y"))
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="cannot be read") as info:
        load_id_column(path, "id")
    assert info.value.public == "the data file of the alias cannot be read"


def test_fraud_is_the_credit_data_with_rare_positives_and_text_columns() -> None:
    """vfl.datasets.fraud: every negative kept, positives at the asked rate, the same ids at
    both parties, string band and ISO date columns, and the same frames for the same seed."""
    guest, host = datasets.fraud()
    credit_guest, _ = datasets.credit()
    negatives = int((credit_guest["y"] == 0).sum())
    assert int((guest["y"] == 0).sum()) == negatives == 23364
    assert abs(float(guest["y"].mean()) - 0.02) < 1e-4
    assert guest["id"].is_unique and guest["id"].tolist() == host["id"].tolist()
    assert set(guest["id"]) <= set(credit_guest["id"])
    assert list(guest.columns) == ["id", "y", *(f"x{i}" for i in range(13)), "bill_band", "opened"]
    assert list(host.columns) == ["id", *(f"x{i}" for i in range(10)), "age_band"]
    for frame, name in ((guest, "bill_band"), (guest, "opened"), (host, "age_band")):
        assert pd.api.types.is_string_dtype(frame[name]), name
    assert set(guest["bill_band"]) == {"none", "low", "mid", "high"}
    assert set(host["age_band"]) == {"18-25", "26-35", "36-45", "46-55", "56+"}
    opened = pd.to_datetime(guest["opened"], format="%Y-%m-%d")
    assert opened.max() < pd.Timestamp("2005-10-01") and opened.min() > pd.Timestamp("1940-01-01")
    assert all(pd.api.types.is_float_dtype(guest[f"x{i}"]) for i in range(13))

    again, _ = datasets.fraud()
    pd.testing.assert_frame_equal(guest, again)
    other, _ = datasets.fraud(seed=1)
    assert set(other["id"]) != set(guest["id"]) and len(other) == len(guest)
    more, more_host = datasets.fraud(positive_rate=0.1)
    assert abs(float(more["y"].mean()) - 0.1) < 1e-4 and len(more_host) == len(more)
    # a customer's opened date does not depend on the rate
    both = guest.merge(more, on="id", suffixes=("", "_more"))
    assert len(both) >= negatives and (both["opened"] == both["opened_more"]).all()
    for rate in (0.0, 0.5, -0.1):
        with pytest.raises(ConfigError, match="positive_rate"):
            datasets.fraud(positive_rate=rate)
    g, h = datasets.partial_overlap(guest, host, overlap=0.5, seed=2)
    assert len(set(g["id"]) & set(h["id"])) == round(0.5 * len(guest))
    assert g["id"].isin(guest["id"]).all()
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(datasets.fraud, globs={"fraud": datasets.fraud}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
