"""``rr_labels``: randomized response on the guest's labels before training (ε-label-DP).

See docs/protocol.md §4.7.2.

Roles: only the guest G runs this, once per job, before the first step; the host H and the
arbiter never see a true label or anything computed from one. Afterwards every message of the
job (δ̃ = δ of the randomized labels, B1/B2, validation-driven early stopping) and the final
model are functions of the randomized labels ``ỹ``, G's features and public randomness, so they
inherit ``ỹ``'s guarantee by post-processing. Test metrics, computed on true labels, stay at G.

Steps
-----
1. G draws a secret 128-bit seed (kept in its owner-only job state, so a resumed job randomizes
   identically) and splits the labelled rows it will use (training and validation) at random into
   two halves A and B.
2. Half A: binary randomized response [Warner65]: keep ``y`` with probability
   ``e^ε/(1 + e^ε)``, else flip it. Each label of A is touched once: ε-label-DP.
3. Prior (``rr_prior``, [Ghazi21] RR-with-prior): G fits a logistic regression on its own
   features of A against the randomized ``ỹ_A`` (post-processing of step 2); for every row of B
   its ``q_r = P(ỹ = 1 | x_r)`` is debiased to the prior ``p_r = (q_r − (1 − k))/(2k − 1)``
   (clipped to [0, 1]) with ``k = e^ε/(1 + e^ε)``.
4. Half B, each row with its prior (RR-with-prior for two classes): when
   ``max(p_r, 1 − p_r) ≥ e^ε/(1 + e^ε)`` the output is the prior's more likely class whatever
   ``y_r`` is (0-label-DP for that row); otherwise randomized response as in step 2. The
   mechanism applied to ``y_r`` depends only on ``x_r`` and on ``ỹ_A``, never on another true
   label of B, so every label of B is ε-label-DP too (parallel composition over disjoint rows).
   Without ``rr_prior``, B is randomized like A.

Accounting (:class:`LabelDpAccount`): each label enters exactly one ε-DP mechanism and is never
used again, so the whole job is ε-label-DP; ε is reported in the job's result and report. This
needs a split that depends on no label (the host sees it; the guest's service splits without
stratification under ``rr_labels``), and ε is per job: k jobs over the same labels are kε. The
guarantee is about the labels only (the features are the guest's own, and the host's leakage
about its features is §4.6's).

References
----------
[Warner65] S. L. Warner, "Randomized response", JASA 60(309), 1965.
[Ghazi21] B. Ghazi, N. Golowich, R. Kumar, P. Manurangsi, C. Zhang, "Deep Learning with
Label Differential Privacy", NeurIPS 2021.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from protocols.errors import ConfigError


@dataclass(frozen=True)
class LabelDpAccount:
    """What the accountant reports for a job (``result.json`` ``privacy``, the report).

    Parameters
    ----------
    mode
        The protection mode.
    label_dp_epsilon
        The job's ε-label-DP, or None when the mode has no formal guarantee.
    guarantee
        ``"formal"`` (ε-label-DP for every message and the final model), ``"empirical"``
        (measured leak AUC, ``benchmarks/leakage.py``) or ``"none"`` (protection off).
    mechanism
        A short name of the mechanism.
    """

    mode: str
    label_dp_epsilon: float | None
    guarantee: str
    mechanism: str

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def keep_probability(epsilon: float) -> float:
    """``e^ε/(1 + e^ε)``: binary randomized response keeps a label with this probability."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def randomized_response(y: np.ndarray, *, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Step 2: keep each binary label w.p. ``e^ε/(1 + e^ε)``, else flip it."""
    flip = rng.random(len(y)) >= keep_probability(epsilon)
    out: np.ndarray = np.where(flip, 1 - y, y).astype(np.float64)
    return out


def rr_with_prior(
    y: np.ndarray, prior: np.ndarray, *, epsilon: float, rng: np.random.Generator
) -> np.ndarray:
    """Step 4: the prior's class where it is confident enough, randomized response elsewhere."""
    confident = np.maximum(prior, 1 - prior) >= keep_probability(epsilon)
    rr = randomized_response(y, epsilon=epsilon, rng=rng)
    out: np.ndarray = np.where(confident, (prior >= 0.5).astype(np.float64), rr)
    return out


def randomize_labels(
    y: np.ndarray,
    *,
    rows: np.ndarray,
    x: np.ndarray,
    epsilon: float,
    prior: bool,
    seed: int,
) -> np.ndarray:
    """Steps 1-4: a copy of ``y`` with the labels of ``rows`` randomized.

    Parameters
    ----------
    y
        The guest's binary labels (all rows; rows outside ``rows`` are returned unchanged).
    rows
        The labelled rows the job trains and validates on.
    x
        The guest's preprocessed features, indexed like ``y`` (for the prior).
    epsilon
        The label-DP ε.
    prior
        Whether to use RR-with-prior on half B.
    seed
        The job's secret seed (step 1).

    Returns
    -------
    numpy.ndarray
        ``ỹ``.
    """
    values = np.asarray(y, dtype=np.float64)
    if not np.isin(values[rows], (0.0, 1.0)).all():
        raise ConfigError("protect = rr_labels needs binary labels (0 or 1)")
    rng = np.random.default_rng([seed, 0x5252])
    shuffled = rng.permutation(np.asarray(rows, dtype=np.int64))
    half_a, half_b = shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2 :]
    out = values.copy()
    out[half_a] = randomized_response(values[half_a], epsilon=epsilon, rng=rng)
    noisy_a = out[half_a]
    if prior and len(half_b) and 0 < noisy_a.sum() < len(noisy_a):
        model = LogisticRegression(max_iter=500).fit(x[half_a], noisy_a)
        q = model.predict_proba(x[half_b])[:, 1]  # P(ỹ = 1 | x) under step 2's noise
        keep = keep_probability(epsilon)
        p = np.clip((q - (1 - keep)) / (2 * keep - 1), 0.0, 1.0)  # P(y = 1 | x)
        out[half_b] = rr_with_prior(values[half_b], p, epsilon=epsilon, rng=rng)
    else:
        out[half_b] = randomized_response(values[half_b], epsilon=epsilon, rng=rng)
    return out


def account(*, mode: str, epsilon: float | None) -> LabelDpAccount:
    """The job's :class:`LabelDpAccount` (ε only for ``rr_labels``)."""
    if epsilon is None:
        guarantee = "none" if mode == "none" else "empirical"
        return LabelDpAccount(mode=mode, label_dp_epsilon=None, guarantee=guarantee, mechanism=mode)
    return LabelDpAccount(
        mode=mode,
        label_dp_epsilon=float(epsilon),
        guarantee="formal",
        mechanism="randomized response on labels (RR-with-prior, docs/protocol.md §4.7.2)",
    )
