"""The arbiter's side of the party service: its key, decryptions, policy and audit records.

Roles: the arbiter A holds the Paillier key pair (made at its first start and kept
owner-only in its state folder, :func:`arbiter_key`) and answers key requests, ``JOB_SPEC``
registrations, ``RESUME`` and masked decryptions of split-NN and transfer jobs under each
job's policy (:func:`serve_arbiter`; docs/protocol.md §2.6). It learns only what §4.6 and
§6 allow: masked values, shapes and the schedule. Its acceptance policy and audit records
are :class:`ArbiterWatch`'s.

A keeps job registrations, served-step marks, counts, resumes and its model registry in
``<state_dir>/arbiter_policy`` (P9 of :mod:`protocols.crypto.policy`): a restarted arbiter
enforces the same schedule and budgets, answers a byte-identical repeat of a served step
with the same plaintext, and refuses any other request for it. Every refusal is recorded in
the audit log (``request_refused``, with its reason).

Notices (docs/protocol.md §4.4.1, :mod:`vfl.service.notices`):

1. on start, ``RUN_STOPPED{restarted}`` to the guest of every open job that has not
   registered again with this process (:func:`notify_restart`): a request A had
   acknowledged but not answered when it was killed gets no reply;
2. when its state folder is full, ``RUN_STOPPED{no_space}`` to the guest of every open job
   (:func:`tell_guests_full`), so that it waits for space instead of giving up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.paillier import (
    PrivateKey,
    PublicKey,
    generate_keypair,
    key_file_bytes,
    read_key_file,
)
from protocols.crypto.policy import DecryptionPolicy, JobPolicy
from protocols.crypto.policy_store import PolicyStore
from protocols.envelope import Envelope
from protocols.errors import CryptoError, DataError, JobRefusedError, VflError
from protocols.executor import Backend, Executor
from protocols.files import atomic_write
from protocols.ray_executor import ray_tls_on
from protocols.roles import Party, Role
from protocols.transport.base import Channel
from vfl.config import PartyConfig
from vfl.service.accept import check_spec
from vfl.service.audit import AuditEvent, AuditLog, config_digest
from vfl.service.driver import ServiceContext
from vfl.service.notices import RunStop, send_clocked
from vfl.splitnn.session import serve_decryptions
from vfl.splitnn.spec import DecTag, JobSpec
from vfl.transfer.session import FtlDecTag, FtlSpec

logger = logging.getLogger(__name__)

KEY_FILE = "arbiter_key.json"
POLICY_DIR = "arbiter_policy"  # the arbiter's policy state (P9), under its state folder
COUNTS_EVERY_S = 60.0  # the arbiter's periodic decryption-count records (when they changed)
NOTICE_PATIENCE_S = 3600.0  # how long A keeps trying to tell guests that it restarted
DECRYPTION_TAGS = (DecTag, FtlDecTag)  # what A decrypts: split-NN and transfer jobs
ARBITER_TAGS = (SetupTag, *DECRYPTION_TAGS)  # every party's: A's key, setup and decryptions


def arbiter_key(
    state_dir: Path, *, bits: int, allow_test_key: bool
) -> tuple[PublicKey, PrivateKey]:
    """The arbiter's key pair: loaded from its state folder, or made and saved (0600) once."""
    path = state_dir / KEY_FILE
    if path.is_file():
        if path.stat().st_mode & 0o077:
            logger.warning("%s is readable by others; chmod 600 it", path)
        try:
            return read_key_file(path, allow_test_key=allow_test_key)
        except CryptoError as exc:
            raise DataError(
                f"the arbiter's {exc}; restore it from backup (running jobs need this key), "
                "or move it away to make a new key"
            ) from None
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, private = generate_keypair(bits=bits, allow_test_key=allow_test_key)
    atomic_write(path, key_file_bytes(public, private), mode=0o600)
    logger.info(
        "made a %d-bit Paillier key (id %s) in %.1f s",
        bits,
        public.key_id.hex()[:16],
        time.monotonic() - started,
    )
    return public, private


def decrypts_on_ray(config: PartyConfig) -> bool:
    """Whether this arbiter decrypts on its silo's Ray cluster: only with ``backend = "ray"``
    and Ray TLS on; its workers then load the key from the key file themselves, so the key
    never travels in a chunk (the file must be readable at the same path on every node)."""
    return (
        config.party.role is Role.ARBITER
        and config.executor.backend is Backend.RAY
        and ray_tls_on()
    )


def policy_of(body: dict[str, Any], *, max_resumes: int) -> JobPolicy:
    """A job's decryption policy from its JOB_SPEC: a transfer job's (``kind = "ftl"``) or a
    split-NN job's, with the arbiter's own limit on resumes."""
    if body.get("kind") == "ftl":
        return FtlSpec.from_json(body).policy(max_resumes=max_resumes)
    return JobSpec.from_json(body).policy(max_resumes=max_resumes)


def serve_arbiter(
    config: PartyConfig,
    channel: Channel,
    executor: Executor,
    *,
    watch: ArbiterWatch | None = None,
) -> ArbiterService:
    """Start answering key, setup and decryption requests (``watch``: acceptance policy and
    audit records; without it, the acceptance policy alone)."""
    public, private = arbiter_key(
        config.state_dir, bits=config.key_bits, allow_test_key=config.allow_test_key
    )

    def admit(body: dict[str, Any], sender: Party) -> None:
        check_spec(config, body, sender)

    service = serve_decryptions(
        channel=channel,
        public_key=public,
        private_key=private,
        executor=executor,
        key_file=(config.state_dir / KEY_FILE).resolve() if decrypts_on_ray(config) else None,
        admit=admit if watch is None else watch.admit,
        policy_of=lambda body: policy_of(body, max_resumes=config.max_resumes),
        tags=DECRYPTION_TAGS,
        policy=DecryptionPolicy(store=PolicyStore(config.state_dir / POLICY_DIR)),
    )
    if watch is not None:
        watch.attach(service)
    return service


class ArbiterWatch:
    """The arbiter's acceptance policy for JOB_SPECs, its audit records and job states.

    Records ``job_refused`` per JOB_SPEC its policy refuses (:meth:`admit`), ``job_accepted``
    per JOB_SPEC that P1 then takes as a proposal of its job (:meth:`proposed`), and
    ``decryption_counts`` (values decrypted per tag, :meth:`DecryptionPolicy.counts`) when
    a registered job registers again (a new run: resume), every ``COUNTS_EVERY_S`` when
    they changed, and at close for every job registered since the service started. A job
    is shown ``running`` with its guest once it is registered (both parties proposed it):
    a spec that P1 refuses (another guest's, for a job one guest proposed or registered)
    touches neither the job's status nor its records, and the job's guest
    (:meth:`guest_of`) is the one it is registered to (docs/protocol.md §2.6 P1).
    """

    def __init__(
        self,
        *,
        config: PartyConfig,
        audit: AuditLog,
        status: Callable[..., None] | None = None,
    ) -> None:
        self.config, self.audit = config, audit
        self.status = status or (lambda job_id, **fields: None)
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, int]] = {}  # job -> counts last recorded
        self._reregistered: dict[str, dict[str, int]] = {}  # job -> counts at its last new run
        self._service: ArbiterService | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def service(self) -> ArbiterService | None:
        """The decryption service (once attached)."""
        return self._service

    def refused(self, request: Envelope, reason: str) -> None:
        """Record a refused request (P1-P8 of :mod:`protocols.crypto.policy`) with its
        reason: the tag, step and requester, never a value."""
        self.audit.record(
            event=AuditEvent.REQUEST_REFUSED,
            job_id=request.job_id[:128],
            submitter=request.sender.party_id,
            tag=str(request.tag)[:64],
            step=request.step,
            reason=reason[:300],
        )

    def attach(self, service: ArbiterService) -> None:
        """The decryption service whose counts, proposals and refusals are recorded."""
        self._service = service
        service.on_refused(self.refused)
        service.on_proposed(self.proposed)

    def _fields(self, body: dict[str, Any], sender: Party) -> dict[str, Any]:
        """A JOB_SPEC's audit fields."""
        return {
            "submitter": sender.party_id,
            "config_sha256": config_digest(body),
            "key_id": self._service.key_id.hex() if self._service is not None else None,
            "guest": str(body.get("guest", ""))[:64],
        }

    def guest_of(self, job_id: str) -> str | None:
        """The guest the job is registered to (P1), if it is."""
        known = self._service.policy.job(job_id) if self._service is not None else None
        parties = tuple(getattr(known, "parties", ()))
        return str(parties[0]) if len(parties) == 2 else None

    def admit(self, body: dict[str, Any], sender: Party) -> None:
        """The ``admit`` hook of :meth:`ArbiterService.serve_setup`: A's ``[accept]``
        policy, and a registered job's guest (P1); a refusal is recorded here."""
        job_id = str(body.get("job_id", ""))[:128]
        fields = self._fields(body, sender)
        try:
            spec = check_spec(self.config, body, sender)
            known = self._service.policy.job(spec.job_id) if self._service is not None else None
            parties = getattr(known, "parties", ())
            if parties and parties[0] != spec.guest:
                raise JobRefusedError(
                    f"job {spec.job_id} is registered to {parties[0]}, not {spec.guest}",
                    public="this job id is registered to another guest",
                )
        except JobRefusedError as exc:
            self.audit.record(
                event=AuditEvent.JOB_REFUSED, job_id=job_id, reason=str(exc), **fields
            )
            logger.warning("refused JOB_SPEC of job %s from %s: %s", job_id, sender, exc)
            raise
        if self._service is not None and self._service.policy.job(spec.job_id) is not None:
            # a new run: the counts so far, once per run (both parties register it), whatever
            # the periodic records wrote in between
            counts = self._service.policy.counts(spec.job_id)
            with self._lock:
                again = self._reregistered.get(spec.job_id) != counts
                self._reregistered[spec.job_id] = counts
            if again:
                self.record_counts(spec.job_id, cause="registered again", force=True)

    def proposed(self, body: dict[str, Any], sender: Party, registered: bool) -> None:
        """The proposal hook of :meth:`ArbiterService.on_proposed`: P1 took this JOB_SPEC
        as a proposal of its job (``registered``: the job is now active)."""
        job_id = str(body.get("job_id", ""))[:128]
        self.audit.record(
            event=AuditEvent.JOB_ACCEPTED, job_id=job_id, **self._fields(body, sender)
        )
        with self._lock:
            self._jobs.setdefault(job_id, {})
        if registered:  # only a registered job's guest counts (P1)
            self.status(job_id, state="running", phase="registered", guest=self.guest_of(job_id))

    def record_counts(self, job_id: str, *, cause: str, force: bool = False) -> None:
        """Record the job's decryption counts if they changed since the last record."""
        if self._service is None:
            return
        counts = self._service.policy.counts(job_id)
        with self._lock:
            if not force and self._jobs.get(job_id) == counts:
                return
            self._jobs[job_id] = counts
        key_id = self._service.key_id.hex()
        self.audit.record(
            event=AuditEvent.DECRYPTION_COUNTS,
            job_id=job_id,
            key_id=key_id,
            counts=counts,
            cause=cause,
        )

    def start(self) -> None:
        """Record changed counts every ``COUNTS_EVERY_S`` seconds from now on."""
        self._thread = threading.Thread(target=self._every, name="audit-counts", daemon=True)
        self._thread.start()

    def _every(self) -> None:
        while not self._stop.wait(COUNTS_EVERY_S):
            for job_id in self.jobs():
                self.record_counts(job_id, cause="periodic")

    def jobs(self) -> list[str]:
        """Jobs registered since the service started."""
        with self._lock:
            return sorted(self._jobs)

    def close(self) -> None:
        """Record every job's counts (service stop) and stop the periodic records."""
        self._stop.set()
        for job_id in self.jobs():
            self.record_counts(job_id, cause="service stop", force=True)


def notify_restart(ctx: ServiceContext, watch: ArbiterWatch) -> None:
    """Notice 1: ``RUN_STOPPED{restarted}`` to the guest of every open job that has not
    registered again with this process, retrying until the guest is reachable (for up to
    ``NOTICE_PATIENCE_S``). A request A had acknowledged but not answered when it stopped
    is never answered (its reply cache died with it, and a repeat is only acknowledged), so
    the run waiting for it starts anew at once instead of at its receive timeout."""
    service = watch.service
    if service is None:
        return
    pending = dict(service.policy.open_jobs())
    give_up, delay = time.monotonic() + NOTICE_PATIENCE_S, 1.0
    body = {"reason": RunStop.RESTARTED.value, "run_id": ""}
    while pending and not ctx.stopping.is_set():
        for job_id, guest_id in list(pending.items()):
            if job_id in watch.jobs():
                del pending[job_id]  # a run registered with this process already
                continue
            try:
                send_clocked(ctx, job_id, ctx.config.peer(guest_id).party, body)
            except (VflError, OSError) as exc:
                logger.debug("job %s: restart notice to %s: %s", job_id, guest_id, exc)
                continue
            del pending[job_id]
            logger.info("job %s: told %s that the arbiter restarted", job_id, guest_id)
        if pending and time.monotonic() + delay > give_up:
            logger.warning("no restart notice reached the guests of %s", sorted(pending))
            return
        ctx.stopping.wait(delay)
        delay = min(2 * delay, 10.0)


def tell_guests_full(ctx: ServiceContext, watch: ArbiterWatch) -> None:
    """Notice 2: ``RUN_STOPPED{no_space}`` to the guest of every open job (a full folder
    fails A's replay journal too, so its peers' requests are only refused as busy,
    docs/protocol.md §2.9.1: this tells them why, and they wait for space instead of
    giving up)."""
    service = watch.service
    if service is None:
        return
    body = {
        "reason": RunStop.NO_SPACE.value,
        "no_space": True,
        "error": "no space left in the arbiter's state folder; it answers again once its "
        "operator freed space",
    }
    for job_id in watch.jobs():
        policy = service.policy.job(job_id)
        if policy is None or service.policy.closed(job_id) or not policy.parties:
            continue
        try:
            send_clocked(ctx, job_id, ctx.config.peer(policy.parties[0]).party, body)
        except (VflError, OSError) as exc:
            logger.warning("job %s: could not tell its guest that A is full: %s", job_id, exc)
