"""From a binary model's scores to decisions: calibration and an operating threshold.

The guest fits a :class:`Decision` on its own validation rows (labels and the model's raw
scores) after training; it is plain JSON (:meth:`Decision.to_json`), saved beside the model,
and applied to new scores with :meth:`Decision.calibrate` and :meth:`Decision.decide`.
Nothing here talks to another party.

* Calibration (:class:`Calibration`): ``platt`` fits ``σ(a·logit(s) + b)`` by logistic
  regression on the logit of the raw score ``s``, with Platt's smoothed targets
  (``(n₊+1)/(n₊+2)`` and ``1/(n₋+2)``, so a separable validation set gives finite ``a, b``);
  a positive ``a`` keeps the ranking. ``isotonic`` fits a monotone step function
  (scikit-learn ``IsotonicRegression``) and applies it by linear interpolation between its
  thresholds (``np.interp``, clipped at both ends). ``none`` keeps the raw score.
* Threshold (:class:`ThresholdRule`), on the calibrated score, a row being flagged when its
  score is at least the threshold: ``fpr`` takes the smallest threshold whose validation
  false-positive rate is at most ``target_fpr``; ``f_beta`` the one that maximises F-beta
  on validation (the smallest of equal maxima). Candidates are the calibrated validation
  scores and one value above the largest (nothing flagged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from protocols.errors import ConfigError, DataError

_EPS = 1e-12  # raw scores are clipped to [ε, 1 − ε] before their logit


class Calibration(StrEnum):
    """How raw scores become probabilities."""

    NONE = "none"
    PLATT = "platt"
    ISOTONIC = "isotonic"


class ThresholdRule(StrEnum):
    """How the operating threshold is chosen on the validation rows."""

    FPR = "fpr"
    F_BETA = "f_beta"


@dataclass(frozen=True)
class DecisionConfig:
    """The job file's ``[decision]`` section (guest-only).

    Parameters
    ----------
    calibration
        ``platt`` (default), ``isotonic`` or ``none``.
    threshold
        ``fpr`` (default): the smallest threshold with validation FPR ``<= target_fpr``;
        ``f_beta``: the threshold maximising F-beta on validation.
    target_fpr
        In ``(0, 1)``; used by the ``fpr`` rule.
    beta
        ``> 0``; used by the ``f_beta`` rule (``beta > 1`` weighs recall more).
    """

    calibration: Calibration = Calibration.PLATT
    threshold: ThresholdRule = ThresholdRule.FPR
    target_fpr: float = 0.05
    beta: float = 1.0

    def __post_init__(self) -> None:
        for name, kind in (("calibration", Calibration), ("threshold", ThresholdRule)):
            value = getattr(self, name)
            if value not in set(kind):
                choices = ", ".join(m.value for m in kind)
                raise ConfigError(f"{name} = {value!r}: use one of {choices}")
            object.__setattr__(self, name, kind(value))
        for name in ("target_fpr", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} = {value!r}: must be a number")
            object.__setattr__(self, name, float(value))
        if not 0.0 < self.target_fpr < 1.0:
            raise ConfigError(f"target_fpr = {self.target_fpr}: must lie in (0, 1)")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta = {self.beta}: must be > 0")

    @classmethod
    def parse(cls, raw: Mapping[str, Any], *, where: str) -> DecisionConfig:
        """The section as written (TOML or JSON), ``ConfigError`` naming ``where`` and the key.

        Parameters
        ----------
        raw
            The section's keys: ``calibration``, ``threshold``, ``target_fpr``, ``beta``.
        where
            Where the section comes from, e.g. ``"job.toml [decision]"``.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: must be a table of keys, not {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {known}")
        default = cls()
        for key in known:  # each key alone, so the message names the one at fault
            if key in raw:
                try:
                    cls(**{key: raw[key]})
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {key}: {exc}") from None
        values = {key: raw.get(key, getattr(default, key)) for key in known}
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """Every key with its value (enums as strings); :meth:`parse` reads it back."""
        return {
            "calibration": self.calibration.value,
            "threshold": self.threshold.value,
            "target_fpr": self.target_fpr,
            "beta": self.beta,
        }


@dataclass(frozen=True)
class Decision:
    """A fitted calibration and threshold (plain JSON, saved with the model).

    Attributes
    ----------
    calibration
        The calibration kind.
    params
        Platt: ``slope`` and ``intercept`` on the logit of the raw score; isotonic: ``x`` and
        ``y``, the fitted thresholds (tuples); none: empty.
    threshold
        On the calibrated score: a row is flagged when its calibrated score is at least this.
    rule
        How the threshold was chosen.
    target_fpr
        The ``fpr`` rule's target (``None`` for ``f_beta``).
    beta
        The ``f_beta`` rule's β (``None`` for ``fpr``).
    validation
        ``fpr``, ``recall``, ``precision`` and ``f_beta`` at the threshold on the validation
        rows (``f_beta`` with the rule's β, F1 for the ``fpr`` rule; precision 0 when nothing
        is flagged).
    """

    calibration: Calibration
    params: dict[str, Any]
    threshold: float
    rule: ThresholdRule
    target_fpr: float | None
    beta: float | None
    validation: dict[str, float]

    @classmethod
    def fit(cls, config: DecisionConfig, *, labels: np.ndarray, scores: np.ndarray) -> Decision:
        """Fit calibration and threshold on validation ``labels`` (0/1) and raw ``scores``.

        Raises
        ------
        DataError
            If the rows hold only one class, labels are not 0/1, scores are not finite
            probabilities in ``[0, 1]``, or the lengths differ.
        """
        y, s = _validation_rows(labels, scores)
        params = _fit_params(config.calibration, y, s)
        calibrated = _apply(config.calibration, params, s)
        rule = config.threshold
        beta = config.beta if rule is ThresholdRule.F_BETA else 1.0
        candidates, tp, fp = _counts(y, calibrated)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        if rule is ThresholdRule.FPR:
            index = int(np.argmax(fp / n_neg <= config.target_fpr))  # first (smallest) that holds
        else:
            index = int(np.argmax(_f_beta(tp, fp, n_pos, beta)))
        threshold = float(candidates[index])
        return cls(
            calibration=config.calibration,
            params=params,
            threshold=threshold,
            rule=rule,
            target_fpr=config.target_fpr if rule is ThresholdRule.FPR else None,
            beta=config.beta if rule is ThresholdRule.F_BETA else None,
            validation=_figures(int(tp[index]), int(fp[index]), n_pos, n_neg, beta),
        )

    def calibrate(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of raw ``scores`` (float64, same shape)."""
        s = np.asarray(scores, dtype=np.float64)
        return _apply(self.calibration, self.params, s)

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Whether each raw score is flagged: ``calibrate(scores) >= threshold`` (bool)."""
        out: np.ndarray = self.calibrate(scores) >= self.threshold
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (lists, numbers, strings); :meth:`from_json` reads it back exactly."""
        return {
            "calibration": self.calibration.value,
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            "threshold": self.threshold,
            "rule": self.rule.value,
            "target_fpr": self.target_fpr,
            "beta": self.beta,
            "validation": dict(self.validation),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Decision:
        """Parse :meth:`to_json` output, ``DataError`` naming what is malformed."""
        try:
            if not isinstance(obj, Mapping):
                raise TypeError(f"a {type(obj).__name__}, not an object")
            keys = {f.name for f in fields(cls)}
            missing = sorted(keys - set(obj))
            extra = sorted(set(obj) - keys)
            if missing or extra:
                raise ValueError(f"missing keys {missing}, unknown keys {extra}")
            calibration = Calibration(obj["calibration"])
            rule = ThresholdRule(obj["rule"])
            target_fpr = _optional(obj["target_fpr"], "target_fpr")
            beta = _optional(obj["beta"], "beta")
            if (target_fpr is None) != (rule is not ThresholdRule.FPR):
                raise ValueError("target_fpr must be given for the fpr rule only")
            if (beta is None) != (rule is not ThresholdRule.F_BETA):
                raise ValueError("beta must be given for the f_beta rule only")
            if target_fpr is not None and not 0 < target_fpr < 1:
                raise ValueError(f"target_fpr {target_fpr} outside (0, 1)")
            if beta is not None and not beta > 0:
                raise ValueError(f"beta {beta} not positive")
            validation = obj["validation"]
            if not isinstance(validation, Mapping):
                raise TypeError("validation is not an object")
            return cls(
                calibration=calibration,
                params=_params_from_json(calibration, obj["params"]),
                threshold=_number(obj["threshold"], "threshold"),
                rule=rule,
                target_fpr=target_fpr,
                beta=beta,
                validation={str(k): _number(v, f"validation {k}") for k, v in validation.items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed decision: {exc}") from None


def _validation_rows(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores).reshape(-1)
    if len(y) != len(s):
        raise DataError(f"{len(s)} scores for {len(y)} labels: pass the same validation rows")
    try:
        y = y.astype(np.float64)
        s = s.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError("labels and scores must be numeric") from None
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("decision labels must be binary (0/1)")
    if not (np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()):
        raise DataError("decision scores must be probabilities in [0, 1] (a binary model's)")
    positives = int(y.sum())
    if positives in (0, len(y)):
        raise DataError(
            f"the {len(y)} validation rows hold only one class ({positives} positive): "
            "calibration and a threshold need both; use more validation rows"
        )
    return y.astype(np.int64), s


def _logit(s: np.ndarray) -> np.ndarray:
    p = np.clip(s, _EPS, 1.0 - _EPS)
    out: np.ndarray = np.log(p) - np.log1p(-p)
    return out


def _fit_params(calibration: Calibration, y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    if calibration is Calibration.PLATT:
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        target = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
        x = _logit(s)[:, None]
        # soft targets as two weighted copies of each row (Platt 1999)
        model = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000)
        model.fit(
            np.concatenate([x, x]),
            np.concatenate([np.ones(len(y)), np.zeros(len(y))]),
            sample_weight=np.concatenate([target, 1.0 - target]),
        )
        return {"slope": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0])}
    if calibration is Calibration.ISOTONIC:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(s, y.astype(np.float64))
        return {
            "x": tuple(float(v) for v in iso.X_thresholds_),
            "y": tuple(float(v) for v in iso.y_thresholds_),
        }
    return {}


def _apply(calibration: Calibration, params: Mapping[str, Any], s: np.ndarray) -> np.ndarray:
    if calibration is Calibration.PLATT:
        z = params["slope"] * _logit(s) + params["intercept"]
        out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
        return out
    if calibration is Calibration.ISOTONIC:
        out = np.interp(s, np.asarray(params["x"]), np.asarray(params["y"]))
        return out
    return np.asarray(s, dtype=np.float64).copy()


def _counts(y: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ascending candidate thresholds and, for each, the true and false positives of
    ``c >= threshold``; the last candidate flags nothing."""
    values = np.unique(c)
    candidates = np.append(values, np.nextafter(values[-1], np.inf))
    pos, neg = np.sort(c[y == 1]), np.sort(c[y == 0])
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")
    fp = len(neg) - np.searchsorted(neg, candidates, side="left")
    return candidates, tp.astype(np.float64), fp.astype(np.float64)


def _f_beta(tp: np.ndarray, fp: np.ndarray, n_pos: int, beta: float) -> np.ndarray:
    b2 = beta * beta
    out: np.ndarray = (1 + b2) * tp / ((1 + b2) * tp + b2 * (n_pos - tp) + fp)
    return out


def _figures(tp: int, fp: int, n_pos: int, n_neg: int, beta: float) -> dict[str, float]:
    return {
        "fpr": fp / n_neg,
        "recall": tp / n_pos,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "f_beta": float(_f_beta(np.array([tp]), np.array([fp]), n_pos, beta)[0]),
    }


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{what} is not finite")
    return float(value)


def _optional(value: Any, what: str) -> float | None:
    return None if value is None else _number(value, what)


def _params_from_json(calibration: Calibration, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise TypeError("params is not an object")
    if calibration is Calibration.PLATT:
        if set(raw) != {"slope", "intercept"}:
            raise ValueError("platt params need exactly slope and intercept")
        return {
            "slope": _number(raw["slope"], "slope"),
            "intercept": _number(raw["intercept"], "intercept"),
        }
    if calibration is Calibration.ISOTONIC:
        if set(raw) != {"x", "y"}:
            raise ValueError("isotonic params need exactly x and y")
        x = tuple(_number(v, "isotonic x") for v in raw["x"])
        y = tuple(_number(v, "isotonic y") for v in raw["y"])
        if not x or len(x) != len(y):
            raise ValueError("isotonic x and y must be non-empty and of one length")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0) or min(y) < 0 or max(y) > 1:
            raise ValueError("isotonic x and y must be non-decreasing, y within [0, 1]")
        return {"x": x, "y": y}
    if raw:
        raise ValueError("calibration none takes no params")
    return {}
