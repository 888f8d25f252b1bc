"""Transfer (FTL) jobs between three party services (processes, mutual TLS): PSI, encrypted
training with the arbiter, and the host's customers outside the overlap scored at the host."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from protocols.errors import InsecureConfigError
from tests.vfl.state_files import not_private
from vfl.client import Client
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import data_dir, find
from vfl.service.audit import AUDIT_FILE, read_audit
from vfl.service.demo import write_demo_setup
from vfl.service.local import Processes, connect_services, start_services, stop_services

JOB = """
[job]
type = "transfer"
id = "{job_id}"
guest_data = "labelled"
host_data = "customers"
epochs = 3
patience = 3

[model]
d = 4
batch = 32
guest_widths = [8]
host_widths = [8]
guest_lr = 0.05
host_lr = 0.02

[protect]
{protect}
"""


@dataclass
class Silos:
    tmp: Path
    paths: dict[str, Path]
    configs: dict[str, PartyConfig]
    procs: Processes
    truth: pd.Series
    shared: set[int]

    def job(self, job_id: str, protect: str = 'mode = "gaussian"') -> Path:
        path = self.tmp / f"{job_id}.toml"
        path.write_text(JOB.format(job_id=job_id, protect=protect))
        return path


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Silos]:
    """The bank holds breast rows 0-399 with labels, the retailer rows 200-568 without:
    200 shared customers."""
    tmp = tmp_path_factory.mktemp("ftl")
    source = data_dir(os.environ)
    guest = pd.read_csv(find("breast_hetero_guest.csv", folder=source))
    host = pd.read_csv(find("breast_hetero_host.csv", folder=source))
    guest.iloc[:400].to_csv(tmp / "labelled.csv", index=False)
    host.iloc[200:].to_csv(tmp / "customers.csv", index=False)
    truth = guest.set_index("id")["y"]
    paths = write_demo_setup(
        tmp / "setup",
        data_folder=tmp,
        data={"bank": {"labelled": "labelled.csv"}, "retailer": {"customers": "customers.csv"}},
        extra={
            "arbiter": "[arbiter]\nkey_bits = 512\nallow_test_key = true  # test only",
            "bank": "[arbiter]\nallow_test_key = true\n[random]\nseed = 5",
            "retailer": "[arbiter]\nallow_test_key = true",
        },
    )
    configs = {pid: load_config(p) for pid, p in paths.items()}
    procs = start_services(configs, logs=tmp / "logs")
    try:
        connect_services(configs)
        shared = set(guest["id"].iloc[:400]) & set(host["id"].iloc[200:])
        yield Silos(tmp=tmp, paths=paths, configs=configs, procs=procs, truth=truth, shared=shared)
    finally:
        stop_services(procs)


@pytest.mark.slow
def test_transfer_job_over_grpc_scores_the_hosts_other_customers(silos: Silos) -> None:
    bank = silos.paths["bank"]
    job_id = Client(config=bank).submit(job=silos.job("ftl-1"))
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "done", final
    assert final["validation"]["roc_auc"] > 0.6
    report = silos.configs["bank"].state_dir / "jobs" / job_id / "report"
    assert {p.name for p in report.iterdir()} >= {"report.json", "roc.png", "loss.png"}
    retailer = silos.configs["retailer"].state_dir / "jobs" / job_id / "scores.csv"
    assert oct(retailer.stat().st_mode & 0o777) == "0o600"
    scores = pd.read_csv(retailer)
    assert len(scores) == 369 - 200  # every retailer customer outside the overlap
    assert set(scores["id"]).isdisjoint(silos.shared)
    assert roc_auc_score(silos.truth.loc[scores["id"]], scores["score"]) > 0.8
    for pid in ("bank", "retailer"):
        events = [
            r["event"]
            for r in read_audit(silos.configs[pid].state_dir / AUDIT_FILE)
            if r.get("job_id") == job_id
        ]
        assert "job_finished" in events, (pid, events)
    # result, report (roc.png, report.json), scores, checkpoints, PSI result: owner-only
    for pid in ("bank", "retailer", "arbiter"):
        state_dir = silos.configs[pid].state_dir
        assert not not_private(state_dir), (pid, not_private(state_dir))


@pytest.mark.slow
def test_the_host_refuses_unprotected_gradients(silos: Silos) -> None:
    """protect = none is allowed by the job file (with allow_label_leak) but the retailer's
    default [accept] protect_modes exclude it: the job fails with its reason."""
    bank = silos.paths["bank"]
    protect = 'mode = "none"\nallow_label_leak = true'
    job_id = Client(config=bank).submit(job=silos.job("ftl-2", protect))
    final = Client(config=bank).wait(job_id, poll_s=0.3)
    assert final["state"] == "failed"
    assert "retailer refused" in final["error"] and "protect_modes" in final["error"]


def test_alignment_without_the_reveal_flag_is_refused_at_submission(silos: Silos) -> None:
    path = silos.tmp / "gamma.toml"
    path.write_text(
        '[job]\ntype = "transfer"\nguest_data = "labelled"\nhost_data = "customers"\n'
        "[model]\ngamma = 0.5\n"
    )
    with pytest.raises(InsecureConfigError, match="ftl_reveal_overlap_repr"):
        Client(config=silos.paths["bank"]).submit(job=path)
