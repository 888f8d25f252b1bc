"""Three split-NN parties on in-memory channels with the real arbiter service (test helper)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from protocols.arbiter.service import ArbiterService
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy
from protocols.executor import Executor
from protocols.link import JobLink
from protocols.transport.base import Channel
from tests.conftest import ARBITER, BANK, RETAILER
from vfl.splitnn.interactive import GuestLayer, HostLayer, SplitTag
from vfl.splitnn.spec import DecTag, JobSpec


def split_layers(
    channels: dict[str, Channel],
    spec: JobSpec,
    pk: PublicKey,
    sk: PrivateKey,
    *,
    executor: Executor,
) -> tuple[GuestLayer, HostLayer, DecryptionPolicy]:
    """Register the job at the arbiter (both JOB_SPECs), serve it, and build both layers."""
    cipher = PaillierCipher(pk)
    policy = DecryptionPolicy()
    for party in (spec.guest, spec.host):
        policy.propose(spec.policy(), submitter=party)
    ArbiterService(
        channel=channels["arbiter"], cipher=cipher, private_key=sk, policy=policy, executor=executor
    ).serve(DecTag)

    def pool() -> ObfuscatorPool:
        p = ObfuscatorPool(pk, executor=executor)
        p.keep_filled(300)
        return p

    common = {
        "arbiter": ARBITER,
        "spec": spec,
        "cipher": cipher,
        "executor": executor,
        "fp": FixedPointConfig(),
    }

    def link(party: str) -> JobLink:
        return JobLink(channel=channels[party], job_id=spec.job_id, timeout=600.0)

    guest = GuestLayer(link=link("bank"), peer=RETAILER, pool=pool(), **common)  # type: ignore[arg-type]
    host = HostLayer(link=link("retailer"), peer=BANK, pool=pool(), **common)  # type: ignore[arg-type]
    return guest, host, policy


def host_step(
    host: HostLayer, step: int, alpha_fn: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The host's whole step as its session runs it: BATCH, S2-S5, STEP_ACK."""
    rows = host.rows_of(host.link.recv(host.peer, SplitTag.BATCH, step), host.spec.batch)
    out = host.step(step, rows, alpha_fn)
    host.wait_ack(step)
    return out


def guest_step(
    guest: GuestLayer,
    step: int,
    rows: np.ndarray,
    delta_fn: Callable[[np.ndarray], np.ndarray],
    eta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The guest's whole step as its session runs it: S1-S6 and STEP_ACK."""
    out = guest.step(step, rows, delta_fn, eta)
    guest.ack(step)
    return out
