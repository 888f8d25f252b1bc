"""FedAvg with secure aggregation in one process (docs/protocol.md §7, tests H1 and H4 at the
protocol level, a substituted key refused, DP epsilon per round, client sampling)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from protocols import secagg
from protocols.envelope import ControlBlock, Envelope, Uint64Block
from protocols.errors import ConfigError, JobRefusedError, SecAggError
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.base import Channel
from protocols.transport.inmemory import InMemoryChannel, InMemoryNetwork
from protocols.transport.tls import TlsIdentity, create_demo_pki, load_demo_identity
from vfl.common import checkpoint
from vfl.data.datasets import data_dir, find
from vfl.data.tables import PartyTable, TableSpec, load_table
from vfl.fedavg import aggregate
from vfl.fedavg.client import CHECKPOINTS
from vfl.fedavg.inprocess import run_in_process
from vfl.fedavg.jobfile import parse_fed_job
from vfl.fedavg.protocol import FedJob, FedTag, RoundAbortedError
from vfl.fedavg.train import build_model, client_splits, local_train
from vfl.privacy.accountant import epsilon
from vfl.privacy.dp import DPConfig

FILES = {
    "bank": "breast_homo_guest.csv",
    "retailer": "breast_homo_host.csv",
    "shop": "breast_homo_test.csv",
}
Factory = Callable[[InMemoryNetwork, Party, TagRegistry], Channel]


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsIdentity]:
    folder = tmp_path_factory.mktemp("pki")
    parties = [Party("bank", Role.GUEST), Party("retailer", Role.HOST), Party("shop", Role.HOST)]
    create_demo_pki(folder, parties)
    return {p.party_id: load_demo_identity(folder, p.party_id) for p in parties}


@pytest.fixture(scope="module")
def tables() -> dict[str, PartyTable]:
    folder = data_dir(os.environ)
    return {
        pid: load_table(TableSpec(path=find(name, folder=folder), id_column="id", label_column="y"))
        for pid, name in FILES.items()
    }


def make_job(clients: tuple[str, ...] = ("bank", "retailer", "shop"), **changes: object) -> FedJob:
    base = FedJob(
        job_id="fed-test",
        coordinator="bank",
        clients=tuple((c, "breast") for c in clients),
        rounds=3,
        batch=32,
        widths=(8, 1),
        learning_rate=0.01,
        validation_fraction=0.2,
        round_timeout_s=30.0,
        init_seed=5,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Recording(InMemoryChannel):
    """Keeps every envelope this party sends."""

    sent: list[Envelope]

    def send(self, envelope: Envelope) -> Envelope:
        out = super().send(envelope)
        self.sent.append(out)
        return out


def recording(
    record: dict[str, Recording], hook: Callable[[Envelope], Envelope | None] | None = None
) -> Factory:
    """A channel factory that records what each party sends; ``hook`` may rewrite an envelope
    or drop it (return None) before it leaves."""

    class Hooked(Recording):
        def send(self, envelope: Envelope) -> Envelope:
            if hook is not None:
                changed = hook(envelope)
                if changed is None:
                    return envelope  # silently lost
                envelope = changed
            return super().send(envelope)

    def factory(net: InMemoryNetwork, party: Party, tags: TagRegistry) -> Channel:
        channel = net.channel(party, tags=tags, channel_class=Hooked)
        assert isinstance(channel, Recording)
        channel.sent = []
        record[party.party_id] = channel
        return channel

    return factory


def plaintext_fedavg(job: FedJob, tables: dict[str, PartyTable], seed: int) -> np.ndarray:
    """The same training with the averages taken in float64, no masks (the H1 reference)."""
    splits = {pid: _splits(tables[pid], job) for pid in job.client_ids}
    xs = {pid: tables[pid].features for pid in job.client_ids}
    ys = {pid: np.asarray(tables[pid].labels) for pid in job.client_ids}
    n = {pid: len(splits[pid][0]) for pid in job.client_ids}
    total = sum(n.values())

    def average(values: dict[str, np.ndarray]) -> np.ndarray:
        return sum(n[p] * values[p] for p in job.client_ids) / total

    columns = next(iter(xs.values())).shape[1]
    first = average({p: aggregate.first_moments(xs[p][splits[p][0]]) for p in xs})
    frac, mean, a = aggregate.centre(first, columns)
    second = average({p: aggregate.second_moments(xs[p][splits[p][0]], mean, a) for p in xs})
    standardizer = aggregate.finish(second, frac, mean, a)
    models = {p: build_model(job, in_features=columns) for p in job.client_ids}
    gens = {
        p: torch.Generator().manual_seed((seed + i) * 1_000_003)
        for i, p in enumerate(job.client_ids)
    }
    current = aggregate.parameter_vector(models["bank"])
    for _ in range(job.rounds):
        updates = {}
        for p in job.client_ids:
            aggregate.load_parameter_vector(models[p], current)
            train = splits[p][0]
            x = torch.from_numpy(standardizer.transform(xs[p])[train])
            y = torch.from_numpy(ys[p][train].astype(np.float32))
            local_train(models[p], x, y, job=job, generator=gens[p])
            updates[p] = aggregate.parameter_vector(models[p])
        current = average(updates)
        aggregate.load_parameter_vector(models["bank"], current)
        current = aggregate.parameter_vector(models["bank"])  # float32 like the clients'
    return current


@pytest.mark.parametrize("group_mask", [True, False])
def test_secure_fedavg_equals_plaintext_fedavg(
    tmp_path: Path,
    tables: dict[str, PartyTable],
    identities: dict[str, TlsIdentity],
    group_mask: bool,
) -> None:
    """H1 end to end: three rounds of secure FedAvg give the plaintext FedAvg model (within
    the fixed-point resolution); A's sums decode to the average only without the group mask."""
    job = make_job(group_mask=group_mask)
    sent: dict[str, Recording] = {}
    run = run_in_process(
        job=job,
        tables=tables,
        identities=identities,
        state_dir=tmp_path,
        seed=7,
        channel_factory=recording(sent),
    )
    finals = [aggregate.parameter_vector(_final_model(tmp_path / p, job)) for p in job.client_ids]
    for other in finals[1:]:
        np.testing.assert_array_equal(other, finals[0])
    reference = plaintext_fedavg(job, tables, seed=7)
    m = len(job.client_ids)
    assert np.max(np.abs(finals[0] - reference)) < 1e-5 + m * 2.0**-secagg.F_H
    history = run.results["bank"].history
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all("clients" not in h for h in history)  # not each other's metrics ...
    assert set(run.aggregator["combined"]["clients"]) == set(job.client_ids)  # A's
    assert history[-1]["validation"]["rows"] == sum(
        len(_splits(t, job)[1]) for t in tables.values()
    )
    last_agg = [
        e for e in sent["arbiter"].sent if e.tag == FedTag.AGG.value and e.step == job.rounds
    ][0]
    assert isinstance(last_agg.body, Uint64Block)
    total = np.frombuffer(last_agg.body.data, dtype="<u8").astype(np.uint64)
    if group_mask:  # uniform to A: its "weight" slot is no row count
        assert not 0 < int(total[-1]) < 10_000
    else:
        average, rows = secagg.decode_sum(total)
        assert rows == sum(len(_train_rows(t, job)) for t in tables.values())
        np.testing.assert_allclose(average, finals[0], atol=1e-5)


def _splits(table: PartyTable, job: FedJob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A client's own train / validation / test rows."""
    assert table.labels is not None
    return client_splits(table.labels, job=job)


def _train_rows(table: PartyTable, job: FedJob) -> np.ndarray:
    return _splits(table, job)[0]


def _final_model(folder: Path, job: FedJob) -> torch.nn.Module:
    from vfl.fedavg.client import MODEL_DIR, load_fed_model

    return load_fed_model(folder / "jobs" / job.job_id / MODEL_DIR)[0]


def test_a_missing_update_aborts_the_round_and_nothing_is_unmasked(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """H4: the shop's update of round 2 never arrives; A aborts round 2 without sending any
    sum of it, every client keeps round 1, and a new run resumes from there to the end."""
    job = make_job(round_timeout_s=1.5)
    sent: dict[str, Recording] = {}

    def lose_round_two(envelope: Envelope) -> Envelope | None:
        lost = envelope.tag == FedTag.UPDATE.value and envelope.step == 2
        return None if lost and envelope.sender.party_id == "shop" else envelope

    with pytest.raises(RoundAbortedError, match="shop sent no fedavg.UPDATE for round 2"):
        run_in_process(
            job=job,
            tables=tables,
            identities=identities,
            state_dir=tmp_path,
            seed=1,
            channel_factory=recording(sent, lose_round_two),
        )
    from_a = [(e.tag, e.step, e.receiver.party_id) for e in sent["arbiter"].sent]
    assert (FedTag.AGG.value, 1, "shop") in from_a
    assert not [t for t in from_a if t[0] == FedTag.AGG.value and t[1] >= 2]
    assert {r for t, _, r in from_a if t == FedTag.ABORT.value} == set(job.client_ids)
    for pid in job.client_ids:  # the updates the others sent for round 2 stay masked at A
        assert (
            checkpoint.available_steps(tmp_path / pid / "jobs" / job.job_id / CHECKPOINTS)[-1] == 1
        )
    run = run_in_process(job=job, tables=tables, identities=identities, state_dir=tmp_path, seed=1)
    assert [h["round"] for h in run.results["bank"].history] == [1, 2, 3]  # round 1 re-reported


def test_a_stray_join_under_the_jobs_id_stops_no_run(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """In round 1 a party that is no client of the job sends A a JOIN for its id with a run
    id of its own: that run is refused alone, and the job's run goes on to the end (A
    replaces a job's run only with one it admitted; docs/protocol.md §4.4.1)."""
    job = make_job(clients=("bank", "retailer"))
    stray = Party("shop", Role.HOST)
    sent: dict[str, Recording] = {}
    intruder: list[Channel] = []

    def hook(envelope: Envelope) -> Envelope:
        first_update = envelope.tag == FedTag.UPDATE.value and envelope.step == 1
        if first_update and envelope.sender.party_id == "bank" and len(intruder) == 1:
            join = next(e for e in sent["bank"].sent if e.tag == FedTag.JOIN.value)
            intruder[0].send(dataclasses.replace(join, sender=stray, run_id="stray", seq=0))
            intruder.append(intruder[0])  # once
        return envelope

    make = recording(sent, hook)

    def factory(net: InMemoryNetwork, party: Party, tags: TagRegistry) -> Channel:
        if not intruder:
            intruder.append(net.channel(stray, tags=tags))
        return make(net, party, tags)

    run = run_in_process(
        job=job,
        tables=tables,
        identities=identities,
        state_dir=tmp_path,
        seed=3,
        channel_factory=factory,
    )
    assert len(intruder) == 2  # the stray JOIN was sent, during round 1
    assert [h["round"] for h in run.results["bank"].history] == [1, 2, 3]
    assert [h["round"] for h in run.results["retailer"].history] == [1, 2, 3]


def test_a_substituted_key_is_refused(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """H3 at the protocol level: A swaps the shop's public key for its own in the KEYS it
    relays; the other clients refuse before deriving any seed."""
    _, own_public = secagg.new_keypair()

    def substitute(envelope: Envelope) -> Envelope | None:
        if envelope.tag != FedTag.KEYS.value or envelope.receiver.party_id == "shop":
            return envelope
        assert isinstance(envelope.body, ControlBlock)
        body = envelope.body.obj()
        for entry in body["keys"]:
            if entry["party"] == "shop":
                entry["public"] = own_public.hex()
        return dataclasses.replace(envelope, body=ControlBlock.from_obj(body))

    with pytest.raises(SecAggError, match="shop"):
        run_in_process(
            job=make_job(),
            tables=tables,
            identities=identities,
            state_dir=tmp_path,
            channel_factory=recording({}, substitute),
            timeout=60,
        )


def test_dp_reports_epsilon_per_round(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """DP-SGD on every client: ε after the last round is the accountant's for
    q = B/n, T = rounds·⌈n/B⌉, σ, δ."""
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    job = make_job(clients=("bank", "retailer"), dp=dp, rounds=2)
    run = run_in_process(job=job, tables=tables, identities=identities, state_dir=tmp_path, seed=3)
    n = len(_train_rows(tables["bank"], job))
    expected, _ = epsilon(
        q=job.batch / n, sigma=1.0, steps=2 * math.ceil(n / job.batch), delta=1e-5
    )
    assert run.results["bank"].epsilon == pytest.approx(expected)
    assert run.results["bank"].history[-1]["epsilon_max"] >= expected


def test_client_sampling(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """Two of three clients per round, as drawn from the job and round; everyone still ends
    with the same model."""
    job = make_job(clients_per_round=2, rounds=3)
    run = run_in_process(job=job, tables=tables, identities=identities, state_dir=tmp_path)
    for record in run.results["bank"].history:
        assert record["participants"] == list(
            aggregate.sample_participants(
                job.client_ids, per_round=2, job_id=job.job_id, round_no=record["round"]
            )
        )
    finals = [aggregate.parameter_vector(_final_model(tmp_path / p, job)) for p in job.client_ids]
    np.testing.assert_array_equal(finals[0], finals[2])
    saved = json.loads((tmp_path / "bank" / "jobs" / job.job_id / "result.json").read_text())
    assert saved["rounds"] == 3


def test_job_file_errors_name_the_problem() -> None:
    raw = {"job": {"type": "horizontal", "rounds": 0}, "clients": {"bank": "a", "shop": "b"}}
    with pytest.raises(ConfigError, match="rounds must be a positive integer"):
        parse_fed_job(raw, source="job.toml", coordinator="bank")
    raw = {"job": {"clients_per_round": 1}, "clients": {"bank": "a", "shop": "b"}}
    with pytest.raises(ConfigError, match="at least two updates"):
        parse_fed_job(raw, source="job.toml", coordinator="bank")
    raw = {"job": {}, "clients": {"bank": "a", "shop": "b"}, "model": {"widths": [4, 2]}}
    with pytest.raises(ConfigError, match=r"end in 1 .*widths = \[1\] is logistic regression"):
        parse_fed_job(raw, source="job.toml", coordinator="bank")
    raw = {"job": {}, "clients": {"bank": "a", "shop": "b"}, "model": {"widths": [1]}}
    logistic = parse_fed_job(raw, source="job.toml", coordinator="bank")
    assert logistic.widths == (1,)
    layers = [type(m) for m in build_model(logistic, in_features=3).modules()]
    assert layers.count(torch.nn.Linear) == 1


def test_refusal_by_the_aggregator_is_not_retried(
    tmp_path: Path, tables: dict[str, PartyTable], identities: dict[str, TlsIdentity]
) -> None:
    """An aggregator policy refusal reaches every client as JobRefusedError (F7, refused)."""

    def admit(job: FedJob, coordinator: Party) -> None:
        raise JobRefusedError("horizontal jobs are not accepted here (accept.job_types)")

    with pytest.raises(JobRefusedError, match="accept.job_types"):
        run_in_process(
            job=make_job(clients=("bank", "retailer")),
            tables=tables,
            identities=identities,
            state_dir=tmp_path,
            admit=admit,
        )
