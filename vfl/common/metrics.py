"""Metrics the guest computes on its own labels (scikit-learn), per task."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from vfl.models.split import Task


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC, KS, average precision, log loss and accuracy of scores ``p`` for labels ``y``.

    KS is ``max(TPR − FPR)`` over thresholds (the Kolmogorov–Smirnov distance between the
    score distributions of the two classes), the figure credit-risk teams report; accuracy
    counts a score of at least 0.5 as the positive class.
    """
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    if len(np.unique(y)) < 2:
        raise ValueError("metrics need both classes among the evaluated rows")
    fpr, tpr, _ = roc_curve(y, p)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "ks": float(np.max(tpr - fpr)),
        "average_precision": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p >= 0.5)),
    }


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
