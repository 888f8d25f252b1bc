"""Model quality of the encrypted split network on default_credit_hetero (issue 5).

Setting: stratified 80/20 test split with seed 0 (test rows untouched until the end),
validation = 10 % of the training rows (early stopping on validation AUC, never on test),
at most 12 epochs, d = k = 8, label protection ``none`` (with its allow flag) for the
comparison. The same architecture, seeds and batch order are trained

* ``encrypted``: P1, 2048-bit Paillier, guest, host and arbiter sessions in this process;
* ``fixedpoint``: the very same protocol code with the plaintext cipher (same integers);
* ``plaintext``: float64/float32 torch, both parties' parts in one model (no protocol);
* ``guest_only``: the guest's bottom and top model on its own features;

plus the encrypted model with the default label protection. Writes
``benchmarks/results/quality.json`` and prints the figures.

Run: ``python -m benchmarks.quality`` (the two encrypted trainings take most of an hour on
2 cores); ``--fast`` skips them to tune in the fast paths.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from protocols.executor import Executor, InlineExecutor, LocalProcessExecutor
from protocols.files import atomic_write
from vfl.common.metrics import binary_metrics
from vfl.data.datasets import data_dir, verify
from vfl.data.preprocess import Preprocessor
from vfl.data.tables import (
    BatchOrder,
    PartyTable,
    Splits,
    TableSpec,
    load_table,
    split_rows,
)
from vfl.models.split import Task, loss_for
from vfl.privacy.label_protection import ProtectConfig, ProtectMode
from vfl.splitnn.inprocess import run_in_process
from vfl.splitnn.job import SplitJob
from vfl.splitnn.training import (
    FloatSplitModel,
    GuestModels,
    TrainConfig,
    joint_init_component,
    make_optimizer,
)

RESULTS = Path(__file__).resolve().parent / "results"
W0_SEED, HOST_SEED, ORDER_SEED = 11, 5, bytes(range(32))
PROTECT_OFF = ProtectConfig(mode=ProtectMode.NONE, allow_label_leak=True)

CONFIG = TrainConfig(  # tuned in the float path: 0.774 ± 0.002 test AUC over 10 seeds
    d=8,
    k=8,
    guest_widths=(32, 16),
    host_widths=(32, 8),
    top_widths=(1,),
    learning_rate=0.03,
    eta_w=0.1,
    protect=PROTECT_OFF,
    seed=0,
)
BATCH, BATCH_EVAL, EPOCHS, PATIENCE = 256, 1024, 12, 2


def load_data() -> tuple[PartyTable, PartyTable, Splits]:
    """Both parties' tables in one row order (the ids are the same customers), and splits."""
    folder = data_dir(os.environ)
    guest = load_table(
        TableSpec(
            path=verify("default_credit_hetero_guest.csv", folder=folder).path, label_column="y"
        )
    )
    host = load_table(TableSpec(path=verify("default_credit_hetero_host.csv", folder=folder).path))
    position = pd.Series(np.arange(len(host)), index=host.ids)
    host = host.take(position.loc[guest.ids].to_numpy())
    assert (host.ids == guest.ids).all() and guest.labels is not None
    return guest, host, split_rows(guest.labels, test_fraction=0.2, validation_fraction=0.1, seed=0)


def _early_stopped(
    train_epoch: Any,
    val_scores: Any,
    test_scores: Any,
    state: Any,
    load: Any,
    y: np.ndarray,
    splits: Splits,
) -> dict[str, Any]:
    """Epochs with validation, patience, best state restored, then the test rows once."""
    history: list[float] = []
    best, best_state = -1, None
    for epoch in range(EPOCHS):
        train_epoch(epoch)
        history.append(binary_metrics(y[splits.validation], val_scores())["roc_auc"])
        if best < 0 or history[-1] > history[best]:
            best, best_state = epoch, copy.deepcopy(state())
        if epoch - best >= PATIENCE:
            break
    load(best_state)
    return {
        "history": history,
        "best_epoch": best,
        "test": binary_metrics(y[splits.test], test_scores()),
    }


def float_split(
    guest: PartyTable, host: PartyTable, splits: Splits, config: TrainConfig
) -> dict[str, Any]:
    """The plaintext split model with the protocol's seeds and batch order."""
    assert guest.labels is not None
    xg = Preprocessor.fit(guest, splits.train).transform(guest)
    xh = Preprocessor.fit(host, splits.train).transform(host)
    model = FloatSplitModel(
        x_guest=xg,
        x_host=xh,
        y=guest.labels,
        config=config,
        w0_guest=joint_init_component(config.d, config.k, seed=W0_SEED),
        w0_host=joint_init_component(config.d, config.k, seed=HOST_SEED + 1000),
        host_seed=HOST_SEED,
    )
    order = BatchOrder(ORDER_SEED, batch_size=BATCH)

    def train_epoch(epoch: int) -> None:
        for rows in order.epoch(splits.train, epoch):
            model.step(rows)

    def state() -> Any:
        return (model.guest.state_dict(), model.host.state_dict(), model.w_h.clone())

    def load(s: Any) -> None:
        model.guest.load_state_dict(s[0])
        model.host.load_state_dict(s[1])
        model.w_h = s[2]

    return _early_stopped(
        train_epoch,
        lambda: model.scores(splits.validation),
        lambda: model.scores(splits.test),
        state,
        load,
        guest.labels,
        splits,
    )


def guest_only(guest: PartyTable, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """The guest's own bottom, ``W_g`` and top model on its features alone."""
    assert guest.labels is not None
    x = torch.tensor(
        Preprocessor.fit(guest, splits.train).transform(guest),
        dtype=torch.float32,
    )
    y = torch.tensor(guest.labels, dtype=torch.float32)
    models = GuestModels(x.shape[1], config)
    opt = make_optimizer(list(models.parameters()), config)
    loss_fn = loss_for(Task.BINARY)
    order = BatchOrder(ORDER_SEED, batch_size=BATCH)

    def train_epoch(epoch: int) -> None:
        models.train()
        for rows in order.epoch(splits.train, epoch):
            opt.zero_grad()
            loss = loss_fn(models.top(models.own_z(x[rows])).squeeze(1), y[rows])
            loss.backward()
            opt.step()

    @torch.no_grad()
    def scores(rows: np.ndarray) -> np.ndarray:
        models.eval()
        return torch.sigmoid(models.top(models.own_z(x[rows])).squeeze(1)).double().numpy()

    return _early_stopped(
        train_epoch,
        lambda: scores(splits.validation),
        lambda: scores(splits.test),
        models.state_dict,
        models.load_state_dict,
        guest.labels,
        splits,
    )


def protocol(
    guest: PartyTable,
    host: PartyTable,
    splits: Splits,
    config: TrainConfig,
    *,
    encrypted: bool,
    executor: Executor,
    pool_executor: Executor | None = None,
) -> dict[str, Any]:
    """A job through the sessions, encrypted or with the plaintext cipher."""
    job = SplitJob(
        job_id=f"quality-{'enc' if encrypted else 'fxp'}-{config.protect.mode.value}",
        train=config,
        batch=BATCH,
        batch_eval=BATCH_EVAL,
        epochs=EPOCHS,
        patience=PATIENCE,
        encrypted=encrypted,
    )
    started = time.monotonic()
    run = run_in_process(
        job=job,
        guest_table=guest,
        host_table=host,
        splits=splits,
        executor=executor,
        w0_seed=W0_SEED,
        order_seed=ORDER_SEED,
        host_seed=HOST_SEED,
        pool_executor=pool_executor,
    )
    result = run.result
    return {
        "history": [m["roc_auc"] for m in result.history],
        "best_epoch": result.best_epoch,
        "test": result.test,
        "test_scores": result.test_scores,
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="skip the encrypted trainings")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    guest, host, splits = load_data()
    out: dict[str, Any] = {"dataset": "default_credit_hetero", "max_epochs": EPOCHS}
    runs: dict[str, Any] = {}
    runs["plaintext"] = float_split(guest, host, splits, CONFIG)
    runs["guest_only"] = guest_only(guest, splits, CONFIG)
    runs["fixedpoint"] = protocol(
        guest, host, splits, CONFIG, encrypted=False, executor=InlineExecutor()
    )
    for name, r in runs.items():
        print(
            f"{name:22s} test AUC {r['test']['roc_auc']:.4f}  "
            f"validation AUC by epoch {[round(v, 4) for v in r['history']]}"
        )
    if not args.fast:
        with LocalProcessExecutor() as executor, LocalProcessExecutor(nice=10) as background:
            runs["encrypted"] = protocol(
                guest,
                host,
                splits,
                CONFIG,
                encrypted=True,
                executor=executor,
                pool_executor=background,
            )
            print(f"encrypted test AUC {runs['encrypted']['test']['roc_auc']:.4f}")
            default = replace(CONFIG, protect=ProtectConfig())
            runs["default_protection"] = protocol(
                guest,
                host,
                splits,
                default,
                encrypted=True,
                executor=executor,
                pool_executor=background,
            )
    enc = runs.get("encrypted", runs["fixedpoint"])
    out.update(
        {
            "epochs": len(enc["history"]),
            "encrypted_test_auc": runs["encrypted"]["test"]["roc_auc"]
            if "encrypted" in runs
            else None,
            "fixedpoint_test_auc": runs["fixedpoint"]["test"]["roc_auc"],
            "plaintext_test_auc": runs["plaintext"]["test"]["roc_auc"],
            "guest_only_test_auc": runs["guest_only"]["test"]["roc_auc"],
            "default_protection_test_auc": (
                runs["default_protection"]["test"]["roc_auc"]
                if "default_protection" in runs
                else None
            ),
            "default_protection": ProtectConfig().mode.value,
        }
    )
    if "encrypted" in runs:
        a, b = (
            np.array(runs["encrypted"]["test_scores"]),
            np.array(runs["fixedpoint"]["test_scores"]),
        )
        out["max_score_diff_encrypted_vs_fixedpoint"] = float(np.max(np.abs(a - b)))
        out["encrypted_minus_plaintext_auc"] = out["encrypted_test_auc"] - out["plaintext_test_auc"]
    out["targets"] = {"encrypted_test_auc": 0.765, "vs_fixedpoint": 1e-6, "vs_plaintext": 0.005}
    out["config"] = {
        "batch": BATCH,
        "batch_eval": BATCH_EVAL,
        "patience": PATIENCE,
        "model": {k: v for k, v in CONFIG.__dict__.items() if k != "protect"},
    }
    out["runs"] = {
        name: {k: v for k, v in r.items() if k != "test_scores"} for name, r in runs.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2, default=str) + "\n").encode())
    for key in (
        "epochs",
        "encrypted_test_auc",
        "fixedpoint_test_auc",
        "plaintext_test_auc",
        "guest_only_test_auc",
        "default_protection_test_auc",
    ):
        print(f"{key:30s} {out[key]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
