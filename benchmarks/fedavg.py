"""Horizontal FedAvg with secure aggregation against centralised training and Flower.

Setup: default_credit_homo_guest, _host_1 and _host_2 (8,000 rows each, 23 features) as
three clients (bank, retailer, shop), tested on default_credit_homo_test (6,000 rows). Model
MLP 23-64-32-1, 20 rounds, 1 local epoch, Adam (lr 1e-3, a fresh optimizer each round),
batch 64; each client holds out 10 % of its rows for validation (the same rows on both
sides). Four party services (three clients and the arbiter as aggregator) run as local
processes over mutual TLS, the job submitted with the same API as ``vfl run``; secure
aggregation with the group mask on.

Measured in one run:

1. ``fedavg_test_auc``: our FedAvg, DP off; the bank's final model on the test file;
2. ``centralised_test_auc``: the same model trained on the union of the clients' training
   rows (standardised with their joint statistics) for 20 epochs, same optimizer and batch;
3. ``flower_test_auc``: Flower (flwr, its own virtualenv: :mod:`flower_run`) in deployment
   mode (a SuperLink and one SuperNode per client as local processes), FedAvg with the same
   model, initial weights, standardised rows, rounds, local epochs and optimizer;
4. ``round_wall_s`` / ``flower_round_wall_s``: median over rounds 2-20 of the time between
   the ends of consecutive rounds (training, aggregation and every client's evaluation),
   taken at the aggregator (ours: the arbiter's service; Flower: its ServerApp);
5. ``dp_test_auc`` and ``dp_epsilon``: our FedAvg with DP-SGD (σ = 1.0, C = 1.0, δ = 1e-5)
   on every client, ε of the most exposed client after round 20 (§7.2 accountant);
6. ``noniid_test_auc``: our FedAvg after pooling the clients' rows, sorting them by
   ``x0`` (the credit limit) and giving each client a contiguous third.

Writes ``benchmarks/results/fedavg.json`` and prints the figures. Takes about 5-10 minutes
(the first run also creates Flower's virtualenv).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where benchmarks/psi.py would shadow
# the psi package: drop the folder (as splitnn_costs.py does), then import flower_run by path.
_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from protocols.files import atomic_write
from protocols.roles import Party, Role
from vfl.client import Client
from vfl.config import load_config
from vfl.data.datasets import data_dir, find
from vfl.data.tables import TableSpec, load_table
from vfl.fedavg import aggregate
from vfl.fedavg.client import MODEL_DIR, load_fed_model
from vfl.fedavg.protocol import FedJob
from vfl.fedavg.train import build_model, client_splits
from vfl.service.admin import admin_call
from vfl.service.demo import write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services

RESULTS = _HERE / "results"
CLIENTS = {
    "bank": "default_credit_homo_guest.csv",
    "retailer": "default_credit_homo_host_1.csv",
    "shop": "default_credit_homo_host_2.csv",
}
TEST_FILE = "default_credit_homo_test.csv"
PARTIES = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("shop", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
ROUNDS, LOCAL_EPOCHS, BATCH, LR, INIT_SEED = 20, 1, 64, 1e-3, 0
WIDTHS = (64, 32, 1)
SORT_FEATURE = "x0"

JOB = """
[job]
type = "horizontal"
id = "{job_id}"
rounds = {rounds}
local_epochs = {epochs}
batch = {batch}
validation_fraction = 0.1
group_mask = true

[clients]
bank = "{alias}"
retailer = "{alias}"
shop = "{alias}"

[model]
widths = {widths}
optimizer = "adam"
learning_rate = {lr}
init_seed = {seed}
"""
DP = """
[dp]
noise_multiplier = 1.0
max_grad_norm = 1.0
delta = 1e-5
"""


def _flower_module() -> Any:
    spec = importlib.util.spec_from_file_location("flower_run", _HERE / "flower_run.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("benchmarks/flower_run.py is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def the_job() -> FedJob:
    """The job both sides run (the client list only matters for the splits)."""
    return FedJob(
        job_id="bench",
        coordinator="bank",
        clients=tuple((c, "credit") for c in sorted(CLIENTS)),
        rounds=ROUNDS,
        local_epochs=LOCAL_EPOCHS,
        batch=BATCH,
        learning_rate=LR,
        widths=WIDTHS,
        validation_fraction=0.1,
        init_seed=INIT_SEED,
    )


def auc_of(model: torch.nn.Module, standardizer: aggregate.Standardizer, test: Any) -> float:
    with torch.no_grad():
        model.eval()
        logits = model(torch.from_numpy(standardizer.transform(test.features))).squeeze(-1)
    return float(roc_auc_score(test.labels, torch.sigmoid(logits).numpy()))


def joint_standardizer(tables: dict[str, Any], job: FedJob) -> tuple[aggregate.Standardizer, dict]:
    """Column statistics of the union of the clients' training rows (what F4 computes), and
    each client's splits."""
    splits = {c: client_splits(np.asarray(t.labels), job=job) for c, t in tables.items()}
    train = np.concatenate([tables[c].features[splits[c][0]] for c in tables])
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    return aggregate.Standardizer(mean=mean, scale=np.where(std > 1e-12, std, 1.0)), splits


def centralised(tables: dict[str, Any], job: FedJob, test: Any) -> dict[str, float]:
    """The same model on the union of the clients' training rows, ``ROUNDS`` epochs."""
    standardizer, splits = joint_standardizer(tables, job)
    x = np.concatenate([standardizer.transform(tables[c].features)[splits[c][0]] for c in tables])
    y = np.concatenate([np.asarray(tables[c].labels)[splits[c][0]] for c in tables])
    model = build_model(job, in_features=x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(ROUNDS * LOCAL_EPOCHS):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for i in range(0, len(xt), BATCH):
            rows = order[i : i + BATCH]
            optimizer.zero_grad()
            loss_fn(model(xt[rows]).squeeze(-1), yt[rows]).backward()
            optimizer.step()
    return {"test_auc": auc_of(model, standardizer, test), "seconds": time.perf_counter() - started}


def flower(tables: dict[str, Any], job: FedJob, test: Any, work: Path) -> dict[str, Any]:
    """Flower's run on the same standardised rows and initial weights."""
    work.mkdir(parents=True, exist_ok=True)
    standardizer, splits = joint_standardizer(tables, job)
    for i, name in enumerate(sorted(tables)):
        x = standardizer.transform(tables[name].features)
        y = np.asarray(tables[name].labels, dtype=np.float32)
        train, val, _ = splits[name]
        np.savez(
            work / f"client{i}.npz",
            x_train=x[train],
            y_train=y[train],
            x_val=x[val],
            y_val=y[val],
        )
    model = build_model(job, in_features=x.shape[1])
    np.savez(work / "init.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    config = {
        "rounds": ROUNDS,
        "local_epochs": LOCAL_EPOCHS,
        "batch": BATCH,
        "lr": LR,
        "seed": 0,
        "in_features": int(x.shape[1]),
        "widths": list(WIDTHS),
    }
    (work / "config.json").write_text(json.dumps(config))
    module = _flower_module()
    module.ensure_venv()
    out: dict[str, Any] = module.run_flower(work)
    with np.load(out["final_params"], allow_pickle=False) as final:
        model.load_state_dict({k: torch.from_numpy(final[k]) for k in final.files})
    out["test_auc"] = auc_of(model, standardizer, test)
    return out


def write_noniid(tables: dict[str, Any], folder: Path) -> dict[str, str]:
    """Pool the clients' rows, sort by ``SORT_FEATURE``, give each client a contiguous third."""
    frames = [pd.read_csv(find(CLIENTS[c], folder=data_dir(os.environ))) for c in sorted(CLIENTS)]
    pooled = pd.concat(frames, ignore_index=True).sort_values(SORT_FEATURE, kind="stable")
    out = {}
    bounds = np.linspace(0, len(pooled), 4).astype(int)
    for i, name in enumerate(sorted(CLIENTS)):
        path = folder / f"noniid_{i}.csv"
        pooled.iloc[bounds[i] : bounds[i + 1]].to_csv(path, index=False)
        out[name] = path.name
    return out


def run_ours(paths: dict[str, Path], tmp: Path, job_id: str, alias: str, dp: bool) -> dict:
    job_file = tmp / f"{job_id}.toml"
    text = JOB.format(
        job_id=job_id,
        rounds=ROUNDS,
        epochs=LOCAL_EPOCHS,
        batch=BATCH,
        alias=alias,
        widths=list(WIDTHS),
        lr=LR,
        seed=INIT_SEED,
    )
    job_file.write_text(text + (DP if dp else ""))
    started = time.monotonic()
    Client(config=paths["bank"]).submit(job=job_file)
    final = Client(config=paths["bank"]).wait(job_id, poll_s=0.5)
    total = time.monotonic() - started
    if final.get("state") != "done":
        raise RuntimeError(f"job {job_id} did not finish: {final}")
    bank = load_config(paths["bank"])
    model, standardizer, _ = load_fed_model(bank.state_dir / "jobs" / job_id / MODEL_DIR)
    result = json.loads((bank.state_dir / "jobs" / job_id / "result.json").read_text())
    ends = [float(h["end_time"]) for h in result["history"]]
    walls = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # rounds 2..R
    arbiter = admin_call(load_config(paths["arbiter"]), "status")["jobs"].get(job_id, {})
    return {
        "model": model,
        "standardizer": standardizer,
        "round_wall_s": walls,
        "round_wall_median_s": statistics.median(walls),
        "total_s": total,
        "validation_auc": [h["validation"].get("roc_auc") for h in result["history"]],
        "epsilon": final.get("epsilon"),
        "epsilon_max": result["history"][-1].get("epsilon_max"),
        "aggregator_state": arbiter.get("state"),
    }


def main() -> None:
    folder = data_dir(os.environ)
    job = the_job()
    tables = {
        c: load_table(TableSpec(path=find(f, folder=folder), id_column="id", label_column="y"))
        for c, f in CLIENTS.items()
    }
    test = load_table(
        TableSpec(path=find(TEST_FILE, folder=folder), id_column="id", label_column="y")
    )
    work = Path(tempfile.mkdtemp(prefix="vfl-bench-fedavg-"))
    try:
        print("centralised ...", flush=True)
        central = centralised(tables, job, test)
        print(f"  test AUC {central['test_auc']:.4f}", flush=True)

        noniid = write_noniid(tables, work)
        shutil.copy(find(TEST_FILE, folder=folder), work)
        data = {
            c: {"credit": str(find(CLIENTS[c], folder=folder)), "noniid": str(work / noniid[c])}
            for c in CLIENTS
        }
        paths = write_demo_setup(work / "setup", data_folder=folder, data=data, parties=PARTIES)
        configs = {pid: load_config(p) for pid, p in paths.items()}
        procs = start_services(configs, logs=work / "logs")
        try:
            connect_services(configs, timeout=300)
            print("ours (secure aggregation, group mask) ...", flush=True)
            ours = run_ours(paths, work, "bench-iid", "credit", dp=False)
            ours_auc = auc_of(ours["model"], ours["standardizer"], test)
            print(
                f"  test AUC {ours_auc:.4f}, round {ours['round_wall_median_s']:.3f} s",
                flush=True,
            )
            print("ours with DP-SGD (sigma 1.0, C 1.0) ...", flush=True)
            dp = run_ours(paths, work, "bench-dp", "credit", dp=True)
            dp_auc = auc_of(dp["model"], dp["standardizer"], test)
            print(f"  test AUC {dp_auc:.4f}, epsilon {dp['epsilon_max']:.3f}", flush=True)
            print(f"ours on a non-IID split (sorted by {SORT_FEATURE}) ...", flush=True)
            skew = run_ours(paths, work, "bench-noniid", "noniid", dp=False)
            skew_auc = auc_of(skew["model"], skew["standardizer"], test)
            print(f"  test AUC {skew_auc:.4f}", flush=True)
        finally:
            stop_services(procs)
        print("Flower (deployment mode: SuperLink + 3 SuperNodes) ...", flush=True)
        peer = flower(tables, job, test, work / "flower")
        print(
            f"  test AUC {peer['test_auc']:.4f}, round {peer['round_wall_median_s']:.3f} s",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "fedavg_test_auc": round(ours_auc, 5),
        "centralised_test_auc": round(central["test_auc"], 5),
        "flower_test_auc": round(peer["test_auc"], 5),
        "round_wall_s": round(ours["round_wall_median_s"], 4),
        "flower_round_wall_s": round(peer["round_wall_median_s"], 4),
        "dp_test_auc": round(dp_auc, 5),
        "dp_epsilon": round(float(dp["epsilon_max"]), 4),
        "noniid_test_auc": round(skew_auc, 5),
        "targets": {
            "auc_gap_to_centralised": round(abs(ours_auc - central["test_auc"]), 5),
            "auc_gap_to_flower": round(abs(ours_auc - peer["test_auc"]), 5),
            "round_wall_ratio_ours_over_flower": round(
                ours["round_wall_median_s"] / peer["round_wall_median_s"], 4
            ),
        },
        "detail": {
            "rounds": ROUNDS,
            "local_epochs": LOCAL_EPOCHS,
            "batch": BATCH,
            "learning_rate": LR,
            "model": f"MLP 23-{'-'.join(str(w) for w in WIDTHS)}",
            "ours_round_wall_s": [round(w, 4) for w in ours["round_wall_s"]],
            "ours_total_s": round(ours["total_s"], 2),
            "ours_validation_auc": ours["validation_auc"],
            "flower_round_wall_s": [round(w, 4) for w in peer["round_wall_s"]],
            "flower_total_s": round(float(peer["total_s"]), 2),
            "flower_setup_s": round(float(peer.get("setup_s", 0.0)), 2),
            "flower_version": peer["flwr_version"],
            "dp_round_wall_median_s": round(dp["round_wall_median_s"], 4),
            "noniid_round_wall_median_s": round(skew["round_wall_median_s"], 4),
            "centralised_train_s": round(central["seconds"], 2),
            "cores": os.cpu_count(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "fedavg.json", (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: v for k, v in result.items() if k != "detail"}, indent=2))


if __name__ == "__main__":
    main()
