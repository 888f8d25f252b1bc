"""One job at the guest across its runs (lifecycle steps 2, 6 and 7 of :mod:`vfl.service.runner`).

Roles: the guest G only. A :class:`GuestJob` runs its job's attempts through the job's
driver (:meth:`vfl.service.driver.JobDriver.attempt`) in a thread of its own until the job is
done, fails for good, is cancelled by G's operator, or the service stops: a failed run is
followed by a new one after ``RETRY_DELAYS_S`` (at most ``RETRY_LIMIT`` in a row without
progress), or after ``NO_SPACE_DELAYS_S`` while a state folder is full (for up to
``NO_SPACE_PATIENCE_S``, not counted as retries); a job over for good gets its
``outcome.json`` (:func:`finish`) and, but for the kinds whose aggregator tells the clients
itself, G's ``JOB_FAILED`` to H and A (R3, :func:`vfl.service.notices.tell_failed`) with the
peer-safe reason only (docs/protocol.md §1.7). Nothing here is sent otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from protocols.errors import RunAbortedError, peer_reason
from protocols.files import NO_SPACE, atomic_write, is_no_space, no_space_error
from protocols.ids import state_path
from vfl.service.audit import AuditEvent
from vfl.service.driver import GuestAttempt, JobDriver, RunSession, ServiceContext, retryable
from vfl.service.notices import RunStop, tell_failed
from vfl.service.requests import TrainRequest

logger = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"  # G: done or failed for good (not resubmitted on start)
RETRY_LIMIT = 6
RETRY_DELAYS_S = (2.0, 5.0, 10.0, 20.0, 40.0, 60.0)
NO_SPACE_DELAYS_S = (2.0, 5.0, 10.0, 15.0)  # G's new runs while a state folder is full
NO_SPACE_PATIENCE_S = 86400.0  # how long G keeps trying before the job fails for good
CANCELLED = "cancelled by its operator"


def finish(ctx: ServiceContext, job_id: str, *, state: str, **fields: Any) -> None:
    """Record that the guest's job is over for good (``outcome.json``: not resubmitted on
    start) and show it in its status."""
    ctx.update(job_id, state=state, phase=state, **fields)
    body = {"state": state, "time": time.time(), **fields}
    try:
        atomic_write(ctx.job_dir(job_id) / OUTCOME_FILE, json.dumps(body).encode(), mode=0o600)
    except OSError as exc:
        logger.error(
            "job %s is %s, but %s cannot record it (%s); the job is resubmitted when the "
            "service starts again",
            job_id,
            state,
            ctx.config.state_dir,
            exc,
        )


class _Episode:
    """Counters of a job's runs since its last progress (lifecycle steps 2 and 7)."""

    def __init__(self) -> None:
        self.attempt = 0  # failed runs in a row
        self.full_since: float | None = None  # when runs began to fail for lack of space
        self.full_waits = 0
        self.last_full = ""


class GuestJob:
    """G's bookkeeping and runs of one job.

    Parameters
    ----------
    ctx
        The service's context.
    driver
        The driver of the job's kind.
    request
        The submitted request (its typed job).
    released
        The test hold is over already (admin ``release`` came first).
    """

    def __init__(
        self,
        *,
        ctx: ServiceContext,
        driver: JobDriver[Any],
        request: TrainRequest,
        released: bool = False,
    ) -> None:
        self.ctx, self.driver, self.request = ctx, driver, request
        self.job_id = request.job.job_id
        self.hold_at = request.hold_at_step  # [testing] allow_hold only (checked at submit)
        self.wake = threading.Event()  # cuts a retry's backoff short
        self.release = threading.Event()  # admin `release`: the hold is over (for good)
        if released:
            self.release.set()
        self.cancelled = False  # admin `cancel`: fail the job for good
        self.no_space: str | None = None  # the space probe stopped the current run
        self.peer_full: str | None = None  # H said its folder is full (kept between runs)
        self.session: RunSession | None = None
        self.notice: dict[str, Any] | None = None  # H's RUN_STOPPED for the current run
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"job-{self.job_id}", daemon=True)

    @property
    def running(self) -> bool:
        """Whether its runs are still going (its thread is alive)."""
        return self.thread.is_alive()

    def stop(self, reason: str | None = None) -> None:
        """Stop the current run (the space probe, the service stop); ``reason``: the space
        probe's error (lifecycle step 7)."""
        session = self.session
        if session is not None and self.running and not session.stopped:
            if reason is not None:
                self.no_space = reason
            session.stop()

    def cancel(self, *, announce: Callable[[], None]) -> bool:
        """Admin ``cancel``: stop the current run and fail the job for good; ``False`` if it
        is not running or cancelled already. ``announce`` (the audit record) runs first."""
        with self._lock:
            if not self.running or self.cancelled:
                return False
            announce()
            self.cancelled = True
            session = self.session
        if session is not None:
            session.stop()
        self.wake.set()
        return True

    def _hold(self, step: int) -> None:
        """The ``after_step`` hook of a job submitted with ``hold_at_step`` (tests of
        restarts): after that many steps the run waits, status ``phase = "held"``, until
        admin ``release``; a stop of the run or the service ends the wait (the run is
        then interrupted like any other)."""
        if self.hold_at != step or self.release.is_set():
            return
        logger.info("job %s held after step %d (testing): admin release goes on", self.job_id, step)
        self.ctx.update(self.job_id, phase="held", held_at=step)
        while not self.release.wait(0.2):
            session = self.session
            if self.ctx.stopping.is_set() or (session is not None and session.stopped):
                raise RunAbortedError(f"job {self.job_id} was stopped while held after step {step}")
        self.ctx.update(self.job_id, phase="training")

    def _started(self, session: RunSession) -> None:
        """A run's session exists: the runner may stop it from now on."""
        with self._lock:
            self.session = session
            stop = self.ctx.stopping.is_set() or self.cancelled
        if stop:
            session.stop()

    # -- runs (lifecycle steps 2, 6, 7) --------------------------------------------------

    def _run(self) -> None:
        """Runs until the job is done, fails for good, or the service stops."""
        episode = _Episode()
        attempt = GuestAttempt(
            job=self.request.job,
            started=lambda session: self._started(session),
            after_step=None if self.hold_at is None else lambda step: self._hold(step),
        )
        while not self.cancelled:
            self.notice = None
            self.no_space = None
            self.wake.clear()
            step_before = self.ctx.state(self.job_id).get("step", 0)
            try:
                outcome = self.driver.attempt(attempt)
            except Exception as exc:  # noqa: BLE001 - reported through status and the audit log
                if not self._after_failure(episode, exc, step_before):
                    return
                continue
            self._done(episode, outcome)
            return
        self._fail(episode, error=CANCELLED, public=CANCELLED)

    def _done(self, episode: _Episode, outcome: dict[str, Any]) -> None:
        if episode.full_since is not None:
            self.ctx.update(self.job_id, no_space=None)
        session = self.session
        self.ctx.audit.record(  # before the status says done
            event=AuditEvent.JOB_FINISHED,
            job_id=self.job_id,
            key_id=session.key_id if session is not None else None,
            runs=episode.attempt + 1,
        )
        path = state_path(self.ctx.config.state_dir, "jobs", self.job_id, "result.json")
        finish(self.ctx, self.job_id, state="done", **outcome, result=str(path))

    def _after_failure(self, episode: _Episode, exc: Exception, step_before: int) -> bool:
        """A run failed with ``exc``: ``True`` to start a new run (after its wait), ``False``
        once the job is over here (failed for good, or interrupted by the service stop)."""
        job_id = self.job_id
        if self.ctx.state(job_id).get("step", 0) > step_before:
            episode.attempt = 0  # the run made progress: the retry limit counts from here
            if episode.full_since is not None:  # and space was back for a while
                episode.full_since, episode.full_waits, episode.last_full = None, 0, ""
                self.ctx.update(job_id, no_space=None)
        notice = self.notice
        error = f"{type(exc).__name__}: {exc}"
        public = peer_reason(exc)
        if notice is not None and notice.get("reason") == RunStop.FAILED.value:
            error = public = f"{notice.get('from')} failed: {notice.get('error', 'no reason')}"
        if self.cancelled:
            self._fail(episode, error=CANCELLED, public=CANCELLED)
            return False
        if self.ctx.stopping.is_set():
            logger.info("job %s interrupted by the service stop; resumes on start", job_id)
            self.ctx.update(job_id, state="interrupted", phase="stopped")
            return False
        full = self.no_space or self._no_space(exc, notice) or self.peer_full
        self.peer_full = None
        if full is None and episode.full_since is not None and notice is None and retryable(exc):
            # a party whose folder is full may fail otherwise too (its transport cannot
            # journal what it receives): still the same episode
            full = f"{episode.last_full} (since then: {error[:200]})"
        if full is not None:  # this party's, the host's or the arbiter's folder
            if time.monotonic() - (episode.full_since or time.monotonic()) < NO_SPACE_PATIENCE_S:
                return self._wait_for_space(episode, full)
            error = full
        elif episode.full_since is not None:
            episode.full_since, episode.full_waits, episode.last_full = None, 0, ""
            self.ctx.update(job_id, no_space=None)
        if notice is not None:
            again = notice.get("reason") == RunStop.RESTARTED.value or bool(
                notice.get("retry", False)
            )
        else:
            again = retryable(exc)
        verdict = self.driver.retry(self.request.job.file, exc)
        if verdict is not None:
            again = verdict
        if not again or episode.attempt >= RETRY_LIMIT:
            logger.debug("%s", traceback.format_exc())
            self._fail(episode, error=error, public=public)
            return False
        episode.attempt += 1
        restarted = notice is not None and notice.get("reason") == RunStop.RESTARTED.value
        delay = 0.0 if restarted else RETRY_DELAYS_S[min(episode.attempt, len(RETRY_DELAYS_S)) - 1]
        logger.warning(
            "job %s: run failed (%s); new run (%d of at most %d) in %.0f s",
            job_id,
            error[:300],
            episode.attempt,
            RETRY_LIMIT,
            delay,
        )
        self.ctx.update(job_id, phase="retrying", attempts=episode.attempt, last_error=error[:300])
        self.ctx.audit.record(
            event=AuditEvent.JOB_RETRIED,
            job_id=job_id,
            key_id=self._key_id(),
            reason=error[:500],
            attempt=episode.attempt,
        )
        return self._wait(delay)

    def _wait_for_space(self, episode: _Episode, full: str) -> bool:
        """Lifecycle step 7: a new run after the next of ``NO_SPACE_DELAYS_S``."""
        job_id = self.job_id
        if episode.full_since is None:
            episode.full_since, episode.last_full = time.monotonic(), full
        if not episode.full_waits:
            self.ctx.audit.record(
                event=AuditEvent.JOB_RETRIED,
                job_id=job_id,
                key_id=self._key_id(),
                reason=full[:500],
                attempt=episode.attempt + 1,
            )
        episode.full_waits += 1
        delay = NO_SPACE_DELAYS_S[min(episode.full_waits, len(NO_SPACE_DELAYS_S)) - 1]
        logger.error("job %s stopped: %s; new run in %.0f s", job_id, full, delay)
        self.ctx.update(job_id, phase="waiting_for_space", last_error=full[:500], no_space=full)
        return self._wait(delay)

    def _wait(self, delay: float) -> bool:
        """Wait before the next run (a notice or a cancel cuts it short); ``False`` if the
        service stops meanwhile."""
        self.wake.wait(delay)
        if self.ctx.stopping.is_set() and not self.cancelled:
            self.ctx.update(self.job_id, state="interrupted", phase="stopped")
            return False
        return True

    def _key_id(self) -> str | None:
        return self.session.key_id if self.session is not None else None

    def _fail(self, episode: _Episode, *, error: str, public: str) -> None:
        """The job failed for good (or was cancelled): audit, outcome, R3 to its peers."""
        job_id = self.job_id
        logger.error("job %s failed: %s", job_id, error)
        self.ctx.audit.record(  # before the status says failed
            event=AuditEvent.JOB_FAILED,
            job_id=job_id,
            key_id=self._key_id(),
            reason=error[:500],
            attempts=episode.attempt + 1,
        )
        finish(self.ctx, job_id, state="failed", error=error[:500])
        receivers = self.driver.failure_peers(self.request.job.file)
        if receivers:
            session = self.session
            body = {"run_id": session.run_id if session is not None else "", "reason": public[:300]}
            tell_failed(self.ctx, job_id, receivers, body)

    def _no_space(self, exc: BaseException, notice: dict[str, Any] | None) -> str | None:
        """The error to report if a run stopped because a state folder is full: this
        party's own (named), or the host's or the arbiter's as they reported it."""
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, OSError) and is_no_space(cause):
                what = f"{self.ctx.config.party.party_id}'s state folder"
                return str(no_space_error(self.ctx.config.state_dir, cause, what=what))
            cause = cause.__cause__ or cause.__context__
        if notice is not None and notice.get("no_space"):
            return f"{notice.get('from')} stopped: {notice.get('error', NO_SPACE)}"
        if is_no_space(exc):
            return f"{type(exc).__name__}: {exc}"
        return None
