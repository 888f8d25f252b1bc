"""Horizontal FedAvg between four party services (processes, mutual TLS): three clients
(a guest and two hosts) and the arbiter as aggregator; `vfl run` of a horizontal job, the
final model at every client, the audit records, and refusals under each party's policy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from protocols.errors import ConfigError
from protocols.roles import Party, Role
from vfl import api
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import data_dir
from vfl.data.tables import TableSpec, load_table
from vfl.fedavg.client import MODEL_DIR, load_fed_model
from vfl.service.admin import admin_call
from vfl.service.audit import AUDIT_FILE, read_audit
from vfl.service.demo import write_demo_setup
from vfl.service.local import Processes, connect_services, start_services, stop_services
from vfl.splitnn.metrics import binary_metrics

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
JOB = """
[job]
type = "horizontal"
id = "{job_id}"
rounds = {rounds}
batch = 128
test_fraction = 0.1
round_timeout_s = 60

[clients]
bank = "credit"
retailer = "credit"
shop = "{shop_data}"

[model]
widths = [16, 1]
learning_rate = 0.003
"""


@dataclass
class Federation:
    tmp: Path
    paths: dict[str, Path]
    configs: dict[str, PartyConfig]
    procs: Processes

    def job_file(self, job_id: str, *, rounds: int = 3, shop_data: str = "credit") -> Path:
        path = self.tmp / f"{job_id}.toml"
        path.write_text(JOB.format(job_id=job_id, rounds=rounds, shop_data=shop_data))
        return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("fedavg")
    paths = write_demo_setup(
        tmp / "setup",
        data_folder=data_dir(os.environ),
        data=DATA,
        parties=PARTIES,
        extra={
            "shop": '[accept]\ndata = ["credit"]  # "private" is not offered',
            "bank": "[testing]\nseed = 3",
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
    job_id = api.submit_job(federation.job_file("fed-1"), config=bank)
    final = api.wait_for_job(job_id, config=bank, poll_s=0.3)
    assert final["state"] == "done", final
    assert final["rounds"] == 3
    assert final["validation"]["rows"] == 2400.0  # 10 % of each client's 8,000 rows
    assert final["validation"]["roc_auc"] > 0.7
    models = {}
    for pid in ("bank", "retailer", "shop"):
        folder = federation.configs[pid].state_dir / "jobs" / job_id / MODEL_DIR
        models[pid] = load_fed_model(folder)
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
    reference = models["bank"][0].state_dict()
    for pid in ("retailer", "shop"):
        for name, value in models[pid][0].state_dict().items():
            assert torch.equal(value, reference[name]), (pid, name)
    model, standardizer, _ = models["bank"]
    test = load_table(
        TableSpec(
            path=data_dir(os.environ) / "default_credit_homo_test.csv",
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


@pytest.mark.slow
def test_a_client_refuses_what_it_does_not_offer(federation: Federation) -> None:
    """The shop's [accept] offers only "credit": the job fails at once with its reason."""
    bank = federation.paths["bank"]
    job_id = api.submit_job(federation.job_file("fed-2", shop_data="private"), config=bank)
    final = api.wait_for_job(job_id, config=bank, poll_s=0.3)
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
        api.submit_job(job, config=paths["bank"])
