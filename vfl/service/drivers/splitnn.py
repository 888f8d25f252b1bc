"""Split-NN jobs in the party services (docs/protocol.md §4; :mod:`vfl.splitnn.session`).

Roles: the guest G drives; its operator submits a job file (``train``) that this driver
parses (:meth:`SplitNnDriver.parse`) and runs once per attempt: PSI first unless the job
names a result, then the guest session over the PSI's shared row order. The host H answers
a guest's ``JOB_START`` for one of its own data aliases and the PSI result it holds, under
its ``[accept]`` and ``[psi]`` policies (:mod:`vfl.service.accept`), and refuses anything
else. The arbiter A decrypts under the job's policy (:mod:`vfl.service.arbiter`).

H's side of the lifecycle (docs/protocol.md §4.4.1; :mod:`vfl.service.runner`, steps 3-4):

1. a ``JOB_START`` for a job id that belongs to another guest or another kind of job
   (:mod:`vfl.service.owners`) is refused (``JOB_ACCEPT{refused}``, the rule only) and
   audited before anything is stopped or touched; ``jobs/<id>/host_run.json`` records the
   guest and run of every accepted run (an older version's record, without an owner
   record, makes its guest the split-NN owner when the service starts);
2. a ``JOB_START`` for a job whose older run H still serves stops that run first (its
   receives raise :class:`~protocols.errors.RunAbortedError`) and waits for it to end;
3. a run of H that fails sends ``RUN_STOPPED{failed}`` (R1) with the error's peer-safe
   reason, whether a new run may help, and the ``no_space`` flag if H's folder is full;
4. on start, H sends ``RUN_STOPPED{restarted}`` to the guest of every run still recorded
   ``running``, retrying until the guest is reachable (``NOTICE_PATIENCE_S``), unless the
   guest has started a new run with it meanwhile; the record then says ``notified``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    JobIdInUseError,
    JobRefusedError,
    NoSpaceError,
    ProtocolError,
    VflError,
    peer_reason,
)
from protocols.files import NO_SPACE, atomic_write, is_no_space, no_space_error
from protocols.ids import check_identifier, state_path
from protocols.link import JobLink
from protocols.roles import Party, Role
from protocols.transport.base import MessageFilter
from psi.result import read_result
from vfl.common.jobfile import JobKind, TypedJob, canonical_json
from vfl.common.seeds import RunSeeds, job_scope
from vfl.config import JobType, PartyConfig
from vfl.data.checks import checked_data
from vfl.data.features import FeatureSpec
from vfl.data.tables import PartyTable, Splits, TableSpec, load_table, split_rows
from vfl.models.split import Task
from vfl.privacy.label_protection import ProtectMode
from vfl.report import REPORT_FILE
from vfl.service.accept import check_offer, host_id_column
from vfl.service.audit import AuditEvent, config_digest, file_digest
from vfl.service.driver import DATA_CHECK_FILE, GuestAttempt, JobDriver, ServiceContext, retryable
from vfl.service.notices import RUN_STOPPED, RunStop, clock_step, keep_trying
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.host import HostSession
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobOffer, JobTag, Progress
from vfl.splitnn.jobfile import TrainJobFile, parse_job
from vfl.splitnn.session import claim_run

logger = logging.getLogger(__name__)

HOST_RUN_FILE = "host_run.json"  # H: the run it serves, for RUN_STOPPED after a restart
NOTICE_PATIENCE_S = 3600.0  # how long H keeps trying to tell G that it restarted
FAILED_PATIENCE_S = 60.0  # how long H keeps trying to tell G that its run failed
STOP_WAIT_S = 10.0  # how long close() waits for H's runs to end


def aligned_table(
    config: PartyConfig,
    request: dict[str, Any],
    *,
    labels: str | None,
    guest: str | None = None,
    features: FeatureSpec | None = None,
    classes: tuple[str, ...] | None = None,
    binary: bool = False,
    report: Path | None = None,
) -> PartyTable:
    """This party's rows for the job, in the PSI's shared order, after its data checks.

    At the host (``guest`` given) the id column is the one its ``[psi]`` policy names for the
    alias (:func:`host_id_column`), the features are its own (:func:`host_features`), a
    column named like the guest's label column is refused and binary columns are warned
    about, and the PSI result must be one it ran with that guest on that alias
    (docs/protocol.md §3.4.1, §4.4.3). The checks' report goes to ``report`` (this party's
    own job folder; never sent) and its warnings to this party's log.
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
    label_like = request.get("label_column") if guest is not None else None
    spec = TableSpec(
        path=config.data[alias],
        id_column=column,
        label_column=labels,
        features=(host_features(config, request) if guest is not None else features)
        or FeatureSpec(),
        label_like=str(label_like) if label_like else None,
        classes=classes,
        binary_labels=binary,
    )
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
    checked_data(
        spec,
        warn_binary=guest is not None,
        report=report,
        duplicates=config.psi.for_alias(alias).duplicates,
    )
    return load_table(spec).take(rows)


def job_splits(config: PartyConfig, table: PartyTable, job_file: TrainJobFile) -> Splits:
    """G's training, validation and test rows of a job (positions in ``table``, its aligned
    rows): keyed by ``split_seed`` under G's local secret, in its file order (§4.4.2)."""
    if table.labels is None:
        raise ConfigError(f"data {job_file.guest_data!r} has no label column")
    split_keys = RunSeeds.at(config.state_dir, job_file.split_seed)
    return split_rows(
        table.labels,
        test_fraction=job_file.test_fraction,
        validation_fraction=job_file.validation_fraction,
        seed=split_keys.integer("split-rows", bits=32),
        # rr_labels: a split the host sees must not depend on the labels (§4.7.2)
        stratified=job_file.job.train.protect.mode is not ProtectMode.RR_LABELS,
        # the split follows the customers, not this PSI's order (§4.4.2)
        file_rows=table.file_rows,
        shuffle=split_keys.digest("split-order"),
    )


def host_features(config: PartyConfig, request: dict[str, Any]) -> FeatureSpec:
    """H's features for the alias a guest names: its own ``[features.<alias>]``, or the job's
    ``[host]`` section if its ``[accept] guest_features`` allows guests to choose them
    (docs/protocol.md §4.4.3)."""
    alias = str(request.get("data", ""))
    asked = request.get("features")
    if asked is None:
        return config.features.get(alias, FeatureSpec())
    if not config.accept.guest_features:
        public = (
            "this host chooses its own feature columns; remove [host] from the job (or ask "
            "its operator to set [accept] guest_features = true)"
        )
        raise JobRefusedError(public, public=public)
    if not isinstance(asked, dict):
        raise ProtocolError("the job's [host] features are not a table")
    spec = FeatureSpec.parse(asked, where="the guest's [host] section")
    own = config.features.get(alias, FeatureSpec())
    label = request.get("label_column")
    chosen = {*(spec.feature_columns or ()), *spec.categorical_columns, *spec.date_columns}
    if label in chosen and label not in (own.feature_columns or ()):
        public = (
            "the job's [host] section lists a column named like the job's label column; only "
            "the host's operator may ([features.<alias>] feature_columns)"
        )
        raise JobRefusedError(public, public=public)
    if chosen & set(own.exclude_columns):
        public = "the job's [host] section names a column this host excludes"
        raise JobRefusedError(public, public=public)
    # the host's own exclusions hold whatever the guest asks (a deny-list on top)
    excluded = tuple(sorted({*spec.exclude_columns, *own.exclude_columns}))
    return dataclasses.replace(spec, exclude_columns=excluded)


class _HostRun:
    """H's bookkeeping of the run it serves for one job."""

    def __init__(self, session: HostSession, envelope: Envelope) -> None:
        self.session, self.envelope = session, envelope
        self.done = threading.Event()
        self.no_space: str | None = None  # the space probe stopped this run


class SplitNnDriver(JobDriver[TrainJobFile]):
    """Split-NN jobs: the guest's runs, the host's answers to ``JOB_START``."""

    kind: ClassVar[JobType] = JobType.SPLIT_NN
    tags = (SplitTag, JobTag)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self._lock = threading.Lock()
        self._host_runs: dict[str, _HostRun] = {}

    @classmethod
    def parse(
        cls, raw: dict[str, Any], *, source: str, party_id: str, allow_plaintext: bool
    ) -> TypedJob[TrainJobFile]:
        """A split-NN job file (:func:`vfl.splitnn.jobfile.parse_job`)."""
        job = parse_job(raw, source=source, allow_plaintext=allow_plaintext)
        return TypedJob(
            kind=JobKind.SPLIT_NN,
            file=job,
            job_id=job.job.job_id,
            guest_data=job.guest_data,
            canonical=canonical_json(job.to_json()),
        )

    def serve(self) -> None:
        """H answers guests' ``JOB_START`` (after taking over older versions' records)."""
        if self.ctx.config.party.role is Role.HOST:
            self._owners_of_old_runs()
            self.ctx.channel.add_handler(
                MessageFilter.for_tags(JobTag.JOB_START), self._on_job_start
            )

    def _owners_of_old_runs(self) -> None:
        """Step 1: a ``host_run.json`` of an older version, kept without an owner record,
        makes its guest the owner of the job id (split NN)."""
        state_dir = self.ctx.config.state_dir
        for found in sorted((state_dir / "jobs").glob(f"*/{HOST_RUN_FILE}")):
            job_id = found.parent.name
            try:
                info = json.loads(state_path(state_dir, "jobs", job_id, HOST_RUN_FILE).read_text())
                if self.ctx.owners.owner(job_id) is None and info.get("guest"):
                    self.ctx.owners.claim(job_id, guest=str(info["guest"]), kind=self.kind)
            except (OSError, ValueError, AttributeError, VflError) as exc:
                logger.warning("%s: no owner taken from it (%s)", found, exc)

    # -- guest ---------------------------------------------------------------------------

    def attempt(self, attempt: GuestAttempt[TrainJobFile]) -> dict[str, Any]:
        """One run: PSI first unless the job has a result, then the guest session."""
        ctx, job_file = self.ctx, attempt.job.file
        config = ctx.config
        job_id = job_file.job.job_id
        psi_job = ctx.ensure_psi(
            job_id=job_id,
            psi_job=job_file.psi_job,
            guest_data=job_file.guest_data,
            host_data=job_file.host_data,
            id_column=job_file.id_column,
            id_type=job_file.id_type,
        )
        request = {"data": job_file.guest_data, "id_column": job_file.id_column, "psi_job": psi_job}
        table = aligned_table(
            config,
            request,
            labels=job_file.label_column,
            features=job_file.guest_spec(),
            classes=job_file.classes,
            binary=job_file.job.train.task is Task.BINARY and job_file.classes is None,
            report=ctx.job_dir(job_id) / DATA_CHECK_FILE,
        )
        if table.labels is None:
            raise ConfigError(f"data {job_file.guest_data!r} has no label column")
        splits = job_splits(config, table, job_file)
        ctx.update(job_id, phase="training", rows=len(table))
        session = GuestSession(
            channel=ctx.channel,
            host=ctx.peer(Role.HOST),
            arbiter=ctx.peer(Role.ARBITER),
            job=job_file.job,
            table=table,
            splits=splits,
            executor=ctx.executor,
            state_dir=config.state_dir,
            seed=config.seed if job_file.seed is None else job_file.seed,
            decision=job_file.decision,
            allow_test_key=config.allow_test_key,
            progress=self._on_progress,
            pool_executor=ctx.background(),
            host_request={
                "data": job_file.host_data,
                "psi_job": psi_job,
                "label_column": job_file.label_column,  # H refuses a feature of that name
                **(
                    {}
                    if job_file.host_features is None
                    else {"features": job_file.host_features.to_json()}
                ),
            },
            after_step=attempt.after_step,
        )
        attempt.started(session)
        try:
            result = session.run()
        finally:
            if session.run_id:  # drop whatever of this run is still unread (R2)
                ctx.channel.abort_run(job_id, session.run_id)
        out: dict[str, Any] = {"test": result.test, "best_epoch": result.best_epoch}
        if (session.report_dir / REPORT_FILE).is_file():
            out["report"] = str(session.report_dir)  # this party's own status only
        return out

    def _on_progress(self, p: Progress) -> None:
        fields_: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "epochs": p.epochs,
            "step": p.step,
            "total_steps": p.total_steps,
        }
        if p.validation is None:
            fields_.update(rows_per_s=round(p.rows_per_s, 1), eta_s=round(p.eta_s), loss=p.loss)
        else:
            fields_["validation"] = {k: round(v, 5) for k, v in p.validation.items()}
        self.ctx.update(p.job_id, **fields_)

    # -- host ----------------------------------------------------------------------------

    def _on_job_start(self, envelope: Envelope) -> None:
        """A guest's JOB_START: stop an older run of the job, then serve this one."""
        ctx = self.ctx
        job_id = envelope.job_id
        if ctx.stopping.is_set():
            return  # the guest tries again once this service is back
        with ctx.job_lock(job_id):
            try:  # step 1: whose job the id is, before anything is stopped or touched
                ctx.claim(
                    job_id,
                    guest=envelope.sender.party_id,
                    kind=self.kind,
                    record=self._names_its_job(envelope),
                )
            except VflError as exc:
                self._refuse_start(envelope, exc)
                return
            with self._lock:
                old = self._host_runs.get(job_id)
            if old is not None and not old.done.is_set():  # step 2
                logger.info(
                    "job %s: run %s replaces run %s, which is stopped first",
                    job_id,
                    envelope.run_id,
                    old.envelope.run_id,
                )
                old.session.stop()
                while not old.done.wait(1.0):
                    if ctx.stopping.is_set():
                        return
            config = ctx.config
            session = HostSession(
                channel=ctx.channel,
                guest=envelope.sender,
                arbiter=ctx.peer(Role.ARBITER),
                table_for=lambda request: aligned_table(
                    config,
                    request,
                    labels=None,
                    guest=envelope.sender.party_id,
                    report=ctx.job_dir(job_id) / DATA_CHECK_FILE,
                ),
                request_for=lambda request: {
                    **request,
                    "id_column": host_id_column(config, request),
                },
                executor=ctx.executor,
                state_dir=config.state_dir,
                seed=ctx.party_seed("splitnn-host", scope=self._seed_scope(envelope)),
                allow_test_key=config.allow_test_key,
                pool_executor=ctx.background(),
                accept=lambda offer: self._accept(offer, envelope),
            )
            run = _HostRun(session, envelope)
            with self._lock:
                self._host_runs[job_id] = run
            ctx.new_peer_run(job_id)  # a new run of the job (resubmitted)
        ctx.update(job_id, state="running", phase="training", started=time.time())
        try:
            session.run(envelope)
        except JobRefusedError as exc:
            ctx.audit.record(
                event=AuditEvent.JOB_REFUSED,
                job_id=job_id,
                submitter=envelope.sender.party_id,
                config_sha256=self._start_digest(envelope),
                key_id=session.key_id,
                reason=str(exc)[:500],
            )
            ctx.update(job_id, state="refused", phase="refused", error=str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - reported through status, audit and R1
            self._run_failed(run, exc)
        else:
            ctx.audit.record(
                event=AuditEvent.JOB_FINISHED,
                job_id=job_id,
                submitter=envelope.sender.party_id,
                key_id=session.key_id,
            )
            self._host_run_state(job_id, envelope, state="done", strict=False)
            ctx.update(job_id, state="done", phase="done")
        finally:
            run.done.set()
            ctx.channel.abort_run(job_id, envelope.run_id)  # drop leftovers of this run

    def _run_failed(self, run: _HostRun, exc: Exception) -> None:
        """H's run ended with ``exc``: interrupted (a stop), or failed (step 3: R1)."""
        ctx, envelope = self.ctx, run.envelope
        job_id = envelope.job_id
        error = f"{type(exc).__name__}: {exc}"[:500]
        full = is_no_space(exc) or run.no_space is not None
        if run.no_space is not None:
            error = run.no_space[:500]
        elif full and isinstance(exc, OSError):
            what = f"{ctx.config.party.party_id}'s state folder"
            error = str(no_space_error(ctx.config.state_dir, exc, what=what))[:500]
        if ctx.stopping.is_set():
            logger.info("job %s: run %s stopped with the service", job_id, envelope.run_id)
            ctx.update(job_id, state="interrupted", phase="stopped")
            return
        if run.session.stopped and run.no_space is None:
            logger.info(
                "job %s: run %s stopped (a newer run replaces it, or the guest failed)",
                job_id,
                envelope.run_id,
            )
            return
        logger.error("job %s failed at the host: %s", job_id, error)
        ctx.audit.record(
            event=AuditEvent.JOB_FAILED,
            job_id=job_id,
            submitter=envelope.sender.party_id,
            key_id=run.session.key_id,
            reason=error,
        )
        self._host_run_state(job_id, envelope, state="failed", strict=False)
        ctx.update(job_id, state="failed", error=error)
        body = {
            "reason": RunStop.FAILED.value,
            # the rule only: never H's paths (its log and status have the folder)
            "error": (
                f"{NO_SPACE} in {ctx.config.party.party_id}'s state folder; its operator must "
                "free space"
                if full
                else peer_reason(exc)
            ),
            "retry": retryable(exc) or full,
            "no_space": full,
        }
        threading.Thread(
            target=self._send_notice,
            args=(job_id, envelope.sender, envelope.run_id, body, FAILED_PATIENCE_S),
            daemon=True,
        ).start()

    @staticmethod
    def _seed_scope(envelope: Envelope) -> str:
        """H's seeded draws depend on what the job is (its ``JOB_START`` without the job id,
        the run's bookkeeping and the PSI named), not on its id: another job draws anew, the
        same job run again (a rerun) draws the same (docs/protocol.md §4.4.2)."""
        body = envelope.body.obj() if isinstance(envelope.body, ControlBlock) else {}
        request = body.get("request")
        return job_scope(
            {
                **{
                    k: v
                    for k, v in body.items()
                    if k not in ("job_id", "encrypted", "checkpoints", "eval_step", "request")
                },
                "request": {
                    k: v
                    for k, v in (request if isinstance(request, dict) else {}).items()
                    if k != "psi_job"
                },
            }
        )

    @staticmethod
    def _names_its_job(envelope: Envelope) -> bool:
        """Whether a ``JOB_START`` names its envelope's job (else the session refuses it,
        docs/protocol.md §2.9, and it claims no job id)."""
        body = envelope.body
        return isinstance(body, ControlBlock) and body.obj().get("job_id") == envelope.job_id

    def _refuse_start(self, envelope: Envelope, exc: VflError) -> None:
        """Step 1: refuse a ``JOB_START`` before any run (``JOB_ACCEPT{refused}``, the rule
        only); the job's runs and status are left alone if the id is another's."""
        if not isinstance(exc, JobIdInUseError):  # the id is free: nothing of another's
            self.ctx.refused(envelope.job_id, str(exc))
        fields = {"no_space": True} if isinstance(exc, NoSpaceError) else {}
        self.ctx.channel.fresh_stream(envelope.job_id, (envelope.sender,))
        JobLink.answering(self.ctx.channel, envelope).refuse(
            envelope, JobTag.JOB_ACCEPT, peer_reason(exc), step=0, **fields
        )

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
        config = self.ctx.config
        check_offer(config, offer)
        if offer.key_bits is None:
            return
        alias = str(offer.request.get("data", ""))
        path = config.data.get(alias)
        self._host_run_state(offer.job.job_id, envelope, state="running")
        self.ctx.audit.record(
            event=AuditEvent.JOB_ACCEPTED,
            job_id=offer.job.job_id,
            submitter=offer.guest,
            config_sha256=self._start_digest(envelope),
            input_sha256=file_digest(path) if path is not None else None,
            key_id=offer.key_id,
            run_id=envelope.run_id,
        )

    def _host_run_state(
        self, job_id: str, envelope: Envelope, *, state: str, strict: bool = True
    ) -> None:
        """Record the run H serves (``strict=False``: a failure to write is only logged, so
        the run's end is still reported; a restart may then send one needless notice)."""
        body = {"guest": envelope.sender.party_id, "run_id": envelope.run_id, "state": state}
        try:
            atomic_write(
                self.ctx.job_dir(job_id) / HOST_RUN_FILE, json.dumps(body).encode(), mode=0o600
            )
        except OSError as exc:
            if strict:
                raise
            logger.error("job %s: cannot record run %s %s: %s", job_id, envelope.run_id, state, exc)

    # -- H's notices (steps 3-4) ---------------------------------------------------------

    def start(self) -> None:
        """Step 4: RUN_STOPPED{restarted} for every run still going at the stop."""
        if self.ctx.config.party.role is not Role.HOST:
            return
        jobs = sorted((self.ctx.config.state_dir / "jobs").glob(f"*/{HOST_RUN_FILE}"))
        for found in jobs:
            job_id = found.parent.name
            try:
                path = state_path(self.ctx.config.state_dir, "jobs", job_id, HOST_RUN_FILE)
                info = json.loads(path.read_text())
                if info.get("state") != "running":
                    continue
                guest = self.ctx.config.peer(str(info["guest"])).party
            except (OSError, ValueError, KeyError, VflError) as exc:
                logger.warning("%s is unreadable (%s); no restart notice sent", found, exc)
                continue
            threading.Thread(
                target=self._send_notice,
                args=(
                    job_id,
                    guest,
                    str(info.get("run_id", "")),
                    {"reason": RunStop.RESTARTED.value},
                    NOTICE_PATIENCE_S,
                ),
                name=f"notice-{job_id}",
                daemon=True,
            ).start()

    def _send_notice(
        self, job_id: str, guest: Party, run_id: str, body: dict[str, Any], patience: float
    ) -> None:
        """R1: tell G, retrying until it is reachable, the service stops or ``patience`` ends."""
        ctx = self.ctx
        restarted = body["reason"] == RunStop.RESTARTED.value
        told: list[bool] = []

        def send() -> None:
            with self._lock:
                resumed = restarted and job_id in self._host_runs
            if resumed:  # G has started a new run with this process already: nothing to say
                return
            try:
                with ctx.job_lock(job_id):
                    number = claim_run(ctx.channel, ctx.job_dir(job_id), (guest,))
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                # a full folder cannot keep the run count: a step and sequence numbers
                # from the clock instead, past every run number (G reads no step here)
                ctx.channel.fresh_stream(job_id, (guest,))
                number = clock_step()
            link = JobLink(channel=ctx.channel, job_id=job_id)
            link.send(guest, RUN_STOPPED, number, {"run_id": run_id, **body})
            told.append(True)

        done, error = keep_trying(send, stopping=ctx.stopping, until=time.monotonic() + patience)
        if error is not None:
            logger.warning(
                "job %s: could not tell %s that run %s stopped: %s", job_id, guest, run_id, error
            )
        if not told:
            return
        logger.info(
            "job %s: told %s that run %s %s", job_id, guest.party_id, run_id, body["reason"]
        )
        if restarted:
            self._mark_notified(job_id, run_id)

    def _mark_notified(self, job_id: str, run_id: str) -> None:
        path = self.ctx.job_dir(job_id) / HOST_RUN_FILE
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

    # -- the runner's hooks ----------------------------------------------------------------

    def guest_failed(self, job_id: str) -> None:
        """R3: record the run failed (no restart notice for it) and stop it."""
        with self._lock:
            run = self._host_runs.get(job_id)
        if run is None:
            return
        self._host_run_state(job_id, run.envelope, state="failed")
        if not run.done.is_set():
            run.session.stop()

    def _running(self) -> list[_HostRun]:
        with self._lock:
            return [r for r in self._host_runs.values() if not r.done.is_set()]

    def peer_runs(self) -> int:
        """H's runs going now."""
        return len(self._running())

    def out_of_space(self, error: str) -> None:
        """Stop H's runs: its folder is full (they then send ``RUN_STOPPED{no_space}``)."""
        for run in self._running():
            if not run.session.stopped:
                run.no_space = error
                run.session.stop()

    def close(self) -> None:
        """Stop H's runs and wait for them to end (at most ``STOP_WAIT_S``)."""
        runs = self._running()
        for run in runs:
            run.session.stop()
        give_up = time.monotonic() + STOP_WAIT_S
        for run in runs:
            run.done.wait(max(0.0, give_up - time.monotonic()))
