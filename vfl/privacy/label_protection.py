"""Label protection of the host-bound gradient, ``δ̃ = Protect(δ, y)`` (docs/protocol.md §4.7).

Roles: only the guest runs this, on δ = ∂L/∂z (B×k) before encoding it for B1 and B2;
the same δ̃ is used in both products, so the host's whole view is a function of {δ̃_t}.
The guest knows δ and the labels but not ``W_h``, so it can only shape δ̃; the host sees
``g_h = δ̃·W_tᵀ``, a linear image of δ̃ (divergences between the classes cannot grow under it,
but a statistic such as the row norm can: see ``max_norm``).

Modes (row-wise; afterwards every mode clips δ̃ elementwise to ``±Δ_max``):

* ``none``: δ̃ = δ. Leaks labels; needs ``allow_label_leak=True`` and logs a warning.
* ``gaussian``: δ̃_b = δ_b·min(1, C/‖δ_b‖) + N(0, σ²C² I) — clip + Gaussian (DP-SGD recipe;
  empirical protection, not a formal label-DP bound). ``C`` is absolute: with a mean-reduced
  loss ‖δ_b‖ = O(1/B), so C must be chosen for the batch size.
* ``max_norm``: δ̃_b = δ_b + N(0, σ_b² I), σ_b² = (max_b' ‖δ_b'‖² − ‖δ_b‖²)/k — every row
  gets the norm of the largest in expectation, which defeats the norm attack *on δ̃*. It does
  not defeat it on the host's ``g_h = δ̃W_tᵀ`` (an anisotropic ``W_t`` weighs the label-aligned
  signal and the isotropic noise differently), nor the direction attack.
* ``marvell`` (binary labels only; needs the batch's labels): per batch, class means
  ``μ_1, μ_0``, per-class isotropic variances ``v_1, v_0`` (mean per-coordinate variance),
  ``Δ = μ_1 − μ_0``, ``e = Δ/‖Δ‖``, ``p`` the positive fraction; row b of class y gets
  ``N(0, a_y eeᵀ + b_y(I − eeᵀ))`` with the four scalars minimising the symmetrised KL
  divergence ``J`` of the two perturbed class Gaussians under the power budget
  ``p(a_1 + (k−1)b_1) + (1−p)(a_0 + (k−1)b_0) ≤ P = s·‖Δ‖²`` [Li22] (:func:`marvell_solve`,
  torch L-BFGS on softplus parameters, started from isotropic noise of the same power, so the
  result is never worse than that). A batch that holds only one class has no ``Δ``; its rows
  get their class's noise of the last two-class batch if the caller keeps a
  :class:`MarvellState`, else isotropic noise of total power ``s·max_b ‖δ_b‖²`` (Li et al.'s
  code would leave such a batch unprotected).

Noise across a row's visits (``persistence`` ρ, docs/protocol.md §4.7.1): a row is seen once per
epoch, and fresh noise averages out over its visits while its label signal does not (the
multi-visit attack). Every mode's standard-normal draw for row r is therefore
``√ρ·z_r + √(1−ρ)·z_fresh``, with ``z_r`` fixed for the whole job (:class:`RowNoise`, derived
from a secret seed and the row's index); each step's marginal is unchanged, and the part of the
noise that averaging cannot remove has variance ρ at every visit count. Non-binary tasks have no
two classes: ``marvell`` then gives every row isotropic noise of power ``s·mean_b ‖δ_b‖²``, so
the default applies to every task.

Noise comes from a generator seeded from the OS CSPRNG (never numpy's global state); a
test may pass its own seeded generator.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from protocols.errors import ConfigError, InsecureConfigError

logger = logging.getLogger(__name__)


class ProtectMode(StrEnum):
    """How the host-bound gradient is protected."""

    NONE = "none"
    GAUSSIAN = "gaussian"
    MAX_NORM = "max_norm"
    MARVELL = "marvell"
    RR_LABELS = "rr_labels"


@dataclass(frozen=True)
class ProtectConfig:
    """Label protection settings.

    The default is ``marvell`` with s = 16, every row's noise fixed for the whole job
    (``persistence`` = 1) and at most 3 visits with label signal (``max_visits``), chosen by
    ``benchmarks/leakage.py`` (docs/protocol.md §4.7.1): it holds every attack of
    :mod:`vfl.privacy.attacks`, the multi-visit ones included, at or below 0.60 leak AUC over a
    whole run when the host's features carry no label, at a utility cost stated there.
    ``rr_labels`` is the one mode with a formal guarantee (ε-label-DP, :mod:`vfl.privacy.label_dp`).

    Parameters
    ----------
    mode
        The protection mode.
    clip_norm
        ``gaussian``: the per-row clipping norm C (absolute, same units as δ).
    noise_multiplier
        ``gaussian``: σ, the noise standard deviation in units of C.
    delta_max
        ``Δ_max``: δ̃ is clipped elementwise to ``±Δ_max`` in every mode.
    allow_label_leak
        Required to select ``none``.
    power_scale
        ``marvell``: s in the power budget ``P = s·‖Δ‖²`` (default 16).
    num_classes
        Number of label classes C; ``marvell`` solves its two-class problem for C = 2 only and
        gives isotropic noise of power ``s·mean_b ‖δ_b‖²`` otherwise.
    persistence
        ρ in [0, 1]: the correlation of a row's noise across its visits (1: fixed per row, so
        averaging a row's gradients over epochs cannot remove it; 0: fresh every step).
    epsilon
        ``rr_labels``: the label-DP ε of randomized response (0 < ε).
    rr_prior
        ``rr_labels``: randomized response with a prior from the guest's own features
        (RR-with-prior [Ghazi21]); False: plain randomized response.
    max_visits
        Noise-adding modes: cap on a row's visits that carry label signal. From epoch
        ``max_visits`` on (a row is seen at most once per epoch) the host-bound gradient is
        zero, so the host's parts stop learning and its view stops growing; 0: no cap
        (default 3).
    """

    mode: ProtectMode = ProtectMode.MARVELL
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta_max: float = 8.0
    allow_label_leak: bool = False
    power_scale: float = 16.0
    num_classes: int = 2
    persistence: float = 1.0
    epsilon: float = 2.0
    rr_prior: bool = True
    max_visits: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", ProtectMode(self.mode))
        if self.mode is ProtectMode.NONE and not self.allow_label_leak:
            raise InsecureConfigError(
                "protect = none sends the true gradient to the host, which reveals labels; "
                "choose marvell (the default), rr_labels, gaussian or max_norm, or set "
                "allow_label_leak = true for experiments"
            )
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or self.delta_max <= 0:
            raise ConfigError("clip_norm and delta_max must be positive, noise_multiplier >= 0")
        if self.mode is ProtectMode.NONE:
            logger.warning("label protection is OFF (allow_label_leak): the host can infer labels")
        if self.power_scale <= 0 or self.num_classes < 1:
            raise ConfigError("power_scale must be positive and num_classes at least 1")
        if not 0 <= self.persistence <= 1:
            raise ConfigError(f"persistence = {self.persistence}: it must lie in [0, 1]")
        if self.max_visits < 0:
            raise ConfigError(f"max_visits = {self.max_visits}: use 0 (no cap) or more")
        if not 0 < self.epsilon <= 50:
            raise ConfigError(f"epsilon = {self.epsilon}: rr_labels needs 0 < epsilon <= 50")

    @property
    def adds_noise(self) -> bool:
        """Whether :func:`protect` adds noise to δ (``rr_labels`` and ``none`` do not)."""
        return self.mode not in (ProtectMode.NONE, ProtectMode.RR_LABELS)


class RowNoise:
    """Each row's fixed standard-normal vector ``z_r`` ∈ ℝᵏ for the whole job (§4.7.1).

    ``z_r`` is derived from a 128-bit secret seed and the row's index (numpy's SeedSequence), so a
    resumed guest gets the same vectors from the seed in its checkpoint, and nothing per row has
    to be stored.

    Parameters
    ----------
    seed
        The job's secret 128-bit seed (:meth:`draw`; kept in the guest's owner-only
        checkpoint).
    k
        The gradient width.
    """

    def __init__(self, *, seed: int, k: int) -> None:
        self.seed, self.k = seed, k
        self._cache: dict[int, np.ndarray] = {}

    @classmethod
    def draw(cls, rng: np.random.Generator, *, k: int) -> RowNoise:
        """A row-noise source with a 128-bit seed from ``rng`` (:func:`new_generator`)."""
        return cls(seed=int.from_bytes(rng.bytes(16), "big"), k=k)

    def of(self, rows: np.ndarray) -> np.ndarray:
        """The B×k matrix of ``z_r`` for ``rows``."""
        out = np.empty((len(rows), self.k))
        for i, row in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
            z = self._cache.get(row)
            if z is None:
                z = np.random.default_rng([self.seed, row]).standard_normal(self.k)
                self._cache[row] = z
            out[i] = z
        return out


def new_generator() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


@dataclass(frozen=True)
class MarvellNoise:
    """Marvell's noise covariances ``Σ_y = a_y eeᵀ + b_y(I − eeᵀ)`` and their objective.

    Parameters
    ----------
    a1, b1
        Variance along ``e`` and per orthogonal direction for the positive class.
    a0, b0
        The same for the negative class.
    objective
        The symmetrised KL divergence ``J`` of the perturbed class Gaussians.
    """

    a1: float
    b1: float
    a0: float
    b0: float
    objective: float


def marvell_objective(
    a1: float, b1: float, a0: float, b0: float, *, v1: float, v0: float, delta_sq: float, k: int
) -> float:
    """``J = ½[s₁/s₀ + s₀/s₁ − 2 + (k−1)(t₁/t₀ + t₀/t₁ − 2) + ‖Δ‖²(1/s₀ + 1/s₁)]`` (§4.7).

    Parameters
    ----------
    a1, b1, a0, b0
        Noise variances (see :class:`MarvellNoise`).
    v1, v0
        The classes' isotropic gradient variances.
    delta_sq
        ``‖Δ‖²``, the squared distance of the class means.
    k
        The gradient width.

    Returns
    -------
    float
        The symmetrised KL divergence, with ``s_y = a_y + v_y`` and ``t_y = b_y + v_y``.
    """
    s1, s0, t1, t0 = a1 + v1, a0 + v0, b1 + v1, b0 + v0
    if min(s1, s0) <= 0 or (k > 1 and min(t1, t0) <= 0):
        return math.inf
    tangential = (k - 1) * (t1 / t0 + t0 / t1 - 2) if k > 1 else 0.0
    return 0.5 * (s1 / s0 + s0 / s1 - 2 + tangential + delta_sq * (1 / s0 + 1 / s1))


def marvell_solve(
    *, v1: float, v0: float, delta_sq: float, p: float, k: int, power: float
) -> MarvellNoise:
    """Minimise :func:`marvell_objective` under the power budget (§4.7).

    The budget is met with equality (adding the same variance to both classes never increases
    ``J``), by writing the four variances as ``P·w/cost(w)`` with ``w = softplus(θ)`` and
    optimising θ ∈ ℝ⁴ with torch L-BFGS. The problem is solved in units of ``‖Δ‖²`` (``J`` is
    scale-free). It starts from the better of isotropic noise of the same power
    (``a_y = b_y = P/k``) and a closed-form point (``t₁ = t₀`` at least cost, ``s₁ = s₀``), and
    keeps that start if the optimiser does not improve on it, so ``J`` is never above the
    isotropic baseline's.

    Parameters
    ----------
    v1, v0
        The classes' isotropic gradient variances.
    delta_sq
        ``‖Δ‖² > 0``.
    p
        The positive fraction of the batch, in (0, 1).
    k
        The gradient width.
    power
        The budget ``P`` (e.g. ``s·‖Δ‖²``).

    Returns
    -------
    MarvellNoise
        The four variances (in the original units) and the attained ``J``.
    """
    if delta_sq <= 0 or power <= 0 or not 0 < p < 1 or k < 1:
        raise ValueError("marvell_solve needs ‖Δ‖² > 0, P > 0, 0 < p < 1 and k >= 1")
    unit = delta_sq
    u1, u0, budget, tangent = v1 / unit, v0 / unit, power / unit, float(k - 1)

    def cost(x: list[float]) -> float:
        return p * (x[0] + tangent * x[1]) + (1 - p) * (x[2] + tangent * x[3])

    def value(x: list[float]) -> float:
        return marvell_objective(*x, v1=u1, v0=u0, delta_sq=1.0, k=k)

    iso = [budget / k] * 4
    # Closed-form start: equal tangential variances t₁ = t₀ at least cost, the rest of the
    # budget along e so that s₁ = s₀; L-BFGS then trades the two off exactly.
    b1, b0 = max(u0 - u1, 0.0), max(u1 - u0, 0.0)
    rest = budget - cost([0.0, b1, 0.0, b0])
    level = rest + p * u1 + (1 - p) * u0
    candidates = [iso]
    if rest > 0 and level > max(u1, u0):
        candidates.append([level - u1, b1, level - u0, b0])
    start = min(candidates, key=value)
    floor = 1e-12 * budget
    dt = torch.float64
    var1, var0 = torch.tensor(u1, dtype=dt), torch.tensor(u0, dtype=dt)
    x0 = torch.tensor([max(x, floor) for x in start], dtype=dt)
    theta = (x0 + torch.log(-torch.expm1(-x0))).detach().requires_grad_(True)  # softplus⁻¹

    def variances() -> torch.Tensor:
        w = torch.nn.functional.softplus(theta)
        spent = p * (w[0] + tangent * w[1]) + (1 - p) * (w[2] + tangent * w[3])
        return budget * w / spent

    def objective() -> torch.Tensor:
        a1, b1, a0, b0 = variances()
        s1, s0, t1, t0 = a1 + var1, a0 + var0, b1 + var1, b0 + var0
        j = s1 / s0 + s0 / s1 - 2 + (1 / s0 + 1 / s1)
        if k > 1:
            j = j + tangent * (t1 / t0 + t0 / t1 - 2)
        half: torch.Tensor = 0.5 * j
        return half

    optimiser = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        j = objective()
        j.backward()  # type: ignore[no-untyped-call]
        return j

    optimiser.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        found = [float(x) for x in variances()]
    best = min((found, start), key=value) if math.isfinite(value(found)) else start
    a1, b1, a0, b0 = (x * unit for x in best)
    j = marvell_objective(a1, b1, a0, b0, v1=v1, v0=v0, delta_sq=delta_sq, k=k)
    return MarvellNoise(a1=a1, b1=b1, a0=a0, b0=b0, objective=j)


@dataclass
class MarvellState:
    """What ``marvell`` remembers between batches (optional; one per training run).

    A batch that holds only one class has no ``Δ``. With a state, its rows get the noise their
    class got in the last batch that held both classes (measured: the norm attack on ``g_h``
    drops by 0.01-0.03); without one, isotropic noise of total power ``s·max_b ‖δ_b‖²``.

    Parameters
    ----------
    direction
        ``e`` of the last two-class batch.
    noise
        Its solved covariances.
    """

    direction: np.ndarray | None = None
    noise: MarvellNoise | None = None


def _marvell(
    delta: np.ndarray,
    labels: np.ndarray | None,
    scale: float,
    z: np.ndarray,
    state: MarvellState | None,
) -> np.ndarray:
    k = delta.shape[1]
    if labels is None:  # no two classes (multiclass, regression): isotropic, s × mean power
        power = scale * float(np.mean(np.sum(delta * delta, axis=1)))
        return delta + z * math.sqrt(power / k)
    positive = labels == 1
    if positive.all() or not positive.any():
        if state is None or state.noise is None or state.direction is None:
            power = scale * float(np.max(np.sum(delta * delta, axis=1)))
            return delta + z * math.sqrt(power / k)
        e, noise = state.direction, state.noise
    else:
        mu1, mu0 = delta[positive].mean(axis=0), delta[~positive].mean(axis=0)
        v1 = float(np.mean((delta[positive] - mu1) ** 2))
        v0 = float(np.mean((delta[~positive] - mu0) ** 2))
        diff = mu1 - mu0
        delta_sq = float(diff @ diff)
        if delta_sq <= 0:
            return delta.copy()
        noise = marvell_solve(
            v1=v1, v0=v0, delta_sq=delta_sq, p=float(positive.mean()), k=k, power=scale * delta_sq
        )
        e = diff / math.sqrt(delta_sq)
        if state is not None:
            state.direction, state.noise = e, noise
    along = z @ e  # the noise's coordinate along e, per row
    across = z - np.outer(along, e)
    sd_along = np.where(positive, math.sqrt(noise.a1), math.sqrt(noise.a0))
    sd_across = np.where(positive, math.sqrt(noise.b1), math.sqrt(noise.b0))
    out: np.ndarray = delta + (sd_along * along)[:, None] * e + sd_across[:, None] * across
    return out


def standard_noise(
    shape: tuple[int, int],
    *,
    rng: np.random.Generator,
    persistence: float = 0.0,
    rows: np.ndarray | None = None,
    row_noise: RowNoise | None = None,
) -> np.ndarray:
    """The B×k standard-normal draw ``√ρ·z_r + √(1−ρ)·z_fresh`` of every mode (§4.7.1)."""
    fresh = rng.normal(0.0, 1.0, size=shape)
    if persistence == 0:
        return fresh
    if rows is None or row_noise is None or len(rows) != shape[0] or row_noise.k != shape[1]:
        raise ConfigError("persistent label-protection noise needs the batch's rows and RowNoise")
    out: np.ndarray = math.sqrt(persistence) * row_noise.of(rows)
    if persistence < 1:
        out += math.sqrt(1 - persistence) * fresh
    return out


def protect(
    delta: np.ndarray,
    config: ProtectConfig,
    *,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
    state: MarvellState | None = None,
    rows: np.ndarray | None = None,
    row_noise: RowNoise | None = None,
) -> np.ndarray:
    """δ̃ for a B×k batch of gradients w.r.t. the interactive pre-activation.

    Parameters
    ----------
    delta
        δ = ∂L/∂z, B×k.
    config
        The protection settings.
    rng
        The noise generator (:func:`new_generator` in production; seeded in tests).
    labels
        The batch's labels (length B, values in {0, 1}); required by ``marvell`` with C = 2.
    state
        ``marvell`` only, optional: the run's :class:`MarvellState` (for single-class batches).
    rows, row_noise
        The batch's row indices and the job's :class:`RowNoise`; required when
        ``config.persistence > 0`` and the mode adds noise.

    Returns
    -------
    numpy.ndarray
        δ̃, clipped elementwise to ``±Δ_max``.
    """
    if delta.ndim != 2:
        raise ValueError(f"expected a B x k gradient, got shape {delta.shape}")
    if not config.adds_noise:
        out = delta.copy()  # none: warned about when the config was made; rr_labels: §4.7.2
    else:
        z = standard_noise(
            delta.shape,
            rng=rng,
            persistence=config.persistence,
            rows=rows,
            row_noise=row_noise,
        )
        if config.mode is ProtectMode.GAUSSIAN:
            norms = np.linalg.norm(delta, axis=1, keepdims=True)
            factor = np.minimum(1.0, config.clip_norm / np.maximum(norms, 1e-300))
            out = delta * factor + z * (config.noise_multiplier * config.clip_norm)
        elif config.mode is ProtectMode.MAX_NORM:
            sq = np.sum(delta * delta, axis=1, keepdims=True)
            out = delta + z * np.sqrt((sq.max() - sq) / delta.shape[1])
        else:
            y = None
            if config.num_classes == 2:
                if labels is None:
                    raise ConfigError("protect = marvell needs the batch's labels")
                y = np.asarray(labels).reshape(-1)
                if y.shape[0] != delta.shape[0] or not np.isin(y, (0, 1)).all():
                    raise ConfigError("protect = marvell needs one binary label (0 or 1) per row")
            out = _marvell(delta, y, config.power_scale, z, state)
    clipped: np.ndarray = np.clip(out, -config.delta_max, config.delta_max)
    return clipped


def embedding_noise(
    alpha: np.ndarray, *, sigma: float, a_max: float, rng: np.random.Generator
) -> np.ndarray:
    """The host's α + N(0, σ² I), clamped to ``±A_max`` (§4.1, §4.7); fresh per step."""
    if sigma < 0 or a_max <= 0:
        raise ConfigError("host_embedding_noise must be >= 0 and A_max positive")
    noisy = alpha + rng.normal(0.0, sigma, size=alpha.shape) if sigma > 0 else alpha
    bounded: np.ndarray = np.clip(noisy, -a_max, a_max)
    return bounded
