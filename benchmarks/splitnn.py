"""One encrypted split-NN training epoch between three party services, against its floor.

Setting (issue 5): default_credit_hetero, 24,000 training rows (93 full batches of 256),
host embedding width d = 8, interactive width k = 8, 2048-bit key, mode P1, protection at
its default; bank (guest), retailer (host) and arbiter as three ``vfl serve`` processes
over mutual TLS on this machine, the job submitted with the guest's admin ``train``.

Figures (``benchmarks/results/splitnn.json``):

* ``epoch_wall_s``: first BATCH to last STEP_ACK (the session's training time; the
  obfuscator pools start empty at the first BATCH and fill while the parties wait);
* ``floor_s``: the §4.9 operation counts of the epoch x primitive costs measured in this run
  (CRT decryption; fixed-base obfuscator generation; fixed-base multiplication for reused
  ciphertexts; powmod otherwise) / 2 cores; ``floor_engine_s`` costs B2 with the multi-
  exponentiation the engine really uses (a lower floor);
* ``naive_phe_s``: the same epoch's P0 flow with python-paillier's EncryptedNumber API in one
  process, timed on a few rows and scaled (``splitnn_costs.naive_phe_epoch_seconds``);
* ``setup_s`` (key, registration, joint initialisation; PSI reported as ``psi_s``),
  ``eval_s`` (validation after the epoch), ``rows_per_s``;
* ``estimate``: what ``vfl estimate`` predicts before the run
  (:func:`vfl.estimate.job.estimate_job_file` on :func:`~vfl.estimate.measure.quick_costs`
  timed just before the services start), and ``estimate_epoch_ratio`` / ``estimate_total_ratio``
  = measured / predicted (epoch; PSI to the end of the test).

Run: ``python -m benchmarks.splitnn`` (about 5 minutes; nothing else should run meanwhile).
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/psi.py must not shadow the psi package: import the package first, then let
# this folder's helper module be found.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
import psi.protocol  # noqa: F401

sys.path.append(str(_HERE))

import argparse
import json
import os
import platform
import tempfile
import time
import tomllib
from dataclasses import fields
from typing import Any

from splitnn_costs import (
    PrimitiveCosts,
    epoch_floor,
    measure_primitive_costs,
    naive_phe_epoch_seconds,
)

from protocols.files import atomic_write
from vfl.config import load_config
from vfl.data.datasets import data_dir
from vfl.estimate.job import estimate_job_file
from vfl.estimate.measure import quick_costs
from vfl.service.admin import admin_call
from vfl.service.arbiter import arbiter_key
from vfl.service.demo import write_demo_setup
from vfl.service.local import connect_services, start_services, stop_services
from vfl.splitnn.jobfile import parse_job
from vfl.splitnn.spec import JobSpec, SplitMode

RESULTS = Path(__file__).resolve().parent / "results"
DATASET_ROWS = 30_000  # default_credit_hetero ids on each side, all aligned

JOB = """
[job]
id = "bench-epoch"
guest_data = "credit"
host_data = "credit"
label_column = "y"
test_fraction = 0.1
validation_fraction = 0.111111112  # 30,000 x 0.9 x (1 - 1/9) = 24,000 training rows
batch = {batch}
batch_eval = 1024
epochs = 1

[model]
d = {d}
k = {k}
guest_widths = [32, 16]
host_widths = [32, {d}]
"""


def run_epoch(work: Path, *, key_bits: int, batch: int, d: int, k: int) -> dict[str, Any]:
    """Start the three services, run the one-epoch job, return its status and result."""
    paths = write_demo_setup(work / "setup", data_folder=data_dir(os.environ))
    if key_bits != 2048:
        for pid in paths:
            with paths[pid].open("a") as f:
                f.write(f"\n[arbiter]\nkey_bits = {key_bits}\nallow_test_key = true\n")
    configs = {pid: load_config(p) for pid, p in paths.items()}
    job_toml = JOB.format(batch=batch, d=d, k=k)
    # the arbiter's key, made here so the primitive costs can be timed before the epoch too
    keys = arbiter_key(configs["arbiter"].state_dir, bits=key_bits, allow_test_key=key_bits != 2048)
    costs_before = measure_primitive_costs(public_key=keys[0], private_key=keys[1])
    quick = quick_costs(keypair=keys)  # what `vfl estimate` would measure
    procs = start_services(configs, logs=work / "logs")
    try:
        connect_services(configs, timeout=300)
        started = time.monotonic()
        reply = admin_call(configs["bank"], "train", {"job_file": tomllib.loads(job_toml)})
        job_id = reply["job_id"]
        while True:
            status = admin_call(configs["bank"], "status")["jobs"][job_id]
            if status["state"] in ("done", "failed"):
                break
            time.sleep(1.0)
        total_s = time.monotonic() - started
    finally:
        stop_services(procs)
    if status["state"] != "done":
        raise RuntimeError(f"the benchmark job failed: {status.get('error')}")
    result = json.loads((configs["bank"].state_dir / "jobs" / job_id / "result.json").read_text())
    costs_after = measure_primitive_costs(public_key=keys[0], private_key=keys[1])
    return {
        "status": status,
        "result": result,
        "total_s": total_s,
        "keys": keys,
        "costs": (costs_before, costs_after),
        "quick_costs": quick,
        "job_toml": job_toml,
    }


def mean_costs(a: PrimitiveCosts, b: PrimitiveCosts) -> PrimitiveCosts:
    """Field-wise mean of two measurements of the primitive costs."""
    values = {}
    for f in fields(PrimitiveCosts):
        x, y = getattr(a, f.name), getattr(b, f.name)
        both_float = isinstance(x, float) and isinstance(y, float)
        values[f.name] = (x + y) / 2 if both_float else x
    return PrimitiveCosts(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--naive-rows", type=int, default=2, help="rows timed for the phe flow")
    parser.add_argument("--out", type=Path, default=RESULTS / "splitnn.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vfl-bench-splitnn-") as tmp:
        run = run_epoch(Path(tmp), key_bits=args.key_bits, batch=args.batch, d=args.d, k=args.k)
    timings = run["result"]["timings"]
    steps = 24_000 // args.batch
    public, private = run["keys"]
    before, after = run["costs"]
    costs = mean_costs(before, after)  # the machine drifts: time the primitives on both sides
    spec = JobSpec(
        job_id="floor",
        key_id=public.key_id.hex(),
        key_bits=public.bits,
        mode=SplitMode.P1,
        batch=args.batch,
        d=args.d,
        k=args.k,
        batch_eval=1024,
        guest="bank",
        host="retailer",
    )
    floor = epoch_floor(spec=spec, steps=steps, costs=costs, few_reuse="powmod")
    floor_engine = epoch_floor(spec=spec, steps=steps, costs=costs, few_reuse="multi_exp")
    naive = naive_phe_epoch_seconds(
        bits=public.bits,
        batch=args.batch,
        d=args.d,
        k=args.k,
        steps=steps,
        sample_rows=args.naive_rows,
    )
    epoch_wall_s = float(timings["train_s"])
    estimate = estimate_job_file(
        parse_job(tomllib.loads(run["job_toml"]), source="benchmark job"),
        rows=int(run["status"].get("rows", DATASET_ROWS)),
        costs=run["quick_costs"],
        cores=os.cpu_count() or 1,
        run_psi=True,
    )
    out = {
        "dataset": "default_credit_hetero",
        "rows": steps * args.batch,
        "steps": steps,
        "batch": args.batch,
        "d": args.d,
        "k": args.k,
        "key_bits": public.bits,
        "mode": "p1",
        "slots": spec.slots,
        "epoch_wall_s": round(epoch_wall_s, 2),
        "floor_s": round(floor.floor_s, 2),
        "ratio_to_floor": round(epoch_wall_s / floor.floor_s, 3),
        "floor_engine_s": round(floor_engine.floor_s, 2),
        "ratio_to_engine_floor": round(epoch_wall_s / floor_engine.floor_s, 3),
        "naive_phe_s": round(naive.epoch_s, 1),
        "naive_phe_speedup": round(naive.epoch_s / epoch_wall_s, 1),
        "rows_per_s": round(steps * args.batch / epoch_wall_s, 1),
        "setup_s": round(float(timings["setup_s"]), 2),
        "psi_s": round(run["total_s"] - sum(float(v) for v in timings.values()), 2),
        "eval_s": round(float(timings["eval_s"]), 2),
        "validation_auc": run["result"]["history"][0]["roc_auc"],
        "estimate_epoch_s": round(estimate.epoch_s, 2),
        "estimate_epoch_ratio": round(epoch_wall_s / estimate.epoch_s, 3),
        "estimate_total_s": round(estimate.total_s, 2),
        "estimate_total_ratio": round(run["total_s"] / estimate.total_s, 3),
        "estimate": estimate.to_json(),
        "estimate_costs": run["quick_costs"].to_json(),
        "floor": floor.to_json(),
        "floor_engine": floor_engine.to_json(),
        "costs": costs.to_json(),
        "costs_before": before.to_json(),
        "costs_after": after.to_json(),
        "naive_phe": naive.to_json(),
        "targets": {"epoch_wall_s": 150, "ratio_to_floor": 1.5, "naive_phe_speedup": 30},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    for key in (
        "epoch_wall_s",
        "floor_s",
        "ratio_to_floor",
        "floor_engine_s",
        "ratio_to_engine_floor",
        "naive_phe_s",
        "naive_phe_speedup",
        "rows_per_s",
        "setup_s",
        "psi_s",
        "eval_s",
        "validation_auc",
        "estimate_epoch_s",
        "estimate_epoch_ratio",
        "estimate_total_s",
        "estimate_total_ratio",
    ):
        print(f"{key:24s} {out[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
