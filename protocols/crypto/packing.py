"""Slot packing of signed integers into one plaintext (§2.7, mode P1).

``P = Σ_j v_j · 2^{s·j}`` as a signed integer, then ``ι``. Unpacking lifts with ``λ``
and peels slots from the bottom; the **overflow detector** aborts if any emitted slot
has ``|d| >= 2^{s-2}`` or if anything is left over at the end. Every valid slot
satisfies ``|v| < 2^{s-2}``, and an overflowing slot with ``|v| < 3·2^{s-2}`` is caught
in whatever position it sits. Capacity ``S = ⌊(|n| - 2)/s⌋``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from gmpy2 import mpz

from protocols.errors import ConfigError, PackingOverflowError


def capacity(n_bits: int, slot_bits: int) -> int:
    """``S = ⌊(|n| - 2)/s⌋`` slots per plaintext."""
    slots = (n_bits - 2) // slot_bits
    if slots < 1:
        raise ConfigError(f"a {n_bits}-bit key cannot hold one {slot_bits}-bit slot")
    return slots


def slot_bits_for(
    *, d: int, k: int, batch: int, b_a: int = 28, b_d: int = 36, l_w: int = 64, sigma: int = 64
) -> int:
    """``s = max(s_F, s_B1, s_B2)`` of §4.8 (130 for d, k <= 64 and B <= 256)."""
    big_l = l_w + sigma - 1
    s_f = b_a + l_w + math.ceil(math.log2(d)) + 2
    s_b1 = b_d + l_w + math.ceil(math.log2(k)) + 2
    s_b2 = max(big_l, b_a + b_d + math.ceil(math.log2(batch))) + 3
    return max(s_f, s_b1, s_b2)


def pack(values: Iterable[int] | np.ndarray, *, slot_bits: int) -> int:
    """Pack signed slot values (slot 0 lowest) into one signed integer."""
    total = 0
    for j, v in enumerate(values):
        total += int(v) << (slot_bits * j)
    return total


def unpack(m: int, n: mpz, *, slot_bits: int, slots: int) -> list[int]:
    """Lift a residue and unpack ``slots`` signed values, checking every slot."""
    p = int(m) if m <= (n - 1) // 2 else int(m) - int(n)
    modulus, half, limit = 1 << slot_bits, 1 << (slot_bits - 1), 1 << (slot_bits - 2)
    out = []
    for j in range(slots):
        d = p & (modulus - 1)
        if d >= half:
            d -= modulus
        if abs(d) >= limit:
            raise PackingOverflowError(
                f"packed slot {j} of {slots} overflowed ({slot_bits}-bit slots)"
            )
        out.append(d)
        p = (p - d) >> slot_bits
    if p != 0:
        raise PackingOverflowError(f"packed value overflows its {slots} slots of {slot_bits} bits")
    return out


def pack_rows(values: np.ndarray, *, slot_bits: int, slots: int) -> np.ndarray:
    """Pack each row of an ``m×k`` int array into ``⌈k/S⌉`` integers (row-packed layout)."""
    m, k = values.shape
    blocks = math.ceil(k / slots)
    out = np.empty((m, blocks), dtype=object)
    for i in range(m):
        for c in range(blocks):
            out[i, c] = pack(values[i, c * slots : (c + 1) * slots], slot_bits=slot_bits)
    return out


def unpack_rows(
    packed: np.ndarray, n: mpz, *, slot_bits: int, slots: int, width: int
) -> np.ndarray:
    """Inverse of :func:`pack_rows` on residues; ``width`` is the original row length ``k``."""
    m, blocks = packed.shape
    out = np.empty((m, width), dtype=object)
    for i in range(m):
        row: list[int] = []
        for c in range(blocks):
            take = min(slots, width - c * slots)
            row.extend(unpack(packed[i, c], n, slot_bits=slot_bits, slots=slots)[:take])
        out[i, :] = row
    return out
