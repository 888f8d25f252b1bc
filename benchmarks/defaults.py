"""Split-NN defaults that travel: one setting chosen on three data sets, on validation only.

Today's defaults (``TrainConfig``: Adam 0.01, guest and host bottoms (16, 8), top (1,),
η_W = 0.1; job files: batch 256, 12 epochs, patience 3; ``fit_vertical``: batch 64, 10 epochs,
patience 3) were tuned on default_credit. This study looks for a setting that holds on

* ``breast`` (:func:`vfl.datasets.breast`, 569 rows, selection on validation ROC AUC),
* ``credit`` (:func:`vfl.datasets.credit`, 30,000 rows, validation ROC AUC),
* ``fraud`` (:func:`vfl.datasets.fraud`, 23,841 rows with 2 % positives, validation PR AUC =
  average precision), numeric columns only: the engine cannot encode its text and date
  columns yet.

Every run trains the float reference of the split network (:class:`FloatSplitModel`, both
parties' parts in one process, the protocol's seeds, batch order and order of updates) with
the default label protection (marvell, s = 16, persistent noise, at most 3 visits: the cap the
reference leaves out is applied here as :class:`GuestTrainer` applies it; the noise is seeded).
Seed ``s`` seeds the stratified 80/20 test split and the 10 % validation rows
(``split_rows``, as ``fit_vertical`` does), the model, ``W_0``, the host and the batch order.

Procedure (the test rows never choose anything):

1. every grid setting (learning rate × bottom widths × batch) runs on every data set and
   seed for up to ``MAX_EPOCHS`` epochs, stopping after ``MAX_PATIENCE`` epochs without a
   better validation ROC AUC (early stopping as the engine does it); the validation and test
   metrics of every epoch are recorded;
2. a budget (epochs E, patience P) is replayed from that record: the engine's rule stops at
   the same epoch and keeps the same one as a run with (E, P) would (P ≤ MAX_PATIENCE);
3. the setting: per data set, the mean validation figure over the seeds at the full budget;
   the recommended setting has the smallest worst shortfall from each data set's best
   setting, the shortfall counted as a share of that best setting's lift over no skill (0.5
   ROC AUC; the positive rate for PR AUC), ties to the mean rank (minimax);
4. the budget: the smallest E (then P) within ``TOLERANCE`` of the full budget's validation
   figure on every data set;
5. learning-rate halving (both parties' optimizers, whenever the validation log loss does
   not improve on its best) is adopted only if it raises the validation figure on every data
   set and by more than ``TOLERANCE`` on average;
6. test ROC AUC and PR AUC, mean ± sd over the seeds, for the recommendation and for today's
   two sets of defaults, side by side;
7. the recommendation once through the real protocol with the plaintext cipher (fixed-point
   arithmetic, ``vfl.fit_vertical(..., plaintext=True)``) on breast and fraud.

Writes ``benchmarks/results/defaults.json``. Run: ``python benchmarks/defaults.py`` (about
10 minutes of one core); ``--fast``: one seed, a tiny grid, no protocol run (a smoke run).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # benchmarks/psi.py would shadow the psi package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import itertools
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch

import vfl
from protocols.executor import InlineExecutor
from protocols.files import atomic_write
from vfl.common.metrics import binary_metrics
from vfl.data.tables import BatchOrder, ImputePolicy, PartyTable, Preprocessor, split_rows
from vfl.privacy.label_protection import ProtectConfig, RowNoise, protect
from vfl.simulate.common import party_table
from vfl.splitnn.training import (
    FloatSplitModel,
    TrainConfig,
    guest_backward,
    joint_init_component,
    protect_labels,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SEEDS = (0, 1, 2)
MAX_EPOCHS, MAX_PATIENCE = 16, 4
EPOCH_CHOICES, PATIENCE_CHOICES = (4, 8, 12, 16), (1, 2, 3, 4)
TOLERANCE = 0.002
TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.1


@dataclass(frozen=True)
class Grid:
    """Learning rates × bottom widths × batch sizes."""

    learning_rates: tuple[float, ...]
    widths: tuple[tuple[int, ...], ...]
    batches: tuple[int, ...]


GRID = Grid(learning_rates=(0.003, 0.01, 0.03), widths=((16, 8), (32, 16)), batches=(64, 256))
FAST = Grid(learning_rates=(0.01, 0.03), widths=((16, 8),), batches=(64, 256))


@dataclass(frozen=True)
class Setting:
    """One point of the grid (the same widths for the guest's and the host's bottom)."""

    learning_rate: float
    widths: tuple[int, ...]
    batch: int

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            learning_rate=self.learning_rate,
            guest_widths=self.widths,
            host_widths=self.widths,
            seed=seed,
        )

    def label(self) -> str:
        return f"lr={self.learning_rate} widths={self.widths} batch={self.batch}"


@dataclass(frozen=True)
class Budget:
    """Epochs and patience of early stopping."""

    epochs: int
    patience: int


DEFAULT_CONFIG = TrainConfig()
TODAY = {  # today's defaults: job files (vfl/splitnn/jobfile.py) and fit_vertical
    "job_file": (
        Setting(DEFAULT_CONFIG.learning_rate, DEFAULT_CONFIG.guest_widths, 256),
        Budget(12, 3),
    ),
    "fit_vertical": (
        Setting(DEFAULT_CONFIG.learning_rate, DEFAULT_CONFIG.guest_widths, 64),
        Budget(10, 3),
    ),
}


@dataclass(frozen=True)
class Data:
    """Both parties' numeric columns in one row order, and the validation figure's metric."""

    name: str
    guest: PartyTable
    host: PartyTable
    metric: str

    @property
    def labels(self) -> np.ndarray:
        assert self.guest.labels is not None
        return self.guest.labels


def numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """The id column and the numeric columns."""
    keep = [c for c in frame.columns if c == "id" or pd.api.types.is_numeric_dtype(frame[c])]
    return frame[keep]


def load(name: str) -> Data:
    """A data set by name, its parties' numeric columns aligned by id."""
    loaders: dict[str, Callable[[], tuple[pd.DataFrame, pd.DataFrame]]] = {
        "breast": vfl.datasets.breast,
        "credit": vfl.datasets.credit,
        "fraud": vfl.datasets.fraud,
    }
    guest_frame, host_frame = loaders[name]()
    guest = party_table(numeric(guest_frame), side="guest", id_column="id", label="y")
    host = party_table(
        numeric(host_frame), side="host", id_column="id", label=None, not_allowed="y"
    )
    position = pd.Series(np.arange(len(host)), index=host.ids)
    host = host.take(position.loc[guest.ids].to_numpy())
    metric = "average_precision" if name == "fraud" else "roc_auc"
    return Data(name=name, guest=guest, host=host, metric=metric)


class ProtocolFloatModel(FloatSplitModel):
    """:class:`FloatSplitModel` with the protocol's ``max_visits`` cap and seeded noise.

    Past the cap the guest sends ``δ̃ = 0``, as :meth:`GuestTrainer.step` does: ``W_h`` stays,
    and the host's optimizer still steps on a zero gradient. Set :attr:`capped` per epoch.
    """

    def __init__(self, *, noise_seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rng = np.random.default_rng(noise_seed)
        self.row_noise = RowNoise.draw(self.rng, k=self.config.k)
        self.capped = False

    def step(self, rows: np.ndarray) -> None:
        """:meth:`FloatSplitModel.step`, with ``δ̃ = 0`` when capped."""
        self.guest.train()
        self.host.train()
        self.opt_g.zero_grad()
        self.opt_h.zero_grad()
        alpha = self.host(self.xh[rows])
        a = torch.clamp(alpha.detach().double(), -self.config.a_max, self.config.a_max)
        z_own = self.guest.own_z(self.xg[rows])
        loss, delta = guest_backward(
            self.config.task, self.guest, (a @ self.w_h).float(), z_own, self.y[rows]
        )
        self.opt_g.step()
        self.losses.append(loss)
        if self.capped:
            d_t = torch.zeros(tuple(delta.shape), dtype=torch.float64)
        else:
            d_t = torch.tensor(
                protect(
                    delta.double().numpy(),
                    self.config.protect,
                    rng=self.rng,
                    labels=protect_labels(self.config.task, self.y[rows]),
                    state=self.marvell,
                    rows=rows,
                    row_noise=self.row_noise,
                )
            )
        g_h = d_t @ self.w_h.T
        self.w_h = self.w_h - self.config.eta_w * (a.T @ d_t)
        torch.autograd.backward(alpha, grad_tensors=g_h.float())
        self.opt_h.step()


def seeds_of(seed: int) -> dict[str, Any]:
    """Seed ``s``'s seeds of ``W_0``, the host and the batch order (as run_in_process takes
    them) and of the protection noise."""
    return {
        "w0_seed": 1000 + seed,
        "host_seed": 2000 + seed,
        "order_seed": seed.to_bytes(32, "big"),
        "noise_seed": 3000 + seed,
    }


def trajectory(data: Data, setting: Setting, seed: int, *, halving: bool) -> dict[str, Any]:
    """One float run: each epoch's validation and test metrics, until early stopping with
    ``MAX_PATIENCE`` (validation ROC AUC) or ``MAX_EPOCHS``."""
    started = time.process_time()
    y = data.labels
    splits = split_rows(
        y, test_fraction=TEST_FRACTION, validation_fraction=VALIDATION_FRACTION, seed=seed
    )
    config = setting.config(seed)
    s = seeds_of(seed)
    xg = Preprocessor.fit(data.guest, splits.train, impute=ImputePolicy.ERROR)
    xh = Preprocessor.fit(data.host, splits.train, impute=ImputePolicy.ERROR)
    model = ProtocolFloatModel(
        x_guest=xg.transform(data.guest),
        x_host=xh.transform(data.host),
        y=y,
        config=config,
        w0_guest=joint_init_component(config.d, config.k, seed=s["w0_seed"]),
        w0_host=joint_init_component(config.d, config.k, seed=s["host_seed"] + 1000),
        host_seed=s["host_seed"],
        noise_seed=s["noise_seed"],
    )
    order = BatchOrder(s["order_seed"], batch_size=setting.batch)
    cap = config.protect.max_visits if config.protect.adds_noise else 0
    record: dict[str, list[float]] = {
        k: [] for k in ("val_roc_auc", "val_ap", "val_log_loss", "test_roc_auc", "test_ap")
    }
    best, best_loss = -1, np.inf
    for epoch in range(MAX_EPOCHS):
        model.capped = bool(cap) and epoch >= cap
        for rows in order.epoch(splits.train, epoch):
            model.step(rows)
        val = binary_metrics(y[splits.validation], model.scores(splits.validation))
        test = binary_metrics(y[splits.test], model.scores(splits.test))
        for key, value in (
            ("val_roc_auc", val["roc_auc"]),
            ("val_ap", val["average_precision"]),
            ("val_log_loss", val["log_loss"]),
            ("test_roc_auc", test["roc_auc"]),
            ("test_ap", test["average_precision"]),
        ):
            record[key].append(value)
        if best < 0 or val["roc_auc"] > record["val_roc_auc"][best]:
            best = epoch
        if halving:
            if val["log_loss"] < best_loss:
                best_loss = val["log_loss"]
            else:
                for optimizer in (model.opt_g, model.opt_h):
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.5
        if epoch - best >= MAX_PATIENCE:
            break
    return {**record, "cpu_s": time.process_time() - started}


def kept_epoch(run: dict[str, Any], budget: Budget) -> tuple[int, int]:
    """The epoch the engine keeps under ``budget`` (replayed) and how many epochs it runs."""
    history = run["val_roc_auc"]
    best = -1
    for epoch in range(min(budget.epochs, len(history))):
        if best < 0 or history[epoch] > history[best]:
            best = epoch
        if epoch - best >= budget.patience:
            return best, epoch + 1
    assert len(history) >= budget.epochs, "a shorter record than the budget: patience too large"
    return best, budget.epochs


def figures(data: Data, runs: Sequence[dict[str, Any]], budget: Budget) -> dict[str, Any]:
    """Mean and sd over the seeds: validation figure, test ROC AUC and PR AUC, epochs run."""
    val_key = "val_ap" if data.metric == "average_precision" else "val_roc_auc"
    rows: dict[str, list[float]] = {
        "validation": [],
        "test_roc_auc": [],
        "test_pr_auc": [],
        "epochs": [],
        "kept": [],
    }
    for run in runs:
        kept, ran = kept_epoch(run, budget)
        rows["validation"].append(run[val_key][kept])
        rows["test_roc_auc"].append(run["test_roc_auc"][kept])
        rows["test_pr_auc"].append(run["test_ap"][kept])
        rows["epochs"].append(ran)
        rows["kept"].append(kept + 1)
    out: dict[str, Any] = {"validation_metric": data.metric}
    for key, values in rows.items():
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": float(np.mean(values)), "sd": sd, "values": values}
    return out


def no_skill(data: Data) -> float:
    """The validation figure of a constant score: 0.5 ROC AUC, or the positive rate."""
    return float(data.labels.mean()) if data.metric == "average_precision" else 0.5


def choose_setting(
    table: dict[str, dict[Setting, float]], baselines: dict[str, float], settings: Sequence[Setting]
) -> tuple[Setting, dict[str, Any]]:
    """The smallest worst shortfall over the data sets, each data set's shortfall a share of
    its best setting's lift over no skill; ties to the mean rank."""
    shortfall: dict[Setting, float] = {}
    rank: dict[Setting, float] = {s: 0.0 for s in settings}
    for name, values in table.items():
        best = max(values.values())
        ordered = sorted(settings, key=lambda s: -values[s])
        for s in settings:
            lost = (best - values[s]) / (best - baselines[name])
            shortfall[s] = max(shortfall.get(s, 0.0), lost)
            rank[s] += (ordered.index(s) + 1) / len(table)
    chosen = min(settings, key=lambda s: (round(shortfall[s], 6), rank[s]))
    scores = {
        s.label(): {"worst_share_of_lift_lost": shortfall[s], "mean_rank": rank[s]}
        for s in settings
    }
    return chosen, scores


def choose_budget(per_data: dict[str, Callable[[Budget], float]]) -> tuple[Budget, Any]:
    """The smallest epochs, then patience, within TOLERANCE of the full budget everywhere."""
    full = Budget(MAX_EPOCHS, MAX_PATIENCE)
    table = {
        f"{e}/{p}": {name: f(Budget(e, p)) for name, f in per_data.items()}
        for e, p in itertools.product(EPOCH_CHOICES, PATIENCE_CHOICES)
    }
    for e, p in itertools.product(EPOCH_CHOICES, PATIENCE_CHOICES):
        if all(f(Budget(e, p)) >= f(full) - TOLERANCE for f in per_data.values()):
            return Budget(e, p), table
    return full, table


def protocol_check(
    data_name: str, setting: Setting, budget: Budget, *, halving: bool
) -> dict[str, Any]:
    """The recommendation once through ``vfl.fit_vertical`` with the plaintext cipher."""
    guest, host = (numeric(f) for f in getattr(vfl.datasets, data_name)())
    started = time.monotonic()
    model = vfl.fit_vertical(
        guest=guest,
        host=host,
        label="y",
        epochs=budget.epochs,
        batch=setting.batch,
        plaintext=True,
        seed=0,
        model=setting.config(0),
        executor=InlineExecutor(),
        progress=False,
    )
    return {
        "test_roc_auc": model.test["roc_auc"],
        "test_pr_auc": model.test["average_precision"],
        "epochs": len(model.history),
        "kept": model.best_epoch + 1,
        "patience": 3,  # fit_vertical's (SplitJob's default); it takes no patience argument
        "lr_halving": False if halving else None,  # the engine has none
        "wall_s": round(time.monotonic() - started, 1),
    }


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def pm(f: dict[str, Any], key: str) -> str:
    return f"{f[key]['mean']:.4f} ± {f[key]['sd']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="one seed, tiny grid, no protocol")
    parser.add_argument("--out", type=Path, default=RESULTS / "defaults.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, cpu0 = time.monotonic(), time.process_time()
    grid = FAST if args.fast else GRID
    seeds = SEEDS[:1] if args.fast else SEEDS
    settings = [
        Setting(lr, w, b)
        for lr, w, b in itertools.product(grid.learning_rates, grid.widths, grid.batches)
    ]
    datasets = [load(name) for name in ("breast", "credit", "fraud")]
    for setting, _ in TODAY.values():  # today's defaults are in the grid
        assert args.fast or setting in settings

    runs: dict[tuple[str, Setting, bool], list[dict[str, Any]]] = {}

    def get(data: Data, setting: Setting, *, halving: bool = False) -> list[dict[str, Any]]:
        key = (data.name, setting, halving)
        if key not in runs:
            runs[key] = [trajectory(data, setting, s, halving=halving) for s in seeds]
            f = figures(data, runs[key], Budget(MAX_EPOCHS, MAX_PATIENCE))
            print(
                f"{data.name:7s} {setting.label():42s} halving={halving!s:5s} "
                f"validation {pm(f, 'validation')}  epochs {f['epochs']['mean']:.1f}  "
                f"cpu {sum(r['cpu_s'] for r in runs[key]):.1f} s",
                flush=True,
            )
        return runs[key]

    full = Budget(MAX_EPOCHS, MAX_PATIENCE)
    validation = {
        d.name: {s: figures(d, get(d, s), full)["validation"]["mean"] for s in settings}
        for d in datasets
    }
    baselines = {d.name: no_skill(d) for d in datasets}
    chosen, setting_scores = choose_setting(validation, baselines, settings)

    def chosen_validation(data: Data) -> Callable[[Budget], float]:
        return lambda b: float(figures(data, get(data, chosen), b)["validation"]["mean"])

    budget, budget_table = choose_budget({d.name: chosen_validation(d) for d in datasets})
    with_halving = {
        d.name: {
            "without": figures(d, get(d, chosen), budget)["validation"]["mean"],
            "with": figures(d, get(d, chosen, halving=True), budget)["validation"]["mean"],
        }
        for d in datasets
    }
    gains = [v["with"] - v["without"] for v in with_halving.values()]
    halving = min(gains) > 0 and float(np.mean(gains)) > TOLERANCE

    candidates = {"recommended": (chosen, budget, halving)}
    candidates.update({f"today_{k}": (s, b, False) for k, (s, b) in TODAY.items()})
    per_data: dict[str, Any] = {}
    for d in datasets:
        per_data[d.name] = {
            "rows": len(d.guest),
            "positives": int(d.labels.sum()),
            "guest_columns": len(d.guest.columns),
            "host_columns": len(d.host.columns),
            "validation_by_setting": {
                s.label(): figures(d, get(d, s), full)["validation"] for s in settings
            },
            "lr_halving_validation": with_halving[d.name],
            "compared": {
                name: {
                    "setting": asdict(s),
                    "budget": asdict(b),
                    "lr_halving": h,
                    **figures(d, get(d, s, halving=h), b),
                }
                for name, (s, b, h) in candidates.items()
            },
        }
    grid_cpu_s = time.process_time() - cpu0
    print(
        f"\nrecommended: {chosen.label()} epochs={budget.epochs} patience={budget.patience} "
        f"lr_halving={halving}  (grid: {grid_cpu_s:.0f} s of CPU)"
    )
    for d in datasets:
        for name, f in per_data[d.name]["compared"].items():
            print(
                f"{d.name:7s} {name:20s} validation {d.metric} {pm(f, 'validation')}  "
                f"test ROC AUC {pm(f, 'test_roc_auc')}  test PR AUC {pm(f, 'test_pr_auc')}  "
                f"epochs {f['epochs']['mean']:.1f}"
            )
    protocol: dict[str, Any] = {}
    if not args.fast:
        for name in ("breast", "fraud"):
            protocol[name] = protocol_check(name, chosen, budget, halving=halving)
            print(f"fit_vertical plaintext {name}: {protocol[name]}", flush=True)
    out = {
        "git_commit": git_commit(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "fast": args.fast,
        "grid": {
            "learning_rate": list(grid.learning_rates),
            "widths": [list(w) for w in grid.widths],
            "batch": list(grid.batches),
            "epochs": list(EPOCH_CHOICES),
            "patience": list(PATIENCE_CHOICES),
            "max_epochs": MAX_EPOCHS,
            "max_patience": MAX_PATIENCE,
            "lr_halving": [False, True],
        },
        "seeds": list(seeds),
        "fixed": {
            "d": DEFAULT_CONFIG.d,
            "k": DEFAULT_CONFIG.k,
            "top_widths": list(DEFAULT_CONFIG.top_widths),
            "optimizer": DEFAULT_CONFIG.optimizer,
            "eta_w": DEFAULT_CONFIG.eta_w,
            "protect": {k: str(v) for k, v in asdict(ProtectConfig()).items()},
            "test_fraction": TEST_FRACTION,
            "validation_fraction": VALIDATION_FRACTION,
            "early_stopping_metric": "validation roc_auc (the engine's)",
        },
        "selection": {
            "setting_rule": "smallest worst shortfall of the mean validation figure (full "
            "budget) from each data set's best setting, as a share of that best setting's lift "
            "over no skill (0.5 ROC AUC, the positive rate for PR AUC); ties to the mean rank",
            "no_skill": baselines,
            "budget_rule": f"smallest epochs, then patience, within {TOLERANCE} of the full "
            "budget's mean validation figure on every data set",
            "halving_rule": f"adopted if it raises every data set's mean validation figure and "
            f"the mean gain exceeds {TOLERANCE}",
            "setting_scores": setting_scores,
            "budget_validation": budget_table,
        },
        "recommendation": {
            "learning_rate": chosen.learning_rate,
            "guest_widths": list(chosen.widths),
            "host_widths": list(chosen.widths),
            "batch": chosen.batch,
            "epochs": budget.epochs,
            "patience": budget.patience,
            "lr_halving": halving,
        },
        "datasets": per_data,
        "protocol_plaintext": protocol,
        "grid_cpu_s": round(grid_cpu_s, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, (json.dumps(out, indent=2) + "\n").encode())
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
