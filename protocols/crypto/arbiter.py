"""The arbiter's decryption service and its policy (docs/protocol.md §2.5, §2.6, §4.4.1).

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
4. ``RESUME{job, step}`` re-opens steps ``>= step`` and drops their cached replies;
5. a scoring grant (:meth:`DecryptionPolicy.grant`, set up by the arbiter's own operator
   policy, not by agreement) admits up to ``count`` values per request in whole rows, until
   its quota of values is used up or it expires; its replies are not cached.

Setup messages (:class:`SetupTag`), answered by :meth:`ArbiterService.serve_setup`:

S1. ``KEY_REQ`` from a configured peer → ``KEY``: the public key (never anything else);
S2. ``JOB_SPEC`` from each requester of a job → ``JOB_READY`` to all of them once they agree
    (the reply waits for the last one), or a refusal to all if they disagree or the spec is
    outside A's own acceptance policy (the ``admit`` hook of :meth:`ArbiterService.serve_setup`);
S3. ``RESUME{step, tag_steps}`` from each requester → rule 4 applied once all requesters sent
    the same body, then ``RESUMED`` to all; disagreeing bodies are refused.

A logs counts per tag only, never values. A keeps registrations, served-step marks and
cached replies in memory: a restarted A has forgotten them (the parties' next run registers
again, S2, and re-opens its steps, S3). Its replies to each party start, per job and process,
at sequence number "now in microseconds", so a restarted A never reuses one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from gmpy2 import mpz

from protocols.crypto.cipher import Cipher
from protocols.crypto.counters import Op, record
from protocols.crypto.paillier import PrivateKey, PublicKey, read_key_file
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, ControlBlock, Envelope, PlainBlock
from protocols.errors import CryptoError, PolicyViolationError, ProtocolError, VflError
from protocols.executor import Executor, split
from protocols.roles import Party
from protocols.tags import tag_value
from protocols.transport.base import Channel, MessageFilter

logger = logging.getLogger(__name__)


class SetupTag(StrEnum):
    """The arbiter's setup messages (S1-S3 of the module docstring)."""

    KEY_REQ = "arbiter.KEY_REQ"
    KEY = "arbiter.KEY"
    JOB_SPEC = "arbiter.JOB_SPEC"
    JOB_READY = "arbiter.JOB_READY"
    RESUME = "arbiter.RESUME"
    RESUMED = "arbiter.RESUMED"


@dataclass(frozen=True)
class PolicyRule:
    """Tag ``tag`` may be decrypted for ``requester`` (party id), ``count`` values per step.

    With ``unit > 0`` (scoring), ``count`` is a maximum and a request must hold a positive
    multiple of ``unit`` values (whole rows of ``unit`` ciphertexts each).
    """

    tag: str
    requester: str
    count: int
    unit: int = 0


@dataclass(frozen=True)
class JobPolicy:
    """What a job may have decrypted (derived from its JOB_SPEC)."""

    job_id: str
    key_id: bytes
    rules: tuple[PolicyRule, ...]
    encrypted: bool = True  # False: a plaintext experiment, A returns the values as they are
    quota: int | None = None  # values this job may have decrypted in all (scoring grants)
    expires_at: float | None = None  # unix time after which every request is refused
    cache_replies: bool = True  # False: scoring, whose requests are never repeated

    @property
    def requesters(self) -> frozenset[str]:
        """The parties that request decryptions (and must agree on setup messages)."""
        return frozenset(r.requester for r in self.rules)

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
            if rule.unit:
                if count < 1 or count > rule.count or count % rule.unit:
                    raise PolicyViolationError(
                        f"{tag} step {step}: {count} values requested; the policy allows up to "
                        f"{rule.count} in whole rows of {rule.unit}"
                    )
            elif count != rule.count:
                raise PolicyViolationError(
                    f"{tag} step {step}: {count} values requested, policy allows {rule.count}"
                )
            if job.expires_at is not None and time.time() > job.expires_at:
                raise PolicyViolationError(f"the decryption grant of {job_id} has expired")
            used = sum(n for (j, _), n in self._counts.items() if j == job_id)
            if job.quota is not None and used + count > job.quota:
                raise PolicyViolationError(
                    f"{job_id} would exceed its quota ({used} of {job.quota} values used)"
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

    def grant(self, policy: JobPolicy, *, used: Mapping[str, int] | None = None) -> None:
        """Register a single-requester policy directly (a scoring grant), with the counts
        it already used before a restart."""
        with self._lock:
            self._jobs[policy.job_id] = policy
            for tag, n in (used or {}).items():
                self._counts[(policy.job_id, tag)] = int(n)
        logger.info("decryption grant %s registered", policy.job_id)

    def cache_reply(self, *, job_id: str, step: int, tag: str, reply: Envelope) -> None:
        """Keep the reply sent for a served request (rule 2)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.cache_replies:
                self._replies[(job_id, step, tag)] = reply

    def cached_reply(self, *, job_id: str, step: int, tag: str) -> Envelope | None:
        """The reply sent earlier for this request, if any."""
        with self._lock:
            return self._replies.get((job_id, step, tag))

    def resume(self, job_id: str, step: int, *, tag_steps: Mapping[str, int] | None = None) -> None:
        """Rule 4: re-open steps ``>= step`` of ``job_id`` (per tag ``>= tag_steps[tag]``)."""
        thresholds = dict(tag_steps or {})
        with self._lock:
            for key in [
                k for k in self._served if k[0] == job_id and k[1] >= thresholds.get(k[2], step)
            ]:
                self._served.pop(key, None)
                self._replies.pop(key, None)
        logger.info("job %s resumed at step %d: counts re-opened", job_id, step)

    def job(self, job_id: str) -> JobPolicy | None:
        """The registered policy of ``job_id``, if any."""
        with self._lock:
            return self._jobs.get(job_id)

    def counts(self, job_id: str) -> dict[str, int]:
        """Values decrypted per tag so far (the audit log's figures)."""
        with self._lock:
            return {tag: n for (job, tag), n in self._counts.items() if job == job_id}


_WORKER_KEYS: dict[int, PrivateKey] = {}
_FILE_KEYS: dict[tuple[str, bytes], PrivateKey] = {}


def _decrypt_chunk(args: tuple[mpz, mpz, mpz, mpz, int, list[mpz]]) -> list[mpz]:
    """Decrypt a slice of values in a worker process (the key stays on this machine).

    Each worker builds the key's CRT constants once and keeps them for later requests.
    """
    p, q, n, h_s, bits, values = args
    key = _WORKER_KEYS.get(int(n))
    if key is None:
        key = PrivateKey(public=PublicKey(n=n, h_s=h_s, bits=bits), p=p, q=q)
        _WORKER_KEYS[int(n)] = key
    return [key.decrypt(c) for c in values]


def _decrypt_chunk_from_file(args: tuple[str, bytes, list[mpz]]) -> list[mpz]:
    """Decrypt a slice with the key this worker loads from the arbiter's key file itself
    (a worker on the silo's Ray cluster: the key is never part of a chunk)."""
    path, key_id, values = args
    key = _FILE_KEYS.get((path, key_id))
    if key is None:
        public, key = read_key_file(Path(path), allow_test_key=True)  # A checked its size
        if public.key_id != key_id:
            raise CryptoError(f"the key file {path} holds another key than the job's")
        _FILE_KEYS[(path, key_id)] = key
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
    key_file
        The arbiter's key file, readable by every worker at this path: workers load the key
        from it and chunks carry only its path and id (for workers on the silo's Ray
        cluster). Without it, chunks carry ``p`` and ``q`` to this machine's own processes.
    """

    def __init__(
        self,
        *,
        channel: Channel,
        cipher: Cipher,
        private_key: PrivateKey | None,
        policy: DecryptionPolicy,
        executor: Executor,
        key_file: Path | None = None,
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
        self._key_file = key_file
        self._setup_lock = threading.Lock()
        self._waiting_ready: dict[str, list[Envelope]] = {}
        self._resumes: dict[str, dict[str, tuple[bytes, Envelope]]] = {}
        self._served_listeners: list[Callable[[str, str, int], None]] = []
        self._stream_lock = threading.Lock()
        self._streams: set[tuple[str, str]] = set()

    def serve(self, tags: Iterable[Enum | str]) -> None:
        """Answer requests with these tags from now on."""
        self._channel.add_handler(
            MessageFilter.for_tags(*tags), self._on_request, on_duplicate=self._on_duplicate
        )

    @property
    def key_id(self) -> bytes:
        """The id of the key this service decrypts with."""
        return self._cipher.key.key_id

    def on_served(self, listener: Callable[[str, str, int], None]) -> None:
        """Call ``listener(job_id, tag, count)`` after each answered request (usage records)."""
        self._served_listeners.append(listener)

    def serve_setup(
        self,
        policy_of: Callable[[dict[str, Any]], JobPolicy],
        *,
        admit: Callable[[dict[str, Any], Party], None] | None = None,
    ) -> None:
        """Answer the setup messages S1-S3; ``policy_of`` derives a policy from a JOB_SPEC body.

        ``admit(body, sender)`` is A's own acceptance policy, applied to every JOB_SPEC before
        it is proposed: a :class:`VflError` it raises refuses the job with its message.
        """
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.KEY_REQ), self._on_key_request)
        self._channel.add_handler(
            MessageFilter.for_tags(SetupTag.JOB_SPEC),
            lambda envelope: self._on_job_spec(envelope, policy_of, admit),
        )
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.RESUME), self._on_resume)

    def _fresh_stream(self, job_id: str, receiver: Party) -> None:
        """Before A's first message to ``receiver`` for ``job_id`` in this process, move its
        sequence numbers to the current time in microseconds: past every number an earlier
        process of A used (the receivers' replay guards remember those across A's restarts),
        as A sends far fewer than one message per microsecond."""
        key = (job_id, receiver.party_id)
        with self._stream_lock:
            if key not in self._streams:
                self._streams.add(key)
                base = time.time_ns() // 1000
                self._channel.restore_stream_state(job_id, {receiver.party_id: base})

    def _setup_reply(self, request: Envelope, tag: SetupTag, obj: dict[str, Any]) -> None:
        self._fresh_stream(request.job_id, request.sender)
        self._channel.send(
            Envelope(
                job_id=request.job_id,
                sender=self._channel.me,
                receiver=request.sender,
                tag=tag,
                step=request.step,
                run_id=request.run_id,
                body=ControlBlock.from_obj(obj),
            )
        )

    def _on_key_request(self, envelope: Envelope) -> None:
        """S1."""
        self._setup_reply(envelope, SetupTag.KEY, {"public_key": self._cipher.key.to_json()})

    def _on_job_spec(
        self,
        envelope: Envelope,
        policy_of: Callable[[dict[str, Any]], JobPolicy],
        admit: Callable[[dict[str, Any], Party], None] | None,
    ) -> None:
        """S2: register when every requester sent the same spec, then answer them all."""
        waiting: list[Envelope] = []
        try:
            if not isinstance(envelope.body, ControlBlock):
                raise PolicyViolationError("JOB_SPEC carries no control block")
            if admit is not None:
                admit(envelope.body.obj(), envelope.sender)
            policy = policy_of(envelope.body.obj())
            if policy.job_id != envelope.job_id:
                raise PolicyViolationError("JOB_SPEC names another job than its envelope")
            if policy.key_id != self._cipher.key.key_id:
                raise PolicyViolationError("JOB_SPEC names another key than the arbiter's")
            if not policy.encrypted:
                logger.warning(
                    "job %s is a PLAINTEXT experiment: nothing is encrypted", policy.job_id
                )
            with self._setup_lock:
                active = self.policy.propose(policy, submitter=envelope.sender.party_id)
                self._waiting_ready.setdefault(envelope.job_id, []).append(envelope)
                if active:
                    waiting = self._waiting_ready.pop(envelope.job_id)
        except (PolicyViolationError, VflError) as exc:
            logger.warning("ALERT: refused JOB_SPEC from %s: %s", envelope.sender, exc)
            with self._setup_lock:
                others = self._waiting_ready.pop(envelope.job_id, [])
            for request in [*others, envelope]:
                self._setup_reply(request, SetupTag.JOB_READY, {"refused": str(exc)[:300]})
            return
        for request in waiting:
            self._setup_reply(request, SetupTag.JOB_READY, {"job_id": envelope.job_id})

    def _on_resume(self, envelope: Envelope) -> None:
        """S3: re-open the steps once every requester asked for the same resume point."""
        job = self.policy.job(envelope.job_id)
        body = envelope.body.obj() if isinstance(envelope.body, ControlBlock) else None
        if job is None or body is None or envelope.sender.party_id not in job.requesters:
            self._setup_reply(envelope, SetupTag.RESUMED, {"refused": "no such job for you"})
            return
        raw = json.dumps(body, sort_keys=True).encode()
        with self._setup_lock:
            pending = self._resumes.setdefault(envelope.job_id, {})
            pending[envelope.sender.party_id] = (raw, envelope)
            if set(pending) < job.requesters:
                return
            del self._resumes[envelope.job_id]
        if len({r for r, _ in pending.values()}) != 1:
            logger.warning("ALERT: RESUME requests of job %s disagree", envelope.job_id)
            for _, request in pending.values():
                self._setup_reply(request, SetupTag.RESUMED, {"refused": "resume points disagree"})
            return
        try:
            step = int(body["step"])
            tag_steps = {str(t): int(v) for t, v in dict(body.get("tag_steps", {})).items()}
        except (KeyError, TypeError, ValueError):
            for _, request in pending.values():
                self._setup_reply(request, SetupTag.RESUMED, {"refused": "malformed RESUME"})
            return
        self.policy.resume(envelope.job_id, step, tag_steps=tag_steps)
        for _, request in pending.values():
            self._setup_reply(request, SetupTag.RESUMED, {"step": step})

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
            values = list(tensor.values.reshape(-1))
            job = self.policy.job(envelope.job_id)
            plain = self._decrypt(values) if job is None or job.encrypted else values
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
        for listener in self._served_listeners:
            listener(envelope.job_id, tag, count)
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
        record(Op.DECRYPTIONS, len(values))
        k = self._key
        parts = split(len(values), self._executor.workers)
        if self._key_file is not None:
            path, key_id = str(self._key_file), k.public.key_id
            file_chunks = [(path, key_id, values[r.start : r.stop]) for r in parts]
            decrypted = self._executor.map(_decrypt_chunk_from_file, file_chunks)
            return [m for chunk in decrypted for m in chunk]
        chunks = [
            (k.p, k.q, k.public.n, k.public.h_s, k.public.bits, values[r.start : r.stop])
            for r in parts
        ]
        return [m for chunk in self._executor.map(_decrypt_chunk, chunks) for m in chunk]

    def _reply(self, request: Envelope, body: PlainBlock | ControlBlock) -> Envelope:
        self._fresh_stream(request.job_id, request.sender)
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
