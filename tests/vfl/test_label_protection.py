"""Label protection on δ̃ itself (synthetic gradients); the attacks on what the host sees,
``g_h = δ̃W_tᵀ`` in a training run, and L6 are in test_label_leakage.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.errors import ConfigError, InsecureConfigError
from vfl.privacy.attacks import leak_auc
from vfl.privacy.label_dp import (
    account,
    keep_probability,
    randomize_labels,
    randomized_response,
    rr_with_prior,
)
from vfl.privacy.label_protection import (
    MarvellState,
    ProtectConfig,
    ProtectMode,
    RowNoise,
    embedding_noise,
    new_generator,
    protect,
)

FRESH_MARVELL = ProtectConfig(mode=ProtectMode.MARVELL, persistence=0.0, power_scale=4.0)


def batch(rng: np.random.Generator, n: int = 4000, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced binary labels (5 % positive); BCE-like gradients, positives larger."""
    y = (rng.random(n) < 0.05).astype(float)
    p = np.clip(rng.normal(0.1, 0.05, n), 0.01, 0.99)
    direction = rng.normal(0, 1, k)
    scale = (p - y)[:, None] / n  # mean-reduced loss: |δ| ~ 1/B, sign and size follow the label
    delta = scale * direction + rng.normal(0, 0.02 / n, (n, k))
    return delta, y


def test_none_needs_the_allow_flag() -> None:
    with pytest.raises(InsecureConfigError, match="reveals labels"):
        ProtectConfig(mode=ProtectMode.NONE)
    ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)
    assert ProtectConfig().mode is not ProtectMode.NONE  # a protecting mode is the default


def test_norm_attack_on_delta_tilde() -> None:
    rng = np.random.default_rng(0)
    delta, y = batch(rng)
    plain = protect(delta, ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True), rng=rng)
    assert leak_auc(np.linalg.norm(plain, axis=1), y) > 0.9  # documents the risk
    protected = protect(delta, ProtectConfig(mode=ProtectMode.MAX_NORM, persistence=0.0), rng=rng)
    assert leak_auc(np.linalg.norm(protected, axis=1), y) < 0.6
    # Only on δ̃: on g_h = δ̃W_tᵀ the norms differ again (test_label_leakage.py, L2).
    marvell = protect(delta, FRESH_MARVELL, rng=rng, labels=y)
    assert leak_auc(np.linalg.norm(marvell, axis=1), y) < 0.6


def test_marvell_noise_shape_and_single_class_batches() -> None:
    rng = np.random.default_rng(3)
    delta, y = batch(rng, n=20000, k=4)
    config = FRESH_MARVELL
    state = MarvellState()
    noise = protect(delta, config, rng=rng, labels=y, state=state) - delta
    assert state.noise is not None and state.direction is not None
    e, solved = state.direction, state.noise
    for cls, (a, b) in {1: (solved.a1, solved.b1), 0: (solved.a0, solved.b0)}.items():
        rows = noise[y == cls]
        along = rows @ e
        assert abs(along.var() / a - 1) < 0.1  # Σ_y = a_y eeᵀ + b_y (I − eeᵀ)
        across = rows - np.outer(along, e)
        assert abs((across**2).sum(axis=1).mean() / (3 * b) - 1) < 0.1 or 3 * b < 1e-3 * a
    negatives = delta[y == 0][:64]
    zeros = np.zeros(64)
    # with a state: the negatives' noise of the last two-class batch
    kept = protect(negatives, config, rng=rng, labels=zeros, state=state) - negatives
    assert abs(np.mean((kept @ e) ** 2) / solved.a0 - 1) < 0.5
    # without: isotropic noise of total power s·max‖δ_b‖²
    alone = protect(negatives, config, rng=rng, labels=zeros) - negatives
    power = 4 * float(np.max(np.sum(negatives**2, axis=1)))
    assert abs(np.mean(np.sum(alone**2, axis=1)) / power - 1) < 0.3
    with pytest.raises(ConfigError, match="labels"):
        protect(negatives, config, rng=rng)
    assert math.isfinite(solved.objective)


def test_embedding_noise_is_fresh_and_bounded() -> None:
    rng = new_generator()
    alpha = np.full((5, 4), 7.9)
    a, b = (
        embedding_noise(alpha, sigma=0.5, a_max=8.0, rng=rng),
        embedding_noise(alpha, sigma=0.5, a_max=8.0, rng=rng),
    )
    assert np.abs(a).max() <= 8.0 and not np.array_equal(a, b)
    assert np.array_equal(embedding_noise(alpha, sigma=0.0, a_max=8.0, rng=rng), alpha)


# ---------------------------------------------------------------------------------------------
# §4.7.1: noise that holds across a row's visits


def test_persistent_noise_is_the_same_at_every_visit_and_standard_per_step() -> None:
    rng = np.random.default_rng(7)
    delta, y = batch(rng, n=6000, k=4)
    rows = np.arange(len(y))
    noise = RowNoise(seed=123, k=4)
    config = ProtectConfig(power_scale=4.0)  # persistence 1, the default
    first = protect(delta, config, rng=rng, labels=y, rows=rows, row_noise=noise) - delta
    again = protect(delta, config, rng=rng, labels=y, rows=rows, row_noise=noise) - delta
    assert np.allclose(first, again)  # averaging a row's visits cannot remove it
    fresh = protect(delta, FRESH_MARVELL, rng=rng, labels=y) - delta
    assert not np.allclose(fresh, protect(delta, FRESH_MARVELL, rng=rng, labels=y) - delta)
    # the per-step marginal is Marvell's either way: same power per class
    for cls in (0, 1):
        ratio = np.mean(first[y == cls] ** 2) / np.mean(fresh[y == cls] ** 2)
        assert 0.85 < ratio < 1.15, ratio
    # a resumed guest rebuilds the same z_r from the seed; another job's seed differs
    assert np.array_equal(RowNoise(seed=123, k=4).of(rows[:50]), noise.of(rows[:50]))
    assert not np.allclose(RowNoise(seed=124, k=4).of(rows[:50]), noise.of(rows[:50]))
    half = ProtectConfig(persistence=0.5, power_scale=4.0)
    a = protect(delta, half, rng=rng, labels=y, rows=rows, row_noise=noise) - delta
    b = protect(delta, half, rng=rng, labels=y, rows=rows, row_noise=noise) - delta
    correlation = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert 0.4 < correlation < 0.6  # ρ = 0.5 between two visits


def test_persistent_noise_needs_the_rows() -> None:
    delta, y = batch(np.random.default_rng(1), n=64)
    with pytest.raises(ConfigError, match="rows"):
        protect(delta, ProtectConfig(), rng=np.random.default_rng(0), labels=y)
    with pytest.raises(ConfigError, match="persistence"):
        ProtectConfig(persistence=1.5)
    with pytest.raises(ConfigError, match="max_visits"):
        ProtectConfig(max_visits=-1)


def test_marvell_applies_to_every_task() -> None:
    """The default mode protects multiclass and regression gradients too (isotropic, s·mean)."""
    rng = np.random.default_rng(2)
    delta = rng.normal(0, 1e-3, (256, 4))
    for classes in (1, 5):
        config = ProtectConfig(num_classes=classes, persistence=0.0, power_scale=4.0)
        noise = protect(delta, config, rng=rng) - delta
        power = 4 * float(np.mean(np.sum(delta**2, axis=1)))
        assert abs(np.mean(np.sum(noise**2, axis=1)) / power - 1) < 0.2


# ---------------------------------------------------------------------------------------------
# §4.7.2: rr_labels (L4)


def test_l4_randomized_response_flip_rate() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(200_000) < 0.2).astype(float)
    for epsilon in (0.5, 2.0):
        flipped = randomized_response(y, epsilon=epsilon, rng=rng) != y
        rate, expected = flipped.mean(), 1 / (1 + math.exp(epsilon))
        assert abs(rate - expected) < 3 * math.sqrt(expected * (1 - expected) / y.size)
        for cls in (0, 1):  # independent of the label
            assert abs(flipped[y == cls].mean() - expected) < 0.01


def test_rr_with_prior_is_epsilon_dp_per_row() -> None:
    """For every prior, P(ỹ = o | y = 1) / P(ỹ = o | y = 0) ≤ e^ε for both outputs o."""
    epsilon = 1.0
    rng = np.random.default_rng(5)
    n = 100_000
    for prior in (0.02, 0.3, 0.5, 0.8, 0.99):
        p = np.full(n, prior)
        ones = rr_with_prior(np.ones(n), p, epsilon=epsilon, rng=rng).mean()
        zeros = rr_with_prior(np.zeros(n), p, epsilon=epsilon, rng=rng).mean()
        for a, b in ((ones, zeros), (1 - ones, 1 - zeros)):
            if a > 0 or b > 0:
                assert min(a, b) > 0 and max(a, b) / min(a, b) < math.exp(epsilon) * 1.05
        if max(prior, 1 - prior) >= keep_probability(epsilon):
            assert ones == zeros == float(prior >= 0.5)  # the prior's class, whatever y is


def test_randomize_labels_keeps_other_rows_and_uses_the_prior() -> None:
    rng = np.random.default_rng(6)
    n = 20_000
    x = rng.normal(0, 1, (n, 3))
    y = (rng.random(n) < 1 / (1 + np.exp(-(3 * x[:, 0] - 3)))).astype(float)  # ~10 % positives
    rows = np.arange(n // 2)
    noisy = randomize_labels(y, rows=rows, x=x, epsilon=1.0, prior=True, seed=9)
    assert np.array_equal(noisy[n // 2 :], y[n // 2 :])  # test rows untouched
    assert np.array_equal(
        noisy, randomize_labels(y, rows=rows, x=x, epsilon=1.0, prior=True, seed=9)
    )
    plain = randomize_labels(y, rows=rows, x=x, epsilon=1.0, prior=False, seed=9)

    def wrong(labels: np.ndarray) -> float:
        return float(np.mean(labels[rows] != y[rows]))

    assert wrong(noisy) < wrong(plain) - 0.05  # the prior spares the confident rows
    with pytest.raises(ConfigError, match="binary"):
        randomize_labels(y + 1, rows=rows, x=x, epsilon=1.0, prior=True, seed=9)


def test_the_accountant_reports_epsilon_only_for_rr_labels() -> None:
    formal = account(mode="rr_labels", epsilon=2.0).to_json()
    assert formal["label_dp_epsilon"] == 2.0 and formal["guarantee"] == "formal"
    assert account(mode="marvell", epsilon=None).label_dp_epsilon is None


def test_an_rr_labels_split_depends_on_no_label() -> None:
    """§4.7.2: the split the host learns (FIT_ROWS, BATCH, EVAL_BATCH) must not move when one
    label changes; the stratified split (other modes) does, in general."""
    from vfl.data.tables import split_rows

    y = (np.random.default_rng(3).random(400) < 0.2).astype(float)
    other = y.copy()
    other[int(np.flatnonzero(y == 1)[0])] = 0.0
    kw = {"test_fraction": 0.2, "validation_fraction": 0.1, "seed": 0}
    a, b = split_rows(y, stratified=False, **kw), split_rows(other, stratified=False, **kw)
    assert all(np.array_equal(x, z) for x, z in zip(a.__dict__.values(), b.__dict__.values()))
    moved = [
        split_rows(y, **dict(kw, seed=s)).test.tolist()
        != split_rows(other, **dict(kw, seed=s)).test.tolist()
        for s in range(5)
    ]
    assert any(moved)
