"""Split-NN jobs between three party services (processes, mutual TLS): `vfl train` at the
guest (PSI, encrypted training, validation, test scores), each party's audit log and
owner-only state, and a host stopped and restarted mid-job that resumes to the same result."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np
import pandas as pd
import pytest

from protocols.arbiter.service import SetupTag
from protocols.crypto.cipher import PaillierCipher
from protocols.crypto.paillier import PublicKey
from protocols.crypto.tensor import EncryptedTensor
from protocols.envelope import CipherBlock, ControlBlock, Envelope, control_of
from protocols.errors import DataError
from protocols.roles import PartyAddress
from protocols.tags import TagRegistry
from protocols.transport.grpc_channel import GrpcChannel
from tests.vfl.state_files import not_private
from vfl.common.decision import Decision
from vfl.config import PartyConfig
from vfl.data.datasets import data_dir
from vfl.scoring.protocol import ScoreTag
from vfl.service.admin import admin_call, service_address
from vfl.service.arbiter import arbiter_key
from vfl.service.audit import AUDIT_FILE
from vfl.service.demo import write_cluster_setup
from vfl.service.local import LocalCluster
from vfl.splitnn.spec import DecTag

ROOT = Path(__file__).resolve().parents[2]

JOB = """
[job]
id = "breast-1"
guest_data = "breast"
host_data = "breast"
label_column = "y"
batch = 64
batch_eval = 64
epochs = 2

[model]
d = 4
k = 4
guest_widths = [8, 4]
host_widths = [8, 4]
learning_rate = 0.02
"""

AUDIT_FIELDS = {
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Bank, retailer and arbiter services with a 512-bit test key; both data parties fix
    their random draws ([testing] seed) so that two runs of one job can be compared, the
    retailer also accepts protect = "none" (the comparison needs noise-free jobs), and the
    bank's jobs may pause after a step until released ([testing] allow_hold)."""
    tmp = tmp_path_factory.mktemp("services")
    paths = write_cluster_setup(
        tmp / "setup",
        data_folder=data_dir(os.environ),
        key_bits=512,
        seed=11,
        host_protect_modes=["none", "marvell", "gaussian", "max_norm"],
        allow_hold=True,
    )
    cluster = LocalCluster.launch(paths, root=tmp)
    try:
        yield cluster
    finally:
        codes = cluster.stop()
    assert codes == {"bank": 0, "retailer": 0, "arbiter": 0}, codes  # SIGTERM stops cleanly
    # the arbiter's last process recorded the decryption counts of every job it registered
    records = cluster.audit("arbiter")
    end = len(records)
    while end and records[end - 1].get("cause") == "service stop":
        end -= 1
    at_stop = {r["job_id"]: r["counts"] for r in records[end:]}
    earlier = [i for i, r in enumerate(records[:end]) if r.get("cause") == "service stop"]
    since = records[earlier[-1] + 1 if earlier else 0 : end]
    registered = {r["job_id"] for r in since if r["event"] == "job_accepted"}
    assert registered and registered <= set(at_stop), registered - set(at_stop)
    trained = [c for job_id, c in at_stop.items() if job_id.startswith("breast")]
    assert trained and all(c["splitnn.Z_FWD"] > 0 for c in trained)  # not the attacks' jobs


def test_train_job_between_three_services(cluster: LocalCluster) -> None:
    job_file = cluster.root / "job.toml"
    job_file.write_text(JOB)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfl",
            "train",
            str(job_file),
            "--config",
            str(cluster.paths["bank"]),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout[out.stdout.index("{") :])
    assert final["state"] == "done", final
    assert final["test"]["roc_auc"] > 0.9
    configs = cluster.configs
    result = json.loads(
        (configs["bank"].state_dir / "jobs" / "breast-1" / "result.json").read_text()
    )
    assert len(result["history"]) == 2 and result["test"]["roc_auc"] > 0.9
    # every job's report, test scores with ids, its seed (none given: a fresh one, recorded)
    assert len(result["test_ids"]) == len(result["test_scores"]) and result["seed"] >= 0
    assert result["decision"]["calibration"] == "platt" and "brier" in result["test_calibrated"]
    report = configs["bank"].state_dir / "jobs" / "breast-1" / "report"
    assert {"report.json", "roc.png", "pr.png", "calibration.png", "loss.png"} <= {
        p.name for p in report.iterdir()
    }
    scored = pd.read_csv(report / "test_scores.csv", dtype={"id": str})
    assert list(scored["id"]) == result["test_ids"]
    for party in ("bank", "retailer"):  # each party's own data report, owner-only
        checks = configs[party].state_dir / "jobs" / "breast-1" / "data_check.json"
        assert stat.S_IMODE(checks.stat().st_mode) == 0o600
        assert json.loads(checks.read_text())["findings"] is not None
    arbiter_log = (cluster.logs / "arbiter.log").read_text()
    assert "job breast-1 registered" in arbiter_log
    host_log = cluster.log("retailer")
    assert "job breast-1 finished at the host" in host_log

    # every party's audit log: JSON lines with all fields, nothing but ids and hashes
    key_file = json.loads((configs["arbiter"].state_dir / "arbiter_key.json").read_text())
    events: dict[str, list[str]] = {}
    for party in ("bank", "retailer", "arbiter"):
        records = [r for r in cluster.audit(party) if r["job_id"] == "breast-1"]
        assert all(set(r) >= AUDIT_FIELDS and r["party"] == party for r in records), records
        events[party] = [r["event"] for r in records]
        assert all(r["key_id"] for r in records if r["event"] != "job_submitted")
        assert len({r["key_id"] for r in records if r["key_id"]}) == 1
        assert all(str(key_file["p"]) not in json.dumps(r) for r in records)
    assert events["bank"] == ["job_submitted", "job_finished"]
    assert events["retailer"] == ["job_accepted", "job_finished"]
    assert events["arbiter"] == ["job_accepted", "job_accepted"]  # one JOB_SPEC from each
    bank = cluster.audit("bank")[0]
    assert bank["submitter"] == "bank" and bank["input_sha256"] == _sha256(
        configs["bank"].data["breast"]
    )
    host = next(r for r in cluster.audit("retailer") if r["event"] == "job_accepted")
    assert host["submitter"] == "bank" and host["input_sha256"] == _sha256(
        configs["retailer"].data["breast"]
    )
    assert bank["code_version"].startswith("0.")

    # secrets and shares are owner-only: key, checkpoints, preprocessing, progress, result
    for party in ("bank", "retailer", "arbiter"):
        state_dir = configs[party].state_dir
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        private = [
            state_dir / AUDIT_FILE,
            *state_dir.glob("jobs"),
            *(state_dir / "jobs").rglob("*"),
            *state_dir.glob("arbiter_key.json"),
        ]
        loose = [
            f"{p} {stat.S_IMODE(p.stat().st_mode):o}"
            for p in private
            if stat.S_IMODE(p.stat().st_mode) & 0o077
        ]
        assert not loose, loose
        assert not not_private(state_dir), not_private(state_dir)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job(job_id: str) -> dict[str, Any]:
    raw = tomllib.loads(JOB)
    raw["job"].update(id=job_id, psi_job="breast-psi", epochs=2)
    raw["protect"] = {"mode": "none", "allow_label_leak": True}  # no noise: comparable runs
    return {"job_file": raw}


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster) -> dict[str, Any]:
    """One PSI (one row order for every job below) and the job run without interruption."""
    bank = cluster.configs["bank"]
    psi = {"peer": "retailer", "data": "breast", "id_column": "id", "job_id": "breast-psi"}
    admin_call(bank, "psi", psi, timeout=600)
    admin_call(bank, "train", _job("breast-ref"))
    ref = cluster.wait("breast-ref", lambda s: s.get("state") == "done", timeout=600)
    assert ref["state"] == "done", ref
    result: dict[str, Any] = json.loads(
        (bank.state_dir / "jobs" / "breast-ref" / "result.json").read_text()
    )
    return result


def test_scoring_through_the_services(cluster: LocalCluster) -> None:
    """After training: online and batch scoring via `vfl score`, each party's model export
    reloaded by its service; the scores exist only at the bank and match each other."""
    if not (cluster.configs["bank"].state_dir / "models" / "breast-1").is_dir():
        pytest.skip("needs the model of test_train_job_between_three_services")
    out_csv = cluster.root / "scores.csv"
    base = ["-m", "vfl", "score", "--config", str(cluster.paths["bank"]), "--model", "breast-1"]
    batch = subprocess.run(
        [sys.executable, *base, "--data", "breast", "--out", str(out_csv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert batch.returncode == 0, batch.stderr[-3000:]
    reply = json.loads(batch.stdout)
    scores = pd.read_csv(out_csv)
    assert reply["rows"] == len(scores) == 569 and reply["host_known"] == 569
    assert stat.S_IMODE(out_csv.stat().st_mode) == 0o600
    ids = [str(i) for i in scores["id"].head(3)]
    online = subprocess.run(
        [sys.executable, *base, "--data", "breast", "--ids", *ids, "--decoys", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert online.returncode == 0, online.stderr[-3000:]
    got = [r["score"] for r in json.loads(online.stdout)["scores"]]
    assert np.allclose(got, scores["score"].head(3), atol=1e-6)
    # the model's calibration and threshold (fitted on validation at J7) decide every score
    decision = Decision.from_json(
        json.loads(
            (
                cluster.configs["bank"].state_dir / "models" / "breast-1" / "manifest.json"
            ).read_text()
        )["decision"]
    )
    assert np.allclose(scores["probability"], decision.calibrate(scores["score"].to_numpy()))
    assert (scores["decision"] == decision.decide(scores["score"].to_numpy())).all()
    assert [r["decision"] for r in json.loads(online.stdout)["scores"]] == [
        bool(v) for v in scores["decision"].head(3)
    ]
    for party in ("bank", "retailer"):
        manifest = json.loads(
            (cluster.configs[party].state_dir / "models" / "breast-1" / "manifest.json").read_text()
        )
        assert manifest["role"] == {"bank": "guest", "retailer": "host"}[party]
    spec = manifest["spec"]
    kappa = -(-spec["k"] // spec["slots"])  # ciphertexts per row
    usage = json.loads((cluster.configs["arbiter"].state_dir / "scoring_usage.json").read_text())
    # values decrypted: the matched rows, the default row and the three online rows
    assert usage["used"]["breast-1.scoring"] == (569 + 1 + 3) * kappa
    # a restarted arbiter numbers its replies past the bank's replay marks: the first score
    # after the restart works (it used to fail with a replay conflict)
    assert cluster.signal("arbiter", signal.SIGTERM) == 0
    cluster.restart("arbiter")
    again = subprocess.run(
        [sys.executable, *base, "--data", "breast", "--ids", *ids],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.allclose([r["score"] for r in json.loads(again.stdout)["scores"]], got, atol=1e-6)


class Deviant:
    """A client holding the bank's certificate that sends whatever it likes to the arbiter."""

    def __init__(self, bank: PartyConfig, arbiter: PartyConfig) -> None:
        self.bank, self.arbiter = bank.party, arbiter.party
        self.channel = GrpcChannel(
            me=bank.party, identity=bank.tls.load(), tags=TagRegistry([SetupTag, ScoreTag, DecTag])
        )
        self.channel.start()
        pinned = bank.peer(arbiter.party.party_id).address_entry().certificate_pem
        self.channel.add_peer(PartyAddress(arbiter.party, service_address(arbiter), pinned))
        port = self.channel.port
        admin_call(arbiter, "set_peer_address", {"peer": "bank", "address": f"127.0.0.1:{port}"})
        self.key_id = b""
        self.key = PublicKey.from_json(
            self.ask("keys", SetupTag.KEY_REQ, 0, {}, SetupTag.KEY)["public_key"],
            allow_test_key=True,
        )
        self.key_id = self.key.key_id
        self.cipher = PaillierCipher(self.key)

    def send(self, job_id: str, tag: Any, step: int, body: Any) -> None:
        if isinstance(body, dict):
            body = ControlBlock.from_obj(body)
        self.channel.fresh_stream(job_id, [self.arbiter])
        envelope = Envelope(
            job_id=job_id,
            sender=self.bank,
            receiver=self.arbiter,
            tag=tag,
            step=step,
            run_id="attack",
            key_id=self.key_id if isinstance(body, CipherBlock) else b"",
            body=body,
        )
        self.channel.send(envelope)

    def ask(self, job_id: str, tag: Any, step: int, body: Any, reply: Any) -> dict[str, Any]:
        self.send(job_id, tag, step, body)
        got = self.channel.recv(
            job_id=job_id, sender=self.arbiter, tag=reply, step=step, run_id="attack", timeout=60
        )
        return control_of(got)

    def ciphertexts(self, rows: int, width: int) -> CipherBlock:
        values = np.empty((rows, width), dtype=object)
        values.reshape(-1)[:] = [
            self.cipher.encrypt(0, gmpy2.powmod(2 + i, self.key.n, self.key.n2))
            for i in range(values.size)
        ]
        return EncryptedTensor(cipher=self.cipher, values=values, scale=0).to_block()


def test_a_deviating_bank_gets_nothing_decrypted_from_the_arbiter(cluster: LocalCluster) -> None:
    """Issue 15's attacks over the real services: the bank's service is replaced by a
    client holding the bank's certificate that deviates. The arbiter refuses a job the bank
    registers alone (itself as host, the arbiter as host, or only its own proposal), steps
    outside a finished job, a grant for a model it never closed or with another κ, and an
    INF_Z ciphertext the retailer never produced; every refusal is in its audit log."""
    bank, arbiter = cluster.configs["bank"], cluster.configs["arbiter"]
    model = bank.state_dir / "models" / "breast-1" / "manifest.json"
    if not model.is_file():
        pytest.skip("needs the model of test_train_job_between_three_services")
    assert cluster.signal("bank", signal.SIGTERM) == 0
    me = Deviant(bank, arbiter)
    try:
        spec = json.loads(model.read_text())["spec"]
        for job_id, host in (("self-made", "bank"), ("wrong-role", "arbiter")):
            body = {**spec, "job_id": job_id, "host": host}
            assert "refused" in me.ask(job_id, SetupTag.JOB_SPEC, 0, body, SetupTag.JOB_READY)
        me.send("alone", SetupTag.JOB_SPEC, 0, {**spec, "job_id": "alone"})  # never answered
        batch = me.ciphertexts(int(spec["batch"]), 1)
        for job_id, tag, step in (
            ("alone", DecTag.Z_FWD, 0),  # registered by the bank alone: not active
            ("breast-1", DecTag.Z_FWD, 10**9),  # outside the schedule, and the job is closed
            ("breast-1", DecTag.G_BWD, 0),  # the host's tag
        ):
            assert "refused" in me.ask(job_id, tag, step, batch, tag), (job_id, tag)
        kappa = -(-int(spec["k"]) // int(spec["slots"]))
        grant = {"key_id": me.key_id.hex(), "kappa": kappa, "max_rows": 10}
        for step, model_id, k, needle in (
            (1, "breast-1-x", kappa, "not trained"),
            (2, "breast-1", kappa + 1, "rows of"),
        ):
            body = {**grant, "model_id": model_id, "kappa": k}
            got = me.ask(f"{model_id}.scoring", ScoreTag.GRANT_REQ, step, body, ScoreTag.GRANT)
            assert needle in got.get("refused", ""), got
        body = {**grant, "model_id": "breast-1"}
        got = me.ask("breast-1.scoring", ScoreTag.GRANT_REQ, 3, body, ScoreTag.GRANT)
        assert "refused" not in got, got
        row = me.ciphertexts(1, kappa)  # a ciphertext the retailer never produced
        got = me.ask("breast-1.scoring", DecTag.INF_Z, 4, row, DecTag.INF_Z)
        assert "registered by the host" in got.get("refused", ""), got
    finally:
        me.channel.close(grace=0.1)
        cluster.restart("bank")
    refused = [
        r
        for r in cluster.audit("arbiter")
        if r["event"] == "request_refused" and r["submitter"] == "bank"
    ]
    assert all(r["reason"] and r["tag"] for r in refused)
    jobs = {r["job_id"] for r in refused}
    assert {"self-made", "wrong-role", "alone", "breast-1", "breast-1-x.scoring"} <= jobs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("party", "how"),
    [
        ("retailer", signal.SIGTERM),
        ("retailer", signal.SIGKILL),
        ("bank", signal.SIGTERM),
        ("arbiter", signal.SIGTERM),
    ],
    ids=["host-sigterm", "host-sigkill", "guest-sigterm", "arbiter-sigterm"],
)
def test_service_restarted_mid_job_resumes_with_the_same_result(
    cluster: LocalCluster, reference: dict[str, Any], party: str, how: signal.Signals
) -> None:
    """A party's service stopped (SIGTERM: cleanly; SIGKILL: at any instruction) three
    steps into a job and started again with the same config. Host: the guest starts a new
    run (at once when the host reports its restart). Guest: its service resubmits the job
    on start and the host drops the run it was still serving. Arbiter: it reloads the job's
    registration, served steps and counts from its state folder (P9), so the current run
    goes on (or a new run registers again and resumes). The data parties resume from their
    checkpoints where needed, and the job ends with exactly the scores of the
    uninterrupted run.

    The guest holds the job after its third step until it is released ([testing]
    allow_hold), so the stop always lands in the middle of a registered run, however
    loaded the machine is; deadlines only bound how long a broken run takes to fail."""
    bank = cluster.configs["bank"]
    job_id = f"breast-{party}-{how.name.lower()}"
    admin_call(bank, "train", {**_job(job_id), "hold_at_step": 3})
    held = cluster.wait(job_id, lambda s: s.get("phase") == "held", timeout=600)
    assert held.get("held_at") == 3, held
    code = cluster.signal(party, how, timeout=300)
    if how is signal.SIGTERM:
        assert code == 0, f"{party} did not stop cleanly mid-job"
    if party != "bank":
        assert cluster.job(job_id)["state"] == "running"  # the guest waits for it
    cluster.restart(party)
    admin_call(bank, "release", {"job_id": job_id})  # also if the resumed run holds again
    done = cluster.wait(job_id, lambda s: s.get("state") == "done", timeout=900)
    assert done["state"] == "done", done

    got = json.loads((bank.state_dir / "jobs" / job_id / "result.json").read_text())
    assert got["test_scores"] == reference["test_scores"]
    assert got["history"] == reference["history"] and got["test"] == reference["test"]

    events = [r["event"] for r in cluster.audit("bank") if r["job_id"] == job_id]
    assert events[0] == "job_submitted" and events[-1] == "job_finished"
    assert "job_finished" not in events[:-1] and "job_failed" not in events
    host_runs = [
        r["run_id"]
        for r in cluster.audit("retailer")
        if r["job_id"] == job_id and r["event"] == "job_accepted"
    ]
    assert len(host_runs) >= (1 if party == "arbiter" else 2)
    assert len(set(host_runs)) == len(host_runs)
    counts = [
        r
        for r in cluster.audit("arbiter")
        if r["job_id"] == job_id
        and r["event"] == "decryption_counts"
        and r["cause"] != "periodic"  # every 60 s while counts change: a slow run gets some
    ]
    # the counts so far, when the job registers again (or when the arbiter itself stops);
    # written before the arbiter answers the JOB_SPEC, so before the job can be done
    assert counts[0]["cause"] == ("service stop" if party == "arbiter" else "registered again")
    assert set(counts[0]["counts"]) >= {"splitnn.Z_FWD", "splitnn.G_BWD", "splitnn.V_WUPD"}
    if party == "retailer":
        assert "job_retried" in events
        host_log = cluster.log("retailer")
        assert f"job {job_id}: told bank that run" in host_log
        if how is signal.SIGTERM:  # the stop ended the run (no waiting for a timeout)
            assert f"job {job_id}: run run1 stopped with the service" in host_log
    elif party == "bank":
        guest_log = cluster.log("bank")
        assert f"job {job_id} interrupted by the service stop; resumes on start" in guest_log
        assert f"resuming job {job_id} (unfinished when the service stopped)" in guest_log


def test_cancel_fails_a_running_job_for_good_at_every_party(cluster: LocalCluster) -> None:
    """`vfl cancel` (admin ``cancel``) at the guest: its run stops, the job is recorded
    failed ("cancelled by its operator", outcome.json: not resumed on a restart, audited as
    job_cancelled then job_failed), and the host and the arbiter are told (JOB_FAILED) and
    show it failed with the guest's peer-safe reason; a second cancel is refused."""
    bank = cluster.configs["bank"]
    psi = {"peer": "retailer", "data": "breast", "id_column": "id", "job_id": "cancel-psi"}
    admin_call(bank, "psi", psi, timeout=600)
    job_id = "breast-cancel"
    request = _job(job_id)
    request["job_file"]["job"]["psi_job"] = "cancel-psi"
    admin_call(bank, "train", {**request, "hold_at_step": 2})
    held = cluster.wait(job_id, lambda s: s.get("phase") == "held", timeout=600)
    assert held["state"] == "running", held
    command = [
        sys.executable,
        "-m",
        "vfl",
        "cancel",
        job_id,
        "--config",
        str(cluster.paths["bank"]),
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"job_id": job_id, "state": "failed"}
    final = cluster.job(job_id)
    assert final["state"] == "failed" and final["error"] == "cancelled by its operator", final
    outcome = json.loads((bank.state_dir / "jobs" / job_id / "outcome.json").read_text())
    assert outcome["state"] == "failed"
    events = [r["event"] for r in cluster.audit("bank") if r["job_id"] == job_id]
    assert events[0] == "job_submitted" and events[-2:] == ["job_cancelled", "job_failed"]
    for party in ("retailer", "arbiter"):
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            state = cluster.status(party)["jobs"].get(job_id, {})
            if state.get("state") == "failed":
                break
            time.sleep(0.2)
        assert state.get("error") == "bank failed: cancelled by its operator", (party, state)
        records = [r for r in cluster.audit(party) if r["job_id"] == job_id]
        assert records[-1]["event"] == "job_failed"
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and f"job {job_id} is not running here" in again.stderr


def test_arbiter_key_is_made_once_and_a_broken_file_is_named(tmp_path: Path) -> None:
    public, _ = arbiter_key(tmp_path, bits=512, allow_test_key=True)
    again, _ = arbiter_key(tmp_path, bits=512, allow_test_key=True)
    assert again.key_id == public.key_id  # kept, not remade
    (tmp_path / "arbiter_key.json").write_text("{broken")
    with pytest.raises(DataError, match="arbiter_key.json is unreadable"):
        arbiter_key(tmp_path, bits=512, allow_test_key=True)
