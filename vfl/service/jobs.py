"""Split-NN jobs inside the party services (guest drives, host follows, arbiter decrypts).

Roles: the arbiter's service holds the Paillier key pair (made at its first start and kept
owner-only in its state folder) and answers key requests, JOB_SPEC registrations, RESUME
and masked decryptions under the job's policy. The guest's operator submits a job to the
guest's own service (admin command ``train``); the guest runs PSI if needed, then the
session of :mod:`vfl.splitnn.session`. The host's service answers ``JOB_START`` for one of
its own data aliases and the PSI result it holds, and refuses anything else. Host and
arbiter apply their own acceptance policy (:mod:`vfl.service.accept`) first.

Lifecycle across stops and restarts (each party logs it in :mod:`vfl.service.audit`):

1. G persists each submitted request (``jobs/<id>/request.json``, 0600) before it runs, and
   ``jobs/<id>/outcome.json`` once the job is done or has failed for good. On start, G's
   service resubmits every job with a request and no outcome.
2. A run that fails with a transport error, a timeout, an arbiter refusal (e.g. a reply
   lost while the arbiter restarted) or because H reported ``RUN_STOPPED`` is followed by a new run
   (J1-J4 with a new run id: both parties resume from their checkpoints), after a backoff
   of ``RETRY_DELAYS_S`` (none after ``RUN_STOPPED{restarted}``), at most ``RETRY_LIMIT``
   times in a row without progress (a run that advanced the step resets the count). A
   refusal under a party's acceptance policy is not retried.
3. H records each accepted run (``jobs/<id>/host_run.json``); on start, its service sends
   ``RUN_STOPPED{restarted}`` to the guest of every run that was still going when it
   stopped, retrying until the guest is reachable; a run of H that fails sends
   ``RUN_STOPPED{failed}`` with the error's peer-safe reason. A, on start, sends
   ``RUN_STOPPED{restarted}`` to the guest of every open job (registered, not closed) that
   has not registered again with it: a request it had acknowledged but not answered when it
   was killed gets no reply.
4. A ``JOB_START`` for a job whose older run is still being served at H stops that run
   first (its receives raise :class:`RunAbortedError`) and waits for it to end.
5. On SIGTERM (:meth:`JobRunner.close`, before the channel closes) every run is stopped the
   same way: checkpoints are written per step, so nothing needs saving; the jobs resume
   when the service is started again.
6. A split-NN or transfer job that fails for good at G (lifecycle step 2: not retried, or
   out of retries) is announced to H and A (``JOB_FAILED{run id, reason}``, R3 of the
   session module, best effort with retries for a minute): H stops its run of the job, and
   H and A record the job as ``failed`` with G's peer-safe reason instead of showing it
   ``running``. Only the job's guest may say so, and only a job shown ``running`` changes.
7. A run that stops because a state folder is full (G's own, H's as its ``RUN_STOPPED``
   says, A's as its refusal or its ``RUN_STOPPED{no_space}`` says; every such error reads
   ``no space left in ...``) is followed by a new run after ``NO_SPACE_DELAYS_S``, without
   counting towards ``RETRY_LIMIT`` (nor do the transport failures that follow while it
   lasts), for up to ``NO_SPACE_PATIENCE_S``: G's status shows
   ``phase = "waiting_for_space"`` and the error (``no_space``, naming the folder), the
   party's log the same. Every party checks its folder every ``SPACE_PROBE_S`` while it
   has runs or jobs (a full folder also fails the transport's replay journal, so nothing
   reaches that party: without the check its runs would end only with their receive
   timeouts); H and A then tell G. Nothing already written is torn (files are replaced
   atomically; the audit log and A's policy journal cut off a record that did not fit), so
   the job resumes from its checkpoints once space is freed.

Whatever one party tells another about a failure or refusal is :func:`peer_reason` of the
error (the rule, never its files, columns, rows or counts); the full text stays in that
party's log, status and audit log.

The arbiter keeps job registrations, served-step marks, counts, resumes and its model
registry in ``<state_dir>/arbiter_policy`` (P9 of :mod:`protocols.crypto.policy`): a
restarted arbiter enforces the same schedule and budgets, answers a byte-identical repeat
of a served step with the same plaintext, and refuses any other request for it. Every
refusal is recorded in the audit log (``request_refused``, with its reason).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from protocols.arbiter.service import ArbiterService
from protocols.crypto.paillier import (
    PrivateKey,
    PublicKey,
    generate_keypair,
    key_file_bytes,
    read_key_file,
)
from protocols.crypto.policy import DecryptionPolicy, JobPolicy
from protocols.crypto.policy_store import PolicyStore
from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    CryptoError,
    DataError,
    JobRefusedError,
    PolicyViolationError,
    RunAbortedError,
    TransportError,
    VflError,
    peer_reason,
)
from protocols.executor import Backend, Executor, make_executor
from protocols.files import NO_SPACE, atomic_write, is_no_space, no_space_error, private_dir
from protocols.ids import check_identifier, state_path
from protocols.ray_executor import ray_tls_on
from protocols.roles import Party, Role
from protocols.transport.base import Channel, MessageFilter
from psi.result import read_result
from vfl.common.jobfile import JobKind, job_kind
from vfl.config import PartyConfig
from vfl.data.tables import PartyTable, TableSpec, load_table, split_rows
from vfl.fedavg.client import FedClient
from vfl.fedavg.jobfile import FedJobFile, parse_fed_job, with_defaults
from vfl.fedavg.protocol import DropoutPolicy, FedResult, RoundAbortedError
from vfl.privacy.label_protection import ProtectMode
from vfl.service.accept import check_offer, check_spec, host_id_column
from vfl.service.audit import AUDIT_FILE, AuditEvent, AuditLog, config_digest, file_digest
from vfl.service.fedjobs import FedJobs
from vfl.service.ftljobs import FtlJobs
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.host import HostSession
from vfl.splitnn.job import JobOffer, JobTag, Progress, SplitResult
from vfl.splitnn.jobfile import TrainJobFile, parse_job
from vfl.splitnn.session import claim_run, serve_decryptions
from vfl.splitnn.spec import DecTag, JobSpec
from vfl.transfer.guest import FtlGuest
from vfl.transfer.jobfile import FtlJobFile, parse_ftl_job
from vfl.transfer.session import FtlDecTag, FtlResult, FtlSpec

logger = logging.getLogger(__name__)

KEY_FILE = "arbiter_key.json"
REQUEST_FILE = "request.json"  # G: the submitted request, kept until the job is over
OUTCOME_FILE = "outcome.json"  # G: done or failed for good (not resubmitted on start)
HOST_RUN_FILE = "host_run.json"  # H: the run it serves, for RUN_STOPPED after a restart
RETRY_LIMIT = 6
RETRY_DELAYS_S = (2.0, 5.0, 10.0, 20.0, 40.0, 60.0)
NOTICE_PATIENCE_S = 3600.0  # how long H keeps trying to tell G that it restarted
COUNTS_EVERY_S = 60.0  # the arbiter's periodic decryption-count records (when they changed)
STOP_WAIT_S = 10.0  # how long close() waits for runs to end
FAILED_NOTICE_S = 60.0  # how long G keeps trying to tell H and A that a job failed (R3)
NO_SPACE_DELAYS_S = (2.0, 5.0, 10.0, 15.0)  # G's new runs while a state folder is full
NO_SPACE_PATIENCE_S = 86400.0  # how long G keeps trying before the job fails for good
SPACE_PROBE_S = 5.0  # how often a party with runs going checks it can still write its state
SPACE_PROBE_BYTES = 16 << 10  # the probe's size (a small checkpoint's)


class RunStop(StrEnum):
    """Why H reports that a run ended early (``RUN_STOPPED``, R1 of the session module), or
    A that the runs of its open jobs cannot go on (``NO_SPACE``, lifecycle step 6)."""

    RESTARTED = "restarted"
    FAILED = "failed"
    NO_SPACE = "no_space"


def retryable(exc: BaseException) -> bool:
    """Whether a new run of the job may succeed where this one failed (lifecycle step 2)."""
    if isinstance(exc, JobRefusedError):
        return False
    return isinstance(exc, TransportError | TimeoutError | PolicyViolationError)


def order_seed_for(seed: int) -> bytes:
    """The guest's batch-order seed derived from its ``[testing] seed``."""
    return hashlib.sha256(f"vfl-batch-order-{seed}".encode()).digest()


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


POLICY_DIR = "arbiter_policy"  # the arbiter's policy state (P9), under its state folder


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
        tags=(DecTag, FtlDecTag),
        policy=DecryptionPolicy(store=PolicyStore(config.state_dir / POLICY_DIR)),
    )
    if watch is not None:
        watch.attach(service)
    return service


class ArbiterWatch:
    """The arbiter's acceptance policy for JOB_SPECs and its audit records.

    Records ``job_accepted``/``job_refused`` per JOB_SPEC, and ``decryption_counts`` (values
    decrypted per tag, :meth:`DecryptionPolicy.counts`) when a registered job registers
    again (a new run: resume), every ``COUNTS_EVERY_S`` when they changed, and at close
    for every job registered since the service started.
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

    def attach(self, service: ArbiterService) -> None:
        """The decryption service whose counts and refusals are recorded."""
        self._service = service
        service.on_refused(self.refused)

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

    def admit(self, body: dict[str, Any], sender: Party) -> None:
        """The ``admit`` hook of :meth:`ArbiterService.serve_setup`."""
        job_id = str(body.get("job_id", ""))[:128]
        key_id = self._service.key_id.hex() if self._service is not None else None
        fields: dict[str, Any] = {
            "submitter": sender.party_id,
            "config_sha256": config_digest(body),
            "key_id": key_id,
            "guest": str(body.get("guest", ""))[:64],
        }
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
        self.audit.record(event=AuditEvent.JOB_ACCEPTED, job_id=spec.job_id, **fields)
        self.status(spec.job_id, state="running", phase="registered", guest=spec.guest)
        with self._lock:
            self._jobs.setdefault(spec.job_id, {})

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


def _aligned_table(
    config: PartyConfig, request: dict[str, Any], *, labels: str | None, guest: str | None = None
) -> PartyTable:
    """This party's rows for the job, in the PSI's shared order.

    At the host (``guest`` given) the id column is the one its ``[psi]`` policy names for the
    alias (:func:`host_id_column`), and the PSI result must be one it ran with that guest on
    that alias (docs/protocol.md §3.4.1).
    """
    alias = str(request.get("data", ""))
    if alias not in config.data:
        known = ", ".join(sorted(config.data)) or "none"
        raise ConfigError(
            f"{config.party.party_id} has no data alias {alias!r} (aliases: {known})",
            public=f"no data alias {alias!r} here",
        )
    column = (
        str(request.get("id_column", "id")) if guest is None else host_id_column(config, request)
    )
    spec = TableSpec(path=config.data[alias], id_column=column, label_column=labels)
    psi_job = check_identifier(request.get("psi_job"), what="psi_job")
    summary, rows = read_result(config.state_dir, psi_job)
    if guest is not None:
        for key, wanted in (("data", alias), ("id_column", column), ("peer", guest)):
            if key in summary and summary[key] != wanted:  # results of older versions lack them
                public = f"PSI {psi_job} aligned other data or another guest here"
                raise JobRefusedError(f"{public} ({key} {summary[key]!r})", public=public)
    if rows is None:
        raise ConfigError(
            f"PSI {psi_job} at {config.party.party_id} kept no rows (cardinality mode?)",
            public=f"PSI {psi_job} kept no rows here (cardinality or guest-only mode?)",
        )
    return load_table(spec).take(rows)


class _GuestJob:
    """G's bookkeeping of one job across its runs (lifecycle steps 1-2)."""

    def __init__(
        self, job_file: TrainJobFile | FedJobFile | FtlJobFile, request: dict[str, Any]
    ) -> None:
        self.job_file, self.request = job_file, request
        self.wake = threading.Event()  # cuts a retry's backoff short
        hold = request.get("hold_at_step")  # [testing] allow_hold only (checked at submit)
        self.hold_at = hold if isinstance(hold, int) else None
        self.release = threading.Event()  # admin `release`: the hold is over (for good)
        self.no_space: str | None = None  # the space probe stopped the current run
        self.peer_full: str | None = None  # H said its folder is full (kept between runs)
        self.session: GuestSession | FedClient | FtlGuest | None = None
        self.notice: dict[str, Any] | None = None  # H's RUN_STOPPED for the current run
        self.thread: threading.Thread | None = None


class _HostRun:
    """H's bookkeeping of the run it serves for one job (lifecycle steps 3-4)."""

    def __init__(self, session: HostSession, envelope: Envelope) -> None:
        self.session, self.envelope = session, envelope
        self.done = threading.Event()
        self.no_space: str | None = None  # the space probe stopped this run


class JobRunner:
    """The service's split-NN jobs: started, tracked for ``status``, resumed after restarts.

    Parameters
    ----------
    config
        This party's configuration (its ``[accept]`` policy applies to what guests ask).
    channel
        The service's channel.
    executor
        Worker processes for the Paillier work on the critical path.
    run_psi
        The guest's PSI admin command (a job without ``psi_job`` runs PSI first).
    """

    def __init__(
        self,
        *,
        config: PartyConfig,
        channel: Channel,
        executor: Executor,
        run_psi: Any,
    ) -> None:
        self.config, self.channel, self.executor = config, channel, executor
        self.run_psi = run_psi
        self._lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}
        self._background: Executor | None = None
        self._stopping = threading.Event()
        self._guest_jobs: dict[str, _GuestJob] = {}
        self._host_runs: dict[str, _HostRun] = {}
        self._job_locks: dict[str, threading.Lock] = {}
        self._guest_failed: dict[str, str] = {}  # H: jobs whose guest reported R3, and why
        self._released: set[str] = set()  # jobs released from their hold (testing)
        self.audit = AuditLog(config.state_dir / AUDIT_FILE, party=config.party.party_id)
        self.watch: ArbiterWatch | None = None
        if config.seed is not None:
            logger.warning(
                "%s: [testing] seed = %d fixes this party's random draws (W_0 component, model "
                "initialisation, batch order): reproducible experiments only, never real data",
                config.source,
                config.seed,
            )
        self.fed = FedJobs(runner=self)
        self.ftl = FtlJobs(runner=self)
        role = config.party.role
        if role is Role.HOST:
            channel.add_handler(MessageFilter.for_tags(JobTag.JOB_START), self._on_job_start)
            self.fed.serve_client()
            self.ftl.serve_host()
        if role is Role.GUEST:
            channel.add_handler(MessageFilter.for_tags(JobTag.RUN_STOPPED), self._on_run_stopped)
        else:
            channel.add_handler(MessageFilter.for_tags(JobTag.JOB_FAILED), self._on_job_failed)

    def serve_arbiter(self) -> ArbiterService:
        """Arbiter: answer key, setup and decryption requests under the acceptance policy,
        with audit records (:class:`ArbiterWatch`); returns the decryption service."""
        self.watch = ArbiterWatch(config=self.config, audit=self.audit, status=self._update)
        self.fed.serve_aggregator()
        service = serve_arbiter(self.config, self.channel, self.executor, watch=self.watch)
        service.on_closed(lambda job_id: self._update(job_id, state="done", phase="done"))
        return service

    def background(self) -> Executor:
        """Low-priority workers that fill obfuscator pools with otherwise idle CPU time (on a
        Ray cluster: the party's own actors, which the protocol steps share)."""
        if self.config.executor.backend is Backend.RAY:
            return self.executor
        with self._lock:
            if self._background is None:
                self._background = make_executor(self.config.executor, nice=10)
            return self._background

    def start(self) -> None:
        """Once the service listens: resubmit G's unfinished jobs, send H's and A's restart
        notices, start the arbiter's periodic count records (lifecycle steps 1 and 3)."""
        role = self.config.party.role
        if role is Role.GUEST:
            self._resume_unfinished()
        elif role is Role.HOST:
            self._notify_restarts()
        elif self.watch is not None:
            threading.Thread(
                target=self._notify_arbiter_restart, name="notice-arbiter", daemon=True
            ).start()
        threading.Thread(target=self._watch_space, name="space-probe", daemon=True).start()
        if self.watch is not None:
            self.watch.start()

    def _watch_space(self) -> None:
        """Lifecycle step 6 at G and H: every ``SPACE_PROBE_S`` while runs are going, check
        that the state folder still takes a write; if it is full, stop those runs with the
        error naming it. A full folder also fails the transport's replay journal, so nothing
        reaches this party any more: without the probe its runs would only end with their
        receive timeouts. The arbiter, which runs no sessions, checks while it has jobs
        registered and says so in its log (its peers only see their requests fail)."""
        full = False
        while not self._stopping.wait(SPACE_PROBE_S):
            with self._lock:
                entries = [
                    e
                    for e in self._guest_jobs.values()
                    if e.session is not None and e.thread is not None and e.thread.is_alive()
                ]
                runs = [r for r in self._host_runs.values() if not r.done.is_set()]
            serving = self.watch is not None and bool(self.watch.jobs())
            if not entries and not runs and not serving:
                continue
            error = self._probe_space()
            if error is None:
                if full:
                    logger.info("%s takes writes again", self.config.state_dir)
                full = False
                continue
            if not full:
                logger.error("%s; stopping %d run(s)", error, len(entries) + len(runs))
                if serving:
                    self._tell_guests_full()
            full = True
            for entry in entries:
                if entry.session is not None and not entry.session.stopped:
                    entry.no_space = error
                    entry.session.stop()
            for run in runs:
                if not run.session.stopped:
                    run.no_space = error
                    run.session.stop()

    def _notify_arbiter_restart(self) -> None:
        """Lifecycle step 3 at A: ``RUN_STOPPED{restarted}`` to the guest of every open job
        that has not registered again with this process, retrying until the guest is
        reachable (for up to ``NOTICE_PATIENCE_S``). A request A had acknowledged but not
        answered when it stopped is never answered (its reply cache died with it, and a
        repeat is only acknowledged), so the run waiting for it starts anew at once instead
        of at its receive timeout."""
        service = self.watch.service if self.watch is not None else None
        if service is None:
            return
        pending = dict(service.policy.open_jobs())
        give_up, delay = time.monotonic() + NOTICE_PATIENCE_S, 1.0
        body = {"reason": RunStop.RESTARTED.value, "run_id": ""}
        while pending and not self._stopping.is_set():
            for job_id, guest_id in list(pending.items()):
                if self.watch is not None and job_id in self.watch.jobs():
                    del pending[job_id]  # a run registered with this process already
                    continue
                try:
                    self._stopped_notice(job_id, guest_id, body)
                except (VflError, OSError) as exc:
                    logger.debug("job %s: restart notice to %s: %s", job_id, guest_id, exc)
                    continue
                del pending[job_id]
                logger.info("job %s: told %s that the arbiter restarted", job_id, guest_id)
            if pending and time.monotonic() + delay > give_up:
                logger.warning("no restart notice reached the guests of %s", sorted(pending))
                return
            self._stopping.wait(delay)
            delay = min(2 * delay, 10.0)

    def _stopped_notice(self, job_id: str, guest_id: str, body: dict[str, Any]) -> None:
        """At A: one ``RUN_STOPPED`` to the guest of ``job_id``, on a fresh stream (A keeps
        no sequence numbers of its own across restarts)."""
        guest = self.config.peer(guest_id).party
        self.channel.fresh_stream(job_id, (guest,))
        self.channel.send(
            Envelope(
                job_id=job_id,
                sender=self.channel.me,
                receiver=guest,
                tag=JobTag.RUN_STOPPED,
                step=time.time_ns() // 1000,
                body=ControlBlock.from_obj(body),
            )
        )

    def _tell_guests_full(self) -> None:
        """At A: ``RUN_STOPPED{no_space}`` to the guest of every open job (a full folder
        fails A's replay journal too, so its peers' requests are only refused as busy,
        docs/protocol.md §2.9.1: this tells them why, and they wait for space instead of
        giving up)."""
        service = self.watch.service if self.watch is not None else None
        if service is None:
            return
        body = {
            "reason": RunStop.NO_SPACE.value,
            "no_space": True,
            "error": "no space left in the arbiter's state folder; it answers again once its "
            "operator freed space",
        }
        for job_id in self.watch.jobs() if self.watch is not None else []:
            policy = service.policy.job(job_id)
            if policy is None or service.policy.closed(job_id) or not policy.parties:
                continue
            try:
                self._stopped_notice(job_id, policy.parties[0], body)
            except (VflError, OSError) as exc:
                logger.warning("job %s: could not tell its guest that A is full: %s", job_id, exc)

    def _probe_space(self) -> str | None:
        """The error naming the state folder if it cannot take a small write now."""
        path = self.config.state_dir / ".space-probe"
        try:
            atomic_write(path, bytes(SPACE_PROBE_BYTES), mode=0o600)
            path.unlink()
        except OSError as exc:
            if is_no_space(exc):
                what = f"{self.config.party.party_id}'s state folder"
                return str(no_space_error(self.config.state_dir, exc, what=what))
            logger.warning("cannot probe %s: %s", self.config.state_dir, exc)
        return None

    def close(self) -> None:
        """Stop every run (lifecycle step 5), record the arbiter's counts, stop workers."""
        self._stopping.set()
        with self._lock:
            guest_jobs = list(self._guest_jobs.values())
            host_runs = list(self._host_runs.values())
        for entry in guest_jobs:
            alive = entry.thread is not None and entry.thread.is_alive()
            if entry.session is not None and alive:
                entry.session.stop()
            entry.wake.set()
        for run in host_runs:
            if not run.done.is_set():
                run.session.stop()
        give_up = time.monotonic() + STOP_WAIT_S
        for entry in guest_jobs:
            if entry.thread is not None:
                entry.thread.join(max(0.0, give_up - time.monotonic()))
        for run in host_runs:
            run.done.wait(max(0.0, give_up - time.monotonic()))
        self.fed.close()
        self.ftl.close()
        if self.watch is not None:
            self.watch.close()
        self.audit.close()
        with self._lock:
            if self._background is not None:
                self._background.close()

    def status(self) -> dict[str, Any]:
        """Progress of every job this service ran since it started."""
        with self._lock:
            out = {job_id: dict(state) for job_id, state in self.jobs.items()}
        out.update(self.fed.aggregator_status())
        return out

    def host_run_failed(
        self, job_id: str, *, submitter: str, exc: BaseException, stopped: bool, what: str
    ) -> None:
        """A host's run of ``what`` (FedAvg, FTL) ended with ``exc``: interrupted if it was
        stopped (a newer run, or the service stop), else failed, in the status and audit log."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        with self._lock:
            guest_failed = job_id in self._guest_failed
        if guest_failed:  # R3 recorded it failed already; the stop was its consequence
            return
        if stopped or self._stopping.is_set():
            self._update(job_id, state="interrupted", phase="stopped")
            return
        logger.error("%s job %s failed here: %s", what, job_id, error)
        self.audit.record(
            event=AuditEvent.JOB_FAILED, job_id=job_id, submitter=submitter, reason=error
        )
        self._update(job_id, state="failed", phase="failed", error=error)

    def _update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            self.jobs.setdefault(job_id, {}).update(fields)

    def _job_lock(self, job_id: str) -> threading.Lock:
        with self._lock:
            return self._job_locks.setdefault(job_id, threading.Lock())

    def _job_dir(self, job_id: str) -> Path:
        """``<state_dir>/jobs/<job_id>``, made 0700 if missing; refused
        (:class:`~protocols.ids.UnsafePathError`) unless ``job_id`` is an identifier and the
        folder stays in the state folder (docs/protocol.md §2.9)."""
        return private_dir(state_path(self.config.state_dir, "jobs", job_id))

    def _stored_jobs(self, file: str) -> list[tuple[str, Path]]:
        """``(job id, path)`` of every ``jobs/<id>/<file>`` in the state folder; a folder
        whose name is not an identifier, or that leads out of the state folder (a planted
        link), is skipped with an error in the log."""
        out = []
        for path in sorted((self.config.state_dir / "jobs").glob(f"*/{file}")):
            job_id = path.parent.name
            try:
                out.append((job_id, state_path(self.config.state_dir, "jobs", job_id, file)))
            except VflError as exc:
                logger.error("ignored %s: %s", path.parent, exc)
        return out

    # -- guest -----------------------------------------------------------------------

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Admin ``train``: validate the job now, keep the request, run it in the background."""
        if self.config.party.role is not Role.GUEST:
            raise ConfigError("only the guest (label holder) submits training jobs")
        if job_kind(dict(request.get("job_file", {}))) is JobKind.HORIZONTAL:
            request = {**request, "job_file": with_defaults(dict(request["job_file"]))}
        job_file = self._parse(request, source="train request")
        job_id = job_file.job.job_id
        hold = request.get("hold_at_step")
        if hold is not None:
            if not self.config.allow_hold:
                raise ConfigError("hold_at_step needs [testing] allow_hold = true (tests only)")
            if not isinstance(hold, int) or isinstance(hold, bool) or hold < 1:
                raise ConfigError("hold_at_step must be a positive integer (steps done)")
        with self._lock:
            if self.jobs.get(job_id, {}).get("state") == "running":
                raise ConfigError(f"job {job_id} is already running")
            self.jobs[job_id] = {"state": "running", "phase": "starting", "started": time.time()}
        try:  # kept before it runs: a restarted service resubmits it (lifecycle step 1)
            folder = self._job_dir(job_id)
            atomic_write(folder / REQUEST_FILE, json.dumps(request).encode(), mode=0o600)
            (folder / OUTCOME_FILE).unlink(missing_ok=True)
        except OSError as exc:
            self._update(job_id, state="failed", phase="failed", error=str(exc)[:300])
            raise DataError(
                f"cannot keep job {job_id} in {self.config.state_dir}: {exc}; check the state "
                "folder's space and permissions"
            ) from None
        self.audit.record(
            event=AuditEvent.JOB_SUBMITTED,
            job_id=job_id,
            submitter=self.config.party.party_id,  # its own operator (admin certificate)
            config_sha256=config_digest(request),
            input_sha256=file_digest(self.config.data[job_file.guest_data]),
            **(
                {"clients": list(job_file.job.client_ids)}
                if isinstance(job_file, FedJobFile)
                else {"host": self.config.peer_with_role(Role.HOST).party_id}
            ),
        )
        self._launch(job_file, request)
        return {"job_id": job_id, "state": "running"}

    def _parse(
        self, request: dict[str, Any], *, source: str
    ) -> TrainJobFile | FedJobFile | FtlJobFile:
        raw = dict(request.get("job_file", {}))
        job_file: TrainJobFile | FedJobFile | FtlJobFile
        if job_kind(raw) is JobKind.TRANSFER:
            job_file = parse_ftl_job(raw, source=source)
        elif job_kind(raw) is JobKind.HORIZONTAL:
            job_file = FedJobFile(
                parse_fed_job(raw, source=source, coordinator=self.config.party.party_id)
            )
        else:
            job_file = parse_job(
                raw, source=source, allow_plaintext=bool(request.get("allow_plaintext", False))
            )
        if job_file.guest_data not in self.config.data:
            known = ", ".join(sorted(self.config.data)) or "none"
            raise ConfigError(f"no data alias {job_file.guest_data!r} here (aliases: {known})")
        return job_file

    def _launch(
        self, job_file: TrainJobFile | FedJobFile | FtlJobFile, request: dict[str, Any]
    ) -> None:
        entry = _GuestJob(job_file, request)
        job_id = job_file.job.job_id
        with self._lock:
            if job_id in self._released:
                entry.release.set()
        entry.thread = threading.Thread(
            target=self._guest_job, args=(entry,), name=f"job-{job_id}", daemon=True
        )
        with self._lock:
            self._guest_jobs[job_id] = entry
        entry.thread.start()

    def _resume_unfinished(self) -> None:
        """Lifecycle step 1: resubmit every job with a request and no outcome."""
        for job_id, path in self._stored_jobs(REQUEST_FILE):
            if (path.parent / OUTCOME_FILE).is_file():
                continue
            try:
                request = json.loads(path.read_text())
                job_file = self._parse(request, source=str(path))
            except (OSError, ValueError, VflError) as exc:
                logger.error("job %s cannot be resumed: %s", job_id, exc)
                error = f"cannot be resumed: {exc}"[:500]
                self.audit.record(event=AuditEvent.JOB_FAILED, job_id=job_id, reason=error)
                self._finish(job_id, state="failed", error=error)
                continue
            logger.info("resuming job %s (unfinished when the service stopped)", job_id)
            self._update(job_id, state="running", phase="resuming", started=time.time())
            self._launch(job_file, request)

    def release(self, job_id: str) -> dict[str, Any]:
        """Admin ``release``: end the test hold of ``job_id`` (``hold_at_step``), now or, if
        its run has not reached the hold yet (e.g. it is being resubmitted), when it does."""
        if not self.config.allow_hold:
            raise ConfigError("release needs [testing] allow_hold = true (tests only)")
        with self._lock:
            self._released.add(job_id)
            entry = self._guest_jobs.get(job_id)
        if entry is not None:
            entry.release.set()
        return {"job_id": job_id, "released": True}

    def _hold(self, entry: _GuestJob, step: int) -> None:
        """The ``after_step`` hook of a job submitted with ``hold_at_step`` (tests of
        restarts): after that many steps the run waits, status ``phase = "held"``, until
        admin ``release``; a stop of the run or the service ends the wait (the run is
        then interrupted like any other)."""
        job_id = entry.job_file.job.job_id
        if entry.hold_at != step or entry.release.is_set():
            return
        logger.info("job %s held after step %d (testing): admin release goes on", job_id, step)
        self._update(job_id, phase="held", held_at=step)
        while not entry.release.wait(0.2):
            session = entry.session
            if self._stopping.is_set() or (session is not None and session.stopped):
                raise RunAbortedError(f"job {job_id} was stopped while held after step {step}")
        self._update(job_id, phase="training")

    def _finish(self, job_id: str, *, state: str, **fields: Any) -> None:
        """Record that the job is over for good (not resubmitted on start)."""
        self._update(job_id, state=state, phase=state, **fields)
        body = {"state": state, "time": time.time(), **fields}
        try:
            atomic_write(
                self._job_dir(job_id) / OUTCOME_FILE, json.dumps(body).encode(), mode=0o600
            )
        except OSError as exc:
            logger.error(
                "job %s is %s, but %s cannot record it (%s); the job is resubmitted when the "
                "service starts again",
                job_id,
                state,
                self.config.state_dir,
                exc,
            )

    def _no_space(self, exc: BaseException, notice: dict[str, Any] | None) -> str | None:
        """The error to report if a run stopped because a state folder is full: this
        party's own (named), or the host's or the arbiter's as they reported it."""
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, OSError) and is_no_space(cause):
                what = f"{self.config.party.party_id}'s state folder"
                return str(no_space_error(self.config.state_dir, cause, what=what))
            cause = cause.__cause__ or cause.__context__
        if notice is not None and notice.get("no_space"):
            return f"{notice.get('from')} stopped: {notice.get('error', NO_SPACE)}"
        if is_no_space(exc):
            return f"{type(exc).__name__}: {exc}"
        return None

    def _guest_job(self, entry: _GuestJob) -> None:
        """Lifecycle step 2: runs until the job is done, fails for good, or the service stops."""
        job_id = entry.job_file.job.job_id
        attempt = 0
        full_since: float | None = None  # when runs began to fail for lack of space
        full_waits = 0
        last_full = ""
        while True:
            entry.notice = None
            entry.no_space = None
            entry.wake.clear()
            step_before = self.status().get(job_id, {}).get("step", 0)
            try:
                result = self._guest_attempt(entry)
            except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
                if self.status().get(job_id, {}).get("step", 0) > step_before:
                    attempt = 0  # the run made progress: the retry limit counts from here
                    if full_since is not None:  # and space was back for a while
                        full_since, full_waits, last_full = None, 0, ""
                        self._update(job_id, no_space=None)
                key_id = entry.session.key_id if entry.session is not None else None
                notice = entry.notice
                error = f"{type(exc).__name__}: {exc}"
                if notice is not None and notice.get("reason") == RunStop.FAILED.value:
                    error = f"{notice.get('from')} failed: {notice.get('error', 'no reason')}"
                if self._stopping.is_set():
                    logger.info("job %s interrupted by the service stop; resumes on start", job_id)
                    self._update(job_id, state="interrupted", phase="stopped")
                    return
                full = entry.no_space or self._no_space(exc, notice) or entry.peer_full
                entry.peer_full = None
                if full is None and full_since is not None and notice is None and retryable(exc):
                    # a party whose folder is full may fail otherwise too (its transport
                    # cannot journal what it receives): still the same episode
                    full = f"{last_full} (since then: {error[:200]})"
                if full is not None:  # this party's, the host's or the arbiter's folder
                    last_full = full if full_since is None else last_full
                    full_since = full_since or time.monotonic()
                    if time.monotonic() - full_since < NO_SPACE_PATIENCE_S:
                        if not full_waits:
                            self.audit.record(
                                event=AuditEvent.JOB_RETRIED,
                                job_id=job_id,
                                key_id=key_id,
                                reason=full[:500],
                                attempt=attempt + 1,
                            )
                        full_waits += 1
                        delay = NO_SPACE_DELAYS_S[min(full_waits, len(NO_SPACE_DELAYS_S)) - 1]
                        logger.error("job %s stopped: %s; new run in %.0f s", job_id, full, delay)
                        self._update(
                            job_id, phase="waiting_for_space", last_error=full[:500], no_space=full
                        )
                        entry.wake.wait(delay)
                        if self._stopping.is_set():
                            self._update(job_id, state="interrupted", phase="stopped")
                            return
                        continue
                    error = full
                elif full_since is not None:
                    full_since, full_waits, last_full = None, 0, ""
                    self._update(job_id, no_space=None)
                if notice is not None:
                    again = notice.get("reason") == RunStop.RESTARTED.value or bool(
                        notice.get("retry", False)
                    )
                else:
                    again = retryable(exc)
                if isinstance(exc, RoundAbortedError) and isinstance(entry.job_file, FedJobFile):
                    again = entry.job_file.job.on_dropout is DropoutPolicy.RETRY
                if not again or attempt >= RETRY_LIMIT:
                    logger.error("job %s failed: %s", job_id, error)
                    logger.debug("%s", traceback.format_exc())
                    self.audit.record(  # before the status says failed
                        event=AuditEvent.JOB_FAILED,
                        job_id=job_id,
                        key_id=key_id,
                        reason=error[:500],
                        attempts=attempt + 1,
                    )
                    self._finish(job_id, state="failed", error=error[:500])
                    public = peer_reason(exc)
                    if notice is not None and notice.get("reason") == RunStop.FAILED.value:
                        public = f"{notice.get('from')} failed: {notice.get('error', 'no reason')}"
                    self._tell_failed(entry, public[:300])
                    return
                attempt += 1
                restarted = notice is not None and notice.get("reason") == RunStop.RESTARTED.value
                delay = 0.0 if restarted else RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S)) - 1]
                logger.warning(
                    "job %s: run failed (%s); new run (%d of at most %d) in %.0f s",
                    job_id,
                    error[:300],
                    attempt,
                    RETRY_LIMIT,
                    delay,
                )
                self._update(job_id, phase="retrying", attempts=attempt, last_error=error[:300])
                self.audit.record(
                    event=AuditEvent.JOB_RETRIED,
                    job_id=job_id,
                    key_id=key_id,
                    reason=error[:500],
                    attempt=attempt,
                )
                entry.wake.wait(delay)
                if self._stopping.is_set():
                    self._update(job_id, state="interrupted", phase="stopped")
                    return
                continue
            if full_since is not None:
                self._update(job_id, no_space=None)
            session = entry.session
            self.audit.record(  # before the status says done
                event=AuditEvent.JOB_FINISHED,
                job_id=job_id,
                key_id=session.key_id if session is not None else None,
                runs=attempt + 1,
            )
            path = str(state_path(self.config.state_dir, "jobs", job_id, "result.json"))
            if isinstance(result, FtlResult):
                last = result.history[result.best_epoch - 1] if result.history else {}
                self._finish(
                    job_id,
                    state="done",
                    best_epoch=result.best_epoch,
                    validation={k[4:]: v for k, v in last.items() if k.startswith("val_")},
                    result=path,
                )
                return
            if isinstance(result, FedResult):
                last = result.history[-1] if result.history else {}
                self._finish(
                    job_id,
                    state="done",
                    rounds=result.rounds,
                    validation=last.get("validation"),
                    test=last.get("test"),
                    epsilon=result.epsilon,
                    model=result.model_dir,
                    result=path,
                )
                return
            self._finish(
                job_id, state="done", test=result.test, best_epoch=result.best_epoch, result=path
            )
            return

    def _tell_failed(self, entry: _GuestJob, reason: str) -> None:
        """Lifecycle step 6 (R3): tell the host and the arbiter that the job failed for good."""
        if isinstance(entry.job_file, FedJobFile):
            return  # a horizontal job's aggregator tells its clients itself (ABORT)
        job_id = entry.job_file.job.job_id
        session = entry.session
        body = {"run_id": session.run_id if session is not None else "", "reason": reason}
        receivers = (
            self.config.peer_with_role(Role.HOST),
            self.config.peer_with_role(Role.ARBITER),
        )
        threading.Thread(
            target=self._send_failed,
            args=(job_id, receivers, body),
            name=f"failed-{job_id}",
            daemon=True,
        ).start()

    def _send_failed(self, job_id: str, receivers: tuple[Party, ...], body: dict[str, Any]) -> None:
        """Send ``JOB_FAILED`` (R3) to each receiver, retrying for ``FAILED_NOTICE_S``."""
        give_up = time.monotonic() + FAILED_NOTICE_S
        with self._job_lock(job_id):  # a fresh run number: never a replay of an earlier one
            number = claim_run(self.channel, self._job_dir(job_id), receivers)
        for receiver in receivers:
            delay = 1.0
            while not self._stopping.is_set():
                try:
                    self.channel.send(
                        Envelope(
                            job_id=job_id,
                            sender=self.channel.me,
                            receiver=receiver,
                            tag=JobTag.JOB_FAILED,
                            step=number,
                            body=ControlBlock.from_obj(body),
                        )
                    )
                except (VflError, OSError) as exc:
                    if time.monotonic() + delay > give_up:
                        logger.warning(
                            "job %s: could not tell %s that it failed: %s", job_id, receiver, exc
                        )
                        break
                    self._stopping.wait(delay)
                    delay = min(2 * delay, 10.0)
                    continue
                logger.info("job %s: told %s that it failed", job_id, receiver.party_id)
                break

    def _on_job_failed(self, envelope: Envelope) -> None:
        """R3 at H and A: the job's guest says the job failed for good. H stops its run of
        it; both record it ``failed`` with the guest's (peer-safe) reason. Only the guest of
        a job shown ``running`` here can do so."""
        job_id, sender = envelope.job_id, envelope.sender.party_id
        body = envelope.body.obj() if isinstance(envelope.body, ControlBlock) else {}
        reason = f"{sender} failed: {str(body.get('reason') or 'no reason given')[:300]}"
        with self._lock:
            state = dict(self.jobs.get(job_id, {}))
            run = self._host_runs.get(job_id)
        if self.config.party.role is Role.HOST:
            guest = run.envelope.sender.party_id if run is not None else self.ftl.guest_of(job_id)
        else:
            guest = state.get("guest")
        if state.get("state") != "running" or guest != sender:
            logger.info(
                "ignored JOB_FAILED for job %s from %s (not its running guest here)", job_id, sender
            )
            return
        logger.warning("job %s: %s", job_id, reason)
        with self._lock:
            self._guest_failed[job_id] = reason
        self.audit.record(
            event=AuditEvent.JOB_FAILED, job_id=job_id, submitter=sender, reason=reason
        )
        self._update(job_id, state="failed", phase="failed", error=reason)
        if run is not None:
            self._host_run_state(job_id, run.envelope, state="failed")
            if not run.done.is_set():
                run.session.stop()
        self.ftl.stop_run(job_id)

    def _has_psi(self, psi_job: str) -> bool:
        try:
            read_result(self.config.state_dir, psi_job)
        except (VflError, OSError, ValueError):
            return False
        return True

    def ensure_psi(self, job_file: TrainJobFile | FtlJobFile) -> str:
        """The job's PSI result: the one it names, or run it now (once) with the host."""
        job_id = job_file.job.job_id
        psi_job = job_file.psi_job or f"{job_id}.psi"
        if not job_file.psi_job and not self._has_psi(psi_job):
            self._update(job_id, phase="psi")
            self.run_psi(
                {
                    "peer": self.config.peer_with_role(Role.HOST).party_id,
                    "data": job_file.guest_data,
                    "host_data": job_file.host_data,  # the host uses its own [psi] columns
                    "id_column": job_file.id_column,
                    "id_type": job_file.id_type,
                    "job_id": psi_job,
                }
            )
        return psi_job

    def _guest_attempt(self, entry: _GuestJob) -> SplitResult | FedResult | FtlResult:
        """One run of the job (split NN and transfer: PSI first unless it has a result)."""
        job_file = entry.job_file
        if isinstance(job_file, FedJobFile):
            return self.fed.coordinate(entry, job_file.job)
        if isinstance(job_file, FtlJobFile):
            return self.ftl.coordinate(entry, job_file)
        job_id = job_file.job.job_id
        psi_job = self.ensure_psi(job_file)
        request = {"data": job_file.guest_data, "id_column": job_file.id_column, "psi_job": psi_job}
        table = _aligned_table(self.config, request, labels=job_file.label_column)
        if table.labels is None:
            raise ConfigError(f"data {job_file.guest_data!r} has no label column")
        splits = split_rows(
            table.labels,
            test_fraction=job_file.test_fraction,
            validation_fraction=job_file.validation_fraction,
            seed=job_file.split_seed,
            # rr_labels: a split the host sees must not depend on the labels (§4.7.2)
            stratified=job_file.job.train.protect.mode is not ProtectMode.RR_LABELS,
        )
        self._update(job_id, phase="training", rows=len(table))
        seed = self.config.seed
        session = GuestSession(
            channel=self.channel,
            host=self.config.peer_with_role(Role.HOST),
            arbiter=self.config.peer_with_role(Role.ARBITER),
            job=job_file.job,
            table=table,
            splits=splits,
            executor=self.executor,
            state_dir=self.config.state_dir,
            impute=job_file.impute,
            w0_seed=seed,
            order_seed=None if seed is None else order_seed_for(seed),
            allow_test_key=self.config.allow_test_key,
            progress=lambda p: self._on_progress(p),
            pool_executor=self.background(),
            host_request={"data": job_file.host_data, "psi_job": psi_job},
            after_step=None if entry.hold_at is None else lambda step: self._hold(entry, step),
        )
        with self._lock:
            entry.session = session
        if self._stopping.is_set():
            session.stop()
        try:
            return session.run()
        finally:
            if session.run_id:  # drop whatever of this run is still unread (R2)
                self.channel.abort_run(job_id, session.run_id)

    def _on_run_stopped(self, envelope: Envelope) -> None:
        """R1 at G: H says a run ended early; stop it now if it is the current one. Also
        A's ``RUN_STOPPED``: ``restarted`` stops the current run (a new one starts at once),
        ``no_space`` (its state folder is full) stops it and waits for space (step 6)."""
        host = self.config.peer_with_role(Role.HOST)
        arbiter = self.config.peer_with_role(Role.ARBITER)
        if not isinstance(envelope.body, ControlBlock) or envelope.sender not in (host, arbiter):
            logger.warning("ignored a RUN_STOPPED from %s", envelope.sender)
            return
        body = envelope.body.obj()
        with self._lock:
            entry = self._guest_jobs.get(envelope.job_id)
        if entry is None:
            logger.info("RUN_STOPPED for job %s, which is not running here", envelope.job_id)
            return
        if envelope.sender == arbiter:
            if body.get("reason") == RunStop.RESTARTED.value:  # no reply to an open request
                logger.warning("job %s: the arbiter restarted; new run", envelope.job_id)
                if entry.session is not None and entry.session.run_id:
                    entry.notice = {**body, "from": arbiter.party_id}
                    entry.session.stop()
                entry.wake.set()
                return
            if body.get("reason") != RunStop.NO_SPACE.value:
                logger.warning("ignored a RUN_STOPPED from %s", envelope.sender)
                return
            entry.peer_full = f"{arbiter.party_id} stopped: {body.get('error', NO_SPACE)}"[:500]
            logger.error("job %s: %s", envelope.job_id, entry.peer_full)
            if entry.session is not None:
                entry.session.stop()
            entry.wake.set()
            return
        session = entry.session
        run_id = str(body.get("run_id", ""))
        logger.warning(
            "job %s: %s reports run %s %s%s",
            envelope.job_id,
            host.party_id,
            run_id or "-",
            body.get("reason"),
            f": {body.get('error')}" if body.get("error") else "",
        )
        # a restarted H serves no earlier run of G at all; a failure concerns its own run
        restarted = body.get("reason") == RunStop.RESTARTED.value
        if body.get("no_space"):  # also if that run already ended: the next one fails too
            entry.peer_full = f"{host.party_id} stopped: {body.get('error', NO_SPACE)}"[:500]
        if session is not None and session.run_id and (restarted or session.run_id == run_id):
            entry.notice = {**body, "from": host.party_id}
            session.stop()
        entry.wake.set()

    def _on_progress(self, p: Progress) -> None:
        fields: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "epochs": p.epochs,
            "step": p.step,
            "total_steps": p.total_steps,
        }
        if p.validation is None:
            fields.update(rows_per_s=round(p.rows_per_s, 1), eta_s=round(p.eta_s), loss=p.loss)
        else:
            fields["validation"] = {k: round(v, 5) for k, v in p.validation.items()}
        self._update(p.job_id, **fields)

    # -- host ------------------------------------------------------------------------

    def _on_job_start(self, envelope: Envelope) -> None:
        """A guest's JOB_START: stop an older run of the job, then serve this one."""
        job_id = envelope.job_id
        if self._stopping.is_set():
            return  # the guest tries again once this service is back
        with self._job_lock(job_id):
            with self._lock:
                old = self._host_runs.get(job_id)
            owner = self._job_guest(job_id, old)
            if owner is not None and owner != envelope.sender.party_id:
                # a job id belongs to the guest that started it: another guest may neither
                # stop its run nor take over its checkpoints
                reason = f"job {job_id} belongs to {owner}; JOB_START from {envelope.sender}"
                logger.warning("refused a JOB_START: %s", reason)
                self.audit.record(
                    event=AuditEvent.JOB_REFUSED,
                    job_id=job_id,
                    submitter=envelope.sender.party_id,
                    reason=reason,
                )
                return
            if old is not None and not old.done.is_set():
                logger.info(
                    "job %s: run %s replaces run %s, which is stopped first",
                    job_id,
                    envelope.run_id,
                    old.envelope.run_id,
                )
                old.session.stop()
                while not old.done.wait(1.0):
                    if self._stopping.is_set():
                        return
            session = HostSession(
                channel=self.channel,
                guest=envelope.sender,
                arbiter=self.config.peer_with_role(Role.ARBITER),
                table_for=lambda request: _aligned_table(
                    self.config, request, labels=None, guest=envelope.sender.party_id
                ),
                request_for=lambda request: {
                    **request,
                    "id_column": host_id_column(self.config, request),
                },
                executor=self.executor,
                state_dir=self.config.state_dir,
                seed=self.config.seed,
                allow_test_key=self.config.allow_test_key,
                pool_executor=self.background(),
                accept=lambda offer: self._accept(offer, envelope),
            )
            run = _HostRun(session, envelope)
            with self._lock:
                self._host_runs[job_id] = run
                self._guest_failed.pop(job_id, None)  # a new run of the job (resubmitted)
        self._update(job_id, state="running", phase="training", started=time.time())
        try:
            session.run(envelope)
        except JobRefusedError as exc:
            self.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=envelope.sender.party_id,
                config_sha256=self._start_digest(envelope),
                key_id=session.key_id,
                reason=str(exc)[:500],
            )
            self._update(job_id, state="refused", phase="refused", error=str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - reported through status, audit and R1
            error = f"{type(exc).__name__}: {exc}"[:500]
            full = is_no_space(exc) or run.no_space is not None
            if run.no_space is not None:
                error = run.no_space[:500]
            elif full and isinstance(exc, OSError):
                what = f"{self.config.party.party_id}'s state folder"
                error = str(no_space_error(self.config.state_dir, exc, what=what))[:500]
            if self._stopping.is_set():
                logger.info("job %s: run %s stopped with the service", job_id, envelope.run_id)
                self._update(job_id, state="interrupted", phase="stopped")
            elif session.stopped and run.no_space is None:
                logger.info(
                    "job %s: run %s stopped (a newer run replaces it, or the guest failed)",
                    job_id,
                    envelope.run_id,
                )
            else:
                logger.error("job %s failed at the host: %s", job_id, error)
                self.audit.record(
                    event=AuditEvent.JOB_FAILED,
                    job_id=job_id,
                    submitter=envelope.sender.party_id,
                    key_id=session.key_id,
                    reason=error,
                )
                self._host_run_state(job_id, envelope, state="failed", strict=False)
                self._update(job_id, state="failed", error=error)
                body = {
                    "reason": RunStop.FAILED.value,
                    # the rule only: never H's paths (its log and status have the folder)
                    "error": (
                        f"{NO_SPACE} in {self.config.party.party_id}'s state folder; its "
                        "operator must free space"
                        if full
                        else peer_reason(exc)
                    ),
                    "retry": retryable(exc) or full,
                    "no_space": full,
                }
                threading.Thread(
                    target=self._send_notice,
                    args=(job_id, envelope.sender, envelope.run_id, body, 60.0),
                    daemon=True,
                ).start()
        else:
            self.audit.record(
                event=AuditEvent.JOB_FINISHED,
                job_id=job_id,
                submitter=envelope.sender.party_id,
                key_id=session.key_id,
            )
            self._host_run_state(job_id, envelope, state="done", strict=False)
            self._update(job_id, state="done", phase="done")
        finally:
            run.done.set()
            self.channel.abort_run(job_id, envelope.run_id)  # drop leftovers of this run

    @staticmethod
    def _start_digest(envelope: Envelope) -> str | None:
        """``config_sha256`` of a JOB_START: the job as received, without the run's own
        resume bookkeeping (checkpoints, evaluation counter)."""
        if not isinstance(envelope.body, ControlBlock):
            return None
        body = {
            k: v for k, v in envelope.body.obj().items() if k not in ("checkpoints", "eval_step")
        }
        return config_digest(body)

    def _accept(self, offer: JobOffer, envelope: Envelope) -> None:
        """H's acceptance policy (the session's ``accept`` hook); records the accepted run."""
        check_offer(self.config, offer)
        if offer.key_bits is None:
            return
        alias = str(offer.request.get("data", ""))
        path = self.config.data.get(alias)
        self._host_run_state(offer.job.job_id, envelope, state="running")
        self.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=offer.job.job_id,
            submitter=offer.guest,
            config_sha256=self._start_digest(envelope),
            input_sha256=file_digest(path) if path is not None else None,
            key_id=offer.key_id,
            run_id=envelope.run_id,
        )

    def _job_guest(self, job_id: str, run: _HostRun | None) -> str | None:
        """H: the guest a job id belongs to (its current run's, or the one recorded)."""
        if run is not None:
            return run.envelope.sender.party_id
        path = state_path(self.config.state_dir, "jobs", job_id, HOST_RUN_FILE)
        try:
            guest = json.loads(path.read_text()).get("guest")
        except (OSError, ValueError, AttributeError):
            return None
        return str(guest) if guest else None

    def _host_run_state(
        self, job_id: str, envelope: Envelope, *, state: str, strict: bool = True
    ) -> None:
        """Record the run H serves (``strict=False``: a failure to write is only logged, so
        the run's end is still reported; a restart may then send one needless notice)."""
        body = {"guest": envelope.sender.party_id, "run_id": envelope.run_id, "state": state}
        try:
            atomic_write(
                self._job_dir(job_id) / HOST_RUN_FILE, json.dumps(body).encode(), mode=0o600
            )
        except OSError as exc:
            if strict:
                raise
            logger.error("job %s: cannot record run %s %s: %s", job_id, envelope.run_id, state, exc)

    def _notify_restarts(self) -> None:
        """Lifecycle step 3: RUN_STOPPED{restarted} for every run still going at the stop."""
        for job_id, path in self._stored_jobs(HOST_RUN_FILE):
            try:
                info = json.loads(path.read_text())
                if info.get("state") != "running":
                    continue
                guest = self.config.peer(str(info["guest"])).party
            except (OSError, ValueError, KeyError, VflError) as exc:
                logger.warning("%s is unreadable (%s); no restart notice sent", path, exc)
                continue
            body = {"reason": RunStop.RESTARTED.value}
            threading.Thread(
                target=self._send_notice,
                args=(
                    job_id,
                    guest,
                    str(info.get("run_id", "")),
                    body,
                    NOTICE_PATIENCE_S,
                ),
                name=f"notice-{job_id}",
                daemon=True,
            ).start()

    def _send_notice(
        self, job_id: str, guest: Party, run_id: str, body: dict[str, Any], patience: float
    ) -> None:
        """R1: tell G, retrying until it is reachable, the service stops or ``patience`` ends."""
        give_up = time.monotonic() + patience
        delay = 1.0
        while not self._stopping.is_set():
            with self._lock:
                resumed = body["reason"] == RunStop.RESTARTED.value and job_id in self._host_runs
            if resumed:  # G has started a new run with this process already: nothing to say
                return
            try:
                try:
                    with self._job_lock(job_id):
                        number = claim_run(self.channel, self._job_dir(job_id), (guest,))
                except OSError as exc:
                    if not is_no_space(exc):
                        raise
                    # a full folder cannot keep the run count: a step and sequence numbers
                    # from the clock instead, past every run number (G reads no step here)
                    self.channel.fresh_stream(job_id, (guest,))
                    number = time.time_ns() // 1000
                self.channel.send(
                    Envelope(
                        job_id=job_id,
                        sender=self.channel.me,
                        receiver=guest,
                        tag=JobTag.RUN_STOPPED,
                        step=number,
                        body=ControlBlock.from_obj({"run_id": run_id, **body}),
                    )
                )
            except (VflError, OSError, ValueError) as exc:
                if time.monotonic() + delay > give_up:
                    logger.warning(
                        "job %s: could not tell %s that run %s stopped: %s",
                        job_id,
                        guest,
                        run_id,
                        exc,
                    )
                    return
                self._stopping.wait(delay)
                delay = min(2 * delay, 10.0)
                continue
            logger.info(
                "job %s: told %s that run %s %s", job_id, guest.party_id, run_id, body["reason"]
            )
            if body["reason"] == RunStop.RESTARTED.value:
                path = self._job_dir(job_id) / HOST_RUN_FILE
                try:
                    info = json.loads(path.read_text())
                except (OSError, ValueError):
                    return
                if info.get("run_id") == run_id and info.get("state") == "running":
                    info["state"] = "notified"
                    try:
                        atomic_write(path, json.dumps(info).encode(), mode=0o600)
                    except OSError as exc:
                        logger.error("job %s: cannot record the notice: %s", job_id, exc)
            return
