"""Label protection on δ̃ itself (synthetic gradients); the attacks on what the host sees,
``g_h = δ̃W_tᵀ`` in a training run, and L6 are in test_label_leakage.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocols.errors import ConfigError, InsecureConfigError
from vfl.privacy.attacks import leak_auc
from vfl.privacy.label_protection import (
    MarvellState,
    ProtectConfig,
    ProtectMode,
    embedding_noise,
    new_generator,
    protect,
)


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
    protected = protect(delta, ProtectConfig(mode=ProtectMode.MAX_NORM), rng=rng)
    assert leak_auc(np.linalg.norm(protected, axis=1), y) < 0.6
    # Only on δ̃: on g_h = δ̃W_tᵀ the norms differ again (test_label_leakage.py, L2).
    marvell = protect(delta, ProtectConfig(mode=ProtectMode.MARVELL), rng=rng, labels=y)
    assert leak_auc(np.linalg.norm(marvell, axis=1), y) < 0.6


def test_marvell_noise_shape_and_single_class_batches() -> None:
    rng = np.random.default_rng(3)
    delta, y = batch(rng, n=20000, k=4)
    config = ProtectConfig(mode=ProtectMode.MARVELL)
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
