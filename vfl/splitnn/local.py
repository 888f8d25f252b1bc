"""All three roles of a split-NN job in one process (experiments, benchmarks, notebooks).

The same sessions as the services (:mod:`vfl.splitnn.session`) over in-memory channels,
with the real arbiter service. Data never leaves the process, so this is for a bank's ML
engineer trying models on data it may hold in full, not for two silos.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from protocols.arbiter.service import SetupTag
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.crypto.policy import DecryptionPolicy
from protocols.errors import ProtocolError
from protocols.executor import Executor
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryNetwork
from vfl.data.tables import PartyTable, Splits
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.host import HostSession
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobTag, SplitJob, SplitResult
from vfl.splitnn.session import serve_decryptions, wait_job_start
from vfl.splitnn.spec import DecTag
from vfl.splitnn.training import HostObserver, HostTrainer

GUEST = Party("guest", Role.GUEST)
HOST = Party("host", Role.HOST)
ARBITER = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class LocalRun:
    """The guest's result and both parties' final trainers."""

    result: SplitResult
    guest: GuestSession
    host: HostTrainer


def run_in_process(
    *,
    job: SplitJob,
    guest_table: PartyTable,
    host_table: PartyTable,
    splits: Splits,
    public_key: PublicKey,
    private_key: PrivateKey,
    executor: Executor,
    state_dir: Path,
    w0_seed: int | None = None,
    order_seed: bytes | None = None,
    host_seed: int | None = None,
    allow_test_key: bool = False,
    timeout: float = 3600.0,
    pool_executor: Executor | None = None,
    policy: DecryptionPolicy | None = None,
    host_observer: HostObserver | None = None,
) -> LocalRun:
    """Run ``job`` between an in-process guest, host and arbiter; raise if any party fails.

    ``policy``: the arbiter's decryption policy (default: a new one in memory);
    ``host_observer``: called with the host's view after each training step (audits)."""
    net = InMemoryNetwork()
    tags = [SplitTag, DecTag, SetupTag, JobTag]
    channels = {p.party_id: net.channel(p, tags=TagRegistry(tags)) for p in (GUEST, HOST, ARBITER)}
    serve_decryptions(
        channel=channels["arbiter"],
        public_key=public_key,
        private_key=private_key,
        executor=executor,
        policy=policy,
    )
    host_out: dict[str, HostTrainer | BaseException] = {}

    def host() -> None:
        try:
            session = HostSession(
                channel=channels["host"],
                guest=GUEST,
                arbiter=ARBITER,
                table_for=lambda _: host_table,
                executor=executor,
                state_dir=state_dir / "host",
                seed=host_seed,
                timeout=timeout,
                allow_test_key=allow_test_key,
                pool_executor=pool_executor,
                observer=host_observer,
            )
            host_out["trainer"] = session.run(wait_job_start(channels["host"], timeout=timeout))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            host_out["error"] = exc
            channels["guest"].close()

    thread = threading.Thread(target=host, name="local-host", daemon=True)
    thread.start()
    guest = GuestSession(
        channel=channels["guest"],
        host=HOST,
        arbiter=ARBITER,
        job=job,
        table=guest_table,
        splits=splits,
        executor=executor,
        state_dir=state_dir / "guest",
        w0_seed=w0_seed,
        order_seed=order_seed,
        timeout=timeout,
        allow_test_key=allow_test_key,
        pool_executor=pool_executor,
    )
    try:
        result = guest.run()
    finally:
        thread.join(timeout)
        for channel in channels.values():
            channel.close()
    error = host_out.get("error")
    if isinstance(error, BaseException):
        raise error
    trainer = host_out.get("trainer")
    if not isinstance(trainer, HostTrainer):
        raise ProtocolError(f"job {job.job_id}: the host's side ended without a trainer")
    return LocalRun(result=result, guest=guest, host=trainer)
