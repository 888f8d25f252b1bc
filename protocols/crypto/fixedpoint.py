"""Fixed-point encoding with explicit scales; nothing is truncated under encryption (§2.2).

``enc_s(x) = int(np.rint(np.ldexp(x, s)))`` per element, giving Python ints (never
``np.int64``); ``ι(v) = v mod n``; ``λ(m) = m if m <= (n-1)/2 else m - n``;
``dec_s(m) = λ(m) / 2^s``. Values are bound-checked before encoding, and decoded
quantities are range-checked against the bound of the quantity being decoded: a
violation means overflow or a broken invariant, and the caller must abort. The P0
weight-update share ``V_WUPD`` is uniform mod n and is only ever handled as a raw
residue (:func:`unmask`), never lifted or range-checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from gmpy2 import mpz

from protocols.errors import ConfigError, DecodingOverflowError, EncodingBoundError

IntArray = np.ndarray  # dtype=object, elements Python int or mpz


@dataclass(frozen=True)
class FixedPointConfig:
    """Scales and bounds of §2.2 / §9 (defaults: ``f_a = 24``, ``f_d = 32``)."""

    f_a: int = 24
    f_d: int = 32
    a_max: float = 8.0
    delta_max: float = 8.0
    w_max: float = 128.0

    def __post_init__(self) -> None:
        if not (0 < self.f_a <= 64 and 0 < self.f_d <= 64):
            raise ConfigError("fixed-point scales f_a and f_d must lie in (0, 64]")
        if min(self.a_max, self.delta_max, self.w_max) <= 0:
            raise ConfigError("fixed-point bounds must be positive")

    @property
    def f_w(self) -> int:
        """Scale of the interactive weights, ``f_a + f_d``."""
        return self.f_a + self.f_d

    @property
    def f_z(self) -> int:
        """Scale of ``z_h = αW``, ``f_a + f_w``."""
        return self.f_a + self.f_w

    @property
    def f_g(self) -> int:
        """Scale of ``g_h = δ̃Wᵀ``, ``f_d + f_w``."""
        return self.f_d + self.f_w

    def z_bound(self, d: int) -> float:
        """Range of decoded ``z_h`` entries: ``d·A_max·W_max``."""
        return d * self.a_max * self.w_max

    def g_bound(self, k: int) -> float:
        """Range of decoded ``g_h`` entries: ``k·Δ_max·W_max``."""
        return k * self.delta_max * self.w_max


def encode(x: np.ndarray | float, *, scale: int, bound: float) -> IntArray:
    """Encode reals at ``scale`` after checking ``|x| <= bound``; an object array of ints."""
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise EncodingBoundError("cannot encode NaN or infinite values")
    if arr.size and float(np.max(np.abs(arr))) > bound:
        raise EncodingBoundError(
            f"value of magnitude {float(np.max(np.abs(arr))):.6g} exceeds its bound {bound:g} "
            f"(scale 2^{scale}); clip or rescale before encoding"
        )
    scaled = np.rint(np.ldexp(arr, scale))
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(scaled.reshape(-1)):
        flat[i] = int(v)
    return out


def ring(values: IntArray, n: mpz) -> IntArray:
    """``ι``: embed signed integers into ``Z_n``."""
    return np.vectorize(lambda v: mpz(v) % n, otypes=[object])(values) if values.size else values


def lift(values: IntArray, n: mpz, *, int_bound: int | None = None) -> IntArray:
    """``λ``: residues in ``[0, n)`` to signed ints, optionally checking ``|v| <= int_bound``."""
    half = (n - 1) // 2
    out = np.empty(np.shape(values), dtype=object)
    flat_out = out.reshape(-1)
    for i, m in enumerate(np.asarray(values, dtype=object).reshape(-1)):
        v = int(m) if m <= half else int(m) - int(n)
        if int_bound is not None and abs(v) > int_bound:
            raise DecodingOverflowError(
                f"decoded integer of {abs(v).bit_length()} bits exceeds its bound of "
                f"{int_bound.bit_length()} bits: overflow or broken invariant, aborting"
            )
        flat_out[i] = v
    return out


def decode(values: IntArray, n: mpz, *, scale: int, bound: float) -> np.ndarray:
    """``dec_s``: residues to float64, raising :class:`DecodingOverflowError` beyond ``bound``."""
    int_bound = int(Fraction(bound) * (1 << scale))
    signed = lift(values, n, int_bound=int_bound)
    return np.array(
        [float(Fraction(int(v), 1 << scale)) for v in signed.reshape(-1)], dtype=np.float64
    ).reshape(np.shape(values))


def unmask(masked: IntArray, masks: IntArray, n: mpz) -> IntArray:
    """``(Y - R) mod n`` elementwise: the raw residue (what ``V_WUPD`` stays as in P0)."""
    out = np.empty(np.shape(masked), dtype=object)
    flat = out.reshape(-1)
    for i, (y, r) in enumerate(
        zip(np.asarray(masked).reshape(-1), np.asarray(masks).reshape(-1), strict=True)
    ):
        flat[i] = (mpz(y) - r) % n
    return out
