"""Demo silos: partial overlap, per-party id spelling that canonicalises equal, held-out rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocols.errors import ConfigError, DataError
from psi.canon import IdType, canonicalize, prepare_ids
from vfl.data.datasets import data_dir, find, read_bytes, verify
from vfl.data.demo_silos import (
    GUEST_FEATURES,
    GUEST_SOURCE,
    HOST_FEATURES,
    HOST_SOURCE,
    SiloFiles,
    build_silos,
    email_ids,
)
from vfl.data.ids import load_id_column
from vfl.data.tables import TableSpec, load_table

FOLDER = data_dir(os.environ)


@dataclass(frozen=True)
class Built:
    files: SiloFiles
    bank: pd.DataFrame
    retailer: pd.DataFrame
    new: pd.DataFrame
    labels: pd.DataFrame
    guest_src: pd.DataFrame  # indexed by canonical e-mail
    host_src: pd.DataFrame


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)


def _canon(ids: pd.Series) -> pd.Series:
    out = ids.map(lambda v: canonicalize(v, IdType.EMAIL))
    assert all(isinstance(v, str) for v in out), "every demo id must canonicalise"
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    verify(GUEST_SOURCE, folder=FOLDER)
    verify(HOST_SOURCE, folder=FOLDER)
    files = build_silos(data_dir=FOLDER, out=tmp_path_factory.mktemp("silos"), seed=7)
    guest_src = pd.read_csv(find(GUEST_SOURCE, folder=FOLDER))
    host_src = pd.read_csv(find(HOST_SOURCE, folder=FOLDER)).set_index("id").loc[guest_src["id"]]
    email = email_ids(guest_src["id"].to_numpy(), seed=7)
    return Built(
        files=files,
        bank=_read(files.bank),
        retailer=_read(files.retailer),
        new=_read(files.new_customers),
        labels=_read(files.new_labels),
        guest_src=guest_src.set_index(pd.Index(email)),
        host_src=host_src.set_index(pd.Index(email)),
    )


def test_counts(built: Built) -> None:
    f = built.files
    assert f.summary() == {
        "bank_rows": 25600,
        "retailer_rows": 24000,
        "shared": 20000,
        "bank_only": 5600,
        "retailer_only": 2400,
        "new_customers": 2000,
        "new_known_to_retailer": 1600,
    }
    assert len(built.bank) == f.bank_rows == f.shared + f.bank_only
    assert len(built.retailer) == f.retailer_rows
    assert f.retailer_rows == f.shared + f.retailer_only + f.new_known_to_retailer
    assert len(built.new) == len(built.labels) == f.new_customers_rows
    assert f.id_type is IdType.EMAIL


def test_overlaps_after_canonicalisation(built: Built) -> None:
    bank = set(_canon(built.bank["id"]))
    retailer = set(_canon(built.retailer["id"]))
    new = set(_canon(built.new["id"]))
    assert len(bank) == 25600 and len(retailer) == 24000 and len(new) == 2000
    assert len(bank & retailer) == 20000
    assert not new & bank  # new applicants are in no training row of the bank
    assert len(new & retailer) == 1600  # ... but the retailer knows 80% of them
    assert len(retailer - bank - new) == 2400


def test_psi_preparation_accepts_every_id(built: Built) -> None:
    for frame in (built.bank, built.retailer, built.new):
        prepared = prepare_ids(frame["id"].tolist(), id_type=IdType.EMAIL)
        assert len(prepared.canonical) == len(frame) and not prepared.rejected


def test_each_party_spells_ids_its_own_way(built: Built) -> None:
    bank = pd.Series(built.bank["id"].to_numpy(), index=_canon(built.bank["id"]))
    retailer = pd.Series(built.retailer["id"].to_numpy(), index=_canon(built.retailer["id"]))
    shared = bank.index.intersection(retailer.index)
    raw_bank, raw_retailer = bank.loc[shared], retailer.loc[shared].to_numpy()
    differ = (raw_bank.to_numpy() != raw_retailer).mean()
    assert 0.2 < differ < 1.0
    for raw in (raw_bank, pd.Series(raw_retailer)):
        assert (raw != raw.str.strip()).any()  # leading/trailing spaces or tabs
        assert raw.str.contains("\t").any()
        assert (raw.str.strip() != raw.str.strip().str.lower()).any()  # some upper case
        assert (raw == raw.str.lower()).any()


def test_rows_are_the_source_rows(built: Built) -> None:
    cols = list(GUEST_FEATURES)
    bank = built.bank.set_index(_canon(built.bank["id"]))
    src = built.guest_src.loc[bank.index]
    assert (bank["y"].to_numpy() == src["y"].to_numpy()).all()
    assert np.array_equal(bank[cols].to_numpy(), src[cols].to_numpy())
    retailer = built.retailer.set_index(_canon(built.retailer["id"]))
    host = built.host_src.loc[retailer.index]
    assert np.array_equal(retailer[list(HOST_FEATURES)].to_numpy(), host[list(HOST_FEATURES)])


def test_new_customers_have_no_label_and_labels_file_matches(built: Built) -> None:
    assert list(built.new.columns) == ["id", *GUEST_FEATURES]
    assert list(built.labels.columns) == ["id", "y"]
    assert built.labels["id"].tolist() == built.new["id"].tolist()
    src = built.guest_src.loc[_canon(built.new["id"])]
    assert (built.labels["y"].to_numpy() == src["y"].to_numpy()).all()
    assert np.array_equal(built.new[list(GUEST_FEATURES)].to_numpy(), src[list(GUEST_FEATURES)])
    assert set(np.unique(built.labels["y"])) == {0, 1}


def test_files_are_shuffled_independently(built: Built) -> None:
    bank = _canon(built.bank["id"])
    retailer = _canon(built.retailer["id"])
    shared = set(bank) & set(retailer)
    in_bank = [c for c in bank if c in shared]
    in_retailer = [c for c in retailer if c in shared]
    position = {c: i for i, c in enumerate(in_retailer)}
    ranks = np.array([position[c] for c in in_bank])
    assert abs(np.corrcoef(np.arange(len(ranks)), ranks)[0, 1]) < 0.05
    source_order = built.guest_src.index.get_indexer(bank)
    assert abs(np.corrcoef(np.arange(len(bank)), source_order)[0, 1]) < 0.05


def test_files_load_as_party_tables(built: Built) -> None:
    bank = load_table(TableSpec(path=built.files.bank, label_column="y"))
    retailer = load_table(TableSpec(path=built.files.retailer))
    new = load_table(TableSpec(path=built.files.new_customers))
    assert bank.features.shape == (25600, 13) and bank.labels is not None
    assert retailer.features.shape == (24000, 10) and retailer.labels is None
    assert new.features.shape == (2000, 13)
    ids, _ = load_id_column(built.files.retailer, "id")
    assert ids == built.retailer["id"].tolist()  # surrounding whitespace survives the CSV


def test_deterministic_for_a_seed(built: Built, tmp_path: Path) -> None:
    again = build_silos(data_dir=FOLDER, out=tmp_path / "again", seed=7)
    other = build_silos(data_dir=FOLDER, out=tmp_path / "other", seed=8)
    for name in ("bank", "retailer", "new_customers", "new_labels"):
        first = getattr(built.files, name).read_bytes()
        assert getattr(again, name).read_bytes() == first
        assert getattr(other, name).read_bytes() != first
    assert not list(tmp_path.rglob("*.tmp"))


def test_email_ids_are_unique_and_plain() -> None:
    ids = np.arange(1, 30001)
    emails = email_ids(ids, seed=3)
    assert len(set(emails)) == len(ids)
    assert all(e == e.lower() and e.split("@")[1].startswith("example.") for e in emails)
    assert list(email_ids(ids, seed=3)) == list(emails)
    assert list(email_ids(ids, seed=4)) != list(emails)
    with pytest.raises(DataError, match="unique"):
        email_ids(np.array([1, 1]), seed=0)


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        build_silos(data_dir=tmp_path, out=tmp_path / "out", seed=0)
    message = str(info.value)
    assert GUEST_SOURCE in message and "VFL_DATA_DIR" in message and "vfl data check" in message
    assert not (tmp_path / "out").exists()


def test_bad_sources_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / GUEST_SOURCE).write_text("id,y,x0\n1,0,0.5\n")
    (tmp_path / HOST_SOURCE).write_bytes(read_bytes(find(HOST_SOURCE, folder=FOLDER)))
    with pytest.raises(DataError, match="expected the header"):
        build_silos(data_dir=tmp_path, out=tmp_path / "out")
    header = ",".join(["id", "y", *GUEST_FEATURES])
    row = ",".join(["0"] * 14)
    (tmp_path / GUEST_SOURCE).write_text(f"{header}\nabc,{row}\n")
    with pytest.raises(DataError, match="not an integer id"):
        build_silos(data_dir=tmp_path, out=tmp_path / "out")
    (tmp_path / GUEST_SOURCE).write_text(f"{header}\n1,{row}\n")
    with pytest.raises(DataError, match="same ids"):
        build_silos(data_dir=tmp_path, out=tmp_path / "out")
    with pytest.raises(ConfigError, match="seed"):
        build_silos(data_dir=FOLDER, out=tmp_path / "out", seed=-1)


def test_demo_setup_from_a_relative_folder_names_real_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make demo` runs `vfl demo` with the relative default `.demo`: every party's data
    alias must still name an existing file (config paths resolve against the config's folder)."""
    from vfl.config import load_config
    from vfl.service.demo import fraud_setup

    monkeypatch.chdir(tmp_path)
    _, configs = fraud_setup(Path(".demo"), data_folder=FOLDER)
    for path in configs.values():
        config = load_config(path)
        assert all(p.is_file() for p in config.data.values()), config.data
    assert set(load_config(configs["bank"]).data) == {"customers", "new"}
