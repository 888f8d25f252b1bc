"""RDP accountant of the sampled Gaussian mechanism (docs/protocol.md §7.2, test L5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from protocols.errors import ConfigError
from vfl.privacy.accountant import ORDERS, RdpAccountant, epsilon, rdp_sampled_gaussian

Q = 256 / 60000
T = 4687
DELTA = 1e-5
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_pinned_grid() -> None:
    expected = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, *range(5, 64), 128, 256, 512]
    assert list(ORDERS) == expected


@pytest.mark.parametrize(("sigma", "eps"), [(1.3, 1.106), (1.0, 1.773), (0.7, 4.548)])
def test_l5_reference_values(sigma: float, eps: float) -> None:
    got, order = epsilon(q=Q, sigma=sigma, steps=T, delta=DELTA)
    assert got == pytest.approx(eps, abs=0.005)
    assert order in ORDERS


@pytest.mark.parametrize(("sigma", "eps"), [(1.3, 1.106), (1.0, 1.759), (0.7, 4.498)])
def test_opacus_grid_values(sigma: float, eps: float) -> None:
    got, _ = epsilon(q=Q, sigma=sigma, steps=T, delta=DELTA, orders=OPACUS_ORDERS)
    assert got == pytest.approx(eps, abs=0.005)


def test_integer_orders_2_to_256_match_pinned_grid() -> None:
    pinned, _ = epsilon(q=Q, sigma=1.0, steps=T, delta=DELTA)
    integers, _ = epsilon(q=Q, sigma=1.0, steps=T, delta=DELTA, orders=range(2, 257))
    assert integers == pytest.approx(pinned, abs=1e-9)


def test_full_batch_is_the_gaussian_mechanism() -> None:
    sigma = 1.7
    rdp = rdp_sampled_gaussian(q=1.0, sigma=sigma)
    np.testing.assert_allclose(rdp, np.array(ORDERS) / (2 * sigma**2), rtol=1e-12)


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.0), (0.3, 0.7), (Q, 1.3)])
def test_rdp_matches_numerical_integral(q: float, sigma: float) -> None:
    """``A_α = E_{z∼N(0,σ²)}[(1 − q + q·e^{(2z−1)/(2σ²)})^α]`` for fractional and integer α."""
    orders = [1.25, 2.5, 3, 4.5, 7.3]
    rdp = rdp_sampled_gaussian(q=q, sigma=sigma, orders=orders)
    for alpha, got in zip(orders, rdp, strict=True):

        def integrand(z: float, alpha: float = alpha) -> float:
            log_mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
            return math.exp(alpha * log_mix - z * z / (2 * sigma**2)) / (
                sigma * math.sqrt(2 * math.pi)
            )

        a, _ = integrate.quad(integrand, -30 * sigma, 30 * sigma + 2, limit=400, points=[0, 1])
        assert got == pytest.approx(math.log(a) / (alpha - 1), rel=1e-6)


def test_fractional_and_integer_branches_agree() -> None:
    near, exact = rdp_sampled_gaussian(q=0.05, sigma=0.9, orders=[3.0000001, 3])
    assert near == pytest.approx(exact, rel=1e-5)


def test_monotone_in_steps_rate_and_noise() -> None:
    def eps(**kw: float) -> float:
        args = {"q": Q, "sigma": 1.0, "steps": T} | kw
        return epsilon(q=args["q"], sigma=args["sigma"], steps=int(args["steps"]), delta=DELTA)[0]

    base = eps()
    assert eps(steps=2 * T) > base > eps(steps=T // 2)
    assert eps(q=2 * Q) > base > eps(q=Q / 2)
    assert eps(sigma=0.8) > base > eps(sigma=1.5)
    assert epsilon(q=Q, sigma=1.0, steps=T, delta=1e-7)[0] > base


def test_rdp_grows_with_order() -> None:
    rdp = rdp_sampled_gaussian(q=0.02, sigma=1.1)
    assert np.all(np.diff(rdp) > 0)
    assert np.all(rdp > 0)


def test_more_orders_never_raise_epsilon() -> None:
    small, _ = epsilon(q=Q, sigma=0.7, steps=T, delta=DELTA, orders=[2, 4, 8, 16])
    large, _ = epsilon(q=Q, sigma=0.7, steps=T, delta=DELTA, orders=[2, 4, 8, 16, *ORDERS])
    assert large <= small


def test_rdp_is_a_fresh_array() -> None:
    a = rdp_sampled_gaussian(q=0.1, sigma=1.0)
    a[:] = -1
    assert np.all(rdp_sampled_gaussian(q=0.1, sigma=1.0) > 0)


def test_zero_steps_and_tiny_privacy_loss() -> None:
    assert epsilon(q=Q, sigma=1.0, steps=0, delta=DELTA)[0] == 0.0
    # Huge noise, one step: the composed RDP is below -log(1 - δ²), so ε = 0.
    assert epsilon(q=1e-4, sigma=1e3, steps=1, delta=0.5)[0] == 0.0


def test_accountant_counts_steps() -> None:
    acc = RdpAccountant(q=Q, sigma=1.0)
    assert acc.epsilon() == 0.0
    acc.step()
    assert acc.steps == 1
    acc.step(T - 1)
    assert acc.steps == T
    assert acc.epsilon() == epsilon(q=Q, sigma=1.0, steps=T, delta=1e-5)[0]
    assert acc.epsilon() == pytest.approx(1.773, abs=0.005)
    before = acc.epsilon()
    acc.step(100)
    assert acc.epsilon() > before
    acc.step(0)
    assert acc.steps == T + 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"q": 0.0}, "sampling rate"),
        ({"q": 1.5}, "sampling rate"),
        ({"sigma": 0.0}, "noise multiplier"),
        ({"sigma": -1.0}, "noise multiplier"),
        ({"sigma": math.inf}, "noise multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"steps": -1}, "steps"),
        ({"orders": [1.0, 2.0]}, "orders"),
        ({"orders": []}, "empty"),
    ],
)
def test_invalid_inputs(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"q": Q, "sigma": 1.0, "steps": T, "delta": DELTA} | kwargs
    with pytest.raises(ConfigError, match=match):
        epsilon(**args)  # type: ignore[arg-type]


def test_invalid_accountant() -> None:
    with pytest.raises(ConfigError, match="sampling rate"):
        RdpAccountant(q=2.0, sigma=1.0)
    with pytest.raises(ConfigError, match="noise multiplier"):
        RdpAccountant(q=0.1, sigma=0.0)
    with pytest.raises(ConfigError, match="delta"):
        RdpAccountant(q=0.1, sigma=1.0, delta=0.0)
    acc = RdpAccountant(q=0.1, sigma=1.0)
    with pytest.raises(ConfigError, match="step count"):
        acc.step(-1)
    with pytest.raises(ValueError, match="noise multiplier"):  # ConfigError is a ValueError
        rdp_sampled_gaussian(q=0.1, sigma=0.0)
