"""Masked decryption, requester side: the masks (docs/protocol.md §2.5).

Roles: the requester X (G or H) must learn ``m = Dec(c)``; the arbiter A holds the key.

1. X samples ``R`` uniform in ``Z_n`` per element (:func:`sample_masks`) and sends
   ``c ⊕ R`` to A under the policy tag and step (``DEC_REQ``);
2. A checks its policy and replies ``Y = Dec(c ⊕ R) = m + R mod n`` to X only;
3. X computes ``m = (Y - R) mod n`` and decodes it as the caller requires.

A sees only ``Y``, uniform in ``Z_n`` and independent of ``m``. Adding a mask needs no
extra obfuscation (§2.4). The messages are sent and received by
:class:`protocols.arbiter.client.ArbiterClient` (its step A6); this module holds the masks.

Bound variant (scoring, docs/protocol.md §5.4): X draws a 32-byte seed and hands it to the
producer P of the ciphertexts; P adds the masks :func:`derived_masks` gives for the seed
to what it produced, registers the digests of the masked ciphertexts with A, and sends
them to X, which forwards the ones it needs as they are (:meth:`ArbiterClient.request`
with ``masks``). P learns the masks (uniform, independent of every value) and never sees
``Y``; A can tie each request to what P produced without ever seeing ``c``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from gmpy2 import mpz

from protocols.crypto.paillier import PublicKey
from protocols.errors import PolicyViolationError


def sample_masks(
    n: mpz, count: int, *, randbelow: Callable[[int], int] = secrets.randbelow
) -> list[mpz]:
    """``count`` masks uniform in ``Z_n`` from the OS CSPRNG (§2.3).

    ``randbelow`` is the test-only hook of §2.3 for deterministic statistical tests; the
    protocol code never passes it, so masks always come from ``secrets``.
    """
    bound = int(n)
    return [mpz(randbelow(bound)) for _ in range(count)]


MASK_DOMAIN = b"VFL-bound-mask-v1"


def derived_masks(n: mpz, seed: bytes, *, label: int, indices: Iterable[int]) -> list[mpz]:
    """The masks of the ciphertexts at ``indices`` for the bound variant:
    ``SHAKE-256(domain || seed || label || i)`` read as an integer of ``|n| + 128`` bits,
    reduced mod ``n`` (statistically uniform in ``Z_n``, within ``2^-128``). ``label``
    separates the producer's messages (a request id or chunk number); the producer derives
    every index, the requester only those it forwards."""
    if len(seed) != 32:
        raise PolicyViolationError("a mask seed is 32 bytes")
    width = (int(n).bit_length() + 128 + 7) // 8
    head = MASK_DOMAIN + seed + label.to_bytes(8, "big", signed=False)
    return [
        mpz(int.from_bytes(hashlib.shake_256(head + i.to_bytes(8, "big")).digest(width), "big")) % n
        for i in indices
    ]


@dataclass(frozen=True)
class PendingDecryption:
    """A sent request (step 1): what :meth:`ArbiterClient.collect` needs to finish it."""

    tag: str
    step: int
    key: PublicKey
    shape: tuple[int, ...]
    masks: np.ndarray
