"""Metrics the guest computes on its own labels (scikit-learn), per task."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from vfl.models.split import Task


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Ranking, fraud and probability metrics of scores ``p`` (probabilities) for labels ``y``.

    Keys: those of :func:`ranking_metrics`; ``brier`` (mean squared error of ``p`` as a
    probability, scikit-learn ``brier_score_loss``); ``log_loss``; ``accuracy`` (a score of at
    least 0.5 counts as the positive class).
    """
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return {
        **ranking_metrics(y, p),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p >= 0.5)),
    }


def ranking_metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """The metrics that depend only on the order of scores ``s`` (any scale) for labels ``y``.

    Keys: ``roc_auc``; ``ks``, ``max(TPR − FPR)`` over thresholds (the Kolmogorov–Smirnov
    distance between the score distributions of the two classes), the figure credit-risk
    teams report; ``pr_auc`` and ``average_precision`` (the same number: scikit-learn's
    average precision, the area under the precision–recall curve without interpolation);
    ``recall_at_fpr_1pct`` and ``recall_at_fpr_5pct`` (:func:`recall_at_fpr`).
    """
    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError("metrics need both classes among the evaluated rows")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ap = float(average_precision_score(y, s))
    return {
        "roc_auc": float(roc_auc_score(y, s)),
        "ks": float(np.max(tpr - fpr)),
        "pr_auc": ap,
        "average_precision": ap,
        "recall_at_fpr_1pct": _recall_at(fpr, tpr, 0.01),
        "recall_at_fpr_5pct": _recall_at(fpr, tpr, 0.05),
    }


def recall_at_fpr(y: np.ndarray, p: np.ndarray, *, target_fpr: float) -> float:
    """The highest true-positive rate among the ROC points whose false-positive rate is at
    most ``target_fpr``.

    No interpolation between ROC points: the figure is one that a threshold on ``p`` actually
    achieves on these rows (ties in ``p`` move together), so it can sit below the curve
    drawn through the points.
    """
    y = np.asarray(y).astype(int)
    fpr, tpr, _ = roc_curve(y, np.asarray(p, dtype=np.float64), drop_intermediate=False)
    return _recall_at(fpr, tpr, target_fpr)


def _recall_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    # roc_curve's first point is (0, 0), so some point always qualifies
    return float(np.max(tpr[fpr <= target + 1e-12]))


def task_metrics(task: Task, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Validation/test metrics for ``task`` (binary: :func:`binary_metrics`)."""
    if task is Task.BINARY:
        return binary_metrics(y, scores)
    if task is Task.MULTICLASS:
        labels = np.asarray(y).astype(int)
        probs = np.clip(scores, 1e-12, 1.0)
        probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rounding
        return {
            "accuracy": float(accuracy_score(labels, probs.argmax(axis=1))),
            "log_loss": float(log_loss(labels, probs, labels=list(range(probs.shape[1])))),
        }
    err = np.asarray(scores, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}


def selection_metric(task: Task) -> tuple[str, bool]:
    """The validation metric early stopping watches, and whether higher is better."""
    if task is Task.BINARY:
        return "roc_auc", True
    if task is Task.MULTICLASS:
        return "log_loss", False
    return "rmse", False
