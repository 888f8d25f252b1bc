"""Horizontal (FedAvg) jobs inside the party services (:mod:`vfl.fedavg.protocol`).

Roles: the guest's service coordinates a job its operator submits (``vfl run`` of a job
with ``type = "horizontal"``): F1 to every other client, then its own client session. A
host's service answers ``START`` under its ``[accept]`` policy and runs its client session.
The arbiter's service aggregates (:class:`FedAggregator`) under its own policy. Retries,
outcome files and audit records are the job runner's (:mod:`vfl.service.jobs`): an aborted
round ends the run, and the coordinator starts a new one or stops as the job says.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocols.envelope import ControlBlock, Envelope
from protocols.errors import ConfigError, JobRefusedError, ProtocolError, VflError, peer_reason
from protocols.roles import Party, Role
from protocols.transport.base import MessageFilter
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.fedavg.aggregator import FedAggregator
from vfl.fedavg.client import FedClient
from vfl.fedavg.protocol import FedJob, FedResult, FedTag
from vfl.service.accept import check_fed_job, check_fed_start
from vfl.service.audit import AuditEvent, file_digest

if TYPE_CHECKING:
    from vfl.service.jobs import JobRunner, _GuestJob

logger = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 120.0


class FedJobs:
    """The FedAvg part of a party's :class:`JobRunner`."""

    def __init__(self, *, runner: JobRunner) -> None:
        self.runner = runner
        self.config = runner.config
        self.channel = runner.channel
        self.aggregator: FedAggregator | None = None
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[FedClient, threading.Event]] = {}  # host's runs

    # -- all clients --------------------------------------------------------------------

    def _table(self, job: FedJob) -> PartyTable:
        alias = job.data_alias(self.config.party.party_id)
        if alias not in self.config.data:
            known = ", ".join(sorted(self.config.data)) or "none"
            raise ConfigError(
                f"{self.config.party.party_id} has no data alias {alias!r} (aliases: {known})"
            )
        return load_table(
            TableSpec(
                path=self.config.data[alias],
                id_column=job.id_column,
                label_column=job.label_column,
                impute=job.impute,
            )
        )

    def _certificates(self, job: FedJob) -> dict[str, bytes]:
        """The pinned certificate of every other client (F3 verifies their keys with them)."""
        out = {}
        for party_id in job.client_ids:
            if party_id == self.config.party.party_id:
                continue
            peer = self.config.peer(party_id)
            pem = peer.address_entry().certificate_pem
            if pem is None:
                raise ConfigError(
                    f"{self.config.source}: [[peers]] {party_id} has no pinned certificate; "
                    "a FedAvg client verifies every other client's key with it: add "
                    f'certificate = "<path to {party_id}.pem>"'
                )
            out[party_id] = pem
        return out

    def _client(self, job: FedJob, run_id: str, table: PartyTable) -> FedClient:
        runner = self.runner
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
            runner._update(job_id, **fields)

        return FedClient(
            channel=self.channel,
            job=job,
            run_id=run_id,
            arbiter=self.config.peer_with_role(Role.ARBITER),
            table=table,
            signing_key_pem=self.config.tls.load().key_pem,
            certificates=self._certificates(job),
            state_dir=self.config.state_dir,
            seed=self.config.seed,
            progress=progress,
        )

    # -- coordinator (guest) --------------------------------------------------------------

    def coordinate(self, entry: _GuestJob, job: FedJob) -> FedResult:
        """One run: F1 to every other client, then this client's session."""
        runner = self.runner
        run_id = uuid.uuid4().hex[:16]
        me = self.config.party.party_id
        others = [self.config.peer(c).party for c in job.client_ids if c != me]
        table = self._table(job)
        self._certificates(job)  # fails before anyone is asked if a certificate is missing
        runner._update(job.job_id, phase="starting", rounds=job.rounds)
        self.channel.fresh_stream(job.job_id, others)
        for party in others:  # F1
            self.channel.send(
                Envelope(
                    job_id=job.job_id,
                    run_id=run_id,
                    sender=self.channel.me,
                    receiver=party,
                    tag=FedTag.START,
                    step=0,
                    body=ControlBlock.from_obj({"job": job.to_json()}),
                )
            )
        client = self._client(job, run_id, table)
        with runner._lock:
            entry.session = client
        try:
            for party in others:
                reply = self.channel.recv(
                    job_id=job.job_id,
                    run_id=run_id,
                    sender=party,
                    tag=FedTag.ACCEPT,
                    step=0,
                    timeout=ACCEPT_TIMEOUT_S,
                )
                body = reply.body.obj() if isinstance(reply.body, ControlBlock) else {}
                if not body.get("ok"):
                    raise JobRefusedError(
                        f"{party.party_id} refused job {job.job_id}: "
                        f"{str(body.get('reason', 'no reason given'))[:400]}"
                    )
            runner._update(job.job_id, phase="training")
            return client.run()
        finally:
            self.channel.abort_run(job.job_id, run_id)

    # -- other clients (hosts) ------------------------------------------------------------

    def serve_client(self) -> None:
        """Answer coordinators' ``START`` (hosts)."""
        self.channel.add_handler(MessageFilter.for_tags(FedTag.START), self._on_start)

    def _reply(self, envelope: Envelope, body: dict[str, Any]) -> None:
        self.channel.fresh_stream(envelope.job_id, (envelope.sender,))
        self.channel.send(
            Envelope(
                job_id=envelope.job_id,
                run_id=envelope.run_id,
                sender=self.channel.me,
                receiver=envelope.sender,
                tag=FedTag.ACCEPT,
                step=0,
                body=ControlBlock.from_obj(body),
            )
        )

    def _on_start(self, envelope: Envelope) -> None:
        """F1 at a client: check, reply, stop an older run of the job, run this one."""
        runner = self.runner
        job_id = envelope.job_id
        sender = envelope.sender
        if runner._stopping.is_set():
            return
        try:
            if not isinstance(envelope.body, ControlBlock):
                raise ProtocolError("START must carry the job as JSON")
            job = FedJob.from_json(envelope.body.obj()["job"])
            if job.job_id != job_id:
                raise ProtocolError(
                    "START names another job than its envelope",
                    public="START names another job than its envelope",
                )
            check_fed_start(self.config, job, sender=sender.party_id)
            table = self._table(job)
            check_fed_start(self.config, job, sender=sender.party_id, features=len(table.columns))
            client = self._client(job, envelope.run_id, table)
        except (VflError, KeyError, TypeError, ValueError) as exc:
            reason = str(exc)
            if not isinstance(exc, JobRefusedError):
                reason = f"{type(exc).__name__}: {exc}"
            logger.warning("refused FedAvg job %s from %s: %s", job_id, sender, reason)
            runner.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=sender.party_id,
                reason=reason[:500],
            )
            runner._update(job_id, state="refused", phase="refused", error=reason[:500])
            public = peer_reason(exc) if isinstance(exc, VflError) else "malformed START"
            self._reply(envelope, {"ok": False, "reason": public})  # details: this log only
            return
        done = threading.Event()
        with runner._job_lock(job_id):
            with self._lock:
                old = self._clients.get(job_id)
                self._clients[job_id] = (client, done)
            if old is not None and not old[1].is_set():
                logger.info("job %s: run %s replaces an older run", job_id, envelope.run_id)
                old[0].stop()
                old[1].wait(30.0)
        alias = job.data_alias(self.config.party.party_id)
        runner.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=job_id,
            submitter=sender.party_id,
            config_sha256=job.digest(),
            input_sha256=file_digest(Path(self.config.data[alias])),
            run_id=envelope.run_id,
        )
        runner._update(job_id, state="running", phase="training", started=time.time())
        try:
            self._reply(envelope, {"ok": True})
            result = client.run()
        except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
            runner.host_run_failed(
                job_id, submitter=sender.party_id, exc=exc, stopped=client.stopped, what="FedAvg"
            )
        else:
            runner.audit.record(
                event=AuditEvent.JOB_FINISHED, job_id=job_id, submitter=sender.party_id
            )
            last = result.history[-1] if result.history else {}
            runner._update(
                job_id,
                state="done",
                phase="done",
                validation=last.get("validation"),
                model=result.model_dir,
            )
        finally:
            done.set()
            self.channel.abort_run(job_id, envelope.run_id)

    # -- aggregator (arbiter) -------------------------------------------------------------

    def serve_aggregator(self) -> None:
        """Aggregate FedAvg runs under this party's ``[accept]`` policy (arbiter)."""
        runner = self.runner

        def admit(job: FedJob, coordinator: Party) -> None:
            check_fed_job(self.config, job, coordinator)

        def notify(job_id: str, event: str, fields: dict[str, Any]) -> None:
            if event == "accepted":
                runner.audit.record(
                    event=AuditEvent.JOB_ACCEPTED, job_id=job_id, run_id=fields.get("run_id")
                )
            elif event == "refused":
                runner.audit.record(
                    event=AuditEvent.JOB_REFUSED, job_id=job_id, reason=fields.get("reason")
                )
            elif event == "aborted":
                runner.audit.record(
                    event=AuditEvent.JOB_FAILED, job_id=job_id, reason=fields.get("reason")
                )
            elif event == "done":
                runner.audit.record(event=AuditEvent.JOB_FINISHED, job_id=job_id)

        self.aggregator = FedAggregator(channel=self.channel, admit=admit, notify=notify)

    def aggregator_status(self) -> dict[str, dict[str, Any]]:
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
