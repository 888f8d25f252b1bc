"""Exponentiation with reused bases (§4.10 items 1 and 3).

* :class:`FixedBaseTable`: windowed table ``T[j][v] = g^{v·2^{w·j}}`` so ``g^x`` costs one
  modular multiplication per non-zero ``w``-bit digit of ``x`` and no squaring. Used for
  the obfuscator base ``h_s`` (``x`` of ``|n| + 128`` bits, ``w = 8``) and for a ciphertext
  reused with many small scalars (``w = 5``).
* :class:`SignedFixedBase`: tables for ``c`` and ``c⁻¹`` so a negative scalar ``x`` is
  evaluated as ``(c⁻¹)^{|x|}``.
* :func:`multi_exp`: ``Π_i c_i^{x_i}`` for signed small ``x_i`` by Pippenger's bucket method,
  positive and negative exponents separately and one inversion at the end; for
  ciphertexts reused too few times to pay for tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import gmpy2
from gmpy2 import mpz


class FixedBaseTable:
    """``g^x mod m`` for ``0 <= x < 2^exp_bits`` from a precomputed windowed table."""

    def __init__(self, base: mpz, modulus: mpz, *, exp_bits: int, window: int) -> None:
        if window < 1 or exp_bits < 1:
            raise ValueError("window and exp_bits must be positive")
        self.modulus = modulus
        self.exp_bits = exp_bits
        self.window = window
        self._mask = (1 << window) - 1
        rows = []
        g = mpz(base) % modulus
        for _ in range((exp_bits + window - 1) // window):
            row = [mpz(1), g]
            for _ in range(2, 1 << window):
                row.append(row[-1] * g % modulus)
            rows.append(row)
            g = row[-1] * g % modulus  # g^(2^w)
        self._rows = rows

    def pow(self, x: int) -> mpz:
        """``g^x mod m``."""
        if x < 0 or x >> self.exp_bits:
            raise ValueError(f"exponent must lie in [0, 2^{self.exp_bits})")
        m, w, mask = self.modulus, self.window, self._mask
        acc = mpz(1)
        j = 0
        x = int(x)
        while x:
            digit = x & mask
            if digit:
                acc = acc * self._rows[j][digit] % m
            x >>= w
            j += 1
        return acc


class SignedFixedBase:
    """``c^x`` for signed ``|x| < 2^exp_bits`` with tables for ``c`` and ``c⁻¹``."""

    def __init__(self, c: mpz, modulus: mpz, *, exp_bits: int, window: int = 5) -> None:
        self._pos = FixedBaseTable(c, modulus, exp_bits=exp_bits, window=window)
        self._neg = FixedBaseTable(
            gmpy2.invert(c, modulus), modulus, exp_bits=exp_bits, window=window
        )

    def pow(self, x: int) -> mpz:
        """``c^x`` (``(c⁻¹)^{-x}`` when ``x < 0``)."""
        return self._pos.pow(x) if x >= 0 else self._neg.pow(-x)


def _pippenger(bases: Sequence[mpz], exps: Sequence[int], modulus: mpz, window: int) -> mpz:
    """``Π b_i^{e_i}`` for non-negative ``e_i`` by the bucket method."""
    if not bases:
        return mpz(1)
    top = max(e.bit_length() for e in exps)
    if top == 0:
        return mpz(1)
    windows = (top + window - 1) // window
    mask = (1 << window) - 1
    acc = mpz(1)
    for j in reversed(range(windows)):
        if acc != 1:
            for _ in range(window):
                acc = acc * acc % modulus
        buckets: list[mpz | None] = [None] * (1 << window)
        shift = j * window
        for b, e in zip(bases, exps, strict=True):
            digit = (e >> shift) & mask
            if digit:
                cur = buckets[digit]
                buckets[digit] = b if cur is None else cur * b % modulus
        running: mpz | None = None
        total: mpz | None = None
        for digit in range(mask, 0, -1):
            bucket = buckets[digit]
            if bucket is not None:
                running = bucket if running is None else running * bucket % modulus
            if running is not None:
                total = running if total is None else total * running % modulus
        if total is not None:
            acc = acc * total % modulus
    return acc


def multi_exp(bases: Sequence[mpz], exps: Sequence[int], modulus: mpz, *, window: int = 4) -> mpz:
    """``Π c_i^{x_i} mod m`` for signed ``x_i`` (one inversion for the negative part)."""
    pos_b, pos_e, neg_b, neg_e = [], [], [], []
    for b, e in zip(bases, exps, strict=True):
        e = int(e)
        if e > 0:
            pos_b.append(b)
            pos_e.append(e)
        elif e < 0:
            neg_b.append(b)
            neg_e.append(-e)
    result = _pippenger(pos_b, pos_e, modulus, window)
    if neg_b:
        result = result * gmpy2.invert(_pippenger(neg_b, neg_e, modulus, window), modulus) % modulus
    return result
