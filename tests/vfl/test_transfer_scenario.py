"""The FTL benchmark scenario (disjoint id sets, no host labels) and the overlap-only baseline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from protocols.errors import ConfigError, DataError
from vfl.data.datasets import data_dir, find
from vfl.transfer.baseline import overlap_only_scores
from vfl.transfer.scenario import TransferScenario, build_scenario, write_scenario

FOLDER = data_dir(os.environ)
GUEST_COLUMNS = ["id", "y"] + [f"x{i}" for i in range(13)]
HOST_COLUMNS = ["id"] + [f"x{i}" for i in range(10)]


@pytest.fixture(scope="module")
def scenario() -> TransferScenario:
    return build_scenario(data_dir=FOLDER)


def test_sizes_and_disjoint_id_sets(scenario: TransferScenario) -> None:
    guest_ids = set(scenario.guest["id"])
    host_ids = set(scenario.host["id"])
    assert len(scenario.guest) == len(guest_ids) == 18_000
    assert len(scenario.host) == len(host_ids) == 15_000
    assert scenario.overlap == 3_000
    assert len(guest_ids & host_ids) == 3_000
    assert set(scenario.overlap_ids) == guest_ids & host_ids
    assert len(scenario.guest_only_ids) == 15_000 and len(scenario.host_only_ids) == 12_000
    assert not set(scenario.guest_only_ids) & set(scenario.host_only_ids)
    assert set(scenario.host_only_ids) == host_ids - guest_ids


def test_host_has_no_labels_and_truth_matches_source(scenario: TransferScenario) -> None:
    assert list(scenario.guest.columns) == GUEST_COLUMNS
    assert list(scenario.host.columns) == HOST_COLUMNS
    assert "y" not in scenario.host.columns
    assert list(scenario.host_labels.index) == list(scenario.host["id"])
    assert set(np.unique(scenario.host_labels)) == {0, 1}
    guest_y = scenario.guest.set_index("id")["y"]
    shared = scenario.overlap_ids
    assert (scenario.host_labels.loc[shared] == guest_y.loc[shared]).all()
    source = pd.read_csv(find("default_credit_hetero_guest.csv", folder=FOLDER), dtype={"id": str})
    truth = source.set_index("id")["y"].loc[scenario.host_only_ids[:200]]
    assert (scenario.host_labels.loc[scenario.host_only_ids[:200]] == truth).all()


def test_same_seed_same_scenario_other_seed_other_overlap(scenario: TransferScenario) -> None:
    again = build_scenario(data_dir=FOLDER)
    pd.testing.assert_frame_equal(again.guest, scenario.guest)
    pd.testing.assert_frame_equal(again.host, scenario.host)
    pd.testing.assert_series_equal(again.host_labels, scenario.host_labels)
    other = build_scenario(data_dir=FOLDER, seed=1)
    assert set(other.overlap_ids) != set(scenario.overlap_ids)


def test_small_overlap_fits_with_fewer_host_rows() -> None:
    small = build_scenario(data_dir=FOLDER, host_rows=12_300, overlap=300)
    assert len(small.overlap_ids) == 300 and len(small.host_only_ids) == 12_000


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"overlap": 300}, r"18000 \+ 15000 - 300 = 32700.*30000"),
        ({"overlap": 16_000}, r"overlap=16000.*host_rows=15000"),
        ({"guest_rows": -1}, r"guest_rows=-1"),
    ],
)
def test_bad_sizes_raise_config_error(kwargs: dict[str, int], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_scenario(data_dir=FOLDER, **kwargs)


def test_write_scenario(scenario: TransferScenario, tmp_path: Path) -> None:
    paths = write_scenario(scenario, tmp_path / "ftl")
    assert set(paths) == {"guest", "host", "host_truth"}
    guest = pd.read_csv(paths["guest"], dtype={"id": str})
    host = pd.read_csv(paths["host"], dtype={"id": str})
    truth = pd.read_csv(paths["host_truth"], dtype={"id": str})
    assert list(guest.columns) == GUEST_COLUMNS and len(guest) == 18_000
    assert list(host.columns) == HOST_COLUMNS and len(host) == 15_000
    assert list(truth.columns) == ["id", "y"]
    assert list(truth["id"]) == list(host["id"])
    assert (truth["y"].to_numpy() == scenario.host_labels.to_numpy()).all()
    np.testing.assert_allclose(host["x3"].to_numpy(), scenario.host["x3"].to_numpy())


def test_overlap_only_baseline_scores_host_only_customers(scenario: TransferScenario) -> None:
    host = scenario.host.set_index("id")
    shared, outside = scenario.overlap_ids, scenario.host_only_ids
    state = torch.random.get_rng_state()
    scores, info = overlap_only_scores(
        host_features_train=host.loc[shared].to_numpy(),
        labels_train=scenario.host_labels.loc[shared].to_numpy(),
        host_features_score=host.loc[outside].to_numpy(),
        max_epochs=5,
    )
    assert torch.equal(state, torch.random.get_rng_state())
    assert scores.shape == (12_000,) and ((scores > 0) & (scores < 1)).all()
    assert 1 <= int(info["epochs"]) <= 5 and 0.5 < float(info["best_val_auc"]) <= 1.0
    auc = roc_auc_score(scenario.host_labels.loc[outside].to_numpy(), scores)
    assert auc > 0.6


def test_overlap_only_baseline_is_deterministic_and_checks_inputs() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    score = rng.normal(size=(50, 4))
    args = {"host_features_train": x, "labels_train": y, "host_features_score": score}
    first, info = overlap_only_scores(**args, max_epochs=3)
    second, _ = overlap_only_scores(**args, max_epochs=3)
    np.testing.assert_array_equal(first, second)
    other, _ = overlap_only_scores(**args, max_epochs=3, seed=1)
    assert not np.array_equal(first, other)
    assert info["train_rows"] == 240 and info["validation_rows"] == 60
    with pytest.raises(ConfigError, match="validation_fraction"):
        overlap_only_scores(**args, validation_fraction=1.0)
    with pytest.raises(DataError, match="0/1"):
        overlap_only_scores(host_features_train=x, labels_train=y * 2, host_features_score=score)
    with pytest.raises(DataError, match="positives"):
        overlap_only_scores(
            host_features_train=x, labels_train=np.zeros(300), host_features_score=score
        )
    with pytest.raises(DataError, match="columns"):
        overlap_only_scores(host_features_train=x, labels_train=y, host_features_score=score[:, :3])
