"""Binary-classification metrics the guest computes on its own labels (scikit-learn)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score, roc_curve


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """ROC AUC, KS, average precision and log loss of scores ``p`` for labels ``y``.

    KS is ``max(TPR − FPR)`` over thresholds (the Kolmogorov–Smirnov distance between the
    score distributions of the two classes), the figure credit-risk teams report.
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
    }
