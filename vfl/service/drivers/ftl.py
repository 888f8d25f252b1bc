"""Transfer (FTL) jobs in the party services (docs/protocol.md §6; :mod:`vfl.transfer.session`).

Roles: the guest's service runs a job its operator submits (a job file with
``type = "transfer"``): PSI first unless the job names one, then the guest session over
all its labelled rows. The host's service answers ``START`` for one of its own data
aliases and the PSI result it holds, under its ``[accept]`` policy (a refusal is
``ACCEPT{ok: false, reason}`` with the rule only, §1.7), and, when it owns the scores (the
default), writes ``jobs/<id>/scores.csv`` for its customers outside the overlap. A
``START`` for a job id that belongs to another guest or another kind of job
(:mod:`vfl.service.owners`) is refused first, without touching that job's run, checkpoints
or status; one whose job id differs from its envelope's, or that names a PSI job that is
not an identifier, is refused (and audited) before its data or any job folder is touched
(docs/protocol.md §2.9, §4.4.1). Every file a job leaves (result, report, scores) is 0600 in 0700
folders. The arbiter decrypts under the job's FTL policy (:mod:`vfl.service.arbiter`).
Retries, outcomes and audit records are the runner's (:mod:`vfl.service.runner`).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    JobIdInUseError,
    JobRefusedError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.files import atomic_write
from protocols.ids import check_identifier
from protocols.link import JobLink
from protocols.roles import Role
from protocols.transport.base import MessageFilter
from psi.result import read_result
from vfl.common.jobfile import JobKind, TypedJob, canonical_json
from vfl.config import JobType
from vfl.data.checks import checked_data
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.report import write_report
from vfl.service.accept import check_ftl_start, host_id_column
from vfl.service.audit import AuditEvent, file_digest
from vfl.service.driver import DATA_CHECK_FILE, GuestAttempt, JobDriver, ServiceContext
from vfl.transfer.guest import FtlGuest
from vfl.transfer.host import FtlHost
from vfl.transfer.jobfile import FtlJobFile, parse_ftl_job
from vfl.transfer.session import FtlJob, FtlResult, FtlTag

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.csv"
RESULT_FILE = "result.json"


class FtlDriver(JobDriver[FtlJobFile]):
    """Transfer jobs: the guest's runs, the host's answers to ``START``."""

    kind: ClassVar[JobType] = JobType.TRANSFER
    tags = (FtlTag,)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[FtlHost, threading.Event]] = {}

    @classmethod
    def parse(
        cls, raw: dict[str, Any], *, source: str, party_id: str, allow_plaintext: bool
    ) -> TypedJob[FtlJobFile]:
        """A transfer job file (:func:`vfl.transfer.jobfile.parse_ftl_job`)."""
        job = parse_ftl_job(raw, source=source)
        return TypedJob(
            kind=JobKind.TRANSFER,
            file=job,
            job_id=job.job.job_id,
            guest_data=job.guest_data,
            canonical=canonical_json(job.to_json()),
        )

    def serve(self) -> None:
        """Hosts answer guests' ``START``."""
        if self.ctx.config.party.role is Role.HOST:
            self.ctx.channel.add_handler(MessageFilter.for_tags(FtlTag.START), self._on_start)

    def _table(
        self, alias: str, *, id_column: str, labels: str | None, job_id: str
    ) -> tuple[PartyTable, np.ndarray]:
        """This party's rows with an id, after its data checks (docs/protocol.md §4.4.3; the
        report in its own job folder), and each such row's line in the file (the PSI's rows
        index the file, :meth:`_overlap` maps them). FTL takes numeric columns only: the
        party's ``[features.<alias>]`` may choose them, not encode categories or dates."""
        config = self.ctx.config
        if alias not in config.data:
            known = ", ".join(sorted(config.data)) or "none"
            raise JobRefusedError(
                f"no data alias {alias!r} here (aliases: {known})",
                public=f"no data alias {alias!r} here",
            )
        features = config.features.get(alias, FeatureSpec())
        if features.categorical or features.date_columns:
            raise ConfigError(
                f"[features.{alias}] encodes categorical or date columns, which transfer jobs "
                "do not: exclude them for this alias, or use a split-NN job",
                public="this party's features for the alias do not suit a transfer job",
            )
        spec = TableSpec(
            path=config.data[alias],
            id_column=id_column,
            label_column=labels,
            features=features,
            binary_labels=labels is not None,
        )
        checked_data(
            spec,
            warn_binary=labels is None,
            report=self.ctx.job_dir(job_id) / DATA_CHECK_FILE,
            duplicates=config.psi.for_alias(alias).duplicates,
        )
        table = load_table(spec)
        usable = table.id_rows()
        return table.take(usable), usable

    def _overlap(
        self, psi_job: str, usable: np.ndarray, *, alias: str = "", guest: str = ""
    ) -> np.ndarray:
        """The PSI's rows as positions among this party's rows with an id (``usable``)."""
        summary, rows = read_result(self.ctx.config.state_dir, psi_job)
        if guest:  # at H: a PSI it ran with this guest on this alias (docs/protocol.md §3.4.1)
            for key, wanted in (("data", alias), ("peer", guest)):
                if key in summary and summary[key] != wanted:
                    public = f"PSI {psi_job} aligned other data or another guest here"
                    raise JobRefusedError(f"{public} ({key} {summary[key]!r})", public=public)
        if rows is None:
            raise JobRefusedError(f"PSI {psi_job} kept no rows here (cardinality mode?)")
        lines = np.asarray(rows, dtype=np.int64)
        positions = np.searchsorted(usable, lines)
        if len(lines) and (positions.max() >= len(usable) or (usable[positions] != lines).any()):
            raise JobRefusedError(
                f"PSI {psi_job} names rows without an id here: the data changed since",
                public=f"PSI {psi_job} does not match this party's data any more",
            )
        return positions

    # -- guest ----------------------------------------------------------------------------

    def attempt(self, attempt: GuestAttempt[FtlJobFile]) -> dict[str, Any]:
        """One run: PSI if needed, then the guest session; writes ``result.json``."""
        ctx, job_file = self.ctx, attempt.job.file
        job = job_file.job
        psi_job = ctx.ensure_psi(
            job_id=job.job_id,
            psi_job=job_file.psi_job,
            guest_data=job_file.guest_data,
            host_data=job_file.host_data,
            id_column=job_file.id_column,
            id_type=job_file.id_type,
        )
        table, usable = self._table(
            job_file.guest_data,
            id_column=job_file.id_column,
            labels=job_file.label_column,
            job_id=job.job_id,
        )
        if table.labels is None:
            raise ProtocolError(f"data {job_file.guest_data!r} has no label column")
        overlap = self._overlap(psi_job, usable)
        ctx.update(job.job_id, phase="training", rows=len(table), overlap=len(overlap))

        def progress(record: dict[str, Any]) -> None:
            ctx.update(
                job.job_id,
                epoch=int(record["epoch"]),
                epochs=job.epochs,
                step=int(record["epoch"]),
                total_steps=job.epochs,
                loss=round(record["loss"], 6),
                validation={k[4:]: round(v, 5) for k, v in record.items() if k.startswith("val_")},
            )

        session = FtlGuest(
            channel=ctx.channel,
            host=ctx.peer(Role.HOST),
            arbiter=ctx.peer(Role.ARBITER),
            job=job,
            features=table.features,
            labels=table.labels,
            overlap=overlap,
            executor=ctx.executor,
            allow_test_key=ctx.config.allow_test_key,
            seed=ctx.party_seed("ftl", scope=job.job_id),
            progress=progress,
            state_dir=ctx.config.state_dir,
            host_request={"data": job_file.host_data, "psi_job": psi_job},
        )
        attempt.started(session)
        try:
            result = session.run(score_outside=job_file.score)
        finally:
            ctx.channel.abort_run(job.job_id, session.run_id)
        self._keep(job, result)
        last = result.history[result.best_epoch - 1] if result.history else {}
        return {
            "best_epoch": result.best_epoch,
            "validation": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
        }

    def _keep(self, job: FtlJob, result: FtlResult) -> None:
        """G's ``result.json``, report (held-out overlap pairs) and, if it owns them, scores."""
        body = {
            "job_id": job.job_id,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "history": list(result.history),
            "scored_here": None if result.scores is None else len(result.scores),
        }
        folder = self.ctx.job_dir(job.job_id)
        atomic_write(folder / RESULT_FILE, json.dumps(body).encode(), mode=0o600)
        labels, scores = result.validation
        if len(set(labels)) == 2:  # report.json, roc.png (held-out overlap pairs), loss.png
            history = [
                {"epoch": h["epoch"] - 1, "train_loss": h["loss"]}
                | {k: v for k, v in h.items() if k.startswith("val_")}
                for h in result.history
            ]
            write_report(
                folder / "report",
                summary={"job_id": job.job_id, "best_epoch": result.best_epoch - 1},
                test_labels=np.asarray(labels),
                test_scores=np.asarray(scores),
                history=history,
            )
        if result.scores is not None:  # G owns the scores: positions only, no host ids
            frame = pd.DataFrame(
                {"position": np.arange(len(result.scores)), "score": result.scores}
            )
            atomic_write(folder / SCORES_FILE, frame.to_csv(index=False).encode(), mode=0o600)

    # -- host -----------------------------------------------------------------------------

    def _refuse(self, envelope: Envelope, reason: str) -> None:
        self.ctx.channel.fresh_stream(envelope.job_id, (envelope.sender,))
        JobLink.answering(self.ctx.channel, envelope).reply(
            envelope, FtlTag.ACCEPT, {"ok": False, "reason": reason[:500]}, step=0
        )

    def _on_start(self, envelope: Envelope) -> None:
        """R1 at H: check, stop an older run of the job, follow this one, keep the scores."""
        ctx = self.ctx
        job_id, sender = envelope.job_id, envelope.sender
        if ctx.stopping.is_set():
            return
        try:  # whose job the id is, before anything else (docs/protocol.md §4.4.1)
            ctx.claim(job_id, guest=sender.party_id, kind=self.kind, record=False)
            if not isinstance(envelope.body, ControlBlock):
                raise ProtocolError("START must carry the job as JSON")
            body = envelope.body.obj()
            job = FtlJob.from_json(body["job"])
            if job.job_id != job_id:
                raise ProtocolError(
                    "START names another job than its envelope",
                    public="START names another job than its envelope",
                )
            request = dict(body.get("request", {}))
            psi_job = check_identifier(request.get("psi_job"), what="START psi_job")
            ctx.claim(job_id, guest=sender.party_id, kind=self.kind)  # if the id is free
            alias = str(request.get("data", ""))
            check_ftl_start(ctx.config, job, sender=sender.party_id, alias=alias)
            column = host_id_column(ctx.config, request)  # its own [psi] policy's column
            table, usable = self._table(alias, id_column=column, labels=None, job_id=job_id)
            check_ftl_start(
                ctx.config, job, sender=sender.party_id, alias=alias, features=len(table.columns)
            )
            overlap = self._overlap(psi_job, usable, alias=alias, guest=sender.party_id)
        except JobIdInUseError as exc:  # another's job: its run and status are left alone
            self._refuse(envelope, peer_reason(exc))  # logged and audited by the claim
            return
        except (VflError, KeyError, TypeError, ValueError) as exc:
            reason = (
                str(exc) if isinstance(exc, JobRefusedError) else f"{type(exc).__name__}: {exc}"
            )
            public = peer_reason(exc) if isinstance(exc, VflError) else "malformed START"
            logger.warning("refused FTL job %s from %s: %s", job_id, sender, reason)
            ctx.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=sender.party_id,
                reason=reason,
            )
            ctx.refused(job_id, reason)  # a run of it still going stays shown
            self._refuse(envelope, public)  # the rule only; the details stay in H's log
            return
        host = FtlHost(
            channel=ctx.channel,
            guest=sender,
            arbiter=ctx.peer(Role.ARBITER),
            features=table.features,
            overlap=overlap,
            executor=ctx.executor,
            allow_test_key=ctx.config.allow_test_key,
            seed=ctx.party_seed("ftl", scope=job.job_id),
            state_dir=ctx.config.state_dir,
        )
        done = threading.Event()
        with ctx.job_lock(job_id):
            with self._lock:
                old = self._hosts.get(job_id)
                self._hosts[job_id] = (host, done)
            ctx.new_peer_run(job_id)  # a new run of the job
            if old is not None and not old[1].is_set():
                old[0].stop()
                old[1].wait(30.0)
        ctx.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=job_id,
            submitter=sender.party_id,
            input_sha256=file_digest(ctx.config.data[alias]),
            run_id=envelope.run_id,
        )
        ctx.update(job_id, state="running", phase="training", started=time.time())
        try:
            host.run(envelope)
        except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
            ctx.peer_run_failed(
                job_id, submitter=sender.party_id, exc=exc, stopped=host.stopped, what="FTL"
            )
        else:
            fields: dict[str, Any] = {}
            if host.scores:  # H owns the scores: its own ids, kept owner-only
                scores = np.concatenate(host.scores)
                ids = table.ids[host.outside[: len(scores)]]
                frame = pd.DataFrame(
                    {"id": ids, "score": scores, "probability": 1.0 / (1.0 + np.exp(-scores))}
                )
                buffer = io.StringIO()
                frame.to_csv(buffer, index=False)
                path = ctx.job_dir(job_id) / SCORES_FILE
                atomic_write(path, buffer.getvalue().encode(), mode=0o600)
                fields = {"scores": str(path), "scored": len(scores)}
            ctx.audit.record(
                event=AuditEvent.JOB_FINISHED, job_id=job_id, submitter=sender.party_id
            )
            ctx.update(job_id, state="done", phase="done", **fields)
        finally:
            done.set()
            ctx.channel.abort_run(job_id, envelope.run_id)

    # -- the runner's hooks ----------------------------------------------------------------

    def guest_failed(self, job_id: str) -> None:
        """Stop this host's run of ``job_id`` if it still runs (R3: its guest failed)."""
        with self._lock:
            entry = self._hosts.get(job_id)
        if entry is not None and not entry[1].is_set():
            entry[0].stop()

    def close(self) -> None:
        """Stop every run this host follows (service stop)."""
        with self._lock:
            hosts = list(self._hosts.values())
        for host, done in hosts:
            if not done.is_set():
                host.stop()
        for _, done in hosts:
            done.wait(5.0)
