"""A finished job's report: summary JSON with the test AUC, ROC and loss curves, scores.

The guest writes it from what it already holds (its own test labels and scores, the
per-epoch history of ``result.json``); nothing here talks to another party. Files in the
output folder (made 0700 if missing), each written atomically and owner-only (0600: the
scores and metrics are the guest's):

1. ``roc.png``: ROC curve of the joint model on the test rows, and of a guest-only
   baseline when its scores are given, with the AUCs in the legend;
2. ``loss.png``: training loss per epoch (plus the validation log loss when the history
   has it) and the validation metrics per epoch (``roc_auc``, ``ks``, ... as written by
   the split-NN session), with the kept (best) epoch marked when the summary names it;
3. ``scores.csv``: the given scores table, unchanged (optional);
4. ``report.json``: the summary plus ``test_auc`` (scikit-learn ``roc_auc_score``) and
   ``guest_only_test_auc`` when baseline scores are given; written last, so its presence
   means the report is complete.

Plots use matplotlib's ``Figure`` with the Agg canvas directly: no pyplot, no global state,
no display needed.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from protocols.errors import DataError
from protocols.files import atomic_write, private_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
ROC_FILE = "roc.png"
LOSS_FILE = "loss.png"
SCORES_FILE = "scores.csv"
TRAIN_LOSS = "train_loss"
EPOCH = "epoch"
VALIDATION_LOSS = "log_loss"  # plotted beside the training loss (same scale for BCE)
_DPI = 120


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report` (``scores`` is ``None`` without a scores table)."""

    report: Path
    roc: Path
    loss: Path
    scores: Path | None = None


def write_report(
    out: Path,
    *,
    summary: dict[str, Any],
    test_labels: np.ndarray,
    test_scores: np.ndarray,
    history: list[dict[str, Any]],
    scores: pd.DataFrame | None = None,
    guest_only_scores: np.ndarray | None = None,
) -> ReportFiles:
    """Write ``report.json``, ``roc.png``, ``loss.png`` and optionally ``scores.csv`` to ``out``.

    Parameters
    ----------
    out
        Output folder, created (0700) if missing; existing report files are replaced.
    summary
        JSON-serialisable run summary (numpy scalars and arrays, paths and enums are
        converted); copied into ``report.json``. Its ``test_auc`` and
        ``guest_only_test_auc`` keys, if any, are replaced by the computed values. An integer
        ``best_epoch`` is marked on the loss plot.
    test_labels
        Binary labels (0/1) of the test rows, both classes present.
    test_scores
        The joint model's scores for the same rows (shape ``(n,)`` or ``(n, 1)``).
    history
        One entry per epoch as in ``result.json``: ``epoch`` (0-based), ``train_loss`` and
        the validation metrics (absent when the job had no validation rows).
    scores
        Optional table (e.g. ids and scores of new customers) written as ``scores.csv``.
    guest_only_scores
        Optional scores of a guest-only baseline for the same test rows.

    Returns
    -------
    ReportFiles
        The paths written.

    Raises
    ------
    DataError
        If labels are not binary with both classes, scores are not finite or their lengths
        differ from the labels', the history is empty or holds a non-numeric value, or the
        summary is not JSON-serialisable.
    """
    y = _labels(test_labels)
    joint = _scores(test_scores, n=len(y), what="test_scores")
    baseline = (
        None
        if guest_only_scores is None
        else _scores(guest_only_scores, n=len(y), what="guest_only_scores")
    )
    epochs = _history(history)
    if scores is not None and not isinstance(scores, pd.DataFrame):
        raise DataError(f"scores must be a pandas DataFrame, not {type(scores).__name__}")
    body = dict(summary)
    body["test_auc"] = float(roc_auc_score(y, joint))
    if baseline is not None:
        body["guest_only_test_auc"] = float(roc_auc_score(y, baseline))
    text = _json(body)  # fails before any file is written
    best_epoch = _best_epoch(summary.get("best_epoch"))

    private_dir(out)
    files = ReportFiles(
        report=out / REPORT_FILE,
        roc=out / ROC_FILE,
        loss=out / LOSS_FILE,
        scores=None if scores is None else out / SCORES_FILE,
    )
    atomic_write(files.roc, _roc_png(y, joint, baseline), mode=0o600)  # 1
    atomic_write(files.loss, _loss_png(epochs, best_epoch=best_epoch), mode=0o600)  # 2
    if scores is not None and files.scores is not None:  # 3
        csv = scores.to_csv(index=False, lineterminator="\n").encode()
        atomic_write(files.scores, csv, mode=0o600)
    atomic_write(files.report, text.encode("utf-8"), mode=0o600)  # 4
    logger.info(
        "report written to %s: %d test rows, %d epochs%s",
        out,
        len(y),
        len(epochs),
        "" if scores is None else f", {len(scores)} score rows",
    )
    return files


def _best_epoch(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return None
    return int(value) if value >= 0 else None


def _labels(values: np.ndarray) -> np.ndarray:
    y = np.asarray(values)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) == 0:
        raise DataError(f"test_labels must be a non-empty 1-D array, got shape {y.shape}")
    try:
        y = y.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError("test_labels must be numeric 0/1 labels") from None
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("test_labels must be binary (0/1); the ROC report covers binary tasks")
    if len(np.unique(y)) < 2:
        raise DataError("test_labels hold only one class: the ROC AUC is undefined")
    return y.astype(np.int64)


def _scores(values: np.ndarray, *, n: int, what: str) -> np.ndarray:
    p = np.asarray(values)
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1:
        raise DataError(f"{what} must be a 1-D array of scores, got shape {p.shape}")
    if len(p) != n:
        raise DataError(f"{what} has {len(p)} values but test_labels has {n}; pass the same rows")
    try:
        p = p.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numeric") from None
    if not np.isfinite(p).all():
        raise DataError(f"{what} row {int(np.argmin(np.isfinite(p)))}: missing or infinite score")
    return p


def _history(history: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Validated per-epoch numbers; ``epoch`` defaults to the entry's position."""
    if not history:
        raise DataError("history is empty: the job recorded no epoch, so there is no loss curve")
    out = []
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise DataError(f"history entry {i} is a {type(entry).__name__}, not a mapping")
        if TRAIN_LOSS not in entry:
            raise DataError(
                f"history entry {i} has no {TRAIN_LOSS!r}; its keys are {sorted(entry)} "
                "(expected the per-epoch entries of result.json)"
            )
        row: dict[str, float] = {}
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise DataError(f"history entry {i}, key {key!r}: not a number")
            row[str(key)] = float(value)
        row.setdefault(EPOCH, float(i))
        out.append(row)
    return out


def _json(body: dict[str, Any]) -> str:
    try:
        return json.dumps(body, indent=2, default=_jsonable, allow_nan=False) + "\n"
    except ValueError:
        raise DataError(
            "the summary holds a NaN or infinite number, which JSON cannot represent"
        ) from None
    except TypeError as exc:
        raise DataError(f"the summary is not JSON-serialisable: {exc}") from None


def _jsonable(value: object) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"values of type {type(value).__name__} cannot be written as JSON")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _roc_png(y: np.ndarray, joint: np.ndarray, baseline: np.ndarray | None) -> bytes:
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    curves = [("Joint model (both parties)", joint, "C0")]
    if baseline is not None:
        curves.append(("Guest-only baseline", baseline, "C1"))
    for label, p, colour in curves:
        fpr, tpr, _ = roc_curve(y, p)
        auc = float(roc_auc_score(y, p))
        ax.plot(fpr, tpr, color=colour, linewidth=2, label=f"{label}: AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="Chance: AUC 0.500")
    positives = int(y.sum())
    ax.set_title(f"ROC curve on the test rows\n({len(y)} rows, {positives} positive)")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def _loss_png(epochs: list[dict[str, float]], *, best_epoch: int | None) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(11.0, 4.5)
    loss_ax, metric_ax = fig.subplots(1, 2)
    x = [e[EPOCH] for e in epochs]
    loss_ax.plot(x, [e[TRAIN_LOSS] for e in epochs], marker="o", label="Training loss")
    if any(VALIDATION_LOSS in e for e in epochs):
        vx, vy = _series(epochs, VALIDATION_LOSS)
        loss_ax.plot(vx, vy, marker="s", linestyle="--", label="Validation log loss")
    loss_ax.set_title("Loss per epoch")
    loss_ax.set_ylabel("Loss")
    metrics = [k for k in _keys(epochs) if k not in (EPOCH, TRAIN_LOSS, VALIDATION_LOSS)]
    for key in metrics:
        mx, my = _series(epochs, key)
        metric_ax.plot(mx, my, marker="o", label=_METRIC_NAMES.get(key, key))
    if not metrics:
        metric_ax.text(
            0.5, 0.5, "no validation rows", ha="center", va="center", transform=metric_ax.transAxes
        )
    metric_ax.set_title("Validation metrics per epoch")
    metric_ax.set_ylabel("Metric value")
    for ax in (loss_ax, metric_ax):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"Kept epoch ({best_epoch})")
        ax.set_xlabel("Epoch (0-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax)
    return _png(fig)


_METRIC_NAMES = {
    "roc_auc": "ROC AUC",
    "ks": "KS",
    "average_precision": "Average precision",
    "accuracy": "Accuracy",
    "rmse": "RMSE",
    "mae": "MAE",
}


def _keys(epochs: list[dict[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for entry in epochs:
        seen.update(dict.fromkeys(entry))
    return list(seen)


def _series(epochs: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(e[EPOCH], e[key]) for e in epochs if key in e and not math.isnan(e[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
