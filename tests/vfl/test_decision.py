"""Fraud metrics, calibration and the operating threshold fitted on validation rows."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from protocols.errors import ConfigError, DataError
from vfl.common.decision import Calibration, Decision, DecisionConfig, ThresholdRule
from vfl.common.metrics import binary_metrics, recall_at_fpr


def miscalibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ~12 % positives and scores that rank well but are far too confident."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * signal - 2.5)))).astype(np.int64)
    scores = 1 / (1 + np.exp(-(4.0 * signal + 1.0)))
    return y, scores


def test_binary_metrics_keep_the_old_keys_and_add_fraud_ones() -> None:
    y, p = miscalibrated(2000)
    m = binary_metrics(y, p)
    assert {"roc_auc", "ks", "average_precision", "log_loss", "accuracy"} <= set(m)
    assert m["pr_auc"] == m["average_precision"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert 0 < m["recall_at_fpr_1pct"] <= m["recall_at_fpr_5pct"] <= 1


def test_recall_at_fpr_is_the_best_achieved_roc_point() -> None:
    """No interpolation: the highest TPR among points with FPR <= target."""
    y = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    # thresholds: 0.9 -> (fpr 0, tpr 1/3); 0.8 -> (1/7, 1/3); 0.7 -> (1/7, 2/3)
    assert recall_at_fpr(y, p, target_fpr=0.1) == pytest.approx(1 / 3)
    assert recall_at_fpr(y, p, target_fpr=1 / 7) == pytest.approx(2 / 3)
    assert recall_at_fpr(y, p, target_fpr=0.3) == pytest.approx(2 / 3)
    assert recall_at_fpr(y, p, target_fpr=3 / 7) == pytest.approx(1.0)


def test_platt_keeps_the_ranking() -> None:
    y, p = miscalibrated(1500)
    decision = Decision.fit(DecisionConfig(), labels=y, scores=p)
    assert decision.params["slope"] > 0
    y2, p2 = miscalibrated(1500, seed=1)
    assert roc_auc_score(y2, decision.calibrate(p2)) == pytest.approx(roc_auc_score(y2, p2))


def test_isotonic_is_monotone() -> None:
    y, p = miscalibrated(1500)
    decision = Decision.fit(DecisionConfig(calibration=Calibration.ISOTONIC), labels=y, scores=p)
    grid = np.linspace(-0.5, 1.5, 2001)  # beyond both ends too: clipped
    out = decision.calibrate(np.clip(grid, 0, 1))
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("calibration", [Calibration.PLATT, Calibration.ISOTONIC])
def test_calibration_lowers_the_brier_score_on_other_rows(calibration: Calibration) -> None:
    y, p = miscalibrated(3000)
    decision = Decision.fit(DecisionConfig(calibration=calibration), labels=y, scores=p)
    y_new, p_new = miscalibrated(3000, seed=5)
    raw = brier_score_loss(y_new, p_new)
    calibrated = brier_score_loss(y_new, decision.calibrate(p_new))
    assert calibrated < 0.8 * raw


@pytest.mark.parametrize("calibration", list(Calibration))
@pytest.mark.parametrize("rule", list(ThresholdRule))
def test_json_round_trip_is_exact(calibration: Calibration, rule: ThresholdRule) -> None:
    y, p = miscalibrated(800)
    config = DecisionConfig(calibration=calibration, threshold=rule, target_fpr=0.02, beta=2.0)
    decision = Decision.fit(config, labels=y, scores=p)
    text = json.dumps(decision.to_json())
    back = Decision.from_json(json.loads(text))
    assert back == decision and json.dumps(back.to_json()) == text
    assert np.array_equal(back.decide(p), decision.decide(p))


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_fpr_threshold_is_the_smallest_within_the_target(target: float) -> None:
    y, p = miscalibrated(2000)
    config = DecisionConfig(target_fpr=target)
    decision = Decision.fit(config, labels=y, scores=p)
    c = decision.calibrate(p)
    flagged = decision.decide(p)
    fpr = flagged[y == 0].mean()
    assert fpr <= target and decision.validation["fpr"] == pytest.approx(fpr)
    assert decision.validation["recall"] == pytest.approx(flagged[y == 1].mean())
    below = c[c < decision.threshold]  # the next lower candidate would exceed the target
    if len(below):
        assert (c[y == 0] >= below.max()).mean() > target
    assert decision.target_fpr == target and decision.beta is None


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_f_beta_threshold_maximises_f_beta(beta: float) -> None:
    y, p = miscalibrated(1000)
    config = DecisionConfig(threshold=ThresholdRule.F_BETA, beta=beta)
    decision = Decision.fit(config, labels=y, scores=p)
    c = decision.calibrate(p)

    def f_beta(t: float) -> float:
        flagged = c >= t
        tp, fp = np.sum(flagged & (y == 1)), np.sum(flagged & (y == 0))
        fn = np.sum(y == 1) - tp
        return float((1 + beta**2) * tp / ((1 + beta**2) * tp + beta**2 * fn + fp))

    best = max(f_beta(t) for t in np.unique(c))
    assert f_beta(decision.threshold) == pytest.approx(best)
    assert decision.validation["f_beta"] == pytest.approx(best)
    assert decision.beta == beta and decision.target_fpr is None


def test_single_class_validation_rows_are_a_clear_error() -> None:
    with pytest.raises(DataError, match="only one class"):
        Decision.fit(DecisionConfig(), labels=np.zeros(50), scores=np.linspace(0, 1, 50))
    with pytest.raises(DataError, match="probabilities"):
        Decision.fit(DecisionConfig(), labels=np.arange(4) % 2, scores=np.array([0, 2, 1, 0]))
    with pytest.raises(DataError, match="3 scores for 4 labels"):
        Decision.fit(DecisionConfig(), labels=np.arange(4) % 2, scores=np.zeros(3))


def test_decision_config_parses_and_round_trips() -> None:
    where = "job.toml [decision]"
    config = DecisionConfig.parse(
        {"calibration": "isotonic", "threshold": "f_beta", "beta": 2}, where=where
    )
    assert config.calibration is Calibration.ISOTONIC and config.beta == 2.0
    assert DecisionConfig.parse(config.to_json(), where=where) == config
    assert DecisionConfig.parse({}, where=where) == DecisionConfig()
    assert json.loads(json.dumps(DecisionConfig().to_json())) == {
        "calibration": "platt",
        "threshold": "fpr",
        "target_fpr": 0.05,
        "beta": 1.0,
    }


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"calibrate": "platt"}, r"job.toml \[decision\]: unknown key\(s\) \['calibrate'\]"),
        ({"calibration": "beta"}, r"\[decision\]: calibration: .*none, platt, isotonic"),
        ({"threshold": "recall"}, r"\[decision\]: threshold: .*fpr, f_beta"),
        ({"target_fpr": 1.0}, r"\[decision\]: target_fpr: .*\(0, 1\)"),
        ({"target_fpr": "5%"}, r"\[decision\]: target_fpr: .*number"),
        ({"beta": 0}, r"\[decision\]: beta: .*> 0"),
        ({"beta": True}, r"\[decision\]: beta: .*number"),
    ],
)
def test_bad_decision_sections_name_where_and_key(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        DecisionConfig.parse(raw, where="job.toml [decision]")


@pytest.mark.parametrize(
    "change",
    [
        {"calibration": "sigmoid"},
        {"params": {"slope": 1.0}},
        {"params": {"slope": "1", "intercept": 0.0}},
        {"threshold": float("nan")},
        {"rule": "fpr", "target_fpr": None},
        {"validation": [1, 2]},
        {"extra": 1},
    ],
)
def test_malformed_decision_json_is_a_data_error(change: dict[str, Any]) -> None:
    y, p = miscalibrated(400)
    obj = {**Decision.fit(DecisionConfig(), labels=y, scores=p).to_json(), **change}
    with pytest.raises(DataError, match="malformed decision"):
        Decision.from_json(obj)
    iso = Decision.fit(DecisionConfig(calibration=Calibration.ISOTONIC), labels=y, scores=p)
    bad = iso.to_json()
    bad["params"]["y"] = list(reversed(bad["params"]["y"]))
    with pytest.raises(DataError, match="non-decreasing"):
        Decision.from_json(bad)
