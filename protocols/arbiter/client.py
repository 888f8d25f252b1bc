"""What a data party asks of the arbiter: the one client (docs/protocol.md §2.5, §2.6, §4.4.1,
§5, §6).

Roles and keys: the arbiter A holds the Paillier key pair; the data party X (the guest G or
the host H of a job) holds A's public key only, and talks to A on its job's
:class:`~protocols.link.JobLink`, so every request carries the job id and the run id and A
answers on that route (§2.9). A's side is S1-S5 and D1-D3 of
:mod:`protocols.arbiter.service`.

What A learns from X: the job's spec (shapes, schedule, parties, key id), resume points and
run numbers, that X finished, the digests of ciphertexts X produced for a scoring session,
and, per decryption, the tag, step, shape and ``c ⊕ R``, which is uniform (§2.5). What X
learns from A: the public key, whether A accepted each request (a refusal names the rule,
§1.7), and ``m = Dec(c)`` for what A's policy lets X decrypt.

Steps (code comments cite them):

A1. Key (§2.1; §4.4.1 J1, §5, §6.3 R1): X → A ``KEY_REQ``; A → X ``KEY{public_key}``. X
    refuses a key below the size floor unless ``allow_test_key``, and a key whose id is not
    ``SHA-256(n)`` (:meth:`PublicKey.from_json`).
A2. Registration (§2.6 P1; J3): X → A ``JOB_SPEC``; A → X ``JOB_READY`` once both parties
    sent the same spec, or a refusal, raised as :class:`JobRefusedError` (not retried).
A3. Resume (§2.6 P6; J4): X → A ``RESUME{step, tag_steps}`` at step ``step``; an FTL run
    after the first is opened with ``RESUME{step: 0, run}`` at step ``run`` (§6.5). A → X
    ``RESUMED`` once both parties sent the same.
A4. Finish (§2.6 P7; J8): X → A ``JOB_DONE``; A → X ``JOB_DONE{closed, scoring}`` once both
    sent it. X waits a bounded time; without an answer it logs that the model cannot be
    scored, and the job's result stands.
A5. Binding (§5.4, P8): the producer H → A ``BIND{group, cap_rows, first, digests}`` of the
    masked ciphertexts it is about to send to G; A → H ``BOUND``.
A6. Masked decryption (§2.5, steps 1-3 of :mod:`protocols.arbiter.masked`): X → A ``c ⊕ R``
    under the policy tag and step, with the key id; A → X ``Y = m + R mod n`` (a
    plaintext block of the same shape and key id) or a refusal; X removes ``R``.

Every refusal is raised as its typed error (:func:`protocols.link.raise_if_refused`):
:class:`NoSpaceError` when A flags ``no_space`` (§4.4.1), :class:`JobRefusedError` for a
refused ``JOB_SPEC``, :class:`PolicyViolationError` otherwise.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from protocols.arbiter import masked
from protocols.arbiter.masked import PendingDecryption
from protocols.arbiter.service import SetupTag
from protocols.crypto.fixedpoint import unmask
from protocols.crypto.paillier import PublicKey
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import ControlBlock, PlainBlock
from protocols.errors import (
    MalformedEnvelopeError,
    PolicyViolationError,
    ProtocolError,
    TransportError,
)
from protocols.link import JobLink, raise_if_refused
from protocols.roles import Party
from protocols.tags import tag_value

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArbiterClient:
    """A data party's requests to the arbiter in one job and run (A1-A6).

    Parameters
    ----------
    link
        The job's link (its job id, run id and receive timeout).
    arbiter
        The arbiter.
    allow_test_key
        Accept a key below the size floor (tests only, A1).
    """

    link: JobLink
    arbiter: Party
    allow_test_key: bool = False

    def _ask(
        self,
        tag: SetupTag,
        answer: SetupTag,
        body: dict[str, Any],
        *,
        step: int = 0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send ``tag`` and return A's ``answer`` of the same step, a refusal raised as its
        typed error (a refused ``JOB_SPEC``: :class:`JobRefusedError`)."""
        obj = self.link.ask(self.arbiter, tag, answer, step, body, timeout=timeout)
        job = f"job {self.link.job_id}"
        registering = answer is SetupTag.JOB_READY
        what = job if registering else f"{tag_value(tag)} of {job}"
        return raise_if_refused(obj, sender=self.arbiter, what=what, refuses_job=registering)

    def public_key(self) -> PublicKey:
        """A1: the arbiter's public key."""
        obj = self._ask(SetupTag.KEY_REQ, SetupTag.KEY, {})
        if not isinstance(obj.get("public_key"), dict):
            raise MalformedEnvelopeError(f"{SetupTag.KEY.value} from {self.arbiter} holds no key")
        return PublicKey.from_json(obj["public_key"], allow_test_key=self.allow_test_key)

    def register(self, spec: dict[str, Any]) -> None:
        """A2: register the job's spec (``JOB_SPEC`` body); returns once A activated it."""
        self._ask(SetupTag.JOB_SPEC, SetupTag.JOB_READY, spec)

    def resume(self, *, step: int, tag_steps: Mapping[str, int]) -> None:
        """A3: re-open the steps from ``step`` (and each tag's own counter in ``tag_steps``)."""
        body = {"step": step, "tag_steps": dict(tag_steps)}
        self._ask(SetupTag.RESUME, SetupTag.RESUMED, body, step=step)

    def open_run(self, run: int) -> None:
        """A3 for numbered runs (FTL, §6.5): open run ``run``; the first needs no opening."""
        if run <= 1:
            return
        self._ask(SetupTag.RESUME, SetupTag.RESUMED, {"step": 0, "run": run}, step=run)

    def finish(self, *, timeout: float) -> bool:
        """A4: the job is over here; whether A registered its model for scoring.

        Without an answer within ``timeout`` (or with a refusal) the log says the model
        cannot be scored; the job's result stands.
        """
        try:
            obj = self._ask(SetupTag.JOB_DONE, SetupTag.JOB_DONE, {}, timeout=timeout)
        except (TimeoutError, TransportError, ProtocolError) as exc:
            logger.warning(
                "job %s: the arbiter did not register its model for scoring (%s)",
                self.link.job_id,
                exc,
            )
            return False
        return bool(obj.get("scoring"))

    def bind(
        self, *, step: int, group: int, cap_rows: int, first: bool, digests: Sequence[bytes]
    ) -> None:
        """A5: register the digests of masked ciphertexts this party produced (§5.4)."""
        body = {
            "group": group,
            "cap_rows": cap_rows,
            "first": first,
            "digests": base64.b64encode(b"".join(digests)).decode(),
        }
        self._ask(SetupTag.BIND, SetupTag.BOUND, body, step=step)

    def request(
        self,
        tensor: EncryptedTensor,
        *,
        tag: StrEnum | str,
        step: int,
        masks: np.ndarray | None = None,
    ) -> PendingDecryption:
        """A6, step 1: send ``c ⊕ R``; the caller may work while A decrypts, then
        :meth:`collect`.

        ``masks``: ``tensor`` already holds them (the bound variant: its producer added
        them), so it is sent as it is.
        """
        key = tensor.cipher.key
        if masks is None:
            masks = np.empty(tensor.values.shape, dtype=object)
            masks.reshape(-1)[:] = masked.sample_masks(key.n, tensor.values.size)  # step 1
            sent = tensor.add_plain(masks)
        elif masks.shape != tensor.values.shape:
            raise PolicyViolationError("the masks do not fit the ciphertexts")
        else:
            sent = tensor
        self.link.send(self.arbiter, tag, step, sent.to_block(), key_id=key.key_id)
        return PendingDecryption(
            tag=tag_value(tag), step=step, key=key, shape=tensor.shape, masks=masks
        )

    def collect(self, pending: PendingDecryption) -> np.ndarray:
        """A6, steps 2-3: wait for A's answer and remove the masks: residues
        ``m = Dec(c)`` in ``[0, n)``, shaped like the request (not yet decoded)."""
        key, step = pending.key, pending.step
        reply = self.link.recv(self.arbiter, pending.tag, step)  # step 2
        if isinstance(reply.body, ControlBlock):
            raise_if_refused(
                {"refused": "no reason given", **reply.body.obj()},
                sender=self.arbiter,
                what=f"decryption {pending.tag} step {step}",
            )
        if not isinstance(reply.body, PlainBlock) or tuple(reply.body.shape) != pending.shape:
            raise MalformedEnvelopeError(
                f"decryption reply for {pending.tag} step {step} has the wrong shape"
            )
        key.check_key_id(reply.key_id)
        y = np.empty(pending.shape, dtype=object)
        y.reshape(-1)[:] = key.residues_from_bytes(reply.body.data, count=pending.masks.size)
        return unmask(y, pending.masks, key.n)  # step 3

    def decrypt(self, tensor: EncryptedTensor, *, tag: StrEnum | str, step: int) -> np.ndarray:
        """A6: :meth:`request` and :meth:`collect` at once."""
        return self.collect(self.request(tensor, tag=tag, step=step))
