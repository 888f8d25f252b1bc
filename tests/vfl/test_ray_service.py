"""A party service whose config names a Ray cluster runs its PSI work there; the arbiter
decrypts on the cluster only with Ray TLS on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from protocols.executor import Backend
from protocols.ray_cluster import LocalRayCluster
from psi.result import read_result
from vfl.config import load_config
from vfl.data.datasets import data_dir, verify
from vfl.service.arbiter import decrypts_on_ray
from vfl.service.demo import write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services

ROOT = Path(__file__).resolve().parents[2]


def test_the_guest_service_aligns_on_its_ray_cluster(tmp_path: Path) -> None:
    folder = data_dir(os.environ)
    guest = pd.read_csv(verify("breast_hetero_guest.csv", folder=folder).path)
    host = pd.read_csv(verify("breast_hetero_host.csv", folder=folder).path)
    with LocalRayCluster(node_cpus=(2,)) as cluster:
        executor = (
            f'[executor]\nbackend = "ray"\nray_address = "{cluster.address}"\n'
            "allow_plaintext_cluster = true\n"
        )
        paths = write_demo_setup(
            tmp_path / "setup", data_folder=folder, extra={"bank": executor, "arbiter": executor}
        )
        configs = {pid: load_config(p) for pid, p in paths.items() if pid != "arbiter"}
        assert configs["bank"].executor.backend is Backend.RAY
        assert configs["retailer"].executor.backend is Backend.LOCAL
        arbiter = load_config(paths["arbiter"])
        assert not decrypts_on_ray(arbiter)  # no Ray TLS here: it keeps its own processes
        procs = start_services(configs, logs=tmp_path / "logs")
        try:
            connect_services(configs)
            out = subprocess.run(
                [sys.executable, "-m", "vfl", "psi", "--config", str(paths["bank"])]
                + ["--peer", "retailer", "--data", "breast", "--job-id", "align-ray"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=300,
            )
            assert out.returncode == 0, out.stderr[-2000:]
            assert json.loads(out.stdout)["intersection_size"] == 569
        finally:
            codes = list(stop_services(procs).values())
    assert codes == [0, 0]
    log = (tmp_path / "logs" / "bank.log").read_text()
    assert "Ray executor: 2 actors" in log  # the guest's chunks ran on the cluster
    assert "Ray executor" not in (tmp_path / "logs" / "retailer.log").read_text()
    _, rows = read_result(configs["bank"].state_dir, "align-ray")
    assert rows is not None and sorted(guest["id"].to_numpy()[rows]) == sorted(
        set(guest["id"]) & set(host["id"])
    )


def test_the_arbiter_decrypts_on_ray_only_with_ray_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = '[executor]\nbackend = "ray"\nray_address = "10.1.0.5:6379"\n'
    paths = write_demo_setup(
        tmp_path, data_folder=data_dir(os.environ), extra={"arbiter": ray, "bank": ray}
    )
    arbiter, bank = load_config(paths["arbiter"]), load_config(paths["bank"])
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    assert not decrypts_on_ray(arbiter)
    monkeypatch.setenv("RAY_USE_TLS", "1")
    assert decrypts_on_ray(arbiter)
    assert not decrypts_on_ray(bank)  # only the arbiter decrypts
