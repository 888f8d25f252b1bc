"""The public API (vfl.fit_vertical and friends, vfl.datasets): PSI really aligns, predictions
run the protocol's computation, bad input fails early and clearly, plaintext needs its flag.

One plaintext split-NN fit on a partial overlap of breast (in this process, no worker pool)
serves the tests that need a model; the encrypted default runs in tests/vfl/test_quickstart.py.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import vfl
from protocols.errors import AlignmentError, ConfigError, DataError, InsecureConfigError
from protocols.executor import InlineExecutor
from vfl.common.decision import Calibration, Decision, DecisionConfig
from vfl.data.features import Encoding
from vfl.simulate import VerticalModel
from vfl.simulate.common import party_table
from vfl.splitnn.saved import load_model

OVERLAP = 0.6


@dataclass(frozen=True)
class Fitted:
    model: VerticalModel
    guest: pd.DataFrame
    host: pd.DataFrame
    warnings: list[str]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fitted() -> Iterator[Fitted]:
    guest, host = vfl.datasets.partial_overlap(*vfl.datasets.breast(), overlap=OVERLAP, seed=3)
    collect = Collect()
    logging.getLogger("vfl").addHandler(collect)
    try:
        model = vfl.fit_vertical(
            guest=guest,
            host=host,
            label="y",
            epochs=2,
            batch=32,
            plaintext=True,
            executor=InlineExecutor(),
            progress=False,
        )
    finally:
        logging.getLogger("vfl").removeHandler(collect)
    yield Fitted(model=model, guest=guest, host=host, warnings=collect.messages)


def test_partial_overlap_shuffles_and_keeps_the_asked_share() -> None:
    guest, host = vfl.datasets.breast()
    g, h = vfl.datasets.partial_overlap(guest, host, overlap=OVERLAP, seed=3)
    common = set(g["id"]) & set(h["id"])
    assert len(common) == round(OVERLAP * 569)
    assert len(g) > len(common) and len(h) > len(common)  # each also holds its own customers
    assert (g["id"].head(20).to_numpy() != h["id"].head(20).to_numpy()).any()  # rows shuffled


def test_psi_finds_the_intersection_and_training_uses_only_it(fitted: Fitted) -> None:
    model, guest, host = fitted.model, fitted.guest, fitted.host
    common = set(guest["id"]) & set(host["id"])
    assert model.psi.intersection == len(common) == round(OVERLAP * 569)
    assert (model.psi.guest_rows, model.psi.host_rows) == (len(guest), len(host))
    rows = model.rows
    assert rows.train + rows.validation + rows.test == len(common)
    assert set(model.test_scores["id"]) <= common
    assert model.evaluate()["roc_auc"] > 0.9


def test_predict_runs_the_protocols_forward_pass(fitted: Fitted, tmp_path: Path) -> None:
    """The held-out rows' scores from predict() equal those the guest computed through the
    protocol's evaluation (fixed point, within 1e-6), whatever the rows' order; a CSV path
    (here gzipped) works as well as a frame."""
    model, guest, host = fitted.model, fitted.guest, fitted.host
    held = model.test_scores
    rows = guest[guest["id"].isin(held["id"])].iloc[::-1]
    host.to_csv(tmp_path / "host.csv.gz", index=False)
    got = model.predict(guest=rows, host=tmp_path / "host.csv.gz", executor=InlineExecutor())
    assert list(got["id"]) == list(rows["id"])  # the guest's order
    want = held.set_index("id").loc[got["id"], "score"].to_numpy()
    np.testing.assert_allclose(got["score"].to_numpy(), want, atol=1e-6)
    assert model.evaluate(guest=rows, host=host)["roc_auc"] == pytest.approx(
        model.evaluate()["roc_auc"]
    )


def test_predict_scores_only_ids_both_parties_hold(
    fitted: Fitted, caplog: pytest.LogCaptureFixture
) -> None:
    model, guest, host = fitted.model, fitted.guest, fitted.host
    only_guest = guest[~guest["id"].isin(host["id"])].head(3)
    both = guest[guest["id"].isin(host["id"])].head(4)
    rows = pd.concat([only_guest.iloc[:1], both, only_guest.iloc[1:]])
    with caplog.at_level(logging.WARNING, logger="vfl.simulate"):
        got = model.predict(guest=rows, host=host, executor=InlineExecutor())
    assert list(got["id"]) == list(both["id"])
    assert got["score"].between(0, 1).all()
    assert "3 of the guest's 7 rows have no match at the host" in caplog.text


def test_plaintext_needs_its_explicit_flag_and_warns(fitted: Fitted) -> None:
    parameters = inspect.signature(vfl.fit_vertical).parameters
    assert parameters["plaintext"].default is False and "encrypted" not in parameters
    assert not fitted.model.encrypted and fitted.model.host.manifest["encrypted"] is False
    assert any("PLAINTEXT" in m for m in fitted.warnings)
    assert "PLAINTEXT" in repr(fitted.model)


def test_save_writes_each_partys_part_owner_only(fitted: Fitted, tmp_path: Path) -> None:
    model = fitted.model
    root = model.save(tmp_path / "model")
    for party in ("guest", "host"):
        folder = root / party / "models" / model.model_id
        assert load_model(root / party, model.model_id).manifest["role"] == party
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}
        assert folder.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ConfigError, match="exists already"):
        model.save(root)


def breast_copy() -> tuple[pd.DataFrame, pd.DataFrame]:
    guest, host = vfl.datasets.breast()
    return guest.copy(), host.copy()


def fit(guest: pd.DataFrame, host: pd.DataFrame, **changes: object) -> VerticalModel:
    arguments: dict[str, object] = {
        "guest": guest,
        "host": host,
        "label": "y",
        "plaintext": True,
        "executor": InlineExecutor(),
        "progress": False,
    }
    return vfl.fit_vertical(**(arguments | changes))  # type: ignore[arg-type]


def test_missing_columns_name_the_party_and_the_column() -> None:
    guest, host = breast_copy()
    with pytest.raises(DataError, match=r"the guest's data has no label column 'label'"):
        fit(guest, host, label="label")
    with pytest.raises(DataError, match=r"the host's data has no id column 'id'"):
        fit(guest, host.rename(columns={"id": "key"}))
    host["y"] = 0
    with pytest.raises(DataError, match="'y' has the name of the job's label column"):
        fit(guest, host)


def test_a_text_feature_names_its_column_and_row() -> None:
    guest, host = breast_copy()
    host["x4"] = host["x4"].astype(object)
    host.loc[7, "x4"] = "n/a"
    with pytest.raises(DataError, match=r"the host's data row 7, column 'x4': not a number"):
        fit(guest, host)


def test_a_duplicate_id_is_named_with_both_rows() -> None:
    guest, host = breast_copy()
    host.loc[9, "id"] = host.loc[2, "id"]
    with pytest.raises(DataError, match=rf"id '{host.loc[2, 'id']}' appears in rows 2 and 9"):
        fit(guest, host)


def test_labels_must_be_binary() -> None:
    guest, host = breast_copy()
    guest.loc[5, "y"] = 2
    with pytest.raises(DataError, match=r"row 5, column 'y': labels must be 0 or 1"):
        fit(guest, host)


def test_no_common_id_is_an_error_after_the_psi() -> None:
    guest, host = breast_copy()
    host["id"] = "other-" + host["id"]
    with pytest.raises(AlignmentError, match="^no shared customers"):
        fit(guest, host)


def test_settings_are_checked_before_any_work() -> None:
    guest, host = breast_copy()
    with pytest.raises(InsecureConfigError, match="allow_test_key"):
        fit(guest, host, plaintext=False, key_bits=1024)
    with pytest.raises(ConfigError, match="id_type 'mail' is not one of"):
        fit(guest, host, id_type="mail")
    with pytest.raises(ConfigError, match="give the label protection once"):
        fit(
            guest,
            host,
            protect=vfl.ProtectConfig(),
            model=vfl.TrainConfig(protect=vfl.ProtectConfig(power_scale=4.0)),
        )
    with pytest.raises(ConfigError, match="must be a pandas DataFrame or a CSV path"):
        fit(guest, [1, 2, 3])
    with pytest.raises(DataError, match="does not exist"):
        fit(guest, "no/such/host.csv")


def test_horizontal_input_errors() -> None:
    clients, _ = vfl.datasets.breast_horizontal()
    with pytest.raises(ConfigError, match="at least two clients"):
        vfl.fit_horizontal(clients={"guest": clients["guest"]}, label="y")
    with pytest.raises(ConfigError, match="client name"):
        vfl.fit_horizontal(clients={"guest": clients["guest"], "a b": clients["host"]}, label="y")
    narrow = clients["host"].drop(columns=["x3"])
    with pytest.raises(ConfigError, match="client host's feature columns .* differ"):
        vfl.fit_horizontal(clients={"guest": clients["guest"], "host": narrow}, label="y")


def test_the_package_exports_its_public_names_lazily() -> None:
    assert set(vfl.__all__) >= {"fit_vertical", "fit_horizontal", "fit_transfer", "datasets"}
    for name in vfl.__all__:
        assert getattr(vfl, name) is not None
    with pytest.raises(AttributeError):
        vfl.no_such_name  # noqa: B018


def test_the_same_seed_gives_the_same_model_bit_for_bit(fitted: Fitted) -> None:
    """docs/protocol.md §4.4.2: a second fit with the same seed (a new PSI, whose shared order
    is drawn afresh, new masks and shares) gives exactly the same test scores and history;
    another seed gives another model."""
    again = vfl.fit_vertical(
        guest=fitted.guest,
        host=fitted.host,
        label="y",
        epochs=2,
        batch=32,
        plaintext=True,
        executor=InlineExecutor(),
        progress=False,
    )
    first = fitted.model.test_scores.sort_values("id").reset_index(drop=True)
    second = again.test_scores.sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(first, second, check_exact=True)
    assert again.history == fitted.model.history
    other = vfl.fit_vertical(
        guest=fitted.guest,
        host=fitted.host,
        label="y",
        epochs=1,
        batch=32,
        plaintext=True,
        executor=InlineExecutor(),
        progress=False,
        seed=1,
    )
    assert set(other.test_scores["id"]) != set(first["id"])  # another split, too


# -- feature specs, classes and decisions ---------------------------------------------------


def with_text_columns(frame: pd.DataFrame, *, prefix: str) -> pd.DataFrame:
    """``frame`` with a categorical column ``<prefix>_band`` and a date ``<prefix>_since``
    derived from its first feature (ISO text, as a silo's export has them)."""
    values = frame["x0"].to_numpy()
    days = np.argsort(np.argsort(values)).astype("timedelta64[D]")
    return frame.assign(
        **{
            f"{prefix}_band": np.where(values > np.median(values), "high", "low"),
            f"{prefix}_since": np.datetime_as_string(np.datetime64("2020-01-01") + days),
        }
    )


@pytest.fixture(scope="module")
def encoded() -> tuple[VerticalModel, pd.DataFrame, pd.DataFrame]:
    guest, host = vfl.datasets.breast()
    guest = with_text_columns(guest, prefix="g")
    guest["y"] = np.where(guest["y"] == 1, "malignant", "benign")
    host = with_text_columns(host, prefix="h")
    model = vfl.fit_vertical(
        guest=guest,
        host=host,
        label="y",
        epochs=1,
        batch=32,
        plaintext=True,
        executor=InlineExecutor(),
        progress=False,
        guest_features={"categorical": ["g_band"], "date_columns": ["g_since"]},
        host_features=vfl.FeatureSpec(
            categorical=(("h_band", Encoding.ONEHOT),), date_columns=("h_since",)
        ),
        classes=["benign", "malignant"],
        decision=vfl.DecisionConfig(calibration=Calibration.ISOTONIC),
    )
    return model, guest, host


def test_categories_and_dates_are_encoded_at_each_party(
    encoded: tuple[VerticalModel, pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    """Each party's saved preprocessing has the one-hot and date-part columns; predict() on
    new rows (an unseen category, later dates, the host's as CSV) scores them the same way."""
    model, guest, host = encoded
    outputs = {
        "guest": model.guest.preprocessor.output_columns,
        "host": model.host.preprocessor.output_columns,
    }
    for party, prefix in (("guest", "g"), ("host", "h")):
        expected = {f"{prefix}_band={v}" for v in ("high", "low", "<other>")}
        expected |= {f"{prefix}_since:{part}" for part in ("age_days", "dow", "month")}
        assert expected <= set(outputs[party]), outputs[party]
        assert not any(c.startswith("g_" if prefix == "h" else "h_") for c in outputs[party])
    saved = load_model(model.save(tmp_path / "m") / "guest", model.model_id)
    assert saved.preprocessor.output_columns == outputs["guest"]
    new_guest = guest.head(12).assign(g_band="medium", g_since="2024-02-29")
    new_host = host.assign(h_since="2021-06-01")
    new_host.to_csv(tmp_path / "host.csv", index=False)
    got = model.predict(guest=new_guest, host=tmp_path / "host.csv", executor=InlineExecutor())
    assert list(got["id"]) == list(new_guest["id"])
    assert got["score"].between(0, 1).all() and got["probability"].between(0, 1).all()
    metrics = model.evaluate(guest=guest, host=host, executor=InlineExecutor())
    assert metrics["roc_auc"] > 0.9  # text labels read as the given classes


def test_the_decision_adds_calibrated_probabilities_and_flags(
    encoded: tuple[VerticalModel, pd.DataFrame, pd.DataFrame], fitted: Fitted
) -> None:
    model = encoded[0]
    assert model.decision is not None and model.decision.calibration is Calibration.ISOTONIC
    assert model.classes == ("benign", "malignant")
    scores = model.test_scores
    assert list(scores.columns) == ["id", "y", "score", "probability", "decision"]
    assert set(scores["y"]) == {0.0, 1.0}  # class indices
    np.testing.assert_array_equal(
        scores["decision"].to_numpy(), model.decision.decide(scores["score"].to_numpy())
    )
    assert {"brier", "pr_auc", "recall_at_fpr_5pct"} <= set(model.test_calibrated)
    validation = model.validation_scores  # what the guest fitted the decision on
    assert len(validation) == model.rows.validation
    assert not set(validation["id"]) & set(scores["id"])
    refit = Decision.fit(
        DecisionConfig(calibration=Calibration.ISOTONIC),
        labels=validation["y"].to_numpy(),
        scores=validation["score"].to_numpy(),
    )
    assert refit.to_json() == model.decision.to_json()
    default = fitted.model  # no decision= given: Platt scaling, the default
    assert default.decision is not None and default.decision.calibration is Calibration.PLATT
    assert {"probability", "decision"} <= set(default.test_scores.columns)


def test_feature_specs_and_classes_are_checked_before_any_work() -> None:
    guest, host = breast_copy()
    with pytest.raises(ConfigError, match="guest_features: unknown key 'categories'"):
        fit(guest, host, guest_features={"categories": ["x0"]})
    with pytest.raises(ConfigError, match="host_features must be a FeatureSpec"):
        fit(guest, host, host_features=["x0"])
    with pytest.raises(ConfigError, match="two different label values"):
        fit(guest, host, classes=["0"])
    with pytest.raises(ConfigError, match="the encoding must be one of"):
        vfl.FeatureSpec(categorical=(("x0", "hashing"),))  # type: ignore[arg-type]
    host["y"] = 0  # a host column named like the label: refused as a feature...
    with pytest.raises(DataError, match="'y' has the name of the job's label column"):
        fit(guest, host, host_features={"categorical": ["x1"]})
    for spec in (  # ... unless excluded, or listed because it is not the label
        vfl.FeatureSpec(exclude_columns=("y",)),
        vfl.FeatureSpec(feature_columns=("x0", "y")),
    ):
        table = party_table(
            host, side="host", id_column="id", label=None, features=spec, label_like="y"
        )
        assert ("y" in table.input_columns) == (spec.feature_columns is not None)
