"""Every client and the aggregator of a FedAvg job in one process (tests, experiments).

The sessions of the services (:class:`FedClient`, :class:`FedAggregator`) over in-memory
channels (:mod:`vfl.common.inprocess`); only F1 (the coordinator's ``START``) is skipped,
since every client is started here with the same run id. FedAvg needs no Paillier key: the
arbiter is the aggregator.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import ProtocolError
from protocols.executor import InlineExecutor
from protocols.roles import Party, Role
from protocols.transport.tls import TlsIdentity
from vfl.common.inprocess import ChannelFactory, InProcess, InProcessResult
from vfl.data.tables import PartyTable
from vfl.fedavg.aggregator import Admit, FedAggregator
from vfl.fedavg.client import FedClient
from vfl.fedavg.protocol import FedJob, FedResult, FedTag

AGGREGATOR = Party("arbiter", Role.ARBITER)


@dataclass(frozen=True)
class FedRun(InProcessResult):
    """Every client's result (``results``, by party id; ``result``: the coordinator's) and
    the aggregator's status of the job (state, round, combined metrics)."""

    results: dict[str, FedResult]
    aggregator: dict[str, Any]
    coordinator: str

    @property
    def result(self) -> FedResult:
        """The coordinator's result."""
        return self.results[self.coordinator]


def run_in_process(
    *,
    job: FedJob,
    tables: Mapping[str, PartyTable],
    identities: Mapping[str, TlsIdentity],
    state_dir: Path | None = None,
    seed: int | None = None,
    run_id: str | None = None,
    timeout: float = 600.0,
    channel_factory: ChannelFactory | None = None,
    admit: Admit | None = None,
) -> FedRun:
    """Run ``job`` between in-process clients and an aggregator; raise the first client error.

    Parameters
    ----------
    job
        The FedAvg job.
    tables
        Each client's rows with labels, by party id.
    identities
        Each client's certificate and key (it signs its ephemeral keys with it, F2).
    state_dir
        Where the clients keep their state (``<state_dir>/<party id>``; default: a
        temporary folder, deleted at the end).
    seed
        Seeds batch order and DP noise (client ``i`` gets ``seed + i``; None: the OS CSPRNG).
    run_id
        The run (default: a fresh one).
    timeout
        Seconds for the whole job.
    channel_factory
        Builds each party's channel (tests interpose on sends with it).
    admit
        The aggregator's acceptance policy for the job (default: accept).
    """
    parties = [identities[pid].party for pid in job.client_ids]
    with InProcess(
        parties=(*parties, AGGREGATOR),
        tags=[FedTag],
        state_dir=state_dir,
        executor=InlineExecutor(),  # FedAvg's work is local training, no ciphertexts
        channel_factory=channel_factory,
    ) as run:
        aggregator = FedAggregator(channel=run.channels[AGGREGATOR.party_id], admit=admit)
        run_id = run_id or uuid.uuid4().hex[:16]
        clients = {
            pid: FedClient(
                channel=run.channels[pid],
                job=job,
                run_id=run_id,
                arbiter=AGGREGATOR,
                table=tables[pid],
                signing_key_pem=identities[pid].key_pem,
                certificates={
                    other: identities[other].certificate_pem
                    for other in job.client_ids
                    if other != pid
                },
                state_dir=run.state(pid),
                seed=None if seed is None else seed + i,
            )
            for i, pid in enumerate(job.client_ids)
        }
        started = time.monotonic()
        try:
            # A's ABORT ends every client's run when one fails or a round is lost (F7)
            out = run.run(
                {pid: client.run for pid, client in clients.items()},
                timeout=timeout,
                close_on_failure=False,
            )
        finally:
            aggregator.close()
        results = {pid: r for pid, r in out.items() if isinstance(r, FedResult)}
        if len(results) != len(clients):
            raise ProtocolError(f"job {job.job_id}: a client ended without its result")
        return FedRun(
            job_id=job.job_id,
            seconds=time.monotonic() - started,
            results=results,
            aggregator=aggregator.status().get(job.job_id, {}),
            coordinator=job.coordinator,
        )
