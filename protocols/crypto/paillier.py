"""Paillier keys and raw ciphertext operations on ``gmpy2.mpz`` (docs/protocol.md §2.1).

Roles and keys: the arbiter A generates the key pair and keeps the private key; it
publishes :class:`PublicKey` (``n``, ``key_id``, the fixed obfuscator base ``h_s``) to
the guest G and host H, who only ever encrypt and evaluate. Nothing in this module
decrypts except :meth:`PrivateKey.decrypt`, which only A calls, on masked values.

Operations (``g = n + 1``, ``N2 = n^2``):

1. ``Enc(m) = (1 + (m mod n)·n) · ρ mod N2`` with ``ρ = r^n`` from the obfuscator pool;
2. ``c ⊕ c' = c·c'``; ``c ⊕ m = c·(1 + (m mod n)·n)``; ``k ⊙ c = c^k`` (``(c⁻¹)^{-k}`` for k < 0);
   ``c ⊖ c' = c·c'⁻¹``; ``Obf(c) = c·ρ`` (all mod ``N2``);
3. ``Dec(c)`` by CRT: two half-size exponentiations mod ``p²`` and ``q²``.

``key_id = SHA-256(I2OSP(n))[:16]``. Ciphertexts travel as ``2|n|/8``-byte big-endian
integers; a receiver checks ``0 < c < N2`` and the key id of every block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2
from gmpy2 import mpz

from protocols.errors import (
    ConfigError,
    CryptoError,
    InsecureConfigError,
    InvalidCiphertextError,
    KeyMismatchError,
)

logger = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
ALLOWED_KEY_BITS = (2048, 3072)


def key_id_of(n: int, n_bytes: int) -> bytes:
    """``SHA-256(I2OSP(n))[:16]``."""
    return hashlib.sha256(int(n).to_bytes(n_bytes, "big")).digest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """``n``, its key id and the fixed obfuscator base ``h_s = h^n mod n²`` (§4.10)."""

    n: mpz
    h_s: mpz
    bits: int
    key_id: bytes = field(init=False)
    n2: mpz = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", mpz(self.n))
        object.__setattr__(self, "h_s", mpz(self.h_s))
        if self.n.bit_length() != self.bits or self.n % 2 == 0:
            raise CryptoError(f"public key n is not an odd {self.bits}-bit modulus")
        n2 = self.n * self.n
        if not 1 < self.h_s < n2 or gmpy2.gcd(self.h_s, self.n) != 1:
            raise CryptoError("public key h_s is not a unit mod n^2")
        object.__setattr__(self, "n2", n2)
        object.__setattr__(self, "key_id", key_id_of(self.n, self.n_bytes))

    @property
    def n_bytes(self) -> int:
        """Bytes of a plaintext / masked value on the wire."""
        return (self.bits + 7) // 8

    @property
    def c_bytes(self) -> int:
        """Bytes of a ciphertext on the wire."""
        return 2 * self.n_bytes

    def to_json(self) -> dict[str, Any]:
        """Serialisable form (hex), sent by the arbiter over the authenticated channel."""
        return {
            "bits": self.bits,
            "n": int(self.n).to_bytes(self.n_bytes, "big").hex(),
            "h_s": int(self.h_s).to_bytes(self.c_bytes, "big").hex(),
            "key_id": self.key_id.hex(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, allow_test_key: bool = False) -> PublicKey:
        """Parse and check a received public key (size floor, key id)."""
        try:
            bits = int(obj["bits"])
            n = int.from_bytes(bytes.fromhex(obj["n"]), "big")
            h_s = int.from_bytes(bytes.fromhex(obj["h_s"]), "big")
            claimed = bytes.fromhex(obj["key_id"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CryptoError(f"public key message is malformed: {exc}") from None
        check_key_bits(bits, allow_test_key=allow_test_key)
        key = cls(n=mpz(n), h_s=mpz(h_s), bits=bits)
        if key.key_id != claimed:
            raise KeyMismatchError("public key id does not match SHA-256(n); refusing the key")
        return key

    # -- raw operations (§2.1) ---------------------------------------------------

    def encrypt(self, m: int, rho: mpz) -> mpz:
        """``(1 + (m mod n)·n)·ρ mod n²`` with a pooled ``ρ`` (use each ``ρ`` once)."""
        return (1 + (m % self.n) * self.n) * rho % self.n2

    def add(self, c1: mpz, c2: mpz) -> mpz:
        """Encrypted addition."""
        return c1 * c2 % self.n2

    def add_plain(self, c: mpz, m: int) -> mpz:
        """Add a plaintext."""
        return c * (1 + (m % self.n) * self.n) % self.n2

    def mul_scalar(self, c: mpz, k: int) -> mpz:
        """Multiply by a small signed scalar."""
        if k >= 0:
            return gmpy2.powmod(c, k, self.n2)
        return gmpy2.powmod(gmpy2.invert(c, self.n2), -k, self.n2)

    def sub(self, c1: mpz, c2: mpz) -> mpz:
        """Encrypted subtraction ``c1 ⊖ c2``."""
        return c1 * gmpy2.invert(c2, self.n2) % self.n2

    def obfuscate(self, c: mpz, rho: mpz) -> mpz:
        """Re-randomise with a fresh pooled ``ρ``."""
        return c * rho % self.n2

    def check_ciphertext(self, c: mpz) -> None:
        """Raise :class:`InvalidCiphertextError` unless ``0 < c < n²``."""
        if not 0 < c < self.n2:
            raise InvalidCiphertextError("ciphertext out of range (must be 0 < c < n^2)")

    def check_key_id(self, key_id: bytes) -> None:
        """Raise :class:`KeyMismatchError` if ``key_id`` is not this key's."""
        if key_id != self.key_id:
            raise KeyMismatchError(
                f"ciphertexts were made under key {key_id.hex()[:12] or 'none'}, "
                f"this party uses key {self.key_id.hex()[:12]}"
            )

    # -- wire format -------------------------------------------------------------

    def ciphertexts_to_bytes(self, values: Any) -> bytes:
        """Concatenate ciphertexts as ``2|n|/8``-byte big-endian integers (C order)."""
        width = self.c_bytes
        return b"".join(int(c).to_bytes(width, "big") for c in values)

    def residues_to_bytes(self, values: Any) -> bytes:
        """Concatenate plaintext residues in ``[0, n)`` as ``|n|/8``-byte big-endian."""
        width = self.n_bytes
        return b"".join(int(v).to_bytes(width, "big") for v in values)

    def residues_from_bytes(self, data: bytes, *, count: int | None = None) -> list[mpz]:
        """Parse residues and check ``0 <= v < n``."""
        out = parse_fixed_width(data, width=self.n_bytes, count=count, what="residue")
        if any(v >= self.n for v in out):
            raise InvalidCiphertextError("plaintext residue out of range (must be < n)")
        return out


@dataclass(frozen=True)
class PrivateKey:
    """The arbiter's private key with CRT constants. Never serialised to a peer."""

    public: PublicKey
    p: mpz
    q: mpz
    _crt: tuple[mpz, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p, q = (mpz(self.p), mpz(self.q)) if self.p < self.q else (mpz(self.q), mpz(self.p))
        if p * q != self.public.n:
            raise CryptoError("private key does not match the public key")
        object.__setattr__(self, "p", p)
        object.__setattr__(self, "q", q)
        p2, q2 = p * p, q * q
        g = self.public.n + 1
        hp = gmpy2.invert((gmpy2.powmod(g, p - 1, p2) - 1) // p, p)
        hq = gmpy2.invert((gmpy2.powmod(g, q - 1, q2) - 1) // q, q)
        p_inv_q = gmpy2.invert(p, q)
        object.__setattr__(self, "_crt", (p - 1, q - 1, p2, q2, hp, hq, p_inv_q))

    def decrypt(self, c: mpz) -> mpz:
        """CRT decryption; the result lies in ``[0, n)``."""
        p1, q1, p2, q2, hp, hq, p_inv_q = self._crt
        p, q = self.p, self.q
        mp = (gmpy2.powmod(c, p1, p2) - 1) // p * hp % p
        mq = (gmpy2.powmod(c, q1, q2) - 1) // q * hq % q
        return mp + (mq - mp) * p_inv_q % q * p

    def half_powmods(self, c: mpz) -> tuple[mpz, mpz]:
        """The decryption's two half-size exponentiations alone (benchmark floor)."""
        p1, q1, p2, q2 = self._crt[:4]
        return gmpy2.powmod(c, p1, p2), gmpy2.powmod(c, q1, q2)


def parse_fixed_width(data: bytes, *, width: int, count: int | None, what: str) -> list[mpz]:
    """Split ``data`` into big-endian integers of ``width`` bytes, checking the length."""
    if len(data) % width or (count is not None and len(data) != count * width):
        expected = f"{count} x {width}" if count is not None else f"a multiple of {width}"
        raise InvalidCiphertextError(f"{what} block of {len(data)} B, expected {expected} B")
    return [mpz(int.from_bytes(data[i : i + width], "big")) for i in range(0, len(data), width)]


def check_key_bits(bits: int, *, allow_test_key: bool) -> None:
    """Refuse keys below 2048 bits unless the explicit test-only flag is set."""
    if bits in ALLOWED_KEY_BITS:
        return
    if bits < MIN_KEY_BITS and allow_test_key and bits >= 256:
        logger.warning("TEST-ONLY Paillier key of %d bits: insecure, never use it for data", bits)
        return
    if bits < MIN_KEY_BITS:
        raise InsecureConfigError(
            f"a {bits}-bit Paillier key is insecure; use 2048 (default) or 3072 bits "
            "(smaller keys exist only for tests, behind allow_test_key=True)"
        )
    raise ConfigError(f"Paillier key size {bits}: use 2048 or 3072 bits")


def generate_keypair(
    *, bits: int = 2048, allow_test_key: bool = False
) -> tuple[PublicKey, PrivateKey]:
    """Generate the arbiter's key pair (phe primes) and a fresh fixed obfuscator base."""
    from phe import paillier

    check_key_bits(bits, allow_test_key=allow_test_key)
    pk, sk = paillier.generate_paillier_keypair(n_length=bits)
    n = mpz(pk.n)
    while True:
        h = mpz(secrets.randbelow(int(n) - 2) + 2)
        if gmpy2.gcd(h, n) == 1:
            break
    public = PublicKey(n=n, h_s=gmpy2.powmod(h, n, n * n), bits=n.bit_length())
    return public, PrivateKey(public=public, p=mpz(sk.p), q=mpz(sk.q))


def key_file_bytes(public: PublicKey, private: PrivateKey) -> bytes:
    """The arbiter's key file (JSON: the public key and ``p``, ``q`` in hex); write it 0600."""
    body = {
        "public": public.to_json(),
        "p": format(int(private.p), "x"),
        "q": format(int(private.q), "x"),
    }
    return json.dumps(body).encode()


def read_key_file(path: Path, *, allow_test_key: bool) -> tuple[PublicKey, PrivateKey]:
    """Parse the arbiter's key file; :class:`CryptoError` (naming the file) if it is unusable."""
    try:
        obj = json.loads(path.read_text())
        public = PublicKey.from_json(obj["public"], allow_test_key=allow_test_key)
        return public, PrivateKey(public=public, p=int(obj["p"], 16), q=int(obj["q"], 16))
    except (OSError, ValueError, KeyError, TypeError, CryptoError) as exc:
        raise CryptoError(f"key file {path} is unreadable ({type(exc).__name__})") from None
