"""The integer reference of the interactive layer: invariant, P0 == P1, closeness to float SGD."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.crypto.fixedpoint import FixedPointConfig, encode
from protocols.crypto.paillier import PublicKey
from protocols.errors import EncodingBoundError
from vfl.splitnn.reference import InteractiveReference
from vfl.splitnn.spec import SplitMode

FP = FixedPointConfig()


def run(
    mode: SplitMode, n: int, steps: int = 15
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, InteractiveReference]:
    rng = np.random.default_rng(0)
    d, k, b = 5, 3, 8
    w0_g, w0_h = rng.normal(0, 0.5, (d, k)), rng.normal(0, 0.5, (d, k))
    ref = InteractiveReference(mode=mode, n=n)
    shares = ref.init(w0_g, w0_h)
    assert (
        ref.weights(shares)
        == encode(w0_g, scale=FP.f_w, bound=128) + encode(w0_h, scale=FP.f_w, bound=128)
    ).all()
    w_float = w0_g + w0_h
    zs, gs = [], []
    for _ in range(steps):
        alpha = np.tanh(rng.normal(0, 1, (b, d)))
        delta = rng.normal(0, 0.05, (b, k))
        before = ref.weights(shares)
        a_hat, z = ref.forward(shares, alpha)
        g, shares = ref.backward(shares, a_hat, delta, eta=0.1)
        big_d = encode(0.1 * delta, scale=FP.f_d, bound=FP.delta_max)
        assert (ref.weights(shares) == before - a_hat.T.dot(big_d)).all()  # exact re-sharing
        assert np.abs(z - alpha @ w_float).max() < 1e-6
        assert np.abs(g - delta @ w_float.T).max() < 1e-6
        w_float = w_float - 0.1 * alpha.T @ delta
        zs.append(z)
        gs.append(g)
    final = np.array([[float(v) for v in row] for row in ref.weights(shares)]) / 2.0**FP.f_w
    return zs, gs, final - w_float, ref


def test_p0_and_p1_agree_bit_for_bit_and_track_float_sgd(pk: PublicKey) -> None:
    z0, g0, err0, _ = run(SplitMode.P0, int(pk.n))
    z1, g1, err1, ref1 = run(SplitMode.P1, int(pk.n))
    assert all((a == b).all() for a, b in zip(z0, z1, strict=True))
    assert all((a == b).all() for a, b in zip(g0, g1, strict=True))
    assert np.abs(err0).max() < 1e-8 and np.abs(err1).max() < 1e-8


def test_p1_shares_stay_statistically_masked(pk: PublicKey) -> None:
    ref = InteractiveReference(mode=SplitMode.P1, n=pk.n)
    shares = ref.init(np.zeros((4, 2)), np.zeros((4, 2)))
    assert all(abs(int(v)) < 2**127 for v in shares.e.reshape(-1))
    assert len({int(v) for v in shares.e.reshape(-1)}) == 8  # fresh, no reuse
    a_hat, _ = ref.forward(shares, np.zeros((3, 4)))
    _, after = ref.backward(shares, a_hat, np.zeros((3, 2)), eta=0.5)
    assert not set(map(int, after.e.reshape(-1))) & set(map(int, shares.e.reshape(-1)))


def test_bounds(pk: PublicKey) -> None:
    ref = InteractiveReference(mode=SplitMode.P0, n=pk.n)
    shares = ref.init(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(EncodingBoundError):
        ref.forward(shares, np.full((1, 2), 8.5))  # |α| > A_max before anything is encrypted
    a_hat, _ = ref.forward(shares, np.zeros((1, 2)))
    with pytest.raises(ValueError, match="η_W"):
        ref.backward(shares, a_hat, np.zeros((1, 2)), eta=1.5)
