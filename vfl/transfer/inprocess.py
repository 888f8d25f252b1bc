"""G, H and A of an FTL job in one process (experiments, benchmarks, tests).

The sessions of :mod:`vfl.transfer.session` over in-memory channels with the real arbiter
service; data never leaves the process, so this is for trying models, not for two silos.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy
from protocols.errors import ProtocolError
from protocols.executor import Executor
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.base import MessageFilter
from protocols.transport.inmemory import InMemoryNetwork
from vfl.transfer.guest import FtlGuest
from vfl.transfer.host import FtlHost
from vfl.transfer.session import FtlDecTag, FtlJob, FtlResult, FtlSpec, FtlTag

GUEST = Party("guest", Role.GUEST)
HOST = Party("host", Role.HOST)
ARBITER = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class LocalFtl:
    """G's result, H's trained network and scores, and A's decryption counts."""

    result: FtlResult
    host_net: nn.Module
    host_scores: np.ndarray | None
    decryptions: dict[str, int]


def run_in_process(
    *,
    job: FtlJob,
    guest_features: np.ndarray,
    guest_labels: np.ndarray,
    guest_overlap: np.ndarray,
    host_features: np.ndarray,
    host_overlap: np.ndarray,
    public_key: PublicKey,
    private_key: PrivateKey,
    executor: Executor,
    allow_test_key: bool = False,
    score_outside: bool = True,
    seed: int | None = None,
    timeout: float = 3600.0,
    state_dir: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> LocalFtl:
    """Run ``job``; ``*_overlap`` hold each party's row of every overlap pair, in one order."""
    net = InMemoryNetwork()
    tags = [FtlTag, FtlDecTag, SetupTag]
    channels = {p.party_id: net.channel(p, tags=TagRegistry(tags)) for p in (GUEST, HOST, ARBITER)}
    service = ArbiterService(
        channel=channels["arbiter"],
        cipher=PaillierCipher(public_key),
        private_key=private_key,
        policy=DecryptionPolicy(),
        executor=executor,
    )
    service.serve(FtlDecTag)
    service.serve_setup(lambda obj: FtlSpec.from_json(obj).policy())
    host = FtlHost(
        channel=channels["host"],
        guest=GUEST,
        arbiter=ARBITER,
        features=host_features,
        overlap=host_overlap,
        executor=executor,
        allow_test_key=allow_test_key,
        seed=None if seed is None else seed + 1,
        timeout=timeout,
        state_dir=None if state_dir is None else state_dir / "host",
    )
    out: dict[str, object] = {}

    def follow() -> None:
        try:
            start = channels["host"].recv_any(MessageFilter.for_tags(FtlTag.START), timeout=timeout)
            out["net"] = host.run(start)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc
            channels["guest"].close()

    thread = threading.Thread(target=follow, name="ftl-host", daemon=True)
    thread.start()
    try:
        result = FtlGuest(
            channel=channels["guest"],
            host=HOST,
            arbiter=ARBITER,
            job=job,
            features=guest_features,
            labels=guest_labels,
            overlap=guest_overlap,
            executor=executor,
            allow_test_key=allow_test_key,
            seed=seed,
            timeout=timeout,
            state_dir=None if state_dir is None else state_dir / "guest",
            progress=progress,
        ).run(score_outside=score_outside)
    except BaseException:
        for channel in channels.values():  # the host's receives end at once
            channel.close()
        raise
    finally:
        thread.join(timeout)
        for channel in channels.values():
            channel.close()
    error = out.get("error")
    if isinstance(error, BaseException):
        raise error
    host_net = out.get("net")
    if not isinstance(host_net, nn.Module):
        raise ProtocolError(f"job {job.job_id}: the host ended without a network")
    scores = np.concatenate(host.scores) if host.scores else None
    return LocalFtl(
        result=result,
        host_net=host_net,
        host_scores=scores,
        decryptions=service.policy.counts(job.job_id),
    )
