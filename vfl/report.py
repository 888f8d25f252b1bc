"""A finished job's report: summary JSON with the test metrics, plots, the test scores.

The guest writes it from what it already holds (its own test labels and scores, the
per-epoch history of ``result.json``, its fitted :class:`~vfl.common.decision.Decision`);
nothing here talks to another party. Files in the output folder (made 0700 if missing), each
written atomically and owner-only (0600: the scores and metrics are the guest's):

1. ``roc.png``: ROC curve of the joint model on the test rows, and of a guest-only
   baseline when its scores are given, with the AUCs in the legend;
2. ``pr.png``: precision–recall curves (PR AUC, i.e. average precision, in the legend) with
   the positive rate as the no-skill line;
3. ``calibration.png``: reliability diagram (scikit-learn ``calibration_curve``, 10
   quantile bins) of the raw scores and, when given, the calibrated ones; scores outside
   ``[0, 1]`` (logits) are not probabilities and get a note instead;
4. ``loss.png``: training loss per epoch (plus the validation log loss when the history
   has it) and the validation metrics per epoch (``roc_auc``, ``ks``, ... as written by
   the split-NN session), with the kept (best) epoch marked when the summary names it;
5. ``test_scores.csv``: one row per test row: ``id`` (when ids are given), ``label``,
   ``score``, and ``probability`` (calibrated) and ``decision`` (0/1) when known;
6. ``scores.csv``: the given scores table, unchanged (optional);
7. ``report.json``: the summary plus ``test_auc`` (scikit-learn ``roc_auc_score``),
   ``guest_only_test_auc`` when baseline scores are given, ``metrics`` on the test rows
   (``joint``, ``guest_only`` and ``calibrated``, each as
   :func:`~vfl.common.metrics.binary_metrics` gives them; only the ranking metrics for raw
   scores that are not probabilities), and with a decision ``decision`` (the
   :class:`~vfl.common.decision.Decision` as JSON: calibration, threshold, validation
   figures) and ``decision_test`` (fpr, recall, precision and flagged rows at the threshold
   on the test rows); written last, so its presence means the report is complete.

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
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from protocols.errors import DataError
from protocols.files import atomic_write, private_dir
from vfl.common.decision import Decision
from vfl.common.metrics import binary_metrics, ranking_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
ROC_FILE = "roc.png"
PR_FILE = "pr.png"
CALIBRATION_FILE = "calibration.png"
LOSS_FILE = "loss.png"
TEST_SCORES_FILE = "test_scores.csv"
SCORES_FILE = "scores.csv"
TRAIN_LOSS = "train_loss"
EPOCH = "epoch"
VALIDATION_LOSS = "log_loss"  # plotted beside the training loss (same scale for BCE)
CALIBRATION_BINS = 10
_DPI = 120


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_report` (``scores`` is ``None`` without a scores table)."""

    report: Path
    roc: Path
    loss: Path
    scores: Path | None = None
    pr: Path | None = None
    calibration: Path | None = None
    test_scores: Path | None = None


def write_report(
    out: Path,
    *,
    summary: dict[str, Any],
    test_labels: np.ndarray,
    test_scores: np.ndarray,
    history: list[dict[str, Any]],
    scores: pd.DataFrame | None = None,
    guest_only_scores: np.ndarray | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    decision: Decision | None = None,
    calibrated: np.ndarray | None = None,
) -> ReportFiles:
    """Write the report files (module docstring) to ``out``; ``report.json`` last.

    Parameters
    ----------
    out
        Output folder, created (0700) if missing; existing report files are replaced.
    summary
        JSON-serialisable run summary (numpy scalars and arrays, paths and enums are
        converted); copied into ``report.json``. Its ``test_auc``, ``guest_only_test_auc``,
        ``metrics``, ``decision`` and ``decision_test`` keys, if any, are replaced by the
        computed values.
        An integer ``best_epoch`` is marked on the loss plot.
    test_labels
        Binary labels (0/1) of the test rows, both classes present.
    test_scores
        The joint model's raw scores for the same rows (shape ``(n,)`` or ``(n, 1)``).
    history
        One entry per epoch as in ``result.json``: ``epoch`` (0-based), ``train_loss`` and
        the validation metrics (absent when the job had no validation rows).
    scores
        Optional table (e.g. ids and scores of new customers) written as ``scores.csv``.
    guest_only_scores
        Optional scores of a guest-only baseline for the same test rows.
    ids
        Optional ids of the test rows (same order), the ``id`` column of
        ``test_scores.csv``.
    decision
        Optional decision fitted on the validation rows: its calibration gives the
        calibrated scores (unless ``calibrated`` is given), its threshold the decisions.
    calibrated
        Optional calibrated probabilities of the test rows (default: from ``decision``).

    Returns
    -------
    ReportFiles
        The paths written.

    Raises
    ------
    DataError
        If labels are not binary with both classes, scores are not finite or their lengths
        (or the ids') differ from the labels', calibrated scores lie outside ``[0, 1]``, the
        history is empty or holds a non-numeric value, or the summary is not
        JSON-serialisable.
    """
    y = _labels(test_labels)
    joint = _scores(test_scores, n=len(y), what="test_scores")
    baseline = (
        None
        if guest_only_scores is None
        else _scores(guest_only_scores, n=len(y), what="guest_only_scores")
    )
    row_ids = _ids(ids, n=len(y))
    if calibrated is None and decision is not None:
        calibrated = decision.calibrate(joint)
    probability = None if calibrated is None else _scores(calibrated, n=len(y), what="calibrated")
    if probability is not None and not _is_probability(probability):
        raise DataError("calibrated must hold probabilities in [0, 1]")
    epochs = _history(history)
    if scores is not None and not isinstance(scores, pd.DataFrame):
        raise DataError(f"scores must be a pandas DataFrame, not {type(scores).__name__}")
    body = dict(summary)
    body.update(_metrics(y, joint, baseline, probability, decision))
    text = _json(body)  # fails before any file is written
    best_epoch = _best_epoch(summary.get("best_epoch"))
    table = _test_table(y, joint, row_ids, probability, decision)

    private_dir(out)
    files = ReportFiles(
        report=out / REPORT_FILE,
        roc=out / ROC_FILE,
        loss=out / LOSS_FILE,
        scores=None if scores is None else out / SCORES_FILE,
        pr=out / PR_FILE,
        calibration=out / CALIBRATION_FILE,
        test_scores=out / TEST_SCORES_FILE,
    )
    atomic_write(files.roc, _roc_png(y, joint, baseline), mode=0o600)  # 1
    atomic_write(out / PR_FILE, _pr_png(y, joint, baseline), mode=0o600)  # 2
    atomic_write(out / CALIBRATION_FILE, _calibration_png(y, joint, probability), mode=0o600)  # 3
    atomic_write(files.loss, _loss_png(epochs, best_epoch=best_epoch), mode=0o600)  # 4
    atomic_write(out / TEST_SCORES_FILE, _csv(table), mode=0o600)  # 5
    if scores is not None and files.scores is not None:  # 6
        atomic_write(files.scores, _csv(scores), mode=0o600)
    atomic_write(files.report, text.encode("utf-8"), mode=0o600)  # 7
    logger.info(
        "report written to %s: %d test rows, %d epochs%s",
        out,
        len(y),
        len(epochs),
        "" if scores is None else f", {len(scores)} score rows",
    )
    return files


def _csv(frame: pd.DataFrame) -> bytes:
    text: str = frame.to_csv(index=False, lineterminator="\n")
    return text.encode()


def _is_probability(p: np.ndarray) -> bool:
    return bool(np.all((p >= 0.0) & (p <= 1.0)))


def _metrics(
    y: np.ndarray,
    joint: np.ndarray,
    baseline: np.ndarray | None,
    probability: np.ndarray | None,
    decision: Decision | None,
) -> dict[str, Any]:
    """The computed keys of ``report.json``."""

    def of(p: np.ndarray) -> dict[str, float]:
        return binary_metrics(y, p) if _is_probability(p) else ranking_metrics(y, p)

    metrics = {"joint": of(joint)}
    out: dict[str, Any] = {"test_auc": float(roc_auc_score(y, joint)), "metrics": metrics}
    if baseline is not None:
        out["guest_only_test_auc"] = float(roc_auc_score(y, baseline))
        metrics["guest_only"] = of(baseline)
    if probability is not None:
        metrics["calibrated"] = binary_metrics(y, probability)
    if decision is not None and probability is not None:
        flagged = probability >= decision.threshold
        tp = int(np.sum(flagged & (y == 1)))
        fp = int(np.sum(flagged & (y == 0)))
        out["decision"] = decision.to_json()
        out["decision_test"] = {
            "fpr": fp / int(np.sum(y == 0)),
            "recall": tp / int(np.sum(y == 1)),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "flagged": tp + fp,
        }
    return out


def _test_table(
    y: np.ndarray,
    joint: np.ndarray,
    ids: np.ndarray | None,
    probability: np.ndarray | None,
    decision: Decision | None,
) -> pd.DataFrame:
    columns: dict[str, Any] = {} if ids is None else {"id": ids}
    columns.update(label=y, score=joint)
    if probability is not None:
        columns["probability"] = probability
        if decision is not None:
            columns["decision"] = (probability >= decision.threshold).astype(np.int64)
    return pd.DataFrame(columns)


def _ids(values: Sequence[Any] | np.ndarray | None, *, n: int) -> np.ndarray | None:
    if values is None:
        return None
    ids = np.asarray(values, dtype=object)
    if ids.ndim != 1:
        raise DataError(f"ids must be a 1-D sequence, got shape {ids.shape}")
    if len(ids) != n:
        raise DataError(f"ids has {len(ids)} values but test_labels has {n}; pass the same rows")
    return ids


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


def _pr_png(y: np.ndarray, joint: np.ndarray, baseline: np.ndarray | None) -> bytes:
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    curves = [("Joint model (both parties)", joint, "C0")]
    if baseline is not None:
        curves.append(("Guest-only baseline", baseline, "C1"))
    for label, p, colour in curves:
        precision, recall, _ = precision_recall_curve(y, p)
        auc = ranking_metrics(y, p)["pr_auc"]
        ax.step(recall, precision, where="post", color=colour, linewidth=2)
        ax.plot([], [], color=colour, linewidth=2, label=f"{label}: PR AUC {auc:.3f}")
    rate = float(np.mean(y))
    ax.axhline(rate, color="grey", linestyle="--", linewidth=1, label=f"No skill: {rate:.3f}")
    ax.set_title(f"Precision–recall on the test rows\n({len(y)} rows, {int(y.sum())} positive)")
    ax.set_xlabel("Recall (true positive rate)")
    ax.set_ylabel("Precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


def _calibration_png(y: np.ndarray, joint: np.ndarray, probability: np.ndarray | None) -> bytes:
    from sklearn.calibration import calibration_curve

    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="Perfectly calibrated")
    curves = [("Raw score", joint, "C0")] if _is_probability(joint) else []
    if probability is not None:
        curves.append(("Calibrated", probability, "C2"))
    for label, p, colour in curves:
        observed, predicted = calibration_curve(y, p, n_bins=CALIBRATION_BINS, strategy="quantile")
        brier = binary_metrics(y, p)["brier"]
        ax.plot(predicted, observed, marker="o", color=colour, label=f"{label}: Brier {brier:.4f}")
    if not _is_probability(joint):
        ax.text(0.5, 0.6, "raw scores are not probabilities\n(outside [0, 1])", ha="center")
    ax.set_title(f"Reliability on the test rows ({CALIBRATION_BINS} quantile bins)")
    ax.set_xlabel("Mean predicted probability")
    ax.set_ylabel("Observed positive rate")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
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
    keys = _keys(epochs)
    skip = {EPOCH, TRAIN_LOSS, VALIDATION_LOSS}
    if "pr_auc" in keys:
        skip.add("average_precision")  # the same number as pr_auc
    metrics = [k for k in keys if k not in skip]
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
    "pr_auc": "PR AUC",
    "recall_at_fpr_1pct": "Recall at 1 % FPR",
    "recall_at_fpr_5pct": "Recall at 5 % FPR",
    "brier": "Brier score",
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
        ax.legend(loc="best", fontsize="small")
