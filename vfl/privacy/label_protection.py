"""Label protection of the host-bound gradient, ``δ̃ = Protect(δ, y)`` (PROTOCOL.md §4.7).

Roles: only the guest runs this, on δ = ∂L/∂z (B×k) before encoding it for B1 and B2;
the same δ̃ is used in both products, so the host's whole view is a function of {δ̃_t}.

Modes (row-wise; afterwards every mode clips δ̃ elementwise to ``±Δ_max``):

* ``none``: δ̃ = δ. Leaks labels; needs ``allow_label_leak=True`` and logs a warning.
* ``gaussian``: δ̃_b = δ_b·min(1, C/‖δ_b‖) + N(0, σ²C² I) — clip + Gaussian (DP-SGD recipe;
  empirical protection, not a formal label-DP bound).
* ``max_norm``: δ̃_b = δ_b + N(0, σ_b² I), σ_b² = (max_b' ‖δ_b'‖² − ‖δ_b‖²)/k — every row
  gets the norm of the largest in expectation, which defeats the norm attack.

Noise comes from a generator seeded from the OS CSPRNG (never numpy's global state); a
test may pass its own seeded generator.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from protocols.errors import ConfigError, InsecureConfigError

logger = logging.getLogger(__name__)


class ProtectMode(StrEnum):
    """How the host-bound gradient is protected."""

    NONE = "none"
    GAUSSIAN = "gaussian"
    MAX_NORM = "max_norm"


@dataclass(frozen=True)
class ProtectConfig:
    """Label protection settings (default: ``max_norm``, a protecting mode)."""

    mode: ProtectMode = ProtectMode.MAX_NORM
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta_max: float = 8.0
    allow_label_leak: bool = False

    def __post_init__(self) -> None:
        if self.mode is ProtectMode.NONE and not self.allow_label_leak:
            raise InsecureConfigError(
                "protect = none sends the true gradient to the host, which reveals labels; "
                "choose gaussian or max_norm, or set allow_label_leak = true for experiments"
            )
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or self.delta_max <= 0:
            raise ConfigError("clip_norm and delta_max must be positive, noise_multiplier >= 0")


def new_generator() -> np.random.Generator:
    """A generator seeded with 128 bits from the OS CSPRNG."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def protect(delta: np.ndarray, config: ProtectConfig, *, rng: np.random.Generator) -> np.ndarray:
    """δ̃ for a B×k batch of gradients w.r.t. the interactive pre-activation."""
    if delta.ndim != 2:
        raise ValueError(f"expected a B x k gradient, got shape {delta.shape}")
    if config.mode is ProtectMode.NONE:
        logger.warning("label protection is OFF (allow_label_leak): the host can infer labels")
        out = delta.copy()
    elif config.mode is ProtectMode.GAUSSIAN:
        norms = np.linalg.norm(delta, axis=1, keepdims=True)
        factor = np.minimum(1.0, config.clip_norm / np.maximum(norms, 1e-300))
        sigma = config.noise_multiplier * config.clip_norm
        out = delta * factor + rng.normal(0.0, sigma, size=delta.shape)
    else:
        sq = np.sum(delta * delta, axis=1, keepdims=True)
        variance = (sq.max() - sq) / delta.shape[1]
        out = delta + rng.normal(0.0, 1.0, size=delta.shape) * np.sqrt(variance)
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
