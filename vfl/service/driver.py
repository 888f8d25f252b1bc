"""The one interface between a party's job runner and each kind of job: drivers.

Every kind of work a party service does with its peers (split NN, FedAvg, FTL, PSI, scoring:
:class:`vfl.config.JobType`) has one *driver*, registered once in
:data:`vfl.service.drivers.DRIVERS`. The runner (:mod:`vfl.service.runner`) knows no kind:
it builds one :class:`ServiceContext`, gives it to every driver, lets each register its
peer-side handlers (:meth:`Driver.serve`) and admin commands (:meth:`Driver.commands`),
and runs the guest's jobs through :class:`JobDriver`: :meth:`~JobDriver.parse` once at
submission into a :class:`~vfl.common.jobfile.TypedJob`, :meth:`~JobDriver.attempt` once
per run (docs/protocol.md §4.4.1 lifecycle; retries, outcomes, notices are the runner's).

A driver reaches the service only through its context: the channel, the party's config,
executors, the audit log, the job-state table (:meth:`ServiceContext.update`), the stopping
event, the job folders and whose job an id is (:meth:`ServiceContext.claim`, which every
peer-side ``START`` handler asks first). No driver imports the runner or another driver.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from protocols.arbiter.service import ArbiterService
from protocols.errors import (
    DataError,
    JobIdInUseError,
    JobRefusedError,
    NoSpaceError,
    PolicyViolationError,
    TransportError,
    VflError,
)
from protocols.executor import Backend, Executor, make_executor
from protocols.files import NO_SPACE, is_no_space, private_dir
from protocols.ids import state_path
from protocols.roles import Party, Role
from protocols.transport.base import Channel
from psi.canon import IdType
from psi.result import read_result
from vfl.common.jobfile import TypedJob
from vfl.common.seeds import RunSeeds
from vfl.config import JobType, PartyConfig
from vfl.service.alignment import run_psi
from vfl.service.audit import AuditEvent, AuditLog
from vfl.service.owners import JobOwners
from vfl.service.requests import AdminCommand, PsiRequest

logger = logging.getLogger(__name__)

DATA_CHECK_FILE = "data_check.json"  # a party's data checks for a job, in its job folder

F = TypeVar("F")

AdminHandler = Callable[[dict[str, Any]], dict[str, Any]]


def retryable(exc: BaseException) -> bool:
    """Whether a new run of a job may succeed where this one failed (lifecycle step 2 of
    :mod:`vfl.service.runner`): not after a refusal under an acceptance policy."""
    if isinstance(exc, JobRefusedError):
        return False
    return isinstance(exc, TransportError | TimeoutError | PolicyViolationError)


class RunSession(Protocol):
    """What the runner needs of a run in progress (any kind's session)."""

    @property
    def run_id(self) -> str:
        """The run's id (empty before it began)."""

    @property
    def key_id(self) -> str | None:
        """Hex id of the arbiter's key once fetched, for audit records."""

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""

    def stop(self) -> None:
        """End the run: its receives raise :class:`~protocols.errors.RunAbortedError`."""


@dataclass(frozen=True)
class GuestAttempt(Generic[F]):
    """One run of a guest's job, as the runner hands it to the job's driver.

    Parameters
    ----------
    job
        The typed job.
    started
        Call with the run's session as soon as it exists (the runner stops it on a
        ``RUN_STOPPED``, a cancel, a full state folder or the service stop; at once if one
        came first).
    after_step
        The test hold (``hold_at_step``), called after each training step; ``None`` without.
    """

    job: TypedJob[F]
    started: Callable[[RunSession], None]
    after_step: Callable[[int], None] | None = None


class ServiceContext:
    """What the runner gives its drivers: the service's shared state and resources.

    Parameters
    ----------
    config
        This party's configuration.
    channel
        The service's channel.
    executor
        Worker processes for the Paillier work on the critical path.
    audit
        The party's audit log.
    """

    def __init__(
        self, *, config: PartyConfig, channel: Channel, executor: Executor, audit: AuditLog
    ) -> None:
        self.config, self.channel, self.executor, self.audit = config, channel, executor, audit
        self.stopping = threading.Event()  # set once the service stops (lifecycle step 5)
        self.arbiter: ArbiterService | None = None  # the arbiter's decryption service
        self.owners = JobOwners(state_dir=config.state_dir)  # whose job each id is (H; A: FedAvg)
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._job_locks: dict[str, threading.Lock] = {}
        self._guest_failed: dict[str, str] = {}  # H: jobs whose guest reported R3, and why
        self._background: Executor | None = None

    # -- job states (admin ``status``) ---------------------------------------------------

    def update(self, job_id: str, **fields: Any) -> None:
        """Merge ``fields`` into the job's status."""
        with self._lock:
            self._jobs.setdefault(job_id, {}).update(fields)

    def begin(self, job_id: str, **fields: Any) -> bool:
        """Set the job's status to ``fields`` unless it is shown running (then ``False``)."""
        with self._lock:
            if self._jobs.get(job_id, {}).get("state") == "running":
                return False
            self._jobs[job_id] = dict(fields)
            return True

    def refused(self, job_id: str, error: str) -> None:
        """A START of the job was refused: shown ``refused``, unless a run of it is shown
        ``running`` (that run goes on, and its guest may still report it failed)."""
        with self._lock:
            state = self._jobs.setdefault(job_id, {})
            if state.get("state") != "running":
                state.update(state="refused", phase="refused", error=error[:500])

    def state(self, job_id: str) -> dict[str, Any]:
        """A copy of the job's status (empty if unknown)."""
        with self._lock:
            return dict(self._jobs.get(job_id, {}))

    def states(self) -> dict[str, dict[str, Any]]:
        """A copy of every job's status."""
        with self._lock:
            return {job_id: dict(state) for job_id, state in self._jobs.items()}

    # -- whose job an id is (docs/protocol.md §4.4.1) -------------------------------------

    def claim(self, job_id: str, *, guest: str, kind: JobType, record: bool = True) -> None:
        """Check a guest's ``START`` of ``kind`` under ``job_id`` before anything of the job
        is stopped or touched: refused if the id belongs to another guest or kind (logged
        and audited here, with the owner; its peer reason names the rule only); if the id
        is free, ``record`` and this party's ``[accept]`` admits ``guest`` for ``kind``, it
        is theirs from now on (:mod:`vfl.service.owners`).

        Raises
        ------
        JobIdInUseError
            The id is another guest's or another kind's. Answer with its peer reason,
            and touch neither the job's status nor its runs.
        DataError
            The record cannot be written (:class:`NoSpaceError` if the folder is full;
            either's peer reason is safe to send).
        """
        keep = record and self.config.accept.admits(guest, kind)
        try:
            self.owners.claim(job_id, guest=guest, kind=kind, record=keep)
        except JobIdInUseError as exc:
            logger.warning("refused a %s START of job %s: %s", kind.value, job_id, exc)
            self.audit.record(
                event=AuditEvent.JOB_REFUSED, job_id=job_id, submitter=guest, reason=str(exc)
            )
            raise
        except OSError as exc:
            logger.error("job %s: cannot record its owner: %s", job_id, exc)
            party = self.config.party.party_id
            if is_no_space(exc):
                raise NoSpaceError(
                    f"{NO_SPACE} in {self.config.state_dir}: {exc}",
                    public=f"{NO_SPACE} in {party}'s state folder; its operator must free space",
                ) from None
            raise DataError(
                f"cannot record job {job_id}'s owner: {exc}",
                public=f"{party} cannot record the job (details in its own log)",
            ) from None

    # -- job folders and locks -----------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """``<state_dir>/jobs/<job_id>``, made 0700 if missing; refused
        (:class:`~protocols.ids.UnsafePathError`) unless ``job_id`` is an identifier and the
        folder stays in the state folder (docs/protocol.md §2.9)."""
        return private_dir(state_path(self.config.state_dir, "jobs", job_id))

    def job_lock(self, job_id: str) -> threading.Lock:
        """The lock that orders a job's runs and run numbers at this party."""
        with self._lock:
            return self._job_locks.setdefault(job_id, threading.Lock())

    def background(self) -> Executor:
        """Low-priority workers that fill obfuscator pools with otherwise idle CPU time (on a
        Ray cluster: the party's own actors, which the protocol steps share)."""
        if self.config.executor.backend is Backend.RAY:
            return self.executor
        with self._lock:
            if self._background is None:
                self._background = make_executor(self.config.executor, nice=10)
            return self._background

    def peer(self, role: Role) -> Party:
        """The configured peer of ``role``."""
        return self.config.peer_with_role(role)

    def party_seed(self, purpose: str, *, scope: str) -> int | None:
        """This party's own seed for ``purpose`` in a job (``scope``, :func:`job_scope`) from
        its ``[random] seed``, keyed by its local secret (:mod:`vfl.common.seeds`); None
        without one (the OS CSPRNG)."""
        if self.config.seed is None:
            return None
        seeds = RunSeeds.at(self.config.state_dir, self.config.seed, scope=scope)
        return seeds.integer(purpose)

    # -- PSI ---------------------------------------------------------------------------

    def run_psi(self, request: PsiRequest) -> dict[str, Any]:
        """Run a PSI with the host as its guest (:func:`vfl.service.alignment.run_psi`)."""
        return run_psi(
            config=self.config, channel=self.channel, executor=self.executor, request=request
        )

    def ensure_psi(
        self,
        *,
        job_id: str,
        psi_job: str,
        guest_data: str,
        host_data: str,
        id_column: str,
        id_type: str,
    ) -> str:
        """The job's PSI result: ``psi_job`` if the job names one, else ``<job>.psi``, run
        now (once) with the host, which uses its own ``[psi]`` columns."""
        name = psi_job or f"{job_id}.psi"
        if not psi_job and not self._has_psi(name):
            self.update(job_id, phase="psi")
            self.run_psi(
                PsiRequest(
                    peer=self.peer(Role.HOST).party_id,
                    data=guest_data,
                    host_data=host_data,
                    id_column=id_column,
                    id_type=IdType(id_type),
                    job_id=name,
                )
            )
        return name

    def _has_psi(self, psi_job: str) -> bool:
        try:
            read_result(self.config.state_dir, psi_job)
        except (VflError, OSError, ValueError):
            return False
        return True

    # -- a guest's R3 at H ---------------------------------------------------------------

    def mark_guest_failed(self, job_id: str, reason: str) -> None:
        """R3: the job's guest said the job failed for good."""
        with self._lock:
            self._guest_failed[job_id] = reason

    def new_peer_run(self, job_id: str) -> None:
        """A new run of the job starts here (its guest resubmitted it): R3 no longer holds."""
        with self._lock:
            self._guest_failed.pop(job_id, None)

    def peer_run_failed(
        self, job_id: str, *, submitter: str, exc: BaseException, stopped: bool, what: str
    ) -> None:
        """A peer-side run of ``what`` (FedAvg, FTL) ended with ``exc``: interrupted if it
        was stopped (a newer run, or the service stop), else failed, in the status and the
        audit log; nothing if its guest's R3 recorded it failed already."""
        error = f"{type(exc).__name__}: {exc}"[:500]
        with self._lock:
            guest_failed = job_id in self._guest_failed
        if guest_failed:  # R3 recorded it failed already; the stop was its consequence
            return
        if stopped or self.stopping.is_set():
            self.update(job_id, state="interrupted", phase="stopped")
            return
        logger.error("%s job %s failed here: %s", what, job_id, error)
        self.audit.record(
            event=AuditEvent.JOB_FAILED, job_id=job_id, submitter=submitter, reason=error
        )
        self.update(job_id, state="failed", phase="failed", error=error)

    def close(self) -> None:
        """Stop the background workers."""
        with self._lock:
            background, self._background = self._background, None
        if background is not None:
            background.close()


class Driver(ABC):  # noqa: B024 - every hook has a default; kind is the one requirement
    """One kind of work with peers, as a party service runs it.

    Subclasses set :attr:`kind` and :attr:`tags`, and override the hooks their kind needs.
    """

    kind: ClassVar[JobType]
    tags: ClassVar[tuple[type[StrEnum], ...]] = ()  # message tags of its protocols

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def serve(self) -> None:  # noqa: B027 - optional hook
        """Register the handlers of peers' messages this party answers (by its role)."""

    def commands(self) -> Mapping[AdminCommand, AdminHandler]:
        """The admin commands of this kind (e.g. ``psi``, ``score``)."""
        return {}

    def start(self) -> None:  # noqa: B027 - optional hook
        """Once the service listens (e.g. notices about runs a stop interrupted)."""

    def guest_failed(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """R3: the job's guest says it failed for good: stop the peer-side run of it."""

    def peer_runs(self) -> int:
        """Peer-side runs going now that the space probe watches (lifecycle step 7)."""
        return 0

    def out_of_space(self, error: str) -> None:  # noqa: B027 - optional hook
        """The state folder is full: stop those runs (``error`` names the folder)."""

    def status(self) -> dict[str, dict[str, Any]]:
        """Job states this driver keeps itself (beyond the context's table)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop every run of this kind (service stop) and release its resources."""


class JobDriver(Driver, Generic[F]):
    """A kind of job the guest's operator submits (``train``) and the runner runs in attempts."""

    @classmethod
    @abstractmethod
    def parse(
        cls, raw: dict[str, Any], *, source: str, party_id: str, allow_plaintext: bool
    ) -> TypedJob[F]:
        """The job file ``raw`` (TOML or its canonical JSON) as a typed job; ``party_id``
        is the submitting party's id (``ConfigError`` naming ``source`` and the key)."""

    @abstractmethod
    def attempt(self, attempt: GuestAttempt[F]) -> dict[str, Any]:
        """Run the job once at the guest; return the outcome's fields (``outcome.json``)."""

    def retry(self, job: F, exc: BaseException) -> bool | None:
        """Whether a run that failed with ``exc`` is followed by a new one, if this kind
        decides it (``None``: the runner's rule, :func:`retryable`)."""
        return None

    def failure_peers(self, job: F) -> tuple[Party, ...]:
        """Who the guest tells that the job failed for good (R3): the host and the arbiter."""
        return (self.ctx.peer(Role.HOST), self.ctx.peer(Role.ARBITER))

    def audit_fields(self, job: F) -> dict[str, Any]:
        """Fields of the ``job_submitted`` record: the job's other data party."""
        return {"host": self.ctx.peer(Role.HOST).party_id}
