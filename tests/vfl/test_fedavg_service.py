"""Horizontal FedAvg between four party services (processes, mutual TLS): three clients
(a guest and two hosts) and the arbiter as aggregator; `vfl run` of a horizontal job, the
final model at every client, the audit records, and refusals under each party's policy."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from protocols.errors import ConfigError
from protocols.roles import Party, Role
from tests.vfl.state_files import not_private
from vfl.client import Client
from vfl.common.metrics import binary_metrics
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import data_dir, find
from vfl.data.tables import TableSpec, load_table
from vfl.fedavg.client import MODEL_DIR, load_fed_model
from vfl.service.admin import admin_call
from vfl.service.audit import AUDIT_FILE, read_audit
from vfl.service.demo import write_demo_setup
from vfl.service.local import (
    Processes,
    connect_services,
    reconnect_service,
    start_services,
    stop_services,
)

PARTIES = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("shop", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
DATA = {
    "bank": {"credit": "default_credit_homo_guest.csv"},
    "retailer": {"credit": "default_credit_homo_host_1.csv"},
    "shop": {"credit": "default_credit_homo_host_2.csv", "private": "breast_homo_host.csv"},
}
FAST = "[transport]\nretry_seconds = 2  # a stopped peer is reported quickly"
JOB = """
[job]
type = "horizontal"
id = "{job_id}"
rounds = {rounds}
batch = 128
test_fraction = 0.1
round_timeout_s = {timeout}
on_dropout = "{on_dropout}"

[clients]
bank = "credit"
retailer = "credit"
shop = "{shop_data}"

[model]
widths = [16, 1]
learning_rate = 0.01
"""


@dataclass
class Federation:
    tmp: Path
    paths: dict[str, Path]
    configs: dict[str, PartyConfig]
    procs: Processes

    def job_file(
        self,
        job_id: str,
        *,
        rounds: int = 3,
        shop_data: str = "credit",
        on_dropout: str = "retry",
        timeout: float = 60,
    ) -> Path:
        path = self.tmp / f"{job_id}.toml"
        path.write_text(
            JOB.format(
                job_id=job_id,
                rounds=rounds,
                shop_data=shop_data,
                on_dropout=on_dropout,
                timeout=timeout,
            )
        )
        return path

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        give_up = time.monotonic() + 120
        while time.monotonic() < give_up:
            state: dict[str, Any] = admin_call(self.configs["bank"], "status")["jobs"].get(
                job_id, {}
            )
            if until(state) or state.get("state") in ("done", "failed"):
                return state
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not get there in time")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("fedavg")
    paths = write_demo_setup(
        tmp / "setup",
        data_folder=data_dir(os.environ),
        data=DATA,
        parties=PARTIES,
        extra={
            # every client seeds its own batch order, so the learned model is reproducible
            "shop": '[accept]\ndata = ["credit"]  # "private" is not offered\n'
            + "[random]\nseed = 5\n"
            + FAST,
            "bank": "[random]\nseed = 3\n" + FAST,
            "retailer": "[random]\nseed = 4\n" + FAST,
            "arbiter": "[arbiter]\nkey_bits = 512\nallow_test_key = true  # unused by FedAvg\n"
            + FAST,
        },
    )
    configs = {pid: load_config(p) for pid, p in paths.items()}
    procs = start_services(configs, logs=tmp / "logs")
    try:
        connect_services(configs)
        yield Federation(tmp=tmp, paths=paths, configs=configs, procs=procs)
    finally:
        stop_services(procs)


@pytest.mark.slow
def test_three_clients_over_grpc(federation: Federation) -> None:
    """`vfl run` of a horizontal job: every client ends with the same model, the combined
    metrics reach the guest, and the model scores the held-out test file well."""
    bank = federation.paths["bank"]
    job_id = Client(config=bank).submit(job=federation.job_file("fed-1"))
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "done", final
    assert final["rounds"] == 3
    assert final["validation"]["rows"] == 2400.0  # 10 % of each client's 8,000 rows
    assert final["validation"]["roc_auc"] > 0.7
    models = {}
    for pid in ("bank", "retailer", "shop"):
        folder = federation.configs[pid].state_dir / "jobs" / job_id / MODEL_DIR
        models[pid] = load_fed_model(folder)
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        report = folder.parent / "report"  # each client's own report of its test rows
        assert {"report.json", "roc.png", "pr.png", "loss.png", "test_scores.csv"} <= {
            p.name for p in report.iterdir()
        }, pid
    reference = models["bank"][0].state_dict()
    for pid in ("retailer", "shop"):
        for name, value in models[pid][0].state_dict().items():
            assert torch.equal(value, reference[name]), (pid, name)
    model, standardizer, _ = models["bank"]
    test = load_table(
        TableSpec(
            path=find("default_credit_homo_test.csv", folder=data_dir(os.environ)),
            id_column="id",
            label_column="y",
        )
    )
    with torch.no_grad():
        logits = model(torch.from_numpy(standardizer.transform(test.features))).squeeze(-1)
    assert binary_metrics(test.labels, torch.sigmoid(logits).numpy())["roc_auc"] > 0.7
    arbiter_jobs = admin_call(federation.configs["arbiter"], "status")["jobs"]
    assert arbiter_jobs[job_id]["state"] == "done"
    assert len(arbiter_jobs[job_id]) > 0
    for pid in ("bank", "retailer", "shop", "arbiter"):
        events = [
            r["event"]
            for r in read_audit(federation.configs[pid].state_dir / AUDIT_FILE)
            if r.get("job_id") == job_id
        ]
        assert "job_finished" in events, (pid, events)
        state_dir = federation.configs[pid].state_dir  # model, rounds, result: owner-only
        assert not not_private(state_dir), (pid, not_private(state_dir))


@pytest.mark.slow
def test_a_client_refuses_what_it_does_not_offer(federation: Federation) -> None:
    """The shop's [accept] offers only "credit": the job fails at once with its reason."""
    bank = federation.paths["bank"]
    job_id = Client(config=bank).submit(job=federation.job_file("fed-2", shop_data="private"))
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "failed"
    assert "shop refused" in final["error"] and "accept.data" in final["error"]


def test_a_job_without_the_guest_as_client_is_refused_before_submission(tmp_path: Path) -> None:
    """The job file is checked at the guest before anything is sent."""
    paths = write_demo_setup(
        tmp_path / "setup", data_folder=data_dir(os.environ), data=DATA, parties=PARTIES
    )
    job = tmp_path / "job.toml"
    job.write_text('[job]\ntype = "horizontal"\n[clients]\nretailer = "credit"\nshop = "x"\n')
    with pytest.raises(ConfigError, match="must include bank"):
        Client(config=paths["bank"]).submit(job=job)


@pytest.mark.slow
def test_a_client_killed_mid_job_aborts_the_round_and_the_job_resumes(
    federation: Federation,
) -> None:
    """The shop's service is killed during a run: the aggregator aborts the round (no sum of
    it is sent), the bank retries (on_dropout = "retry"), and once the shop's service is back
    the job resumes from the rounds every client saved and finishes."""
    bank = federation.paths["bank"]
    job_id = Client(config=bank).submit(job=federation.job_file("fed-3", rounds=8, timeout=4))
    federation.wait(job_id, lambda s: s.get("round", 0) >= 2)
    shop = federation.procs["shop"]
    shop.send_signal(signal.SIGKILL)
    shop.wait()
    state = federation.wait(job_id, lambda s: s.get("phase") == "retrying")
    assert state["state"] == "running"
    assert "aborted" in state["last_error"]
    federation.procs.update(
        start_services({"shop": federation.configs["shop"]}, logs=federation.tmp / "logs")
    )
    reconnect_service(federation.configs, "shop")
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "done", final
    result = json.loads(
        (federation.configs["bank"].state_dir / "jobs" / job_id / "result.json").read_text()
    )
    assert [h["round"] for h in result["history"]] == list(range(1, 9))
    events = [
        r["event"]
        for r in read_audit(federation.configs["bank"].state_dir / AUDIT_FILE)
        if r.get("job_id") == job_id
    ]
    assert "job_retried" in events and events[-1] == "job_finished"
    arbiter = read_audit(federation.configs["arbiter"].state_dir / AUDIT_FILE)
    assert any(r["event"] == "job_failed" and r.get("job_id") == job_id for r in arbiter)


@pytest.mark.slow
def test_on_dropout_stop_ends_the_job(federation: Federation) -> None:
    """With on_dropout = "stop", an aborted round fails the job for good."""
    bank = federation.paths["bank"]
    job_id = Client(config=bank).submit(
        job=federation.job_file("fed-4", rounds=40, on_dropout="stop", timeout=4)
    )
    federation.wait(job_id, lambda s: s.get("round", 0) >= 1)
    federation.procs["retailer"].send_signal(signal.SIGKILL)
    federation.procs["retailer"].wait()
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "failed" and "aborted" in final["error"]
    federation.procs.update(
        start_services({"retailer": federation.configs["retailer"]}, logs=federation.tmp / "logs")
    )
    reconnect_service(federation.configs, "retailer")
