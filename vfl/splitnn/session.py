"""A split-NN training job between the guest, the host and the arbiter (docs/protocol.md §4.4.1).

Roles and keys: the arbiter A holds the Paillier key pair and hands out the public key; the
guest G (labels, its features) drives the job; the host H (its features) follows. What each
party learns is §4.6 plus, at H, the row indices of every batch and evaluation batch, which
rows are used to fit preprocessing, and one bit per epoch (validation improved or not, so
both can keep the best model). Nothing else crosses the wire in plaintext.

Job sequence (every message carries the run id of this (re)start, §4.4.1; the session's
:class:`~protocols.link.JobLink` fills it in, and the arbiter's steps J1, J3, J4 and J8 are A1-A4
of :class:`~protocols.arbiter.client.ArbiterClient`):

J1. G and H → A ``KEY_REQ``; A → ``KEY`` (the public key).
J2. G → H ``JOB_START{job, run id, G's checkpoints, schedule}`` and ``FIT_ROWS`` (the
    training rows, so H fits its preprocessing on them only); H checks the schedule against
    its own row counts (:meth:`Schedule.check_at_host`) and the job against its acceptance
    policy (its ``accept`` hook: guest, data alias, shapes, protection mode, then its
    column count and the arbiter's key size) and answers ``JOB_ACCEPT{H's checkpoints}``
    or ``JOB_ACCEPT{refused: reason}`` with the rule only (docs/protocol.md §1.7; G raises
    :class:`JobRefusedError`, not retried).
J3. G and H → A ``JOB_SPEC``; A → ``JOB_READY`` once both sent the same (policy, §2.6), or
    ``JOB_READY{refused: reason}`` if the job is outside A's own acceptance policy.
J4. Resume point ``t`` = the newest step both still hold. If there is one, both send
    ``RESUME{t, Z_EVAL counter}`` to A (which re-opens those steps once both asked) and load
    checkpoint ``t``; otherwise the joint initialisation I1-I3 and checkpoint 0.
J5. Step ``t``: S1-S6 of :mod:`vfl.splitnn.interactive`. G writes checkpoint ``t+1`` before
    ``STEP_ACK{t}`` and then keeps ``t`` and ``t+1``; H writes ``t+1`` after ``STEP_ACK{t}``
    and then deletes ``t``. So the parties are never more than one step apart.
J6. After each epoch, validation (``EVAL_BATCH``/``EVAL_F1``/``Z_EVAL``) and the metrics at G;
    if the validation AUC improved, G → H ``BEST{epoch}`` and both snapshot their checkpoint.
    Training stops early after ``patience`` epochs without improvement.
J7. G → H ``USE_BEST``; both restore the best snapshot; G evaluates the held-out test rows
    (never used before), writes ``result.json``, and sends ``JOB_END``.
J8. G and H → A ``JOB_DONE``; A closes the job and registers its model for scoring once
    both sent it (P7 of :mod:`protocols.crypto.policy`).

Outside a run (the services, :mod:`vfl.service.runner` and :mod:`vfl.service.drivers.splitnn`):

R1. H → G ``RUN_STOPPED{run id, reason}`` when H's service starts again after it stopped
    during a run (reason ``restarted``; not sent once G has started a run with the new H)
    or when H's part of a run failed (``failed``, with the error and whether a new run may
    help). G stops its current run (for ``failed`` only if it is the one named) and starts
    a new one (J1-J4 again with a new run id: both resume from their checkpoints) instead
    of waiting for its receive timeout. Its step is a fresh run number of H (never a replay).
R2. A session's :meth:`PartySession.stop` ends its run: every receive of that run raises
    :class:`RunAbortedError` (a newer run of the same job replaces it, or the service stops).
R3. G → H and A ``JOB_FAILED{run id, reason}`` when G's job failed for good (not when it is
    only interrupted or retried): H stops its run of the job and, like A, records the job
    as failed with G's peer-safe reason, so no party shows it running. Its step is a fresh
    run number of G.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.arbiter.client import ArbiterClient
from protocols.arbiter.service import ArbiterService
from protocols.crypto.cipher import Cipher, PaillierCipher, PlaintextCipher
from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.crypto.obfuscators import ObfuscatorPool, PlaintextPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy, JobPolicy
from protocols.envelope import Envelope
from protocols.errors import (
    RunAbortedError,
)
from protocols.executor import Executor
from protocols.files import atomic_write, private_dir
from protocols.link import JobLink
from protocols.roles import Party
from protocols.transport.base import Channel, MessageFilter
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import PartyTable
from vfl.splitnn.job import DONE_WAIT_S, JobTag, Progress, SplitJob
from vfl.splitnn.saved import config_to_json, save_model
from vfl.splitnn.spec import DecTag, JobSpec

logger = logging.getLogger(__name__)


@dataclass
class PartySession:
    """Plumbing shared by both sessions."""

    ROLE: ClassVar[str] = ""  # "guest" or "host": the saved model's role

    channel: Channel
    peer: Party
    arbiter: Party
    executor: Executor
    state_dir: Path
    timeout: float
    allow_test_key: bool
    pool_executor: Executor | None = None

    def __post_init__(self) -> None:
        self.run_id = ""
        self.job_id = ""
        self.key_id = ""  # hex id of the arbiter's key once fetched (J1), for audit logs
        self._stop_lock = threading.Lock()
        self.stopped = False

    def stop(self) -> None:
        """R2: end this session's run; its receives raise :class:`RunAbortedError`.

        Safe from any thread, also before the run has started (it then stops at once).
        """
        with self._stop_lock:
            self.stopped = True
            job_id, run_id = self.job_id, self.run_id
        if job_id and run_id:
            dropped = self.channel.abort_run(job_id, run_id)
            logger.info(
                "job %s run %s stopped (%d unread messages dropped)", job_id, run_id, dropped
            )

    def _begin(self, job_id: str, run_id: str) -> None:
        """Set the run's ids and its link; a :meth:`stop` that came first takes effect now."""
        with self._stop_lock:
            self.job_id, self.run_id = job_id, run_id
            stopped = self.stopped
        if stopped:
            self.channel.abort_run(job_id, run_id)
            raise RunAbortedError(f"job {job_id} run {run_id} was stopped before it started")
        self.link = JobLink(
            channel=self.channel, job_id=job_id, run_id=run_id, timeout=self.timeout
        )
        self.arbiter_client = ArbiterClient(
            link=self.link, arbiter=self.arbiter, allow_test_key=self.allow_test_key
        )

    def public_key(self) -> PublicKey:
        """J1 (A1 of :mod:`protocols.arbiter.client`)."""
        key = self.arbiter_client.public_key()
        self.key_id = key.key_id.hex()
        return key

    def resume_at_arbiter(self, step: int, eval_step: int) -> None:
        """J4: both parties ask A to re-open the steps they will run again (A3)."""
        self.arbiter_client.resume(step=step, tag_steps={DecTag.Z_EVAL.value: eval_step})

    def finish_at_arbiter(self) -> None:
        """J8: both parties tell A the job is over; A closes it (no further decryption) and
        registers its model for scoring (P7 of :mod:`protocols.crypto.policy`). A model A
        did not register cannot be scored, which the log says; the job's result stands."""
        self.arbiter_client.finish(timeout=min(self.timeout, DONE_WAIT_S))

    def _preprocess(self, job_dir: Path, table: PartyTable, fit_rows: np.ndarray) -> np.ndarray:
        """Fit scaling/imputation on the training rows only; keep it with the job's model."""
        pre = Preprocessor.fit(table, fit_rows)
        self.preprocessor = pre
        private_dir(job_dir)
        atomic_write(job_dir / "preprocessing.json", json.dumps(pre.to_json()).encode(), mode=0o600)
        return pre.transform(table)

    def export(
        self,
        *,
        job: SplitJob,
        spec: JobSpec,
        module: torch.nn.Module,
        big_ints: dict[str, np.ndarray],
        data: dict[str, Any],
        metrics: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Save this party's part of the trained model for scoring (model id = job id);
        ``extra`` adds this party's own fields to its manifest (the guest's seed, decision)."""
        role = self.ROLE
        manifest = {
            "job_id": job.job_id,
            "role": role,
            "party": self.channel.me.party_id,
            "peer": self.peer.party_id,
            "arbiter": self.arbiter.party_id,
            "columns": list(self.preprocessor.input_columns),
            "preprocessing": self.preprocessor.to_json(),
            "train": config_to_json(job.train),
            "spec": spec.to_json(),
            "fixed_point": asdict(FixedPointConfig()),
            "key_id": spec.key_id,
            "key_bits": spec.key_bits,
            "encrypted": job.encrypted,
            "metrics": metrics or {},
            "data": data,
            **(extra or {}),
        }
        folder = save_model(
            state_dir=self.state_dir,
            model_id=job.job_id,
            manifest=manifest,
            module=module,
            big_ints=big_ints,
        )
        logger.info("job %s: %s part of the model saved in %s", job.job_id, role, folder)

    def pool(self, key: PublicKey, *, encrypted: bool) -> ObfuscatorPool:
        if encrypted:
            return ObfuscatorPool(key, executor=self.pool_executor or self.executor)
        return PlaintextPool(key, executor=self.executor)

    def cipher(self, key: PublicKey, *, encrypted: bool) -> Cipher:
        if encrypted:
            return PaillierCipher(key)
        return PlaintextCipher(key, i_understand_nothing_is_encrypted=True)

    def next_run(self, job_dir: Path) -> int:
        """Count this party's (re)starts of the job, persisted before anything is sent.

        Sequence numbers of run ``r`` start at ``r·2^40``, past anything an interrupted run
        may have sent (the receivers' replay guards remember those).
        """
        return claim_run(self.channel, job_dir, (self.peer, self.arbiter))


def claim_run(channel: Channel, job_dir: Path, receivers: Iterable[Party]) -> int:
    """Persist the next run number of the job in ``job_dir`` and move the channel's sequence
    numbers to ``runs·2^40`` for ``receivers`` (see :meth:`PartySession.next_run`); the services
    also claim one for each ``RUN_STOPPED`` notice, which may follow a restart."""
    private_dir(job_dir)  # jobs/ holds shares too
    path = job_dir / "runs"
    runs = int(path.read_text()) + 1 if path.is_file() else 1
    atomic_write(path, f"{runs}\n".encode(), mode=0o600)
    for party in receivers:
        channel.restore_stream_state(job_dir.name, {party.party_id: runs << 40})
    return runs


def resume_point(guest_steps: list[int], host_steps: list[int]) -> int | None:
    """The newest step both parties hold a checkpoint of (§4.4.1), if any."""
    common = set(guest_steps) & set(host_steps)
    return max(common) if common else None


def serve_decryptions(
    *,
    channel: Channel,
    public_key: PublicKey,
    private_key: PrivateKey,
    executor: Executor,
    key_file: Path | None = None,
    admit: Callable[[dict[str, Any], Party], None] | None = None,
    policy_of: Callable[[dict[str, Any]], JobPolicy] | None = None,
    tags: Iterable[type[StrEnum]] = (DecTag,),
    policy: DecryptionPolicy | None = None,
) -> ArbiterService:
    """The arbiter's part of jobs: key, JOB_SPEC, RESUME and masked decryptions of ``tags``.

    ``admit(spec_body, sender)`` is the arbiter's acceptance policy for JOB_SPECs (see
    :meth:`ArbiterService.serve_setup`); ``policy_of`` derives a job's decryption policy
    from its JOB_SPEC (default: a split-NN spec); ``key_file``: the workers load the key
    from this file instead of receiving it (see :class:`ArbiterService`); ``policy``: the
    policy to enforce (default: a new one kept in memory only).
    """
    service = ArbiterService(
        channel=channel,
        cipher=PaillierCipher(public_key),
        private_key=private_key,
        policy=policy or DecryptionPolicy(),
        executor=executor,
        key_file=key_file,
    )
    for enum_cls in tags:
        service.serve(enum_cls)
    service.serve_setup(policy_of or (lambda obj: JobSpec.from_json(obj).policy()), admit=admit)
    return service


def wait_job_start(channel: Channel, *, timeout: float) -> Envelope:
    """The next ``JOB_START`` any guest sends (for hosts run outside a service)."""
    return channel.recv_any(MessageFilter.for_tags(JobTag.JOB_START), timeout=timeout)


def log_progress(every_s: float = 10.0) -> Callable[[Progress], None]:
    last = [0.0]

    def report(p: Progress) -> None:
        now = time.monotonic()
        if p.validation is None and now - last[0] < every_s and p.step < p.total_steps:
            return
        last[0] = now
        if p.validation is None:
            logger.info(
                "job %s epoch %d/%d step %d/%d: %.0f rows/s, ETA %.0f s, loss %.4f",
                p.job_id,
                p.epoch + 1,
                p.epochs,
                p.step,
                p.total_steps,
                p.rows_per_s,
                p.eta_s,
                p.loss,
            )

    return report
