"""RDP accountant for the sampled Gaussian mechanism and its (ε, δ) conversion.

See docs/protocol.md §7.2.

What is accounted: T steps of DP-SGD (:mod:`vfl.privacy.dp`), each a *sampled Gaussian
mechanism*: every record joins the step's batch independently with probability ``q`` (Poisson
sampling), the per-example gradients are clipped to norm ``C`` and summed, and Gaussian noise
``N(0, σ²C²)`` is added. The guarantee is record-level (add/remove one record) for the released
sequence of noisy sums; it says nothing about records sampled with another rate or scheme.

Steps
-----
1. Per-step Rényi DP at order α [MTZ19]: ``ε_RDP(α) = log(A_α)/(α − 1)`` with
   ``A_α = E_{z∼N(0,σ²)}[((1 − q) + q·exp((2z − 1)/(2σ²)))^α]``.

   * Integer α: binomial expansion
     ``A_α = Σ_{k=0}^{α} C(α, k)(1 − q)^{α−k} q^k exp((k² − k)/(2σ²))``, summed in log space.
   * Fractional α: split the integral at ``z₀ = σ² log(1/q − 1) + ½`` (where the two mixture
     weights cross) and expand each side with the generalised binomial series:
     ``A_α = Σ_{i≥0} C(α, i)[(1 − q)^{α−i} q^i e^{(i²−i)/(2σ²)} Φ((z₀ − i)/σ)
     + q^{α−i}(1 − q)^i e^{(j²−j)/(2σ²)} Φ((j − z₀)/σ)]``, ``j = α − i``. ``C(α, i)``
     changes sign for ``i > α``; terms are accumulated in log space with their signs and the
     series stops once both of a step's terms are below ``e^{−30}``.
   * ``q = 1`` is the plain Gaussian mechanism: ``ε_RDP(α) = α/(2σ²)``.

2. Composition: T steps give ``T·ε_RDP(α)`` at every order.

3. Conversion [Balle20]:
   ``ε = min_α [T·ε_RDP(α) + log1p(−1/α) − (log δ + log α)/(α − 1)]`` over the pinned order
   grid :data:`ORDERS`, floored at 0. An order whose composed RDP is at most ``−log(1 − δ²)``
   gives ε = 0 directly (the KL divergence is at most the RDP, and by Bretagnolle-Huber the total
   variation is at most ``sqrt(1 − e^{−KL})`` ≤ δ).

Reference values (q = 256/60000, T = 4687, δ = 1e-5, pinned grid): σ = 1.3 ⇒ ε = 1.106,
σ = 1.0 ⇒ 1.773, σ = 0.7 ⇒ 4.548 (test L5). A larger grid can only lower ε.

References
----------
[MTZ19] I. Mironov, K. Talwar, L. Zhang, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530, 2019.
[Balle20] B. Balle, G. Barthe, M. Gaboardi, J. Hsu, T. Sato, "Hypothesis Testing
Interpretations and Rényi Differential Privacy", AISTATS 2020.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from protocols.errors import ConfigError

__all__ = ["ORDERS", "RdpAccountant", "epsilon", "rdp_sampled_gaussian"]

ORDERS: tuple[float, ...] = (
    1.25,
    1.5,
    1.75,
    2,
    2.25,
    2.5,
    3,
    3.5,
    4,
    4.5,
    *range(5, 64),
    128,
    256,
    512,
)
"""The pinned Rényi order grid of §7.2 (TF-Privacy's default); reported ε values use it."""

_LOG_TERM_CUTOFF = -30.0  # fractional series: stop once both terms of a step are below e^-30
_MAX_SERIES_TERMS = 100_000  # far beyond what any sane (q, σ, α) needs; guards an endless loop


def _check_mechanism(q: float, sigma: float) -> None:
    if not (isinstance(q, int | float) and 0 < q <= 1):
        raise ConfigError(
            f"sampling rate q = {q!r} must lie in (0, 1]; use q = batch size / dataset size"
        )
    if not (isinstance(sigma, int | float) and sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(
            f"noise multiplier sigma = {sigma!r} must be a positive finite number; "
            "sigma = 0 gives no privacy (epsilon = inf)"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(
            f"delta = {delta!r} must lie in (0, 1); use a value well below 1/n, e.g. 1e-5"
        )


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(a) for a in orders)
    if not checked:
        raise ConfigError("the Rényi order grid is empty; pass orders=ORDERS (the pinned grid)")
    bad = [a for a in checked if not (a > 1 and math.isfinite(a))]
    if bad:
        raise ConfigError(f"Rényi orders must be finite and > 1, got {bad}; remove them")
    return checked


def _log_sub(log_a: float, log_b: float) -> float:
    """``log(e^a − e^b)`` for ``a ≥ b`` (−inf when equal)."""
    if log_b == -math.inf:
        return log_a
    if log_b >= log_a:
        return -math.inf
    return log_a + math.log1p(-math.exp(log_b - log_a))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """``log A_α`` for an integer order by the binomial expansion (Step 1)."""
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
    log_terms = (
        log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2.0 * sigma**2)
    )
    return float(special.logsumexp(log_terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """``log A_α`` for a fractional order by the two-sided series (Step 1)."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma**2 * (log_1mq - log_q) + 0.5
    two_var = 2.0 * sigma**2
    # Positive and negative parts of the series, each as a log-sum.
    log_pos, log_neg = -math.inf, -math.inf
    log_abs_coef, sign = 0.0, 1.0  # C(α, 0) = 1
    for i in range(_MAX_SERIES_TERMS):
        j = alpha - i
        log_s0 = (
            log_abs_coef
            + i * log_q
            + j * log_1mq
            + (i * i - i) / two_var
            + float(special.log_ndtr((z0 - i) / sigma))
        )
        log_s1 = (
            log_abs_coef
            + j * log_q
            + i * log_1mq
            + (j * j - j) / two_var
            + float(special.log_ndtr((j - z0) / sigma))
        )
        log_step = float(np.logaddexp(log_s0, log_s1))
        if sign > 0:
            log_pos = float(np.logaddexp(log_pos, log_step))
        else:
            log_neg = float(np.logaddexp(log_neg, log_step))
        if max(log_s0, log_s1) < _LOG_TERM_CUTOFF:
            break
        # C(α, i+1) = C(α, i)·(α − i)/(i + 1); the factor is negative once i > α.
        factor = (alpha - i) / (i + 1)
        if factor == 0:
            break
        log_abs_coef += math.log(abs(factor))
        sign *= math.copysign(1.0, factor)
    else:  # pragma: no cover - the terms decay geometrically long before this
        raise ConfigError(
            f"the RDP series for q = {q}, sigma = {sigma}, alpha = {alpha} did not converge; "
            "use an integer order or a larger sigma"
        )
    return _log_sub(log_pos, log_neg)


@functools.lru_cache(maxsize=256)
def _rdp_cached(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """Per-step RDP at each order; memoised per (q, σ, grid), immutable result."""
    out = []
    for alpha in orders:
        if q == 1.0:
            out.append(alpha / (2.0 * sigma**2))
            continue
        if alpha.is_integer():
            log_a = _log_a_int(q, sigma, int(alpha))
        else:
            log_a = _log_a_frac(q, sigma, alpha)
        out.append(max(log_a, 0.0) / (alpha - 1))  # A_α ≥ 1 exactly; clip rounding below 0
    return tuple(out)


def rdp_sampled_gaussian(*, q: float, sigma: float, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """Per-step Rényi DP of the sampled Gaussian mechanism at each order.

    Parameters
    ----------
    q
        Poisson sampling rate, ``0 < q ≤ 1``.
    sigma
        Noise multiplier σ (noise std divided by the clipping norm), ``σ > 0``.
    orders
        Rényi orders α > 1; default the pinned grid :data:`ORDERS`.

    Returns
    -------
    numpy.ndarray
        ``ε_RDP(α)`` for one step, one entry per order (a fresh array; results are cached
        per ``(q, σ, orders)``).

    Raises
    ------
    ConfigError
        If q, σ or an order is out of range.
    """
    _check_mechanism(q, sigma)
    checked = _check_orders(orders)
    return np.array(_rdp_cached(float(q), float(sigma), checked), dtype=np.float64)


def epsilon(
    *, q: float, sigma: float, steps: int, delta: float, orders: Sequence[float] = ORDERS
) -> tuple[float, float]:
    """ε after ``steps`` sampled Gaussian steps, by the improved conversion of [Balle20].

    Parameters
    ----------
    q
        Poisson sampling rate, ``0 < q ≤ 1``.
    sigma
        Noise multiplier σ, ``σ > 0``.
    steps
        Number of steps T ≥ 0 (DP-SGD: ``epochs·ceil(n/B)``).
    delta
        Target δ, ``0 < δ < 1``.
    orders
        Rényi orders to minimise over; default the pinned grid :data:`ORDERS`.

    Returns
    -------
    tuple of (float, float)
        ``(ε, α*)``: the smallest ε over the grid (≥ 0, ``inf`` if every order overflows) and
        the order attaining it. With ``steps = 0`` nothing was released: ``(0.0, orders[0])``.

    Raises
    ------
    ConfigError
        If an argument is out of range.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(
            f"steps = {steps!r} must be a non-negative integer (T = epochs·ceil(n/B))"
        )
    _check_delta(delta)
    rdp = rdp_sampled_gaussian(q=q, sigma=sigma, orders=orders)
    alphas = np.array(_check_orders(orders), dtype=np.float64)
    if steps == 0:
        return 0.0, float(alphas[0])
    total = steps * rdp
    with np.errstate(over="ignore", invalid="ignore"):
        eps = total + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    eps = np.where(np.isnan(eps), math.inf, eps)
    # Step 3: a composed RDP this small bounds the total variation by δ itself.
    eps = np.where(total <= -math.log1p(-(delta**2)), 0.0, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


@dataclass
class RdpAccountant:
    """Counts DP-SGD steps of one sampled Gaussian mechanism and reports ε.

    Parameters
    ----------
    q
        Poisson sampling rate per step (``batch/n``).
    sigma
        Noise multiplier σ.
    delta
        Target δ (default 1e-5).
    steps
        Steps taken so far.

    Examples
    --------
    >>> acc = RdpAccountant(q=256 / 60000, sigma=1.0)
    >>> acc.step(4687)
    >>> round(acc.epsilon(), 3)
    1.773
    """

    q: float
    sigma: float
    delta: float = 1e-5
    steps: int = 0

    def __post_init__(self) -> None:
        _check_mechanism(self.q, self.sigma)
        _check_delta(self.delta)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps = {self.steps!r} must be a non-negative integer")

    def step(self, count: int = 1) -> None:
        """Record ``count`` more steps (``count ≥ 0``)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"step count = {count!r} must be a non-negative integer")
        self.steps += count

    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta` over the pinned grid (0.0 before the first step)."""
        if self.steps == 0:
            return 0.0
        eps, _ = epsilon(q=self.q, sigma=self.sigma, steps=self.steps, delta=self.delta)
        return eps
