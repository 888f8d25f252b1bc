"""The aggregator's side of FedAvg runs (steps F2-F7 of :mod:`vfl.fedavg.protocol`).

Roles: A (the arbiter's service) relays the clients' signed keys, sums masked vectors and
combines the clients' validation metrics. It holds no key of this protocol: every vector it
receives is uniform on ``Z_2^64`` (H2) and, with the group mask, so is every sum. It keeps
nothing on disk: after a restart the coordinator's next run starts over at F2 and resumes
from the clients' saved rounds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols import secagg
from protocols.envelope import Envelope, Uint64Block, control_of
from protocols.errors import (
    JobIdInUseError,
    JobRefusedError,
    ProtocolError,
    RunAbortedError,
    VflError,
    peer_reason,
)
from protocols.link import JobLink
from protocols.roles import Party, Role
from protocols.transport.base import Channel, MessageFilter
from vfl.fedavg.aggregate import combine_metrics, sample_participants
from vfl.fedavg.protocol import FedJob, FedTag

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 600.0
Admit = Callable[[FedJob, Party], None]
Notify = Callable[[str, str, dict[str, Any]], None]  # (job id, event, fields)


class _Abort(Exception):
    """Internal: end the run with ABORT to every client (F7)."""


@dataclass
class _Run:
    link: JobLink  # A's link in this run of the job
    joins: queue.Queue[Envelope] = field(default_factory=queue.Queue)
    joined: dict[str, Party] = field(default_factory=dict)  # who sent a JOIN (for ABORT)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    older: list[_Run] = field(default_factory=list)  # runs it replaces once admitted

    @property
    def job_id(self) -> str:
        return self.link.job_id

    @property
    def run_id(self) -> str:
        return self.link.run_id


class FedAggregator:
    """A's FedAvg service: one thread per run, started by the run's first ``JOIN``. A run
    replaces the job's older runs only once it is admitted (every client joined, the
    same job, ``admit`` passed), so a stray ``JOIN`` under a job's id stops no run of it.

    Parameters
    ----------
    channel
        A's channel.
    admit
        A's acceptance policy: raise :class:`JobRefusedError` to refuse a job (checked on
        the coordinator's own JOIN).
    notify
        Called with ``(job_id, event, fields)`` on ``accepted``, ``refused``, ``round``,
        ``aborted`` and ``done`` (audit records, status).
    join_timeout
        How long A waits for every client's JOIN.
    """

    def __init__(
        self,
        *,
        channel: Channel,
        admit: Admit | None = None,
        notify: Notify | None = None,
        join_timeout: float = JOIN_TIMEOUT_S,
    ) -> None:
        self.channel = channel
        self.admit = admit
        self.notify = notify
        self.join_timeout = join_timeout
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _Run] = {}
        self._status: dict[str, dict[str, Any]] = {}
        channel.add_handler(MessageFilter.for_tags(FedTag.JOIN), self._on_join)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per job: state, round, combined metrics (for ``vfl status`` at the arbiter)."""
        with self._lock:
            return {k: dict(v) for k, v in self._status.items()}

    def close(self) -> None:
        """Stop every run (their receives end at once)."""
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.stopped.set()
            self.channel.abort_run(run.job_id, run.run_id)
        for run in runs:
            if run.thread is not None:
                run.thread.join(5.0)

    def _on_join(self, envelope: Envelope) -> None:
        key = (envelope.job_id, envelope.run_id)
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                older = [r for k, r in self._runs.items() if k[0] == envelope.job_id]
                run = _Run(link=JobLink.answering(self.channel, envelope), older=older)
                self._runs[key] = run
                start = True
            else:
                start = False
        run.joins.put(envelope)
        if not start:
            return
        run.thread = threading.Thread(
            target=self._serve, args=(run,), name=f"fedavg-{run.job_id}", daemon=True
        )
        run.thread.start()

    def _event(self, job_id: str, event: str, **fields: Any) -> None:
        with self._lock:
            state = "running" if event in ("accepted", "round") else event
            self._status.setdefault(job_id, {}).update(state=state, phase=event, **fields)
        if self.notify is not None:
            try:
                self.notify(job_id, event, fields)
            except Exception:  # noqa: BLE001 - a notification must not end the run
                logger.exception("notification %s of job %s failed", event, job_id)

    def _serve(self, run: _Run) -> None:
        clients: list[Party] = []
        try:
            job, clients, resume = self._gather(run)
            self._rounds(run, job, clients, resume)
        except _Abort as exc:
            self._abort(run, clients, str(exc))
        except JobIdInUseError as exc:  # told to whoever joined; nothing of the owner's
            reason = f"refused by the aggregator: {peer_reason(exc)}"
            self._abort(run, clients, reason, refused=True, quiet=True)
        except JobRefusedError as exc:
            self._abort(
                run, clients, f"refused by the aggregator: {peer_reason(exc)}", refused=True
            )
        except RunAbortedError:
            logger.info("job %s: run %s stopped", run.job_id, run.run_id)
        except (VflError, TimeoutError, ValueError) as exc:
            logger.error("job %s: run %s failed: %s", run.job_id, run.run_id, exc)
            self._abort(run, clients, peer_reason(exc))  # the clients see the rule only
        finally:
            with self._lock:
                if self._runs.get((run.job_id, run.run_id)) is run:
                    del self._runs[(run.job_id, run.run_id)]
            self.channel.abort_run(run.job_id, run.run_id)

    # -- F2, F3 -----------------------------------------------------------------------

    def _gather(self, run: _Run) -> tuple[FedJob, list[Party], int]:
        """F2: every client's JOIN, checked; F3: KEYS (and the relayed group seeds)."""
        give_up = time.monotonic() + self.join_timeout
        joins: dict[str, dict[str, Any]] = {}
        parties = run.joined
        job: FedJob | None = None
        expected: tuple[str, ...] = ()
        while job is None or len(joins) < len(expected):
            if run.stopped.is_set():
                raise RunAbortedError(f"run {run.run_id} of job {run.job_id} was stopped")
            try:
                envelope = run.joins.get(timeout=max(0.0, min(1.0, give_up - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= give_up:
                    missing = sorted(set(expected) - set(joins)) or ["every client"]
                    raise _Abort(f"no JOIN from {', '.join(missing)} in time") from None
                continue
            body = control_of(envelope)
            sender = envelope.sender
            parties[sender.party_id] = sender
            if job is None:
                job = FedJob.from_json(body["job"])
                if job.job_id != run.job_id or job.digest() != body.get("job_sha256"):
                    raise _Abort(f"{sender.party_id} sent a job that does not match its digest")
                expected = job.client_ids
            if sender.party_id not in expected or sender.role is Role.ARBITER:
                raise _Abort(f"{sender.party_id} is not a client of job {run.job_id}")
            joins[sender.party_id] = body
        if job is None:  # pragma: no cover - the loop only ends with a job
            raise _Abort("no job")
        coordinator = parties[job.coordinator]
        if self.admit is not None:
            try:
                self.admit(job, coordinator)
            except JobIdInUseError:
                raise  # another coordinator's job id: its status and records stay
            except JobRefusedError as exc:
                self._event(run.job_id, "refused", reason=str(exc)[:300])
                raise
        reference = joins[job.coordinator]
        for party_id, body in joins.items():
            for field_name, what in (
                ("job_sha256", "job"),
                ("columns_sha256", "columns (names and order)"),
                ("init_sha256", "initial model (engine or torch versions differ?)"),
            ):
                if body.get(field_name) != reference.get(field_name):
                    raise _Abort(
                        f"{party_id}'s {what} differs from {job.coordinator}'s; every client "
                        "must hold the same columns and run the same job"
                    )
        for old in run.older:  # admitted: a newer run of the job replaces the older ones
            old.stopped.set()
            self.channel.abort_run(old.job_id, old.run_id)
        run.older = []
        held = [set(int(r) for r in b.get("rounds_held", [])) | {0} for b in joins.values()]
        common = set.intersection(*held)
        resume = max(common)
        clients = [parties[c] for c in job.client_ids]
        self._event(run.job_id, "accepted", run_id=run.run_id, resume_round=resume)
        self.channel.fresh_stream(run.job_id, clients)
        keys = [
            {"party": c, "public": joins[c]["public"], "signature": joins[c]["signature"]}
            for c in job.client_ids
        ]
        for client in clients:
            self._send(run, client, FedTag.KEYS, 0, {"keys": keys, "resume_round": resume})
        if job.group_mask and len(clients) > 2:  # F3: relay the wrapped group seed
            first = clients[0]
            body = self._control_of(run, first, FedTag.GROUP, 0, self.join_timeout)
            wrapped = body.get("wrapped", {})
            for client in clients[1:]:
                blob = wrapped.get(client.party_id)
                if not isinstance(blob, str):
                    raise _Abort(f"{first.party_id}'s group seeds lack {client.party_id}")
                self._send(run, client, FedTag.GROUP, 0, {"wrapped": blob})
        logger.info(
            "job %s: run %s with %d clients, from round %d",
            run.job_id,
            run.run_id,
            len(clients),
            resume,
        )
        return job, clients, resume

    # -- F4, F5, F6 -------------------------------------------------------------------

    def _rounds(self, run: _Run, job: FedJob, clients: list[Party], resume: int) -> None:
        for step in (0, 1):  # F4
            self._sum(run, job, clients, clients, FedTag.STATS, FedTag.STATS_SUM, step)
        history: list[dict[str, Any]] = []
        previous: dict[str, Any] | None = None
        by_id = {c.party_id: c for c in clients}
        if resume > 0:  # the clients report on the resumed round again
            started = time.monotonic()
            previous = _shared(self._reports(run, job, clients, resume, started))
            history.append(previous)
        for round_no in range(resume + 1, job.rounds + 1):  # F5
            started = time.monotonic()
            chosen = sample_participants(
                job.client_ids,
                per_round=job.clients_per_round,
                job_id=job.job_id,
                round_no=round_no,
            )
            for client in clients:
                self._send(
                    run,
                    client,
                    FedTag.ROUND,
                    round_no,
                    {"participants": list(chosen), "previous": previous},
                )
            participants = [by_id[c] for c in chosen]
            self._sum(run, job, participants, clients, FedTag.UPDATE, FedTag.AGG, round_no)
            record = self._reports(run, job, clients, round_no, started)
            record["participants"] = list(chosen)
            self._event(  # A's own status keeps each client's metrics ...
                job.job_id,
                "round",
                round=round_no,
                rounds=job.rounds,
                combined=record,
                run_id=run.run_id,
            )
            previous = _shared(record)  # ... the clients get only the combination
            history.append(previous)
        for client in clients:  # F6
            self._send(run, client, FedTag.DONE, 0, {"history": history})
        self._event(job.job_id, "done", round=job.rounds, rounds=job.rounds, run_id=run.run_id)

    def _sum(
        self,
        run: _Run,
        job: FedJob,
        senders: Sequence[Party],
        receivers: Sequence[Party],
        up: FedTag,
        down: FedTag,
        step: int,
    ) -> None:
        """Receive every sender's masked vector, send the wrap-around sum to every receiver."""
        give_up = time.monotonic() + job.round_timeout_s
        vectors = []
        for sender in senders:
            envelope = self._recv(run, sender, up, step, give_up - time.monotonic(), missing=True)
            if not isinstance(envelope.body, Uint64Block):
                raise ProtocolError(f"{up.value} from {sender.party_id} must carry uint64 values")
            vectors.append(np.frombuffer(envelope.body.data, dtype="<u8").astype(np.uint64))
        total = secagg.sum_updates(vectors)
        block = Uint64Block(total.astype("<u8").tobytes(), shape=total.shape)
        for receiver in receivers:
            self._send(run, receiver, down, step, block)

    def _reports(
        self, run: _Run, job: FedJob, clients: Sequence[Party], round_no: int, started: float
    ) -> dict[str, Any]:
        """Every client's EVAL of ``round_no``, combined."""
        reports = {}
        give_up = time.monotonic() + job.round_timeout_s
        for client in clients:
            reports[client.party_id] = self._control_of(
                run, client, FedTag.EVAL, round_no, give_up - time.monotonic()
            )
        return self._combine(round_no, reports, time.monotonic() - started)

    @staticmethod
    def _combine(
        round_no: int, reports: dict[str, dict[str, Any]], seconds: float
    ) -> dict[str, Any]:
        validation = combine_metrics(
            {c: r.get("validation", {}) for c, r in reports.items()}, weight="rows"
        )
        out: dict[str, Any] = {
            "round": round_no,
            "validation": validation,
            "clients": {c: r.get("validation", {}) for c, r in reports.items()},
            "round_s": round(seconds, 4),
            "end_time": time.time(),
        }
        tests = {c: r["test"] for c, r in reports.items() if isinstance(r.get("test"), dict)}
        if tests:
            out["test"] = combine_metrics(tests, weight="rows")
        eps = [r["epsilon"] for r in reports.values() if r.get("epsilon") is not None]
        if eps:
            out["epsilon_max"] = max(float(e) for e in eps)
        return out

    # -- messages -----------------------------------------------------------------------

    def _send(
        self, run: _Run, to: Party, tag: FedTag, step: int, body: dict[str, Any] | Uint64Block
    ) -> None:
        """Send in the run; an unreachable client aborts it (F7)."""
        try:
            run.link.send(to, tag, step, body)
        except VflError as exc:
            if isinstance(exc, RunAbortedError):
                raise
            raise _Abort(f"{to.party_id} is unreachable ({type(exc).__name__})") from None

    def _recv(
        self,
        run: _Run,
        sender: Party,
        tag: FedTag,
        step: int,
        timeout: float,
        *,
        missing: bool = False,
    ) -> Envelope:
        try:
            envelope = run.link.recv_any(sender, (tag, FedTag.ABORT), timeout=max(0.0, timeout))
            if envelope.tag == FedTag.ABORT.value:  # the client gave up (F7)
                reason = str(control_of(envelope).get("reason", "no reason given"))[:300]
                raise _Abort(f"{sender.party_id} left the run: {reason}")
            if envelope.step != step:
                raise _Abort(f"{sender.party_id} sent {tag.value} step {envelope.step}, not {step}")
            return envelope
        except TimeoutError:
            what = "round" if tag in (FedTag.UPDATE, FedTag.EVAL) else "step"
            raise _Abort(
                f"{sender.party_id} sent no {tag.value} for {what} {step} in time"
                + ("; nothing of this round is unmasked" if missing else "")
            ) from None

    def _control_of(
        self, run: _Run, sender: Party, tag: FedTag, step: int, timeout: float
    ) -> dict[str, Any]:
        return control_of(self._recv(run, sender, tag, step, timeout))

    def _abort(
        self,
        run: _Run,
        clients: Sequence[Party],
        reason: str,
        *,
        refused: bool = False,
        quiet: bool = False,
    ) -> None:
        """F7: tell every reachable client; no sum of the round is ever sent (``quiet``:
        the job's status and records are not this run's to change)."""
        logger.warning("job %s: run %s aborted: %s", run.job_id, run.run_id, reason)
        if not quiet:
            self._event(run.job_id, "aborted", reason=reason[:300], run_id=run.run_id)
        if not clients:  # aborted before every JOIN: tell whoever joined
            clients = list(run.joined.values())
        for client in clients:
            try:
                body = {"reason": reason[:500], "refused": refused}
                run.link.send(client, FedTag.ABORT, 0, body)
            except VflError:
                logger.info("job %s: %s not told of the abort", run.job_id, client.party_id)


def _shared(record: dict[str, Any]) -> dict[str, Any]:
    """What the clients learn of a round's reports: the combination, not each other's."""
    return {k: v for k, v in record.items() if k != "clients"}
