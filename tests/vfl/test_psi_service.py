"""PSI between two party services (processes, mutual TLS), started with `vfl psi`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from psi.result import read_result
from vfl.config import load_config
from vfl.data.datasets import data_dir, verify
from vfl.service.demo import write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services

ROOT = Path(__file__).resolve().parents[2]


def test_two_services_align_real_rows(tmp_path: Path) -> None:
    folder = data_dir(os.environ)
    guest = pd.read_csv(verify("breast_hetero_guest.csv", folder=folder).path)
    host = pd.read_csv(verify("breast_hetero_host.csv", folder=folder).path)
    # partial overlap with e-mail-like ids, written differently at each party
    guest = guest.iloc[:400].copy()
    guest["email"] = [f"Customer{i}@Bank.example " for i in guest["id"]]
    host = host.iloc[150:].sample(frac=1.0, random_state=3).copy()
    host["email"] = [f" customer{i}@BANK.EXAMPLE" for i in host["id"]]
    host.loc[host.index[:5], "email"] = ""  # rejected, counted, never sent
    guest_csv, host_csv = tmp_path / "bank_customers.csv", tmp_path / "shop_customers.parquet"
    guest.to_csv(guest_csv, index=False)
    host.to_parquet(host_csv, index=False)

    paths = write_demo_setup(tmp_path / "setup", data_folder=folder)
    with paths["bank"].open("a") as f:
        f.write(f'customers = "{guest_csv}"\n')
    with paths["retailer"].open("a") as f:  # the retailer's own choice of id column (§3.4.1)
        f.write(f'customers = "{host_csv}"\n\n[psi.data.customers]\nid_column = "email"\n')
    configs = {pid: load_config(p) for pid, p in paths.items() if pid != "arbiter"}
    procs = start_services(configs, logs=tmp_path / "logs")
    try:
        connect_services(configs)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "vfl",
                "psi",
                "--config",
                str(configs["bank"].source),
                "--peer",
                "retailer",
                "--data",
                "customers",
                "--id-column",
                "email",
                "--id-type",
                "email",
                "--job-id",
                "align-1",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout)
        expected = set(guest["id"]) & set(host["id"].iloc[5:])
        assert summary["intersection_size"] == len(expected) > 200
    finally:
        codes = list(stop_services(procs).values())
    assert codes == [0, 0]
    g_summary, g_rows = read_result(configs["bank"].state_dir, "align-1")
    h_summary, h_rows = read_result(configs["retailer"].state_dir, "align-1")
    assert g_rows is not None and h_rows is not None
    assert (
        guest["id"].to_numpy()[g_rows].tolist() == host["id"].to_numpy()[h_rows].tolist()
    )  # one shared order
    assert h_summary["rejected"] == {"empty": 5} and g_summary["intersection_size"] == len(expected)
    log = (tmp_path / "logs" / "retailer.log").read_text()
    assert "PSI align-1 done" in log and "Customer" not in log and "customer1" not in log
