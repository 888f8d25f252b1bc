"""All three roles of a split-NN job in one process (experiments, benchmarks, notebooks).

The sessions of the services (:mod:`vfl.splitnn.guest`, :mod:`vfl.splitnn.host`) over
in-memory channels with the real arbiter service and a fresh Paillier key
(:mod:`vfl.common.inprocess`). Data never leaves the process, so this is for a bank's ML
engineer trying models on data it may hold in full, not for two silos.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocols.arbiter.service import SetupTag
from protocols.crypto.paillier import PublicKey
from protocols.crypto.policy import DecryptionPolicy
from protocols.errors import ProtocolError
from protocols.executor import Executor
from protocols.roles import Party, Role
from vfl.common.decision import DecisionConfig
from vfl.common.inprocess import InProcess, InProcessResult
from vfl.common.seeds import simulation_secret
from vfl.data.tables import PartyTable, Splits
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.host import HostSession
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobTag, Progress, SplitJob, SplitResult
from vfl.splitnn.session import wait_job_start
from vfl.splitnn.spec import DecTag, JobSpec
from vfl.splitnn.training import HostObserver, HostTrainer

GUEST = Party("guest", Role.GUEST)
HOST = Party("host", Role.HOST)
ARBITER = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class SplitRun(InProcessResult):
    """The guest's result, the host's final trainer, the arbiter's decryptions per tag and
    its public key (each party's saved model is in ``<state_dir>/<party>/models/<job id>``)."""

    result: SplitResult
    host: HostTrainer
    decryptions: dict[str, int]
    public_key: PublicKey


def run_in_process(
    *,
    job: SplitJob,
    guest_table: PartyTable,
    host_table: PartyTable,
    splits: Splits,
    state_dir: Path | None = None,
    executor: Executor | None = None,
    key_bits: int = 2048,
    allow_test_key: bool = False,
    seed: int | None = None,
    w0_seed: int | None = None,
    order_seed: bytes | None = None,
    host_seed: int | None = None,
    timeout: float = 3600.0,
    pool_executor: Executor | None = None,
    policy: DecryptionPolicy | None = None,
    host_observer: HostObserver | None = None,
    progress: Callable[[Progress], None] | None = None,
    decision: DecisionConfig | None = None,
) -> SplitRun:
    """Run ``job`` between an in-process guest, host and arbiter; raise if any party fails.

    Parameters
    ----------
    job, guest_table, host_table, splits
        The job, each party's rows in the PSI order, and the guest's row splits.
    state_dir, executor
        See :class:`~vfl.common.inprocess.InProcess` (default: a temporary folder, deleted at
        the end, and a local process pool).
    key_bits, allow_test_key
        The arbiter's fresh key; below 2048 bits only with ``allow_test_key`` (tests).
    seed
        The guest's job seed (:class:`~vfl.splitnn.guest.GuestSession`; None: a fresh one).
    w0_seed, order_seed, host_seed
        Raw seeds for experiments that compare with the float reference (None: from the
        guest's job seed, and for the host the OS CSPRNG).
    timeout
        Seconds each party waits for a message, and for the whole job.
    pool_executor
        Workers that fill the obfuscator pools (default: ``executor``).
    policy
        The arbiter's decryption policy (default: a new one in memory).
    host_observer
        Called with the host's view after each training step (audits).
    progress
        Called after every guest step and validation (default: a log line every 10 s).
    decision
        How the guest turns a binary model's scores into probabilities and decisions at J7
        (calibration and threshold fitted on the validation rows; :mod:`vfl.common.decision`);
        None: the default :class:`~vfl.common.decision.DecisionConfig`.
    """
    tags = [SplitTag, DecTag, SetupTag, JobTag]
    with InProcess(
        parties=(GUEST, HOST, ARBITER), tags=tags, state_dir=state_dir, executor=executor
    ) as run:
        service, public_key = run.serve_arbiter(
            party_id=ARBITER.party_id,
            tags=[DecTag],
            policy_of=lambda obj: JobSpec.from_json(obj).policy(),
            key_bits=key_bits,
            allow_test_key=allow_test_key,
            policy=policy,
        )
        host_channel = run.channels[HOST.party_id]
        host = HostSession(
            channel=host_channel,
            guest=GUEST,
            arbiter=ARBITER,
            table_for=lambda _: host_table,
            executor=run.executor,
            state_dir=run.state(HOST.party_id),
            seed=host_seed,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
            observer=host_observer,
        )
        if seed is not None:  # one process holds every party: repeatable in a new folder
            simulation_secret(run.state(GUEST.party_id), seed=seed)
        guest = GuestSession(
            channel=run.channels[GUEST.party_id],
            host=HOST,
            arbiter=ARBITER,
            job=job,
            table=guest_table,
            splits=splits,
            executor=run.executor,
            state_dir=run.state(GUEST.party_id),
            seed=seed,
            w0_seed=w0_seed,
            order_seed=order_seed,
            timeout=timeout,
            allow_test_key=allow_test_key,
            pool_executor=pool_executor,
            progress=progress,
            decision=decision,
        )
        started = time.monotonic()
        out = run.run(
            {
                "guest": guest.run,
                "host": lambda: host.run(wait_job_start(host_channel, timeout=timeout)),
            },
            timeout=timeout,
        )
        result, trainer = out["guest"], out["host"]
        if not isinstance(result, SplitResult) or not isinstance(trainer, HostTrainer):
            raise ProtocolError(f"job {job.job_id}: a party ended without its result")
        return SplitRun(
            job_id=job.job_id,
            seconds=time.monotonic() - started,
            result=result,
            host=trainer,
            decryptions=service.policy.counts(job.job_id),
            public_key=public_key,
        )
