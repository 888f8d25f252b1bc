"""Ids that could act as paths, sent by an attacker who holds a valid certificate
(docs/protocol.md §2.9): every one is refused with a typed error, and nothing is made or
removed inside or outside the state folder."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protocols.envelope import ControlBlock, Envelope, control_of, encode
from protocols.errors import ConfigError, MalformedEnvelopeError
from protocols.generated import transport_pb2 as pb
from protocols.ids import UnsafePathError, state_path
from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport.grpc_channel import GrpcChannel
from protocols.transport.grpc_client import DELIVER, open_channel
from protocols.transport.options import TransportOptions
from psi.protocol import PsiMode, PsiResult, PsiTag
from psi.result import read_result, result_dir, write_result
from tests.conftest import BANK, RETAILER
from tests.vfl.state_files import not_private
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import data_dir
from vfl.fedavg.client import job_folder
from vfl.fedavg.jobfile import parse_fed_job
from vfl.fedavg.protocol import FedJob, FedTag
from vfl.scoring.protocol import ScoreTag
from vfl.service.admin import admin_call, service_address
from vfl.service.demo import write_demo_setup
from vfl.service.local import Processes, connect_services, start_services, stop_services
from vfl.service.owners import IN_USE, OWNER_FILE
from vfl.splitnn.job import JobTag, SplitJob
from vfl.splitnn.jobfile import parse_job
from vfl.splitnn.saved import model_dir
from vfl.transfer.jobfile import parse_ftl_job
from vfl.transfer.session import FtlJob, FtlTag, ftl_folder

BAD_IDS = [".", "..", "/tmp/x", "a/b", "a\x00b", "x" * 200]
FED_JOB = FedJob(
    job_id="fed", coordinator="bank", clients=(("bank", "credit"), ("retailer", "credit"))
)


def _ftl_start(job_id: str, psi_job: str = "psi-1") -> dict[str, Any]:
    return {
        "job": {**FtlJob(job_id="ftl").to_json(), "job_id": job_id},
        "request": {"data": "credit", "id_column": "id", "psi_job": psi_job},
        "held": [],
        "run": 1,
    }


def _psi_result() -> PsiResult:
    return PsiResult(
        role="host",
        mode=PsiMode.BOTH,
        run_id="ab",
        intersection_size=1,
        rows=np.array([0]),
        own_list_size=1,
        peer_list_size=1,
        summary={},
    )


# ------------------------------------------------------------------ job files, bodies, links


@pytest.mark.parametrize("bad", [*BAD_IDS, "x" * 97])
def test_job_files_refuse_ids_that_are_not_identifiers(bad: str) -> None:
    """A job file's id and psi_job name folders: at most 96 characters (derived ids fit)."""
    data = {"guest_data": "a", "host_data": "b"}
    with pytest.raises(ConfigError, match=r"\[job\] id"):
        parse_job({"job": {"id": bad, **data}}, source="j.toml")
    with pytest.raises(ConfigError, match=r"\[job\] psi_job"):
        parse_job({"job": {"psi_job": bad, **data}}, source="j.toml")
    with pytest.raises(ConfigError, match=r"\[job\] id"):
        parse_ftl_job({"job": {"type": "transfer", "id": bad, **data}}, source="j.toml")
    with pytest.raises(ConfigError, match=r"\[job\] psi_job"):
        parse_ftl_job({"job": {"type": "transfer", "psi_job": bad, **data}}, source="j.toml")
    fed = {"job": {"type": "horizontal", "id": bad}, "clients": {"bank": "a", "shop": "b"}}
    with pytest.raises(ConfigError, match=r"\[job\] id"):
        parse_fed_job(fed, source="j.toml", coordinator="bank")
    longest = parse_job({"job": {"id": "x" * 96, **data}}, source="j.toml")
    assert longest.job.job_id == "x" * 96


@pytest.mark.parametrize("bad", BAD_IDS)
def test_peer_sent_job_ids_are_malformed(bad: str) -> None:
    """The job of a FedAvg or FTL START and of a split-NN JOB_START, as a peer sends it."""
    with pytest.raises(MalformedEnvelopeError, match="not a valid identifier"):
        FedJob.from_json({**FED_JOB.to_json(), "job_id": bad})
    with pytest.raises(MalformedEnvelopeError, match="not a valid identifier"):
        FtlJob.from_json(_ftl_start(bad)["job"])
    with pytest.raises(MalformedEnvelopeError, match="not a valid identifier"):
        SplitJob.from_host_part({**SplitJob(job_id="s").host_part(), "job_id": bad})


def test_a_link_planted_in_the_state_folder_leads_nowhere(tmp_path: Path) -> None:
    """Links in jobs/, psi/ and for models/ that point outside: every path built from an id
    through them is refused, and nothing is written or read outside."""
    state, outside = tmp_path / "state", tmp_path / "outside"
    outside.mkdir()
    (state / "jobs").mkdir(parents=True)
    (state / "jobs" / "evil").symlink_to(outside)
    (state / "psi").mkdir()
    (state / "psi" / "evil").symlink_to(outside)
    (state / "models").symlink_to(outside)
    builders = [
        lambda: state_path(state, "jobs", "evil"),
        lambda: state_path(state, "jobs", "evil", "result.json"),
        lambda: job_folder(state, "evil"),
        lambda: ftl_folder(state, "evil"),
        lambda: model_dir(state, "model-1"),
        lambda: result_dir(state, "evil"),
        lambda: read_result(state, "evil"),
        lambda: write_result(state, "evil", _psi_result()),
    ]
    for build in builders:
        with pytest.raises(UnsafePathError, match="leave the party's state folder"):
            build()
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (state / "psi").iterdir()) == ["evil"]


# ------------------------------------------------------------------ over the real channel


@dataclass
class Host:
    root: Path
    retailer: PartyConfig
    bank: PartyConfig
    procs: Processes

    def tree(self) -> set[str]:
        """Every path under the setup folder (certificates, state folders, the attacker's
        target), except the logs and the replay journal (one file per accepted job id)."""
        out = set()
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root)
            if rel.parts[0] != "logs" and "replay" not in rel.parts:
                out.add(str(rel))
        return out


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """The retailer's service alone: the attacker is a client with the bank's certificate."""
    root = tmp_path_factory.mktemp("hostile")
    paths = write_demo_setup(root / "setup", data_folder=data_dir(os.environ))
    configs = {pid: load_config(p) for pid, p in paths.items()}
    retailer = configs["retailer"]
    procs = start_services({"retailer": retailer}, logs=root / "logs")
    try:
        connect_services({"retailer": retailer})
        (root / "outside").mkdir()
        yield Host(root=root, retailer=retailer, bank=configs["bank"], procs=procs)
    finally:
        codes = stop_services(procs)
    assert codes == {"retailer": 0}, codes


def _frame(job_id: str, tag: str, body: dict[str, Any], seq: int) -> bytes:
    """A frame whose envelope names ``job_id`` (built by hand: :class:`Envelope` refuses it)."""
    envelope = Envelope(
        job_id="placeholder",
        sender=BANK,
        receiver=RETAILER,
        tag=tag,
        body=ControlBlock.from_obj(body),
    ).with_seq(seq)
    header, payload = encode(envelope)
    msg = pb.Envelope()
    msg.ParseFromString(header)
    msg.job_id = job_id
    return bytes(
        pb.Frame(
            header=msg.SerializeToString(), payload_size=len(payload), payload=payload
        ).SerializeToString()
    )


def test_envelope_job_ids_that_are_paths_are_refused_at_decode(host: Host) -> None:
    """PSI HELLO, FedAvg and FTL START, scoring OPEN under job ids that would be paths
    (".", "..", absolute, with a separator or NUL, too long): INVALID_ARGUMENT, and the
    retailer makes, replaces or deletes nothing anywhere."""
    target = str(host.root / "outside" / "x")  # an absolute path the test can watch
    hello = {"mode": "both", "id_type": "generic", "size": 1, "chunk_points": 1, "run_id": "ab"}
    bodies: dict[str, Any] = {
        PsiTag.HELLO: lambda job: {**hello, "request": {"data": "credit"}},
        FedTag.START: lambda job: {"job": {**FED_JOB.to_json(), "job_id": job}},
        FtlTag.START: lambda job: _ftl_start(job),
        ScoreTag.OPEN: lambda job: {"model_id": job, "mode": "online", "mask_seed": "00" * 32},
    }
    tmp_x = Path("/tmp/x").exists()
    before = host.tree()
    jobs = admin_call(host.retailer, "status")["jobs"]
    raw = open_channel(
        peer_id="retailer",
        address=service_address(host.retailer),
        identity=host.bank.tls.load(),
        options=TransportOptions(retry_seconds=2),
    )
    try:
        deliver = raw.unary_unary(DELIVER)
        seq = 1
        for job_id in [*BAD_IDS, target]:
            for tag, body in bodies.items():
                seq += 1
                with pytest.raises(grpc.RpcError) as info:
                    deliver(_frame(job_id, tag, body(job_id), seq), timeout=10)
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (job_id, tag)
                assert "not a valid identifier" in (info.value.details() or ""), (job_id, tag)
    finally:
        raw.close()
    assert host.tree() == before
    assert Path("/tmp/x").exists() == tmp_x
    assert admin_call(host.retailer, "status")["jobs"] == jobs  # no handler ran


@pytest.fixture(scope="module")
def attacker(host: Host) -> Iterator[GrpcChannel]:
    """A channel with the bank's certificate that the retailer answers."""
    channel = GrpcChannel(
        me=host.bank.party,
        identity=host.bank.tls.load(),
        tags=TagRegistry([PsiTag, FedTag, FtlTag, ScoreTag, JobTag]),
    )
    channel.start()
    pinned = host.bank.peer("retailer").address_entry().certificate_pem
    channel.add_peer(PartyAddress(host.retailer.party, service_address(host.retailer), pinned))
    address = f"127.0.0.1:{channel.port}"
    admin_call(host.retailer, "set_peer_address", {"peer": "bank", "address": address})
    yield channel
    channel.close(grace=0.1)


def _ask(
    channel: GrpcChannel, job_id: str, tag: str, body: dict[str, Any], reply: str
) -> dict[str, Any]:
    run = secrets.token_hex(8)
    channel.fresh_stream(job_id, [RETAILER])
    channel.send(
        Envelope(
            job_id=job_id,
            run_id=run,
            sender=BANK,
            receiver=RETAILER,
            tag=tag,
            body=ControlBlock.from_obj(body),
        )
    )
    answer = channel.recv(job_id=job_id, sender=RETAILER, tag=reply, step=0, run_id=run, timeout=60)
    return control_of(answer)


def test_ids_inside_bodies_are_checked_and_compared_to_the_envelope(
    host: Host, attacker: GrpcChannel
) -> None:
    """A valid envelope whose body names another job or model, or an id that is a path:
    refused with its reason before the retailer touches a job, PSI or model folder."""
    state = host.retailer.state_dir
    before = host.tree()
    cases = [
        ("fed-a", FedTag.START, {"job": {**FED_JOB.to_json(), "job_id": "fed-b"}}, "another job"),
        (
            "fed-c",
            FedTag.START,
            {"job": {**FED_JOB.to_json(), "job_id": str(state)}},
            "not a valid",
        ),
        ("ftl-a", FtlTag.START, _ftl_start("ftl-b"), "another job"),
        ("ftl-c", FtlTag.START, _ftl_start("../ftl-c"), "not a valid identifier"),
        ("ftl-d", FtlTag.START, _ftl_start("ftl-d", psi_job="../../psi"), "psi_job"),
    ]
    for job_id, tag, body, needle in cases:
        answer = FedTag.ACCEPT if tag == FedTag.START else FtlTag.ACCEPT
        reply = _ask(attacker, job_id, tag, body, answer)
        assert reply.get("ok") is False and needle in reply["reason"], (job_id, reply)
    for job_id, model_id, needle in (
        ("m-a.scoring", "../m-a", "not a valid identifier"),
        ("m-b.scoring", "m-c", "another model than its envelope"),
    ):
        body = {"model_id": model_id, "mode": "online", "mask_seed": "00" * 32}
        reply = _ask(attacker, job_id, ScoreTag.OPEN, body, ScoreTag.READY)
        assert needle in reply.get("refused", ""), (job_id, reply)
    assert host.tree() == before
    assert not any((state / name).exists() for name in ("jobs", "psi", "models"))
    assert not not_private(state), not_private(state)


def test_a_job_id_belongs_to_the_kind_of_job_that_claimed_it(
    host: Host, attacker: GrpcChannel
) -> None:
    """The bank's transfer START claims its job id (an owner-only record) although the host
    then refuses the job; the bank's FedAvg START and split-NN JOB_START under that id are
    refused with the rule only, and leave the job's status as the first refusal left it
    (docs/protocol.md §4.4.1)."""
    state = host.retailer.state_dir
    first = _ask(attacker, "kind-1", FtlTag.START, _ftl_start("kind-1", "no-psi"), FtlTag.ACCEPT)
    assert first.get("ok") is False and first["reason"] != IN_USE
    shown = admin_call(host.retailer, "status")["jobs"]["kind-1"]
    assert shown["state"] == "refused"
    fed = {"job": {**FED_JOB.to_json(), "job_id": "kind-1"}}
    for tag, body, reply in (
        (FedTag.START, fed, FedTag.ACCEPT),
        (JobTag.JOB_START, {"job_id": "kind-1"}, JobTag.JOB_ACCEPT),
    ):
        answer = _ask(attacker, "kind-1", tag, body, reply)
        assert answer.get("reason", answer.get("refused")) == IN_USE, (tag, answer)
    assert admin_call(host.retailer, "status")["jobs"]["kind-1"] == shown
    owner = json.loads((state / "jobs" / "kind-1" / OWNER_FILE).read_text())
    assert owner == {"guest": "bank", "kind": "transfer"}
    assert not not_private(state), not_private(state)
