"""The bank + retailer fraud demo: three party services on this machine, one command.

1. verify the real data sets against their sha256 list;
2. build two silos from default_credit_hetero (:mod:`vfl.data.demo_silos`): the bank with
   labels, the retailer with its columns, about 20,000 shared customers, e-mail ids with
   each side's own noise, and new applicants at the bank;
3. issue a demo CA and certificates, write one config per party, start ``vfl serve`` for
   each as its own process and wait until each reports SERVING (gRPC health);
4. print the run-time estimate of the job (:mod:`vfl.estimate`);
5. the bank submits the job (``vfl run``): PSI on canonicalised e-mails, then encrypted
   split-NN training with the default label protection, with a progress bar;
6. the bank trains its guest-only baseline on the same rows (nothing leaves the bank);
7. batch scoring of the new applicants (§5.2) and 8. online scoring of a few (§5.1);
   the scores exist only at the bank;
9. write the report folder (``report.json``, ROC and loss PNGs, the scores CSV) and stop
   every service with SIGTERM.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from protocols.ids import state_path
from protocols.roles import Party, Role
from protocols.transport.tls import create_demo_pki
from psi.result import read_result
from vfl.common.seeds import simulation_secret
from vfl.config import PartyConfig, load_config
from vfl.data.datasets import find, verify_all
from vfl.data.demo_silos import (
    BANK_FILE,
    NEW_CUSTOMERS_FILE,
    RETAILER_FILE,
    SiloFiles,
    build_silos,
)
from vfl.data.tables import TableSpec, load_table
from vfl.estimate.job import estimate_job_file, format_estimate
from vfl.estimate.measure import quick_costs
from vfl.report import write_report
from vfl.service.admin import admin_call
from vfl.service.drivers.splitnn import job_splits
from vfl.service.local import connect_services, start_services, stop_services
from vfl.service.progress import follow_job
from vfl.service.requests import AdminCommand
from vfl.splitnn.baseline import guest_only_scores
from vfl.splitnn.jobfile import load_job_file

DEMO_PARTIES = (
    Party("bank", Role.GUEST),
    Party("retailer", Role.HOST),
    Party("arbiter", Role.ARBITER),
)
_DATA = {
    "bank": {"credit": "default_credit_hetero_guest.csv", "breast": "breast_hetero_guest.csv"},
    "retailer": {"credit": "default_credit_hetero_host.csv", "breast": "breast_hetero_host.csv"},
    "arbiter": {},
}


DEMO_JOB = """\
[job]
id = "fraud-demo"
guest_data = "customers"
host_data = "customers"
id_column = "id"
id_type = "email"
label_column = "y"
batch = 256
batch_eval = 1024
epochs = 3
patience = 2

[model]
d = 8
k = 8
guest_widths = [32, 16]
host_widths = [32, 8]
learning_rate = 0.03
eta_w = 0.1

[protect]
mode = "marvell"
"""

ARBITER_SCORING = """\
[scoring]              # who may score the demo's models, how much, how long
requesters = ["bank"]
quota_rows = 100000
valid_days = 30
"""


def write_demo_setup(
    out: Path,
    *,
    data_folder: Path,
    data: Mapping[str, Mapping[str, str]] | None = None,
    extra: Mapping[str, str] | None = None,
    parties: Sequence[Party] = DEMO_PARTIES,
) -> dict[str, Path]:
    """Certificates and one config per party under ``out``; returns config paths.

    ``data`` maps each party to its data aliases (file names under ``data_folder``, each
    found plain or as ``.gz``; default:
    the credit and breast files); ``extra`` adds TOML text to a party's config; ``parties``
    (default: bank, retailer, arbiter) each get every other one as a pinned peer.
    """
    certs = out / "certs"
    create_demo_pki(certs, list(parties))
    paths = {}
    aliases = data if data is not None else _DATA
    for party in parties:
        lines = [
            "[party]",
            f'id = "{party.party_id}"',
            f'role = "{party.role.value}"',
            'listen = "127.0.0.1:0"',
            f'state_dir = "state/{party.party_id}"',
            "",
            "[tls]",
            'ca = "certs/ca.pem"',
            f'certificate = "certs/{party.party_id}.pem"',
            f'key = "certs/{party.party_id}.key"',
            "",
        ]
        for peer in parties:
            if peer == party:
                continue
            lines += [
                "[[peers]]",
                f'id = "{peer.party_id}"',
                f'role = "{peer.role.value}"',
                'address = "127.0.0.1:0"  # set at start-up by the demo',
                f'certificate = "certs/{peer.party_id}.pem"',
                "",
            ]
        lines.append("[data]")
        lines += [
            f'{alias} = "{find(name, folder=data_folder)}"'
            for alias, name in aliases.get(party.party_id, {}).items()
        ]
        if extra and party.party_id in extra:
            lines += ["", extra[party.party_id]]
        path = out / f"{party.party_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        paths[party.party_id] = path
    return paths


def write_cluster_setup(
    out: Path,
    *,
    data_folder: Path,
    key_bits: int = 2048,
    seed: int | None = None,
    host_protect_modes: Sequence[str] | None = None,
    allow_hold: bool = False,
) -> dict[str, Path]:
    """:func:`write_demo_setup` for tests and benchmarks of the three services.

    ``key_bits`` below 2048 makes the arbiter use a test key, which the data parties then
    accept (``allow_test_key``: never outside tests); ``seed`` fixes both data parties'
    random draws (``[random] seed``, with a local secret derived from it, as in a simulation:
    two runs of a job give the same scores, in any folder);
    ``host_protect_modes`` widens the retailer's ``[accept] protect_modes`` (``"none"`` for
    noise-free comparisons); ``allow_hold`` lets the bank's jobs pause after a step
    (``[testing] allow_hold``)."""
    test_key = key_bits < 2048
    extra: dict[str, list[str]] = {"bank": [], "retailer": [], "arbiter": []}
    if test_key or key_bits != 2048:
        extra["arbiter"] += ["[arbiter]", f"key_bits = {key_bits}"]
        if test_key:
            extra["arbiter"].append("allow_test_key = true  # test only")
    for pid in ("bank", "retailer"):
        if test_key:
            extra[pid] += ["[arbiter]", "allow_test_key = true  # accept the test key", ""]
        if seed is not None:
            extra[pid] += ["[random]", f"seed = {seed}", ""]
        if allow_hold and pid == "bank":
            extra[pid] += ["[testing]", "allow_hold = true", ""]
    if host_protect_modes is not None:
        modes = ", ".join(f'"{m}"' for m in host_protect_modes)
        extra["retailer"] += ["[accept]", f"protect_modes = [{modes}]"]
    paths = write_demo_setup(
        out,
        data_folder=data_folder,
        extra={pid: "\n".join(lines) for pid, lines in extra.items() if lines},
    )
    if seed is not None:  # one machine, one operator: the same draws in every fresh folder
        for pid in ("bank", "retailer"):
            simulation_secret(load_config(paths[pid]).state_dir, seed=seed)
    return paths


def fraud_setup(out: Path, *, data_folder: Path) -> tuple[SiloFiles, dict[str, Path]]:
    """The fraud demo's silos, certificates and party configs under ``out`` (steps 2-3)."""
    out = out.resolve()  # the configs name files by absolute path
    silos = build_silos(data_dir=data_folder, out=out / "data")
    configs = write_demo_setup(
        out,
        data_folder=out / "data",
        data={
            "bank": {"customers": BANK_FILE, "new": NEW_CUSTOMERS_FILE},
            "retailer": {"customers": RETAILER_FILE},
        },
        extra={"arbiter": ARBITER_SCORING},
    )
    return silos, configs


def run_demo(out: Path, *, data_folder: Path, echo: Callable[[str], None]) -> Path:
    """Run steps 1-9 of the module docstring; return the report folder."""
    out = out.resolve()
    started = time.monotonic()
    echo(f"1. data sets in {data_folder}:")
    for ds in verify_all(folder=data_folder):
        echo(f"   ok  {ds.name:36s} {ds.size / 1e6:7.2f} MB  sha256 {ds.sha256[:12]}...")
    silos, configs = fraud_setup(out, data_folder=data_folder)
    counts = silos.summary()
    echo(
        f"2. two silos from default_credit_hetero in {out / 'data'}: the bank holds "
        f"{counts['bank_rows']:,} customers with fraud labels, the retailer "
        f"{counts['retailer_rows']:,}, {counts['shared']:,} of them shared; ids are e-mail "
        f"addresses with each side's own case and whitespace noise; "
        f"{counts['new_customers']:,} new applicants wait at the bank for scoring"
    )
    parsed = {pid: load_config(path) for pid, path in configs.items()}
    procs = start_services(parsed, logs=out / "logs")
    echo(
        f"3. demo CA and certificates in {out / 'certs'}; started `vfl serve` for "
        + ", ".join(f"{pid} (pid {proc.pid})" for pid, proc in procs.items())
    )
    report = out / "report"
    try:
        connect_services(parsed)
        echo("   all three report SERVING on grpc.health.v1 and know where their peers listen")
        report = _train_and_score(out, parsed, silos, echo, started)
    finally:
        codes = stop_services(procs)
    echo("9. SIGTERM sent; exit codes: " + ", ".join(f"{p}={c}" for p, c in codes.items()))
    if any(codes.values()):
        raise SystemExit("demo failed: see the logs in " + str(out / "logs"))
    return report


def _train_and_score(
    out: Path,
    configs: Mapping[str, PartyConfig],
    silos: SiloFiles,
    echo: Callable[[str], None],
    started: float,
) -> Path:
    bank = configs["bank"]
    job_path = out / "fraud_job.toml"
    job_path.write_text(DEMO_JOB)
    job = load_job_file(job_path)
    costs = quick_costs()
    estimate = estimate_job_file(
        job, rows=silos.bank_rows, costs=costs, cores=os.cpu_count() or 1, run_psi=True
    )
    echo(f"4. estimate for {job_path.name} (measured this machine's primitives in a few s):")
    for line in format_estimate(estimate).splitlines():
        echo(f"   {line}")
    echo(
        "5. the bank submits the job: PSI on e-mail ids, then encrypted split-NN training "
        f"(2048-bit Paillier, label protection {job.job.train.protect.mode.value})"
    )
    t_job = time.monotonic()
    raw = tomllib.loads(DEMO_JOB)
    reply = admin_call(bank, AdminCommand.TRAIN, {"job_file": raw})
    final = follow_job(bank, reply["job_id"])
    job_s = time.monotonic() - t_job
    if final.get("state") != "done":
        raise SystemExit(f"demo job failed: {final.get('error', final)}")
    job_id = job.job.job_id
    result = json.loads(state_path(bank.state_dir, "jobs", job_id, "result.json").read_text())
    psi_summary, psi_rows = read_result(bank.state_dir, f"{job_id}.psi")
    echo(
        f"   PSI: {psi_summary['intersection_size']:,} shared customers "
        f"({psi_summary['seconds']:.1f} s); {result['epochs_run']} epochs, best "
        f"{result['best_epoch'] + 1}; test AUC {result['test']['roc_auc']:.4f}"
    )

    echo("6. the bank's guest-only baseline (its own features, same rows and splits)")
    table = load_table(
        TableSpec(path=bank.data["customers"], id_column="id", label_column="y")
    ).take(np.asarray(psi_rows))
    if table.labels is None:
        raise SystemExit("demo data lost its labels")
    splits = job_splits(bank, table, job)  # the job's own rows (keyed, docs/protocol.md §4.4.2)
    baseline = guest_only_scores(
        table,
        splits,
        job.job.train,
        batch=job.job.batch,
        epochs=job.job.epochs,
        patience=job.job.patience,
    )
    test_labels = table.labels[splits.test]
    test_scores = np.asarray(result["test_scores"], dtype=np.float64).reshape(-1)
    guest_only_auc = float(roc_auc_score(test_labels, baseline.reshape(-1)))

    echo("7. batch scoring of the new applicants (GUEST_ONLY PSI, then §5.2)")
    scored = admin_call(
        bank,
        AdminCommand.SCORE,
        {
            "model": job_id,
            "data": "new",
            "id_type": "email",
            "out": str((out / "new_customer_scores.csv").resolve()),
        },
        timeout=3600,
    )
    scores = pd.read_csv(scored["out"])
    truth = pd.read_csv(silos.new_labels)
    new_auc = float(roc_auc_score(truth["y"].to_numpy(), scores["score"].to_numpy()))
    echo(
        f"   {scored['rows']:,} applicants scored in {scored['seconds']:.1f} s "
        f"({scored['rows_per_s']:.0f} rows/s); the retailer knew {scored['host_known']:,} "
        f"of them; AUC against the demo's ground truth {new_auc:.4f}"
    )
    echo("8. online scoring of single applicants by e-mail (§5.1, one pseudonym lookup each)")
    ids = [str(v) for v in scores["id"].head(5)]
    online = admin_call(
        bank,
        AdminCommand.SCORE,
        {"model": job_id, "data": "new", "id_type": "email", "ids": ids, "decoys": 2},
    )
    for r in online["scores"]:
        echo(f"   {r['id'].strip()[:32]:<32} score {r['score']:.4f} in {r['ms']:.0f} ms")

    summary = {
        "job_id": job_id,
        "test_auc": float(roc_auc_score(test_labels, test_scores)),
        "guest_only_auc": guest_only_auc,
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "test_metrics": result["test"],
        "privacy": result.get("privacy", {}),  # label protection and its ε (docs/protocol.md §4.7)
        "psi": psi_summary,
        "silos": silos.summary(),
        "estimate": estimate.to_json(),
        "timings": {
            "estimate_total_s": estimate.total_s,
            "job_wall_s": job_s,
            **result["timings"],
            "batch_scoring_s": scored["seconds"],
            "batch_scoring_rows_per_s": scored["rows_per_s"],
            "online_scoring_ms": [r["ms"] for r in online["scores"]],
            "demo_wall_s": time.monotonic() - started,
        },
        "new_customers": {
            "rows": scored["rows"],
            "host_known": scored["host_known"],
            "auc_against_demo_ground_truth": new_auc,
        },
    }
    files = write_report(
        out / "report",
        summary=summary,
        test_labels=test_labels,
        test_scores=test_scores,
        history=result["history"],
        scores=scores,
        guest_only_scores=baseline.reshape(-1),
    )
    echo(
        f"   joint model test AUC {summary['test_auc']:.4f} vs the bank alone "
        f"{guest_only_auc:.4f}; estimate {estimate.total_s:.0f} s (upper bound) vs job "
        f"{job_s:.0f} s"
    )
    echo(f"   report: {files.report.name}, {files.roc.name}, {files.loss.name}, scores.csv")
    return files.report.parent
