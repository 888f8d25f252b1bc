"""The arbiter's decryption service and its policy (PROTOCOL.md §2.5, §2.6, §4.4.1).

Roles: A holds the Paillier private key; G and H send masked ciphertexts ``c ⊕ R``.
A learns only tags, shapes, counts and timing; every value it decrypts is uniform.

Policy, per job registered from the JOB_SPEC that every requester sends (A checks they
agree and refuses the job otherwise):

1. each ``(job, step, tag)`` is served once; its ``count`` is fixed per tag and must
   come from the tag's one requester;
2. a byte-identical repeat of a served request gets the cached reply, without a new
   decryption, so a lost reply cannot deadlock;
3. anything else (unknown job or tag, wrong requester, wrong count, a different second
   request for a served step) is refused with an alert, and the requester is told why;
4. ``RESUME{job, step}`` re-opens steps ``>= step`` and drops their cached replies.

A logs counts per tag only, never values.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from gmpy2 import mpz

from protocols.crypto.cipher import Cipher
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, ControlBlock, Envelope, PlainBlock
from protocols.errors import CryptoError, PolicyViolationError, ProtocolError
from protocols.executor import Executor, split
from protocols.tags import tag_value
from protocols.transport.base import Channel, MessageFilter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PolicyRule:
    """Tag ``tag`` may be decrypted for ``requester`` (party id), ``count`` values per step."""

    tag: str
    requester: str
    count: int


@dataclass(frozen=True)
class JobPolicy:
    """What a job may have decrypted (derived from its JOB_SPEC)."""

    job_id: str
    key_id: bytes
    rules: tuple[PolicyRule, ...]

    def rule(self, tag: str) -> PolicyRule | None:
        """The rule for ``tag``, if any."""
        return next((r for r in self.rules if r.tag == tag), None)


class Admission(Enum):
    """Outcome of a policy check."""

    NEW = "new"
    CACHED = "cached"


_StepKey = tuple[str, int, str]


class DecryptionPolicy:
    """Rules 1-4 of the module docstring. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proposed: dict[str, dict[str, JobPolicy]] = {}
        self._jobs: dict[str, JobPolicy] = {}
        self._served: dict[_StepKey, bytes] = {}
        self._replies: dict[_StepKey, Envelope] = {}
        self._counts: dict[tuple[str, str], int] = {}

    def propose(self, policy: JobPolicy, *, submitter: str) -> bool:
        """Record one party's JOB_SPEC; the job is active once every requester sent the same.

        Returns whether the job is now active; raises if the proposals disagree.
        """
        with self._lock:
            if policy.job_id in self._jobs:
                if self._jobs[policy.job_id] != policy:
                    raise PolicyViolationError(
                        f"job {policy.job_id} is already registered differently"
                    )
                return True
            proposals = self._proposed.setdefault(policy.job_id, {})
            for other_submitter, other in proposals.items():
                if other != policy:
                    del self._proposed[policy.job_id]
                    logger.warning(
                        "ALERT: JOB_SPECs of %s and %s disagree; job %s refused",
                        other_submitter,
                        submitter,
                        policy.job_id,
                    )
                    raise PolicyViolationError(
                        f"JOB_SPEC from {submitter} disagrees with the one from {other_submitter}; "
                        f"job {policy.job_id} refused"
                    )
            proposals[submitter] = policy
            if {r.requester for r in policy.rules} <= set(proposals):
                self._jobs[policy.job_id] = policy
                del self._proposed[policy.job_id]
                logger.info(
                    "job %s registered: %s",
                    policy.job_id,
                    ", ".join(f"{r.tag}x{r.count}" for r in policy.rules),
                )
                return True
            return False

    def admit(
        self, *, job_id: str, step: int, tag: str, requester: str, count: int, digest: bytes
    ) -> Admission:
        """Apply rules 1-3 to one request."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise PolicyViolationError(f"job {job_id} has no registered decryption policy")
            rule = job.rule(tag)
            if rule is None:
                raise PolicyViolationError(f"tag {tag} is not decryptable in job {job_id}")
            if requester != rule.requester:
                raise PolicyViolationError(
                    f"{requester} may not request {tag} (only {rule.requester})"
                )
            if count != rule.count:
                raise PolicyViolationError(
                    f"{tag} step {step}: {count} values requested, policy allows {rule.count}"
                )
            key = (job_id, step, tag)
            served = self._served.get(key)
            if served is not None:
                if served == digest and key in self._replies:
                    return Admission.CACHED
                raise PolicyViolationError(f"{tag} step {step} of job {job_id} was already served")
            self._served[key] = digest
            self._counts[(job_id, tag)] = self._counts.get((job_id, tag), 0) + count
            return Admission.NEW

    def cache_reply(self, *, job_id: str, step: int, tag: str, reply: Envelope) -> None:
        """Keep the reply sent for a served request (rule 2)."""
        with self._lock:
            self._replies[(job_id, step, tag)] = reply

    def cached_reply(self, *, job_id: str, step: int, tag: str) -> Envelope | None:
        """The reply sent earlier for this request, if any."""
        with self._lock:
            return self._replies.get((job_id, step, tag))

    def resume(self, job_id: str, step: int) -> None:
        """Rule 4: re-open steps ``>= step`` of ``job_id``."""
        with self._lock:
            for key in [k for k in self._served if k[0] == job_id and k[1] >= step]:
                self._served.pop(key, None)
                self._replies.pop(key, None)
        logger.info("job %s resumed at step %d: counts re-opened", job_id, step)

    def counts(self, job_id: str) -> dict[str, int]:
        """Values decrypted per tag so far (the audit log's figures)."""
        with self._lock:
            return {tag: n for (job, tag), n in self._counts.items() if job == job_id}


def _decrypt_chunk(args: tuple[mpz, mpz, mpz, mpz, int, list[mpz]]) -> list[mpz]:
    """Decrypt a slice of values in a worker process (the key stays on this machine)."""
    p, q, n, h_s, bits, values = args
    key = PrivateKey(public=PublicKey(n=n, h_s=h_s, bits=bits), p=p, q=q)
    return [key.decrypt(c) for c in values]


class ArbiterService:
    """Answers masked decryption requests on a channel under a :class:`DecryptionPolicy`.

    Parameters
    ----------
    channel
        The arbiter's channel (the policy tags must be registered on it).
    cipher
        The cipher of the job (Paillier, or plaintext for experiments).
    private_key
        The key; ``None`` only with a plaintext cipher.
    policy
        The policy to enforce.
    executor
        Where decryptions run (split over processes: the arbiter is the critical path).
    """

    def __init__(
        self,
        *,
        channel: Channel,
        cipher: Cipher,
        private_key: PrivateKey | None,
        policy: DecryptionPolicy,
        executor: Executor,
    ) -> None:
        if cipher.encrypted and private_key is None:
            raise CryptoError("the arbiter needs its private key to serve a Paillier job")
        if private_key is not None and private_key.public.key_id != cipher.key.key_id:
            raise CryptoError("the private key does not belong to the job's public key")
        self._channel = channel
        self._cipher = cipher
        self._key = private_key
        self.policy = policy
        self._executor = executor

    def serve(self, tags: Iterable[Enum | str]) -> None:
        """Answer requests with these tags from now on."""
        self._channel.add_handler(
            MessageFilter.for_tags(*tags), self._on_request, on_duplicate=self._on_duplicate
        )

    def _on_request(self, envelope: Envelope) -> None:
        tag = tag_value(envelope.tag)
        try:
            if not isinstance(envelope.body, CipherBlock):
                raise PolicyViolationError(f"{tag} request carries no ciphertexts")
            count = math.prod(envelope.body.shape) if envelope.body.shape else 0
            digest = hashlib.sha256(
                envelope.key_id + repr(envelope.body.shape).encode() + envelope.payload
            ).digest()
            admission = self.policy.admit(
                job_id=envelope.job_id,
                step=envelope.step,
                tag=tag,
                requester=envelope.sender.party_id,
                count=count,
                digest=digest,
            )
            if admission is Admission.CACHED:
                self._on_duplicate(envelope)
                return
            tensor = EncryptedTensor.from_block(
                envelope.body, cipher=self._cipher, key_id=envelope.key_id
            )
            plain = self._decrypt(list(tensor.values.reshape(-1)))
        except (PolicyViolationError, CryptoError, ProtocolError) as exc:
            logger.warning(
                "ALERT: refused decryption request from %s: %s (%s)",
                envelope.sender,
                exc,
                envelope.describe(),
            )
            self._channel.send(
                self._reply(envelope, ControlBlock.from_obj({"refused": str(exc)[:300]}))
            )
            return
        body = PlainBlock(self._cipher.key.residues_to_bytes(plain), shape=envelope.body.shape)
        sent = self._channel.send(self._reply(envelope, body))
        self.policy.cache_reply(job_id=envelope.job_id, step=envelope.step, tag=tag, reply=sent)
        logger.info(
            "decrypted %d values for %s: %s step %d",
            count,
            envelope.sender.party_id,
            tag,
            envelope.step,
        )

    def _on_duplicate(self, envelope: Envelope) -> None:
        cached = self.policy.cached_reply(
            job_id=envelope.job_id, step=envelope.step, tag=tag_value(envelope.tag)
        )
        if cached is not None:
            logger.info("repeat of %s step %d answered from cache", envelope.tag, envelope.step)
            self._channel.send(cached)

    def _decrypt(self, values: list[mpz]) -> list[mpz]:
        if self._key is None:
            return values
        k = self._key
        parts = split(len(values), self._executor.workers)
        chunks = [
            (k.p, k.q, k.public.n, k.public.h_s, k.public.bits, values[r.start : r.stop])
            for r in parts
        ]
        return [m for chunk in self._executor.map(_decrypt_chunk, chunks) for m in chunk]

    def _reply(self, request: Envelope, body: PlainBlock | ControlBlock) -> Envelope:
        return Envelope(
            job_id=request.job_id,
            sender=self._channel.me,
            receiver=request.sender,
            tag=request.tag,
            step=request.step,
            run_id=request.run_id,
            key_id=request.key_id,
            body=body,
        )
