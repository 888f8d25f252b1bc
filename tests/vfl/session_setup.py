"""Run a whole split-NN job (guest, host, arbiter) in one process on in-memory channels."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocols.arbiter.service import ArbiterService, SetupTag
from protocols.crypto.paillier import PrivateKey, PublicKey
from protocols.executor import InlineExecutor
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryChannel, InMemoryNetwork
from psi.protocol import PsiTag
from tests.conftest import ARBITER, BANK, RETAILER
from vfl.common.seeds import simulation_secret
from vfl.data.tables import PartyTable, Splits, split_rows
from vfl.scoring.protocol import ScoreTag
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.host import HostSession
from vfl.splitnn.interactive import SplitTag
from vfl.splitnn.job import JobTag, SplitJob, SplitResult
from vfl.splitnn.session import serve_decryptions, wait_job_start
from vfl.splitnn.spec import DecTag
from vfl.splitnn.training import HostTrainer

TAGS = [SplitTag, DecTag, SetupTag, JobTag, ScoreTag, PsiTag]


def synthetic_tables(rows: int = 240, seed: int = 0) -> tuple[PartyTable, PartyTable, Splits]:
    """A guest table (3 features + labels) and a host table (4 features) on the same ids."""
    rng = np.random.default_rng(seed)
    xg, xh = rng.normal(size=(rows, 3)), rng.normal(size=(rows, 4))
    logit = xg[:, 0] - xg[:, 1] + 1.5 * xh[:, 0] - xh[:, 2] + 0.3 * rng.normal(size=rows)
    y = (logit > 0.4).astype(np.float64)
    ids = np.array([f"id{i}" for i in range(rows)], dtype=object)
    guest = PartyTable(
        source=Path("guest.csv"), ids=ids, columns=("a", "b", "c"), features=xg, labels=y
    )
    host = PartyTable(source=Path("host.csv"), ids=ids, columns=("p", "q", "r", "s"), features=xh)
    return guest, host, split_rows(y, test_fraction=0.2, validation_fraction=0.2, seed=0)


@dataclass
class Trio:
    """The network, the arbiter service and where the parties keep their state."""

    net: InMemoryNetwork
    arbiter: ArbiterService
    state: Path
    channels: dict[str, InMemoryChannel] = field(default_factory=dict)

    def channel(self, party_id: str, cls: type[InMemoryChannel] | None = None) -> InMemoryChannel:
        party = {"bank": BANK, "retailer": RETAILER}[party_id]
        ch = self.net.channel(party, tags=TagRegistry(TAGS), channel_class=cls)
        self.channels[party_id] = ch
        return ch


def trio(tmp: Path, pk: PublicKey, sk: PrivateKey) -> Trio:
    """An arbiter serving decryptions and setup messages on a fresh network."""
    net = InMemoryNetwork()
    channel = net.channel(ARBITER, tags=TagRegistry(TAGS))
    service = serve_decryptions(
        channel=channel, public_key=pk, private_key=sk, executor=InlineExecutor()
    )
    return Trio(net=net, arbiter=service, state=tmp, channels={"arbiter": channel})


@dataclass
class Outcome:
    """What one attempt of a job ended with at each party."""

    result: SplitResult | None = None
    guest: GuestSession | None = None
    host: HostTrainer | None = None
    errors: list[BaseException] = field(default_factory=list)


def run_job(
    t: Trio,
    job: SplitJob,
    guest_table: PartyTable,
    host_table: PartyTable,
    splits: Splits,
    *,
    guest_cls: type[InMemoryChannel] | None = None,
    host_cls: type[InMemoryChannel] | None = None,
    timeout: float = 20.0,
    host_kwargs: dict[str, Any] | None = None,
    **guest_kwargs: Any,
) -> Outcome:
    """One attempt: fresh channels for G and H (as after a restart), both sessions to the end.

    ``host_kwargs`` go to the :class:`HostSession` (e.g. its ``accept`` policy hook).

    If either party fails, both channels are closed so the other stops waiting at once.
    """
    out = Outcome()
    g_ch, h_ch = t.channel("bank", guest_cls), t.channel("retailer", host_cls)

    def fail(exc: BaseException) -> None:
        out.errors.append(exc)
        g_ch.close()
        h_ch.close()

    def host() -> None:
        try:
            session = HostSession(
                channel=h_ch,
                guest=BANK,
                arbiter=ARBITER,
                executor=InlineExecutor(),
                state_dir=t.state / "retailer",
                pool_target=64,
                timeout=timeout,
                allow_test_key=True,
                **{"seed": 7, "table_for": lambda _: host_table, **(host_kwargs or {})},
            )
            out.host = session.run(wait_job_start(h_ch, timeout=timeout))
        except BaseException as exc:  # noqa: BLE001 - reported through ``out``
            fail(exc)

    thread = threading.Thread(target=host)
    thread.start()
    try:
        if guest_kwargs.get("seed") is not None:  # repeatable in a fresh folder (§4.4.2)
            simulation_secret(t.state / "bank", seed=int(guest_kwargs["seed"]))
        session = GuestSession(
            channel=g_ch,
            host=RETAILER,
            arbiter=ARBITER,
            job=job,
            table=guest_table,
            splits=splits,
            executor=InlineExecutor(),
            state_dir=t.state / "bank",
            w0_seed=3,
            order_seed=bytes(32),
            pool_target=64,
            timeout=timeout,
            allow_test_key=True,
            **guest_kwargs,
        )
        out.guest = session
        out.result = session.run()
    except BaseException as exc:  # noqa: BLE001
        fail(exc)
    thread.join(timeout + 10)
    g_ch.close()
    h_ch.close()
    return out
