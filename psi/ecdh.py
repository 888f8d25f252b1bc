"""The X25519 group of the PSI (docs/protocol.md §3.1, §3.3).

* Hash to curve: ``u(c)`` is the first ``u_j`` (``j = 0..255``) with
  ``u_j = SHA-512(DST ‖ salt ‖ I2OSP(len(c), 4) ‖ c ‖ I2OSP(j, 1))[0:32]``, bit 255 cleared,
  ``u_j < p`` and ``u³ + 486662u² + u`` a square mod ``p`` (Legendre symbol via gmpy2), so
  every hashed point is on Curve25519 itself, never on the twist.
* Masking: ``M_k(u) = X25519(k, u)`` with ``cryptography``; commutative, constant-time.
* Validation of received lists: 32-byte elements, bit 255 clear, ``u < p``, no duplicates.
* Dummies (padding): public keys of fresh X25519 keys, distributed like masked points.

The chunk functions at the bottom run in executor worker processes; private keys reach
them only within this party's own process tree.
"""

from __future__ import annotations

import hashlib
import secrets

import gmpy2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from gmpy2 import mpz

from protocols.errors import AlignmentError, InvalidPointError

P = (1 << 255) - 19
_P = mpz(P)
_A = mpz(486662)
POINT_BYTES = 32
SALT_BYTES = 16


def dst(id_type: str) -> bytes:
    """Domain separation tag ``DST v2`` for an id type."""
    return b"VFL-PSI-v2|X25519|SHA-512|" + id_type.encode() + b"|"


def on_curve(u: int) -> bool:
    """Euler criterion: is ``u³ + 486662u² + u`` a square mod ``p`` (u on Curve25519)?"""
    m = mpz(u)
    f = (m * (m * (m + _A) + 1)) % _P
    return bool(f == 0 or gmpy2.legendre(f, _P) == 1)


def hash_to_curve(c: bytes, *, prefix: bytes) -> bytes:
    """``u(c)`` as 32 little-endian bytes; ``prefix = DST ‖ salt``."""
    head = prefix + len(c).to_bytes(4, "big") + c
    for j in range(256):
        digest = bytearray(hashlib.sha512(head + bytes((j,))).digest()[:POINT_BYTES])
        digest[31] &= 0x7F
        u = mpz(int.from_bytes(digest, "little"))
        if u >= _P:
            continue
        f = (u * (u * (u + _A) + 1)) % _P
        if f != 0 and gmpy2.legendre(f, _P) == 1:
            return bytes(digest)
    raise AlignmentError("hash to curve found no point in 256 tries (probability 2^-256)")


def mask(key: X25519PrivateKey, points: bytes) -> bytes:
    """``M_k`` of every 32-byte point in ``points`` (concatenated in and out)."""
    out = bytearray(len(points))
    exchange = key.exchange
    from_bytes = X25519PublicKey.from_public_bytes
    for i in range(0, len(points), POINT_BYTES):
        try:
            out[i : i + POINT_BYTES] = exchange(from_bytes(points[i : i + POINT_BYTES]))
        except ValueError:
            raise InvalidPointError(f"element {i // POINT_BYTES} is a small-order point") from None
    return bytes(out)


def dummy_points(count: int) -> bytes:
    """``count`` uniform points of the prime-order subgroup (padding)."""
    return b"".join(
        X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(count)
    )


def validate(
    data: bytes, *, expected: int | None = None, what: str = "list", duplicates: bool = True
) -> np.ndarray:
    """Check a received list of points; return it as an ``S32`` array.

    Raises :class:`InvalidPointError` for a bad length, a non-canonical encoding (bit 255
    set or ``u >= p``) or, unless ``duplicates=False`` (the caller checks the whole list
    instead of one chunk), a duplicate element.
    """
    if len(data) % POINT_BYTES:
        raise InvalidPointError(f"{what}: {len(data)} B is not a whole number of 32-byte points")
    count = len(data) // POINT_BYTES
    if expected is not None and count != expected:
        raise InvalidPointError(f"{what}: {count} points, expected {expected}")
    words = np.frombuffer(data, dtype="<u8").reshape(count, 4)
    top = words[:, 3]
    if np.any(top >> np.uint64(63)):
        raise InvalidPointError(f"{what}: an element has bit 255 set (not canonical)")
    at_p = (top == np.uint64(0x7FFFFFFFFFFFFFFF)) & (words[:, 2] == np.uint64(2**64 - 1))
    at_p &= (words[:, 1] == np.uint64(2**64 - 1)) & (words[:, 0] >= np.uint64(2**64 - 19))
    if np.any(at_p):
        raise InvalidPointError(f"{what}: an element is >= p (not canonical)")
    points = np.frombuffer(data, dtype="S32")
    if duplicates and count > 1:
        ordered = np.sort(points, kind="stable")
        if np.any(ordered[1:] == ordered[:-1]):
            raise InvalidPointError(f"{what}: duplicate elements (an honest peer deduplicates)")
    return points


def new_key() -> bytes:
    """A fresh ephemeral X25519 private key (raw bytes), one per PSI run."""
    return X25519PrivateKey.generate().private_bytes_raw()


def new_salt() -> bytes:
    """A fresh 16-byte run salt (= run id)."""
    return secrets.token_bytes(SALT_BYTES)


# ---------------------------------------------------------------------------
# executor chunk functions (worker processes)


def hash_and_mask_chunk(args: tuple[bytes, bytes, list[bytes | None]]) -> bytes:
    """``M_k(u(c))`` for each item; ``None`` items become dummies."""
    key_bytes, prefix, items = args
    key = X25519PrivateKey.from_private_bytes(key_bytes)
    exchange = key.exchange
    from_bytes = X25519PublicKey.from_public_bytes
    out = []
    for c in items:
        if c is None:
            out.append(X25519PrivateKey.generate().public_key().public_bytes_raw())
        else:
            out.append(exchange(from_bytes(hash_to_curve(c, prefix=prefix))))
    return b"".join(out)


def mask_chunk(args: tuple[bytes, bytes]) -> bytes:
    """``M_k`` of each point of a received chunk."""
    key_bytes, points = args
    return mask(X25519PrivateKey.from_private_bytes(key_bytes), points)
