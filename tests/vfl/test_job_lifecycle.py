"""The services' job lifecycle in one process: resubmission after a restart, RUN_STOPPED at
the guest, a new run replacing one the host still serves, and the audit log file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from protocols.crypto.paillier import PrivateKey, PublicKey, key_file_bytes
from protocols.crypto.policy_store import PolicyStore
from protocols.envelope import ControlBlock, Envelope
from protocols.errors import (
    ConfigError,
    DataError,
    JobRefusedError,
    NoSpaceError,
    PeerUnavailableError,
    PolicyViolationError,
)
from protocols.executor import InlineExecutor
from protocols.tags import TagRegistry
from protocols.transport.inmemory import InMemoryChannel, InMemoryNetwork
from tests.conftest import ARBITER, BANK, RETAILER
from tests.vfl.session_setup import TAGS, run_job, synthetic_tables, trio
from tests.vfl.test_splitnn_session import CONFIG, Crash, crashing
from vfl.config import JobType, PartyConfig, parse_config
from vfl.service import guestjob as guestjob_module
from vfl.service.arbiter import KEY_FILE, ArbiterWatch
from vfl.service.audit import (
    AuditEvent,
    AuditLog,
    code_version,
    config_digest,
    file_digest,
    read_audit,
)
from vfl.service.driver import GuestAttempt, retryable
from vfl.service.drivers import parse_job
from vfl.service.drivers import splitnn as splitnn_driver
from vfl.service.guestjob import OUTCOME_FILE, GuestJob
from vfl.service.requests import TrainRequest
from vfl.service.runner import REQUEST_FILE, JobRunner
from vfl.splitnn.guest import GuestSession
from vfl.splitnn.job import JobTag, SplitJob

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
id = "{peer}"
role = "{peer_role}"
address = "127.0.0.1:1"

[[peers]]
id = "arbiter"
role = "arbiter"
address = "127.0.0.1:2"

[data]
credit = "credit.csv"

[arbiter]
allow_test_key = true

[random]
seed = 7

[accept]
protect_modes = ["none"]
"""


def config(tmp_path: Path, me: str) -> PartyConfig:
    role, peer, peer_role = (
        ("guest", "retailer", "host") if me == "bank" else ("host", "bank", "guest")
    )
    text = PARTY.format(me=me, role=role, peer=peer, peer_role=peer_role)
    return parse_config(tomllib.loads(text), source=tmp_path / f"{me}.toml")


def request(job_id: str, **job: Any) -> dict[str, Any]:
    return {
        "job_file": {"job": {"id": job_id, "guest_data": "credit", "host_data": "credit", **job}}
    }


def typed(job_id: str) -> TrainRequest:
    """The typed request of :func:`request` (the guest's, bank's)."""
    return TrainRequest(job=parse_job(request(job_id)["job_file"], source="test", party_id="bank"))


def test_unfinished_jobs_are_resubmitted_on_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifecycle step 1: a request without an outcome runs again; one with an outcome does
    not; one that no longer parses is recorded as failed (and not tried again)."""
    cfg = config(tmp_path, "bank")
    jobs = cfg.state_dir / "jobs"
    for job_id, body in (("a", request("a")), ("b", request("b")), ("c", request("c", x=1))):
        (jobs / job_id).mkdir(parents=True)
        (jobs / job_id / REQUEST_FILE).write_text(json.dumps(body))
    (jobs / "b" / OUTCOME_FILE).write_text('{"state": "done"}')
    net = InMemoryNetwork()
    runner = JobRunner(
        config=cfg,
        channel=net.channel(BANK, tags=TagRegistry(TAGS)),
        executor=InlineExecutor(),
    )
    launched: list[str] = []
    monkeypatch.setattr(runner, "_launch", lambda req: launched.append(req.job.job_id))
    runner.start()
    assert launched == ["a"]
    status = runner.status()
    assert status["a"]["phase"] == "resuming" and status["c"]["state"] == "failed"
    assert "unknown key" in status["c"]["error"]
    assert json.loads((jobs / "c" / OUTCOME_FILE).read_text())["state"] == "failed"
    runner.close()


class StubSession:
    """Stands in for the guest's current session."""

    def __init__(self, run_id: str) -> None:
        self.run_id, self.stopped, self.key_id = run_id, False, ""

    def stop(self) -> None:
        self.stopped = True


def test_run_stopped_stops_the_current_run(tmp_path: Path) -> None:
    """R1 at the guest: a restarted host serves none of G's runs, so G stops its current run
    (and knows why); a failure report about an older run only cuts a retry's wait short."""
    net = InMemoryNetwork()
    runner = JobRunner(
        config=config(tmp_path, "bank"),
        channel=net.channel(BANK, tags=TagRegistry(TAGS)),
        executor=InlineExecutor(),
    )
    host = net.channel(RETAILER, tags=TagRegistry(TAGS))
    entry = GuestJob(ctx=runner.ctx, driver=runner.drivers[JobType.SPLIT_NN], request=typed("j"))
    entry.session = StubSession("run3")
    runner._guest_jobs["j"] = entry

    def notice(step: int, **body: Any) -> None:
        entry.wake.clear()
        host.send(
            Envelope(
                job_id="j",
                sender=RETAILER,
                receiver=BANK,
                tag=JobTag.RUN_STOPPED,
                step=step,
                body=ControlBlock.from_obj(body),
            )
        )
        assert entry.wake.wait(5)

    notice(1, run_id="run2", reason="failed", error="E", retry=True)
    assert not entry.session.stopped and entry.notice is None  # type: ignore[union-attr]
    notice(2, run_id="run3", reason="failed", error="E", retry=False)
    assert entry.session.stopped and entry.notice["error"] == "E"  # type: ignore[union-attr,index]
    entry.session = StubSession("run4")
    notice(3, run_id="run1", reason="restarted")
    assert entry.session.stopped and entry.notice["reason"] == "restarted"  # type: ignore[union-attr,index]
    runner.close()


def test_retryable_errors() -> None:
    assert retryable(PeerUnavailableError("down")) and retryable(TimeoutError())
    assert retryable(PolicyViolationError("job x has no registered decryption policy"))
    assert not retryable(JobRefusedError("d = 99 exceeds accept.max_d = 64"))
    assert not retryable(ConfigError("bad job"))


def test_a_new_run_replaces_the_run_the_host_still_serves(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifecycle step 4: the guest dies mid-step while the host's service keeps waiting in
    the old run; the guest's next run makes the host stop the old one first, both resume,
    and the job ends exactly where an uninterrupted run ends."""
    guest_table, host_table, splits = synthetic_tables(rows=160)
    job = SplitJob(job_id="s14", train=CONFIG, batch=16, batch_eval=24, epochs=2, patience=3)
    reference = run_job(trio(tmp_path / "ref", pk, sk), job, guest_table, host_table, splits)
    assert reference.result is not None

    t = trio(tmp_path / "run", pk, sk)
    cfg = config(tmp_path / "run", "retailer")
    monkeypatch.setattr(splitnn_driver, "aligned_table", lambda *args, **kwargs: host_table)
    runner = JobRunner(config=cfg, channel=t.channel("retailer"), executor=InlineExecutor())
    monkeypatch.setattr(runner.ctx, "background", lambda: InlineExecutor())
    # the reference's host seed (the service keys its [random] seed, docs/protocol.md §4.4.2)
    monkeypatch.setattr(runner.ctx, "party_seed", lambda purpose, *, scope: 7)
    monkeypatch.setattr(splitnn_driver, "HostSession", _quick(splitnn_driver.HostSession))

    def guest(cls: Any = None) -> GuestSession:
        return GuestSession(
            channel=t.channel("bank", cls),
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
            timeout=20,
            allow_test_key=True,
            host_request={"data": "credit"},
        )

    with pytest.raises(Crash):
        guest(crashing("splitnn.B1", 7)).run()  # the host now waits in run1 for ever
    assert runner.status()["s14"]["state"] == "running"
    result = guest().run()
    assert result.test_scores == reference.result.test_scores
    assert result.history == reference.result.history
    give_up = time.monotonic() + 10
    while runner.status()["s14"]["state"] != "done" and time.monotonic() < give_up:
        time.sleep(0.05)
    assert runner.status()["s14"]["state"] == "done", runner.status()
    records = read_audit(cfg.state_dir / "audit.jsonl")
    assert [r["event"] for r in records] == ["job_accepted", "job_accepted", "job_finished"]
    assert [r["run_id"] for r in records[:2]] == ["run1", "run2"]
    runner.close()


def _quick(cls: Any) -> Any:
    """The service's HostSession with the small test pools and timeouts."""

    def make(**kwargs: Any) -> Any:
        return cls(**kwargs, pool_target=64, timeout=20)

    return make


def test_audit_log_appends_json_lines_owner_only(tmp_path: Path) -> None:
    """One JSON object per line with every field; 0600; appends across reopenings and
    from many threads without interleaving."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, party="bank")
    log.record(event=AuditEvent.JOB_SUBMITTED, job_id="j", submitter="bank", config_sha256="ab")
    threads = [
        threading.Thread(
            target=lambda i=i: log.record(event=AuditEvent.JOB_RETRIED, job_id=f"t{i}", attempt=i)
        )
        for i in range(20)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    log.record(event=AuditEvent.JOB_FAILED, job_id="late")  # closed: dropped, not raised
    again = AuditLog(path, party="bank")
    again.record(event=AuditEvent.JOB_FINISHED, job_id="j", key_id="00ff")
    again.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    records = read_audit(path)
    assert len(records) == 22
    assert records[0]["event"] == "job_submitted" and records[-1]["key_id"] == "00ff"
    fields = {
        "time",
        "party",
        "job_id",
        "event",
        "submitter",
        "config_sha256",
        "input_sha256",
        "code_version",
        "key_id",
    }
    assert all(fields <= set(r) for r in records)
    assert sorted(r["attempt"] for r in records[1:21]) == list(range(20))
    assert records[0]["time"].endswith("+00:00") and records[0]["code_version"] == code_version()


def test_digests(tmp_path: Path) -> None:
    assert config_digest({"a": 1, "b": [1, 2]}) == config_digest({"b": [1, 2], "a": 1})
    data = tmp_path / "x.csv"
    data.write_bytes(np.arange(300_000).tobytes())
    assert file_digest(data, chunk=4096) == hashlib.sha256(data.read_bytes()).hexdigest()
    assert file_digest(tmp_path / "missing") is None


class StubPolicy:
    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.values: dict[str, dict[str, int]] = {}

    def job(self, job_id: str) -> object | None:
        return object() if job_id in self.registered else None

    def counts(self, job_id: str) -> dict[str, int]:
        return dict(self.values.get(job_id, {}))


class StubService:
    def __init__(self) -> None:
        self.policy = StubPolicy()
        self.key_id = bytes.fromhex("ab" * 8)
        self.refusal_listeners: list[Any] = []

    def on_refused(self, listener: Any) -> None:
        self.refusal_listeners.append(listener)

    def on_proposed(self, listener: Any) -> None:
        pass


def test_arbiter_watch_records_policy_decisions_and_counts(tmp_path: Path) -> None:
    """job_refused per JOB_SPEC refused, job_accepted per JOB_SPEC taken as a proposal;
    decryption counts when a registered job registers again (resume), periodically only
    when they changed, and at the stop."""
    text = PARTY.format(me="arbiter", role="arbiter", peer="retailer", peer_role="host")
    text = text.replace(
        'id = "arbiter"\nrole = "arbiter"\naddress', 'id = "bank"\nrole = "guest"\naddress'
    )
    text = text.replace('[data]\ncredit = "credit.csv"\n', "").replace(
        'protect_modes = ["none"]', "max_d = 8"
    )
    cfg = parse_config(tomllib.loads(text), source=tmp_path / "arbiter.toml")
    audit = AuditLog(tmp_path / "audit.jsonl", party="arbiter")
    watch = ArbiterWatch(config=cfg, audit=audit)
    service = StubService()
    watch.attach(service)  # type: ignore[arg-type]
    spec = {
        "job_id": "j",
        "key_id": "ab" * 8,
        "key_bits": 1024,
        "mode": "p0",
        "batch": 4,
        "d": 3,
        "k": 2,
        "batch_eval": 4,
        "guest": "bank",
        "host": "retailer",
        "epochs": 1,
        "steps_per_epoch": 3,
        "eval_steps": 2,
        "eval_rewind": 1,
    }

    def propose(sender: Any, registered: bool) -> None:
        watch.admit(spec, sender)
        watch.proposed(spec, sender, registered)

    propose(BANK, False)
    with pytest.raises(JobRefusedError, match="d = 9 exceeds accept.max_d = 8"):
        watch.admit({**spec, "d": 9}, RETAILER)
    service.policy.registered.add("j")
    service.policy.values["j"] = {"splitnn.Z_FWD": 12}
    propose(BANK, True)  # a new run registers again: the counts so far
    propose(RETAILER, True)  # unchanged: not recorded twice
    watch.record_counts("j", cause="periodic")  # unchanged: nothing
    service.policy.values["j"] = {"splitnn.Z_FWD": 24}
    watch.record_counts("j", cause="periodic")
    watch.close()
    audit.close()
    records = read_audit(tmp_path / "audit.jsonl")
    assert [(r["event"], r.get("cause")) for r in records] == [
        ("job_accepted", None),
        ("job_refused", None),
        ("decryption_counts", "registered again"),
        ("job_accepted", None),
        ("job_accepted", None),
        ("decryption_counts", "periodic"),
        ("decryption_counts", "service stop"),
    ]
    assert records[1]["submitter"] == "retailer" and "max_d" in records[1]["reason"]
    assert records[5]["counts"] == {"splitnn.Z_FWD": 24} and records[0]["key_id"] == "ab" * 8


ARBITER_PARTY = """
[party]
id = "arbiter"
role = "arbiter"
listen = "127.0.0.1:0"
state_dir = "state/arbiter"

[tls]
ca = "ca.pem"
certificate = "me.pem"
key = "me.key"

[[peers]]
id = "bank"
role = "guest"
address = "127.0.0.1:1"

[[peers]]
id = "retailer"
role = "host"
address = "127.0.0.1:2"

[arbiter]
allow_test_key = true
"""

BAD_DATA = "bank_private.csv row 12, column 'income': not a number"


class BadDataMidRun(InMemoryChannel):
    """The guest finds bad data after the job started: its third step fails."""

    armed: ClassVar[bool] = True

    def send(self, envelope: Envelope) -> Envelope:
        if BadDataMidRun.armed and envelope.tag == "splitnn.B1" and envelope.step == 2:
            BadDataMidRun.armed = False
            raise DataError(BAD_DATA)
        return super().send(envelope)


def test_a_guest_failure_mid_run_shows_failed_at_every_party(
    tmp_path: Path, pk: PublicKey, sk: PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifecycle step 6 (R3): the guest's job fails for good in the middle of a run; without
    any restart the host stops its run and both host and arbiter show the job failed, with
    the guest's peer-safe reason (not the file, row or column of the guest's error)."""
    guest_table, host_table, splits = synthetic_tables(rows=160)
    net = InMemoryNetwork()
    arb_cfg = parse_config(tomllib.loads(ARBITER_PARTY), source=tmp_path / "arbiter.toml")
    arb_cfg.state_dir.mkdir(parents=True)
    (arb_cfg.state_dir / KEY_FILE).write_bytes(key_file_bytes(pk, sk))
    runners = {
        "arbiter": JobRunner(
            config=arb_cfg,
            channel=net.channel(ARBITER, tags=TagRegistry(TAGS)),
            executor=InlineExecutor(),
        ),
        "retailer": JobRunner(
            config=config(tmp_path, "retailer"),
            channel=net.channel(RETAILER, tags=TagRegistry(TAGS)),
            executor=InlineExecutor(),
        ),
        "bank": JobRunner(
            config=config(tmp_path, "bank"),
            channel=net.channel(BANK, tags=TagRegistry(TAGS), channel_class=BadDataMidRun),
            executor=InlineExecutor(),
        ),
    }

    def table(
        config: PartyConfig,
        request: dict[str, Any],
        *,
        labels: str | None,
        guest: Any = None,
        **checks: Any,
    ) -> Any:
        return guest_table if labels else host_table

    monkeypatch.setattr(splitnn_driver, "aligned_table", table)
    monkeypatch.setattr(splitnn_driver, "split_rows", lambda *args, **kwargs: splits)
    monkeypatch.setattr(splitnn_driver, "HostSession", _quick(splitnn_driver.HostSession))
    monkeypatch.setattr(splitnn_driver, "GuestSession", _quick(splitnn_driver.GuestSession))
    for runner in runners.values():
        monkeypatch.setattr(runner.ctx, "background", lambda: InlineExecutor())
    job = {"psi_job": "p", "batch": 16, "batch_eval": 24, "epochs": 2, "mode": "p0"}
    submitted = request("r3", **job)
    submitted["job_file"]["model"] = {"d": 3, "k": 2, "guest_widths": [6, 4], "host_widths": [6, 3]}
    submitted["job_file"]["protect"] = {"mode": "none", "allow_label_leak": True}
    runners["bank"].submit(submitted)

    def state(party: str) -> dict[str, Any]:
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            now = runners[party].status().get("r3", {})
            if now.get("state") == "failed":
                return now
            time.sleep(0.05)
        raise AssertionError(f"{party}: {runners[party].status()}")

    assert BAD_DATA in state("bank")["error"]  # the guest's own status has the details
    public = "bank failed: DataError: its data failed a check (details in its own log)"
    assert state("retailer")["error"] == public
    assert state("arbiter")["error"] == public
    host_run = json.loads(
        (tmp_path / "state" / "retailer" / "jobs" / "r3" / "host_run.json").read_text()
    )
    assert host_run["state"] == "failed"  # a restarted host sends no RUN_STOPPED for it
    for party in ("retailer", "arbiter"):
        records = read_audit(tmp_path / "state" / party / "audit.jsonl")
        assert [r["event"] for r in records][-1] == "job_failed"
        assert "bank_private" not in json.dumps(records)
    for runner in runners.values():
        runner.close()


def _enospc(*_: Any, **__: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_audit_record_that_does_not_fit_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the record written in part is cut off again (no torn line between two
    whole ones), the error is logged, not raised; later records append normally."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, party="bank")
    log.record(event=AuditEvent.JOB_SUBMITTED, job_id="a")
    real_write = os.write

    def half(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # a short write, as on a full disk

    monkeypatch.setattr(os, "write", half)
    log.record(event=AuditEvent.JOB_RETRIED, job_id="b")
    monkeypatch.setattr(os, "write", real_write)
    log.record(event=AuditEvent.JOB_FINISHED, job_id="c")
    log.close()
    assert [r["job_id"] for r in read_audit(path)] == ["a", "c"]


def test_a_guest_whose_folder_is_full_waits_for_space_without_using_up_its_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lifecycle step 6 at G: runs that fail for lack of space (more than RETRY_LIMIT of
    them, and a transport failure while it lasts) do not fail the job; the status says
    why, naming the folder; the job finishes once a run gets through."""
    monkeypatch.setattr(guestjob_module, "NO_SPACE_DELAYS_S", (0.0,))
    cfg = config(tmp_path, "bank")
    net = InMemoryNetwork()
    runner = JobRunner(
        config=cfg,
        channel=net.channel(BANK, tags=TagRegistry(TAGS)),
        executor=InlineExecutor(),
    )
    seen: list[dict[str, Any]] = []
    failures = [OSError(errno.ENOSPC, "No space left on device")] * (
        guestjob_module.RETRY_LIMIT + 2
    )
    failures.insert(3, PeerUnavailableError("the arbiter cannot journal it either"))

    def attempt(attempt: GuestAttempt[Any]) -> dict[str, Any]:
        seen.append(runner.status()["full"])
        if failures:
            raise failures.pop(0)
        return {"test": {"auc": 1.0}, "best_epoch": 0}

    monkeypatch.setattr(runner.drivers[JobType.SPLIT_NN], "attempt", attempt)
    runner.ctx.update("full", state="running")
    runner._launch(typed("full"))
    runner._guest_jobs["full"].thread.join(30)
    status = runner.status()["full"]
    assert status["state"] == "done" and status["no_space"] is None, status
    waiting = [s for s in seen if s.get("phase") == "waiting_for_space"]
    assert len(waiting) == guestjob_module.RETRY_LIMIT + 3
    assert all(str(cfg.state_dir) in s["no_space"] for s in waiting)
    assert all(s["no_space"].startswith("no space left in") for s in waiting)
    events = [r["event"] for r in read_audit(cfg.state_dir / "audit.jsonl")]
    assert events.count("job_retried") == 1 and "job_failed" not in events
    runner.close()


def test_the_arbiter_refuses_what_it_cannot_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's policy journal cannot take the record (a full folder): the journal keeps no part
    of it, the error names the folder, and the store reads back what was written."""
    store = PolicyStore(tmp_path / "policy")
    store.append("j", {"served": "t", "step": 0, "digest": "00", "n": 1})
    path = next((tmp_path / "policy" / "jobs").glob("*.log"))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:5]))
    monkeypatch.setattr(os, "fsync", _enospc)
    folder = re.escape(str(tmp_path / "policy"))
    with pytest.raises(NoSpaceError, match=f"no space left in {folder}"):
        store.append("j", {"served": "t", "step": 1, "digest": "00", "n": 1})
    monkeypatch.undo()
    assert path.read_bytes().count(b"\n") == 1 and path.read_bytes().endswith(b"\n")
    store.append("j", {"served": "t", "step": 2, "digest": "00", "n": 1})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]
