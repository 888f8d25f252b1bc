"""G, H and A of an FTL job in one process (experiments, benchmarks, tests).

The sessions of :mod:`vfl.transfer.guest` and :mod:`vfl.transfer.host` over in-memory
channels with the real arbiter service and a fresh Paillier key
(:mod:`vfl.common.inprocess`); data never leaves the process, so this is for trying
models, not for two silos.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from protocols.arbiter.service import SetupTag
from protocols.crypto.paillier import PublicKey
from protocols.errors import ProtocolError
from protocols.executor import Executor
from protocols.roles import Party, Role
from protocols.transport.base import MessageFilter
from vfl.common.inprocess import InProcess, InProcessResult
from vfl.transfer.guest import FtlGuest
from vfl.transfer.host import FtlHost
from vfl.transfer.session import FtlDecTag, FtlJob, FtlResult, FtlSpec, FtlTag

GUEST = Party("guest", Role.GUEST)
HOST = Party("host", Role.HOST)
ARBITER = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class FtlRun(InProcessResult):
    """G's result, H's trained network (``Net^B``) and the scores H received (when H owns
    them), the arbiter's decryptions per tag and its public key."""

    result: FtlResult
    host: nn.Module
    host_scores: np.ndarray | None
    decryptions: dict[str, int]
    public_key: PublicKey


def run_in_process(
    *,
    job: FtlJob,
    guest_features: np.ndarray,
    guest_labels: np.ndarray,
    guest_overlap: np.ndarray,
    host_features: np.ndarray,
    host_overlap: np.ndarray,
    state_dir: Path | None = None,
    executor: Executor | None = None,
    key_bits: int = 2048,
    allow_test_key: bool = False,
    score_outside: bool = True,
    seed: int | None = None,
    timeout: float = 3600.0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> FtlRun:
    """Run ``job``; ``*_overlap`` hold each party's row of every overlap pair, in one order.

    Parameters
    ----------
    job
        The FTL job.
    guest_features, guest_labels, guest_overlap
        G's rows, labels and its row of each overlap pair.
    host_features, host_overlap
        H's rows and its row of each overlap pair.
    state_dir, executor
        See :class:`~vfl.common.inprocess.InProcess` (default: a temporary folder, deleted at
        the end, and a local process pool).
    key_bits, allow_test_key
        The arbiter's fresh key; below 2048 bits only with ``allow_test_key`` (tests).
    score_outside
        Score H's rows outside the overlap after training (§6.6).
    seed
        Seeds G's (and, plus one, H's) initialisation and shuffles (None: the OS CSPRNG).
    timeout
        Seconds each party waits for a message, and for the whole job.
    progress
        Called with G's record of each epoch.
    """
    tags = [FtlTag, FtlDecTag, SetupTag]
    with InProcess(
        parties=(GUEST, HOST, ARBITER), tags=tags, state_dir=state_dir, executor=executor
    ) as run:
        service, public_key = run.serve_arbiter(
            party_id=ARBITER.party_id,
            tags=[FtlDecTag],
            policy_of=lambda obj: FtlSpec.from_json(obj).policy(),
            key_bits=key_bits,
            allow_test_key=allow_test_key,
        )
        host_channel = run.channels[HOST.party_id]
        host = FtlHost(
            channel=host_channel,
            guest=GUEST,
            arbiter=ARBITER,
            features=host_features,
            overlap=host_overlap,
            executor=run.executor,
            allow_test_key=allow_test_key,
            seed=None if seed is None else seed + 1,
            timeout=timeout,
            state_dir=run.state(HOST.party_id),
        )
        guest = FtlGuest(
            channel=run.channels[GUEST.party_id],
            host=HOST,
            arbiter=ARBITER,
            job=job,
            features=guest_features,
            labels=guest_labels,
            overlap=guest_overlap,
            executor=run.executor,
            allow_test_key=allow_test_key,
            seed=seed,
            timeout=timeout,
            state_dir=run.state(GUEST.party_id),
            progress=progress,
        )

        def follow() -> nn.Module:
            start = host_channel.recv_any(MessageFilter.for_tags(FtlTag.START), timeout=timeout)
            return host.run(start)

        started = time.monotonic()
        out = run.run(
            {"guest": lambda: guest.run(score_outside=score_outside), "host": follow},
            timeout=timeout,
        )
        result, net = out["guest"], out["host"]
        if not isinstance(result, FtlResult) or not isinstance(net, nn.Module):
            raise ProtocolError(f"job {job.job_id}: a party ended without its result")
        return FtlRun(
            job_id=job.job_id,
            seconds=time.monotonic() - started,
            result=result,
            host=net,
            host_scores=np.concatenate(host.scores) if host.scores else None,
            decryptions=service.policy.counts(job.job_id),
            public_key=public_key,
        )
