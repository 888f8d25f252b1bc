"""Label-leakage attacks on the host's view of split training.

See docs/protocol.md §4.7, tests L1, L2, L7.

Roles: every function here plays the **attacker = the host H**, offline, on a recorded
transcript, **for evaluation only** (tests and audits); no protocol or service code calls it.
H's view of a training run is, per step t, its plaintext cut-layer gradient
``g_h = δ̃_t·W_tᵀ`` (B×d, decrypted from B1), its own embedding ``α_t`` exactly as it was
encoded for F1 and B2 (``â_t / 2^{f_a}``) and the row indices ``I_t`` of the batch
(:class:`HostView`). H never sees labels, δ, δ̃ or ``W_t``.

What is measured: each attack turns the view into one score per row, and the score is compared
with the true labels (which only the evaluator holds) by the **leak AUC**
``max(AUC, 1 − AUC)`` (``sklearn.metrics.roc_auc_score``; 0.5 = no leakage, 1 = every label
recovered up to one global flip). The attacks:

* **norm attack** [Li22]: ``score_b = ‖g_h[b]‖₂`` — with class imbalance the rare class has the
  larger gradient (for binary cross-entropy ``δ_b ∝ p_b − y_b``);
* **direction attack** [Li22]: H knows the label of one positive row ``b*`` per batch (side
  knowledge; the evaluator picks the first positive of each batch) and scores the other rows of
  that batch by ``cos(g_h[b], g_h[b*])``; batches without a positive are skipped;
* **update-tracking attack** (§4.7, L7): from ``g_t`` H learns the column space ``Q`` of ``W_t``;
  the public update ``W_{t+1} = W_t − η_W·α_tᵀ D_t`` (``D_t`` the gradient the guest put into
  B2) and ``P⊥ = I − QQᵀ`` give ``g_{t+1}P⊥ = −η_W (δ̃_{t+1} D_tᵀ)(α_t P⊥)``, so H solves for
  ``M = δ̃_{t+1} D_tᵀ`` (exactly when ``B ≤ d − k``, else its projection onto the column space of
  ``α_t P⊥``) and reads off ``D_t`` up to a k×k transform (:func:`track_updates`). Those
  recovered rows are then scored by the norm and the direction attack. When the protocol is
  followed, ``D_t = δ̃_t`` and the attack learns nothing beyond ``g_t``; if the guest put the
  true δ into B2, it would bypass ``Protect`` — that is what test L7 guards against.

Attacks over a whole run (docs/protocol.md §4.7.1; a row is seen once per epoch):

* **multi-visit averaging** (:func:`averaging_attack`): per row, the mean of its ``g_h`` over
  all its visits so far (fresh noise shrinks as 1/visits, the label signal does not), scored by
  its norm, its projection on the first principal component of all rows' means (no side
  knowledge), and its cosine to the mean of the known positives' means;
* **forward-embedding clustering** (:func:`clustering_attack`, [Sun22-FE]): the host's own α of
  each row's latest visit, split in two by k-means (score: distance to one centre minus distance
  to the other) and projected on its first principal component; no side knowledge;
* **visit differencing** (:func:`differencing_attack`): per row, its last live ``g_h`` minus its
  first — noise fixed per row cancels, and what is left follows how the row's prediction moved
  toward its label; scored by norm, first principal component and model completion;
* **model completion** (:func:`completion_attack`, [Fu22]): with a handful of known labels
  (:func:`known_rows`: e.g. 20, half of each class, or 1 % of the rows) the host fits a
  logistic regression on per-row features (averaged ``g_h``, or its α) and scores every other
  row.

Every attack maps a view to one score per row; the same functions applied to a view whose
"gradients" and "embeddings" are the host's raw features give the attack's **baseline** (what the
host's own data tells it without the protocol).

[Sun22-FE] J. Sun et al., "Label Leakage and Protection from Forward Embedding in Vertical
Federated Learning", arXiv:2203.01451, 2022.
[Fu22] C. Fu et al., "Label Inference Attacks Against Vertical Federated Learning", USENIX
Security 2022.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class HostView:
    """The host's transcript of a training run, one entry per step.

    Parameters
    ----------
    gradients
        ``g_h`` of each step (B×d), as decoded from B1.
    embeddings
        The host's own ``α_t`` (B×d) as encoded for F1/B2, i.e. ``â_t / 2^{f_a}``.
    rows
        The batch's row indices ``I_t`` (length B), to look up labels when evaluating.
    """

    gradients: Sequence[np.ndarray]
    embeddings: Sequence[np.ndarray]
    rows: Sequence[np.ndarray]

    def __post_init__(self) -> None:
        if not len(self.gradients) == len(self.embeddings) == len(self.rows):
            raise ValueError("gradients, embeddings and rows need one entry per step")
        for g, a, r in zip(self.gradients, self.embeddings, self.rows, strict=True):
            if g.ndim != 2 or g.shape != a.shape or r.shape != (g.shape[0],):
                raise ValueError(f"step shapes disagree: g {g.shape}, α {a.shape}, rows {r.shape}")

    def window(self, start: int, stop: int | None = None) -> HostView:
        """The view restricted to steps ``start .. stop − 1``."""
        return HostView(
            gradients=self.gradients[start:stop],
            embeddings=self.embeddings[start:stop],
            rows=self.rows[start:stop],
        )


class ViewRecorder:
    """Builds a :class:`HostView` from the host's ``HostTrainer.observer`` calls, in step order.

    Raises ``RuntimeError`` on a step out of order (e.g. a resumed job: its view would have a gap).
    """

    def __init__(self) -> None:
        self.gradients: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []

    def __call__(self, step: int, rows: np.ndarray, alpha: np.ndarray, g_h: np.ndarray) -> None:
        if step != len(self.rows):
            raise RuntimeError(f"host step {step} out of order (resumed?)")
        self.rows.append(np.asarray(rows, dtype=np.int64).copy())
        self.embeddings.append(np.array(alpha, dtype=np.float64))
        self.gradients.append(np.array(g_h, dtype=np.float64))

    def view(self) -> HostView:
        """What was recorded so far."""
        return HostView(gradients=self.gradients, embeddings=self.embeddings, rows=self.rows)


def leak_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """``max(AUC, 1 − AUC)`` of ``scores`` against binary ``labels``.

    Parameters
    ----------
    scores
        One score per row (higher = more likely positive, or the reverse: the max makes the
        direction irrelevant).
    labels
        The true labels in {0, 1}; both classes must be present.

    Returns
    -------
    float
        The leak AUC in [0.5, 1].
    """
    y = np.asarray(labels).reshape(-1)
    if np.unique(y).size != 2:
        raise ValueError("leak AUC needs both classes among the scored rows")
    auc = float(roc_auc_score(y, np.asarray(scores, dtype=np.float64).reshape(-1)))
    return max(auc, 1.0 - auc)


def _cosine_to(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(reference)
    out: np.ndarray = rows @ reference / np.maximum(norms, 1e-300)
    return out


def norm_scores(batches: Sequence[np.ndarray]) -> np.ndarray:
    """Norm-attack scores ``‖x_b‖₂`` of every row of every batch, concatenated."""
    return np.concatenate([np.linalg.norm(b, axis=1) for b in batches])


def direction_scores(
    batches: Sequence[np.ndarray], batch_labels: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Direction-attack scores and the labels of the scored rows.

    Parameters
    ----------
    batches
        Per-step matrices whose rows are scored (``g_h`` or recovered gradients).
    batch_labels
        The labels of each batch's rows. Only the first positive of a batch is used as the
        attacker's side knowledge; the others are evaluation ground truth.

    Returns
    -------
    tuple of numpy.ndarray
        ``cos(x_b, x_{b*})`` for every row except ``b*`` of every batch with a positive, and the
        labels of those rows.
    """
    scores: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    for x, y in zip(batches, batch_labels, strict=True):
        positives = np.flatnonzero(y == 1)
        if positives.size == 0:
            continue
        known = int(positives[0])
        others = np.arange(x.shape[0]) != known
        scores.append(_cosine_to(x[others], x[known]))
        truth.append(y[others])
    if not scores:
        raise ValueError("no batch contains a positive row to serve as the known positive")
    return np.concatenate(scores), np.concatenate(truth)


def _labels_of(view: HostView, labels: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(labels)[r] for r in view.rows]


def norm_attack(view: HostView, labels: np.ndarray) -> float:
    """Leak AUC of the norm attack on ``g_h`` [Li22].

    Parameters
    ----------
    view
        The host's transcript.
    labels
        All true labels, indexed by row (evaluation only).

    Returns
    -------
    float
        ``max(AUC, 1 − AUC)`` of ``‖g_h[b]‖`` over every row of every step.
    """
    return leak_auc(norm_scores(view.gradients), np.concatenate(_labels_of(view, labels)))


def direction_attack(view: HostView, labels: np.ndarray) -> float:
    """Leak AUC of the direction attack on ``g_h`` (cosine to a known positive) [Li22].

    Parameters
    ----------
    view
        The host's transcript.
    labels
        All true labels, indexed by row (evaluation only, plus the known positive per batch).

    Returns
    -------
    float
        ``max(AUC, 1 − AUC)`` over the rows of every batch that holds a positive.
    """
    scores, truth = direction_scores(view.gradients, _labels_of(view, labels))
    return leak_auc(scores, truth)


def track_updates(view: HostView, k: int, *, rcond: float = 1e-9) -> dict[int, np.ndarray]:
    """The host's estimate of the B2 gradient ``D_t`` of every usable step (§4.7).

    Parameters
    ----------
    view
        The host's transcript; consecutive entries must be consecutive protocol steps.
    k
        The interactive width (public, in the ``JOB_SPEC``).
    rcond
        Relative cut-off for the numerical ranks of ``g_t`` and ``α_t P⊥``.

    Returns
    -------
    dict of int to numpy.ndarray
        For each step t < T − 1 with ``g_t ≠ 0`` and ``g_{t+1} ≠ 0``, a B×k matrix ``R_t``.
        When ``g_t`` has rank k (it then spans the column space of ``W_t``),
        ``R_t R_tᵀ = η_W² Π D_t (δ̃_{t+1}ᵀδ̃_{t+1}) D_tᵀ Π``: the rows of ``Π D_t`` up to a k×k
        transform, where ``Π = I`` when ``B ≤ d − k`` (exact recovery) and otherwise the
        projection onto the column space of ``α_t P⊥``. A lower rank (e.g. a unit of the
        guest's ReLU that is dead for the whole batch) leaves part of ``W_t`` unseen; the
        identity still holds when δ̃_{t+1} does not excite that part. ``η_W`` only rescales
        ``R_t``.
    """
    out: dict[int, np.ndarray] = {}
    for t in range(len(view.gradients) - 1):
        g_t, g_next, alpha = view.gradients[t], view.gradients[t + 1], view.embeddings[t]
        _, sv, vt = np.linalg.svd(g_t, full_matrices=False)
        rank = min(k, int(np.sum(sv > rcond * sv[0]))) if sv.size and sv[0] > 0 else 0
        if rank == 0:
            continue
        q = vt[:rank].T  # d × rank: the column space of W_t (the part δ̃_t excites)
        p_perp = np.eye(g_t.shape[1]) - q @ q.T
        a = alpha @ p_perp  # B × d, rank ≤ d − k
        # M̂ = −g_{t+1}P⊥A⁺ = η_W δ̃_{t+1} D_tᵀ Π (B×B, rank ≤ k); its left factor (A⁺)ᵀ is B×d,
        # so the SVD of M̂ᵀ = (A⁺)ᵀ(−P⊥g_{t+1}ᵀ) is taken through a thin QR of that factor.
        q_a, r_a = np.linalg.qr(np.linalg.pinv(a, rcond=rcond).T)
        small = r_a @ -(p_perp @ g_next.T)  # d × B
        if not np.any(small):
            continue
        u, s, _ = np.linalg.svd(small, full_matrices=False)
        out[t] = (q_a @ u[:, :k]) * s[:k]
    return out


def update_tracking_attack(
    view: HostView,
    labels: np.ndarray,
    k: int,
    *,
    recovered: dict[int, np.ndarray] | None = None,
    steps: range | None = None,
) -> float | None:
    """Leak AUC of the update-tracking attack (§4.7, test L7).

    The recovered ``R_t`` of :func:`track_updates` are scored by the norm attack and by the
    direction attack (known positive as in :func:`direction_attack`); the attack's leak AUC is
    the larger of the two.

    Parameters
    ----------
    view
        The host's transcript.
    labels
        All true labels, indexed by row (evaluation only, plus the known positive per batch).
    k
        The interactive width.
    recovered
        :func:`track_updates` of ``view``, if already computed (e.g. once for a whole run).
    steps
        Score only the recovered steps in this range (e.g. one epoch); None: all.

    Returns
    -------
    float or None
        ``max(AUC, 1 − AUC)`` of the better of the two scorings; None when no step in range
        could be recovered (e.g. all its gradients are zero).
    """
    found = track_updates(view, k) if recovered is None else recovered
    chosen = [t for t in sorted(found) if steps is None or t in steps]
    if not chosen:
        return None
    batches = [found[t] for t in chosen]
    batch_labels = [np.asarray(labels)[view.rows[t]] for t in chosen]
    by_norm = leak_auc(norm_scores(batches), np.concatenate(batch_labels))
    by_direction = leak_auc(*direction_scores(batches, batch_labels))
    return max(by_norm, by_direction)


def _steps_until(view: HostView, stop: int | None) -> range:
    return range(len(view.rows) if stop is None else min(stop, len(view.rows)))


def visit_means(
    view: HostView, *, embeddings: bool = False, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every row seen in steps ``0 .. stop − 1`` and the mean of its ``g_h`` (or α) over them.

    A visit whose ``g_h`` is exactly zero (``max_visits`` reached) carries nothing and is
    skipped, as an attacker would.

    Returns
    -------
    tuple of numpy.ndarray
        The sorted row indices and their means (one row of the matrix per index).
    """
    steps = _steps_until(view, stop)
    source = view.embeddings if embeddings else view.gradients
    rows = np.concatenate([view.rows[t] for t in steps])
    values = np.concatenate([source[t] for t in steps])
    if not embeddings:
        live = np.any(values != 0, axis=1)
        rows, values = rows[live], values[live]
    unique, inverse = np.unique(rows, return_inverse=True)
    sums = np.zeros((unique.size, values.shape[1]))
    np.add.at(sums, inverse, values)
    counts = np.bincount(inverse, minlength=unique.size)
    out: np.ndarray = sums / counts[:, None]
    return unique, out


def latest_embeddings(view: HostView, *, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row seen in steps ``0 .. stop − 1`` and its α at its latest visit (sorted by row)."""
    latest: dict[int, np.ndarray] = {}
    for t in _steps_until(view, stop):
        for row, alpha in zip(view.rows[t].tolist(), view.embeddings[t], strict=True):
            latest[row] = alpha
    rows = np.array(sorted(latest), dtype=np.int64)
    return rows, np.array([latest[r] for r in rows.tolist()])


def pc1_scores(x: np.ndarray) -> np.ndarray:
    """Each row's projection on the first principal component of the centred rows of ``x``."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out: np.ndarray = centred @ vt[0]
    return out


def known_rows(
    rows: np.ndarray, labels: np.ndarray, *, count: int, seed: int, balanced: bool
) -> np.ndarray:
    """The attacker's side knowledge: ``count`` rows of ``rows`` whose labels it knows.

    ``balanced``: half of them of each class (as with a few hand-labelled examples per class);
    else a stratified sample at the classes' rates with at least two of each class.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)[rows]
    chosen = []
    for cls in (0, 1):
        members = rows[y == cls]
        want = count // 2 if balanced else max(2, round(count * members.size / rows.size))
        chosen.append(rng.choice(members, size=min(want, members.size), replace=False))
    return np.sort(np.concatenate(chosen))


def averaging_attack(
    view: HostView, labels: np.ndarray, *, known: np.ndarray, stop: int | None = None
) -> dict[str, float]:
    """Leak AUCs of the multi-visit averaging attack on ``g_h`` (steps ``0 .. stop − 1``).

    Parameters
    ----------
    view
        The host's transcript.
    labels
        All true labels, indexed by row (evaluation, and the known rows' side knowledge).
    known
        Rows whose labels the attacker knows (:func:`known_rows`); only ``avg_direction`` uses
        them (the mean of the known positives' means), and they are not scored.
    stop
        Use the steps before this one (e.g. the end of an epoch); None: all.

    Returns
    -------
    dict of str to float
        ``avg_norm``, ``avg_pc1`` (no side knowledge) and ``avg_direction``.
    """
    rows, means = visit_means(view, stop=stop)
    y = np.asarray(labels)[rows]
    out = {
        "avg_norm": leak_auc(np.linalg.norm(means, axis=1), y),
        "avg_pc1": leak_auc(pc1_scores(means), y),
    }
    positives = np.isin(rows, known) & (y == 1)
    if positives.any():
        scored = ~np.isin(rows, known)
        reference = means[positives].mean(axis=0)
        out["avg_direction"] = leak_auc(_cosine_to(means[scored], reference), y[scored])
    return out


def clustering_attack(view: HostView, labels: np.ndarray, *, stop: int | None = None) -> float:
    """Leak AUC of the forward-embedding clustering attack on the host's own α [Sun22-FE].

    The better of two scorings without side knowledge: 2-means on the standardised α of each
    row's latest visit (distance to one centre minus distance to the other), and α's first
    principal component.
    """
    rows, alpha = latest_embeddings(view, stop=stop)
    y = np.asarray(labels)[rows]
    x = StandardScaler().fit_transform(alpha)
    centres = KMeans(n_clusters=2, n_init=4, random_state=0).fit(x).cluster_centers_
    by_cluster = np.linalg.norm(x - centres[0], axis=1) - np.linalg.norm(x - centres[1], axis=1)
    return max(leak_auc(by_cluster, y), leak_auc(pc1_scores(x), y))


def completion_attack(
    rows: np.ndarray, features: np.ndarray, labels: np.ndarray, *, known: np.ndarray
) -> float:
    """Leak AUC of passive model completion [Fu22]: a classifier fitted on the known rows.

    Parameters
    ----------
    rows
        Row indices of ``features`` (sorted).
    features
        Per-row features of the host (e.g. averaged ``g_h`` or α; raw features for a baseline).
    labels
        All true labels, indexed by row.
    known
        The rows whose labels the attacker knows; they train a logistic regression on the
        standardised features and are not scored.

    Returns
    -------
    float
        ``max(AUC, 1 − AUC)`` over the other rows.
    """
    y = np.asarray(labels)[rows]
    train = np.isin(rows, known)
    if np.unique(y[train]).size < 2:
        raise ValueError("model completion needs known rows of both classes")
    scaler = StandardScaler().fit(features[train])
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train]), y[train])
    scores = model.decision_function(scaler.transform(features[~train]))
    return leak_auc(scores, y[~train])


def differencing_attack(
    view: HostView, labels: np.ndarray, *, known: np.ndarray, stop: int | None = None
) -> dict[str, float]:
    """Leak AUCs of visit differencing: each row's last live ``g_h`` minus its first.

    Noise that is fixed per row (``persistence`` = 1) cancels in the difference; the label
    signal's change between the visits remains. Rows with fewer than two live visits are skipped;
    without any, the attack has nothing to score and returns an empty dict.

    Returns
    -------
    dict of str to float
        ``diff_norm``, ``diff_pc1`` (no side knowledge) and ``diff_completion`` (a logistic
        regression on the differences fitted on ``known``).
    """
    first: dict[int, np.ndarray] = {}
    last: dict[int, np.ndarray] = {}
    for t in _steps_until(view, stop):
        for row, g in zip(view.rows[t].tolist(), view.gradients[t], strict=True):
            if not np.any(g != 0):
                continue
            if row in first:
                last[row] = g
            else:
                first[row] = g
    rows = np.array(sorted(last), dtype=np.int64)
    if rows.size == 0:
        return {}
    diff = np.array([last[r] - first[r] for r in rows.tolist()])
    y = np.asarray(labels)[rows]
    if np.unique(y).size < 2:
        return {}
    out = {
        "diff_norm": leak_auc(np.linalg.norm(diff, axis=1), y),
        "diff_pc1": leak_auc(pc1_scores(diff), y),
    }
    if np.unique(y[np.isin(rows, known)]).size == 2:
        out["diff_completion"] = completion_attack(rows, diff, labels, known=known)
    return out
