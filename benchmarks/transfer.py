"""Federated transfer learning against "hand the overlap's labels to the host".

Scenario (:mod:`vfl.transfer.scenario`, default_credit_hetero, seed 0): the guest holds
18,000 labelled customers with guest columns, the host 15,000 customers with host columns,
3,000 of them shared; the host's 12,000 customers outside the overlap are scored and the AUC
is computed against their true labels (which the host never sees). The 300-customer case
cannot keep both sizes (18,000 + 15,000 − 300 > the 30,000 customers that exist): it keeps
the guest's 18,000 and the host's same 12,000 outside customers, so the host holds 12,300.

1. ``ftl_auc``: FTL (§6) with the engine's sessions, the real arbiter service and a
   2048-bit key, G, H and A in one process on in-memory channels; d = 8, batch 64, 20 epochs,
   the model of the epoch with the best AUC on the guest's held-out overlap pairs (20 %) kept
   (with so few pairs an early stop on them is mostly noise); default label
   protection (noise along Φ, 1.0); host network MLP 32 → 8 with a tanh output;
2. ``overlap_only_auc``: the same host network with a linear head, trained in plaintext on
   the host columns of the overlap customers with their labels
   (:func:`vfl.transfer.baseline.overlap_only_scores`), in the same run;
3. ``epoch_wall_s``: median wall time of an FTL epoch (training and validation).

Writes ``benchmarks/results/transfer.json`` and prints the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from protocols.files import atomic_write
from vfl.data.datasets import data_dir
from vfl.transfer.baseline import overlap_only_scores
from vfl.transfer.ftl import FtlConfig
from vfl.transfer.inprocess import run_in_process
from vfl.transfer.scenario import build_scenario
from vfl.transfer.session import FtlJob

RESULTS = _HERE / "results"
CASES = {3000: 15_000, 300: 12_300}  # overlap -> host rows


def one_case(overlap: int, host_rows: int, *, key_bits: int, epochs: int) -> dict[str, Any]:
    scenario = build_scenario(data_dir=data_dir(os.environ), overlap=overlap, host_rows=host_rows)
    guest, host = scenario.guest, scenario.host
    g_index = {k: i for i, k in enumerate(guest["id"])}
    h_index = {k: i for i, k in enumerate(host["id"])}
    shared = list(scenario.overlap_ids)
    g_over = np.array([g_index[k] for k in shared])
    h_over = np.array([h_index[k] for k in shared])
    xg = guest.drop(columns=["id", "y"]).to_numpy(dtype=np.float64)
    xh = host.drop(columns=["id"]).to_numpy(dtype=np.float64)
    outside = np.setdiff1d(np.arange(len(host)), h_over)
    truth = scenario.host_labels.to_numpy()[outside]

    started = time.monotonic()
    baseline, info = overlap_only_scores(
        host_features_train=xh[h_over],
        labels_train=guest["y"].to_numpy()[g_over],
        host_features_score=xh[outside],
    )
    baseline_s = time.monotonic() - started
    job = FtlJob(
        config=FtlConfig(d=8, batch=64),
        guest_widths=(32,),
        host_widths=(32,),
        epochs=epochs,
        patience=epochs,  # every epoch runs; the best by validation AUC is kept
        guest_lr=0.01,
        host_lr=0.003,
    )
    local = run_in_process(  # on a local process pool of every CPU
        job=job,
        guest_features=xg,
        guest_labels=guest["y"].to_numpy(dtype=np.float64),
        guest_overlap=g_over,
        host_features=xh,
        host_overlap=h_over,
        key_bits=key_bits,
        allow_test_key=key_bits < 2048,
        seed=0,
    )
    scores = local.result.scores
    if scores is None:
        raise RuntimeError("FTL returned no scores")
    epochs_s = [h["seconds"] for h in local.result.history]
    return {
        "ftl_auc": round(float(roc_auc_score(truth, scores)), 5),
        "overlap_only_auc": round(float(roc_auc_score(truth, baseline)), 5),
        "n_overlap": overlap,
        "n_scored": int(len(outside)),
        "epoch_wall_s": round(statistics.median(epochs_s), 2),
        "detail": {
            "epochs_run": local.result.epochs,
            "best_epoch": local.result.best_epoch,
            "history": list(local.result.history),
            "ftl_total_s": round(local.seconds, 1),
            "overlap_only": info,
            "overlap_only_s": round(baseline_s, 2),
            "decryptions": local.decryptions,
            "key_bits": key_bits,
            "guest_rows": len(guest),
            "host_rows": len(host),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", type=int, choices=sorted(CASES), help="run one overlap size")
    args = parser.parse_args()
    cases = [args.only] if args.only else sorted(CASES)
    out: dict[str, Any] = {}
    for overlap in cases:
        print(f"overlap {overlap} ...", flush=True)
        found = one_case(overlap, CASES[overlap], key_bits=args.key_bits, epochs=args.epochs)
        print(
            f"  FTL AUC {found['ftl_auc']:.4f}, overlap only {found['overlap_only_auc']:.4f}, "
            f"epoch {found['epoch_wall_s']:.1f} s",
            flush=True,
        )
        out[str(overlap)] = found
    main_case = out.get("3000", next(iter(out.values())))
    result = {k: v for k, v in main_case.items() if k != "detail"}
    if "300" in out:
        small = out["300"]
        result.update(
            {
                "ftl_auc_300": small["ftl_auc"],
                "overlap_only_auc_300": small["overlap_only_auc"],
                "n_overlap_300": small["n_overlap"],
            }
        )
    result["cases"] = out
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / "transfer.json", (json.dumps(result, indent=2) + "\n").encode())
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))


if __name__ == "__main__":
    main()
