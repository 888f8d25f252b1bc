"""A split-NN job between three party services (processes, mutual TLS), started with
`vfl train` at the guest: PSI, encrypted training, validation, test scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocols.errors import DataError
from vfl.config import load_config
from vfl.data.datasets import data_dir
from vfl.service.demo import write_demo_setup
from vfl.service.jobs import arbiter_key
from vfl.service.local import connect_services, start_services, stop_services

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


def test_train_job_between_three_services(tmp_path: Path) -> None:
    paths = write_demo_setup(tmp_path / "setup", data_folder=data_dir(os.environ))
    with paths["arbiter"].open("a") as f:
        f.write("\n[arbiter]\nkey_bits = 512\nallow_test_key = true  # test only\n")
    for pid in ("bank", "retailer"):
        with paths[pid].open("a") as f:
            f.write("\n[arbiter]\nallow_test_key = true  # accept the test key\n")
    configs = {pid: load_config(p) for pid, p in paths.items()}
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB)
    procs = start_services(configs, logs=tmp_path / "logs")
    try:
        connect_services(configs)
        out = subprocess.run(
            [sys.executable, "-m", "vfl", "train", str(job_file), "--config", str(paths["bank"])],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        final = json.loads(out.stdout[out.stdout.index("{") :])
        assert final["state"] == "done", final
        assert final["test"]["roc_auc"] > 0.9
    finally:
        codes = list(stop_services(procs).values())
    assert codes == [0, 0, 0]
    result = json.loads(
        (configs["bank"].state_dir / "jobs" / "breast-1" / "result.json").read_text()
    )
    assert len(result["history"]) == 2 and result["test"]["roc_auc"] > 0.9
    arbiter_log = (tmp_path / "logs" / "arbiter.log").read_text()
    assert "job breast-1 registered" in arbiter_log
    host_log = (tmp_path / "logs" / "retailer.log").read_text()
    assert "job breast-1 finished at the host" in host_log
    key = configs["arbiter"].state_dir / "arbiter_key.json"
    assert key.stat().st_mode & 0o077 == 0  # owner-only


def test_arbiter_key_is_made_once_and_a_broken_file_is_named(tmp_path: Path) -> None:
    public, _ = arbiter_key(tmp_path, bits=512, allow_test_key=True)
    again, _ = arbiter_key(tmp_path, bits=512, allow_test_key=True)
    assert again.key_id == public.key_id  # kept, not remade
    (tmp_path / "arbiter_key.json").write_text("{broken")
    with pytest.raises(DataError, match="arbiter_key.json is unreadable"):
        arbiter_key(tmp_path, bits=512, allow_test_key=True)
