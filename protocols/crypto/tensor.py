"""Encrypted tensors and the products of the split NN (docs/protocol.md §4.4, §4.8).

An :class:`EncryptedTensor` is an object array of ciphertexts with its ``scale`` and
optional ``packing`` layout, bound to one public key. The one heavy kernel is
:func:`plain_matmul`, ``[[Out]] = P ⊙ [[C]]`` with ``Out[b, c] = ⊕_i P[b, i] ⊙ C[i, c]`` for a
plaintext integer matrix ``P`` of small signed scalars. The three products of a step
are this kernel in three orientations:

* F1 (at H): ``[[Ẑ]] = plain_matmul(â, [[W^G]])`` (B×d times d×κ_k, row-packed),
* B1 (at G): ``[[Ĝ]] = plain_matmul(δ̂, [[E]])`` (B×k times k×κ_d, column-packed),
* B2 (at H): ``[[V̂]] = plain_matmul(âᵀ, [[D̂]])`` (d×B times B×κ_k, row-packed),

each followed by a plaintext addend and :meth:`EncryptedTensor.obfuscate` before it
leaves the party (§2.4). The kernel splits the reduction dimension over the
executor's processes; each worker uses fixed-base tables for ``c`` and ``c⁻¹`` when a
ciphertext is reused by many rows (F1, B1), else Pippenger multi-exponentiation (B2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from gmpy2 import mpz

from protocols.crypto.cipher import Cipher
from protocols.crypto.counters import Op, record
from protocols.crypto.fixed_base import SignedFixedBase, multi_exp
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.envelope import CipherBlock, Packing
from protocols.errors import InvalidCiphertextError
from protocols.executor import Executor, split

TABLE_MIN_REUSE = 48


@dataclass(frozen=True)
class EncryptedTensor:
    """Ciphertexts (object array of ``mpz``) with their scale and packing layout."""

    cipher: Cipher
    values: np.ndarray
    scale: int
    packing: Packing | None = None
    obfuscated: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return tuple(self.values.shape)

    def __add__(self, other: EncryptedTensor) -> EncryptedTensor:
        """Elementwise ``⊕``."""
        self._same_key(other)
        return self._map2(other, self.cipher.add)

    def sub(self, other: EncryptedTensor) -> EncryptedTensor:
        """Elementwise ``⊖``."""
        self._same_key(other)
        record(Op.INVERSES, self.values.size)
        return self._map2(other, self.cipher.sub)

    def add_plain(self, plain: np.ndarray) -> EncryptedTensor:
        """Elementwise ``⊕`` with plaintext integers (the result needs obfuscation to leave)."""
        out = np.empty(self.values.shape, dtype=object)
        for idx, c in np.ndenumerate(self.values):
            out[idx] = self.cipher.add_plain(c, int(plain[idx]))
        return replace(self, values=out, obfuscated=False)

    def obfuscate(self, pool: ObfuscatorPool) -> EncryptedTensor:
        """Re-randomise every element with fresh pooled ``ρ`` values (§2.4)."""
        rhos = pool.take(self.values.size)
        record(Op.OBFUSCATIONS, self.values.size)
        out = np.empty(self.values.shape, dtype=object)
        for (idx, c), rho in zip(np.ndenumerate(self.values), rhos, strict=True):
            out[idx] = self.cipher.obfuscate(c, rho)
        return replace(self, values=out, obfuscated=True)

    def to_block(self) -> CipherBlock:
        """Serialise for an envelope (``2|n|/8`` bytes per element, C order)."""
        return CipherBlock(
            data=self.cipher.key.ciphertexts_to_bytes(self.values.reshape(-1)),
            shape=self.shape,
            scale=self.scale,
            packing=self.packing,
        )

    @classmethod
    def from_block(cls, block: CipherBlock, *, cipher: Cipher, key_id: bytes) -> EncryptedTensor:
        """Parse and validate a received block: key id, length and range of every element."""
        cipher.key.check_key_id(key_id)
        count = int(np.prod(block.shape)) if block.shape else None
        if count is None:
            raise InvalidCiphertextError("cipher block has no shape")
        values = cipher.from_bytes(block.data, count=count)
        arr = np.empty(count, dtype=object)
        arr[:] = values
        return cls(
            cipher=cipher, values=arr.reshape(block.shape), scale=block.scale, packing=block.packing
        )

    def _same_key(self, other: EncryptedTensor) -> None:
        other.cipher.key.check_key_id(self.cipher.key.key_id)
        if self.shape != other.shape or self.scale != other.scale:
            raise ValueError(
                f"shapes/scales differ: {self.shape}@{self.scale} vs {other.shape}@{other.scale}"
            )

    def _map2(self, other: EncryptedTensor, op: object) -> EncryptedTensor:
        out = np.empty(self.values.shape, dtype=object)
        for idx, c in np.ndenumerate(self.values):
            out[idx] = op(c, other.values[idx])  # type: ignore[operator]
        return replace(self, values=out, obfuscated=False)


def encrypt(
    cipher: Cipher,
    plain: np.ndarray,
    *,
    pool: ObfuscatorPool,
    scale: int,
    packing: Packing | None = None,
) -> EncryptedTensor:
    """Encrypt integers (already encoded/packed) with pooled obfuscators: one mulmod each."""
    rhos = pool.take(plain.size)
    record(Op.FRESH_ENCRYPTIONS, plain.size)
    out = np.empty(plain.shape, dtype=object)
    for (idx, m), rho in zip(np.ndenumerate(plain), rhos, strict=True):
        out[idx] = cipher.encrypt(int(m), rho)
    return EncryptedTensor(cipher=cipher, values=out, scale=scale, packing=packing)


def _matmul_chunk(args: tuple[mpz, bool, np.ndarray, np.ndarray]) -> np.ndarray:
    """Partial product of one slice of the reduction dimension (runs in a worker)."""
    modulus, encrypted, plain, cts = args
    m, r = plain.shape
    q = cts.shape[1]
    out = np.empty((m, q), dtype=object)
    if not encrypted:  # plaintext mode: integer matmul mod n
        for b in range(m):
            for c in range(q):
                out[b, c] = sum(int(plain[b, i]) * cts[i, c] for i in range(r)) % modulus
        return out
    out.fill(mpz(1))
    if m >= TABLE_MIN_REUSE:
        bits = max(1, max(abs(int(v)) for v in plain.reshape(-1)).bit_length())
        for i in range(r):
            column = [int(v) for v in plain[:, i]]
            for c in range(q):
                table = SignedFixedBase(cts[i, c], modulus, exp_bits=bits, window=5)
                for b, x in enumerate(column):
                    if x:
                        out[b, c] = out[b, c] * table.pow(x) % modulus
    else:
        for c in range(q):
            bases = list(cts[:, c])
            for b in range(m):
                out[b, c] = multi_exp(bases, [int(v) for v in plain[b, :]], modulus)
    return out


def plain_matmul(
    plain: np.ndarray, enc: EncryptedTensor, *, executor: Executor, scale: int
) -> EncryptedTensor:
    """``[[P·C]]`` for small signed integers ``P`` (m×r) and ciphertexts ``C`` (r×q).

    The result has ``scale`` (the sum of the operands' scales) and ``C``'s packing, and is
    not yet obfuscated.
    """
    if plain.ndim != 2 or enc.values.ndim != 2 or plain.shape[1] != enc.values.shape[0]:
        raise ValueError(f"cannot multiply {plain.shape} by {enc.shape}")
    record(Op.SCALAR_MULTS, plain.shape[0] * plain.shape[1] * enc.values.shape[1])
    modulus = enc.cipher.modulus
    parts = split(plain.shape[1], executor.workers)
    chunks = [
        (
            modulus,
            enc.cipher.encrypted,
            plain[:, part.start : part.stop],
            enc.values[part.start : part.stop, :],
        )
        for part in parts
    ]
    partials = executor.map(_matmul_chunk, chunks)
    out = partials[0]
    for partial in partials[1:]:
        for idx, v in np.ndenumerate(partial):
            out[idx] = (out[idx] * v if enc.cipher.encrypted else out[idx] + v) % modulus
    return EncryptedTensor(cipher=enc.cipher, values=out, scale=scale, packing=enc.packing)
