"""Reports: report.json with the test metrics and decision, ROC, PR, calibration and loss PNGs,
test_scores.csv and scores.csv, clear input errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from protocols.errors import DataError
from vfl.common.decision import Calibration, Decision, DecisionConfig
from vfl.common.metrics import binary_metrics
from vfl.report import ReportFiles, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    joint = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(size=n))))
    guest = 1 / (1 + np.exp(-(0.8 * y - 0.4 + rng.normal(size=n))))
    return y, joint, guest


def _history(epochs: int = 4, *, validation: bool = True) -> list[dict[str, Any]]:
    """Entries shaped like the split-NN session's (``_validate``)."""
    out: list[dict[str, Any]] = []
    for e in range(epochs):
        entry: dict[str, Any] = {}
        if validation:
            entry.update(
                roc_auc=0.70 + 0.01 * e,
                ks=0.30 + 0.01 * e,
                average_precision=0.45 + 0.01 * e,
                log_loss=0.48 - 0.01 * e,
            )
        entry.update(train_loss=0.52 - 0.02 * e, epoch=e)
        out.append(entry)
    return out


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_full_report(tmp_path: Path) -> None:
    y, joint, guest = _data()
    scores = pd.DataFrame({"id": ["a@example.com", "b@example.com"], "score": [0.1, 0.9]})
    files = write_report(
        tmp_path / "report",
        summary={"job_id": "job-1", "best_epoch": np.int64(2), "rows": np.int64(400)},
        test_labels=y,
        test_scores=joint,
        history=_history(),
        scores=scores,
        guest_only_scores=guest,
    )
    assert isinstance(files, ReportFiles)
    assert files.report.name == "report.json" and files.scores is not None
    body = json.loads(files.report.read_text())
    assert body["job_id"] == "job-1" and body["best_epoch"] == 2 and body["rows"] == 400
    assert body["test_auc"] == roc_auc_score(y, joint)
    assert body["guest_only_test_auc"] == roc_auc_score(y, guest)
    assert files.report.read_text().startswith("{\n  ")  # pretty-printed
    assert body["metrics"]["joint"] == binary_metrics(y, joint)
    assert body["metrics"]["guest_only"]["roc_auc"] == body["guest_only_test_auc"]
    assert "calibrated" not in body["metrics"] and "decision" not in body
    assert files.pr is not None and files.calibration is not None
    for png in (files.roc, files.loss, files.pr, files.calibration):
        width, height = _png_size(png)
        assert width > 300 and height > 300 and png.stat().st_size > 10_000
    assert pd.read_csv(files.scores).equals(scores)
    assert files.test_scores is not None
    table = pd.read_csv(files.test_scores)
    assert list(table.columns) == ["label", "score"] and np.allclose(table["score"], joint)
    assert not list(tmp_path.rglob("*.tmp"))
    folder = files.report.parent
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}
    assert sorted(p.name for p in folder.iterdir()) == [
        "calibration.png",
        "loss.png",
        "pr.png",
        "report.json",
        "roc.png",
        "scores.csv",
        "test_scores.csv",
    ]


def test_report_with_ids_and_a_decision(tmp_path: Path) -> None:
    """The decision's calibrated probabilities and decisions per test row, its threshold and
    validation figures and the calibrated test metrics in report.json."""
    y, joint, _ = _data()
    rng = np.random.default_rng(1)
    val_y = rng.integers(0, 2, 300)
    val_scores = 1 / (1 + np.exp(-(2.0 * val_y - 1 + rng.normal(size=300))))
    decision = Decision.fit(
        DecisionConfig(calibration=Calibration.ISOTONIC), labels=val_y, scores=val_scores
    )
    ids = [f"c{i}@example.com" for i in range(len(y))]
    files = write_report(
        tmp_path,
        summary={},
        test_labels=y,
        test_scores=joint,
        history=_history(),
        ids=ids,
        decision=decision,
    )
    assert files.test_scores is not None
    table = pd.read_csv(files.test_scores)
    assert list(table.columns) == ["id", "label", "score", "probability", "decision"]
    assert table["id"].tolist() == ids and table["label"].tolist() == y.tolist()
    assert np.allclose(table["probability"], decision.calibrate(joint))
    assert table["decision"].tolist() == decision.decide(joint).astype(int).tolist()
    body = json.loads(files.report.read_text())
    assert Decision.from_json(body["decision"]) == decision
    assert body["decision"]["validation"]["fpr"] <= 0.05
    assert body["metrics"]["calibrated"] == binary_metrics(y, decision.calibrate(joint))
    flagged = decision.decide(joint)
    assert body["decision_test"]["flagged"] == int(flagged.sum())
    assert body["decision_test"]["recall"] == pytest.approx(flagged[y == 1].mean())


def test_logit_scores_get_ranking_metrics_only(tmp_path: Path) -> None:
    """Scores outside [0, 1] (the transfer driver's logits) are ranked, not calibrated."""
    y, joint, _ = _data()
    logits = np.log(joint / (1 - joint))
    files = write_report(
        tmp_path, summary={}, test_labels=y, test_scores=logits, history=_history(1)
    )
    metrics = json.loads(files.report.read_text())["metrics"]["joint"]
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y, joint))
    assert "pr_auc" in metrics and "brier" not in metrics and "log_loss" not in metrics
    assert files.calibration is not None and _png_size(files.calibration)[0] > 300


def test_minimal_report_without_validation_rows(tmp_path: Path) -> None:
    y, joint, _ = _data()
    files = write_report(
        tmp_path,
        summary={"test_auc": "replaced"},
        test_labels=y.astype(float).reshape(-1, 1),
        test_scores=joint.reshape(-1, 1).astype(np.float32),
        history=_history(1, validation=False),
    )
    assert files.scores is None and not (tmp_path / "scores.csv").exists()
    body = json.loads(files.report.read_text())
    assert body["test_auc"] == pytest.approx(roc_auc_score(y, joint.astype(np.float32)))
    assert "guest_only_test_auc" not in body
    assert _png_size(files.loss)[0] > 300


def _call(out: Path, **changes: Any) -> ReportFiles:
    y, joint, guest = _data()
    kwargs: dict[str, Any] = {
        "summary": {},
        "test_labels": y,
        "test_scores": joint,
        "history": _history(),
        "guest_only_scores": guest,
    }
    kwargs.update(changes)
    return write_report(out, **kwargs)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"test_scores": np.zeros(399)}, "test_scores has 399 values but test_labels has 400"),
        ({"guest_only_scores": np.zeros(10)}, "guest_only_scores has 10 values"),
        ({"test_labels": np.full(400, 2)}, "binary"),
        ({"test_labels": np.zeros(400)}, "only one class"),
        ({"test_labels": np.zeros((0,))}, "non-empty 1-D"),
        ({"test_scores": np.full(400, np.nan)}, "row 0: missing or infinite score"),
        ({"test_scores": np.zeros((400, 2))}, "1-D array of scores"),
        ({"history": []}, "history is empty"),
        ({"history": [{"epoch": 0, "roc_auc": 0.7}]}, "no 'train_loss'"),
        ({"history": [{"epoch": 0, "train_loss": "0.5"}]}, "key 'train_loss': not a number"),
        ({"summary": {"x": float("nan")}}, "NaN or infinite"),
        ({"summary": {"x": object()}}, "not JSON-serialisable"),
        ({"scores": [1, 2]}, "must be a pandas DataFrame"),
        ({"ids": ["a", "b"]}, "ids has 2 values but test_labels has 400"),
        ({"calibrated": np.full(400, 1.5)}, "calibrated must hold probabilities"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    out = tmp_path / "report"
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        _call(out, **changes)
    assert not out.exists()  # validated before anything is written


def test_error_messages_do_not_quote_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _call(tmp_path, history=[{"epoch": 0, "train_loss": "secret-value"}])
    assert "secret-value" not in str(info.value)
