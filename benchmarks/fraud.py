"""Fraud-like data: does the retailer's data help the bank catch rare positives? (2 % positives)

Data: :func:`vfl.datasets.fraud` (``positive_rate=0.02, seed=0``: the credit customers with
the positives subsampled to 2 %, 23,841 rows, 477 positives), every customer at both parties
(full overlap; the PSI still aligns them). The bank (guest) has the label, its numeric columns,
the categorical ``bill_band`` (one-hot) and the date ``opened``; the retailer (host) its numeric
columns and the categorical ``age_band`` (one-hot). Preprocessing is the engine's
(:mod:`vfl.data.preprocess`, fitted on the training rows). Seed ``s`` gives the stratified
split (20 % test, then 20 % of the rest for validation: 20 %, not the default 10 %, so that
validation holds about 76 positives instead of 38 for early stopping, the choices below and
the calibration), the models' initial weights, the batch order and the label protection's
noise.

Variants, each trained for at most ``EPOCHS`` epochs (batch 256, early stopping on validation
ROC AUC with the engine's patience 3), with the engine's defaults otherwise (network
``TrainConfig()``, Adam 0.01, default label protection ``marvell``):

* ``joint``: ``vfl.fit_vertical`` with both parties' features; for seed 0 encrypted (P1,
  2048-bit Paillier, the default) and in plaintext mode (the same fixed-point protocol code
  without encryption), whose test scores must be identical; seeds 1 and 2 in plaintext mode
  only (an encrypted run takes about 20 minutes on this machine);
* ``joint_linear``: the same with ``guest_widths = host_widths = top_widths = ()`` and
  ``k = 1`` (a vertical logistic regression), plaintext mode;
* ``guest_only``: the guest's part of the same network (bottom, ``W_g``, top) on its own
  features, trained in plain torch on the same rows, splits and preprocessing;
* ``centralised``: one network of the same family (bottom (16, 8), ``W``, top) on both
  parties' preprocessed features side by side, plain torch, same rows and splits.

Choices, on validation rows only (the test rows are scored once, after every choice): per
variant, the loss among ``bce`` (the default), ``class_weight = "balanced"`` and ``focal``
(γ = 2) by the mean validation PR AUC of the kept epoch over the seeds; then the calibration,
Platt or isotonic, by the mean 5-fold cross-validated Brier score on the validation rows'
scores (the calibration is fitted on validation, so it cannot be judged on the same rows).
Every variant's test scores are then calibrated as the guest's J7 does it:
``Decision.fit(DecisionConfig(calibration=...))`` on the kept model's validation scores
(the encrypted run gets ``decision=`` and reports the engine's own calibrated metrics).

Reported per variant, mean ± sd over seeds 0, 1, 2 (sample sd), under ``test`` (what the
targets read): PR AUC, ROC AUC and recall at 1 % and 5 % FPR of the model's scores (a
calibration is monotone and does not change the ranking; isotonic's steps only tie scores) and
the Brier score of the calibrated scores; ``test_raw`` and ``test_calibrated`` keep every metric
of both; plus the joint model's uncalibrated Brier score and the targets as booleans with their
numbers.

Writes ``benchmarks/results/fraud.json``. Run: ``python -m benchmarks.fraud`` (about 30
minutes on 2 cores, most of it the encrypted run); ``--fast``: seed 0, 1 epoch, two losses, no
encrypted run (a smoke run of about 2 minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # benchmarks/psi.py would shadow the psi package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import copy
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

import vfl
from protocols.executor import InlineExecutor
from protocols.files import atomic_write
from vfl.common.decision import Calibration, Decision, DecisionConfig
from vfl.common.metrics import binary_metrics
from vfl.data.features import Encoding, FeatureSpec
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import BatchOrder, PartyTable
from vfl.models.split import ClassWeight, LossKind
from vfl.simulate.common import party_table
from vfl.simulate.vertical import VerticalModel
from vfl.splitnn.saved import config_to_json
from vfl.splitnn.training import (
    TrainConfig,
    guest_models,
    make_optimizer,
    resolve_pos_weight,
    task_loss,
    task_scores,
)

ROOT = _HERE.parent
RESULTS = ROOT / "benchmarks" / "results"

SEEDS = (0, 1, 2)
EPOCHS, BATCH, PATIENCE = 6, 256, 3  # patience: the engine's (SplitJob's default)
TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.2
POSITIVE_RATE, DATA_SEED = 0.02, 0
LABEL, ID = "y", "id"
GUEST_FEATURES = FeatureSpec(
    categorical=(("bill_band", Encoding.ONEHOT),), date_columns=("opened",)
)
HOST_FEATURES = FeatureSpec(categorical=(("age_band", Encoding.ONEHOT),))
NETWORK = TrainConfig()  # the engine's defaults
LINEAR = TrainConfig(guest_widths=(), host_widths=(), top_widths=(), k=1)
LOSSES: dict[str, dict[str, Any]] = {
    "bce": {},
    "balanced": {"class_weight": ClassWeight.BALANCED},
    "focal": {"loss": LossKind.FOCAL, "focal_gamma": 2.0},
}
CALIBRATIONS = (Calibration.PLATT, Calibration.ISOTONIC)
CV_FOLDS = 5
METRICS = ("pr_auc", "roc_auc", "recall_at_fpr_1pct", "recall_at_fpr_5pct", "brier")
VARIANTS = ("joint", "joint_linear", "guest_only", "centralised")


@dataclass(frozen=True)
class Data:
    """Both parties' frames and validated tables (the same customers in the same order)."""

    guest_frame: pd.DataFrame
    host_frame: pd.DataFrame
    guest: PartyTable
    host: PartyTable

    @property
    def labels(self) -> np.ndarray:
        assert self.guest.labels is not None
        return self.guest.labels


@dataclass(frozen=True)
class Run:
    """One trained model: the kept model's validation and test scores (in row order of
    ``val_rows`` and ``test_rows``, positions in :class:`Data`'s tables)."""

    variant: str
    loss: str
    seed: int
    val_rows: np.ndarray
    test_rows: np.ndarray
    val_scores: np.ndarray
    test_scores: np.ndarray
    best_epoch: int
    epochs_run: int
    wall_s: float


def load_data() -> Data:
    guest, host = vfl.datasets.fraud(positive_rate=POSITIVE_RATE, seed=DATA_SEED)
    assert (guest[ID].to_numpy() == host[ID].to_numpy()).all()
    g = party_table(guest, side="guest", id_column=ID, label=LABEL, features=GUEST_FEATURES)
    h = party_table(
        host, side="host", id_column=ID, label=None, features=HOST_FEATURES, label_like=LABEL
    )
    return Data(guest_frame=guest, host_frame=host, guest=g, host=h)


def config_of(base: TrainConfig, loss: str) -> TrainConfig:
    return replace(base, **LOSSES[loss])


def positions(data: Data, ids: pd.Series) -> np.ndarray:
    index = pd.Series(np.arange(len(data.guest)), index=data.guest.ids)
    return np.array(index.loc[ids.astype(str)].to_numpy(), dtype=np.int64)  # a writable copy


def protocol_run(
    data: Data,
    variant: str,
    base: TrainConfig,
    loss: str,
    seed: int,
    *,
    epochs: int,
    encrypted: bool = False,
    decision: DecisionConfig | None = None,
) -> tuple[Run, VerticalModel]:
    """``vfl.fit_vertical`` on the fraud frames (plaintext mode unless ``encrypted``)."""
    started = time.monotonic()
    model = vfl.fit_vertical(
        guest=data.guest_frame,
        host=data.host_frame,
        label=LABEL,
        id_column=ID,
        epochs=epochs,
        batch=BATCH,
        plaintext=not encrypted,
        test_fraction=TEST_FRACTION,
        validation_fraction=VALIDATION_FRACTION,
        seed=seed,
        model=config_of(base, loss),
        guest_features=GUEST_FEATURES,
        host_features=HOST_FEATURES,
        decision=decision,
        executor=None if encrypted else InlineExecutor(),
        progress=encrypted,
    )
    run = Run(
        variant=variant,
        loss=loss,
        seed=seed,
        val_rows=positions(data, model.validation_scores[ID]),
        test_rows=positions(data, model.test_scores[ID]),
        val_scores=model.validation_scores["score"].to_numpy(dtype=np.float64),
        test_scores=model.test_scores["score"].to_numpy(dtype=np.float64),
        best_epoch=model.best_epoch,
        epochs_run=len(model.history),
        wall_s=time.monotonic() - started,
    )
    return run, model


def local_run(
    data: Data,
    variant: str,
    x: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    loss: str,
    seed: int,
    *,
    epochs: int,
) -> Run:
    """The guest's network (bottom, ``W``, top) on ``x`` alone, in plain torch, with the
    engine's optimiser, loss, batch order rule and early stopping (validation ROC AUC)."""
    started = time.monotonic()
    train, val, test = splits
    y = data.labels
    config = config_of(replace(NETWORK, seed=seed), loss)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    models = guest_models(x.shape[1], config)
    optimizer = make_optimizer(list(models.parameters()), config)
    order = BatchOrder(
        hashlib.sha256(f"fraud|{variant}|{seed}".encode()).digest(), batch_size=BATCH
    )
    pos_weight = resolve_pos_weight(config, y[train])

    @torch.no_grad()
    def scores(rows: np.ndarray) -> np.ndarray:
        models.eval()
        return task_scores(config.task, models.top(models.own_z(xt[rows])))

    history: list[float] = []
    best, best_state = -1, copy.deepcopy(models.state_dict())
    for epoch in range(epochs):
        models.train()
        for rows in order.epoch(train, epoch):
            optimizer.zero_grad()
            value = task_loss(
                config.task,
                models.top(models.own_z(xt[rows])),
                yt[rows],
                loss=config.loss,
                focal_gamma=config.focal_gamma,
                pos_weight=pos_weight,
            )
            torch.autograd.backward(value)
            optimizer.step()
        history.append(binary_metrics(y[val], scores(val))["roc_auc"])
        if best < 0 or history[-1] > history[best]:
            best, best_state = epoch, copy.deepcopy(models.state_dict())
        if len(history) - 1 - best >= PATIENCE:
            break
    models.load_state_dict(best_state)
    return Run(
        variant=variant,
        loss=loss,
        seed=seed,
        val_rows=val,
        test_rows=test,
        val_scores=scores(val),
        test_scores=scores(test),
        best_epoch=best,
        epochs_run=len(history),
        wall_s=time.monotonic() - started,
    )


def cv_brier(calibration: Calibration, y: np.ndarray, s: np.ndarray, seed: int) -> float:
    """The Brier score of ``calibration`` fitted on 4/5 of the validation rows and applied to
    the other fifth, over 5 stratified folds."""
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    squared = 0.0
    for fit_rows, held in folds.split(s, y):
        fitted = Decision.fit(
            DecisionConfig(calibration=calibration), labels=y[fit_rows], scores=s[fit_rows]
        )
        squared += float(np.sum((fitted.calibrate(s[held]) - y[held]) ** 2))
    return squared / len(y)


def summary(values: list[float]) -> dict[str, Any]:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "sd": sd, "values": [float(v) for v in values]}


def calibrated(
    run: Run, y: np.ndarray, calibration: Calibration
) -> tuple[dict[str, float], Decision]:
    """The test metrics of ``run``'s scores calibrated as the guest's J7 does it."""
    decision = Decision.fit(
        DecisionConfig(calibration=calibration),
        labels=y[run.val_rows],
        scores=run.val_scores,
    )
    return binary_metrics(y[run.test_rows], decision.calibrate(run.test_scores)), decision


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="seed 0, 1 epoch, no encryption")
    parser.add_argument("--out", type=Path, default=RESULTS / "fraud.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load_start = time.monotonic(), os.getloadavg()
    seeds = SEEDS[:1] if args.fast else SEEDS
    epochs = 1 if args.fast else EPOCHS
    losses = ("bce", "balanced") if args.fast else tuple(LOSSES)
    data = load_data()
    y = data.labels
    say(f"fraud: {len(y)} rows, {int(y.sum())} positives; seeds {list(seeds)}, {epochs} epochs")

    # 1. every variant × loss × seed, in plaintext (the protocol's fixed point) or plain torch
    runs: dict[tuple[str, str, int], Run] = {}
    models: dict[tuple[str, str, int], VerticalModel] = {}
    for seed in seeds:
        for loss in losses:
            for variant, base in (("joint", NETWORK), ("joint_linear", LINEAR)):
                run, model = protocol_run(data, variant, base, loss, seed, epochs=epochs)
                runs[variant, loss, seed], models[variant, loss, seed] = run, model
                say(
                    f"{variant:12s} {loss:8s} seed {seed}: kept epoch {run.best_epoch + 1} of "
                    f"{run.epochs_run}, validation PR AUC "
                    f"{binary_metrics(y[run.val_rows], run.val_scores)['pr_auc']:.4f} "
                    f"({run.wall_s:.0f} s)"
                )
        first = runs["joint", losses[0], seed]
        for loss in losses:  # every run of a seed splits the customers the same way
            other = runs["joint_linear", loss, seed]
            assert np.array_equal(np.sort(other.test_rows), np.sort(first.test_rows))
        held = np.zeros(len(y), dtype=bool)
        held[first.val_rows] = held[first.test_rows] = True
        splits = (np.flatnonzero(~held), first.val_rows, first.test_rows)
        xg = Preprocessor.fit(data.guest, splits[0]).transform(data.guest)
        xh = Preprocessor.fit(data.host, splits[0]).transform(data.host)
        for loss in losses:
            for variant, x in (("guest_only", xg), ("centralised", np.hstack([xg, xh]))):
                run = local_run(data, variant, x, splits, loss, seed, epochs=epochs)
                runs[variant, loss, seed] = run
                say(
                    f"{variant:12s} {loss:8s} seed {seed}: kept epoch {run.best_epoch + 1} of "
                    f"{run.epochs_run}, validation PR AUC "
                    f"{binary_metrics(y[run.val_rows], run.val_scores)['pr_auc']:.4f} "
                    f"({run.wall_s:.1f} s)"
                )

    # 2. choices on validation rows only: the loss, then the calibration
    selection: dict[str, Any] = {}
    for variant in VARIANTS:
        by_loss = {
            loss: summary(
                [
                    binary_metrics(y[r.val_rows], r.val_scores)["pr_auc"]
                    for r in (runs[variant, loss, s] for s in seeds)
                ]
            )
            for loss in losses
        }
        chosen = max(losses, key=lambda loss: by_loss[loss]["mean"])
        by_calibration = {
            c.value: summary(
                [
                    cv_brier(c, y[r.val_rows], r.val_scores, seed=s)
                    for s, r in ((s, runs[variant, chosen, s]) for s in seeds)
                ]
            )
            for c in CALIBRATIONS
        }
        calibration = min(CALIBRATIONS, key=lambda c: by_calibration[c.value]["mean"])
        selection[variant] = {
            "validation_pr_auc_by_loss": by_loss,
            "loss": chosen,
            "validation_cv_brier_by_calibration": by_calibration,
            "calibration": calibration.value,
        }
        say(f"{variant}: loss {chosen}, calibration {calibration.value} (validation)")

    # 3. the joint model's seed 0 encrypted, with the chosen loss and calibration
    encrypted: dict[str, Any] = {"run": False}
    joint_loss = selection["joint"]["loss"]
    joint_calibration = Calibration(selection["joint"]["calibration"])
    if not args.fast:
        say("joint seed 0 encrypted (2048-bit Paillier, P1): about 3 minutes per epoch")
        enc_run, enc_model = protocol_run(
            data,
            "joint",
            NETWORK,
            joint_loss,
            0,
            epochs=epochs,
            encrypted=True,
            decision=DecisionConfig(calibration=joint_calibration),
        )
        plain = runs["joint", joint_loss, 0]
        order = np.argsort(plain.test_rows)
        enc_order = np.argsort(enc_run.test_rows)
        assert np.array_equal(plain.test_rows[order], enc_run.test_rows[enc_order])
        diff = float(
            np.max(np.abs(plain.test_scores[order] - enc_run.test_scores[enc_order]), initial=0.0)
        )
        replayed, _ = calibrated(plain, y, joint_calibration)
        engine = enc_model.test_calibrated
        encrypted = {
            "run": True,
            "seed": 0,
            "key_bits": 2048,
            "mode": "p1",
            "wall_s": round(enc_run.wall_s, 1),
            "training_job_s": round(enc_model.seconds, 1),
            "epochs_run": enc_run.epochs_run,
            "kept_epoch": enc_run.best_epoch + 1,
            "history": list(enc_model.history),
            "encrypted_vs_plaintext_max_score_diff": diff,
            "engine_calibrated_vs_replayed_max_diff": max(
                abs(engine[k] - replayed[k]) for k in METRICS
            ),
            "decision": None if enc_model.decision is None else enc_model.decision.to_json(),
            "test_calibrated": engine,
        }
        say(
            f"encrypted: {enc_run.wall_s:.0f} s, max |score - plaintext score| {diff:.3g}, "
            f"calibrated PR AUC {engine['pr_auc']:.4f}"
        )

    # 4. test metrics of the chosen settings, calibrated on validation
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        loss = selection[variant]["loss"]
        calibration = Calibration(selection[variant]["calibration"])
        per_seed = []
        for seed in seeds:
            run = runs[variant, loss, seed]
            metrics, decision = calibrated(run, y, calibration)
            if variant == "joint" and seed == 0 and encrypted["run"]:
                metrics = encrypted["test_calibrated"]  # the engine's own, from the encrypted run
            raw = binary_metrics(y[run.test_rows], run.test_scores)
            per_seed.append((run, metrics, raw, decision))
        variants[variant] = {
            "loss": loss,
            "calibration": calibration.value,
            "training": (
                "seed 0 encrypted, seeds 1-2 plaintext mode (same fixed-point protocol code)"
                if variant == "joint" and encrypted["run"]
                else "plaintext mode (fit_vertical plaintext=True)"
                if variant.startswith("joint")
                else "plain torch, in one process"
            ),
            "test_calibrated": {k: summary([m[k] for _, m, _, _ in per_seed]) for k in METRICS},
            "test_raw": {k: summary([r[k] for _, _, r, _ in per_seed]) for k in METRICS},
            # what the targets read: ranking metrics of the model's own scores (calibration is
            # monotone; isotonic's steps only tie them), the Brier score after calibration
            "test": {
                k: summary([(m if k == "brier" else r)[k] for _, m, r, _ in per_seed])
                for k in METRICS
            },
            "kept_epoch": [run.best_epoch + 1 for run, _, _, _ in per_seed],
            "epochs_run": [run.epochs_run for run, _, _, _ in per_seed],
            "threshold_validation": [d.validation for _, _, _, d in per_seed],
            "wall_s": summary([run.wall_s for run, _, _, _ in per_seed]),
        }

    def mean(variant: str, metric: str, kind: str = "test") -> float:
        value: float = variants[variant][kind][metric]["mean"]
        return value

    joint_r5, guest_r5, central_r5 = (
        mean(v, "recall_at_fpr_5pct") for v in ("joint", "guest_only", "centralised")
    )
    joint_ap, central_ap = mean("joint", "pr_auc"), mean("centralised", "pr_auc")
    calibrated_brier, raw_brier = mean("joint", "brier"), mean("joint", "brier", "test_raw")
    targets = {
        "joint_recall_at_fpr_5pct_vs_guest_only": {
            "joint": joint_r5,
            "guest_only": guest_r5,
            "gain": joint_r5 - guest_r5,
            "target": "gain >= 0.05",
            "met": joint_r5 - guest_r5 >= 0.05,
        },
        "joint_recall_at_fpr_5pct_vs_centralised": {
            "joint": joint_r5,
            "centralised": central_r5,
            "shortfall": central_r5 - joint_r5,
            "target": "centralised - joint <= 0.03",
            "met": central_r5 - joint_r5 <= 0.03,
        },
        "joint_pr_auc_vs_centralised": {
            "joint": joint_ap,
            "centralised": central_ap,
            "relative_shortfall": (central_ap - joint_ap) / central_ap,
            "target": "joint >= 0.9 x centralised",
            "met": joint_ap >= 0.9 * central_ap,
        },
        "joint_calibrated_brier_vs_uncalibrated": {
            "calibrated": calibrated_brier,
            "uncalibrated": raw_brier,
            "target": "calibrated <= uncalibrated",
            "met": calibrated_brier <= raw_brier,
        },
    }
    first = runs["joint", losses[0], seeds[0]]
    protocol_walls = [r.wall_s for (v, _, _), r in runs.items() if v.startswith("joint")]
    out = {
        "git_commit": git_commit(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fast": args.fast,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
        "data": {
            "dataset": f"vfl.datasets.fraud(positive_rate={POSITIVE_RATE}, seed={DATA_SEED})",
            "rows": len(y),
            "positives": int(y.sum()),
            "overlap": "every customer at both parties (full overlap, aligned by the PSI)",
            "guest_features": GUEST_FEATURES.to_json(),
            "host_features": HOST_FEATURES.to_json(),
            "guest_input_columns": len(data.guest.input_columns),
            "host_input_columns": len(data.host.input_columns),
            "test_fraction": TEST_FRACTION,
            "validation_fraction": VALIDATION_FRACTION,
            "rows_per_split": {
                "train": int(len(y) - len(first.val_rows) - len(first.test_rows)),
                "validation": len(first.val_rows),
                "test": len(first.test_rows),
            },
            "test_positives": [int(y[runs["joint", losses[0], s].test_rows].sum()) for s in seeds],
            "validation_positives": [
                int(y[runs["joint", losses[0], s].val_rows].sum()) for s in seeds
            ],
        },
        "setting": {
            "seeds": list(seeds),
            "max_epochs": epochs,
            "batch": BATCH,
            "patience": PATIENCE,
            "early_stopping": "validation roc_auc (the engine's)",
            "network": config_to_json(NETWORK),
            "linear": config_to_json(LINEAR),
            "losses": {k: {n: str(v) for n, v in o.items()} for k, o in LOSSES.items()},
            "calibrations": [c.value for c in CALIBRATIONS],
            "threshold": "fpr rule, target 0.05 (DecisionConfig default)",
        },
        "selection": {
            "rule": "per variant: the loss with the highest mean validation PR AUC of the kept "
            "epoch over the seeds; then the calibration with the lowest mean 5-fold "
            "cross-validated Brier score on the validation rows' scores; test rows never used",
            **selection,
        },
        "variants": variants,
        "joint_uncalibrated_brier": variants["joint"]["test_raw"]["brier"],
        "encrypted": encrypted,
        "encrypted_vs_plaintext_max_score_diff": encrypted.get(
            "encrypted_vs_plaintext_max_score_diff"
        ),
        "targets": targets,
        "timings": {
            "plaintext_protocol_run_s": {
                "median": float(np.median(protocol_walls)),
                "min": float(np.min(protocol_walls)),
                "max": float(np.max(protocol_walls)),
                "runs": len(protocol_walls),
            },
            "encrypted_run_s": encrypted.get("wall_s"),
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    for variant in VARIANTS:
        f = variants[variant]["test"]
        print(
            f"{variant:12s} "
            + "  ".join(f"{k} {f[k]['mean']:.4f} ± {f[k]['sd']:.4f}" for k in METRICS),
            flush=True,
        )
    for name, target in targets.items():
        print(f"{name}: {'met' if target['met'] else 'MISSED'} {target}")
    say(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
