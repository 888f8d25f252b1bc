"""Integer reference of the interactive layer's host part, without encryption.

It computes exactly the integers the encrypted protocol computes (docs/protocol.md §4.3, §4.4,
§4.8) — joint initialisation, ``z_h`` (F1), ``g_h`` (B1) and the share update (B2) — so the
encrypted run can be compared with it bit for bit (test S1), and P0 with P1 (S2).

Shares: P0 keeps ``W^G``, ``E`` uniform in ``Z_n`` with ``W^G + E ≡ enc_{f_w}(W) (mod n)``;
P1 keeps them as integers below ``2^L`` in magnitude with ``W^G + E = enc_{f_w}(W)`` over ℤ.

1. init: each side's Gaussian component ``W_0^G``, ``W_0^H``; H draws ``E_0`` and sends
   ``M_init = enc(W_0^H) − E_0``; G sets ``W^G_0 = enc(W_0^G) + M_init``;
2. forward: ``Ẑ = â·(W^G + E)``, decoded at ``f_z = f_a + f_w``;
3. backward B1: ``Ĝ = δ̂·(W^G + E)ᵀ``, decoded at ``f_g = f_d + f_w``;
4. backward B2: ``D̂ = enc_{f_d}(η_W·δ̃)``, ``V̂ = âᵀD̂ + E' − E``; ``W^G ← W^G − V̂``, ``E ← E'``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from gmpy2 import mpz

from protocols.crypto.fixedpoint import FixedPointConfig, decode, encode, lift, ring
from vfl.splitnn.spec import SplitMode

SIGMA_STAT = 64


@dataclass(frozen=True)
class Shares:
    """``W^G`` (at the guest) and ``E`` (at the host), object arrays of ints, d×k."""

    wg: np.ndarray
    e: np.ndarray


class InteractiveReference:
    """Steps 1-4 of the module docstring for one (mode, modulus, scales)."""

    def __init__(self, *, mode: SplitMode, n: mpz, fp: FixedPointConfig | None = None) -> None:
        self.mode = mode
        self.n = mpz(n)
        self.fp = fp or FixedPointConfig()
        self.big_l = 64 + SIGMA_STAT - 1  # L = ℓ_W + σ − 1

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        return values if self.mode is SplitMode.P1 else ring(values, self.n)

    def fresh_share(self, shape: tuple[int, ...]) -> np.ndarray:
        """A fresh host share: uniform mod n (P0) or in ``[−2^{L−1}, 2^{L−1})`` (P1)."""
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            if self.mode is SplitMode.P0:
                out[idx] = secrets.randbelow(int(self.n))
            else:
                out[idx] = secrets.randbelow(1 << self.big_l) - (1 << (self.big_l - 1))
        return out

    def init(self, w0_guest: np.ndarray, w0_host: np.ndarray) -> Shares:
        """Step 1: joint initialisation from each party's own component."""
        fp = self.fp
        e0 = self.fresh_share(w0_host.shape)
        m_init = self._reduce(encode(w0_host, scale=fp.f_w, bound=fp.w_max) - e0)
        wg = self._reduce(encode(w0_guest, scale=fp.f_w, bound=fp.w_max) + m_init)
        return Shares(wg=wg, e=e0)

    def weights(self, shares: Shares) -> np.ndarray:
        """``enc(W)`` recovered from both shares (only a test may look at this)."""
        total: np.ndarray = shares.wg + shares.e
        return total if self.mode is SplitMode.P1 else lift(ring(total, self.n), self.n)

    def forward(self, shares: Shares, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step 2: ``â`` and the decoded ``z_h`` (range-checked at ``d·A_max·W_max``)."""
        fp = self.fp
        a_hat = encode(alpha, scale=fp.f_a, bound=fp.a_max)
        z_hat = a_hat.dot(shares.wg) + a_hat.dot(shares.e)
        z = decode(
            ring(z_hat, self.n),
            self.n,
            scale=fp.f_z,
            bound=fp.z_bound(alpha.shape[1]),
        )
        return a_hat, z

    def backward(
        self, shares: Shares, a_hat: np.ndarray, delta: np.ndarray, eta: float
    ) -> tuple[np.ndarray, Shares]:
        """Steps 3-4: the decoded ``g_h`` (pre-update shares) and the re-shared weights."""
        fp = self.fp
        if not 0 < eta <= 1:
            raise ValueError("η_W must lie in (0, 1]")
        d_hat = encode(delta, scale=fp.f_d, bound=fp.delta_max)
        g_hat = d_hat.dot(shares.wg.T) + d_hat.dot(shares.e.T)
        g = decode(
            ring(g_hat, self.n),
            self.n,
            scale=fp.f_g,
            bound=fp.g_bound(delta.shape[1]),
        )
        big_d = encode(eta * delta, scale=fp.f_d, bound=fp.delta_max)
        e_new = self.fresh_share(shares.e.shape)
        v_hat = self._reduce(a_hat.T.dot(big_d) + e_new - shares.e)
        wg = self._reduce(shares.wg - v_hat)
        return g, Shares(wg=wg, e=e_new)
