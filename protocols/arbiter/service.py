"""The arbiter's decryption service (docs/protocol.md §2.5, §2.6, §4.4.1, §5.4).

Roles: A holds the Paillier private key; G and H send masked ciphertexts ``c ⊕ R`` (for
scoring, H masks with G's mask and registers the result first, §5.4). A learns only tags,
shapes, counts, digests and timing; every value it decrypts is uniform. What A serves is
decided by its :class:`~protocols.crypto.policy.DecryptionPolicy` (rules P1-P9 there).

Setup messages (:class:`SetupTag`), answered by :meth:`ArbiterService.serve_setup`:

S1. ``KEY_REQ`` from a configured peer → ``KEY``: the public key (never anything else);
S2. ``JOB_SPEC`` from each party of a job → ``JOB_READY`` to both once they agree (P1; the
    reply waits for the second), or a refusal to both if they disagree, if the sender is
    no party of it, or if the spec is outside A's own acceptance policy (the ``admit`` hook
    of :meth:`ArbiterService.serve_setup`, which checks the parties against A's config);
    the listeners of :meth:`ArbiterService.on_proposed` see each spec P1 took, and no other;
S3. ``RESUME{step, tag_steps}`` (FTL: ``RESUME{step, run}``) from each party → P6 applied
    once both sent the same body, then ``RESUMED`` to both; disagreeing bodies, or a resume
    P6 refuses, are refused;
S4. ``JOB_DONE`` from each party → P7 once both sent it (the job closes; a split-NN model is
    registered for scoring), then ``JOB_DONE`` to both;
S5. ``BIND{group, cap_rows, first, digests}`` from a grant's binder → P8 registration,
    ``BOUND``.

Decryption requests (D1-D3):

D1. A computes the request's digest and, for a bound grant, each ciphertext's digest, and
    asks the policy (P2-P5, P8); a refusal is answered with its peer-safe reason
    (:func:`protocols.errors.peer_reason`), logged in full as an alert
    and passed to the refusal listeners (the service's audit log);
D2. A new request is decrypted (on the executor's workers) and answered; its reply is
    cached (P4); a byte-identical repeat gets the cached reply or, if no longer cached,
    the same ciphertexts decrypted again (not counted);
D3. the usage listeners see ``(job, tag, count)`` of every answered new request.

A logs counts per tag only, never values. Its replies to each party start, per job and
process, at sequence number "now in microseconds", so a restarted A never reuses one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from gmpy2 import mpz

from protocols.crypto.cipher import Cipher
from protocols.crypto.counters import Op, record
from protocols.crypto.paillier import PrivateKey, PublicKey, read_key_file
from protocols.crypto.policy import (
    DIGEST_BYTES,
    Admission,
    DecryptionPolicy,
    JobPolicy,
    ciphertext_digests,
)
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, ControlBlock, Envelope, PlainBlock
from protocols.errors import (
    CryptoError,
    NoSpaceError,
    PolicyViolationError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.executor import Executor, split
from protocols.roles import Party
from protocols.tags import tag_value
from protocols.transport.base import Channel, MessageFilter

logger = logging.getLogger(__name__)


class SetupTag(StrEnum):
    """The arbiter's setup messages (S1-S5 of the module docstring)."""

    KEY_REQ = "arbiter.KEY_REQ"
    KEY = "arbiter.KEY"
    JOB_SPEC = "arbiter.JOB_SPEC"
    JOB_READY = "arbiter.JOB_READY"
    RESUME = "arbiter.RESUME"
    RESUMED = "arbiter.RESUMED"
    JOB_DONE = "arbiter.JOB_DONE"
    BIND = "arbiter.BIND"
    BOUND = "arbiter.BOUND"


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
        self._done: dict[str, dict[str, tuple[bytes, Envelope]]] = {}
        self._refused_listeners: list[Callable[[Envelope, str], None]] = []
        self._served_listeners: list[Callable[[str, str, int], None]] = []
        self._closed_listeners: list[Callable[[str], None]] = []
        self._proposed_listeners: list[Callable[[dict[str, Any], Party, bool], None]] = []
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

    def on_closed(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(job_id)`` once a job is closed (S4: both parties sent JOB_DONE)."""
        self._closed_listeners.append(listener)

    def on_proposed(self, listener: Callable[[dict[str, Any], Party, bool], None]) -> None:
        """Call ``listener(spec, sender, registered)`` for every JOB_SPEC that P1 took as a
        proposal of its job (S2), ``registered`` once the job is active; never for a
        refused one (e.g. another guest's spec for a job another guest proposed)."""
        self._proposed_listeners.append(listener)

    def on_refused(self, listener: Callable[[Envelope, str], None]) -> None:
        """Call ``listener(request, reason)`` for every refused request (D1, S2-S5)."""
        self._refused_listeners.append(listener)

    def refuse(self, envelope: Envelope, reason: str) -> None:
        """Log a refused request as an alert and pass it to the refusal listeners (its
        answer is the caller's)."""
        logger.warning(
            "ALERT: refused %s from %s: %s", envelope.describe(), envelope.sender, reason
        )
        for listener in self._refused_listeners:
            listener(envelope, reason)

    def serve_setup(
        self,
        policy_of: Callable[[dict[str, Any]], JobPolicy],
        *,
        admit: Callable[[dict[str, Any], Party], None] | None = None,
    ) -> None:
        """Answer the setup messages S1-S5; ``policy_of`` derives a policy from a JOB_SPEC body.

        ``admit(body, sender)`` is A's own acceptance policy, applied to every JOB_SPEC before
        it is proposed: a :class:`VflError` it raises refuses the job with its message.
        """
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.KEY_REQ), self._on_key_request)
        self._channel.add_handler(
            MessageFilter.for_tags(SetupTag.JOB_SPEC),
            lambda envelope: self._on_job_spec(envelope, policy_of, admit),
        )
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.RESUME), self._on_resume)
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.JOB_DONE), self._on_done)
        self._channel.add_handler(MessageFilter.for_tags(SetupTag.BIND), self._on_bind)

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

    def reply(self, request: Envelope, tag: StrEnum, obj: dict[str, Any]) -> None:
        """Answer ``request`` with a control block (setup replies, and the scoring grants
        kept beside this service), on a stream numbered as :meth:`_fresh_stream` says."""
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

    @staticmethod
    def _refusal(public: str, exc: BaseException) -> dict[str, Any]:
        """A refusal's body; a full state folder is flagged (``no_space``), never read from
        the text, so no peer-chosen string can pass for it (docs/protocol.md §4.4.1)."""
        body: dict[str, Any] = {"refused": public}
        if isinstance(exc, NoSpaceError):
            body["no_space"] = True
        return body

    @staticmethod
    def _no_space(envelope: Envelope, exc: NoSpaceError) -> str:
        """Log that the policy state could not be written (the folder is named here only)
        and return the reason the requester hears: the request is refused, nothing is
        decrypted, and the same request is answered once space is freed."""
        logger.error("cannot record %s: %s", envelope.describe(), exc)
        return (
            "no space left in the arbiter's state folder; nothing was decrypted or recorded, "
            "ask again once its operator freed space"
        )

    def _on_key_request(self, envelope: Envelope) -> None:
        """S1."""
        self.reply(envelope, SetupTag.KEY, {"public_key": self._cipher.key.to_json()})

    def _on_job_spec(
        self,
        envelope: Envelope,
        policy_of: Callable[[dict[str, Any]], JobPolicy],
        admit: Callable[[dict[str, Any], Party], None] | None,
    ) -> None:
        """S2: register when both parties sent the same spec, then answer them both."""
        waiting: list[Envelope] = []
        parties: tuple[str, ...] = ()  # the job's parties, once the sender's spec is valid
        try:
            if not isinstance(envelope.body, ControlBlock):
                raise PolicyViolationError("JOB_SPEC carries no control block")
            spec = envelope.body.obj()
            if spec.get("job_id") != envelope.job_id:  # docs/protocol.md §2.9
                raise PolicyViolationError("JOB_SPEC names another job than its envelope")
            if admit is not None:
                admit(spec, envelope.sender)
            policy = policy_of(spec)
            if policy.job_id != envelope.job_id:
                raise PolicyViolationError("JOB_SPEC names another job than its envelope")
            if policy.key_id != self._cipher.key.key_id:
                raise PolicyViolationError("JOB_SPEC names another key than the arbiter's")
            if not policy.encrypted:
                logger.warning(
                    "job %s is a PLAINTEXT experiment: nothing is encrypted", policy.job_id
                )
            parties = tuple(policy.parties)
            with self._setup_lock:
                active = self.policy.propose(policy, submitter=envelope.sender.party_id)
                self._waiting_ready.setdefault(envelope.job_id, []).append(envelope)
                if active:
                    waiting = self._waiting_ready.pop(envelope.job_id)
        except (PolicyViolationError, VflError) as exc:
            if isinstance(exc, NoSpaceError):
                public = self._no_space(envelope, exc)
            else:
                public = peer_reason(exc)
                self.refuse(envelope, str(exc))  # the full text: A's own log and audit only
            # Only a disagreement between the job's own parties ends the others' wait; a
            # spec refused before (or from a party its spec does not name) answers its
            # sender alone, so a third party cannot end another guest's registration.
            with self._setup_lock:
                queue = self._waiting_ready.get(envelope.job_id, [])
                others = [r for r in queue if r.sender.party_id in parties]
                kept = [r for r in queue if r.sender.party_id not in parties]
                if envelope.sender.party_id not in parties:
                    others, kept = [], queue
                if kept:
                    self._waiting_ready[envelope.job_id] = kept
                else:
                    self._waiting_ready.pop(envelope.job_id, None)
            for request in [*others, envelope]:
                self.reply(request, SetupTag.JOB_READY, self._refusal(public, exc))
            return
        for listener in self._proposed_listeners:
            try:
                listener(spec, envelope.sender, active)
            except Exception:  # noqa: BLE001 - a record must not undo a registration
                logger.exception("a listener of job %s's JOB_SPEC failed", envelope.job_id)
        for request in waiting:
            self.reply(request, SetupTag.JOB_READY, {"job_id": envelope.job_id})

    def _agreed(
        self, envelope: Envelope, pending: dict[str, dict[str, tuple[bytes, Envelope]]]
    ) -> list[tuple[bytes, Envelope]] | None:
        """Collect one party's setup request; all of them once every party of the job sent
        one (``None`` until then)."""
        job = self.policy.job(envelope.job_id)
        body = envelope.body.obj() if isinstance(envelope.body, ControlBlock) else None
        if job is None or body is None or envelope.sender.party_id not in job.parties:
            raise PolicyViolationError("no such job for you")
        raw = json.dumps(body, sort_keys=True).encode()
        with self._setup_lock:
            mine = pending.setdefault(envelope.job_id, {})
            mine[envelope.sender.party_id] = (raw, envelope)
            if set(mine) < set(job.parties):
                return None
            del pending[envelope.job_id]
        return list(mine.values())

    def _on_resume(self, envelope: Envelope) -> None:
        """S3: re-open the steps once both parties asked for the same resume point (P6)."""
        try:
            requests = self._agreed(envelope, self._resumes)
        except PolicyViolationError as exc:
            self.refuse(envelope, str(exc))
            self.reply(envelope, SetupTag.RESUMED, {"refused": peer_reason(exc)})
            return
        if requests is None:
            return
        try:
            if len({raw for raw, _ in requests}) != 1:
                raise PolicyViolationError("resume points disagree")
            body = json.loads(requests[0][0])
            try:
                step = int(body["step"])
                tag_steps = {str(t): int(v) for t, v in dict(body.get("tag_steps", {})).items()}
                run = None if body.get("run") is None else int(body["run"])
            except (KeyError, TypeError, ValueError):
                raise PolicyViolationError("malformed RESUME") from None
            self.policy.resume(envelope.job_id, step, tag_steps=tag_steps, run=run)
        except NoSpaceError as exc:
            reason = self._no_space(envelope, exc)
            for _, request in requests:
                self.reply(request, SetupTag.RESUMED, {"refused": reason})
            return
        except PolicyViolationError as exc:
            for _, request in requests:
                self.refuse(request, str(exc))
                self.reply(request, SetupTag.RESUMED, {"refused": peer_reason(exc)})
            return
        for _, request in requests:
            self.reply(request, SetupTag.RESUMED, {"step": step})

    def _on_done(self, envelope: Envelope) -> None:
        """S4: close the job once both parties finished it (P7)."""
        try:
            requests = self._agreed(envelope, self._done)
            if requests is None:
                return
            try:
                model = self.policy.close(envelope.job_id)
            except NoSpaceError as exc:  # both asked: both hear why nothing was closed
                reason = self._no_space(envelope, exc)
                for _, request in requests:
                    self.reply(request, SetupTag.JOB_DONE, {"refused": reason})
                return
        except PolicyViolationError as exc:
            self.refuse(envelope, str(exc))
            self.reply(envelope, SetupTag.JOB_DONE, {"refused": peer_reason(exc)})
            return
        answer = {"closed": True, "scoring": model is not None}
        logger.info("job %s closed%s", envelope.job_id, ": model registered" if model else "")
        for listener in self._closed_listeners:
            listener(envelope.job_id)
        for _, request in requests:
            self.reply(request, SetupTag.JOB_DONE, answer)

    def _on_bind(self, envelope: Envelope) -> None:
        """S5: a binder registers the ciphertexts it produced for a scoring session (P8)."""
        try:
            if not isinstance(envelope.body, ControlBlock):
                raise PolicyViolationError("BIND carries no control block")
            body = envelope.body.obj()
            try:
                group, cap = int(body["group"]), int(body["cap_rows"])
                first = body["first"]
                raw = base64.b64decode(str(body["digests"]), validate=True)
            except (KeyError, TypeError, ValueError, binascii.Error):
                raise PolicyViolationError("malformed BIND") from None
            if not isinstance(first, bool):
                raise PolicyViolationError("malformed BIND")
            if not raw or len(raw) % DIGEST_BYTES:
                raise PolicyViolationError("BIND holds no whole digests")
            items = [raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]
            self.policy.bind(
                job_id=envelope.job_id,
                run_id=envelope.run_id,
                group=group,
                cap_rows=cap,
                items=items,
                submitter=envelope.sender.party_id,
                first=first,
            )
        except PolicyViolationError as exc:
            self.refuse(envelope, str(exc))
            self.reply(envelope, SetupTag.BOUND, {"refused": peer_reason(exc)})
            return
        self.reply(envelope, SetupTag.BOUND, {"bound": len(items)})

    def _on_request(self, envelope: Envelope) -> None:
        """D1-D3."""
        tag = tag_value(envelope.tag)
        try:
            if not isinstance(envelope.body, CipherBlock):
                raise PolicyViolationError(f"{tag} request carries no ciphertexts")
            count = math.prod(envelope.body.shape) if envelope.body.shape else 0
            digest = hashlib.sha256(
                envelope.key_id + repr(envelope.body.shape).encode() + envelope.payload
            ).digest()
            job = self.policy.job(envelope.job_id)
            items: list[bytes] = []
            if job is not None and job.binder and count:
                items = ciphertext_digests(envelope.key_id, envelope.body.data, count)
            admission = self.policy.admit(  # D1
                job_id=envelope.job_id,
                step=envelope.step,
                tag=tag,
                requester=envelope.sender.party_id,
                count=count,
                digest=digest,
                run_id=envelope.run_id,
                items=items,
            )
            if admission is Admission.CACHED:
                self._on_duplicate(envelope)
                return
            tensor = EncryptedTensor.from_block(
                envelope.body, cipher=self._cipher, key_id=envelope.key_id
            )
            values = list(tensor.values.reshape(-1))
            plain = self._decrypt(values) if job is None or job.encrypted else values  # D2
        except (PolicyViolationError, CryptoError, ProtocolError, NoSpaceError) as exc:
            if isinstance(exc, NoSpaceError):  # not the requester's doing: no alert
                public = self._no_space(envelope, exc)
            else:
                public = peer_reason(exc)
                self.refuse(envelope, str(exc))
            self._channel.send(
                self._reply(envelope, ControlBlock.from_obj(self._refusal(public, exc)))
            )
            return
        body = PlainBlock(self._cipher.key.residues_to_bytes(plain), shape=envelope.body.shape)
        sent = self._channel.send(self._reply(envelope, body))
        self.policy.cache_reply(job_id=envelope.job_id, step=envelope.step, tag=tag, reply=sent)
        if admission is Admission.REPEAT:
            logger.info("repeat of %s step %d decrypted again", tag, envelope.step)
            return
        for listener in self._served_listeners:  # D3
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
