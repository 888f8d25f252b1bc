"""Masked decryption, requester side (docs/protocol.md §2.5).

Roles: the requester X (G or H) must learn ``m = Dec(c)``; the arbiter A holds the key.

1. X samples ``R`` uniform in ``Z_n`` per element (:func:`sample_masks`) and sends
   ``c ⊕ R`` to A under the policy tag and step (``DEC_REQ``);
2. A checks its policy and replies ``Y = Dec(c ⊕ R) = m + R mod n`` to X only;
3. X computes ``m = (Y - R) mod n`` and decodes it as the caller requires.

A sees only ``Y``, uniform in ``Z_n`` and independent of ``m``. Adding a mask needs no
extra obfuscation (§2.4).

Bound variant (scoring, docs/protocol.md §5.4): X draws a 32-byte seed and hands it to the
producer P of the ciphertexts; P adds the masks :func:`derived_masks` gives for the seed
to what it produced, registers the digests of the masked ciphertexts with A, and sends
them to X, which forwards the ones it needs as they are (:meth:`MaskedDecryptionClient.
request` with ``masks``). P learns the masks (uniform, independent of every value) and
never sees ``Y``; A can tie each request to what P produced without ever seeing ``c``.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import numpy as np
from gmpy2 import mpz

from protocols.crypto.cipher import Cipher
from protocols.crypto.fixedpoint import unmask
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import ControlBlock, Envelope, PlainBlock
from protocols.errors import MalformedEnvelopeError, NoSpaceError, PolicyViolationError
from protocols.roles import Party
from protocols.tags import tag_value
from protocols.transport.base import Channel


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
    """A sent request: what :meth:`MaskedDecryptionClient.collect` needs to finish it."""

    job_id: str
    tag: str
    step: int
    run_id: str
    shape: tuple[int, ...]
    masks: np.ndarray


class MaskedDecryptionClient:
    """Runs steps 1-3 of the module docstring over a channel."""

    def __init__(
        self, *, channel: Channel, arbiter: Party, cipher: Cipher, timeout: float = 600.0
    ) -> None:
        self._channel = channel
        self._arbiter = arbiter
        self._cipher = cipher
        self._timeout = timeout

    def decrypt(
        self, tensor: EncryptedTensor, *, job_id: str, tag: Enum | str, step: int, run_id: str = ""
    ) -> np.ndarray:
        """Residues ``m = Dec(c)`` in ``[0, n)``, shaped like ``tensor`` (not yet decoded)."""
        return self.collect(self.request(tensor, job_id=job_id, tag=tag, step=step, run_id=run_id))

    def request(
        self,
        tensor: EncryptedTensor,
        *,
        job_id: str,
        tag: Enum | str,
        step: int,
        run_id: str = "",
        masks: np.ndarray | None = None,
    ) -> PendingDecryption:
        """Step 1: send ``c ⊕ R``; the caller may work while A decrypts, then :meth:`collect`.

        ``masks``: ``tensor`` already holds them (the bound variant: its producer added
        them), so it is sent as it is.
        """
        key = self._cipher.key
        if masks is None:
            masks = np.empty(tensor.values.shape, dtype=object)
            masks.reshape(-1)[:] = sample_masks(key.n, tensor.values.size)  # step 1
            masked = tensor.add_plain(masks)
        elif masks.shape != tensor.values.shape:
            raise PolicyViolationError("the masks do not fit the ciphertexts")
        else:
            masked = tensor
        tag = tag_value(tag)
        self._channel.send(
            Envelope(
                job_id=job_id,
                sender=self._channel.me,
                receiver=self._arbiter,
                tag=tag,
                step=step,
                run_id=run_id,
                key_id=key.key_id,
                body=masked.to_block(),
            )
        )
        return PendingDecryption(
            job_id=job_id, tag=tag, step=step, run_id=run_id, shape=tensor.shape, masks=masks
        )

    def collect(self, pending: PendingDecryption) -> np.ndarray:
        """Steps 2-3: wait for A's reply and remove the masks."""
        key = self._cipher.key
        step = pending.step
        reply = self._channel.recv(  # step 2
            job_id=pending.job_id,
            sender=self._arbiter,
            tag=pending.tag,
            step=step,
            run_id=pending.run_id,
            timeout=self._timeout,
        )
        if isinstance(reply.body, ControlBlock):
            body = reply.body.obj()
            reason = str(body.get("refused", "no reason given"))[:300]
            if body.get("no_space") is True:  # the arbiter's folder is full (§4.4.1)
                raise NoSpaceError(f"the arbiter cannot decrypt {reply.tag} now: {reason}")
            raise PolicyViolationError(
                f"the arbiter refused decryption {reply.tag} step {step}: {reason}"
            )
        if not isinstance(reply.body, PlainBlock) or tuple(reply.body.shape) != pending.shape:
            raise MalformedEnvelopeError(
                f"decryption reply for {reply.tag} step {step} has the wrong shape"
            )
        key.check_key_id(reply.key_id)
        y = np.empty(pending.shape, dtype=object)
        y.reshape(-1)[:] = key.residues_from_bytes(reply.body.data, count=pending.masks.size)
        return unmask(y, pending.masks, key.n)  # step 3
