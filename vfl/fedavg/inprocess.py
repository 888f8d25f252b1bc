"""Every client and the aggregator of a FedAvg job in one process (tests, experiments).

The same sessions as the services (:class:`FedClient`, :class:`FedAggregator`) over
in-memory channels; only F1 (the coordinator's ``START``) is skipped, since every client is
started here with the same run id.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from protocols.errors import ProtocolError
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.inmemory import InMemoryNetwork
from protocols.transport.tls import TlsIdentity
from vfl.data.tables import PartyTable
from vfl.fedavg.aggregator import FedAggregator
from vfl.fedavg.client import FedClient
from vfl.fedavg.protocol import FedJob, FedResult, FedTag

AGGREGATOR = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class InProcessRun:
    """Every client's result and the aggregator's status."""

    results: dict[str, FedResult]
    aggregator: dict[str, dict[str, object]]


def run_in_process(
    *,
    job: FedJob,
    tables: Mapping[str, PartyTable],
    identities: Mapping[str, TlsIdentity],
    state_dir: Path,
    seed: int | None = None,
    run_id: str | None = None,
    timeout: float = 600.0,
    channel_factory: Callable[[InMemoryNetwork, Party, TagRegistry], Channel] | None = None,
) -> InProcessRun:
    """Run ``job`` between in-process clients (``tables`` by party id; ``identities`` their
    certificates and keys) and an aggregator; raise the first client error."""
    net = InMemoryNetwork()

    def make(party: Party) -> Channel:
        tags = TagRegistry([FedTag])
        if channel_factory is not None:
            return channel_factory(net, party, tags)
        return net.channel(party, tags=tags)

    parties = {pid: identities[pid].party for pid in job.client_ids}
    channels = {pid: make(p) for pid, p in parties.items()}
    aggregator_channel = make(AGGREGATOR)
    aggregator = FedAggregator(channel=aggregator_channel)
    run = run_id or uuid.uuid4().hex[:16]
    results: dict[str, FedResult] = {}
    errors: dict[str, BaseException] = {}

    def client(pid: str) -> None:
        try:
            session = FedClient(
                channel=channels[pid],
                job=job,
                run_id=run,
                arbiter=AGGREGATOR,
                table=tables[pid],
                signing_key_pem=identities[pid].key_pem,
                certificates={
                    other: identities[other].certificate_pem
                    for other in job.client_ids
                    if other != pid
                },
                state_dir=state_dir / pid,
                seed=None if seed is None else seed + job.client_ids.index(pid),
            )
            results[pid] = session.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[pid] = exc

    threads = [
        threading.Thread(target=client, args=(pid,), name=f"fedavg-{pid}", daemon=True)
        for pid in job.client_ids
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join(timeout)
    finally:
        aggregator.close()
        for channel in (*channels.values(), aggregator_channel):
            channel.close()
    for pid in job.client_ids:
        if pid in errors:
            raise errors[pid]
    if len(results) != len(job.client_ids):
        raise ProtocolError(f"job {job.job_id}: clients still running after {timeout} s")
    return InProcessRun(results=results, aggregator=aggregator.status())
