"""What the label protection costs the joint fraud model: validation rows only.

A diagnostic beside ``benchmarks/fraud.py`` (same data, splits, network, batch and epochs, the
``balanced`` loss it chose for ``joint``): the joint model trained in plaintext mode (the same
fixed-point protocol code as encrypted, max score difference 0 in ``fraud.json``) under several
label-protection settings, seeds 0-2, scored on the **validation** rows only (the test rows are
never touched, so nothing here tunes what ``fraud.json`` reports). Settings: the default
(``marvell``, ``power_scale`` 16, persistent noise, visit cap 3), no visit cap, ``power_scale``
4, both, and no protection (``none``: the host can infer labels). What each setting leaks is
``benchmarks/leakage.py``'s subject; this measures only what it costs.

Writes ``benchmarks/results/fraud_protection.json``. Run: ``python -m benchmarks.fraud_protection``
(about 15 minutes on 2 cores).
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from benchmarks.fraud import EPOCHS, NETWORK, RESULTS, SEEDS, git_commit, load_data, protocol_run
from protocols.files import atomic_write
from vfl.common.metrics import binary_metrics
from vfl.privacy.label_protection import ProtectConfig, ProtectMode

SETTINGS = {
    "default": ProtectConfig(),
    "no_cap": ProtectConfig(max_visits=0),
    "s4": ProtectConfig(power_scale=4.0),
    "s4_no_cap": ProtectConfig(power_scale=4.0, max_visits=0),
    "none": ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True),
}
METRICS = ("pr_auc", "roc_auc", "recall_at_fpr_5pct")


def main() -> None:
    data = load_data()
    out: dict[str, Any] = {}
    for name, protect in SETTINGS.items():
        per_seed = []
        for seed in SEEDS:
            config = replace(NETWORK, protect=protect)
            run, _ = protocol_run(data, "joint", config, "balanced", seed, epochs=EPOCHS)
            found = binary_metrics(data.labels[run.val_rows], run.val_scores)
            per_seed.append({k: found[k] for k in METRICS})
            print(name, seed, per_seed[-1], flush=True)
        out[name] = {
            k: {
                "mean": float(np.mean([v[k] for v in per_seed])),
                "sd": float(np.std([v[k] for v in per_seed], ddof=1)),
            }
            for k in METRICS
        }
    body = {
        "git_commit": git_commit(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": "validation only (seeds 0-2)",
        "loss": "balanced",
        "max_epochs": EPOCHS,
        "settings": {k: str(v) for k, v in SETTINGS.items()},
        "validation": out,
    }
    atomic_write(RESULTS / "fraud_protection.json", (json.dumps(body, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
