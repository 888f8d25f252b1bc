"""Three split-NN parties on in-memory channels with the real arbiter service (test helper)."""

from __future__ import annotations

from protocols.crypto.arbiter import ArbiterService, DecryptionPolicy
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.fixedpoint import FixedPointConfig
from protocols.crypto.obfuscators import ObfuscatorPool
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.executor import Executor
from protocols.transport.base import Channel
from tests.conftest import ARBITER, BANK, RETAILER
from vfl.splitnn.interactive import GuestLayer, HostLayer
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
    guest = GuestLayer(channel=channels["bank"], peer=RETAILER, pool=pool(), **common)  # type: ignore[arg-type]
    host = HostLayer(channel=channels["retailer"], peer=BANK, pool=pool(), **common)  # type: ignore[arg-type]
    return guest, host, policy
