"""A party's jobs across runs, stops and restarts: the job runner (it knows no kind of job).

Roles: at the guest G the runner runs the jobs its operator submits (admin ``train``), one
*attempt* (run) at a time through the driver of the job's kind (:mod:`vfl.service.driver`,
registered in :data:`vfl.service.drivers.DRIVERS`); at the host H and the arbiter A it lets
the drivers answer the guests' runs and records what the guests report. The arbiter's
decryptions are :mod:`vfl.service.arbiter`'s. What crosses the wire is the drivers' and the
notices' (:mod:`vfl.service.notices`); the runner sends nothing else.

Lifecycle across stops and restarts (docs/protocol.md §4.4.1; each party logs it in
:mod:`vfl.service.audit`):

1. G persists each submitted request as its canonical JSON (``jobs/<id>/request.json``,
   0600; its SHA-256 is the ``config_sha256`` of ``job_submitted``) before it runs, and
   ``jobs/<id>/outcome.json`` once the job is done or has failed for good. On start, G's
   service resubmits every job with a request and no outcome.
2. A run that fails with a transport error, a timeout, an arbiter refusal (e.g. a reply
   lost while the arbiter restarted) or because H reported ``RUN_STOPPED`` is followed by a
   new run (J1-J4 with a new run id: both parties resume from their checkpoints), after a
   backoff of ``RETRY_DELAYS_S`` (none after ``RUN_STOPPED{restarted}``), at most
   ``RETRY_LIMIT`` times in a row without progress (a run that advanced the step resets
   the count). A refusal under a party's acceptance policy is not retried; a driver may
   decide otherwise for its kind (FedAvg: ``on_dropout``).
3. H records each accepted split-NN run; on start, its service sends
   ``RUN_STOPPED{restarted}`` to the guest of every run that was still going when it
   stopped; a run of H that fails sends ``RUN_STOPPED{failed}`` with the error's peer-safe
   reason (:mod:`vfl.service.drivers.splitnn`). A, on start, sends ``RUN_STOPPED{restarted}``
   to the guest of every open job that has not registered again with it
   (:func:`vfl.service.arbiter.notify_restart`).
4. A guest's new run of a job whose older run is still being served at H stops that run
   first (its receives raise :class:`~protocols.errors.RunAbortedError`) and waits for it.
5. On SIGTERM (:meth:`JobRunner.close`, before the channel closes) every run is stopped the
   same way: checkpoints are written per step, so nothing needs saving; the jobs resume
   when the service is started again.
6. A job that fails for good at G (step 2: not retried, or out of retries), or that its
   operator cancels (admin ``cancel``), is announced to H and A (``JOB_FAILED{run id,
   reason}``, R3, best effort with retries for a minute; a FedAvg job's aggregator tells
   its clients itself): H stops its run of the job, and H and A record the job as
   ``failed`` with G's peer-safe reason instead of showing it ``running``. Only the job's
   guest may say so (at H the guest that owns the id, :mod:`vfl.service.owners`, whose
   notice reaches only the driver of the job's kind; at A the guest the job is registered
   to), and only a job shown ``running`` changes.
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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from protocols.envelope import Envelope
from protocols.errors import (
    ConfigError,
    DataError,
    VflError,
)
from protocols.executor import Executor
from protocols.files import NO_SPACE, atomic_write, is_no_space, no_space_error
from protocols.ids import state_path
from protocols.roles import Role
from protocols.transport.base import Channel, MessageFilter
from vfl.common.jobfile import JobKind, TypedJob, canonical_json
from vfl.config import JobType, PartyConfig
from vfl.service.arbiter import (
    ARBITER_TAGS,
    ArbiterWatch,
    notify_restart,
    serve_arbiter,
    tell_guests_full,
)
from vfl.service.audit import AUDIT_FILE, AuditEvent, AuditLog, config_digest, file_digest
from vfl.service.driver import (
    AdminHandler,
    Driver,
    JobDriver,
    ServiceContext,
)
from vfl.service.drivers import DRIVERS, parse_job
from vfl.service.guestjob import CANCELLED, OUTCOME_FILE, GuestJob, finish
from vfl.service.notices import (
    JOB_FAILED,
    NOTICE_TAGS,
    RUN_STOPPED,
    RunStop,
    notice_body,
)
from vfl.service.requests import AdminCommand, JobIdRequest, TrainRequest

logger = logging.getLogger(__name__)

REQUEST_FILE = "request.json"  # G: the submitted request, kept until the job is over
STOP_WAIT_S = 10.0  # how long close() and cancel wait for runs to end
SPACE_PROBE_S = 5.0  # how often a party with runs going checks it can still write its state
SPACE_PROBE_BYTES = 16 << 10  # the probe's size (a small checkpoint's)


def message_tags() -> list[type[StrEnum]]:
    """Every message tag a party service accepts: the arbiter's key, setup and decryption
    tags, the notices' and each driver's (its channel refuses any other)."""
    tags: list[type[StrEnum]] = [*ARBITER_TAGS, NOTICE_TAGS]
    for driver in DRIVERS.values():
        tags.extend(t for t in driver.tags if t not in tags)
    return tags


class JobRunner:
    """The service's jobs of every kind: started, tracked for ``status``, resumed after
    restarts, each kind through its driver.

    Parameters
    ----------
    config
        This party's configuration (its ``[accept]`` policy applies to what guests ask).
    channel
        The service's channel.
    executor
        Worker processes for the Paillier work on the critical path.
    """

    def __init__(self, *, config: PartyConfig, channel: Channel, executor: Executor) -> None:
        self.config = config
        self.audit = AuditLog(config.state_dir / AUDIT_FILE, party=config.party.party_id)
        self.ctx = ServiceContext(
            config=config, channel=channel, executor=executor, audit=self.audit
        )
        self._lock = threading.Lock()
        self._guest_jobs: dict[str, GuestJob] = {}
        self._released: set[str] = set()  # jobs released from their hold (testing)
        role = config.party.role
        self.watch: ArbiterWatch | None = None
        if role is Role.ARBITER:  # with its [accept] policy and audit records
            self.watch = ArbiterWatch(config=config, audit=self.audit, status=self.ctx.update)
            service = serve_arbiter(config, channel, executor, watch=self.watch)
            service.on_closed(lambda job_id: self.ctx.update(job_id, state="done", phase="done"))
            self.ctx.arbiter = service
        self.drivers = {kind: driver(self.ctx) for kind, driver in DRIVERS.items()}
        for each in self.drivers.values():
            each.serve()
        if role is Role.GUEST:
            channel.add_handler(MessageFilter.for_tags(RUN_STOPPED), self._on_run_stopped)
        else:
            channel.add_handler(MessageFilter.for_tags(JOB_FAILED), self._on_job_failed)

    def commands(self) -> dict[AdminCommand, AdminHandler]:
        """The admin commands of jobs: ``train``, ``cancel``, ``release`` and the drivers'."""
        out: dict[AdminCommand, AdminHandler] = {
            AdminCommand.TRAIN: self.submit,
            AdminCommand.CANCEL: lambda data: self.cancel(
                JobIdRequest.from_json(data, command=AdminCommand.CANCEL).job_id
            ),
            AdminCommand.RELEASE: lambda data: self.release(
                JobIdRequest.from_json(data, command=AdminCommand.RELEASE).job_id
            ),
        }
        for each in self.drivers.values():
            out.update(each.commands())
        return out

    def start(self) -> None:
        """Once the service listens: resubmit G's unfinished jobs, let the drivers send their
        notices (H's restart notices), A's restart notices, the space probe and A's
        periodic count records (lifecycle steps 1, 3 and 7)."""
        if self.config.party.role is Role.GUEST:
            self._resume_unfinished()
        for each in self.drivers.values():
            each.start()
        if self.watch is not None:
            threading.Thread(
                target=notify_restart,
                args=(self.ctx, self.watch),
                name="notice-arbiter",
                daemon=True,
            ).start()
        threading.Thread(target=self._watch_space, name="space-probe", daemon=True).start()
        if self.watch is not None:
            self.watch.start()

    def close(self) -> None:
        """Stop every run (lifecycle step 5), record the arbiter's counts, stop workers."""
        self.ctx.stopping.set()
        with self._lock:
            guest_jobs = list(self._guest_jobs.values())
        for entry in guest_jobs:
            entry.stop()
            entry.wake.set()
        for each in self.drivers.values():
            each.close()
        give_up = time.monotonic() + STOP_WAIT_S
        for entry in guest_jobs:
            if entry.running:
                entry.thread.join(max(0.0, give_up - time.monotonic()))
        if self.watch is not None:
            self.watch.close()
        self.audit.close()
        self.ctx.close()

    def status(self) -> dict[str, Any]:
        """Progress of every job this service ran since it started."""
        out: dict[str, Any] = self.ctx.states()
        for each in self.drivers.values():
            out.update(each.status())
        return out

    # -- the space probe (lifecycle step 7) ----------------------------------------------

    def _watch_space(self) -> None:
        """Every ``SPACE_PROBE_S`` while runs are going, check that the state folder still
        takes a write; if it is full, stop those runs with the error naming it. A full
        folder also fails the transport's replay journal, so nothing reaches this party any
        more: without the probe its runs would only end with their receive timeouts. The
        arbiter, which runs no sessions, checks while it has jobs registered, says so in its
        log and tells the guests of its open jobs."""
        full = False
        while not self.ctx.stopping.wait(SPACE_PROBE_S):
            with self._lock:
                entries = [e for e in self._guest_jobs.values() if e.session and e.running]
            runs = sum(each.peer_runs() for each in self.drivers.values())
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
                logger.error("%s; stopping %d run(s)", error, len(entries) + runs)
                if self.watch is not None and serving:
                    tell_guests_full(self.ctx, self.watch)
            full = True
            for entry in entries:
                entry.stop(error)
            for each in self.drivers.values():
                each.out_of_space(error)

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

    # -- guest: submission, resubmission, release, cancel ---------------------------------

    def _parse_job(self, source: str) -> Callable[[dict[str, Any], bool], TypedJob[Any]]:
        """The driver table's parser for this party, checking the job's own data alias."""

        def parse(raw: dict[str, Any], allow_plaintext: bool) -> TypedJob[Any]:
            job = parse_job(
                raw,
                source=source,
                party_id=self.config.party.party_id,
                allow_plaintext=allow_plaintext,
            )
            if job.guest_data not in self.config.data:
                known = ", ".join(sorted(self.config.data)) or "none"
                raise ConfigError(f"no data alias {job.guest_data!r} here (aliases: {known})")
            return job

        return parse

    def _driver(self, kind: JobKind) -> JobDriver[Any]:
        driver = self.drivers[JobType(kind.value)]
        if not isinstance(driver, JobDriver):  # pragma: no cover - the table pairs them
            raise ConfigError(f"{kind.value} is not a kind of job to submit")
        return driver

    def submit(self, data: dict[str, Any]) -> dict[str, Any]:
        """Admin ``train``: parse the job once, keep the request, run it in the background."""
        if self.config.party.role is not Role.GUEST:
            raise ConfigError("only the guest (label holder) submits training jobs")
        request = TrainRequest.from_json(data, parse_job=self._parse_job("train request"))
        job = request.job
        if request.hold_at_step is not None and not self.config.allow_hold:
            raise ConfigError("hold_at_step needs [testing] allow_hold = true (tests only)")
        if not self.ctx.begin(job.job_id, state="running", phase="starting", started=time.time()):
            raise ConfigError(f"job {job.job_id} is already running")
        text = canonical_json(request.to_json())
        try:  # kept before it runs: a restarted service resubmits it (lifecycle step 1)
            folder = self.ctx.job_dir(job.job_id)
            atomic_write(folder / REQUEST_FILE, text.encode(), mode=0o600)
            (folder / OUTCOME_FILE).unlink(missing_ok=True)
        except OSError as exc:
            self.ctx.update(job.job_id, state="failed", phase="failed", error=str(exc)[:300])
            raise DataError(
                f"cannot keep job {job.job_id} in {self.config.state_dir}: {exc}; check the "
                "state folder's space and permissions"
            ) from None
        driver = self._driver(job.kind)
        self.audit.record(
            event=AuditEvent.JOB_SUBMITTED,
            job_id=job.job_id,
            submitter=self.config.party.party_id,  # its own operator (admin certificate)
            config_sha256=config_digest(request.to_json()),
            input_sha256=file_digest(self.config.data[job.guest_data]),
            **driver.audit_fields(job.file),
        )
        self._launch(request)
        return {"job_id": job.job_id, "state": "running"}

    def _launch(self, request: TrainRequest) -> None:
        with self._lock:
            entry = GuestJob(
                ctx=self.ctx,
                driver=self._driver(request.job.kind),
                request=request,
                released=request.job.job_id in self._released,
            )
            self._guest_jobs[entry.job_id] = entry
        entry.thread.start()

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

    def _resume_unfinished(self) -> None:
        """Lifecycle step 1: resubmit every job with a request and no outcome."""
        for job_id, path in self._stored_jobs(REQUEST_FILE):
            if (path.parent / OUTCOME_FILE).is_file():
                continue
            try:
                request = TrainRequest.from_json(
                    json.loads(path.read_text()), parse_job=self._parse_job(str(path))
                )
            except (OSError, ValueError, VflError) as exc:
                logger.error("job %s cannot be resumed: %s", job_id, exc)
                error = f"cannot be resumed: {exc}"[:500]
                self.audit.record(event=AuditEvent.JOB_FAILED, job_id=job_id, reason=error)
                finish(self.ctx, job_id, state="failed", error=error)
                continue
            logger.info("resuming job %s (unfinished when the service stopped)", job_id)
            self.ctx.update(job_id, state="running", phase="resuming", started=time.time())
            self._launch(request)

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

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Admin ``cancel``: stop the job's current run and fail the job for good, as if its
        run had failed (lifecycle step 6: ``JOB_FAILED`` to H and A); waits up to
        ``STOP_WAIT_S`` for the run to end and returns the job's state then."""
        if self.config.party.role is not Role.GUEST:
            raise ConfigError("only the guest cancels a job (the party that submitted it)")
        with self._lock:
            entry = self._guest_jobs.get(job_id)

        def announce() -> None:
            logger.warning("job %s: %s", job_id, CANCELLED)
            self.audit.record(
                event=AuditEvent.JOB_CANCELLED, job_id=job_id, submitter=self.config.party.party_id
            )

        if entry is None or not entry.cancel(announce=announce):
            raise ConfigError(f"job {job_id} is not running here")
        entry.thread.join(STOP_WAIT_S)
        return {"job_id": job_id, "state": self.ctx.state(job_id).get("state")}

    # -- notices (R1 at G, R3 at H and A) ------------------------------------------------

    def _on_run_stopped(self, envelope: Envelope) -> None:
        """R1 at G: H says a run ended early; stop it now if it is the current one. Also
        A's ``RUN_STOPPED``: ``restarted`` stops the current run (a new one starts at once),
        ``no_space`` (its state folder is full) stops it and waits for space (step 7)."""
        host = self.config.peer_with_role(Role.HOST)
        arbiter = self.config.peer_with_role(Role.ARBITER)
        body = notice_body(envelope)
        if body is None or envelope.sender not in (host, arbiter):
            logger.warning("ignored a RUN_STOPPED from %s", envelope.sender)
            return
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

    def _on_job_failed(self, envelope: Envelope) -> None:
        """R3 at H and A: the job's guest says the job failed for good. H stops its run of
        it; both record it ``failed`` with the guest's (peer-safe) reason. Only the guest of
        a job shown ``running`` here can do so."""
        job_id, sender = envelope.job_id, envelope.sender.party_id
        body = notice_body(envelope) or {}
        reason = f"{sender} failed: {str(body.get('reason') or 'no reason given')[:300]}"
        state = self.ctx.state(job_id)
        guest, driver = self._owner(job_id)
        if state.get("state") != "running" or guest != sender:
            logger.info(
                "ignored JOB_FAILED for job %s from %s (not its running guest here)", job_id, sender
            )
            return
        logger.warning("job %s: %s", job_id, reason)
        self.ctx.mark_guest_failed(job_id, reason)
        self.audit.record(
            event=AuditEvent.JOB_FAILED, job_id=job_id, submitter=sender, reason=reason
        )
        if driver is not None:  # its own records first (host_run.json), then the status
            driver.guest_failed(job_id)
        self.ctx.update(job_id, state="failed", phase="failed", error=reason)

    def _owner(self, job_id: str) -> tuple[str | None, Driver | None]:
        """Whose job ``job_id`` is here, and the driver of its kind (docs/protocol.md
        §4.4.1): at H the guest and kind that first started it (:mod:`vfl.service.owners`),
        at A the guest it is registered to (P1; A runs no session to stop)."""
        if self.watch is not None:
            return self.watch.guest_of(job_id), None
        try:
            owner = self.ctx.owners.owner(job_id)
        except VflError as exc:  # an unreadable record: nobody's notice is taken
            logger.warning("job %s: %s", job_id, exc)
            return None, None
        return (None, None) if owner is None else (owner.guest, self.drivers[owner.kind])
