"""A job id belongs to the guest (and the kind of job) that first started it
(docs/protocol.md §4.4.1): a second allowed guest tries every message that could stop,
restart, take over or fail another guest's job at the host and at the arbiter, in one
process over in-memory channels. Nothing of the owner's job changes, and every refusal
names the rule only."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocols.arbiter.service import SetupTag
from protocols.crypto.paillier import PrivateKey, PublicKey, key_file_bytes
from protocols.envelope import ControlBlock, Envelope, control_of
from protocols.errors import JobIdInUseError, peer_reason
from protocols.executor import InlineExecutor
from protocols.roles import Party, Role
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryChannel, InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.session_setup import TAGS, run_job, synthetic_tables, trio
from tests.vfl.test_splitnn_session import CONFIG
from vfl.config import JobType, PartyConfig, parse_config
from vfl.fedavg.protocol import FedJob, FedTag
from vfl.service import owners as owners_module
from vfl.service.arbiter import KEY_FILE
from vfl.service.audit import read_audit
from vfl.service.drivers import splitnn as splitnn_driver
from vfl.service.owners import IN_USE, OWNER_FILE, JobOwner, JobOwners
from vfl.service.runner import JobRunner, message_tags
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.job import JobTag, SplitJob
from vfl.transfer.session import FtlJob, FtlTag, ftl_folder

BANK2 = Party("bank2", Role.GUEST)

PARTY = """
[party]
id = "{me}"
role = "{role}"
listen = "127.0.0.1:0"
state_dir = "state/{me}"

[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"

[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"

[[peers]]
id = "bank2"
role = "guest"
address = "127.0.0.1:3"

[[peers]]
id = "{other}"
role = "{other_role}"
address = "127.0.0.1:2"

[arbiter]
allow_test_key = true

[random]
seed = 7
"""
HOST_EXTRA = """
[data]
credit = "credit.csv"

[accept]
protect_modes = ["none"]
"""


def config(tmp_path: Path, me: str) -> PartyConfig:
    """The retailer (host) or the arbiter, each accepting two guests: bank and bank2."""
    if me == "retailer":
        text = PARTY.format(me=me, role="host", other="arbiter", other_role="arbiter")
        text += HOST_EXTRA
    else:
        text = PARTY.format(me=me, role="arbiter", other="retailer", other_role="host")
    return parse_config(tomllib.loads(text), source=tmp_path / f"{me}.toml")


def ftl_start(job_id: str) -> dict[str, Any]:
    return {
        "job": {**FtlJob(job_id="ftl").to_json(), "job_id": job_id},
        "request": {"data": "credit", "psi_job": "psi-1"},
        "held": [],
        "run": 1,
    }


def fed_start(job_id: str, coordinator: str) -> dict[str, Any]:
    job = FedJob(
        job_id=job_id, coordinator=coordinator, clients=((coordinator, "a"), ("retailer", "credit"))
    )
    return {"job": job.to_json()}


ATTACKS: dict[str, tuple[str, str, Callable[[str, str], dict[str, Any]]]] = {
    # kind: (START tag, answer tag, body(job id, sender))
    "transfer": (FtlTag.START, FtlTag.ACCEPT, lambda job, sender: ftl_start(job)),
    "horizontal": (FedTag.START, FedTag.ACCEPT, fed_start),
    "split_nn": (JobTag.JOB_START, JobTag.JOB_ACCEPT, lambda job, sender: {"job_id": job}),
}


def ask(
    channel: InMemoryChannel, job_id: str, kind: str, run_id: str, body_of: str | None = None
) -> str:
    """Send a START of ``kind`` for ``job_id`` (whose body names ``body_of``, by default the
    same job) to the retailer; its refusal's reason."""
    tag, answer, body = ATTACKS[kind]
    channel.fresh_stream(job_id, [RETAILER])
    channel.send(
        Envelope(
            job_id=job_id,
            run_id=run_id,
            sender=channel.me,
            receiver=RETAILER,
            tag=tag,
            body=ControlBlock.from_obj(body(body_of or job_id, channel.me.party_id)),
        )
    )
    reply = control_of(
        channel.recv(job_id=job_id, sender=RETAILER, tag=answer, step=0, run_id=run_id, timeout=60)
    )
    assert reply.get("ok") is not True, reply
    return str(reply.get("reason") or reply.get("refused"))


def job_failed(sender: Party, job_id: str, receiver: Party = RETAILER) -> Envelope:
    return Envelope(
        job_id=job_id,
        sender=sender,
        receiver=receiver,
        tag=JobTag.JOB_FAILED,
        step=1,
        body=ControlBlock.from_obj({"run_id": "r", "reason": "DataError: a check failed"}),
    )


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def wait_for(check: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + 60
    while not check():
        if time.monotonic() > give_up:
            raise AssertionError(what)
        time.sleep(0.02)


# ------------------------------------------------------------------ the record itself


def test_the_owner_record_is_kept_refuses_others_and_names_nobody(tmp_path: Path) -> None:
    """Claimed once for a guest and a kind, owner-only, kept across a restart; another guest
    or another kind is refused with the rule only; an unreadable record refuses everyone."""
    owners = JobOwners(state_dir=tmp_path)
    owners.claim("x", guest="bank", kind=JobType.SPLIT_NN)
    owners.claim("x", guest="bank", kind=JobType.SPLIT_NN)  # its own: again and again
    record = tmp_path / "jobs" / "x" / OWNER_FILE
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(record.parent).st_mode) == 0o700
    for guest, kind in (("bank2", JobType.SPLIT_NN), ("bank", JobType.TRANSFER)):
        with pytest.raises(JobIdInUseError, match="belongs to bank's split_nn job") as caught:
            owners.claim("x", guest=guest, kind=kind)
        assert peer_reason(caught.value) == IN_USE
        assert not any(n in IN_USE for n in ("bank", "split", "transfer", "horizontal"))
    again = JobOwners(state_dir=tmp_path)  # a restarted service
    assert again.owner("x") == JobOwner(guest="bank", kind=JobType.SPLIT_NN)
    again.claim("y", guest="bank2", kind=JobType.TRANSFER, record=False)  # checked only
    assert again.owner("y") is None and not (tmp_path / "jobs" / "y").exists()
    (tmp_path / "jobs" / "z").mkdir()
    (tmp_path / "jobs" / "z" / OWNER_FILE).write_text("{not json")
    with pytest.raises(JobIdInUseError, match="cannot be read") as caught:
        again.claim("z", guest="bank", kind=JobType.SPLIT_NN)
    assert peer_reason(caught.value) == IN_USE and str(tmp_path) not in IN_USE


# ------------------------------------------------------------------ at the host


def quick(cls: Any) -> Any:
    """The service's HostSession with the small test pools."""

    def make(**kwargs: Any) -> Any:
        return cls(**kwargs, pool_target=64, timeout=120)

    return make


def test_a_second_guest_cannot_touch_a_running_split_nn_job(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bank's split-NN job holds after a step; meanwhile bank2 sends a transfer START, a
    FedAvg START, a split-NN JOB_START and a JOB_FAILED for its id: each is refused with the
    rule only (or ignored), the host's run is neither stopped nor restarted, and the job
    ends exactly as an undisturbed run does."""
    guest_table, host_table, splits = synthetic_tables(rows=160)
    job = SplitJob(job_id="own1", train=CONFIG, batch=16, batch_eval=24, epochs=2, patience=3)
    reference = run_job(trio(tmp_path / "ref", pk, sk), job, guest_table, host_table, splits)
    assert reference.result is not None

    t = trio(tmp_path / "run", pk, sk)
    cfg = config(tmp_path / "run", "retailer")
    monkeypatch.setattr(splitnn_driver, "aligned_table", lambda *args, **kwargs: host_table)
    monkeypatch.setattr(splitnn_driver, "HostSession", quick(splitnn_driver.HostSession))
    retailer = t.net.channel(RETAILER, tags=TagRegistry(message_tags()))
    runner = JobRunner(config=cfg, channel=retailer, executor=InlineExecutor())
    monkeypatch.setattr(runner.ctx, "background", lambda: InlineExecutor())
    # the reference's host seed (the service keys its [random] seed, docs/protocol.md §4.4.2)
    monkeypatch.setattr(runner.ctx, "party_seed", lambda purpose, *, scope: 7)
    attacker = t.net.channel(BANK2, tags=TagRegistry(message_tags()))
    reached, release = threading.Event(), threading.Event()

    def hold(step: int) -> None:
        if step == 3:
            reached.set()
            release.wait(120)

    results: list[Any] = []
    guest = GuestSession(
        channel=t.channel("bank"),
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
        timeout=120,
        allow_test_key=True,
        host_request={"data": "credit"},
        after_step=hold,
    )
    thread = threading.Thread(target=lambda: results.append(guest.run()))
    thread.start()
    try:
        assert reached.wait(120), "the bank's run did not reach its hold"
        assert runner.status()["own1"]["state"] == "running"
        for kind in ("transfer", "horizontal", "split_nn"):
            assert ask(attacker, "own1", kind, f"b2-{kind}") == IN_USE
        runner._on_job_failed(job_failed(BANK2, "own1"))  # not its guest: ignored
        assert runner.status()["own1"]["state"] == "running"
        assert runner.drivers[JobType.SPLIT_NN].peer_runs() == 1
    finally:
        release.set()
        thread.join(120)
    assert results and results[0].test_scores == reference.result.test_scores
    assert results[0].history == reference.result.history
    wait_for(lambda: runner.status()["own1"]["state"] == "done", "the host's run did not end")
    runner.close()
    records = [r for r in read_audit(cfg.state_dir / "audit.jsonl") if r["job_id"] == "own1"]
    assert [r["event"] for r in records if r["event"] != "job_refused"] == [
        "job_accepted",
        "job_finished",
    ]
    refused = [r for r in records if r["event"] == "job_refused"]
    assert len(refused) == 3
    assert all("belongs to bank's split_nn job" in r["reason"] for r in refused)
    owner = json.loads((cfg.state_dir / "jobs" / "own1" / OWNER_FILE).read_text())
    assert owner == {"guest": "bank", "kind": "split_nn"}


class StubRun:
    """A run of another kind's driver that only records whether it was stopped."""

    def __init__(self, guest: Party) -> None:
        self.guest, self.stopped = guest, False

    def stop(self) -> None:
        self.stopped = True


def test_transfer_and_fedavg_runs_belong_to_their_guest(tmp_path: Path) -> None:
    """bank2's transfer job and the bank's FedAvg job run at the host (stub runs, real
    checkpoint files); the other guest's START of either kind, a START of another kind and
    its JOB_FAILED change nothing; the owner's own refused START leaves its run shown
    running, and the owner's JOB_FAILED reaches only the driver of the job's kind."""
    net = InMemoryNetwork()
    cfg = config(tmp_path, "retailer")
    runner = JobRunner(
        config=cfg,
        channel=net.channel(RETAILER, tags=TagRegistry(message_tags())),
        executor=InlineExecutor(),
    )
    bank = net.channel(BANK, tags=TagRegistry(message_tags()))
    bank2 = net.channel(BANK2, tags=TagRegistry(message_tags()))
    ftl, fed = runner.drivers[JobType.TRANSFER], runner.drivers[JobType.HORIZONTAL]
    runs: dict[str, StubRun] = {}
    done: list[threading.Event] = []
    for job_id, guest, kind, runs_of in (
        ("ftl1", BANK2, JobType.TRANSFER, ftl._hosts),  # type: ignore[attr-defined]
        ("fed1", BANK, JobType.HORIZONTAL, fed._clients),  # type: ignore[attr-defined]
    ):
        runner.ctx.claim(job_id, guest=guest.party_id, kind=kind)
        runs[job_id] = StubRun(guest)
        done.append(threading.Event())
        runs_of[job_id] = (runs[job_id], done[-1])
        runner.ctx.update(job_id, state="running", phase="training")
    checkpoints = ftl_folder(cfg.state_dir, "ftl1")
    checkpoints.mkdir()
    (checkpoints / "step-3.npz").write_bytes(b"bank2's shares")
    before = tree(cfg.state_dir / "jobs")
    # a split-NN run under the same id, as before ids had owners: R3 must not reach it
    ghost = StubRun(BANK2)
    splitnn = runner.drivers[JobType.SPLIT_NN]
    splitnn._host_runs["ftl1"] = splitnn_driver._HostRun(  # type: ignore[attr-defined]
        ghost,  # type: ignore[arg-type]
        job_failed(BANK2, "ftl1"),
    )

    for sender, job_id in ((bank, "ftl1"), (bank2, "fed1")):  # the other guest's job
        for kind in ("transfer", "horizontal", "split_nn"):
            assert ask(sender, job_id, kind, f"{sender.me.party_id}-{kind}") == IN_USE
        runner._on_job_failed(job_failed(sender.me, job_id))
    for kind in ("transfer", "split_nn"):  # the owner's own job id, for another kind
        assert ask(bank, "fed1", kind, f"own-{kind}") == IN_USE
    # the owner's own START of its kind, refused by another rule: its run goes on
    assert "another job than its envelope" in ask(bank, "fed1", "horizontal", "own", "fed2")
    assert tree(cfg.state_dir / "jobs") == before
    assert not any(run.stopped for run in (*runs.values(), ghost))
    status = runner.status()
    assert status["ftl1"]["state"] == status["fed1"]["state"] == "running"

    runner._on_job_failed(job_failed(BANK2, "ftl1"))  # the owner's: its transfer run only
    runner._on_job_failed(job_failed(BANK, "fed1"))
    assert runs["ftl1"].stopped and runs["fed1"].stopped and not ghost.stopped
    status = runner.status()
    assert status["ftl1"]["state"] == status["fed1"]["state"] == "failed"
    for each in [*done, splitnn._host_runs["ftl1"].done]:  # type: ignore[attr-defined]
        each.set()
    runner.close()
    records = read_audit(cfg.state_dir / "audit.jsonl")
    refused = [r for r in records if r["event"] == "job_refused"]
    assert "another job than its envelope" in refused.pop(-1)["reason"]  # the owner's own
    owners = sorted(r["reason"].split(";")[0] for r in refused)
    assert owners == [
        *["job fed1 belongs to bank's horizontal job"] * 5,
        *["job ftl1 belongs to bank2's transfer job"] * 3,
    ]
    assert [r["submitter"] for r in records if r["event"] == "job_failed"] == ["bank2", "bank"]


def test_old_records_and_a_full_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split-NN run an older version recorded (host_run.json, no owner record) is its
    guest's once the host starts; a START whose owner record cannot be written is refused,
    a full folder with the no_space flag and the rule only."""
    cfg = config(tmp_path, "retailer")
    old = cfg.state_dir / "jobs" / "old1"
    old.mkdir(parents=True)
    (old / "host_run.json").write_text('{"guest": "bank", "run_id": "r", "state": "done"}')
    net = InMemoryNetwork()
    runner = JobRunner(
        config=cfg,
        channel=net.channel(RETAILER, tags=TagRegistry(message_tags())),
        executor=InlineExecutor(),
    )
    assert runner.ctx.owners.owner("old1") == JobOwner(guest="bank", kind=JobType.SPLIT_NN)
    bank2 = net.channel(BANK2, tags=TagRegistry(message_tags()))
    assert ask(bank2, "old1", "split_nn", "b2") == IN_USE

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owners_module, "atomic_write", full)
    tag, answer, body = ATTACKS["split_nn"]
    bank2.fresh_stream("new1", [RETAILER])
    bank2.send(
        Envelope(
            job_id="new1",
            run_id="b2",
            sender=BANK2,
            receiver=RETAILER,
            tag=tag,
            body=ControlBlock.from_obj(body("new1", "bank2")),
        )
    )
    reply = control_of(
        bank2.recv(job_id="new1", sender=RETAILER, tag=answer, step=0, run_id="b2", timeout=60)
    )
    assert reply == {
        "refused": "no space left in retailer's state folder; its operator must free space",
        "no_space": True,
    }
    assert runner.status()["new1"]["state"] == "refused"  # nobody's job: nothing else shown
    assert ask(bank2, "new1", "transfer", "b2-ftl") == reply["refused"]
    assert runner.ctx.owners.owner("new1") is None
    runner.close()


# ------------------------------------------------------------------ at the arbiter


def spec(pk: PublicKey, guest: str) -> dict[str, Any]:
    return {
        "job_id": "reg1",
        "key_id": pk.key_id.hex(),
        "key_bits": pk.bits,
        "mode": "p1",
        "batch": 16,
        "d": 3,
        "k": 2,
        "batch_eval": 24,
        "guest": guest,
        "host": "retailer",
        "epochs": 1,
        "steps_per_epoch": 4,
        "eval_steps": 1,
        "eval_rewind": 1,
        "encrypted": True,
    }


def test_only_a_registered_jobs_guest_counts_at_the_arbiter(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey
) -> None:
    """bank2 proposes the bank's job id while the bank's proposal waits for the host, and
    again once it is registered: refused each time, without a guest in A's status or a
    job_accepted record; bank2's JOB_FAILED changes nothing, the bank's fails the job."""
    cfg = config(tmp_path, "arbiter")
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / KEY_FILE).write_bytes(key_file_bytes(pk, sk))
    net = InMemoryNetwork()
    runner = JobRunner(
        config=cfg,
        channel=net.channel(ARBITER, tags=TagRegistry(message_tags())),
        executor=InlineExecutor(),
    )
    channels = {p: net.channel(p, tags=TagRegistry(TAGS)) for p in (BANK, BANK2, RETAILER)}

    def propose(party: Party, guest: str, run_id: str) -> None:
        channels[party].fresh_stream("reg1", [ARBITER])
        channels[party].send(
            Envelope(
                job_id="reg1",
                run_id=run_id,
                sender=party,
                receiver=ARBITER,
                tag=SetupTag.JOB_SPEC,
                body=ControlBlock.from_obj(spec(pk, guest)),
            )
        )

    def ready(party: Party, run_id: str) -> dict[str, Any]:
        return control_of(
            channels[party].recv(
                job_id="reg1",
                sender=ARBITER,
                tag=SetupTag.JOB_READY,
                step=0,
                run_id=run_id,
                timeout=60,
            )
        )

    propose(BANK, "bank", "r1")
    propose(BANK2, "bank2", "x1")  # while the bank's proposal waits for the host
    assert "waiting for other parties" in ready(BANK2, "x1")["refused"]
    assert "guest" not in runner.status().get("reg1", {})
    runner._on_job_failed(job_failed(BANK2, "reg1", ARBITER))
    assert runner.status().get("reg1", {}).get("state") != "failed"
    propose(RETAILER, "bank", "r1")
    assert ready(BANK, "r1") == ready(RETAILER, "r1") == {"job_id": "reg1"}
    assert runner.status()["reg1"]["guest"] == "bank"
    propose(BANK2, "bank2", "x2")  # once it is registered
    assert ready(BANK2, "x2")["refused"] == "this job id is registered to another guest"
    runner._on_job_failed(job_failed(BANK2, "reg1", ARBITER))
    assert runner.status()["reg1"]["state"] == "running"
    runner._on_job_failed(job_failed(BANK, "reg1", ARBITER))
    assert runner.status()["reg1"]["state"] == "failed"
    aggregator = runner.drivers[JobType.HORIZONTAL].aggregator  # type: ignore[attr-defined]
    aggregator.admit(FedJob.from_json(fed_start("fedA", "bank")["job"]), BANK)
    with pytest.raises(JobIdInUseError):  # FedAvg job ids at A: their first coordinator's
        aggregator.admit(FedJob.from_json(fed_start("fedA", "bank2")["job"]), BANK2)
    runner.close()
    records = read_audit(cfg.state_dir / "audit.jsonl")
    accepted = [r["submitter"] for r in records if r["event"] == "job_accepted"]
    assert accepted == ["bank", "retailer"]
    assert not any(r.get("guest") == "bank2" for r in records if r["event"] != "job_refused")
    assert [r["submitter"] for r in records if r["event"] == "job_failed"] == ["bank"]
