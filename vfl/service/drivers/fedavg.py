"""Horizontal (FedAvg) jobs in the party services (docs/protocol.md §7; :mod:`vfl.fedavg.protocol`).

Roles: the guest's service coordinates a job its operator submits (a job file with
``type = "horizontal"``): F1 ``START`` to every other client, then its own client session.
A host's service answers ``START`` under its ``[accept]`` policy (``ACCEPT{ok}`` or
``ACCEPT{ok: false, reason}`` with the rule only, §1.7) and runs its client session. The
arbiter's service aggregates (:class:`FedAggregator`) under its own policy. Retries,
outcome files and audit records are the runner's (:mod:`vfl.service.runner`): an aborted
round ends the run, and the coordinator starts a new one or stops as the job's
``on_dropout`` says; the aggregator tells the clients of a failed job itself (``ABORT``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    JobIdInUseError,
    JobRefusedError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.link import JobLink
from protocols.roles import Party, Role
from protocols.transport.base import MessageFilter
from vfl.common.jobfile import JobKind, TypedJob, canonical_json
from vfl.config import JobType
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.fedavg.aggregator import FedAggregator
from vfl.fedavg.client import FedClient
from vfl.fedavg.jobfile import FedJobFile, parse_fed_job, with_defaults
from vfl.fedavg.protocol import DropoutPolicy, FedJob, FedTag, RoundAbortedError
from vfl.service.accept import check_fed_job, check_fed_start
from vfl.service.audit import AuditEvent, file_digest
from vfl.service.driver import GuestAttempt, JobDriver, ServiceContext

logger = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 120.0


class FedAvgDriver(JobDriver[FedJobFile]):
    """FedAvg jobs: the coordinator's runs, the clients' answers, the aggregator."""

    kind: ClassVar[JobType] = JobType.HORIZONTAL
    tags = (FedTag,)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.aggregator: FedAggregator | None = None
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[FedClient, threading.Event]] = {}  # host's runs

    @classmethod
    def parse(
        cls, raw: dict[str, Any], *, source: str, party_id: str, allow_plaintext: bool
    ) -> TypedJob[FedJobFile]:
        """A horizontal job file (:func:`vfl.fedavg.jobfile.parse_fed_job`), with its id and
        initial-model seed drawn now if it names none (so a resubmission is the same job)."""
        job = FedJobFile(parse_fed_job(with_defaults(raw), source=source, coordinator=party_id))
        return TypedJob(
            kind=JobKind.HORIZONTAL,
            file=job,
            job_id=job.job.job_id,
            guest_data=job.guest_data,
            canonical=canonical_json(job.to_json()),
        )

    def serve(self) -> None:
        """Hosts answer coordinators' ``START``; the arbiter aggregates."""
        role = self.ctx.config.party.role
        if role is Role.HOST:
            self.ctx.channel.add_handler(MessageFilter.for_tags(FedTag.START), self._on_start)
        elif role is Role.ARBITER:
            self._serve_aggregator()

    def retry(self, job: FedJobFile, exc: BaseException) -> bool | None:
        """An aborted round: a new run only if the job says so (``on_dropout``)."""
        if isinstance(exc, RoundAbortedError):
            return job.job.on_dropout is DropoutPolicy.RETRY
        return None

    def failure_peers(self, job: FedJobFile) -> tuple[Party, ...]:
        """None: the aggregator tells the clients of a failed job itself (``ABORT``)."""
        return ()

    def audit_fields(self, job: FedJobFile) -> dict[str, Any]:
        """The job's clients."""
        return {"clients": list(job.job.client_ids)}

    # -- all clients --------------------------------------------------------------------

    def _table(self, job: FedJob) -> PartyTable:
        config = self.ctx.config
        alias = job.data_alias(config.party.party_id)
        if alias not in config.data:
            known = ", ".join(sorted(config.data)) or "none"
            raise ConfigError(
                f"{config.party.party_id} has no data alias {alias!r} (aliases: {known})"
            )
        return load_table(
            TableSpec(
                path=config.data[alias],
                id_column=job.id_column,
                label_column=job.label_column,
                features=FeatureSpec(impute=job.impute),
            )
        )

    def _certificates(self, job: FedJob) -> dict[str, bytes]:
        """The pinned certificate of every other client (F3 verifies their keys with them)."""
        config = self.ctx.config
        out = {}
        for party_id in job.client_ids:
            if party_id == config.party.party_id:
                continue
            pem = config.peer(party_id).address_entry().certificate_pem
            if pem is None:
                raise ConfigError(
                    f"{config.source}: [[peers]] {party_id} has no pinned certificate; "
                    "a FedAvg client verifies every other client's key with it: add "
                    f'certificate = "<path to {party_id}.pem>"'
                )
            out[party_id] = pem
        return out

    def _client(self, job: FedJob, run_id: str, table: PartyTable) -> FedClient:
        ctx = self.ctx
        job_id = job.job_id

        def progress(p: dict[str, Any]) -> None:
            fields: dict[str, Any] = {
                "epoch": p["round"],
                "epochs": p["rounds"],
                "step": p["round"],
                "total_steps": p["rounds"],
                "round": p["round"],
                "rounds": p["rounds"],
            }
            combined = p.get("combined")
            if combined:
                fields["validation"] = {
                    k: round(v, 5) for k, v in combined.get("validation", {}).items()
                }
            if p.get("epsilon") is not None:
                fields["epsilon"] = round(float(p["epsilon"]), 4)
            ctx.update(job_id, **fields)

        return FedClient(
            channel=ctx.channel,
            job=job,
            run_id=run_id,
            arbiter=ctx.peer(Role.ARBITER),
            table=table,
            signing_key_pem=ctx.config.tls.load().key_pem,
            certificates=self._certificates(job),
            state_dir=ctx.config.state_dir,
            seed=ctx.party_seed("fedavg", scope=job.job_id),
            progress=progress,
        )

    # -- coordinator (guest) --------------------------------------------------------------

    def attempt(self, attempt: GuestAttempt[FedJobFile]) -> dict[str, Any]:
        """One run: F1 to every other client, then this client's session."""
        ctx, job = self.ctx, attempt.job.file.job
        link = JobLink(
            channel=ctx.channel,
            job_id=job.job_id,
            run_id=uuid.uuid4().hex[:16],
            timeout=ACCEPT_TIMEOUT_S,
        )
        me = ctx.config.party.party_id
        others = [ctx.config.peer(c).party for c in job.client_ids if c != me]
        table = self._table(job)
        self._certificates(job)  # fails before anyone is asked if a certificate is missing
        ctx.update(job.job_id, phase="starting", rounds=job.rounds)
        ctx.channel.fresh_stream(job.job_id, others)
        for party in others:  # F1
            link.send(party, FedTag.START, 0, {"job": job.to_json()})
        client = self._client(job, link.run_id, table)
        attempt.started(client)
        try:
            for party in others:
                reply = link.recv(party, FedTag.ACCEPT, 0)
                body = reply.body.obj() if isinstance(reply.body, ControlBlock) else {}
                if not body.get("ok"):
                    raise JobRefusedError(
                        f"{party.party_id} refused job {job.job_id}: "
                        f"{str(body.get('reason', 'no reason given'))[:400]}"
                    )
            ctx.update(job.job_id, phase="training")
            result = client.run()
        finally:
            ctx.channel.abort_run(job.job_id, link.run_id)
        last = result.history[-1] if result.history else {}
        return {
            "rounds": result.rounds,
            "validation": last.get("validation"),
            "test": last.get("test"),
            "epsilon": result.epsilon,
            "model": result.model_dir,
        }

    # -- other clients (hosts) ------------------------------------------------------------

    def _answer(self, envelope: Envelope, body: dict[str, Any]) -> None:
        self.ctx.channel.fresh_stream(envelope.job_id, (envelope.sender,))
        JobLink.answering(self.ctx.channel, envelope).reply(envelope, FedTag.ACCEPT, body, step=0)

    def _on_start(self, envelope: Envelope) -> None:
        """F1 at a client: check, reply, stop an older run of the job, run this one."""
        ctx = self.ctx
        job_id, sender = envelope.job_id, envelope.sender
        if ctx.stopping.is_set():
            return
        try:  # whose job the id is, before anything else (docs/protocol.md §4.4.1)
            ctx.claim(job_id, guest=sender.party_id, kind=self.kind, record=False)
            if not isinstance(envelope.body, ControlBlock):
                raise ProtocolError("START must carry the job as JSON")
            job = FedJob.from_json(envelope.body.obj()["job"])
            if job.job_id != job_id:
                raise ProtocolError(
                    "START names another job than its envelope",
                    public="START names another job than its envelope",
                )
            ctx.claim(job_id, guest=sender.party_id, kind=self.kind)  # if the id is free
            check_fed_start(ctx.config, job, sender=sender.party_id)
            table = self._table(job)
            check_fed_start(ctx.config, job, sender=sender.party_id, features=len(table.columns))
            client = self._client(job, envelope.run_id, table)
        except JobIdInUseError as exc:  # another's job: its run and status are left alone
            self._answer(envelope, {"ok": False, "reason": peer_reason(exc)})  # audited
            return
        except (VflError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc)
            if not isinstance(exc, JobRefusedError):
                reason = f"{type(exc).__name__}: {exc}"
            logger.warning("refused FedAvg job %s from %s: %s", job_id, sender, reason)
            ctx.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=sender.party_id,
                reason=reason[:500],
            )
            ctx.refused(job_id, reason)  # a run of it still going stays shown
            public = peer_reason(exc) if isinstance(exc, VflError) else "malformed START"
            self._answer(envelope, {"ok": False, "reason": public})  # details: this log only
            return
        done = threading.Event()
        with ctx.job_lock(job_id):
            with self._lock:
                old = self._clients.get(job_id)
                self._clients[job_id] = (client, done)
            if old is not None and not old[1].is_set():
                logger.info("job %s: run %s replaces an older run", job_id, envelope.run_id)
                old[0].stop()
                old[1].wait(30.0)
        alias = job.data_alias(ctx.config.party.party_id)
        ctx.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=job_id,
            submitter=sender.party_id,
            config_sha256=job.digest(),
            input_sha256=file_digest(Path(ctx.config.data[alias])),
            run_id=envelope.run_id,
        )
        ctx.update(job_id, state="running", phase="training", started=time.time())
        try:
            self._answer(envelope, {"ok": True})
            result = client.run()
        except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
            ctx.peer_run_failed(
                job_id, submitter=sender.party_id, exc=exc, stopped=client.stopped, what="FedAvg"
            )
        else:
            ctx.audit.record(
                event=AuditEvent.JOB_FINISHED, job_id=job_id, submitter=sender.party_id
            )
            last = result.history[-1] if result.history else {}
            ctx.update(
                job_id,
                state="done",
                phase="done",
                validation=last.get("validation"),
                model=result.model_dir,
            )
        finally:
            done.set()
            ctx.channel.abort_run(job_id, envelope.run_id)

    # -- aggregator (arbiter) -------------------------------------------------------------

    def _serve_aggregator(self) -> None:
        """Aggregate FedAvg runs under this party's ``[accept]`` policy (arbiter)."""
        ctx = self.ctx

        def admit(job: FedJob, coordinator: Party) -> None:
            check_fed_job(ctx.config, job, coordinator)
            # the job id is its coordinator's (docs/protocol.md §4.4.1)
            ctx.claim(job.job_id, guest=coordinator.party_id, kind=self.kind)

        def notify(job_id: str, event: str, fields: dict[str, Any]) -> None:
            if event == "accepted":
                ctx.audit.record(
                    event=AuditEvent.JOB_ACCEPTED, job_id=job_id, run_id=fields.get("run_id")
                )
            elif event == "refused":
                ctx.audit.record(
                    event=AuditEvent.JOB_REFUSED, job_id=job_id, reason=fields.get("reason")
                )
            elif event == "aborted":
                ctx.audit.record(
                    event=AuditEvent.JOB_FAILED, job_id=job_id, reason=fields.get("reason")
                )
            elif event == "done":
                ctx.audit.record(event=AuditEvent.JOB_FINISHED, job_id=job_id)

        self.aggregator = FedAggregator(channel=ctx.channel, admit=admit, notify=notify)

    def guest_failed(self, job_id: str) -> None:
        """Stop this client's run of ``job_id`` if it still runs (R3: its coordinator
        failed; coordinators leave that to the aggregator's ``ABORT`` as a rule)."""
        with self._lock:
            entry = self._clients.get(job_id)
        if entry is not None and not entry[1].is_set():
            entry[0].stop()

    def status(self) -> dict[str, dict[str, Any]]:
        """The aggregator's jobs (arbiter), for ``vfl status``."""
        return {} if self.aggregator is None else self.aggregator.status()

    def close(self) -> None:
        """Stop every run (service stop)."""
        with self._lock:
            clients = list(self._clients.values())
        for client, done in clients:
            if not done.is_set():
                client.stop()
        if self.aggregator is not None:
            self.aggregator.close()
        for _, done in clients:
            done.wait(5.0)
