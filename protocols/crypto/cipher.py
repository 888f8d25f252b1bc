"""The arithmetic interface upper layers use: Paillier, or plaintext for experiments.

:class:`PaillierCipher` evaluates on ciphertexts under the arbiter's public key.
:class:`PlaintextCipher` has the same interface but its "ciphertexts" are the residues
themselves: nothing is hidden. It exists to measure what encryption costs and to debug
protocols, needs ``i_understand_nothing_is_encrypted=True`` and logs a warning.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from gmpy2 import mpz

from protocols.crypto.paillier import PublicKey, parse_fixed_width
from protocols.errors import InsecureConfigError, InvalidCiphertextError

logger = logging.getLogger(__name__)


class Cipher(ABC):
    """Element operations under one public key (see docs/protocol.md §2.1)."""

    def __init__(self, key: PublicKey) -> None:
        self.key = key

    @property
    @abstractmethod
    def encrypted(self) -> bool:
        """Whether values are really encrypted."""

    @abstractmethod
    def encrypt(self, m: int, rho: mpz) -> mpz:
        """Encrypt ``m`` with a pooled ``ρ``."""

    @abstractmethod
    def add(self, c1: mpz, c2: mpz) -> mpz:
        """``c1 ⊕ c2``."""

    @abstractmethod
    def add_plain(self, c: mpz, m: int) -> mpz:
        """``c ⊕ m``."""

    @abstractmethod
    def mul_scalar(self, c: mpz, k: int) -> mpz:
        """``k ⊙ c`` for a small signed ``k``."""

    @abstractmethod
    def sub(self, c1: mpz, c2: mpz) -> mpz:
        """``c1 ⊖ c2``."""

    @abstractmethod
    def obfuscate(self, c: mpz, rho: mpz) -> mpz:
        """Re-randomise."""

    @abstractmethod
    def check(self, c: mpz) -> None:
        """Raise :class:`InvalidCiphertextError` if ``c`` is out of range."""

    def from_bytes(self, data: bytes, *, count: int) -> list[mpz]:
        """Parse ``count`` wire values (``2|n|/8`` bytes each) and check every one."""
        out = parse_fixed_width(data, width=self.key.c_bytes, count=count, what="ciphertext")
        for c in out:
            self.check(c)
        return out

    @property
    @abstractmethod
    def modulus(self) -> mpz:
        """The modulus ciphertexts live in (``n²``, or ``n`` in plaintext mode)."""


class PaillierCipher(Cipher):
    """Real Paillier arithmetic on raw ``mpz`` (the default)."""

    @property
    def encrypted(self) -> bool:
        return True

    @property
    def modulus(self) -> mpz:
        return self.key.n2

    def encrypt(self, m: int, rho: mpz) -> mpz:
        return self.key.encrypt(m, rho)

    def add(self, c1: mpz, c2: mpz) -> mpz:
        return self.key.add(c1, c2)

    def add_plain(self, c: mpz, m: int) -> mpz:
        return self.key.add_plain(c, m)

    def mul_scalar(self, c: mpz, k: int) -> mpz:
        return self.key.mul_scalar(c, k)

    def sub(self, c1: mpz, c2: mpz) -> mpz:
        return self.key.sub(c1, c2)

    def obfuscate(self, c: mpz, rho: mpz) -> mpz:
        return self.key.obfuscate(c, rho)

    def check(self, c: mpz) -> None:
        self.key.check_ciphertext(c)


class PlaintextCipher(Cipher):
    """Residues mod ``n`` in the clear, same interface. Experiments only."""

    def __init__(self, key: PublicKey, *, i_understand_nothing_is_encrypted: bool = False) -> None:
        if not i_understand_nothing_is_encrypted:
            raise InsecureConfigError(
                "the plaintext cipher sends every value in the clear; pass "
                "i_understand_nothing_is_encrypted=True (experiments only)"
            )
        logger.warning("PLAINTEXT MODE: nothing is encrypted; every party sees every value")
        super().__init__(key)

    @property
    def encrypted(self) -> bool:
        return False

    @property
    def modulus(self) -> mpz:
        return self.key.n

    def encrypt(self, m: int, rho: mpz) -> mpz:
        return mpz(m) % self.key.n

    def add(self, c1: mpz, c2: mpz) -> mpz:
        return (c1 + c2) % self.key.n

    def add_plain(self, c: mpz, m: int) -> mpz:
        return (c + m) % self.key.n

    def mul_scalar(self, c: mpz, k: int) -> mpz:
        return c * k % self.key.n

    def sub(self, c1: mpz, c2: mpz) -> mpz:
        return (c1 - c2) % self.key.n

    def obfuscate(self, c: mpz, rho: mpz) -> mpz:
        return c

    def check(self, c: mpz) -> None:
        if not 0 <= c < self.key.n:
            raise InvalidCiphertextError("plaintext-mode value out of range (must be < n)")
