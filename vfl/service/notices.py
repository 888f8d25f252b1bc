"""The notices services send each other outside a run (docs/protocol.md §4.4.1; R1 and R3 of
:mod:`vfl.splitnn.session`), for every vertical job (split NN and transfer).

Roles: H (and A) tell G that a run of its job ended early (``RUN_STOPPED{run_id, reason}``,
R1: ``restarted``, ``failed`` with H's peer-safe error and whether a new run may help,
``no_space``); G tells H and A that the job failed for good (``JOB_FAILED{run_id, reason}``,
R3). Neither carries data: a reason is :func:`protocols.errors.peer_reason` of the error or a
rule text (§1.7), and a full folder is signalled by the ``no_space`` flag, never by the text.

Each notice's step is a fresh run number of its sender (:func:`claim_run`), or the clock's
microseconds where there is none to claim (an arbiter, a full folder), so it is never taken
for a replay of an earlier one (§2.9). Senders retry for a while (:func:`keep_trying`): the
receiver may itself be restarting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from protocols.envelope import Envelope, control_of
from protocols.errors import VflError
from protocols.link import JobLink
from protocols.roles import Party
from vfl.service.driver import ServiceContext
from vfl.splitnn.job import JobTag
from vfl.splitnn.session import claim_run

logger = logging.getLogger(__name__)

FAILED_NOTICE_S = 60.0  # how long G keeps trying to tell H and A that a job failed (R3)
MAX_DELAY_S = 10.0

NOTICE_TAGS = JobTag  # the enum of the notices' tags (split-NN's job tags, R1 and R3)
RUN_STOPPED = JobTag.RUN_STOPPED
JOB_FAILED = JobTag.JOB_FAILED


class RunStop(StrEnum):
    """Why a run ended early (``RUN_STOPPED``): H restarted or failed (R1), or A or H cannot
    write its state folder (lifecycle step 7)."""

    RESTARTED = "restarted"
    FAILED = "failed"
    NO_SPACE = "no_space"


def notice_body(envelope: Envelope) -> dict[str, Any] | None:
    """The JSON of a notice, or ``None`` if it carries none (it is then ignored)."""
    try:
        return control_of(envelope)
    except VflError:
        return None


def clock_step() -> int:
    """A notice's step where no run number can be claimed: the clock's microseconds, past
    every run number (receivers read no step from a notice)."""
    return time.time_ns() // 1000


def send_clocked(ctx: ServiceContext, job_id: str, to: Party, body: dict[str, Any]) -> None:
    """One ``RUN_STOPPED`` on a fresh stream with a clock step (a sender that keeps no
    sequence numbers of its own across restarts, or cannot write them)."""
    ctx.channel.fresh_stream(job_id, (to,))
    JobLink(channel=ctx.channel, job_id=job_id).send(to, RUN_STOPPED, clock_step(), body)


def keep_trying(
    attempt: Callable[[], object], *, stopping: threading.Event, until: float
) -> tuple[bool, BaseException | None]:
    """Call ``attempt`` until it returns, the service stops or the monotonic clock passes
    ``until``, waiting 1, 2, 4, ... (at most ``MAX_DELAY_S``) seconds between tries.

    Returns
    -------
    done, error
        Whether ``attempt`` returned; the last error if it gave up (``None`` on a stop).
    """
    delay = 1.0
    while not stopping.is_set():
        try:
            attempt()
        except (VflError, OSError, ValueError) as exc:
            if time.monotonic() + delay > until:
                return False, exc
            stopping.wait(delay)
            delay = min(2 * delay, MAX_DELAY_S)
            continue
        return True, None
    return False, None


def tell_failed(
    ctx: ServiceContext, job_id: str, receivers: tuple[Party, ...], body: dict[str, Any]
) -> None:
    """R3 at G: ``JOB_FAILED`` to each receiver, retrying for ``FAILED_NOTICE_S`` (in a
    thread of its own)."""

    def send() -> None:
        give_up = time.monotonic() + FAILED_NOTICE_S
        with ctx.job_lock(job_id):  # a fresh run number: never a replay of an earlier one
            number = claim_run(ctx.channel, ctx.job_dir(job_id), receivers)
        link = JobLink(channel=ctx.channel, job_id=job_id)
        for receiver in receivers:
            done, error = keep_trying(
                lambda: link.send(receiver, JOB_FAILED, number, body),  # noqa: B023
                stopping=ctx.stopping,
                until=give_up,
            )
            if done:
                logger.info("job %s: told %s that it failed", job_id, receiver.party_id)
            elif error is not None:
                logger.warning(
                    "job %s: could not tell %s that it failed: %s", job_id, receiver, error
                )

    threading.Thread(target=send, name=f"failed-{job_id}", daemon=True).start()
