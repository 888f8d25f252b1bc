"""Scoring latency and throughput, and how close `vfl estimate` is, over three gRPC services.

Setup: the demo's silos (default_credit_hetero: bank 25,600 customers with labels, retailer
24,000, 20,000 shared, e-mail ids), the three party services as local processes with demo
certificates and a 2048-bit arbiter key, d = k = 8, B = 256, P1.

1. PSI of the two silos (BOTH), then `vfl estimate` for a 1-epoch job on that intersection
   (the primitives measured here, in the same run), then the job itself through the services;
   ``estimate_error = |estimated - actual| / actual`` of the job's wall time (setup,
   one epoch, validation and the test rows);
2. online scoring (§5.1): ``ONLINE_REQUESTS`` single customers by e-mail, one request
   each, timed inside the bank's service from the pseudonym to the score (the session is
   opened once before); p50 and p99; the reference in the same run is the floor of one
   request from the measured primitives (``d·κ_k`` small exponentiations and one obfuscator at
   the retailer, ``κ_k`` decryptions at the arbiter);
3. batch scoring (§5.2) of the 2,000 new applicants: GUEST_ONLY PSI, then ``[[Ẑ]]`` for every
   position of the retailer's list (24,000 + 1), decryption of the matched ones only;
   ``batch_rows_per_s`` = applicants / wall time of the whole admin command.

Writes ``benchmarks/results/scoring.json`` and prints the figures. Takes about 5 minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where benchmarks/psi.py would shadow
# the psi package: drop the folder (as splitnn_costs.py does).
if __name__ == "__main__":
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import json
import os
import shutil
import statistics
import tempfile
import time
import tomllib
from typing import Any

import pandas as pd

from protocols.files import atomic_write
from vfl.config import load_config
from vfl.data.datasets import data_dir
from vfl.estimate.job import estimate_job_file
from vfl.estimate.measure import quick_costs
from vfl.service.admin import admin_call
from vfl.service.demo import DEMO_JOB, fraud_setup
from vfl.service.local import connect_services, start_services, stop_services
from vfl.splitnn.jobfile import parse_job

RESULTS = Path(__file__).resolve().parent / "results"
ONLINE_REQUESTS = 200


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="vfl-bench-scoring-"))
    try:
        out = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "scoring.json", json.dumps(out, indent=2).encode())
    for key in (
        "online_p50_ms",
        "online_p99_ms",
        "online_floor_ms",
        "online_p50_over_floor",
        "batch_rows_per_s",
        "batch_seconds",
        "estimate_s",
        "actual_s",
        "estimate_error",
    ):
        print(f"{key:>22}: {out[key]}")
    print(f"written to {RESULTS / 'scoring.json'}")


def run(work: Path) -> dict[str, Any]:
    silos, configs = fraud_setup(work, data_folder=data_dir(os.environ))
    parsed = {pid: load_config(path) for pid, path in configs.items()}
    procs = start_services(parsed, logs=work / "logs")
    try:
        connect_services(parsed)
        return _measure(parsed["bank"], silos.summary())
    finally:
        stop_services(procs)


def _measure(bank: Any, silos: dict[str, int]) -> dict[str, Any]:
    psi = admin_call(
        bank,
        "psi",
        {
            "peer": "retailer",
            "data": "customers",
            "host_data": "customers",
            "id_column": "id",
            "id_type": "email",
            "job_id": "bench.psi",
        },
        timeout=600,
    )
    raw = tomllib.loads(DEMO_JOB)
    raw["job"].update(id="bench-1epoch", epochs=1, psi_job="bench.psi")
    job = parse_job(raw, source="benchmark job")
    costs = quick_costs()
    estimate = estimate_job_file(
        job,
        rows=int(psi["intersection_size"]),
        costs=costs,
        cores=os.cpu_count() or 1,
        run_psi=False,
    )
    started = time.monotonic()
    reply = admin_call(bank, "train", {"job_file": raw})
    while True:
        status = admin_call(bank, "status")["jobs"].get(reply["job_id"], {})
        if status.get("state") in ("done", "failed"):
            break
        time.sleep(0.5)
    actual = time.monotonic() - started
    if status["state"] != "done":
        raise SystemExit(f"benchmark job failed: {status.get('error')}")
    print(f"1-epoch job: estimated {estimate.total_s:.1f} s, took {actual:.1f} s", file=sys.stderr)

    new = bank.data["new"]
    ids = [str(v) for v in pd.read_csv(new, usecols=["id"])["id"].head(ONLINE_REQUESTS)]
    online = admin_call(
        bank,
        "score",
        {"model": "bench-1epoch", "data": "new", "id_type": "email", "ids": ids},
        timeout=3600,
    )
    ms = sorted(r["ms"] for r in online["scores"])
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    kappa = 1  # d = k = 8 fit one 2048-bit ciphertext row (15 slots)
    floor_ms = 1e3 * (8 * kappa * costs.powmod_a_s + costs.obfuscator_s + kappa * costs.decrypt_s)
    batch = admin_call(
        bank,
        "score",
        {
            "model": "bench-1epoch",
            "data": "new",
            "id_type": "email",
            "out": str(Path(tempfile.gettempdir()) / "vfl-bench-scores.csv"),
        },
        timeout=3600,
    )
    return {
        "setup": {
            "key_bits": 2048,
            "d": 8,
            "k": 8,
            "batch": 256,
            "mode": "p1",
            "transport": "gRPC, mutual TLS, three local processes",
            "silos": silos,
            "cores": os.cpu_count(),
        },
        "online_requests": len(ms),
        "online_p50_ms": round(p50, 2),
        "online_p99_ms": round(p99, 2),
        "online_mean_ms": round(statistics.fmean(ms), 2),
        "online_floor_ms": round(floor_ms, 2),
        "online_p50_over_floor": round(p50 / floor_ms, 2),
        "batch_rows": batch["rows"],
        "batch_host_known": batch["host_known"],
        "batch_seconds": batch["seconds"],
        "batch_rows_per_s": batch["rows_per_s"],
        "batch_host_positions": silos["retailer_rows"] + 1,
        "estimate_s": round(estimate.total_s, 2),
        "actual_s": round(actual, 2),
        "estimate_error": round(abs(estimate.total_s - actual) / actual, 4),
        "estimate": estimate.to_json(),
        "job_timings": status.get("timings", {}),
        "primitive_costs": costs.to_json(),
    }


if __name__ == "__main__":
    main()
