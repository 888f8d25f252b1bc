"""Transfer (FTL) jobs inside the party services (:mod:`vfl.transfer.session`).

Roles: the guest's service runs a job its operator submits (``vfl run`` of a job with
``type = "transfer"``): PSI first unless the job names one, then the guest session over
all its labelled rows. The host's service answers ``START`` for one of its own data
aliases and the PSI result it holds, under its ``[accept]`` policy, and, when it owns the
scores (the default), writes ``jobs/<id>/scores.csv`` for its customers outside the overlap.
A ``START`` whose job id differs from its envelope's, or that names a PSI job that is not an
identifier, is refused (and audited) before its data or any job folder is touched
(docs/protocol.md §2.9). Every file a job leaves (result, report, scores) is 0600 in 0700
folders.
The arbiter decrypts under the job's FTL policy (:class:`vfl.transfer.session.FtlSpec`).
Retries, outcomes and audit records are the job runner's (:mod:`vfl.service.jobs`).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from protocols.envelope import ControlBlock, Envelope
from protocols.errors import JobRefusedError, ProtocolError, VflError, peer_reason
from protocols.files import atomic_write
from protocols.ids import check_identifier
from protocols.roles import Role
from protocols.transport.base import MessageFilter
from psi.result import read_result
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.report import write_report
from vfl.service.accept import check_ftl_start, host_id_column
from vfl.service.audit import AuditEvent, file_digest
from vfl.transfer.guest import FtlGuest
from vfl.transfer.host import FtlHost
from vfl.transfer.jobfile import FtlJobFile
from vfl.transfer.session import FtlJob, FtlResult, FtlTag

if TYPE_CHECKING:
    from vfl.service.jobs import JobRunner, _GuestJob

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.csv"
RESULT_FILE = "result.json"


class FtlJobs:
    """The transfer-learning part of a party's :class:`JobRunner`."""

    def __init__(self, *, runner: JobRunner) -> None:
        self.runner = runner
        self.config = runner.config
        self.channel = runner.channel
        self._lock = threading.Lock()
        self._hosts: dict[str, tuple[FtlHost, threading.Event]] = {}

    def _table(self, alias: str, *, id_column: str, labels: str | None) -> PartyTable:
        if alias not in self.config.data:
            known = ", ".join(sorted(self.config.data)) or "none"
            raise JobRefusedError(
                f"no data alias {alias!r} here (aliases: {known})",
                public=f"no data alias {alias!r} here",
            )
        return load_table(
            TableSpec(path=self.config.data[alias], id_column=id_column, label_column=labels)
        )

    def _overlap(self, psi_job: str, *, alias: str = "", guest: str = "") -> np.ndarray:
        summary, rows = read_result(self.config.state_dir, psi_job)
        if guest:  # at H: a PSI it ran with this guest on this alias (docs/protocol.md §3.4.1)
            for key, wanted in (("data", alias), ("peer", guest)):
                if key in summary and summary[key] != wanted:
                    public = f"PSI {psi_job} aligned other data or another guest here"
                    raise JobRefusedError(f"{public} ({key} {summary[key]!r})", public=public)
        if rows is None:
            raise JobRefusedError(f"PSI {psi_job} kept no rows here (cardinality mode?)")
        return np.asarray(rows, dtype=np.int64)

    # -- guest ----------------------------------------------------------------------------

    def coordinate(self, entry: _GuestJob, job_file: FtlJobFile) -> FtlResult:
        """One run: PSI if needed, then the guest session; writes ``result.json``."""
        runner = self.runner
        job = job_file.job
        psi_job = runner.ensure_psi(job_file)
        table = self._table(
            job_file.guest_data, id_column=job_file.id_column, labels=job_file.label_column
        )
        if table.labels is None:
            raise ProtocolError(f"data {job_file.guest_data!r} has no label column")
        overlap = self._overlap(psi_job)
        runner._update(job.job_id, phase="training", rows=len(table), overlap=len(overlap))

        def progress(record: dict[str, Any]) -> None:
            runner._update(
                job.job_id,
                epoch=int(record["epoch"]),
                epochs=job.epochs,
                step=int(record["epoch"]),
                total_steps=job.epochs,
                loss=round(record["loss"], 6),
                validation={k[4:]: round(v, 5) for k, v in record.items() if k.startswith("val_")},
            )

        session = FtlGuest(
            channel=self.channel,
            host=self.config.peer_with_role(Role.HOST),
            arbiter=self.config.peer_with_role(Role.ARBITER),
            job=job,
            features=table.features,
            labels=table.labels,
            overlap=overlap,
            executor=runner.executor,
            allow_test_key=self.config.allow_test_key,
            seed=self.config.seed,
            progress=progress,
            state_dir=self.config.state_dir,
            host_request={"data": job_file.host_data, "psi_job": psi_job},
        )
        with runner._lock:
            entry.session = session
        try:
            result = session.run(score_outside=job_file.score)
        finally:
            self.channel.abort_run(job.job_id, session.run_id)
        body = {
            "job_id": job.job_id,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "history": list(result.history),
            "scored_here": None if result.scores is None else len(result.scores),
        }
        folder = runner._job_dir(job.job_id)
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
        return result

    # -- host -----------------------------------------------------------------------------

    def serve_host(self) -> None:
        """Answer guests' ``START`` (hosts)."""
        self.channel.add_handler(MessageFilter.for_tags(FtlTag.START), self._on_start)

    def _refuse(self, envelope: Envelope, reason: str) -> None:
        self.channel.fresh_stream(envelope.job_id, (envelope.sender,))
        self.channel.send(
            Envelope(
                job_id=envelope.job_id,
                run_id=envelope.run_id,
                sender=self.channel.me,
                receiver=envelope.sender,
                tag=FtlTag.ACCEPT,
                step=0,
                body=ControlBlock.from_obj({"ok": False, "reason": reason[:500]}),
            )
        )

    def _on_start(self, envelope: Envelope) -> None:
        """R1 at H: check, stop an older run of the job, follow this one, keep the scores."""
        runner = self.runner
        job_id, sender = envelope.job_id, envelope.sender
        if runner._stopping.is_set():
            return
        try:
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
            alias = str(request.get("data", ""))
            check_ftl_start(self.config, job, sender=sender.party_id, alias=alias)
            column = host_id_column(self.config, request)  # its own [psi] policy's column
            table = self._table(alias, id_column=column, labels=None)
            check_ftl_start(
                self.config, job, sender=sender.party_id, alias=alias, features=len(table.columns)
            )
            overlap = self._overlap(psi_job, alias=alias, guest=sender.party_id)
        except (VflError, KeyError, TypeError, ValueError) as exc:
            reason = (
                str(exc) if isinstance(exc, JobRefusedError) else f"{type(exc).__name__}: {exc}"
            )
            public = peer_reason(exc) if isinstance(exc, VflError) else "malformed START"
            logger.warning("refused FTL job %s from %s: %s", job_id, sender, reason)
            runner.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=sender.party_id,
                reason=reason,
            )
            runner._update(job_id, state="refused", phase="refused", error=reason[:500])
            self._refuse(envelope, public)  # the rule only; the details stay in H's log
            return
        host = FtlHost(
            channel=self.channel,
            guest=sender,
            arbiter=self.config.peer_with_role(Role.ARBITER),
            features=table.features,
            overlap=overlap,
            executor=runner.executor,
            allow_test_key=self.config.allow_test_key,
            seed=self.config.seed,
            state_dir=self.config.state_dir,
        )
        done = threading.Event()
        with runner._job_lock(job_id):
            with self._lock:
                old = self._hosts.get(job_id)
                self._hosts[job_id] = (host, done)
            with runner._lock:
                runner._guest_failed.pop(job_id, None)  # a new run of the job
            if old is not None and not old[1].is_set():
                old[0].stop()
                old[1].wait(30.0)
        runner.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=job_id,
            submitter=sender.party_id,
            input_sha256=file_digest(self.config.data[alias]),
            run_id=envelope.run_id,
        )
        runner._update(job_id, state="running", phase="training", started=time.time())
        try:
            host.run(envelope)
        except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
            runner.host_run_failed(
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
                path = runner._job_dir(job_id) / SCORES_FILE
                atomic_write(path, buffer.getvalue().encode(), mode=0o600)
                fields = {"scores": str(path), "scored": len(scores)}
            runner.audit.record(
                event=AuditEvent.JOB_FINISHED, job_id=job_id, submitter=sender.party_id
            )
            runner._update(job_id, state="done", phase="done", **fields)
        finally:
            done.set()
            self.channel.abort_run(job_id, envelope.run_id)

    def guest_of(self, job_id: str) -> str | None:
        """The guest of the transfer run this host follows for ``job_id``, if any."""
        with self._lock:
            entry = self._hosts.get(job_id)
        return None if entry is None else entry[0].guest.party_id

    def stop_run(self, job_id: str) -> None:
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
